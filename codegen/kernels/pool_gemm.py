"""Lowering of the `fused {kind = "gap_gemm"}` groups of compiler/passes/fuse_pooling.py: a global
average pool, views, and the Gemm (+ bias / activation / cast epilogue) reading the pooled rows.

Variants (family "gap_gemm", priority 24):
- "gap_gemm.fused": ONE kernel (templates/gap_gemm.cu.j2): each block pools its BN rows into shared
  memory, then one warp per output column multiplies them by the weight (FMA, fp32, a fixed
  shuffle tree: deterministic, no atomics). Space: BN (rows a block) x BJ (columns a block) within
  the Target's shared memory; default: BN = min(8, N), BJ = 32 (64 from 8 rows on). Applies to a
  Gemm without transA whose weight and bias are constants, with an epilogue of bias, one
  activation and a final Cast at most (no residual, no scale).
- "gap_gemm.split": the fallback, the group as the kernels of before: the pool and the views op by
  op, then the Gemm as its gemm_epilogue group (or alone).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ...ir.builder import const_value
from ...ir.graph import Op
from ...passes import fuse_pooling as fp
from ...passes.fuse_epilogue import match
from ..lower import LowerCtx, Problem, describe_op
from ..runtime_sizes import ceil_div, is_symbolic, leading_only
from ..variants import YES, Variant, no, register
from .common import CTYPES, KernelSpec, act_ctx, cdiv, kernel_name, render as _render_template
from .epilogue_fusion import closed_group
from .gemm_lowering import emit_spec
from ._helpers import bound_body as _bound

PRIORITY = 24  # below dw_pw's 25 (one family a priority), above the epilogue groups' 20
FAMILY = "gap_gemm"
NT = 256
ROWS = (1, 2, 4, 8)
COLS = (32, 64, 128)


@dataclass
class _Gap:
    pool: Op
    views: list
    gemm: Op
    tail: list  # the Gemm's epilogue ops (body ops)
    nhwc: bool
    N: int
    HW: int
    C: int
    J: int
    trans_b: bool
    alpha: float
    bias: Optional[np.ndarray]  # float64 [J]
    act: str
    act_params: tuple
    dtype: str  # the input's numpy dtype name
    out_dtype: str
    why_not: str = ""  # why the one kernel cannot take it ("" = it can); the split always can


def _gap(problem: Problem):
    if "gap_gemm" not in problem.memo:
        problem.memo["gap_gemm"] = _read(problem)
    return problem.memo["gap_gemm"]


def _read(problem: Problem):
    L, op = problem.L, problem.op
    body = op.attrs.body
    outer = {id(a): v for a, v in zip(body.args, op.operands)}

    def const_of(v):
        return const_value(L.canon(outer.get(id(v), v)), L.module.weights)

    ops = [b for b in body.ops if b.name != "const"]
    if not ops or len(body.results) != 1 or len(op.results) != 1:
        return "not a pool, views and a Gemm"
    pool = ops[0]
    kind = fp.pool_kind(pool, const_of)
    gi = next((i for i, b in enumerate(ops) if b.name == "Gemm"), None)
    if kind is None or gi is None:
        return "not a global average pool and a Gemm"
    views, gemm = ops[1:gi], ops[gi]
    users: dict[int, list] = {}
    for b in ops:
        for v in b.operands:
            if v is not None:
                users.setdefault(id(v), []).append(b)
    ret = {id(body.results[0])}
    ch = match(gemm, lambda v: None if id(v) in ret or len(users.get(id(v), ())) != 1 else users[id(v)][0],
               const_of)
    steps = ch.steps if ch is not None else ()
    tail = [s.op for s in steps]
    if (tail[-1] if tail else gemm).results[0] is not body.results[0] or gi + 1 + len(tail) != len(ops):
        return "the body is not pool -> views -> Gemm -> epilogue"
    a = gemm.attrs
    x = L.static_shape(pool.operands[0])  # a range build: at max; the runtime batch is n_of(problem)
    n, hw, c = (x[0], x[1] * x[2], x[3]) if kind == "nhwc" else (x[0], x[2] * x[3], x[1])
    trans_b = bool(int(getattr(a, "transB", 0) or 0))
    j = int(gemm.results[0].type.shape[1])
    alpha, beta = float(getattr(a, "alpha", 1.0)), float(getattr(a, "beta", 1.0))
    why, bias, act, act_params = "", None, "none", ()
    w = const_of(gemm.operands[1])
    if int(getattr(a, "transA", 0) or 0):
        why = "transA"
    elif w is None or tuple(w.shape) != ((j, c) if trans_b else (c, j)):
        why = "the Gemm weight is not a constant of the pooled width"
    if len(gemm.operands) > 2 and gemm.operands[2] is not None:
        cv = const_of(gemm.operands[2])
        if cv is None or cv.size not in (1, j) or (cv.ndim == 2 and cv.shape[0] != 1):
            why = why or "the Gemm's C is not a per-column constant"
        else:
            bias = beta * np.broadcast_to(np.asarray(cv, np.float64).reshape(-1), (j,))
    for s in steps:
        if s.role == "bias":
            v = np.broadcast_to(np.asarray(const_of(s.operand), np.float64).reshape(-1), (j,))
            bias = v if bias is None else bias + v
        elif s.role == "act":
            act, act_params = s.act, s.act_params
        elif s.role not in ("cast", "view"):
            why = why or f"a {s.role} in the Gemm epilogue"
    dt = pool.operands[0].type.dtype.np.name
    if dt not in CTYPES or gemm.operands[1].type.dtype.np.name != dt:
        why = why or "dtype"
    return _Gap(pool, views, gemm, tail, kind == "nhwc", int(n), int(hw), int(c), j, trans_b, alpha, bias, act,
                act_params, dt, body.results[0].type.dtype.np.name, why)


def _space(problem: Problem) -> list:
    g = _gap(problem)
    lim = problem.target.smem_per_block_optin
    return [dict(BN=bn, BJ=bj) for bn in ROWS for bj in COLS
            if bn <= max(1, g.N) and bn * g.C * 4 <= lim]


def _default(problem: Problem, space: list) -> dict:
    g = _gap(problem)
    bn = max(p["BN"] for p in space if p["BN"] <= min(8, g.N)) if space else 1
    want = dict(BN=bn, BJ=64 if g.N >= 8 else 32)
    return want if want in space else dict(space[0])


def _n_sym(problem: Problem):
    """The batch as a range build's runtime size (an Expr), or None when static."""
    n = problem.op.operands[0].type.shape[0] if problem.op.operands[0].type.shape else 1
    return n if is_symbolic(n) else None


