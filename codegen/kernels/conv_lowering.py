"""Conv / ConvTranspose (NCHW 1-D and 2-D, NHWC 2-D) on the fast conv + GEMM families, priority 10.

Conv, per case (first match):
* depthwise-like (C/group == 1): direct kernel, specialised depthwise path (conv_direct.cu.j2), any dtype.
* 1x1, stride 1, no padding: a batched GEMM straight on NCHW, no layout pass:
  Y[n, g] (KG x HW) = W[g] (KG x CG) @ X[n, g] (CG x HW); bias enters as a per-row C operand.
* fp16 / bf16 / fp32 with `tf32`: NCHW -> NHWC (+ channel zero-padding to 16 bytes) transpose into a
  temp, then the tensor-core implicit GEMM (conv_igemm.cu.j2) with the weight pre-transformed at
  compile time to OHWI and the NCHW output written by its epilogue. Grouped convs whose C/group is not
  a multiple of 16 bytes use the direct kernel.
* strict fp32 (no tf32): im2col into a temp (conv_im2col.cu.j2) + FFMA batched GEMM (gemm_f32.cu.j2)
  writing NCHW; the direct kernel when the im2col buffer would exceed IM2COL_MAX_BYTES; declines (the
  fallback) when that GEMM has fewer 64x64 CTAs than gemm_lowering.F32_MIN_CTAS (no split-K yet).
ConvTranspose: the direct gather kernel (no atomics), any dtype.

Conv {layout = "NHWC"} (set by compiler/passes/assign_layout.py; weight already OHWI, output NHWC):
* depthwise: the NHWC direct kernel (conv_direct.cu.j2, channels innermost, 2 per thread);
* 1x1, stride 1, no padding, groups 1: one plain GEMM [N*H*W, C] x [C, K] (weight as B^T), bias per column;
* otherwise: the implicit GEMM reading NHWC and writing NHWC (no layout kernel, no channel padding:
  C/group not a multiple of 16 bytes loads by element gathers).

Declines (fallback_linalg.py handles Conv; ConvTranspose has no fallback) for 3-D convs, mixed or
unsupported dtypes, grids past the hardware limits.
"""
from __future__ import annotations


from ..lower import LowerCtx, lowering
from . import conv, gemm
from .common import CTYPES
from .epilogue import NONE, Epilogue
from .gemm_lowering import (FAST_PRIORITY, MAX_GRID_YZ, aligned, emit_gemm, emit_spec, f32_worth_it, gemm_ok,
                            kernel_dtype, use_tf32)
from .pool import spatial_pads
from .conv_weight import ohwi_weight

IM2COL_MAX_BYTES = 512 << 20


def conv_params_for(ctx: LowerCtx, problem: conv.ConvProblem, kind: str) -> dict:
    """Tile parameters (heuristic for now; `conv.candidates(problem, kind)` is the tuning space)."""
    return conv.default_params(problem, kind, ctx.target)


def _geometry_2d(x_shape, w_shape):
    """(N, C, H, W, R, S, nd) with 1-D convs mapped onto H = R = 1."""
    nd = len(x_shape) - 2
    if nd == 2:
        return x_shape[0], x_shape[1], x_shape[2], x_shape[3], w_shape[2], w_shape[3], 2
    if nd == 1:
        return x_shape[0], x_shape[1], 1, x_shape[2], 1, w_shape[2], 1
    return None


def _operands(ctx: LowerCtx):
    """((x, w, y, bias), kernel dtype, 2-D geometry) of a Conv/ConvTranspose the fast kernels
    take, or None (unsupported dtype, empty output, 3-D): the lowering then declines."""
    x, w, y, bias = ctx.inp(0), ctx.inp(1), ctx.out(0), ctx.inp(2)
    dt = kernel_dtype(x, w, y, bias)
    g2 = _geometry_2d(x.shape, w.shape)
    if dt is None or y.numel == 0 or g2 is None:
        return None
    return (x, w, y, bias), dt, g2


def _to2(v, nd, fill):
    v = list(v)
    return tuple(v) if nd == 2 else (fill, v[0])


