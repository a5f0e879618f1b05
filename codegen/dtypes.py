"""The one dtype table of the CUDA backend, keyed by ir/types.py's DTypes.

For every IR dtype: the C type of an element in device memory, the C type arithmetic happens in,
the 2-vector C type the GEMM/conv kernels store through, the bytes an element takes in memory, and
the numpy dtype a tensor has on the device (cupy lacks ml_dtypes' types: bf16 lives there as its
uint16 bit patterns, the narrow float/int types one byte an element, bit-identical to ml_dtypes'
numpy layout). Complex types have no CUDA lowering (ctype None: `ctype()` says so).

Everything else (lowering, the kernel families, the runtime) reads these fields; nothing keeps its
own copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..ir.types import DTYPES, DType, dtype as _dtype
from .errors import LoweringError


@dataclass(frozen=True)
class CType:
    dtype: DType
    ctype: Optional[str]     # element in memory (None: not supported by the CUDA backend)
    compute: Optional[str]   # arithmetic (fp16/bf16/narrow floats in float, narrow ints in int32_t)
    vec2: Optional[str]      # 2-vector type (only the GEMM/conv dtypes: f32, f16, bf16)
    device_np: np.dtype      # numpy dtype of the tensor's bytes on the device (cupy)

    @property
    def itemsize(self) -> int:
        """Bytes an element takes in memory (narrow types: one byte an element)."""
        return self.dtype.np.itemsize

    @property
    def narrow(self) -> bool:
        """Sub-byte or 8-bit float / 4-bit, 2-bit int types: structs of templates/exotic_types.cu.j2."""
        return self.ctype is not None and self.ctype.startswith("nnc_")

    @property
    def raw_on_device(self) -> bool:
        """The device holds raw bits (a numpy dtype cupy lacks)."""
        return self.device_np != self.dtype.np


_PLAIN_C = {
    "f64": "double", "f32": "float", "f16": "__half", "bf16": "__nv_bfloat16",
    "i64": "int64_t", "i32": "int32_t", "i16": "int16_t", "i8": "int8_t",
    "u64": "uint64_t", "u32": "uint32_t", "u16": "uint16_t", "u8": "uint8_t", "bool": "bool",
}
_VEC2 = {"f32": "float2", "f16": "__half2", "bf16": "__nv_bfloat162"}
_NUMPY_NATIVE = {"float64", "float32", "float16", "int64", "int32", "int16", "int8",
                 "uint64", "uint32", "uint16", "uint8", "bool", "complex64", "complex128"}


def _row(d: DType) -> CType:
    if d.kind == "complex":
        c = comp = None
    elif d.short in _PLAIN_C:
        c = _PLAIN_C[d.short]
        comp = "float" if d.short in ("f16", "bf16") else c
    else:  # the narrow types: structs named after the IR spelling (templates/exotic_types.cu.j2)
        c = f"nnc_{d.short}"
        comp = "int32_t" if d.is_int else "float"
    if d.np_name in _NUMPY_NATIVE:
        dev = d.np
    else:  # ml_dtypes types: raw bits of the same width
        dev = np.dtype(np.uint16 if d.np.itemsize == 2 else np.uint8)
    return CType(d, c, comp, _VEC2.get(d.short), dev)


TABLE: dict[str, CType] = {short: _row(d) for short, d in DTYPES.items()}
BY_NP_NAME: dict[str, CType] = {row.dtype.np_name: row for row in TABLE.values()}

# C type of a scalar kernel argument -> its numpy type (plan.json launches' {"type", "value"})
SCALAR_NP: dict[str, type] = {"int64_t": np.int64, "int32_t": np.int32, "float": np.float32, "double": np.float64}


def info(dt) -> CType:
    """The table row of a DType, an IR name ('f16') or a numpy name ('float16')."""
    if isinstance(dt, str) and dt in BY_NP_NAME:
        return BY_NP_NAME[dt]
    return TABLE[_dtype(dt).short]


def ctype(dt: DType) -> str:
    c = TABLE[dt.short].ctype
    if c is None:
        raise LoweringError(f"dtype {dt} is not supported by the CUDA backend")
    return c


def compute_type(dt: DType) -> str:
    ctype(dt)
    return TABLE[dt.short].compute


def device_np(np_name: str) -> np.dtype:
    """The cupy dtype a tensor of numpy dtype name `np_name` has on the device (raw bits for
    ml_dtypes types)."""
    return BY_NP_NAME[np_name].device_np


# the GEMM/conv kernel families' dtypes (numpy names): C type, bytes, 2-vector C type
KERNEL_FAMILY_TYPES: dict[str, tuple[str, int, str]] = {
    r.dtype.np_name: (r.ctype, r.itemsize, r.vec2) for r in TABLE.values() if r.vec2 is not None}
