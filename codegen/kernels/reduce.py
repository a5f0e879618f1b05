"""Reduction family: Reduce* over any axes (via an [outer, R, inner] view, transposing first when
the axes are not contiguous), ArgMax/ArgMin,
GlobalAveragePool/GlobalMaxPool.
Softmax/LogSoftmax and LayerNormalization: codegen/kernels/rownorm_variants.py."""
from __future__ import annotations

import numpy as np

from ..dtypes import compute_type
from ..lower import LowerCtx, lowering
from .elementwise import lit
from .movement import strided_copy
from ..runtime_sizes import grid_dim, numel

# op -> (combine, map(v), final(acc))  (R is the reduced extent, m the max for lse)
REDUCE = {
    "ReduceSum": ("sum", "v", "acc"),
    "ReduceMean": ("sum", "v", "acc / static_cast<{acc}>({R})"),
    "ReduceMax": ("max", "v", "acc"),
    "ReduceMin": ("min", "v", "acc"),
    "ReduceProd": ("prod", "v", "acc"),
    "ReduceL1": ("sum", "nnc_abs(v)", "acc"),
    "ReduceL2": ("sum", "v * v", "sqrt{f}(acc)"),
    "ReduceSumSquare": ("sum", "v * v", "acc"),
    "ReduceLogSum": ("sum", "v", "log{f}(acc)"),
    "ReduceLogSumExp": ("sum", "exp{f}(v - m)", "log{f}(acc) + m"),
}


def _acc_type(dt) -> str:
    ct = compute_type(dt)
    if ct in ("float", "double"):
        return ct
    # bool accumulates unsigned, so the max/min identities are false/true (empty reductions)
    return "int64_t" if dt.kind == "int" else "uint64_t"


def _init(combine, acc):
    if combine == "sum":
        return lit(0, acc)
    if combine == "prod":
        return lit(1, acc)
    if acc in ("float", "double"):
        return lit(float("-inf") if combine == "max" else float("inf"), acc)
    big = "9223372036854775807LL" if acc == "int64_t" else "18446744073709551615ULL"
    small = "(-9223372036854775807LL - 1)" if acc == "int64_t" else "0ULL"
    return small if combine == "max" else big


def reduce_view(ctx: LowerCtx, x, axes: list):
    """-> (buffer, outer, R, inner): x itself when the axes are contiguous, else a transposed temp
    with the reduced axes last."""
    shape = list(x.shape)
    axes = sorted(axes)
    if not axes:
        return x, int(np.prod(shape, dtype=np.int64)), 1, 1
    if axes == list(range(axes[0], axes[-1] + 1)):
        outer = int(np.prod(shape[:axes[0]], dtype=np.int64))
        R = int(np.prod([shape[a] for a in axes], dtype=np.int64))
        inner = int(np.prod(shape[axes[-1] + 1:], dtype=np.int64))
        return x, outer, R, inner
    kept = [d for d in range(len(shape)) if d not in axes]
    perm = kept + axes
    st = x.strides()
    tshape = [shape[p] for p in perm]
    t = ctx.temp(x.dtype, tshape, "reduce_t")
    strided_copy(ctx, x, t, tshape, [st[p] for p in perm])
    outer = int(np.prod([shape[d] for d in kept], dtype=np.int64))
    return t, outer, int(np.prod([shape[a] for a in axes], dtype=np.int64)), 1


def _rt_view(ctx: LowerCtx, axes: list):
    """A range build's [outer, R, inner] of operand 0 (Exprs where symbolic), for contiguous axes
    only (the transposing view would need runtime strides; codegen/runtime_sizes.py)."""
    sh = list(ctx.sym_shape(0))
    axes = sorted(axes)
    if not axes:
        return numel(sh), 1, 1
    if axes != list(range(axes[0], axes[-1] + 1)):
        ctx.fail(f"reduction axes {axes} are not contiguous: a range build reduces contiguous axes only")
    return numel(sh[:axes[0]]), numel(sh[axes[0]:axes[-1] + 1]), numel(sh[axes[-1] + 1:])


