"""Common-subexpression elimination: ops that compute the same value become one.

Rewrites: an op with the same name, the same operands (by identity, after earlier merges), equal
attrs and equal result types as an earlier op visible from it (same region or an enclosing one)
-> its results are the earlier op's results. `const` ops merge when they hold the same tensor:
inline values by dtype, shape and bytes; weights by name, or by dtype, shape and bytes (a weight's
bytes are hashed only when another weight of its dtype and shape exists).
Never merged: ops with regions (If/Loop/Scan/fused bodies are not compared), ops that are not
deterministic (registry `foldable` False), ops with an attribute that has no exact key, and an op
whose result is a function/region result (that name is the model's output name).
Requires: a verified module. Linear: one sweep in program order with a hash table keyed by
(name, operand ids, attrs key, result types); inner regions see the outer table, and their own
entries are dropped when the sweep leaves them (a value defined inside is not visible outside).
The merged-away ops are removed here; weights no longer named are left to `dce`.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter

import numpy as np

from nnc.ir import registry
from nnc.ir.graph import Function, Module, Region
from nnc.ir.rewrite import Substitution
from nnc.ir.types import DType

_NOKEY = object()  # an attribute value with no exact, hashable key: the op is not merged


def _attr_key(v):
    """An exact hashable key of one attribute value (floats by their bits: -0.0 is not 0.0)."""
    if v is None or isinstance(v, (bool, int, str, DType)):
        return (type(v).__name__, v)
    if isinstance(v, float):
        return ("f", v.hex())
    if isinstance(v, np.ndarray):
        return ("a", v.dtype.str, v.shape, np.ascontiguousarray(v).tobytes())
    if isinstance(v, tuple):
        ks = tuple(_attr_key(x) for x in v)
        return _NOKEY if any(k is _NOKEY for k in ks) else ("t", ks)
    return _NOKEY  # Region, or anything this pass does not know how to compare exactly


def _attrs_key(attrs):
    if attrs is None:
        return ()
    if not dataclasses.is_dataclass(attrs):
        return _NOKEY
    out = []
    for f in dataclasses.fields(attrs):
        k = _attr_key(getattr(attrs, f.name))
        if k is _NOKEY:
            return _NOKEY
        out.append((f.name, k))
    return (type(attrs).__name__, tuple(out))


class _Cse:
    def __init__(self, module: Module):
        self.module = module
        self.table: dict = {}
        self.subst = Substitution()
        self.counts: Counter = Counter()
        self._digest: dict[str, bytes] = {}  # weight name -> hash of its bytes (computed lazily)
        self._by_meta: dict = {}  # (dtype, shape) -> first weight const of that dtype and shape

    def _weight_digest(self, name: str) -> bytes:
        d = self._digest.get(name)
        if d is None:
            a = self.module.weights[name]
            d = self._digest[name] = hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=20).digest()
        return d

    def _const_key(self, op):
        a = op.attrs
        t = op.results[0].type
        if a.value is not None:
            return ("const", _attr_key(a.value), t)
        w = self.module.weights
        if w is None or a.weight not in w:
            return ("const-name", a.weight, t)
        arr = w[a.weight]
        meta = (arr.dtype.str, arr.shape, t)
        first = self._by_meta.get(meta)
        if first is None:  # the only weight of this dtype/shape so far: no need to hash it yet
            self._by_meta[meta] = a.weight
            return ("const-only", meta, a.weight)
        if first == a.weight:
            return ("const-only", meta, a.weight)
        # a second weight of this dtype and shape: key both by content (the first one's entry is
        # re-keyed so that later equal weights find it)
        fk = ("const-bytes", meta, self._weight_digest(first))
        only = ("const-only", meta, first)
        if only in self.table and fk not in self.table:
            self.table[fk] = self.table[only]
        return ("const-bytes", meta, self._weight_digest(a.weight))

    def _key(self, op):
        if op.name == "const":
            return self._const_key(op)
        if op.regions() or not registry.get(op.name).foldable:
            return None
        ak = _attrs_key(op.attrs)
        if ak is _NOKEY:
            return None
        return (op.name, tuple(None if v is None else id(v) for v in op.operands), ak,
                tuple(r.type for r in op.results))

    def region(self, r: Region) -> bool:
        changed = False
        added = []
        returned = {id(v) for v in r.results}
        keep = []
        for op in r.ops:
            self.subst.apply(op)
            for _, sub in op.regions():
                changed |= self.region(sub)
            key = self._key(op)
            if key is not None:
                try:
                    prev = self.table.get(key)
                except TypeError:  # an unhashable result type (should not happen): leave it
                    prev, key = None, None
                if prev is not None and len(prev.results) == len(op.results) and \
                        not any(id(v) in returned for v in op.results):
                    for old, new in zip(op.results, prev.results):
                        self.subst[old] = new
                    self.counts[op.name] += 1
                    changed = True
                    continue
                if prev is None and key is not None:
                    self.table[key] = op
                    added.append(key)
            keep.append(op)
        if len(keep) != len(r.ops):
            r.ops = keep
        self.subst.apply_results(r)
        if not isinstance(r, Function):  # a function's table is dropped with it
            for k in added:  # values defined in this region are not visible after it
                self.table.pop(k, None)
        return changed


def rewrite(module: Module) -> Counter:
    """The merges done, by op name (what `run` reports as changed; tools print it)."""
    total: Counter = Counter()
    for f in module.functions:
        c = _Cse(module)  # a table per function: values of one function are not seen in another
        c.region(f)
        total += c.counts
    return total


def run(module: Module) -> bool:
    return bool(rewrite(module))
