"""Weight-only int4 GEMM for the small-M shapes of token-by-token decoding: `matmul_int4_weight`
(ir/ops/gemm_int4.py) as declared Variants of family "gemm_int4" (templates/gemm_int4.cu.j2).

* gemm_int4.small_m (priority 10): M <= 16 rows (x's leading dims folded), f16 / bf16 activations
  and scales of that dtype. The weight is re-laid-out at compile time (ctx.weight transforms, so it
  lands in weights.bin once): 16-column tiles x 64-k chunks of 512 bytes, lane l's 16 bytes holding
  exactly its mma.sync m16n8k16 B fragments for the chunk's four k16 steps and the tile's two n8
  halves, nibbles ordered so that `(word >> 4j) & 0x000f000f | 0x64006400` (f16; 0x4300 bf16)
  is fragment register j as two halves 1024 + u (128 + u): one lop3 per pair, then an exact
  subtract of 1024 + z and one multiply by the group's scale (rounded once to f16 / bf16, as
  DequantizeLinear with an f16 scale writes it). x rows are the mma's A rows (rows >= M zero);
  fp32 accumulators. A CTA owns R tiles (16R columns) and 1/SPLIT of K (SPLIT > 1 only when the
  tiles give too few CTAs: fp32 partials, then a reduce kernel); its KSPLIT warps split that K
  (chunk c goes to warp c % KSPLIT), each keeping U chunks of loads in flight (registers,
  software-pipelined), and reduce through shared memory; the scale groups' values (and zero points) are re-laid-out per
  (tile, group) so a lane reads its two columns' scales in one 4-byte load.
* gemm_int4.dequant (priority 0): everything else (M > 16, f32 activations, block sizes that are
  not a multiple of 16, odd K): the weight dequantized at compile time into x's dtype (weights.bin
  holds it at full width: no memory saving) and the op lowered as an ordinary MatMul (+ Add of the
  bias), i.e. the
  normal GEMM family (mma / wgmma) — prefill shapes are compute-bound, where that is the right kernel.

    applies(problem) -> Fit   small_m: sm_80+ (Target.cc), constant w_q / scale / zero point, M <= 16,
                              x f16/bf16 with scales of the same dtype, block_size % 16 == 0, K even,
                              x 4-byte aligned
    space                     R (16-column tiles a CTA) x KSPLIT (warps along K) x SPLIT (CTAs along
                              K, for small N) x PIPE: regs (U chunks in flight, APRE: x fragments
                              prefetched too) or smem (STAGES), within the Target's threads per
                              block, shared memory and a register budget
    default                   PIPE regs, R = 2 for large N (else 1), SPLIT up to one CTA an SM, the
                              fewest KSPLIT warps giving ~12 resident warps an SM, U = 2 (measured
                              best regs point on the H200 at K = N = 8192; the tuner also races the
                              PIPE smem ring: STAGES cp.async stages a warp)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ...ir.ops.gemm_int4 import dequantized_weight
from .. import dtypes
from ..lower import LowerCtx
from ..variants import YES, Variant, no, register
from .common import cdiv
from .gemm_lowering import aligned

FAMILY = "gemm_int4"
PRIORITY = 10
MIN_CC = 80          # mma.sync m16n8k16 f16/bf16, bf16 hsub2/hmul2
MAX_M = 16           # the mma's A rows
TILE_N = 16          # columns of one packed tile (two n8 mma tiles)
CHUNK_K = 64         # k of one packed chunk (four k16 mma steps)
CHUNK_BYTES = TILE_N * CHUNK_K // 2
# activation type -> (magic, OFFSET): the exponent that turns a nibble u in the low mantissa bits
# into OFFSET + u exactly (the C type comes from the one dtype table, codegen/dtypes.py)
ACT = {"f16": ("0x64006400", 1024), "bf16": ("0x43004300", 128)}


@dataclass(frozen=True)
class Int4Gemm:
    """What the kernel needs to know of one op (decided by applies, reused by space/render)."""
    M: int
    K: int
    N: int
    block: int       # group size along K
    act: str         # f16 | bf16
    has_zp: bool     # per-group zero points (else the constant ZERO)
    zero: int        # the nibble value that dequantizes to 0 without zero points (8 for i4, 0 for u4)
    has_bias: bool = False  # bias[N] added in the epilogue (in fp32, before the store)
    x16: bool = False       # K % 8 == 0 and x 16-byte aligned: x rows by 16-byte cp.async (PIPE smem)

    @property
    def tiles(self) -> int:
        return cdiv(self.N, TILE_N)

    @property
    def chunks(self) -> int:
        return cdiv(self.K, CHUNK_K)

    @property
    def groups(self) -> int:  # scale groups covering the padded K
        return cdiv(self.chunks * CHUNK_K, self.block)


def _rows(shape) -> int:
    m = 1
    for d in shape[:-1]:
        m *= int(d)
    return m


def analyse(problem) -> "Int4Gemm | str":
    if problem.target.cc < MIN_CC:
        return f"needs sm_80+ (mma.sync m16n8k16), target is {problem.target.arch}"
    x, wq, s, y = problem.tensor(0), problem.tensor(1), problem.tensor(2), problem.result(0)
    if any(problem.value(i) is None for i in (1, 2)) or (problem.has(3) and problem.value(3) is None):
        return "w_q / scale / zero point are not compile-time constants"
    if x.dtype.short not in ACT:
        return f"activations are {x.dtype.short}, not f16 / bf16"
    if s.dtype != x.dtype:
        return f"scales are {s.dtype.short}, activations {x.dtype.short}"
    K, N = (int(d) for d in wq.shape)
    M = _rows(x.shape)
    bs = int(problem.attr("block_size"))
    if M > MAX_M:
        return f"M = {M} > {MAX_M} rows (the dequantize + GEMM variant takes it)"
    if bs % 16:
        return f"block_size {bs} is not a multiple of 16 (a k16 mma step in one group)"
    if K % 2:
        return f"K = {K} is odd (x is read in pairs)"
    if not aligned(x, 4) or y.numel == 0:
        return "x is a view not 4-byte aligned, or the output is empty"
    zero = 8 if wq.dtype.short == "i4" else 0
    return Int4Gemm(M, K, N, bs, x.dtype.short, problem.has(3), zero, problem.has(4), K % 8 == 0 and aligned(x, 16))


def _applies(problem):
    got = analyse(problem)
    if isinstance(got, str):
        return no(got)
    problem.memo["gemm_int4.problem"] = got
    return YES


def regs_estimate(p: dict) -> int:
    """Registers a thread holds (PIPE regs): two stages of U*R 16-byte loads (and with APRE their x
    fragments), the accumulators, scales."""
    return 2 * p["U"] * p["R"] * 4 + p["R"] * 8 + 2 * p["U"] * p["R"] * 4 + 16 * p["U"] * p.get("APRE", 0) + 48


# The smem-ring and APRE points came after the last GPU round that passed (H200, 2026-12-02 16:15) and
# the next one failed on them (every-space-point test: CUDA_ERROR_INVALID_VALUE at launch), so they
# stay out of the declared space until one passes on the GPU (True brings them back).
UNVERIFIED_POINTS = False


def splits(pr: "Int4Gemm", R: int, KS: int, sm_count: int) -> list:
    """CTAs along K on offer: 1, and 2 / 4 / 8 while the tiles alone give too few CTAs (< 2 a SM)
    and every split still has a chunk for each warp."""
    ctas = cdiv(pr.tiles, R)
    return [1] + [s for s in (2, 4, 8) if ctas * s <= 4 * sm_count and ctas < 2 * sm_count
                  and pr.chunks >= s * KS]


def scale_slots(block: int) -> int:
    """Scale groups a 64-k chunk reads (the template's SPC): 64 / B, 1 when B is a multiple of 64,
    else one per k16 step."""
    return 64 // block if 64 % block == 0 else (1 if block % 64 == 0 else 4)


def stage_bytes(pr: "Int4Gemm", R: int) -> int:
    """One stage of PIPE smem's ring (the template's STAGE): R weight tiles, their scale (and zero)
    pairs, the x rows (8 or 16, 144-byte rows: ldmatrix without bank conflicts)."""
    pairs = R * scale_slots(pr.block) * 32
    return R * CHUNK_BYTES + pairs * (2 if pr.has_zp else 1) + (16 if pr.M > 8 else 8) * 144


def smem_bytes(pr: "Int4Gemm", p: dict) -> int:
    """Dynamic shared memory of a point (PIPE smem: the warps' rings; regs: none)."""
    return p["KSPLIT"] * p["STAGES"] * stage_bytes(pr, p["R"]) if p.get("PIPE") == "smem" else 0


def space(problem) -> list:
    pr: Int4Gemm = problem.memo["gemm_int4.problem"]
    t = problem.target
    out = []
    for R in (1, 2, 4):
        if R > 1 and pr.tiles < R:
            continue
        for KS in (2, 4, 8, 16):
            if KS * 32 > t.max_threads_per_block or (KS > 2 and pr.chunks < KS):
                continue
            red = 4 * KS * R * 256  # the static reduction buffer
            for SPLIT in splits(pr, R, KS, t.sm_count):
                for U in (1, 2, 4):
                    for APRE in ((0, 1) if UNVERIFIED_POINTS else (0,)):
                        p = dict(R=R, KSPLIT=KS, U=U, SPLIT=SPLIT, PIPE="regs", APRE=APRE)
                        if regs_estimate(p) <= min(t.regs_per_thread, 168) and red <= t.smem_per_block:
                            out.append(p)
                if not UNVERIFIED_POINTS or not pr.x16 or KS not in (4, 8):
                    continue
                for ST in (3, 4, 6):
                    p = dict(R=R, KSPLIT=KS, SPLIT=SPLIT, PIPE="smem", STAGES=ST)
                    if red <= t.smem_per_block and red + smem_bytes(pr, p) <= t.smem_per_block_optin:
                        out.append(p)
    return out


def default(problem, sp: list) -> dict:
    """PIPE regs (the smem ring is the tuner's to pick). R = 2 when N gives two tiles a CTA and still
    >= 2 CTAs an SM (each A fragment serves two tiles), else 1; SPLIT: CTAs along K until there is
    one CTA an SM; KSPLIT: the fewest warps giving ~12 resident warps an SM; U = 2 (1 when a warp
    has one chunk). (H200, K = N = 8192, M = 1..16: R 2, KSPLIT 8, U 2 was the fastest regs point.)"""
    pr: Int4Gemm = problem.memo["gemm_int4.problem"]
    sms = problem.target.sm_count
    sp = [p for p in sp if p["PIPE"] == "regs"] or sp
    r = 2 if pr.tiles >= 2 * sms else 1
    cands = [p for p in sp if p["R"] == r] or [p for p in sp if p["R"] == 1] or sp
    r = cands[0]["R"]
    ctas = cdiv(pr.tiles, r)
    offered = sorted({p["SPLIT"] for p in cands})
    split = 1
    while ctas * split < sms and split * 2 in offered:
        split *= 2
    cands = [p for p in cands if p["SPLIT"] == split] or cands
    split = cands[0]["SPLIT"]
    ks_list = sorted({p["KSPLIT"] for p in cands})
    ks = next((k for k in ks_list if ctas * split * k >= 12 * sms), ks_list[-1])
    u = 2 if cdiv(pr.chunks, split * ks) >= 2 else 1
    cands = [p for p in cands if not p.get("APRE")] or cands
    by = {(p["KSPLIT"], p.get("U")): p for p in cands}
    for uu in (u, 1, 2, 4):
        if (ks, uu) in by:
            return dict(by[(ks, uu)])
    return dict(cands[0])


# ---------------------------------------------------------------- compile-time layouts

def pack_weight(u: np.ndarray, pr: Int4Gemm) -> np.ndarray:
    """u [K, N] (nibble values 0..15) -> uint32 [tiles, chunks, 32 lanes, 4 words]; K and N padded
    with 0 (x is 0 there, so any finite weight gives 0). Row k = chunk*64 + 16w + 8b + 2t + hi and
    column n = tile*16 + 8h + g go to lane 4g + t, word w, nibble 4hi + 2h + b (the m16n8k16 B
    fragment of n8 half h: register b, element hi)."""
    KP, NP = pr.chunks * CHUNK_K, pr.tiles * TILE_N
    full = np.zeros((KP, NP), np.uint8)
    full[:pr.K, :pr.N] = u
    # (chunk, w, b, t, hi, tile, h, g) -> (tile, chunk, g, t, w, hi, h, b)
    v = full.reshape(pr.chunks, 4, 2, 4, 2, pr.tiles, 2, 8).transpose(5, 0, 7, 3, 1, 4, 6, 2)
    v = np.ascontiguousarray(v).reshape(pr.tiles, pr.chunks, 32, 4, 8)
    # nibble i at bits 4i of the little-endian word: byte i // 2, low nibble when i is even
    packed = v[..., 0::2] | (v[..., 1::2] << np.uint8(4))
    return np.ascontiguousarray(packed).view(np.uint32).reshape(pr.tiles, pr.chunks, 32, 4)


def pack_groups(a: np.ndarray, pr: Int4Gemm, dt) -> np.ndarray:
    """A per-(group, column) array [KB, N] -> [tiles, groups, 8 (lane // 4), 2 (n8 half)] in dt
    (zero padded), so lane l reads its two columns' values of a group as one pair."""
    full = np.zeros((pr.groups, pr.tiles * TILE_N), dt)
    full[:a.shape[0], :pr.N] = a.astype(dt)
    t = full.reshape(pr.groups, pr.tiles, 2, 8)      # [g, tile, half, lane//4]
    return np.ascontiguousarray(t.transpose(1, 0, 3, 2))


def nibbles(w_q: np.ndarray, zero: int) -> np.ndarray:
    """The stored nibble u (uint8) of each int4 value: q + 8 for i4 (u = 8 is 0), q for u4. From
    the storage bytes (ml_dtypes keeps the 4-bit code in the low nibble; converting through int64
    is ~50x slower at decoder sizes)."""
    a = np.asarray(w_q)
    if a.dtype.name in ("int4", "uint4"):
        code = np.ascontiguousarray(a).view(np.uint8) & np.uint8(0xF)
        return code ^ np.uint8(8) if a.dtype.name == "int4" else code
    return (a.astype(np.int64) + (8 if zero == 8 else 0)).astype(np.uint8)


def kernel_params(pr: Int4Gemm, params: dict, op_names: str, kind: str = "gemm") -> dict:
    magic, offset = ACT[pr.act]
    ctype = dtypes.ctype(dtypes.info(pr.act).dtype)
    params = {"SPLIT": 1, "PIPE": "regs", "STAGES": 0, "U": 1, "APRE": 0, **params}
    return dict(kind=kind, op_names=op_names, M=pr.M, K=pr.K, N=pr.N, TILES=pr.tiles, CHUNKS=pr.chunks,
                GROUPS=pr.groups, BS=pr.block, act=pr.act, T=ctype, MAGIC=magic, OFFSET=offset,
                has_zp=pr.has_zp, ZERO=pr.zero, has_bias=pr.has_bias, CPS=cdiv(pr.chunks, params["SPLIT"]),
                **params)


def grid(pr: Int4Gemm, params: dict) -> tuple:
    """((CTAs along N, CTAs along K), threads) of the GEMM kernel."""
    return (cdiv(pr.tiles, params["R"]), params.get("SPLIT", 1)), params["KSPLIT"] * 32


def _render(ctx: LowerCtx, problem, params: dict):
    pr: Int4Gemm = problem.memo["gemm_int4.problem"]
    x, y = ctx.inp(0), ctx.out(0)
    sdt = np.float16 if pr.act == "f16" else ctx.value(2).dtype
    w = ctx.weight(1, lambda q: pack_weight(nibbles(q, pr.zero), pr), key="int4_mma_tiles")
    s = ctx.weight(2, lambda a: pack_groups(a, pr, sdt), key="int4_group_pairs")
    args = [x, w, s]
    if pr.has_zp:
        offset = ACT[pr.act][1]
        zsub = lambda z: pack_groups(nibbles(z, pr.zero).astype(np.float32) + offset, pr, sdt)  # noqa: E731
        args.append(ctx.weight(3, zsub, key="int4_zero_offsets"))  # OFFSET + z: exact in f16 / bf16
    split = params.get("SPLIT", 1)
    bias = [ctx.inp(4)] if pr.has_bias else []
    part = ctx.temp("f32", [split, pr.M, pr.N], "split_k") if split > 1 else None
    args += [part] if split > 1 else bias + [y]
    k = ctx.render("gemm_int4.cu.j2", "gemm_int4", **kernel_params(pr, params, ctx.op.name))
    g, threads = grid(pr, params)
    ctx.launch(k, g, threads, args, smem=smem_bytes(pr, params))
    if split > 1:  # the partials' sum (+ bias), in the activation dtype
        kr = ctx.render("gemm_int4.cu.j2", "gemm_int4_reduce", **kernel_params(pr, params, ctx.op.name, "reduce"))
        ctx.launch(kr, cdiv(pr.M * pr.N, 256), 256, [part] + bias + [y])
    return True


# ---------------------------------------------------------------- the fallback

def _render_dequant(ctx: LowerCtx, problem, params: dict):
    """W dequantized at compile time into x's dtype, then the op as a MatMul (the GEMM family)."""
    from ...ir.graph import Op, Value
    from ...ir.ops.core import ConstAttrs
    from ...ir.registry import NoAttrs
    from ...ir.types import TensorType
    op, L = ctx.op, ctx.L
    xv = op.operands[0]
    vals = [problem.value(i) for i in (1, 2)] + [problem.value(3) if problem.has(3) else None]
    if vals[0] is None or vals[1] is None or (problem.has(3) and vals[2] is None):
        ctx.fail("matmul_int4_weight needs constant w_q / scale / zero point")
    w = dequantized_weight(op.attrs, *vals).astype(xv.type.dtype.np)
    res = op.results[0]
    wv = Value(f"{res.name}.w_dequant", TensorType(xv.type.dtype, tuple(w.shape)))
    Op("const", [], [wv], ConstAttrs(value=w), op.loc)  # (its producer: problem.value reads it)
    L.values[id(wv)] = ctx.new_weight(w, "w_dequant")
    inner = Value(f"{res.name}.matmul", res.type)
    mm = Op("MatMul", [xv, wv], [inner], NoAttrs(), op.loc)
    if not problem.has(4):
        L.equiv[id(inner)] = L.canon(res)  # the MatMul writes the op's result buffer
        L.lower_op(mm)
    else:  # then the bias as an Add (a temp between them)
        L.lower_op(mm)
        out = Value(f"{res.name}.bias", res.type)
        add = Op("Add", [inner, op.operands[4]], [out], NoAttrs(), op.loc)
        L.equiv[id(out)] = L.canon(res)
        L.lower_op(add)
    ctx.emitted += 1
    return True


SMALL_M = register(Variant("gemm_int4.small_m", FAMILY, ("matmul_int4_weight",), _render, _applies,
                           space, default, priority=PRIORITY))  # no cost model: the tuner times the whole space
DEQUANT = register(Variant("gemm_int4.dequant", FAMILY, ("matmul_int4_weight",), _render_dequant,
                           priority=0))
