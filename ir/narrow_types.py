"""nnc's own value conversions to and from the narrow element types (ONNX Cast semantics).

ml_dtypes stays the storage dtype (one byte an element; 4/2-bit values in the low bits), but every
value conversion here is explicit numpy arithmetic on codes, so a result never depends on the
installed ml_dtypes version (0.7 changed both its int4/int2 float conversion and its e8m0
rounding). The rules, from the ONNX Cast operator and its technical notes (float8, float4, int4,
int2):

* f8e4m3fn / f8e4m3fnuz / f8e5m2 / f8e5m2fnuz: round to nearest even. saturate=1: +-inf and
  values whose rounding exceeds the largest finite value become +-max; saturate=0: they become NaN
  (e5m2: +-inf). NaN stays NaN (sign kept where the format has one); -0 stays -0 except in the
  fnuz formats (no negative zero: -0 and negative values that round to zero give +0).
* f4e2m1: round to nearest even, always saturating to +-6 (inf too); NaN -> +6 (float4 table).
* f8e8m0 (2^(c-127), c = 255 NaN): round_mode up = the next power of two >= x, down = the one
  <= x, nearest = the nearer one, ties up. saturate=1: results above 2^127 (and +inf) give 2^127,
  below 2^-127 (and 0) give 2^-127; saturate=0: both give NaN. The spec leaves negative inputs
  unspecified: nnc uses |x| (as onnx's reference and CUDA's cvt read only the exponent).
* int4 / uint4 / int2 / uint2 from floats: round to the nearest integer, ties to even, then keep
  the low bits (two's complement), exactly, for any magnitude. NaN and +-inf (no integer to round
  to; the spec leaves them undefined) give 0. From integers: keep the low bits; from bool: 0/1.
* bf16: round to nearest even, overflow to +-inf, NaN stays (quiet) NaN.

Conversions from narrow types decode codes exactly (every value fits float32 / float64).
Each rounding is done once, on the exact value: float64 sources directly, integers beyond 2^53
through a round-to-odd step that keeps the later rounding exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .types import DType


@dataclass(frozen=True)
class MiniFloat:
    """A sign-magnitude float format: `mbits` mantissa bits, exponent `bias`, magnitude codes up to
    `max_code` finite; `inf_code`/`nan_code` magnitude codes (None: none); `fnuz`: no negative zero,
    the code with only the sign bit set is the one NaN; `width`: bits of a code (sign on top)."""
    mbits: int
    bias: int
    max_code: int
    inf_code: Optional[int]
    nan_code: Optional[int]
    fnuz: bool
    width: int
    always_saturate: bool = False  # f4e2m1: no inf / NaN, Cast saturates whatever the attribute

    @property
    def sign(self) -> int:
        return 1 << (self.width - 1)


FORMATS: dict[str, MiniFloat] = {
    "f8e4m3": MiniFloat(3, 7, 0x7E, None, 0x7F, False, 8),
    "f8e4m3fnuz": MiniFloat(3, 8, 0x7F, None, None, True, 8),
    "f8e5m2": MiniFloat(2, 15, 0x7B, 0x7C, 0x7E, False, 8),
    "f8e5m2fnuz": MiniFloat(2, 16, 0x7F, None, None, True, 8),
    "f4e2m1": MiniFloat(1, 1, 0x7, None, None, False, 4, always_saturate=True),
    "bf16": MiniFloat(7, 127, 0x7F7F, 0x7F80, 0x7FC0, False, 16),
}
_F8 = ("f8e4m3", "f8e4m3fnuz", "f8e5m2", "f8e5m2fnuz")
NARROW_INT_BITS = {"i4": 4, "u4": 4, "i2": 2, "u2": 2}
E8M0_NAN = 0xFF
E8M0_ROUND_MODES = ("up", "down", "nearest")


# ---------------------------------------------------------------- exact float64 views of sources

def exact_float64(x: np.ndarray) -> np.ndarray:
    """x (any numeric or narrow dtype) as float64 holding either its exact value or, for integers
    beyond 2^53, a round-to-odd value that rounds to every narrower format exactly like x."""
    x = np.asarray(x)
    if x.dtype.name in FROM_CODES:
        return decode(x)
    if x.dtype.kind == "b":
        return x.astype(np.float64)
    if x.dtype.kind in "iu" and x.dtype.itemsize == 8:
        return _int64_round_to_odd(x)
    return x.astype(np.float64)


def _int64_round_to_odd(x: np.ndarray) -> np.ndarray:
    neg = x < 0 if x.dtype.kind == "i" else np.zeros(x.shape, bool)
    mag = np.where(neg, (~x.astype(np.uint64)) + np.uint64(1), x.astype(np.uint64))  # |x|, no overflow
    big = mag >= np.uint64(1 << 53)
    if not big.any():
        return np.where(neg, -mag.astype(np.float64), mag.astype(np.float64))
    bl = np.zeros(mag.shape, np.int64)  # bit length of the big magnitudes
    for b in range(54, 65):
        bl = np.where(mag >= np.uint64(1 << (b - 1)), b, bl)
    shift = np.where(big, bl - 53, 0).astype(np.uint64)
    kept = mag >> shift
    lost = (mag & ((np.uint64(1) << shift) - np.uint64(1))) != 0
    kept = kept | lost.astype(np.uint64)  # sticky bit: the value rounds like the exact one
    v = np.ldexp(kept.astype(np.float64), shift.astype(np.int32))
    return np.where(neg, -v, v)


# ---------------------------------------------------------------- minifloats (f8, f4, bf16)

def _round_codes(a: np.ndarray, f: MiniFloat) -> np.ndarray:
    """Magnitude codes of finite a >= 0 rounded to nearest even; may exceed f.max_code (overflow).
    code = ((k - emin) << M) + n with k = max(floor(log2 a), emin), n = rint(a / 2^(k-M)): one
    formula for subnormals (k = emin, n < 2^M) and normals, the mantissa carry included."""
    emin = 1 - f.bias
    _, e = np.frexp(a)  # a = m * 2^e, 0.5 <= m < 1, so floor(log2 a) = e - 1
    k = np.where(a == 0, emin, np.maximum(e.astype(np.int64) - 1, emin))
    n = np.rint(np.ldexp(a, (f.mbits - k).astype(np.int32)))  # exact scaling, then RNE; n <= 2^(M+1)
    return ((k - emin) << f.mbits) + n.astype(np.int64)


def encode_minifloat(x: np.ndarray, short: str, saturate: bool = True) -> np.ndarray:
    """Codes (uint8 / uint16) of ONNX Cast of x to the format `short` (see the module docstring)."""
    f = FORMATS[short]
    v = exact_float64(x)
    neg = np.signbit(v)
    a = np.abs(v)
    nan = np.isnan(v)
    inf = np.isinf(v)
    fin = ~(nan | inf)
    with np.errstate(all="ignore"):
        code = _round_codes(np.where(fin, a, 0.0), f)
    sat = saturate or f.always_saturate
    over = fin & (code > f.max_code)
    if sat:
        mag = np.where(over | inf, f.max_code, code)
    else:
        ovf = f.inf_code if f.inf_code is not None else (f.nan_code if f.nan_code is not None else -1)
        mag = np.where(over | inf, ovf, code)
    sign = np.where(neg, f.sign, 0)
    out = sign | mag
    if f.fnuz:
        out = np.where(mag == 0, 0, out)  # no negative zero
        out = np.where(mag == -1, f.sign, out)  # overflow without saturation: the NaN code
        out = np.where(nan, f.sign, out)
    elif f.nan_code is not None:
        out = np.where(nan, sign | f.nan_code, out)
    else:  # f4e2m1: NaN -> +max (the float4 Cast table)
        out = np.where(nan, f.max_code, out)
    return out.astype(np.uint16 if f.width == 16 else np.uint8)


def decode_minifloat(codes: np.ndarray, short: str) -> np.ndarray:
    """float64 values of codes in the format `short` (exact)."""
    f = FORMATS[short]
    c = np.asarray(codes).astype(np.int64)
    neg = (c & f.sign) != 0
    m = c & (f.sign - 1)
    e = m >> f.mbits
    frac = m & ((1 << f.mbits) - 1)
    val = np.where(e == 0, np.ldexp(frac.astype(np.float64), 1 - f.bias - f.mbits),
                   np.ldexp((frac + (1 << f.mbits)).astype(np.float64), (e - f.bias - f.mbits).astype(np.int32)))
    val = np.where(neg, -val, val)
    if f.inf_code is not None:
        val = np.where(m == f.inf_code, np.where(neg, -np.inf, np.inf), val)
        val = np.where(m > f.inf_code, np.nan, val)
    elif f.nan_code is not None:
        val = np.where(m == f.nan_code, np.nan, val)
    if f.fnuz:
        val = np.where(c == f.sign, np.nan, val)
    return val


# ---------------------------------------------------------------- f8e8m0

def encode_e8m0(x: np.ndarray, saturate: bool = True, round_mode: str = "up") -> np.ndarray:
    """uint8 codes of ONNX Cast of x to float8e8m0 (see the module docstring)."""
    if round_mode not in E8M0_ROUND_MODES:
        raise ValueError(f"round_mode must be one of {', '.join(E8M0_ROUND_MODES)}, got {round_mode!r}")
    v = exact_float64(x)
    a = np.abs(v)
    nan, inf = np.isnan(a), np.isinf(a)
    ok = ~(nan | inf) & (a > 0)
    safe = np.where(ok, a, 1.0)
    m, e = np.frexp(safe)  # safe = m * 2^e: 2^(e-1) <= safe < 2^e, so p = e - 1 is floor(log2)
    p = e.astype(np.int64) - 1
    exact = m == 0.5
    if round_mode == "up":
        p = np.where(exact, p, p + 1)
    elif round_mode == "nearest":
        p = np.where(m >= 0.75, p + 1, p)  # x >= 1.5 * 2^p: 2^(p+1) is nearer (ties up)
    hi, lo = p > 127, p < -127
    code = np.clip(p + 127, 0, 254)
    if saturate:
        code = np.where(inf, 254, np.where(ok, code, 0))  # 0 and tiny -> 2^-127, inf -> 2^127
    else:
        code = np.where(~ok | hi | lo, E8M0_NAN, code)
    return np.where(nan, E8M0_NAN, code).astype(np.uint8)


def decode_e8m0(codes: np.ndarray) -> np.ndarray:
    c = np.asarray(codes).astype(np.int64)
    return np.where(c == E8M0_NAN, np.nan, np.ldexp(1.0, (c - 127).astype(np.int32)))


# ---------------------------------------------------------------- narrow integers

def encode_narrow_int(x: np.ndarray, short: str) -> np.ndarray:
    """uint8 codes (low bits) of ONNX Cast of x to int4 / uint4 / int2 / uint2."""
    bits = NARROW_INT_BITS[short]
    mask = (1 << bits) - 1
    x = np.asarray(x)
    if x.dtype.name in FROM_CODES:
        x = FROM_CODES[x.dtype.name](x)
    if x.dtype.kind in "iub":
        return (x.astype(np.int64) & mask).astype(np.uint8) if x.dtype != np.uint64 \
            else (x & np.uint64(mask)).astype(np.uint8)
    v = np.rint(x.astype(np.float64) if x.dtype.kind != "c" else x.real.astype(np.float64))
    # |v| >= 2^62 is a multiple of 2^10 in float64: its low bits are 0, like NaN / inf's chosen 0
    small = np.isfinite(v) & (np.abs(v) < 2.0 ** 62)
    return (np.where(small, v, 0).astype(np.int64) & mask).astype(np.uint8)


def decode_narrow_int(codes: np.ndarray, short: str) -> np.ndarray:
    """int64 values of narrow-int codes (signed ones sign-extended)."""
    bits = NARROW_INT_BITS[short]
    c = np.asarray(codes).view(np.uint8).astype(np.int64) & ((1 << bits) - 1)
    if short.startswith("i"):
        c = np.where(c >= 1 << (bits - 1), c - (1 << bits), c)
    return c


# ---------------------------------------------------------------- dispatch

_BY_NP_NAME = {"float8_e4m3fn": "f8e4m3", "float8_e4m3fnuz": "f8e4m3fnuz", "float8_e5m2": "f8e5m2",
               "float8_e5m2fnuz": "f8e5m2fnuz", "float4_e2m1fn": "f4e2m1", "bfloat16": "bf16",
               "float8_e8m0fnu": "f8e8m0", "int4": "i4", "uint4": "u4", "int2": "i2", "uint2": "u2"}


def _decoder(short: str):
    if short == "f8e8m0":
        return lambda a: decode_e8m0(a.view(np.uint8))
    if short in NARROW_INT_BITS:
        return lambda a: decode_narrow_int(a, short)
    f = FORMATS[short]
    return lambda a: decode_minifloat(a.view(np.uint16 if f.width == 16 else np.uint8), short)


FROM_CODES = {npn: _decoder(s) for npn, s in _BY_NP_NAME.items()}


def _contiguous(x: np.ndarray) -> np.ndarray:
    """x in C order, keeping its shape (np.ascontiguousarray turns a 0-d array into 1-d)."""
    return x if x.flags.c_contiguous else x.copy(order="C")


def decode(x: np.ndarray) -> np.ndarray:
    """A narrow-typed array's exact values (float64, or int64 for the narrow ints)."""
    return FROM_CODES[x.dtype.name](_contiguous(x))


def is_narrow(dt: DType) -> bool:
    return dt.short in FORMATS or dt.short == "f8e8m0" or dt.short in NARROW_INT_BITS


def cast_to_narrow(x: np.ndarray, to: DType, saturate: bool = True, round_mode: str = "up") -> np.ndarray:
    """ONNX Cast of x to the narrow type `to`, as an array of to's ml_dtypes storage dtype."""
    with np.errstate(all="ignore"):  # NaN / inf inputs are handled explicitly, not warned about
        if to.short == "f8e8m0":
            codes = encode_e8m0(x, saturate, round_mode)
        elif to.short in NARROW_INT_BITS:
            codes = encode_narrow_int(x, to.short)
        else:  # saturate only applies to the float8 types (bf16 overflows to inf, f4 always saturates)
            codes = encode_minifloat(x, to.short, saturate if to.short in _F8 else False)
    return _contiguous(np.asarray(codes)).view(to.np)
