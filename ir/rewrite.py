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


class Substitution:
    """replace_uses deferred: old value -> new value, applied to an op's operands when a sweep in
    program order reaches the op (uses follow definitions, so that is soon enough). A pass that
    replaces k values then costs O(ops) instead of the O(k x ops) of one replace_uses each.
    The old values are kept referenced, so that their id() is never reused by a new value."""

    def __init__(self):
        self._map: dict[int, tuple[Value, Value]] = {}

    def __bool__(self) -> bool:
        return bool(self._map)

    def __setitem__(self, old: Value, new: Value) -> None:
        self._map[id(old)] = (old, new)

    def get(self, v: Value) -> Value:
        e = self._map.get(id(v))
        return v if e is None else e[1]

    def apply(self, op: Op) -> None:
        """op's operands read the replacements (nested regions: apply to their ops in turn)."""
        if self._map and any(v is not None and id(v) in self._map for v in op.operands):
            op.operands = [None if v is None else self.get(v) for v in op.operands]

    def apply_results(self, region: Region) -> None:
        if self._map:
            region.results = [self.get(v) for v in region.results]


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
