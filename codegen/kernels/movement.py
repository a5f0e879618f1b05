"""Data movement family: views (Identity/Reshape/Squeeze/Unsqueeze/Flatten as buffer aliases),
Transpose, Expand, Tile, Slice, Split, Concat, DepthToSpace/SpaceToDepth (all one strided-copy
template), Gather, GatherElements, Pad, Resize (cubic / antialiased: sampling.py), ReverseSequence
(reverse_sequence.cu.j2, one thread per output element)."""
from __future__ import annotations

import numpy as np

from ...ir.layout import op_is_nhwc
from ..lower import LowerCtx, lowering
from ..plan import Buffer, contiguous_strides
from ..runtime_sizes import numel
from ._helpers import empty_result, grid_stride_launch
from .elementwise import lit


def strided_copy(ctx: LowerCtx, src: Buffer, dst: Buffer, shape, in_strides, in_base: int = 0,
                 out_strides=None, out_base: int = 0, in_mods=None):
    shape = [int(d) for d in shape]
    n = int(np.prod(shape, dtype=np.int64))
    if n == 0:
        return
    # drop extent-1 dims (they contribute nothing), keep at least one
    keep = [d for d in range(len(shape)) if shape[d] != 1] or [0] if shape else []
    in_mods = in_mods or [0] * len(shape)
    out_contig = out_strides is None and out_base == 0
    out_strides = out_strides or contiguous_strides(shape)
    sh = [shape[d] for d in keep] or [1]
    ist = [int(in_strides[d]) for d in keep] or [0]
    ost = [int(out_strides[d]) for d in keep] or [0]
    mods = [int(in_mods[d]) for d in keep] or [0]
    k = ctx.render("strided_copy.cu.j2", "copy_" + ctx.op.name.lower(), ctype=src.ctype, shape=sh, in_strides=ist,
                   in_mods=mods, in_base=int(in_base), out_contig=out_contig, out_strides=ost, out_base=int(out_base))
    ctx.launch(k, ctx.grid1d(n), 256, [src, dst, ctx.i64(n)])


@lowering("Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", runtime_sizes=True)  # the same bytes at every size
def _view(ctx: LowerCtx):
    ctx.alias(0, ctx.inp(0))  # buffers are always contiguous: a reshape is a view
    return True


