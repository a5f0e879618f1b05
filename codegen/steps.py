"""Steps: what each top-level IR op (or fused group) of the lowered function became.

The lowering (codegen/lower.py, `Lowerer.run`) records one `Step` per op of the main function
it lowers: the op's index in that function (the one of OUT/ir/final.nnir), the buffers of its
operands and results, the scratch temporaries its lowering allocated, and the range of launches
it emitted into `Plan.launches` and into `Plan.init_launches` (an init op emits only there; a
fused group run every time may also put constant-only parts of its body there). plan.json carries them
as "steps" (ids only). The CPU plan executor (codegen/plan_exec.py) runs the plan from them: each
step's reference semantics on views at the plan's offsets, temporaries poisoned first.

What counts as a temporary: a root temp buffer made while the op was lowered that is neither one
of its results nor the buffer of another top-level value (a fused body's intermediates, lowered
op by op by codegen/kernels/fused.py, are temporaries of the fused step).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Step:
    op: int                          # index of the op in the final IR's main function
    operands: tuple                  # buffer id per operand; None: absent, or a const with no buffer
    results: tuple                   # buffer id per result
    temps: tuple                     # scratch buffers the op's lowering allocated
    launches: tuple                  # [first, end) of what it emitted into Plan.launches
    init_launches: tuple             # [first, end) of what it emitted into Plan.init_launches
    init: bool = False               # the op itself is computed in the load-time init phase

    def to_json(self) -> dict:
        return {"op": self.op, "operands": list(self.operands), "results": list(self.results),
                "temps": list(self.temps), "launches": list(self.launches),
                "init_launches": list(self.init_launches), "init": self.init}


class StepRecorder:
    """Watches a Lowerer while it lowers each top-level op (see the module docstring)."""

    def __init__(self, lowerer, func):
        self.L = lowerer
        self.steps: list[Step] = []
        self._top = {id(a) for a in func.args}
        for op in func.ops:
            self._top.update(id(r) for r in op.results)

    def _buf_id(self, v) -> Optional[int]:
        if v is None:
            return None
        b = self.L.values.get(id(self.L.canon(v)) if hasattr(self.L, "canon") else id(v))
        return None if b is None else b.id

    @contextmanager
    def step(self, index: int, op, init: bool):
        L = self.L
        n_run, n_init, n_buf = len(L.launches), len(L.init_launches), len(L.buffers)
        yield
        results = tuple(self._buf_id(r) for r in op.results)
        res_set = set(results)
        temps = tuple(b.id for b in L.buffers[n_buf:]
                      if b.kind == "temp" and b.alias_of is None and b.id not in res_set
                      and (b.value is None or id(b.value) not in self._top))
        self.steps.append(Step(index, tuple(self._buf_id(v) for v in op.operands), results, temps,
                               (n_run, len(L.launches)), (n_init, len(L.init_launches)), init))
