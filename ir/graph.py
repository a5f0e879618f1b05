"""The IR's data structures: values, ops, regions, functions, modules. No pass logic here.

SSA: every `Value` is defined once, by an op result or a region argument. An `Op` has operands
(a None operand is an omitted optional input, printed `none`), results, a typed attrs dataclass
(its registry entry's schema) and a source location. Regions (If branches, Loop/Scan bodies,
fusion-group bodies) are attribute values of type `Region`, so they print and parse like any
attribute and passes find them by walking attrs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from .types import TensorType


@dataclass(frozen=True)
class Loc:
    line: int = 0
    col: int = 0
    node: str = ""  # ONNX node name (or other origin) kept for error messages

    def __str__(self) -> str:
        where = f"{self.line}:{self.col}" if self.line else ""
        if self.node:
            where = f"{where} (node {self.node!r})" if where else f"node {self.node!r}"
        return where or "<unknown location>"


@dataclass(eq=False)
class Value:
    name: str
    type: TensorType
    producer: Optional["Op"] = field(default=None, repr=False)

    @property
    def relayout(self) -> tuple:
        """Read-only, kept for old callers: ir.layout.perm_of(value), from the type's layout tag."""
        from .layout import perm_of
        return perm_of(self)

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


@dataclass(eq=False)
class Op:
    name: str  # registry key, e.g. "Conv", "const"
    operands: list  # list[Value | None]
    results: list  # list[Value]
    attrs: Any  # dataclass instance of the op's attrs schema
    loc: Loc = field(default_factory=Loc)

    def __post_init__(self):
        for r in self.results:
            r.producer = self

    @property
    def result(self) -> Value:
        assert len(self.results) == 1, f"{self.name} has {len(self.results)} results"
        return self.results[0]

    def regions(self) -> list[tuple[str, "Region"]]:
        return regions_of(self.attrs)

    def __repr__(self) -> str:
        res = ", ".join(f"%{r.name}" for r in self.results)
        return f"<{res} = {self.name} at {self.loc}>"


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}  # attrs class -> its field names (fields() is slow)


def regions_of(attrs) -> list[tuple[str, "Region"]]:
    """(field name, region) for every region-valued attribute of an attrs dataclass."""
    if attrs is None:
        return []
    names = _FIELD_NAMES.get(type(attrs))
    if names is None:
        ok = dataclasses.is_dataclass(attrs) and not isinstance(attrs, type)
        names = _FIELD_NAMES[type(attrs)] = tuple(f.name for f in dataclasses.fields(attrs)) if ok else ()
    out = []
    for n in names:
        v = getattr(attrs, n)
        if isinstance(v, Region):
            out.append((n, v))
    return out


@dataclass(eq=False)
class Region:
    """A block: arguments, ops in order, and the values it returns."""
    args: list  # list[Value]
    ops: list  # list[Op]
    results: list  # list[Value]

    def walk(self) -> Iterator[Op]:
        """All ops, nested regions included, in program order (pre-order)."""
        for op in self.ops:
            yield op
            for _, r in op.regions():
                yield from r.walk()


@dataclass(eq=False)
class Function(Region):
    name: str = "main"


@dataclass(eq=False)
class Module:
    functions: list  # list[Function]
    weights: Any = None  # ir.weights.WeightStore
    loc_file: str = ""  # where it was parsed from, for messages

    @property
    def main(self) -> Function:
        for f in self.functions:
            if f.name == "main":
                return f
        return self.functions[0]


def users(region: Region) -> dict[int, list[Op]]:
    """id(Value) -> ops that read it, across nested regions."""
    out: dict[int, list[Op]] = {}
    for op in region.walk():
        for v in op.operands:
            if v is not None:
                out.setdefault(id(v), []).append(op)
        for _, r in op.regions():
            for v in r.results:
                out.setdefault(id(v), []).append(op)
    for v in region.results:
        out.setdefault(id(v), [])
    return out


def value_names(module: Module) -> set[str]:
    """Every SSA name in the module (arguments and results, nested regions included)."""
    out = set()
    for f in module.functions:
        out |= {a.name for a in f.args}
        for op in f.walk():
            out |= {r.name for r in op.results}
            for _, r in op.regions():
                out |= {a.name for a in r.args}
    return out


class NameGen:
    """Fresh SSA names that do not collide with names already in use."""

    def __init__(self, taken=()):
        self.taken = set(taken)
        self.n = 0

    def __call__(self, hint: str = "") -> str:
        base = hint or ""
        if base and base not in self.taken:
            self.taken.add(base)
            return base
        while True:
            cand = f"{base}_{self.n}" if base else str(self.n)
            self.n += 1
            if cand not in self.taken:
                self.taken.add(cand)
                return cand
