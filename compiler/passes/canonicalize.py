"""Canonicalisation: local rewrites to a simpler equivalent form.

Rewrites:
- Identity whose result is not a function result -> its operand (inference Dropout, Cast round
  trips and Flatten/Squeeze/Unsqueeze chains: see `simplify`);
- Cast to the operand's own dtype -> its operand;
- Reshape of Reshape -> one Reshape (the inner shape no longer matters; not when the outer
  shape has a 0 entry, which copies a dim of the inner result);
- Transpose of Transpose -> one Transpose with the composed permutation (or nothing if identity);
- Expand / Reshape to the operand's own static shape -> its operand.
Requires: a verified module. Function results keep their names: an op whose result is a function
result is never bypassed (the result name is the model's output name).
"""
from __future__ import annotations

import numpy as np

from nnc.ir.builder import const_value
from nnc.ir.graph import Module, Region
from nnc.ir.rewrite import Substitution


def _bypass_operand(op, module) -> bool:
    x = op.operands[0] if op.operands else None
    if x is None:
        return False
    res = op.results[0]
    if op.name == "Identity":
        return True
    if op.name == "Cast":
        return x.type.dtype == res.type.dtype
    if op.name in ("Reshape", "Expand", "Squeeze", "Unsqueeze", "Flatten"):
        return x.type.is_static and res.type == x.type
    return False


def _fold_pairs(op, module) -> bool:
    """Merges op with its producer where the pair has a one-op equivalent; True if changed."""
    x = op.operands[0] if op.operands else None
    prod = x.producer if x is not None else None
    if prod is None:
        return False
    if op.name == "Reshape" and prod.name == "Reshape":
        # a 0 entry copies a dim of the operand: once the operand changes, so would that dim
        target = const_value(op.operands[1], module.weights)
        if not op.attrs.allowzero and (target is None or 0 in np.asarray(target).reshape(-1)):
            return False
        op.operands = [prod.operands[0]] + op.operands[1:]
        return True
    if op.name == "Transpose" and prod.name == "Transpose":
        p1, p2 = prod.attrs.perm, op.attrs.perm
        if not p1 or not p2:
            return False
        import dataclasses
        op.attrs = dataclasses.replace(op.attrs, perm=tuple(p1[i] for i in p2))
        op.operands = [prod.operands[0]]
        return True
    return False


def _region(r: Region, module: Module, subst: Substitution) -> bool:
    """One sweep in program order: a bypassed result's uses (nested regions included) read the
    operand through `subst`, without a walk over the region per bypass (that was quadratic)."""
    changed = False
    returned = {id(v) for v in r.results}  # a function's or region's results keep their names
    keep = []
    for op in r.ops:
        subst.apply(op)
        for _, sub in op.regions():
            changed |= _region(sub, module, subst)
        if op.name == "const":
            keep.append(op)
            continue
        if _fold_pairs(op, module):
            changed = True
        if op.name == "Transpose" and getattr(op.attrs, "perm", None) and \
                tuple(op.attrs.perm) == tuple(range(len(op.attrs.perm))):
            bypass = True
        else:
            bypass = _bypass_operand(op, module)
        if bypass and id(op.results[0]) not in returned:
            subst[op.results[0]] = op.operands[0]
            changed = True
            continue
        keep.append(op)
    if len(keep) != len(r.ops):
        r.ops = keep
    subst.apply_results(r)
    return changed


def run(module: Module) -> bool:
    changed = False
    for f in module.functions:
        while _region(f, module, Substitution()):
            changed = True
    return changed
