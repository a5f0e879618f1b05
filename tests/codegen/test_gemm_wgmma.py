"""The Hopper wgmma GEMM family (codegen/kernels/gemm_wgmma.py, templates/gemm_wgmma.cu.j2).

CPU: applies() (sm_90a only, dtypes, alignment and shape limits, with reasons), the declared space
fits the Target, every point of the space and every layout / epilogue flag NVRTC-compiles for
sm_90a, the kernel opens with the header comment when lowered through a model, and the variant is a
candidate of MatMul / Gemm on sm_90a only. GPU (marked `gpu`): every candidate and every layout and
epilogue kind against numpy (fp64 of the rounded inputs), ragged M (1, 7, 129), N and K edges,
outputs poisoned first, random inputs."""
from __future__ import annotations

import numpy as np
import pytest

from nnc.codegen.kernels import common, gemm, gemm_wgmma as W
from nnc.codegen.target import ARCHS

from . import space_cover
from .test_gemm_conv import HAVE_NVRTC, _check, _dev, _host, _poison, _rounded, needs_gpu

SM90A = ARCHS["sm_90a"]
SM90 = ARCHS["sm_90"]


# ---------------------------------------------------------------- applies (CPU)
def test_fits_sm90a_fp16_bf16_only():
    pr = gemm.GemmProblem(4096, 4096, 4096, dtype="float16")
    assert W.fits(pr, SM90A)
    assert W.fits(gemm.with_(pr, dtype="bfloat16"), SM90A)
    f = W.fits(pr, SM90)
    assert not f and "sm_90a" in f.why
    f = W.fits(gemm.with_(pr, dtype="float32", tf32=True), SM90A)
    assert not f and "float32" in f.why


@pytest.mark.parametrize("kw,why", [
    (dict(K=100), "K = 100"),
    (dict(N=100), "N % 8"),
    (dict(lda=4100), "16-byte aligned"),
    (dict(trans_a=True, M=7), "M % 8"),
    (dict(batch=(1, 2), stride_b=(0, 12)), "16-byte aligned"),
    (dict(M=0), "empty"),
])
def test_fits_refuses_with_reason(kw, why):
    pr = gemm.with_(gemm.GemmProblem(4096, 4096, 4096, dtype="float16"), **kw)
    f = W.fits(pr, SM90A)
    assert not f and why in f.why, f.why


def test_fits_ragged_m_and_transposed_b_ragged_n():
    assert W.fits(gemm.GemmProblem(7, 4096, 64), SM90A)
    assert W.fits(gemm.GemmProblem(1, 100, 64, trans_b=True), SM90A)  # K-major B: any N


def test_space_within_target_and_valid():
    for M, N in ((4096, 4096), (128, 768), (1, 64), (100, 3000)):
        pr = gemm.GemmProblem(M, N, 768)
        space = W.candidates(pr, SM90A)
        assert space
        for p in space:
            assert W.smem_bytes(p) <= SM90A.smem_per_block_optin
            rows = p["BM"] if W.pingpong(p) else p["BM"] // p["CW"]  # a ping-pong warp group owns whole tiles
            assert rows % 64 == 0 and p["BN"] % 64 == 0
            assert 0 <= W.lag(p) <= p["STAGES"] - 2
        assert W.default_params(pr, SM90A) in space
        # B [K, N] by cp.async: no BN = 192 (load_mnmajor needs BN / 8 to divide 128); bulk or B^T may
        assert not [p for p in space if p["BN"] == 192 and W.load_kind(p) != "tma"]  # TMA boxes load any BN
        assert [p for p in W.candidates(pr, SM90A, b_bulk=True) if p["BN"] == 192 and p.get("b_bulk")] or N < 192


def test_render_refuses_params_outside_the_space():
    with pytest.raises(ValueError, match="declared space"):
        W.render(gemm.GemmProblem(256, 256, 256), dict(BM=256, BN=256, STAGES=4, CW=1))
    with pytest.raises(ValueError, match="LAG"):
        W.render(gemm.GemmProblem(256, 256, 256), dict(BM=128, BN=128, STAGES=4, CW=2, LAG=3))


