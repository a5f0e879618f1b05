"""Lowering of the `fused {kind = "attention"}` groups of compiler/passes/fuse_attention.py to ONE
flash-attention kernel (templates/flash_attention.cu.j2): O = softmax(steps(Q K^T)) V with an
online softmax, so no S x T tensor exists in global memory.

The body is read back with the pass's own matcher (`fuse_attention.match_body`), so the pass and
this lowering agree on every op's role. Each operand is bound as (batch0, batch1, seq, dim)
strides into the buffer of the value the group reads: an absorbed Transpose permutes the strides,
a broadcast batch dim (K/V shared across heads) gets stride 0, a mask gets stride 0 along every
dim it broadcasts over. Rank-3 scores [N,S,T] run as batch0 = 1, batch1 = N.

Variants:
- "tc" (f16/bf16, D and Dv multiples of 16 up to 128): tensor cores; the CTA shape (warps, m-tiles
  per warp) is the pass's decision in params (fuse_attention.tile_of / choose_tile), made smaller
  while the target's shared memory would not hold it;
- "simt" (f32, or head dims the tc variant does not take, up to 256): one thread per query row.
The scale/mask steps are folded with log2(e) into per-step coefficients when no Where step sits
among them (x = a * qk + sum b_i * mask_i); otherwise they run in order and a final factor
log2(e) follows. The lowering declines (the generic fallback then lowers the body op by op) when
shared memory would not fit the target.
"""
from __future__ import annotations

import math

import numpy as np

from ...ir.builder import const_value
from ...passes.fuse_attention import TC_MAX_D, choose_tile, match_body, parse_tile
from ..lower import LowerCtx, describe_op, lowering

PRIORITY = 30  # above the generic fallback (fused.FALLBACK_PRIORITY) and the other fused families
LOG2E = 1.4426950408889634
BC = 64          # key/value rows per tile (tc)
BC_SIMT = 32     # key/value rows per tile (simt)
SIMT_ROWS = 64   # threads (query rows) per CTA (simt)
SIMT_MAX_D = 256
FLT_MAX = 3.4028234663852886e38
MMA = {"f16": "f16", "bf16": "bf16"}
PAIR = {"f16": "__half2", "bf16": "__nv_bfloat162"}


def _contiguous(shape) -> list:
    st, acc = [], 1
    for d in reversed(shape):
        st.insert(0, acc)
        acc *= int(d)
    return st


def _logical_strides(operand) -> tuple:
    """(shape, strides, element offset) of Q/Kt/V as the group's MatMul sees it, into the source's
    buffer: the packed pick first (rank-5 perm, index along its axis 0), then the perm."""
    shape = tuple(int(d) for d in operand.source.type.shape)
    st = _contiguous(shape)
    off = 0
    if operand.pick is not None:
        p5, index = operand.pick
        off = index * st[p5[0]]
        shape, st = tuple(shape[p] for p in p5[1:]), [st[p] for p in p5[1:]]
    if operand.perm is not None:
        shape, st = tuple(shape[p] for p in operand.perm), [st[p] for p in operand.perm]
    return shape, st, off


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
    full = (1,) * (4 - len(shape)) + tuple(int(d) for d in shape)
    st = _contiguous(full)
    return [0 if full[i] == 1 else st[i] for i in range(4)]


def _aligned(buf, strides_but_last, elem: int) -> bool:
    """16-byte cp.async chunks: offset and every non-dim stride keep 16-byte alignment."""
    off = buf.alias_offset if buf.alias_of is not None else 0
    return off % 16 == 0 and all((s * elem) % 16 == 0 for s in strides_but_last)


def _pair_aligned(buf, strides_but_last) -> bool:
    """Paired 16-bit stores: 4-byte aligned offset and even strides."""
    off = buf.alias_offset if buf.alias_of is not None else 0
    return off % 4 == 0 and all(s % 2 == 0 for s in strides_but_last)


def steps_for_template(at, masks_index) -> list:
    """The steps as the template applies them, with log2(e) and the Q/K scales folded in."""
    steps = list(at.steps)
    pre = at.scale
    if not any(s.role == "where" for s in steps):
        # x = a * qk + sum_i b_i * mask_i, in log2 units
        out = []
        total = pre * math.prod(s.scale for s in steps if s.role == "scale") * LOG2E
        out.append({"role": "scale", "c": total})
        for k, s in enumerate(steps):
            if s.role == "add":
                after = math.prod(t.scale for t in steps[k + 1:] if t.role == "scale")
                out.append({"role": "add", "i": masks_index[id(s.op)], "c": after * LOG2E})
        return out if (total != 1.0 or len(out) > 1) else []
    out = [] if pre == 1.0 else [{"role": "scale", "c": pre}]
    for s in steps:
        if s.role == "scale":
            out.append({"role": "scale", "c": s.scale})
        elif s.role == "add":
            out.append({"role": "add", "i": masks_index[id(s.op)], "c": 1.0})
        else:
            fill = s.fill if s.fill >= -FLT_MAX else float("-inf")
            out.append({"role": "where", "i": masks_index[id(s.op)], "fill": max(min(fill, FLT_MAX), -math.inf),
                        "keep": s.keep_if_true})
    out.append({"role": "scale", "c": LOG2E})
    return out


