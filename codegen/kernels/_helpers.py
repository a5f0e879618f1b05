"""Small helpers shared by several kernel families (fill, views, quantize, norm, scatter, attention,
sampling, linalg, ml, movement, pool): axis normalisation, constant scalars, accumulator types, the
launcher of the direct kernels built on grid_stride.cu.j2 and the binding of a fused op's body to its
operands (the fused families: epilogue, dw_pw, gap_gemm). Registers no lowering."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np


@contextmanager
def bound_body(L, op, anchor=None):
    """While lowering a fused op's body: its arguments stand for the op's operands, its result (and
    the anchor's, when given: that lowering then writes the group's output directly) for the op's
    result. The Lowerer's value equivalences are restored afterwards."""
    body = op.attrs.body
    bound = []
    try:
        for inner, v in zip(body.args, op.operands):
            L.equiv[id(inner)] = L.canon(v)
            bound.append(id(inner))
        L.equiv[id(body.results[0])] = L.canon(op.results[0])
        bound.append(id(body.results[0]))
        if anchor is not None:
            L.equiv[id(anchor.results[0])] = L.canon(op.results[0])
            bound.append(id(anchor.results[0]))
        yield
    finally:
        for k in bound:
            L.equiv.pop(k, None)


def float_acc(dt) -> str:
    return "double" if dt.short == "f64" else "float"


def norm_axis(a, rank):
    return a + rank if a < 0 else a


def scalar_const(ctx, i, default=None):
    v = ctx.value(i)
    if v is None:
        return default
    a = np.asarray(v).reshape(-1)
    return a[0].item() if a.size else default


def grid_stride_launch(ctx, template, hint, args, bufs, count, **p):
    """One kernel of `template` (a template extending grid_stride.cu.j2; `args` its C parameter list),
    one thread per element of `count`."""
    k = ctx.render(template, hint, args=args, **p)
    ctx.launch(k, ctx.grid1d(count), 256, bufs + [ctx.i64(count)])


def empty_result(ctx, i=0):
    """Result i with no elements becomes a zero-size weight: -> True (nothing left to emit)."""
    y = ctx.out(i)
    if y.numel == 0:
        ctx.alias(i, ctx.new_weight(np.zeros(y.shape, y.dtype.np)))
        return True
    return False
