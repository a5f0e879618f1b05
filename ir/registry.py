"""The op registry: one entry per op with its attrs schema, type/shape inference and numpy
reference semantics. Op families register themselves in ir/ops/*.py; registering a name twice
is an error.

An attrs schema is a frozen dataclass whose field annotations say the attribute types:
int, float, str, bool, DType, tuple[int, ...], tuple[float, ...], tuple[str, ...],
np.ndarray (a tensor), Region (a sub-graph), each optionally Optional[...]. The parser and the
ONNX importer convert raw values through `make_attrs`, so a wrong type fails with the field name.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from .errors import NncError, ShapeError
from .graph import Loc, Region
from .symbolic import UNKNOWN
from .types import DType, TensorType, dtype


@dataclass(frozen=True)
class NoAttrs:
    pass


@dataclass(frozen=True)
class OpDef:
    name: str
    attrs: type
    infer: Callable[["InferCtx"], list]
    ref: Callable[..., Any]
    inputs: tuple = (1, 1)  # (min, max); max -1 = variadic
    outputs: tuple = (1, 1)
    foldable: bool = True  # deterministic and cheap to evaluate at compile time
    ref_ctx: bool = False  # ref takes ctx= (for regions, result types)
    doc: str = ""


REGISTRY: dict[str, OpDef] = {}


def register(name: str, attrs: type = NoAttrs, *, infer, ref, inputs=(1, 1), outputs=(1, 1),
             foldable=True, ref_ctx=False, doc="") -> OpDef:
    if name in REGISTRY:
        raise RuntimeError(f"op {name!r} registered twice")
    if not dataclasses.is_dataclass(attrs):
        raise TypeError(f"attrs schema of {name} must be a dataclass")
    if isinstance(inputs, int):
        inputs = (inputs, inputs)
    if isinstance(outputs, int):
        outputs = (outputs, outputs)
    d = OpDef(name, attrs, infer, ref, tuple(inputs), tuple(outputs), foldable, ref_ctx, doc)
    REGISTRY[name] = d
    return d


def get(name: str) -> OpDef:
    _ensure_loaded()
    if name not in REGISTRY:
        raise NncError(f"unknown op {name!r}")
    return REGISTRY[name]


_LOADED = False


def _ensure_loaded():
    global _LOADED
    if not _LOADED:
        _LOADED = True
        from . import ops  # noqa: F401  (registers every family)


# ---------------------------------------------------------------- attribute schemas

@dataclass(frozen=True)
class AttrSpec:
    base: Any  # int, float, str, bool, DType, np.ndarray, Region
    seq: bool  # tuple[...] of base
    optional: bool


_SPECS: dict[type, dict[str, AttrSpec]] = {}


def attr_specs(cls: type) -> dict[str, AttrSpec]:
    if cls in _SPECS:
        return _SPECS[cls]
    hints = typing.get_type_hints(cls, globalns={"np": np, "Region": Region, "DType": DType,
                                                 "Optional": Optional, **vars(typing)})
    out = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        optional = False
        if typing.get_origin(t) is typing.Union:
            args = [a for a in typing.get_args(t) if a is not type(None)]
            optional, t = True, args[0]
        seq = False
        if typing.get_origin(t) is tuple:
            seq, t = True, typing.get_args(t)[0]
        out[f.name] = AttrSpec(t, seq, optional)
    _SPECS[cls] = out
    return out


def _coerce_one(base, v, where):
    if base is int:
        if isinstance(v, (bool, np.bool_)):
            return int(v)
        if isinstance(v, (int, np.integer)):
            return int(v)
        if isinstance(v, float) and v.is_integer():
            return int(v)
    elif base is float:
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
            return float(v)
    elif base is bool:
        if isinstance(v, (bool, int, np.integer)):
            return bool(v)
    elif base is str:
        if isinstance(v, bytes):
            return v.decode()
        if isinstance(v, str):
            return v
    elif base is DType:
        try:
            return dtype(v)
        except (ValueError, TypeError):
            pass
    elif base is np.ndarray:
        if isinstance(v, np.ndarray):
            return v
    elif base is Region:
        if isinstance(v, Region):
            return v
    else:
        return v
    raise NncError(f"{where}: expected {getattr(base, '__name__', base)}, got {v!r}")


def make_attrs(cls: type, raw: dict, where: str = "") -> Any:
    """Builds the typed attrs of an op from raw values; unknown names and wrong types fail."""
    specs = attr_specs(cls)
    kwargs = {}
    for k, v in raw.items():
        if k not in specs:
            known = ", ".join(specs) or "none"
            raise NncError(f"{where}: unknown attribute {k!r} (known: {known})")
        s = specs[k]
        at = f"{where}: attribute {k!r}"
        if v is None and s.optional:
            kwargs[k] = None
        elif s.seq:
            if isinstance(v, np.ndarray):
                v = v.tolist()
            if not isinstance(v, (list, tuple)):
                v = [v]
            kwargs[k] = tuple(_coerce_one(s.base, x, at) for x in v)
        else:
            kwargs[k] = _coerce_one(s.base, v, at)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required attribute is missing
        raise NncError(f"{where}: {e}") from None


def attrs_items(attrs) -> list[tuple[str, Any]]:
    """Fields that differ from their defaults, in schema order (what the printer shows)."""
    out = []
    for f in dataclasses.fields(attrs):
        v = getattr(attrs, f.name)
        if f.default is not dataclasses.MISSING:
            d = f.default
            if isinstance(v, np.ndarray) or isinstance(d, np.ndarray):
                pass
            elif v == d and type(v) is type(d):
                continue
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            if v == f.default_factory():  # type: ignore[misc]
                continue
        out.append((f.name, v))
    return out


# ---------------------------------------------------------------- inference context

class InferCtx:
    """What a shape-inference function sees: operand types, constant operand values, attrs."""

    def __init__(self, opdef: OpDef, attrs, operands: list, num_results: int, loc: Loc,
                 const_value: Callable[[Any], Optional[np.ndarray]], declared=None):
        self.declared = declared  # result types as written (text/ONNX), or None
        self.opdef = opdef
        self.attrs = attrs
        self._operands = operands  # list[Value|None]
        self.num_results = num_results
        self.loc = loc
        self._const = const_value

    @property
    def n(self) -> int:
        return len(self._operands)

    def has(self, i: int) -> bool:
        return i < len(self._operands) and self._operands[i] is not None

    def type(self, i: int) -> TensorType:
        if not self.has(i):
            self.fail(f"operand {i} is required")
        return self._operands[i].type

    def shape(self, i: int) -> tuple:
        t = self.type(i)
        if t.shape is None:
            raise _UnknownRank()
        return t.shape

    def dtype(self, i: int) -> DType:
        return self.type(i).dtype

    def value(self, i: int) -> Optional[np.ndarray]:
        """The operand's value if it is a compile-time constant, else None."""
        if not self.has(i):
            return None
        return self._const(self._operands[i])

    def fail(self, msg: str):
        raise ShapeError(f"{self.loc}: {self.opdef.name}: {msg}")


