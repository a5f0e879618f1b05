"""Normalisations and softmax: BatchNormalization, InstanceNormalization, LayerNormalization,
GroupNormalization, RMSNormalization, LRN, LpNormalization, MeanVarianceNormalization,
Softmax, LogSoftmax, Hardmax."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..registry import register
from ..types import TensorType, dtype
from ._util import norm_axis, same_as


def _f(x):
    """Working precision: f64 for f64 inputs, f32 otherwise (as ORT does for f16/bf16)."""
    return x.astype(np.float64 if x.dtype == np.float64 else np.float32, copy=False)


# ---------------------------------------------------------------- BatchNormalization

@dataclass(frozen=True)
class BatchNormAttrs:
    epsilon: float = 1e-5
    momentum: float = 0.9
    training_mode: int = 0


def _bn_infer(ctx):
    xs = ctx.shape(0)
    out = [ctx.type(0)]
    for i in (3, 4)[: ctx.num_results - 1]:
        out.append(TensorType(ctx.dtype(i), (xs[1],)))
    return out


def _bn_ref(a: BatchNormAttrs, x, scale, b, mean, var):
    shp = (1, -1) + (1,) * (x.ndim - 2)
    xf = _f(x)
    wt = xf.dtype
    if a.training_mode:
        axes = (0,) + tuple(range(2, x.ndim))
        m = xf.mean(axis=axes)
        v = xf.var(axis=axes)
        y = (xf - m.reshape(shp)) / np.sqrt(v.reshape(shp) + wt.type(a.epsilon))
        y = y * scale.astype(wt).reshape(shp) + b.astype(wt).reshape(shp)
        rm = mean.astype(wt) * wt.type(a.momentum) + m * wt.type(1 - a.momentum)
        rv = var.astype(wt) * wt.type(a.momentum) + v * wt.type(1 - a.momentum)
        return y.astype(x.dtype), rm.astype(mean.dtype), rv.astype(var.dtype)
    inv = scale.astype(wt) / np.sqrt(var.astype(wt) + wt.type(a.epsilon))
    y = (xf - mean.astype(wt).reshape(shp)) * inv.reshape(shp) + b.astype(wt).reshape(shp)
    return y.astype(x.dtype, copy=False), mean, var


register("BatchNormalization", BatchNormAttrs, infer=_bn_infer, ref=_bn_ref, inputs=5, outputs=(1, 3))


# ---------------------------------------------------------------- InstanceNormalization

@dataclass(frozen=True)
class EpsAttrs:
    epsilon: float = 1e-5


def _in_ref(a: EpsAttrs, x, scale, b):
    shp = (1, -1) + (1,) * (x.ndim - 2)
    xf = _f(x)
    axes = tuple(range(2, x.ndim))
    m = xf.mean(axis=axes, keepdims=True)
    v = ((xf - m) ** 2).mean(axis=axes, keepdims=True)
    y = (xf - m) / np.sqrt(v + xf.dtype.type(a.epsilon))
    y = y * _f(scale).reshape(shp) + _f(b).reshape(shp)
    return y.astype(x.dtype)


register("InstanceNormalization", EpsAttrs, infer=same_as(0), ref=_in_ref, inputs=3)


# ---------------------------------------------------------------- LayerNormalization

@dataclass(frozen=True)
class LayerNormAttrs:
    axis: int = -1
    epsilon: float = 1e-5
    stash_type: int = 1


def _ln_infer(ctx):
    a = ctx.attrs
    t = ctx.type(0)
    xs = ctx.shape(0)
    ax = norm_axis(a.axis, len(xs))
    st = dtype(a.stash_type)
    stat = TensorType(st, tuple(xs[:ax]) + (1,) * (len(xs) - ax))
    return [t, stat, stat][: ctx.num_results]


def _ln_ref(a: LayerNormAttrs, x, scale, b=None):
    ax = norm_axis(a.axis, x.ndim)
    axes = tuple(range(ax, x.ndim))
    st = dtype(a.stash_type).np
    wt = np.float64
    xf = x.astype(wt)
    m = xf.mean(axis=axes, keepdims=True)
    v = ((xf - m) ** 2).mean(axis=axes, keepdims=True)
    inv = 1.0 / np.sqrt(v + a.epsilon)
    y = (xf - m) * inv * scale.astype(wt)
    if b is not None:
        y = y + b.astype(wt)
    return y.astype(x.dtype), m.astype(st), inv.astype(st)


register("LayerNormalization", LayerNormAttrs, infer=_ln_infer, ref=_ln_ref, inputs=(2, 3), outputs=(1, 3))


# ---------------------------------------------------------------- GroupNormalization

@dataclass(frozen=True)
class GroupNormAttrs:
    num_groups: int
    epsilon: float = 1e-5
    stash_type: int = 1


def _gn_ref(a: GroupNormAttrs, x, scale, b):
    N, C = x.shape[:2]
    G = a.num_groups
    xf = x.astype(np.float64).reshape(N, G, -1)
    m = xf.mean(axis=-1, keepdims=True)
    v = ((xf - m) ** 2).mean(axis=-1, keepdims=True)
    y = ((xf - m) / np.sqrt(v + a.epsilon)).reshape(x.shape)
    shp = (1, -1) + (1,) * (x.ndim - 2)
    y = y * scale.astype(np.float64).reshape(shp) + b.astype(np.float64).reshape(shp)
    return y.astype(x.dtype)


register("GroupNormalization", GroupNormAttrs, infer=same_as(0), ref=_gn_ref, inputs=3)


# ---------------------------------------------------------------- RMSNormalization

def _rms_ref(a: LayerNormAttrs, x, scale):
    ax = norm_axis(a.axis, x.ndim)
    axes = tuple(range(ax, x.ndim))
    xf = x.astype(np.float64)
    ms = (xf * xf).mean(axis=axes, keepdims=True)
    y = xf / np.sqrt(ms + a.epsilon) * scale.astype(np.float64)
    return y.astype(x.dtype)


register("RMSNormalization", LayerNormAttrs, infer=same_as(0), ref=_rms_ref, inputs=2)


# ---------------------------------------------------------------- LRN

@dataclass(frozen=True)
class LRNAttrs:
    size: int
    alpha: float = 1e-4
    beta: float = 0.75
    bias: float = 1.0
    layout: str = "NCHW"  # nnc extension, as Conv's (ir/ops/conv.py): "NHWC" windows over the last axis


def _lrn_infer(ctx):
    from .conv import check_layout
    xs = ctx.shape(0)
    check_layout(ctx, ctx.attrs.layout, 4 if xs is None else len(xs))
    return same_as(0)(ctx)


def _lrn_ref(a: LRNAttrs, x):
    if a.layout == "NHWC":  # exactly the NCHW op on the transposed input
        from .conv import TO_NCHW, TO_NHWC
        y = _lrn_nchw_ref(a, x.transpose(TO_NCHW))
        return np.ascontiguousarray(y.transpose(TO_NHWC))
    return _lrn_nchw_ref(a, x)


def _lrn_nchw_ref(a: LRNAttrs, x):
    xf = x.astype(np.float64)
    C = x.shape[1]
    sq = xf * xf
    lo = (a.size - 1) // 2
    hi = a.size - 1 - lo
    pad = np.pad(sq, [(0, 0), (lo, hi)] + [(0, 0)] * (x.ndim - 2))
    cs = np.cumsum(pad, axis=1)
    cs = np.concatenate([np.zeros_like(cs[:, :1]), cs], axis=1)
    ssum = cs[:, a.size:a.size + C] - cs[:, :C]
    y = xf / (a.bias + a.alpha / a.size * ssum) ** a.beta
    return y.astype(x.dtype)


register("LRN", LRNAttrs, infer=_lrn_infer, ref=_lrn_ref)


# ---------------------------------------------------------------- LpNormalization

@dataclass(frozen=True)
class LpNormAttrs:
    axis: int = -1
    p: int = 2


def _lpnorm_ref(a: LpNormAttrs, x):
    xf = x.astype(np.float64)
    ax = norm_axis(a.axis, x.ndim)
    if a.p == 1:
        n = np.abs(xf).sum(axis=ax, keepdims=True)
    else:
        n = np.sqrt((xf * xf).sum(axis=ax, keepdims=True))
    with np.errstate(all="ignore"):
        y = np.where(n == 0, 0.0, xf / np.where(n == 0, 1.0, n))
    return y.astype(x.dtype)


register("LpNormalization", LpNormAttrs, infer=same_as(0), ref=_lpnorm_ref)


# ---------------------------------------------------------------- MeanVarianceNormalization

@dataclass(frozen=True)
class MVNAttrs:
    axes: tuple[int, ...] = (0, 2, 3)


def _mvn_ref(a: MVNAttrs, x):
    xf = x.astype(np.float64)
    axes = tuple(norm_axis(i, x.ndim) for i in a.axes)
    m = xf.mean(axis=axes, keepdims=True)
    v = (xf * xf).mean(axis=axes, keepdims=True) - m * m
    return ((xf - m) / (np.sqrt(np.maximum(v, 0)) + 1e-9)).astype(x.dtype)


register("MeanVarianceNormalization", MVNAttrs, infer=same_as(0), ref=_mvn_ref)


# ---------------------------------------------------------------- Softmax family

@dataclass(frozen=True)
class SoftmaxAttrs:
    axis: int = -1


def _sm_infer(ctx):
    norm_axis(ctx.attrs.axis, len(ctx.shape(0)))
    return [ctx.type(0)]


def _softmax_ref(a: SoftmaxAttrs, x):
    ax = norm_axis(a.axis, x.ndim)
    xf = _f(x)
    m = xf.max(axis=ax, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.exp(xf - m)
    return (e / e.sum(axis=ax, keepdims=True)).astype(x.dtype)


def _logsoftmax_ref(a: SoftmaxAttrs, x):
    ax = norm_axis(a.axis, x.ndim)
    xf = _f(x)
    m = xf.max(axis=ax, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    d = xf - m
    return (d - np.log(np.exp(d).sum(axis=ax, keepdims=True))).astype(x.dtype)


def _hardmax_ref(a: SoftmaxAttrs, x):
    ax = norm_axis(a.axis, x.ndim)
    idx = np.expand_dims(np.argmax(x, axis=ax), ax)
    y = np.zeros(x.shape, x.dtype)
    np.put_along_axis(y, idx, 1, axis=ax)
    return y


register("Softmax", SoftmaxAttrs, infer=_sm_infer, ref=_softmax_ref)
register("LogSoftmax", SoftmaxAttrs, infer=_sm_infer, ref=_logsoftmax_ref)
register("Hardmax", SoftmaxAttrs, infer=_sm_infer, ref=_hardmax_ref)
