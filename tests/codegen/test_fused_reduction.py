"""The lowering of fused rowreduce groups (codegen/kernels/fused_reduction.py,
templates/fused_rowreduce.cu.j2): each group is ONE launch whose header names every op of the
group; the kernels compile with NVRTC for sm_90 (rows kept in registers, and rows too long for
that, recomputed); the plan runs in its arena on the reference backend exactly as the interpreter
does; on a GPU the kernels match the interpreter (poisoned outputs, fresh random inputs, fp32 rel
1e-3, f16 1e-2)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper as h

from nnc.codegen.lower import lower
from nnc.codegen.plan_exec import PlanExecutor
from nnc.ir.interp import Interpreter
from nnc.passes import fuse_reduction
from nnc.pipeline import run_passes
from tests.passes.test_fuse_reduction import CASES, _c, _model

TEMPLATE = "fused_rowreduce.cu.j2"
N = h.make_node


def long_rows():
    """Rows of 30000 (vocabulary softmax): too long for registers, so the phases recompute; and
    a LayerNorm of 2048 (8 columns a thread in registers)."""
    nodes = [N("Mul", ["x", "k"], ["s"]), N("Softmax", ["s"], ["p"], axis=-1),
             N("Add", ["z", "z"], ["zz"]), N("LayerNormalization", ["zz", "g", "be"], ["y"], axis=-1)]
    return _model(nodes, [("x", [2, 30000]), ("z", [3, 2048])], [("p", [2, 30000]), ("y", [3, 2048])],
                  [_c("k", 0.25), _c("g", np.linspace(0.5, 1.5, 2048)), _c("be", np.linspace(-1, 1, 2048))])


MODELS = {name: make for name, (make, _) in CASES.items()}
MODELS["long_rows"] = long_rows


def _fused(name, precision="fp32"):
    m = MODELS[name]()
    if precision == "fp16":
        run_passes(m, ["to-fp16", "canonicalize", "dce"])
    assert fuse_reduction.run(m)
    return m


def _feed(m, rng):
    out = {}
    for a in m.main.args:
        x = rng.standard_normal([int(d) for d in a.type.shape])
        x = np.where(np.abs(x) < 0.05, 0.5, x)  # non-zero inputs
        out[a.name] = x.astype(a.type.dtype.np)
    return out


def _opts():
    from nnc.codegen.options import LowerOptions
    from nnc.codegen.target import resolve_target
    return LowerOptions(resolve_target("sm_90"), "fp32", False)


CASE_NAMES = sorted(MODELS)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_one_launch_per_group_naming_every_op(name):
    m = _fused(name)
    groups = [op for op in m.main.ops if op.name == "fused"]
    plan = lower(m, _opts())
    rows = [l for l in plan.launches if l.kind == "kernel" and plan.kernels[l.kernel].template == TEMPLATE]
    assert len(rows) == len(groups)
    for l, g in zip(rows, groups):
        src = plan.kernels[l.kernel].source
        for b in g.attrs.body.ops:
            if b.name != "const":
                assert f"= {b.name}(%" in src, (b, name)
        assert "nnc_block_" in src


def test_rows_in_registers_or_recomputed():
    m = _fused("long_rows")
    plan = lower(m, _opts())
    ks = [plan.kernels[l.kernel] for l in plan.launches if plan.kernels[l.kernel].template == TEMPLATE]
    by_c = {k.params["C"]: k for k in ks}
    assert by_c[2048].params["caches"] and by_c[2048].params["vpt"] == 8
    assert not by_c[30000].params["caches"] and by_c[30000].params["block"] == 1024


def test_mask_is_read_by_broadcast_index():
    m = _fused("attention_softmax")
    plan = lower(m, _opts())
    (k,) = [plan.kernels[l.kernel] for l in plan.launches if plan.kernels[l.kernel].template == TEMPLATE]
    # the [1,1,1,8] mask: row offset 0, column stride 1, no [1,2,8,8] copy
    assert any(ri["row"] == "0" for ri in k.params["row_inputs"])
    assert not any(l.kind == "kernel" and "expand" in l.kernel for l in plan.launches)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_kernels_compile_with_nvrtc(tmp_path, precision):
    from nnc.codegen.emit import compile_to_dir
    for name in CASE_NAMES:
        m = _fused(name, precision)
        plan = compile_to_dir(m, tmp_path / f"{name}_{precision}", arch="sm_90")
        assert plan["cubins"], name
        assert any(k["template"] == TEMPLATE for k in plan["kernels"]), name


@pytest.mark.parametrize("name", CASE_NAMES)
def test_plan_runs_in_the_arena(name):
    m = _fused(name)
    plan = lower(m, _opts())
    ex = PlanExecutor.from_plan(plan, m)
    rng = np.random.default_rng(5)
    for _ in range(2):
        feed = _feed(m, rng)
        ref = Interpreter(m).run(feed)
        got = ex.run(feed)
        assert set(got) == set(ref)
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k])


def test_default_pipeline_fuses_bert_like_attention(tmp_path):
    m = CASES["attention_softmax"][0]()
    from nnc.pipeline import DEFAULT_PIPELINE
    assert DEFAULT_PIPELINE.index("fuse-epilogue") < DEFAULT_PIPELINE.index("fuse-reduction") \
        < DEFAULT_PIPELINE.index("fuse-elementwise")
    run_passes(m)
    kinds = [op.attrs.kind for op in m.main.walk() if op.name == "fused"]
    # the attention pass may take the whole attention; otherwise the Softmax group is ours
    assert "rowreduce" in kinds or "attention" in kinds


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_gpu_fused_rowreduce_matches_interpreter(name, precision, tmp_path, rng):
    import nnc
    from nnc.codegen.emit import compile_to_dir
    m = _fused(name, precision)
    compile_to_dir(m, tmp_path, arch=None)
    g = nnc.load(tmp_path)
    tol = 1e-2 if precision == "fp16" else 1e-3
    for _ in range(2):  # fresh inputs each time; arena and outputs poisoned
        feed = _feed(m, rng)
        ref = Interpreter(m).run(feed)
        got = g.run(feed, output="numpy", poison=True)
        for k, v in ref.items():
            a = np.asarray(got[k]).astype(np.float64)
            b = v.astype(np.float64)
            assert np.isfinite(b).all(), f"{name}/{k}: non-finite reference"
            scale = max(1.0, float(np.abs(b).max()))
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=f"{name}/{k}")