@pytest.mark.parametrize("trans_b", [False, True])
def test_preswizzle_b_layout(trans_b):
    K, N, BN = 100, 136, 64
    b = np.arange(K * N, dtype=np.float32).reshape(K, N).astype(np.float16)
    o = W.preswizzle_b(b.T.copy() if trans_b else b, trans_b, BN).reshape(3, 2, BN, 64)
    for k in range(K):
        for n in range(N):
            r = n % BN
            assert o[n // BN, k // 64, r, (((k % 64) // 8) ^ (r % 8)) * 8 + k % 8] == b[k, n]
    assert np.count_nonzero(o) == np.count_nonzero(b)  # the padding is zeros


# ---------------------------------------------------------------- NVRTC compile (CPU)
def all_specs():
    """[(case, spec)]: every point of the space on a bias + gelu problem, every layout and epilogue
    flag, the bias-rows batch, odd ldd, and the pre-swizzled bulk B at every publish mode."""
    specs = []
    for dt in ("float16", "bfloat16"):
        base = gemm.GemmProblem(4096, 4096, 4096, dtype=dt, has_bias=True, bias_dtype="float32", act="gelu")
        for p in W.candidates(base, SM90A):
            specs.append((f"{dt} bias gelu", W.render(base, p)))
        for ta in (False, True):
            for tb in (False, True):
                pr = gemm.GemmProblem(1000, 1000 if not tb else 999, 328, dtype=dt, trans_a=ta, trans_b=tb,
                                      has_c=True, ldc_m=0, act="relu", alpha=0.5, beta=2.0,
                                      out_dtype="float32" if ta else None)
                specs.append((f"{dt} ta={ta} tb={tb} C relu", W.render(pr, W.candidates(pr, SM90A)[-1])))
    rows = gemm.GemmProblem(512, 64, 64, has_bias=True, bias_rows=True, bias_stride_z1=512, batch=(1, 2),
                            stride_a=(0, 0), stride_b=(0, 64 * 64), stride_d=(0, 512 * 64), act="silu")
    specs.append(("bias rows batch silu", W.render(rows, W.candidates(rows, SM90A)[0])))
    odd = gemm.GemmProblem(7, 72, 8, ldd=73)  # odd ldd: scalar stores
    specs.append(("odd ldd", W.render(odd)))
    for dt in ("float16", "bfloat16"):  # pre-swizzled bulk B, every publish mode
        pr = gemm.GemmProblem(4096, 3072, 768, dtype=dt, has_bias=True, bias_dtype="float32", act="gelu")
        for p in [q for q in W.candidates(pr, SM90A, b_bulk=True) if W.load_kind(q) != "tma"]:  # TMA: no LAG
            for lag in range(0, 1 if W.pingpong(p) else p["STAGES"] - 1, 2 if dt == "float16" else 3):
                specs.append((f"{dt} bulk B", W.render(pr, dict(p, LAG=lag))))
    return specs


def _setmaxnreg(s) -> bool:
    return s.params["CW"] == 2 and s.params.get("CTAS", 1) == 1  # registers move: 2 consumer WGs, 1 CTA/SM


@pytest.mark.skipif(not HAVE_NVRTC, reason="NVRTC unavailable")
def test_every_point_compiles_sm90a():
    """NVRTC compiles a covering subset of all_specs() (tests/codegen/space_cover.py: each case, each
    parameter value, each line of code, setmaxnreg on and off); NNC_FULL_SPACE=1: every point.
    Every point's source is checked as text."""
    labelled = all_specs()
    specs = [s for _, s in labelled]
    assert len({s.name for s in specs}) >= 15
    chosen = space_cover.to_compile(labelled, lambda s: [f"setmaxnreg={_setmaxnreg(s)}"])
    assert all(sz > 0 for sz in space_cover.nvrtc_compile_all([s.source for s in chosen]))
    # setmaxnreg only where registers move: two consumer warp groups, one CTA per SM
    assert all("wgmma.mma_async" in s.source and ("setmaxnreg" in s.source) == _setmaxnreg(s) for s in specs)
    assert any(s.params.get("CTAS") == 2 for s in specs) and any(s.params["BN"] == 192 for s in specs)
    assert all(f"__launch_bounds__({128 * (s.params['CW'] + 1)}, {s.params.get('CTAS', 1)})" in s.source
               for s in specs)


# ---------------------------------------------------------------- lowering (CPU)
def _plan(model, arch, selector=None):
    from nnc.codegen.lower import lower
    from nnc.codegen.options import LowerOptions
    from nnc.codegen.target import for_arch
    from nnc.driver import pipeline_passes
    from nnc.onnx_import import import_model
    from nnc.pipeline import Pipeline
    mod = import_model(model)
    Pipeline([p for p in pipeline_passes("fp16") if p != "fuse-attention"]).run(mod)
    return lower(mod, LowerOptions(for_arch(arch), precision="fp16"), selector=selector)


def _matmul_model(m=256, k=512, n=512):
    from .cuda_models import F, N, mk
    rng = np.random.default_rng(0)
    return mk([N("MatMul", ["x", "w"], ["y"])], [("x", F, [m, k])], [("y", F)],
              [("w", rng.standard_normal((k, n)).astype(np.float32))])


def test_a_candidate_on_sm90a_only():
    from nnc.codegen.variants import TimedSelector
    (s90,) = [s for s in _plan(_matmul_model(), "sm_90").selections if "MatMul" in s.op]
    assert "gemm.wgmma.matmul" not in s90.candidates
    prefer = TimedSelector(lambda c, p: 0.0 if c.variant.family == "gemm_wgmma" else 1.0)
    plan = _plan(_matmul_model(), "sm_90a", prefer)
    (sel,) = [s for s in plan.selections if "MatMul" in s.op]
    assert "gemm.wgmma.matmul" in sel.candidates and "gemm.matmul" in sel.candidates
    assert sel.variant == "gemm.wgmma.matmul"
    (k,) = [k for k in plan.kernels.values() if k.template == W.TEMPLATE]
    src = str(k.source)
    assert src.lstrip().startswith("// ====") and "template: gemm_wgmma.cu.j2" in src and "MatMul" in src
    assert "wgmma.mma_async" in src
    assert W.MATMUL.priority != 10  # its own family: never at the mma.sync variants' priority


# ---------------------------------------------------------------- GPU correctness
def _np_act(x, act):
    if act == "relu":
        return np.maximum(x, 0)
    if act == "gelu":
        from math import erf, sqrt
        return 0.5 * x * (1 + np.vectorize(erf)(x / sqrt(2)))
    if act == "silu":
        return x / (1 + np.exp(-x))
    return x


def _run(spec, bufs):
    import cupy
    fn = common.load_cubin(common.nvrtc_compile(spec.source, "sm_90a"), spec)
    common.launch(fn, spec, bufs)
    cupy.cuda.runtime.deviceSynchronize()


# M, N, K, dtype, trans_a, trans_b, epilogue
GPU_CASES = [
    (256, 256, 256, "float16", False, False, "none"),
    (1, 768, 768, "float16", False, False, "bias"),
    (7, 136, 72, "bfloat16", False, False, "bias_gelu"),
    (129, 200, 328, "float16", False, True, "residual"),
    (128, 2304, 768, "float16", False, False, "bias_residual_relu"),
    (200, 64, 136, "bfloat16", True, False, "scale"),
    (136, 72, 64, "float16", True, True, "cast_f32"),
    (4096, 768, 3072, "bfloat16", False, False, "bias_gelu"),
    (1000, 999, 520, "float16", False, True, "bias_residual_relu"),
]


def _case_arrays(case, rng):
    M, N, K, dt, ta, tb, epi = case
    a = rng.uniform(-1, 1, (K, M) if ta else (M, K))
    b = rng.uniform(-1, 1, (N, K) if tb else (K, N))
    kw, extra = {}, {}
    ar, br = _rounded(a, dt), _rounded(b, dt)
    ref = (ar.T if ta else ar) @ (br.T if tb else br)
    if epi == "scale":
        kw["alpha"] = 0.25
        ref = 0.25 * ref
    if "bias" in epi:
        bias = rng.uniform(-1, 1, N).astype(np.float32)
        kw.update(has_bias=True, bias_dtype="float32")
        extra["bias"] = bias
        ref = ref + bias.astype(np.float64)
    if "residual" in epi:
        c = rng.uniform(-1, 1, (M, N))
        kw.update(has_c=True, c_dtype=dt, ldc_m=N, ldc_n=1, beta=0.5)
        extra["C"] = c
        ref = ref + 0.5 * _rounded(c, dt)
    for act in ("relu", "gelu"):
        if epi.endswith(act):
            kw["act"] = act
            ref = _np_act(ref, act)
    if epi == "cast_f32":
        kw["out_dtype"] = "float32"
    pr = gemm.GemmProblem(M, N, K, dtype=dt, trans_a=ta, trans_b=tb, **kw)
    return pr, a, b, extra, ref


def _bufs(pr, a, b, extra):
    import cupy
    dt = pr.dtype
    bufs = dict(A=_dev(a, dt), B=_dev(b, dt))
    if "bias" in extra:
        bufs["bias"] = cupy.asarray(extra["bias"])
    if "C" in extra:
        bufs["C"] = _dev(extra["C"], dt)
    return bufs


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}-ta{int(c[4])}tb{int(c[5])}-{c[6]}")
def test_wgmma_gemm_gpu(case):
    rng = np.random.default_rng(abs(hash(case)) & 0xFFFF)
    pr, a, b, extra, ref = _case_arrays(case, rng)
    odt = pr.out_dtype or pr.dtype
    bufs = _bufs(pr, a, b, extra)
    space = W.candidates(pr, SM90A)
    points = space if pr.M * pr.N <= 1 << 18 else [W.default_params(pr, SM90A)]
    if not pr.trans_b:  # publish modes: noinc, and the largest lag (cp.async points only)
        cp = next(p for p in space if W.load_kind(p) != "tma")
        points = points + [dict(cp, LAG=cp["STAGES"] - 2)]
    for p in points:
        d = _poison((pr.M, pr.N), odt)
        _run(W.render(pr, p), dict(bufs, D=d))
        _check(_host(d, odt), ref, 1e-2 if pr.dtype == "float16" else 3e-2)
    # B as a weight: pre-swizzled on the host, one bulk copy a stage
    for p in (W.candidates(pr, SM90A, b_bulk=True)[:1] if pr.M * pr.N > 1 << 18 else
              [q for q in W.candidates(pr, SM90A, b_bulk=True) if q.get("b_bulk")]):
        d = _poison((pr.M, pr.N), odt)
        bb = W.preswizzle_b(_rounded(b, pr.dtype).astype(np.float32), pr.trans_b, p["BN"])
        _run(W.render(pr, p), dict(bufs, B=_dev(bb, pr.dtype), D=d))
        _check(_host(d, odt), ref, 1e-2 if pr.dtype == "float16" else 3e-2)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("sched", ["persist", "pingpong"])
