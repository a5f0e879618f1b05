"""Helpers shared by op families: broadcasting, axis normalisation, common inference shapes."""
from __future__ import annotations

import numpy as np

from ..errors import NncError
from ..symbolic import UNKNOWN, Expr, dmax
from ..types import TensorType


def norm_axis(axis: int, rank: int, what: str = "axis") -> int:
    if not -rank <= axis < max(rank, 1):
        raise NncError(f"{what} {axis} is out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def broadcast_shapes(*shapes) -> tuple:
    """Numpy broadcasting over symbolic dims. Two different symbols give max(a, b)."""
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = [s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0]
        d = 1
        for x in dims:
            if x == 1:
                continue
            if d == 1:
                d = x
            elif isinstance(d, int) and isinstance(x, int):
                if d != x:
                    raise NncError(f"shapes {[list(map(str, s)) for s in shapes]} do not broadcast")
            elif d != x:
                d = dmax(d, x) if not (isinstance(x, Expr) and x.kind == "unknown") else UNKNOWN
        out.append(d)
    return tuple(out)


def same_as(i: int = 0):
    """Inference: one result with operand i's type."""
    def infer(ctx):
        return [ctx.type(i)]
    return infer


def broadcast_infer(result_dtype=None):
    """Inference: numpy broadcasting of all operands; dtype of operand 0 unless given."""
    def infer(ctx):
        shapes = [ctx.shape(i) for i in range(ctx.n) if ctx.has(i)]
        dt = result_dtype or ctx.dtype(0)
        return [TensorType(dt, broadcast_shapes(*shapes))]
    return infer


def as_dtype(x, t: TensorType | np.dtype):
    dt = t.dtype.np if isinstance(t, TensorType) else t
    return np.asarray(x).astype(dt, copy=False)


def is_float(dt) -> bool:
    """numpy and ml_dtypes floats (ml_dtypes' bfloat16/float8 have numpy kind 'V')."""
    dt = np.dtype(dt)
    return dt.kind == "f" or "float" in dt.name
