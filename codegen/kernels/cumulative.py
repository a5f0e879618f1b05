"""CumSum / CumProd (scan.cu.j2, one thread per line along the axis; exclusive / reverse; an axis
that is not a compile-time constant is read on the device, one thread per element)."""
from __future__ import annotations

import numpy as np

from ..lower import LowerCtx, lowering
from .reduce import _acc_type, _axis_view


@lowering("CumSum", "CumProd")
def _cum(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    if y.numel == 0:
        ctx.alias(0, x)
        return True
    av = ctx.value(1)
    common = dict(kind="cum", ctype=x.ctype, acc=_acc_type(x.dtype), op="prod" if ctx.op.name == "CumProd" else "sum",
                  exclusive=bool(ctx.attr("exclusive", 0)), reverse=bool(ctx.attr("reverse", 0)))
    if av is not None:
        outer, R, inner = _axis_view(x.shape, int(np.asarray(av).reshape(-1)[0]))
        k = ctx.render("scan.cu.j2", ctx.op.name.lower(), ax_ptr=False, outer=outer, R=R, inner=inner, **common)
        ctx.launch(k, ctx.grid1d(outer * inner), 256, [x, y])
    else:
        ab = ctx.inp(1)
        k = ctx.render("scan.cu.j2", ctx.op.name.lower(), ax_ptr=True, axctype=ab.ctype, shape=list(x.shape) or [1],
                       **common)
        ctx.launch(k, ctx.grid1d(x.numel), 256, [x, ab, y])
    return True
