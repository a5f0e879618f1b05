"""2:4 structured-sparse GEMM on the sparse tensor cores: `matmul_sparse24` (ir/ops/gemm_sparse24.py)
as declared Variants of family "gemm_sparse24" (templates/gemm_sparse24.cu.j2).

The weight is the sparse operand, so the kernel computes Y^T = W^T @ X^T with
`mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.{f16,bf16}` (sm_80+): the mma's A is
W^T [N, K] (row n = column n of W, 2:4-sparse along K, compressed to K/2 values), its B is X^T [K, M]
in "col" layout, i.e. X [M, K] row-major as it lies in memory, and its D is Y^T (stored transposed
by the epilogue, with the bias along N and the activation).

* gemm_sparse24.mma (priority 10, rank 1; the one of sm_80 / sm_89 / plain sm_90): f16 / bf16 activations, constant w_values / w_meta, K % 8 == 0,
  x 16-byte aligned. At compile time (ctx.weight transforms, into weights.bin once) the values are
  re-laid-out per 16-row x 32-k mma tile (512 bytes): lane l = 4g + t holds its four A registers
  {row g, kept cols 2t..2t+1}, {row g+8, same}, {row g, kept cols 8+2t..}, {row g+8, same} as one
  16-byte load (the PTX ISA's sparse m16n8k32 f16/bf16 A fragment: k chunk t and chunk 4 + t of the
  tile). The metadata goes per tile into 16 words: word 2g + h is what lane 4g + h (h = 0, 1: sparsity
  selector 0, threads T0 / T1 of each quad) passes, bits 0..15 row g and 16..31 row g + 8, the 4-bit
  code (i0 | i1 << 2) of chunk j of k-half h at bits 4j. K is padded to the 64-k stage (zero values,
  code 0b0100), N to 256 rows. A CTA owns BN weight rows x BM activation rows; WN x WM warps; a
  STAGES-deep cp.async ring of 64-k stages (compressed values, metadata, x rows 144-byte padded for
  conflict-free ldmatrix, which gives each n8 B fragment of a k32 step in one x4 load).
* gemm_sparse24.wgmma (priority 10, rank 0: first in the heuristic order on sm_90a; H200 round of
  2026-12-03 07:08, fp16: correct, 1.1-1.25x the mma variant at M = 4096, equal at M = 128): sm_90a (Target.has_wgmma), the same conditions and the same
  weight packing: `wgmma.mma_async.sp` m64n{BM}k32 with the sparse A from registers (each warp its
  16-row tile: the per-warp A fragment and metadata of sparse wgmma are those of mma.sp m16n8k32) and
  x^T from a 128-byte-swizzled K-major shared-memory tile (templates/gemm_sparse24_wgmma.cu.j2); WG
  warp groups, TPW (1, 2) 64-row weight tiles a warp group (TPW wgmmas a k-step: more work a barrier),
  BM (64, 128, 256; TPW x BM <= 256) activation rows, STAGES (3, 4), SPLIT, KPER (1; 2 at 4 stages:
  two 64-k stages a batch of wgmmas, half the barriers and waits).
* gemm_sparse24.dense (priority 0): everything else (f32 activations, a pre-sm_80 target, views),
  and the dense alternative the tuner times against the sparse kernel (TensorRT's "sparse tactics
  are timed against dense"): the weight decompressed at compile time and the op lowered as a MatMul
  (+ Add of the bias, + Relu / Gelu), i.e. the normal GEMM family.

    applies(problem) -> Fit   mma: sm_80+, x f16/bf16, constant w_values / w_meta, K % 8 == 0, x 16-byte
                              aligned, a non-empty output
    space                     BN (64, 128) x BM (32, 64, 128) x warps WN x WM (4 or 8) x STAGES (3, 4) x
                              SPLIT (CTAs along K, 2 / 4 / 8 offered only when the tiles give fewer CTAs
                              than SMs: fp32 partials, then a reduce kernel with the bias / activation) x
                              within the Target's shared memory (opt-in) and threads; the y tile always goes
                              out transposed through shared memory (16-byte row stores; storing from
                              registers was dropped after the H200 round: the same results, more stores)
    default                   the largest tiles that still give >= 1 CTA a SM (M >= 1024: BN 128, BM 128,
                              2 x 2 warps, 3 stages; small M: BM 32 / 64 with 4 x 1 / 2 x 2 warps;
                              still too few tiles: K split over CTAs until there is one CTA a SM)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...ir.ops.gemm_sparse24 import decompress
from .. import dtypes
from ..lower import LowerCtx
from ..variants import YES, Variant, no, register
from .common import cdiv
from .gemm_lowering import aligned

FAMILY = "gemm_sparse24"
PRIORITY = 10
MIN_CC = 80           # mma.sp m16n8k32 f16 / bf16
TILE_N = 16           # weight rows of one mma (its M)
STEP_K = 32           # k of one mma.sp (its K: 16 kept values a row)
STAGE_K = 64          # k of one pipeline stage (two mma k-steps)
PAD_N = 256           # N is padded to the largest BN (the wgmma variant: 2 warp groups x 2 tiles of 64)
X_ROW_BYTES = 144     # one x row of a stage: 64 halves + 16 bytes (ldmatrix rows on distinct banks)
PAD_CODE = 0b0100     # i0 = 0, i1 = 1: the metadata of an all-zero (padding) group
MMA = {"f16": "f16", "bf16": "bf16"}


@dataclass(frozen=True)
class Sparse24Gemm:
    """What the kernel needs to know of one op (decided by applies, reused by space/render)."""
    M: int
    K: int
    N: int
    act: str          # f16 | bf16
    has_bias: bool
    activation: str   # none | relu | gelu | gelu_tanh (the epilogue, gemm_common.cu.j2's activation macro)
    y16: bool = True  # y 16-byte aligned (the epilogue's 16-byte row stores when N % 8 == 0)

    @property
    def k_pad(self) -> int:
        return cdiv(self.K, STAGE_K) * STAGE_K

    @property
    def n_pad(self) -> int:
        return cdiv(self.N, PAD_N) * PAD_N

    @property
    def tiles_n(self) -> int:
        return self.n_pad // TILE_N

    @property
    def steps_k(self) -> int:
        return self.k_pad // STEP_K


def _rows(shape) -> int:
    m = 1
    for d in shape[:-1]:
        m *= int(d)
    return m


def analyse(problem) -> "Sparse24Gemm | str":
    if problem.target.cc < MIN_CC:
        return f"needs sm_80+ (mma.sp m16n8k32), target is {problem.target.arch}"
    x, y = problem.tensor(0), problem.result(0)
    if problem.value(1) is None or problem.value(2) is None or (problem.has(3) and problem.value(3) is None):
        return "w_values / w_meta / bias are not compile-time constants"
    if x.dtype.short not in MMA:
        return f"activations are {x.dtype.short}, not f16 / bf16"
    K, N = int(x.shape[-1]), int(problem.tensor(1).shape[0])
    if K % 8:
        return f"K = {K} is not a multiple of 8 (x rows are read in 16-byte pieces)"
    if not aligned(x, 16) or y.numel == 0:
        return "x is a view not 16-byte aligned, or the output is empty"
    return Sparse24Gemm(_rows(x.shape), K, N, x.dtype.short, problem.has(3), problem.attr("activation"), aligned(y, 16))


def _applies(problem):
    got = analyse(problem)
    if isinstance(got, str):
        return no(got)
    problem.memo["gemm_sparse24.problem"] = got
    return YES


WARPS = ((2, 2), (4, 1), (2, 4), (4, 2))  # (WN, WM): warps along N (weight rows) x along M


def splits(pr: "Sparse24Gemm", bn: int, bm: int, sm_count: int) -> list:
    """CTAs along K on offer: 1, and 2 / 4 / 8 while the tiles alone give fewer CTAs than SMs (the
    b1 shapes: 128 x 3072 x 768 has 24 tiles of 64 x 64) and each split keeps >= 2 k blocks."""
    ctas = cdiv(pr.N, bn) * cdiv(pr.M, bm)
    kb = pr.k_pad // STAGE_K
    return [1] + [s for s in (2, 4, 8) if ctas < sm_count and ctas * s <= 2 * sm_count and kb >= 2 * s]


def pick_split(pr: "Sparse24Gemm", bn: int, bm: int, offered, sm_count: int) -> int:
    """The fewest CTAs along K (of those offered) that give one CTA a SM."""
    ctas = cdiv(pr.N, bn) * cdiv(pr.M, bm)
    for s in sorted(offered):
        if ctas * s >= sm_count:
            return s
    return max(offered)


def smem_bytes(params: dict) -> int:
    """The ring: STAGES x (BN/16 x 2 k-steps x (512 value + 64 metadata bytes) + BM x-rows); the epilogue
    reuses it for the y tile (BM rows of BN + 8 halves), which always fits in 3 stages."""
    ring = params["STAGES"] * (params["BN"] // TILE_N * 2 * (512 + 64) + params["BM"] * X_ROW_BYTES)
    assert ring >= params["BM"] * (params["BN"] + 8) * 2
    return ring


def space(problem) -> list:
    t = problem.target
    out = []
    for BN in (64, 128):
        for BM in (32, 64, 128):
            for WN, WM in WARPS:
                if BN % (WN * TILE_N) or BM % (WM * 8) or WN * WM * 32 > t.max_threads_per_block:
                    continue
                if (BN // WN // TILE_N) * (BM // WM // 8) > 32:  # mma tiles a warp: accumulators in registers
                    continue
                for ST in (3, 4):
                    for SPLIT in splits(problem.memo["gemm_sparse24.problem"], BN, BM, t.sm_count):
                        p = dict(BN=BN, BM=BM, WN=WN, WM=WM, STAGES=ST, SPLIT=SPLIT)
                        if smem_bytes(p) <= t.smem_per_block_optin:
                            out.append(p)
    return out


def default(problem, sp: list) -> dict:
    """BN 128 x BM 128 on 2 x 2 warps, 3 stages, while that gives >= 1 CTA a SM; else the smaller
    tiles (BM 64, then 32; then BN 64) that do (BERT-base b1's 128 x 768 rows, decoding shapes)."""
    pr: Sparse24Gemm = problem.memo["gemm_sparse24.problem"]
    sms = problem.target.sm_count
    prefs = [(128, 128, 2, 2), (128, 64, 2, 2), (64, 64, 2, 2), (128, 32, 4, 1), (64, 32, 4, 1)]
    by = {(p["BN"], p["BM"], p["WN"], p["WM"]): p for p in sp
          if p["STAGES"] == 3 and p["SPLIT"] == 1}
    for key in prefs:
        if key in by and cdiv(pr.N, key[0]) * cdiv(pr.M, key[1]) >= sms:
            return dict(by[key])
    for key in reversed(prefs):  # too few tiles even at the smallest: split K over CTAs
        if key in by:
            offered = [p["SPLIT"] for p in sp if (p["BN"], p["BM"], p["WN"], p["WM"]) == key and p["STAGES"] == 3]
            return dict(by[key], SPLIT=pick_split(pr, key[0], key[1], offered, sms))
    return dict(sp[0])


# ---------------------------------------------------------------- compile-time layouts

def padded_parts(vals: np.ndarray, meta: np.ndarray, pr: Sparse24Gemm) -> tuple[np.ndarray, np.ndarray]:
    """(values [N_pad, K_pad/2], codes u8 [N_pad, K_pad/4]): zero values and PAD_CODE past N and K."""
    v = np.zeros((pr.n_pad, pr.k_pad // 2), vals.dtype)
    v[:pr.N, :pr.K // 2] = vals
    c = np.full((pr.n_pad, pr.k_pad // 4), PAD_CODE, np.uint8)
    c[:pr.N, :pr.K // 4] = meta
    return v, c


def pack_values(vals: np.ndarray, meta: np.ndarray, pr: Sparse24Gemm) -> np.ndarray:
    """uint32 [tiles_n, steps_k, 32 lanes, 4 registers]: register r of lane 4g + t in the tile of rows
    16T .. 16T+15 and k-step S = the two kept values (low half first) at kept columns 16S + c .. c+1,
    of row 16T + g + 8 (r & 1), c = 2t + 8 (r >> 1)."""
    v, _ = padded_parts(vals, meta, pr)
    u16 = np.ascontiguousarray(v).view(np.uint16)                 # [N_pad, K_pad/2]
    # (tile, rh, g, step, ch, t, e) over rows 16T + 8rh + g and kept columns 16S + 8ch + 2t + e
    a = u16.reshape(pr.tiles_n, 2, 8, pr.steps_k, 2, 4, 2)
    # -> (tile, step, g, t, ch, rh, e): register r = 2ch + rh, halves e
    a = np.ascontiguousarray(a.transpose(0, 3, 2, 5, 4, 1, 6))
    return a.reshape(pr.tiles_n, pr.steps_k, 32, 8).view(np.uint32).reshape(pr.tiles_n, pr.steps_k, 32, 4)


def pack_meta(vals: np.ndarray, meta: np.ndarray, pr: Sparse24Gemm) -> np.ndarray:
    """uint32 [tiles_n, steps_k, 16]: word 2g + h = the codes of k-half h (chunks 4h .. 4h+3 of the
    step; chunk j at bits 4j) of row g (bits 0..15) and row g + 8 (bits 16..31)."""
    _, c = padded_parts(vals, meta, pr)
    c = c.astype(np.uint32).reshape(pr.tiles_n, 2, 8, pr.steps_k, 2, 4)  # (tile, rh, g, step, h, j)
    half = (c << (np.arange(4, dtype=np.uint32) * 4)).sum(axis=-1, dtype=np.uint32)  # (tile, rh, g, step, h)
    word = half[:, 0] | (half[:, 1] << np.uint32(16))                     # (tile, g, step, h)
    return np.ascontiguousarray(word.transpose(0, 2, 1, 3)).reshape(pr.tiles_n, pr.steps_k, 16)


def kernel_params(pr: Sparse24Gemm, params: dict, op_names: str, kind: str = "gemm") -> dict:
    kb, split = pr.k_pad // STAGE_K, params.get("SPLIT", 1)
    return dict(kind=kind, op_names=op_names, M=pr.M, K=pr.K, N=pr.N, KB=kb, KBS=cdiv(kb, split), STEPS=pr.steps_k,
                act=pr.act, T=dtypes.ctype(dtypes.info(pr.act).dtype), MMA_T=MMA[pr.act],
                has_bias=pr.has_bias, activation=pr.activation, VEC_STORE=pr.N % 8 == 0 and pr.y16,
                SMEM=smem_bytes(params), **{"SPLIT": 1, **params})


def grid(pr: Sparse24Gemm, params: dict) -> tuple:
    """((CTAs along N, CTAs along M, CTAs along K), threads) of the kernel."""
    return ((cdiv(pr.N, params["BN"]), cdiv(pr.M, params["BM"]), params.get("SPLIT", 1)),
            params["WN"] * params["WM"] * 32)


def launch_split(ctx: LowerCtx, pr: Sparse24Gemm, kernel, grid_, threads: int, head: list, params: dict, smem: int):
    """The GEMM launch writing y, or (SPLIT > 1) fp32 partials [SPLIT, M, N] then the reduce kernel
    (kind "reduce" of gemm_sparse24.cu.j2: + bias, activation, cast)."""
    split = params.get("SPLIT", 1)
    bias = [ctx.inp(3)] if pr.has_bias else []
    if split == 1:
        ctx.launch(kernel, grid_, threads, head + bias + [ctx.out(0)], smem=smem)
        return
    part = ctx.temp("f32", [split, pr.M, pr.N], "split_k")
    ctx.launch(kernel, grid_, threads, head + [part], smem=smem)
    kr = ctx.render("gemm_sparse24.cu.j2", "gemm_sparse24_reduce", **kernel_params(pr, params, ctx.op.name, "reduce"))
    ctx.launch(kr, cdiv(pr.M * pr.N, 256), 256, [part] + bias + [ctx.out(0)])


def _render(ctx: LowerCtx, problem, params: dict):
    pr: Sparse24Gemm = problem.memo["gemm_sparse24.problem"]
    meta = ctx.value(2)
    vals = ctx.value(1)
    wv = ctx.weight(1, lambda v: pack_values(v, meta, pr), key="sparse24_mma_tiles")
    we = ctx.weight(2, lambda m: pack_meta(vals, m, pr), key="sparse24_mma_meta")
    k = ctx.render("gemm_sparse24.cu.j2", "gemm_sparse24", **kernel_params(pr, params, ctx.op.name))
    g, threads = grid(pr, params)
    launch_split(ctx, pr, k, g, threads, [ctx.inp(0), wv, we], params, smem_bytes(params))
    return True


# ---------------------------------------------------------------- the sparse wgmma variant (sm_90a)

def wgmma_bn(params: dict) -> int:
    """Weight rows a CTA: WG warp groups of TPW 64-row tiles."""
    return 64 * params["WG"] * params.get("TPW", 1)


def wgmma_stage_bytes(params: dict) -> int:
    """One stage: BM swizzled x rows of 128 bytes, then the CTA's weight rows' values and metadata,
    rounded up to the 1024-byte swizzle atom."""
    bn = wgmma_bn(params)
    return cdiv(params["BM"] * 128 + bn // TILE_N * 2 * (512 + 64), 1024) * 1024


def wgmma_smem_bytes(params: dict) -> int:
    """The ring (+ 1024 bytes to start it on a 1024-byte boundary); the y tile reuses it."""
    ring = params["STAGES"] * wgmma_stage_bytes(params)
    assert ring >= params["BM"] * (wgmma_bn(params) + 8) * 2
    return ring + 1024


def _applies_wgmma(problem):
    if not getattr(problem.target, "has_wgmma", False):
        return no(f"sparse wgmma needs sm_90a (target {problem.target.arch})")
    return _applies(problem)


def wgmma_space(problem) -> list:
    t = problem.target
    out = []
    pr = problem.memo["gemm_sparse24.problem"]
    for WG in (1, 2):
        for TPW in (1, 2):
            for BM in (64, 128, 256):
                if TPW * BM > 256:  # (accumulators: TPW x BM / 2 registers a thread)
                    continue
                for ST in (3, 4):
                    for SPLIT in splits(pr, 64 * WG * TPW, BM, t.sm_count):
                        for KPER in ((1, 2) if ST == 4 else (1,)):
                            p = dict(WG=WG, TPW=TPW, BM=BM, STAGES=ST, SPLIT=SPLIT, KPER=KPER)
                            if WG * 128 <= t.max_threads_per_block and wgmma_smem_bytes(p) <= t.smem_per_block_optin:
                                out.append(p)
    return out


def wgmma_default(problem, sp: list) -> dict:
    """2 warp groups x BM 128, 4 stages while that gives >= 1 CTA a SM, else BM 64, then 1 warp group."""
    pr: Sparse24Gemm = problem.memo["gemm_sparse24.problem"]
    sms = problem.target.sm_count
    sp = [p for p in sp if p["KPER"] == 1 and p["TPW"] == 1] or sp  # (KPER / TPW 2: the tuner's, until timed)
    by = {(p["WG"], p["BM"], p["STAGES"]): p for p in sp if p["SPLIT"] == 1}
    prefs = [(2, 128, 4), (2, 64, 4), (1, 64, 4)]
    for key in prefs:
        if key in by and cdiv(pr.N, 64 * key[0]) * cdiv(pr.M, key[1]) >= sms:
            return dict(by[key])
    key = prefs[-1]  # too few tiles: split K over CTAs
    if key not in by:
        return dict(sp[0])
    offered = [p["SPLIT"] for p in sp if (p["WG"], p["BM"], p["STAGES"]) == key]
    return dict(by[key], SPLIT=pick_split(pr, 64, key[1], offered, sms))


def _render_wgmma(ctx: LowerCtx, problem, params: dict):
    pr: Sparse24Gemm = problem.memo["gemm_sparse24.problem"]
    meta, vals = ctx.value(2), ctx.value(1)
    wv = ctx.weight(1, lambda v: pack_values(v, meta, pr), key="sparse24_mma_tiles")
    we = ctx.weight(2, lambda m: pack_meta(vals, m, pr), key="sparse24_mma_meta")
    split = params.get("SPLIT", 1)
    as_mma = {"BN": wgmma_bn(params), "BM": params["BM"], "WN": 1, "WM": 1, "STAGES": params["STAGES"], "SPLIT": split}
    kp = {k: v for k, v in kernel_params(pr, as_mma, ctx.op.name).items() if k not in ("BN", "WN", "WM", "SMEM")}
    k = ctx.render("gemm_sparse24_wgmma.cu.j2", "gemm_sparse24_wgmma", **{**kp, "KPER": 1, "TPW": 1, **params, "SPLIT": split,
                                                                         "SMEM": wgmma_smem_bytes(params)})
    g = (cdiv(pr.N, wgmma_bn(params)), cdiv(pr.M, params["BM"]), split)
    launch_split(ctx, pr, k, g, params["WG"] * 128, [ctx.inp(0), wv, we], as_mma, wgmma_smem_bytes(params))
    return True


# ---------------------------------------------------------------- the dense alternative

def _render_dense(ctx: LowerCtx, problem, params: dict):
    """W decompressed at compile time into x's dtype, then MatMul (+ Add bias, + Relu / Gelu): the GEMM family."""
    from ...ir.graph import Op, Value
    from ...ir.ops.core import ConstAttrs
    from ...ir.ops.elementwise import GeluAttrs
    from ...ir.registry import NoAttrs
    from ...ir.types import TensorType
    op, L = ctx.op, ctx.L
    xv = op.operands[0]
    vals, meta = problem.value(1), problem.value(2)
    if vals is None or meta is None or (problem.has(3) and problem.value(3) is None):
        ctx.fail("matmul_sparse24 needs constant w_values / w_meta / bias")
    w = decompress(vals, meta).astype(xv.type.dtype.np)
    res = op.results[0]
    wv = Value(f"{res.name}.w_dense", TensorType(xv.type.dtype, tuple(w.shape)))
    Op("const", [], [wv], ConstAttrs(value=w), op.loc)  # (its producer: problem.value reads it)
    L.values[id(wv)] = ctx.new_weight(w, "w_dense")
    chain = [("MatMul", [xv, wv])]
    if problem.has(3):
        chain.append(("Add", [None, op.operands[3]]))
    if op.attrs.activation == "relu":
        chain.append(("Relu", [None]))
    elif op.attrs.activation in ("gelu", "gelu_tanh"):
        chain.append(("Gelu", [None]))
    prev = None
    for i, (name, operands) in enumerate(chain):
        last = i == len(chain) - 1
        out = Value(f"{res.name}.{name.lower()}", res.type)
        attrs = GeluAttrs("tanh" if op.attrs.activation == "gelu_tanh" else "none") if name == "Gelu" else NoAttrs()
        o = Op(name, [prev if a is None else a for a in operands], [out], attrs, op.loc)
        if last:
            L.equiv[id(out)] = L.canon(res)  # the last op writes the op's result buffer
        L.lower_op(o)
        prev = out
    ctx.emitted += 1
    return True


MMA_SP = register(Variant("gemm_sparse24.mma", FAMILY, ("matmul_sparse24",), _render, _applies,
                          space, default, priority=PRIORITY, rank=1))
WGMMA_SP = register(Variant("gemm_sparse24.wgmma", FAMILY, ("matmul_sparse24",), _render_wgmma, _applies_wgmma,
                            wgmma_space, wgmma_default, priority=PRIORITY, rank=0))
DENSE = register(Variant("gemm_sparse24.dense", FAMILY, ("matmul_sparse24",), _render_dense, priority=0))