def _emit_direct(ctx, pr, x, w, y, bias, res=None):
    if pr.N * pr.K > MAX_GRID_YZ:
        return None
    spec = conv.render(pr, conv_params_for(ctx, pr, "direct"), kind="direct")
    emit_spec(ctx, spec, {"X": x, "W": w, "Y": y, "bias": bias, "C": res})
    return True


def _nchw_gemm_epilogue(dt, bias, res, epi: Epilogue, K: int, KG: int, PQ: int):
    """GemmProblem epilogue fields and C/bias bindings of a conv run as a batched GEMM writing NCHW
    (rows: the output channels of group z1, columns: pixels)."""
    kw = dict(act=epi.act, act_params=epi.act_params)
    if res is None:  # the bias enters as a per-row C operand (broadcast along the columns)
        kw.update(has_c=bias is not None, c_dtype=dt, ldc_m=1, ldc_n=0, stride_c=(0, KG), beta=1.0)
        return kw, {"C": bias}
    kw.update(has_c=True, c_dtype=dt, ldc_m=PQ, ldc_n=1, stride_c=(K * PQ, KG * PQ), beta=1.0,
              has_bias=bias is not None, bias_dtype=dt, bias_rows=True, bias_stride_z1=KG)
    return kw, {"C": res, "bias": bias}


@lowering("Conv", priority=FAST_PRIORITY)
def _conv(ctx: LowerCtx, epi: Epilogue = NONE):
    """epi: the epilogue of a fused group (codegen/kernels/epilogue_fusion.py); every path below
    takes bias, residual and activation, none a scale."""
    if (ctx.attr("layout", "NCHW") or "NCHW") == "NHWC":
        return _conv_nhwc(ctx, epi)
    got = _operands(ctx)
    if got is None or epi.alpha != 1.0 or epi.beta != 1.0:
        return None
    (x, w, y, bias), dt, (N, C, H, W, R, S, nd) = got
    if epi.bias is not None:  # the op's own bias is already summed into it
        bias = epi.bias
    res = epi.residual
    if kernel_dtype(x, bias, res) != dt or (res is not None and tuple(res.shape) != tuple(y.shape)):
        return None
    in_sp, out_sp, kernel = list(x.shape[2:]), list(y.shape[2:]), list(w.shape[2:])
    strides = list(ctx.attr("strides") or [1] * nd)
    dil = list(ctx.attr("dilations") or [1] * nd)
    begin, end = spatial_pads(ctx, in_sp, out_sp, kernel, strides, dil)
    groups = int(ctx.attr("group", 1) or 1)
    K = y.shape[1]
    sh, sw = _to2(strides, nd, 1)
    dh, dw = _to2(dil, nd, 1)
    pt, pl = _to2(begin, nd, 0)
    pb, pr_ = _to2(end, nd, 0)
    tf32 = use_tf32(ctx) and dt == "float32"
    pr = conv.ConvProblem(N, C, H, W, K, R, S, stride=(sh, sw), pads=(pt, pl, pb, pr_), dilation=(dh, dw),
                          groups=groups, dtype=dt, has_bias=bias is not None, tf32=tf32,
                          has_c=res is not None, act=epi.act, act_params=epi.act_params)
    P, Q = (out_sp[0], out_sp[1]) if nd == 2 else (1, out_sp[0])
    if pr.P != P or pr.Q != Q or C % groups or K % groups or w.shape[1] != C // groups:
        return None
    CG, KG = pr.CG, pr.KG

    if CG == 1:  # depthwise (and single-input-channel convs)
        return _emit_direct(ctx, pr, x, w, y, bias, res)

    if R == 1 and S == 1 and (sh, sw) == (1, 1) and (pt, pl, pb, pr_) == (0, 0, 0, 0):
        # pointwise: batched GEMM on NCHW, no layout pass
        HW = H * W
        kw, cb = _nchw_gemm_epilogue(dt, bias, res, epi, K, KG, HW)
        gp = gemm.GemmProblem(KG, HW, CG, dtype=dt, tf32=tf32, batch=(N, groups), stride_a=(0, KG * CG),
                              stride_b=(C * HW, CG * HW), stride_d=(K * HW, KG * HW), **kw)
        if gemm_ok(gp) and aligned(x):
            emit_gemm(ctx, gp, {"A": w, "B": x, "D": y, **cb})
            return True

    epc = 16 // CTYPES[dt][1]
    if pr.igemm_ok():
        if groups > 1 and CG % epc:
            return _emit_direct(ctx, pr, x, w, y, bias, res)
        if N > MAX_GRID_YZ or groups > MAX_GRID_YZ:
            return None
        cp = conv.padded_channels(pr)
        wpad = cp if groups == 1 else None  # only ungrouped convs pad their input channels
        # a const weight transposed at compile time, an init value at load (conv_weight.py)
        wt = ohwi_weight(ctx, K, CG, R, S, groups, wpad, f"ohwi_c{cp}", dt)
        if wt is None:
            return None
        xt = ctx.temp(x.dtype, (N, H, W, cp), "nhwc")
        lay = conv.render_layout("nchw_to_nhwc", N, C, H * W, dt, CP=cp)
        emit_spec(ctx, lay, {"X": x, "Y": xt})
        cpr = conv.ConvProblem(N, cp, H, W, K, R, S, stride=(sh, sw), pads=(pt, pl, pb, pr_), dilation=(dh, dw),
                               groups=groups, dtype=dt, has_bias=bias is not None, tf32=tf32,
                               in_layout="NHWC", out_layout="NCHW",
                               has_c=res is not None, act=epi.act, act_params=epi.act_params)
        spec = conv.render(cpr, conv_params_for(ctx, cpr, "igemm"), kind="igemm")
        emit_spec(ctx, spec, {"X": xt, "W": wt, "Y": y, "bias": bias, "C": res})
        return True

    # strict fp32: im2col + FFMA GEMM writing NCHW
    RS, PQ = R * S, P * Q
    col_bytes = N * C * RS * PQ * CTYPES[dt][1]
    kw, cb = _nchw_gemm_epilogue(dt, bias, res, epi, K, KG, PQ)
    gp = gemm.GemmProblem(KG, PQ, CG * RS, dtype=dt, batch=(N, groups), stride_a=(0, KG * CG * RS),
                          stride_b=(C * RS * PQ, CG * RS * PQ), stride_d=(K * PQ, KG * PQ), **kw)
    if not f32_worth_it(gp, ctx.target):  # too few FFMA CTAs: the fallback measured faster (H100, resnet18 l3/l4 at b8)
        return None
    if col_bytes > IM2COL_MAX_BYTES or not gemm_ok(gp):
        return _emit_direct(ctx, pr, x, w, y, bias, res)
    col = ctx.temp(x.dtype, (N, C * RS, PQ), "col")
    emit_spec(ctx, conv.render_im2col(pr), {"X": x, "Y": col})
    emit_gemm(ctx, gp, {"A": w, "B": col, "D": y, **cb})
    return True


