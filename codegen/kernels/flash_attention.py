"""Lowering of the `fused {kind = "attention"}` groups of compiler/passes/fuse_attention.py to ONE
flash-attention kernel (templates/flash_attention.cu.j2): O = softmax(steps(Q K^T)) V with an
online softmax, so no S x T tensor exists in global memory.

The body is read back with the pass's own matcher (`fuse_attention.match_body`), so the pass and
this lowering agree on every op's role. Each operand is bound as (batch0, batch1, seq, dim)
strides into the buffer of the value the group reads: an absorbed Transpose permutes the strides,
a broadcast batch dim (K/V shared across heads) gets stride 0, a mask gets stride 0 along every
dim it broadcasts over. Rank-3 scores [N,S,T] run as batch0 = 1, batch1 = N.

One declared Variant, "flash_attention" (codegen/variants.py), with two kernel shapes:
- tensor cores (f16/bf16, D and Dv multiples of 16 up to 128). Declared space: every
  {mi, warps, bc} (m-tiles per warp, warps per CTA: 16 * mi * warps query rows; bc key/value rows
  per tile) whose shared memory fits the target and whose accumulators fit the register budget
  (TILE_REGS); `default`: the tile the pass recorded in params ("tile=<rows>x<bc> warps=<w>",
  fuse_attention.tile_of / choose_tile, per (B*H, S, D)) when it is in the space, else
  choose_tile's; a timed selector may pick any other point;
- "simt" (f32, or head dims the tc kernel does not take, up to 256): one thread per query row
  (space: the one point {}).
applies() declines (the generic fallback then lowers the body op by op) when no kernel takes the
group: D > 256, shared memory, or grid limits.
Range profiles (codegen/runtime_sizes.py): the variant declares runtime_sizes. Both kernels take S,
T and every stride as arguments, so a group over symbolic S / T (fuse_attention's views with Expr
strides) passes those per run (Scalar.expr), launches ceil(S / rows) x B1 x B0 CTAs per run, and
always masks the kv tail tile (T is only known per run); the tile is the one of the profile's opt
shape, the limits are checked at its max.
On sm_90a a second variant of the same groups, flash_attention_wgmma.py (one priority above, opt-in
through the fused op's params "wgmma=..." until ON_BY_DEFAULT), renders a FlashAttention-3-style
wgmma kernel from the same binding (bind_operands) and step macros (flash_attention_steps.cu.j2).

Semantics (steps_for_template): the scores go through the body's steps in order, in fp32; when
the group computes in 16 bits, every additive mask's sum is rounded to that type, as the body's Add
produces it (a -1e4 padding mask swamps the score in bf16/fp16: a row whose visible columns are all
padded averages them uniformly in the reference, and so here). With masks the scores stay in
natural units and log2(e) is applied inside the exponentials, so a finite fill stays finite.
A row of nothing but -inf gives NaN, as the reference's softmax.
"""
from __future__ import annotations

import math

import numpy as np

from ...ir.builder import const_value
from ...passes.fuse_attention import TC_MAX_D, choose_kv_rows, choose_tile, match_body, parse_tile
from .. import runtime_sizes
from ..errors import LoweringError
from ..lower import LowerCtx, describe_op
from ..variants import Variant, YES, no, register

PRIORITY = 30  # above the generic fallback (fused.FALLBACK_PRIORITY) and the other fused families
LOG2E = 1.4426950408889634
BC = 64          # key/value rows per tile (tc): the default
BCS = (32, 64, 128)  # the declared choices
WARPS = (2, 4, 8)    # one warp is never declared: its unrolled tile loads spill
TILE_REGS = 184  # the register model's budget (tile_regs): ptxas -v (sm_90, nvcc 13.0) shows every declared
                 # point of D = 64 / 128 spill-free with masks and causal, every excluded one spilling or at 255
BC_SIMT = 32     # key/value rows per tile (simt)
SIMT_ROWS = 64   # threads (query rows) per CTA (simt)
SIMT_MAX_D = 256
FLT_MAX = 3.4028234663852886e38
MMA = {"f16": "f16", "bf16": "bf16"}
PAIR = {"f16": "__half2", "bf16": "__nv_bfloat162"}


def _contiguous(shape) -> list:
    """Row-major strides (Exprs where a range profile's dims are symbolic: passed per run)."""
    st, acc = [], 1
    for d in reversed(shape):
        st.insert(0, acc)
        acc = acc * d
    return st


