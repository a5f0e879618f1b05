"""EPI = shfl on the Hopper wgmma GEMM / conv (codegen/kernels/gemm_wgmma.py, templates/gemm_wgmma.cu.j2):
the register epilogue whose quads transpose their column pairs through shuffles so each thread
writes 8 consecutive outputs as one 16-byte store; and the per-kind switches of the unverified
point kinds (gemm_wgmma.unverified_kinds, in_space).

CPU: which kinds candidates adds for each `unverified` argument, that the shuffle-store points stay
out of the space and the heuristic, render's refusals, and a covering subset of the kernels (every
schedule, split-K, fp16 and bf16, the full epilogue, an im2col conv) NVRTC-compiles for sm_90a.
GPU (marked `gpu`): every EPI = shfl point against numpy (random inputs, outputs poisoned), on a
ragged N (the last octet and unaligned rows: the element-store fallback), a 7-row M (quads of rows
past M skip), a 1x1-conv-like K = 64 and a batch-1 split-K GEMM; D at a 2-element offset."""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from nnc.codegen.kernels import common, conv, conv_wgmma as CW, gemm, gemm_wgmma as W
from nnc.codegen.target import ARCHS

from .test_gemm_conv import HAVE_NVRTC, _check, _host, _poison, needs_gpu

SM90A = ARCHS["sm_90a"]


def _shfl_points(pr, **kw):
    return [p for p in W.candidates(pr, SM90A, unverified=("split", "epi_shfl"), **kw) if W.epi_shfl(p)]


# ---------------------------------------------------------------- the space (CPU)
def test_unverified_kinds_and_the_space():
    pr = gemm.GemmProblem(128, 768, 3072, dtype="float16")  # batch-1 FFN2: split points exist
    space = W.candidates(pr, SM90A)
    assert all(W.in_space(p) for p in space)
    assert not any(W.epi_shfl(p) or W.epi_smem(p) or W.split_k(p) > 1 for p in space)
    first = W.candidates(pr, SM90A, unverified=True)  # the first round's kinds only
    assert any(W.split_k(p) > 1 for p in first) and any(W.epi_smem(p) for p in first)
    assert not any(W.epi_shfl(p) for p in first)
    every = W.candidates(pr, SM90A, unverified="all")
    shfl = [p for p in every if W.epi_shfl(p)]
    assert shfl and all(W.load_kind(p) == "tma" and not W.in_space(p) for p in shfl)
    assert any(W.pingpong(p) for p in shfl) and any(W.persistent(p) and not W.pingpong(p) for p in shfl)
    assert any(W.split_k(p) > 1 for p in shfl)
    assert all(p in every for p in space) and every[:len(W.candidates(pr, SM90A, unverified=False))] == \
        W.candidates(pr, SM90A, unverified=False)  # the kinds' points come after the base space, unchanged
    assert W.unverified_kinds(False) == () and W.unverified_kinds(None) == ("epi_tma", "cw3_epi_tma")  # measured
    with pytest.raises(ValueError, match="unknown unverified"):
        W.unverified_kinds(("stream_k",))
    assert not W.epi_shfl(W.default_params(pr, SM90A, True))


def test_in_space_follows_the_per_kind_switch(monkeypatch):
    pr = gemm.GemmProblem(4096, 256, 64, dtype="float16", trans_b=True)
    monkeypatch.setitem(W.IN_SPACE, "epi_shfl", True)
    space = W.candidates(pr, SM90A)
    assert any(W.epi_shfl(p) for p in space) and not any(W.epi_smem(p) or W.split_k(p) > 1 for p in space)
    assert all(W.in_space(p) for p in space)
    monkeypatch.setitem(W.IN_SPACE, "epi_shfl", False)
    monkeypatch.setattr(W, "UNVERIFIED_IN_SPACE", True)  # the master switch: every kind
    assert {W.split_k(p) > 1 or W.epi_smem(p) or W.epi_shfl(p) for p in W.candidates(pr, SM90A)} == {False, True}


