"""Data-dependent output extents (device count + host read-back, like NonZero in special.py):
Compress (a static gather when the condition is a compile-time constant), Unique (one block,
O(R^2) row comparisons), NonMaxSuppression (one thread per (batch, class) + an in-order concat).
Dynamic results are allocated at their upper bound; their consumers must not need the true shape at
compile time (a consumer whose result shape is symbolic fails to lower, as after NonZero)."""
from __future__ import annotations

import numpy as np

from ..lower import LowerCtx, lowering


def _norm(a, r):
    return a + r if a < 0 else a


@lowering("Compress")
def _compress(ctx: LowerCtx):
    x = ctx.inp(0)
    cond = ctx.inp(1)
    axis = ctx.attr("axis", None)
    shape = list(x.shape) if axis is not None else [x.numel]
    ax = _norm(int(axis), len(shape)) if axis is not None else 0
    inner = int(np.prod(shape[ax + 1:], dtype=np.int64))
    D = shape[ax]
    n = min(cond.numel, D)
    static = ctx.out_shape(0) is not None
    if static:
        y = ctx.out(0)
        if y.numel == 0:
            ctx.alias(0, ctx.new_weight(np.zeros(y.shape, y.dtype.np)))
            return True
    else:
        y = ctx.out_dynamic(0, shape[:ax] + [D] + shape[ax + 1:])
    pos = ctx.temp("i64", [max(D, 1)], "pos")
    count = ctx.temp("i64", [1], "count")
    k1 = ctx.render("compress.cu.j2", "compress_scan", kind="compress_scan", cctype=cond.ctype, n=n, D=D)
    ctx.launch(k1, 1, 1024, [cond, pos, count])
    if x.numel:
        k2 = ctx.render("compress.cu.j2", "compress", kind="compress", ctype=x.ctype, inner=inner, D=D)
        ctx.launch(k2, ctx.grid1d(x.numel), 256, [x, pos, count, y, ctx.i64(x.numel)])
    if not static:
        ctx.readback(count, y, axis=ax)
    return True


@lowering("Unique")
def _unique(ctx: LowerCtx):
    x = ctx.inp(0)
    axis = ctx.attr("axis", None)
    shape = list(x.shape) if axis is not None else [x.numel]
    ax = _norm(int(axis), len(shape)) if axis is not None else 0
    R = shape[ax]
    inner = int(np.prod(shape[ax + 1:], dtype=np.int64))
    E = int(np.prod(shape[:ax], dtype=np.int64)) * inner
    if R == 0:
        ctx.fail("Unique of an empty input is not supported")
    y = ctx.out_dynamic(0, shape)
    idx = ctx.out_dynamic(1, [R]) if ctx.n_out > 1 else ctx.temp("i64", [R], "indices")
    inv = ctx.out(2) if ctx.n_out > 2 else ctx.temp("i64", [R], "inverse")
    cnt = ctx.out_dynamic(3, [R]) if ctx.n_out > 3 else ctx.temp("i64", [R], "counts")
    first = ctx.temp("i64", [R], "first")
    rank = ctx.temp("i64", [R], "rank")
    count = ctx.temp("i64", [1], "count")
    k = ctx.render("unique.cu.j2", "unique", ctype=x.ctype, R=R, E=E, inner=inner,
                   sorted=bool(ctx.attr("sorted", 1)))
    ctx.launch(k, 1, 1024, [x, first, rank, y, idx, inv, cnt, count])
    ctx.readback(count, y, axis=ax)
    if ctx.n_out > 1:
        ctx.readback(count, idx, axis=0)
    if ctx.n_out > 3:
        ctx.readback(count, cnt, axis=0)
    return True


@lowering("NonMaxSuppression")
def _nms(ctx: LowerCtx):
    boxes, scores = ctx.inp(0), ctx.inp(1)
    B, C, N = scores.shape
    mx, iou, sth = ctx.inp(2), ctx.inp(3), ctx.inp(4)
    if mx is not None and mx.numel == 0:
        mx = None
    if iou is not None and iou.numel == 0:
        iou = None
    if sth is not None and sth.numel == 0:
        sth = None
    y = ctx.out_dynamic(0, [max(B * C * N, 1), 3])
    state = ctx.temp("u8", [max(B * C * N, 1)], "state")
    keep = ctx.temp("i64", [max(B * C * N, 1)], "keep")
    kcount = ctx.temp("i64", [max(B * C, 1)], "kcount")
    count = ctx.temp("i64", [1], "count")
    k = ctx.render("nms.cu.j2", "nms", kind="nms", bctype=boxes.ctype, sctype=scores.ctype, B=B, C=C, N=N,
                   has_max=mx is not None, mctype=mx.ctype if mx is not None else "",
                   has_iou=iou is not None, ictype=iou.ctype if iou is not None else "",
                   has_sth=sth is not None, tctype=sth.ctype if sth is not None else "",
                   center=bool(ctx.attr("center_point_box", 0)))
    args = [boxes, scores] + [b for b in (mx, iou, sth) if b is not None] + [state, keep, kcount]
    if B * C:
        ctx.launch(k, ctx.grid1d(B * C, 64), 64, args)
    k2 = ctx.render("nms.cu.j2", "nms_out", kind="nms_out", B=B, C=C, N=N)
    ctx.launch(k2, 1, 32, [keep, kcount, y, count])
    ctx.readback(count, y, axis=0)
    return True
