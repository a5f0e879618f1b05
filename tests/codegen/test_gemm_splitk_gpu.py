"""Split-K on the mma.sync GEMM, on the GPU (marked `gpu`, skipped without a device): split kernels
against a float64 reference of the same rounded inputs, on fresh random data with the output and
the workspace poisoned (NaN) first: fp16, bf16 and fp32 on TF32 tensor cores (the strict-fp32 FFMA
template has no split-K), bias + gelu + residual epilogues, ragged K, a batch, per-row bias; three
launches in a row (the last CTA of a tile must leave its counter at zero) give the same bits
(deterministic reduction order); a CUDA graph of [zero the counters, launch] replayed on new inputs;
the split points of the BERT-base / MobileNetV2 batch-1 shapes; compiled models (the lowering's
workspace, the run's shared counters and their zeroing copy) under nnc.load with and without CUDA
graphs against the reference backend. CPU checks: test_gemm_splitk.py."""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from nnc.codegen.kernels import common, gemm
from nnc.codegen.target import for_arch

from .test_gemm_conv import _dev, _host, _np_act, _poison, _rounded, _tol, needs_gpu

gpu = pytest.mark.gpu
SM90 = for_arch("sm_90")
T64 = dict(BM=64, BN=64, BK=32, WARPS_M=2, WARPS_N=2, STAGES=4)
T128x256 = dict(BM=128, BN=256, BK=32, WARPS_M=2, WARPS_N=4, STAGES=3)
TF32_T = dict(BM=128, BN=128, BK=16, WARPS_M=2, WARPS_N=2, STAGES=4)

# label, GemmProblem kwargs (M, N, K first), params
CASES = [
    ("fp16 bias+gelu+residual", dict(M=128, N=768, K=3072, has_bias=True, bias_dtype="float32", act="gelu",
                                     has_c=True, ldc_m=768, ldc_n=1, beta=1.0), dict(T64, SPLIT_K=4)),
    ("fp16 ragged K, transposed A", dict(M=129, N=67, K=1000, trans_a=True, alpha=0.5), dict(T64, SPLIT_K=3)),
    ("fp16 K not a BK multiple, 16 splits, 128x256", dict(M=100, N=300, K=3000 - 7, has_c=True, ldc_m=0, ldc_n=1,
                                                          beta=2.0, act="relu"), dict(T128x256, SPLIT_K=16)),
    ("bf16 transposed B", dict(M=130, N=96, K=1000, dtype="bfloat16", trans_b=True), dict(T64, SPLIT_K=6)),
    ("fp32 tf32 bias+gelu+residual", dict(M=128, N=768, K=3072, dtype="float32", tf32=True, has_bias=True,
                                          bias_dtype="float32", act="gelu", has_c=True, ldc_m=768, ldc_n=1),
     dict(TF32_T, SPLIT_K=4)),
    ("fp32 tf32 ragged, fp16 out", dict(M=77, N=200, K=999, dtype="float32", tf32=True, out_dtype="float16"),
     dict(T64, SPLIT_K=12)),
    ("fp16 per-row bias (NCHW 1x1 conv)", dict(M=512, N=49, K=2048, has_bias=True, bias_dtype="float32",
                                               bias_rows=True, act="relu"), dict(T64, SPLIT_K=8)),
]


def _operands(pr, rng):
    a = rng.uniform(-1, 1, (pr.K, pr.M) if pr.trans_a else (pr.M, pr.K))
    b = rng.uniform(-1, 1, (pr.N, pr.K) if pr.trans_b else (pr.K, pr.N))
    c = rng.uniform(-1, 1, (pr.M if pr.ldc_m else 1, pr.N)) if pr.has_c else None
    bias = rng.uniform(-1, 1, pr.M if pr.bias_rows else pr.N) if pr.has_bias else None
    return a, b, c, bias


def _reference(pr, a, b, c, bias):
    dt = pr.dtype
    ar, br = _rounded(a, dt), _rounded(b, dt)  # (TF32: within _tol(dt, tf32) of this)
    y = pr.alpha * ((ar.T if pr.trans_a else ar) @ (br.T if pr.trans_b else br))
    if c is not None:
        y = y + pr.beta * _rounded(c, dt)
    if bias is not None:
        y = y + (bias.astype(np.float32).astype(np.float64)[:, None] if pr.bias_rows else
                 bias.astype(np.float32).astype(np.float64))
    return _np_act(y, pr.act)


