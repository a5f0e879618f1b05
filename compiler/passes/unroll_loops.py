"""Loop / Scan unrolling: turns loops with a compile-time trip count into straight-line IR.

Rewrites:
- Loop whose trip count M is a compile-time value (<= MAX_ITERATIONS) and whose initial cond is
  absent or a compile-time value (inline_if.static_value) -> copies of the body, one per iteration,
  with the iteration number (and the incoming cond) as constants and the loop-carried values
  threaded from one copy to the next. The copies are built with folding on, so a body cond
  computed from constants and the iteration number folds to a constant: the unrolling stops after the first iteration that yields false. A cond
  that does not fold to a constant keeps the Loop. Scan outputs: Concat(axis 0) of the
  per-iteration values, each Unsqueeze'd on axis 0 (a zero-trip loop gives a constant empty tensor).
- Scan whose scan inputs have a static length L (1 <= L <= MAX_ITERATIONS) -> L copies of the body,
  step t reading Squeeze(Slice(x, [i], [i+1], [axis]), [axis]) of every scan input (i = t, or L-1-t
  for a reversed input, axis from scan_input_axes); scan outputs are Unsqueeze'd on their
  scan_output_axes entry and concatenated there (in reverse step order for a reversed output).
Body constants are hoisted (one copy for all iterations); body Identity ops are bypassed. Values of
the copies get fresh names derived from the body names plus the iteration (`<name>.<i>`, NameGen).
Nested loops are unrolled inside out. Ifs left with constant conds by the unrolling are inlined
right after (inline-if), so If-in-Loop bodies flatten in one go.
Requires: a verified module. The op's result names are kept (they may be the model's outputs): the
value that replaces a result takes its name, or an Identity carrying it is added where the value is
defined elsewhere (an outer value, a function argument).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from nnc.ir.builder import Builder, const_value
from nnc.ir.errors import NncError
from nnc.ir.graph import Module, NameGen, Op, Region, Value, value_names
from nnc.ir.ops.control_flow import _scan_layout
from nnc.ir.ops._util import norm_axis
from nnc.ir.rewrite import Substitution, used_values
from nnc.ir.types import TensorType

from . import inline_if

MAX_ITERATIONS = 256
MAX_UNROLLED_OPS = 1 << 14  # iterations x body ops above this keeps the loop


class _Abort(Exception):
    pass


def _refine(inferred: TensorType, declared: TensorType) -> TensorType:
    """Inferred type with dims it leaves unknown taken from the declared (valid every iteration)."""
    if inferred.shape is None:
        return declared if declared.dtype == inferred.dtype else inferred
    if declared.shape is None or len(declared.shape) != len(inferred.shape):
        return inferred
    shp = tuple(i if isinstance(i, int) else d for i, d in zip(inferred.shape, declared.shape))
    return TensorType(inferred.dtype, shp)


class _Unroller:
    def __init__(self, module: Module, names: NameGen, b: Builder):
        self.module = module
        self.names = names
        self.b = b
        self.hoisted: dict[int, Value] = {}
        self.consts: dict = {}

    def m(self, vmap, v):
        return vmap.get(id(v), v)

    def i64(self, vals, hint):
        key = (hint, tuple(vals))
        if key not in self.consts:
            self.consts[key] = self.b.constant(np.array(vals, np.int64), hint)
        return self.consts[key]

    def clone_nested(self, r: Region, vmap: dict, sfx: str) -> Region:
        args = [Value(self.names(f"{a.name}.{sfx}"), a.type) for a in r.args]
        for a, n in zip(r.args, args):
            vmap[id(a)] = n
        ops = []
        for op in r.ops:
            attrs = op.attrs
            if op.regions():
                attrs = dataclasses.replace(attrs, **{k: self.clone_nested(s, vmap, sfx) for k, s in op.regions()})
            res = [Value(self.names(f"{x.name}.{sfx}"), x.type) for x in op.results]
            ops.append(Op(op.name, [None if v is None else self.m(vmap, v) for v in op.operands], res, attrs, op.loc))
            for x, n in zip(op.results, res):
                vmap[id(x)] = n
        return Region(args, ops, [self.m(vmap, v) for v in r.results])

    def clone_body(self, body: Region, vmap: dict, sfx: str) -> list:
        b = self.b
        for op in body.ops:
            if op.name == "const":
                if id(op) not in self.hoisted:
                    r0 = op.results[0]
                    c = Value(self.names(r0.name), r0.type)
                    b.region.ops.append(Op("const", [], [c], op.attrs, op.loc))
                    self.hoisted[id(op)] = c
                vmap[id(op.results[0])] = self.hoisted[id(op)]
                continue
            if op.name == "Identity" and op.operands and op.operands[0] is not None:
                vmap[id(op.results[0])] = self.m(vmap, op.operands[0])
                continue
            attrs = op.attrs
            if op.regions():
                attrs = dataclasses.replace(attrs, **{k: self.clone_nested(s, vmap, sfx) for k, s in op.regions()})
            try:
                outs = b.create(op.name, [None if v is None else self.m(vmap, v) for v in op.operands], attrs,
                                num_results=len(op.results), names=[f"{r.name}.{sfx}" for r in op.results],
                                loc=op.loc, declared=[r.type for r in op.results])
            except NncError:
                raise _Abort() from None
            for r, o in zip(op.results, outs):
                if o.producer is not None and o.producer.name != "const":
                    o.type = _refine(o.type, r.type)
                vmap[id(r)] = o
        return [self.m(vmap, v) for v in body.results]

    def stack(self, vals: list, axis: int, dtype_np, hint: str, empty_type: TensorType | None, loc):
        """Concat of the values Unsqueeze'd on `axis` (a const empty tensor when there are none)."""
        if not vals:
            if empty_type is None or empty_type.shape is None or not all(isinstance(d, int) for d in empty_type.shape):
                raise _Abort()
            shp = list(empty_type.shape)
            shp.insert(axis, 0)
            return self.b.constant(np.zeros(shp, dtype_np), hint)
        ax = self.i64([axis], f"axis{axis}")
        us = [self.b.create("Unsqueeze", [v, ax], names=[f"{hint}.{i}"], loc=loc)[0] for i, v in enumerate(vals)]
        if len(us) == 1:
            return us[0]
        return self.b.create("Concat", us, {"axis": axis}, names=[hint], loc=loc)[0]

    # ---------------------------------------------------------------- Loop
    def loop(self, op: Op) -> list:
        ops = list(op.operands) + [None] * max(0, 2 - len(op.operands))
        M, cond, carried = ops[0], ops[1], list(ops[2:])
        if M is None:
            raise _Abort()
        mv = inline_if.static_value(M, self.module.weights)
        if mv is None or mv.size != 1:
            raise _Abort()
        trip = max(int(mv.reshape(-1)[0]), 0)
        body = op.attrs.body
        if trip > MAX_ITERATIONS or trip * len(body.ops) > MAX_UNROLLED_OPS:
            raise _Abort()
        if cond is None:
            c = True
        else:
            cv = inline_if.static_value(cond, self.module.weights)
            if cv is None or cv.size != 1:
                raise _Abort()
            c = bool(cv.reshape(-1)[0])
        n_carried = len(carried)
        n_scan = len(body.results) - 1 - n_carried
        used = used_values(body)
        it_arg, c_arg = body.args[0], body.args[1]

        def arg_shape(a):
            return tuple(a.type.shape) if a.type.shape is not None and all(isinstance(d, int) for d in a.type.shape) else ()
        scans = [[] for _ in range(n_scan)]
        i = 0
        while i < trip and c:
            vmap = {id(a): v for a, v in zip(body.args[2:], carried)}
            if id(it_arg) in used:
                vmap[id(it_arg)] = self.b.constant(np.array(i, np.int64).reshape(arg_shape(it_arg)), f"{it_arg.name}.{i}")
            if id(c_arg) in used:
                vmap[id(c_arg)] = self.b.constant(np.array(c, np.bool_).reshape(arg_shape(c_arg)), f"{c_arg.name}.{i}")
            outs = self.clone_body(body, vmap, str(i))
            cval = const_value(outs[0], self.module.weights)
            if cval is None or cval.size != 1:
                raise _Abort()
            c = bool(cval.reshape(-1)[0])
            carried = list(outs[1:1 + n_carried])
            for j in range(n_scan):
                scans[j].append(outs[1 + n_carried + j])
            i += 1
        res = list(carried)
        for j in range(n_scan):
            rt = op.results[n_carried + j].type
            bt = body.results[1 + n_carried + j].type
            res.append(self.stack(scans[j], 0, rt.dtype.np, op.results[n_carried + j].name, bt, op.loc))
        return res

    # ---------------------------------------------------------------- Scan
    def scan(self, op: Op) -> list:
        a = op.attrs
        body = a.body
        m = a.num_scan_inputs
        n_state = len(op.operands) - m
        n_out = len(body.results) - n_state
        in_axes, in_dirs, out_axes, out_dirs = _scan_layout(a, m, n_out)
        xs = op.operands[n_state:]
        length, axes = None, []
        for k, x in enumerate(xs):
            s = x.type.shape
            if s is None:
                raise _Abort()
            ax = norm_axis(in_axes[k], len(s))
            if not isinstance(s[ax], int) or (length is not None and s[ax] != length):
                raise _Abort()
            length = s[ax]
            axes.append(ax)
        if not length or length > MAX_ITERATIONS or length * (len(body.ops) + 2 * m) > MAX_UNROLLED_OPS:
            raise _Abort()
        states = list(op.operands[:n_state])
        outs_per = [[] for _ in range(n_out)]
        for t in range(length):
            slices = []
            for k, x in enumerate(xs):
                idx = t if not in_dirs[k] else length - 1 - t
                axc = self.i64([axes[k]], f"axis{axes[k]}")
                arg = body.args[n_state + k]
                try:
                    s = self.b.create("Slice", [x, self.i64([idx], f"idx{idx}"), self.i64([idx + 1], f"idx{idx + 1}"), axc],
                                      names=[f"{arg.name}.slice.{t}"], loc=op.loc)[0]
                    s = self.b.create("Squeeze", [s, axc], names=[f"{arg.name}.{t}"], loc=op.loc)[0]
                except NncError:
                    raise _Abort() from None
                slices.append(s)
            vmap = {id(arg): v for arg, v in zip(body.args, states + slices)}
            outs = self.clone_body(body, vmap, str(t))
            states = list(outs[:n_state])
            for j in range(n_out):
                outs_per[j].append(outs[n_state + j])
        res = list(states)
        for j in range(n_out):
            vals = outs_per[j][::-1] if out_dirs[j] else outs_per[j]
            shp = vals[0].type.shape
            if shp is None:
                raise _Abort()
            ax = norm_axis(out_axes[j], len(shp) + 1)
            res.append(self.stack(vals, ax, None, op.results[n_state + j].name, None, op.loc))
        return res