def test_persistent_points_run_many_tiles_a_cta_gpu(sched):
    """Persistent and ping-pong points with a grid of 2 and 3 CTAs (a stand-in Target with few SMs):
    every CTA loops over many tiles, both consumer warp groups of a ping-pong CTA take turns, the ring
    wraps across tiles, over a ragged M/N/K and over batches (grid z)."""
    from dataclasses import replace
    rng = np.random.default_rng(7)
    few = replace(SM90A, sm_count=2)
    for case, nb in (((1000, 999, 520, "float16", False, True, "bias_residual_relu"), 1),
                     ((300, 200, 136, "bfloat16", False, False, "bias_gelu"), 1),
                     ((256, 192, 192, "float16", False, False, "none"), 3)):
        pr, a, b, extra, ref = _case_arrays(case, rng)
        if nb > 1:  # the same A and B for every batch, D per batch
            pr = gemm.with_(pr, batch=(1, nb), stride_d=(0, pr.M * pr.N))
        odt = pr.out_dtype or pr.dtype
        bufs = _bufs(pr, a, b, extra)
        pts = [p for p in W.candidates(pr, SM90A) if (W.pingpong(p) if sched == "pingpong" else p.get("PERSIST"))]
        assert pts
        for p in pts:
            spec = W.render(pr, p, target=few)
            assert spec.grid[0] * spec.grid[2] <= max(2, nb) and spec.grid[0] * W.cdiv(pr.M, p["BM"]) >= 1
            d = _poison((nb, pr.M, pr.N) if nb > 1 else (pr.M, pr.N), odt)
            _run(spec, dict(bufs, D=d))
            got = _host(d, odt)
            for z in range(nb):
                _check(got[z] if nb > 1 else got, ref, 1e-2 if pr.dtype == "float16" else 3e-2)