def test_render_refuses_and_marks():
    f32 = gemm.GemmProblem(256, 256, 256, dtype="float16", out_dtype="float32")
    assert not W.epi_shfl_fits(f32) and not _shfl_points(f32)
    odd = gemm.GemmProblem(256, 999, 256, dtype="float16", trans_b=True)  # odd rows: no pairs
    assert not W.epi_shfl_fits(odd)
    ok = gemm.GemmProblem(256, 256, 256, dtype="float16")
    p = _shfl_points(ok)[0]
    with pytest.raises(ValueError, match="2-byte output"):
        W.render(f32, p)
    with pytest.raises(ValueError, match="declared space"):
        W.render(ok, dict(p, EPI="shuffle"))
    src = W.render(ok, p).source
    assert "16-byte stores through quad shuffles" in src and "__shfl_sync(quad" in src and "make_uint4" in src
    assert W.render(ok, p).name != W.render(ok, dict(p, EPI="regs")).name


def shfl_specs():
    """A covering subset: each schedule (coop, 2 CTAs, persistent, ping-pong) once in fp16 with
    bias + residual + relu, two in bf16 with gelu, a split-K point, a 1x1/2 conv's im2col point."""
    specs = []
    pr = gemm.GemmProblem(1000, 1000, 520, dtype="float16", trans_b=True, has_bias=True, bias_dtype="float32",
                          has_c=True, c_dtype="float16", ldc_m=1000, ldc_n=1, beta=0.5, act="relu")
    pts = _shfl_points(pr)
    picks = {}
    for p in pts:
        key = ("pp" if W.pingpong(p) else "persist" if W.persistent(p) else f"cta{W.ctas_per_sm(p)}")
        picks.setdefault(key, p)
    assert set(picks) == {"pp", "persist", "cta1", "cta2"}
    specs += [W.render(pr, p) for p in picks.values()]
    bf = gemm.GemmProblem(136, 768, 768, dtype="bfloat16", has_bias=True, bias_dtype="bfloat16", act="gelu")
    specs += [W.render(bf, p) for p in _shfl_points(bf)[-2:]]
    b1 = gemm.GemmProblem(128, 768, 3072, dtype="float16")
    specs += [W.render(b1, next(p for p in _shfl_points(b1) if W.split_k(p) > 1))]
    cp = conv.ConvProblem(32, 256, 56, 56, 512, 1, 1, stride=(2, 2), in_layout="NHWC", out_layout="NHWC")
    gp, geo = CW.igemm_problem(cp), CW.im2col_geometry(cp)
    im = [p for p in W.candidates(gp, SM90A, True, True, True, unverified=("epi_shfl",)) if W.epi_shfl(p)]
    specs += [W.render(gp, next(p for p in im if W.pingpong(p)), im2col=geo, target=SM90A)]
    return specs


def _compile(src):
    return len(common.nvrtc_compile(src, "sm_90a"))


@pytest.mark.skipif(not HAVE_NVRTC, reason="NVRTC unavailable")
def test_shfl_kernels_compile_sm90a():
    specs = shfl_specs()
    srcs = list({s.name: s.source for s in specs}.values())
    assert len(srcs) >= 7  # (a persistent point is its one-tile twin's kernel on a smaller grid)
    with ProcessPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as ex:
        assert all(sz > 0 for sz in ex.map(_compile, srcs))