def emit_reduce(ctx: LowerCtx, kind: str, x, y, axes):
    if ctx.problem is not None and ctx.problem.symbolic:
        return _emit_reduce_rt(ctx, kind, x, y, axes)
    src, outer, R, inner = reduce_view(ctx, x, axes)
    combine, mp, fin = REDUCE[kind]
    acc = _acc_type(x.dtype)
    f = "f" if acc == "float" else ""
    lowest = lit(float("-inf"), acc) if acc in ("float", "double") else _init("max", acc)
    variant = "row" if inner == 1 and R > 1 else "col"
    block = 256 if variant == "row" else 256
    k = ctx.render("reduce.cu.j2", "reduce_" + kind[6:].lower(), variant=variant, outer=outer, R=R, inner=inner,
                   in_ctype=x.ctype, out_ctype=y.ctype, acc=acc, combine_op=combine, map_expr=mp.format(f=f),
                   final_expr=fin.format(f=f, acc=acc, R=R), init=_init(combine, acc), lowest=lowest,
                   lse=kind == "ReduceLogSumExp", block=block)
    grid = min(outer, 65535) if variant == "row" else ctx.grid1d(outer * inner)
    ctx.launch(k, grid, block, [src, y])


def _emit_reduce_rt(ctx: LowerCtx, kind: str, x, y, axes):
    """emit_reduce with the sizes per run: outer, R, inner as C over the symbol parameters."""
    outer, R, inner = _rt_view(ctx, axes)
    combine, mp, fin = REDUCE[kind]
    acc = _acc_type(x.dtype)
    f = "f" if acc == "float" else ""
    lowest = lit(float("-inf"), acc) if acc in ("float", "double") else _init("max", acc)
    variant = "row" if inner == 1 else "col"  # (the row kernel takes R = 1 too)
    c = ctx.csize
    k = ctx.render("reduce.cu.j2", "reduce_" + kind[6:].lower(), variant=variant, outer=c(outer), R=c(R), inner=c(inner),
                   in_ctype=x.ctype, out_ctype=y.ctype, acc=acc, combine_op=combine, map_expr=mp.format(f=f),
                   final_expr=fin.format(f=f, acc=acc, R="R"), init=_init(combine, acc), lowest=lowest,
                   lse=kind == "ReduceLogSumExp", block=256, rt_params=ctx.rt_params())
    grid = grid_dim(outer, 1, ctx.L.sym_max, 65535)[1] if variant == "row" else ctx.grid1d(outer * inner)
    ctx.launch(k, grid, 256, [x, y, *ctx.rt_args()])


@lowering(*REDUCE, runtime_sizes=True)  # (a range build: contiguous axes; _emit_reduce_rt)
def _reduce(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    rank = len(x.shape)
    axes = None
    if ctx.has(1):
        v = ctx.value(1)
        if v is None:
            ctx.fail("the axes input must be a compile-time constant")
        axes = [int(a) for a in np.asarray(v).reshape(-1)]
    elif ctx.attr("axes") is not None:  # older-opset form, should the importer keep it
        axes = list(ctx.attr("axes"))
    if not axes:
        if ctx.attr("noop_with_empty_axes", 0):
            if ctx.op.name in ("ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceMean"):
                ctx.alias(0, x)
                return True
        axes = list(range(rank))
    axes = sorted({a + rank if a < 0 else a for a in axes})
    emit_reduce(ctx, ctx.op.name, x, y, axes)
    return True


@lowering("GlobalAveragePool", "GlobalMaxPool", runtime_sizes=True)
def _global_pool(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    emit_reduce(ctx, "ReduceMean" if ctx.op.name == "GlobalAveragePool" else "ReduceMax", x, y,
                list(range(2, len(x.shape))))
    return True


def _axis_view(shape, axis):
    axis = axis + len(shape) if axis < 0 else axis
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
    return outer, int(shape[axis]), inner


# Softmax / LogSoftmax and LayerNormalization: the "rownorm" variant family
# (codegen/kernels/rownorm_variants.py).


@lowering("ArgMax", "ArgMin")
def _argreduce(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    outer, R, inner = _axis_view(x.shape, int(ctx.attr("axis", 0)))
    k = ctx.render("argreduce.cu.j2", ctx.op.name.lower(), outer=outer, R=R, inner=inner, ctype=x.ctype,
                   compute=compute_type(x.dtype), cmp=">" if ctx.op.name == "ArgMax" else "<",
                   last=bool(ctx.attr("select_last_index", 0)))
    ctx.launch(k, ctx.grid1d(outer * inner), 256, [x, y])
    return True
