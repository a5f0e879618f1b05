"""Hopper GEMM family (templates/gemm_wgmma.cu.j2): wgmma.mma_async on sm_90a, a warp-specialised
producer/consumer pipeline (one producer warp group filling a STAGES-deep shared-memory ring with
16-byte cp.async at 128B-swizzled addresses, mbarrier full/empty handshakes; CW consumer warp groups
issuing wgmma), fp32 accumulate, and the GEMM family's fused epilogue.

Loads (params["LOAD"]): "cp_async" (the default, no key) by the producer warps: needs nothing from the
host, zero-fills ragged edges itself and keeps the kernel's arguments those of gemm_tc.cu.j2; or
"tma": one elected producer thread issues cp.async.bulk.tensor through two tensor maps (A's, B's),
which the runtime encodes at load time from the operands' addresses (codegen/tma.py) and passes
as two extra __grid_constant__ arguments after gemm.kernel_args (Scalars of type tma.TMAP_CTYPE
whose value names the pointer argument they map). The hardware swizzles and zero-fills.
A constant 2-D B (a weight) may instead be pre-swizzled at compile time (`preswizzle_b`, through
LowerCtx.weight) into one contiguous block per (column tile, k-tile), which the producer loads with
a single 1-D cp.async.bulk (the TMA engine, no tensor map) per stage: params["b_bulk"].

The problem is the GEMM family's own GemmProblem (codegen/kernels/gemm.py), built by the same
functions as the mma.sync variants (gemm_lowering.matmul_case / gemm_case: the Epilogue of a fused
group becomes the same bias / residual / activation / alpha / beta / output-dtype fields), so both
variants compute exactly the same thing from the same buffers.

    applies(problem) -> Fit      sm_90a only (Target.has_wgmma); fp16/bf16 (not tf32); K % 8 == 0
                                 and 16-byte aligned rows and batch strides (lda, ldb, sA*, sB* % 8);
                                 an MN-major operand (B not transposed, A transposed) also needs
                                 its MN extent % 8 == 0 (whole 16-byte chunks)
    candidates(problem, target)  the declared space: (BM, BN, STAGES, CW) tiles, BK = 64, each by
                                 cp.async and (tma_fits: cuTensorMapEncodeTiled's rules) by TMA; the
                                 unverified point kinds (UNVERIFIED_KINDS: split-K, staged / shuffle /
                                 TMA-store epilogues, BM = 192 tiles, wide swizzle, wave split-K) join
                                 it per kind (IN_SPACE) once measured; tools ask for them by name
    default_params(problem, target), render(problem, params) -> KernelSpec (same args as gemm.render)
"""
from __future__ import annotations

from .. import tma as tmap
from ..lower import LowerCtx
from ..target import Target
from ..variants import YES, Variant, no, register
from . import gemm
from .common import CTYPES, DEFAULT_TARGET, KernelSpec, act_ctx, cdiv, kernel_name, render as render_template

TEMPLATE = "gemm_wgmma.cu.j2"
BK = 64  # one 128-byte swizzle row of fp16/bf16
# (BM, BN, STAGES, CW): CW consumer warp groups share the BM rows (each BM/CW, as BM/CW/64 m64 wgmmas
# of n = BN); accumulators per consumer thread: (BM/CW/64) * BN/2 floats
TILE_SPACE = [
    (128, 256, 4, 2),
    (256, 128, 4, 2),
    (128, 128, 6, 2),
    (128, 128, 6, 1),
    (128, 64, 8, 2),
    (64, 128, 8, 1),
    (64, 64, 8, 1),
]
MAX_ACC = 128  # fp32 accumulators per consumer thread the register budget allows
# Two CTAs per SM (CTAS = 2): while one runs its epilogue (bias, activation, residual, stores: the
# tensor cores idle) the other's mainloop runs, which a one-CTA kernel cannot overlap. Half the
# shared memory and registers each: (BM, BN, STAGES, CW) whose ring fits twice in an SM (4-6
# stages) and whose accumulators fit the registers ptxas may use at two CTAs (reg_cap: it compiles
# the whole kernel to the launch bounds' share, setmaxnreg does not raise it; 128x128 with two
# consumer warp groups needs 90 of 80 and is not in the space).
TILE_SPACE_2CTA = [
    (128, 64, 4, 2),
    (64, 128, 4, 1),
    (64, 64, 6, 1),
]
# BN = 192: N = 768 and 2304 (BERT) split into whole tiles that fill 128 / 132 SMs at 4096 rows
TILE_SPACE = TILE_SPACE + [(128, 192, 4, 2)]
# Persistent points (PERSIST): a CTA per SM (per resident CTA) loops over tiles, and the producer runs
# on into the next tile's k-tiles while the consumers store this one (the ring never drains).
# SCHED "pingpong": the CTA's tiles alternate between the two consumer warp groups, each computing
# a whole BM x BN tile, taking turns at the tensor cores: one's epilogue overlaps the other's
# mainloop (the schedule CUTLASS calls ping-pong). (BM, BN, STAGES) per warp group.
PERSISTENT_COOP = [(128, 256, 4, 2), (128, 192, 4, 2), (256, 128, 4, 2), (128, 128, 6, 2)]
PINGPONG = [(128, 128, 6), (64, 256, 5), (64, 128, 8), (128, 64, 8)]
# TMA only, for the tuner (not measured yet): ping-pong rings one or two stages deeper (all the shared
# memory; a TMA stage costs the producer nothing but its bytes; the cost model does not see stages,
# so its pick stays the shallower twin listed first), and ping-pong 64x192, whose tiles fill the
# 2 x 132 warp groups evenly on N = 768 / 2304 / 3072 at 4096 rows (256 / 768 / 1024 tiles; the
# cost model rates its area like 64x128 until measured)
PINGPONG_TMA = [(128, 128, 7), (64, 128, 9), (128, 64, 9), (64, 192, 6), (64, 192, 7)]
# Three consumer warp groups (kind "cw3", TMA only, unverified): BM = 192 = 3 x m64, BN = 128. At
# BERT-base b32 (M = 4096: 22 tile rows) the grid is whole waves of 132 SMs on every GEMM: N = 768
# -> 132 tiles, 2304 -> 396, 3072 -> 528 (128x128 leaves 192 tiles = 1.45 waves on N = 768).
# 512 threads: 128 registers each (no setmaxnreg), 64 accumulators a consumer thread.
TILE_SPACE_CW3 = [(192, 128, 5, 3)]
# Kind "swizzle": the TMA points of the space at GROUP_M = 16 (twice the rows of tiles sharing B
# panels in L2) for big grids (8192^3: A and B are 128 MB each, more than L2)
SWIZZLE_WIDE = 16
SWIZZLE_MIN_TILES = (32, 32)  # tile rows, tile columns of 128 (M, N >= 3969: 4096^3, 8192^3)
REGS_BESIDES_ACC = 28  # addresses, descriptors, loop state of a consumer thread (ptxas -v, 2026-12-02)


def smem_bytes(p: dict, im2col: bool = False) -> int:
    """The ring, the mbarriers and 1 KB to align the ring to a swizzle atom (im2col by cp.async: and
    the producer's row table of a conv's implicit A, 8 bytes a row; the TMA im2col map needs none)."""
    # + ping-pong's two order barriers (16 bytes: always reserved, so the row table's place is fixed)
    table = 8 * p["BM"] if im2col and load_kind(p) != "tma" else 0
    return p["STAGES"] * (p["BM"] + p["BN"]) * BK * 2 + 16 * p["STAGES"] + 16 + 1024 + table + epi_tma_bytes(p)