def _bufs(pr, spec, a, b, c, bias):
    import cupy
    dt, odt = pr.dtype, pr.out_dtype or pr.dtype
    n = dict((name, v) for name, _, v in spec.args)
    bufs = dict(A=_dev(a, dt), B=_dev(b, dt), D=_poison((pr.M, pr.N), odt),
                ws=cupy.full(n["ws"], np.nan, cupy.float32),  # garbage: every partial is written first
                tile_counters=cupy.zeros(n["tile_counters"], cupy.int32))
    if c is not None:
        bufs["C"] = _dev(c, dt)
    if bias is not None:
        bufs["bias"] = cupy.asarray(bias.astype(np.float32))
    return bufs


def _out(pr, d):
    return _host(d, pr.out_dtype or pr.dtype)


def _err(got, ref):
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-12))


@gpu
@needs_gpu
@pytest.mark.parametrize("label,kw,params", CASES, ids=[c[0] for c in CASES])
def test_split_kernel_matches_reference_relaunched(label, kw, params):
    import cupy
    pr = gemm.GemmProblem(**kw)
    spec = gemm.render(pr, params)
    fn = common.load_cubin(common.nvrtc_compile(spec.source), spec)
    rng = np.random.default_rng(sum(map(ord, label)))
    ops = _operands(pr, rng)
    ref = _reference(pr, *ops)
    bufs = _bufs(pr, spec, *ops)
    tol = _tol("float16" if pr.out_dtype == "float16" else pr.dtype, pr.tf32)
    outs = []
    for launch in range(3):
        bufs["D"] = _poison((pr.M, pr.N), pr.out_dtype or pr.dtype)  # fresh poison every launch
        common.launch(fn, spec, bufs)
        cupy.cuda.runtime.deviceSynchronize()
        got = _out(pr, bufs["D"])
        err = _err(got, ref)
        assert err < tol, f"{label}: launch {launch}: rel err {err:.3g}"
        assert not bufs["tile_counters"].any(), f"{label}: launch {launch} left tile counters non-zero"
        outs.append(got)
    assert all(np.array_equal(outs[0], o) for o in outs[1:]), f"{label}: relaunches differ (non-deterministic)"


@gpu
@needs_gpu
def test_cuda_graph_replay_of_zero_copy_and_split_launch():
    """What a model's graph holds: [copy zeros into the counters, the split launch], captured
    once; replayed on new inputs (written into the captured buffers) it gives new, right outputs."""
    import cupy
    pr = gemm.GemmProblem(M=128, N=768, K=3072, has_bias=True, bias_dtype="float32", act="gelu",
                          has_c=True, ldc_m=768, ldc_n=1)
    spec = gemm.render(pr, dict(T64, SPLIT_K=4))
    fn = common.load_cubin(common.nvrtc_compile(spec.source), spec)
    rng = np.random.default_rng(7)
    ops = _operands(pr, rng)
    bufs = _bufs(pr, spec, *ops)
    bufs["tile_counters"].fill(12345)  # a graph must not rely on what the arena left there
    zeros = cupy.zeros_like(bufs["tile_counters"])
    st = cupy.cuda.Stream(non_blocking=True)
    with st:
        st.begin_capture()
        cupy.cuda.runtime.memcpyAsync(bufs["tile_counters"].data.ptr, zeros.data.ptr, zeros.nbytes, 3, st.ptr)
        common.launch(fn, spec, bufs, stream=st)
        g = st.end_capture()
    seen = []
    for rep in range(3):
        ops = _operands(pr, rng)
        for role, x in zip(("A", "B", "C"), ops[:3]):
            bufs[role][...] = _dev(x, pr.dtype)
        bufs["bias"][...] = cupy.asarray(ops[3].astype(np.float32))
        bufs["D"].fill(np.nan)
        g.launch(st)
        st.synchronize()
        got = _out(pr, bufs["D"])
        err = _err(got, _reference(pr, *ops))
        assert err < _tol("float16"), f"replay {rep}: rel err {err:.3g}"
        seen.append(got)
    assert not np.array_equal(seen[0], seen[1]), "two inputs, one output: the replay is stale"