@pytest.mark.gpu
@needs_gpu
def test_wgmma_batched_broadcast_gpu():
    rng = np.random.default_rng(5)
    a = rng.uniform(-1, 1, (3, 1, 33, 64))
    b = rng.uniform(-1, 1, (4, 64, 24))
    pr = gemm.matmul_problem(a.shape, b.shape, "float16", act="relu")
    assert W.fits(pr, SM90A)
    ref = np.maximum(_rounded(a, "float16") @ _rounded(b, "float16"), 0)
    d = _poison(ref.shape, "float16")
    _run(W.render(pr), dict(A=_dev(a, "float16"), B=_dev(b, "float16"), D=d))
    _check(_host(d, "float16"), ref, 1e-2)


# ---------------------------------------------------------------- through the compiler (sm_90a)
def _e2e_models():
    from .test_epilogue_fusion import gemm_block, matmul_block
    from .cuda_models import F, N, mk
    rng = np.random.default_rng(3)
    bert = mk([N("MatMul", ["x", "w"], ["mm"]), N("Add", ["mm", "b"], ["a"]), N("Gelu", ["a"], ["y"])],
              [("x", F, [128, 768])], [("y", F)],
              [("w", (rng.standard_normal((768, 2304)) / 28).astype(np.float32)),
               ("b", rng.standard_normal(2304).astype(np.float32))])
    return {"gemm_transB_bias_gelu": gemm_block(), "batched_matmul_residual_relu": matmul_block(),
            "bert_qkv_bias_gelu": bert}


