"""Fill family (fill.cu.j2, one thread per output element): ConstantOfShape, EyeLike, Trilu (k a
compile-time constant or read on the device), Range, OneHot. Empty results become zero-size weights."""
from __future__ import annotations

import numpy as np

from ..lower import LowerCtx, lowering
from ._helpers import norm_axis, scalar_const
from .elementwise import lit


@lowering("ConstantOfShape")
def _constant_of_shape(ctx: LowerCtx):
    y = ctx.out(0)
    v = ctx.attr("value")
    val = 0 if v is None else np.asarray(v).reshape(-1)[0].item()
    if y.numel == 0:
        ctx.alias(0, ctx.new_weight(np.zeros(y.shape, y.dtype.np)))
        return True
    k = ctx.render("fill.cu.j2", "fill", kind="fill", ctype=y.ctype, value=lit(val, y.compute))
    ctx.launch(k, ctx.grid1d(y.numel), 256, [y, ctx.i64(y.numel)])
    return True


@lowering("EyeLike")
def _eyelike(ctx: LowerCtx):
    y = ctx.out(0)
    k = ctx.render("fill.cu.j2", "eyelike", kind="eye", ctype=y.ctype, cols=y.shape[1], k=int(ctx.attr("k", 0)))
    ctx.launch(k, ctx.grid1d(y.numel), 256, [y, ctx.i64(y.numel)])
    return True


@lowering("Trilu")
def _trilu(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    if y.numel == 0:
        ctx.alias(0, x)
        return True
    kv = scalar_const(ctx, 1, 0) if (not ctx.has(1) or ctx.value(1) is not None) else None
    kb = ctx.inp(1) if kv is None else None
    k = ctx.render("fill.cu.j2", "trilu", kind="trilu", ctype=x.ctype, k_ptr=kb is not None,
                   kctype=kb.ctype if kb is not None else "", k=int(kv or 0), rows=x.shape[-2], cols=x.shape[-1],
                   upper=bool(ctx.attr("upper", 1)))
    ctx.launch(k, ctx.grid1d(y.numel), 256, [x] + ([kb] if kb is not None else []) + [y, ctx.i64(y.numel)])
    return True


@lowering("Range")
def _range(ctx: LowerCtx):
    y = ctx.out(0)
    if y.numel == 0:
        ctx.alias(0, ctx.new_weight(np.zeros(y.shape, y.dtype.np)))
        return True
    k = ctx.render("fill.cu.j2", "range", kind="range", ctype=y.ctype)
    ctx.launch(k, ctx.grid1d(y.numel), 256, [ctx.inp(0), ctx.inp(2), y, ctx.i64(y.numel)])
    return True


@lowering("OneHot")
def _onehot(ctx: LowerCtx):
    ind, vals, y = ctx.inp(0), ctx.inp(2), ctx.out(0)
    rank = len(y.shape)
    axis = norm_axis(int(ctx.attr("axis", -1)), rank)
    depth = y.shape[axis]
    inner = int(np.prod(y.shape[axis + 1:], dtype=np.int64))
    k = ctx.render("fill.cu.j2", "onehot", kind="onehot", ctype=y.ctype, ictype=ind.ctype, depth=depth, inner=inner)
    ctx.launch(k, ctx.grid1d(y.numel), 256, [ind, vals, y, ctx.i64(y.numel)])
    return True