# ---------------------------------------------------------------- GPU
SHFL_GPU_CASES = [(1000, 996, 520, "float16", False, True, "bias_residual_relu"),  # ragged last octet
                  (7, 136, 72, "bfloat16", False, False, "bias_gelu"),  # rows past M in every tile
                  (4096, 256, 64, "float16", False, True, "bias_residual_relu"),  # a 1x1 64->256 conv's K
                  (128, 768, 3072, "float16", False, False, "none")]  # batch-1 FFN2: split-K points


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", SHFL_GPU_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}-{c[6]}")
def test_shfl_epilogue_gpu(case):
    """Every EPI = shfl point against numpy, outputs poisoned (split-K ones launched twice on the
    same scratch); then D at an offset of 2 elements (rows not 16-byte aligned: element stores)."""
    from .test_conv_tma import _cubins
    from .test_gemm_tma import _run_tma, check_points_gpu
    from .test_gemm_wgmma import _bufs, _case_arrays
    rng = np.random.default_rng(abs(hash(case)) & 0xFFFF)
    pr, a, b, extra, ref = _case_arrays(case, rng)
    odt = pr.out_dtype or pr.dtype
    tol = 1e-2 if pr.dtype == "float16" else 3e-2
    bufs = _bufs(pr, a, b, extra)
    pts = _shfl_points(pr)
    assert pts
    _cubins([W.render(pr, p) for p in pts])
    check_points_gpu(pr, pts, bufs, ref, tol)
    big = _poison((pr.M * pr.N + 8,), odt)
    view = big[2:2 + pr.M * pr.N].reshape(pr.M, pr.N)
    _run_tma(W.render(pr, pts[0]), dict(bufs, D=view))
    _check(_host(view, odt), ref, tol)


# ---------------------------------------------------------------- kinds cw3 (BM = 192) and swizzle (CPU)
def test_cw3_and_swizzle_points():
    pr = gemm.GemmProblem(4096, 768, 768, dtype="float16")
    assert not any(p["CW"] == 3 for p in W.candidates(pr, SM90A, unverified="all")
                   if W.load_kind(p) != "tma")
    cw3 = [p for p in W.candidates(pr, SM90A, unverified=("cw3", "epi_shfl")) if p["CW"] == 3]
    assert {(p["BM"], p["BN"]) for p in cw3} == {(192, 128)}
    assert all(W.in_space(p) == W.epi_tma(p) for p in cw3)  # cw3 is in the space with TMA stores only
    assert any(W.persistent(p) for p in cw3) and any(W.epi_shfl(p) for p in cw3)
    assert W.grid_of(pr, cw3[0], SM90A)[0] == 132  # 22 x 6 tiles: one whole wave
    spec = W.render(pr, cw3[0])
    assert spec.block == (512, 1, 1) and "setmaxnreg" not in spec.source
    assert not any(p["CW"] == 3 for p in W.candidates(gemm.GemmProblem(128, 768, 768), SM90A, unverified="all"))
    with pytest.raises(ValueError, match="declared space"):
        W.render(pr, dict(cw3[0], LOAD="cp_async"))
    big = gemm.GemmProblem(8192, 8192, 8192, dtype="bfloat16")
    swz = [p for p in W.candidates(big, SM90A, unverified=("swizzle",)) if p.get("swizzle") == W.SWIZZLE_WIDE]
    assert swz and all(W.load_kind(p) == "tma" and not W.in_space(p) for p in swz)
    assert not any(p.get("swizzle") == W.SWIZZLE_WIDE for p in W.candidates(pr, SM90A, unverified="all"))
    assert "GROUP_M" not in str(W.render(big, swz[0]).params) and W.render(big, swz[0]).name != \
        W.render(big, dict(swz[0], swizzle=8)).name


