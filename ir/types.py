"""Element types and tensor types.

A `TensorType` is a dtype, a shape whose dims are ints or symbolic `Expr`s (None = unknown rank),
and an optional layout tag (e.g. "nhwc") that layout passes set and codegen reads (ir/layout.py: the
shape is the physical one, the tag names the logical tensor; equality compares it, inference and
`types_compatible` ignore it). Printed form:
`f32[N,3,224,224]`, `i64[]` (scalar), `f16[1,56,56,64]#nhwc`, `f32[*]` (unknown rank).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import ml_dtypes
import numpy as np

from .symbolic import UNKNOWN, Dim, fmt


@dataclass(frozen=True)
class DType:
    short: str  # IR spelling: f32
    np_name: str  # numpy spelling, the plan.json contract: float32
    bits: int
    onnx: int  # onnx.TensorProto enum value
    kind: str  # "float" | "int" | "uint" | "bool" | "complex"

    @property
    def np(self) -> np.dtype:
        return np.dtype(_NUMPY[self.short])

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    @property
    def is_int(self) -> bool:
        return self.kind in ("int", "uint")

    def __str__(self) -> str:
        return self.short


_TABLE = [
    # short, numpy name, bits, onnx enum, kind
    ("f64", "float64", 64, 11, "float"),
    ("f32", "float32", 32, 1, "float"),
    ("f16", "float16", 16, 10, "float"),
    ("bf16", "bfloat16", 16, 16, "float"),
    ("f8e4m3", "float8_e4m3fn", 8, 17, "float"),
    ("f8e4m3fnuz", "float8_e4m3fnuz", 8, 18, "float"),
    ("f8e5m2", "float8_e5m2", 8, 19, "float"),
    ("f8e5m2fnuz", "float8_e5m2fnuz", 8, 20, "float"),
    ("f4e2m1", "float4_e2m1fn", 4, 23, "float"),
    ("f8e8m0", "float8_e8m0fnu", 8, 24, "float"),
    ("i64", "int64", 64, 7, "int"),
    ("i32", "int32", 32, 6, "int"),
    ("i16", "int16", 16, 5, "int"),
    ("i8", "int8", 8, 3, "int"),
    ("i4", "int4", 4, 22, "int"),
    ("i2", "int2", 2, 26, "int"),
    ("u64", "uint64", 64, 13, "uint"),
    ("u32", "uint32", 32, 12, "uint"),
    ("u16", "uint16", 16, 4, "uint"),
    ("u8", "uint8", 8, 2, "uint"),
    ("u4", "uint4", 4, 21, "uint"),
    ("u2", "uint2", 2, 25, "uint"),
    ("bool", "bool", 8, 9, "bool"),
    ("c64", "complex64", 64, 14, "complex"),
    ("c128", "complex128", 128, 15, "complex"),
]
_NUMPY = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz, "float4_e2m1fn": ml_dtypes.float4_e2m1fn,
    "float8_e8m0fnu": ml_dtypes.float8_e8m0fnu, "int2": ml_dtypes.int2, "uint2": ml_dtypes.uint2,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "int4": ml_dtypes.int4,
    "uint64": np.uint64, "uint32": np.uint32, "uint16": np.uint16, "uint8": np.uint8,
    "uint4": ml_dtypes.uint4, "bool": np.bool_, "complex64": np.complex64, "complex128": np.complex128,
}
_NUMPY = {short: _NUMPY[npn] for short, npn, *_ in _TABLE}

DTYPES: dict[str, DType] = {row[0]: DType(*row) for row in _TABLE}
_BY_NP = {DTYPES[s].np: DTYPES[s] for s in DTYPES}
_BY_ONNX = {d.onnx: d for d in DTYPES.values()}
_BY_NP_NAME = {d.np_name: d for d in DTYPES.values()}

F64, F32, F16, BF16 = DTYPES["f64"], DTYPES["f32"], DTYPES["f16"], DTYPES["bf16"]
I64, I32, I8, U8, BOOL = DTYPES["i64"], DTYPES["i32"], DTYPES["i8"], DTYPES["u8"], DTYPES["bool"]


def dtype(x) -> DType:
    """DType from an IR name ('f32'), a numpy name ('float32'), a numpy dtype or an ONNX enum."""
    if isinstance(x, DType):
        return x
    if isinstance(x, int):
        if x in _BY_ONNX:
            return _BY_ONNX[x]
        raise ValueError(f"unsupported ONNX element type {x}")
    if isinstance(x, str):
        if x in DTYPES:
            return DTYPES[x]
        if x in _BY_NP_NAME:
            return _BY_NP_NAME[x]
        raise ValueError(f"unknown dtype {x!r}")
    d = np.dtype(x)
    if d in _BY_NP:
        return _BY_NP[d]
    raise ValueError(f"unsupported numpy dtype {d}")


Shape = Optional[tuple]  # tuple of Dim, or None for unknown rank


@dataclass(frozen=True)
class TensorType:
    dtype: DType
    shape: Shape
    layout: Optional[str] = None

    @property
    def rank(self) -> Optional[int]:
        return None if self.shape is None else len(self.shape)

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    @property
    def numel(self) -> Dim:
        if self.shape is None:
            return UNKNOWN
        n: Dim = 1
        for d in self.shape:
            n = n * d
        return n

    def with_shape(self, shape) -> "TensorType":
        """Same dtype, new shape, no layout tag: inference gives physical shapes only; a layout pass
        sets the tag of what it lays out (ir/layout.py), and the verifier checks where tags go."""
        return TensorType(self.dtype, None if shape is None else tuple(shape))

    def with_dtype(self, dt) -> "TensorType":
        return TensorType(dtype(dt), self.shape, self.layout)

    def __str__(self) -> str:
        dims = "*" if self.shape is None else ",".join(fmt(d) for d in self.shape)
        lay = f"#{self.layout}" if self.layout else ""
        return f"{self.dtype.short}[{dims}]{lay}"


def tensor(dt, shape) -> TensorType:
    return TensorType(dtype(dt), None if shape is None else tuple(shape))


def type_of_array(a: np.ndarray) -> TensorType:
    return TensorType(dtype(a.dtype), tuple(int(d) for d in a.shape))


def dims_compatible(a: Dim, b: Dim) -> bool:
    """Two dims can describe the same runtime extent. Strict on ints; a symbolic expression may
    equal a different-looking one at run time, so symbols are accepted."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return True


def types_compatible(declared: TensorType, inferred: TensorType) -> bool:
    if declared.dtype != inferred.dtype:
        return False
    if declared.shape is None or inferred.shape is None:
        return True
    if len(declared.shape) != len(inferred.shape):
        return False
    return all(dims_compatible(a, b) for a, b in zip(declared.shape, inferred.shape))
