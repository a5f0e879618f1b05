"""Simplification: inference Dropout, exact Cast round trips and static view chains removed.

Complements `canonicalize`, which already removes Identity, Cast to the same dtype,
Reshape∘Reshape, Transpose∘Transpose and Reshape/Expand to the operand's own shape; nothing here
repeats those.

Rewrites:
- inference Dropout (`training_mode` absent or a constant false; any ratio): the output is the
  input. An unread mask result is dropped; a read mask becomes a constant all-true bool (static
  shapes up to FOLD_MAX_ELEMENTS); then a Dropout whose output is not a function result goes.
  This removes the per-run all-true fill launches of opset <= 11 models, whose Dropout always
  has the (unread) mask result.
- Cast round trips and chains through an exact intermediate: Cast_C(Cast_B(x: A)) where every
  A value is exactly a B value (f16/bf16 -> f32 -> f16, i8 -> i32, i16 -> f32, bool -> any...)
  -> Cast_C(x), and when C == A -> x. A lossy intermediate (f32 -> f16 -> f32, i64 -> i32, f32
  -> i32) is never removed: it changes values.
- chains of views (Reshape, Flatten, Squeeze, Unsqueeze) with static shapes: a view of a view
  -> one Reshape of the chain's input to the final shape (a new constant shape), and nothing at
  all when that shape is the input's own.
Requires: a verified module. Function and region results keep their names and types: an op
whose result is one is rewritten in place at most, never bypassed. One sweep in program order
(replacements through a Substitution), so linear in the number of ops; `dce` sweeps the view
and Cast ops left unread.
"""
from __future__ import annotations

from collections import Counter

import ml_dtypes
import numpy as np

from nnc.ir import registry
from nnc.ir.builder import FOLD_MAX_ELEMENTS, Builder, const_value
from nnc.ir.graph import Module, NameGen, Op, Region, value_names
from nnc.ir.narrow_types import is_narrow
from nnc.ir.rewrite import Substitution, used_values
from nnc.ir.types import DType

VIEWS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")  # ops that only reinterpret the shape


def _range(dt: DType):
    """(kind, lo, hi, mantissa bits, min exponent) of a dtype whose values this pass reasons
    about, else None (narrow formats other than bf16 have saturation rules of their own)."""
    if dt.kind == "bool":
        return ("bool", 0, 1, None, None)
    if is_narrow(dt) and dt.short != "bf16":
        return None
    if dt.is_int:
        i = np.iinfo(dt.np)
        return ("int", int(i.min), int(i.max), None, None)
    if dt.is_float:
        f = ml_dtypes.finfo(dt.np)
        return ("float", None, None, int(f.nmant), (int(f.minexp), int(f.maxexp)))
    return None


def exact_cast(a: DType, b: DType) -> bool:
    """True when every value of dtype a converts to dtype b exactly (and so back again)."""
    ra, rb = _range(a), _range(b)
    if ra is None or rb is None:
        return False
    if ra[0] == "bool":
        return True  # 0 and 1 exist in every type; nonzero -> true recovers them
    if rb[0] == "bool":
        return False
    if ra[0] == "int" and rb[0] == "int":
        return rb[1] <= ra[1] and ra[2] <= rb[2]
    if ra[0] == "int" and rb[0] == "float":  # integers exact up to 2**(mantissa bits + 1)
        return max(-ra[1], ra[2]) <= 2 ** (rb[3] + 1)
    if ra[0] == "float" and rb[0] == "float":
        (amin, amax), (bmin, bmax) = ra[4], rb[4]
        return rb[3] >= ra[3] and bmin <= amin and bmax >= amax
    return False  # float -> int truncates


def _training(op: Op, module: Module) -> bool:
    """Dropout's training_mode: True unless it is absent or a constant false."""
    if len(op.operands) <= 2 or op.operands[2] is None:
        return False
    t = const_value(op.operands[2], module.weights)
    return t is None or bool(np.asarray(t).reshape(-1)[0])