def _compile(src):
    return common.nvrtc_compile(src, "sm_90")


SHAPES_B1 = [(128, 2304, 768), (128, 768, 768), (128, 3072, 768), (128, 768, 3072), (49, 160, 960), (49, 1280, 320)]


@gpu
@needs_gpu
def test_split_points_of_batch1_shapes_match_reference():
    """The default and the cost model's first 6 split points of each BERT-base / MobileNetV2
    batch-1 shape (fp16, bias + gelu), each launched twice."""
    import cupy
    jobs = []
    for M, N, K in SHAPES_B1:
        pr = gemm.GemmProblem(M, N, K, has_bias=True, bias_dtype="float32", act="gelu")
        pts = sorted((p for p in gemm.candidates(pr, SM90) if p.get("SPLIT_K", 1) > 1),
                     key=lambda p: gemm.modelled_time(pr, p, SM90))[:6]
        d = gemm.default_params(pr, SM90)
        pts += [d] if d not in pts else []
        jobs += [(pr, p, gemm.render(pr, p)) for p in pts]
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 2)) as ex:
        cubins = list(ex.map(_compile, [s.source for _, _, s in jobs]))
    rng = np.random.default_rng(11)
    for (pr, p, spec), cub in zip(jobs, cubins):
        fn = common.load_cubin(cub, spec)
        ops = _operands(pr, rng)
        ref = _reference(pr, *ops)
        bufs = _bufs(pr, spec, *ops) if spec.params.get("SPLIT_K", 1) > 1 else \
            dict(A=_dev(ops[0], "float16"), B=_dev(ops[1], "float16"), D=_poison((pr.M, pr.N), "float16"),
                 bias=cupy.asarray(ops[3].astype(np.float32)))
        for launch in range(2):
            bufs["D"].fill(np.nan)
            common.launch(fn, spec, bufs)
            cupy.cuda.runtime.deviceSynchronize()
            err = _err(_out(pr, bufs["D"]), ref)
            assert err < _tol("float16"), f"{pr.M}x{pr.N}x{pr.K} {p} launch {launch}: rel err {err:.3g}"


@gpu
@needs_gpu
@pytest.mark.parametrize("model,precision,tf32", [("linear", "fp16", False), ("linear", "fp32", True),
                                                  ("two_gemms", "fp16", False)])
def test_compiled_model_graph_and_eager_match_reference(tmp_path, model, precision, tf32):
    """The lowering's workspace, the run's shared counters and their one zeroing copy (two split
    GEMMs share them in "two_gemms") under nnc.load, CUDA graph and eager, on fresh inputs with
    poisoned arenas, run twice each, against the reference backend."""
    import json

    import nnc
    import onnx
    from nnc.cli import _random_inputs
    from nnc.driver import compile_model

    from .test_gemm_splitk import _linear_model, _two_split_gemms
    onnx.save(_linear_model() if model == "linear" else _two_split_gemms(), tmp_path / "m.onnx")
    compile_model(str(tmp_path / "m.onnx"), tmp_path / "out", arch="sm_90", precision=precision, tf32=tf32)
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    n_split = sum(1 for k in plan["kernels"] if k.get("params", {}).get("SPLIT_K", 1) > 1)
    assert n_split >= (2 if model == "two_gemms" else 1), "split-K kernels not chosen"
    g, e = nnc.load(tmp_path / "out"), nnc.load(tmp_path / "out", cuda_graph=False)
    ref = nnc.load(tmp_path / "out", backend="reference")
    seen = []
    for seed in (1, 2, 3):
        feed = _random_inputs(plan, seed)
        want = ref.run(feed)
        for mod, what in ((g, "graph"), (e, "eager")):
            for rep in range(2):  # twice: the counters the first run's kernels reset serve the second
                got = mod.run(feed, output="numpy", poison=True)
                for n in mod.output_names:
                    a, w = np.asarray(got[n], np.float64), np.asarray(want[n], np.float64)
                    err = _err(a, w)
                    assert err < (2e-2 if precision == "fp16" else 5e-3), f"{what} seed {seed} rep {rep}: {err:.3g}"
        seen.append(got)
    n = g.output_names[0]
    assert not np.array_equal(seen[0][n], seen[1][n])
