"""Lowering of the `fused` groups of compiler/passes/fuse_epilogue.py (kinds "conv_epilogue",
"gemm_epilogue"): the anchor Conv / Gemm / MatMul goes through its own fast lowering
(conv_lowering.py, gemm_lowering.py), so the same variant is chosen as for the op alone, with an
`Epilogue` (codegen/kernels/epilogue.py) saying what the kernel does after the product:

- bias steps and the anchor's own constant bias (Conv's B, a Gemm's per-column constant C times
  beta) are summed at compile time (float64) into one per-channel weight (conv: the conv's dtype,
  the template reads it so; GEMM: fp32);
- a scale step multiplies everything so far: alpha, the residual's beta and the bias;
- the residual is bound to the kernel's C operand (one that broadcasts onto the result, e.g.
  fuse-horizontal's per-member bias [G, 1, 1, N], is read with zero strides along its broadcast
  axes: gemm_lowering.c_strides), the activation to its epilogue activation;
- a final Cast is the output buffer's dtype (the GEMM's out_dtype);
- a range profile (codegen/runtime_sizes.py): a Gemm/MatMul group whose rows M are symbolic
  takes the GEMM variant that runs a runtime M (gemm_lowering.runtime_rows); a residual must then
  have exactly the shape it is added onto; the split takes the rest (its parts have runtime
  sizes); the conv epilogue stays static;
- views (Reshape & co. keeping the last axis) need nothing: the GEMM writes the group's output,
  which is the same bytes; a residual added after or before one is read as the shape it was
  added onto (Epilogue.residual_onto).

The body is read back with the pass's own matcher (`fuse_epilogue.match_body`), so the pass and
this lowering agree on every op's role.

Variants (codegen/variants.py; family "epilogue", priority 20, in this order):
- "epilogue.gemm": a Gemm/MatMul anchor whose GEMM variant (gemm_lowering.FAST) applies with the
  epilogue — decided without emitting; the anchor is then lowered through the selector with its
  own variant, so plan.json names the GEMM variant and tile params of the kernel;
- "epilogue.conv": a Conv anchor through conv_lowering._conv (a legacy lowering, so this render
  may decline: dtype, alignment, a too-small fp32 problem, non-constant weights on igemm, ...);
- "epilogue.split": the group as the unfused pipeline would have it: the anchor alone through its
  usual lowerings, then the rest of the chain as one `fused {kind = "elementwise"}` group
  (fused_elementwise.py, or its own fallback); applies when that chain is elementwise-renderable.
Where none applies the generic fallback (codegen/kernels/fused.py) lowers the body op by op.
Every kernel emitted names all ops of the group in its header.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ...ir.builder import const_value
from ...ir.graph import Op, Region, Value
from ...ir.ops.fused import FusedAttrs
from ...ir.types import dtype as _dtype
from ...passes.fuse_epilogue import conv_channel_axis, gemm_c_is_bias, match_body
from ..lower import LowerCtx, Problem, TensorInfo, describe_op
from ..variants import YES, Variant, no, register
from . import conv_lowering, gemm_lowering
from .epilogue import Epilogue
from .fused_elementwise import can_render
from ._helpers import bound_body as _bound

PRIORITY = 20  # above the generic fallback (fused.FALLBACK_PRIORITY) and fused_elementwise.py (10)
KINDS = ("conv_epilogue", "gemm_epilogue")


@dataclass
class _Group:
    """What the body says, read once (pure): the anchor, its operands without a bias that moved
    into the epilogue, and the epilogue's pieces (bias: float64 values, residual: a body Value)."""
    anchor: Op
    a_op: Op  # the anchor, or a copy without its bias operand (results not re-owned)
    bias: Optional[np.ndarray]
    residual: Optional[Value]
    residual_onto: Optional[tuple]  # the shape of the value the residual is added to
    act: str
    act_params: tuple
    alpha: float
    beta: float
    conv: bool
    chan: int
    residual_onto_ir: Optional[tuple] = None  # residual_onto as the IR has it (a range profile: with its symbols)


def _group(problem: Problem):
    """The _Group of a fused epilogue op, or why not (memoised on the problem)."""
    if "epilogue" in problem.memo:
        return problem.memo["epilogue"]
    problem.memo["epilogue"] = got = _read(problem)
    return got