@lowering("Transpose", runtime_sizes=True)
def _transpose(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    rank = len(x.shape)
    perm = ctx.attr("perm") or tuple(reversed(range(rank)))
    moved = [p for p in perm if x.shape[p] != 1]  # (a range build: a symbolic dim counts as moving)
    if moved == sorted(moved):  # only extent-1 dims move: the same bytes in the same order, a view
        ctx.alias(0, x)          # (torch MHA's seq-first [1,S,E] <-> [S,1,E] at batch 1)
        return True
    if ctx.problem is not None and ctx.problem.symbolic:
        xs = ctx.sym_shape(0)
        st, acc = [0] * len(xs), 1
        for d in range(len(xs) - 1, -1, -1):
            st[d], acc = acc, acc * xs[d]
        strided_copy_rt(ctx, x, y, ctx.sym_out_shape(0), [st[p] for p in perm])
        return True
    st = x.strides()
    strided_copy(ctx, x, y, y.shape, [st[p] for p in perm])
    return True


def strided_copy_rt(ctx: LowerCtx, src: Buffer, dst: Buffer, sym_shape, sym_in_strides, out_strides=None,
                    out_base=0, in_base=0):
    """strided_copy of a range build: the shape, strides and output base (ints or Exprs) as C
    text over the symbol parameters, the element count and grid per run (codegen/runtime_sizes.py)."""
    n = 1
    for d in sym_shape:
        n = n * d
    keep = [d for d in range(len(sym_shape)) if sym_shape[d] != 1] or [0]
    out_contig = out_strides is None and out_base == 0
    ost = [ctx.csize(out_strides[d]) for d in keep] if out_strides is not None else [0] * len(keep)
    k = ctx.render("strided_copy.cu.j2", "copy_" + ctx.op.name.lower(), ctype=src.ctype,
                   shape=[ctx.csize(sym_shape[d]) for d in keep], in_strides=[ctx.csize(sym_in_strides[d]) for d in keep],
                   in_mods=[0] * len(keep), in_base=ctx.csize(in_base), out_contig=out_contig, out_strides=ost,
                   out_base=ctx.csize(out_base), rt_params=ctx.rt_params())
    ctx.launch(k, ctx.grid1d(n), 256, [src, dst, ctx.i64(n), *ctx.rt_args()])


def _bcast_strides(in_shape, out_shape):
    st = contiguous_strides(in_shape)
    out = [0] * len(out_shape)
    for k in range(1, len(in_shape) + 1):
        out[-k] = 0 if in_shape[-k] == 1 and out_shape[-k] != 1 else st[-k]
    return out


@lowering("Expand")
def _expand(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    strided_copy(ctx, x, y, y.shape, _bcast_strides(x.shape, y.shape))
    return True


@lowering("Tile")
def _tile(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    mods = [d if o != d else 0 for d, o in zip(x.shape, y.shape)]
    strided_copy(ctx, x, y, y.shape, x.strides(), in_mods=mods)
    return True


def _const_ints(ctx, i, what):
    v = ctx.value(i)
    if v is None:
        ctx.fail(f"{what} (operand {i}) must be a compile-time constant")
    return [int(a) for a in np.asarray(v).reshape(-1)]


@lowering("Slice", runtime_sizes=True)  # a range build: _slice_rt
def _slice(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    rank = len(x.shape)
    starts, ends = _const_ints(ctx, 1, "starts"), _const_ints(ctx, 2, "ends")
    axes = _const_ints(ctx, 3, "axes") if ctx.has(3) else list(range(len(starts)))
    steps = _const_ints(ctx, 4, "steps") if ctx.has(4) else [1] * len(starts)
    if ctx.problem is not None and ctx.problem.symbolic:
        return _slice_rt(ctx, starts, axes, steps)
    st = x.strides()
    begin = [0] * rank
    step = [1] * rank
    for s, e, a, k in zip(starts, ends, axes, steps):
        a = a + rank if a < 0 else a
        b0, _, _ = slice(s, e, k).indices(x.shape[a])
        begin[a], step[a] = b0, k
    base = sum(b * s for b, s in zip(begin, st))
    if y.numel and not x.dynamic and contiguous_slice(x.shape, y.shape, step):
        ctx.alias(0, x, base * x.dtype.np.itemsize)  # one contiguous run of x: a view, no copy
        return True
    strided_copy(ctx, x, y, y.shape, [s * k for s, k in zip(st, step)], in_base=base)
    return True


def _slice_rt(ctx: LowerCtx, starts, axes, steps) -> bool:
    """A range build's Slice: a strided copy with the sizes per run. Along a symbolic axis the
    start must be >= 0 with step 1 (the begin is then the start at every size; the IR's result
    type gives the extent); static axes take any start, end and step."""
    xs, ys = ctx.sym_shape(0), ctx.sym_out_shape(0)
    rank = len(xs)
    st = _sym_strides(xs)
    begin, step = [0] * rank, [1] * rank
    for s_, a, k in zip(starts, axes, steps):
        a = a + rank if a < 0 else a
        if isinstance(xs[a], int):
            begin[a], step[a] = slice(s_, None, k).indices(xs[a])[0], k
            continue
        if s_ < 0 or k != 1 or isinstance(ys[a], int):
            ctx.fail(f"a Slice along symbolic axis {a} needs a start >= 0, step 1 and a symbolic extent in a "
                     f"range build (given start {s_}, step {k}, extent {ys[a]})")
        begin[a] = s_
    base = 0
    for b, s_ in zip(begin, st):
        base = base + b * s_
    strided_copy_rt(ctx, ctx.inp(0), ctx.out(0), ys, [s_ * k for s_, k in zip(st, step)], in_base=base)
    return True


def contiguous_slice(in_shape, out_shape, step) -> bool:
    """Whether a slice of a contiguous tensor is one contiguous run: for some axis a, every axis
    before it has extent 1, every axis after it is taken whole, and a itself has step 1 (or one
    element), as have the whole axes (a negative step reverses them). E.g. Y[i] of Y[G, ...] (fuse-horizontal's members) or a channel range at batch 1."""
    r = len(in_shape)
    a = next((d for d in range(r) if out_shape[d] != 1), r)
    if a == r:
        return True
    return all(step[d] == 1 or out_shape[d] == 1 for d in range(a, r)) and \
        all(out_shape[d] == in_shape[d] for d in range(a + 1, r))


@lowering("Split")
def _split(ctx: LowerCtx):
    x = ctx.inp(0)
    rank = len(x.shape)
    axis = int(ctx.attr("axis", 0))
    axis = axis + rank if axis < 0 else axis
    st = x.strides()
    off = 0
    for i in range(ctx.n_out):
        y = ctx.out(i)
        strided_copy(ctx, x, y, y.shape, st, in_base=off * st[axis])
        off += y.shape[axis]
    return True


def _sym_strides(shape) -> list:
    st, acc = [0] * len(shape), 1
    for d in range(len(shape) - 1, -1, -1):
        st[d], acc = acc, acc * shape[d]
    return st


@lowering("Concat", runtime_sizes=True)
def _concat(ctx: LowerCtx):
    y = ctx.out(0)
    rank = len(y.shape)
    axis = int(ctx.attr("axis", 0))
    axis = axis + rank if axis < 0 else axis
    if ctx.problem is not None and ctx.problem.symbolic:  # a range build: one strided copy an input
        ys = ctx.sym_out_shape(0)
        yst, off = _sym_strides(ys), 0
        for i in range(ctx.n_in):
            if not ctx.has(i):
                continue
            xs = ctx.sym_shape(i)
            strided_copy_rt(ctx, ctx.inp(i), y, xs, _sym_strides(xs), out_strides=yst, out_base=off * yst[axis])
            off = off + xs[axis]
        return True
    yst = y.strides()
    off = 0
    copies = []  # (input buffer, its offset on the axis): the inputs not written in place
    for i in range(ctx.n_in):
        x = ctx.inp(i)
        if x is None:
            continue
        if ctx.L.slot_views.get(id(ctx.L.canon(ctx.op.operands[i])), (None,))[0] is x:
            ctx.L.zero_copy_bytes += x.nbytes  # its producer wrote it in place (memory.concat_slots)
        elif x.numel:
            copies.append((x, off))
        off += x.shape[axis]
    # an NHWC Concat (assign-layout: channels innermost, so never zero-copy): one launch for all
    # copied inputs. NCHW ones keep a copy each (their slots usually take them; tests pin the counts)
    if op_is_nhwc(ctx.op) and 2 <= len(copies) <= CONCAT_MAX_INPUTS and not y.dynamic \
            and not any(x.dynamic for x, _ in copies):
        _concat_kernel(ctx, y, axis, copies)
        return True
    for x, o in copies:
        strided_copy(ctx, x, y, x.shape, x.strides(), out_strides=yst, out_base=o * yst[axis])
    return True


CONCAT_MAX_INPUTS = 16  # inputs one concat.cu.j2 launch takes (unrolled); more: a copy each


def _concat_kernel(ctx: LowerCtx, y, axis: int, copies):
    inner = int(np.prod(y.shape[axis + 1:], dtype=np.int64))
    outer = int(np.prod(y.shape[:axis], dtype=np.int64))
    parts, voff = [], 0
    for x, o in copies:
        n = int(x.shape[axis])
        parts.append(dict(n=n, voff=voff, vend=voff + n, ooff=int(o)))
        voff += n
    k = ctx.render("concat.cu.j2", "concat", ctype=y.ctype, parts=parts, M=voff, C=int(y.shape[axis]),
                   inner=inner)
    total = outer * voff * inner
    ctx.launch(k, ctx.grid1d(total), 256, [x for x, _ in copies] + [y, ctx.i64(total)])


@lowering("DepthToSpace", "SpaceToDepth")
def _depth_space(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    b = int(ctx.attr("blocksize"))
    N, C, H, W = x.shape
    if ctx.op.name == "DepthToSpace":
        if ctx.attr("mode", "DCR") == "DCR":
            rs, perm = [N, b, b, C // (b * b), H, W], [0, 3, 4, 1, 5, 2]
        else:
            rs, perm = [N, C // (b * b), b, b, H, W], [0, 1, 4, 2, 5, 3]
    else:
        rs = [N, C, H // b, b, W // b, b]
        perm = [0, 3, 5, 1, 2, 4] if ctx.attr("mode", "DCR") == "DCR" else [0, 1, 3, 5, 2, 4]
    st = contiguous_strides(rs)
    strided_copy(ctx, x, y, [rs[p] for p in perm], [st[p] for p in perm])
    return True


@lowering("Gather", runtime_sizes=True)  # a range build: every size per run (C over the symbol params)
def _gather(ctx: LowerCtx):
    x, ind, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    rank = len(x.shape)
    axis = int(ctx.attr("axis", 0))
    axis = axis + rank if axis < 0 else axis
    post = int(np.prod(x.shape[axis + 1:], dtype=np.int64))
    if ctx.problem is not None and ctx.problem.symbolic:
        n, xs = y.sym_numel, ctx.sym_shape(0)
        k = ctx.render("gather.cu.j2", "gather", ctype=x.ctype, ictype=ind.ctype, post=ctx.csize(numel(xs[axis + 1:])),
                       nidx=ctx.csize(ind.sym_numel), dim=ctx.csize(xs[axis]), rt_params=ctx.rt_params())
        ctx.launch(k, ctx.grid1d(n), 256, [x, ind, y, ctx.i64(n), *ctx.rt_args()])
        return True
    n = y.numel
    if n == 0:
        ctx.alias(0, x)
        return True
    k = ctx.render("gather.cu.j2", "gather", ctype=x.ctype, ictype=ind.ctype, post=post, nidx=max(ind.numel, 1),
                   dim=x.shape[axis])
    ctx.launch(k, ctx.grid1d(n), 256, [x, ind, y, ctx.i64(n)])
    return True


@lowering("GatherElements")
def _gather_elements(ctx: LowerCtx):
    x, ind, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    rank = len(x.shape)
    axis = int(ctx.attr("axis", 0))
    axis = axis + rank if axis < 0 else axis
    k = ctx.render("gather_elements.cu.j2", "gather_elements", ctype=x.ctype, ictype=ind.ctype, shape=list(y.shape),
                   axis=axis, x_strides=x.strides(), dim=x.shape[axis])
    ctx.launch(k, ctx.grid1d(y.numel), 256, [x, ind, y, ctx.i64(y.numel)])
    return True


@lowering("Pad")
def _pad(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    rank = len(x.shape)
    pads = _const_ints(ctx, 1, "pads")
    axes = _const_ints(ctx, 3, "axes") if ctx.has(3) else list(range(rank))
    begin = [0] * rank
    for j, a in enumerate(axes):
        begin[a + rank if a < 0 else a] = pads[j]
    value = 0
    vbuf = None  # a run-time constant_value (one element), read by the kernel
    if ctx.has(2):
        v = ctx.value(2)
        if v is None:
            vbuf = ctx.inp(2)
            if vbuf.numel != 1 or vbuf.dtype != x.dtype:
                ctx.fail("constant_value must be a compile-time constant")
        else:
            value = np.asarray(v).reshape(-1)[0].item() if np.asarray(v).size else 0
    cv = lit(value, y.compute) if vbuf is None else "cv[0]"
    extra = {"value_ptr": True} if vbuf is not None else {}
    k = ctx.render("pad.cu.j2", "pad", ctype=x.ctype, mode=ctx.attr("mode", "constant"), out_shape=list(y.shape),
                   in_shape=list(x.shape), in_strides=x.strides(), begin=begin, value=cv, **extra)
    ctx.launch(k, ctx.grid1d(y.numel), 256, [x] + ([vbuf] if vbuf is not None else []) + [y, ctx.i64(y.numel)])
    return True


@lowering("Resize", "Upsample")
def _resize(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    rank = len(x.shape)
    mode = ctx.attr("mode", "nearest")
    if mode not in ("nearest", "linear"):
        ctx.fail(f"mode {mode!r} is not supported by the CUDA backend (nearest, linear)")
    coord = ctx.attr("coordinate_transformation_mode", "half_pixel")
    if coord not in ("half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel", "tf_half_pixel_for_nn"):
        ctx.fail(f"coordinate_transformation_mode {coord!r} is not supported")
    if ctx.attr("antialias", 0):
        ctx.fail("antialias is not supported")
    scales = None
    sidx = 2 if ctx.op.name == "Resize" else 1
    if ctx.has(sidx):
        v = ctx.value(sidx)
        if v is not None and np.asarray(v).size:
            scales = [float(s) for s in np.asarray(v).reshape(-1)]
            axes = ctx.attr("axes")
            if axes and len(scales) != rank:
                full = [1.0] * rank
                for a, s in zip(axes, scales):
                    full[a] = s
                scales = full
    if scales is None or ctx.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        scales = [o / i for o, i in zip(y.shape, x.shape)]
    resized = [d for d in range(rank) if y.shape[d] != x.shape[d] or scales[d] != 1.0]
    if mode == "linear" and len(resized) > 3:
        ctx.fail("linear resize over more than 3 dims is not supported")
    k = ctx.render("resize.cu.j2", "resize", ctype=x.ctype, mode=mode, coord=coord,
                   nearest_mode=ctx.attr("nearest_mode", "round_prefer_floor"), out_shape=list(y.shape),
                   in_shape=list(x.shape), in_strides=x.strides(), scales=scales, resized=resized)
    ctx.launch(k, ctx.grid1d(y.numel), 256, [x, y, ctx.i64(y.numel)])
    return True


@lowering("ReverseSequence")
def _revseq(ctx: LowerCtx):
    x, lens, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    if empty_result(ctx):
        return True
    ba, ta = int(ctx.attr("batch_axis", 1)), int(ctx.attr("time_axis", 0))
    inner = int(np.prod(x.shape[2:], dtype=np.int64))
    grid_stride_launch(ctx, "reverse_sequence.cu.j2", "revseq",
                       [f"const {x.ctype}* __restrict__ x", f"const {lens.ctype}* __restrict__ lens",
                        f"{y.ctype}* __restrict__ y"], [x, lens, y], y.numel,
                       inner=inner, d1=x.shape[1], batch_axis=ba, T=x.shape[ta])
    return True