class _Simplify:
    def __init__(self, module: Module):
        self.module = module
        self.names = NameGen(value_names(module))
        self.subst = Substitution()
        self.counts: Counter = Counter()

    def region(self, r: Region, used: set[int]) -> None:
        returned = {id(v) for v in r.results}
        new_ops: list[Op] = []
        b = Builder(Region([], new_ops, []), self.module.weights, self.names)
        for op in r.ops:
            self.subst.apply(op)
            for _, sub in op.regions():
                self.region(sub, used)
            if op.name == "Dropout" and self._dropout(op, b, used, returned):
                continue
            if op.name == "Cast" and self._cast(op, returned):
                continue
            if op.name in VIEWS and self._view(op, b, returned):
                continue
            new_ops.append(op)
        r.ops = new_ops
        self.subst.apply_results(r)

    def _dropout(self, op: Op, b: Builder, used: set[int], returned: set[int]) -> bool:
        """True when the op is gone (its output reads the input through subst)."""
        if _training(op, self.module):
            return False
        if len(op.results) == 2:
            mask = op.results[1]
            if id(mask) not in used and id(mask) not in returned:
                op.results = op.results[:1]
                self.counts["Dropout mask dropped"] += 1
            elif id(mask) not in returned and mask.type.is_static and \
                    int(np.prod(mask.type.shape, dtype=np.int64)) <= FOLD_MAX_ELEMENTS:
                self.subst[mask] = b.constant(np.ones(mask.type.shape, np.bool_), mask.name + "_true",
                                              op.loc, weight_hint=mask.name)
                op.results = op.results[:1]
                self.counts["Dropout mask -> const"] += 1
        if len(op.results) == 1 and id(op.results[0]) not in returned:
            self.subst[op.results[0]] = op.operands[0]
            self.counts["Dropout"] += 1
            return True
        return False

    def _cast(self, op: Op, returned: set[int]) -> bool:
        x = op.operands[0]
        inner = x.producer
        if inner is None or inner.name != "Cast":
            return False
        src = inner.operands[0]
        a, bt, c = src.type.dtype, x.type.dtype, op.results[0].type.dtype
        if not exact_cast(a, bt):
            return False
        if c == a and id(op.results[0]) not in returned:
            self.subst[op.results[0]] = src
            self.counts["Cast round trip"] += 1
            return True
        op.operands = [src]  # Cast_C(x) directly; the inner Cast may now be unread
        self.counts["Cast chain"] += 1
        return False

    def _view(self, op: Op, b: Builder, returned: set[int]) -> bool:
        x = op.operands[0]
        inner = x.producer
        res = op.results[0]
        if inner is None or inner.name not in VIEWS or not res.type.is_static or 0 in res.type.shape:
            return False  # (a 0 in a Reshape shape would mean "copy this dim")
        src = inner.operands[0]
        if not src.type.is_static:
            return False
        if src.type == res.type and id(res) not in returned:
            self.subst[res] = src
            self.counts["view chain -> nothing"] += 1
            return True
        shape = b.constant(np.asarray(res.type.shape, np.int64), res.name + "_shape", op.loc)
        if op.name == "Reshape" and not op.attrs.allowzero:
            op.operands = [src, shape]
        else:  # a new op in place (same result Value, so its name and users stay)
            attrs = registry.make_attrs(registry.get("Reshape").attrs, {}, "Reshape")
            b.region.ops.append(Op("Reshape", [src, shape], [res], attrs, op.loc))
            self.counts["view chain -> Reshape"] += 1
            return True
        self.counts["view chain -> Reshape"] += 1
        return False


def rewrite(module: Module) -> Counter:
    """The rewrites done, by kind (what `run` reports as changed; tools print it)."""
    s = _Simplify(module)
    for f in module.functions:
        s.region(f, used_values(f))
    return s.counts


def run(module: Module) -> bool:
    return bool(rewrite(module))

