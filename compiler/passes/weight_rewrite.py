"""The region walk the weight-rewriting passes share (quantize-weights-int4, sparsify-weights-24):
each op of a region, nested regions first, is offered to the pass's `op(op, builder, uses,
returned, drop)`; an op it rewrites (True) is replaced by what it built into the new op list, and
the ops it folded (their ids put in `drop`, e.g. a bias Add or an activation after a MatMul) are
left out. Holds before: the region's values have their producers and users (ir.graph.users)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from nnc.ir.builder import Builder, const_value
from nnc.ir.graph import Op, Region, users


def float_weight_kn(op: Op, weights) -> Optional[np.ndarray]:
    """The constant float weight W [K, N] (Gemm's transB folded, contiguous) of a MatMul, or of a
    Gemm without transA / alpha, whose input is a float tensor of rank >= 1; else None."""
    if op.name not in ("MatMul", "Gemm") or len(op.results) != 1:
        return None
    if op.name == "Gemm" and (op.attrs.transA or op.attrs.alpha != 1.0):
        return None
    x = op.operands[0]
    w = const_value(op.operands[1], weights)
    if not x.type.dtype.is_float or x.type.rank is None or x.type.rank < 1 or w is None or w.ndim != 2:
        return None
    if w.dtype.kind != "f" and w.dtype.name != "bfloat16" or w.dtype == np.float64 or w.size == 0:
        return None
    return np.ascontiguousarray(w.T if op.name == "Gemm" and op.attrs.transB else w)


class WeightOpRewriter:
    """Base of a pass that rewrites single ops with constant weights; the subclass sets
    self.module and self.names and implements op()."""

    def op(self, op: Op, b: Builder, uses: dict, returned: set, drop: set) -> bool:
        raise NotImplementedError

    def region(self, r: Region) -> None:
        new_ops: list = []
        b = Builder(Region([], new_ops, []), self.module.weights, self.names)
        uses, returned, drop = users(r), {id(v) for v in r.results}, set()
        for op in r.ops:
            if id(op) in drop:
                continue
            for _, sub in op.regions():
                self.region(sub)
            if self.op(op, b, uses, returned, drop):
                continue
            new_ops.append(op)
        r.ops = new_ops
