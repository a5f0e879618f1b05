"""BatchNormalization folded into the preceding Conv / Gemm / MatMul weights.

Rewrites: an inference BatchNormalization (training_mode 0, its running-mean/var results unread)
whose scale, bias, mean and var are constants, reading the result of
- a Conv (any group) with a constant weight W[O, C/g, k...] and an optional constant bias,
- a Gemm with a constant B (transB either way) and an optional constant C,
- a 2-D MatMul with a constant B[K, M],
where that result has no other reader and is no function/region result, becomes that one op with
  f  = scale / sqrt(var + epsilon)            (per output channel)
  W' = W * f    (Conv: each output channel; Gemm/MatMul: each output column)
  b' = (b - mean) * f + bias                  (Conv bias / Gemm C with beta folded in, beta = 1;
                                               MatMul gets an Add of b')
computed in float64 and stored in the weight's dtype, as new weights in the module's WeightStore
(small ones inline) so that big folded weights stay in weights.bin. The op takes over the BN's
result Value, so the name the BN's readers (or the model's outputs) see is unchanged.
A weight that is not a `const` but is computed from constants only (light_resnet50's
ConstantOfShape weights, left unfolded because they are big) is scaled by a `Mul` with the
constant per-channel factor instead: an input-independent op, so the CUDA backend runs it once at
load (codegen/init_phase.py), never per run.
Requires: a verified module; constants folded first (the BN parameters must be `const`s).
Not rewritten: a BN with no such producer stays (it is one elementwise kernel; the fusion passes
after this one merge it into its neighbours).
Linear: one sweep per region, use counts computed once; the moved op is re-emitted at the BN's
place (all its operands are defined earlier, its only reader was the BN).
"""
from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from nnc.ir import registry
from nnc.ir.builder import Builder, const_value
from nnc.ir.graph import Function, Module, NameGen, Op, Region, users, value_names


def _input_independent(f: Function) -> set[int]:
    """ids of values computed from constants only by deterministic ops (no regions): the values
    the CUDA backend computes once at load."""
    out: set[int] = set()
    for op in f.ops:
        if op.name == "const" or op.regions() or not registry.get(op.name).foldable:
            continue
        if all(v is None or id(v) in out or (v.producer is not None and v.producer.name == "const")
               for v in op.operands):
            out.update(id(r) for r in op.results)
    return out


