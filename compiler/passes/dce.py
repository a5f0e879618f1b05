"""Dead-code elimination: erases ops none of whose results are read.

Rewrites: any op (in any region) whose results are all unused, repeatedly, back to front.
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
    while True:
        live = used_values(r)
        keep = [op for op in r.ops if any(id(res) in live for res in op.results)]
        if len(keep) == len(r.ops):
            return changed
        r.ops = keep
        changed = True


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
