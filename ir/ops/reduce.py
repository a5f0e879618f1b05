"""Reductions and scans: Reduce* (axes as an input), ArgMax/ArgMin, CumSum/CumProd, and the
losses NegativeLogLikelihoodLoss / SoftmaxCrossEntropyLoss."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..registry import register
from ..types import I64, TensorType
from ._util import norm_axis, same_as


@dataclass(frozen=True)
class ReduceAttrs:
    keepdims: int = 1
    noop_with_empty_axes: int = 0


def _reduce_axes(a, axes, rank):
    """None = identity (noop), else a tuple of normalised axes."""
    if axes is None or np.size(axes) == 0:
        if a.noop_with_empty_axes:
            return None
        return tuple(range(rank))
    return tuple(sorted({norm_axis(int(i), rank) for i in np.asarray(axes).reshape(-1)}))


def _reduce_infer(ctx):
    a = ctx.attrs
    t = ctx.type(0)
    xs = ctx.shape(0)
    if ctx.has(1):
        v = ctx.value(1)
        if v is None:
            if a.keepdims:
                from ..symbolic import UNKNOWN
                return [TensorType(t.dtype, (UNKNOWN,) * len(xs))]
            return [TensorType(t.dtype, None)]
    else:
        v = None
    axes = _reduce_axes(a, v, len(xs))
    if axes is None:
        return [t]
    if a.keepdims:
        shape = tuple(1 if i in axes else d for i, d in enumerate(xs))
    else:
        shape = tuple(d for i, d in enumerate(xs) if i not in axes)
    return [TensorType(t.dtype, shape)]


def _wdt(x):
    if x.dtype == np.float64:
        return np.float64
    if x.dtype.kind == "f" or "float" in x.dtype.name:
        return np.float32
    return None


def _make_reduce(kind):
    def ref(a: ReduceAttrs, x, axes=None):
        ax = _reduce_axes(a, axes, x.ndim)
        if ax is None:
            return x
        kd = bool(a.keepdims)
        wd = _wdt(x)
        xf = x.astype(wd) if wd is not None and x.dtype != wd else x
        if kind == "Sum":
            r = np.sum(xf, axis=ax, keepdims=kd, dtype=xf.dtype)
        elif kind == "Mean":
            r = np.mean(xf, axis=ax, keepdims=kd)
        elif kind in ("Max", "Min"):
            if x.dtype == np.bool_:
                r = (np.any if kind == "Max" else np.all)(x, axis=ax, keepdims=kd)
            else:
                if wd is not None:
                    init = -np.inf if kind == "Max" else np.inf
                else:
                    info = np.iinfo(x.dtype)
                    init = info.min if kind == "Max" else info.max
                f = np.max if kind == "Max" else np.min
                r = f(xf, axis=ax, keepdims=kd, initial=init)
        elif kind == "Prod":
            r = np.prod(xf, axis=ax, keepdims=kd, dtype=xf.dtype)
        elif kind == "L1":
            r = np.sum(np.abs(xf), axis=ax, keepdims=kd, dtype=xf.dtype)
        elif kind == "L2":
            r = np.sqrt(np.sum(xf.astype(np.float64) ** 2, axis=ax, keepdims=kd))
            if wd is None:
                r = np.floor(r + 0.5) if False else r
        elif kind == "SumSquare":
            r = np.sum(xf * xf, axis=ax, keepdims=kd, dtype=xf.dtype)
        elif kind == "LogSum":
            with np.errstate(divide="ignore"):
                r = np.log(np.sum(xf, axis=ax, keepdims=kd))
        elif kind == "LogSumExp":
            xd = xf.astype(np.float64)
            if xd.size == 0 or any(x.shape[i] == 0 for i in ax):
                with np.errstate(divide="ignore"):
                    r = np.log(np.sum(np.exp(xd), axis=ax, keepdims=kd))
            else:
                m = np.max(xd, axis=ax, keepdims=True)
                m = np.where(np.isfinite(m), m, 0)
                r = np.log(np.sum(np.exp(xd - m), axis=ax, keepdims=True)) + m
                if not kd:
                    r = np.squeeze(r, axis=ax)
        else:
            raise AssertionError(kind)
        return np.asarray(r).astype(x.dtype)
    return ref


for _k in ("Sum", "Mean", "Max", "Min", "Prod", "L1", "L2", "SumSquare", "LogSum", "LogSumExp"):
    register(f"Reduce{_k}", ReduceAttrs, infer=_reduce_infer, ref=_make_reduce(_k), inputs=(1, 2))


# ---------------------------------------------------------------- ArgMax / ArgMin

@dataclass(frozen=True)
class ArgAttrs:
    axis: int = 0
    keepdims: int = 1
    select_last_index: int = 0


def _arg_infer(ctx):
    a = ctx.attrs
    xs = ctx.shape(0)
    ax = norm_axis(a.axis, len(xs))
    if a.keepdims:
        shape = tuple(1 if i == ax else d for i, d in enumerate(xs))
    else:
        shape = tuple(d for i, d in enumerate(xs) if i != ax)
    return [TensorType(I64, shape)]


def _make_arg(fn):
    def ref(a: ArgAttrs, x):
        ax = norm_axis(a.axis, x.ndim)
        if a.select_last_index:
            r = x.shape[ax] - 1 - fn(np.flip(x, axis=ax), axis=ax)
        else:
            r = fn(x, axis=ax)
        if a.keepdims:
            r = np.expand_dims(r, ax)
        return np.asarray(r).astype(np.int64)
    return ref


register("ArgMax", ArgAttrs, infer=_arg_infer, ref=_make_arg(np.argmax))
register("ArgMin", ArgAttrs, infer=_arg_infer, ref=_make_arg(np.argmin))


# ---------------------------------------------------------------- CumSum / CumProd

@dataclass(frozen=True)
class CumAttrs:
    exclusive: int = 0
    reverse: int = 0


def _make_cum(fn, ident):
    def ref(a: CumAttrs, x, axis):
        ax = norm_axis(int(np.asarray(axis).reshape(-1)[0]), x.ndim)
        y = np.flip(x, axis=ax) if a.reverse else x
        r = fn(y, axis=ax, dtype=x.dtype)
        if a.exclusive:
            pad = np.full_like(np.take(r, [0], axis=ax), ident)
            r = np.concatenate([pad, np.take(r, np.arange(r.shape[ax] - 1), axis=ax)], axis=ax)
        if a.reverse:
            r = np.flip(r, axis=ax)
        return np.ascontiguousarray(r).astype(x.dtype)
    return ref


register("CumSum", CumAttrs, infer=same_as(0), ref=_make_cum(np.cumsum, 0), inputs=2)
register("CumProd", CumAttrs, infer=same_as(0), ref=_make_cum(np.cumprod, 1), inputs=2)


# ---------------------------------------------------------------- losses

@dataclass(frozen=True)
class LossAttrs:
    ignore_index: Optional[int] = None
    reduction: str = "mean"


def _loss_shape(ctx, tgt_shape):
    if ctx.attrs.reduction == "none":
        return tuple(tgt_shape)
    return ()


def _nll_infer(ctx):
    return [TensorType(ctx.dtype(0), _loss_shape(ctx, ctx.shape(1)))]


def _nll(a, logp, target, weight):
    """logp (N, C, d...), target (N, d...) -> loss in logp's working dtype."""
    C = logp.shape[1]
    tgt = target.astype(np.int64)
    ignore = np.zeros(tgt.shape, bool) if a.ignore_index is None else tgt == a.ignore_index
    safe = np.where(ignore, 0, tgt)
    picked = np.take_along_axis(logp, np.expand_dims(safe, 1), axis=1)[:, 0]
    w = np.ones(C, logp.dtype) if weight is None else weight.astype(logp.dtype)
    wt = np.where(ignore, 0, w[safe]).astype(logp.dtype)
    loss = -picked * wt
    if a.reduction == "none":
        return loss
    if a.reduction == "sum":
        return np.sum(loss)
    den = np.sum(wt)
    return np.sum(loss) / den if weight is not None or a.ignore_index is not None else np.mean(loss)


def _nll_ref(a: LossAttrs, x, target, weight=None):
    wd = np.float64 if x.dtype == np.float64 else np.float32
    return np.asarray(_nll(a, x.astype(wd), target, weight)).astype(x.dtype)


register("NegativeLogLikelihoodLoss", LossAttrs, infer=_nll_infer, ref=_nll_ref, inputs=(2, 3))


def _sce_infer(ctx):
    out = [TensorType(ctx.dtype(0), _loss_shape(ctx, ctx.shape(1))), ctx.type(0)]
    return out[: ctx.num_results]


def _sce_ref(a: LossAttrs, scores, labels, weights=None):
    wd = np.float64 if scores.dtype == np.float64 else np.float32
    s = scores.astype(wd)
    m = s.max(axis=1, keepdims=True)
    lp = s - m - np.log(np.exp(s - m).sum(axis=1, keepdims=True))
    loss = _nll(a, lp, labels, weights)
    return np.asarray(loss).astype(scores.dtype), lp.astype(scores.dtype)


register("SoftmaxCrossEntropyLoss", LossAttrs, infer=_sce_infer, ref=_sce_ref, inputs=(2, 3), outputs=(1, 2))
