"""Data-dependent sizes downstream of NonZero (issue 10, codegen/data_dependent.py): NonZero ->
Transpose -> GatherND -> Relu -> ReduceSum lowers for CUDA with NonZero's count as a runtime size
symbol bound at its read-back. CPU: the plan runs in its arena (codegen/plan_exec.py) exactly like
the interpreter on inputs with every count from 0 to all, and its kernels compile with NVRTC. GPU:
the generated kernels against the interpreter on fresh random inputs (poisoned outputs)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T, helper as h

from nnc.codegen.lower import lower
from nnc.codegen.options import LowerOptions
from nnc.codegen.plan_exec import PlanExecutor
from nnc.codegen.target import resolve_target
from nnc.ir.errors import NncError
from nnc.ir.interp import Interpreter
from nnc.onnx_import import import_model
from nnc.pipeline import run_passes


def nonzero_gather_model(shape=(4, 5)) -> onnx.ModelProto:
    """x -> NonZero -> Transpose(1, 0) -> GatherND(x, .) -> Relu (output r, length = the count)
    -> ReduceSum (output s)."""
    nodes = [h.make_node("NonZero", ["x"], ["nz"]),
             h.make_node("Transpose", ["nz"], ["idx"], perm=[1, 0]),
             h.make_node("GatherND", ["x", "idx"], ["vals"]),
             h.make_node("Relu", ["vals"], ["r"]),
             h.make_node("ReduceSum", ["r"], ["s"], keepdims=0)]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, list(shape))],
                     [h.make_tensor_value_info("s", T.FLOAT, []), h.make_tensor_value_info("r", T.FLOAT, ["n"])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 10
    return m


def _module(model):
    m = import_model(model)
    run_passes(m)
    return m


def _lower(m):
    return lower(m, LowerOptions(resolve_target("sm_90"), "fp32", False))


def _feeds(shape, rng):
    """Fresh random inputs with nonzero counts 0, some, about half and all."""
    out = []
    for p in (0.0, 0.15, 0.5, 1.0):
        x = rng.standard_normal(shape).astype(np.float32)
        x[rng.random(shape) >= p] = 0.0
        x[x == 0] = 0.0 if p < 1.0 else 0.5  # p = 1: every element nonzero
        out.append({"x": x})
    return out


def _expected(x):
    r = np.maximum(x[x != 0], 0)
    return {"r": r, "s": np.float32(r.sum(dtype=np.float32))}


@pytest.mark.parametrize("shape", [(4, 5), (3, 700)])  # 700: several NonZero chunks, grids > 1 block
def test_plan_runs_like_the_interpreter(shape):
    m = _module(nonzero_gather_model(shape))
    plan = _lower(m)
    # the IR keeps its `?` dims; the plan's buffers carry the count's symbol, sized at the bound
    assert str(m.main.results[1].type) == "f32[?]"
    syms = {b.name: b.sym_shape for b in plan.buffers if b.sym_shape is not None}
    assert {"nz", "idx", "vals", "r"} <= set(syms)
    n = shape[0] * shape[1]
    assert {b.name: b.shape for b in plan.buffers}["vals"] == (n,)
    ex = PlanExecutor.from_plan(plan, m)
    counts = []
    for feed in _feeds(shape, np.random.default_rng(7)):
        ref = Interpreter(m).run(feed)
        got = ex.run(feed)
        exp = _expected(feed["x"])
        counts.append(got["r"].shape[0])
        assert got["r"].shape == ref["r"].shape == exp["r"].shape
        np.testing.assert_array_equal(got["r"], ref["r"])
        np.testing.assert_array_equal(got["s"], ref["s"])
        np.testing.assert_allclose(got["s"], exp["s"], rtol=1e-5, atol=1e-5)
    assert counts[0] == 0 and counts[-1] == n and len(set(counts)) == 4


def test_kernels_compile_with_nvrtc():
    from nnc.codegen.cuda import compile_many
    from nnc.codegen.units import make_units
    plan = _lower(_module(nonzero_gather_model((3, 700))))
    names = sorted(plan.kernels)
    assert any("gathernd" in k for k in names) and any("nonzero" in k for k in names)
    cubins = compile_many(make_units(list(plan.kernels.values())), "sm_90a")
    assert cubins and all(len(c) > 0 for c in cubins)


def test_runtime_sized_launches_use_the_count():
    """Every launch after the read-back sizes itself from the count's symbol (no baked bound)."""
    from nnc.codegen.plan import Scalar
    plan = _lower(_module(nonzero_gather_model()))
    kinds = [l.kind for l in plan.launches]
    rb = kinds.index("readback")
    after = [l for l in plan.launches[rb + 1:] if l.kind == "kernel"]
    assert after and all(any(isinstance(a, Scalar) and a.expr is not None and "nnc_nz0" in a.expr.symbols
                             for a in l.args) for l in after)


