"""`fused`: a fusion group, the ops a fusion pass chose to run as one kernel.

    %y = fused(%x, %w, %b) {kind = "conv_epilogue", body = region(%x_, %w_, %b_) {
      %c = Conv(%x_, %w_) ...
      %a = Add(%c, %b_) ...
      %r = Relu(%a) ...
      return %r
    }} : f16[1,64,56,56]

- The body is closed: it reads only its arguments (one per operand, same types, in order) and
  consts of its own, never values of the enclosing function, so lowering sees the whole group
  and passes outside it cannot change what it computes.
- The results are the body's results: every value of the group that is used outside it.
- `kind` names the lowering family that takes the group ("elementwise", "conv_epilogue",
  "gemm_epilogue", ...); `params` holds what that family decided (tiles, the selector's choice),
  so dumps and kernel headers show it.
- Reference semantics: run the body. The interpreter, and therefore `nnc verify --per-layer`,
  still sees every op inside.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..graph import Region
from ..registry import register


@dataclass(frozen=True)
class FusedAttrs:
    body: Region
    kind: str = ""
    params: str = ""  # the lowering's decisions, e.g. "tile=128x128x32 stages=3" (free-form, printed)


def _fused_infer(ctx):
    body = ctx.attrs.body
    if len(body.args) != ctx.n:
        ctx.fail(f"body takes {len(body.args)} arguments, the op has {ctx.n} operands")
    for i, a in enumerate(body.args):
        if ctx.has(i) and a.type != ctx.type(i):
            ctx.fail(f"body argument {i} (%{a.name}) has type {a.type}, operand {i} is {ctx.type(i)}")
    inside = {id(a) for a in body.args}
    for op in body.ops:
        if op.regions():
            ctx.fail(f"{op.name} in a fused body: ops with regions are not fused")
        for v in op.operands:
            if v is not None and id(v) not in inside:
                ctx.fail(f"body reads %{v.name} from outside (a fused body reads only its arguments)")
        inside.update(id(r) for r in op.results)
    for v in body.results:
        if id(v) not in inside:
            ctx.fail(f"body returns %{v.name}, which it does not define")
    if len(body.results) != ctx.num_results:
        ctx.fail(f"body returns {len(body.results)} values, the op has {ctx.num_results} results")
    return [v.type for v in body.results]


def _fused_ref(a: FusedAttrs, *operands, ctx):
    return tuple(ctx.run_region(a.body, list(operands)))


register("fused", FusedAttrs, infer=_fused_infer, ref=_fused_ref, inputs=(0, -1), outputs=(1, -1),
         ref_ctx=True, doc="A fusion group: the body's ops run as one kernel (kind names its lowering).")
