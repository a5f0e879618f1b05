"""NHWC convs on the Hopper wgmma pipeline (codegen/kernels/conv_wgmma.py, templates/gemm_wgmma.cu.j2
with a_im2col).

CPU: applies() (sm_90a only, dtypes, groups, C % 8, with reasons), the declared space fits the
Target with the row table, the kernels of ResNet-50-like shapes (and C % 64 != 0, dilation,
asymmetric pads) NVRTC-compile for sm_90a, and an NHWC ResNet-like model built for sm_90a picks the
wgmma conv variants (the stem, C = 3, stays on conv.igemm_nhwc) while sm_90 never sees them. GPU
(marked `gpu`): each ResNet-50 shape at batch 1 and 32, fp16, random inputs, outputs poisoned with
NaN, against a conv of the rounded inputs (fp32 on the GPU, tap by tap), with and without the
bias + residual + relu epilogue; and the whole compiler path against the reference interpreter."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from nnc.codegen.kernels import common, conv, conv_wgmma as CW, gemm_wgmma as W
from nnc.codegen.target import ARCHS

from . import space_cover
from .test_gemm_conv import HAVE_NVRTC, _check, _dev, _host, _poison, _rounded, needs_gpu

SM90A = ARCHS["sm_90a"]

# label -> (C, H, W, K, R, S, stride, pad): ResNet-50 (v1.5) layer shapes
RESNET50 = {
    "1x1_256to64_56": (256, 56, 56, 64, 1, 1, 1, 0),
    "3x3_64to64_56_pad1": (64, 56, 56, 64, 3, 3, 1, 1),
    "3x3s2_128to128_56_pad1": (128, 56, 56, 128, 3, 3, 2, 1),
    "1x1s2_256to512_56": (256, 56, 56, 512, 1, 1, 2, 0),
}


def _conv_problem(N, C, H, W_, K, R, S, stride, pad, dtype="float16", pads=None, dil=1, epi=False):
    return conv.ConvProblem(N, C, H, W_, K, R, S, stride=(stride, stride), pads=pads or (pad,) * 4,
                            dilation=(dil, dil), dtype=dtype, in_layout="NHWC", out_layout="NHWC",
                            has_bias=epi, has_c=epi, act="relu" if epi else "none")


def _gemm(pr):
    return CW.igemm_problem(pr, pr.dtype if pr.has_bias else None, pr.dtype if pr.has_c else None, pr.act)


def _is_pointwise(pr):
    return (pr.R, pr.S, pr.stride, tuple(pr.pads)) == (1, 1, (1, 1), (0, 0, 0, 0))


def _render(pr, params):
    """The kernel the variant renders: pointwise -> the plain wgmma GEMM, else a_im2col."""
    return W.render(_gemm(pr), params, im2col=None if _is_pointwise(pr) else CW.im2col_geometry(pr), target=SM90A)


# ---------------------------------------------------------------- applies / space (CPU)
@pytest.mark.parametrize("kw,why", [
    (dict(C=12), "multiple of 8"),
    (dict(dtype="float32"), "float32"),
    (dict(H=40000), "int16"),
])
def test_igemm_fits_refuses_with_reason(kw, why):
    a = dict(N=1, C=64, H=56, W_=56, K=64, R=3, S=3, stride=1, pad=1)
    a.update({k: v for k, v in kw.items() if k != "dtype"})
    pr = _conv_problem(**a, dtype=kw.get("dtype", "float16"))
    f = CW.igemm_fits(pr)
    assert not f and why in f.why, f.why


def test_igemm_fits_resnet_shapes_and_grouped_refused():
    for C, H, W_, K, R, S, st, pad in RESNET50.values():
        assert CW.igemm_fits(_conv_problem(32, C, H, W_, K, R, S, st, pad))
    g = conv.ConvProblem(1, 64, 8, 8, 64, 3, 3, pads=(1,) * 4, groups=2, in_layout="NHWC", out_layout="NHWC")
    f = CW.igemm_fits(g)
    assert not f and "grouped" in f.why


def test_space_within_target_with_row_table():
    for N in (1, 32):
        for C, H, W_, K, R, S, st, pad in RESNET50.values():
            gp = _gemm(_conv_problem(N, C, H, W_, K, R, S, st, pad))
            for bulk in (False, True):
                space = W.candidates(gp, SM90A, bulk, im2col=True)
                assert space and W.default_params(gp, SM90A, bulk, im2col=True) in space
                for p in space:
                    assert W.smem_bytes(p, True) == W.smem_bytes(p) + 8 * p["BM"]
                    assert W.smem_bytes(p, True) <= SM90A.smem_per_block_optin
                    assert W.ctas_per_sm(p) * (W.smem_bytes(p, True) + W.SMEM_RESERVED_PER_CTA) <= SM90A.smem_per_sm


def test_im2col_geometry():
    g = CW.im2col_geometry(_conv_problem(2, 64, 56, 56, 128, 3, 3, 2, 1))
    assert (g["CV_P"], g["CV_Q"], g["CV_SH"], g["CV_PH"], g["cv_inbounds"]) == (28, 28, 2, 1, False)
    assert CW.im2col_geometry(_conv_problem(2, 256, 56, 56, 512, 1, 1, 2, 0))["cv_inbounds"]


# ---------------------------------------------------------------- NVRTC compile (CPU)
def all_specs():
    """[(case, spec)]: ResNet-50 shapes at batch 1 and 32 with and without the epilogue (the whole
    space at 32 with it, else the default point), and odd problems at every third point."""
    specs = []
    for N in (1, 32):
        for label, (C, H, W_, K, R, S, st, pad) in RESNET50.items():
            for epi in (False, True):
                pr = _conv_problem(N, C, H, W_, K, R, S, st, pad, epi=epi)
                gp = _gemm(pr)
                im = not _is_pointwise(pr)
                pts = [W.default_params(gp, SM90A, True, im)]
                if N == 32 and epi:  # the whole space once per shape (the staged epilogue: test_gemm_tma)
                    pts = [p for p in W.candidates(gp, SM90A, True, im) if not W.epi_smem(p)]
                specs += [(f"{label} N={N} epi={epi}", _render(pr, p)) for p in pts]
    # C % 64 != 0 (division path), dilation, asymmetric pads, bf16, a LAG publish mode
    odd = {"C24 s2 epi": _conv_problem(2, 24, 20, 20, 40, 3, 3, 2, 1, epi=True),
           "dilation 2": _conv_problem(1, 64, 17, 19, 64, 3, 3, 1, 2, dil=2),
           "pads 0011 bf16 epi": _conv_problem(1, 128, 14, 14, 256, 3, 3, 2, 0, pads=(0, 0, 1, 1),
                                               dtype="bfloat16", epi=True),
           "C8 5x5": _conv_problem(1, 8, 9, 9, 16, 5, 5, 1, 2)}
    for label, pr in odd.items():
        gp = _gemm(pr)
        for p in W.candidates(gp, SM90A, True, True)[::3]:
            specs.append((label, _render(pr, p)))
            if not W.pingpong(p):  # ping-pong publishes with noinc only
                specs.append((label, _render(pr, dict(p, LAG=1))))
    return specs


@pytest.mark.skipif(not HAVE_NVRTC, reason="NVRTC unavailable")
def test_every_point_compiles_sm90a():
    """NVRTC compiles a covering subset of all_specs() (tests/codegen/space_cover.py: each case,
    each parameter value, each kernel kind, each line of code); NNC_FULL_SPACE=1: every point.
    Every point's source is checked as text."""
    labelled = all_specs()
    specs = [s for _, s in labelled]
    assert len({s.name for s in specs}) >= 30
    chosen = space_cover.to_compile(labelled, lambda s: [s.name.rsplit("_", 1)[0]])
    assert all(sz > 0 for sz in space_cover.nvrtc_compile_all([s.source for s in chosen]))
    im = [s for s in specs if s.name.startswith("nnc_conv_wgmma")]
    assert im and all("im2col of NHWC" in s.source and "bar.sync 1, 128" in s.source for s in im)
    assert all("wgmma.mma_async" in s.source for s in specs)