@pytest.mark.parametrize("name", ["gemm_transB_bias_gelu", "batched_matmul_residual_relu", "bert_qkv_bias_gelu"])
def test_heuristic_picks_wgmma_with_bulk_weight_on_sm90a(name):
    plan = _plan(_e2e_models()[name], "sm_90a")
    ks = [k for k in plan.kernels.values() if k.template == W.TEMPLATE]
    assert len(ks) == 1, [k.template for k in plan.kernels.values()]
    sel = ks[0].params["selected"]["params"]
    assert sel.get("b_bulk") is True or W.load_kind(sel) == "tma"  # TMA measured faster than bulk B
    assert not [k for k in _plan(_e2e_models()[name], "sm_90").kernels.values() if k.template == W.TEMPLATE]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", ["gemm_transB_bias_gelu", "batched_matmul_residual_relu", "bert_qkv_bias_gelu"])
def test_compiled_for_sm90a_matches_interpreter_gpu(name, tmp_path):
    """The whole path: fuse-epilogue group -> the wgmma variant (heuristic) with its weight
    pre-swizzled into weights.bin -> NVRTC sm_90a -> nnc.load, against the reference interpreter."""
    import nnc
    from nnc.codegen.emit import compile_to_dir
    from nnc.driver import pipeline_passes
    from nnc.ir.interp import Interpreter
    from nnc.onnx_import import import_model
    from nnc.pipeline import Pipeline
    mod = import_model(_e2e_models()[name])
    Pipeline(pipeline_passes("fp16"), verify_each=True).run(mod)
    plan = compile_to_dir(mod, tmp_path, arch="sm_90a", precision="fp16", tf32=False)
    assert any(W.TEMPLATE in str(k.get("template", "")) for k in plan["kernels"]), plan["kernels"]
    g = nnc.load(tmp_path)
    rng = np.random.default_rng(11)
    for _ in range(2):  # fresh inputs each time; arena and outputs poisoned
        feed = {a.name: rng.standard_normal(a.type.shape).astype(np.float32) for a in mod.main.args}
        ref = Interpreter(mod).run(feed)
        got = g.run(feed, output="numpy", poison=True)
        for k, v in ref.items():
            a, b = np.asarray(got[k]).astype(np.float64), v.astype(np.float64)
            assert np.isfinite(a).all(), f"{name}/{k}: non-finite output"
            np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2 * max(1.0, float(np.abs(b).max())), err_msg=name)
