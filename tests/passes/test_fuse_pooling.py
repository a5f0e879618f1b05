"""fuse-pooling (compiler/passes/fuse_pooling.py) and its kernel (codegen/kernels/pool_gemm.py,
templates/gap_gemm.cu.j2): GlobalAveragePool -> Flatten -> Gemm as one `fused {kind = "gap_gemm"}` op.

- the pass groups the classifier head at fp16/bf16 (NHWC: assign-layout's ReduceMean form) and at
  fp32 (NCHW GlobalAveragePool), with the Gemm's bias / activation / cast epilogue; the
  interpreter gives bit-identical outputs with and without it;
- lowering (CPU): one gap_gemm kernel for the head, the plan exact in its arena; a Gemm whose C is
  a tensor (not a per-column constant) falls back to the kernels of before (gap_gemm.split);
- NVRTC compiles the kernel over its space (rows x columns a block, NHWC and NCHW, transB 0/1);
- GPU (marked gpu): the build matches the interpreter on fresh random inputs, outputs poisoned
  (fp16 rel 1e-2, bf16 4e-2, fp32 1e-3), batch 1 and 3, C up to 2048 (64 KB of pooled rows).
ResNet-50 / MobileNetV2 fp16: one launch fewer each (the pool kernel), counted in
tests/codegen/test_launch_budget.py.
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnc.codegen.kernels import pool_gemm as pg
from nnc.codegen.kernels.common import nvrtc_compile
from nnc.codegen.lower import lower
from nnc.codegen.plan_exec import PlanExecutor
from nnc.driver import pipeline_passes
from nnc.ir.interp import Interpreter
from nnc.onnx_import import import_model
from nnc.passes import fuse_pooling as fpool
from nnc.pipeline import Pipeline

N = helper.make_node
F = TensorProto.FLOAT


def head_model(n=1, c=64, hw=7, j=10, act=False, trans_b=1, c_input=False, seed=0):
    """stem 3x3 conv (3 -> c) + Relu, 1x1 conv (c -> c) + Relu, GlobalAveragePool, Flatten, Gemm (+ Relu)."""
    rng = np.random.default_rng(seed)
    w = lambda *s: rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))  # noqa: E731
    wf = w(j, c) if trans_b else w(j, c).T.copy()
    inits = {"ws": w(c, 3, 3, 3), "w1": w(c, c, 1, 1), "b1": rng.standard_normal(c) * 0.1, "wf": wf,
             "bf": rng.standard_normal(j)}
    nodes = [N("Conv", ["x", "ws"], ["s"], pads=[1] * 4), N("Relu", ["s"], ["sr"]),
             N("Conv", ["sr", "w1", "b1"], ["c1"]), N("Relu", ["c1"], ["r1"]),
             N("GlobalAveragePool", ["r1"], ["g"]), N("Flatten", ["g"], ["f"]),
             N("Gemm", ["f", "wf", "cin" if c_input else "bf"], ["z" if act else "y"], transB=trans_b)]
    if act:
        nodes.append(N("Relu", ["z"], ["y"]))
    inputs = [helper.make_tensor_value_info("x", F, [n, 3, hw, hw])]
    if c_input:
        inputs.append(helper.make_tensor_value_info("cin", F, [n, j]))
        del inits["bf"]
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", F, [n, j])],
                          [numpy_helper.from_array(np.asarray(a, np.float32), nm) for nm, a in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def build(model, precision="fp16", pool=True):
    m = import_model(model)
    passes = [p for p in pipeline_passes(precision) if pool or p != "fuse-pooling"]
    Pipeline(passes, verify_each=True).run(m)
    return m


def gap_ops(m):
    return [op for op in m.main.ops if op.name == "fused" and op.attrs.kind == fpool.KIND]


def feed(m, rng):
    return {a.name: rng.standard_normal(a.type.shape).astype(np.float32) for a in m.main.args}


CASES = [dict(), dict(n=3, act=True), dict(trans_b=0, c=40, hw=5), dict(n=2, c=128, j=24, hw=9)]


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_grouped_and_interpreter_same(case, precision, rng):
    model = head_model(**CASES[case])
    a, b = build(model, precision), build(model, precision, pool=False)
    ops = gap_ops(a)
    assert len(ops) == 1 and not gap_ops(b)
    names = [o.name for o in ops[0].attrs.body.ops]
    assert names[0] == ("ReduceMean" if precision != "fp32" else "GlobalAveragePool") and "Gemm" in names
    assert ("pool=nhwc" if precision != "fp32" else "pool=nchw") in ops[0].attrs.params
    for _ in range(2):
        f = feed(a, rng)
        ra, rb = Interpreter(a).run(f), Interpreter(b).run(f)
        for k in rb:
            np.testing.assert_array_equal(ra[k], rb[k])


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_one_kernel_exact_in_arena(case, precision, rng):
    m = build(head_model(**CASES[case]), precision)
    plan = lower(m, {"arch": "sm_90", "precision": precision})
    ks = [plan.kernels[l.kernel] for l in plan.launches if l.kind == "kernel"]
    heads = [k for k in ks if k.template == "gap_gemm.cu.j2"]
    assert len(heads) == 1 and not any(k.template.startswith("reduce") for k in ks)
    assert any("GlobalAveragePool" in o or "ReduceMean" in o for o in heads[0].ops)
    ex = PlanExecutor.from_plan(plan, m)
    f = feed(m, rng)
    ref, got = Interpreter(m).run(f), ex.run(f)
    for k in ref:
        assert np.array_equal(got[k], ref[k]), k


def test_tensor_c_falls_back(rng):
    m = build(head_model(c_input=True), "fp16")
    assert len(gap_ops(m)) == 1
    plan = lower(m, {"arch": "sm_90", "precision": "fp16"})
    assert [s.variant for s in plan.selections if s.variant.startswith("gap_gemm")] == ["gap_gemm.split"]
    assert not [l for l in plan.launches if l.kind == "kernel" and plan.kernels[l.kernel].template == "gap_gemm.cu.j2"]
    ex = PlanExecutor.from_plan(plan, m)
    f = feed(m, rng)
    ref, got = Interpreter(m).run(f), ex.run(f)
    for k in ref:
        assert np.array_equal(got[k], ref[k]), k


def test_nvrtc_compiles_the_space():
    for nhwc, tb, dt, odt in ((True, True, "float16", "float32"), (True, False, "bfloat16", "bfloat16"),
                              (False, True, "float32", "float32")):
        g = pg._Gap(None, [], None, [], nhwc, 3, 49, 96, 40, tb, 1.0, np.zeros(40), "relu", (), dt, odt)
        for p in [dict(BN=bn, BJ=bj) for bn in pg.ROWS for bj in pg.COLS][::3]:
            spec = pg.render_spec(g, p)
            assert spec.smem == p["BN"] * 96 * 4 and spec.grid == (-(-40 // p["BJ"]), -(-3 // p["BN"]), 1)
            nvrtc_compile(spec.source)


GPU_CASES = [(dict(), "fp16"), (dict(n=3, act=True), "bf16"), (dict(n=3, c=2048, j=1000, hw=7), "fp16"),
             (dict(trans_b=0, c=40, hw=5, n=2), "fp32"), (dict(n=8, c=1280, j=1000, hw=7), "fp16")]


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
def test_gpu_matches_interpreter(case, tmp_path, rng):
    import nnc
    from nnc.codegen.emit import compile_to_dir
    kw, precision = GPU_CASES[case]
    m = build(head_model(seed=case, **kw), precision)
    assert len(gap_ops(m)) == 1
    compile_to_dir(m, tmp_path, arch=None, precision=precision)
    g = nnc.load(tmp_path)
    assert any(k["template"] == "gap_gemm.cu.j2" for k in g.plan["kernels"])
    tol = {"fp16": 1e-2, "bf16": 4e-2, "fp32": 1e-3}[precision]
    for _ in range(2):
        f = feed(m, rng)
        ref = Interpreter(m).run(f)
        got = g.run(f, output="numpy", poison=True)
        for k, v in ref.items():
            a, b = np.asarray(got[k]).astype(np.float64), v.astype(np.float64)
            assert np.isfinite(a).all(), k
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())), err_msg=k)
