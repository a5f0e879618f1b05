"""If inlining: turns `If` into straight-line IR where that is statically possible.

Rewrites:
- If whose cond is a compile-time value (a `const`, or pure ops over consts, evaluated here without
  rewriting them: a cond computed from an earlier inlined branch's constants counts) -> the chosen
  branch's ops, moved in place of the If (outer-scope references already point at the outer
  values; branches take no arguments);
- If with a non-constant cond whose branches return pairwise equal static types and contain only
  pure ops (registry `foldable`, no regions) -> both branches' ops, then one
  `Where(cond, then_value, else_value)` per result (Where broadcasts the one-element cond; a
  `bool[1]` cond is reshaped to `bool[]` first so that scalar results stay scalars).
Anything else keeps its If. Nested Ifs are handled inside out, so an If whose branches become
straight-line after their own inner Ifs were inlined can be selected too.
Requires: a verified module. The If's result names are kept (they may be the model's output
names): the value that replaces a result takes its name, or an Identity carrying the name is
added where the value is defined elsewhere (an outer value, a function argument).
Moved values whose names would clash with another value of the module get fresh names (NameGen).
"""
from __future__ import annotations

import collections

import numpy as np

from nnc.ir import registry
from nnc.ir.builder import Builder, const_value, evaluate
from nnc.ir.graph import Loc, Module, NameGen, Op, Region
from nnc.ir.rewrite import Substitution, replace_uses

MAX_SELECT_OPS = 256  # a branch bigger than this keeps its If (both sides would always run)


def static_value(v, weights, depth: int = 16):
    """The compile-time value of `v`: a `const`, or a pure region-free op over such values
    (evaluated by its reference semantics, nothing rewritten), else None."""
    cv = const_value(v, weights)
    if cv is not None or depth == 0:
        return cv
    op = v.producer
    if op is None:
        return None
    vals = []
    for x in op.operands:
        xv = None if x is None else static_value(x, weights, depth - 1)
        if x is not None and xv is None:
            return None
        vals.append(xv)
    outs = evaluate(registry.get(op.name), op.attrs, vals, [r.type for r in op.results])
    if outs is None:
        return None
    return next(o for r, o in zip(op.results, outs) if r is v)


def _all_names(module: Module) -> collections.Counter:
    c = collections.Counter()

    def region(r: Region):
        c.update(a.name for a in r.args)
        for op in r.ops:
            c.update(x.name for x in op.results)
            for _, sub in op.regions():
                region(sub)
    for f in module.functions:
        region(f)
    return c


class _Ctx:
    def __init__(self, module: Module):
        self.module = module
        self.counts = _all_names(module)
        self.names = NameGen(self.counts)
        self.subst = Substitution()  # uses of inlined Ifs' results, applied as the sweep goes

    def dedupe(self, ops: list) -> None:
        """Renames results of `ops` (moved to an enclosing scope) whose names are used twice."""
        for op in ops:
            for v in op.results:
                if self.counts[v.name] > 1:
                    self.counts[v.name] -= 1
                    v.name = self.names(v.name)
                    self.counts[v.name] += 1


def bind_results(b: Builder, olds: list, news: list, fresh: set, region: Region, counts=None,
                 subst: Substitution | None = None) -> None:
    """Every use of olds[i] now reads news[i], which takes olds[i]'s name. `fresh`: id() of values
    this rewrite created (they may be renamed); others get an Identity that carries the name.
    With `subst`, the uses are rewritten when the caller's sweep reaches them (see Substitution),
    instead of by a walk over `region` per value."""
    renamed = set()
    for old, new in zip(olds, news):
        if id(new) not in fresh or id(new) in renamed:
            new = b.create("Identity", [new], loc=old.producer.loc if old.producer else Loc())[0]
        if counts is not None and counts[new.name] > 0:
            counts[new.name] -= 1
        new.name = old.name
        renamed.add(id(new))
        if subst is not None:
            subst[old] = new
        else:
            replace_uses(region, old, new)


def _pure(r: Region) -> bool:
    for op in r.ops:
        if op.regions() or not registry.get(op.name).foldable:
            return False
    return True


def _selectable(op: Op) -> bool:
    a = op.attrs
    t, e = a.then_branch, a.else_branch
    if len(t.ops) + len(e.ops) > MAX_SELECT_OPS or not (_pure(t) and _pure(e)):
        return False
    return all(x.type.is_static and x.type == y.type for x, y in zip(t.results, e.results))


def _region(r: Region, ctx: _Ctx) -> bool:
    changed = False
    old_ops = r.ops
    new_ops: list = []
    b = Builder(Region([], new_ops, []), ctx.module.weights, ctx.names)
    for op in old_ops:
        ctx.subst.apply(op)  # results of Ifs inlined earlier (uses come later in order)
        for _, sub in op.regions():
            changed |= _region(sub, ctx)
        if op.name != "If":
            new_ops.append(op)
            continue
        a = op.attrs
        cv = static_value(op.operands[0], ctx.module.weights)
        if cv is not None and cv.size == 1:
            branch = a.then_branch if bool(np.asarray(cv).reshape(-1)[0]) else a.else_branch
            ctx.dedupe(branch.ops)
            new_ops.extend(branch.ops)
            fresh = {id(v) for o in branch.ops for v in o.results}
            bind_results(b, op.results, list(branch.results), fresh, r, ctx.counts, ctx.subst)
            changed = True
            continue
        if _selectable(op):
            cond = op.operands[0]
            for br in (a.then_branch, a.else_branch):
                ctx.dedupe(br.ops)
                new_ops.extend(br.ops)
            if cond.type.shape != ():
                shp = b.constant(np.zeros((0,), np.int64), "scalar_shape", op.loc)
                cond = b.create("Reshape", [cond, shp], names=[cond.name + ".scalar"], loc=op.loc)[0]
            sel, fresh = [], set()
            for res, x, y in zip(op.results, a.then_branch.results, a.else_branch.results):
                if x is y:
                    sel.append(x)
                    continue
                w = b.create("Where", [cond, x, y], names=[res.name + ".sel"], loc=op.loc)[0]
                fresh.add(id(w))
                sel.append(w)
            bind_results(b, op.results, sel, fresh, r, ctx.counts, ctx.subst)
            changed = True
            continue
        new_ops.append(op)
    r.ops = new_ops
    ctx.subst.apply_results(r)
    return changed


def run(module: Module) -> bool:
    ctx = _Ctx(module)
    return any([_region(f, ctx) for f in module.functions])
