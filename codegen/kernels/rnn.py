"""Recurrent family: ONNX RNN, GRU and LSTM (semantics: ir/ops/rnn.py), template rnn.cu.j2.

Per op, three kernels:
  proj  the input projection X.W^T + Wb (+ Rb) of all timesteps and directions at once into an fp32
        temp G [D][S][B][gates*H] (one GEMM-like launch);
  init  the fp32 state: h ping-pong [2][D][B][H] and c [D][B][H] from initial_h / initial_c or zeros;
  step  the recurrence (matvec h.R^T + gate math), both directions at once. By default ONE
        persistent cooperative launch runs every timestep with a grid-wide barrier between steps
        (kernel name prefix `nnc_coop_`: the runtime and host.cu.j2 launch such kernels with
        cudaLaunchCooperativeKernel, clamping the grid to what is co-resident). With the option
        `rnn_stepwise` (or NNC_RNN_STEPWISE=1) it is one ordinary launch per (step, phase) instead.
Storage f32 / f16 / bf16 (the IR types), math in fp32.

Time fusion (issue 8): the variant "rnn.persistent" (priority 10, below) replaces the step kernel by
the persistent on-chip recurrence of `emit_recurrence` (template variant "rec"): block (d, slice)
of ONE cooperative launch keeps its slice of R (all gates of HS hidden units) in shared memory for
every step; per step only h (fp32 ping-pong in global, read from L2), G[t] and y[t] move; the
sync is flag-based producer/consumer (release/acquire, one word per block) or a per-direction
counter barrier. It declares its space (sync, blocks per direction, matvec tiling, step_mma: the
step's matvec on tensor cores, mma.sync m16n8k16 over R and h in smem as f16/bf16) for the
selector. The legacy @lowering below stays the fallback (stepwise mode, two-phase GRU, shapes whose
h or R do not fit). rnn-pass's `recurrence` lowering calls `emit_recurrence` directly
(/work/notes/rnn_interface.md: the contract).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from ...ir.ops.rnn import _KIND, _num_dirs, activation_slots
from ..lower import LowerCtx, lowering
from ..dtypes import TABLE
from ..target import Target
from ..variants import YES, Fit, Variant, no, register

FLOATS = ("f32", "f16", "bf16")
BLOCK = 256
WARPS = BLOCK // 32
COOP_MAX_GRID = 1024  # the runtime clamps further to the co-resident blocks of the device


def activations(kind: str, a) -> list[list[dict]]:
    """Per direction, the op's activation slots as {kind, alpha, beta} (ir/ops/rnn.py's parsing)."""
    return [[{"kind": k, "alpha": al, "beta": be} for k, al, be in d] for d in activation_slots(kind, a)]


def _stepwise(ctx: LowerCtx) -> bool:
    return ctx.options.rnn_stepwise  # LowerOptions (default: $NNC_RNN_STEPWISE, codegen/options.py)


@lowering("RNN", "GRU", "LSTM")
def _rnn(ctx: LowerCtx):
    kind = ctx.op.name
    a = ctx.attrs
    lstm = kind == "LSTM"
    x, w, r = ctx.inp(0), ctx.inp(1), ctx.inp(2)
    bias, lens, h0 = ctx.inp(3), ctx.inp(4), ctx.inp(5)
    c0 = ctx.inp(6) if lstm else None
    peep = ctx.inp(7) if lstm else None
    for buf, what in ((x, "X"), (w, "W"), (r, "R"), (bias, "B"), (h0, "initial_h"), (c0, "initial_c"), (peep, "P")):
        if buf is not None and buf.dtype.short not in FLOATS:
            ctx.fail(f"{what} has dtype {buf.dtype}: the CUDA RNN kernels take f32 / f16 / bf16")
    if lens is not None and lens.dtype.kind not in ("int", "uint"):
        ctx.fail(f"sequence_lens has dtype {lens.dtype}, an integer type is expected")
    activations(kind, a)  # NncError names the bad activation; lowering adds the op's location
    nd = _num_dirs(a)
    layout = int(a.layout)
    S, NB = (x.shape[0], x.shape[1]) if layout == 0 else (x.shape[1], x.shape[0])
    I = x.shape[2]
    H = r.shape[2]
    gates = _KIND[kind][0]
    GH = gates * H
    lbr = bool(getattr(a, "linear_before_reset", 0)) if kind == "GRU" else False
    y = ctx.out(0)
    yh = ctx.out(1) if ctx.n_out > 1 else None
    yc = ctx.out(2) if ctx.n_out > 2 and lstm else None
    common = dict(kind=kind, S=S, NB=NB, ND=nd, H=H, GH=GH, I=I, layout=layout, lbr=lbr)

    g = ctx.temp("f32", (nd, S, NB, GH), "rnn_proj")  # fp32 projections of every step

    # (1) input projection, all steps and directions
    kp = ctx.render("rnn.cu.j2", "rnn_proj", variant="proj", xt=x.ctype, wt=w.ctype,
                    has_b=bias is not None, bt=bias.ctype if bias is not None else "", **common)
    ctx.launch(kp, (-(-nd * GH // 64), -(-S * NB // 64)), BLOCK, [x, w] + ([bias] if bias is not None else []) + [g])

    # (2)+(3) state and the recurrence: the warp-per-item step kernel, G read as the proj left it
    spec = _spec_of(ctx.op, ctx.inp)
    if spec is None:
        ctx.fail("X, W, R, B, initial_h, initial_c and P must share one float dtype")
    emit_recurrence_fallback(ctx, spec, g=g, r=r, y=y, yh=yh if spec.has_yh else None, yc=yc if spec.has_yc else None,
                             h0=h0, c0=c0, peep=peep, rbh=bias if spec.has_rbh else None, lens=lens)
    return True


# ---------------------------------------------------------------- the persistent on-chip recurrence

CT = {s: TABLE[s].ctype for s in FLOATS}  # from the one dtype table (codegen/dtypes.py)
ESIZE = {s: TABLE[s].itemsize for s in FLOATS}
# the per-step synchronisation between the blocks of a direction: "flags" (one release/acquire word
# per block), "barrier" (one release counter per direction), "tagged" (h_step carries its step number
# in the same atomic word: the consumers poll h itself, no flag, no fence; templates/rnn.cu.j2)
SYNCS = ("flags", "barrier", "tagged")
# one block a direction (the whole R slice on one SM): h never leaves its shared memory
LOCAL = "local"
SYNC_WORDS_PER_DIR = 32  # barrier counters one 128-byte line apart; flags need D*NSB words
TAG_INFLIGHT = 8  # the tagged sync's 16-byte polls a thread keeps in flight


@dataclass(frozen=True)
class RecurrenceSpec:
    """One recurrence: what emit_recurrence needs (the contract: /work/notes/rnn_interface.md).
    Strides in elements. g: element (t, b, d, n) at t*g_st + b*g_sb + d*g_sd + n (None: the plain
    GEMM output [S*B, D*gates*H]); y: (t, b, d, j) at t*y_st + b*y_sb + d*y_sd + j (None: ONNX
    layout 0 [S][D][B][H]); states (initial_h/c, Y_h, Y_c): (b, d, j) at b*st_sb + d*st_sd + j
    (None: layout 0 [D][B][H]). rbh (GRU linear_before_reset's hidden recurrent bias): d*rbh_sd +
    rbh_off + j."""
    kind: str
    S: int
    B: int
    D: int
    H: int
    direction: str = "forward"
    storage: str = "f32"
    g_dtype: str = "f32"
    g_strides: Optional[tuple] = None
    y_strides: Optional[tuple] = None
    state_strides: Optional[tuple] = None
    acts: Optional[list] = None
    clip: Optional[float] = None
    input_forget: bool = False
    linear_before_reset: bool = True
    has_h0: bool = False
    has_c0: bool = False
    has_peep: bool = False
    has_rbh: bool = False
    rbh_sd: Optional[int] = None
    rbh_off: int = 0
    has_lens: bool = False
    lens_dtype: str = "i32"
    has_y: bool = True
    has_yh: bool = False
    has_yc: bool = False

    @property
    def gates(self) -> int:
        return _KIND[self.kind][0]

    @property
    def GH(self) -> int:
        return self.gates * self.H

    def strides(self):
        B, D, H, GH = self.B, self.D, self.H, self.GH
        g = self.g_strides or (B * D * GH, D * GH, GH)
        y = self.y_strides or (D * B * H, H, B * H)
        st = self.state_strides or (H, B * H)
        return g, y, st


def _default_acts(kind: str, D: int) -> list:
    from types import SimpleNamespace
    a = SimpleNamespace(direction="bidirectional" if D == 2 else "forward", activations=[],
                        activation_alpha=[], activation_beta=[])
    return activations(kind, a)


def _vec(spec: RecurrenceSpec) -> int:
    return 16 // ESIZE[spec.storage]


def _layout(spec: RecurrenceSpec, nsb: int, tr: int, tb: int, r_smem: bool) -> dict:
    """Block geometry and shared-memory bytes for nsb blocks per direction."""
    H, vec = spec.H, _vec(spec)
    hs = -(-H // nsb)
    rows = spec.gates * hs
    rowsp = -(-rows // tr) * tr
    bp = -(-spec.B // tb) * tb
    hp = -(-H // vec) * vec
    r_bytes = rowsp * hp * ESIZE[spec.storage] if r_smem else 0
    smem = r_bytes + bp * hp * 4 + bp * rowsp * 4
    return dict(HS=hs, NSB=-(-H // hs), ROWS=rows, ROWSP=rowsp, BP=bp, HP=hp, R_BYTES=r_bytes, smem=smem)


def _tiling_cost(spec: RecurrenceSpec, lay: dict, tr: int, tb: int, ks: int) -> tuple:
    """(threads, modelled clocks of one step's matvec) for a tiling; threads 0: does not fit."""
    vec = _vec(spec)
    ntile = (lay["ROWSP"] // tr) * (lay["BP"] // tb)
    threads = -(-max(ntile * ks, spec.B * lay["HS"], 32) // 32) * 32
    regs = tr * tb + vec * (tr + tb) + 40
    if threads > 1024 or regs * threads > 65536:
        return 0, 0.0
    iters = -(-(lay["HP"] // vec) // ks)
    per_thread = iters * (tr * tb * vec + tr * (1 + vec // 2) + tb * vec // 4) + 2 * tr * tb * max(1, ks.bit_length() - 1)
    issue = threads / 32 * per_thread / 4.0         # four schedulers, one warp instruction a clock each
    latency = iters * 30.0 + per_thread             # smem latency per k-vector, partly hidden
    return threads, max(issue, latency)


# ---- the tensor-core step (space parameter step_mma): h x R^T as mma.sync m16n8k16, fp32 accumulate
MMA_STORAGE = ("f16", "bf16")
MMA_MAX_ACC = 128  # fp32 accumulators a thread holds (m-tiles x n-tiles x 4): beyond, registers spill
# the batch from which the default takes the tensor-core step: the cost model's crossover over the
# issue's shapes (point_cost, fp16: the mma step is modelled cheaper from batch 2 for GRU 800 and
# LSTM 1024, from 4 for LSTM 512, from 8 for RNN 256; tests/codegen/test_rnn_mma.py checks it)
MMA_MIN_BATCH = 8
# the tensor-core step when the batch allows it. Measured (tools/bench_rnn.py --step-mma, H200,
# 2026-12-02, fp16, ms; FMA step -> mma step, cuDNN eager): LSTM 2x512 b8 1.33 -> 0.80-0.89 (3.50),
# b16 1.62 -> 0.86-0.93 (3.38), b32 2.70 -> 1.08-1.13 (3.24); GRU 5x800 bi b16 11.2 -> 4.5-5.1 (29.4);
# fp32 (FMA) 1.17 / 1.63 / 2.69 / 15.4: fp16 now the faster at each
DEFAULT_STEP_MMA = True
DEFAULT_MMA_WARPS = None  # None: the cost model's pick of the space's 4 / 8 (tools/bench_rnn.py --step-mma mma4,mma8)


def _mma_layout(spec: RecurrenceSpec, nsb: int, threads: int) -> dict:
    """Geometry and shared-memory bytes of the tensor-core step: R slice [NP][PITCH] and h [MP][PITCH]
    in the storage dtype (rows PITCH = HK + 8 elements: 16-byte rows of one ldmatrix phase on distinct
    banks), fp32 partial sums [NW][MP][PP] of the NW warps' k-slices (PP = NP + 4: the gate threads'
    reads of consecutive batches land on distinct banks)."""
    H = spec.H
    hs = -(-H // nsb)
    rows = spec.gates * hs
    np_ = -(-rows // 8) * 8
    mp = -(-spec.B // 16) * 16
    hk = -(-H // 16) * 16
    pitch = hk + 8
    nw = threads // 32
    esz = ESIZE[spec.storage]
    r_bytes = np_ * pitch * esz
    h_bytes = mp * pitch * esz
    pp = np_ + 4
    smem = r_bytes + h_bytes + nw * mp * pp * 4
    return dict(HS=hs, NSB=-(-H // hs), ROWS=rows, NP=np_, PP=pp, MP=mp, HK=hk, PITCH=pitch, NW=nw, R_BYTES=r_bytes,
                H_BYTES=h_bytes, smem=smem)


def _mma_cost(spec: RecurrenceSpec, lay: dict) -> float:
    """Modelled clocks of the tensor-core step's matvec: each warp runs ceil(NKS / NW) k-steps of
    MT ldmatrix.x4 (h) + NT ldmatrix.x2 (R) + MT*NT mma (~8 clocks issue each on its scheduler,
    ~32 latency per dependent k-step), then the NW partials are summed by the gate threads."""
    mt, nt = lay["MP"] // 16, lay["NP"] // 8
    iters = -(-(lay["HK"] // 16) // lay["NW"])
    per_iter = max(32.0, (mt + nt) * 4.0 + mt * nt * 8.0 * max(1.0, lay["NW"] / 4))
    reduce = 30.0 + lay["NW"] * spec.gates * 2.0 + mt * nt * 8.0
    return iters * per_iter + 30.0 + reduce


# cells whose default takes the mma step: not a plain RNN, whose only state is h, so rounding h to
# 16 bits for each step's MMA compounds over the sequence (H200, 2026-12-02: RNN fp16 b17 with
# unit-scale weights, 1.05-1.4e-2 rel err against the interpreter, tolerance 1e-2); LSTM's c and
# GRU's blend keep the state in fp32. The points stay in the space for a timed selector.
MMA_CELLS = ("LSTM", "GRU")


def mma_by_default(spec: RecurrenceSpec) -> bool:
    """Whether the heuristic takes a tensor-core step point (when the space has one)."""
    return DEFAULT_STEP_MMA and spec.B >= MMA_MIN_BATCH and spec.kind in MMA_CELLS


def _mma_ok(spec: RecurrenceSpec) -> bool:
    return spec.storage in MMA_STORAGE and spec.H % 8 == 0


# the L2's aggregate rate for the h broadcast (every block of a direction reads all of h each step):
# ~7 TB/s at ~1.9 GHz. With it the model ranks the measured points (tools/bench_rnn.py, H200,
# 2026-12-02, fp16 us/step): LSTM 512 b16/b32 half the blocks a direction faster (3.17 vs 3.32,
# 3.88 vs 3.93: less broadcast, little more work a block), GRU 800 bi b16 all of them (4.06 vs
# 4.55: half would need 13 warps of gate threads and 10 n-tiles a block)
L2_BYTES_PER_CLOCK = 3700.0


def _staging_clocks(spec: RecurrenceSpec, step_mma: bool, blocks: int) -> float:
    """Modelled clocks to stage h [B][H] into one block's shared memory from L2: fp32 for the FMA
    step, the storage dtype (ldmatrix operand) for the tensor-core step; ~64 B a clock an SM after
    ~600 of latency, or the L2's aggregate rate over all `blocks` reading it, whichever is slower."""
    nbytes = spec.B * spec.H * (ESIZE[spec.storage] if step_mma else 4)
    return 600.0 + max(nbytes / 64.0, blocks * nbytes / L2_BYTES_PER_CLOCK)


def point_layout(spec: RecurrenceSpec, params: dict) -> dict:
    """The geometry of a point of recurrence_space (either step)."""
    if params["sync"] == ONCHIP:
        return onchip_layout(spec, params["mma_warps"], bool(params["hsplit"]), params.get("cluster", 1),
                             params.get("ksplit", 1))
    if params.get("step_mma"):
        return _mma_layout(spec, params["nsb"], params["threads"])
    return _layout(spec, params["nsb"], params["tr"], params["tb"], params["r_smem"])


def point_cost(spec: RecurrenceSpec, params: dict) -> float:
    """Modelled clocks of one step's h staging + matvec at a point of the space (the default's and
    MMA_MIN_BATCH's model; the selector can time the points instead)."""
    mma = bool(params.get("step_mma"))
    lay = point_layout(spec, params)
    if params["sync"] == ONCHIP:  # no staging: the matvec over all of R on one SM, hi (+ lo)
        nmma = lay["MT"] * lay["NT"] * (spec.H // 16) * (2 if params["hsplit"] else 1) // lay["KSP"]
        sync = 100.0 if lay["CL"] == 1 else 600.0  # (modelled: a cluster barrier + the DSMEM pushes)
        return sync + nmma * 4.0 / 4 + 30.0 * (spec.H // 16) / lay["KSP"] + (60.0 if lay["KSP"] > 1 else 0.0)
    if mma:
        core = _mma_cost(spec, lay)
    else:
        core = _tiling_cost(spec, lay, params["tr"], params["tb"], params["ks"])[1]
    return _staging_clocks(spec, mma, spec.D * lay["NSB"]) + core


def _mma_points(spec: RecurrenceSpec, target: Target, nsb: int, syncs=None) -> list[dict]:
    """The tensor-core step's points at nsb blocks a direction: 4 or 8 warps splitting k (more
    threads when B*HS gate threads need them), both syncs; R always in smem (fp16/bf16)."""
    if not _mma_ok(spec):
        return []
    out = []
    for warps in (8, 4):
        hs = -(-spec.H // nsb)
        threads = max(warps * 32, -(-spec.B * hs // 32) * 32)
        if threads > 1024:
            continue
        lay = _mma_layout(spec, nsb, threads)
        if lay["smem"] > target.smem_per_block_optin or (lay["MP"] // 16) * (lay["NP"] // 8) * 4 > MMA_MAX_ACC:
            continue
        for sync in syncs or SYNCS:
            out.append(dict(sync=sync, nsb=lay["NSB"], tr=None, tb=None, ks=None, threads=threads, r_smem=True,
                            kperm=False, stage_batch=False, step_mma=True, mma_warps=warps))
    return out


# ---- the on-chip recurrence (sync ONCHIP, templates/rnn_onchip.cu.j2): one block a direction holds
# the direction's whole R in smem and h never leaves it; the matvec on tensor cores split over warps
# by hidden unit, so every gate of a (batch, unit) lands in one thread's accumulators
ONCHIP = "onchip"
ONCHIP_WARPS = (16, 8, 4)
# CTAs a direction: one, or a thread-block cluster (portable sizes <= 8) that splits R by hidden unit
# and shares h over distributed shared memory, one cluster barrier a step
ONCHIP_CLUSTERS = (1, 2, 4, 8)
# k groups of warps splitting the step's matvec over K (partial sums added through smem)
ONCHIP_KSPLITS = (1, 2, 4)
ONCHIP_MAX_MT = 4  # batch <= 64: the m-tiles a thread's accumulators hold
# from this batch the heuristic takes the on-chip step where it applies (the tensor-core step's
# own crossover, MMA_MIN_BATCH; below, the latency-bound batches keep the measured tagged /
# wavefront kernels, which spread the matvec over many SMs)
ONCHIP_MIN_BATCH = 8
# On by default for the cells measured faster, at cluster 8 x k split 4, 8 warps, h 16-bit (H200, 2026-12-05
# 05:45 UTC, tools/bench_rnn.py --syncs ..., RNN 2x256 seq 256 b16 fp16, median of 3 alternating rounds, ms
# (us a step): c8k4 8 warps h 16-bit 0.803 (1.53); same, 16 warps 0.819; hi + lo: c8k4 0.995, c8k1 4 warps
# 0.990, c4k2 1.072, c2k4 1.434, single CTA 1.910 (3.69); the tagged persistent kernel 1.207 (2.31); cuDNN
# 0.816 in the same run. Every point matched the reference within 8.3e-4 (hi + lo 7.7e-4, torch fp16 8.5e-4):
# at this seq the 16-bit h operand costs no accuracy, so hi + lo is off by default). Earlier (2026-12-04
# 18:40) the single-CTA kernel alone: 1.698 vs tagged 1.179, latency-bound on one SM (the serial ldmatrix ->
# mma chain over K, the gate math of 16 positions a thread), which the cluster (1/8 of R a CTA) and the k
# split (a quarter of the chain a warp) cut. Only the cells measured (DEFAULT_ONCHIP_CELLS): LSTM / GRU
# cells small enough to fit keep the tagged kernel by default (their on-chip points stay in the space).
DEFAULT_ONCHIP = True
DEFAULT_ONCHIP_CELLS = ("RNN",)
DEFAULT_ONCHIP_WARPS = 8
# h as hi + lo 16-bit operands (twice the MMAs): None = for the cells whose only state is h (RNN: the
# rounding of each step's h feeds the next step); True / False forces it (tools/bench_rnn.py). False: the
# measurement above (no accuracy lost at RNN 2x256 seq 256, 0.803 against 0.995 ms)
DEFAULT_ONCHIP_HSPLIT = False
# the heuristic's cluster size and k split among the on-chip points (None: 1; where the shape has no such
# point, the nearest: the same cluster first, then the same k split); tools/bench_rnn.py forces them with
# --syncs onchip[1|2][cN][kM]
DEFAULT_ONCHIP_CLUSTER = 8
DEFAULT_ONCHIP_KSPLIT = 4


def onchip_layout(spec: RecurrenceSpec, warps: int, hsplit: bool, cluster: int = 1, ksplit: int = 1,
                  k_width: Optional[int] = None) -> Optional[dict]:
    """Geometry of the on-chip step with `warps` warps (ksplit k groups of warps // ksplit) in each of
    `cluster` CTAs a direction, or None where it does not apply: this CTA's rows of R [NG*H/cluster]
    [PITCH] and the full h tiles [2 (hi, lo: 4)][MP][PITCH] in the storage dtype (PITCH = KW + 8: the 8
    rows of one ldmatrix phase on distinct banks), then the k groups' partial sums in fp32. k_width
    KW: the matvec's K (H; a stack's layer wavefront: 2H, [R_l | W_l] against [h_l | h_{l-1}])."""
    H = spec.H
    kw = k_width or H
    if spec.storage not in MMA_STORAGE or H % 16 or warps % ksplit or (kw // 16) % ksplit or H % cluster:
        return None
    nwn = warps // ksplit
    uc = H // cluster
    if uc % (8 * nwn):
        return None
    u = uc // nwn
    mp = -(-spec.B // 16) * 16
    mt, nt = mp // 16, spec.gates * u // 8
    pitch = kw + 8
    esz = ESIZE[spec.storage]
    r_bytes = spec.gates * uc * pitch * esz
    smem = r_bytes + (4 if hsplit else 2) * mp * pitch * esz + (ksplit - 1) * nwn * mt * nt * 4 * 32 * 4
    pos = mt * (u // 8) * 4  # (batch, unit) positions a thread owns
    pf = pos * spec.gates <= 32  # G[t] one step ahead while registers allow
    regs = mt * nt * 4 * (2 if hsplit else 1) + pos * (2 if spec.kind == "LSTM" else 1) + pos * spec.gates * (2 if pf else 1)
    return dict(HS=H, NSB=1, U=u, MP=mp, MT=mt, NT=nt, PITCH=pitch, R_BYTES=r_bytes, smem=smem, PF=pf, regs=regs,
                CL=cluster, KSP=ksplit, NWN=nwn)


def _onchip_points(spec: RecurrenceSpec, target: Target) -> list[dict]:
    out = []
    if -(-spec.B // 16) > ONCHIP_MAX_MT:
        return out
    for cluster in ONCHIP_CLUSTERS:
        if spec.D * cluster > target.sm_count:
            continue
        for warps in ONCHIP_WARPS:
            for ksplit in ONCHIP_KSPLITS:
                for hsplit in (False, True):
                    lay = onchip_layout(spec, warps, hsplit, cluster, ksplit)
                    if lay is None or lay["smem"] > target.smem_per_block_optin or lay["regs"] > 160:
                        continue
                    out.append(dict(sync=ONCHIP, nsb=1, tr=None, tb=None, ks=None, threads=32 * warps, r_smem=True,
                                    kperm=False, stage_batch=False, step_mma=True, mma_warps=warps, hsplit=hsplit,
                                    cluster=cluster, ksplit=ksplit))
    return out


def onchip_hsplit(spec: RecurrenceSpec) -> bool:
    return spec.kind == "RNN" if DEFAULT_ONCHIP_HSPLIT is None else bool(DEFAULT_ONCHIP_HSPLIT)


def _onchip_default(spec: RecurrenceSpec, space: list, forced: bool) -> Optional[dict]:
    """The heuristic's on-chip point (DEFAULT_ONCHIP_WARPS warps, else the most), or None."""
    if not (forced or (DEFAULT_ONCHIP and spec.B >= ONCHIP_MIN_BATCH and spec.kind in DEFAULT_ONCHIP_CELLS)):
        return None
    cl, ksp = DEFAULT_ONCHIP_CLUSTER or 1, DEFAULT_ONCHIP_KSPLIT or 1
    warps, hs = DEFAULT_MMA_WARPS or DEFAULT_ONCHIP_WARPS, onchip_hsplit(spec)
    pts = [p for p in space if p["sync"] == ONCHIP]
    if not pts:
        return None

    def miss(p):  # field by field: the wanted h split, cluster, k split, warps; then the bigger cluster
        c, k = p.get("cluster", 1), p.get("ksplit", 1)
        return (p["hsplit"] != hs, c != cl, k != ksp, p["mma_warps"] != warps, abs(c - cl), abs(k - ksp), -c)
    return dict(min(pts, key=miss))


def _cell_params(spec: RecurrenceSpec) -> dict:
    """The template parameters both recurrence kernels (rnn.cu.j2 "rec", rnn_onchip.cu.j2) take from
    the spec: the cell, its dtypes, strides and optional operands."""
    g, y, st = spec.strides()
    return dict(kind=spec.kind, S=spec.S, B=spec.B, D=spec.D, H=spec.H, NG=spec.gates, direction=spec.direction,
                acts=spec.acts or _default_acts(spec.kind, spec.D), clip=None if spec.clip is None else float(spec.clip),
                input_forget=bool(spec.input_forget), rt=CT[spec.storage], gt=CT[spec.g_dtype],
                lt=TABLE[spec.lens_dtype].ctype, g_st=g[0], g_sb=g[1], g_sd=g[2], y_st=y[0], y_sb=y[1], y_sd=y[2],
                st_sb=st[0], st_sd=st[1], has_h0=spec.has_h0, has_c0=spec.has_c0 and spec.kind == "LSTM",
                has_p=spec.has_peep and spec.kind == "LSTM", has_rbh=spec.has_rbh and spec.kind == "GRU",
                rbh_sd=spec.H if spec.rbh_sd is None else spec.rbh_sd, rbh_off=spec.rbh_off, has_lens=spec.has_lens,
                has_y=spec.has_y, has_yh=spec.has_yh, has_yc=spec.has_yc and spec.kind == "LSTM")


def onchip_render_params(spec: RecurrenceSpec, params: dict, k_width: Optional[int] = None) -> dict:
    cl, ksp = params.get("cluster", 1), params.get("ksplit", 1)
    lay = onchip_layout(spec, params["mma_warps"], bool(params["hsplit"]), cl, ksp, k_width)
    if lay is None:
        raise ValueError(f"the on-chip step does not take {spec.kind} hidden {spec.H} {spec.storage} at "
                         f"{params['mma_warps']} warps, cluster {cl}, k split {ksp}")
    return dict(_cell_params(spec), sync=ONCHIP, NTHR=params["threads"], U=lay["U"], MP=lay["MP"], PITCH=lay["PITCH"],
                HSPLIT=bool(params["hsplit"]), PF=lay["PF"], CL=cl, KSP=ksp, NWN=lay["NWN"])


def _blocks_per_dir(spec: RecurrenceSpec, target: Target) -> int:
    return max(1, min(spec.H, target.sm_count // spec.D))


def recurrence_fits(spec: RecurrenceSpec, target: Target) -> Fit:
    """Whether the persistent kernel takes this recurrence (and why not)."""
    if spec.kind not in _KIND:
        return no(f"kind {spec.kind!r}")
    if spec.kind == "GRU" and not spec.linear_before_reset:
        return no("GRU with linear_before_reset=0 needs r*h of every unit before its matvec: two phases a step")
    if spec.storage not in CT or spec.g_dtype not in CT:
        return no(f"dtype {spec.storage}/{spec.g_dtype}")
    if spec.H % 4:
        return no(f"hidden size {spec.H} not a multiple of 4 (16-byte h staging)")
    if spec.S < 1 or spec.B < 1:
        return no("empty sequence or batch")
    if not recurrence_space(spec, target):
        return no(f"batch {spec.B} x hidden {spec.H}: h does not fit in shared memory beside the R slice")
    return YES


SMALL_BATCH = 4  # up to this batch the space also has a quarter of the blocks a direction
# ... and the heuristic (FMA step) takes the most blocks that give each at least this many rows of R
# (gates x hidden units). Measured (tools/bench_rnn.py, H200, 2026-12-03, b1 fp16, ms, all blocks ->
# a quarter): RNN 2x256 (2 -> 8 rows) tagged 0.733 -> 0.500, barrier 0.920 -> 0.916; LSTM 2x512
# (16 -> 64 rows) tagged 0.430 -> 0.519, barrier 0.587 -> 0.770
MIN_ROWS_SMALL_BATCH = 8


def recurrence_space(spec: RecurrenceSpec, target: Target) -> list[dict]:
    """The declared space: sync scheme (flags / barrier / tagged) x blocks per direction (the most
    that are co-resident, half, and a quarter at batch <= SMALL_BATCH) x the best-modelled matvec
    tilings; R in smem when it fits, else streamed from L2."""
    out = []
    top = _blocks_per_dir(spec, target)
    counts = {top, max(1, top // 2)}
    if spec.B <= SMALL_BATCH:  # latency-bound: a quarter of the blocks (4x the R rows each) polls less
        counts.add(max(1, top // 4))
    for nsb in sorted(counts, reverse=True):
        for r_smem in (True, False):
            if not r_smem and spec.H % _vec(spec):
                continue
            tilings = _fma_tilings(spec, target, nsb, r_smem)
            out += _fma_points(spec, tilings, r_smem, SYNCS)
            if tilings:
                break  # R in smem fits: streaming it is never better
        out += _mma_points(spec, target, nsb)
    # one block a direction when its whole R (and h, and a gate thread a batch x unit) fits: h stays
    # in that block's smem between steps, __syncthreads the only sync (sync LOCAL)
    out += _onchip_points(spec, target)
    if top > 1 and spec.B * spec.H <= 1024:
        out += _fma_points(spec, _fma_tilings(spec, target, 1, True), True, (LOCAL,))
        out += _mma_points(spec, target, 1, (LOCAL,))
    return out


def _fma_tilings(spec: RecurrenceSpec, target: Target, nsb: int, r_smem: bool) -> list:
    """(modelled cost, threads, tr, tb, ks, NSB) of the FMA step's tilings that fit, cheapest first."""
    tilings = []
    for tr in (1, 2, 4):
        for tb in (1, 2, 4, 8):
            if tb > 1 and tb > spec.B:
                continue
            lay = _layout(spec, nsb, tr, tb, r_smem)
            if lay["smem"] > target.smem_per_block_optin:
                continue
            for ks in (32, 16, 8, 4):
                threads, cost = _tiling_cost(spec, lay, tr, tb, ks)
                if threads:
                    tilings.append((cost, threads, tr, tb, ks, lay["NSB"]))
    tilings.sort()
    return tilings


def _fma_points(spec: RecurrenceSpec, tilings: list, r_smem: bool, syncs) -> list:
    """The FMA step's points: the two best-modelled tilings x syncs x kperm x stage_batch."""
    out = []
    kperms = (False, True) if r_smem and _vec(spec) == 8 and spec.H % 8 == 0 else (False,)
    for cost, threads, tr, tb, ks, nsb_real in tilings[:2]:
        for sync in syncs:
            for kperm in kperms:
                for stage_batch in (False, True) if sync in ("flags", "barrier") else (False,):
                    out.append(dict(sync=sync, nsb=nsb_real, tr=tr, tb=tb, ks=ks, threads=threads,
                                    r_smem=r_smem, kperm=kperm, stage_batch=stage_batch, step_mma=False,
                                    mma_warps=None))
    return out


def default_syncs(spec: RecurrenceSpec, step_mma: bool) -> tuple:
    """The heuristic's sync schemes in order of preference (the first the space has points of):
    DEFAULT_SYNC_SMALL_BATCH for the FMA step at batch <= SMALL_BATCH (when set), else DEFAULT_SYNC
    (the measured-faster schemes, tools/bench_rnn.py)."""
    if not step_mma and spec.B <= SMALL_BATCH and DEFAULT_SYNC_SMALL_BATCH:
        return tuple(DEFAULT_SYNC_SMALL_BATCH) + (DEFAULT_SYNC,)
    return (DEFAULT_SYNC,)


def default_sync(spec: RecurrenceSpec, step_mma: bool, space: Optional[list] = None) -> str:
    """The first of default_syncs that has points in space (None: the first)."""
    prefs = default_syncs(spec, step_mma)
    if space is not None:
        for sync in prefs:
            if any(p["sync"] == sync and bool(p.get("step_mma")) == step_mma for p in space):
                return sync
    return prefs[0]


def recurrence_default(spec: RecurrenceSpec, target: Target, space: Optional[list] = None) -> dict:
    """The heuristic: the first of the space (most blocks, R on chip, best-modelled tiling) with
    default_sync's scheme; the tensor-core step's cheapest-modelled point from MMA_MIN_BATCH."""
    space = recurrence_space(spec, target) if space is None else space
    onchip = _onchip_default(spec, space, forced=DEFAULT_SYNC == ONCHIP)
    if onchip is not None:
        return onchip
    space = [p for p in space if p["sync"] != ONCHIP] or space
    mma = mma_by_default(spec)
    if mma and any(p.get("step_mma") for p in space):
        sync = default_sync(spec, True, space)
        pts = [p for p in space if p.get("step_mma") and p["sync"] == sync
               and DEFAULT_MMA_WARPS in (None, p.get("mma_warps"))]
        if pts:  # the cheapest-modelled blocks a direction and warps (ties: the space's order)
            return dict(min(pts, key=lambda p: point_cost(spec, p)))
    space = [p for p in space if not p.get("step_mma")] or space
    sync = default_sync(spec, False, space)
    space = [p for p in space if p["sync"] == sync] or space
    if spec.B <= SMALL_BATCH:  # latency-bound: the most blocks a direction that still give each MIN_ROWS rows
        roomy = [p for p in space if spec.gates * point_layout(spec, p)["HS"] >= MIN_ROWS_SMALL_BATCH]
        if roomy:
            most = max(p["nsb"] for p in roomy)
            space = [p for p in roomy if p["nsb"] == most]
    for p in space:
        if (p["sync"] == sync and p.get("kperm", False) == DEFAULT_KPERM
                and p.get("stage_batch", False) == DEFAULT_STAGE_BATCH):
            return dict(p)
    for p in space:
        if p["sync"] == sync:
            return dict(p)
    return dict(space[0])


# measured (tools/bench_rnn.py, H200, 2026-12-02): LSTM 2x512 b1 fp32 0.68 ms barrier vs 0.89 ms flags,
# fp16 0.55 vs 0.64 (acquire polls then); the floor (RNN H=64 b1) 1.46 vs 1.33 us a step
DEFAULT_SYNC = "barrier"
# batch <= SMALL_BATCH, FMA step: the syncs to prefer (None: DEFAULT_SYNC). Measured (tools/bench_rnn.py, H200, 2026-12-03,
# b1 fp16, ms, barrier -> tagged): LSTM 2x512 0.587 -> 0.430 (cuDNN 4.88), RNN 2x256 0.920 -> 0.733
# (0.500 a quarter of the blocks; cuDNN 1.05); the floor (RNN H=64 b1) 1.50 -> 0.72 us a step; the
# same max error as barrier on both. The tensor-core step (batch >= 8) keeps DEFAULT_SYNC until measured
# local (one block a direction) measured slower (H200 08:00, RNN 2x256 b1 fp16: 1.000 ms vs tagged 0.530,
# 1.92 vs 1.00 us a step: one SM's matvec of the whole R outweighs the saved L2 round trip), so not preferred
DEFAULT_SYNC_SMALL_BATCH = ("tagged",)  # in order of preference
# the permuted k order of fp16/bf16 R in smem (conflict-free h reads): written after the last GPU
# run, compile-checked only, so off by default until measured (tools/bench_rnn.py --kperm)
DEFAULT_KPERM = False
# h staged with 8 loads a thread in flight (space parameter stage_batch): likewise written after
# the last GPU run (the suspected cost at batch 16-32: ~10 us a step against a ~3 us bound)
DEFAULT_STAGE_BATCH = False


def sync_words(spec: RecurrenceSpec, params: dict) -> int:
    return max(spec.D * params["nsb"], spec.D * SYNC_WORDS_PER_DIR)


def h_words(spec: RecurrenceSpec, params: dict) -> int:
    """32-bit words of the tagged sync's h buffer [2][D][B][H] (FMA step: {fp32 h, u32 tag} pairs;
    tensor-core step: one {16-bit h, 16-bit tag} word an element); 0 for the other syncs."""
    if params["sync"] != "tagged":
        return 0
    return 2 * spec.D * spec.B * spec.H * (1 if params.get("step_mma") else 2)


def _tag_inflight(spec: RecurrenceSpec, params: dict) -> int:
    chunks = spec.B * spec.H // (4 if params.get("step_mma") else 2)
    return max(1, min(TAG_INFLIGHT, -(-chunks // params["threads"])))


def render_params(spec: RecurrenceSpec, params: dict) -> dict:
    """Template parameters of the "rec" kernel (rnn.cu.j2) for spec and a point of its space; of the
    on-chip kernel (rnn_onchip.cu.j2) for an ONCHIP point."""
    if params["sync"] == ONCHIP:
        return onchip_render_params(spec, params)
    mma = bool(params.get("step_mma", False))
    if mma and not _mma_ok(spec):
        raise ValueError(f"step_mma needs f16/bf16 storage and hidden % 8 == 0 (got {spec.storage}, {spec.H})")
    lay = point_layout(spec, params)
    if lay["NSB"] != params["nsb"]:
        raise ValueError(f"nsb {params['nsb']} does not split hidden {spec.H} evenly into slices")
    if mma:  # the FMA step's tiling is unused: one-row tiles keep its template constants defined
        geom = dict(ROWSP=lay["NP"], BP=lay["MP"], HP=lay["PITCH"], R_BYTES=lay["R_BYTES"], R_SMEM=True, TR=1, TB=1,
                    KS=1, MP=lay["MP"], NP=lay["NP"], PP=lay["PP"], HK=lay["HK"], PITCH=lay["PITCH"], NW=lay["NW"],
                    H_BYTES=lay["H_BYTES"])
    else:
        geom = dict(ROWSP=lay["ROWSP"], BP=lay["BP"], HP=lay["HP"], R_BYTES=lay["R_BYTES"], R_SMEM=params["r_smem"],
                    TR=params["tr"], TB=params["tb"], KS=params["ks"])
    return dict(_cell_params(spec), variant="rec", sync=params["sync"], NSB=lay["NSB"], HS=lay["HS"],
                VEC=_vec(spec), NTHR=params["threads"], KPERM=bool(params.get("kperm", False)) and not mma,
                STAGE_BATCH=bool(params.get("stage_batch", False)) and not mma and params["sync"] != "tagged",
                STEP_MMA=mma, TAG_U=_tag_inflight(spec, params),
                ht="unsigned int" if params["sync"] == "tagged" else CT[spec.storage] if mma else "float", layout=0,
                lbr=spec.linear_before_reset, **geom)


def _check_buffers(ctx, spec, h0, c0, peep, rbh, lens, y, yh, yc):
    for flag, buf, what in ((spec.has_h0, h0, "initial_h"), (spec.has_c0 and spec.kind == "LSTM", c0, "initial_c"),
                            (spec.has_peep and spec.kind == "LSTM", peep, "P"), (spec.has_rbh and spec.kind == "GRU", rbh, "rbh"),
                            (spec.has_lens, lens, "sequence_lens"), (spec.has_y, y, "Y"), (spec.has_yh, yh, "Y_h"),
                            (spec.has_yc and spec.kind == "LSTM", yc, "Y_c")):
        if flag and buf is None:
            ctx.fail(f"internal error: the recurrence spec says {what} but no buffer was given")


def emit_recurrence_fallback(ctx: LowerCtx, spec: RecurrenceSpec, params: Optional[dict] = None, *, g, r, y=None,
                             yh=None, yc=None, h0=None, c0=None, peep=None, rbh=None, lens=None) -> dict:
    """Any spec (two-phase GRU, h too big for smem, H not a multiple of 4): the warp-per-item
    step kernel (template variant "step", R read from global every step) with the spec's strided
    G / Y / state indexing, as one cooperative launch with a grid barrier (or, with the option
    rnn_stepwise, one launch a stage). params: unused (no space declared)."""
    _check_buffers(ctx, spec, h0, c0, peep, rbh, lens, y, yh, yc)
    kind, D, NB, H, S, GH = spec.kind, spec.D, spec.B, spec.H, spec.S, spec.GH
    lstm = kind == "LSTM"
    gs, ys, ss = spec.strides()
    two_phase = kind == "GRU" and not spec.linear_before_reset
    common = dict(kind=kind, S=S, NB=NB, ND=D, H=H, GH=GH, I=0, layout=0, lbr=kind == "GRU" and spec.linear_before_reset,
                  st_sb=ss[0], st_sd=ss[1])
    has_h0, has_c0 = spec.has_h0, spec.has_c0 and lstm
    hs = ctx.temp("f32", (2, D, NB, H), "rnn_h")
    cs = ctx.temp("f32", (D, NB, H), "rnn_c") if lstm else None
    aux = ctx.temp("f32", (2, D, NB, H), "rnn_aux") if two_phase else None
    bar = ctx.temp("u32", (2,), "rnn_barrier")
    ki = ctx.render("rnn.cu.j2", "rnn_init", variant="init", has_h0=has_h0, has_c0=has_c0,
                    h0t=CT[spec.storage] if has_h0 else "", c0t=CT[spec.storage] if has_c0 else "", **common)
    ctx.launch(ki, ctx.grid1d(D * NB * H), BLOCK, [hs] + ([cs] if lstm else []) + [b for b in (h0 if has_h0 else None,
               c0 if has_c0 else None) if b is not None] + [bar])
    BT = min(NB, 8 if kind == "RNN" else 4)
    NBT = -(-NB // BT)
    stepwise = _stepwise(ctx)
    rt = CT[spec.storage]
    has_rbh = spec.has_rbh and kind == "GRU" and spec.linear_before_reset
    has_p = spec.has_peep and lstm
    tp = dict(variant="step", coop=not stepwise, direction=spec.direction,
              acts=spec.acts or _default_acts(kind, D), clip=None if spec.clip is None else float(spec.clip),
              input_forget=bool(spec.input_forget) and lstm, two_phase=two_phase, BT=BT, NBT=NBT, rt=rt,
              has_b=has_rbh, bt=rt, rbh_sd=spec.H if spec.rbh_sd is None else spec.rbh_sd, rbh_off=spec.rbh_off,
              has_lens=spec.has_lens, lt=TABLE[spec.lens_dtype].ctype,
              has_p=has_p, pt=rt, has_y=spec.has_y, has_yh=spec.has_yh, has_yc=spec.has_yc and lstm, yt=rt,
              gt=CT[spec.g_dtype], g_st=gs[0], g_sb=gs[1], g_sd=gs[2], y_st=ys[0], y_sb=ys[1], y_sd=ys[2], **common)
    ks = ctx.render("rnn.cu.j2", ("coop_" if not stepwise else "") + kind.lower() + "_step", **tp)
    args = [g, r] + ([rbh] if has_rbh else [])
    args += [b for b, on in ((lens, spec.has_lens), (peep, has_p), (hs, True), (cs, lstm), (aux, two_phase)) if on]
    args += [bar] + [b for b, on in ((y, spec.has_y), (yh, spec.has_yh), (yc, tp["has_yc"])) if on]
    stages = S * (2 if two_phase else 1)
    blocks = -(-(D * NBT * H) // WARPS)
    if stepwise:
        for u in range(stages):
            ctx.launch(ks, min(blocks, 65535), BLOCK, args + [ctx.i32(u), ctx.i32(u + 1)])
    else:
        ctx.launch(ks, min(blocks, COOP_MAX_GRID), BLOCK, args + [ctx.i32(0), ctx.i32(stages)])
    return {}


def emit_recurrence(ctx: LowerCtx, spec: RecurrenceSpec, params: Optional[dict] = None, *, g, r, y=None, yh=None,
                    yc=None, h0=None, c0=None, peep=None, rbh=None, lens=None) -> dict:
    """Emits the sync-word reset and the ONE cooperative launch running every step (both
    directions). Returns the params used. Buffers: see RecurrenceSpec / rnn_interface.md. A spec
    the persistent kernel does not take (recurrence_fits), or the option rnn_stepwise, goes to
    emit_recurrence_fallback (returns {})."""
    fit = recurrence_fits(spec, ctx.target)
    if not fit or _stepwise(ctx):
        return emit_recurrence_fallback(ctx, spec, g=g, r=r, y=y, yh=yh, yc=yc, h0=h0, c0=c0, peep=peep, rbh=rbh,
                                        lens=lens)
    params = dict(params) if params else recurrence_default(spec, ctx.target)
    _check_buffers(ctx, spec, h0, c0, peep, rbh, lens, y, yh, yc)
    tp = render_params(spec, params)
    if params["sync"] == ONCHIP:  # one ordinary launch of D clusters of CL blocks: no sync words, no h in global
        k = ctx.render("rnn_onchip.cu.j2", f"rnn_onchip_{spec.kind.lower()}", **tp)
        args = [g, r] + [b for b, on in ((rbh, tp["has_rbh"]), (lens, tp["has_lens"]), (peep, tp["has_p"]),
                                         (h0, tp["has_h0"]), (c0, tp["has_c0"]), (y, tp["has_y"]), (yh, tp["has_yh"]),
                                         (yc, tp["has_yc"])) if on]
        ctx.launch(k, spec.D * tp["CL"], params["threads"], args + [ctx.i32(0)], smem=point_layout(spec, params)["smem"])
        return params
    lay = point_layout(spec, params)
    nwords, nhw = sync_words(spec, params), h_words(spec, params)
    words = ctx.temp("u32", (nwords,), "rnn_sync")
    # h between steps: fp32, or the storage dtype the tensor-core step's ldmatrix reads (half the bytes);
    # the tagged sync's words (h and its step number together), zeroed with the sync words
    if nhw:
        hbuf = ctx.temp("u32", (nhw,), "rnn_h_tagged")
    else:
        hbuf = ctx.temp(spec.storage if tp["STEP_MMA"] else "f32", (2, spec.D, spec.B, spec.H), "rnn_h")
    ki = ctx.render("rnn.cu.j2", "rnn_sync_init", variant="sync_init", NWORDS=nwords, NHWORDS=nhw, kind=spec.kind)
    ctx.launch(ki, ctx.grid1d(max(nwords, nhw)), 256, [words] + ([hbuf] if nhw else []))
    k = ctx.render("rnn.cu.j2", f"coop_{spec.kind.lower()}_step", **tp)
    args = [g, r]
    args += [b for b, on in ((rbh, tp["has_rbh"]), (lens, tp["has_lens"]), (peep, tp["has_p"]), (h0, tp["has_h0"]),
                             (c0, tp["has_c0"])) if on]
    args += [hbuf, words]
    args += [b for b, on in ((y, tp["has_y"]), (yh, tp["has_yh"]), (yc, tp["has_yc"])) if on]
    args.append(ctx.i32(0))
    ctx.launch(k, spec.D * lay["NSB"], params["threads"], args, smem=lay["smem"])
    return params


# ---------------------------------------------------------------- the variant (ONNX RNN / GRU / LSTM)

def _spec_of(op, tensor, target_dtype_ok=True) -> Optional[RecurrenceSpec]:
    """The RecurrenceSpec of an ONNX RNN/GRU/LSTM op as the legacy proj kernel leaves G:
    fp32 [D][S][B][GH]. tensor(i): the operand's Buffer/TensorInfo or None."""
    kind, a = op.name, op.attrs
    lstm = kind == "LSTM"
    x, r = tensor(0), tensor(2)
    nd = _num_dirs(a)
    layout = int(a.layout)
    S, NB = (x.shape[0], x.shape[1]) if layout == 0 else (x.shape[1], x.shape[0])
    H = r.shape[2]
    GH = _KIND[kind][0] * H
    bias, lens, h0 = tensor(3), tensor(4), tensor(5)
    c0 = tensor(6) if lstm else None
    peep = tensor(7) if lstm else None
    lbr = bool(getattr(a, "linear_before_reset", 0)) if kind == "GRU" else True
    st = r.dtype.short
    for t in (x, tensor(1), bias, h0, c0, peep):
        if t is not None and t.dtype.short != st:
            return None
    if lens is not None and lens.dtype.kind not in ("int", "uint"):
        return None
    nres = len(op.results)
    y_strides = (nd * NB * H, H, NB * H) if layout == 0 else (nd * H, S * nd * H, H)
    st_strides = (H, NB * H) if layout == 0 else (nd * H, H)
    return RecurrenceSpec(
        kind=kind, S=S, B=NB, D=nd, H=H, direction=a.direction, storage=st, g_dtype="f32",
        g_strides=(NB * GH, GH, S * NB * GH), y_strides=y_strides, state_strides=st_strides,
        acts=activations(kind, a), clip=None if a.clip is None else float(a.clip),
        input_forget=bool(getattr(a, "input_forget", 0)) if lstm else False, linear_before_reset=lbr,
        has_h0=h0 is not None, has_c0=c0 is not None, has_peep=peep is not None,
        has_rbh=kind == "GRU" and bias is not None, rbh_sd=2 * GH, rbh_off=GH + 2 * H,
        has_lens=lens is not None, lens_dtype=lens.dtype.short if lens is not None else "i32",
        has_y=True, has_yh=nres > 1, has_yc=lstm and nres > 2)


def _applies(p):
    if p.options.rnn_stepwise:
        return no("rnn_stepwise: one launch a step asked for")
    try:
        spec = _spec_of(p.op, p.tensor)
    except Exception as e:  # malformed op: the legacy lowering reports it with its location
        return no(f"not a well-formed recurrent op ({e})")
    if spec is None:
        return no("mixed operand dtypes")
    fit = recurrence_fits(spec, p.target)
    if fit:
        p.memo["rnn_spec"] = spec
    return fit


def _space(p) -> list:
    return recurrence_space(p.memo["rnn_spec"], p.target)


def _default(p, space) -> dict:
    return recurrence_default(p.memo["rnn_spec"], p.target, space)


# The projection of all steps on the GEMM family (tensor cores at fp16/bf16, the 8x8 FFMA kernel
# at fp32) once it is this big (flops); below, the family's own 64x64 proj kernel.
GEMM_PROJ_MIN_FLOPS = 1 << 26


def _gemm_projection(ctx: LowerCtx, spec: RecurrenceSpec):
    """G = X.W^T + (Wb + Rb, folded at compile time) as one GEMM [S*B, I] x [I, D*GH] into fp32, the
    rows in X's order. Returns (G, g_strides), or None (nothing emitted) when it does not apply."""
    from . import gemm
    from .gemm_lowering import DTYPES, emit_spec
    a = ctx.attrs
    x, w, bias = ctx.inp(0), ctx.inp(1), ctx.inp(3)
    S, NB, D, H, GH, I = spec.S, spec.B, spec.D, spec.H, spec.GH, x.shape[2]
    if 2.0 * S * NB * D * GH * I < GEMM_PROJ_MIN_FLOPS or spec.storage not in DTYPES:
        return None
    bv = ctx.value(3) if bias is not None else None
    if bias is not None and bv is None:
        return None  # a runtime bias cannot be folded: the proj kernel adds it
    pr = gemm.GemmProblem(M=S * NB, N=D * GH, K=I, dtype=DTYPES[spec.storage], out_dtype="float32", trans_b=True,
                          has_bias=bias is not None, bias_dtype="float32", tf32=ctx.options.tf32)
    try:
        ks = gemm.render(pr, gemm.default_params(pr, ctx.target))
    except Exception:  # a tile the family cannot render for this problem: the proj kernel does it
        return None
    bufs = {"A": x, "B": w}
    if bias is not None:
        b = np.asarray(bv, np.float32).reshape(D, 2, GH)
        fold = b[:, 0].copy()
        if spec.kind == "GRU" and spec.linear_before_reset:
            fold[:, :2 * H] += b[:, 1, :2 * H]  # the hidden gate's Rb stays inside r * (.)
        else:
            fold += b[:, 1]
        bufs["bias"] = ctx.new_weight(fold.reshape(D * GH), "proj_bias")
    g = ctx.temp("f32", (S * NB, D * GH), "rnn_proj")
    bufs["D"] = g
    emit_spec(ctx, ks, bufs)
    strides = (NB * D * GH, D * GH, GH) if int(a.layout) == 0 else (D * GH, S * D * GH, GH)
    return g, strides


def _render(ctx: LowerCtx, p, params: dict):
    spec = _spec_of(ctx.op, ctx.inp)
    a = ctx.attrs
    kind = ctx.op.name
    x, w, bias = ctx.inp(0), ctx.inp(1), ctx.inp(3)
    S, NB, D, H, GH = spec.S, spec.B, spec.D, spec.H, spec.GH
    lstm = kind == "LSTM"
    got = _gemm_projection(ctx, spec)
    if got is not None:
        g, gs = got
        emit_recurrence(ctx, replace(spec, g_strides=gs), params, g=g, r=ctx.inp(2), y=ctx.out(0),
                        yh=ctx.out(1) if spec.has_yh else None, yc=ctx.out(2) if spec.has_yc else None,
                        h0=ctx.inp(5), c0=ctx.inp(6) if lstm else None, peep=ctx.inp(7) if lstm else None,
                        rbh=bias if spec.has_rbh else None, lens=ctx.inp(4))
        return True
    g = ctx.temp("f32", (D, S, NB, GH), "rnn_proj")
    common = dict(kind=kind, S=S, NB=NB, ND=D, H=H, GH=GH, I=x.shape[2], layout=int(a.layout),
                  lbr=spec.linear_before_reset if kind == "GRU" else False)
    kp = ctx.render("rnn.cu.j2", "rnn_proj", variant="proj", xt=x.ctype, wt=w.ctype,
                    has_b=bias is not None, bt=bias.ctype if bias is not None else "", **common)
    ctx.launch(kp, (-(-D * GH // 64), -(-S * NB // 64)), BLOCK, [x, w] + ([bias] if bias is not None else []) + [g])
    emit_recurrence(ctx, spec, params, g=g, r=ctx.inp(2), y=ctx.out(0),
                    yh=ctx.out(1) if spec.has_yh else None, yc=ctx.out(2) if spec.has_yc else None,
                    h0=ctx.inp(5), c0=ctx.inp(6) if lstm else None, peep=ctx.inp(7) if lstm else None,
                    rbh=bias if spec.has_rbh else None, lens=ctx.inp(4))
    return True


PERSISTENT = register(Variant("rnn.persistent", "rnn", ("RNN", "GRU", "LSTM"), _render, _applies, _space, _default,
                              priority=10))