def _const_factor(d) -> int:
    """An int that divides the stride/size d at every value of the symbols (d itself for an int;
    a product's constant; else 1)."""
    if isinstance(d, int):
        return d
    if d.kind == "mul":
        return math.prod(a for a in d.args if isinstance(a, int))
    return 1


def _logical_strides(operand) -> tuple:
    """(shape, strides, element offset) of Q/Kt/V as the group's MatMul sees it, into the source's
    buffer: the pass's strided view (fuse_attention.Operand.layout: absorbed Transposes, reshapes,
    Split/Slice/Gather parts of a packed projection)."""
    lay = operand.layout
    return tuple(lay.shape), list(lay.strides), lay.offset


def _batch2(shape, strides, batch) -> list:
    """Strides of the canonical (batch0, batch1) for an operand whose batch dims right-align to the
    scores' `batch` (1 or 2 dims); 0 where the operand broadcasts."""
    nb = len(shape) - 2
    out = []
    for i in range(len(batch)):
        j = i - (len(batch) - nb)
        out.append(0 if j < 0 or shape[j] == 1 else strides[j])
    return [0] + out if len(batch) == 1 else out


def _mask_strides(shape, scores4) -> list:
    full = (1,) * (4 - len(shape)) + tuple(shape)
    st = _contiguous(full)
    return [0 if isinstance(full[i], int) and full[i] == 1 else st[i] for i in range(4)]


def _aligned(buf, strides_but_last, elem: int) -> bool:
    """16-byte cp.async chunks: offset and every non-dim stride keep 16-byte alignment."""
    off = buf.alias_offset if buf.alias_of is not None else 0
    return off % 16 == 0 and all((_const_factor(s) * elem) % 16 == 0 for s in strides_but_last)


def _pair_aligned(buf, strides_but_last) -> bool:
    """Paired 16-bit stores: 4-byte aligned offset and even strides."""
    off = buf.alias_offset if buf.alias_of is not None else 0
    return off % 4 == 0 and all(_const_factor(s) % 2 == 0 for s in strides_but_last)


def causal_band(cond, S: int, T: int):
    """(k, lower) when the constant condition `cond` (broadcast over the batch dims) is, on its
    [S, T] slice, exactly "col - row <= k" (lower: True; np.tril(ones, k)) or its complement
    (False); else None. GPT-2's causal Where condition: the kernel compares indices instead of
    loading S x T bytes."""
    if cond is None or not isinstance(S, int) or not isinstance(T, int) or cond.ndim < 2 \
            or cond.shape[-2:] != (S, T) or cond.size != S * T:
        return None
    c = np.asarray(cond).reshape(S, T) != 0
    for lower in (True, False):
        m = c if lower else ~c
        k = int(m[0].sum()) - 1
        if np.array_equal(m, np.tril(np.ones((S, T), bool), k)):
            return k, lower
    return None


def steps_for_template(at, masks_index, round16: bool = False, causal=None) -> tuple:
    """(steps, post): the steps as the template applies them and the factor taking their result to
    log2 units inside the exponentials. Without masks: no steps, post = the Q/K scales times
    log2(e) (the template's post_fma: one FFMA a score); a non-positive product stays a step. With masks: the steps in order in natural units (a leading scale folded
    into the first Add's FMA), each Add followed by a rounding to the 16-bit type when `round16`
    (the body's Add produces that type), post = log2(e). causal: id(Where op) -> causal_band of
    its condition, for the Wheres that become {role: causal, k, keep} (x = (col - row <= k) ==
    keep ? x : fill)."""
    causal = causal or {}
    steps = list(at.steps)
    pre = at.scale
    if not any(s.role in ("where", "add") for s in steps):
        total = pre * math.prod(s.scale for s in steps if s.role == "scale") * LOG2E
        if total > 0:  # the raw scores' max is the scaled one's: the scale goes into the exponentials
            return [], total
        return [{"role": "scale", "c": total}], 1.0
    out = [] if pre == 1.0 else [{"role": "scale", "c": pre}]
    for s in steps:
        if s.role == "scale":
            if out and out[-1]["role"] == "scale":
                out[-1] = {"role": "scale", "c": out[-1]["c"] * s.scale}
            else:
                out.append({"role": "scale", "c": s.scale})
        elif s.role == "add":
            a = {"role": "add", "i": masks_index[id(s.op)], "c": 1.0, "pre": 1.0}
            if out and out[-1]["role"] == "scale":  # x = pre * x + mask: one FMA
                a["pre"] = out.pop()["c"]
            out.append(a)
            if round16:
                out.append({"role": "round"})
        else:
            fill = max(min(s.fill if s.fill >= -FLT_MAX else float("-inf"), FLT_MAX), -math.inf)
            if id(s.op) in causal:
                k, lower = causal[id(s.op)]
                out.append({"role": "causal", "k": k, "fill": fill, "keep": s.keep_if_true == lower})
            else:
                out.append({"role": "where", "i": masks_index[id(s.op)], "fill": fill, "keep": s.keep_if_true})
    return out, LOG2E


