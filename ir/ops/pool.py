"""Pooling: MaxPool (+Indices), AveragePool, LpPool, GlobalAveragePool, GlobalMaxPool,
GlobalLpPool, MaxUnpool. Vectorised over sliding-window views."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..registry import NoAttrs, register
from ..types import I64, TensorType
from .conv import TO_NCHW, TO_NHWC, _ints, acc_dtype, check_layout, conv_out_dim, permute, resolve_pads, windows
from ._util import is_float


@dataclass(frozen=True)
class PoolAttrs:
    kernel_shape: tuple[int, ...]
    auto_pad: str = "NOTSET"
    ceil_mode: int = 0
    dilations: Optional[tuple[int, ...]] = None
    pads: Optional[tuple[int, ...]] = None
    storage_order: int = 0
    strides: Optional[tuple[int, ...]] = None
    layout: str = "NCHW"  # nnc extension, as Conv's (ir/ops/conv.py): "NHWC" pools X [N,H,W,C] -> [N,P,Q,C]


@dataclass(frozen=True)
class AvgPoolAttrs:
    kernel_shape: tuple[int, ...]
    auto_pad: str = "NOTSET"
    ceil_mode: int = 0
    count_include_pad: int = 0
    dilations: Optional[tuple[int, ...]] = None
    pads: Optional[tuple[int, ...]] = None
    strides: Optional[tuple[int, ...]] = None
    layout: str = "NCHW"  # as PoolAttrs.layout


@dataclass(frozen=True)
class LpPoolAttrs:
    kernel_shape: tuple[int, ...]
    auto_pad: str = "NOTSET"
    ceil_mode: int = 0
    dilations: Optional[tuple[int, ...]] = None
    p: int = 2
    pads: Optional[tuple[int, ...]] = None
    strides: Optional[tuple[int, ...]] = None


def _pool_out(ctx_or_none, a, spatial):
    nd = len(a.kernel_shape)
    s = _ints(a.strides, nd, 1)
    d = _ints(a.dilations, nd, 1)
    p = a.pads or (0,) * (2 * nd)
    return tuple(conv_out_dim(spatial[i], a.kernel_shape[i], s[i], d[i], p[i], p[i + nd], a.auto_pad,
                              bool(a.ceil_mode)) for i in range(nd))


def _pool_infer(ctx):
    xs = ctx.shape(0)
    layout = getattr(ctx.attrs, "layout", "NCHW")
    check_layout(ctx, layout, len(xs))
    if layout == "NHWC":
        if ctx.num_results > 1:
            ctx.fail("layout NHWC has no Indices output")
        out = _pool_infer_nchw(ctx, permute(xs, TO_NCHW))
        return [t.with_shape(permute(t.shape, TO_NHWC)) for t in out]
    return _pool_infer_nchw(ctx, xs)


def _nhwc_ref(ref):
    """The reference of a pool with the layout attribute: the NCHW op's on the transposed input."""
    def run(a, x, **kw):
        if getattr(a, "layout", "NCHW") != "NHWC":
            return ref(a, x, **kw)
        y = ref(dataclasses.replace(a, layout="NCHW"), x.transpose(TO_NCHW), **kw)
        return np.ascontiguousarray(y.transpose(TO_NHWC))
    return run


def _pool_infer_nchw(ctx, xs):
    if len(xs) != len(ctx.attrs.kernel_shape) + 2:
        ctx.fail(f"kernel_shape {list(ctx.attrs.kernel_shape)} does not match input rank {len(xs)}")
    shape = tuple(xs[:2]) + _pool_out(ctx, ctx.attrs, xs[2:])
    out = [TensorType(ctx.dtype(0), shape)]
    if ctx.num_results > 1:
        out.append(TensorType(I64, shape))
    return out