@pytest.mark.skipif(not HAVE_NVRTC, reason="NVRTC unavailable")
def test_cw3_kernels_compile_sm90a():
    """BM = 192 with transposed A (three 64-row MN-major boxes), the full epilogue, bf16; a 3x3 conv's
    im2col point; split-K over three consumer warp groups."""
    pr = gemm.GemmProblem(1000, 1000, 520, dtype="bfloat16", trans_a=True, has_bias=True, bias_dtype="float32",
                          has_c=True, c_dtype="bfloat16", ldc_m=1000, ldc_n=1, beta=0.5, act="gelu")
    pts = [p for p in W.candidates(pr, SM90A, unverified=("cw3", "epi_smem", "split")) if p["CW"] == 3]
    firsts = {}
    for p in pts:
        if not W.persistent(p):
            firsts.setdefault((W.epi_smem(p), W.split_k(p) > 1), p)
    assert len(firsts) == 3
    specs = [W.render(pr, p) for p in firsts.values()]
    cp = conv.ConvProblem(32, 128, 28, 28, 128, 3, 3, pads=(1,) * 4, in_layout="NHWC", out_layout="NHWC")
    gp, geo = CW.igemm_problem(cp), CW.im2col_geometry(cp)
    specs += [W.render(gp, next(p for p in W.candidates(gp, SM90A, True, True, True, unverified=("cw3",))
                                if p["CW"] == 3), im2col=geo, target=SM90A)]
    srcs = list({s.name: s.source for s in specs}.values())
    assert len(srcs) == 4
    with ProcessPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as ex:
        assert all(sz > 0 for sz in ex.map(_compile, srcs))


CW3_GPU_CASES = [(1000, 996, 520, "float16", False, True, "bias_residual_relu"),
                 (200, 136, 328, "bfloat16", True, False, "bias_gelu"),
                 (4096, 768, 768, "float16", False, False, "none")]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", CW3_GPU_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}-{c[6]}")
def test_cw3_gpu(case):
    """Every BM = 192 point (one tile a CTA, persistent, staged and shuffle epilogues) against numpy,
    outputs poisoned."""
    from .test_conv_tma import _cubins
    from .test_gemm_tma import check_points_gpu
    from .test_gemm_wgmma import _bufs, _case_arrays
    rng = np.random.default_rng(abs(hash(case)) & 0xFFFF)
    pr, a, b, extra, ref = _case_arrays(case, rng)
    bufs = _bufs(pr, a, b, extra)
    pts = [p for p in W.candidates(pr, SM90A, unverified="all") if p["CW"] == 3]
    assert pts
    _cubins([W.render(pr, p) for p in pts])
    check_points_gpu(pr, pts, bufs, ref)


@pytest.mark.gpu
@needs_gpu
def test_swizzle16_gpu():
    """The GROUP_M = 16 points (4096 x 4096, K = 128) against numpy, outputs poisoned."""
    from .test_conv_tma import _cubins
    from .test_gemm_tma import check_points_gpu
    from .test_gemm_wgmma import _bufs, _case_arrays
    case = (4096, 4096, 128, "float16", False, False, "bias")
    pr, a, b, extra, ref = _case_arrays(case, np.random.default_rng(11))
    bufs = _bufs(pr, a, b, extra)
    pts = [p for p in W.candidates(pr, SM90A, unverified=("swizzle",)) if p.get("swizzle") == W.SWIZZLE_WIDE]
    assert pts
    _cubins([W.render(pr, p) for p in pts])
    check_points_gpu(pr, pts[::2], bufs, ref, 1e-2, times=1)


# ---------------------------------------------------------------- the issue-9 scoreboard's problems (CPU)
def test_scoreboard_problems_and_points(monkeypatch):
    """tools/check_wgmma_vs_vendor.py: issue 9's shapes, each with in-space and unverified TMA points
    and the heuristic's pick (renders without a GPU)."""
    import sys
    tools = os.path.join(os.path.dirname(__file__), "..", "..", "tools")
    monkeypatch.syspath_prepend(os.path.abspath(tools))
    monkeypatch.setattr(sys, "argv", ["check_wgmma_vs_vendor.py"])
    import check_wgmma_vs_vendor as C
    labels = [p[1] for p in C.PROBLEMS]
    assert len(labels) == 17 and labels.count("8192^3") == 2 and sum("BERT" in x for x in labels) == 8
    for prob in C.PROBLEMS:
        label, dt, pr, geo, cpr, points, dflt = C.problem_points(prob)
        assert all(W.load_kind(p) == "tma" for p in points)
        assert any(W.in_space(p) for p in points) and any(not W.in_space(p) for p in points), label
        assert W.in_space(dflt)
    label, dt, pr, geo, cpr, points, dflt = C.problem_points(C.PROBLEMS[-3])  # 1x1/2: the im2col map
    assert geo is not None and W.render(pr, points[-1], im2col=geo, target=SM90A).source


