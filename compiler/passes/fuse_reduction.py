"""Reduction fusion: row reductions over the last axis together with the elementwise ops that
feed them (prologue) and use them (epilogue) become one `fused {kind = "rowreduce"}` op each,
lowered to ONE kernel, one CTA per row (codegen/kernels/fused_reduction.py).

    %s = Div(%qk, %c)    : f16[1,12,128,128]          %p = fused(%qk, %c, %mask) {body = region(...) {
    %m = Add(%s, %mask)  : f16[1,12,128,128]    ->         Div, Add, Softmax
    %p = Softmax(%m) {axis = -1}                        }, kind = "rowreduce"} : f16[1,12,128,128]

A group lives on one row domain F = [..., C] (C > 1), the shape its reductions read; its values
are F-shaped (per element) or R-shaped ([..., 1], per row). Members:
- row cores (`row_core` of the lowering): ReduceSum/Mean/Max/Min over the last axis with keepdims,
  Softmax/LogSoftmax and LayerNormalization/RMSNormalization over the last axis (one result);
- elementwise ops the elementwise family renders (`can_render`) whose result is F- or R-shaped.
So besides the cores with their mask Add / scale / residual Add / Cast, the forms written out as
ops fuse as one group too: mean-variance LayerNorm (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt,
Div, Mul, Add), Softmax as Exp/ReduceSum/Div, RMSNorm as Pow/ReduceMean/Add/Sqrt/Div/Mul.
Operands from outside the group broadcast (the [B,1,1,S] attention mask is read in place).

Groups: one sweep in program order with union-find, as fuse-elementwise: an op joins the open
groups of the values it reads when their domains agree (a group without a core yet has only a
shape: it agrees with F when that shape is F or R). A group is closed once an op outside it reads
one of its values (convexity: ir/outline.py outlines at the group's last op). Groups without a
core are dropped (fuse-elementwise takes those), as are groups of one op. Ops computed from
constants only (the load-time init phase) are left alone.

Must hold: a verified module; runs after fuse-epilogue (a residual Add already in a GEMM's
epilogue stays there; ops inside fused ops are not looked at again) and before fuse-elementwise
(which would otherwise take the prologue/epilogue ops into elementwise groups), after the
precision passes. Linear time: O(ops) plus near-constant union-find.
"""
from __future__ import annotations

from nnc.codegen.init_phase import input_independent
from nnc.codegen.kernels.fused_elementwise import can_render
from nnc.codegen.kernels.fused_reduction import FLOATS, KIND, data_operands, row_core, row_shape
from nnc.codegen.lower import DYNAMIC_OPS
from nnc.ir.builder import const_value
from nnc.ir.graph import Module, Op
from nnc.ir.op_groups import OpGroups
from nnc.ir.outline import Outliner
from nnc.ir.outline import _reads  # operands, and the outer values an op's regions read


class _Groups(OpGroups):
    """OpGroups whose roots also hold their domain F (None before a core joins) and their shape
    (the elementwise result shape while the domain is None)."""

    def __init__(self):
        super().__init__()
        self.domain: dict[int, tuple | None] = {}
        self.shape: dict[int, tuple] = {}

    def new(self, i, op, domain, shape):
        super().new(i, op)
        self.domain[i], self.shape[i] = domain, shape

    def agree(self, a, b) -> bool:
        da, db = self.domain[a], self.domain[b]
        if da is not None and db is not None:
            return da == db
        if da is None and db is None:
            return self.shape[a] == self.shape[b]
        d, s = (da, self.shape[b]) if da is not None else (db, self.shape[a])
        return s in (d, row_shape(d))

    def _merged(self, root, gone):
        if self.domain[root] is None:
            self.domain[root], self.shape[root] = self.domain[gone], self.shape[gone]
        del self.domain[gone], self.shape[gone]


def _floats(op: Op) -> bool:
    """Every value of the op is f16/bf16/f32 (what the row kernel computes in)."""
    return all(v.type.dtype.short in FLOATS for v in [*op.results, *(x for x in op.operands if x is not None)])


def find_groups(func, weights=None) -> list[list[Op]]:
    """The rowreduce groups of `func`'s top level (>= 2 ops, one core at least), in program order."""
    init = input_independent(func, DYNAMIC_OPS)
    const_of = lambda v: const_value(v, weights)  # noqa: E731
    g = _Groups()
    group_of_value: dict[int, int] = {}
    for i, op in enumerate(func.ops):
        read_groups = []
        for v in _reads(op):
            j = group_of_value.get(id(v))
            if j is not None:
                read_groups.append(g.find(j))
        joined = None
        if op.name != "const" and not (op.results and id(op.results[0]) in init):
            core = row_core(op, const_of)
            if core is not None:
                F = tuple(op.operands[0].type.shape)
                g.new(i, op, F, F)
            elif can_render(op) and _floats(op):
                s = tuple(op.results[0].type.shape)
                g.new(i, op, None, s)
            if i in g.parent:
                joined = i
                data = {id(v) for v in data_operands(op)}
                for v in _reads(op):  # the groups this op may join: those whose values it reads as data
                    j = group_of_value.get(id(v))
                    if j is None or id(v) not in data:
                        continue
                    r = g.find(j)
                    if r != joined and g.open.get(r) and g.agree(r, joined):
                        joined = g.union(r, joined)
                for r in op.results:
                    group_of_value[id(r)] = i
        for r in dict.fromkeys(read_groups):  # read from outside: that group can grow no further
            r = g.find(r)
            if r != (g.find(joined) if joined is not None else None):
                g.open[r] = False
    return g.in_program_order(func, [r for r, ops in g.ops.items() if len(ops) >= 2 and g.domain[r] is not None])


def run(module: Module) -> bool:
    f = module.main
    groups = find_groups(f, module.weights)
    if not groups:
        return False
    out = Outliner(f, module=module)
    changed = False
    for group in groups:
        if out.can_outline(group):
            out.outline(group, kind=KIND)
            changed = True
    out.finish()
    return changed
