"""GEMM / convolution kernel families: NVRTC compile check of every tuning candidate (CPU), and GPU
correctness against numpy float64 (marked `gpu`, skipped without a device)."""
from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from nnc.codegen.kernels import common, conv, gemm  # noqa: E402  (the package: its modules import nnc.ir)

try:
    from cupy_backends.cuda.libs import nvrtc  # noqa: F401
    HAVE_NVRTC = True
except Exception:  # noqa: BLE001
    HAVE_NVRTC = False


def _have_gpu() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001
        return False


gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not _have_gpu(), reason="no CUDA device")


# ---------------------------------------------------------------- compile every candidate (CPU)
def all_specs():
    """Every candidate of every template (primary flag set), plus each flag variant with one candidate."""
    specs = []
    for dt, tf in (("float16", False), ("bfloat16", False), ("float32", True), ("float32", False)):
        base = gemm.GemmProblem(4096, 4096, 4096, dtype=dt, tf32=tf, has_bias=True, act="relu")
        for p in gemm.candidates(base):
            if p.get("swizzle", gemm.GROUP_M) == gemm.GROUP_M:  # other block orders: test_gemm_swizzle.py
                specs.append(gemm.render(base, p))
        for ta in (False, True):
            for tb in (False, True):
                pr = gemm.GemmProblem(1000, 999, 333, dtype=dt, tf32=tf, trans_a=ta, trans_b=tb, has_c=True,
                                      ldc_m=0, act="gelu")
                specs.append(gemm.render(pr, gemm.candidates(pr)[-1]))
    for dt, tf in (("float16", False), ("bfloat16", False), ("float32", True)):
        base = conv.ConvProblem(32, 256, 56, 56, 256, 3, 3, pads=(1, 1, 1, 1), dtype=dt, tf32=tf, in_layout="NHWC",
                                out_layout="NHWC", has_bias=True, has_c=True, act="relu")
        for p in conv.candidates(base):
            specs.append(conv.render(base, p))
        odd = conv.ConvProblem(2, 3, 17, 17, 20, 7, 7, stride=(2, 2), pads=(3, 3, 3, 3), dtype=dt, tf32=tf)
        specs.append(conv.render(odd))  # NCHW in/out, scalar gathers
    for dt in ("float32", "float16"):
        for g, tr in ((1, False), (8, False), (8, True)):
            pr = conv.ConvProblem(1, 8, 12, 12, 8 if g > 1 else 4, 3, 3, stride=(2, 2), pads=(1, 1, 1, 1), groups=g,
                                  dtype=dt, transposed=tr, has_bias=True)
            for p in conv.candidates(pr, "direct"):
                specs.append(conv.render(pr, p, kind="direct"))
        for d in ("nchw_to_nhwc", "nhwc_to_nchw"):
            specs.append(conv.render_layout(d, 2, 3, 50, dt, CP=8))
    return specs


def _group_key(spec):
    # sources with the same element typedefs can share one translation unit
    src = spec.source
    return tuple(line for line in src.splitlines() if line.startswith("typedef"))


def _compile_group(sources):
    return len(common.nvrtc_compile("\n".join(sources), "sm_90"))


@pytest.mark.skipif(not HAVE_NVRTC, reason="NVRTC unavailable")
def test_every_candidate_compiles_sm90():
    """Every candidate renders; a covering subset (tests/codegen/space_cover.py: every parameter value
    and every distinct code line at least once) NVRTC-compiles; NNC_FULL_SPACE=1 compiles them all."""
    from . import space_cover
    specs = all_specs()
    n_distinct = len({s.name for s in specs})
    specs = space_cover.to_compile([("", s) for s in specs])
    groups: dict = {}
    seen = set()
    for s in specs:
        if s.name in seen:
            continue
        seen.add(s.name)
        groups.setdefault(_group_key(s), []).append(s.source)
    # split big groups so the pool can spread the work
    chunks = []
    for srcs in groups.values():
        for i in range(0, len(srcs), 6):
            chunks.append(srcs[i:i + 6])
    with ProcessPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as ex:
        sizes = list(ex.map(_compile_group, chunks))
    assert all(sz > 0 for sz in sizes)
    assert n_distinct >= 40 and len(seen) >= (n_distinct if space_cover.full_space() else 8)


