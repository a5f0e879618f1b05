"""Memory-aware schedule: reorders a function's top-level ops into a topological order that frees
big tensors early, where that lowers the most bytes live at once.

Rewrites: the order of `func.ops` (never the ops themselves). Greedy list scheduling: among the
ops whose operands are all computed, run the one that frees the most bytes minus the bytes it
allocates (an operand is freed by its last reader); ties go to the earlier op of the original
order, so a chain keeps its order. A `const` costs no arena bytes: it is placed right before its
first reader. The new order is kept only if its estimated peak (the largest sum of bytes of the
values live at one op, operands and results of that op included, as codegen/memory.py's
liveness counts them) is strictly below the original order's; otherwise nothing changes.

Requires: SSA order (every operand defined before its reader). Values that an op's regions read
from the enclosing function count as its operands (a `fused` body is closed; If/Loop bodies may
capture). Runs last: after fusion, which decides which tensors exist at all. Arguments and
weights are not in the arena and cost nothing; returned values live to the end. A value of
unknown (symbolic) size counts 0 bytes. O(n log n) in the ops and their operands.
"""
from __future__ import annotations

import heapq
import math

from nnc.ir.graph import Function, Module, Op
from nnc.ir.rewrite import used_values


def _bytes(v) -> int:
    t = v.type
    if t.shape is None or not all(isinstance(d, int) for d in t.shape):
        return 0
    return math.prod(t.shape) * t.dtype.np.itemsize


def _deps(func: Function) -> list[list]:
    """Per op, the distinct values it reads that are defined by ops of `func` (operands and
    values its regions capture)."""
    defined = {id(r): r for op in func.ops for r in op.results}
    out = []
    for op in func.ops:
        seen = {}
        for v in op.operands:
            if v is not None and id(v) in defined:
                seen[id(v)] = v
        for _, sub in op.regions():
            for vid in used_values(sub):
                if vid in defined:
                    seen[vid] = defined[vid]
        out.append(list(seen.values()))
    return out


def peak_bytes(ops: list[Op], deps: dict[int, list], returned: set[int]) -> int:
    """The most bytes live at one op for this order (results allocated before operands die)."""
    last = {}
    for t, op in enumerate(ops):
        for v in deps[id(op)]:
            last[id(v)] = t
    cur = peak = 0
    for t, op in enumerate(ops):
        if op.name == "const":
            continue
        for r in op.results:
            cur += _bytes(r)
        peak = max(peak, cur)
        for r in op.results:  # never read: dead after its producer
            if id(r) not in last and id(r) not in returned:
                cur -= _bytes(r)
        for v in deps[id(op)]:
            if last[id(v)] == t and id(v) not in returned and v.producer is not None and v.producer.name != "const":
                cur -= _bytes(v)
    return peak


def schedule(func: Function) -> list[Op]:
    """The greedy order (see the module docstring)."""
    ops = func.ops
    index = {id(op): i for i, op in enumerate(ops)}
    dl = _deps(func)
    deps = {id(op): d for op, d in zip(ops, dl)}
    returned = {id(v) for v in func.results}
    readers: dict[int, list[Op]] = {}
    for op, d in zip(ops, dl):
        for v in d:
            readers.setdefault(id(v), []).append(op)
    remaining = {vid: len(rs) for vid, rs in readers.items()}  # readers not yet scheduled
    waiting = {}  # op id -> operands not yet computed (consts excluded: placed on demand)
    for op, d in zip(ops, dl):
        waiting[id(op)] = sum(1 for v in d if v.producer.name != "const")

    def freeable(v) -> int:
        return 0 if id(v) in returned or v.producer.name == "const" else _bytes(v)

    def score(op) -> int:
        freed = sum(freeable(v) for v in deps[id(op)] if remaining[id(v)] == 1)
        return freed - sum(_bytes(r) for r in op.results)

    heap = []
    for op in ops:
        if op.name != "const" and waiting[id(op)] == 0:
            heapq.heappush(heap, (-score(op), index[id(op)], op))
    out: list[Op] = []
    placed: set[int] = set()

    def emit(op):
        placed.add(id(op))
        out.append(op)

    while heap:
        neg, i, op = heapq.heappop(heap)
        if id(op) in placed or -neg != score(op):
            continue  # stale entry: a fresher one is in the heap
        for v in deps[id(op)]:
            if v.producer.name == "const" and id(v.producer) not in placed:
                emit(v.producer)
        emit(op)
        for v in deps[id(op)]:
            remaining[id(v)] -= 1
            if remaining[id(v)] == 1:  # its last reader now frees it: that reader scores higher
                for r in readers[id(v)]:
                    if id(r) not in placed and waiting[id(r)] == 0:
                        heapq.heappush(heap, (-score(r), index[id(r)], r))
        for res in op.results:
            for r in readers.get(id(res), ()):
                waiting[id(r)] -= 1
                if waiting[id(r)] == 0:
                    heapq.heappush(heap, (-score(r), index[id(r)], r))
    for op in ops:  # consts nobody reads (a returned const): keep them
        if id(op) not in placed:
            emit(op)
    return out


def _function(func: Function) -> bool:
    if len(func.ops) < 3:
        return False
    new = schedule(func)
    if len(new) != len(func.ops) or all(a is b for a, b in zip(new, func.ops)):
        return False
    deps = {id(op): d for op, d in zip(func.ops, _deps(func))}
    returned = {id(v) for v in func.results}
    if peak_bytes(new, deps, returned) >= peak_bytes(func.ops, deps, returned):
        return False
    func.ops = new
    return True


def run(module: Module) -> bool:
    changed = False
    for f in module.functions:
        changed |= _function(f)
    return changed
