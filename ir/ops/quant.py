"""Type conversion and linear quantization: Cast, CastLike, BitCast, QuantizeLinear,
DequantizeLinear, DynamicQuantizeLinear (ONNX semantics, newest opset).

Quantization granularity follows the scale's shape: a scalar (or one element) is per tensor, a
1-D scale of length D[axis] is per axis, a scale of the input's rank is blocked along `axis` with
`block_size` elements a block (the last block may be short). Narrow types (int4, uint4, f8*, f4)
are ml_dtypes dtypes, one value a byte.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .. import narrow_types
from ..errors import NncError
from ..narrow_types import is_narrow
from ..registry import NoAttrs, register
from ..types import DType, TensorType, U8, dtype
from ._util import norm_axis

_F8 = {"f8e4m3", "f8e4m3fnuz", "f8e5m2", "f8e5m2fnuz"}
_INT_RANGE = {"u8": (0, 255), "i8": (-128, 127), "u16": (0, 65535), "i16": (-32768, 32767),
              "u4": (0, 15), "i4": (-8, 7), "u2": (0, 3), "i2": (-2, 1), "i32": (-2**31, 2**31 - 1)}


_EXOTIC_INT = ("int4", "uint4", "int2", "uint2")  # ml_dtypes names of the narrow ints


def _plain(x: np.ndarray) -> np.ndarray:
    """x as a numpy-native dtype: narrow types decoded exactly (nnc.ir.narrow_types) to int64 /
    float64, never through ml_dtypes' own conversions."""
    if x.dtype.name in narrow_types.FROM_CODES:
        return narrow_types.decode(x)
    return x


def cast_array(x: np.ndarray, to: DType, saturate: bool = True, round_mode: str = "up") -> np.ndarray:
    """ONNX Cast of an array to `to`. Narrow targets (f8*, f4e2m1, f8e8m0, bf16, int4/uint4/int2/
    uint2) follow the rules in nnc.ir.narrow_types; bool = nonzero; other targets numpy's
    conversion (float -> int truncates, ints wrap, float overflow -> inf)."""
    x = np.asarray(x)
    if x.dtype == to.np:
        return x
    if is_narrow(to):
        return narrow_types.cast_to_narrow(x, to, saturate, round_mode)
    x = _plain(x)
    if to.kind == "bool":
        return x != 0
    with np.errstate(all="ignore"):
        return x.astype(to.np)


# ---------------------------------------------------------------- Cast / CastLike / BitCast

@dataclass(frozen=True)
class CastAttrs:
    to: DType
    saturate: int = 1
    round_mode: str = "up"  # only for f8e8m0: up | down | nearest


def _check_round_mode(ctx):
    if ctx.attrs.round_mode not in narrow_types.E8M0_ROUND_MODES:
        ctx.fail(f"round_mode must be one of {', '.join(narrow_types.E8M0_ROUND_MODES)}, "
                 f"got {ctx.attrs.round_mode!r}")


def _cast_infer(ctx):
    _check_round_mode(ctx)
    return [TensorType(ctx.attrs.to, ctx.shape(0))]


register("Cast", CastAttrs, inputs=1, infer=_cast_infer,
         ref=lambda a, x: cast_array(x, a.to, bool(a.saturate), a.round_mode))


@dataclass(frozen=True)
class CastLikeAttrs:
    saturate: int = 1
    round_mode: str = "up"


def _castlike_infer(ctx):
    _check_round_mode(ctx)
    return [TensorType(ctx.dtype(1), ctx.shape(0))]


register("CastLike", CastLikeAttrs, inputs=2, infer=_castlike_infer,
         ref=lambda a, x, like: cast_array(x, dtype(like.dtype), bool(a.saturate), a.round_mode))


@dataclass(frozen=True)
class BitCastAttrs:
    to: DType


def _bitcast_infer(ctx):
    src, to = ctx.dtype(0), ctx.attrs.to
    if src.bits != to.bits:
        ctx.fail(f"BitCast needs equal bit widths: {src} is {src.bits} bits, {to} is {to.bits}")
    return [TensorType(to, ctx.shape(0))]