def test_api_shapes():
    p = gemm.matmul_problem((8, 1, 128, 64), (12, 64, 32), "float16")
    assert p.batch == (8, 12) and p.stride_a == (128 * 64, 0) and p.stride_b == (0, 64 * 32)
    spec = gemm.render(p)
    assert spec.grid[2] == 96 and spec.arg_order[:3] == ["A", "B", "D"]
    assert all(c["BM"] <= 128 for c in gemm.candidates(gemm.GemmProblem(100, 100, 100)))
    w = np.random.rand(16, 3, 7, 7).astype(np.float32)
    wp = conv.prepare_weight(w, c_pad=8)
    assert wp.shape == (16, 7, 7, 8) and np.all(wp[..., 3:] == 0) and np.allclose(wp[..., :3], w.transpose(0, 2, 3, 1))


# ---------------------------------------------------------------- GPU correctness
def _np_act(x, act):
    if act == "relu":
        return np.maximum(x, 0)
    if act == "gelu":
        from math import erf, sqrt
        return 0.5 * x * (1 + np.vectorize(erf)(x / sqrt(2)))
    if act == "sigmoid":
        return 1 / (1 + np.exp(-x))
    return x


_NP = {"float16": np.float16, "float32": np.float32}


def _bf16():
    import ml_dtypes
    return ml_dtypes.bfloat16


def _dev(x, dtype):
    import cupy
    if dtype == "bfloat16":
        return cupy.asarray(x.astype(_bf16()).view(np.uint16)).view(cupy.uint16)
    return cupy.asarray(x.astype(_NP[dtype]))


def _host(x, dtype):
    if dtype == "bfloat16":
        return x.get().view(_bf16()).astype(np.float64)
    return x.get().astype(np.float64)


def _rounded(x, dtype):
    return x.astype(_bf16() if dtype == "bfloat16" else _NP[dtype]).astype(np.float64)


def _poison(shape, dtype):
    import cupy
    if dtype == "bfloat16":
        return cupy.full(shape, 0x7FC0, dtype=cupy.uint16)
    return cupy.full(shape, np.nan, dtype=_NP[dtype])


def _run(spec, bufs):
    fn = common.load_cubin(common.nvrtc_compile(spec.source), spec)
    common.launch(fn, spec, bufs)
    import cupy
    cupy.cuda.runtime.deviceSynchronize()


def _tol(dtype, tf32=False):
    return {"float16": 1e-2, "bfloat16": 3e-2, "float32": 3e-3 if tf32 else 1e-3}[dtype]


def _check(got, ref, rtol):
    assert np.isfinite(got).all(), "NaN/inf in output (unwritten poison?)"
    err = np.abs(got - ref).max() / (np.abs(ref).max() + 1e-12)
    assert err < rtol, f"rel err {err:.3g} >= {rtol}"


GEMM_CASES = [
    # M, N, K, dtype, tf32, ta, tb
    (256, 256, 256, "float16", False, False, False),
    (129, 67, 77, "float16", False, False, False),
    (200, 136, 96, "float16", False, True, True),
    (64, 72, 40, "float16", False, False, True),
    (100, 130, 70, "float16", False, True, False),
    (130, 96, 64, "bfloat16", False, False, True),
    (129, 67, 77, "float32", False, False, False),
    (96, 200, 50, "float32", False, True, True),
    (129, 67, 77, "float32", True, False, True),
    (128, 96, 64, "float32", True, True, False),
]


@gpu
@needs_gpu
@pytest.mark.parametrize("case", GEMM_CASES)
def test_gemm_gpu(case):
    M, N, K, dt, tf, ta, tb = case
    rng = np.random.default_rng(hash(case) & 0xFFFF)
    a = rng.uniform(-1, 1, (K, M) if ta else (M, K))
    b = rng.uniform(-1, 1, (N, K) if tb else (K, N))
    c = rng.uniform(-1, 1, (1, N))
    bias = rng.uniform(-1, 1, N)
    pr = gemm.GemmProblem(M, N, K, dtype=dt, tf32=tf, trans_a=ta, trans_b=tb, has_c=True, ldc_m=0, ldc_n=1,
                          alpha=0.5, beta=2.0, has_bias=True, act="relu")
    ar, br, cr, biasr = (_rounded(x, dt) for x in (a, b, c, bias))
    ref = np.maximum(0.5 * ((ar.T if ta else ar) @ (br.T if tb else br)) + 2.0 * cr + biasr, 0)
    for p in gemm.candidates(pr):
        spec = gemm.render(pr, p)
        d = _poison((M, N), dt)
        _run(spec, dict(A=_dev(a, dt), B=_dev(b, dt), C=_dev(c, dt), bias=_dev(bias, dt), D=d))
        _check(_host(d, dt), ref, _tol(dt, tf))


