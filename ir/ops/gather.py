"""Indexing ops: Gather, GatherElements, GatherND, ScatterElements, ScatterND, TensorScatter,
Compress, ReverseSequence, NonZero, Unique, TopK.

Ops whose result extent depends on data (NonZero, Unique, Compress) give `UNKNOWN` dims.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import NncError
from ..registry import NoAttrs, register
from ..symbolic import UNKNOWN
from ..types import I64, TensorType
from ._util import norm_axis
from .shape import int_list


def _fix_index(idx, dim: int, what="index"):
    idx = np.asarray(idx).astype(np.int64)
    idx = np.where(idx < 0, idx + dim, idx)
    if idx.size and (idx.min() < 0 or idx.max() >= dim):
        raise NncError(f"{what} out of range for extent {dim}")
    return idx


# ---------------------------------------------------------------- Gather

@dataclass(frozen=True)
class AxisAttrs:
    axis: int = 0


def check_const_index(ctx, i: int, dim, what="index"):
    """A constant index operand must lie in [-dim, dim): caught at compile time, because the CUDA
    kernels do not bounds-check (an out-of-range runtime index is an error in the reference
    interpreter and undefined on the GPU, as in ONNX)."""
    idx = ctx.value(i)
    if idx is None or not isinstance(dim, int) or not np.asarray(idx).size:
        return
    idx = np.asarray(idx).astype(np.int64)
    lo, hi = int(idx.min()), int(idx.max())
    if lo < -dim or hi >= dim:
        bad = lo if lo < -dim else hi
        ctx.fail(f"constant {what} {bad} is out of range for extent {dim} (valid: {-dim}..{dim - 1})")


def _gather_infer(ctx):
    s = ctx.shape(0)
    ax = norm_axis(ctx.attrs.axis, len(s))
    check_const_index(ctx, 1, s[ax])
    return [ctx.type(0).with_shape(tuple(s[:ax]) + tuple(ctx.shape(1)) + tuple(s[ax + 1:]))]


def _gather_ref(a, x, idx):
    ax = norm_axis(a.axis, x.ndim)
    return np.take(x, _fix_index(idx, x.shape[ax]), axis=ax)


register("Gather", AxisAttrs, infer=_gather_infer, ref=_gather_ref, inputs=2)


def _gather_elements_infer(ctx):
    s, si = ctx.shape(0), ctx.shape(1)
    if len(s) != len(si):
        ctx.fail(f"data rank {len(s)} and indices rank {len(si)} differ")
    check_const_index(ctx, 1, s[norm_axis(ctx.attrs.axis, len(s))])
    return [ctx.type(0).with_shape(si)]


def _gather_elements_ref(a, x, idx):
    ax = norm_axis(a.axis, x.ndim)
    return np.take_along_axis(x, _fix_index(idx, x.shape[ax]), axis=ax)


register("GatherElements", AxisAttrs, infer=_gather_elements_infer, ref=_gather_elements_ref, inputs=2)


# ---------------------------------------------------------------- GatherND

@dataclass(frozen=True)
class BatchDimsAttrs:
    batch_dims: int = 0


def _gathernd_infer(ctx):
    s, si = ctx.shape(0), ctx.shape(1)
    b = ctx.attrs.batch_dims
    k = si[-1] if si else None
    if not isinstance(k, int):
        return [TensorType(ctx.dtype(0), None)]
    if b + k > len(s):
        ctx.fail(f"batch_dims {b} + index depth {k} exceed data rank {len(s)}")
    return [ctx.type(0).with_shape(tuple(si[:-1]) + tuple(s[b + k:]))]


def _gathernd_ref(a, x, idx):
    b = a.batch_dims
    k = idx.shape[-1]
    nb = int(np.prod(x.shape[:b], dtype=np.int64))
    d = x.reshape((nb,) + x.shape[b:])
    ind = idx.reshape((nb, -1, k)).astype(np.int64)
    cols = [_fix_index(ind[..., j], x.shape[b + j]) for j in range(k)]
    bi = np.arange(nb)[:, None]
    out = d[(bi,) + tuple(cols)]
    return out.reshape(idx.shape[:-1] + x.shape[b + k:])


register("GatherND", BatchDimsAttrs, infer=_gathernd_infer, ref=_gathernd_ref, inputs=2)


# ---------------------------------------------------------------- ScatterElements / ScatterND

@dataclass(frozen=True)
class ScatterElementsAttrs:
    axis: int = 0
    reduction: str = "none"


_UFUNC = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}


def _apply(out, where, upd, reduction):
    if reduction == "none":
        out[where] = upd
    elif reduction in _UFUNC:
        if out.dtype == np.bool_ and reduction in ("add", "mul"):
            f = np.logical_or if reduction == "add" else np.logical_and
            f.at(out, where, upd)
        else:
            _UFUNC[reduction].at(out, where, upd)
    else:
        raise NncError(f"unknown reduction {reduction!r}")


def _scatter_elements_ref(a, x, idx, upd):
    ax = norm_axis(a.axis, x.ndim)
    out = x.copy()
    if idx.size == 0:
        return out
    grid = list(np.indices(idx.shape, sparse=True))
    grid[ax] = _fix_index(idx, x.shape[ax])
    _apply(out, tuple(grid), upd, a.reduction)
    return out


def _scatter_infer(ctx):
    if ctx.attrs.reduction not in ("none", "add", "mul", "max", "min"):
        ctx.fail(f"unknown reduction {ctx.attrs.reduction!r}")
    return [ctx.type(0)]


register("ScatterElements", ScatterElementsAttrs, infer=_scatter_infer, ref=_scatter_elements_ref, inputs=3)


@dataclass(frozen=True)
class ScatterNDAttrs:
    reduction: str = "none"


def _scatternd_ref(a, x, idx, upd):
    out = x.copy()
    k = idx.shape[-1]
    ind = idx.reshape(-1, k)
    cols = tuple(_fix_index(ind[:, j], x.shape[j]) for j in range(k))
    u = upd.reshape((ind.shape[0],) + x.shape[k:])
    _apply(out, cols, u, a.reduction)
    return out


register("ScatterND", ScatterNDAttrs, infer=_scatter_infer, ref=_scatternd_ref, inputs=3)


# ---------------------------------------------------------------- TensorScatter

@dataclass(frozen=True)
class TensorScatterAttrs:
    axis: int = -2
    mode: str = "linear"


def _tensor_scatter_infer(ctx):
    if ctx.attrs.mode not in ("linear", "circular"):
        ctx.fail(f"unknown mode {ctx.attrs.mode!r}")
    s, su = ctx.shape(0), ctx.shape(1)
    if len(s) != len(su):
        ctx.fail(f"cache rank {len(s)} and update rank {len(su)} differ")
    norm_axis(ctx.attrs.axis, len(s))
    return [ctx.type(0)]


def _tensor_scatter_ref(a, cache, upd, widx=None):
    ax = norm_axis(a.axis, cache.ndim)
    if ax == 0:
        raise NncError("TensorScatter axis cannot be the batch axis")
    out = cache.copy()
    L, S = cache.shape[ax], upd.shape[ax]
    wi = np.zeros(cache.shape[0], np.int64) if widx is None else np.asarray(widx).astype(np.int64)
    for bi in range(cache.shape[0]):
        pos = wi[bi] + np.arange(S)
        if a.mode == "circular":
            pos = pos % L
        dst = np.moveaxis(out[bi], ax - 1, 0)
        dst[pos] = np.moveaxis(upd[bi], ax - 1, 0)
    return out


register("TensorScatter", TensorScatterAttrs, infer=_tensor_scatter_infer, ref=_tensor_scatter_ref,
         inputs=(2, 3))


# ---------------------------------------------------------------- Compress / ReverseSequence

@dataclass(frozen=True)
class CompressAttrs:
    axis: Optional[int] = None


def _compress_infer(ctx):
    s = ctx.shape(0)
    cond = ctx.value(1)
    n = UNKNOWN if cond is None else int(np.count_nonzero(np.asarray(cond).reshape(-1)))
    if ctx.attrs.axis is None:
        return [ctx.type(0).with_shape((n,))]
    ax = norm_axis(ctx.attrs.axis, len(s))
    return [ctx.type(0).with_shape(tuple(s[:ax]) + (n,) + tuple(s[ax + 1:]))]


def _compress_ref(a, x, cond):
    c = np.asarray(cond).reshape(-1).astype(bool)
    if a.axis is None:
        return np.compress(c, x.reshape(-1))
    return np.compress(c, x, axis=norm_axis(a.axis, x.ndim))


register("Compress", CompressAttrs, infer=_compress_infer, ref=_compress_ref, inputs=2)


@dataclass(frozen=True)
class ReverseSequenceAttrs:
    batch_axis: int = 1
    time_axis: int = 0


def _revseq_ref(a, x, lens):
    out = x.copy()
    b, t = a.batch_axis, a.time_axis
    for i, n in enumerate(int_list(lens)):
        n = min(max(n, 0), x.shape[t])
        src = [slice(None)] * x.ndim
        dst = [slice(None)] * x.ndim
        src[b] = dst[b] = i
        dst[t] = slice(0, n)
        src[t] = slice(n - 1, None, -1) if n > 0 else slice(0, 0)
        out[tuple(dst)] = x[tuple(src)]
    return out


def _revseq_infer(ctx):
    a = ctx.attrs
    if {a.batch_axis, a.time_axis} != {0, 1}:
        ctx.fail("batch_axis and time_axis must be 0 and 1")
    return [ctx.type(0)]


register("ReverseSequence", ReverseSequenceAttrs, infer=_revseq_infer, ref=_revseq_ref, inputs=2)


# ---------------------------------------------------------------- NonZero

def _nonzero_infer(ctx):
    return [TensorType(I64, (max(len(ctx.shape(0)), 1), UNKNOWN))]


def _nonzero_ref(a, x):
    return np.array(np.nonzero(np.atleast_1d(x)), dtype=np.int64).reshape(max(x.ndim, 1), -1)


register("NonZero", NoAttrs, infer=_nonzero_infer, ref=_nonzero_ref)


# ---------------------------------------------------------------- Unique

@dataclass(frozen=True)
class UniqueAttrs:
    axis: Optional[int] = None
    sorted: int = 1


def _unique_infer(ctx):
    s = ctx.shape(0)
    if ctx.attrs.axis is None:
        y = (UNKNOWN,)
        n = 1
        for d in s:
            n = n * d
    else:
        ax = norm_axis(ctx.attrs.axis, len(s))
        y = tuple(s[:ax]) + (UNKNOWN,) + tuple(s[ax + 1:])
        n = s[ax]
    return [ctx.type(0).with_shape(y), TensorType(I64, (UNKNOWN,)), TensorType(I64, (n,)),
            TensorType(I64, (UNKNOWN,))][:ctx.num_results]


def _unique_ref(a, x):
    if a.axis is None:
        flat = x.reshape(-1)
        y, idx, inv, cnt = np.unique(flat, return_index=True, return_inverse=True, return_counts=True)
        ax = 0
        src = flat
    else:
        ax = norm_axis(a.axis, x.ndim)
        y, idx, inv, cnt = np.unique(x, return_index=True, return_inverse=True, return_counts=True, axis=ax)
        src = x
    inv = np.asarray(inv).reshape(-1)
    if not a.sorted:
        order = np.argsort(idx, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        idx, cnt = idx[order], cnt[order]
        inv = rank[inv]
        y = np.take(src, idx, axis=ax)
    return (y.astype(x.dtype, copy=False), idx.astype(np.int64), inv.astype(np.int64), cnt.astype(np.int64))


register("Unique", UniqueAttrs, infer=_unique_infer, ref=_unique_ref, outputs=(1, 4))


# ---------------------------------------------------------------- TopK

@dataclass(frozen=True)
class TopKAttrs:
    axis: int = -1
    largest: int = 1
    sorted: int = 1


def _topk_infer(ctx):
    s = ctx.shape(0)
    ax = norm_axis(ctx.attrs.axis, len(s))
    kv = ctx.value(1)
    k = UNKNOWN if kv is None else int(np.asarray(kv).reshape(-1)[0])
    if isinstance(k, int) and isinstance(s[ax], int) and k > s[ax]:
        ctx.fail(f"k={k} exceeds extent {s[ax]}")
    out = tuple(s[:ax]) + (k,) + tuple(s[ax + 1:])
    return [ctx.type(0).with_shape(out), TensorType(I64, out)]


def _topk_ref(a, x, k):
    k = int(np.asarray(k).reshape(-1)[0])
    ax = norm_axis(a.axis, x.ndim)
    n = x.shape[ax]
    if a.largest:
        # stable descending: equal values keep the lower index first
        order = n - 1 - np.flip(np.argsort(np.flip(x, ax), axis=ax, kind="stable"), ax)
    else:
        order = np.argsort(x, axis=ax, kind="stable")
    idx = np.take(order, np.arange(k), axis=ax)
    return np.take_along_axis(x, idx, axis=ax), idx.astype(np.int64)


register("TopK", TopKAttrs, infer=_topk_infer, ref=_topk_ref, inputs=2, outputs=2)
