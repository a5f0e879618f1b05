"""Shape / layout ops: Reshape, Transpose, Concat, Split, Slice, Expand, Squeeze, Unsqueeze,
Flatten, Tile, Range, Shape, Size, ConstantOfShape, Pad, CenterCropPad, Trilu, EyeLike, OneHot.

Inference uses constant operand values (Reshape's shape, Slice's starts/ends, Pad's pads, ...)
through `ctx.value(i)`; when such an operand is not constant the affected dims are `UNKNOWN`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import NncError
from ..registry import NoAttrs, register
from ..symbolic import UNKNOWN, Expr
from ..types import DType, F32, I64, TensorType, dtype as to_dtype
from ._util import broadcast_shapes, norm_axis, same_as

BIG = 1 << 30  # slice bounds at or beyond this mean "to the end"


# ---------------------------------------------------------------- helpers

def const_ints(ctx, i: int) -> Optional[list]:
    """Operand i's constant value as a list of Python ints, or None when it is not constant."""
    v = ctx.value(i)
    if v is None:
        return None
    v = np.asarray(v)
    if v.dtype.kind not in "iub" and not np.all(np.isfinite(v.astype(np.float64))):
        ctx.fail(f"operand {i} must hold integers, got {v.reshape(-1)[:8].tolist()}")
    return [int(x) for x in v.reshape(-1)]


def vec_len(ctx, i: int):
    """Static length of 1-D operand i (an int), or None."""
    s = ctx.shape(i)
    if len(s) == 0:
        return 1
    return s[0] if isinstance(s[0], int) else None


def _factors(d) -> list:
    if isinstance(d, Expr) and d.kind == "mul":
        return list(d.args)
    return [d]


def prod(dims):
    n = 1
    for d in dims:
        n = n * d
    return n