class _Fold:
    def __init__(self, module: Module, f: Function):
        self.module = module
        self.names = NameGen(value_names(module))
        self.uses = users(f)
        self.init = _input_independent(f)
        self.counts: Counter = Counter()

    def _const(self, v):
        return None if v is None else const_value(v, self.module.weights)

    def _bn_params(self, bn: Op):
        if bn.attrs.training_mode or any(self.uses.get(id(r)) for r in bn.results[1:]):
            return None
        vals = [self._const(v) for v in bn.operands[1:5]]
        if any(a is None for a in vals):
            return None
        s, bb, m, v = (np.asarray(a, np.float64).reshape(-1) for a in vals)
        f = s / np.sqrt(v + np.float64(bn.attrs.epsilon))
        return f, bb - m * f, m, bb

    def region(self, r: Region) -> None:
        returned = {id(v) for v in r.results}
        new_ops: list = []
        pos: dict[int, int] = {}  # id(op) -> its index in new_ops (Conv/Gemm/MatMul only)
        b = Builder(Region([], new_ops, []), self.module.weights, self.names)
        for op in r.ops:
            for _, sub in op.regions():
                self.region(sub)
            if op.name == "BatchNormalization":
                prod = op.operands[0].producer
                if prod is not None and id(prod) in pos and self._fold(prod, op, b, returned):
                    new_ops[pos.pop(id(prod))] = None  # the producer was re-emitted here
                    continue
            if op.name in ("Conv", "Gemm", "MatMul"):
                pos[id(op)] = len(new_ops)
            new_ops.append(op)
        r.ops = [op for op in new_ops if op is not None]

    def _weight(self, w, factor: np.ndarray, b: Builder, hint: str, loc):
        """W * factor (broadcast): a new constant, or a Mul for an input-independent W."""
        a = self._const(w)
        if a is not None:
            wf = (np.asarray(a, np.float64) * factor).astype(a.dtype)
            return b.constant(wf, hint, loc, weight_hint=hint)
        if id(w) not in self.init:
            return None
        fc = b.constant(factor.astype(w.type.dtype.np), hint + "_scale", loc)
        return b.create("Mul", [w, fc], names=[hint], loc=loc)[0]

    def _fold(self, prod: Op, bn: Op, b: Builder, returned: set[int]) -> bool:
        x = bn.operands[0]
        if len(prod.results) != 1 or len(self.uses.get(id(x), ())) != 1 or id(x) in returned:
            return False
        p = self._bn_params(bn)
        if p is None:
            return False
        f, shift, m, bb = p
        w = prod.operands[1]
        dt = x.type.dtype.np
        if prod.name == "Conv":
            if w.type.shape is None or len(w.type.shape) < 1 or w.type.shape[0] != f.size:
                return False
            bias = prod.operands[2] if len(prod.operands) > 2 else None
            bv = self._const(bias)
            if bias is not None and bv is None:
                return False
            nw = self._weight(w, f.reshape((-1,) + (1,) * (len(w.type.shape) - 1)), b,
                              f"{w.name}_bn", prod.loc)
            if nw is None:
                return False
            b0 = np.zeros(f.size) if bv is None else np.asarray(bv, np.float64).reshape(-1)
            nb = b.constant(((b0 - m) * f + bb).astype(dt), f"{x.name}_bn_bias", prod.loc,
                            weight_hint=f"{x.name}_bn_bias")
            prod.operands = [prod.operands[0], nw, nb]
        elif prod.name == "Gemm":
            if len(x.type.shape) != 2 or x.type.shape[1] != f.size:
                return False
            c = prod.operands[2] if len(prod.operands) > 2 else None
            cv = self._const(c)
            if c is not None and cv is None:
                return False
            col = f.reshape(-1, 1) if prod.attrs.transB else f.reshape(1, -1)
            nw = self._weight(w, col, b, f"{w.name}_bn", prod.loc)
            if nw is None:
                return False
            c0 = 0.0 if cv is None else np.asarray(cv, np.float64) * prod.attrs.beta
            nc = b.constant(((c0 - m) * f + bb).astype(dt), f"{x.name}_bn_bias", prod.loc,
                            weight_hint=f"{x.name}_bn_bias")
            prod.operands = [prod.operands[0], nw, nc]
            prod.attrs = dataclasses.replace(prod.attrs, beta=1.0)
        else:  # MatMul: only a 2-D product has the BN's channel axis (1) as the weight's columns
            if len(x.type.shape) != 2 or w.type.shape is None or len(w.type.shape) != 2 or \
                    x.type.shape[1] != f.size or len(prod.operands[0].type.shape or ()) != 2:
                return False
            nw = self._weight(w, f.reshape(1, -1), b, f"{w.name}_bn", prod.loc)
            if nw is None:
                return False
            prod.operands = [prod.operands[0], nw]
        res = bn.results[0]
        if prod.name == "MatMul":
            nb = b.constant(shift.astype(dt), f"{x.name}_bn_bias", prod.loc, weight_hint=f"{x.name}_bn_bias")
            b.region.ops.append(prod)  # the product keeps its own result; an Add takes the BN's
            attrs = registry.make_attrs(registry.get("Add").attrs, {}, "Add")
            b.region.ops.append(Op("Add", [x, nb], [res], attrs, bn.loc))
        else:
            prod.results = [res]
            res.producer = prod
            prod.loc = bn.loc  # it now computes the BN node's output (nnc verify --per-layer maps by loc)
            b.region.ops.append(prod)
        self.counts[f"{prod.name}+BatchNormalization"] += 1
        return True


def rewrite(module: Module) -> Counter:
    """The folds done, by pattern (what `run` reports as changed; tools print it)."""
    total: Counter = Counter()
    for f in module.functions:
        fo = _Fold(module, f)
        fo.region(f)
        total += fo.counts
    return total


def run(module: Module) -> bool:
    return bool(rewrite(module))
