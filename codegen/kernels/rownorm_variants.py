"""Row normalisations as a declared Variant family "rownorm" (codegen/variants.py):
LayerNormalization, Softmax / LogSoftmax (over the last axis), RMSNormalization, and
Instance / GroupNormalization (NCHW: a row is one (n, group) of cpg channels x spatial).

Variants, in the heuristic order:
- `rownorm.<op>_regs` (templates/rownorm_regs.cu.j2): the row held in registers as stored, W warps
  per row (W = 1: a warp per row, shuffles only; W = 32: a block of 1024 threads per row), RPB rows
  per block, VEC-element vector loads/stores (16 bytes where R % VEC == 0 and x / y are aligned);
  mean and variance (two passes over the registers), max and sum of exp, or sum of squares from the
  registers: one global read and one write per element. Applies to f16 / bf16 / f32 rows of
  contiguous elements whose per-thread share fits MAX_ROW_BYTES at W = 32 (f16: R <= 65536,
  f32: R <= 32768), scale / bias of R or 1 elements. Space: (VEC, W, RPB); the heuristic picks
  W by R (the least W whose share is <= TARGET_ROW_BYTES), RPB for ~256-thread blocks while the
  grid keeps >= 2 blocks an SM.
- `rownorm.<op>_generic`: today's kernels (layernorm.cu.j2, softmax.cu.j2, rownorm.cu.j2: a block
  per row, passes over global memory): any dtype, the column form of Softmax (axis not last),
  huge rows. Mean / InvStdDev and scale / bias broadcasting are the same in every variant.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..lower import LowerCtx
from ..runtime_sizes import grid_dim, is_symbolic, numel
from ..variants import YES, Fit, Variant, no, register
from ._helpers import norm_axis
from .elementwise import widest_vector

FAMILY = "rownorm"
FLOATS = ("f16", "bf16", "f32")
MAX_ROW_BYTES = 128     # per thread: the row's share held in registers (32 registers)
TARGET_ROW_BYTES = 96   # the heuristic's share: the least W at or under it
WARPS = (1, 2, 4, 8, 16, 32)
ROWS_PER_BLOCK = (1, 2, 4, 8)
MAX_BLOCK = 1024
BLOCK_TARGET = 256


@dataclass(frozen=True)
class RowProblem:
    """One row normalisation: `outer` rows of R contiguous elements."""
    kind: str                 # layernorm | rms | softmax | logsoftmax
    dtype: str                # short name of x's dtype
    itemsize: int
    outer: int
    R: int
    x_off: int                # byte offsets of x and y in their roots (vector alignment)
    y_off: int
    scale_n: int = 0          # 0: none
    scale_size: int = 0
    scale_off: int = 0
    bias_n: int = 0
    bias_size: int = 0
    bias_off: int = 0
    groups: int = 1           # kind group: groups, channels a group, elements a channel
    cpg: int = 1
    spatial: int = 1


def _vecs(p: RowProblem) -> list:
    """Vector widths (elements, largest first) R and every vector pointer's alignment allow."""
    if p.x_off % p.itemsize or p.y_off % p.itemsize:
        return []
    v = widest_vector(p.R, p.itemsize, [(p.x_off, p.itemsize), (p.y_off, p.itemsize)])
    out = []
    while v >= 1:
        out.append(v)
        v //= 2
    return out