@lowering("fused", priority=PRIORITY, regions=True, when=lambda op: op.attrs.kind == "attention")
def _fused_attention(ctx: LowerCtx):
    L, op = ctx.L, ctx.op
    body = op.attrs.body
    outer = {id(a): v for a, v in zip(body.args, op.operands)}

    def const_of(v):
        return const_value(outer.get(id(v), v), L.module.weights)

    at = match_body(body, const_of)
    if at is None or len(op.results) != 1:
        return None
    batch, S, T, D, Dv = at.shape
    batch = tuple(int(d) for d in batch)
    dt = at.qk.results[0].type.dtype.short
    elem = {"f16": 2, "bf16": 2, "f32": 4}[dt]
    B0, B1 = (1, batch[0]) if len(batch) == 1 else batch

    tc = dt in MMA and D % 16 == 0 and Dv % 16 == 0 and D <= TC_MAX_D and Dv <= TC_MAX_D
    sm = ctx.target.sm_count
    if tc:
        mi, warps = parse_tile(op.attrs.params) or choose_tile(S, B0 * B1, D, Dv, sm)
        while True:
            smem = (16 * mi * warps * (D + 8) + 2 * BC * (D + 8) + 2 * BC * (Dv + 8)) * 2
            if smem <= ctx.target.smem_per_block_optin or (warps == 1 and mi == 1):
                break
            mi, warps = (1, warps) if mi > 1 else (1, warps // 2)
        if smem > ctx.target.smem_per_block_optin:
            tc = False
    if not tc:
        smem = BC_SIMT * (D + Dv) * 4
        if D > SIMT_MAX_D or Dv > SIMT_MAX_D or smem > ctx.target.smem_per_block_optin:
            return None  # nothing renders it: the fallback lowers the body op by op
    if B0 > 65535 or B1 > 65535:  # grid y/z limits: likewise
        return None

    def buf(v):
        return L.buffer(outer.get(id(v), v))

    qshape, qst, qoff = _logical_strides(at.q)
    kshape, kst, koff = _logical_strides(at.kt)
    vshape, vst, voff = _logical_strides(at.v)
    q4 = _batch2(qshape, qst, batch) + [qst[-2], qst[-1]]
    k4 = _batch2(kshape, kst, batch) + [kst[-1], kst[-2]]  # Kt [.., D, T] read as K (t, d)
    v4 = _batch2(vshape, vst, batch) + [vst[-2], vst[-1]]
    y = ctx.out(0)
    rshape = tuple(int(d) for d in at.result.type.shape)
    rst = _contiguous(rshape)
    if at.out_perm is None:
        ost = rst
    else:
        ost = [0] * len(rshape)
        for k, a in enumerate(at.out_perm):
            ost[a] = rst[k]
    oshape = tuple(int(d) for d in at.pv.results[0].type.shape)
    o4 = _batch2(oshape, ost, batch) + [ost[-2], ost[-1]]

    masks, margs, mstr, index = [], [], [], {}
    for s in at.steps:
        if s.role in ("add", "where"):
            b = buf(s.operand)
            index[id(s.op)] = len(masks)
            mshape = tuple(int(d) for d in s.operand.type.shape)
            # does the mask vary along the query rows (its dim -2, right-aligned)?
            masks.append({"ctype": b.ctype, "rows": len(mshape) >= 2 and mshape[-2] != 1})
            margs.append(b)
            mstr += _mask_strides(mshape, 4)
    steps = steps_for_template(at, index)

    def source(operand, off):
        """The operand's buffer; a packed pick reads a view from its element offset to the end."""
        b = buf(operand.source)
        if not off:
            return b
        n = int(np.prod(b.shape))
        return L.view(b, b.dtype, (n - off,), off * elem, f"{operand.source.name}.pick{off}")

    qb, kb, vb = source(at.q, qoff), source(at.kt, koff), source(at.v, voff)
    if tc:
        params = dict(variant="tc", T=y.ctype, T2=PAIR[dt], mma=MMA[dt], D=D, DV=Dv, WARPS=warps, MI=mi, BC=BC,
                      vec_q=q4[3] == 1 and _aligned(qb, q4[:3], elem),
                      vec_k=k4[3] == 1 and _aligned(kb, k4[:3], elem),
                      vec_v=v4[3] == 1 and _aligned(vb, v4[:3], elem),
                      vec_o=o4[3] == 1 and _pair_aligned(y, o4[:3]),
                      masks=masks, steps=steps)
        rows = 16 * mi * warps
        block = 32 * warps
    else:
        params = dict(variant="simt", T=y.ctype, D=D, DV=Dv, WARPS=SIMT_ROWS // 32, BC=BC_SIMT,
                      masks=masks, steps=steps)
        rows = SIMT_ROWS
        block = SIMT_ROWS
    k = ctx.render("flash_attention.cu.j2", "flash_attention", **params)
    for bop in body.ops:  # the header names every op of the group
        if bop.name != "const":
            k.add_op(describe_op(bop))
    grid = (-(-S // rows), B1, B0)
    args = [qb, kb, vb, y] + margs + [ctx.i32(S), ctx.i32(T)]
    args += [ctx.i64(x) for x in q4 + k4 + v4 + o4 + mstr]
    ctx.launch(k, grid, block, args, smem=smem)
    return True