def _read(problem: Problem):
    L, op = problem.L, problem.op
    body = op.attrs.body
    outer = {id(a): v for a, v in zip(body.args, op.operands)}

    def const_of(v):
        return const_value(outer.get(id(v), v), L.module.weights)

    ch = match_body(body, const_of)
    if ch is None or len(op.results) != 1:
        return "the body is not an anchor and its epilogue chain"
    anchor = ch.anchor
    y_shape = tuple(anchor.results[0].type.shape)
    conv = anchor.name == "Conv"
    chan = y_shape[conv_channel_axis(anchor)] if conv else y_shape[-1]  # NHWC convs: the last axis

    # the anchor's own bias moves into the epilogue's (summed with the chain's)
    operands = list(anchor.operands)
    bias = None
    if len(operands) > 2 and operands[2] is not None:
        own = const_of(operands[2])
        if conv and own is not None and any(s.role == "bias" for s in ch.steps):
            bias = np.asarray(own, np.float64).reshape(-1)
            operands = operands[:2]
        elif not conv and gemm_c_is_bias(anchor, const_of) and float(anchor.attrs.beta) != 0.0:
            bias = float(anchor.attrs.beta) * np.broadcast_to(np.asarray(own, np.float64).reshape(-1), (chan,))
            operands = operands[:2]
    alpha, beta, residual, onto, act, act_params, onto_ir = 1.0, 1.0, None, None, "none", (), None
    for s in ch.steps:
        if s.role == "bias":
            v = np.broadcast_to(np.asarray(const_of(s.operand), np.float64).reshape(-1), (chan,))
            bias = v if bias is None else bias + v
        elif s.role == "residual":
            residual, onto = s.operand, tuple(s.op.results[0].type.shape)
            onto_ir = onto
            if any(not isinstance(d, int) for d in onto + tuple(residual.type.shape)):
                # a range profile: the kernel reads C at the max shape's strides, right at every
                # size only for a residual of exactly the shape it is added onto
                if tuple(residual.type.shape) != onto:
                    return "a residual broadcast along a symbolic dim"
                onto = L.static_shape(s.op.results[0])
        elif s.role == "scale":
            alpha, beta = alpha * s.scale, beta * s.scale
            bias = None if bias is None else bias * s.scale
        elif s.role == "act":
            act, act_params = s.act, s.act_params
    a_op = anchor
    if len(operands) != len(anchor.operands):  # without the bias it gave up; results not re-owned
        a_op = Op(anchor.name, operands, [], anchor.attrs, anchor.loc)
        a_op.results = anchor.results
    return _Group(anchor, a_op, bias, residual, onto, act, act_params, alpha, beta, conv, chan, onto_ir)


def _gemm_epilogue_info(problem: Problem, g: _Group) -> Epilogue:
    """The Epilogue as applies() knows it: TensorInfos where render makes buffers."""
    bias = TensorInfo(_dtype(np.dtype(np.float32)), (g.chan,)) if g.bias is not None else None
    res = problem.info(g.residual) if g.residual is not None else None
    return Epilogue(bias=bias, residual=res, act=g.act, act_params=g.act_params, alpha=g.alpha, beta=g.beta,
                    residual_onto=g.residual_onto)


def _epilogue_key(g: _Group) -> str:
    # a residual broadcast onto the result (a per-batch bias) reads less than a full one: its shape
    # is part of the key (a full one's key stays as it was)
    bshape = ""
    if g.residual is not None and tuple(g.residual.type.shape) != g.residual_onto_ir:
        bshape = "x".join(map(str, g.residual.type.shape))
        bshape = f"[{bshape}]"
    return (f"|epilogue(bias={g.bias is not None},residual={g.residual is not None}{bshape},act={g.act}"
            f"{list(g.act_params)},alpha={g.alpha},beta={g.beta})")


def _applies_gemm(problem: Problem):
    g = _group(problem)
    if isinstance(g, str):
        return no(g)
    fast = gemm_lowering.EPILOGUE_VARIANTS.get(g.anchor.name)
    if fast is None:
        return no("the anchor is not a Gemm/MatMul")
    with _bound(problem.L, problem.op, g.anchor):
        fits = [v.check(Problem(problem.L, g.a_op, _gemm_epilogue_info(problem, g))) for v in fast]
    return YES if any(fits) else fits[fast.index(gemm_lowering.FAST[g.anchor.name])]  # mma.sync's reason


def _make_epilogue(ctx: LowerCtx, g: _Group) -> Epilogue:
    """The real Epilogue: the summed bias as its own weight (conv: the conv's dtype; GEMM: fp32)."""
    L = ctx.L
    bias_buf = None
    if g.bias is not None:
        dt = g.anchor.results[0].type.dtype.np if g.conv else np.dtype(np.float32)
        bias_buf = ctx.new_weight(np.ascontiguousarray(g.bias.astype(dt)), "epilogue_bias")
    return Epilogue(bias=bias_buf, residual=None if g.residual is None else L.buffer(g.residual),
                    act=g.act, act_params=g.act_params, alpha=g.alpha, beta=g.beta, residual_onto=g.residual_onto)


def _name_group(ctx: LowerCtx, n_launch: int) -> None:
    """Every kernel launched for the group names all the body's ops."""
    L = ctx.L
    descs = [describe_op(b) for b in ctx.op.attrs.body.ops]
    for launch in L.launches[n_launch:]:
        if launch.kernel is not None:
            for d in descs:
                L.kernels[launch.kernel].add_op(d)


