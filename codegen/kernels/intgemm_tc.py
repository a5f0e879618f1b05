"""Int8 tensor-core kernels for the integer ops (templates/intgemm_tc.cu.j2): declared Variants of
family "intgemm_tc" at PRIORITY 10, above the one-thread-per-output baseline of intgemm.py
(legacy @lowering, priority 0), so the heuristic picks them where they apply and the timed
selector races them against the baseline.

* intgemm_tc.matmul (MatMulInteger, QLinearMatMul): A [.., M, K] (batch folded into rows) x a
  constant B [K, N], the weight reordered at compile time to [N, K] (K-major, the mma's "col" B).
* intgemm_tc.conv (ConvInteger, QLinearConv; 2-D NCHW, groups 1): an im2col kernel writes the
  input as col [N*P*Q, KP] (k = (c, r, s), the zero point outside the image, zeros up to KP, the
  next multiple of 16) into a temp, then the GEMM with the OIHW weight as [O, KP]; y stored NCHW.

Zero points are exact through int32 correction terms (wrap-around arithmetic):
    sum_k (a - za)(b - zb[n]) = sum_k a*b + (K*za*zb[n] - za*sum_k b[n, k]) - zb[n]*sum_k a
the middle term a compile-time int32 vector `corr`, the last a per-row sum of A the kernel takes
from its A fragments (dp4a) only when some zb != 0. u8 and s8 operands go to the mma as they
are (.u8/.s8 operand types). QLinear*: rint((acc + bias) * scale[n]) + yz, saturated, in f64
with scale = sa * sb[n] / sy computed here as the reference interpreter computes it (bit-exact).

    applies(problem) -> Fit   sm_80+ (Target.cc), i8/u8 operands, scalar A zero point / scale,
                              constant B (weight), scales and zero points, int8/uint8 (QLinear*)
                              or int32 output; matmul: K % 16 == 0 (16-byte cp.async rows of A),
                              16-byte aligned A, 2-D B; conv: 2-D, groups 1, NCHW
    space                     tiles BM x BN x BK (bytes of K), warps, stages within the Target's
                              shared memory
    default                   the largest tile that still gives one wave of CTAs (else 64x64)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..lower import LowerCtx
from ..variants import YES, Variant, no, register
from .common import cdiv
from .gemm_lowering import aligned
from .intgemm import _QR

FAMILY = "intgemm_tc"
PRIORITY = 10
MIN_CC = 80  # mma.sync m16n8k32 s8/u8
GROUP_M = 8
_INT8 = ("i8", "u8")

# (BM, BN, BK, WARPS_M, WARPS_N, STAGES)
TILES = [
    (128, 128, 64, 2, 4, 4), (128, 128, 128, 2, 4, 3), (128, 256, 64, 2, 4, 3), (256, 128, 64, 4, 2, 3),
    (128, 64, 64, 2, 2, 4), (64, 128, 64, 2, 2, 4), (64, 64, 64, 2, 2, 4), (64, 64, 128, 2, 2, 3),
    (32, 64, 64, 1, 2, 4), (64, 32, 64, 2, 1, 4), (32, 64, 128, 1, 2, 4),
]


def smem_bytes(p: dict) -> int:
    return p["STAGES"] * (p["BM"] + p["BN"]) * (p["BK"] + 16)


@dataclass(frozen=True)
class IntGemm:
    """What the kernels need to know of one op (decided by applies, reused by render)."""
    kind: str            # "mm" | "conv"
    quant: bool          # QLinear*: requantized output
    M: int               # GEMM rows (A rows with the batch folded in / N*P*Q output pixels)
    N: int               # columns (B columns / output channels)
    K: int               # true reduction length
    KP: int              # row length of A and B in memory (K up to a multiple of 16)
    a_u8: bool
    b_u8: bool
    out: str             # output dtype short name: i32 | i8 | u8
    has_zb: bool         # some B zero point is not 0 (the row-sum term)
    has_bias: bool
    conv: Optional[tuple] = None  # (NB, C, H, W, R, S, P, Q, SH, SW, PH, PW, DH, DW)
    yz: int = 0          # QLinear*: the output zero point
    pair_store: bool = False  # matmul, N even, y aligned: two columns in one store


def _scalar(v) -> Optional[int]:
    a = np.asarray(v)
    if a.size != 1:
        return None
    return int(a.reshape(()))


def _vec(v, n: int, dt=np.int64) -> Optional[np.ndarray]:
    """A scalar or [n] parameter as an [n] array; None for any other shape."""
    a = np.asarray(v)
    if a.size == 1:
        return np.full(n, a.reshape(()), dtype=a.dtype).astype(dt)
    if a.size == n and a.ndim == 1:
        return a.astype(dt)
    return None


def _common(problem, ql: bool, ia: int, ib: int):
    """Shared checks; returns (A info, B info, y info, B value) or a reason (str)."""
    if problem.target.cc < MIN_CC:
        return f"needs sm_80+ (mma.sync m16n8k32 int8), target is {problem.target.arch}"
    a, b, y = problem.tensor(ia), problem.tensor(ib), problem.result(0)
    if a is None or b is None:
        return "missing operand"
    if a.dtype.short not in _INT8 or b.dtype.short not in _INT8:
        return "operands are not int8 / uint8"
    if ql and y.dtype.short not in _INT8:
        return f"output dtype {y.dtype.short} is not int8 / uint8"
    if y.numel == 0:
        return "empty output"
    bv = problem.value(ib)
    if bv is None:
        return "B (the weight) is not a compile-time constant"
    return a, b, y, np.asarray(bv)


def _zero_points(problem, ql: bool, N: int):
    """(za, zb[N]) as ints, or a reason: the A zero point must be a scalar constant."""
    iaz, ibz = (2, 5) if ql else (2, 3)
    za = 0
    if problem.has(iaz):
        v = problem.value(iaz)
        if v is None:
            return "the A zero point is not a compile-time constant"
        za = _scalar(v)
        if za is None:
            return "per-row A zero point"
    zb = np.zeros(N, np.int64)
    if problem.has(ibz):
        v = problem.value(ibz)
        if v is None:
            return "the B zero point is not a compile-time constant"
        zb = _vec(v, N)
        if zb is None:
            return "B zero point neither per-tensor nor per-column"
    return za, zb


def _scale(problem, N: int):
    """scale[N] = sa * sb[n] / sy in f64 (as the interpreter's requantize), and yz; or a reason."""
    vals = [problem.value(i) for i in (1, 4, 6, 7)]
    if any(v is None for v in vals):
        return "scales / output zero point are not compile-time constants"
    sa, sb, sy, yz = (np.asarray(v) for v in vals)
    if sa.size != 1 or sy.size != 1 or yz.size != 1:
        return "per-row A scale or non-scalar output scale / zero point"
    sbv = _vec(sb, N, np.float64)
    if sbv is None:
        return "B scale neither per-tensor nor per-column"
    scale = sa.astype(np.float64).reshape(()) * sbv / sy.astype(np.float64).reshape(())
    return np.ascontiguousarray(scale, np.float64), int(yz.reshape(()))


def analyse(problem) -> "IntGemm | str":
    """The IntGemm of problem's op, or why the variant does not apply. Stores the compile-time
    data (weight value, zero points, scales) in problem.memo for render."""
    op = problem.op.name
    ql = op.startswith("QLinear")
    conv = op in ("ConvInteger", "QLinearConv")
    ia, ib = (0, 3) if ql else (0, 1)
    got = _common(problem, ql, ia, ib)
    if isinstance(got, str):
        return got
    a, b, y, bv = got
    geo = None
    if conv:
        from ...ir.ops.conv import _ints, resolve_pads
        at = problem.op.attrs
        if len(a.shape) != 4 or len(b.shape) != 4:
            return "not a 2-D convolution"
        if int(at.group or 1) != 1:
            return "grouped convolution"
        if getattr(at, "layout", None) not in (None, "NCHW"):
            return "not NCHW"
        NB, C, H, W = (int(d) for d in a.shape)
        O, Cw, R, S = (int(d) for d in b.shape)
        if Cw != C:
            return "weight channels differ from input channels"
        st = _ints(at.strides, 2, 1)
        dl = _ints(at.dilations, 2, 1)
        pads = resolve_pads((H, W), (R, S), st, dl, at.auto_pad, at.pads)
        P, Q = int(y.shape[2]), int(y.shape[3])
        M, N, K = NB * P * Q, O, C * R * S
        geo = (NB, C, H, W, R, S, P, Q, st[0], st[1], pads[0][0], pads[1][0], dl[0], dl[1])
        if NB * C * H * W >= 2 ** 31:
            return "index limits"
        wmat = bv.reshape(O, K)
    else:
        if len(a.shape) < 2 or len(b.shape) != 2:
            return "A of rank < 2 or B not 2-D"
        K, N = (int(d) for d in b.shape)
        if int(a.shape[-1]) != K:
            return "A and B inner dims differ"
        M = int(np.prod(a.shape[:-1], dtype=np.int64))
        if K % 16:
            return f"K = {K} is not a multiple of 16 (16-byte cp.async rows of A)"
        if not aligned(a):
            return "A is a view not 16-byte aligned"
        wmat = bv.T
    if M >= 2 ** 31 or M * max(K, N) >= 2 ** 40:
        return "index limits"
    zp = _zero_points(problem, ql, N)
    if isinstance(zp, str):
        return zp
    za, zb = zp
    memo = dict(za=za, zb=zb, wmat=wmat)
    if ql:
        sc = _scale(problem, N)
        if isinstance(sc, str):
            return sc
        memo["scale"], memo["yz"] = sc
    problem.memo["intgemm_tc"] = memo
    KP = cdiv(K, 16) * 16
    return IntGemm("conv" if conv else "mm", ql, M, N, K, KP, a.dtype.short == "u8", b.dtype.short == "u8",
                   y.dtype.short, bool(np.any(zb != 0)), bool(ql and conv and problem.has(8)), geo,
                   int(memo.get("yz", 0)),
                   not conv and N % 2 == 0 and aligned(y, 8 if y.dtype.short == "i32" else 2))


def _applies(problem):
    got = analyse(problem)
    if isinstance(got, str):
        return no(got)
    problem.memo["intgemm_tc.problem"] = got
    return YES


def space(problem) -> list:
    optin = problem.target.smem_per_block_optin
    tiles = [dict(BM=bm, BN=bn, BK=bk, WARPS_M=wm, WARPS_N=wn, STAGES=st) for bm, bn, bk, wm, wn, st in TILES]
    return [p for p in tiles if smem_bytes(p) <= optin and (p["BN"] // p["WARPS_N"]) % 16 == 0
            and (p["BM"] // p["WARPS_M"]) % 16 == 0]


def default(problem, sp: list) -> dict:
    """The largest of the preferred tiles that still fills one wave of CTAs; below a wave even
    with 64x64 tiles, the tile (of at least 32x64) giving the most CTAs."""
    pr: IntGemm = problem.memo["intgemm_tc.problem"]
    sms = problem.target.sm_count
    prefs = [(128, 128, 64), (128, 64, 64), (64, 128, 64), (64, 64, 64)]
    if pr.N <= 64:
        prefs = [(128, 64, 64), (64, 64, 64)]
    by = {(p["BM"], p["BN"], p["BK"]): p for p in sp}

    def ctas(t):
        return cdiv(pr.M, t[0]) * cdiv(pr.N, t[1])
    for t in prefs:
        if t in by and ctas(t) >= sms:
            return dict(by[t])
    small = [t for t in ((64, 64, 64), (32, 64, 64), (64, 32, 64)) if t in by]
    if not small:
        return dict(sp[-1])
    return dict(by[max(small, key=lambda t: (min(ctas(t), sms), t[0] * t[1]))])


def _time_model(problem, params) -> float:
    pr: IntGemm = problem.memo["intgemm_tc.problem"]
    ctas = cdiv(pr.M, params["BM"]) * cdiv(pr.N, params["BN"])
    waves = cdiv(ctas, problem.target.sm_count)
    return waves * 2.0 * params["BM"] * params["BN"] * pr.KP / 20e12


def gemm_params(pr: IntGemm, params: dict, op_names: str) -> dict:
    """The template's render context of the GEMM kernel."""
    kw = dict(kind="gemm", op_names=op_names, M=pr.M, N=pr.N, KP=pr.KP, a_u8=pr.a_u8, b_u8=pr.b_u8,
              yctype={"i32": "int32_t", "i8": "int8_t", "u8": "uint8_t"}[pr.out], quant=pr.quant,
              ybytes=4 if pr.out == "i32" else 1, pair_store=pr.pair_store,
              has_zb=pr.has_zb, has_bias=pr.has_bias, conv=pr.kind == "conv", GROUP_M=GROUP_M,
              PQ=(pr.conv[6] * pr.conv[7]) if pr.conv else 1, **params)
    if pr.quant:
        lo, hi = _QR[pr.out]
        kw.update(LO=lo, HI=hi, YZ=pr.yz)
    return kw


def im2col_params(pr: IntGemm, za: int, op_names: str) -> dict:
    NB, C, H, W, R, S, P, Q, SH, SW, PH, PW, DH, DW = pr.conv
    return dict(kind="im2col", op_names=op_names, a_u8=pr.a_u8, NB=NB, C=C, H=H, W=W, R=R, S=S, P=P, Q=Q,
                PQ=P * Q, SH=SH, SW=SW, PH=PH, PW=PW, DH=DH, DW=DW, K=pr.K, KP=pr.KP, MTOT=pr.M,
                XZ=int(za) & 0xFF)


def constants(pr: IntGemm, memo: dict) -> dict:
    """Compile-time arrays: the [N, KP] weight, corr[N] (int32), zb[N] (int32), scale[N] (f64)."""
    w = np.asarray(memo["wmat"])
    bdt = np.uint8 if pr.b_u8 else np.int8
    wk = np.zeros((pr.N, pr.KP), bdt)
    wk[:, :pr.K] = w.astype(bdt)
    colsum = w.astype(np.int64).sum(axis=1)
    za, zb = int(memo["za"]), memo["zb"].astype(np.int64)
    corr = pr.K * za * zb - za * colsum
    out = dict(weight=wk, corr=(corr & 0xFFFFFFFF).astype(np.uint32).view(np.int32),
               zb=zb.astype(np.int32))
    if pr.quant:
        out["scale"] = memo["scale"]
    return out


def _render(ctx: LowerCtx, problem, params: dict):
    pr: IntGemm = problem.memo["intgemm_tc.problem"]
    memo = problem.memo["intgemm_tc"]
    consts = constants(pr, memo)
    y = ctx.out(0)
    ia = 0
    a = ctx.inp(ia)
    w = ctx.new_weight(consts["weight"], "w_nk")
    corr = ctx.new_weight(consts["corr"], "corr")
    name = ctx.op.name
    if pr.kind == "conv":
        col = ctx.temp("u8" if pr.a_u8 else "i8", [pr.M, pr.KP], "im2col")
        k1 = ctx.render("intgemm_tc.cu.j2", "int8_im2col", **im2col_params(pr, memo["za"], name))
        ctx.launch(k1, (cdiv(pr.M, 64), cdiv(pr.KP, 64)), 256, [a, col])
        a = col
    args = [a, w, corr]
    if pr.has_zb:
        args.append(ctx.new_weight(consts["zb"], "zb"))
    if pr.quant:
        args.append(ctx.new_weight(consts["scale"], "scale"))
    if pr.has_bias:
        args.append(ctx.inp(8))
    args.append(y)
    k = ctx.render("intgemm_tc.cu.j2", "int8_tc_gemm", **gemm_params(pr, params, name))
    ctx.launch(k, cdiv(pr.M, params["BM"]) * cdiv(pr.N, params["BN"]),
               params["WARPS_M"] * params["WARPS_N"] * 32, args, smem=smem_bytes(params))
    return True


MATMUL = register(Variant("intgemm_tc.matmul", FAMILY, ("MatMulInteger", "QLinearMatMul"), _render, _applies,
                          space, default, priority=PRIORITY, cost=_time_model))
CONV = register(Variant("intgemm_tc.conv", FAMILY, ("ConvInteger", "QLinearConv"), _render, _applies,
                        space, default, priority=PRIORITY, cost=_time_model))