@gpu
@needs_gpu
@pytest.mark.parametrize("dt", ["float16", "float32"])
def test_batched_matmul_broadcast_gpu(dt):
    rng = np.random.default_rng(1)
    a = rng.uniform(-1, 1, (3, 1, 33, 40))
    b = rng.uniform(-1, 1, (4, 40, 24))
    pr = gemm.matmul_problem(a.shape, b.shape, dt, act="gelu")
    ref = _np_act(_rounded(a, dt) @ _rounded(b, dt), "gelu")
    spec = gemm.render(pr)
    d = _poison(ref.shape, dt)
    _run(spec, dict(A=_dev(a, dt), B=_dev(b, dt), D=d))
    _check(_host(d, dt), ref, _tol(dt))


def _np_conv(x, w, stride, pads, dil, groups):
    N, C, H, W = x.shape
    K, CG, R, S = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    P = (H + pads[0] + pads[2] - dil[0] * (R - 1) - 1) // stride[0] + 1
    Q = (W + pads[1] + pads[3] - dil[1] * (S - 1) - 1) // stride[1] + 1
    y = np.zeros((N, K, P, Q))
    KG = K // groups
    for g in range(groups):
        for r in range(R):
            for s in range(S):
                patch = xp[:, g * CG:(g + 1) * CG, r * dil[0]: r * dil[0] + stride[0] * (P - 1) + 1: stride[0],
                           s * dil[1]: s * dil[1] + stride[1] * (Q - 1) + 1: stride[1]]
                y[:, g * KG:(g + 1) * KG] += np.einsum("nchw,kc->nkhw", patch, w[g * KG:(g + 1) * KG, :, r, s])
    return y


def _np_conv_transpose(x, w, stride, pads, dil, groups, out_pad=(0, 0)):
    N, C, H, W = x.shape
    _, KG, R, S = w.shape
    CG = C // groups
    P = (H - 1) * stride[0] - pads[0] - pads[2] + dil[0] * (R - 1) + out_pad[0] + 1
    Q = (W - 1) * stride[1] - pads[1] - pads[3] + dil[1] * (S - 1) + out_pad[1] + 1
    full = np.zeros((N, KG * groups, P + pads[0] + pads[2] + stride[0] * 2 + R * dil[0], Q + pads[1] + pads[3] + stride[1] * 2 + S * dil[1]))
    for g in range(groups):
        for r in range(R):
            for s in range(S):
                contrib = np.einsum("nchw,ck->nkhw", x[:, g * CG:(g + 1) * CG], w[g * CG:(g + 1) * CG, :, r, s])
                full[:, g * KG:(g + 1) * KG, r * dil[0]: r * dil[0] + stride[0] * (H - 1) + 1: stride[0],
                     s * dil[1]: s * dil[1] + stride[1] * (W - 1) + 1: stride[1]] += contrib
    return full[:, :, pads[0]:pads[0] + P, pads[1]:pads[1] + Q]


CONV_CASES = [
    # N, C, H, W, K, R, S, stride, pads, dil, groups, dtype, tf32
    (2, 16, 10, 10, 24, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, "float16", False),
    (1, 3, 19, 19, 20, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1), 1, "float16", False),
    (2, 32, 9, 11, 40, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, "bfloat16", False),
    (1, 32, 9, 9, 32, 3, 3, (2, 1), (1, 0, 2, 1), (2, 1), 2, "float16", False),
    (2, 16, 10, 10, 24, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, "float32", True),
]


