"""GEMM / batched MatMul kernel family.

    D[z] = act(alpha * op(A[z]) @ op(B[z]) + beta * C[z] + bias)      (per-column bias)

Templates: templates/gemm_tc.cu.j2 (fp16/bf16 mma.sync m16n8k16, or tf32 m16n8k8 on fp32 data;
ldmatrix + cp.async multi-stage pipeline) and templates/gemm_f32.cu.j2 (fp32 FFMA, 8x8 per thread).

Batch: z runs over B0*B1; operand X's offset is (z // B1) * sX[0] + (z % B1) * sX[1] (elements), so a
stride of 0 broadcasts. `matmul_problem()` builds this from ONNX MatMul shapes (numpy broadcasting).

API:  candidates(problem, target) -> list[dict];  render(problem, params=None) -> KernelSpec;
      default_params(problem, target) -> dict. target: the codegen/target.py Target the tiles are
      fitted to (shared memory, SM count, L2; default: the sm_90 table entry).
Params: the tile (BM, BN, BK; tensor cores also WARPS_M, WARPS_N, STAGES) and `swizzle`, the block
order (GROUP_M tile rows per group, see SWIZZLE_SPACE; chosen by `choose_swizzle` for grids of more
than one wave whose operands do not fit in L2); tensor cores also SPLIT_K (absent: 1), the CTAs
that share one output tile, each over a run of whole K tiles (see "split-K" below).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..target import Target
from .common import CTYPES, DEFAULT_TARGET, KernelSpec, act_ctx, cdiv, kernel_name, render as _render

NUM_SMS = DEFAULT_TARGET.sm_count  # old name; the heuristics read target.sm_count


@dataclass(frozen=True)
class GemmProblem:
    M: int
    N: int
    K: int
    dtype: str = "float16"           # float16 | bfloat16 | float32
    out_dtype: str | None = None     # default: dtype
    trans_a: bool = False            # A stored [K, M] (ld = lda)
    trans_b: bool = False            # B stored [N, K]
    lda: int | None = None           # default: contiguous
    ldb: int | None = None
    ldd: int | None = None
    batch: tuple[int, int] = (1, 1)  # (B0, B1)
    stride_a: tuple[int, int] = (0, 0)
    stride_b: tuple[int, int] = (0, 0)
    stride_d: tuple[int, int] = (0, 0)
    has_c: bool = False              # beta * C, C broadcast via (ldc_m, ldc_n, stride_c)
    c_dtype: str | None = None
    ldc_m: int = 0
    ldc_n: int = 1
    stride_c: tuple[int, int] = (0, 0)
    alpha: float = 1.0
    beta: float = 1.0
    has_bias: bool = False           # per-column bias[N]
    bias_dtype: str | None = None
    bias_rows: bool = False          # bias per row instead: bias[z1 * bias_stride_z1 + row] (NCHW
    bias_stride_z1: int = 0          # pointwise convs: rows are output channels, z1 the group)
    act: str = "none"
    act_params: tuple = ()           # e.g. (("alpha", 0.2),)
    tf32: bool = False               # fp32 data on tensor cores (TF32 inputs, fp32 accumulate)

    @property
    def lda_(self):
        return self.lda if self.lda is not None else (self.M if self.trans_a else self.K)

    @property
    def ldb_(self):
        return self.ldb if self.ldb is not None else (self.K if self.trans_b else self.N)

    @property
    def ldd_(self):
        return self.ldd if self.ldd is not None else self.N

    @property
    def nbatch(self):
        return self.batch[0] * self.batch[1]

    @property
    def flops(self):
        return 2.0 * self.M * self.N * self.K * self.nbatch

    @property
    def family(self):
        if self.dtype in ("float16", "bfloat16"):
            return "tc"
        if self.dtype == "float32":
            return "tc" if self.tf32 else "f32"
        raise ValueError(f"GEMM dtype {self.dtype} unsupported")


def matmul_problem(a_shape, b_shape, dtype="float16", **kw) -> GemmProblem | None:
    """ONNX MatMul (numpy semantics) on contiguous inputs -> GemmProblem, or None when the broadcast
    batch cannot be expressed with two batch levels."""
    a_shape, b_shape = list(a_shape), list(b_shape)
    squeeze_a = len(a_shape) == 1
    squeeze_b = len(b_shape) == 1
    if squeeze_a:
        a_shape = [1] + a_shape
    if squeeze_b:
        b_shape = b_shape + [1]
    M, K = a_shape[-2:]
    K2, N = b_shape[-2:]
    if K != K2:
        raise ValueError("MatMul inner dims differ")
    ab, bb = a_shape[:-2], b_shape[:-2]
    nd = max(len(ab), len(bb))
    ab = [1] * (nd - len(ab)) + ab
    bb = [1] * (nd - len(bb)) + bb
    ob = []
    for x, y in zip(ab, bb):
        if x != y and 1 not in (x, y):
            raise ValueError("MatMul batch dims do not broadcast")
        ob.append(max(x, y))

    def strides(bshape, mat):
        s, acc = [0] * nd, mat
        for i in reversed(range(nd)):
            s[i] = acc if bshape[i] != 1 else 0
            acc *= bshape[i]
        return s

    sa, sb = strides(ab, M * K), strides(bb, K * N)
    sd = strides(ob, M * N)
    dims = [[ob[i], sa[i], sb[i], sd[i]] for i in range(nd) if ob[i] != 1]
    merged = []
    for d in dims:
        if merged:
            p = merged[-1]
            if all(p[j] == d[j] * d[0] for j in (1, 2, 3)):
                p[0] *= d[0]
                p[1], p[2], p[3] = d[1], d[2], d[3]
                continue
        merged.append(list(d))
    if len(merged) > 2:
        return None
    while len(merged) < 2:
        merged.insert(0, [1, 0, 0, 0])
    (b0, a0, bs0, d0), (b1, a1, bs1, d1) = merged
    return GemmProblem(M=M, N=N, K=K, dtype=dtype, batch=(b0, b1), stride_a=(a0, a1), stride_b=(bs0, bs1),
                       stride_d=(d0, d1), **kw)


def fold_batch_into_rows(pr: GemmProblem) -> GemmProblem | None:
    """A batched MatMul whose B is one matrix for every batch (stride_b 0) and whose A and D batches
    follow each other contiguously (A [.., M, K] @ W [K, N], a Linear layer) is one GEMM of
    batch * M rows: the same memory, one M extent, so tiles and the grouped block order span the
    whole batch (BERT at batch 32: 4096 rows, not 32 separate 128-row GEMMs). None when it is not
    (already unbatched, B batched, a broadcast A, a transposed or strided operand)."""
    if pr.nbatch == 1 or any(pr.stride_b) or pr.trans_a or pr.lda is not None or pr.ldd is not None:
        return None
    (b0, b1), (a0, a1), (d0, d1) = pr.batch, pr.stride_a, pr.stride_d
    mk, mn = pr.M * pr.K, pr.M * pr.N
    # the inner level steps one matrix, the outer one the whole inner level (or is absent)
    if (a1, d1) != ((mk, mn) if b1 > 1 else (0, 0)) or (b0 > 1 and (a0, d0) != (mk * b1, mn * b1)):
        return None
    return replace(pr, M=pr.M * b0 * b1, batch=(1, 1), stride_a=(0, 0), stride_d=(0, 0))


# ---------------------------------------------------------------- tuning spaces (next to the templates)
# gemm_tc.cu.j2: (BM, BN, BK, WARPS_M, WARPS_N, STAGES)
TC16_SPACE = [
    (128, 256, 32, 2, 4, 3),
    (256, 128, 32, 4, 2, 3),
    (128, 128, 32, 2, 2, 4),
    (128, 128, 64, 2, 2, 3),
    (128, 64, 32, 2, 2, 4),
    (64, 128, 32, 2, 2, 4),
    (64, 64, 32, 2, 2, 4),
    (64, 64, 64, 2, 2, 3),
]
TF32_SPACE = [
    (128, 128, 16, 2, 2, 4),
    (128, 128, 32, 2, 2, 3),
    (128, 64, 32, 2, 2, 3),
    (64, 64, 32, 2, 2, 4),
]
# gemm_f32.cu.j2: (BM, BN, BK); 8x8 outputs per thread
F32_SPACE = [(128, 128, 8), (128, 64, 8), (64, 128, 8), (64, 64, 8)]
# Block order (both templates): `swizzle` = G tile rows per group. Block bid of the grid's
# tiles_m x tiles_n tiles walks G rows of M (down a column of tiles) before moving one tile along
# N, group after group (`tile_of` below is the same formula): the CTAs resident at once then read
# G row panels of A and about W/G column panels of B (W: CTAs per wave), so L2 serves more of the
# reuse. 1 is plain row-major order. GROUP_M (8) is the order every GEMM had before `swizzle`
# existed and stays the default, so kernels the heuristic does not re-order are unchanged.
GROUP_M = 8
SWIZZLE_SPACE = (1, 4, 8, 16)
SWIZZLE_MIN_GAIN = 0.10  # a non-default order must cut the modelled DRAM panel traffic this much
SWIZZLE_MAX_WAVES = 64   # the traffic model looks at the first waves only (linear, bounded cost)


def tile_of(bid, tiles_m: int, tiles_n: int, group: int):
    """(tm, tn) of block `bid` (int or numpy array) under swizzle `group`: the templates' formula."""
    per_group = group * tiles_n
    first_m = (bid // per_group) * group
    gsize = np.minimum(tiles_m - first_m, group) if isinstance(bid, np.ndarray) else min(tiles_m - first_m, group)
    r = bid % per_group
    return first_m + r % gsize, r // gsize


def ctas_per_sm(p: dict, family: str, elem: int, target: Target) -> int:
    """Resident CTAs of tile p per SM (thread and shared-memory limits; registers assumed to fit)."""
    if family == "tc":
        nt = p["WARPS_M"] * p["WARPS_N"] * 32
        smem = _tc_smem(p, elem, True, True)
    else:
        nt = (p["BM"] // 8) * (p["BN"] // 8)
        smem = 2 * p["BK"] * (p["BM"] + p["BN"]) * 4
    by_smem = target.smem_per_sm // max(smem, 1)
    return max(1, min(target.max_threads_per_sm // nt, by_smem, 32))


def wave_traffic(tiles_m: int, tiles_n: int, BM: int, BN: int, group: int, wave: int) -> int:
    """Rows of A plus columns of B the CTAs of each wave (`wave` consecutive blocks) read, summed
    over the first SWIZZLE_MAX_WAVES waves: the DRAM traffic (in units of K elements) when L2 keeps
    a wave's panels and nothing older."""
    n = min(tiles_m * tiles_n, wave * SWIZZLE_MAX_WAVES)
    bid = np.arange(n, dtype=np.int64)
    tm, tn = tile_of(bid, tiles_m, tiles_n, group)
    w = bid // wave
    rows = np.unique(w * tiles_m + tm).size
    cols = np.unique(w * tiles_n + tn).size
    return rows * BM + cols * BN


def choose_swizzle(problem: "GemmProblem", p: dict, target: Target = DEFAULT_TARGET) -> int:
    """The block order for tile p: GROUP_M (the old order) unless the grid runs more than one wave,
    A and B do not fit in half of L2 anyway, and another order in SWIZZLE_SPACE cuts the modelled
    panel traffic by SWIZZLE_MIN_GAIN."""
    fam = problem.family
    elem = CTYPES[problem.dtype][1]
    tiles_m, tiles_n = cdiv(problem.M, p["BM"]), cdiv(problem.N, p["BN"])
    wave = target.sm_count * ctas_per_sm(p, fam, elem, target)
    if tiles_m * tiles_n * problem.nbatch <= wave or tiles_m == 1 or tiles_n == 1:
        return GROUP_M
    if (problem.M + problem.N) * problem.K * elem * problem.nbatch <= target.l2_bytes // 2:
        return GROUP_M
    base = wave_traffic(tiles_m, tiles_n, p["BM"], p["BN"], GROUP_M, wave)
    best, best_t = GROUP_M, base
    for g in SWIZZLE_SPACE:
        t = wave_traffic(tiles_m, tiles_n, p["BM"], p["BN"], g, wave)
        if t < best_t:
            best, best_t = g, t
    return best if best_t <= (1.0 - SWIZZLE_MIN_GAIN) * base else GROUP_M


def _tc_smem(p: dict, elem: int, a_kmajor: bool, b_kmajor: bool) -> int:
    epc = 16 // elem
    a = (p["BM"] * (p["BK"] + epc)) if a_kmajor else (p["BK"] * (p["BM"] + epc))
    b = (p["BN"] * (p["BK"] + epc)) if b_kmajor else (p["BK"] * (p["BN"] + epc))
    return p["STAGES"] * (a + b) * elem


def _tc_valid(p: dict, elem: int, tf32: bool, max_smem: int) -> bool:
    wtm, wtn = p["BM"] // p["WARPS_M"], p["BN"] // p["WARPS_N"]
    kstep = 8 if tf32 else 16
    return (wtm % 16 == 0 and wtn % 16 == 0 and p["BK"] % kstep == 0 and p["BK"] % (16 // elem) == 0
            and p["STAGES"] >= 2 and _tc_smem(p, elem, True, True) <= max_smem
            and _tc_smem(p, elem, False, False) <= max_smem)


def _size_ok(tile: int, dim: int) -> bool:
    """Drop tiles much larger than the problem dimension (pure waste)."""
    return tile <= max(64, 1 << max(0, (dim - 1)).bit_length())


def candidates(problem: GemmProblem, target: Target = DEFAULT_TARGET) -> list[dict]:
    fam = problem.family
    out = []
    if fam == "tc":
        elem = CTYPES[problem.dtype][1]
        space = TF32_SPACE if problem.dtype == "float32" else TC16_SPACE
        for bm, bn, bk, wm, wn, st in space:
            p = dict(BM=bm, BN=bn, BK=bk, WARPS_M=wm, WARPS_N=wn, STAGES=st)
            if (_tc_valid(p, elem, problem.dtype == "float32", target.smem_per_block_optin)
                    and _size_ok(bm, problem.M) and _size_ok(bn, problem.N)):
                out.append(p)
    else:
        for bm, bn, bk in F32_SPACE:
            if _size_ok(bm, problem.M) and _size_ok(bn, problem.N):
                out.append(dict(BM=bm, BN=bn, BK=bk))
    if not out:  # tiny problems: keep the smallest tile
        out = [dict(zip(("BM", "BN", "BK", "WARPS_M", "WARPS_N", "STAGES"), TC16_SPACE[-2]))] if fam == "tc" else [
            dict(BM=64, BN=64, BK=8)]
        if fam == "tc" and problem.dtype == "float32":
            out = [dict(BM=64, BN=64, BK=32, WARPS_M=2, WARPS_N=2, STAGES=4)]
    # block order: every SWIZZLE_SPACE value where the grid is more than one wave (the order then
    # matters), the heuristic's choice first; else only the default order
    elem = CTYPES[problem.dtype][1] if problem.dtype in CTYPES else 4
    full = []
    for p in out:
        tiles = cdiv(problem.M, p["BM"]) * cdiv(problem.N, p["BN"]) * problem.nbatch
        if tiles <= target.sm_count * ctas_per_sm(p, fam, elem, target):
            full.append(dict(p, swizzle=GROUP_M))
            continue
        pick = choose_swizzle(problem, p, target)
        full.extend(dict(p, swizzle=g) for g in (pick,) + tuple(g for g in SWIZZLE_SPACE if g != pick))
    if fam == "tc":  # then the split-K points of the tiles whose grid leaves SMs idle
        full.extend(dict(p, swizzle=GROUP_M, SPLIT_K=s) for p in out for s in split_points(problem, p, target))
    return full


def default_params(problem: GemmProblem, target: Target = DEFAULT_TARGET) -> dict:
    """Heuristic pick (no measurement): the largest tile that still fills ~all SMs, else the most CTAs;
    then a split-K point instead when modelled_time says it takes at most SPLIT_K_MIN_GAIN of that
    tile's time (grids of fewer tiles than SMs with long K: see split_points)."""
    cands = candidates(problem, target)
    whole = [p for p in cands if p.get("SPLIT_K", 1) == 1]
    best = _default_whole(problem, whole, target)
    split = [p for p in cands if p.get("SPLIT_K", 1) > 1]
    if split:
        t_best = modelled_time(problem, best, target)
        # equal times: the deeper BK (a split runs few K tiles: fewer pipeline steps; H200 agrees)
        s_best = min(split, key=lambda p: (round(modelled_time(problem, p, target), 12), -p["BK"]))
        if modelled_time(problem, s_best, target) <= SPLIT_K_MIN_GAIN * t_best:
            return s_best
    return best


def _default_whole(problem: GemmProblem, cands: list, target: Target) -> dict:
    sms = target.sm_count

    def score(p):
        ctas = cdiv(problem.M, p["BM"]) * cdiv(problem.N, p["BN"]) * problem.nbatch
        waves = ctas / sms
        eff = waves / cdiv(ctas, sms) if ctas else 0  # last-wave efficiency
        util = min(1.0, waves) * eff
        waste = (problem.M * problem.N) / (cdiv(problem.M, p["BM"]) * p["BM"] * cdiv(problem.N, p["BN"]) * p["BN"])
        return util * waste * (1.0 + 0.15 * (p["BM"] * p["BN"]) / (128 * 128))

    return max(cands, key=score)  # first of equal scores: the tile with its chosen swizzle


# ---------------------------------------------------------------- split-K (gemm_tc.cu.j2)
# A grid of fewer output tiles than SMs (batch-1 BERT: M = 128; 1x1 convs on 7x7 maps) leaves most
# SMs idle. With SPLIT_K = S the grid is (tiles, S, batch): CTA (tile, s) runs K tiles
# [s * KT // S, (s + 1) * KT // S) of the KT = ceil(K / BK) (whole K tiles; the split sizes differ
# by at most one, a ragged K only zero-fills the last tile as without split), stores its fp32
# partial tile to the workspace `ws` and counts itself in `tile_counters[tile]`; the last of the S
# to arrive adds the S partials in split order 0..S-1 (deterministic, whoever arrives last), resets
# the counter to 0 (re-launchable, CUDA-graph safe) and runs the epilogue. The lowering
# (gemm_lowering.splitk_scratch) makes the workspace a temp of the step and binds the counters the
# run's split GEMMs share, zeroed once per run before the first.
SPLIT_K_SPACE = (2, 3, 4, 6, 8, 12, 16)
SPLIT_K_MIN_GAIN = 0.9        # the heuristic splits when the model says <= 90 % of the unsplit time
SPLIT_K_MAX_PER_SM = 2        # split grids of at most this many CTAs per SM
# modelled_time's constants, fitted to H200 CUDA-graph timings of 64x64 tiles at batch-1 BERT /
# MobileNetV2 / ResNet-50 shapes (tools/bench_splitk.py, 2026-12-02): unsplit 2.0 us + K x 7.9 ns;
# a split launch ~2 us more, plus ~0.5 us per other partial tile the last CTA reads (latency bound).
LAUNCH_S = 2.0e-6             # a launch's fixed cost in a graph (launch, pipeline fill, epilogue)
CTA_FLOPS = 1.0e12            # one CTA's mma.sync rate alone on an SM
SPLIT_K_FIXED_S = 2.0e-6      # a split launch's fences, atomics and second pass
SPLIT_K_PARTIAL_BPS = 32e9    # the last CTA reads the other S - 1 fp32 partial tiles at this


def split_ranges(k_tiles: int, split: int) -> list[tuple[int, int]]:
    """[first, end) K tiles of each split: the template's (s * KT) / S formula."""
    return [(s * k_tiles // split, (s + 1) * k_tiles // split) for s in range(split)]


def split_points(problem: GemmProblem, p: dict, target: Target = DEFAULT_TARGET) -> list[int]:
    """The SPLIT_K values (> 1) of SPLIT_K_SPACE tile p may run with, pruned by the Target and K:
    the unsplit grid has fewer tiles than SMs; the split grid is at most one wave of resident CTAs
    and at most SPLIT_K_MAX_PER_SM CTAs per SM (more splits fill no more SMs, only add partials
    to reduce); every split runs at least max(2, STAGES - 1) K tiles (the pipeline fills); the
    fp32 partials fit in half of L2 (they are read back from it). Tensor cores only."""
    if problem.family != "tc":
        return []
    tiles = cdiv(problem.M, p["BM"]) * cdiv(problem.N, p["BN"]) * problem.nbatch
    if tiles >= target.sm_count:
        return []
    k_tiles = cdiv(problem.K, p["BK"])
    min_kt = max(2, p["STAGES"] - 1)
    wave = target.sm_count * ctas_per_sm(p, "tc", CTYPES[problem.dtype][1], target)
    out = []
    for s in SPLIT_K_SPACE:
        if k_tiles // s < min_kt or tiles * s > min(wave, SPLIT_K_MAX_PER_SM * target.sm_count):
            continue
        if splitk_workspace(problem, dict(p, SPLIT_K=s))[0] * 4 > target.l2_bytes // 2:
            continue
        out.append(s)
    return out


def splitk_workspace(problem: GemmProblem, params: dict) -> tuple[int, int]:
    """(fp32 elements of the partials workspace, int32 tile counters) of a split-K launch; (0, 0)
    without split. Partials: one BM x BN fp32 tile per (split, tile, batch); counters: one per
    (tile, batch)."""
    split = params.get("SPLIT_K", 1)
    if split <= 1:
        return 0, 0
    tiles = cdiv(problem.M, params["BM"]) * cdiv(problem.N, params["BN"]) * problem.nbatch
    return split * tiles * params["BM"] * params["BN"], tiles


def modelled_time(problem: GemmProblem, p: dict, target: Target = DEFAULT_TARGET) -> float:
    """A rough run time (seconds; a model, not a measurement): LAUNCH_S plus waves of CTAs over the
    SMs times one CTA's tile of work at CTA_FLOPS (the variant's old cost, plus a constant: the
    same ranking of unsplit tiles); a split point runs K / S each and adds SPLIT_K_FIXED_S and the
    last CTA's read of the other S - 1 partials."""
    split = p.get("SPLIT_K", 1)
    ctas = cdiv(problem.M, p["BM"]) * cdiv(problem.N, p["BN"]) * problem.nbatch * split
    waves = cdiv(ctas, target.sm_count)
    t = LAUNCH_S + waves * 2.0 * p["BM"] * p["BN"] * cdiv(problem.K, split) / CTA_FLOPS
    if split > 1:
        t += SPLIT_K_FIXED_S + (split - 1) * p["BM"] * p["BN"] * 4 / SPLIT_K_PARTIAL_BPS
    return t


def _vec(elem_per_16b: int, *vals) -> bool:
    return all(int(v) % elem_per_16b == 0 for v in vals)


def kernel_args(pr: GemmProblem, ctype: str, to: str, ctx: dict) -> list:
    """The GEMM kernels' argument list (gemm_f32 / gemm_tc here, gemm_wgmma.py's too)."""
    args = [("A", f"const {ctype}*", None), ("B", f"const {ctype}*", None), ("D", f"{to}*", None)]
    if pr.has_c:
        args.append(("C", f"const {ctx['TC']}*", None))
    if pr.has_bias:
        args.append(("bias", f"const {ctx['TBIAS']}*", None))
    args += [("M", "int", pr.M), ("N", "int", pr.N), ("K", "int", pr.K), ("lda", "long long", pr.lda_),
             ("ldb", "long long", pr.ldb_), ("ldd", "long long", pr.ldd_), ("ldc_m", "long long", pr.ldc_m),
             ("ldc_n", "long long", pr.ldc_n), ("alpha", "float", float(pr.alpha)), ("beta", "float", float(pr.beta)),
             ("bdiv", "int", pr.batch[1]), ("sA0", "long long", pr.stride_a[0]), ("sA1", "long long", pr.stride_a[1]),
             ("sB0", "long long", pr.stride_b[0]), ("sB1", "long long", pr.stride_b[1]),
             ("sC0", "long long", pr.stride_c[0]), ("sC1", "long long", pr.stride_c[1]),
             ("sD0", "long long", pr.stride_d[0]), ("sD1", "long long", pr.stride_d[1])]
    return args


def render(problem: GemmProblem, params: dict | None = None, name: str | None = None) -> KernelSpec:
    pr = problem
    params = dict(params or default_params(pr))
    fam = pr.family
    ctype, elem, _ = CTYPES[pr.dtype]
    out_dtype = pr.out_dtype or pr.dtype
    to, to_bytes, to2 = CTYPES[out_dtype]
    a_kmajor, b_kmajor = not pr.trans_a, pr.trans_b
    lda, ldb, ldd = pr.lda_, pr.ldb_, pr.ldd_
    params.setdefault("swizzle", GROUP_M)
    swz = params["swizzle"]
    if not isinstance(swz, int) or isinstance(swz, bool) or not 1 <= swz <= 1024:
        raise ValueError(f"GEMM swizzle must be an int in 1..1024, got {swz!r}")
    split = params.pop("SPLIT_K", 1)
    if not isinstance(split, int) or isinstance(split, bool) or not 1 <= split <= 65535:
        raise ValueError(f"GEMM SPLIT_K must be an int in 1..65535, got {split!r}")
    if split > 1 and fam != "tc":
        raise ValueError("GEMM SPLIT_K > 1 needs the tensor-core template (gemm_tc.cu.j2)")
    ctx = {k: v for k, v in params.items() if k != "swizzle"}  # the templates read it as GROUP_M,
    ctx.update(act_ctx(pr.act, dict(pr.act_params)))          # so the default order keeps its names
    ctx.update(T=ctype, TO=to, TO2=to2, elem_bytes=elem, a_kmajor=a_kmajor, b_kmajor=b_kmajor,
               has_c=pr.has_c, has_bias=pr.has_bias, GROUP_M=swz,
               TC=CTYPES[pr.c_dtype or out_dtype][0], TBIAS=CTYPES[pr.bias_dtype or out_dtype][0])
    if pr.has_bias and pr.bias_rows:  # only when set, so other kernels keep their names (hash of ctx)
        ctx.update(bias_row_z1=int(pr.bias_stride_z1))
    if split > 1:  # likewise: unsplit kernels keep their names and sources
        ctx.update(split_k=split)
    if fam == "tc":
        epc = 16 // elem
        ctx.update(conv=False, mma={"float16": "f16", "bfloat16": "bf16", "float32": "tf32"}[pr.dtype],
                   vec_a=_vec(epc, lda, *pr.stride_a), vec_b=_vec(epc, ldb, *pr.stride_b),
                   pair_store=_vec(2, ldd, *pr.stride_d))
        nt = params["WARPS_M"] * params["WARPS_N"] * 32
        smem = _tc_smem(params, elem, a_kmajor, b_kmajor)
        template, prefix = "gemm_tc.cu.j2", "nnc_gemm_tc"
    else:
        ctx.update(vec_a=_vec(4, lda, *pr.stride_a), vec_b=_vec(4, ldb, *pr.stride_b), vec_d=_vec(4, ldd, *pr.stride_d))
        nt = (params["BM"] // 8) * (params["BN"] // 8)
        smem = 0
        template, prefix = "gemm_f32.cu.j2", "nnc_gemm_f32"
    ctx["name"] = name or kernel_name(prefix, ctx)
    src = _render(template, **ctx)
    grid = (cdiv(pr.M, params["BM"]) * cdiv(pr.N, params["BN"]), split, pr.nbatch)
    args = kernel_args(pr, ctype, to, ctx)
    if split > 1:  # scratch the caller binds (gemm_lowering.emit_spec): the value is its element count
        ws, counters = splitk_workspace(pr, dict(params, SPLIT_K=split))
        args += [("ws", "float*", ws), ("tile_counters", "int*", counters)]
        params["SPLIT_K"] = split
    if swz == GROUP_M:  # the default order is left out of plan.json / model.cu, which stay as before
        params.pop("swizzle")
    return KernelSpec(source=src, name=ctx["name"], grid=grid, block=(nt, 1, 1), smem=smem, args=args,
                      params=dict(params, family=fam, template=template))


def with_(problem: GemmProblem, **kw) -> GemmProblem:
    return replace(problem, **kw)
