"""FP8 tensor-core GEMM on Hopper: `matmul_fp8` (ir/ops/gemm_fp8.py) as wgmma.mma_async with e4m3 /
e5m2 operands (templates/gemm_fp8_wgmma.cu.j2), variant "gemm_fp8.wgmma" of family "gemm_fp8".

What it computes, from the op's operands as they are (1 byte a value, no dequantize pass):

    acc[m, n] = sum_k f32(a[m, k]) * f32(b[k, n])          (wgmma, f32 accumulators)
    y[m, n]   = out_dtype(act(acc * (a_scale * b_scale[n]) [+ f32(bias[n])]))

- a: the activations, already fp8 [.., K] (the QuantizeLinear kernel that quantize-fp8 / the QDQ
  fold leave in front of the op writes them: the "small cast kernel" option; it is not fused into
  its producer yet), flattened to [M, K] row-major.
- b: the constant weight [K, N], stored at compile time as [N, K] (K-major: 8-bit wgmma reads both
  operands K-major only, there is no transpose for 8-bit types) in weights.bin, 1 byte a weight.
- b_scale: f32, stored as [N] (per column) or [1] (per tensor); a_scale: the f32 scalar operand,
  read by the kernel from its buffer (it need not be a constant).
- The epilogue multiplies, adds the bias, applies the op's activation and casts, in the reference's
  order (the only difference from ir/ops/gemm_fp8._ref is the order of the f32 sum).

Loads: both operands by the TMA engine (codegen/tma.py, data type uint8), 128B-swizzled, zero-filled
past M, N and K, so any K % 16 == 0 (the tensor map's 16-byte row stride) works, and ragged M / N too.

    applies(problem) -> Fit   sm_90a (Target.has_wgmma); a and b fp8 (e4m3 / e5m2, either mix);
                              static shapes; K % 16 == 0; b and b_scale constants; a's buffer
                              16-byte aligned (a view at another offset is refused)
    candidates(pr, target)    TILE_SPACE: (BM, BN, STAGES, CW), BK = 128, the ring within the
                              shared memory an SM gives a block; TILE_SPACE_2CTA: the same at two
                              CTAs per SM (CTAS = 2, unmeasured, not the heuristic's pick)
    default_params            the smallest modelled_time (a model, not measured yet)
    render_spec(pr, params)   -> KernelSpec (tools and tests launch it directly)

Priority 5, above gemm_fp8.dequant (0), which stays the fallback (sm_80, K % 16 != 0, ...).
Unrun on a GPU as of this commit (2026-12-03): correctness and speed are the lead's H200 round.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .. import tma as tmap
from ..lower import LowerCtx
from ..target import Target
from ..variants import YES, Variant, no, register
from . import gemm
from .common import CTYPES, DEFAULT_TARGET, KernelSpec, cdiv, kernel_name, render as render_template

TEMPLATE = "gemm_fp8_wgmma.cu.j2"
FAMILY = "gemm_fp8"  # the family of gemm_fp8.dequant (codegen/kernels/gemm_fp8.py)
PRIORITY = 5
BK = 128  # one k-tile: 128 fp8 values = one 128-byte swizzle row
WGMMA_TYPE = {"f8e4m3": "e4m3", "f8e5m2": "e5m2"}
# (BM, BN, STAGES, CW): CW consumer warp groups split the BM rows (BM / CW / 64 m64 wgmmas each);
# accumulators per consumer thread: (BM / CW / 64) * BN / 2 floats (at most MAX_ACC). Stage bytes
# (BM + BN) * 128: the deepest ring within ~200 KB. BN = 192: N = 768 / 2304 in whole tiles (BERT).
TILE_SPACE = [
    (128, 256, 4, 2),
    (128, 192, 5, 2),
    (128, 128, 6, 2),
    (256, 128, 4, 2),
    (128, 64, 8, 2),
    (128, 128, 6, 1),
    (64, 128, 8, 1),
    (64, 64, 8, 1),
    (64, 32, 8, 1),  # small M (BERT at batch 1: M = 128): more CTAs for the SMs (48 at N = 768)
]
# Two CTAs per SM (CTAS = 2): one CTA's epilogue and pipeline fill overlap the other's mainloop,
# which a one-tile CTA cannot do itself (at K = 768 a BERT tile has only 6 k-tiles, so fill and
# epilogue are a large share). Each CTA gets half the shared memory and the registers ptxas may use
# at two CTAs (reg_cap: one consumer warp group, no setmaxnreg). Not measured: in the space for
# the timed selector and tools/bench_gemm_fp8.py --space, never the heuristic's pick until measured.
TILE_SPACE_2CTA = [
    (64, 128, 4, 1),
    (128, 64, 4, 1),
    (64, 192, 3, 1),
]
MAX_ACC = 128
REGS_BESIDES_ACC = 30  # addresses, descriptors, loop and epilogue state of a consumer thread (a guess)
SMEM_RESERVED_PER_CTA = 1024


@dataclass(frozen=True)
class Fp8GemmProblem:
    """One matmul_fp8 as the kernel sees it: A [M, K] and B [N, K] fp8 (row-major, ld = K), D [M, N]
    (ld = N) of out_dtype (numpy name); b_scale_cols: b_scale is [N] (else one value)."""
    M: int
    N: int
    K: int
    a_dtype: str = "f8e4m3"
    b_dtype: str = "f8e4m3"
    out_dtype: str = "float16"
    has_bias: bool = False
    bias_dtype: str = "float16"
    b_scale_cols: bool = True
    act: str = "none"
    d_offset_bytes: int = 0  # D's byte offset in its buffer's root (pair stores need alignment)


def smem_bytes(p: dict) -> int:
    """The ring, its 2 x STAGES mbarriers, and 1 KB to align the ring to a swizzle atom."""
    return p["STAGES"] * (p["BM"] + p["BN"]) * BK + 16 * p["STAGES"] + 1024


def ctas_per_sm(p: dict) -> int:
    return int(p.get("CTAS", 1))


def reg_cap(p: dict, target: Target) -> int:
    """Registers per thread ptxas compiles to under the launch bounds (threads, CTAS per SM)."""
    return min(target.regs_per_thread, target.regs_per_sm // (ctas_per_sm(p) * 128 * (p["CW"] + 1)) // 8 * 8)


def _valid(p: dict, target: Target) -> bool:
    rows = p["BM"] // p["CW"]
    acc = (rows // 64) * p["BN"] // 2
    ctas = ctas_per_sm(p)
    if ctas not in (1, 2) or (ctas == 2 and (p["CW"] != 1 or acc + REGS_BESIDES_ACC > reg_cap(p, target))):
        return False
    return (p["CW"] in (1, 2) and p["BM"] % p["CW"] == 0 and rows % 64 == 0 and p["BN"] % 32 == 0
            and p["BN"] <= 256 and p["BM"] <= 256 and p["STAGES"] >= 2 and acc <= MAX_ACC
            and smem_bytes(p) <= target.smem_per_block_optin
            and ctas * (smem_bytes(p) + SMEM_RESERVED_PER_CTA) <= target.smem_per_sm)


def candidates(pr: Fp8GemmProblem, target: Target = DEFAULT_TARGET) -> list:
    points = [dict(BM=bm, BN=bn, STAGES=st, CW=cw) for bm, bn, st, cw in TILE_SPACE]
    points += [dict(BM=bm, BN=bn, STAGES=st, CW=cw, CTAS=2) for bm, bn, st, cw in TILE_SPACE_2CTA]
    return [p for p in points if _valid(p, target)]


# The heuristic's model (NOT measured yet): a tile's mainloop at one SM's share of an fp8 peak
# rate (twice the fp16 wgmma model's 750 TFLOP/s: the tensor cores' fp8 rate is twice their fp16
# one), scaled by tile efficiency, plus a per-wave fill + epilogue; rounds of tiles over the SMs.
R_FP8 = 1500e12
TILE_EFFICIENCY = {64 * 32: 0.3, 64 * 64: 0.5, 64 * 128: 0.75, 128 * 64: 0.8, 128 * 128: 1.0,
                   128 * 192: 1.05, 128 * 256: 1.1, 256 * 128: 1.1}
WAVE_S = 4e-6


def modelled_time(pr: Fp8GemmProblem, p: dict, target: Target = DEFAULT_TARGET) -> float:
    K = cdiv(pr.K, BK) * BK
    tiles = cdiv(pr.M, p["BM"]) * cdiv(pr.N, p["BN"])
    rate = R_FP8 * TILE_EFFICIENCY.get(p["BM"] * p["BN"], 1.0) / target.sm_count
    tile = 2.0 * p["BM"] * p["BN"] * K / rate
    if ctas_per_sm(p) == 2:  # two CTAs share an SM: each at about half the rate, fills and epilogues hidden
        return cdiv(tiles, 2 * target.sm_count) * 2 * tile / 0.9 + WAVE_S
    return cdiv(tiles, target.sm_count) * (tile + WAVE_S)


def default_params(pr: Fp8GemmProblem, target: Target = DEFAULT_TARGET) -> dict:
    """The smallest modelled time among the one-CTA points (two-CTA points: not measured yet)."""
    return min((p for p in candidates(pr, target) if ctas_per_sm(p) == 1), key=lambda p: modelled_time(pr, p, target))


def tensor_map_specs(pr: Fp8GemmProblem, p: dict) -> tuple:
    """A's and B's tensor maps: [rows][K] bytes, boxes {BK, BM} / {BK, BN}, 128B swizzle; arg: the
    launch arguments A (0) and B (1)."""
    sa = tmap.matrix_spec("uint8", pr.K, pr.M, pr.K, BK, p["BM"], arg=0)
    sb = tmap.matrix_spec("uint8", pr.K, pr.N, pr.K, BK, p["BN"], arg=1)
    return sa, sb


def fits(pr: Fp8GemmProblem, target: Target):
    if not getattr(target, "has_wgmma", False):
        return no(f"fp8 wgmma needs sm_90a (target {target.arch})")
    if pr.a_dtype not in WGMMA_TYPE or pr.b_dtype not in WGMMA_TYPE:
        return no(f"wgmma takes e4m3 / e5m2, not {pr.a_dtype} x {pr.b_dtype}")
    if pr.M <= 0 or pr.N <= 0 or pr.K <= 0:
        return no("an empty GEMM")
    if pr.K % 16:
        return no(f"K = {pr.K} is not a multiple of 16 (the tensor maps' 16-byte row stride)")
    if pr.out_dtype not in CTYPES or pr.act not in ("none", "relu"):
        return no(f"output {pr.out_dtype} / activation {pr.act} not taken")
    if pr.has_bias and pr.bias_dtype not in ("float16", "bfloat16", "float32"):
        return no(f"a {pr.bias_dtype} bias (the epilogue reads f16 / bf16 / f32)")
    for what, sp in zip("AB", tensor_map_specs(pr, dict(BM=64, BN=64))):
        why = tmap.check(sp)
        if why:
            return no(f"TMA {what}: {why}")
    if not candidates(pr, target):
        return no("no tile of the space fits the target's shared memory")
    return YES


def render_spec(pr: Fp8GemmProblem, params: dict | None = None, target: Target = DEFAULT_TARGET,
                name: str | None = None) -> KernelSpec:
    params = dict(params or default_params(pr, target))
    if not _valid(params, target):
        raise ValueError(f"fp8 wgmma GEMM params {params} are not in the declared space's bounds")
    to, to_bytes, to2 = CTYPES[pr.out_dtype]
    pair = pr.N % 2 == 0 and pr.d_offset_bytes % (2 * to_bytes) == 0
    ctx = dict(BM=params["BM"], BN=params["BN"], BK=BK, STAGES=params["STAGES"], CW=params["CW"], CTAS=ctas_per_sm(params),
               GROUP_M=gemm.GROUP_M, atype=WGMMA_TYPE[pr.a_dtype], btype=WGMMA_TYPE[pr.b_dtype], TO=to, TO2=to2,
               has_bias=pr.has_bias, TBIAS=CTYPES[pr.bias_dtype][0] if pr.has_bias else "", act=pr.act,
               b_scale_cols=pr.b_scale_cols, pair_store=pair)
    ctx["name"] = name or kernel_name("nnc_gemm_fp8_wgmma", ctx)
    src = render_template(TEMPLATE, **ctx)
    args = [("A", "const unsigned char*", None), ("B", "const unsigned char*", None), ("D", f"{to}*", None)]
    if pr.has_bias:
        args.append(("bias", f"const {ctx['TBIAS']}*", None))
    args += [("a_scale", "const float*", None), ("b_scale", "const float*", None),
             ("M", "int", pr.M), ("N", "int", pr.N), ("K", "int", pr.K), ("ldd", "long long", pr.N)]
    sa, sb = tensor_map_specs(pr, params)
    args += [("tmA", tmap.TMAP_CTYPE, tmap.spec_dict(sa)), ("tmB", tmap.TMAP_CTYPE, tmap.spec_dict(sb))]
    grid = (cdiv(pr.M, params["BM"]) * cdiv(pr.N, params["BN"]), 1, 1)
    return KernelSpec(source=src, name=ctx["name"], grid=grid, block=(128 * (params["CW"] + 1), 1, 1),
                      smem=smem_bytes(params), args=args,
                      params=dict(params, BK=BK, family="gemm_fp8_wgmma", template=TEMPLATE))


# ---------------------------------------------------------------- the numpy model of the kernel

def weight_nk(b: np.ndarray) -> np.ndarray:
    """The constant [K, N] fp8 weight as the kernel reads it: [N, K], K contiguous."""
    return np.ascontiguousarray(np.asarray(b).T)


def scale_vector(b_scale, N: int) -> np.ndarray:
    """b_scale as the kernel reads it: f32 [N] (per column) or [1] (per tensor)."""
    s = np.asarray(b_scale, np.float32)
    return np.ascontiguousarray(s.reshape(-1) if s.ndim else s.reshape(1))


def model(a, a_scale, b_nk, b_scale_vec, bias=None, act="none", out_dtype=np.float16, BK_=BK):
    """What the kernel computes, in numpy: exact fp8 products summed in f32 one k-tile (BK_ values)
    at a time (the wgmma order up to the tensor core's internal sum order), times
    (a_scale * b_scale[n]) in f32, + bias in f32, the activation, the cast. a: fp8 [M, K];
    b_nk: fp8 [N, K] (weight_nk); b_scale_vec: scale_vector."""
    from ...ir.narrow_types import decode
    af = decode(np.asarray(a)).astype(np.float32)
    bf = decode(np.asarray(b_nk)).astype(np.float32)
    M, K = af.shape
    acc = np.zeros((M, bf.shape[0]), np.float32)
    for k0 in range(0, K, BK_):
        acc += af[:, k0:k0 + BK_] @ bf[:, k0:k0 + BK_].T
    s = np.float32(np.asarray(a_scale, np.float32).reshape(())) * b_scale_vec.astype(np.float32)
    y = acc * (s if s.size > 1 else s.reshape(()))
    if bias is not None:
        y = y + np.asarray(bias).astype(np.float32)
    if act == "relu":
        y = np.maximum(y, np.float32(0))
    return y.astype(out_dtype)


# ---------------------------------------------------------------- the Variant

def problem_of(problem) -> Fp8GemmProblem | str:
    """The Fp8GemmProblem of a matmul_fp8 Problem (codegen/lower.py), or why it has none."""
    op = problem.op
    a, b, y = problem.tensor(0), problem.tensor(2), problem.result(0)
    if any(not all(isinstance(d, int) for d in t.shape) for t in (a, b, y)):
        return "symbolic shapes"
    if problem.value(2) is None or problem.value(3) is None:
        return "b / b_scale are not compile-time constants"
    K, N = (int(d) for d in b.shape)
    M = int(np.prod(a.shape[:-1])) if len(a.shape) > 1 else 1
    if (a.alias_offset or 0) % tmap.GLOBAL_ALIGN:
        return "a is a view at an offset that is not 16-byte aligned"
    bias = problem.tensor(4) if problem.has(4) else None
    return Fp8GemmProblem(M, N, K, a.dtype.short, b.dtype.short, y.dtype.np_name, bias is not None,
                          bias.dtype.np_name if bias is not None else "float16",
                          np.ndim(problem.value(3)) == 1, getattr(op.attrs, "activation", "none"))


def _applies(problem):
    pr = problem_of(problem)
    if isinstance(pr, str):
        return no(pr)
    fit = fits(pr, problem.target)
    if fit:
        problem.memo["gemm_fp8_wgmma"] = pr
    return fit


def _space(problem) -> list:
    return candidates(problem.memo["gemm_fp8_wgmma"], problem.target)


def _default(problem, space) -> dict:
    return default_params(problem.memo["gemm_fp8_wgmma"], problem.target)


def _render(ctx: LowerCtx, problem, params: dict):
    pr = problem.memo["gemm_fp8_wgmma"]
    d = ctx.out(0)
    pr = replace(pr, d_offset_bytes=int(getattr(d, "alias_offset", 0) or 0))
    if int(getattr(ctx.inp(0), "alias_offset", 0) or 0) % tmap.GLOBAL_ALIGN:  # (applies saw no buffer yet)
        ctx.fail("matmul_fp8: a is a view at an offset that is not 16-byte aligned (its tensor map needs it)")
    bufs = {"A": ctx.inp(0), "B": ctx.weight(2, weight_nk, key="fp8_nk"), "D": d, "a_scale": ctx.inp(1),
            "b_scale": ctx.weight(3, lambda s: scale_vector(s, pr.N), key="fp8_scale_vec")}
    if pr.has_bias:
        bufs["bias"] = ctx.inp(4)
    from . import gemm_lowering
    gemm_lowering.emit_spec(ctx, render_spec(pr, params, problem.target), bufs)
    return True


def _cost(problem, params) -> float:
    return modelled_time(problem.memo["gemm_fp8_wgmma"], params, problem.target)


WGMMA = register(Variant("gemm_fp8.wgmma", FAMILY, ("matmul_fp8",), _render, _applies, _space, _default,
                         priority=PRIORITY, cost=_cost))