def _applies(problem: Problem):
    g = _gap(problem)
    if isinstance(g, str):
        return no(g)
    if problem.symbolic and not leading_only(list(problem.op.operands) + [
            v for b in problem.op.attrs.body.ops for v in list(b.operands) + list(b.results)]):
        return no("a symbolic dim other than the batch")
    if g.why_not:
        return no(g.why_not)
    if g.out_dtype not in CTYPES:
        return no("output dtype")
    if not _space(problem):
        return no("the pooled rows do not fit the Target's shared memory")
    return YES


def render_spec(g: _Gap, params: dict, name: Optional[str] = None) -> KernelSpec:
    ctype, otype = CTYPES[g.dtype][0], CTYPES[g.out_dtype][0]
    ctx = dict(params, NT=NT, HW=g.HW, C=g.C, J=g.J, nhwc=g.nhwc, trans_b=g.trans_b, T=ctype, TW=ctype, OT=otype,
               alpha=repr(float(g.alpha)), inv_hw=repr(1.0 / g.HW), has_bias=g.bias is not None,
               **act_ctx(g.act, dict(g.act_params)))
    ctx["name"] = name or kernel_name("nnc_gap_gemm", ctx)
    src = _render_template("gap_gemm.cu.j2", **ctx)
    args = [("X", f"const {ctype}*", None), ("W", f"const {ctype}*", None), ("Y", f"{otype}*", None)]
    if g.bias is not None:
        args.append(("bias", "const float*", None))
    args.append(("NB", "int", g.N))
    return KernelSpec(source=src, name=ctx["name"], grid=(cdiv(g.J, params["BJ"]), cdiv(g.N, params["BN"]), 1),
                      block=(NT, 1, 1), smem=params["BN"] * g.C * 4, args=args,
                      params=dict(params, family=FAMILY, template="gap_gemm.cu.j2"))


def _render(ctx: LowerCtx, problem: Problem, params: dict):
    L, g = ctx.L, _gap(problem)
    n_launch = len(L.launches)
    with _bound(L, ctx.op):
        x = L.buffer(g.pool.operands[0])
        w = L.buffer(g.gemm.operands[1])
        y = L.result_buffer(ctx.op.results[0])
        b = None if g.bias is None else ctx.new_weight(g.bias.astype(np.float32), "gap_gemm_bias")
    spec = render_spec(g, params)
    n = _n_sym(problem)
    if n is not None:  # a range build: the rows and the grid's rows per run (the kernel stops at NB)
        spec = dataclasses.replace(spec, grid=(spec.grid[0], ceil_div(n, params["BN"]), 1),
                                   args=[(r, ct, n if r == "NB" else v) for r, ct, v in spec.args])
    emit_spec(ctx, spec, {"X": x, "W": w, "Y": y, "bias": b})
    descs = [describe_op(o) for o in ctx.op.attrs.body.ops]
    for launch in L.launches[n_launch:]:
        if launch.kernel is not None:
            for d in descs:
                L.kernels[launch.kernel].add_op(d)
    return True


def _applies_split(problem: Problem):
    g = _gap(problem)
    return no(g) if isinstance(g, str) else YES


def _render_split(ctx: LowerCtx, problem: Problem, params: dict):
    """The pool and the views op by op, then the Gemm as the gemm_epilogue group it was."""
    L, g = ctx.L, _gap(problem)
    with _bound(L, ctx.op):
        for o in [g.pool] + g.views:
            L.lower_op(o)
        if not g.tail:
            L.lower_op(g.gemm)
        else:
            L.lower_op(closed_group([g.gemm] + g.tail, g.tail[-1].results[0], "gemm_epilogue",
                                    "a gap_gemm group lowered as before", g.gemm.loc))
    ctx.emitted += 1
    return True


FUSED = register(Variant("gap_gemm.fused", FAMILY, ("fused",), _render, _applies, _space, _default,
                         priority=PRIORITY, rank=0, kinds=(fp.KIND,), regions=True, runtime_sizes=True))
SPLIT = register(Variant("gap_gemm.split", FAMILY, ("fused",), _render_split, _applies_split,
                         priority=PRIORITY, rank=1, kinds=(fp.KIND,), regions=True))