def epi_tma_bytes(p: dict) -> int:
    """EPI = tma: the consumer warp groups' output stages (2-byte D: ROWS x BN each; ping-pong: two
    whole tiles, else the tile's rows split), 1024-aligned after the mbarriers."""
    if p.get("EPI", "regs") != "tma":
        return 0
    return p["BM"] * p["BN"] * 2 * (2 if pingpong(p) else 1) + 1024


SMEM_RESERVED_PER_CTA = 1024  # the driver's own shared memory per resident CTA (sm_80+)


def ctas_per_sm(p: dict) -> int:
    return int(p.get("CTAS", 1))


def pingpong(p: dict) -> bool:
    return p.get("SCHED", "coop") == "pingpong"


def persistent(p: dict) -> bool:
    return bool(p.get("PERSIST")) or pingpong(p)


LOADS = ("cp_async", "tma")


def load_kind(p: dict) -> str:
    return p.get("LOAD", "cp_async")


def _valid(p: dict, target: Target, im2col: bool = False) -> bool:
    if p.get("SCHED", "coop") not in ("coop", "pingpong") or load_kind(p) not in LOADS:
        return False
    if load_kind(p) == "tma" and (p.get("b_bulk") or lag(p) != 0):  # (im2col: im2col_tma_fits, in render)
        return False
    sk = p.get("SPLIT_K", 1)
    if not isinstance(sk, int) or isinstance(sk, bool) or not 1 <= sk <= 65535:
        return False
    if sk > 1 and (load_kind(p) != "tma" or persistent(p)):  # split-K: TMA, a CTA a (tile, split)
        return False
    if p.get("EPI", "regs") not in EPILOGUES:
        return False
    if epi_smem(p) and (load_kind(p) != "tma" or persistent(p) or sk > 1 or not epi_stage_fits(p)):
        return False
    if epi_tma(p) and (load_kind(p) != "tma" or sk > 1 or ctas_per_sm(p) != 1):
        return False
    if pingpong(p) and (p["CW"] != 2 or ctas_per_sm(p) != 1 or lag(p) != 0):
        return False
    rows = p["BM"] if pingpong(p) else p["BM"] // p["CW"]
    ctas = ctas_per_sm(p)
    acc = (rows // 64) * p["BN"] // 2
    if p["CW"] not in (1, 2, 3) or (p["CW"] == 3 and load_kind(p) != "tma"):
        return False
    # one CTA of two warp groups or fewer: setmaxnreg / 255 registers; more (two CTAs, or 512 threads):
    # the launch bounds' share, which the accumulators and REGS_BESIDES_ACC must fit
    return (rows % 64 == 0 and p["BN"] % 64 == 0 and p["BN"] <= 256 and p["STAGES"] >= 3 and ctas in (1, 2)
            and (acc <= MAX_ACC if ctas == 1 and p["CW"] <= 2 else acc + REGS_BESIDES_ACC <= reg_cap(p, target))
            and smem_bytes(p, im2col) <= target.smem_per_block_optin
            and ctas * (smem_bytes(p, im2col) + SMEM_RESERVED_PER_CTA) <= target.smem_per_sm)


def reg_cap(p: dict, target: Target) -> int:
    """Registers per thread ptxas compiles to under the launch bounds (threads, CTAS per SM)."""
    return min(target.regs_per_thread, target.regs_per_sm // (ctas_per_sm(p) * 128 * (p["CW"] + 1)) // 8 * 8)


def setmaxnreg(p: dict):
    """(producer, consumer) registers per thread after setmaxnreg, or None (no reallocation): with
    two consumer warp groups and one CTA per SM, the producer warp group, which needs few, gives
    its registers to the consumers. At two CTAs per SM nothing moves (ptxas compiled every thread
    to the same share)."""
    if p["CW"] != 2 or ctas_per_sm(p) != 1:
        return None
    return 40, 232


def split_k(p: dict) -> int:
    return int(p.get("SPLIT_K", 1))


def epi_smem(p: dict) -> bool:
    """EPI = smem: the epilogue staged through shared memory (fp32 [BM][BN + 8] over the free ring of
    a CTA-a-tile TMA point), then row-contiguous reads of C / bias and 16-byte stores of D: for
    store-bound GEMMs (K = 64 1x1 convs: one k-tile). Speed not measured (UNVERIFIED_IN_SPACE);
    never the heuristic's pick (the cost model does not see it; the register epilogue's twin comes
    first)."""
    return p.get("EPI", "regs") == "smem"


EPILOGUES = ("regs", "smem", "shfl", "tma")


def epi_shfl(p: dict) -> bool:
    """EPI = shfl: the register epilogue, but the 4 threads of a quad (one row) transpose their
    column pairs through shuffles so each writes 8 consecutive outputs as one 16-byte store (a warp
    store: 8 rows x 64 contiguous bytes, not 8 x 16). Any schedule (ping-pong and persistent points
    included), no shared memory; 2-byte outputs (epi_shfl_fits). Speed not measured (IN_SPACE)."""
    return p.get("EPI", "regs") == "shfl"


def epi_tma(p: dict) -> bool:
    """EPI = tma: the epilogue writes each consumer warp group's rows into its own 128B-swizzled
    shared stage and one thread stores them with cp.async.bulk.tensor (a third tensor map, of D), so
    the stores leave as whole lines and run on while the warp group starts its next tile (the
    schedule CUTLASS's TMA epilogue uses). Any TMA schedule at one CTA an SM, unsplit; one 2-byte D
    matrix (epi_tma_fits). Speed not measured (IN_SPACE)."""
    return p.get("EPI", "regs") == "tma"


def d_map_spec(pr: gemm.GemmProblem, p: dict) -> tmap.TensorMapSpec:
    """The tensor map of D for EPI = tma: [M, N] (leading dim ldd) in boxes of 64 columns x one
    consumer warp group's rows, 128B-swizzled; arg 2 (gemm.kernel_args: A, B, D)."""
    rows = p["BM"] if pingpong(p) else p["BM"] // p["CW"]
    return tmap.matrix_spec(pr.out_dtype or pr.dtype, pr.N, pr.M, pr.ldd_, 64, rows, (), arg=2)


def epi_tma_fits(pr: gemm.GemmProblem) -> bool:
    """One 2-byte D matrix whose map cuTensorMapEncodeTiled takes (rows 16-byte aligned: N % 8 for a
    dense D; the address is checked at encode time)."""
    if CTYPES[pr.out_dtype or pr.dtype][1] != 2 or pr.nbatch != 1:
        return False
    return not tmap.check(d_map_spec(pr, dict(BM=64, BN=64, CW=1)))


def epi_shfl_fits(pr: gemm.GemmProblem) -> bool:
    """A 2-byte output with even row and batch strides (the pairs the quads exchange; a row start not
    16-byte aligned, or a ragged last octet, falls back to element stores at run time)."""
    return CTYPES[pr.out_dtype or pr.dtype][1] == 2 and all(int(v) % 2 == 0 for v in (pr.ldd_, *pr.stride_d))


def epi_stage_fits(p: dict) -> bool:
    return p["BM"] * (p["BN"] + 8) * 4 <= p["STAGES"] * (p["BM"] + p["BN"]) * BK * 2


def lag(p: dict) -> int:
    """How the producer publishes a stage: 0 = cp.async.mbarrier.arrive.noinc (the arrive fires when
    the copies land); n > 0 = n k-tiles later, after cp.async.wait_group n (at most STAGES - 2, or
    the producer would wait on an empty stage the consumers cannot free yet)."""
    if "LAG" in p:
        return int(p["LAG"])
    return DEFAULT_LAG


DEFAULT_LAG = 0


def preswizzle_b(b, trans_b: bool, BN: int):
    """A 2-D B ([K, N], or [N, K] when trans_b) as the bulk-copy layout: [tiles_n][KT][BN][64], each
    (tile, k-tile) block exactly the K-major 128B-swizzled shared tile (16-byte chunk c of row n at
    chunk c ^ (n % 8)), zero-padded past N and K."""
    import numpy as np
    bt = np.asarray(b)
    bt = bt if trans_b else bt.T  # [N, K]
    N, K = bt.shape
    tn, kt = cdiv(N, BN), cdiv(K, BK)
    pad = np.zeros((tn * BN, kt * BK), dtype=bt.dtype)
    pad[:N, :K] = bt
    t = pad.reshape(tn, BN, kt, BK // 8, 8).transpose(0, 2, 1, 3, 4)  # [tn][kt][n][chunk][8]
    out = np.empty_like(t)
    n = np.arange(BN)[:, None]
    c = np.arange(BK // 8)[None, :]
    out[:, :, n, c ^ (n % 8), :] = t[:, :, n, c, :]
    return np.ascontiguousarray(out.reshape(tn * kt * BN * BK))


def fits(pr: gemm.GemmProblem, target: Target):
    """Fit: whether the wgmma kernel can compute pr on target."""
    if not getattr(target, "has_wgmma", False):
        return no(f"wgmma needs sm_90a (target {target.arch})")
    if pr.dtype not in ("float16", "bfloat16"):
        return no(f"wgmma GEMM takes fp16/bf16, not {pr.dtype}")
    if pr.M <= 0 or pr.N <= 0 or pr.K <= 0:
        return no("an empty GEMM")
    if pr.K % 8:
        return no(f"K = {pr.K} is not a multiple of 8 (16-byte chunks)")
    if pr.trans_a and pr.M % 8:
        return no(f"transposed A needs M % 8 == 0 (M = {pr.M})")
    if not pr.trans_b and pr.N % 8:
        return no(f"B [K, N] needs N % 8 == 0 (N = {pr.N})")
    if any(int(v) % 8 for v in (pr.lda_, pr.ldb_, *pr.stride_a, *pr.stride_b)):
        return no("an operand's rows or batch strides are not 16-byte aligned")
    return YES


def _batch_levels(pr: gemm.GemmProblem, strides) -> list:
    """[(name, count, stride)] of the batch levels an operand varies over, innermost first (z1:
    batch[1] with strides[1], then z0: batch[0] with strides[0]); a broadcast level (stride 0) or
    one of a single batch is no tensor-map dim."""
    lv = [("z1", pr.batch[1], int(strides[1])), ("z0", pr.batch[0], int(strides[0]))]
    return [x for x in lv if x[1] > 1 and x[2] != 0]


def tensor_map_specs(pr: gemm.GemmProblem, p: dict) -> tuple:
    """(A's TensorMapSpec, B's, A's batch coordinate names, B's) for LOAD = tma: the operands as
    the kernel reads them (A [M, K] or transposed [K, M]; B [N, K] when trans_b, else [K, N]),
    K-major tiles one box {64 k, BM or BN}, MN-major tiles boxes {64 mn, 64 k}; arg: A and B are
    the kernel's arguments 0 and 1 (gemm.kernel_args)."""
    out = []
    for arg, (kmajor, ext, ld, strides, box_rows) in enumerate((
            (not pr.trans_a, pr.M, pr.lda_, pr.stride_a, p["BM"]),
            (pr.trans_b, pr.N, pr.ldb_, pr.stride_b, p["BN"]))):
        lv = _batch_levels(pr, strides)
        batch = tuple((n, st) for _, n, st in lv)
        if kmajor:
            spec = tmap.matrix_spec(pr.dtype, pr.K, ext, ld, BK, box_rows, batch, arg=arg)
        else:
            spec = tmap.matrix_spec(pr.dtype, ext, pr.K, ld, 64, BK, batch, arg=arg)
        out.append((spec, [name for name, _, _ in lv]))
    (sa, za), (sb, zb) = out
    return sa, sb, za, zb


def tma_fits(pr: gemm.GemmProblem, target: Target = DEFAULT_TARGET):
    """Fit: whether the TMA loads can read pr's operands (cuTensorMapEncodeTiled's rules through
    tma.check; the addresses' 16-byte alignment is checked when the runtime encodes them)."""
    if not getattr(target, "has_wgmma", False):
        return no("TMA loads are in the sm_90a kernel only")
    return tma_specs_fit(pr)


def tma_specs_fit(pr: gemm.GemmProblem):
    """Fit: whether pr's operands make tensor maps cuTensorMapEncodeTiled takes (any target)."""
    if pr.dtype not in tmap.DATA_TYPE:
        return no(f"no tensor map type for {pr.dtype}")
    sa, sb, _, _ = tensor_map_specs(pr, dict(BM=64, BN=64))
    for what, sp in (("A", sa), ("B", sb)):
        why = tmap.check(sp)
        if why:
            return no(f"TMA {what}: {why}")
    return YES


def im2col_map_spec(pr: gemm.GemmProblem, g: dict, BM: int) -> tmap.TensorMapSpec:
    """The im2col tensor map of a conv's implicit A (g: conv_wgmma.im2col_geometry's CV_* dict; x
    NHWC [N, H, W, C], N = M / (P * Q)): copies of BM output pixels x one 64-channel block (128 B,
    the K-major stage tile); traversal = the conv stride; bounding box lower corner = -pad (the
    first output pixel's filter base) and upper corner the last one's, (P - 1) * stride - pad,
    relative to dim - 1 (so the traversal wraps to the next row / image exactly where the output
    pixels do, whatever the end padding); the tap (r, s) is the instruction's im2col offsets."""
    n = pr.M // (g["CV_P"] * g["CV_Q"])
    lower = (-g["CV_PH"], -g["CV_PW"])
    upper = ((g["CV_P"] - 1) * g["CV_SH"] - g["CV_PH"] - (g["CV_H"] - 1),
             (g["CV_Q"] - 1) * g["CV_SW"] - g["CV_PW"] - (g["CV_W"] - 1))
    return tmap.nhwc_im2col_spec(pr.dtype, n, g["CV_H"], g["CV_W"], g["CV_C"], BK, BM, (g["CV_SH"], g["CV_SW"]),
                                 lower, upper, arg=0)


IM2COL_MAX_OFFSET = {4: 255}  # the instruction's im2col offsets (the tap r, s) at rank 4: 8 bits each


def im2col_tma_fits(pr: gemm.GemmProblem, g: dict):
    """Fit: whether the TMA im2col map loads the conv's implicit A: C % 64 == 0 (a k-tile is one
    64-channel block of one tap), dilation 1, the taps within the 8-bit im2col offsets, the corners
    and the map within cuTensorMapEncodeIm2col's rules (tma.check)."""
    if g["CV_C"] % BK:
        return no(f"C = {g['CV_C']} is not a multiple of {BK} (one 64-channel block a k-tile)")
    if (g["CV_DH"], g["CV_DW"]) != (1, 1):
        return no("a dilated conv (the im2col map's taps are the filter offsets at dilation 1)")
    if max(g["CV_R"], g["CV_S"]) - 1 > IM2COL_MAX_OFFSET[4]:
        return no("filter taps past the 8-bit im2col offsets")
    if pr.M % (g["CV_P"] * g["CV_Q"]):
        return no("M is not whole images of P x Q output pixels")
    why = tmap.check(im2col_map_spec(pr, g, 64))
    return no(f"TMA im2col: {why}") if why else YES


# Point kinds whose speed is not measured yet (split-K, the staged epilogue; 2026-12-03): left out of
# the declared space, so neither the heuristic nor the tuner (whose budget more points would spread
# over fewer problems) meets them; tools and tests ask for them (unverified=True). Their GPU tests
# (test_gemm_wgmma_splitk.py, test_conv_tma.py) passed on the H200 at 28e0771 (2026-12-03 08:00);
# test_gemm_tma.py -k staged and the timings (tools/check_conv_tma.py --split, check_gemm_tma.py)
# have not run. Set True once those show where they win.
UNVERIFIED_IN_SPACE = False
# Per kind (what each point kind adds): "split" SPLIT_K > 1, "epi_smem" EPI = smem, "epi_shfl" EPI = shfl
# (16-byte stores through quad shuffles, 2026-12-03 afternoon, unrun on GPU). A kind joins the
# declared space when UNVERIFIED_IN_SPACE or its IN_SPACE entry is True; flip an entry only with a
# measurement that shows where it wins (tools/check_wgmma_vs_vendor.py).
# "cw3" the BM = 192 three-consumer-warp-group tiles (TILE_SPACE_CW3), "swizzle" GROUP_M = SWIZZLE_WIDE,
# "split_waves" split-K on grids of one or two waves whose last wave is mostly idle (split_wave_points;
# the points carry WAVES = True), "epi_tma" EPI = tma (D by TMA stores from a swizzled stage),
# "cw3_epi_tma" the cw3 tiles with EPI = tma only.
# Measured (H200, lead's run of tools/check_wgmma_vs_vendor.py, 2026-12-03 ~15:50, every point
# checked first, 0 wrong): epi_tma's best beat the space's best on 13 of 17 problems, cuBLAS /
# cuDNN over nnc: BERT b1 QKV / out / FFN1 / FFN2 0.85 / 0.74 / 0.81 / 0.65 -> 0.91 / 0.82 / 0.91 /
# 0.68, b32 QKV / out / FFN1 / FFN2 0.77 / 0.73 / 0.98 / 0.96 -> 0.96 / 0.92 / 1.09 / 1.06, ResNet-50
# b32 1x1 64->256 @56 0.43 -> 1.07, 256->64 @56 0.81 -> 0.97, 1x1/2 256->512 0.84 -> 1.31, 1024->256
# @14 0.73 -> 0.91, 512->2048 @7 0.69 -> 0.85; within 1-4 % of it on 4096^3 / 8192^3 (1.07-1.10 of
# cuBLAS either way). The best 1x1 64->256 and b32 out-proj points were cw3 + epi_tma (192x128x4
# persistent: 20.3 / 10.5 us), so those join too; the other kinds stay out: split's best was the
# winner only on b1 FFN2 (7.0 us, 0.99; not flipped: one shape), epi_smem / epi_shfl lost to
# epi_tma everywhere but 8192^3 bf16 (epi_smem 1.10 vs 1.06), cw3 with the register epilogue and
# swizzle 16 lost on 4096^3 / 8192^3, split_waves lost (0.35-0.62).
UNVERIFIED_KINDS = ("split", "epi_smem", "epi_shfl", "cw3", "swizzle", "split_waves", "epi_tma", "cw3_epi_tma")
IN_SPACE = {"split": False, "epi_smem": False, "epi_shfl": False, "cw3": False, "swizzle": False,
            "split_waves": False, "epi_tma": True, "cw3_epi_tma": True}
# candidates(unverified=True): the kinds of the first round only (their GPU tests ran at 28e0771; what
# the existing tests ask for); a later kind is asked for by name (unverified=("epi_shfl",) or "all")
UNVERIFIED_TRUE = ("split", "epi_smem")


def unverified_kinds(unverified=None) -> tuple:
    """The point kinds candidates adds for its `unverified` argument: None: those in the space
    (UNVERIFIED_IN_SPACE, IN_SPACE); True: those and UNVERIFIED_TRUE; a tuple of kind names: those
    in the space and these; "all": every kind; False: none (the base tiles only)."""
    space = tuple(k for k in UNVERIFIED_KINDS if UNVERIFIED_IN_SPACE or IN_SPACE[k])
    if unverified is None:
        return space
    if unverified is False:
        return ()
    if unverified == "all":
        return UNVERIFIED_KINDS
    kinds = UNVERIFIED_TRUE if unverified is True else tuple(unverified)
    bad = [k for k in kinds if k not in UNVERIFIED_KINDS]
    if bad:
        raise ValueError(f"unknown unverified point kinds {bad} (known: {UNVERIFIED_KINDS})")
    return tuple(k for k in UNVERIFIED_KINDS if k in space or k in kinds)


def in_space(p: dict) -> bool:
    """Whether point p's kinds are all in the declared space (an unverified kind's flag is on)."""
    kinds = unverified_kinds(None)
    sk_kind = "split_waves" if p.get("WAVES") else "split"
    return ((split_k(p) == 1 or sk_kind in kinds) and (not epi_smem(p) or "epi_smem" in kinds)
            and (not epi_shfl(p) or "epi_shfl" in kinds) and (not epi_tma(p) or "epi_tma" in kinds)
            and (p["CW"] != 3 or "cw3" in kinds or ("cw3_epi_tma" in kinds and epi_tma(p)))
            and (p.get("swizzle", gemm.GROUP_M) != SWIZZLE_WIDE or "swizzle" in kinds))


def candidates(problem: gemm.GemmProblem, target: Target = DEFAULT_TARGET, b_bulk: bool = False,
               im2col: bool = False, im2col_tma: bool = False, unverified=None) -> list[dict]:
    """The declared space; b_bulk: B is a constant 2-D weight, so the pre-swizzled bulk-copy
    points come first (the same tiles with cp.async B follow); im2col: A is a conv's implicit
    im2col (conv_wgmma.py), whose row table takes shared memory too; im2col_tma: its geometry
    takes an im2col tensor map (im2col_tma_fits), so the TMA points (A by the im2col map, B by a
    tiled one) follow the cp.async ones, as for a GEMM; unverified (unverified_kinds: None = the
    kinds in the space): the split-K, staged-epilogue and shuffle-store points last."""
    kinds = unverified_kinds(unverified)
    out = []
    points = [dict(BM=bm, BN=bn, STAGES=st, CW=cw) for bm, bn, st, cw in TILE_SPACE]
    points += [dict(BM=bm, BN=bn, STAGES=st, CW=cw, CTAS=2) for bm, bn, st, cw in TILE_SPACE_2CTA]
    points += [dict(BM=bm, BN=bn, STAGES=st, CW=cw, PERSIST=True) for bm, bn, st, cw in PERSISTENT_COOP]
    points += [dict(BM=bm, BN=bn, STAGES=st, CW=2, SCHED="pingpong") for bm, bn, st in PINGPONG]
    for p in points:
        if _valid(p, target, im2col) and gemm._size_ok(p["BM"], problem.M) and gemm._size_ok(p["BN"], problem.N):
            out.append(dict(p, swizzle=gemm.GROUP_M))
    smallest = dict(BM=64, BN=64, STAGES=8, CW=1, swizzle=gemm.GROUP_M)  # loads any operand layout
    plain = [p for p in out if mn_major_loads_ok(problem, p)] or [smallest]
    # the TMA points: every tile (the boxes load any operand layout), after the cp.async ones
    tma_points = []
    if out and (im2col_tma if im2col else True) and tma_fits(problem, target):
        deep = [dict(BM=bm, BN=bn, STAGES=st, CW=2, SCHED="pingpong", LOAD="tma") for bm, bn, st in PINGPONG_TMA]
        tma_points = [dict(p, LOAD="tma") for p in out] + [
            dict(p, swizzle=gemm.GROUP_M) for p in deep
            if _valid(p, target, im2col) and gemm._size_ok(p["BM"], problem.M) and gemm._size_ok(p["BN"], problem.N)]
    wide = []
    if tma_points and ("cw3" in kinds or "cw3_epi_tma" in kinds):
        wide = [dict(BM=bm, BN=bn, STAGES=st, CW=cw, LOAD="tma", swizzle=gemm.GROUP_M) for bm, bn, st, cw in TILE_SPACE_CW3]
        wide += [dict(p, PERSIST=True) for p in wide]
        wide = [p for p in wide if _valid(p, target, im2col) and gemm._size_ok(p["BM"], problem.M)
                and gemm._size_ok(p["BN"], problem.N)]
    if "cw3" in kinds:  # (before the kinds below, which then take them too)
        tma_points, wide = tma_points + wide, []
    extra = []  # the unverified kinds' points
    if tma_points and "swizzle" in kinds and all(
            cdiv(d, 128) >= lo for d, lo in zip((problem.M, problem.N), SWIZZLE_MIN_TILES)):
        extra += [dict(p, swizzle=SWIZZLE_WIDE) for p in tma_points]
    if "split" in kinds:
        # split-K (TMA, a CTA a tile): grids of fewer tiles than SMs with long K (split_points)
        extra += [dict(p, SPLIT_K=sk) for p in tma_points if not persistent(p)
                 for sk in split_points(problem, p, target)]
    if "split_waves" in kinds:
        extra += [dict(p, SPLIT_K=sk, WAVES=True) for p in tma_points if not persistent(p)
                  for sk in split_wave_points(problem, p, target)]
    if "epi_smem" in kinds:
        # the staged epilogue (EPI = smem) of the CTA-a-tile TMA points
        extra += [dict(p, EPI="smem") for p in tma_points if _valid(dict(p, EPI="smem"), target, im2col)]
    if "epi_shfl" in kinds and epi_shfl_fits(problem):
        # 16-byte stores through quad shuffles (EPI = shfl) on every TMA point, and on the split ones
        # of the smallest split of each tile (batch-1 grids: the fewest partials)
        first_split = {}
        for p in extra:
            if split_k(p) > 1:
                first_split.setdefault((p["BM"], p["BN"], p["STAGES"], p["CW"], p.get("CTAS", 1)), p)
        extra += [dict(p, EPI="shfl") for p in tma_points + list(first_split.values())]
    if "epi_tma" in kinds and epi_tma_fits(problem):
        # D by TMA stores: every unsplit one-CTA TMA point, its ring shortened to make room for the
        # output stages where it must (at least 3 stages)
        for p in tma_points + wide:  # (wide: the cw3 tiles of kind cw3_epi_tma, with EPI = tma only)
            if ctas_per_sm(p) != 1:
                continue
            q = dict(p, EPI="tma")
            while not _valid(q, target, im2col) and q["STAGES"] > 3:
                q = dict(q, STAGES=q["STAGES"] - 1)
            if _valid(q, target, im2col) and q not in extra:
                extra.append(q)
    return ([dict(p, b_bulk=True) for p in out or [smallest]] + plain + tma_points + extra) if b_bulk \
        else plain + tma_points + extra


# Split-K on the TMA points (SPLIT_K = S > 1, gemm.py's scheme and scratch: gemm.splitk_workspace's
# fp32 partials and per-tile counters, bound by gemm_lowering.emit_spec, the counters zeroed once a
# run): CTA (tile, s) runs k-tiles [s KT / S, (s + 1) KT / S), stores its partial, the last of the
# tile adds them in split order and runs the epilogue. For batch-1 GEMMs (M ~ 128: a few tiles on
# 132 SMs). Speed not measured (UNVERIFIED_IN_SPACE); once in the space, the heuristic splits only
# when the model gives it gemm.SPLIT_K_MIN_GAIN of the best unsplit point's time.
SPLIT_MIN_K_TILES = 3  # k-tiles a split runs at least (the TMA ring needs no warm-up of its own)


def split_points(problem: gemm.GemmProblem, p: dict, target: Target = DEFAULT_TARGET) -> list[int]:
    """The SPLIT_K values (> 1) of gemm.SPLIT_K_SPACE TMA point p may run with: the unsplit grid has
    fewer tiles than SMs; the split grid is at most one wave of resident CTAs and at most
    gemm.SPLIT_K_MAX_PER_SM CTAs an SM; every split runs SPLIT_MIN_K_TILES k-tiles or more; the
    partials fit in half of L2."""
    if load_kind(p) != "tma" or persistent(p):
        return []
    tiles = cdiv(problem.M, p["BM"]) * cdiv(problem.N, p["BN"]) * problem.nbatch
    if tiles >= target.sm_count:
        return []
    k_tiles = cdiv(problem.K, BK)
    wave = target.sm_count * ctas_per_sm(p)
    out = []
    for sk in gemm.SPLIT_K_SPACE:
        if k_tiles // sk < SPLIT_MIN_K_TILES or tiles * sk > min(wave, gemm.SPLIT_K_MAX_PER_SM * target.sm_count):
            continue
        if gemm.splitk_workspace(problem, dict(p, SPLIT_K=sk))[0] * 4 > target.l2_bytes // 2:
            continue
        out.append(sk)
    return out


# Kind "split_waves": split-K where the unsplit grid is one or two waves of CTAs whose last wave is
# mostly idle (BERT-base b32 out-proj / FFN2 at 128x128: 192 tiles = 1.45 waves; ResNet-50 1x1
# 1024->256 @14: 98 tiles = 0.74 of a wave): S splits of K make a grid of S x tiles CTAs that fills
# its waves at least SPLIT_WAVES_MIN_GAIN better, at most SPLIT_WAVES_MAX waves, every split
# SPLIT_MIN_K_TILES k-tiles or more. The fp32 partials (S x the output) go through L2: whether the
# fuller waves pay for them is what the measurement decides (the same kernel as "split").
SPLIT_WAVES_SPACE = (2, 3, 4)
SPLIT_WAVES_MIN_GAIN = 0.15
SPLIT_WAVES_MAX = 3


def split_wave_points(problem: gemm.GemmProblem, p: dict, target: Target = DEFAULT_TARGET) -> list[int]:
    """The SPLIT_K values of kind split_waves for TMA point p (a CTA a tile): [] where the unsplit
    grid has fewer tiles than SMs (split_points' case) or more than two waves."""
    if load_kind(p) != "tma" or persistent(p):
        return []
    tiles = cdiv(problem.M, p["BM"]) * cdiv(problem.N, p["BN"]) * problem.nbatch
    slots = target.sm_count * ctas_per_sm(p)
    if tiles < target.sm_count or tiles > 2 * slots:
        return []
    fill = lambda n: n / (cdiv(n, slots) * slots)  # noqa: E731 (the busy share of the waves' CTA slots)
    k_tiles = cdiv(problem.K, BK)
    out = []
    for sk in SPLIT_WAVES_SPACE:
        n = tiles * sk
        if k_tiles // sk < SPLIT_MIN_K_TILES or cdiv(n, slots) > SPLIT_WAVES_MAX:
            continue
        if fill(n) < fill(tiles) + SPLIT_WAVES_MIN_GAIN:
            continue
        if gemm.splitk_workspace(problem, dict(p, SPLIT_K=sk))[0] * 4 > target.l2_bytes // 2:
            continue
        out.append(sk)
    return out


def mn_major_loads_ok(problem: gemm.GemmProblem, p: dict) -> bool:
    """The MN-major tile loader (load_mnmajor: 128 threads over 64 k rows of EXT / 8 chunks) needs
    EXT / 8 to divide 128: a B [K, N] copied by cp.async (not transposed, not bulk) cannot take
    BN = 192, nor a transposed A BM = 192 (the GPU gate caught BN = 192 wrong, H200 2026-12-02)."""
    if load_kind(p) == "tma":
        return True
    if not p.get("b_bulk") and not problem.trans_b and 128 % (p["BN"] // 8):
        return False
    return not (problem.trans_a and 128 % (p["BM"] // 8))


# The heuristic's cost model, calibrated on the H200 (2026-12-02) from the tuner's timings of every
# point on BERT-base batch-32 GEMMs (4096 x {768, 2304, 3072} x {768, 3072}) and tools/
# bench_conv_wgmma.py on ResNet-50 batch-32 convs, plus 8192^3 (714 TFLOP/s with a bulk B):
# - a whole-GPU rate that grows with K (the per-tile fill and epilogue amortised over the k-loop):
#   R_INF * K / (K + K_HALF), R_INF 750 TFLOP/s with a pre-swizzled bulk B, 380 with B by cp.async;
# - bigger tiles issue fewer, longer wgmmas per byte loaded: TILE_EFFICIENCY by tile area; two CTAs
#   an SM share it (0.9);
# - a CTA a tile pays fill + epilogue every wave (WAVE_OVERHEAD_S); persistent points once per tile
#   less (the producer runs ahead), ping-pong and two-CTA points hide them behind the other
#   warp group's / CTA's mainloop; persistent points take ceil(tiles / SMs) tiles each.
# On those shapes the model's pick is the measured best or within 10 % of it (the tuner's timings
# recorded in plan.json "timings"); the old model (8192^3 rates only) picked points 10-45 % slower.
R_INF = {True: 750e12, False: 380e12}
# TMA points (both operands by the TMA engine, one producer thread), fitted to tools/check_gemm_tma.py
# on the H200 (2026-12-02, fp16: 4096^3 both B layouts, BERT-base b32's four GEMMs, 8 x 1024^3,
# 12 x 512x768x768, 1000x999x520), where TMA was 1.3-1.9x the cp.async and bulk-B points: the same
# peak rate as bulk B, but a tile's fill + epilogue is a separate term (K_EPI_TMA k-equivalents of
# its mainloop) that ping-pong and two-CTA points hide behind the other warp group's / CTA's
# mainloop; persistent and one-tile CTAs pay it per tile. The measured-best TMA point is the model's
# pick on 5 of those 9 problems and within 2 % on two more; on the last two (4096^3 B [N, K],
# 8 x 1024^3) its pick, ping-pong 128x128, was not among the times reported (the old model's picks
# were 3-25 % slower than the best on 5 problems). A weight B now gets TMA too (bulk B was slower).
R_INF_TMA = 750e12
K_EPI_TMA = 768
K_EPI_TMA_STORE = 0.5  # EPI = tma: the fill + epilogue term's share left (the stores run on under the next tile)
TMA_FIXED_S = 5e-6  # once a launch: the first fill and the last epilogue
TMA_WAVE_S = 4e-6  # per wave of a CTA-a-tile grid
K_HALF = 1365
TILE_EFFICIENCY = {64 * 64: 0.55, 64 * 128: 0.8, 64 * 192: 0.8, 128 * 128: 1.0, 128 * 192: 1.05, 128 * 256: 1.1}
WAVE_OVERHEAD_S = 4e-6  # pipeline fill + epilogue of one CTA a tile (not persistent: every wave pays it)
HIDDEN_OVERHEAD_S = 2e-6  # what a persistent / overlapped schedule still pays (the first fill, the last store)


# A conv's implicit A by the TMA im2col map (conv_wgmma.py), measured on the H200 (2026-12-03,
# tools/check_conv_tma.py, ResNet-50 b32 fp16, 0 wrong): the TMA im2col points run at the TMA GEMM's
# rates (3x3 convs 1.04-1.09x cuDNN, 413-439 TFLOP/s at 14-56 px; 1x1/2 256 TFLOP/s), 1.5-2.3x the
# cp.async gather's best on every shape, so where the map fits the heuristic picks among the TMA
# points only (default_params; the cp.async ones stay in the space for the timed selector), at the
# TMA GEMM's model (IM2COL_TMA_RATE 1.0; the first, unmeasured, 0.7 sent 3x3 256 @14 and 512 @7 to
# the gather at 196 / 180 instead of 413 / 423 TFLOP/s). Ping-pong was the fastest schedule on 5 of
# the 6 im2col shapes (the fused epilogue under the other warp group's mainloop); the model's
# coop picks ran 3-13 % slower there, so one-CTA-a-tile TMA im2col points are modelled at
# IM2COL_COOP_RATE (with it the heuristic's pick is the measured best or within 3 % on 5 of the 6
# shapes, 13 % on 1x1/2 256->512 @56).
IM2COL_TMA_RATE = 1.0
IM2COL_COOP_RATE = 0.9


def modelled_time(problem: gemm.GemmProblem, p: dict, target: Target = DEFAULT_TARGET, im2col: bool = False) -> float:
    """Seconds for problem at point p: rounds of tiles per SM times one tile's time, plus the
    overhead its schedule cannot hide (im2col: A is a conv's implicit im2col). A model for the
    heuristic, not a measurement."""
    K = cdiv(problem.K, BK) * BK
    per_sm = ctas_per_sm(p)
    eff = TILE_EFFICIENCY.get(p["BM"] * p["BN"], 1.0) * (0.9 if per_sm == 2 else 1.0)
    tiles = cdiv(problem.M, p["BM"]) * cdiv(problem.N, p["BN"]) * problem.nbatch
    if load_kind(p) == "tma":
        if im2col:
            eff *= IM2COL_TMA_RATE * (1.0 if pingpong(p) else IM2COL_COOP_RATE)
        return _tma_time(p, K, eff, tiles, target, im2col)
    rate = R_INF[bool(p.get("b_bulk"))] * K / (K + K_HALF) * eff / target.sm_count  # one SM's
    tile = 2.0 * p["BM"] * p["BN"] * K / rate
    if pingpong(p):
        return cdiv(tiles, target.sm_count) * tile + HIDDEN_OVERHEAD_S
    if per_sm == 2:  # two CTAs share an SM: each tile at half its rate, two at a time
        return cdiv(tiles, 2 * target.sm_count) * 2 * tile + HIDDEN_OVERHEAD_S
    if persistent(p):
        return cdiv(tiles, target.sm_count) * (tile + HIDDEN_OVERHEAD_S) + HIDDEN_OVERHEAD_S
    return cdiv(tiles, target.sm_count) * (tile + WAVE_OVERHEAD_S)


def _tma_time(p: dict, K: int, eff: float, tiles: int, target: Target, im2col: bool = False) -> float:
    """modelled_time of a TMA point: a tile's mainloop, and its fill + epilogue, at one SM's rate
    (split-K: K / S a CTA, tiles x S CTAs, plus gemm.py's split costs: the fences and atomics, the
    last CTA's read of the other S - 1 partials)."""
    sms, rate = target.sm_count, R_INF_TMA * eff / target.sm_count
    sk = split_k(p)
    main = 2.0 * p["BM"] * p["BN"] * cdiv(K, sk) / rate
    epi = 2.0 * p["BM"] * p["BN"] * K_EPI_TMA / rate * (K_EPI_TMA_STORE if epi_tma(p) and not im2col else 1.0)
    if sk > 1:
        return (cdiv(tiles * sk, ctas_per_sm(p) * sms) * ctas_per_sm(p) * main + epi + TMA_FIXED_S
                + gemm.SPLIT_K_FIXED_S + (sk - 1) * p["BM"] * p["BN"] * 4 / gemm.SPLIT_K_PARTIAL_BPS)
    if pingpong(p):
        return cdiv(tiles, sms) * main + epi + TMA_FIXED_S
    if ctas_per_sm(p) == 2:
        return cdiv(tiles, 2 * sms) * 2 * main + epi + TMA_FIXED_S
    if persistent(p):
        return cdiv(tiles, sms) * (main + epi) + TMA_FIXED_S
    return cdiv(tiles, sms) * (main + epi + TMA_WAVE_S)


# EPI = tma in the heuristic: for a GEMM (a 1x1/1 conv's too) the model rates a tile's fill + epilogue
# term at K_EPI_TMA_STORE = 0.5 with TMA stores, so every pick is an EPI = tma point; on the lead's
# H200 run (2026-12-03 ~15:50, IN_SPACE's comment) the pick is the measured-best EPI = tma point on
# 9 of the 14 problems whose best EPI = tma point is known (BERT b1 QKV / out / FFN1 64x64x8, 4.5-4.6
# us vs the old pick's 4.8-5.1; b32 FFN1 128x128x5 ping-pong 33.6 vs 37.6; b32 FFN2 128x192x4 29.7
# vs 32.9; 4096^3 fp16 / bf16 128x256x3 persistent 222 / 218 vs 230 / 222; 1x1 256->64 @56 128x64x8
# ping-pong 19.0 vs 22.8; 1x1 512->2048 @7 128x128x5 ping-pong 9.7 vs 12.2); on the others (b32 QKV
# and out-proj, 8192^3, 1x1 64->256 @56, 1024->256 @14) the kind's best beat the old pick (8192^3
# bf16 aside: 1554 vs 1548 us) but the new pick's own time was not taken (0.5 was chosen as the
# factor with the most of those 9 hits among 0.1-1.0). An implicit-GEMM conv's pick keeps the
# register epilogue (the factor is 1 there: ties, the register twin comes first) unless its caller
# asks (prefer_epi_tma: conv_wgmma for 1x1/2 convs: the kind's best 16.5 us vs the old pick's 29.6
# at 256->512 @56); 3x3 convs were not measured with EPI = tma (the timed selector sees both).
PREFER_EPI_TMA = True


def default_params(problem: gemm.GemmProblem, target: Target = DEFAULT_TARGET, b_bulk: bool = False,
                   im2col: bool = False, im2col_tma: bool = False, prefer_epi_tma: bool = False) -> dict:
    """The point of the smallest modelled time (one CTA per SM: the ring takes most of shared
    memory, so big tiles win unless they leave most SMs idle); a split-K point only when its
    modelled time is at most gemm.SPLIT_K_MIN_GAIN of the best unsplit point's; a conv whose
    im2col map fits: among the TMA points only (measured faster on every shape, IM2COL_TMA_RATE)."""
    cands = candidates(problem, target, b_bulk, im2col, im2col_tma)
    if im2col and im2col_tma:
        cands = [p for p in cands if load_kind(p) == "tma"] or cands
    if im2col and prefer_epi_tma and PREFER_EPI_TMA:
        # a 1x1 (strided) conv's implicit GEMM: D by TMA stores where the space has them (a GEMM's
        # pick takes them through the model: K_EPI_TMA_STORE)
        store = [p for p in cands if epi_tma(p) and split_k(p) == 1]
        if store:
            cands = store + [p for p in cands if split_k(p) > 1]
    t = lambda p: modelled_time(problem, p, target, im2col)  # noqa: E731
    best = min((p for p in cands if split_k(p) == 1), key=t)
    split = [p for p in cands if split_k(p) > 1]
    if split:
        s_best = min(split, key=t)
        if t(s_best) <= gemm.SPLIT_K_MIN_GAIN * t(best):
            return s_best
    return best


def grid_of(problem: gemm.GemmProblem, p: dict, target: Target = DEFAULT_TARGET) -> tuple:
    """(x, 1 or SPLIT_K, batches): a CTA per tile (and split), or for a persistent point at most one
    per resident CTA slot (SM count x CTAS), spread over the batches; the kernel strides its tiles by
    the grid either way."""
    tiles = cdiv(problem.M, p["BM"]) * cdiv(problem.N, p["BN"])
    if not persistent(p):
        return tiles, split_k(p), problem.nbatch  # split-K: blockIdx.y is the split
    slots = target.sm_count * ctas_per_sm(p)
    return max(1, min(tiles, cdiv(slots, problem.nbatch))), 1, problem.nbatch


def render(problem: gemm.GemmProblem, params: dict | None = None, name: str | None = None,
           im2col: dict | None = None, target: Target = DEFAULT_TARGET) -> KernelSpec:
    """im2col: A is the implicit im2col matrix of an NHWC conv of this geometry (the template's
    CV_* constants and cv_inbounds: conv_wgmma.im2col_geometry); A then binds x."""
    pr = problem
    params = dict(params or default_params(pr, target))
    ctype, elem, _ = CTYPES[pr.dtype]
    out_dtype = pr.out_dtype or pr.dtype
    to, _, to2 = CTYPES[out_dtype]
    swz = params.get("swizzle", gemm.GROUP_M)
    if not isinstance(swz, int) or isinstance(swz, bool) or not 1 <= swz <= 1024:
        raise ValueError(f"GEMM swizzle must be an int in 1..1024, got {swz!r}")
    if not _valid(params, target, im2col is not None):
        raise ValueError(f"wgmma GEMM params {params} are not in the declared space's bounds")
    bulk = bool(params.get("b_bulk", False))
    if bulk and (pr.nbatch > 1 and any(pr.stride_b)):
        raise ValueError("wgmma GEMM: a pre-swizzled B must be one matrix (no batch strides)")
    if split_k(params) > cdiv(pr.K, BK):
        raise ValueError(f"wgmma GEMM: SPLIT_K {split_k(params)} exceeds the {cdiv(pr.K, BK)} k-tiles")
    if not 0 <= lag(params) <= params["STAGES"] - 2:
        raise ValueError(f"wgmma GEMM: LAG must be in 0..STAGES-2, got {params}")
    ctx = dict(BM=params["BM"], BN=params["BN"], BK=BK, STAGES=params["STAGES"], CW=params["CW"], LAG=lag(params),
               CTAS=ctas_per_sm(params), MAXNREG=setmaxnreg(params), SCHED=params.get("SCHED", "coop"))
    if bulk:
        ctx["b_bulk"] = True
    tma = load_kind(params) == "tma"
    if tma:
        fit = tma_specs_fit(pr)
        if fit and im2col is not None:
            fit = im2col_tma_fits(pr, im2col)
        if not fit:
            raise ValueError(f"wgmma GEMM: LOAD = tma does not fit ({fit.why})")
        spec_a, spec_b, za, zb = tensor_map_specs(pr, params)
        if im2col is not None:
            spec_a, za = im2col_map_spec(pr, im2col, params["BM"]), []
        ctx.update(LOAD="tma", tma_a_batch=za, tma_b_batch=zb)  # only when set: cp.async kernels keep their names
    if im2col is not None:
        if pr.trans_a or not pr.trans_b or pr.nbatch != 1:
            raise ValueError("wgmma conv: A must be the im2col rows (K-major), B [K_out, R*S*C], one batch")
        ctx.update(a_im2col=True, **im2col)
    if split_k(params) > 1:  # only when set: unsplit kernels keep their names and sources
        ctx["split_k"] = split_k(params)
    if epi_tma(params):
        if not epi_tma_fits(pr):
            raise ValueError("wgmma GEMM: EPI = tma needs one 2-byte D matrix with 16-byte aligned rows")
        ctx["epi_tma"] = True
    if epi_shfl(params):
        if not epi_shfl_fits(pr):
            raise ValueError("wgmma GEMM: EPI = shfl needs a 2-byte output with even row and batch strides")
        ctx["epi_shfl"] = True
    if epi_smem(params):
        ctx.update(epi_smem=True, TO_BYTES=CTYPES[out_dtype][1], TC_BYTES=CTYPES[pr.c_dtype or out_dtype][1])
    if params.get("probe"):  # measurement only (tools/bench_gemm_wgmma.py --probe): wrong results
        ctx["probe"] = str(params["probe"])
    ctx.update(act_ctx(pr.act, dict(pr.act_params)))
    ctx.update(T=ctype, TO=to, TO2=to2, a_kmajor=not pr.trans_a, b_kmajor=pr.trans_b or bulk, has_c=pr.has_c,
               has_bias=pr.has_bias, GROUP_M=swz, mma={"float16": "f16", "bfloat16": "bf16"}[pr.dtype],
               TC=CTYPES[pr.c_dtype or out_dtype][0], TBIAS=CTYPES[pr.bias_dtype or out_dtype][0],
               pair_store=all(int(v) % 2 == 0 for v in (pr.ldd_, *pr.stride_d)))
    if pr.has_bias and pr.bias_rows:
        ctx.update(bias_row_z1=int(pr.bias_stride_z1))
    ctx["name"] = name or kernel_name("nnc_conv_wgmma" if im2col is not None else "nnc_gemm_wgmma", ctx)
    src = render_template(TEMPLATE, **ctx)
    grid = grid_of(pr, params, target)
    args = gemm.kernel_args(pr, ctype, to, ctx)
    if split_k(params) > 1:  # scratch emit_spec binds (gemm_lowering.splitk_scratch): the value is its element count
        ws, counters = gemm.splitk_workspace(pr, params)
        args += [("ws", "float*", ws), ("tile_counters", "int*", counters)]
    if tma:
        assert args[0][0] == "A" and args[1][0] == "B"  # the specs' "arg" indices
        args += [("tmA", tmap.TMAP_CTYPE, tmap.spec_dict(spec_a)), ("tmB", tmap.TMAP_CTYPE, tmap.spec_dict(spec_b))]
    if epi_tma(params):
        assert args[2][0] == "D"  # d_map_spec's arg index
        args += [("tmD", tmap.TMAP_CTYPE, tmap.spec_dict(d_map_spec(pr, params)))]
    return KernelSpec(source=src, name=ctx["name"], grid=grid, block=(128 * (params["CW"] + 1), 1, 1),
                      smem=smem_bytes(params, im2col is not None), args=args,
                      params=dict(params, BK=BK, family="wgmma", template=TEMPLATE))


def splitk_arrays(spec: KernelSpec) -> dict:
    """Zeroed device scratch for a rendered split-K spec's ws / tile_counters args (tools and tests
    that launch a KernelSpec directly; a compiled model gets them from gemm_lowering.emit_spec): {}
    for an unsplit one. The kernel leaves the counters zero again, so the arrays serve any number of
    launches. GPU only (cupy)."""
    import cupy
    kinds = {"float*": cupy.float32, "int*": cupy.int32}
    return {name: cupy.zeros(max(int(n), 1), kinds[ct]) for name, ct, n in spec.args
            if name in ("ws", "tile_counters")}


# ---------------------------------------------------------------- the Variants (MatMul, Gemm)
# Above the mma.sync variants (gemm_lowering.FAST_PRIORITY = 10): measured faster on the H200 on every
# large shape (4096^3 fp16: 548 vs 293 TFLOP/s with a weight B, 331 vs 293 without; BERT-base batch-32
# GEMMs 1.0-2.0x; tools/bench_gemm_wgmma.py, 2026-12-02). Only sm_90a targets see it (--arch sm_90a, or
# a compile on the Hopper GPU present: codegen/target.py).
PRIORITY = 11


def _case(problem, a, b, c, y):
    from . import gemm_lowering
    return gemm_lowering._case(problem, a, b, c, y)


def _applies(problem):
    got = _case(problem, problem.tensor(0), problem.tensor(1),
                problem.tensor(2) if problem.op.name == "Gemm" else None, problem.result(0))
    if isinstance(got, str):
        return no(got)
    fit = fits(got[0], problem.target)
    if not fit:
        return fit
    problem.memo["gemm_wgmma"] = got[0]
    problem.memo["gemm_wgmma_bulk"] = _bulk_b(problem, got[0])
    return YES


def _bulk_b(problem, pr) -> bool:
    """B is a compile-time constant 2-D matrix of 2-byte elements, read unbatched: it can be
    pre-swizzled for bulk copies."""
    v = problem.value(1)
    return (v is not None and getattr(v, "ndim", 0) == 2 and v.dtype.itemsize == 2
            and not any(pr.stride_b) and pr.ldb is None)


def _space(problem) -> list:
    return candidates(problem.memo["gemm_wgmma"], problem.target, problem.memo["gemm_wgmma_bulk"])


def _default(problem, space) -> dict:
    return default_params(problem.memo["gemm_wgmma"], problem.target, problem.memo["gemm_wgmma_bulk"])


def _render(ctx: LowerCtx, problem, params: dict):
    from . import gemm_lowering
    bulk = bool(params.get("b_bulk"))
    # the order the mma.sync variant makes buffers in; a pre-swizzled B reads its own weight buffer
    # instead of the constant's (which is then never made)
    a, b, y = ctx.inp(0), problem.tensor(1) if bulk else ctx.inp(1), ctx.out(0)
    c = ctx.inp(2) if ctx.op.name == "Gemm" else None
    got = _case(problem, a, b, c, y)
    if isinstance(got, str):
        ctx.fail(f"internal error: the wgmma GEMM variant applied but its buffers do not fit ({got})")
    pr, bufs = got
    params = tma_store_or_regs(params, y)
    if bulk:
        BN = params["BN"]
        bufs["B"] = ctx.weight(1, lambda w: preswizzle_b(w, pr.trans_b, BN), key=f"wgmma_b{BN}{'t' * pr.trans_b}")
    gemm_lowering.emit_spec(ctx, render(pr, params, target=problem.target), bufs)
    return True


def tma_store_or_regs(params: dict, d_buf) -> dict:
    """EPI = tma needs D's start 16-byte aligned (the tensor map's base): an output view that starts
    elsewhere (a slice of a bigger buffer) takes the register epilogue of the same tile instead."""
    from .gemm_lowering import aligned
    return dict(params, EPI="regs") if epi_tma(params) and not aligned(d_buf) else params


def _register_epilogue_variants():
    from . import gemm_lowering
    gemm_lowering.add_epilogue_variant("MatMul", MATMUL)
    gemm_lowering.add_epilogue_variant("Gemm", GEMM)


def _time_model(problem, params) -> float:
    """The heuristic's model (modelled_time) as a stand-in timer's cost."""
    return modelled_time(problem.memo["gemm_wgmma"], params, problem.target)


MATMUL = register(Variant("gemm.wgmma.matmul", "gemm_wgmma", ("MatMul",), _render, _applies, _space, _default,
                          priority=PRIORITY, cost=_time_model))
GEMM = register(Variant("gemm.wgmma.gemm", "gemm_wgmma", ("Gemm",), _render, _applies, _space, _default,
                        priority=PRIORITY, cost=_time_model))
# a fused epilogue group's GEMM anchor may render with these too
_register_epilogue_variants()