# ---------------------------------------------------------------- kind split_waves
def test_split_wave_points():
    out = gemm.GemmProblem(4096, 768, 768, dtype="float16")  # 128x128: 192 tiles, 1.45 waves
    pts = [p for p in W.candidates(out, SM90A, unverified=("split_waves",)) if p.get("WAVES")]
    assert pts and all(W.split_k(p) > 1 and not W.in_space(p) for p in pts)
    assert any((p["BM"], p["BN"], W.split_k(p)) == (128, 128, 2) for p in pts)
    assert not any(p.get("WAVES") for p in W.candidates(out, SM90A, unverified=("split",)))
    b1 = gemm.GemmProblem(128, 768, 3072, dtype="float16")  # fewer tiles than SMs: kind split's case
    assert not any(p.get("WAVES") for p in W.candidates(b1, SM90A, unverified="all"))
    p = pts[0]
    assert W.render(out, p).name == W.render(out, {k: v for k, v in p.items() if k != "WAVES"}).name
    assert W.grid_of(out, p, SM90A)[1] == W.split_k(p) and W.grid_of(out, p, SM90A)[0] > SM90A.sm_count // 2


@pytest.mark.gpu
@needs_gpu
def test_split_waves_gpu():
    """Split grids of more than one wave (CTAs of a tile in different waves) against numpy,
    outputs poisoned, each launched twice on the same scratch."""
    from .test_conv_tma import _cubins
    from .test_gemm_tma import check_points_gpu
    from .test_gemm_wgmma import _bufs, _case_arrays
    case = (4096, 768, 768, "float16", False, False, "bias_residual_relu")
    pr, a, b, extra, ref = _case_arrays(case, np.random.default_rng(12))
    bufs = _bufs(pr, a, b, extra)
    pts = [p for p in W.candidates(pr, SM90A, unverified=("split_waves", "epi_shfl")) if p.get("WAVES")]
    assert pts
    _cubins([W.render(pr, p) for p in pts])
    check_points_gpu(pr, pts, bufs, ref, 1e-2, times=2)


# ---------------------------------------------------------------- kind epi_tma (D by TMA stores)
def test_epi_tma_points_and_render():
    pr = gemm.GemmProblem(4096, 256, 64, dtype="float16", trans_b=True)  # a 1x1 64->256 conv's GEMM
    pts = [p for p in W.candidates(pr, SM90A, unverified=("epi_tma",)) if W.epi_tma(p)]
    assert pts and all(W.load_kind(p) == "tma" and W.ctas_per_sm(p) == 1 and W.in_space(p) for p in pts)
    assert [p for p in W.candidates(pr, SM90A) if W.epi_tma(p)] == pts  # in the space since the H200 run
    assert any(W.pingpong(p) for p in pts) and all(W.smem_bytes(p) <= SM90A.smem_per_block_optin for p in pts)
    spec = W.render(pr, next(p for p in pts if W.pingpong(p)))
    (tmd,) = [a for a in spec.args if a[0] == "tmD"]
    assert tmd[2]["arg"] == 2 and tmd[2]["dims"] == [256, 4096] and tmd[2]["box"][0] == 64
    assert "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group" in spec.source
    assert not W.epi_tma_fits(gemm.GemmProblem(256, 256, 256, dtype="float16", out_dtype="float32"))
    assert not W.epi_tma_fits(gemm.GemmProblem(256, 252, 256, dtype="float16", trans_b=True))  # 504-byte rows
    with pytest.raises(ValueError, match="declared space"):
        W.render(pr, dict(pts[0], SPLIT_K=2))


