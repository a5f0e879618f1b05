"""Spatial sampling and resampling, one thread per output element. gridsample.cu.j2: GridSample
(1-3-D, nearest / linear / cubic). resize_taps.cu.j2: Resize linear / cubic (priority 5 over
movement.py's Resize, which keeps nearest: per-axis tap tables computed at compile time with the reference's own 1-D
resampler). roialign.cu.j2, center_crop_pad.cu.j2, col2im.cu.j2, affine_grid.cu.j2: RoiAlign, CenterCropPad, Col2Im,
AffineGrid. deform_conv.cu.j2: DeformConv (bilinearly sampled inputs)."""
from __future__ import annotations

import numpy as np

from ..lower import LowerCtx, lowering
from ._helpers import empty_result, float_acc, grid_stride_launch, norm_axis


@lowering("GridSample")
def _grid_sample(ctx: LowerCtx):
    x, g, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    nd = len(x.shape) - 2
    if not 1 <= nd <= 3:
        ctx.fail(f"{nd}-D GridSample is not supported")
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(ctx.attr("mode", "linear"), ctx.attr("mode", "linear"))
    if mode not in ("nearest", "linear", "cubic"):
        ctx.fail(f"mode {mode!r} is not supported")
    k = ctx.render("gridsample.cu.j2", "grid_sample", ctype=x.ctype, gctype=g.ctype, nd=nd, dims=list(x.shape[2:]),
                   C=x.shape[1], out_total=int(np.prod(y.shape[2:], dtype=np.int64)),
                   in_total=int(np.prod(x.shape[2:], dtype=np.int64)), mode=mode,
                   padding=ctx.attr("padding_mode", "zeros"), align_corners=bool(ctx.attr("align_corners", 0)))
    if y.numel:
        ctx.launch(k, ctx.grid1d(y.numel), 256, [x, g, y, ctx.i64(y.numel)])
    else:
        ctx.alias(0, ctx.new_weight(np.zeros(y.shape, y.dtype.np)))
    return True


@lowering("Resize", priority=5)
def _resize_taps(ctx: LowerCtx):
    a = ctx.attrs
    mode = getattr(a, "mode", "nearest")
    # every linear and cubic mode: the taps come from the reference resampler, so each
    # coordinate_transformation_mode (half_pixel_symmetric, align_corners...) matches it exactly
    if mode not in ("cubic", "linear"):
        return None
    if a.coordinate_transformation_mode == "tf_crop_and_resize":
        ctx.fail("tf_crop_and_resize is not supported with linear / cubic")
    from ...ir.ops.nn import _resize_axis
    x, y = ctx.inp(0), ctx.out(0)
    if empty_result(ctx):
        return True
    rank = len(x.shape)
    scales = None
    if ctx.has(2):
        v = ctx.value(2)
        if v is not None and np.asarray(v).size:
            scales = [float(s) for s in np.asarray(v).reshape(-1)]
            if a.axes and len(scales) != rank:
                full = [1.0] * rank
                for ax, s in zip(a.axes, scales):
                    full[norm_axis(ax, rank)] = s
                scales = full
    if scales is None or a.keep_aspect_ratio_policy != "stretch":
        scales = [o / i for o, i in zip(y.shape, x.shape)]
    resized = [d for d in range(rank) if y.shape[d] != x.shape[d] or scales[d] != 1.0]
    idx_t, w_t, T, toff = [], [], [], []
    off = 0
    for d in resized:
        n_in, n_out = x.shape[d], y.shape[d]
        mat = _resize_axis(a, np.eye(n_in), 0, scales[d], n_out, None)  # [out, in]
        t = max(1, int((mat != 0).sum(axis=1).max()))
        ii = np.zeros((n_out, t), np.int32)
        ww = np.zeros((n_out, t), np.float32)
        for o in range(n_out):
            nz = np.nonzero(mat[o])[0]
            ii[o, :len(nz)] = nz
            ww[o, :len(nz)] = mat[o, nz]
        idx_t.append(ii.reshape(-1))
        w_t.append(ww.reshape(-1))
        T.append(t)
        toff.append(off)
        off += n_out * t
    if not resized:
        ctx.alias(0, x)
        return True
    tb = ctx.new_weight(np.concatenate(idx_t), "taps_i")
    wb = ctx.new_weight(np.concatenate(w_t), "taps_w")
    grid_stride_launch(ctx, "resize_taps.cu.j2", "resize_taps",
                       [f"const {x.ctype}* __restrict__ x", "const int32_t* __restrict__ tidx",
                        "const float* __restrict__ tw", f"{y.ctype}* __restrict__ y"],
                       [x, tb, wb, y], y.numel, ctype=y.ctype, oshape=list(y.shape), in_strides=x.strides(),
                       resized=resized, T=T, toff=toff, ntaps=int(np.prod(T)))
    return True


