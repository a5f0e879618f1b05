"""Constant folding: evaluates ops whose operands are all constants with their reference
semantics and replaces them by `const` ops.

Rewrites: foldable op (registry `foldable=True`, no regions) with all-`const` operands and a
static result no larger than FOLD_MAX_ELEMENTS -> `const` (inline if small, else a new weight).
Requires: a verified module (result types are trusted as the folded values' types).
Leaves big producers (e.g. in-graph ConstantOfShape weights) alone: they stay cheap device work.
"""
from __future__ import annotations

from nnc.ir import registry
from nnc.ir.builder import Builder, const_value, evaluate
from nnc.ir.graph import Module, NameGen, Region, value_names
from nnc.ir.rewrite import Substitution


def _region(r: Region, module: Module, names: NameGen, subst: Substitution) -> bool:
    """One sweep in program order; a folded result's uses read its const through `subst` (nested
    regions included), without a walk over the region per fold."""
    changed = False
    new_ops = []
    b = Builder(Region([], new_ops, []), module.weights, names)
    for op in list(r.ops):
        subst.apply(op)
        for _, sub in op.regions():
            changed |= _region(sub, module, names, subst)
        vals = [None if v is None else const_value(v, module.weights) for v in op.operands]
        outs = None
        if op.name != "const" and all(x is not None for v, x in zip(op.operands, vals) if v is not None):
            outs = evaluate(registry.get(op.name), op.attrs, vals, [x.type for x in op.results])
        if outs is not None:
            for res, val in zip(op.results, outs):
                names.taken.discard(res.name)
                subst[res] = b.constant(val, res.name, op.loc, weight_hint=res.name)
            changed = True
            continue
        new_ops.append(op)
    r.ops = new_ops
    subst.apply_results(r)
    return changed


def run(module: Module) -> bool:
    names = NameGen(value_names(module))
    return any([_region(f, module, names, Substitution()) for f in module.functions])