def _body_names(op: Op) -> set:
    out = set()
    for _, r in op.regions():
        out |= {a.name for a in r.args}
        for o in r.ops:
            out |= {x.name for x in o.results}
    return out


def _region(r: Region, module: Module, names: NameGen, subst: Substitution) -> bool:
    changed = False
    new_ops: list = []
    b = Builder(Region([], new_ops, []), module.weights, names, fold=True)
    for op in list(r.ops):
        subst.apply(op)  # results of loops unrolled earlier (uses come later in order)
        for _, sub in op.regions():
            changed |= _region(sub, module, names, subst)
        if op.name not in ("Loop", "Scan"):
            new_ops.append(op)
            continue
        start = len(new_ops)
        counts = inline_if._all_names(module)
        released = {n for n in _body_names(op) - {x.name for x in op.results} if counts[n] == 1}
        names.taken -= released  # the body goes away: its names may be reused by its copies
        u = _Unroller(module, names, b)
        try:
            res = u.loop(op) if op.name == "Loop" else u.scan(op)
        except _Abort:
            del new_ops[start:]
            names.taken |= released
            new_ops.append(op)
            continue
        fresh = {id(v) for o in new_ops[start:] for v in o.results}
        inline_if.bind_results(b, op.results, res, fresh, r, subst=subst)
        changed = True
    r.ops = new_ops
    subst.apply_results(r)
    return changed


def run(module: Module) -> bool:
    names = NameGen(value_names(module))
    changed = any([_region(f, module, names, Substitution()) for f in module.functions])
    if changed:
        inline_if.run(module)
    return changed