register("BitCast", BitCastAttrs, inputs=1, infer=_bitcast_infer,
         ref=lambda a, x: (x if x.flags.c_contiguous else x.copy()).view(a.to.np))


# ---------------------------------------------------------------- quantization

def expand_param(v: np.ndarray, shape: tuple, axis: int, block_size: int) -> np.ndarray:
    """A scale / zero point broadcastable against an input of `shape` (per tensor, axis, block)."""
    v = np.asarray(v)
    if v.ndim == 0 or (v.size == 1 and not block_size):
        return v.reshape(())
    rank = len(shape)
    if not block_size:
        if v.ndim != 1:
            raise NncError(f"per-axis scale must be 1-D, got shape {list(v.shape)}")
        dims = [1] * rank
        dims[axis] = v.size
        return v.reshape(dims)
    r = np.repeat(v, block_size, axis=axis)
    return r.take(np.arange(shape[axis]), axis=axis)


def _check_param(ctx, i: int, xshape: tuple, axis: int, block_size: int, what: str):
    s = ctx.shape(i)
    if len(s) == 0 or (len(s) == 1 and s[0] == 1 and not block_size):
        return
    rank = len(xshape)
    if not block_size:
        if len(s) != 1:
            ctx.fail(f"{what} must be a scalar or 1-D (per axis) without block_size, got {ctx.type(i)}")
        ax = norm_axis(axis, rank)
        if isinstance(s[0], int) and isinstance(xshape[ax], int) and s[0] != xshape[ax]:
            ctx.fail(f"{what} has {s[0]} elements, input dim {ax} is {xshape[ax]}")
        return
    if len(s) != rank:
        ctx.fail(f"blocked {what} must have the input's rank {rank}, got {ctx.type(i)}")
    ax = norm_axis(axis, rank)
    for d, (a, b) in enumerate(zip(s, xshape)):
        want = (b + block_size - 1) // block_size if d == ax else b
        if isinstance(a, int) and isinstance(want, int) and a != want:
            ctx.fail(f"blocked {what} dim {d} is {a}, expected {want}")


@dataclass(frozen=True)
class QuantizeAttrs:
    axis: int = 1
    saturate: int = 1
    block_size: int = 0
    output_dtype: Optional[DType] = None
    precision: Optional[DType] = None


def _q_out_dtype(ctx) -> DType:
    a = ctx.attrs
    if ctx.has(2):
        dt = ctx.dtype(2)
        if a.output_dtype is not None and a.output_dtype != dt:
            ctx.fail(f"output_dtype {a.output_dtype} differs from the zero point's {dt}")
        return dt
    return a.output_dtype or U8


def _quantize_infer(ctx):
    a = ctx.attrs
    out = _q_out_dtype(ctx)
    if out.short not in _INT_RANGE and out.short not in _F8 and out.short != "f4e2m1":
        ctx.fail(f"{out} is not a quantized type")
    xs = ctx.shape(0)
    if a.block_size < 0:
        ctx.fail("block_size must be >= 0")
    for i, w in ((1, "y_scale"), (2, "y_zero_point")):
        if ctx.has(i):
            _check_param(ctx, i, xs, a.axis, a.block_size, w)
    return [TensorType(out, xs)]


def quantize(x, scale, zp, out: DType, axis=1, block_size=0, saturate=True, precision=None):
    x = np.asarray(x)
    s = np.asarray(scale)
    ax = norm_axis(axis, x.ndim) if s.size > 1 or block_size else 0
    s = expand_param(s, x.shape, ax, block_size)
    if precision is not None:
        pd = precision.np  # the division's precision, also for narrow floats (bf16, f16)
        v = (x.astype(pd) / s.astype(pd)).astype(np.float32 if pd != np.float64 else np.float64)
    else:
        cd = np.result_type(np.float32, *(d for d in (x.dtype, s.dtype) if d in (np.float32, np.float64)))
        v = x.astype(cd) / s.astype(cd)
    z = None if zp is None else expand_param(zp, x.shape, ax, block_size)
    if out.short in _INT_RANGE:
        lo, hi = _INT_RANGE[out.short]
        q = np.rint(v.astype(np.float64))
        if z is not None:
            q = q + z.astype(np.float64)
        with np.errstate(invalid="ignore"):
            return np.clip(q, lo, hi).astype(out.np)
    if z is not None:
        v = v + z.astype(np.float32).astype(v.dtype)
    return cast_array(v.astype(v.dtype), out, saturate)


