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
from ..runtime_sizes import leading_only
from ..plan import contiguous_strides
from ..variants import Variant, register
from .pool import spatial_pads

FALLBACK_PRIORITY = 0
TILE = 16


def _batch_strides(shape, batch):
    """Element strides of a contiguous operand's batch dims broadcast to `batch` (0 = broadcast)."""
    mat = int(np.prod(shape[-2:], dtype=np.int64)) if len(shape) >= 2 else 0
    bshape = list(shape[:-2])
    st = contiguous_strides(bshape) if bshape else []
    out = [0] * len(batch)
    for k in range(1, len(bshape) + 1):
        out[-k] = 0 if bshape[-k] == 1 else st[-k] * mat
    return out


def emit_matmul(ctx: LowerCtx, a, b, y, M, N, K, batch, a_bs, b_bs, a_ms, a_ks, b_ks, b_ns,
                bias=None, bias_ms=0, bias_ns=0, alpha=1.0, beta=1.0, tile: int = TILE):
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
        batch.append(max(da, db))
    emit_matmul(ctx, a, b, y, M, N, K, batch, _batch_strides(ash, batch), _batch_strides(bsh, batch),
                K, 1, N, 1, tile=(params or {}).get("tile", TILE))
    return True


def _gemm(ctx: LowerCtx, problem=None, params=None):
    a, b, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    ta, tb = bool(ctx.attr("transA", 0)), bool(ctx.attr("transB", 0))
    M, K = (a.shape[1], a.shape[0]) if ta else a.shape
    N = b.shape[0] if tb else b.shape[1]
    a_ms, a_ks = (1, M) if ta else (K, 1)
    b_ks, b_ns = (1, K) if tb else (N, 1)
    c = ctx.inp(2)
    bias_ms = bias_ns = 0
    if c is not None:
        cs = [1] * (2 - len(c.shape)) + list(c.shape)
        bias_ms = cs[1] if cs[0] != 1 else 0
        bias_ns = 1 if cs[1] != 1 else 0
    emit_matmul(ctx, a, b, y, M, N, K, [], [], [], a_ms, a_ks, b_ks, b_ns, bias=c, bias_ms=bias_ms,
                bias_ns=bias_ns, alpha=float(ctx.attr("alpha", 1.0)), beta=float(ctx.attr("beta", 1.0)),
                tile=(params or {}).get("tile", TILE))
    return True


MATMUL = register(Variant("linalg.matmul", "linalg", ("MatMul",), _matmul, space=_space, priority=FALLBACK_PRIORITY))
GEMM = register(Variant("linalg.gemm", "linalg", ("Gemm",), _gemm, space=_space, priority=FALLBACK_PRIORITY))


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
