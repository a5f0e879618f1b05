"""Outlining: replace a group of ops of a region by one `fused` op whose body holds copies of them
(ir/ops/fused.py). The shared mechanism of every fusion pass; the passes decide the groups.

    out = Outliner(func)                 # uses and positions computed once: O(ops)
    for group in groups:                 # each a list of ops of func
        if out.can_outline(group):
            out.outline(group, kind="elementwise")
    out.finish()                         # func.ops rebuilt once

The fused op's results are the group's original result Values that are read outside the group
(or returned), so users and the function's results need no rewriting and keep their names; the
body gets fresh copies (names from NameGen). External operands, consts included, become operands
of the fused op, one body argument each. A group is outlined at the position of its last op;
`can_outline` checks that this is legal: no outside user of a group result comes before that
position (the group is convex in program order), no op of the group has regions, and no op is
already in another group. Whole pass: O(ops + sum of group sizes).
"""
from __future__ import annotations

from typing import Optional

from .graph import NameGen, Op, Region, Value, value_names
from .ops.fused import FusedAttrs


class Outliner:
    def __init__(self, func: Region, names: Optional[NameGen] = None, module=None):
        self.func = func
        self.names = names or NameGen(value_names(module) if module is not None else _region_names(func))
        self.pos = {id(op): i for i, op in enumerate(func.ops)}
        self.users: dict[int, list[Op]] = {}
        for op in func.ops:
            for v in _reads(op):
                self.users.setdefault(id(v), []).append(op)
        self.returned = {id(v) for v in func.results}
        self._taken: set[int] = set()  # ops already outlined
        self._at: dict[int, Op] = {}  # position of a group's last op -> its fused op

    def _pos(self, op: Op) -> int:
        return self.pos[id(op)]

    def can_outline(self, group: list[Op]) -> bool:
        if not group or any(id(op) in self._taken or id(op) not in self.pos or op.regions() for op in group):
            return False
        ids = {id(op) for op in group}
        last = max(self._pos(op) for op in group)
        for op in group:
            for r in op.results:
                for u in self.users.get(id(r), ()):
                    if id(u) not in ids and self._pos(u) < last:
                        return False
        return True

    def outline(self, group: list[Op], kind: str, params: str = "") -> Optional[Op]:
        """The fused op that now stands for `group` (None when nothing of it is used)."""
        if not self.can_outline(group):
            raise ValueError(f"group of {len(group)} ops cannot be outlined here (not convex, or taken)")
        group = sorted(group, key=self._pos)
        ids = {id(op) for op in group}
        args, operands, arg_of, copy_of = [], [], {}, {}
        body_ops = []
        for op in group:
            new_operands = []
            for v in op.operands:
                if v is None:
                    new_operands.append(None)
                elif id(v) in copy_of:
                    new_operands.append(copy_of[id(v)])
                else:
                    if id(v) not in arg_of:
                        a = Value(self.names(v.name), v.type)
                        arg_of[id(v)] = a
                        args.append(a)
                        operands.append(v)
                    new_operands.append(arg_of[id(v)])
            results = [Value(self.names(r.name), r.type) for r in op.results]
            for r, c in zip(op.results, results):
                copy_of[id(r)] = c
            body_ops.append(Op(op.name, new_operands, results, op.attrs, op.loc))
        outputs = [r for op in group for r in op.results
                   if id(r) in self.returned or any(id(u) not in ids for u in self.users.get(id(r), ()))]
        self._taken |= ids
        if not outputs:
            return None
        body = Region(args, body_ops, [copy_of[id(r)] for r in outputs])
        # the group's location: its first op that came from the model (a pass-made Cast has none)
        loc = next((op.loc for op in group if op.loc.node), group[0].loc)
        fused = Op("fused", operands, outputs, FusedAttrs(body, kind, params), loc)
        last = self._pos(group[-1])
        self.pos[id(fused)] = last
        self._at[last] = fused
        for v in operands:  # the fused op now reads what the group read from outside
            us = self.users.get(id(v), [])
            self.users[id(v)] = [u for u in us if id(u) not in ids] + [fused]
        return fused

    def finish(self) -> None:
        ops = []
        for i, op in enumerate(self.func.ops):
            if i in self._at:
                ops.append(self._at[i])
            elif id(op) not in self._taken:
                ops.append(op)
        self.func.ops = ops


def _reads(op: Op):
    """Values an op reads: operands, and the outer values its regions read."""
    for v in op.operands:
        if v is not None:
            yield v
    for _, r in op.regions():
        inner = {id(a) for a in r.args}
        for o in r.walk():
            inner.update(id(x) for x in o.results)
        for o in r.walk():
            for v in o.operands:
                if v is not None and id(v) not in inner:
                    yield v
        for v in r.results:
            if id(v) not in inner:
                yield v


def _region_names(func: Region) -> set:
    names = {a.name for a in func.args}
    for op in func.walk():
        names.update(r.name for r in op.results)
        for _, r in op.regions():
            names.update(a.name for a in r.args)
    return names
