"""Lowering of the `fused {kind = "dw_pw"}` groups of compiler/passes/fuse_cross_layer.py: a
depthwise 3x3 conv (+ bias + activation) and the pointwise 1x1 conv reading it (+ bias +
residual + activation), NHWC, f16/bf16.

Variants (family "dw_pw", priority 25: above the epilogue groups' 20, below flash attention's 30):
- "dw_pw.tiled": ONE kernel (templates/conv_dw_pw.cu.j2) computing the pair tile by tile, the
  depthwise tile in shared memory, the pointwise product on tensor cores (mma.sync m16n8k16).
  Space: fuse_cross_layer.tile_space (spatial tile TH x TW, pw output channels a block KN, dw
  channel chunk CC, warps) within the Target's shared memory; default: the tile the pass recorded
  in the op's params when it is in the space, else fuse_cross_layer.default_tile. Applies when
  channels are multiples of 8, the buffers 16-byte aligned, the depthwise weight a constant, and
  the space is not empty.
- "dw_pw.split": the fallback, the pair as the two groups it was before the pass (each through
  the epilogue lowerings, epilogue_fusion.py, or the Conv lowerings when it had no epilogue): two
  kernels, the depthwise result in a buffer of its own.
Every kernel emitted names all the body's ops in its header.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ...ir.builder import const_value
from ...ir.graph import Op, Value
from ...passes import fuse_cross_layer as xl
from ...passes.fuse_epilogue import match
from ..lower import LowerCtx, Problem, describe_op
from ..variants import YES, Variant, no, register
from .common import CTYPES, KernelSpec, act_ctx, kernel_name, render as _render
from .conv import MMA
from .epilogue_fusion import closed_group
from .gemm_lowering import emit_spec
from ._helpers import bound_body as _bound

PRIORITY = 25
FAMILY = "dw_pw"
KINDS = (xl.KIND,)


@dataclass
class _Half:
    conv: Op
    ops: list  # the conv and its chain, body ops in order
    bias: Optional[np.ndarray]  # float64 [channels], the conv's own constant bias + bias steps
    act: str
    act_params: tuple
    residual: Optional[Value]  # a body value


@dataclass
class _Pair:
    dw: _Half
    pw: _Half
    shape: xl.DwPwShape
    dtype: str  # numpy name


def _half(conv: Op, nxt, const_of) -> Optional[_Half]:
    ch = match(conv, nxt, const_of)
    steps = ch.steps if ch is not None else ()
    bias = None
    if len(conv.operands) > 2 and conv.operands[2] is not None:
        own = const_of(conv.operands[2])
        if own is None:
            return None
        bias = np.asarray(own, np.float64).reshape(-1)
    act, act_params, residual = "none", (), None
    chan = conv.results[0].type.shape[3]
    for s in steps:
        if s.role == "bias":
            v = np.broadcast_to(np.asarray(const_of(s.operand), np.float64).reshape(-1), (chan,))
            bias = v if bias is None else bias + v
        elif s.role == "act":
            act, act_params = s.act, s.act_params
        elif s.role == "residual":
            residual = s.operand
        else:
            return None
    return _Half(conv, [conv] + [s.op for s in steps], bias, act, act_params, residual)


def _pair(problem: Problem):
    """The group read back (memoised): the two halves, or why not."""
    if "dw_pw" in problem.memo:
        return problem.memo["dw_pw"]
    problem.memo["dw_pw"] = got = _read(problem)
    return got


def _read(problem: Problem):
    L, op = problem.L, problem.op
    body = op.attrs.body
    outer = {id(a): v for a, v in zip(body.args, op.operands)}

    def const_of(v):
        return const_value(L.canon(outer.get(id(v), v)), L.module.weights)

    ops = [b for b in body.ops if b.name != "const"]
    convs = [b for b in ops if b.name == "Conv"]
    if len(convs) != 2 or len(body.results) != 1 or len(op.results) != 1:
        return "the body is not two convs and their epilogues"
    users: dict[int, list] = {}
    for b in ops:
        for v in b.operands:
            if v is not None:
                users.setdefault(id(v), []).append(b)
    ret = {id(body.results[0])}

    def nxt(v):
        us = users.get(id(v), ())
        return None if id(v) in ret or len(us) != 1 else us[0]

    dw, pw = (_half(c, nxt, const_of) for c in convs)
    if dw is None or pw is None or dw.residual is not None:
        return "an epilogue the pair kernel does not take"
    if pw.conv.operands[0] is not dw.ops[-1].results[0] or pw.ops[-1].results[0] is not body.results[0] or \
            len(dw.ops) + len(pw.ops) != len(ops):
        return "the body is not dw -> pw"
    shape = xl.pair_shape(dw.conv, pw.conv)
    if shape is None:
        return "not an NHWC depthwise 3x3 conv and a 1x1 conv"
    return _Pair(dw, pw, shape, dw.conv.results[0].type.dtype.np.name)


# ---------------------------------------------------------------- dw_pw.tiled

def _space(problem: Problem) -> list:
    pr = _pair(problem)
    return xl.tile_space(pr.shape, problem.target.smem_per_block_optin)


def _default(problem: Problem, space: list) -> dict:
    recorded = xl.parse_tile(problem.op.attrs.params or "")
    if recorded is not None and recorded in space:
        return dict(recorded)
    pr = _pair(problem)
    return xl.default_tile(pr.shape, problem.target.smem_per_block_optin, problem.target.sm_count) or dict(space[0])


def _applies_tiled(problem: Problem):
    pr = _pair(problem)
    if isinstance(pr, str):
        return no(pr)
    s = pr.shape
    if s.C % xl.VEC or s.K % xl.VEC:
        return no(f"channels {s.C} -> {s.K} not multiples of {xl.VEC}")
    if pr.dtype not in MMA or pr.dtype == "float32":
        return no("f16/bf16 only")
    with _bound(problem.L, problem.op):
        infos = [problem.info(pr.dw.conv.operands[0]), problem.info(pr.pw.conv.operands[1]),
                 problem.info(problem.op.results[0])]
        if pr.pw.residual is not None:
            infos.append(problem.info(pr.pw.residual))
        if const_value(problem.L.canon(_outer(problem.op, pr.dw.conv.operands[1])), problem.L.module.weights) is None:
            return no("the depthwise weight is not a constant")
    if not all(i.alias_of is None or i.alias_offset % 16 == 0 for i in infos):
        return no("a buffer is not 16-byte aligned")
    if not _space(problem):
        return no("no tile fits the Target's shared memory")
    return YES


def _outer(op: Op, v: Value) -> Value:
    body = op.attrs.body
    for a, o in zip(body.args, op.operands):
        if a is v:
            return o
    return v


def render_spec(shape: xl.DwPwShape, dtype: str, params: dict, dw_act=("none", ()), pw_act=("none", ()),
                dw_bias: bool = True, pw_bias: bool = True, has_c: bool = False, name: Optional[str] = None) -> KernelSpec:
    """The pair kernel for one point of the space (tests and the bench call this directly)."""
    s, p = shape, dict(params)
    ctype = CTYPES[dtype][0]
    ctx = dict(p, **{k: getattr(s, k) for k in s.__dataclass_fields__}, T=ctype, mma=MMA[dtype],
               dw_bias=dw_bias, pw_bias=pw_bias, has_c=has_c)
    for pre, (act, ap) in (("dw_", dw_act), ("pw_", pw_act)):
        ctx.update({pre + k: v for k, v in act_ctx(act, dict(ap)).items()})
    ctx["name"] = name or kernel_name("nnc_conv_dw_pw", ctx)
    src = _render("conv_dw_pw.cu.j2", **ctx)
    grid = (xl.cdiv(s.P, p["TH"]) * xl.cdiv(s.Q, p["TW"]), xl.cdiv(s.K, p["KN"]), s.N)
    block = (32 * p["WARPS_M"] * p["WARPS_N"], 1, 1)
    args = [("X", f"const {ctype}*", None), ("Wd", f"const {ctype}*", None), ("Wp", f"const {ctype}*", None),
            ("Y", f"{ctype}*", None)]
    if has_c:
        args.append(("C", f"const {ctype}*", None))
    if dw_bias:
        args.append(("bias_dw", f"const {ctype}*", None))
    if pw_bias:
        args.append(("bias_pw", f"const {ctype}*", None))
    args.append(("NB", "int", s.N))
    return KernelSpec(source=src, name=ctx["name"], grid=grid, block=block, smem=xl.smem_bytes(p), args=args,
                      params=dict(p, tile=xl.format_tile(p), family=FAMILY, template="conv_dw_pw.cu.j2"))


def dw_weight_taps(w: np.ndarray) -> np.ndarray:
    """OHWI depthwise weight [C, 3, 3, 1] -> tap-major [9, C] (8 channels of a tap: one 16-byte load)."""
    c = w.shape[0]
    return np.ascontiguousarray(np.asarray(w).reshape(c, 9).T)


def _render_tiled(ctx: LowerCtx, problem: Problem, params: dict):
    L, pr = ctx.L, _pair(problem)
    n_launch = len(L.launches)
    dt = np.dtype(pr.dtype)
    with _bound(L, ctx.op):
        x = L.buffer(pr.dw.conv.operands[0])
        wd_outer = L.canon(_outer(ctx.op, pr.dw.conv.operands[1]))
        key = (id(wd_outer), "dw_taps")
        if key not in L.transformed:
            wd = const_value(wd_outer, L.module.weights)
            L.transformed[key] = ctx.new_weight(dw_weight_taps(wd).astype(dt), "dw_taps")
        wd_buf = L.transformed[key]
        wp = L.buffer(pr.pw.conv.operands[1])
        y = L.result_buffer(ctx.op.results[0])
        res = None if pr.pw.residual is None else L.buffer(pr.pw.residual)
        bd = None if pr.dw.bias is None else ctx.new_weight(pr.dw.bias.astype(dt), "dw_bias")
        bp = None if pr.pw.bias is None else ctx.new_weight(pr.pw.bias.astype(dt), "pw_bias")
    spec = render_spec(pr.shape, pr.dtype, params, (pr.dw.act, pr.dw.act_params), (pr.pw.act, pr.pw.act_params),
                       bd is not None, bp is not None, res is not None)
    emit_spec(ctx, spec, {"X": x, "Wd": wd_buf, "Wp": wp, "Y": y, "C": res, "bias_dw": bd, "bias_pw": bp})
    _name_group(ctx, n_launch)
    return True


def _name_group(ctx: LowerCtx, n_launch: int) -> None:
    L = ctx.L
    descs = [describe_op(b) for b in ctx.op.attrs.body.ops]
    for launch in L.launches[n_launch:]:
        if launch.kernel is not None:
            for d in descs:
                L.kernels[launch.kernel].add_op(d)


# ---------------------------------------------------------------- dw_pw.split

def _sub_group(half: _Half) -> Op:
    """A half as the op it was before the pass: its Conv, or a conv_epilogue group over copies."""
    if len(half.ops) == 1:
        return half.conv
    # its result stands for the body value (bound to the outer result where it is one)
    return closed_group(half.ops, half.ops[-1].results[0], "conv_epilogue", "a dw_pw group lowered as two kernels",
                        half.conv.loc)


def _applies_split(problem: Problem):
    pr = _pair(problem)
    return no(pr) if isinstance(pr, str) else YES


def _render_split(ctx: LowerCtx, problem: Problem, params: dict):
    L, pr = ctx.L, _pair(problem)
    with _bound(L, ctx.op):
        for half in (pr.dw, pr.pw):
            L.lower_op(_sub_group(half))
    ctx.emitted += 1
    return True


TILED = register(Variant("dw_pw.tiled", FAMILY, ("fused",), _render_tiled, _applies_tiled, _space, _default,
                         priority=PRIORITY, rank=0, kinds=KINDS, regions=True))
SPLIT = register(Variant("dw_pw.split", FAMILY, ("fused",), _render_split, _applies_split,
                         priority=PRIORITY, rank=1, kinds=KINDS, regions=True))