@gpu
@needs_gpu
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_igemm_gpu(case):
    N, C, H, W, K, R, S, st, pads, dil, g, dt, tf = case
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, (N, C, H, W))
    w = rng.uniform(-1, 1, (K, C // g, R, S))
    bias = rng.uniform(-1, 1, K)
    pr = conv.ConvProblem(N, C, H, W, K, R, S, stride=st, pads=pads, dilation=dil, groups=g, dtype=dt, tf32=tf,
                          has_bias=True, act="relu")
    ref = np.maximum(_np_conv(_rounded(x, dt), _rounded(w, dt), st, pads, dil, g) + _rounded(bias, dt)[None, :, None, None], 0)
    # (1) planned NCHW path: layout transform (+channel pad) then igemm writing NCHW
    steps = conv.plan(pr)
    cp = padded_channels = conv.padded_channels(pr)
    wdev = _dev(conv.prepare_weight(w, g, cp if cp != C else None), dt) if steps[-1][0].params["family"] == "igemm" else _dev(w, dt)
    bufs = dict(x=_dev(x, dt), w=wdev, bias=_dev(bias, dt), y=_poison(ref.shape, dt),
                tmp_x=_poison((N, H, W, padded_channels), dt))
    for spec, roles in steps:
        _run(spec, {k: bufs[v] for k, v in roles.items() if v in bufs})
    _check(_host(bufs["y"], dt), ref, _tol(dt, tf))
    # (2) every candidate on NHWC in/out, and NCHW in/out with element gathers
    xh = _dev(x.transpose(0, 2, 3, 1).copy(), dt)
    wd = _dev(conv.prepare_weight(w, g), dt)
    for p in conv.candidates(pr):
        spec = conv.render(conv.ConvProblem(**{**pr.__dict__, "in_layout": "NHWC", "out_layout": "NHWC"}), p, kind="igemm")
        y = _poison((N, ref.shape[2], ref.shape[3], K), dt)
        _run(spec, dict(X=xh, W=wd, bias=_dev(bias, dt), Y=y))
        _check(_host(y, dt).transpose(0, 3, 1, 2), ref, _tol(dt, tf))
    spec = conv.render(pr, kind="igemm")
    y = _poison(ref.shape, dt)
    _run(spec, dict(X=_dev(x, dt), W=wd, bias=_dev(bias, dt), Y=y))
    _check(_host(y, dt), ref, _tol(dt, tf))


DIRECT_CASES = [
    # N, C, H, W, K, R, S, stride, pads, dil, groups, transposed, dtype
    (2, 8, 11, 13, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 8, False, "float32"),      # depthwise
    (1, 12, 15, 15, 24, 5, 5, (2, 2), (2, 2, 2, 2), (1, 1), 12, False, "float16"),   # depthwise x2 mult
    (2, 6, 9, 9, 4, 3, 3, (2, 2), (1, 0, 1, 1), (1, 2), 2, False, "float32"),        # grouped direct
    (2, 6, 5, 7, 4, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 1, True, "float32"),         # conv transpose
    (1, 8, 6, 6, 6, 4, 4, (2, 2), (1, 1, 1, 1), (1, 1), 2, True, "float16"),         # grouped conv transpose
]


@gpu
@needs_gpu
@pytest.mark.parametrize("case", DIRECT_CASES)
def test_conv_direct_gpu(case):
    N, C, H, W, K, R, S, st, pads, dil, g, tr, dt = case
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (N, C, H, W))
    w = rng.uniform(-1, 1, (C, K // g, R, S) if tr else (K, C // g, R, S))
    bias = rng.uniform(-1, 1, K)
    xr, wr = _rounded(x, dt), _rounded(w, dt)
    ref = (_np_conv_transpose(xr, wr, st, pads, dil, g) if tr else _np_conv(xr, wr, st, pads, dil, g))
    ref = ref + _rounded(bias, dt)[None, :, None, None]
    pr = conv.ConvProblem(N, C, H, W, K, R, S, stride=st, pads=pads, dilation=dil, groups=g, dtype=dt,
                          transposed=tr, has_bias=True)
    assert (pr.P, pr.Q) == ref.shape[2:]
    for p in conv.candidates(pr, "direct"):
        spec = conv.render(pr, p, kind="direct")
        y = _poison(ref.shape, dt)
        _run(spec, dict(X=_dev(x, dt), W=_dev(w, dt), bias=_dev(bias, dt), Y=y))
        _check(_host(y, dt), ref, _tol(dt))