def _conv_nhwc(ctx: LowerCtx, epi: Epilogue):
    """Conv {layout = "NHWC"} (compiler/passes/assign_layout.py): X [N,H,W,C], weight already OHWI
    [K,R,S,C/g], Y [N,P,Q,K]. Never declines: the fallback lowerings only know NCHW, so a case no
    kernel here takes is a clear error instead."""
    x, w, y, bias = ctx.inp(0), ctx.inp(1), ctx.out(0), ctx.inp(2)
    dt = kernel_dtype(x, w, y, bias)
    if epi.bias is not None:
        bias = epi.bias
    res = epi.residual
    if dt is None or kernel_dtype(x, bias, res) != dt or epi.alpha != 1.0 or epi.beta != 1.0 or \
            (res is not None and tuple(res.shape) != tuple(y.shape)):
        ctx.fail("an NHWC Conv needs one float dtype on all operands (and no epilogue scale)")
    N, H, W, C = x.shape
    K, R, S, CG = w.shape
    _, P, Q, _ = y.shape
    strides = list(ctx.attr("strides") or [1, 1])
    dil = list(ctx.attr("dilations") or [1, 1])
    begin, end = spatial_pads(ctx, [H, W], [P, Q], [R, S], strides, dil)
    groups = int(ctx.attr("group", 1) or 1)
    tf32 = use_tf32(ctx) and dt == "float32"
    pr = conv.ConvProblem(N, C, H, W, K, R, S, stride=tuple(strides), pads=(begin[0], begin[1], end[0], end[1]),
                          dilation=tuple(dil), groups=groups, dtype=dt, has_bias=bias is not None, tf32=tf32,
                          in_layout="NHWC", out_layout="NHWC",
                          has_c=res is not None, act=epi.act, act_params=epi.act_params)
    if pr.P != P or pr.Q != Q or C % groups or K % groups or CG != C // groups or y.numel == 0:
        ctx.fail(f"NHWC Conv geometry: input {list(x.shape)}, weight {list(w.shape)}, output {list(y.shape)}")
    bufs = {"X": x, "W": w, "Y": y, "bias": bias, "C": res}
    if CG == 1:  # depthwise: channels-vectorised direct kernel
        spec = conv.render(pr, dict(NT=256, OPT=1), kind="direct")
        emit_spec(ctx, spec, bufs)
        return True
    if groups == 1 and (R, S) == (1, 1) and tuple(strides) == (1, 1) and pr.pads == (0, 0, 0, 0):
        # pointwise: one plain GEMM, D [N*H*W, K] = X [N*H*W, C] @ W[K, C]^T, per-column bias
        kw = dict(act=epi.act, act_params=epi.act_params)
        if bias is not None:
            kw.update(has_bias=True, bias_dtype=dt)
        if res is not None:
            kw.update(has_c=True, c_dtype=dt, ldc_m=K, ldc_n=1, beta=1.0)
        gp = gemm.GemmProblem(N * H * W, K, C, dtype=dt, tf32=tf32, trans_b=True, **kw)
        if gemm_ok(gp) and aligned(x) and aligned(w) and (dt != "float32" or tf32):
            emit_gemm(ctx, gp, {"A": x, "B": w, "D": y, "C": res, "bias": bias})
            return True
    if not pr.igemm_ok() or N > MAX_GRID_YZ or groups > MAX_GRID_YZ:
        ctx.fail(f"no NHWC kernel for this Conv ({dt}{'' if dt != 'float32' else ' without tf32'}, "
                 f"groups {groups}): assign-layout leaves such convs NCHW")
    # implicit GEMM reading NHWC directly (16-byte cp.async when C/group % 8 == 0 (fp16), element
    # gathers otherwise, e.g. the 3-channel stem) and writing NHWC from its epilogue
    spec = conv.render(pr, conv_params_for(ctx, pr, "igemm"), kind="igemm")
    emit_spec(ctx, spec, bufs)
    return True


