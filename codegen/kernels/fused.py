"""Lowering of `fused` (ir/ops/fused.py), the fusion groups of compiler/passes/.

The fallback, `lower_body`, takes ANY fused op at the lowest priority: it lowers the body's ops one
by one as if they stood in the function, so every group compiles even when no family renders it
as one kernel (a kind nobody lowers yet, or a family that declined). For the body's duration the
Lowerer's value equivalence (`Lowerer.equiv`, consulted by buffer/result_buffer/is_output and
LowerCtx.value) maps
- each body argument to the fused op's operand (its buffer, and its compile-time value when the
  operand is a const: a Reshape's shape stays known inside the body),
- each body result to the fused op's result (graph outputs keep their names and io_index),
so intermediate values get buffers of their own, named after the body's values.
Families that render a whole group as one kernel register at higher priority (e.g. "elementwise",
codegen/kernels/fused_elementwise.py); when none applies (or a legacy one declines) this, the
Variant "fused.op_by_op" (codegen/variants.py: it applies to every group), runs.
"""
from __future__ import annotations

from .. import init_phase
from ..lower import DYNAMIC_OPS, LowerCtx
from ..variants import Variant, register

FALLBACK_PRIORITY = -1000  # below every family's lowering of `fused`


def lower_body(ctx: LowerCtx) -> None:
    """Lowers ctx.op's body op by op into the current launch list (run or init phase)."""
    L, op = ctx.L, ctx.op
    body = op.attrs.body
    bound: list[int] = []
    extra: list[tuple] = []  # (outer result, body value already bound): a body value returned twice
    try:
        for inner, outer in zip(body.args, op.operands):
            L.equiv[id(inner)] = L.canon(outer)
            bound.append(id(inner))
        for inner, outer in zip(body.results, op.results):
            if id(inner) in L.equiv:
                extra.append((outer, inner))
                continue
            L.equiv[id(inner)] = L.canon(outer)
            bound.append(id(inner))
        init = L.init_values  # body args standing for init values are init values too
        init.update(id(a) for a, v in zip(body.args, op.operands) if _is_init(L, v))
        for bop in body.ops:
            if bop.name == "const":  # buffers of body consts are made lazily, like the function's
                continue
            if init_phase.is_init_op(bop, init, DYNAMIC_OPS):
                # computed from constants only: once at load, as it would be unfused
                init.update(id(r) for r in bop.results)
                init.update(id(L.canon(r)) for r in bop.results)
                L.lower_init_op(bop)
            else:
                L.lower_op(bop)
        for outer, inner in extra:
            dst = L.result_buffer(outer)
            ctx.copy(dst, L.buffer(inner))
    finally:
        for k in bound:
            L.equiv.pop(k, None)
    ctx.emitted += 1  # lowered (a body of views only emits no launch, yet it is done)


def _is_init(L, v) -> bool:
    v = L.canon(v)
    return id(v) in L.init_values or (v.producer is not None and v.producer.name == "const")


def _render(ctx: LowerCtx, problem, params: dict):
    lower_body(ctx)
    return True


OP_BY_OP = register(Variant("fused.op_by_op", "fused", ("fused",), _render, priority=FALLBACK_PRIORITY,
                            regions=True, runtime_sizes=True))  # each body op is checked by its own variants