# ---------------------------------------------------------------- the declared variant

def _smem(mi: int, warps: int, bc: int, D: int, Dv: int) -> int:
    return (16 * mi * warps * (D + 8) + 2 * bc * (D + 8) + 2 * bc * (Dv + 8)) * 2


def tile_regs(mi: int, warps: int, bc: int, D: int, Dv: int) -> int:
    """A register model of one thread: the S, O and Q fragments (mi * (bc/2 + Dv/2 + D/4) fp32
    registers), plus 3 per 16-byte cp.async chunk of a K/V tile it issues (the unrolled loads keep
    their addresses live: few warps and wide tiles spill)."""
    return mi * (bc // 2 + Dv // 2 + D // 4) + 3 * bc * (D + Dv) // (8 * 32 * warps)


def tile_space(D: int, Dv: int, smem_limit: int) -> list:
    """Every tensor-core tile {mi, warps, bc} that fits shared memory and the register model."""
    out = []
    for mi in (1, 2):
        for w in WARPS:
            for bc in BCS:
                if tile_regs(mi, w, bc, D, Dv) <= TILE_REGS and _smem(mi, w, bc, D, Dv) <= smem_limit:
                    out.append({"mi": mi, "warps": w, "bc": bc})
    return out


def _recorded_bc(params: str):
    """The kv rows of the pass's "tile=<rows>x<bc>" (None when absent or malformed)."""
    for word in params.split():
        if word.startswith("tile=") and "x" in word:
            try:
                return int(word.split("x", 1)[1])
            except ValueError:
                return None
    return None


def _case(problem):
    """The group as the kernel sees it (problem.memo["attention"]), or why no kernel takes it."""
    got = problem.memo.get("attention")
    if got is not None:
        return got
    L, op = problem.L, problem.op
    body = op.attrs.body
    outer = {id(a): v for a, v in zip(body.args, op.operands)}

    def const_of(v):
        return const_value(outer.get(id(v), v), L.module.weights)

    at = match_body(body, const_of)
    if at is None or len(op.results) != 1:
        return "the body is not an attention the kernel takes"
    batch, S, T, D, Dv = at.shape
    batch = tuple(batch)
    dt = at.qk.results[0].type.dtype.short
    B0, B1 = (1, batch[0]) if len(batch) == 1 else batch
    # a range profile (codegen/runtime_sizes.py): the sizes as Exprs (passed per run), the limits
    # and the tile decisions at the profile's max and opt
    env_max = L.sym_max
    env_opt = runtime_sizes.at_opt(L.options.symbol_ranges) if env_max else {}
    mx = {k: runtime_sizes.at_max(d, env_max) for k, d in (("S", S), ("T", T), ("B0", B0), ("B1", B1))}
    opt = {k: runtime_sizes.at_max(d, env_opt) for k, d in (("S", S), ("T", T), ("B0", B0), ("B1", B1))}
    if mx["B0"] > 65535 or mx["B1"] > 65535:
        return "batch beyond the grid's y/z limits"
    if max(mx["S"], mx["T"]) >= 2 ** 31:
        return "sequence lengths past int32 rows"
    limit = problem.target.smem_per_block_optin
    space = []
    if dt in MMA and D % 16 == 0 and Dv % 16 == 0 and D <= TC_MAX_D and Dv <= TC_MAX_D:
        space = tile_space(D, Dv, limit)
    if not space:  # simt
        if D > SIMT_MAX_D or Dv > SIMT_MAX_D or BC_SIMT * (D + Dv) * 4 > limit:
            return f"head dims {D}/{Dv}: no flash-attention kernel takes them"
        space = [{}]
    got = dict(at=at, outer=outer, const_of=const_of, batch=batch, S=S, T=T, D=D, Dv=Dv, dt=dt, B0=B0, B1=B1,
               space=space, max=mx, opt=opt)
    problem.memo["attention"] = got
    return got


def case_hooks(case):
    """(applies, space) of a variant whose `case(problem)` is a dict with its "space", or a string
    saying why no kernel of it takes the group (this file's and flash_attention_wgmma's)."""
    def applies(problem):
        got = case(problem)
        return no(got) if isinstance(got, str) else YES

    def space(problem) -> list:
        return case(problem)["space"]
    return applies, space


_applies, _space = case_hooks(_case)


def _default(problem, space) -> dict:
    """The pass's recorded tile when declared, else choose_tile's (bc 64), shrunk until it fits."""
    c = _case(problem)
    if space == [{}]:
        return {}
    recorded = parse_tile(problem.op.attrs.params)
    if recorded is not None:
        want = {"mi": recorded[0], "warps": recorded[1], "bc": _recorded_bc(problem.op.attrs.params) or BC}
        if want in space:
            return dict(want)
    o = c["opt"]  # (a range profile: the tile of its opt shape)
    mi, w = choose_tile(o["S"], o["B0"] * o["B1"], c["D"], c["Dv"], problem.target.sm_count)
    bc = choose_kv_rows(o["S"], o["B0"] * o["B1"], c["D"], c["Dv"], problem.target.sm_count)
    while True:
        want = {"mi": mi, "warps": w, "bc": bc}
        if want in space or (mi == 1 and w == WARPS[0]):
            break
        mi, w = (1, w) if mi > 1 else (1, max(WARPS[0], w // 2))
        bc = BC
    return dict(want) if want in space else dict(space[0])


def _cost(problem, params) -> float:
    """A rough model (seconds) for the stand-in timer: waves of CTAs x one CTA's MMA work at a
    nominal 2 TFLOP/s per SM, plus a K/V reload per CTA (not a measurement)."""
    c = _case(problem)
    o = c["opt"]
    if not params:
        return 4.0 * o["B0"] * o["B1"] * o["S"] * o["T"] * (c["D"] + c["Dv"]) / 2e13
    rows = 16 * params["mi"] * params["warps"]
    ctas = -(-o["S"] // rows) * o["B0"] * o["B1"]
    waves = -(-ctas // problem.target.sm_count)
    work = 2.0 * rows * o["T"] * (c["D"] + c["Dv"]) / 2e12
    return waves * (work + o["T"] * (c["D"] + c["Dv"]) * 2 / 2e10)


def bind_operands(ctx: LowerCtx, problem, pair_masks: bool) -> dict:
    """What both kernel shapes pass (this variant's and flash_attention_wgmma's): the Q/K/V/O
    buffers (a packed pick as a view from its offset) and their (batch0, batch1, seq, dim) strides,
    the masks (buffers, strides, template flags), the steps and post. pair_masks: a 16-bit mask of
    the scores' type may be read as column pairs (the tc kernels' accumulator layout)."""
    L = ctx.L
    c = _case(problem)
    at, outer, S, T, dt = (c[k] for k in ("at", "outer", "S", "T", "dt"))
    batch = c["batch"]
    elem = {"f16": 2, "bf16": 2, "f32": 4}[dt]

    def buf(v):
        return L.buffer(outer.get(id(v), v))

    qshape, qst, qoff = _logical_strides(at.q)
    kshape, kst, koff = _logical_strides(at.kt)
    vshape, vst, voff = _logical_strides(at.v)
    q4 = _batch2(qshape, qst, batch) + [qst[-2], qst[-1]]
    k4 = _batch2(kshape, kst, batch) + [kst[-1], kst[-2]]  # Kt [.., D, T] read as K (t, d)
    v4 = _batch2(vshape, vst, batch) + [vst[-2], vst[-1]]
    y = ctx.out(0)
    ost = list(at.out_strides)  # o's strides into the result's buffer (the absorbed head merge)
    oshape = tuple(at.pv.results[0].type.shape)
    o4 = _batch2(oshape, ost, batch) + [ost[-2], ost[-1]]

    masks, margs, mstr, index, causal = [], [], [], {}, {}
    for s in at.steps:
        band = causal_band(c["const_of"](s.operand), S, T) if s.role == "where" else None
        if band is not None:  # a constant tril/triu condition: computed from the indices, nothing loaded
            causal[id(s.op)] = band
        elif s.role in ("add", "where"):
            b = buf(s.operand)
            index[id(s.op)] = len(masks)
            mshape = tuple(s.operand.type.shape)
            ms = _mask_strides(mshape, 4)
            unit = isinstance(ms[3], int) and ms[3] == 1
            # 32-bit loads of column pairs (col is even): a 16-bit mask of the scores' type, rows
            # and offset 4-byte aligned, T even (col < T then implies col + 1 < T)
            pair = (pair_masks and s.role == "add" and unit and b.dtype.short == dt and isinstance(T, int)
                    and T % 2 == 0 and _pair_aligned(b, ms[:3]))
            # rows: does the mask vary along the query rows (its dim -2, right-aligned)?
            rows = len(mshape) >= 2 and not (isinstance(mshape[-2], int) and mshape[-2] == 1)
            masks.append({"ctype": b.ctype, "rows": rows, "unit": unit,
                          "pair": bool(pair)})
            margs.append(b)
            mstr += ms
    steps, post = steps_for_template(at, index, round16=elem == 2, causal=causal)

    def source(operand, off):
        """The operand's buffer; a packed pick reads a view from its element offset to the end."""
        b = buf(operand.source)
        if not isinstance(off, int):
            raise LoweringError(f"{describe_op(problem.op)}: a packed pick at a symbolic offset")
        if not off:
            return b
        n = int(np.prod(b.shape))
        return L.view(b, b.dtype, (n - off,), off * elem, f"{operand.source.name}.pick{off}")

    return dict(qb=source(at.q, qoff), kb=source(at.kt, koff), vb=source(at.v, voff), y=y, q4=q4, k4=k4, v4=v4,
                o4=o4, masks=masks, margs=margs, mstr=mstr, steps=steps, post=post, elem=elem)


def _render(ctx: LowerCtx, problem, params: dict):
    op = ctx.op
    c = _case(problem)
    S, T, D, Dv, dt, B0, B1 = (c[k] for k in ("S", "T", "D", "Dv", "dt", "B0", "B1"))
    body = op.attrs.body
    tc = bool(params)
    if tc:
        mi, warps, bc = params["mi"], params["warps"], params["bc"]
        smem = _smem(mi, warps, bc, D, Dv)
    else:
        smem = BC_SIMT * (D + Dv) * 4
    b = bind_operands(ctx, problem, pair_masks=tc)
    qb, kb, vb, y, q4, k4, v4, o4, masks, margs, mstr, steps, post, elem = (
        b[k] for k in ("qb", "kb", "vb", "y", "q4", "k4", "v4", "o4", "masks", "margs", "mstr", "steps", "post", "elem"))
    if tc:
        params = dict(variant="tc", T=y.ctype, T2=PAIR[dt], mma=MMA[dt], D=D, DV=Dv, WARPS=warps, MI=mi, BC=bc,
                      vec_q=q4[3] == 1 and _aligned(qb, q4[:3], elem),
                      vec_k=k4[3] == 1 and _aligned(kb, k4[:3], elem),
                      vec_v=v4[3] == 1 and _aligned(vb, v4[:3], elem),
                      vec_o=o4[3] == 1 and _pair_aligned(y, o4[:3]),
                      masks=masks, steps=steps, post=post, post_fma=not steps and post != 1.0,
                      tail=not isinstance(T, int) or T % bc != 0)
        rows = 16 * mi * warps
        block = 32 * warps
    else:
        params = dict(variant="simt", T=y.ctype, T2=PAIR.get(dt), D=D, DV=Dv, WARPS=SIMT_ROWS // 32, BC=BC_SIMT,
                      masks=masks, steps=steps, post=post, post_fma=False, tail=True)
        rows = SIMT_ROWS
        block = SIMT_ROWS
    k = ctx.render("flash_attention.cu.j2", "flash_attention", **params)
    k.add_op("flash attention tile: " + (f"{rows}x{bc} rows x kv rows, {warps} warps" if tc else "simt, one thread per row"))
    for bop in body.ops:  # the header names every op of the group
        if bop.name != "const":
            k.add_op(describe_op(bop))
    grid = (runtime_sizes.ceil_div(S, rows), B1, B0)  # Exprs of a range profile: the grid per run
    args = [qb, kb, vb, y] + margs + [ctx.i32(S), ctx.i32(T)]
    args += [ctx.i64(x) for x in q4 + k4 + v4 + o4 + mstr]
    ctx.launch(k, grid, block, args, smem=smem)
    return True


FLASH_ATTENTION = register(Variant("flash_attention", "flash_attention", ("fused",), _render, _applies, _space,
                                   _default, priority=PRIORITY, kinds=("attention",), regions=True, cost=_cost,
                                   runtime_sizes=True))