# ---------------------------------------------------------------- lowering (CPU): the golden plan
def _resnet_like():
    """Stem 7x7/2 on 3 channels, MaxPool, a bottleneck (1x1 -> 3x3 -> 1x1 with bias) with a strided
    1x1 downsample and a strided 3x3, residual add + relu, GAP head: channels multiples of 8."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    inits = {"ws": w(32, 3, 7, 7), "bs": w(32), "w1": w(16, 32, 1, 1), "b1": w(16), "w2": w(16, 16, 3, 3),
             "b2": w(16), "w3": w(64, 16, 1, 1), "b3": w(64), "wd": w(64, 32, 1, 1), "bd": w(64),
             "wf": w(10, 64), "bf": w(10)}
    N = helper.make_node
    nodes = [N("Conv", ["x", "ws", "bs"], ["s"], pads=[3] * 4, strides=[2, 2]), N("Relu", ["s"], ["sr"]),
             N("MaxPool", ["sr"], ["p"], kernel_shape=[3, 3], pads=[1] * 4, strides=[2, 2]),
             N("Conv", ["p", "w1", "b1"], ["c1"]), N("Relu", ["c1"], ["r1"]),
             N("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1] * 4, strides=[2, 2]), N("Relu", ["c2"], ["r2"]),
             N("Conv", ["r2", "w3", "b3"], ["c3"]),
             N("Conv", ["p", "wd", "bd"], ["d"], strides=[2, 2]),
             N("Add", ["c3", "d"], ["a"]), N("Relu", ["a"], ["r3"]),
             N("GlobalAveragePool", ["r3"], ["g"]), N("Flatten", ["g"], ["f"]),
             N("Gemm", ["f", "wf", "bf"], ["y"], transB=1)]
    F = TensorProto.FLOAT
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 3, 64, 64])],
                          [helper.make_tensor_value_info("y", F, [2, 10])],
                          [numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _module():
    from nnc.driver import pipeline_passes
    from nnc.onnx_import import import_model
    from nnc.pipeline import Pipeline
    m = import_model(_resnet_like())
    Pipeline(pipeline_passes("fp16"), verify_each=True).run(m)
    return m


def _conv_variants(plan):
    return sorted(s.variant for s in plan.selections if "Conv(" in s.op)


def test_resnet_like_plan_picks_wgmma_convs_on_sm90a():
    from nnc.codegen.lower import lower
    plan = lower(_module(), {"arch": "sm_90a", "precision": "fp16"})
    assert _conv_variants(plan) == ["conv.igemm_nhwc", "conv.igemm_wgmma_nhwc", "conv.igemm_wgmma_nhwc",
                                    "conv.pointwise_wgmma_nhwc", "conv.pointwise_wgmma_nhwc"], _conv_variants(plan)
    for s in plan.selections:
        if s.variant == "conv.pointwise_wgmma_nhwc":
            assert "conv.pointwise_gemm_nhwc" in s.candidates and (s.params.get("b_bulk") is True
                                                                  or W.load_kind(s.params) == "tma")  # TMA: measured faster
        if s.variant == "conv.igemm_wgmma_nhwc":
            assert "conv.igemm_nhwc" in s.candidates and s.params.get("b_bulk") is True
    ks = [k for k in plan.kernels.values() if k.template == W.TEMPLATE]
    assert len(ks) == 4
    for k in ks:
        src = str(k.source)
        assert src.lstrip().startswith("// ====") and "template: gemm_wgmma.cu.j2" in src and "Conv" in src
    assert sum("im2col of NHWC" in str(k.source) for k in ks) == 2
    base = lower(_module(), {"arch": "sm_90", "precision": "fp16"})
    assert not [v for v in _conv_variants(base) if "wgmma" in v]
    assert not any("wgmma" in c for s in base.selections for c in s.candidates)


def test_every_space_point_renders_through_the_model():
    """Each (variant, params) of the wgmma conv candidates' declared spaces renders in the model
    (the timed selector's race: a timer that prefers one point at a time, all of them in turn)."""
    from nnc.codegen.lower import lower
    from nnc.codegen.variants import TimedSelector
    m = _module()
    spaces = {}

    def record(c, p):
        if c.variant.family == CW.FAMILY:
            spaces.setdefault(c.problem.key, (c.name, c.space))
        return 0.0 if c.variant.family == CW.FAMILY else 1.0
    lower(m, {"arch": "sm_90a", "precision": "fp16"}, selector=TimedSelector(record))
    assert len(spaces) == 4
    n = max(len(sp) for _, sp in spaces.values())
    for i in range(1, n):  # the i-th point of every space (clamped)
        def pick(c, p, i=i):
            if c.variant.family != CW.FAMILY:
                return 1.0
            return 0.0 if p == c.space[min(i, len(c.space) - 1)] else 0.5
        plan = lower(_module(), {"arch": "sm_90a", "precision": "fp16"}, selector=TimedSelector(pick))
        assert sum(k.template == W.TEMPLATE for k in plan.kernels.values()) == 4


def test_wgmma_conv_variants_registered_above_mma_sync():
    from nnc.codegen.kernels import conv_lowering
    assert CW.POINTWISE_WGMMA_NHWC.priority > conv_lowering.POINTWISE_GEMM_NHWC.priority
    assert CW.IGEMM_WGMMA_NHWC in conv_lowering.OTHER_CONV_VARIANTS


# ---------------------------------------------------------------- GPU correctness
def _run(spec, bufs):
    import cupy
    fn = common.load_cubin(common.nvrtc_compile(spec.source, "sm_90a"), spec)
    common.launch(fn, spec, bufs)
    cupy.cuda.runtime.deviceSynchronize()


def _conv_ref_gpu(x, w, pr):
    """NHWC conv of x [N, H, W, C] with OHWI w [K, R, S, C] (cupy fp32), tap by tap: one GEMM of
    the strided window per (r, s)."""
    import cupy
    N, H, W_, C = x.shape
    K = w.shape[0]
    pt, pl, pb, pr_ = pr.pads
    xp = cupy.zeros((N, H + pt + pb, W_ + pl + pr_, C), cupy.float32)
    xp[:, pt:pt + H, pl:pl + W_] = x
    sh, sw = pr.stride
    dh, dw = pr.dilation
    out = cupy.zeros((N * pr.P * pr.Q, K), cupy.float32)
    for r in range(pr.R):
        for s in range(pr.S):
            win = xp[:, r * dh: r * dh + (pr.P - 1) * sh + 1: sh, s * dw: s * dw + (pr.Q - 1) * sw + 1: sw]
            out += win.reshape(-1, C) @ w[:, r, s, :].T
    return out


GPU_CASES = [(lbl, n, epi) for lbl in RESNET50 for n in (1, 32) for epi in (False, True)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}-b{c[1]}-{'bias_res_relu' if c[2] else 'plain'}")
def test_wgmma_conv_gpu(case):
    import cupy
    label, N, epi = case
    C, H, W_, K, R, S, st, pad = RESNET50[label]
    pr = _conv_problem(N, C, H, W_, K, R, S, st, pad, epi=epi)
    gp = _gemm(pr)
    im = not _is_pointwise(pr)
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
    x = _rounded(rng.uniform(-1, 1, (N, H, W_, C)), "float16").astype(np.float32)
    w = _rounded(rng.uniform(-1, 1, (K, R, S, C)) / np.sqrt(R * S * C), "float16").astype(np.float32)
    xd, wd = cupy.asarray(x), cupy.asarray(w)
    ref = _conv_ref_gpu(xd, wd, pr)
    bufs = dict(A=_dev(x, "float16"), B=_dev(w, "float16"))
    if epi:
        bias = _rounded(rng.uniform(-1, 1, K), "float16")
        res = _rounded(rng.uniform(-1, 1, (gp.M, K)), "float16")
        ref = cupy.maximum(ref + cupy.asarray(bias, cupy.float32) + cupy.asarray(res, cupy.float32), 0)
        bufs.update(bias=_dev(bias, "float16"), C=_dev(res, "float16"))
    ref = ref.get().astype(np.float64)
    space = W.candidates(gp, SM90A, True, im)
    bulk = [p for p in space if p.get("b_bulk")]
    plain = [p for p in space if not p.get("b_bulk")]
    dflt = W.default_params(gp, SM90A, True, im)
    lagged = [p for p in plain if not W.pingpong(p) and W.load_kind(p) != "tma"][-1]  # ping-pong, TMA: no LAG
    points = [dflt, plain[0], dict(lagged, LAG=1)] if N == 32 else bulk + plain[:2]
    for p in points:
        d = _poison((gp.M, K), "float16")
        bb = bufs
        if p.get("b_bulk"):
            bb = dict(bufs, B=_dev(W.preswizzle_b(w.reshape(K, -1), True, p["BN"]), "float16"))
        _run(_render(pr, p), dict(bb, D=d))
        _check(_host(d, "float16"), ref, 1e-2)


@pytest.mark.gpu
@needs_gpu
def test_compiled_resnet_like_for_sm90a_matches_interpreter_gpu(tmp_path):
    """The whole path: assign-layout NHWC + fused conv epilogues -> the wgmma conv variants
    (heuristic, weights pre-swizzled into weights.bin) -> NVRTC sm_90a -> nnc.load, against the
    reference interpreter (poisoned arena and outputs, fresh inputs)."""
    import nnc
    from nnc.codegen.emit import compile_to_dir
    from nnc.ir.interp import Interpreter
    m = _module()
    plan = compile_to_dir(m, tmp_path, arch="sm_90a", precision="fp16", tf32=False)
    assert sum(W.TEMPLATE in str(k.get("template", "")) for k in plan["kernels"]) == 4, plan["kernels"]
    g = nnc.load(tmp_path)
    rng = np.random.default_rng(11)
    for _ in range(2):
        feed = {a.name: rng.standard_normal(a.type.shape).astype(np.float32) for a in m.main.args}
        ref = Interpreter(m).run(feed)
        got = g.run(feed, output="numpy", poison=True)
        for k, v in ref.items():
            a, b = np.asarray(got[k]).astype(np.float64), v.astype(np.float64)
            assert np.isfinite(a).all(), f"{k}: non-finite output"
            np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2 * max(1.0, float(np.abs(b).max())))
