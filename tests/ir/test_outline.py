"""Outlining groups into `fused` ops (ir/outline.py, ir/ops/fused.py): the printed IR parses back
identically, verifies, and the interpreter gives the same outputs before and after."""
import numpy as np
import pytest
from onnx import TensorProto, helper

from nnc.ir.equal import first_difference
from nnc.ir.errors import NncError
from nnc.ir.interp import Interpreter
from nnc.ir.outline import Outliner
from nnc.ir.parser import parse
from nnc.ir.printer import print_module
from nnc.ir.verify import verify
from nnc.onnx_import import import_model


def chain_model():
    """x -> Add(b) -> Relu -> (r) ; r -> Mul(x) -> y ; r also an output; Sigmoid(x) between."""
    nodes = [helper.make_node("Add", ["x", "b"], ["s"], name="add"),
             helper.make_node("Sigmoid", ["x"], ["g"], name="sig"),
             helper.make_node("Relu", ["s"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "g"], ["y"], name="mul")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
                                       helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
                           helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 3])])
    return import_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10))


def _ops(m):
    return {op.loc.node: op for op in m.main.ops}


def test_outline_keeps_outputs_names_and_semantics(rng):
    m = chain_model()
    feed = {"x": rng.standard_normal((2, 3)).astype(np.float32), "b": rng.standard_normal((2, 3)).astype(np.float32)}
    before = Interpreter(m).run(feed)
    ops = _ops(m)
    out = Outliner(m.main, module=m)
    group = [ops["add"], ops["relu"], ops["mul"]]
    assert out.can_outline(group)
    f = out.outline(group, kind="elementwise")
    out.finish()
    verify(m)
    assert [r.name for r in f.results] == ["r", "y"]  # r is returned, y is returned: both leave
    assert [op.name for op in m.main.ops] == ["Sigmoid", "fused"]
    text = print_module(m)
    assert 'kind = "elementwise"' in text and "body = region(" in text
    m2 = parse(text)
    m2.weights = m.weights
    assert print_module(m2) == text and first_difference(m, m2) is None
    after = Interpreter(m2).run(feed)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_non_convex_group_is_refused():
    m = chain_model()
    ops = _ops(m)
    out = Outliner(m.main, module=m)
    # add -> relu with the Sigmoid between them is fine; add + mul without relu is not convex:
    # relu (outside) reads add's result and mul (inside) reads relu's, so relu would come too late
    assert not out.can_outline([ops["add"], ops["mul"]])
    with pytest.raises(ValueError):
        out.outline([ops["add"], ops["mul"]], kind="elementwise")


def test_fused_body_must_be_closed():
    text = """func @main(%x: f32[4]) -> (f32[4]) {
  %y = fused(%x) {body = region(%a: f32[4]) {
    %z = Relu(%x) : f32[4]
    return %z
  }, kind = "elementwise"} : f32[4]
  return %y
}
"""
    with pytest.raises(NncError, match="outside"):
        verify(parse(text))
