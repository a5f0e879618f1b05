"""In-place reuse in the memory planner (codegen/memory.py inplace_pairs): an elementwise kernel's
output shares the arena slot of an operand that dies at it, only where the operand is read at the
output's own index. plan.json records it ("inplace_of"), the overlap checker allows exactly that
overlap and nothing more, the aliased kernel drops __restrict__ and compiles with NVRTC, and the
plan still gives the interpreter's outputs bit for bit in its arena (codegen/plan_exec.py; the light
models and examples run with in-place on in tests/codegen/test_plan_exec.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from nnc.codegen import memory
from nnc.codegen.lower import lower
from nnc.codegen.memory import ArenaOverlapError, Interval, check_placement
from nnc.codegen.plan_exec import PlanExecutor
from nnc.ir.interp import Interpreter
from nnc.onnx_import import import_model, parse_shapes
from nnc.pipeline import run_passes

ROOT = Path(__file__).resolve().parents[2]


def _model():
    """a = Relu(x) [1,16] (broadcast into the Add), b = Relu(y) [16,16] (same shape), c = Add(a, b),
    out = Neg(c): no fusion, so every op is one elementwise kernel over temps."""
    f = TensorProto.FLOAT
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["y"], ["b"]),
         helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Neg", ["c"], ["out"])],
        "g", [helper.make_tensor_value_info("x", f, [1, 16]), helper.make_tensor_value_info("y", f, [16, 16])],
        [helper.make_tensor_value_info("out", f, [16, 16])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _by_name(plan):
    return {b.name: b for b in plan.buffers}


def test_broadcast_input_is_never_reused_and_the_same_shape_one_is():
    m = import_model(_model())
    plan = lower(m, {"arch": "sm_90"})
    b = _by_name(plan)
    assert b["c"].inplace_of == b["b"].id  # b dies at the Add and is read at the output's index
    assert b["c"].inplace_of != b["a"].id and b["c"].offset == b["b"].offset
    assert b["a"].offset + memory.align(b["a"].nbytes) <= b["c"].offset or b["c"].offset + b["c"].nbytes <= b["a"].offset
    # the broadcast operand alone: never a candidate, whatever else holds
    first, last = memory.liveness(plan)
    assert all(i != b["a"].id for _, i, _ in memory.inplace_pairs(plan, first, last))
    assert plan.memory["inplace_bytes"] > 0
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((1, 16)).astype(np.float32), "y": rng.standard_normal((16, 16)).astype(np.float32)}
    np.testing.assert_array_equal(PlanExecutor.from_plan(plan, m).run(feed)["out"], Interpreter(m).run(feed)["out"])


def test_strided_input_of_the_same_shape_is_not_reused(monkeypatch):
    """A kernel that reads an input at other indices (template strides set, as a blocked quantize
    scale or a broadcast has) never writes over it, even with matching shape and dtype."""
    m = import_model(_model())
    plan = lower(m, {"arch": "sm_90"})
    b = _by_name(plan)
    first, last = memory.liveness(plan)
    for k in plan.kernels.values():
        for p in k.params.get("inputs", []):
            p["strides"] = [16, 1]
    assert memory.inplace_pairs(plan, first, last) == []
    assert b["c"].inplace_of is not None  # (the first plan did reuse: the strides alone decide)


def test_planner_without_inplace_matches_before():
    m = import_model(_model())
    plan = lower(m, {"arch": "sm_90"})
    with_ip = plan.memory["arena_bytes"]
    memory.plan_memory(plan, inplace=False)
    assert all(b.inplace_of is None for b in plan.buffers)
    assert plan.memory["arena_bytes"] > with_ip and plan.memory["inplace_bytes"] == 0


def test_checker_allows_exactly_the_inplace_overlap():
    iv = [Interval(0, 2, 512), Interval(2, 4, 512), Interval(1, 3, 256)]
    check_placement(iv, [0, 0, 512], inplace=[(0, 1)])
    with pytest.raises(ArenaOverlapError, match="live together"):
        check_placement(iv, [0, 0, 512])  # not declared in place
    with pytest.raises(ArenaOverlapError, match="not the same slot"):
        check_placement(iv, [0, 256, 768], inplace=[(0, 1)])  # partial overlap of a pair
    with pytest.raises(ArenaOverlapError, match="live together"):
        check_placement(iv, [0, 0, 256], inplace=[(0, 1)])  # a third buffer over the pair
    with pytest.raises(ArenaOverlapError, match="live together"):
        check_placement(iv[:2] + [Interval(1, 3, 512)], [256, 256, 0], inplace=[(0, 1)])  # ... from below


def test_inplace_kernel_drops_restrict_and_compiles(tmp_path):
    from nnc.codegen.emit import compile_to_dir
    m = import_model(_model())
    pj = compile_to_dir(m, tmp_path, arch="sm_90")
    assert any(b.get("inplace_of") is not None for b in pj["buffers"])
    assert "_inplace" in (tmp_path / "model.cu").read_text() and pj["cubins"]  # NVRTC compiled it
    plan = lower(import_model(_model()), {"arch": "sm_90"})
    aliased = [k for k in plan.kernels.values() if "_inplace" in k.name]
    assert aliased
    for k in aliased:
        decl = k.body[:k.body.index("int64_t n)")]
        ins = [i for i, p in enumerate(k.params["inputs"]) if p.get("aliased")]
        outs = [i for i, p in enumerate(k.params["outputs"]) if p.get("aliased")]
        assert ins and outs
        for i in ins:
            assert f"__restrict__ in{i}," not in decl and f"in{i}," in decl
        for i in outs:
            assert f"__restrict__ out{i}," not in decl and f"out{i}," in decl
    used = {l.kernel for l in plan.launches if l.kind == "kernel"}
    assert set(plan.kernels) == used  # no kernel left behind unlaunched


def test_tiny_cnn_writes_in_place_and_shrinks():
    m = import_model(str(ROOT / "examples" / "tiny_cnn.onnx"), shapes=parse_shapes("input:1x3x32x32"))
    run_passes(m)
    plan = lower(m, {"arch": "sm_90"})
    after = plan.memory["arena_bytes"]
    assert plan.memory["inplace_bytes"] > 0 and after <= plan.memory["naive_bytes"]
    memory.plan_memory(plan, inplace=False)
    assert after < plan.memory["arena_bytes"]  # measured: 131072 -> 81920 B


@pytest.mark.gpu
@pytest.mark.parametrize("name,shapes", [("_model", ""), ("tiny_cnn", "input:1x3x32x32"), ("tiny_transformer", "")])
def test_gpu_inplace_plan_matches_interpreter(name, shapes, tmp_path):
    """On the GPU the aliased kernels (no __restrict__) write over their dying operands: outputs
    match the interpreter, arena poisoned."""
    import nnc
    from nnc.codegen.emit import compile_to_dir
    m = import_model(_model() if name == "_model" else str(ROOT / "examples" / f"{name}.onnx"),
                     shapes=parse_shapes(shapes))
    if name != "_model":  # _model is the unfused chain of the CPU test above: fusion would merge it
        run_passes(m)
    pj = compile_to_dir(m, tmp_path, arch=None)
    assert any(b.get("inplace_of") is not None for b in pj["buffers"])
    g = nnc.load(tmp_path)
    rng = np.random.default_rng(0)
    for _ in range(2):
        feed = {a.name: rng.standard_normal([int(d) for d in a.type.shape]).astype(a.type.dtype.np) for a in m.main.args}
        ref = Interpreter(m).run(feed)
        got = g.run(feed, output="numpy", poison=True)
        for k, v in ref.items():
            np.testing.assert_allclose(np.asarray(got[k]), v, rtol=1e-4, atol=1e-5, err_msg=f"{name}/{k}")