@pytest.mark.skipif(not HAVE_NVRTC, reason="NVRTC unavailable")
def test_epi_tma_kernels_compile_sm90a():
    """Coop, ping-pong and cw3 points with the full epilogue (bf16), and a 1x1/2 conv's im2col point."""
    pr = gemm.GemmProblem(1000, 1000, 520, dtype="bfloat16", has_bias=True, bias_dtype="float32", has_c=True,
                          c_dtype="bfloat16", ldc_m=1000, ldc_n=1, beta=0.5, act="relu")
    pts = [p for p in W.candidates(pr, SM90A, unverified=("epi_tma", "cw3")) if W.epi_tma(p)]
    picks = {}
    for p in pts:
        picks.setdefault("pp" if W.pingpong(p) else f"cw{p['CW']}", p)
    specs = [W.render(pr, p) for p in picks.values()]
    cp = conv.ConvProblem(32, 256, 56, 56, 512, 1, 1, stride=(2, 2), in_layout="NHWC", out_layout="NHWC")
    gp, geo = CW.igemm_problem(cp), CW.im2col_geometry(cp)
    im = [p for p in W.candidates(gp, SM90A, True, True, True, unverified=("epi_tma",)) if W.epi_tma(p)]
    specs += [W.render(gp, next(p for p in im if W.pingpong(p)), im2col=geo, target=SM90A)]
    assert len(specs) >= 4
    with ProcessPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as ex:
        assert all(sz > 0 for sz in ex.map(_compile, [s.source for s in specs]))


EPI_TMA_GPU_CASES = [(1000, 1000, 520, "bfloat16", False, True, "bias_residual_relu"),  # ragged M: clipped rows
                     (200, 136, 328, "float16", True, False, "bias_gelu"),  # ragged N past a 64-column box
                     (4096, 256, 64, "float16", False, True, "bias_residual_relu")]  # a 1x1 64->256 conv's K


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", EPI_TMA_GPU_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}-{c[6]}")
def test_epi_tma_gpu(case):
    """Every EPI = tma point (cw3 too) against numpy, outputs poisoned (with a poisoned guard row
    past M: the TMA store must clip), each launched twice."""
    from .test_conv_tma import _cubins
    from .test_gemm_tma import _run_tma
    from .test_gemm_wgmma import _bufs, _case_arrays
    rng = np.random.default_rng(abs(hash(case)) & 0xFFFF)
    pr, a, b, extra, ref = _case_arrays(case, rng)
    odt = pr.out_dtype or pr.dtype
    bufs = _bufs(pr, a, b, extra)
    pts = [p for p in W.candidates(pr, SM90A, unverified=("epi_tma", "cw3")) if W.epi_tma(p)]
    assert pts
    _cubins([W.render(pr, p) for p in pts])
    for p in pts:
        big = _poison((pr.M + 1, pr.N), odt)
        d = big[:pr.M]
        _run_tma(W.render(pr, p), dict(bufs, D=d), times=2)
        _check(_host(d, odt), ref, 1e-2 if pr.dtype == "float16" else 3e-2)
        assert not np.isfinite(_host(big[pr.M:], odt)).any(), f"{p} wrote past M"