def _prepare(a, x, fill):
    """Pads x (explicit/auto pads plus the ceil-mode tail) with `fill`; returns the padded array,
    the output sizes, begin pads and a mask of which padded positions are explicit pads/data."""
    nd = x.ndim - 2
    k = tuple(a.kernel_shape)
    s = _ints(a.strides, nd, 1)
    d = _ints(a.dilations, nd, 1)
    pads = resolve_pads(x.shape[2:], k, s, d, a.auto_pad, a.pads)
    out = _pool_out(None, a, x.shape[2:])
    extra = []
    for i in range(nd):
        need = (out[i] - 1) * s[i] + (k[i] - 1) * d[i] + 1
        have = x.shape[2 + i] + pads[i][0] + pads[i][1]
        extra.append(max(0, need - have))
    pw = [(0, 0), (0, 0)] + [(pads[i][0], pads[i][1] + extra[i]) for i in range(nd)]
    xp = np.pad(x, pw, constant_values=fill) if any(p != (0, 0) for p in pw) else x
    return xp, out, pads, extra, k, s, d


def _crop(win, out):
    return win[(slice(None), slice(None)) + tuple(slice(0, o) for o in out)]


def _tap_reduce(xp, out, k, s, d, fn):
    """Reduces over kernel taps with one strided slice per tap (vectorised over pixels)."""
    nd = len(k)
    y = None
    for kpos in np.ndindex(*k):
        sl = tuple(slice(kpos[i] * d[i], kpos[i] * d[i] + (out[i] - 1) * s[i] + 1, s[i]) for i in range(nd))
        v = xp[(slice(None), slice(None)) + sl]
        y = v.copy() if y is None else fn(y, v, out=y)
    return y


def _maxpool_ref(a: PoolAttrs, x, *, ctx=None):
    if is_float(x.dtype):
        fill = -np.inf
    else:
        fill = np.iinfo(x.dtype).min
    xp, out, pads, extra, k, s, d = _prepare(a, x, fill)
    nd = len(k)
    win = _crop(windows(xp, k, s, d), out)
    N, C = x.shape[:2]
    if ctx is not None and len(ctx.result_types) == 1:
        return _tap_reduce(xp, out, k, s, d, np.maximum).astype(x.dtype, copy=False)
    flat = win.reshape(win.shape[:2 + nd] + (-1,))
    y = flat.max(axis=-1)
    # indices: argmax within window -> position in the unpadded input
    kidx = np.argmax(flat, axis=-1)
    kpos = np.unravel_index(kidx, k)
    spatial = x.shape[2:]
    coords = []
    for i in range(nd):
        o = np.arange(out[i]).reshape((1, 1) + tuple(out[i] if j == i else 1 for j in range(nd)))
        coords.append(o * s[i] + kpos[i] * d[i] - pads[i][0])
    n = np.arange(N).reshape((N,) + (1,) * (nd + 1))
    c = np.arange(C).reshape((1, C) + (1,) * nd)
    if a.storage_order == 1:
        lin = np.zeros_like(coords[0])
        for i in reversed(range(nd)):
            lin = lin * spatial[i] + coords[i]
        idx = lin
    else:
        idx = np.zeros_like(coords[0])
        for i in range(nd):
            idx = idx * spatial[i] + coords[i]
    total = int(np.prod(spatial))
    idx = (n * C + c) * total + idx
    return y.astype(x.dtype, copy=False), idx.astype(np.int64)


register("MaxPool", PoolAttrs, infer=_pool_infer, ref=_nhwc_ref(_maxpool_ref), outputs=(1, 2), ref_ctx=True)


def _avgpool_ref(a: AvgPoolAttrs, x):
    acc = acc_dtype(x.dtype)
    xa = x.astype(acc, copy=False)
    xp, out, pads, extra, k, s, d = _prepare(a, xa, 0)
    nd = len(k)
    sums = _tap_reduce(xp, out, k, s, d, np.add)
    # divisor: number of counted positions in each window
    spatial = x.shape[2:]
    ones = np.ones((1, 1) + tuple(spatial), acc)
    if a.count_include_pad:
        ones = np.pad(ones, [(0, 0), (0, 0)] + [tuple(p) for p in pads], constant_values=1)
        ones = np.pad(ones, [(0, 0), (0, 0)] + [(0, e) for e in extra])
    else:
        ones = np.pad(ones, [(0, 0), (0, 0)] + [(pads[i][0], pads[i][1] + extra[i]) for i in range(nd)])
    cnt = _tap_reduce(ones, out, k, s, d, np.add)
    return (sums / np.maximum(cnt, 1)).astype(x.dtype, copy=False)


