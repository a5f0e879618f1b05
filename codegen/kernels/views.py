"""Ops that need no kernel of their own: Shape / Size (compile-time constant weights), Dropout
(inference only: a view of its input, plus an all-true mask from fill.cu.j2 when the mask is asked
for), BitCast (a reinterpreting view; the element size must not change)."""
from __future__ import annotations

import numpy as np

from ..lower import LowerCtx, lowering
from ._helpers import scalar_const


@lowering("Dropout")
def _dropout(ctx: LowerCtx):
    if ctx.has(2):
        t = ctx.value(2)
        if t is None or bool(np.asarray(t).reshape(-1)[0]):
            ratio = scalar_const(ctx, 1, 0.5) if ctx.has(1) else 0.5
            if t is None or ratio != 0:
                ctx.fail("training-mode Dropout is not supported by the CUDA backend (inference only)")
    ctx.alias(0, ctx.inp(0))
    if ctx.n_out > 1:
        m = ctx.out(1)
        k = ctx.render("fill.cu.j2", "fill", kind="fill", ctype=m.ctype, value="true")
        ctx.launch(k, ctx.grid1d(max(m.numel, 1)), 256, [m, ctx.i64(m.numel)])
    return True


@lowering("Shape", "Size")
def _shape(ctx: LowerCtx):
    s = ctx.shape(0)
    if ctx.op.name == "Size":
        arr = np.asarray(int(np.prod(s, dtype=np.int64)), np.int64)
    else:
        r = len(s)
        st = ctx.attr("start", 0) or 0
        en = ctx.attr("end", None)
        st = min(max(st + r if st < 0 else st, 0), r)
        en = r if en is None else min(max(en + r if en < 0 else en, 0), r)
        arr = np.asarray(s[st:en], np.int64)
    ctx.alias(0, ctx.new_weight(arr.reshape(ctx.out_shape(0)), "shape"))
    return True


@lowering("BitCast")
def _bitcast(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    if x.dtype.bits != y.dtype.bits:
        ctx.fail(f"BitCast {x.dtype} -> {y.dtype} changes the element size")
    ctx.alias(0, x)  # a reinterpreting view
    return True