def _render_gemm(ctx: LowerCtx, problem: Problem, params: dict):
    L, g = ctx.L, _group(problem)
    n_launch = len(L.launches)
    with _bound(L, ctx.op, g.anchor):
        epi = _make_epilogue(ctx, g)
        # the anchor through the selector, restricted to its GEMM-family variants (one applies: see
        # _applies_gemm); headers name the body's own ops, not the copy
        L.lower_op(g.a_op, extra=epi, variants=gemm_lowering.EPILOGUE_VARIANTS[g.anchor.name], desc=describe_op(g.anchor),
                   key_extra=_epilogue_key(g))
    _name_group(ctx, n_launch)
    ctx.emitted += 1
    return True


def _applies_conv(problem: Problem):
    g = _group(problem)
    if isinstance(g, str):
        return no(g)
    return YES if g.conv else no("the anchor is not a Conv")


def _render_conv(ctx: LowerCtx, problem: Problem, params: dict):
    L, g = ctx.L, _group(problem)
    n_buf, n_launch = len(L.buffers), len(L.launches)
    with _bound(L, ctx.op, g.anchor):
        epi = _make_epilogue(ctx, g)
        actx = LowerCtx(L, g.a_op)
        actx._desc = describe_op(g.anchor)  # headers name the body's own ops (below), not the copy
        ret = conv_lowering._conv(actx, epi)
    if ret is None and not actx.emitted:  # declined: the next candidate (epilogue.split) runs
        if len(L.buffers) == n_buf + (epi.bias is not None):
            del L.buffers[n_buf:]  # the bias weight nobody reads
        return None
    _name_group(ctx, n_launch)
    ctx.emitted += actx.emitted
    return True


def _applies_split(problem: Problem):
    g = _group(problem)
    if isinstance(g, str):
        return no(g)
    if not all(can_render(t) for t in problem.op.attrs.body.ops[1:]):
        return no("the chain after the anchor is not elementwise-renderable")
    return YES


def closed_group(part: list, last: Value, kind: str, note: str, loc) -> Op:
    """A `fused {kind}` op over copies of the ops `part` (a closed region reading fresh arguments);
    its result is `last` itself (the caller binds it to the fused op's result)."""
    new, args, ext, ops = {}, [], [], []
    for t in part:
        operands = []
        for v in t.operands:
            if v is not None and id(v) not in new:
                new[id(v)] = Value(v.name, v.type)
                args.append(new[id(v)])
                ext.append(v)
            operands.append(None if v is None else new[id(v)])
        results = [Value(r.name, r.type) for r in t.results]
        new.update((id(r), c) for r, c in zip(t.results, results))
        ops.append(Op(t.name, operands, results, t.attrs, t.loc))
    group = Op("fused", ext, [], FusedAttrs(Region(args, ops, [new[id(last)]]), kind, note), loc)
    group.results = [last]
    return group


def _render_split(ctx: LowerCtx, problem: Problem, params: dict):
    """The anchor alone (its lowerings by priority), then the chain after it as one elementwise group."""
    L, body = ctx.L, ctx.op.attrs.body
    anchor, tail = body.ops[0], body.ops[1:]
    g = _group(problem)
    if g.anchor.name in gemm_lowering.FAST:
        # buffers in the order the GEMM variant's render makes them (operands, then the group's
        # output), as when the fused attempt made them first: the plan does not depend on
        # whether the split was decided before or after trying
        with _bound(L, ctx.op, g.anchor):
            actx = LowerCtx(L, g.a_op)
            actx.inp(0), actx.inp(1), actx.out(0)
            if g.anchor.name == "Gemm":
                actx.inp(2)
    with _bound(L, ctx.op):
        L.lower_op(anchor)
        L.lower_op(closed_group(tail, body.results[0], "elementwise", "the chain of a declined epilogue group",
                                tail[0].loc))
    ctx.emitted += 1
    return True


# runtime_sizes: a range profile's group takes its GEMM variant only where that one takes the
# runtime rows (gemm_lowering.runtime_rows; each variant's own check refuses the rest), else the split
GEMM_EPILOGUE = register(Variant("epilogue.gemm", "epilogue", ("fused",), _render_gemm, _applies_gemm,
                                 priority=PRIORITY, rank=0, kinds=KINDS, regions=True, runtime_sizes=True))
CONV_EPILOGUE = register(Variant("epilogue.conv", "epilogue", ("fused",), _render_conv, _applies_conv,
                                 priority=PRIORITY, rank=1, kinds=KINDS, regions=True, may_decline=True))
SPLIT = register(Variant("epilogue.split", "epilogue", ("fused",), _render_split, _applies_split,
                         priority=PRIORITY, rank=2, kinds=KINDS, regions=True,
                         runtime_sizes=True))  # its parts (the anchor, the elementwise chain) check their own
