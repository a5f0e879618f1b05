"""Selection ops: TopK (static K) and NonZero (data-dependent output extent: a device count plus a
host read-back recorded in the plan)."""
from __future__ import annotations

import numpy as np

from ..dtypes import compute_type
from ..lower import LowerCtx, lowering


@lowering("TopK")
def _topk(ctx: LowerCtx):
    x = ctx.inp(0)
    kv = ctx.value(1)
    if kv is None:
        ctx.fail("K must be a compile-time constant")
    K = int(np.asarray(kv).reshape(-1)[0])
    vals, inds = ctx.out(0), ctx.out(1)
    rank = len(x.shape)
    axis = int(ctx.attr("axis", -1))
    axis = axis + rank if axis < 0 else axis
    inner = int(np.prod(x.shape[axis + 1:], dtype=np.int64))
    R = x.shape[axis]
    k = ctx.render("topk.cu.j2", "topk", ctype=x.ctype, compute=compute_type(x.dtype), R=R, inner=inner, K=K,
                   cmp=">" if ctx.attr("largest", 1) else "<")
    n = x.numel
    ctx.launch(k, ctx.grid1d(n), 256, [x, vals, inds, ctx.i64(n)])
    return True


def _static_input(op) -> bool:
    return op.operands[0] is not None and op.operands[0].type.is_static


# runtime sizes: its count is a data-dependent symbol (codegen/data_dependent.py) bound by the
# read-back; the kernel itself only needs its input's static size
@lowering("NonZero", when=_static_input, runtime_sizes=True)
def _nonzero(ctx: LowerCtx):
    x = ctx.inp(0)
    shape = list(x.shape) or [1]
    y = ctx.out_dynamic(0, [len(x.shape), x.numel])
    count = ctx.temp("i64", [1], "count")
    k = ctx.render("nonzero.cu.j2", "nonzero", ctype=x.ctype, numel=x.numel, shape=shape if x.shape else [])
    ctx.launch(k, 1, 1024, [x, y, count])
    ctx.readback(count, y, axis=1)
    return True
