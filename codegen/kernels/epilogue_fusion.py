"""Lowering of the `fused` groups of compiler/passes/fuse_epilogue.py (kinds "conv_epilogue",
"gemm_epilogue"): the anchor Conv / Gemm / MatMul goes through its own fast lowering
(conv_lowering.py, gemm_lowering.py), so the same variant is chosen as for the op alone, with an
`Epilogue` (codegen/kernels/epilogue.py) saying what the kernel does after the product:

- bias steps and the anchor's own constant bias (Conv's B, a Gemm's per-column constant C times
  beta) are summed at compile time (float64) into one per-channel weight (conv: the conv's dtype,
  the template reads it so; GEMM: fp32);
- a scale step multiplies everything so far: alpha, the residual's beta and the bias;
- the residual is bound to the kernel's C operand, the activation to its epilogue activation;
- a final Cast is the output buffer's dtype (the GEMM's out_dtype).

The body is read back with the pass's own matcher (`fuse_epilogue.match_body`), so the pass and
this lowering agree on every op's role. When the anchor's lowering declines with the epilogue
(dtype, alignment, a too-small fp32 problem, non-constant conv weights on the igemm path, ...), the
group is split as the unfused pipeline would have it: the anchor alone through its usual lowerings,
then the rest of the chain as one `fused {kind = "elementwise"}` group (fused_elementwise.py, or
its own fallback); where that cannot render, this declines and the generic fallback
(codegen/kernels/fused.py) lowers the body op by op. Every kernel emitted names all ops of the
group in its header.
"""
from __future__ import annotations

import numpy as np

from ...ir.builder import const_value
from ...ir.graph import Op, Region, Value
from ...ir.ops.fused import FusedAttrs
from ...passes.fuse_epilogue import conv_channel_axis, gemm_c_is_bias, match_body
from ..lower import LowerCtx, describe_op, lowering
from . import conv_lowering, gemm_lowering
from .epilogue import Epilogue
from .fused_elementwise import can_render

PRIORITY = 20  # above the generic fallback (fused.FALLBACK_PRIORITY); kind-specific (`when`); unique
# per op (fused_elementwise.py has 10)
KINDS = ("conv_epilogue", "gemm_epilogue")
ANCHOR_LOWERING = {"Conv": conv_lowering._conv, "Gemm": gemm_lowering._gemm, "MatMul": gemm_lowering._matmul}


@lowering("fused", priority=PRIORITY, regions=True, when=lambda op: op.attrs.kind in KINDS)
def _fused_epilogue(ctx: LowerCtx):
    L, op = ctx.L, ctx.op
    body = op.attrs.body
    outer = {id(a): v for a, v in zip(body.args, op.operands)}

    def const_of(v):
        return const_value(outer.get(id(v), v), L.module.weights)

    ch = match_body(body, const_of)
    if ch is None or len(op.results) != 1:
        return None
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
    alpha, beta, residual, act, act_params = 1.0, 1.0, None, "none", ()
    for s in ch.steps:
        if s.role == "bias":
            v = np.broadcast_to(np.asarray(const_of(s.operand), np.float64).reshape(-1), (chan,))
            bias = v if bias is None else bias + v
        elif s.role == "residual":
            residual = s.operand
        elif s.role == "scale":
            alpha, beta = alpha * s.scale, beta * s.scale
            bias = None if bias is None else bias * s.scale
        elif s.role == "act":
            act, act_params = s.act, s.act_params

    n_buf, n_launch = len(L.buffers), len(L.launches)
    bound = []
    try:
        # body arguments stand for the fused op's operands, the anchor's result for the group's
        # result: the anchor's lowering writes the group's output directly
        for inner, v in zip(body.args, op.operands):
            L.equiv[id(inner)] = L.canon(v)
            bound.append(id(inner))
        L.equiv[id(body.results[0])] = L.canon(op.results[0])
        bound.append(id(body.results[0]))
        L.equiv[id(anchor.results[0])] = L.canon(op.results[0])
        bias_buf = None
        if bias is not None:
            dt = anchor.results[0].type.dtype.np if conv else np.dtype(np.float32)
            bias_buf = ctx.new_weight(np.ascontiguousarray(bias.astype(dt)), "epilogue_bias")
        epi = Epilogue(bias=bias_buf, residual=None if residual is None else L.buffer(residual),
                       act=act, act_params=act_params, alpha=alpha, beta=beta)
        a_op = anchor
        if len(operands) != len(anchor.operands):  # without the bias it gave up; results not re-owned
            a_op = Op(anchor.name, operands, [], anchor.attrs, anchor.loc)
            a_op.results = anchor.results
        actx = LowerCtx(L, a_op)
        actx._desc = describe_op(anchor)  # headers name the body's own ops (below), not the copy
        try:
            ret = ANCHOR_LOWERING[anchor.name](actx, epi)
        finally:
            L.equiv.pop(id(anchor.results[0]), None)
        if ret is None and not actx.emitted:
            if len(L.buffers) == n_buf + (bias_buf is not None):
                del L.buffers[n_buf:]  # the bias weight nobody reads
            return _split(ctx, body)
    finally:
        for k in bound:
            L.equiv.pop(k, None)
    descs = [describe_op(b) for b in body.ops]
    for launch in L.launches[n_launch:]:
        if launch.kernel is not None:
            for d in descs:
                L.kernels[launch.kernel].add_op(d)
    ctx.emitted += actx.emitted
    return True


def _split(ctx: LowerCtx, body: Region):
    """The anchor alone (its lowerings by priority), then the chain after it as one elementwise
    group; None (nothing emitted) when the chain is not elementwise-renderable."""
    L = ctx.L
    anchor, tail = body.ops[0], body.ops[1:]
    if not all(can_render(t) for t in tail):
        return None
    L.lower_op(anchor)
    # the tail as its own closed region (copies of its ops reading fresh arguments)
    new, args, ext, ops = {}, [], [], []
    for t in tail:
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
    group = Op("fused", ext, [], FusedAttrs(Region(args, ops, [new[id(body.results[0])]]), "elementwise",
                                            "the chain of a declined epilogue group"), tail[0].loc)
    group.results = [body.results[0]]  # stands for the fused op's result (bound by the caller)
    L.lower_op(group)
    ctx.emitted += 1
    return True