register("QuantizeLinear", QuantizeAttrs, inputs=(2, 3), infer=_quantize_infer,
         ref=lambda a, x, s, z=None: quantize(x, s, z, _q_dtype_of(a, z), a.axis, a.block_size,
                                               bool(a.saturate), a.precision))


def _q_dtype_of(a: QuantizeAttrs, z) -> DType:
    if z is not None:
        return dtype(z.dtype)
    return a.output_dtype or U8


@dataclass(frozen=True)
class DequantizeAttrs:
    axis: int = 1
    block_size: int = 0
    output_dtype: Optional[DType] = None


def _dequantize_infer(ctx):
    a = ctx.attrs
    xs = ctx.shape(0)
    if ctx.has(2) and ctx.dtype(2) != ctx.dtype(0):
        ctx.fail(f"zero point dtype {ctx.dtype(2)} differs from the input's {ctx.dtype(0)}")
    for i, w in ((1, "x_scale"), (2, "x_zero_point")):
        if ctx.has(i):
            _check_param(ctx, i, xs, a.axis, a.block_size, w)
    return [TensorType(a.output_dtype or ctx.dtype(1), xs)]


def dequantize(x, scale, zp, out: np.dtype, axis=1, block_size=0):
    x = np.asarray(x)
    s = np.asarray(scale)
    ax = norm_axis(axis, x.ndim) if s.size > 1 or block_size else 0
    s = expand_param(s, x.shape, ax, block_size)
    cd = np.float64 if np.float64 in (s.dtype, np.dtype(out)) or x.dtype == np.int32 else np.float32
    if x.dtype.kind in "iu" or x.dtype.name in _EXOTIC_INT:
        xi = x.astype(np.int64)
        if zp is not None:
            xi = xi - expand_param(zp, x.shape, ax, block_size).astype(np.int64)
        dx = xi.astype(cd)
    else:
        dx = x.astype(np.float32).astype(cd)
        if zp is not None:
            dx = dx - expand_param(zp, x.shape, ax, block_size).astype(np.float32).astype(cd)
    return (dx * s.astype(cd)).astype(out)


register("DequantizeLinear", DequantizeAttrs, inputs=(2, 3), infer=_dequantize_infer,
         ref=lambda a, x, s, z=None: dequantize(x, s, z, (a.output_dtype.np if a.output_dtype else s.dtype),
                                                 a.axis, a.block_size))


def _dql_infer(ctx):
    t = ctx.type(0)
    if not t.dtype.is_float:
        ctx.fail(f"input must be float, got {t.dtype}")
    return [TensorType(U8, t.shape), TensorType(t.dtype, ()), TensorType(U8, ())][:ctx.num_results]


def _dql_ref(a, x):
    xf = x.astype(np.float32)
    qmin, qmax = 0.0, 255.0
    maxx = np.float32(max(0.0, float(xf.max()) if xf.size else 0.0))
    minx = np.float32(min(0.0, float(xf.min()) if xf.size else 0.0))
    scale = np.float32(1.0 if maxx == minx else (maxx - minx)) / np.float32(qmax - qmin)
    zp = np.rint(np.clip(np.float32(qmin) - minx / scale, qmin, qmax))
    y = np.clip(np.rint(xf / scale) + zp, qmin, qmax).astype(np.uint8)
    return y, np.asarray(scale).astype(x.dtype), np.asarray(zp).astype(np.uint8)


register("DynamicQuantizeLinear", NoAttrs,
         inputs=1, outputs=(1, 3), infer=_dql_infer, ref=_dql_ref)