def div_dims(num: list, den: list):
    """prod(num) // prod(den), cancelling equal symbolic factors first (N*12 / N -> 12)."""
    nf = [f for d in num for f in _factors(d)]
    df = [f for d in den for f in _factors(d)]
    rest = []
    for f in df:
        if not isinstance(f, int) and f in nf:
            nf.remove(f)
        else:
            rest.append(f)
    ni = prod([f for f in nf if isinstance(f, int)])
    ns = [f for f in nf if not isinstance(f, int)]
    di = prod([f for f in rest if isinstance(f, int)])
    ds = [f for f in rest if not isinstance(f, int)]
    if any(isinstance(f, Expr) and f.kind == "unknown" for f in ns + ds):
        return UNKNOWN
    if ds:
        return prod(ns + [ni]) // prod(ds + [di])
    if di != 0 and ni % di == 0:
        return prod(ns + [ni // di])
    return prod(ns + [ni]) // di


def int_list(a) -> list:
    return [int(x) for x in np.asarray(a).reshape(-1)]


# ---------------------------------------------------------------- Reshape

@dataclass(frozen=True)
class ReshapeAttrs:
    allowzero: int = 0


def reshape_dims(in_shape, target: list, allowzero: int):
    out = []
    neg = None
    for i, s in enumerate(target):
        if s == 0 and not allowzero:
            if i >= len(in_shape):
                raise NncError(f"shape entry {i} is 0 but the input has rank {len(in_shape)}")
            out.append(in_shape[i])
        elif s == -1:
            if neg is not None:
                raise NncError("at most one -1 in a shape")
            neg = i
            out.append(None)
        elif s < 0:
            raise NncError(f"invalid shape entry {s}")
        else:
            out.append(s)
    if neg is not None:
        out[neg] = div_dims(list(in_shape), [d for d in out if d is not None])
    elif all(isinstance(d, int) for d in list(in_shape) + out) and prod(in_shape) != prod(out):
        raise NncError(f"cannot reshape {list(in_shape)} to {out}")
    return tuple(out)


def _reshape_infer(ctx):
    t = ctx.type(0)
    target = const_ints(ctx, 1)
    if target is None:
        n = vec_len(ctx, 1)
        return [TensorType(t.dtype, None if n is None else (UNKNOWN,) * n)]
    return [t.with_shape(reshape_dims(ctx.shape(0), target, ctx.attrs.allowzero))]


def _reshape_ref(a, x, shape):
    return np.reshape(x, reshape_dims(x.shape, int_list(shape), a.allowzero))


register("Reshape", ReshapeAttrs, infer=_reshape_infer, ref=_reshape_ref, inputs=2)


# ---------------------------------------------------------------- Transpose

@dataclass(frozen=True)
class TransposeAttrs:
    perm: Optional[tuple[int, ...]] = None


def _perm(a, rank):
    p = list(range(rank))[::-1] if a.perm is None else [norm_axis(x, rank, "perm entry") for x in a.perm]
    if sorted(p) != list(range(rank)):
        raise NncError(f"perm {list(a.perm)} is not a permutation of rank {rank}")
    return p


def _transpose_infer(ctx):
    s = ctx.shape(0)
    return [ctx.type(0).with_shape(tuple(s[i] for i in _perm(ctx.attrs, len(s))))]


register("Transpose", TransposeAttrs, infer=_transpose_infer,
         ref=lambda a, x: np.ascontiguousarray(np.transpose(x, _perm(a, x.ndim))))


# ---------------------------------------------------------------- Concat

@dataclass(frozen=True)
class ConcatAttrs:
    axis: int


def _pick(dims):
    """One dim out of several that must be equal: prefer an int, then a symbol."""
    for d in dims:
        if isinstance(d, int):
            return d
    for d in dims:
        if not (isinstance(d, Expr) and d.kind == "unknown"):
            return d
    return dims[0]


def _concat_infer(ctx):
    shapes = [ctx.shape(i) for i in range(ctx.n)]
    rank = len(shapes[0])
    if any(len(s) != rank for s in shapes):
        ctx.fail(f"operand ranks differ: {[len(s) for s in shapes]}")
    ax = norm_axis(ctx.attrs.axis, rank)
    out = []
    for i in range(rank):
        ds = [s[i] for s in shapes]
        if i == ax:
            out.append(prod_sum(ds))
        else:
            ints = {d for d in ds if isinstance(d, int)}
            if len(ints) > 1:
                ctx.fail(f"dim {i} differs between operands: {sorted(ints)}")
            out.append(_pick(ds))
    return [ctx.type(0).with_shape(out)]


def prod_sum(ds):
    """Sum of dims with like terms collected (N + N + N-1 -> 3*N-1)."""
    const = 0
    coefs: dict = {}
    for d in ds:
        if isinstance(d, Expr) and d.kind == "unknown":
            return UNKNOWN
        for t in (d.args if isinstance(d, Expr) and d.kind == "add" else (d,)):
            if isinstance(t, int):
                const += t
                continue
            c, rest = 1, t
            if t.kind == "mul" and isinstance(t.args[0], int):
                c = t.args[0]
                rest = t.args[1] if len(t.args) == 2 else Expr("mul", args=t.args[1:])
            coefs[rest] = coefs.get(rest, 0) + c
    n = 0
    for rest, c in coefs.items():
        if c:
            n = n + c * rest
    return n + const


register("Concat", ConcatAttrs, infer=_concat_infer, inputs=(1, -1),
         ref=lambda a, *xs: np.concatenate(xs, axis=norm_axis(a.axis, xs[0].ndim)))


# ---------------------------------------------------------------- Split

@dataclass(frozen=True)
class SplitAttrs:
    axis: int = 0
    num_outputs: Optional[int] = None


def split_sizes(d, n: int, uneven: bool):
    if isinstance(d, int):  # chunks of ceil(d/n) while data lasts: splitting 2 into 4 gives
        c = -(-d // n)       # [1, 1, 0, 0], what ONNX's reference slices out, never a negative size
        return [max(0, min(c, d - c * i)) for i in range(n)]
    if uneven:
        c = (d + (n - 1)) // n
        return [c] * (n - 1) + [d - c * (n - 1)]
    return [d // n] * n


def _split_infer(ctx):
    t = ctx.type(0)
    s = ctx.shape(0)
    ax = norm_axis(ctx.attrs.axis, len(s))
    n = ctx.num_results
    if ctx.attrs.num_outputs is not None and ctx.attrs.num_outputs != n:
        ctx.fail(f"num_outputs={ctx.attrs.num_outputs} but {n} results")
    if ctx.has(1):
        sizes = const_ints(ctx, 1)
        if sizes is None:
            sizes = [UNKNOWN] * n
        elif len(sizes) != n:
            ctx.fail(f"split has {len(sizes)} entries for {n} results")
        elif isinstance(s[ax], int) and sum(sizes) != s[ax]:
            ctx.fail(f"split {sizes} does not sum to dim {s[ax]}")
    else:
        sizes = split_sizes(s[ax], n, ctx.attrs.num_outputs is not None)
    return [t.with_shape(s[:ax] + (k,) + s[ax + 1:]) for k in sizes]


def _split_ref(a, x, split=None, *, ctx):
    ax = norm_axis(a.axis, x.ndim)
    n = a.num_outputs or len(ctx.result_types)
    sizes = int_list(split) if split is not None else split_sizes(x.shape[ax], n, True)
    idx = np.cumsum(sizes)[:-1]
    return tuple(np.split(x, idx, axis=ax))


register("Split", SplitAttrs, infer=_split_infer, ref=_split_ref, inputs=(1, 2), outputs=(1, -1),
         ref_ctx=True)


# ---------------------------------------------------------------- Slice

def slice_len(d, start: int, end: int, step: int):
    if step == 0:
        raise NncError("slice step cannot be 0")
    if isinstance(d, int):
        return len(range(*slice(start, end, step).indices(d)))
    if isinstance(d, Expr) and d.kind == "unknown":
        return UNKNOWN
    # symbolic extent: assume the bounds are inside the dim (the usual case)
    if step > 0:
        s = 0 if start <= -BIG else (start if start >= 0 else d + start)
        e = d if end >= BIG else (end if end >= 0 else d + end)
        n = e - s
        if isinstance(n, int):
            return max(0, -(-n // step))
        return n if step == 1 else (n + (step - 1)) // step
    s = d - 1 if start >= BIG else (start if start >= 0 else d + start)
    e = -1 if end <= -BIG else (end if end >= 0 else d + end)
    n = s - e
    if isinstance(n, int):
        return max(0, -(-n // -step))
    return n if step == -1 else (n + (-step - 1)) // -step


def _slice_params(rank, starts, ends, axes, steps):
    if axes is None:
        axes = list(range(len(starts)))
    if steps is None:
        steps = [1] * len(starts)
    if not (len(starts) == len(ends) == len(axes) == len(steps)):
        raise NncError("starts, ends, axes and steps differ in length")
    axes = [norm_axis(a, rank) for a in axes]
    if len(set(axes)) != len(axes):
        raise NncError(f"repeated axes {axes}")
    return list(zip(axes, starts, ends, steps))


def _slice_infer(ctx):
    t = ctx.type(0)
    s = list(ctx.shape(0))
    starts, ends = const_ints(ctx, 1), const_ints(ctx, 2)
    axes = const_ints(ctx, 3) if ctx.has(3) else None
    steps = const_ints(ctx, 4) if ctx.has(4) else None
    if starts is None or ends is None or (ctx.has(4) and steps is None):
        if ctx.has(3) and axes is None:
            return [t.with_shape((UNKNOWN,) * len(s))]
        if axes is None:
            n = vec_len(ctx, 1)
            axes = list(range(n)) if n is not None else list(range(len(s)))
        for a in axes:
            s[norm_axis(a, len(s))] = UNKNOWN
        return [t.with_shape(s)]
    if ctx.has(3) and axes is None:
        return [t.with_shape((UNKNOWN,) * len(s))]
    for ax, st, en, sp in _slice_params(len(s), starts, ends, axes, steps):
        s[ax] = slice_len(s[ax], st, en, sp)
    return [t.with_shape(s)]


def _slice_ref(a, x, starts, ends, axes=None, steps=None):
    idx = [slice(None)] * x.ndim
    for ax, st, en, sp in _slice_params(x.ndim, int_list(starts), int_list(ends),
                                        None if axes is None else int_list(axes),
                                        None if steps is None else int_list(steps)):
        if sp == 0:
            raise NncError("slice step cannot be 0")
        idx[ax] = slice(st, en, sp)
    return np.ascontiguousarray(x[tuple(idx)])


register("Slice", NoAttrs, infer=_slice_infer, ref=_slice_ref, inputs=(3, 5))


# ---------------------------------------------------------------- Expand

def _expand_infer(ctx):
    t = ctx.type(0)
    s = ctx.shape(0)
    target = const_ints(ctx, 1)
    if target is None:
        n = vec_len(ctx, 1)
        if n is None:
            return [TensorType(t.dtype, None)]
        r = max(n, len(s))
        pad = (1,) * (r - len(s)) + tuple(s)
        return [t.with_shape(d if isinstance(d, int) and d != 1 else UNKNOWN for d in pad)]
    return [t.with_shape(broadcast_shapes(tuple(s), tuple(target)))]


def _expand_ref(a, x, shape):
    out = np.broadcast_shapes(x.shape, tuple(int_list(shape)))
    return np.array(np.broadcast_to(x, out))


register("Expand", NoAttrs, infer=_expand_infer, ref=_expand_ref, inputs=2)


# ---------------------------------------------------------------- Squeeze / Unsqueeze / Flatten

def _squeeze_axes(shape, axes):
    if axes is None:
        return [i for i, d in enumerate(shape) if isinstance(d, int) and d == 1]
    ax = sorted({norm_axis(a, len(shape)) for a in axes})
    for a in ax:
        if isinstance(shape[a], int) and shape[a] != 1:
            raise NncError(f"cannot squeeze axis {a} of extent {shape[a]}")
    return ax


def _squeeze_infer(ctx):
    t = ctx.type(0)
    s = ctx.shape(0)
    axes = None
    if ctx.has(1):
        axes = const_ints(ctx, 1)
        if axes is None:
            return [TensorType(t.dtype, None)]
    drop = _squeeze_axes(s, axes)
    return [t.with_shape(d for i, d in enumerate(s) if i not in drop)]


def _squeeze_ref(a, x, axes=None):
    drop = _squeeze_axes(x.shape, None if axes is None else int_list(axes))
    return np.reshape(x, [d for i, d in enumerate(x.shape) if i not in drop])


register("Squeeze", NoAttrs, infer=_squeeze_infer, ref=_squeeze_ref, inputs=(1, 2))


def _unsqueeze_shape(shape, axes):
    r = len(shape) + len(axes)
    ax = {norm_axis(a, r) for a in axes}
    if len(ax) != len(axes):
        raise NncError(f"repeated axes {axes}")
    it = iter(shape)
    return tuple(1 if i in ax else next(it) for i in range(r))


def _unsqueeze_infer(ctx):
    t = ctx.type(0)
    axes = const_ints(ctx, 1)
    if axes is None:
        n = vec_len(ctx, 1)
        return [TensorType(t.dtype, None if n is None else (UNKNOWN,) * (len(ctx.shape(0)) + n))]
    return [t.with_shape(_unsqueeze_shape(ctx.shape(0), axes))]


register("Unsqueeze", NoAttrs, infer=_unsqueeze_infer, inputs=2,
         ref=lambda a, x, axes: np.reshape(x, _unsqueeze_shape(x.shape, int_list(axes))))


@dataclass(frozen=True)
class FlattenAttrs:
    axis: int = 1


def _flatten_shape(s, axis):
    r = len(s)
    if not -r <= axis <= r:
        raise NncError(f"axis {axis} out of range for rank {r}")
    ax = axis + r if axis < 0 else axis
    return (prod(s[:ax]), prod(s[ax:]))


register("Flatten", FlattenAttrs,
         infer=lambda ctx: [ctx.type(0).with_shape(_flatten_shape(ctx.shape(0), ctx.attrs.axis))],
         ref=lambda a, x: np.reshape(x, _flatten_shape(x.shape, a.axis)))


# ---------------------------------------------------------------- Tile

def _tile_infer(ctx):
    t = ctx.type(0)
    s = ctx.shape(0)
    reps = const_ints(ctx, 1)
    if reps is None:
        return [t.with_shape(d if d == 0 else UNKNOWN for d in s)]
    if len(reps) != len(s):
        ctx.fail(f"repeats has {len(reps)} entries for rank {len(s)}")
    return [t.with_shape(d * r for d, r in zip(s, reps))]


register("Tile", NoAttrs, infer=_tile_infer, inputs=2,
         ref=lambda a, x, reps: np.tile(x, int_list(reps)) if x.ndim else x.copy())


# ---------------------------------------------------------------- Range

def _range_ref(a, start, limit, delta):
    dt = start.dtype
    if dt.kind in "iu" or dt in (np.float32, np.float64, np.float16):
        return np.arange(start, limit, delta).astype(dt)
    return np.arange(start.astype(np.float32), limit.astype(np.float32), delta.astype(np.float32)).astype(dt)


def _range_infer(ctx):
    dt = ctx.dtype(0)
    vals = [ctx.value(i) for i in range(3)]
    if any(v is None for v in vals):
        return [TensorType(dt, (UNKNOWN,))]
    return [TensorType(dt, (range_length(ctx, *[np.asarray(v).reshape(()) for v in vals]),))]


def range_length(ctx, start, limit, delta) -> int:
    """ONNX's max(ceil((limit - start) / delta), 0), computed without building the array (a
    limit of 1e12 must give a clean size error, not a MemoryError). Integers are exact; floats
    use the operand type's arithmetic, as np.arange in the reference does."""
    if start.dtype.kind in "iu":
        s, l, d = int(start), int(limit), int(delta)
        if d == 0:
            ctx.fail("delta is 0")
        return max(-((s - l) // d), 0)
    ft = start.dtype if start.dtype in (np.float32, np.float64, np.float16) else np.dtype(np.float32)
    s, l, d = (np.asarray(x).astype(ft)[()] for x in (start, limit, delta))
    with np.errstate(all="ignore"):  # in the operand type, as np.arange does
        n = np.ceil((l - s) / d)
    if d == 0 or not np.isfinite(n):
        ctx.fail(f"start {s}, limit {l} and delta {d} do not define a finite range")
    return max(int(n), 0)


register("Range", NoAttrs, infer=_range_infer, inputs=3,
         ref=lambda a, s, l, d: _range_ref(a, s.reshape(()), l.reshape(()), d.reshape(())))


# ---------------------------------------------------------------- Shape / Size

@dataclass(frozen=True)
class ShapeAttrs:
    start: int = 0
    end: Optional[int] = None


def shape_range(rank: int, a) -> tuple:
    def clamp(v):
        v = v + rank if v < 0 else v
        return min(max(v, 0), rank)
    s = clamp(a.start)
    e = rank if a.end is None else clamp(a.end)
    return s, max(e, s)


def _shape_infer(ctx):
    s, e = shape_range(len(ctx.shape(0)), ctx.attrs)
    return [TensorType(I64, (e - s,))]


def _shape_ref(a, x):
    s, e = shape_range(x.ndim, a)
    return np.array(x.shape[s:e], np.int64)


register("Shape", ShapeAttrs, infer=_shape_infer, ref=_shape_ref)
register("Size", NoAttrs, infer=lambda ctx: [TensorType(I64, ())],
         ref=lambda a, x: np.array(x.size, np.int64))


# ---------------------------------------------------------------- ConstantOfShape

@dataclass(frozen=True)
class ConstantOfShapeAttrs:
    value: Optional[np.ndarray] = None


def _cos_dtype(a):
    return F32 if a.value is None else to_dtype(a.value.dtype)


def _cos_infer(ctx):
    dt = _cos_dtype(ctx.attrs)
    shape = const_ints(ctx, 0)
    if shape is None:
        n = vec_len(ctx, 0)
        return [TensorType(dt, None if n is None else (UNKNOWN,) * n)]
    return [TensorType(dt, tuple(shape))]


def _cos_ref(a, shape):
    v = np.zeros((), np.float32) if a.value is None else np.asarray(a.value).reshape(-1)[0]
    return np.full(tuple(int_list(shape)), v, dtype=_cos_dtype(a).np)


register("ConstantOfShape", ConstantOfShapeAttrs, infer=_cos_infer, ref=_cos_ref)


# ---------------------------------------------------------------- Pad

@dataclass(frozen=True)
class PadAttrs:
    mode: str = "constant"


def _pad_axes(rank, pads, axes):
    axes = list(range(rank)) if axes is None else [norm_axis(a, rank) for a in axes]
    if len(pads) != 2 * len(axes):
        raise NncError(f"pads has {len(pads)} entries for {len(axes)} axes")
    n = len(axes)
    return [(ax, pads[i], pads[i + n]) for i, ax in enumerate(axes)]


def _pad_infer(ctx):
    t = ctx.type(0)
    s = list(ctx.shape(0))
    if ctx.attrs.mode not in ("constant", "reflect", "edge", "wrap"):
        ctx.fail(f"unknown mode {ctx.attrs.mode!r}")
    pads = const_ints(ctx, 1)
    axes = const_ints(ctx, 3) if ctx.has(3) else None
    if pads is None or (ctx.has(3) and axes is None):
        if ctx.has(3) and axes is None:
            return [t.with_shape((UNKNOWN,) * len(s))]
        for ax in (range(len(s)) if axes is None else axes):
            s[norm_axis(ax, len(s))] = UNKNOWN
        return [t.with_shape(s)]
    for ax, b, e in _pad_axes(len(s), pads, axes):
        s[ax] = s[ax] + b + e
    return [t.with_shape(s)]


def _pad_ref(a, x, pads, value=None, axes=None):
    spec = _pad_axes(x.ndim, int_list(pads), None if axes is None else int_list(axes))
    crop = [slice(None)] * x.ndim
    width = [(0, 0)] * x.ndim
    for ax, b, e in spec:
        crop[ax] = slice(max(-b, 0), x.shape[ax] - max(-e, 0))
        width[ax] = (max(b, 0), max(e, 0))
    x = x[tuple(crop)]
    if a.mode == "constant":
        cv = x.dtype.type(0) if value is None or value.size == 0 else np.asarray(value).reshape(-1)[0]
        return np.pad(x, width, mode="constant", constant_values=cv).astype(x.dtype, copy=False)
    mode = {"reflect": "reflect", "edge": "edge", "wrap": "wrap"}[a.mode]
    return np.pad(x, width, mode=mode)


register("Pad", PadAttrs, infer=_pad_infer, ref=_pad_ref, inputs=(2, 4))


# ---------------------------------------------------------------- CenterCropPad

@dataclass(frozen=True)
class CenterCropPadAttrs:
    axes: Optional[tuple[int, ...]] = None


def _ccp_infer(ctx):
    t = ctx.type(0)
    s = list(ctx.shape(0))
    axes = list(range(len(s))) if ctx.attrs.axes is None else [norm_axis(a, len(s)) for a in ctx.attrs.axes]
    shape = const_ints(ctx, 1)
    for i, ax in enumerate(axes):
        s[ax] = UNKNOWN if shape is None else shape[i]
    return [t.with_shape(s)]


def _ccp_ref(a, x, shape):
    axes = list(range(x.ndim)) if a.axes is None else [norm_axis(v, x.ndim) for v in a.axes]
    shape = int_list(shape)
    src = [slice(None)] * x.ndim
    dst = [slice(None)] * x.ndim
    out = list(x.shape)
    for ax, sh in zip(axes, shape):
        d = x.shape[ax]
        out[ax] = sh
        if sh < d:
            b = (d - sh) // 2
            src[ax] = slice(b, b + sh)
        elif sh > d:
            b = (sh - d) // 2
            dst[ax] = slice(b, b + d)
    res = np.zeros(out, x.dtype)
    res[tuple(dst)] = x[tuple(src)]
    return res


register("CenterCropPad", CenterCropPadAttrs, infer=_ccp_infer, ref=_ccp_ref, inputs=2)


# ---------------------------------------------------------------- Trilu / EyeLike

@dataclass(frozen=True)
class TriluAttrs:
    upper: int = 1


def _trilu_ref(a, x, k=None):
    kk = 0 if k is None else int(np.asarray(k).reshape(-1)[0])
    if x.ndim < 2:
        raise NncError("Trilu needs rank >= 2")
    r, c = x.shape[-2:]
    i = np.arange(r)[:, None]
    j = np.arange(c)[None, :]
    keep = (j - i >= kk) if a.upper else (j - i <= kk)
    return np.where(keep, x, np.zeros((), x.dtype)).astype(x.dtype, copy=False)


register("Trilu", TriluAttrs, infer=same_as(0), ref=_trilu_ref, inputs=(1, 2))


@dataclass(frozen=True)
class EyeLikeAttrs:
    dtype: Optional[DType] = None
    k: int = 0


def _eyelike_infer(ctx):
    s = ctx.shape(0)
    if len(s) != 2:
        ctx.fail(f"input must be 2-D, got rank {len(s)}")
    return [TensorType(ctx.attrs.dtype or ctx.dtype(0), s)]


def _eyelike_ref(a, x):
    dt = (a.dtype.np if a.dtype is not None else x.dtype)
    return np.eye(x.shape[0], x.shape[1], k=a.k).astype(dt)


register("EyeLike", EyeLikeAttrs, infer=_eyelike_infer, ref=_eyelike_ref)


# ---------------------------------------------------------------- OneHot

@dataclass(frozen=True)
class OneHotAttrs:
    axis: int = -1


def _onehot_infer(ctx):
    s = ctx.shape(0)
    dv = ctx.value(1)
    depth = UNKNOWN if dv is None else int(np.asarray(dv).reshape(-1)[0])
    r = len(s) + 1
    ax = norm_axis(ctx.attrs.axis, r)
    return [TensorType(ctx.dtype(2), tuple(s[:ax]) + (depth,) + tuple(s[ax:]))]


def _onehot_ref(a, idx, depth, values):
    depth = int(np.asarray(depth).reshape(-1)[0])
    ax = norm_axis(a.axis, idx.ndim + 1)
    v = np.asarray(idx).astype(np.int64)  # float indices truncate, as ONNX casts them
    v = np.where(v < 0, v + depth, v)
    v = np.expand_dims(v, ax)
    rng = np.arange(depth).reshape((1,) * ax + (depth,) + (1,) * (idx.ndim - ax))
    off, on = values.reshape(-1)[0], values.reshape(-1)[1]
    return np.where(rng == v, on, off).astype(values.dtype)


register("OneHot", OneHotAttrs, infer=_onehot_infer, ref=_onehot_ref, inputs=3)
