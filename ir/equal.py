"""Structural equality of modules: same functions, ops, attrs, types, names and wiring.

Used by the round-trip tests (parse(print(m)) equals m). Arrays compare by dtype, shape and
bytes; NaN equals NaN; locations compare by their node name only (line:col is where text was).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .graph import Module, Region


def modules_equal(a: Module, b: Module) -> bool:
    return first_difference(a, b) is None


def first_difference(a: Module, b: Module):
    if len(a.functions) != len(b.functions):
        return "function count"
    for fa, fb in zip(a.functions, b.functions):
        if fa.name != fb.name:
            return f"function name {fa.name} vs {fb.name}"
        d = _region(fa, fb, {}, f"@{fa.name}")
        if d:
            return d
    return None


def _region(ra: Region, rb: Region, m: dict, where: str):
    if len(ra.args) != len(rb.args) or len(ra.ops) != len(rb.ops) or len(ra.results) != len(rb.results):
        return f"{where}: sizes differ"
    for x, y in zip(ra.args, rb.args):
        if x.name != y.name or x.type != y.type:
            return f"{where}: arg %{x.name}: {x.type} vs %{y.name}: {y.type}"
        m[id(x)] = id(y)
    for i, (oa, ob) in enumerate(zip(ra.ops, rb.ops)):
        w = f"{where} op {i} ({oa.name})"
        if oa.name != ob.name or oa.loc.node != ob.loc.node:
            return f"{w}: {oa.name}/{oa.loc.node} vs {ob.name}/{ob.loc.node}"
        if len(oa.operands) != len(ob.operands) or len(oa.results) != len(ob.results):
            return f"{w}: operand/result counts"
        for x, y in zip(oa.operands, ob.operands):
            if (x is None) != (y is None) or (x is not None and m.get(id(x)) != id(y)):
                return f"{w}: operands differ"
        d = _attrs(oa.attrs, ob.attrs, m, w)
        if d:
            return d
        for x, y in zip(oa.results, ob.results):
            if x.name != y.name or x.type != y.type:
                return f"{w}: result %{x.name}: {x.type} vs %{y.name}: {y.type}"
            m[id(x)] = id(y)
    for x, y in zip(ra.results, rb.results):
        if m.get(id(x)) != id(y):
            return f"{where}: returned values differ"
    return None


def _attrs(a, b, m, w):
    if type(a) is not type(b):
        return f"{w}: attrs types differ"
    if a is None or not dataclasses.is_dataclass(a):
        return None if a == b else f"{w}: attrs differ"
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, Region) or isinstance(y, Region):
            if not (isinstance(x, Region) and isinstance(y, Region)):
                return f"{w}: attr {f.name}"
            d = _region(x, y, m, f"{w}.{f.name}")
            if d:
                return d
        elif not _val_eq(x, y):
            return f"{w}: attr {f.name}: {x!r} vs {y!r}"
    return None


def _val_eq(x, y) -> bool:
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.dtype == y.dtype
                and x.shape == y.shape and x.tobytes() == y.tobytes())
    if isinstance(x, float) and isinstance(y, float):
        return x == y or (math.isnan(x) and math.isnan(y))
    if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
        return len(x) == len(y) and all(_val_eq(p, q) for p, q in zip(x, y))
    return type(x) is type(y) and x == y
