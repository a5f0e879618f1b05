"""Elementwise binary and variadic ops: arithmetic, comparisons, logic, bitwise, Max/Min/Sum/Mean,
Where. All broadcast numpy-style; comparisons and logic give bool, the rest operand 0's dtype
(Where: operand 1's). Narrow floats are computed in f32 and rounded back.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..registry import NoAttrs, register
from ..types import BOOL, TensorType
from ._util import broadcast_shapes
from .elementwise import wide


def _binary_infer(kinds=("float", "int", "uint"), result=None, same=True):
    """Inference: broadcast of all operands; operand dtypes equal (if same) and of these kinds."""
    def infer(ctx):
        dt = ctx.dtype(0)
        if dt.kind not in kinds:
            ctx.fail(f"unsupported element type {dt}")
        if same:
            for i in range(1, ctx.n):
                if ctx.has(i) and ctx.dtype(i) != dt:
                    ctx.fail(f"operand {i} has dtype {ctx.dtype(i)}, operand 0 has {dt}")
        shapes = [ctx.shape(i) for i in range(ctx.n) if ctx.has(i)]
        return [TensorType(result or dt, broadcast_shapes(*shapes))]
    return infer


NUM = ("float", "int", "uint")
INTS = ("int", "uint")
ALL = ("float", "int", "uint", "bool")


def _arith(fn):
    def ref(a, x, y):
        return np.asarray(fn(wide(x), wide(y))).astype(x.dtype, copy=False)
    return ref


register("Add", NoAttrs, infer=_binary_infer(NUM), ref=_arith(np.add), inputs=2)
register("Sub", NoAttrs, infer=_binary_infer(NUM), ref=_arith(np.subtract), inputs=2)
register("Mul", NoAttrs, infer=_binary_infer(NUM), ref=_arith(np.multiply), inputs=2)


def _div(x, y):
    if x.dtype.kind in "iu":  # C-style: truncates toward zero; x/0 gives 0 rather than trapping
        with np.errstate(all="ignore"):
            q = np.floor_divide(x, y)
            r = np.remainder(x, y)
        if x.dtype.kind == "i":
            q = q + ((r != 0) & ((x < 0) ^ (y < 0))).astype(q.dtype)
        return q
    return np.divide(x, y)


register("Div", NoAttrs, infer=_binary_infer(NUM), ref=_arith(_div), inputs=2)


def _pow_ref(a, x, y):
    if x.dtype.kind in "iu":
        if y.dtype.kind in "iu" and not (np.asarray(y) < 0).any():
            r = np.power(x.astype(np.int64), y.astype(np.int64))
        else:
            r = np.power(x.astype(np.float64), y.astype(np.float64))
        return np.asarray(r).astype(x.dtype)
    xw = wide(x)
    return np.asarray(np.power(xw, y.astype(xw.dtype))).astype(x.dtype, copy=False)


register("Pow", NoAttrs, infer=_binary_infer(NUM, same=False), ref=_pow_ref, inputs=2)


@dataclass(frozen=True)
class ModAttrs:
    fmod: int = 0


def _mod_ref(a: ModAttrs, x, y):
    xw, yw = wide(x), wide(y)
    with np.errstate(all="ignore"):
        r = np.fmod(xw, yw) if a.fmod else np.mod(xw, yw)
    return np.asarray(r).astype(x.dtype, copy=False)


def _mod_infer(ctx):  # fmod=0 on floats: Python-style mod (sign of the divisor), as onnx's tests
    return _binary_infer(NUM)(ctx)


register("Mod", ModAttrs, infer=_mod_infer, ref=_mod_ref, inputs=2)


@dataclass(frozen=True)
class BitShiftAttrs:
    direction: str


def _bitshift_ref(a: BitShiftAttrs, x, y):
    """Right shifts of signed ints are arithmetic; a shift < 0 or >= the width leaves only the
    sign fill (-1 for a right shift of a negative x, else 0)."""
    x, y = np.broadcast_arrays(x, y)
    bits = x.dtype.itemsize * 8
    yi = y.astype(np.int64)
    bad = (yi < 0) | (yi >= bits)
    ys = np.where(bad, 0, yi)
    ux = x.view(np.dtype(f"u{x.dtype.itemsize}"))
    if a.direction == "LEFT":
        r = np.left_shift(ux, ys.astype(ux.dtype)).view(x.dtype)
        fill = np.zeros_like(x)
    else:
        r = np.right_shift(x, ys.astype(x.dtype))
        fill = np.where(x < 0, -1, 0).astype(x.dtype) if x.dtype.kind == "i" else np.zeros_like(x)
    return np.where(bad, fill, r).astype(x.dtype, copy=False)


def _bitshift_infer(ctx):
    if ctx.attrs.direction not in ("LEFT", "RIGHT"):
        ctx.fail(f"direction must be LEFT or RIGHT, got {ctx.attrs.direction!r}")
    return _binary_infer(INTS)(ctx)


register("BitShift", BitShiftAttrs, infer=_bitshift_infer, ref=_bitshift_ref, inputs=2)


def _logic(fn, kinds):
    return dict(infer=_binary_infer(kinds), ref=lambda a, x, y: np.asarray(fn(x, y)).astype(x.dtype, copy=False),
                inputs=2)


register("And", NoAttrs, **_logic(np.logical_and, ("bool",)))
register("Or", NoAttrs, **_logic(np.logical_or, ("bool",)))
register("Xor", NoAttrs, **_logic(np.logical_xor, ("bool",)))
register("BitwiseAnd", NoAttrs, **_logic(np.bitwise_and, INTS))
register("BitwiseOr", NoAttrs, **_logic(np.bitwise_or, INTS))
register("BitwiseXor", NoAttrs, **_logic(np.bitwise_xor, INTS))


def _cmp(fn, kinds=NUM):
    return dict(infer=_binary_infer(kinds, result=BOOL),
                ref=lambda a, x, y: np.asarray(fn(wide(x), wide(y)), dtype=np.bool_), inputs=2)


register("Equal", NoAttrs, **_cmp(np.equal, ALL))
register("Less", NoAttrs, **_cmp(np.less))
register("LessOrEqual", NoAttrs, **_cmp(np.less_equal))
register("Greater", NoAttrs, **_cmp(np.greater))
register("GreaterOrEqual", NoAttrs, **_cmp(np.greater_equal))


# ---------------------------------------------------------------- variadic

def _variadic(fn, mean=False):
    def ref(a, *xs):
        dt = xs[0].dtype
        acc = functools.reduce(fn, [wide(x) for x in xs])
        if mean:
            acc = acc / acc.dtype.type(len(xs))
        return np.asarray(acc).astype(dt, copy=False)
    return ref


register("Max", NoAttrs, infer=_binary_infer(NUM), ref=_variadic(np.maximum), inputs=(1, -1))
register("Min", NoAttrs, infer=_binary_infer(NUM), ref=_variadic(np.minimum), inputs=(1, -1))
register("Sum", NoAttrs, infer=_binary_infer(NUM), ref=_variadic(np.add), inputs=(1, -1))
register("Mean", NoAttrs, infer=_binary_infer(("float",)), ref=_variadic(np.add, mean=True), inputs=(1, -1))


def _where_infer(ctx):
    if ctx.dtype(0) != BOOL:
        ctx.fail(f"condition must be bool, got {ctx.dtype(0)}")
    if ctx.dtype(1) != ctx.dtype(2):
        ctx.fail(f"X and Y differ in dtype: {ctx.dtype(1)} vs {ctx.dtype(2)}")
    return [TensorType(ctx.dtype(1), broadcast_shapes(ctx.shape(0), ctx.shape(1), ctx.shape(2)))]


register("Where", NoAttrs, infer=_where_infer, ref=lambda a, c, x, y: np.where(c, x, y).astype(x.dtype, copy=False),
         inputs=3)
