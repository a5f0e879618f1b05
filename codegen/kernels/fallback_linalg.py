"""Simple, always-correct MatMul/Gemm (smem-tiled) and direct Conv, registered at priority 0.

MatMul/Gemm: the Variants "linalg.matmul" / "linalg.gemm" (codegen/variants.py), which apply to
every problem; space: the square smem tile (16 only, the template's one tested size). Conv: a
legacy @lowering (the conv family's). Faster kernels (codegen/kernels/gemm_lowering.py,
conv_lowering.py) register the same ops at a higher priority and do not apply (or decline) in the
cases they do not handle; these then run.
"""
from __future__ import annotations

import numpy as np

from ..lower import LowerCtx, lowering
from ...ir.symbolic import dmax
from ..runtime_sizes import at_max, ceil_div, is_symbolic, leading_only, numel
from ..runtime_sizes import shape_is_symbolic as is_symbolic_shape
from ..plan import contiguous_strides
from ..variants import YES, Variant, no, register
from .pool import spatial_pads

FALLBACK_PRIORITY = 0
TILE = 16


def _sym_strides(shape) -> list:
    st, acc = [], 1
    for d in reversed(list(shape)):
        st.append(acc)
        acc = acc * d
    return st[::-1]


def _bmax(da, db):
    """The broadcast of two batch dims (ints, or a range build's Exprs)."""
    if da == db or db == 1:
        return da
    if da == 1:
        return db
    return dmax(da, db)


def _batch_strides(shape, batch):
    """Element strides of a contiguous operand's batch dims broadcast to `batch` (0 = broadcast);
    dims may be a range build's Exprs."""
    if any(is_symbolic(d) for d in shape):
        mat = (shape[-2] * shape[-1]) if len(shape) >= 2 else 0
        bshape = list(shape[:-2])
        st = _sym_strides(bshape)
        out = [0] * len(batch)
        for k in range(1, len(bshape) + 1):
            out[-k] = 0 if bshape[-k] == 1 else st[-k] * mat
        return out
    mat = int(np.prod(shape[-2:], dtype=np.int64)) if len(shape) >= 2 else 0
    bshape = list(shape[:-2])
    st = contiguous_strides(bshape) if bshape else []
    out = [0] * len(batch)
    for k in range(1, len(bshape) + 1):
        out[-k] = 0 if bshape[-k] == 1 else st[-k] * mat
    return out