@lowering("RoiAlign")
def _roialign(ctx: LowerCtx):
    X, rois, bi, y = ctx.inp(0), ctx.inp(1), ctx.inp(2), ctx.out(0)
    if empty_result(ctx):
        return True
    a = ctx.attrs
    _, C, H, W = X.shape
    grid_stride_launch(ctx, "roialign.cu.j2", "roialign",
                       [f"const {X.ctype}* __restrict__ X", f"const {rois.ctype}* __restrict__ rois",
                        f"const {bi.ctype}* __restrict__ bidx", f"{y.ctype}* __restrict__ y"],
                       [X, rois, bi, y], y.numel, ctype=y.ctype, OH=a.output_height, OW=a.output_width, C=C, H=H, W=W,
                       off="0.5" if a.coordinate_transformation_mode == "half_pixel" else "0.0",
                       scale=repr(float(a.spatial_scale)), sr=int(a.sampling_ratio), mode=a.mode)
    return True


@lowering("CenterCropPad")
def _ccp(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    if empty_result(ctx):
        return True
    delta = []
    for d in range(len(x.shape)):
        i, o = x.shape[d], y.shape[d]
        delta.append((i - o) // 2 if o < i else -((o - i) // 2))
    grid_stride_launch(ctx, "center_crop_pad.cu.j2", "center_crop_pad",
                       [f"const {x.ctype}* __restrict__ x", f"{y.ctype}* __restrict__ y"],
                       [x, y], y.numel, ctype=y.ctype, oshape=list(y.shape), ishape=list(x.shape), istr=x.strides(),
                       delta=delta)
    return True


def _const(ctx, i, what):
    v = ctx.value(i)
    if v is None:
        ctx.fail(f"{what} (operand {i}) must be a compile-time constant")
    return np.asarray(v)


@lowering("Col2Im")
def _col2im(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    img = [int(v) for v in _const(ctx, 1, "image_shape").reshape(-1)]
    ks = [int(v) for v in _const(ctx, 2, "block_shape").reshape(-1)]
    nd = len(img)
    st = list(ctx.attr("strides") or [1] * nd)
    dl = list(ctx.attr("dilations") or [1] * nd)
    p = list(ctx.attr("pads") or [0] * (2 * nd))
    O = [(img[i] + p[i] + p[i + nd] - ((ks[i] - 1) * dl[i] + 1)) // st[i] + 1 for i in range(nd)]
    Ostr = [int(np.prod(O[i + 1:], dtype=np.int64)) for i in range(nd)]
    if empty_result(ctx):
        return True
    grid_stride_launch(ctx, "col2im.cu.j2", "col2im",
                       [f"const {x.ctype}* __restrict__ x", f"{y.ctype}* __restrict__ y"], [x, y],
                       y.numel, ctype=y.ctype, acc=float_acc(x.dtype), nd=nd, img=img, kshape=ks, KK=int(np.prod(ks)),
                       pads=p[:nd], dil=dl, strides=st, O=O, Ostr=Ostr, OP=int(np.prod(O)))
    return True


@lowering("AffineGrid")
def _affine(ctx: LowerCtx):
    th, y = ctx.inp(0), ctx.out(0)
    if empty_result(ctx):
        return True
    sp = list(y.shape[1:-1])
    grid_stride_launch(ctx, "affine_grid.cu.j2", "affine_grid",
                       [f"const {th.ctype}* __restrict__ theta", f"{y.ctype}* __restrict__ y"],
                       [th, y], y.numel, ctype=y.ctype, nd=len(sp), sp=sp, align=bool(ctx.attr("align_corners", 0)))
    return True


@lowering("DeformConv")
def _deform(ctx: LowerCtx):
    from ...ir.ops.modern import _dc_params
    x, w, off, y = ctx.inp(0), ctx.inp(1), ctx.inp(2), ctx.out(0)
    bias, mask = ctx.inp(3), ctx.inp(4)
    if empty_result(ctx):
        return True
    nd = len(x.shape) - 2
    ks, dil, st, pads = _dc_params(ctx.attrs, nd, w.shape[2:])
    G, OG = int(ctx.attr("group", 1)), int(ctx.attr("offset_group", 1))
    C, M = x.shape[1], w.shape[0]
    outs = list(y.shape[2:])
    args = [f"const {x.ctype}* __restrict__ x", f"const {w.ctype}* __restrict__ w", f"const {off.ctype}* __restrict__ off"]
    bufs = [x, w, off]
    if bias is not None:
        args.append(f"const {bias.ctype}* __restrict__ bias")
        bufs.append(bias)
    if mask is not None:
        args.append(f"const {mask.ctype}* __restrict__ mask")
        bufs.append(mask)
    grid_stride_launch(ctx, "deform_conv.cu.j2", "deform_conv", args + [f"{y.ctype}* __restrict__ y"],
                       bufs + [y], y.numel,
                       ctype=y.ctype, acc=float_acc(x.dtype), nd=nd, outs=outs, ins=list(x.shape[2:]), ks=list(ks),
                       dil=list(dil), st=list(st), pads=list(pads[:nd]), M=M, Mg=M // G, Cg=C // G, C=C, cpo=C // OG,
                       OG=OG, KP=int(np.prod(ks)), OP=int(np.prod(outs)), IP=int(np.prod(x.shape[2:])),
                       has_bias=bias is not None, has_mask=mask is not None)
    return True
