"""NHWC convolutions on the Hopper wgmma GEMM pipeline (templates/gemm_wgmma.cu.j2, gemm_wgmma.py):
declared Variants of family "conv_wgmma" at gemm_wgmma.PRIORITY (11, above the mma.sync conv
variants' FAST_PRIORITY 10), so on sm_90a the heuristic prefers them and the timed selector races
them against conv.pointwise_gemm_nhwc / conv.igemm_nhwc; elsewhere (no Target.has_wgmma) they never
apply.

* conv.pointwise_wgmma_nhwc: a 1x1, stride-1, unpadded, ungrouped NHWC conv is the plain GEMM
  D [N*H*W, K] = X [N*H*W, C] @ W [K, C]^T: exactly the GemmProblem conv.pointwise_gemm_nhwc
  renders (conv_lowering._nhwc_case: per-column bias, residual as C, activation), on the wgmma
  kernel; a constant weight (OHWI [K, 1, 1, C]) is pre-swizzled for bulk copies like a MatMul's.
* conv.igemm_wgmma_nhwc: any other ungrouped NHWC conv with C % 8 == 0 (R, S, stride, pads,
  dilation): the implicit GEMM D [N*P*Q, K] = im2col(X) [N*P*Q, R*S*C] @ W [K, R*S*C]^T, the
  template's a_im2col loader (rows = output pixels, k = (r, s, c) in the OHWI order, 16-byte
  chunks of 8 channels gathered from x or zero-filled out of bounds); B as for the GEMM.

    applies(problem) -> Fit   sm_90a (gemm_wgmma.fits), fp16/bf16, NHWC, groups 1, 16-byte aligned
                              x (and weight), C % 8 == 0 (igemm), int32 offsets into x
    space                     gemm_wgmma.candidates (the bulk-B points first when the weight is a
                              constant; the im2col row table counted in shared memory); igemm
                              with C % 64 == 0 and dilation 1 (gemm_wgmma.im2col_tma_fits): also the
                              TMA points, A by an im2col tensor map of x (LOAD = tma, codegen/tma.py
                              mode "im2col"), B by a tiled one
    default                   gemm_wgmma.default_params (its wave model; TMA im2col at
                              gemm_wgmma.IM2COL_TMA_RATE); 1x1 convs (strided too) prefer the
                              EPI = tma points (gemm_wgmma.PREFER_EPI_TMA, measured on ResNet-50's)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..lower import LowerCtx
from ..variants import YES, Variant, no, register
from . import conv, conv_lowering as CL, gemm, gemm_wgmma as W
from .gemm_lowering import aligned, emit_spec, gemm_ok

FAMILY = "conv_wgmma"
PRIORITY = W.PRIORITY
MAX_SPATIAL = 1 << 15  # the row table packs (ih0, iw0) as two int16


@dataclass(frozen=True)
class _Case:
    """What a variant's applies derived (problem.memo, one key per variant): the GemmProblem, whether
    the weight is a constant to pre-swizzle for bulk copies, the im2col geometry (None: pointwise)
    and whether an im2col tensor map can load it (the TMA points)."""
    gemm: gemm.GemmProblem
    bulk: bool
    im2col: Optional[dict]
    im2col_tma: bool = False


def im2col_geometry(pr: conv.ConvProblem) -> dict:
    """The template's compile-time conv geometry (CV_*) and cv_inbounds (no padding: every tap of
    every output pixel lies inside x)."""
    return dict(CV_H=pr.H, CV_W=pr.W, CV_C=pr.C, CV_P=pr.P, CV_Q=pr.Q, CV_R=pr.R, CV_S=pr.S,
                CV_SH=pr.stride[0], CV_SW=pr.stride[1], CV_PH=pr.pads[0], CV_PW=pr.pads[1],
                CV_DH=pr.dilation[0], CV_DW=pr.dilation[1], cv_inbounds=not any(pr.pads))


def igemm_problem(pr: conv.ConvProblem, bias_dtype=None, c_dtype=None, act="none", act_params=()) -> gemm.GemmProblem:
    """The implicit GEMM of an NHWC conv: [N*P*Q, R*S*C] x [K, R*S*C]^T, the epilogue fields of
    conv_lowering's pointwise NHWC GemmProblem (per-column bias, residual C [N*P*Q, K])."""
    kw = dict(act=act, act_params=tuple(act_params))
    if bias_dtype is not None:
        kw.update(has_bias=True, bias_dtype=bias_dtype)
    if c_dtype is not None:
        kw.update(has_c=True, c_dtype=c_dtype, ldc_m=pr.K, ldc_n=1, beta=1.0)
    return gemm.GemmProblem(pr.N * pr.P * pr.Q, pr.K, pr.R * pr.S * pr.C, dtype=pr.dtype, trans_b=True, **kw)