def vectors_per_thread(p: RowProblem, vec: int, warps: int) -> int:
    """NV: the VEC-element vectors of the row one thread of W warps holds."""
    return -(-p.R // (vec * 32 * warps))


def share_bytes(p: RowProblem, vec: int, warps: int) -> int:
    """Bytes of the row one thread holds: NV vectors of VEC elements."""
    return vectors_per_thread(p, vec, warps) * vec * p.itemsize


def regs_space(p: RowProblem) -> list:
    """(VEC, W, RPB): the two widest vector widths, W while the row's share fits MAX_ROW_BYTES and
    at least half the row's lanes have a vector, RPB while the block stays within MAX_BLOCK."""
    space = []
    for vec in _vecs(p)[:2]:
        nvec = p.R // vec
        for w in WARPS:
            if share_bytes(p, vec, w) > MAX_ROW_BYTES:
                continue
            if w > 1 and 32 * w > 2 * nvec:  # more than half the row's lanes idle
                continue
            for rpb in ROWS_PER_BLOCK:
                block = 32 * w * rpb
                if block > MAX_BLOCK or (rpb > 1 and rpb > p.outer):
                    continue
                space.append({"VEC": vec, "W": w, "RPB": rpb})
    return space


def regs_default(p: RowProblem, space: list, sm_count: int = 132) -> dict:
    vec = max(s["VEC"] for s in space)
    ws = sorted({s["W"] for s in space if s["VEC"] == vec})
    w = next((w for w in ws if share_bytes(p, vec, w) <= TARGET_ROW_BYTES), ws[-1])
    rpbs = sorted({s["RPB"] for s in space if s["VEC"] == vec and s["W"] == w})
    rpb = max([r for r in rpbs if 32 * w * r <= BLOCK_TARGET] or rpbs[:1])
    while rpb > 1 and -(-p.outer // rpb) < 2 * sm_count:
        rpb //= 2
    if rpb not in rpbs:
        rpb = rpbs[0]
    return {"VEC": vec, "W": w, "RPB": rpb}


def regs_params(p: RowProblem, params: dict) -> dict:
    """Template parameters of rownorm_regs.cu.j2 (beside the op's ctypes and flags)."""
    vec, w, rpb = int(params["VEC"]), int(params["W"]), int(params["RPB"])
    if p.R % vec or 32 * w * rpb > MAX_BLOCK:
        raise ValueError(f"rownorm regs: VEC={vec} W={w} RPB={rpb} do not fit R={p.R}")
    nv = vectors_per_thread(p, vec, w)
    per_col = p.kind in ("layernorm", "rms")  # group: per channel
    vs = per_col and p.scale_n == p.R and p.scale_n > 1 and p.scale_off % (vec * p.scale_size) == 0
    vb = per_col and p.bias_n == p.R and p.bias_n > 1 and p.bias_off % (vec * p.bias_size) == 0
    out = dict(kind=p.kind, outer=p.outer, R=p.R, VEC=vec, W=w, RPB=rpb, NV=nv, vx=True, xsize=p.itemsize,
               vscale=vs, vbias=vb, ssize=p.scale_size, bsize=p.bias_size)
    if p.kind == "group":
        out.update(groups=p.groups, cpg=p.cpg, spatial=p.spatial)
    return out


def regs_grid(p: RowProblem, params: dict) -> tuple[int, int]:
    rpb, w = int(params["RPB"]), int(params["W"])
    groups = -(-p.outer // rpb)
    return max(1, min(groups, 65535)), 32 * w * rpb


# ---------------------------------------------------------------- problems of the three ops

def _info_offset(t) -> int:
    return int(t.alias_offset) if t.alias_of is not None else 0


def _itemsize(t) -> int:
    return max(1, t.dtype.bits // 8)


def _operand(t) -> tuple[int, int, int]:
    """(elements, itemsize, byte offset) of a scale / bias operand; zeros where there is none."""
    return (t.numel, _itemsize(t), _info_offset(t)) if t is not None else (0, 0, 0)


def _row_problem(problem, kind: str, outer: int, R: int, scale=None, bias=None, **extra) -> RowProblem:
    x, y = problem.tensor(0), problem.result(0)
    scale_n, scale_size, scale_off = _operand(scale)
    bias_n, bias_size, bias_off = _operand(bias)
    return RowProblem(kind=kind, dtype=x.dtype.short, itemsize=_itemsize(x), outer=outer, R=R,
                      x_off=_info_offset(x), y_off=_info_offset(y),
                      scale_n=scale_n, scale_size=scale_size, scale_off=scale_off,
                      bias_n=bias_n, bias_size=bias_size, bias_off=bias_off, **extra)


def _rows(shape, axis: int) -> tuple[int, int]:
    """(outer, R) of a normalisation over the dims from `axis` (negative: from the end) on."""
    axis = norm_axis(axis, len(shape))
    return int(np.prod(shape[:axis], dtype=np.int64)), int(np.prod(shape[axis:], dtype=np.int64))


def _layernorm_rows(problem) -> tuple[int, int]:
    return _rows(problem.tensor(0).shape, int(problem.attr("axis", -1)))


def _regs_fit(p: RowProblem) -> Fit:
    if p.dtype not in FLOATS:
        return no(f"dtype {p.dtype} (f16 / bf16 / f32 only)")
    if p.outer < 1 or p.R < 1:
        return no("empty")
    if not regs_space(p):
        return no(f"a row of {p.R} does not fit the registers of a block")
    return YES


def _memo(problem, make) -> Optional[RowProblem]:
    if "rownorm" not in problem.memo:
        problem.memo["rownorm"] = make(problem)
    return problem.memo["rownorm"]


def _layernorm_problem(problem) -> Optional[RowProblem]:
    outer, R = _layernorm_rows(problem)
    scale, bias = problem.tensor(1), problem.tensor(2)
    if scale is None or any(b is not None and b.numel not in (1, R) for b in (scale, bias)):
        return None  # the generic variant reports it
    return _row_problem(problem, "layernorm", outer, R, scale, bias)


def _softmax_problem(problem) -> Optional[RowProblem]:
    x = problem.tensor(0)
    if len(x.shape) == 0:
        return None
    rank = len(x.shape)
    axis = norm_axis(int(problem.attr("axis", -1)), rank)
    if axis != rank - 1:
        return None
    R = int(x.shape[-1])
    outer = int(np.prod(x.shape[:-1], dtype=np.int64))
    return _row_problem(problem, "logsoftmax" if problem.op.name == "LogSoftmax" else "softmax", outer, R)


def rms_scale_ok(scale, x_shape, axis: int) -> bool:
    rank = len(x_shape)
    R = int(np.prod(x_shape[axis:], dtype=np.int64))
    return not (scale.numel not in (1, R) or (scale.numel == R and tuple(scale.shape[-(rank - axis):]) !=
                                              tuple(x_shape[axis:]) and len(scale.shape) >= rank - axis))


def _rms_problem(problem) -> Optional[RowProblem]:
    x, sc = problem.tensor(0), problem.tensor(1)
    rank = len(x.shape)
    axis = norm_axis(int(problem.attr("axis", -1)), rank)
    if sc is None or not rms_scale_ok(sc, x.shape, axis):
        return None
    outer, R = _rows(x.shape, axis)
    return _row_problem(problem, "rms", outer, R, sc)


def _group_dims(problem) -> tuple:
    """(N, C, spatial, groups) of an Instance / GroupNormalization (NCHW)."""
    x = problem.tensor(0)
    N, C = int(x.shape[0]), int(x.shape[1])
    spatial = int(np.prod(x.shape[2:], dtype=np.int64))
    G = C if problem.op.name == "InstanceNormalization" else int(problem.attr("num_groups"))
    return N, C, spatial, G


def _group_problem(problem) -> Optional[RowProblem]:
    x = problem.tensor(0)
    if len(x.shape) < 2 or getattr(problem.op.attrs, "layout", "NCHW") not in (None, "NCHW"):
        return None
    N, C, spatial, G = _group_dims(problem)
    sc, bi = problem.tensor(1), problem.tensor(2)
    if G < 1 or C % G or sc is None or bi is None or sc.numel != C or bi.numel != C:
        return None
    return _row_problem(problem, "group", N * G, (C // G) * spatial, sc, bi, groups=G, cpg=C // G, spatial=spatial)


MAKERS = {"LayerNormalization": _layernorm_problem, "Softmax": _softmax_problem,
          "LogSoftmax": _softmax_problem, "RMSNormalization": _rms_problem,
          "InstanceNormalization": _group_problem, "GroupNormalization": _group_problem}


def row_problem(problem) -> Optional[RowProblem]:
    return _memo(problem, MAKERS[problem.op.name])


def _rt_outer(problem, p: RowProblem):
    """A range build's row count per run: the symbolic dims before the R static trailing
    elements of a row (None: a row's extent is itself symbolic; codegen/runtime_sizes.py)."""
    shape = problem.op.operands[0].type.shape
    acc, k = 1, len(shape)
    while k > 0 and acc < p.R and isinstance(shape[k - 1], int):
        acc *= shape[k - 1]
        k -= 1
    if acc != p.R:
        return None
    return numel(shape[:k])


def _applies_regs(problem):
    p = row_problem(problem)
    if p is None:
        return no("not a row of contiguous elements with scale / bias of R or 1")
    if problem.symbolic and (_rt_outer(problem, p) is None or any(
            is_symbolic(d) for v in problem.op.operands[1:] if v is not None for d in v.type.shape or ())):
        return no("a row's extent, or a scale / bias, depends on a symbolic dim")
    return _regs_fit(p)


def _space_regs(problem) -> list:
    return regs_space(row_problem(problem))


def _default_regs(problem, space) -> dict:
    return regs_default(row_problem(problem), space, problem.target.sm_count)


def _render_regs(ctx: LowerCtx, problem, params: dict):
    p = row_problem(problem)
    x, y = ctx.inp(0), ctx.out(0)
    scale = ctx.inp(1) if p.kind in ("layernorm", "rms", "group") else None
    bias = ctx.inp(2) if p.kind in ("layernorm", "group") else None
    mean = ctx.out(1) if p.kind == "layernorm" and ctx.n_out > 1 else None
    rstd = ctx.out(2) if p.kind == "layernorm" and ctx.n_out > 2 else None
    eps = float(ctx.attr("epsilon", 1e-5) or 0.0) if p.kind in ("layernorm", "rms", "group") else 0.0
    k = ctx.render("rownorm_regs.cu.j2", f"{p.kind}_regs", ctype=x.ctype, epsilon=eps,
                   has_scale=scale is not None, has_bias=bias is not None,
                   sctype=scale.ctype if scale is not None else "", bctype=bias.ctype if bias is not None else "",
                   scale_n=scale.numel if scale is not None else 1, bias_n=bias.numel if bias is not None else 1,
                   has_mean=mean is not None, has_rstd=rstd is not None,
                   mctype=(mean or rstd).ctype if (mean or rstd) else "",
                   **{**regs_params(p, params), **_rt_template(ctx, problem, p)})
    grid, block = regs_grid(p, params)
    if problem.symbolic:  # a range build: the rows per run (the kernel loops over its row groups)
        grid = grid_dim(_rt_outer(problem, p), int(params["RPB"]), ctx.L.sym_max, 65535)[1]
    args = [x] + [b for b in (scale, bias) if b is not None] + [y] + [b for b in (mean, rstd) if b is not None]
    ctx.launch(k, grid, block, args + (ctx.rt_args() if problem.symbolic else []))
    return True


def _rt_template(ctx, problem, p: RowProblem) -> dict:
    """A range build's template params: outer as C text over the symbol parameters."""
    if not problem.symbolic:
        return {}
    return {"outer": ctx.csize(_rt_outer(problem, p)), "rt_params": ctx.rt_params()}


def _cost_regs(problem, params) -> float:
    """A bytes-and-occupancy model (the stand-in timer's): read + write at 3.5 TB/s, worse for
    blocks that idle lanes and for few blocks."""
    p = row_problem(problem)
    t = 2.0 * p.outer * p.R * p.itemsize / 3.5e12
    grid, block = regs_grid(p, params)
    fill = min(1.0, grid * block / (problem.target.sm_count * 1024.0))
    lanes = p.R / float(vectors_per_thread(p, params["VEC"], params["W"]) * params["VEC"] * 32 * params["W"])
    return t / max(0.05, fill * lanes) + 2e-6


# ---------------------------------------------------------------- the generic (legacy) kernels

def _render_layernorm_generic(ctx: LowerCtx, problem, params: dict):
    x, y = ctx.inp(0), ctx.out(0)
    outer, R = _layernorm_rows(problem)
    scale, bias = ctx.inp(1), ctx.inp(2)
    for b, what in ((scale, "Scale"), (bias, "B")):
        if b is not None and b.numel not in (1, R):
            ctx.fail(f"{what} of {b.numel} elements does not cover the normalised {R} elements")
    mean = ctx.out(1) if ctx.n_out > 1 else None
    rstd = ctx.out(2) if ctx.n_out > 2 else None
    args = [x] + [b for b in (scale, bias) if b is not None] + [y] + [b for b in (mean, rstd) if b is not None]
    k = ctx.render("layernorm.cu.j2", "layernorm", outer=outer, R=R, ctype=x.ctype,
                   epsilon=float(ctx.attr("epsilon", 1e-5)),
                   has_scale=scale is not None, has_bias=bias is not None,
                   sctype=scale.ctype if scale else "", bctype=bias.ctype if bias else "",
                   scale_n=scale.numel if scale else 1, bias_n=bias.numel if bias else 1,
                   has_mean=mean is not None, has_rstd=rstd is not None,
                   mctype=(mean or rstd).ctype if (mean or rstd) else "")
    ctx.launch(k, min(max(outer, 1), 65535), 256, args)
    return True


def _render_softmax_generic(ctx: LowerCtx, problem, params: dict):
    from .reduce import _axis_view
    x, y = ctx.inp(0), ctx.out(0)
    if len(x.shape) == 0:
        outer, R, inner = 1, 1, 1
    else:
        outer, R, inner = _axis_view(x.shape, int(ctx.attr("axis", -1)))
    variant = "row" if inner == 1 else "col"
    if problem is not None and problem.symbolic:  # a range build: the sizes per run
        sh = ctx.sym_shape(0)
        axis = norm_axis(int(ctx.attr("axis", -1)), len(sh))
        so, sr, si = numel(sh[:axis]), sh[axis], numel(sh[axis + 1:])
        variant = "row" if si == 1 else "col"
        k = ctx.render("softmax.cu.j2", ctx.op.name.lower(), variant=variant, outer=ctx.csize(so), R=ctx.csize(sr),
                       inner=ctx.csize(si), ctype=x.ctype, log=ctx.op.name == "LogSoftmax", rt_params=ctx.rt_params())
        grid = grid_dim(so, 1, ctx.L.sym_max, 65535)[1] if variant == "row" else ctx.grid1d(so * si)
        ctx.launch(k, grid, 256, [x, y, *ctx.rt_args()])
        return True
    k = ctx.render("softmax.cu.j2", ctx.op.name.lower(), variant=variant, outer=outer, R=R, inner=inner,
                   ctype=x.ctype, log=ctx.op.name == "LogSoftmax")
    grid = min(outer, 65535) if variant == "row" else ctx.grid1d(outer * inner)
    ctx.launch(k, grid, 256, [x, y])
    return True


def _render_rms_generic(ctx: LowerCtx, problem, params: dict):
    from .norm import _rownorm
    x, y = ctx.inp(0), ctx.out(0)
    rank = len(x.shape)
    axis = norm_axis(int(ctx.attr("axis", -1)), rank)
    outer, R = _rows(x.shape, axis)
    sc = ctx.inp(1)
    if not rms_scale_ok(sc, x.shape, axis):
        ctx.fail("scale must cover the normalised dims")
    _rownorm(ctx, "rms", x, y, outer, R, 1, sc, scale_n=sc.numel)
    return True


def _render_group_generic(ctx: LowerCtx, problem, params: dict):
    from .norm import _group_norm
    return _group_norm(ctx)


GENERIC = {"LayerNormalization": _render_layernorm_generic, "Softmax": _render_softmax_generic,
           "LogSoftmax": _render_softmax_generic, "RMSNormalization": _render_rms_generic,
           "InstanceNormalization": _render_group_generic, "GroupNormalization": _render_group_generic}
SHORT = {"LayerNormalization": "layernorm", "Softmax": "softmax", "LogSoftmax": "logsoftmax",
         "RMSNormalization": "rmsnorm", "InstanceNormalization": "instancenorm", "GroupNormalization": "groupnorm"}

REGS = {}
GENERICS = {}
for _op, _short in SHORT.items():
    REGS[_op] = register(Variant(
        name=f"rownorm.{_short}_regs", family=FAMILY, ops=(_op,), rank=0, applies=_applies_regs,
        space=_space_regs, default=_default_regs, render=_render_regs, cost=_cost_regs, runtime_sizes=True))
    GENERICS[_op] = register(Variant(
        name=f"rownorm.{_short}_generic", family=FAMILY, ops=(_op,), rank=1, render=GENERIC[_op],
        runtime_sizes=_op in ("Softmax", "LogSoftmax")))  # the softmax kernel takes its sizes per run