# ---------------------------------------------------------------- the flip (H200, 2026-12-03 ~15:50)
def test_epi_tma_in_the_space_and_the_heuristic():
    """EPI = tma and cw3 + EPI = tma are in the space; the other kinds are not; a GEMM's heuristic
    pick is an EPI = tma point (the measured-best one on these: BERT b1 64x64x8, b32 FFN1 128x128x5
    ping-pong, FFN2 128x192x4, 4096^3 128x256x3 persistent); a 3x3 conv's keeps the register
    epilogue, a 1x1/2 conv's variant asks for EPI = tma."""
    for (M, N, K), tile in {(128, 2304, 768): (64, 64, 8, None), (4096, 3072, 768): (128, 128, 5, "pingpong"),
                            (4096, 768, 3072): (128, 192, 4, None), (4096, 4096, 4096): (128, 256, 3, "persist")}.items():
        pr = gemm.GemmProblem(M, N, K, dtype="float16")
        d = W.default_params(pr, SM90A, b_bulk=True)
        sched = "pingpong" if W.pingpong(d) else "persist" if W.persistent(d) else None
        assert W.epi_tma(d) and W.in_space(d) and (d["BM"], d["BN"], d["STAGES"], sched) == tile, (M, N, K, d)
    space = W.candidates(gemm.GemmProblem(4096, 768, 768, dtype="float16"), SM90A)
    assert any(p["CW"] == 3 for p in space) and all(W.epi_tma(p) for p in space if p["CW"] == 3)
    assert not any(W.epi_shfl(p) or W.epi_smem(p) or W.split_k(p) > 1 or p.get("swizzle") == W.SWIZZLE_WIDE
                   for p in space)
    cp = conv.ConvProblem(32, 64, 56, 56, 64, 3, 3, pads=(1,) * 4, in_layout="NHWC", out_layout="NHWC")
    gp = CW.igemm_problem(cp)
    assert not W.epi_tma(W.default_params(gp, SM90A, True, True, True))
    strided = conv.ConvProblem(32, 256, 56, 56, 512, 1, 1, stride=(2, 2), in_layout="NHWC", out_layout="NHWC")
    gs = CW.igemm_problem(strided)
    assert W.epi_tma(W.default_params(gs, SM90A, True, True, True, prefer_epi_tma=True))
    assert not W.epi_tma(W.default_params(gs, SM90A, True, True, True))


# ---------------------------------------------------------------- EPI = tma through a compiled model
def _tma_store_first(monkeypatch):
    from nnc.codegen import variants
    monkeypatch.setitem(variants.SELECTORS, "tma-store-first",
                        lambda: variants.TimedSelector(lambda c, p: 0.0 if W.epi_tma(p) else 1.0))
    return "tma-store-first"


def test_lowered_plan_carries_the_d_map(monkeypatch, tmp_path):
    """A model whose GEMMs take EPI = tma points: each such launch has a third tensor map, of its own
    D argument (the output buffer), and the C API host code encodes three maps."""
    import json

    from nnc.codegen import tma
    from .test_gemm_tma import _compile_model, _tma_model
    _compile_model(_tma_model(), tmp_path / "m", _tma_store_first(monkeypatch))
    jplan = json.loads((tmp_path / "m" / "plan.json").read_text())
    three = [l for l in jplan["launches"] if sum(a.get("type") == tma.TMAP_CTYPE for a in l["args"]) == 3]
    assert three, [l["kernel"] for l in jplan["launches"]]
    for l in three:
        maps = [tma.spec_of(a["value"]) for a in l["args"] if a.get("type") == tma.TMAP_CTYPE]
        assert [m.arg for m in maps] == [0, 1, 2] and "buf" in l["args"][2]
    host = (tmp_path / "m" / "model.cu").read_text()
    assert "tm2);" in host and "D by TMA stores" in host


@pytest.mark.gpu
@needs_gpu
def test_epi_tma_model_through_nnc_load_gpu(monkeypatch, tmp_path):
    """The runtime encodes the D maps from the arena (CUDA graph and eager, outputs poisoned),
    against the reference interpreter."""
    import nnc
    from nnc.ir.interp import Interpreter
    from .test_gemm_tma import _compile_model, _tma_model
    mod, plan = _compile_model(_tma_model(), tmp_path / "m", _tma_store_first(monkeypatch))
    rng = np.random.default_rng(13)
    for cuda_graph in (True, False):
        g = nnc.load(tmp_path / "m", cuda_graph=cuda_graph)
        feed = {x.name: rng.standard_normal(x.type.shape).astype(np.float32) for x in mod.main.args}
        ref = Interpreter(mod).run(feed)
        got = g.run(feed, output="numpy", poison=True)
        for k, v in ref.items():
            v = np.asarray(v, np.float64)
            err = np.abs(np.asarray(got[k], np.float64) - v).max() / (np.abs(v).max() + 1e-12)
            assert err < 2e-2, (k, err)
