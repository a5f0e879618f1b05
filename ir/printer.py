"""Module -> IR text. The output parses back to an equal graph and prints byte-identically."""
from __future__ import annotations

import base64
import json
import math
import re

import numpy as np

from .graph import Function, Module, Op, Region
from .registry import attrs_items
from .types import DType, TensorType

_BARE = re.compile(r"^[A-Za-z0-9_.$/\-]+$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
INLINE_LIST_MAX = 64  # dense tensors above this many elements print as base64


def vname(name: str) -> str:
    return "%" + (name if _BARE.match(name) else json.dumps(name))


def fmt_float(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    s = repr(float(x))
    return s


def _fmt_elem(x, dt: DType) -> str:
    if dt.kind == "bool":
        return "true" if x else "false"
    if dt.is_float:
        f = float(x)
        if math.isnan(f) or math.isinf(f):
            return fmt_float(f)
        s = str(x)  # numpy/ml_dtypes print the shortest text that round-trips in their own type
        return s if any(c in s for c in ".en") else s + ".0"
    return str(int(x))


def fmt_dense(a: np.ndarray) -> str:
    from .types import type_of_array
    t = type_of_array(a)
    flat = a.reshape(-1)
    if flat.size <= INLINE_LIST_MAX and t.dtype.kind != "complex" and t.dtype.bits >= 8:
        body = "[" + ", ".join(_fmt_elem(x, t.dtype) for x in flat) + "]"
    else:
        body = "base64 " + json.dumps(base64.b64encode(np.ascontiguousarray(a).tobytes()).decode())
    return f"dense<{body}> : {t}"


def fmt_attr(v, indent: int) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return fmt_float(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, DType):
        return v.short
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(fmt_attr(x, indent) for x in v) + "]"
    if isinstance(v, np.ndarray):
        return fmt_dense(v)
    if isinstance(v, Region):
        args = ", ".join(f"{vname(a.name)}: {a.type}" for a in v.args)
        return f"region({args}) " + _block(v, indent)
    raise TypeError(f"cannot print attribute value {v!r}")


def _op(op: Op, indent: int) -> str:
    res = ", ".join(vname(r.name) for r in op.results)
    ops = ", ".join("none" if v is None else vname(v.name) for v in op.operands)
    s = f"{res} = {op.name}({ops})"
    items = attrs_items(op.attrs) if op.attrs is not None else []
    if items:
        s += " {" + ", ".join(f"{k} = {fmt_attr(v, indent)}" for k, v in items) + "}"
    s += " : " + ", ".join(str(r.type) for r in op.results)
    if op.loc.node:
        s += f" loc({json.dumps(op.loc.node)})"
    return s


def _block(r: Region, indent: int) -> str:
    pad = "  " * (indent + 1)
    lines = ["{"]
    for op in r.ops:
        lines.append(pad + _op(op, indent + 1))
    lines.append(pad + "return " + ", ".join(vname(v.name) for v in r.results))
    lines.append("  " * indent + "}")
    return "\n".join(lines).replace("return \n", "return\n")


def print_function(f: Function) -> str:
    args = ", ".join(f"{vname(a.name)}: {a.type}" for a in f.args)
    res = ", ".join(str(v.type) for v in f.results)
    return f"func @{f.name}({args}) -> ({res}) " + _block(f, 0) + "\n"


def print_module(m: Module) -> str:
    return "\n".join(print_function(f) for f in m.functions)


def print_type(t: TensorType) -> str:
    return str(t)
