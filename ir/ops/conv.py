"""Convolutions: Conv, ConvTranspose, ConvInteger, QLinearConv, Col2Im.

References are vectorised numpy: im2col through sliding_window_view + a grouped matmul, and
ConvTranspose as a grouped matmul followed by a scatter-add over kernel positions (a loop over
kernel taps, never over pixels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import NncError
from ..registry import register
from ..symbolic import UNKNOWN
from ..types import I32, TensorType


# ---------------------------------------------------------------- shared helpers

def acc_dtype(dt: np.dtype) -> np.dtype:
    """The dtype to accumulate in: f64 for f64 and f32, f32 for the narrower floats. float32 dot
    products go through float64 so that the reference does not depend on the BLAS kernel the CPU
    gets: OpenBLAS's sgemm rounds output columns differently (its Haswell kernel, picked on AMD
    Zen, gives identical-weight channels different last bits), and light_squeezenet's Softmax over
    ~1e10 logits turns those bits into a different answer."""
    return np.dtype(np.float64) if dt in (np.float64, np.float32) else np.dtype(np.float32)


def _ints(t, n, default):
    return tuple(t) if t else (default,) * n


def conv_out_dim(i, k, s, d, pb, pe, auto_pad, ceil=False):
    """Output extent of a sliding window (works on symbolic dims)."""
    for what, v, lo in (("kernel size", k, 1), ("stride", s, 1), ("dilation", d, 1), ("pad", pb, 0), ("pad", pe, 0)):
        if isinstance(v, int) and v < lo:
            raise NncError(f"{what} {v} must be >= {lo}")
    keff = (k - 1) * d + 1
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return (i + s - 1) // s
    if auto_pad == "VALID":
        pb = pe = 0
    num = i + pb + pe - keff
    if ceil:
        o = (num + s - 1) // s + 1
        if isinstance(o, int) and isinstance(i, int) and (o - 1) * s >= i + pb:
            o -= 1  # the last window would start in the end padding
        return _positive(o, i, keff)
    return _positive(num // s + 1, i, keff)


def _positive(o, i, keff):
    if isinstance(o, int) and o < 1 and isinstance(i, int) and i > 0:
        raise NncError(f"the window (effective extent {keff}) does not fit the padded input extent {i}: "
                       f"output extent would be {o}")
    return o


def resolve_pads(in_sizes, kernel, strides, dilations, auto_pad, pads):
    """Concrete (begin, end) pads per spatial dim for int sizes."""
    nd = len(in_sizes)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for i, k, s, d in zip(in_sizes, kernel, strides, dilations):
            o = -(-i // s)
            total = max(0, (o - 1) * s + (k - 1) * d + 1 - i)
            small = total // 2
            out.append((small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small))
        return out
    if auto_pad == "VALID" or not pads:
        return [(0, 0)] * nd
    return [(pads[i], pads[i + nd]) for i in range(nd)]


def windows(xp, kernel, strides, dilations):
    """(N, C, *spatial) -> (N, C, *out, *kernel) strided view (no copy)."""
    nd = len(kernel)
    keff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    w = sliding_window_view(xp, keff, axis=tuple(range(2, 2 + nd)))
    idx = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) \
        + tuple(slice(None, None, d) for d in dilations)
    return w[idx]


def conv_core(x, w, strides, pads, dilations, group):
    """Grouped N-d convolution of already-typed arrays (pads = [(b, e)] per dim)."""
    nd = x.ndim - 2
    if any(p != (0, 0) for p in pads):
        x = np.pad(x, [(0, 0), (0, 0)] + [tuple(p) for p in pads])
    kernel = w.shape[2:]
    win = windows(x, kernel, strides, dilations)  # N, C, O..., K...
    N, C = x.shape[:2]
    O = win.shape[2:2 + nd]
    G = group
    Cg = C // G
    M = w.shape[0]
    Mg = M // G
    P = int(np.prod(O, dtype=np.int64))
    KK = int(np.prod(kernel, dtype=np.int64))
    win = win.reshape((N, G, Cg) + tuple(O) + tuple(kernel))
    perm = (1, 0) + tuple(range(3, 3 + nd)) + (2,) + tuple(range(3 + nd, 3 + 2 * nd))
    cols = np.ascontiguousarray(win.transpose(perm)).reshape(G, N * P, Cg * KK)
    wm = w.reshape(G, Mg, Cg * KK).transpose(0, 2, 1)
    out = np.matmul(cols, wm)  # G, N*P, Mg
    out = out.reshape((G, N) + tuple(O) + (Mg,))
    out = out.transpose((1, 0, nd + 2) + tuple(range(2, 2 + nd)))
    return np.ascontiguousarray(out).reshape((N, M) + tuple(O))


# ---------------------------------------------------------------- Conv

@dataclass(frozen=True)
class ConvAttrs:
    auto_pad: str = "NOTSET"
    dilations: Optional[tuple[int, ...]] = None
    group: int = 1
    kernel_shape: Optional[tuple[int, ...]] = None
    pads: Optional[tuple[int, ...]] = None
    strides: Optional[tuple[int, ...]] = None


def conv_out_shape(ctx, a, xs, ws):
    nd = len(xs) - 2
    if nd < 0:
        ctx.fail("input must have rank >= 2")
    kernel = a.kernel_shape or tuple(ws[2:])
    if len(kernel) != nd:
        ctx.fail(f"kernel rank {len(kernel)} does not match input spatial rank {nd}")
    s = _ints(a.strides, nd, 1)
    d = _ints(a.dilations, nd, 1)
    p = a.pads or (0,) * (2 * nd)
    return tuple(conv_out_dim(xs[2 + i], kernel[i], s[i], d[i], p[i], p[i + nd], a.auto_pad)
                 for i in range(nd))


# nnc's layout extension (compiler/passes/assign_layout.py): Conv {layout = "NHWC"} reads X [N,H,W,C] and
# the weight pre-transformed to OHWI [K,R,S,C/group], and writes Y [N,P,Q,K]; 2-D only. Everything else
# (attributes, bias [K], numerics) is the ONNX NCHW op's, and the reference is exactly that op's.
LAYOUTS = ("NCHW", "NHWC")
TO_NCHW, TO_NHWC = (0, 3, 1, 2), (0, 2, 3, 1)


def check_layout(ctx, layout: str, rank: int):
    if layout not in LAYOUTS:
        ctx.fail(f"layout {layout!r} must be one of {', '.join(LAYOUTS)}")
    if layout == "NHWC" and rank != 4:
        ctx.fail(f"layout NHWC needs a rank-4 input, got rank {rank}")


def permute(shape, perm):
    return tuple(shape[p] for p in perm)


@dataclass(frozen=True)
class ConvOpAttrs(ConvAttrs):
    layout: str = "NCHW"


def _conv_infer(ctx):
    a = ctx.attrs
    xs, ws = ctx.shape(0), ctx.shape(1)
    layout = getattr(a, "layout", "NCHW")
    check_layout(ctx, layout, len(xs))
    if layout == "NHWC":
        if len(ws) != 4:
            ctx.fail(f"layout NHWC needs a rank-4 OHWI weight, got rank {len(ws)}")
        t = _conv_infer_nchw(ctx, a, permute(xs, TO_NCHW), permute(ws, TO_NCHW))
        return [t.with_shape(permute(t.shape, TO_NHWC))]
    return [_conv_infer_nchw(ctx, a, xs, ws)]


def _conv_infer_nchw(ctx, a, xs, ws):
    if len(ws) != len(xs):
        ctx.fail(f"weight rank {len(ws)} != input rank {len(xs)}")
    if isinstance(xs[1], int) and isinstance(ws[1], int) and xs[1] != ws[1] * a.group:
        ctx.fail(f"input channels {xs[1]} != weight channels {ws[1]} * group {a.group}")
    return TensorType(ctx.dtype(0), (xs[0], ws[0]) + conv_out_shape(ctx, a, xs, ws))


def _conv_params(a, x, w):
    nd = x.ndim - 2
    kernel = tuple(w.shape[2:])
    s = _ints(a.strides, nd, 1)
    d = _ints(a.dilations, nd, 1)
    pads = resolve_pads(x.shape[2:], kernel, s, d, a.auto_pad, a.pads)
    return s, d, pads


def _conv_ref(a: ConvAttrs, x, w, b=None):
    if getattr(a, "layout", "NCHW") == "NHWC":  # exactly the NCHW op on transposed operands
        y = _conv_ref(ConvAttrs(a.auto_pad, a.dilations, a.group, a.kernel_shape, a.pads, a.strides),
                      x.transpose(TO_NCHW), w.transpose(TO_NCHW), b)
        return np.ascontiguousarray(y.transpose(TO_NHWC))
    s, d, pads = _conv_params(a, x, w)
    acc = acc_dtype(x.dtype)
    y = conv_core(x.astype(acc, copy=False), w.astype(acc, copy=False), s, pads, d, a.group)
    if b is not None:
        y = y + b.astype(acc).reshape((1, -1) + (1,) * (x.ndim - 2))
    return y.astype(x.dtype, copy=False)


register("Conv", ConvOpAttrs, infer=_conv_infer, ref=_conv_ref, inputs=(2, 3))


def _convint_infer(ctx):
    t = _conv_infer(ctx)[0]
    return [TensorType(I32, t.shape)]


def _zp(z, shape_rank=None):
    return np.int64(0) if z is None else z.astype(np.int64)


def _convint_ref(a: ConvAttrs, x, w, xz=None, wz=None):
    s, d, pads = _conv_params(a, x, w)
    xf = x.astype(np.float64) - _zp(xz)
    wz_ = _zp(wz)
    if np.ndim(wz_) == 1:
        wz_ = wz_.reshape((-1,) + (1,) * (w.ndim - 1))
    wf = w.astype(np.float64) - wz_
    # padding is with the zero point, i.e. 0 after the shift
    y = conv_core(xf, wf, s, pads, d, a.group)
    return np.rint(y).astype(np.int32)


register("ConvInteger", ConvAttrs, infer=_convint_infer, ref=_convint_ref, inputs=(2, 4))


def _qlconv_infer(ctx):
    a = ctx.attrs
    xs, ws = ctx.shape(0), ctx.shape(3)
    return [TensorType(ctx.dtype(7), (xs[0], ws[0]) + conv_out_shape(ctx, a, xs, ws))]


def requantize(acc, scale, yz, out_dtype):
    info = np.iinfo(out_dtype)
    y = np.rint(acc * scale) + yz.astype(np.float64)
    return np.clip(y, info.min, info.max).astype(out_dtype)


def _qlconv_ref(a: ConvAttrs, x, xs, xz, w, ws, wz, ys, yz, b=None):
    s, d, pads = _conv_params(a, x, w)
    nd = x.ndim - 2
    xf = x.astype(np.float64) - xz.astype(np.float64)
    wzf = wz.astype(np.float64)
    if wzf.ndim == 1:
        wzf = wzf.reshape((-1,) + (1,) * (w.ndim - 1))
    wf = w.astype(np.float64) - wzf
    acc = conv_core(xf, wf, s, pads, d, a.group)
    if b is not None:
        acc = acc + b.astype(np.float64).reshape((1, -1) + (1,) * nd)
    wsf = ws.astype(np.float64)
    scale = xs.astype(np.float64) * (wsf.reshape((1, -1) + (1,) * nd) if wsf.ndim == 1 else wsf) \
        / ys.astype(np.float64)
    return requantize(acc, scale, yz, yz.dtype)


register("QLinearConv", ConvAttrs, infer=_qlconv_infer, ref=_qlconv_ref, inputs=(8, 9))


# ---------------------------------------------------------------- ConvTranspose

@dataclass(frozen=True)
class ConvTransposeAttrs:
    auto_pad: str = "NOTSET"
    dilations: Optional[tuple[int, ...]] = None
    group: int = 1
    kernel_shape: Optional[tuple[int, ...]] = None
    output_padding: Optional[tuple[int, ...]] = None
    output_shape: Optional[tuple[int, ...]] = None
    pads: Optional[tuple[int, ...]] = None
    strides: Optional[tuple[int, ...]] = None


def _convt_geometry(a, in_sizes, kernel):
    """(pads [(b, e)], output sizes) for ConvTranspose; works on symbolic sizes when pads are
    explicit."""
    nd = len(in_sizes)
    s = _ints(a.strides, nd, 1)
    d = _ints(a.dilations, nd, 1)
    op = _ints(a.output_padding, nd, 0)
    full = [s[i] * (in_sizes[i] - 1) + op[i] + (kernel[i] - 1) * d[i] + 1 for i in range(nd)]
    out_shape = a.output_shape
    if out_shape is not None and len(out_shape) > nd:
        out_shape = out_shape[-nd:]
    if out_shape is not None or a.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if out_shape is None:
            out_shape = [in_sizes[i] * s[i] for i in range(nd)]
        pads = []
        for i in range(nd):
            total = full[i] - out_shape[i]
            if not isinstance(total, int):
                pads.append((UNKNOWN, UNKNOWN))
                continue
            if a.auto_pad == "SAME_UPPER":
                pads.append((total // 2, total - total // 2))
            else:
                pads.append((total - total // 2, total // 2))
        return pads, list(out_shape)
    p = (0,) * (2 * nd) if (a.auto_pad == "VALID" or not a.pads) else a.pads
    pads = [(p[i], p[i + nd]) for i in range(nd)]
    return pads, [full[i] - pads[i][0] - pads[i][1] for i in range(nd)]


def _convt_infer(ctx):
    a = ctx.attrs
    xs, ws = ctx.shape(0), ctx.shape(1)
    kernel = a.kernel_shape or tuple(ws[2:])
    _, out = _convt_geometry(a, xs[2:], kernel)
    return [TensorType(ctx.dtype(0), (xs[0], ws[1] * a.group) + tuple(out))]


def _convt_ref(a: ConvTransposeAttrs, x, w, b=None):
    nd = x.ndim - 2
    kernel = tuple(w.shape[2:])
    s = _ints(a.strides, nd, 1)
    d = _ints(a.dilations, nd, 1)
    pads, out = _convt_geometry(a, x.shape[2:], kernel)
    acc = acc_dtype(x.dtype)
    N, C = x.shape[:2]
    I = x.shape[2:]
    G = a.group
    Cg = C // G
    Mg = w.shape[1]
    M = Mg * G
    P = int(np.prod(I, dtype=np.int64))
    KK = int(np.prod(kernel, dtype=np.int64))
    xm = x.astype(acc, copy=False).reshape(N, G, Cg, P).transpose(1, 0, 3, 2).reshape(G, N * P, Cg)
    wm = w.astype(acc, copy=False).reshape(G, Cg, Mg * KK)
    cols = np.matmul(xm, wm).reshape((G, N) + tuple(I) + (Mg,) + kernel)
    # -> N, G, Mg, K..., I...
    perm = (1, 0, 2 + nd) + tuple(range(3 + nd, 3 + 2 * nd)) + tuple(range(2, 2 + nd))
    cols = cols.transpose(perm)
    full = [(I[i] - 1) * s[i] + (kernel[i] - 1) * d[i] + 1 for i in range(nd)]
    buf = np.zeros((N, G, Mg) + tuple(full), acc)
    for kpos in np.ndindex(*kernel):
        sl = tuple(slice(kpos[i] * d[i], kpos[i] * d[i] + (I[i] - 1) * s[i] + 1, s[i]) for i in range(nd))
        buf[(slice(None),) * 3 + sl] += cols[(slice(None),) * 3 + kpos]
    buf = buf.reshape((N, M) + tuple(full))
    y = np.zeros((N, M) + tuple(int(o) for o in out), acc)
    dst, src = [], []
    for i in range(nd):
        pb = pads[i][0]
        lo = max(0, -pb)
        hi = min(out[i], full[i] - pb)
        if hi <= lo:
            return (y + (0 if b is None else b.astype(acc).reshape((1, -1) + (1,) * nd))).astype(x.dtype)
        dst.append(slice(lo, hi))
        src.append(slice(lo + pb, hi + pb))
    y[(slice(None),) * 2 + tuple(dst)] = buf[(slice(None),) * 2 + tuple(src)]
    if b is not None:
        y = y + b.astype(acc).reshape((1, -1) + (1,) * nd)
    return y.astype(x.dtype, copy=False)


register("ConvTranspose", ConvTransposeAttrs, infer=_convt_infer, ref=_convt_ref, inputs=(2, 3))


# ---------------------------------------------------------------- Col2Im

@dataclass(frozen=True)
class Col2ImAttrs:
    dilations: Optional[tuple[int, ...]] = None
    pads: Optional[tuple[int, ...]] = None
    strides: Optional[tuple[int, ...]] = None


def _col2im_infer(ctx):
    xs = ctx.shape(0)
    img = ctx.value(1)
    blk = ctx.value(2)
    if img is None:
        nd = ctx.shape(1)[0]
        if not isinstance(nd, int):
            raise NncError("Col2Im: image_shape must have a static length")
        sp = (UNKNOWN,) * nd
    else:
        sp = tuple(int(v) for v in img)
    c = UNKNOWN
    if blk is not None:
        c = xs[1] // int(np.prod(blk))
    return [TensorType(ctx.dtype(0), (xs[0], c) + sp)]


def _col2im_ref(a: Col2ImAttrs, x, image_shape, block_shape):
    img = [int(v) for v in image_shape]
    kernel = tuple(int(v) for v in block_shape)
    nd = len(img)
    s = _ints(a.strides, nd, 1)
    d = _ints(a.dilations, nd, 1)
    p = a.pads or (0,) * (2 * nd)
    N = x.shape[0]
    KK = int(np.prod(kernel))
    C = x.shape[1] // KK
    padded = [img[i] + p[i] + p[i + nd] for i in range(nd)]
    O = [(padded[i] - ((kernel[i] - 1) * d[i] + 1)) // s[i] + 1 for i in range(nd)]
    acc = acc_dtype(x.dtype)
    cols = x.astype(acc).reshape((N, C) + kernel + tuple(O))
    buf = np.zeros((N, C) + tuple(padded), acc)
    for kpos in np.ndindex(*kernel):
        sl = tuple(slice(kpos[i] * d[i], kpos[i] * d[i] + (O[i] - 1) * s[i] + 1, s[i]) for i in range(nd))
        buf[(slice(None),) * 2 + sl] += cols[(slice(None),) * 2 + kpos]
    crop = tuple(slice(p[i], p[i] + img[i]) for i in range(nd))
    return buf[(slice(None),) * 2 + crop].astype(x.dtype)


register("Col2Im", Col2ImAttrs, infer=_col2im_infer, ref=_col2im_ref, inputs=3)
