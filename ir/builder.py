"""Builds ops with inferred result types: the one way importers and passes create IR.

`Builder.create` checks the operand count, builds typed attrs, infers result types and appends
the op. With `fold=True`, an op whose operands are all small constants is evaluated by its
reference semantics and replaced by a `const` (this is how Shape->Gather->Concat->Reshape chains
fold during import).

`mark` / `take_over_or_roll_back`: a pass that rewrites an op builds the replacement, then lets
its last op take over the old result Value, or removes all it built when the types differ.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from . import registry
from .errors import NncError
from .graph import Loc, NameGen, Op, Region, Value, regions_of
from .types import type_of_array
from .weights import WeightStore

FOLD_MAX_ELEMENTS = 1 << 16  # results larger than this stay ops (e.g. in-graph ConstantOfShape weights)
INLINE_MAX_ELEMENTS = 8  # constants larger than this go to the weight store


def const_value(v: Value, weights: Optional[WeightStore]) -> Optional[np.ndarray]:
    """The value of `v` if a `const` op defines it, else None."""
    op = v.producer
    if op is None or op.name != "const":
        return None
    a = op.attrs
    if a.value is not None:
        return a.value
    if weights is not None and a.weight in weights:
        return weights[a.weight]
    return None


class Builder:
    def __init__(self, region: Region, weights: WeightStore, names: NameGen, fold: bool = False):
        self.region = region
        self.weights = weights
        self.names = names
        self.fold = fold

    def value_of(self, v: Value) -> Optional[np.ndarray]:
        return const_value(v, self.weights)

    def constant(self, a: np.ndarray, name: str = "", loc: Loc = Loc(), weight_hint: str = "") -> Value:
        a = np.asarray(a)
        if a.size > INLINE_MAX_ELEMENTS:
            wname = self.weights.fresh_name(weight_hint or name or "w")
            self.weights[wname] = a
            attrs = registry.make_attrs(registry.get("const").attrs, {"weight": wname}, "const")
        else:
            attrs = registry.make_attrs(registry.get("const").attrs, {"value": a}, "const")
        res = Value(self.names(name), type_of_array(a))
        op = Op("const", [], [res], attrs, loc)
        self.region.ops.append(op)
        return res

    def create(self, name: str, operands: list, attrs=None, *, num_results: int = 1,
               names: Optional[list] = None, loc: Loc = Loc(), declared=None) -> list[Value]:
        opdef = registry.get(name)
        where = f"{loc}: {name}"
        lo, hi = opdef.inputs
        n = len(operands)
        while n > lo and operands[n - 1] is None:  # trailing omitted optionals
            n -= 1
        operands = list(operands[:n])
        if n < lo or (hi >= 0 and n > hi):
            want = f"{lo}" if lo == hi else f"{lo} to {'any' if hi < 0 else hi}"
            raise NncError(f"{where}: takes {want} operands, got {n}")
        olo, ohi = opdef.outputs
        if num_results < olo or (ohi >= 0 and num_results > ohi):
            raise NncError(f"{where}: produces {olo}..{ohi} results, {num_results} requested")
        if attrs is None or isinstance(attrs, dict):
            attrs = registry.make_attrs(opdef.attrs, attrs or {}, where)
        types = registry.run_infer(opdef, attrs, operands, num_results, loc,
                                   lambda v: self.value_of(v), declared)
        if self.fold:
            folded = self._try_fold(opdef, attrs, operands, types, names, loc)
            if folded is not None:
                return folded
        names = names or [""] * num_results
        results = [Value(self.names(nm), t) for nm, t in zip(names, types)]
        self.region.ops.append(Op(name, operands, results, attrs, loc))
        return results

    def mark(self) -> int:
        """A point to roll back to (see take_over_or_roll_back): how many ops are built so far."""
        return len(self.region.ops)

    def take_over_or_roll_back(self, old: Value, new: Value, since: int, loc: Optional[Loc] = None) -> bool:
        """Put the op that defines `new` in place of `old`'s producer: that op's result becomes
        `old` itself (so every reader of `old` reads the new op, untouched). Done only when the
        two types are equal; otherwise every op built since the mark `since` is removed, their
        result names freed, and False returned (the caller then keeps its original op).

        Why a whole rollback: a rewriting pass builds its replacement before it can know the
        result type (inference runs in `create`), and a mismatch (e.g. a weight whose dtype is not
        the activation's) means the pattern does not apply; the half-built ops must not stay in
        the region as dead code reading live values. Constants made before `since` stay: they are
        unread and DCE removes them with their weights. `loc`, when given, is the new op's loc."""
        if new.type != old.type:
            for op in self.region.ops[since:]:
                for r in op.results:
                    self.names.taken.discard(r.name)
            del self.region.ops[since:]
            return False
        assert new.producer is not None and any(op is new.producer for op in self.region.ops[since:]), \
            f"{new!r} is not the result of an op built since the mark"
        self.take_over(old, new)
        if loc is not None:
            old.producer.loc = loc
        return True

    def take_over(self, old: Value, new: Value) -> None:
        """The op defining `new` defines `old` instead (its readers untouched); `new`'s name is
        freed. The caller has checked that the types agree."""
        last = new.producer
        self.names.taken.discard(new.name)
        last.results = [old if r is new else r for r in last.results]
        old.producer = last

    def _try_fold(self, opdef, attrs, operands, types, names, loc):
        vals = []
        for v in operands:
            a = None if v is None else self.value_of(v)
            if v is not None and (a is None or a.size > FOLD_MAX_ELEMENTS):
                return None
            vals.append(a)
        outs = evaluate(opdef, attrs, vals, types)
        if outs is None:
            return None
        names = names or [""] * len(types)
        return [self.constant(o, nm, loc) for o, nm in zip(outs, names)]


def evaluate(opdef, attrs, vals: list, types: list) -> Optional[list]:
    """An op's results computed at compile time by its reference semantics, from operand values
    `vals` (None only for omitted optional operands); None when the op must stay an op: not
    `foldable` (random, say), has regions, or gives non-static or over-large results."""
    if not opdef.foldable or regions_of(attrs) or not all(t.is_static for t in types):
        return None
    if sum(int(np.prod(t.shape, dtype=np.int64)) for t in types) > FOLD_MAX_ELEMENTS:
        return None
    from .interp import call_ref
    try:
        return call_ref(opdef, attrs, vals, types, None)
    except NncError:
        return None
