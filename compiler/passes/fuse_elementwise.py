"""Elementwise fusion: maximal groups of elementwise and broadcast ops become one
`fused {kind = "elementwise"}` op each, lowered to ONE kernel that computes the group's whole
expression DAG per output element (codegen/kernels/fused_elementwise.py).

    %a = Add(%x, %b) : f32[1,64,56,56]                %a, %r = fused(%x, %b, %s) {body = region(...) {
    %m = Mul(%a, %s) : f32[1,64,56,56]        ->         Add, Mul, Relu
    %r = Relu(%m)    : f32[1,64,56,56]                 }, kind = "elementwise"} : f32[1,64,56,56], ...

What is elementwise: an op the elementwise kernel family can render as one expression
(`can_render` of codegen/kernels/fused_elementwise.py, i.e. in the family's expression table:
unary math, binary arithmetic/compare/logic with broadcasting, Where, Clip, Cast, activations
such as Relu/Sigmoid/Tanh/Gelu/Erf/LeakyRelu/HardSigmoid/Softplus), with one result, static
shapes and plain dtypes (f32/f64/f16/bf16, integers, bool; not the narrow f8/i4 types).

Groups (one sweep in program order, union of producer groups): an elementwise op joins the groups
of the elementwise ops whose results it reads when
- its result has the group's shape: every op of a group produces the same shape, so every result
  of the fused op has the output shape; operands from outside may broadcast (index math in the
  kernel);
- the group is still open: no op outside it has read one of its values yet. Otherwise the group
  would not be convex in program order (ir/outline.py outlines it at its last op, after that
  reader), so it is closed and later ops start new groups.
Ops computed from constants only (the load-time init phase, codegen/init_phase.py) are left alone:
unfused they run once at load, fused they would run every time. Groups of one op stay as they are.
Only the main function's top level is fused (the CUDA backend has no control flow left).

Must hold: a verified module; run after the cleanups (cse, simplify, fold-batchnorm) and after
fuse-epilogue, which takes conv/gemm + the elementwise chain after them first (ops already inside
a fused op are not looked at again), and after the precision pass (to-fp16/bf16 keeps ops with
regions at f32). Linear time: O(ops) plus near-constant union-find.
"""
from __future__ import annotations

from nnc.codegen.init_phase import input_independent
from nnc.codegen.kernels.fused_elementwise import can_render
from nnc.codegen.lower import DYNAMIC_OPS
from nnc.ir.graph import Module, Op
from nnc.ir.op_groups import OpGroups
from nnc.ir.outline import Outliner
from nnc.ir.outline import _reads  # operands, and the outer values an op's regions read

KIND = "elementwise"


class _Groups(OpGroups):
    """OpGroups whose roots also hold the shape every member result has."""

    def __init__(self):
        super().__init__()
        self.shape: dict[int, tuple] = {}

    def new(self, i: int, op: Op) -> None:
        super().new(i, op)
        self.shape[i] = tuple(op.results[0].type.shape)

    def _merged(self, root: int, gone: int) -> None:
        del self.shape[gone]


def find_groups(func) -> list[list[Op]]:
    """The fusion groups of `func`'s top level (>= 2 ops each), in program order of their first op."""
    init = input_independent(func, DYNAMIC_OPS)
    g = _Groups()
    group_of_value: dict[int, int] = {}  # id(value) -> index of the op (in g) that made it
    for i, op in enumerate(func.ops):
        read_groups = []
        for v in _reads(op):
            j = group_of_value.get(id(v))
            if j is not None:
                read_groups.append(g.find(j))
        joined = None
        if op.name != "const" and can_render(op) and not (op.results and id(op.results[0]) in init):
            g.new(i, op)
            joined = i
            shape = g.shape[i]
            for r in dict.fromkeys(read_groups):
                if g.open.get(r) and g.shape[r] == shape:
                    joined = g.union(r, joined)
            for r in op.results:
                group_of_value[id(r)] = i
        for r in dict.fromkeys(read_groups):  # read from outside: that group can grow no further
            r = g.find(r)
            if r != (g.find(joined) if joined is not None else None):
                g.open[r] = False
    return g.in_program_order(func, [r for r, ops in g.ops.items() if len(ops) >= 2])


def run(module: Module) -> bool:
    f = module.main
    groups = find_groups(f)
    if not groups:
        return False
    out = Outliner(f, module=module)
    changed = False
    for group in groups:
        if out.can_outline(group):  # holds by construction; checked again by the one who outlines
            out.outline(group, kind=KIND)
            changed = True
    out.finish()
    return changed
