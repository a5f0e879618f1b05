"""Integer matmul / conv (int32 accumulation) and DynamicQuantizeLinear:

  intgemm.cu.j2  kind mm    MatMulInteger, QLinearMatMul (batch broadcast; per-row A / per-column B
                            zero points and scales; one thread per output element)
                 kind conv  ConvInteger, QLinearConv (N-d, groups, dilations, pads; per-output-channel
                            weight zero point / scale; one thread per output element)
  dynq.cu.j2     DynamicQuantizeLinear: one block reduces min/max and writes scale / zero point, then
                 an elementwise kernel quantizes.
"""
from __future__ import annotations

import numpy as np

from ..lower import LowerCtx, lowering

_QR = {"i8": (-128, 127), "u8": (0, 255), "i16": (-32768, 32767), "u16": (0, 65535), "i32": (-2147483648, 2147483647)}


def _bstrides(pshape, oshape):
    """Element strides of a parameter of shape pshape broadcast (right-aligned) to oshape."""
    pshape = list(pshape)
    if len(pshape) > len(oshape):
        pshape = pshape[len(pshape) - len(oshape):]
    full = [1] * (len(oshape) - len(pshape)) + pshape
    st, acc = [0] * len(oshape), 1
    for d in range(len(oshape) - 1, -1, -1):
        st[d] = acc if full[d] != 1 else 0
        acc *= full[d]
    return st


def _row_shape(b, ashape):
    """A-side parameter (zero point / scale): scalar, per-row 1-D [M], or [.., M, 1]."""
    s = list(b.shape)
    n = b.numel
    if n == 1:
        return []
    if len(s) == 1:
        return [n, 1]
    return s


@lowering("MatMulInteger", "QLinearMatMul")
def _mm_int(ctx: LowerCtx):
    ql = ctx.op.name == "QLinearMatMul"
    ia, ib = (0, 3) if ql else (0, 1)
    A, B, y = ctx.inp(ia), ctx.inp(ib), ctx.out(0)
    ash, bsh = list(A.shape), list(B.shape)
    if len(ash) == 1:
        ash = [1] + ash
    if len(bsh) == 1:
        bsh = bsh + [1]
    M, K, N = ash[-2], ash[-1], bsh[-1]
    batch = list(np.broadcast_shapes(tuple(ash[:-2]), tuple(bsh[:-2])))
    oshape = batch + [M, N]
    nb = len(batch)

    def bst(sh, mat):
        full = [1] * (nb - len(sh[:-2])) + list(sh[:-2])
        st, acc = [0] * nb, mat
        for d in range(nb - 1, -1, -1):
            st[d] = acc if full[d] != 1 else 0
            acc *= full[d]
        return st
    astr, bstr = bst(ash, M * K), bst(bsh, K * N)
    params, bufs = [], []

    def add(name, i, row):
        b = ctx.inp(i)
        shp = _row_shape(b, ash) if row else ([] if b.numel == 1 else list(b.shape))
        params.append(dict(name=name, ctype=b.ctype, per=_bstrides(shp, oshape)))
        bufs.append(b)
    if ql:
        add("sa", 1, True)
        add("az", 2, True)
        add("sb", 4, False)
        add("bz", 5, False)
        add("sy", 6, False)
        add("yz", 7, False)
        if y.dtype.short not in _QR:
            ctx.fail(f"output dtype {y.dtype} is not supported")
    else:
        if ctx.has(2):
            add("az", 2, True)
        if ctx.has(3):
            add("bz", 3, False)
    names = {p["name"] for p in params}
    lo, hi = _QR.get(y.dtype.short, (0, 0))
    k = ctx.render("intgemm.cu.j2", "intmm", kind="mm", actype=A.ctype, bctype=B.ctype, yctype=y.ctype,
                   params=params, M=M, N=N, K=K, oshape=oshape, astr=astr, bstr=bstr,
                   has_az="az" in names, has_bz="bz" in names, quant=ql, has_bias=False, lo=lo, hi=hi)
    if y.numel:
        ctx.launch(k, ctx.grid1d(y.numel), 256, [A, B] + bufs + [y, ctx.i64(y.numel)])
    else:
        ctx.alias(0, ctx.new_weight(np.zeros(y.shape, y.dtype.np)))
    return True


@lowering("ConvInteger", "QLinearConv")
def _conv_int(ctx: LowerCtx):
    from ...ir.ops.conv import _ints, resolve_pads
    ql = ctx.op.name == "QLinearConv"
    ix, iw = (0, 3) if ql else (0, 1)
    x, w, y = ctx.inp(ix), ctx.inp(iw), ctx.out(0)
    a = ctx.attrs
    nd = len(x.shape) - 2
    kshape = list(w.shape[2:])
    s = list(_ints(a.strides, nd, 1))
    d = list(_ints(a.dilations, nd, 1))
    pads = resolve_pads(x.shape[2:], kshape, s, d, a.auto_pad, a.pads)
    M, Cg = w.shape[0], w.shape[1]
    G = int(a.group or 1)
    params, bufs = [], []

    def add(name, i, per_ok):
        b = ctx.inp(i)
        params.append(dict(name=name, ctype=b.ctype, per=bool(per_ok and b.numel > 1)))
        bufs.append(b)
    if ql:
        add("sa", 1, False)
        add("az", 2, False)
        add("sb", 4, True)
        add("bz", 5, True)
        add("sy", 6, False)
        add("yz", 7, False)
        if ctx.has(8):
            add("bias", 8, True)
    else:
        if ctx.has(2):
            add("az", 2, False)
        if ctx.has(3):
            add("bz", 3, True)
    names = {p["name"] for p in params}
    lo, hi = _QR.get(y.dtype.short, (0, 0))
    xsp = int(np.prod(x.shape[2:], dtype=np.int64))
    xstr = x.strides()[2:]
    k = ctx.render("intgemm.cu.j2", "intconv", kind="conv", actype=x.ctype, bctype=w.ctype, yctype=y.ctype,
                   params=params, nd=nd, oshape=list(y.shape[2:]), xshape=list(x.shape[2:]), xstr=xstr,
                   kshape=kshape, strides=s, dil=d, pads=[p[0] for p in pads], M=M, Mg=M // G, Cg=Cg,
                   C=x.shape[1], xsp=xsp, ksp=int(np.prod(kshape, dtype=np.int64)),
                   has_az="az" in names, has_bz="bz" in names, quant=ql, has_bias="bias" in names, lo=lo, hi=hi)
    ctx.launch(k, ctx.grid1d(y.numel), 256, [x, w] + bufs + [y, ctx.i64(y.numel)])
    return True


@lowering("DynamicQuantizeLinear")
def _dynq(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    sc = ctx.out(1) if ctx.n_out > 1 else ctx.temp(x.dtype, [], "scale")
    zp = ctx.out(2) if ctx.n_out > 2 else ctx.temp("u8", [], "zp")
    k1 = ctx.render("dynq.cu.j2", "dynq_stats", kind="stats", ctype=x.ctype, sctype=sc.ctype)
    ctx.launch(k1, 1, 1024, [x, sc, zp, ctx.i64(x.numel)])
    if x.numel:
        k2 = ctx.render("dynq.cu.j2", "dynq_apply", kind="apply", ctype=x.ctype, sctype=sc.ctype)
        ctx.launch(k2, ctx.grid1d(x.numel), 256, [x, sc, zp, y, ctx.i64(x.numel)])
    return True
