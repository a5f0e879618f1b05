"""Normalisations. rownorm.cu.j2 (one block per normalised row): InstanceNormalization,
GroupNormalization, LpNormalization (p = 1 or 2), MeanVarianceNormalization (axes
that are not trailing: transposed into a temp with strided_copy first, and back after). scan.cu.j2
(one thread per line / element): Hardmax, LRN. LayerNormalization, Softmax and RMSNormalization (whose generic kernel is
the "rms" kind here): codegen/kernels/rownorm_variants.py."""
from __future__ import annotations

import numpy as np

from ...ir.layout import op_is_nhwc
from ..lower import LowerCtx, lowering
from ._helpers import norm_axis
from .movement import strided_copy
from .reduce import _acc_type, _axis_view


def _rownorm(ctx, kind, x, y, outer, R, inner, scale=None, bias=None, **extra):
    acc = "double" if x.dtype.short == "f64" else "float"
    p = dict(kind=kind, ctype=x.ctype, acc=acc, outer=outer, R=R, inner=inner, has_scale=scale is not None,
             has_bias=bias is not None, sctype=scale.ctype if scale is not None else "",
             bctype=bias.ctype if bias is not None else "", epsilon=repr(float(ctx.attr("epsilon", 1e-5) or 0.0)),
             groups=1, cpg=1, spatial=1, scale_n=1, p=2)
    p.update(extra)
    k = ctx.render("rownorm.cu.j2", kind + "norm", **p)
    args = [x] + [b for b in (scale, bias) if b is not None] + [y]
    ctx.launch(k, max(1, min(outer * inner, 65535)), 256, args)


def _group_norm(ctx: LowerCtx):
    """The generic kernel of Instance / GroupNormalization (rownorm_variants.py: rownorm.*_generic)."""
    x, y = ctx.inp(0), ctx.out(0)
    N, C = x.shape[:2]
    spatial = int(np.prod(x.shape[2:], dtype=np.int64))
    G = C if ctx.op.name == "InstanceNormalization" else int(ctx.attr("num_groups"))
    sc, bi = ctx.inp(1), ctx.inp(2)
    if sc.numel != C or bi.numel != C:
        ctx.fail(f"scale/bias must have C={C} elements")
    _rownorm(ctx, "group", x, y, N * G, (C // G) * spatial, 1, sc, bi, groups=G, cpg=C // G, spatial=spatial)
    return True


@lowering("LpNormalization")
def _lp_norm(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    p = int(ctx.attr("p", 2))
    if p not in (1, 2):
        ctx.fail("p must be 1 or 2")
    outer, R, inner = _axis_view(x.shape, int(ctx.attr("axis", -1)))
    _rownorm(ctx, "lp", x, y, outer, R, inner, p=p)
    return True


@lowering("MeanVarianceNormalization")
def _mvn(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    rank = len(x.shape)
    axes = sorted({norm_axis(int(a), rank) for a in (ctx.attr("axes") or (0, 2, 3))})
    kept = [d for d in range(rank) if d not in axes]
    perm = kept + axes
    st = x.strides()
    tshape = [x.shape[p] for p in perm]
    outer = int(np.prod([x.shape[d] for d in kept], dtype=np.int64))
    R = int(np.prod([x.shape[d] for d in axes], dtype=np.int64))
    if perm == list(range(rank)):
        _rownorm(ctx, "mvn", x, y, outer, R, 1)
        return True
    t = ctx.temp(x.dtype, tshape, "mvn_t")
    strided_copy(ctx, x, t, tshape, [st[p] for p in perm])
    t2 = ctx.temp(x.dtype, tshape, "mvn_n")
    _rownorm(ctx, "mvn", t, t2, outer, R, 1)
    inv = [perm.index(d) for d in range(rank)]
    tst = t2.strides()
    strided_copy(ctx, t2, y, y.shape, [tst[i] for i in inv])
    return True


@lowering("Hardmax")
def _hardmax(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    outer, R, inner = _axis_view(x.shape, int(ctx.attr("axis", -1)))
    k = ctx.render("scan.cu.j2", "hardmax", kind="hardmax", ctype=x.ctype, acc=_acc_type(x.dtype), ax_ptr=False,
                   outer=outer, R=R, inner=inner)
    ctx.launch(k, ctx.grid1d(outer * inner), 256, [x, y])
    return True


@lowering("LRN")
def _lrn(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    size = int(ctx.attr("size"))
    axis = 3 if op_is_nhwc(ctx.op) else 1  # {layout = "NHWC"} (assign-layout): channels innermost
    C = x.shape[axis]
    inner = int(np.prod(x.shape[axis + 1:], dtype=np.int64))
    lo = (size - 1) // 2
    k = ctx.render("scan.cu.j2", "lrn", kind="lrn", ctype=x.ctype, acc="double" if x.dtype.short == "f64" else "float",
                   numel=x.numel, inner=inner, C=C, lo=lo, hi=size - 1 - lo, size=size,
                   alpha=repr(float(ctx.attr("alpha", 1e-4))), beta=repr(float(ctx.attr("beta", 0.75))),
                   bias=repr(float(ctx.attr("bias", 1.0))))
    ctx.launch(k, ctx.grid1d(x.numel), 256, [x, y])
    return True