def emit_matmul(ctx: LowerCtx, a, b, y, M, N, K, batch, a_bs, b_bs, a_ms, a_ks, b_ks, b_ns,
                bias=None, bias_ms=0, bias_ns=0, alpha=1.0, beta=1.0, tile: int = TILE):
    """Sizes and strides are ints, or (a range build) Exprs: C text over the symbol parameters,
    the grid per run (codegen/runtime_sizes.py)."""
    sizes = [M, N, K, *batch, *a_bs, *b_bs, a_ms, a_ks, b_ks, b_ns, bias_ms, bias_ns]
    if any(is_symbolic(d) for d in sizes):
        nb = numel(batch)
        if at_max(nb, ctx.L.sym_max) > 65535:
            ctx.fail(f"batch {at_max(nb, ctx.L.sym_max)} at the profile's max exceeds the fallback matmul's grid.z limit")
        c = ctx.csize
        k = ctx.render("matmul_fallback.cu.j2", "matmul", tile=tile, actype=a.ctype, bctype=b.ctype, cctype=y.ctype,
                       has_bias=bias is not None, biasctype=bias.ctype if bias is not None else "",
                       M=c(M), N=c(N), K=c(K), batch=[c(d) for d in batch], a_bs=[c(d) for d in a_bs],
                       b_bs=[c(d) for d in b_bs], a_ms=c(a_ms), a_ks=c(a_ks), b_ks=c(b_ks), b_ns=c(b_ns),
                       bias_ms=c(bias_ms), bias_ns=c(bias_ns), alpha=alpha, beta=beta, rt_params=ctx.rt_params())
        grid = (ceil_div(N, tile), ceil_div(M, tile), nb)
        args = [a, b] + ([bias] if bias is not None else []) + [y] + ctx.rt_args()
        ctx.launch(k, grid, (tile, tile), args)
        return
    nb = int(np.prod(batch, dtype=np.int64)) if batch else 1
    if nb > 65535:
        ctx.fail(f"batch {nb} exceeds the fallback matmul's grid.z limit")
    k = ctx.render("matmul_fallback.cu.j2", "matmul", tile=tile, actype=a.ctype, bctype=b.ctype, cctype=y.ctype,
                   has_bias=bias is not None, biasctype=bias.ctype if bias is not None else "",
                   M=M, N=N, K=K, batch=list(batch), a_bs=a_bs, b_bs=b_bs, a_ms=a_ms, a_ks=a_ks,
                   b_ks=b_ks, b_ns=b_ns, bias_ms=bias_ms, bias_ns=bias_ns, alpha=alpha, beta=beta)
    grid = ((N + tile - 1) // tile, (M + tile - 1) // tile, nb)
    args = [a, b] + ([bias] if bias is not None else []) + [y]
    ctx.launch(k, grid, (tile, tile), args)


def _space(problem) -> list:
    return [{"tile": TILE}]


def _matmul(ctx: LowerCtx, problem=None, params=None):
    a, b, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    ash, bsh = list(a.shape), list(b.shape)
    if problem is not None and problem.symbolic:  # a range build: the sizes per run
        ash, bsh = list(ctx.sym_shape(0)), list(ctx.sym_shape(1))
    if len(ash) == 1:
        ash = [1] + ash
    if len(bsh) == 1:
        bsh = bsh + [1]
    M, K = ash[-2], ash[-1]
    N = bsh[-1]
    rank = max(len(ash), len(bsh))
    batch = []
    for i in range(rank - 2, 0, -1):
        da = ash[-2 - i] if len(ash) - 2 >= i else 1
        db = bsh[-2 - i] if len(bsh) - 2 >= i else 1
        batch.append(_bmax(da, db))
    emit_matmul(ctx, a, b, y, M, N, K, batch, _batch_strides(ash, batch), _batch_strides(bsh, batch),
                K, 1, N, 1, tile=(params or {}).get("tile", TILE))
    return True


def _gemm_applies(problem):
    c = problem.op.operands[2] if len(problem.op.operands) > 2 else None
    if problem.symbolic and c is not None and is_symbolic_shape(c.type.shape):
        return no("a Gemm C with symbolic dims")
    return YES


def _gemm(ctx: LowerCtx, problem=None, params=None):
    a, b, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    ta, tb = bool(ctx.attr("transA", 0)), bool(ctx.attr("transB", 0))
    ash, bsh = (ctx.sym_shape(0), ctx.sym_shape(1)) if problem is not None and problem.symbolic else (a.shape, b.shape)
    M, K = (ash[1], ash[0]) if ta else ash
    N = bsh[0] if tb else bsh[1]
    a_ms, a_ks = (1, M) if ta else (K, 1)
    b_ks, b_ns = (1, K) if tb else (N, 1)
    c = ctx.inp(2)
    bias_ms = bias_ns = 0
    if c is not None:
        if c.sym_shape is not None:
            ctx.fail("a Gemm C with symbolic dims is not supported in a range build")
        cs = [1] * (2 - len(c.shape)) + list(c.shape)
        bias_ms = cs[1] if cs[0] != 1 else 0
        bias_ns = 1 if cs[1] != 1 else 0
    emit_matmul(ctx, a, b, y, M, N, K, [], [], [], a_ms, a_ks, b_ks, b_ns, bias=c, bias_ms=bias_ms,
                bias_ns=bias_ns, alpha=float(ctx.attr("alpha", 1.0)), beta=float(ctx.attr("beta", 1.0)),
                tile=(params or {}).get("tile", TILE))
    return True


MATMUL = register(Variant("linalg.matmul", "linalg", ("MatMul",), _matmul, space=_space, priority=FALLBACK_PRIORITY,
                          runtime_sizes=True))
GEMM = register(Variant("linalg.gemm", "linalg", ("Gemm",), _gemm, space=_space, priority=FALLBACK_PRIORITY,
                        applies=_gemm_applies, runtime_sizes=True))


def _pad3(v, fill):
    v = list(v)
    return [fill] * (3 - len(v)) + v


# NCHW only: it reads x.shape[2:] as the spatial dims (an NHWC conv's kernels are conv_lowering's;
# a timed selection found it a wrong candidate for ResNet-50's NHWC convs)
@lowering("Conv", priority=FALLBACK_PRIORITY, runtime_sizes=True,  # a batch symbolic: n per run
          when=lambda op: getattr(op.attrs, "layout", "NCHW") != "NHWC" and leading_only(op.operands + op.results))
def _conv(ctx: LowerCtx):
    x, w, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    bias = ctx.inp(2)
    in_sp, out_sp = list(x.shape[2:]), list(y.shape[2:])
    nd = len(in_sp)
    if nd > 3:
        ctx.fail(f"{nd}-D convolution is not supported")
    kernel = list(w.shape[2:])
    strides = list(ctx.attr("strides") or [1] * nd)
    dil = list(ctx.attr("dilations") or [1] * nd)
    begin, _ = spatial_pads(ctx, in_sp, out_sp, kernel, strides, dil)
    group = int(ctx.attr("group", 1))
    k = ctx.render("direct_conv.cu.j2", "conv_direct", ctype=x.ctype, wctype=w.ctype, has_bias=bias is not None,
                   bctype=bias.ctype if bias is not None else "", OC=y.shape[1], IC=x.shape[1],
                   ICg=x.shape[1] // group, group=group, in_sp=_pad3(in_sp, 1), out_sp=_pad3(out_sp, 1),
                   kernel=_pad3(kernel, 1), strides=_pad3(strides, 1), dil=_pad3(dil, 1), pads=_pad3(begin, 0))
    args = [x, w] + ([bias] if bias is not None else []) + [y, ctx.i64(y.sym_numel)]
    ctx.launch(k, ctx.grid1d(y.sym_numel), 256, args)
    return True
