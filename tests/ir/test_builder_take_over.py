"""Builder.take_over_or_roll_back: the new op takes over the old result when the types agree;
otherwise everything built since the mark is gone (ops, their names), the old op stays, and the
module still verifies. The rewriting passes (fold-qdq, quantize-fp8, quantize-weights-int4,
sparsify-weights-24) rely on exactly this."""
import numpy as np
import pytest

from nnc.passes import dce
from nnc.ir import WeightStore, parse, print_module, verify
from nnc.ir.builder import Builder
from nnc.ir.graph import NameGen, Region, users, value_names

TEXT = """func @main(%x: f32[2,3]) -> (f32[2,3]) {
  %a = Relu(%x) : f32[2,3]
  %b = Neg(%a) : f32[2,3]
  return %b
}
"""


def _rewrite_relu(build):
    """Offers the Relu to `build(builder, relu) -> Value`, the way the passes' region walks do;
    returns (module, took_over, builder)."""
    module = parse(TEXT)
    if module.weights is None:
        module.weights = WeightStore()
    f = module.main
    new_ops: list = []
    b = Builder(Region([], new_ops, []), module.weights, NameGen(value_names(module)))
    took = None
    for op in f.ops:
        if op.name == "Relu":
            start = b.mark()
            took = b.take_over_or_roll_back(op.results[0], build(b, op), start, loc=op.loc)
            if took:
                continue
        new_ops.append(op)
    f.ops = new_ops
    return module, took, b


def test_matching_type_takes_over_the_result():
    def build(b, relu):
        return b.create("Abs", [relu.operands[0]], names=["a"], loc=relu.loc)[0]

    module, took, b = _rewrite_relu(build)
    assert took
    verify(module)
    f = module.main
    assert [op.name for op in f.ops] == ["Abs", "Neg"]
    abs_op, neg = f.ops
    assert abs_op.results[0] is neg.operands[0] and abs_op.results[0].producer is abs_op
    assert abs_op.results[0].name == "a"
    assert "a_0" not in b.names.taken  # the fresh result's name was given back


def test_mismatched_type_rolls_back_everything_built_since_the_mark():
    built = []

    def build(b, relu):
        # a constant big enough for the weight store and two ops, ending in f16[4,2,3]: not f32[2,3]
        c = b.constant(np.ones((4, 2, 3), np.float32), "c", relu.loc, weight_hint="c")
        s = b.create("Add", [relu.operands[0], c], names=["sum"], loc=relu.loc)[0]
        h = b.create("Cast", [s], {"to": "f16"}, names=["half"], loc=relu.loc)[0]
        built.extend([c.name, s.name, h.name])
        return h

    module, took, b = _rewrite_relu(build)
    assert took is False
    verify(module)
    assert print_module(module) == print_module(parse(TEXT))  # the original op stayed
    f = module.main
    assert [op.name for op in f.ops] == ["Relu", "Neg"]
    assert f.ops[0].results[0].producer is f.ops[0]
    # no op reads x but the Relu: nothing rolled back is left reading live values
    assert users(f)[id(f.args[0])] == [f.ops[0]]
    assert not any(n in b.names.taken for n in built), "rolled-back names must be free again"
    # the constant's weight is unread now: DCE drops it, as it does for the passes
    assert "c" in module.weights
    dce.run(module)
    assert "c" not in module.weights
    verify(module)


def _one_op_then_mark(name: str):
    """(the Relu's result, builder, its op list, an Abs of x built before the mark, the mark)."""
    module = parse(TEXT)
    f = module.main
    new_ops: list = []
    b = Builder(Region([], new_ops, []), WeightStore(), NameGen(value_names(module)))
    early = b.create("Abs", [f.args[0]], names=[name])[0]
    return f.ops[0].results[0], b, new_ops, early, b.mark()


def test_ops_before_the_mark_stay():
    relu_out, b, new_ops, kept, start = _one_op_then_mark("kept")
    h = b.create("Cast", [kept], {"to": "f16"}, names=["half"])[0]
    assert not b.take_over_or_roll_back(relu_out, h, start)
    assert new_ops == [kept.producer] and "kept" in b.names.taken and "half" not in b.names.taken


def test_a_value_not_built_since_the_mark_is_refused():
    relu_out, b, _, early, start = _one_op_then_mark("early")
    with pytest.raises(AssertionError, match="not the result of an op built since the mark"):
        b.take_over_or_roll_back(relu_out, early, start)
