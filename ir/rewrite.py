"""Small graph-editing helpers shared by passes: use replacement and erasure."""
from __future__ import annotations

import dataclasses

from .graph import Function, Op, Region, Value


def replace_uses(region: Region, old: Value, new: Value) -> None:
    """Every read of `old` (nested regions and returned values included) now reads `new`."""
    for op in region.ops:
        op.operands = [new if v is old else v for v in op.operands]
        for _, r in op.regions():
            replace_uses(r, old, new)
    region.results = [new if v is old else v for v in region.results]


def used_values(region: Region) -> set[int]:
    """id() of every value read anywhere inside region (nested regions included)."""
    out = {id(v) for v in region.results}
    for op in region.ops:
        out |= {id(v) for v in op.operands if v is not None}
        for _, r in op.regions():
            out |= used_values(r)
    return out


def is_result(func: Function, v: Value) -> bool:
    return any(r is v for r in func.results)


def replace_attrs(op: Op, **changes) -> None:
    op.attrs = dataclasses.replace(op.attrs, **changes)