register("AveragePool", AvgPoolAttrs, infer=_pool_infer, ref=_nhwc_ref(_avgpool_ref))


def _lppool_ref(a: LpPoolAttrs, x):
    acc = acc_dtype(x.dtype)
    xp, out, pads, extra, k, s, d = _prepare(a, np.abs(x.astype(acc)) ** a.p, 0)
    sums = _tap_reduce(xp, out, k, s, d, np.add)
    return (sums ** (1.0 / a.p)).astype(x.dtype, copy=False)


register("LpPool", LpPoolAttrs, infer=_pool_infer, ref=_lppool_ref)


# ---------------------------------------------------------------- global pools

def _global_infer(ctx):
    xs = ctx.shape(0)
    return [TensorType(ctx.dtype(0), tuple(xs[:2]) + (1,) * (len(xs) - 2))]


def _gap_ref(a, x):
    axes = tuple(range(2, x.ndim))
    return x.astype(acc_dtype(x.dtype)).mean(axis=axes, keepdims=True).astype(x.dtype)


def _gmp_ref(a, x):
    return x.max(axis=tuple(range(2, x.ndim)), keepdims=True)


@dataclass(frozen=True)
class GlobalLpAttrs:
    p: int = 2


def _glp_ref(a, x):
    acc = acc_dtype(x.dtype)
    s = (np.abs(x.astype(acc)) ** a.p).sum(axis=tuple(range(2, x.ndim)), keepdims=True)
    return (s ** (1.0 / a.p)).astype(x.dtype)


register("GlobalAveragePool", NoAttrs, infer=_global_infer, ref=_gap_ref)
register("GlobalMaxPool", NoAttrs, infer=_global_infer, ref=_gmp_ref)
register("GlobalLpPool", GlobalLpAttrs, infer=_global_infer, ref=_glp_ref)


# ---------------------------------------------------------------- MaxUnpool

@dataclass(frozen=True)
class MaxUnpoolAttrs:
    kernel_shape: tuple[int, ...]
    pads: Optional[tuple[int, ...]] = None
    strides: Optional[tuple[int, ...]] = None


def _unpool_default(a, spatial):
    nd = len(a.kernel_shape)
    s = _ints(a.strides, nd, 1)
    p = a.pads or (0,) * (2 * nd)
    return tuple((spatial[i] - 1) * s[i] + a.kernel_shape[i] - p[i] - p[i + nd] for i in range(nd))


def _unpool_infer(ctx):
    xs = ctx.shape(0)
    if ctx.has(2):
        v = ctx.value(2)
        if v is not None:
            return [TensorType(ctx.dtype(0), tuple(int(t) for t in v))]
        from ..symbolic import UNKNOWN
        return [TensorType(ctx.dtype(0), (UNKNOWN,) * len(xs))]
    return [TensorType(ctx.dtype(0), tuple(xs[:2]) + _unpool_default(ctx.attrs, xs[2:]))]


def _unpool_ref(a: MaxUnpoolAttrs, x, idx, output_shape=None):
    if output_shape is not None:
        shape = tuple(int(v) for v in output_shape)
    else:
        shape = tuple(x.shape[:2]) + _unpool_default(a, x.shape[2:])
    y = np.zeros(int(np.prod(shape)), x.dtype)
    y[idx.reshape(-1)] = x.reshape(-1)
    return y.reshape(shape)


register("MaxUnpool", MaxUnpoolAttrs, infer=_unpool_infer, ref=_unpool_ref, inputs=(2, 3))