def igemm_fits(pr: conv.ConvProblem):
    """Fit: whether the im2col loader takes the conv's geometry (GEMM limits are gemm_wgmma.fits')."""
    if pr.groups != 1:
        return no("grouped conv")
    if pr.dtype not in ("float16", "bfloat16"):
        return no(f"wgmma conv takes fp16/bf16, not {pr.dtype}")
    if pr.C % 8:
        return no(f"C = {pr.C} is not a multiple of 8 (16-byte chunks of one tap)")
    if max(pr.H, pr.W, *pr.pads, pr.R * pr.dilation[0], pr.S * pr.dilation[1]) >= MAX_SPATIAL:
        return no("spatial extents past the row table's int16")
    if pr.N * pr.H * pr.W * pr.C >= 2 ** 31:
        return no("x has 2^31 elements or more (int32 offsets)")
    return YES


def _bulk_b(problem) -> bool:
    v = problem.value(1)
    return v is not None and v.dtype.itemsize == 2


def _nhwc(problem):
    """The NHWC case (conv_lowering._nhwc, which raises when no NHWC kernel takes it), or why not."""
    if not CL._nhwc_layout(problem):
        return "an NCHW conv"
    return CL._nhwc(problem)


def _applies_pointwise(problem):
    c = _nhwc(problem)
    if isinstance(c, str):
        return no(c)
    if "pointwise" not in c.paths:
        return no("not a 1x1, stride-1, unpadded, ungrouped conv (or not 16-byte aligned)")
    fit = W.fits(c.gemm, problem.target)
    if not fit:
        return fit
    problem.memo["conv_wgmma.pointwise"] = _Case(c.gemm, _bulk_b(problem), None)
    return YES


def _applies_igemm(problem):
    c = _nhwc(problem)
    if isinstance(c, str):
        return no(c)
    pr = c.pr
    if "pointwise" in c.paths:
        return no("a pointwise conv: conv.pointwise_wgmma_nhwc (the same GEMM without gathers)")
    fit = igemm_fits(pr)
    if not fit:
        return fit
    if not aligned(problem.tensor(0)) or not aligned(problem.tensor(1)):
        return no("x or the weight not 16-byte aligned")
    epi = CL._epi(problem)
    has_bias = epi.bias is not None or problem.tensor(2) is not None
    gp = igemm_problem(pr, pr.dtype if has_bias else None, pr.dtype if epi.residual is not None else None,
                       epi.act, epi.act_params)
    if not gemm_ok(gp):
        return no("GEMM grid or index limits")
    fit = W.fits(gp, problem.target)
    if not fit:
        return fit
    geo = im2col_geometry(pr)
    problem.memo["conv_wgmma.igemm"] = _Case(gp, _bulk_b(problem), geo, bool(W.im2col_tma_fits(gp, geo)))
    return YES


def _space(key: str):
    def space(problem) -> list:
        c = problem.memo[key]
        return W.candidates(c.gemm, problem.target, c.bulk, c.im2col is not None, c.im2col_tma)
    return space


def _default(key: str):
    def default(problem, space) -> dict:
        c = problem.memo[key]
        one_tap = c.im2col is None or (c.im2col["CV_R"], c.im2col["CV_S"]) == (1, 1)  # measured: 1x1 convs
        return W.default_params(c.gemm, problem.target, c.bulk, c.im2col is not None, c.im2col_tma,
                                prefer_epi_tma=one_tap)
    return default


def _time_model(key: str):
    def cost(problem, params) -> float:
        c = problem.memo[key]
        return W.modelled_time(c.gemm, params, problem.target, c.im2col is not None)
    return cost


def _gemm_b(w):
    """An OHWI weight [K, R, S, C] as the GEMM's B^T [K, R*S*C]."""
    return w.reshape(w.shape[0], -1)


def _render(key: str):
    def render(ctx: LowerCtx, problem, params: dict):
        return _emit(ctx, problem, problem.memo[key], params)
    return render


def _emit(ctx: LowerCtx, problem, case: _Case, params: dict):
    epi = CL._epi(problem)
    bulk = bool(params.get("b_bulk"))
    # conv_lowering._buffers' order; a pre-swizzled B reads its own weight buffer instead of the
    # constant's (which is then never made)
    x, w, y = ctx.inp(0), problem.tensor(1) if bulk else ctx.inp(1), ctx.out(0)
    bias = epi.bias if epi.bias is not None else ctx.inp(2)
    pr = case.gemm
    params = W.tma_store_or_regs(params, y)
    if bulk:
        BN = params["BN"]
        w = ctx.weight(1, lambda v: W.preswizzle_b(_gemm_b(v), True, BN), key=f"wgmma_conv_b{BN}")
    spec = W.render(pr, params, im2col=case.im2col, target=problem.target)
    emit_spec(ctx, spec, {"A": x, "B": w, "D": y, "C": epi.residual, "bias": bias})
    return True


def _variant(name, rank, applies, key) -> Variant:
    v = register(Variant(name, FAMILY, ("Conv",), _render(key), applies, _space(key), _default(key),
                         priority=PRIORITY, rank=rank, cost=_time_model(key)))
    CL.add_conv_variant(v)  # a fused conv group's anchor may render with it too
    return v


POINTWISE_WGMMA_NHWC = _variant("conv.pointwise_wgmma_nhwc", 0, _applies_pointwise, "conv_wgmma.pointwise")
IGEMM_WGMMA_NHWC = _variant("conv.igemm_wgmma_nhwc", 1, _applies_igemm, "conv_wgmma.igemm")