class _UnknownRank(Exception):
    """Raised by InferCtx.shape on an unknown-rank operand; infer then yields unknown ranks."""


def run_infer(opdef: OpDef, attrs, operands: list, num_results: int, loc: Loc,
              const_value, declared=None) -> list[TensorType]:
    ctx = InferCtx(opdef, attrs, operands, num_results, loc, const_value, declared)
    try:
        out = opdef.infer(ctx)
    except _UnknownRank:
        dt = next((v.type.dtype for v in operands if v is not None), None)
        out = [TensorType(dt, None)] * num_results
    except ShapeError:
        raise
    except NncError as e:
        raise ShapeError(f"{loc}: {opdef.name}: {e}") from None
    except (ValueError, IndexError, TypeError, KeyError, ZeroDivisionError, OverflowError) as e:
        raise ShapeError(f"{loc}: {opdef.name}: shape inference failed: {e}") from None
    if isinstance(out, TensorType):
        out = [out]
    out = list(out)[:num_results]
    if len(out) < num_results:
        ctx.fail(f"inference gave {len(out)} result types, {num_results} requested")
    for i, t in enumerate(out):
        check_extents(t, lambda msg, i=i: ctx.fail(f"result {i}: {msg}"))
    return out


# A tensor with more elements than this is refused at compile time: no device holds it, and the
# reference interpreter would die allocating it (2**36 elements = 256 GiB of f32).
MAX_ELEMENTS = 1 << 36


def check_extents(t: TensorType, fail: Callable[[str], Any]) -> None:
    """Every static dim of `t` is >= 0 and its static element count is at most MAX_ELEMENTS.
    `fail(msg)` raises (with the caller's location); a negative extent comes from bad attributes
    (negative pads, huge dilations) or a malformed model, never from a valid graph."""
    if t is None or t.shape is None:
        return
    n = 1
    for d in t.shape:
        if isinstance(d, int):
            if d < 0:
                fail(f"negative extent {d} in {t}")
            n *= d
    if n > MAX_ELEMENTS:
        fail(f"{t} has {n} elements, more than the {MAX_ELEMENTS} nnc accepts")


def unknown_dims(rank: int) -> tuple:
    return (UNKNOWN,) * rank
