"""Indexed gather / scatter. scatter.cu.j2: GatherND (one thread per output element), ScatterND (one
thread per slice element, updates applied in order), ScatterElements (one thread per line along the
axis); the scatters copy the data into the result first and support every reduction. tensor_scatter.cu.j2:
TensorScatter (KV-cache update, linear or circular, optional per-batch write indices)."""
from __future__ import annotations

import numpy as np

from ..lower import LowerCtx, lowering
from ._helpers import grid_stride_launch, norm_axis
from .reduce import _acc_type, _axis_view


@lowering("GatherND")
def _gathernd(ctx: LowerCtx):
    x, ind, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    b = int(ctx.attr("batch_dims", 0))
    kk = ind.shape[-1]
    if y.numel == 0:
        ctx.alias(0, ctx.new_weight(np.zeros(y.shape, y.dtype.np)))
        return True
    slice_ = int(np.prod(x.shape[b + kk:], dtype=np.int64))
    nj = int(np.prod(ind.shape[b:-1], dtype=np.int64))
    xs = x.strides()
    k = ctx.render("scatter.cu.j2", "gathernd", kind="gathernd", ctype=x.ctype, ictype=ind.ctype, k=max(kk, 1),
                   dims=list(x.shape[b:b + kk]) or [1], xstrides=xs[b:b + kk] or [0], slice=slice_, nj=nj,
                   bstride=(xs[b - 1] if b > 0 else 0) if b else 0, reduction="none", acc="")
    if kk == 0:
        ctx.fail("GatherND with an empty index depth is not supported")
    ctx.launch(k, ctx.grid1d(y.numel), 256, [x, ind, y, ctx.i64(y.numel)])
    return True


def _scatter_prologue(ctx):
    x, y = ctx.inp(0), ctx.out(0)
    ctx.copy(y, x)
    return x, ctx.inp(1), ctx.inp(2), y


@lowering("ScatterND")
def _scatternd(ctx: LowerCtx):
    x, ind, upd, y = _scatter_prologue(ctx)
    kk = ind.shape[-1]
    nupd = int(np.prod(ind.shape[:-1], dtype=np.int64))
    slice_ = int(np.prod(x.shape[kk:], dtype=np.int64))
    if nupd == 0 or slice_ == 0:
        return True
    k = ctx.render("scatter.cu.j2", "scatternd", kind="scatternd", ctype=x.ctype, ictype=ind.ctype, k=kk,
                   dims=list(x.shape[:kk]), xstrides=x.strides()[:kk], slice=slice_, nupd=nupd,
                   reduction=ctx.attr("reduction", "none"), acc=_acc_type(x.dtype))
    ctx.launch(k, ctx.grid1d(slice_), 256, [ind, upd, y])
    return True


@lowering("ScatterElements")
def _scatter_elements(ctx: LowerCtx):
    x, ind, upd, y = _scatter_prologue(ctx)
    if ind.numel == 0:
        return True
    rank = len(x.shape)
    axis = norm_axis(int(ctx.attr("axis", 0)), rank)
    outer, A, inner = _axis_view(ind.shape, axis)
    k = ctx.render("scatter.cu.j2", "scatter_elements", kind="scatterel", ctype=x.ctype, ictype=ind.ctype,
                   ishape=list(ind.shape), xstrides=x.strides(), axis=axis, outer=outer, inner=inner, A=A,
                   D=x.shape[axis], reduction=ctx.attr("reduction", "none"), acc=_acc_type(x.dtype))
    ctx.launch(k, ctx.grid1d(outer * inner), 256, [ind, upd, y])
    return True


@lowering("TensorScatter")
def _tscatter(ctx: LowerCtx):
    cache, upd, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    wi = ctx.inp(2)
    ctx.copy(y, cache)
    if upd.numel == 0:
        return True
    ax = norm_axis(int(ctx.attr("axis", -2)), len(cache.shape))
    if ax == 0:
        ctx.fail("axis cannot be the batch axis")
    inner = int(np.prod(cache.shape[ax + 1:], dtype=np.int64))
    mid = int(np.prod(cache.shape[1:ax], dtype=np.int64))
    args = [f"const {upd.ctype}* __restrict__ u"] + ([f"const {wi.ctype}* __restrict__ wi"] if wi else []) + \
        [f"{y.ctype}* __restrict__ y"]
    grid_stride_launch(ctx, "tensor_scatter.cu.j2", "tensor_scatter", args,
                       [upd] + ([wi] if wi else []) + [y], upd.numel,
                       inner=inner, S=upd.shape[ax], L=cache.shape[ax], mid=mid, has_wi=wi is not None,
                       circular=ctx.attr("mode", "linear") == "circular")
    return True
