"""The region walk the weight-rewriting passes share (quantize-weights-int4, sparsify-weights-24):
each op of a region, nested regions first, is offered to the pass's `op(op, builder, uses,
returned, drop)`; an op it rewrites (True) is replaced by what it built into the new op list, and
the ops it folded (their ids put in `drop`, e.g. a bias Add or an activation after a MatMul) are
left out. Holds before: the region's values have their producers and users (ir.graph.users)."""
from __future__ import annotations

from nnc.ir.builder import Builder
from nnc.ir.graph import Op, Region, users


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