@lowering("ConvTranspose", priority=FAST_PRIORITY)
def _conv_transpose(ctx: LowerCtx):
    from ...ir.ops.conv import _convt_geometry
    got = _operands(ctx)
    if got is None:
        return None
    (x, w, y, bias), dt, (N, C, H, W, R, S, nd) = got
    groups = int(ctx.attr("group", 1) or 1)
    K = y.shape[1]
    kernel = list(w.shape[2:])
    pads, out = _convt_geometry(ctx.attrs, list(x.shape[2:]), kernel)
    if [int(o) for o in out] != list(y.shape[2:]) or K != w.shape[1] * groups or C % groups:
        return None
    strides = list(ctx.attr("strides") or [1] * nd)
    dil = list(ctx.attr("dilations") or [1] * nd)
    sh, sw = _to2(strides, nd, 1)
    dh, dw = _to2(dil, nd, 1)
    P, Q = (out[0], out[1]) if nd == 2 else (1, out[0])
    ph, pw = _to2([p[0] for p in pads], nd, 0)
    # end pads chosen so that ConvProblem's output size is exactly (P, Q) (output_padding folded in)
    full_h, full_w = (H - 1) * sh + (R - 1) * dh + 1, (W - 1) * sw + (S - 1) * dw + 1
    pr = conv.ConvProblem(N, C, H, W, K, R, S, stride=(sh, sw), pads=(ph, pw, full_h - P - ph, full_w - Q - pw),
                          dilation=(dh, dw), groups=groups, dtype=dt, has_bias=bias is not None, transposed=True)
    if pr.P != P or pr.Q != Q:
        return None
    return _emit_direct(ctx, pr, x, w, y, bias)
