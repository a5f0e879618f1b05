"""Dead-code elimination: erases ops none of whose results are read.

Rewrites: any op (in any region) whose results are all unused, after the ops that read them went
(one sweep back to front).
Requires: nothing. All registered ops are pure (no side effects), so erasure is always safe.
"""
from __future__ import annotations

from nnc.ir.graph import Module, Region
from nnc.ir.rewrite import used_values


def _region(r: Region) -> bool:
    changed = False
    for op in r.ops:
        for _, sub in op.regions():
            changed |= _region(sub)
    # one sweep back to front: SSA order puts every use after its definition, so when an op is
    # reached all its readers were already seen (the fixpoint in one pass, O(ops))
    live = {id(v) for v in r.results}
    keep = []
    for op in reversed(r.ops):
        if not any(id(res) in live for res in op.results):
            continue
        keep.append(op)
        live.update(id(v) for v in op.operands if v is not None)
        for _, sub in op.regions():  # values of enclosing scopes read inside the region
            live |= used_values(sub)
    if len(keep) != len(r.ops):
        keep.reverse()
        r.ops = keep
        changed = True
    return changed


def run(module: Module) -> bool:
    changed = False
    for f in module.functions:
        changed |= _region(f)
    if module.weights is not None:  # drop weights no const names any more
        named = {op.attrs.weight for f in module.functions for op in f.walk() if op.name == "const"}
        for name in [n for n in module.weights.names() if n not in named]:
            del module.weights.arrays[name]
            changed = True
    return changed