def test_unsupported_consumer_is_a_clear_error():
    """An op downstream with no runtime-size kernel (CumSum here) is refused, naming the node."""
    nodes = [h.make_node("NonZero", ["x"], ["nz"]),
             h.make_node("Cast", ["nz"], ["f"], to=T.FLOAT),
             h.make_node("CumSum", ["f", "ax"], ["c"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [4, 5])],
                     [h.make_tensor_value_info("c", T.FLOAT, None)],
                     [h.make_tensor(name="ax", data_type=T.INT64, dims=[], vals=[1])])
    m = _module(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]))
    with pytest.raises(NncError, match="CumSum") as e:
        _lower(m)
    assert "NonZero's data-dependent count" in str(e.value) and "needs static shapes" in str(e.value)
    assert "?" in str(m.main.results[0].type)  # the IR's types came back after the failure


def test_runtime_finds_the_binding_readback(tmp_path):
    """compiler/runtime.py's map {readback launch: symbol} from plan.json (no GPU needed)."""
    import json
    from types import SimpleNamespace
    from nnc.codegen.emit import compile_to_dir
    from nnc.codegen.options import CodegenOptions
    from nnc.runtime import Module
    m = _module(nonzero_gather_model())
    compile_to_dir(m, tmp_path / "out", options=CodegenOptions(LowerOptions(resolve_target("sm_90"), "fp32",
                                                                                 False), "nvrtc"))
    pj = json.loads((tmp_path / "out" / "plan.json").read_text())
    fake = SimpleNamespace(plan=pj, buffers={b["id"]: b for b in pj["buffers"]}, runtime_sizes={}, dir=tmp_path)
    rb = [j for j, l in enumerate(pj["launches"]) if l["kind"] == "readback"]
    assert Module._data_dependent_readbacks(fake) == {rb[0]: "nnc_nz0"}
    out = {t["name"]: t for t in pj["outputs"]}
    assert out["r"]["sym_shape"] == [{"sym": "nnc_nz0"}] and out["r"]["max_shape"] == [20]


@pytest.mark.gpu
def test_cuda_runs_like_the_interpreter(tmp_path):
    import nnc
    from nnc.codegen.emit import compile_to_dir
    from nnc.codegen.options import CodegenOptions
    shape = (3, 700)
    m = _module(nonzero_gather_model(shape))
    compile_to_dir(m, tmp_path / "out", options=CodegenOptions(LowerOptions(resolve_target(None), "fp32", False),
                                                              "nvrtc"))
    mod = nnc.load(tmp_path / "out")
    assert not mod.uses_cuda_graph and "read-back" in (mod.graph_fallback or "")
    rng = np.random.default_rng(11)
    counts = set()
    for _ in range(2):
        for feed in _feeds(shape, rng):
            ref = Interpreter(m).run(feed)
            got = mod.run(feed, output="numpy", poison=True)
            counts.add(got["r"].shape[0])
            assert got["r"].shape == ref["r"].shape
            np.testing.assert_allclose(got["r"], ref["r"], rtol=1e-3, atol=1e-5)
            np.testing.assert_allclose(got["s"], ref["s"], rtol=1e-3, atol=1e-3)
    # fresh feeds each round: the empty and the full count every time, partial counts differing per round
    assert {0, shape[0] * shape[1]} <= counts and len(counts) >= 4
