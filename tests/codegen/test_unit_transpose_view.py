"""A Transpose that only moves extent-1 dims (torch MHA's seq-first [1,S,E] <-> [S,1,E] at batch 1,
around ViT's attention) keeps every byte in place: codegen/kernels/movement.py lowers it as a view
(no strided copy), a graph output still gets its own copy, and the plan computes what the
interpreter does."""
from __future__ import annotations

import numpy as np

from nnc.codegen.lower import lower
from nnc.codegen.plan_exec import PlanExecutor
from nnc.ir import parse
from nnc.ir.interp import Interpreter
from nnc.ir.weights import WeightStore

TEXT = """func @main(%x: f32[1,4,8], %w: f32[8,8], %z: f32[2,1,3]) -> (f32[4,1,8], f32[1,4,8], f32[3,1,2]) {
  %t = Transpose(%x) {perm = [1, 0, 2]} : f32[4,1,8]
  %m = MatMul(%t, %w) : f32[4,1,8]
  %u = Transpose(%m) {perm = [1, 0, 2]} : f32[1,4,8]
  %a = Add(%u, %x) : f32[1,4,8]
  %r = Transpose(%z) {perm = [2, 1, 0]} : f32[3,1,2]
  return %t, %a, %r
}
"""


def test_unit_move_transpose_is_a_view(rng):
    m = parse(TEXT)
    m.weights = WeightStore()
    plan = lower(m, {"arch": "sm_90", "precision": "fp32"})
    copies = [l for l in plan.launches if l.kernel and plan.kernels[l.kernel].template == "strided_copy.cu.j2"]
    # %u: a view; %t: a graph output (copied, not a transpose kernel); %r really reorders [2,3]
    assert len(copies) == 1 and "transpose" in copies[0].kernel, [l.kernel for l in plan.launches]
    ex = PlanExecutor.from_plan(plan, m)
    feed = {a.name: rng.standard_normal([int(d) for d in a.type.shape]).astype(np.float32) for a in m.main.args}
    want = Interpreter(m).run(feed)
    got = ex.run(feed)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
