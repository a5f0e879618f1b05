"""Pooling (pool.cu.j2: MaxPool with optional Indices, AveragePool, LpPool, MaxPool/AveragePool
{layout = "NHWC"} with channels innermost; Global* are reductions,
see reduce.py), BatchNormalization (inference; constant parameters folded at compile time into one
[2, C] fp32 weight) and MaxUnpool (fill.cu.j2 zero fill + a maxunpool.cu.j2 scatter)."""
from __future__ import annotations

import numpy as np

from ...ir.layout import op_is_nhwc
from ..lower import LowerCtx, lowering
from ..runtime_sizes import leading_only
from ._helpers import empty_result, grid_stride_launch


def spatial_pads(ctx: LowerCtx, in_sp, out_sp, kernel, strides, dil):
    """Leading/trailing pads per spatial dim, auto_pad resolved."""
    nd = len(in_sp)
    auto = ctx.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(nd):
            total = max(0, (out_sp[i] - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - in_sp[i])
            b = total // 2 if auto == "SAME_UPPER" else (total + 1) // 2
            begin.append(b)
            end.append(total - b)
        return begin, end
    if auto == "VALID":
        return [0] * nd, [0] * nd
    pads = list(ctx.attr("pads") or [0] * (2 * nd))
    return pads[:nd], pads[nd:]


def _pad3(v, fill):
    v = list(v)
    return [fill] * (3 - len(v)) + v


@lowering("MaxPool", "AveragePool", "LpPool", runtime_sizes=True,  # a batch symbolic: n per run
          when=lambda op: leading_only(op.operands + op.results))
def _pool(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    ind = ctx.out(1) if ctx.n_out > 1 else None  # MaxPool's Indices
    if op_is_nhwc(ctx.op):  # compiler/passes/assign_layout.py
        if ind is not None:
            ctx.fail("an NHWC MaxPool has no Indices output")
        return _pool_nhwc(ctx)
    in_sp, out_sp = list(x.shape[2:]), list(y.shape[2:])
    nd = len(in_sp)
    kernel = list(ctx.attr("kernel_shape"))
    strides = list(ctx.attr("strides") or [1] * nd)
    dil = list(ctx.attr("dilations") or [1] * nd)
    begin, end = spatial_pads(ctx, in_sp, out_sp, kernel, strides, dil)
    kind = {"MaxPool": "max", "LpPool": "lp"}.get(ctx.op.name, "avg")
    _emit_pool(ctx, kind, kernel, strides, dil, begin, end, ind)
    return True


def _pool_nhwc(ctx: LowerCtx):
    """[N,H,W,C] -> [N,P,Q,C]: the same template with channels innermost."""
    x, y = ctx.inp(0), ctx.out(0)
    in_sp, out_sp, C = list(x.shape[1:3]), list(y.shape[1:3]), int(x.shape[3])
    kernel = list(ctx.attr("kernel_shape"))
    strides = list(ctx.attr("strides") or [1, 1])
    dil = list(ctx.attr("dilations") or [1, 1])
    begin, end = spatial_pads(ctx, in_sp, out_sp, kernel, strides, dil)
    kind = "max" if ctx.op.name == "MaxPool" else "avg"
    k = ctx.render("pool.cu.j2", ctx.op.name.lower() + "_nhwc", ctype=x.ctype, kind=kind, nhwc=True, C=C,
                   in_sp=_pad3(in_sp, 1), out_sp=_pad3(out_sp, 1), kernel=_pad3(kernel, 1),
                   strides=_pad3(strides, 1), dil=_pad3(dil, 1), pads=_pad3(begin, 0), pads_end=_pad3(end, 0),
                   count_include_pad=bool(ctx.attr("count_include_pad", 0)))
    ctx.launch(k, ctx.grid1d(y.sym_numel), 256, [x, y, ctx.i64(y.sym_numel)])
    return True


@lowering("GlobalLpPool")
def _global_lp_pool(ctx: LowerCtx):
    """One window covering every spatial position."""
    in_sp = list(ctx.inp(0).shape[2:])
    nd = len(in_sp)
    _emit_pool(ctx, "lp", in_sp, [1] * nd, [1] * nd, [0] * nd, [0] * nd, None)
    return True


def _emit_pool(ctx: LowerCtx, kind: str, kernel, strides, dil, begin, end, ind):
    x, y = ctx.inp(0), ctx.out(0)
    in_sp, out_sp = list(x.shape[2:]), list(y.shape[2:])
    if len(in_sp) > 3:
        ctx.fail(f"{len(in_sp)}-D pooling is not supported")
    extra = {}
    if ind is not None:
        extra = {"with_index": True, "storage_order": int(ctx.attr("storage_order", 0) or 0)}
    k = ctx.render("pool.cu.j2", ctx.op.name.lower(), ctype=x.ctype, kind=kind, p=int(ctx.attr("p", 2) or 2), **extra,
                   in_sp=_pad3(in_sp, 1), out_sp=_pad3(out_sp, 1), kernel=_pad3(kernel, 1), strides=_pad3(strides, 1),
                   dil=_pad3(dil, 1), pads=_pad3(begin, 0), pads_end=_pad3(end, 0),
                   count_include_pad=bool(ctx.attr("count_include_pad", 0)))
    ctx.launch(k, ctx.grid1d(y.sym_numel), 256, [x, y] + ([ind] if ind is not None else []) + [ctx.i64(y.sym_numel)])


@lowering("BatchNormalization")
def _batchnorm(ctx: LowerCtx):
    if ctx.attr("training_mode", 0) or ctx.n_out > 1:
        ctx.fail("training-mode BatchNormalization is not supported by the CUDA backend")
    x, y = ctx.inp(0), ctx.out(0)
    C = x.shape[1] if len(x.shape) > 1 else 1
    spatial = int(np.prod(x.shape[2:], dtype=np.int64))
    eps = float(ctx.attr("epsilon", 1e-5))
    vals = [ctx.value(i) for i in range(1, 5)]
    n = y.numel
    if all(v is not None for v in vals):
        def fold(_):
            s, b, m, v = (np.asarray(a, np.float64) for a in vals)
            a = s / np.sqrt(v + eps)
            return np.stack([a, b - m * a]).astype(np.float32)
        ab = ctx.weight(1, fold, key="bn_fold")
        k = ctx.render("batchnorm.cu.j2", "batchnorm", ctype=x.ctype, folded=True, pctype="float", C=C,
                       spatial=spatial, epsilon=eps)
        ctx.launch(k, ctx.grid1d(n), 256, [x, ab, y, ctx.i64(n)])
    else:
        ps = [ctx.inp(i) for i in range(1, 5)]
        k = ctx.render("batchnorm.cu.j2", "batchnorm", ctype=x.ctype, folded=False, pctype=ps[0].ctype, C=C,
                       spatial=spatial, epsilon=eps)
        ctx.launch(k, ctx.grid1d(n), 256, [x, *ps, y, ctx.i64(n)])
    return True


def _zero(ctx, y):
    k = ctx.render("fill.cu.j2", "fill", kind="fill", ctype=y.ctype, value="0")
    ctx.launch(k, ctx.grid1d(y.numel), 256, [y, ctx.i64(y.numel)])


@lowering("MaxUnpool")
def _maxunpool(ctx: LowerCtx):
    x, ind, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    if empty_result(ctx):
        return True
    _zero(ctx, y)
    if x.numel:
        grid_stride_launch(ctx, "maxunpool.cu.j2", "maxunpool", [f"const {x.ctype}* __restrict__ x",
                           f"const {ind.ctype}* __restrict__ ind", f"{y.ctype}* __restrict__ y"],
                           [x, ind, y], x.numel, ynumel=y.numel)
    return True
