"""Hopper (sm_90a) lowering of the `fused {kind = "attention"}` groups: FlashAttention-3 style,
templates/flash_attention_wgmma.cu.j2 (S = Q K^T and O += P V with wgmma, Q and K/V tiles in
128B-swizzled shared memory, P as wgmma's register A operand, a producer warp group streaming K/V
through an mbarrier ring, consumer warp groups of 64 query rows).

A second declared Variant for the groups flash_attention.py takes ("flash_attention.wgmma", one
priority above it, so the heuristic prefers it wherever it applies), reading the group with the
same matcher (flash_attention._case) and binding the same operands, masks and steps
(flash_attention.bind_operands): same semantics (scale, additive masks incl. [B,1,1,T] padding,
Where / causal from indices, the 16-bit rounding of a mask Add, tails, strided operands).

applies() declines (the mma.sync kernel of flash_attention.py then runs) when:
- the target has no wgmma (anything but sm_90a);
- the group computes in f32, or D / Dv is not 64 or 128;
- Q, K or V has a non-unit dim stride, or a seq / batch stride or offset that breaks 16-byte
  alignment (the producer copies 16-byte chunks only);
- a source of Q / K / V is a compile-time constant;
- the fused op's params say "wgmma=off" (the benchmark's old-kernel rows), or, while
  ON_BY_DEFAULT is False, do not say "wgmma=<cw>x<bc>[x<stages>[x<persist>]]" (opt-in) and the
  group is not of the kind the TMA points were measured to win on (tma_win: f16, head dim 64, no
  mask or causal, T >= TMA_WIN_MIN_T, enough_work; the default is then TMA_DEFAULT_POINTS'); with
  ON_BY_DEFAULT True and no such word, when the group has fewer (query tile, head) items than SMs
  (enough_work).
Declared space: {cw, bc, stages, persist, pingpong} (consumer warp groups of 64 rows, key/value
rows per tile, ring stages, persistent CTAs: one per SM slot looping over the (query tile, head)
items instead of one per item, the warp groups issuing their wgmmas in turn) whose shared memory fits the target and whose registers fit regs_model;
plus, where Q, K and V can be described by tensor maps (tma_specs: positive 16-byte strides),
the points with "tma": 1 (persistent only): one producer thread loads Q and the K/V tiles with
the TMA engine (cp.async.bulk.tensor, 128B swizzle by the hardware, zero fill past S / T) and the
Q tile is double-buffered (the next item's Q lands while the current one runs); for groups with
no mask or causal step also FlashAttention-3's head-dim-64 tile, 3 x 64 rows x 128 keys
(TMA_MASKLESS_FITS: ptxas fits it where regs_model would not); and on a few turn-taking TMA points
"emu": 4 / 8, every 4th / 8th column block's exponentials by a cubic on the FMA pipe (EMUS,
EMU_AT). The cp.async points leave "tma"
out (their dicts, words and kernels are as before).
`default`: the point "wgmma=" names when declared, else the first declared of TMA_DEFAULT_POINTS
(measured), else DEFAULT_POINT, else the space's first.
Grid: (CTAs, 1, 1); the items' (query tile, batch1, batch0) are decoded from compile-time counts.
"""
from __future__ import annotations

from .. import tma as tmap
from ..lower import LowerCtx, describe_op
from ..plan import Scalar
from ..variants import Variant, register
from . import flash_attention as FA

PRIORITY = FA.PRIORITY + 1
# With False only groups whose params say "wgmma=<point>", or the kind of group the TMA points were
# measured to win on (tma_win), take this kernel; True: every group it applies to with enough_work
# (the cp.async DEFAULT_POINT was not faster than the mma.sync kernel on the H200).
ON_BY_DEFAULT = False
HEAD_DIMS = (64, 128)
CWS = (1, 2, 3)
BCS = (64, 128)
STAGES = (2, 3)
# the TMA ring: deeper where shared memory leaves the room (cw 2, bc 128, D 64: 6 stages = 229 KB):
# a tile's load latency (L2 / DRAM, ~1 us) spans several tiles' compute at head dim 64
TMA_STAGES = (2, 3, 4, 6)
PERSIST = (0, 1)
DEFAULT_POINT = {"cw": 2, "bc": 128, "stages": 2, "persist": 1, "pingpong": 0}
# The heuristic's TMA points, the first declared one wins (before DEFAULT_POINT). Measured on the H200
# (2026-12-03, tools/bench_attention.py --wgmma tma, B=32 S=512 H=12 D=64 fp16, no mask, CUDA-graph
# ms): cw2 bc128 s6 persist pp tma 0.0692 (372 TFLOP/s), s4 0.0715, vs torch SDPA flash 0.1016 and
# the mma.sync kernel 0.1077 (at B=1 S=128 the mma.sync kernel stays faster: 0.0038 vs 0.0046).
TMA_DEFAULT_POINTS = ({"cw": 2, "bc": 128, "stages": 6, "persist": 1, "pingpong": 1, "tma": 1},
                      {"cw": 2, "bc": 128, "stages": 4, "persist": 1, "pingpong": 1, "tma": 1})
# Where the heuristic takes the wgmma kernel without a "wgmma=" word (while ON_BY_DEFAULT is False):
# the measured win's kind of group (tma_win): 16-bit f16 scores, head dims 64, no mask or causal
# step, at least TMA_WIN_MIN_T keys and enough (query tile, head) items to fill the SMs. Short or
# masked groups, bf16 and head dim 128 keep the mma.sync kernel (not measured with TMA).
TMA_WIN_MIN_T = 512
REG_OVERHEAD = 32  # row state, loop counters, barrier addresses (with D / 2 more: regs_model)


def setmaxnreg(cw: int):
    """(producer, consumer) registers a thread after setmaxnreg, or None (one consumer warp group: 255
    at launch already). The producer keeps 40 (24 at three consumers); the consumers share the
    rest of the SM's 64K at one CTA per SM, in steps of 8."""
    if cw < 2:
        return None
    prod = 40 if cw == 2 else 24
    return prod, min(255, (65536 - 128 * prod) // (128 * cw)) // 8 * 8


def regs_budget(cw: int) -> int:
    """Registers a consumer thread may use (one CTA of 128 (cw + 1) threads per SM)."""
    m = setmaxnreg(cw)
    return m[1] if m else min(255, (65536 // (128 * (cw + 1))) // 8 * 8)


def regs_model(bc: int, D: int, Dv: int) -> int:
    """A consumer thread's registers: S (bc / 2 fp32), P packed (bc / 4), O (Dv / 2), and an
    overhead growing with D (the Q load's and the masks' addresses, the softmax's temporaries).
    Fitted to ptxas -v (nvcc 13.0, sm_90a; tests/codegen/test_flash_attention_wgmma.py): every
    declared point is spill-free with masks and causal; the excluded ones at D = 128 (bc 128 at cw 1 or 2,
    cw 3 / bc 64) spill."""
    return bc // 2 + bc // 4 + Dv // 2 + D // 2 + REG_OVERHEAD


def smem_bytes(cw: int, bc: int, stages: int, D: int, Dv: int, qbufs: int = 1) -> int:
    """1024 B of alignment slack, Q per warp group (qbufs copies: 2 on the TMA points), the K/V
    ring, 2 mbarriers a stage and 2 a Q buffer."""
    return 1024 + qbufs * cw * 64 * D * 2 + stages * bc * (D + Dv) * 2 + 16 * stages + 16 * qbufs


def point_smem(p: dict, D: int, Dv: int) -> int:
    """A declared point's shared memory (the TMA points double-buffer Q)."""
    return smem_bytes(p["cw"], p["bc"], p["stages"], D, Dv, 2 if p.get("tma") else 1)


def ctas_per_sm(cw: int, bc: int, smem: int = 0, smem_per_sm: int = 228 * 1024) -> int:
    """CTAs an SM holds (registers): one at two or three consumer warp groups; at one, two when
    its S tile is 64 wide (~110 registers a thread) and two CTAs' `smem` (+ 1 KB each, the
    system's) fit the SM's smem_per_sm (the target's), else one."""
    return 2 if cw == 1 and bc == 64 and 2 * (smem + 1024) <= smem_per_sm else 1


# TMA points regs_model would exclude but ptxas fits (nvcc 13.0, sm_90a, max register + 1 in the
# SASS, no spills): (cw, bc, D, Dv) of a group without masks or causal (scale steps only; tails and
# strided operands fine): 152-154 of cw 3's 160. FlashAttention-3's head-dim-64 tile (192 x 128).
# With a mask the same kernel spills (104-276 bytes), so masked groups keep the model's bound.
TMA_MASKLESS_FITS = {(3, 128, 64, 64)}
# the exponentials partly on the FMA pipe (template EMU: every 4th / 8th 8-column block), declared
# on the turn-taking TMA points of 128-key tiles at these (cw, stages): a knob to measure. H200
# 2026-12-03, B=32 S=512: slower than without (cw2 s4 0.0788 / 0.0742 ms at emu 4 / 8 vs 0.0715;
# cw3 s3 0.0779 / 0.0735 vs 0.0716), so no default takes it
EMUS = (4, 8)
EMU_AT = {(2, 4), (3, 3)}


def wgmma_space(D: int, Dv: int, smem_limit: int, tma: bool = False, maskless: bool = False) -> list:
    """The cp.async points, then (tma: the group's operands have tensor maps) the TMA points
    (maskless: the group has no mask or causal step, TMA_MASKLESS_FITS join)."""
    out = []
    for cw in CWS:
        for bc in BCS:
            for st in STAGES:
                if regs_model(bc, D, Dv) <= regs_budget(cw) and smem_bytes(cw, bc, st, D, Dv) <= smem_limit:
                    out += [{"cw": cw, "bc": bc, "stages": st, "persist": p, "pingpong": 0} for p in PERSIST]
                    if cw >= 2:  # the warp groups taking turns at the tensor cores (persistent CTAs only)
                        out.append({"cw": cw, "bc": bc, "stages": st, "persist": 1, "pingpong": 1})
    if tma:
        for cw in CWS:
            for bc in BCS:
                for st in TMA_STAGES:
                    for pp in ((0, 1) if cw >= 2 else (0,)):
                        p = {"cw": cw, "bc": bc, "stages": st, "persist": 1, "pingpong": pp, "tma": 1}
                        fits = regs_model(bc, D, Dv) <= regs_budget(cw) or maskless and (cw, bc, D, Dv) in TMA_MASKLESS_FITS
                        if fits and point_smem(p, D, Dv) <= smem_limit:
                            out.append(p)
                            if pp and bc == 128 and (cw, st) in EMU_AT:
                                out += [dict(p, emu=e) for e in EMUS]
    return out


def _map_strides(dims: list, strides: list, elem: int):
    """Byte strides of dims 1.. for a tensor map, or None: a dim of extent 1 takes any valid stride
    (the one below it times its extent: never read), a broadcast (stride 0) dim of extent > 1 has no
    tensor map."""
    out = []
    for i in range(1, len(dims)):
        st = int(strides[i]) * elem
        if dims[i] == 1:
            st = max(16, (out[-1] if out else dims[0] * elem) * dims[i - 1])
            st = -(-st // 16) * 16
        out.append(st)
    return out


def tma_specs(c: dict, bc: int):
    """(Q's, K's, V's) tensor map specs over (dim, seq, batch1, batch0), innermost first: boxes of
    64 columns x 64 query rows / bc key rows (a 64-column block of a head dim 128 is a second copy
    at column 64), 128B swizzle; the launch's arguments 0 / 1 / 2 hold the addresses. None when a
    size is symbolic or a map breaks cuTensorMapEncodeTiled's rules (tma.check)."""
    at, batch = c["at"], c["batch"]
    if not all(isinstance(c[k], int) for k in ("S", "T", "B0", "B1")):
        return None
    dtype = {"f16": "float16", "bf16": "bfloat16"}.get(c["dt"])
    if dtype is None:
        return None
    qsh, qst, _ = FA._logical_strides(at.q)
    ksh, kst, _ = FA._logical_strides(at.kt)
    vsh, vst, _ = FA._logical_strides(at.v)
    q4 = FA._batch2(qsh, qst, batch) + [qst[-2], qst[-1]]
    k4 = FA._batch2(ksh, kst, batch) + [kst[-1], kst[-2]]  # Kt [.., D, T] read as K (t, d)
    v4 = FA._batch2(vsh, vst, batch) + [vst[-2], vst[-1]]
    specs = []
    for n, (st4, cols, rows, box_rows) in enumerate(((q4, c["D"], c["S"], 64), (k4, c["D"], c["T"], bc),
                                                     (v4, c["Dv"], c["T"], bc))):
        if not all(isinstance(x, int) for x in st4) or st4[3] != 1:
            return None
        dims = [cols, rows, c["B1"], c["B0"]]
        strides = _map_strides(dims, [1, st4[2], st4[1], st4[0]], 2)
        if any(s <= 0 for s in strides):
            return None
        sp = tmap.TensorMapSpec(dtype, tuple(dims), tuple(strides), (64, box_rows, 1, 1), 128, n)
        if tmap.check(sp):
            return None
        specs.append(sp)
    return tuple(specs)


def requested(params: str):
    """The fused op's "wgmma=" word: "off", "on" (the default point), a point
    "<cw>x<bc>[x<stages>[x<persist>[x<pingpong>[x<tma>[x<emu>]]]]]" (missing fields from DEFAULT_POINT), or None
    when absent or malformed."""
    for word in params.split():
        if word.startswith("wgmma="):
            v = word[len("wgmma="):]
            if v in ("off", "on"):
                return v
            try:
                parts = [int(x) for x in v.split("x")]
            except ValueError:
                return None
            keys = ("cw", "bc", "stages", "persist", "pingpong")
            if not 2 <= len(parts) <= 7:
                return None
            got = {k: (parts[i] if i < len(parts) else DEFAULT_POINT[k]) for i, k in enumerate(keys)}
            # the TMA points carry "tma" (the cp.async ones leave it out), a few "emu"
            for i, k in ((5, "tma"), (6, "emu")):
                if len(parts) > i and parts[i]:
                    got[k] = parts[i]
            return got
    return None


def enough_work(c, target) -> bool:
    """The heuristic's use of this kernel without a "wgmma=" word: at least one CTA of the default
    point per SM (below that the mma.sync kernel's 16-64-row CTAs spread the work wider)."""
    items = -(-c["S"] // (64 * DEFAULT_POINT["cw"])) * c["B0"] * c["B1"]
    return items >= target.sm_count


def tma_win(c, target) -> bool:
    """The heuristic's use of the TMA default point without a "wgmma=" word (TMA_WIN_MIN_T above)."""
    if not all(isinstance(c[k], int) for k in ("S", "T", "B0", "B1")):
        return False  # runtime sizes: the mma.sync kernel's variant takes those
    maskless = not any(s.role in ("add", "where") for s in c["at"].steps)
    return (c["dt"] == "f16" and c["D"] == 64 and c["Dv"] == 64 and maskless and c["T"] >= TMA_WIN_MIN_T
            and enough_work(c, target))


def _aligned_source(L, operand, outer, elem: int) -> bool:
    """Unit dim stride, and 16-byte aligned seq / batch strides and start (into its buffer)."""
    lay = operand.layout
    src = outer.get(id(operand.source), operand.source)
    prod = getattr(src, "producer", None)
    if prod is not None and prod.name == "const":
        return False
    if lay.strides[-1] != 1:
        return False
    b = L.buffer(src)
    off = (b.alias_offset if b.alias_of is not None else 0) + lay.offset * elem
    return off % 16 == 0 and all((s * elem) % 16 == 0 for s in lay.strides[:-1])


def _kt_aligned(L, operand, outer, elem: int) -> bool:
    """Kt [.., D, T] is read as K (t, d): its dim (d) stride is Kt's stride -2."""
    lay = operand.layout
    src = outer.get(id(operand.source), operand.source)
    prod = getattr(src, "producer", None)
    if prod is not None and prod.name == "const" or lay.strides[-2] != 1:
        return False
    b = L.buffer(src)
    off = (b.alias_offset if b.alias_of is not None else 0) + lay.offset * elem
    st = list(lay.strides[:-2]) + [lay.strides[-1]]
    return off % 16 == 0 and all((s * elem) % 16 == 0 for s in st)


def _case(problem):
    got = problem.memo.get("attention_wgmma")
    if got is not None:
        return got
    target = problem.target
    if not getattr(target, "has_wgmma", False):
        return "needs wgmma (sm_90a)"
    want = requested(problem.op.attrs.params)
    if want == "off":
        return "params say wgmma=off"
    c = FA._case(problem)
    if isinstance(c, str):
        return c
    auto = want is None and not ON_BY_DEFAULT and tma_win(c, target)  # the heuristic's measured TMA win
    if want is None and not ON_BY_DEFAULT and not auto:
        return (f"opt-in: params carry no wgmma= point (and the group is not a measured TMA win: f16, head "
                f"dim 64, no mask, >= {TMA_WIN_MIN_T} keys, enough items)")
    if want is None and not enough_work(c, target):
        return "too few (query tile, head) items to fill the SMs: the mma.sync kernel's smaller CTAs win"
    if c["dt"] not in FA.MMA or c["D"] not in HEAD_DIMS or c["Dv"] not in HEAD_DIMS:
        return f"{c['dt']} head dims {c['D']}/{c['Dv']}: the wgmma kernel takes f16/bf16 at 64 or 128"
    at, outer, L = c["at"], c["outer"], problem.L
    if not (_aligned_source(L, at.q, outer, 2) and _kt_aligned(L, at.kt, outer, 2) and _aligned_source(L, at.v, outer, 2)):
        return "Q/K/V not unit-stride and 16-byte aligned (cp.async chunks)"
    maps = {bc: tma_specs(c, bc) for bc in BCS}
    maskless = not any(s.role in ("add", "where") for s in c["at"].steps)
    space = wgmma_space(c["D"], c["Dv"], target.smem_per_block_optin, tma=all(maps.values()), maskless=maskless)
    if not space:
        return "no declared tile fits"
    if auto and not any(p in space for p in TMA_DEFAULT_POINTS):
        return "opt-in: the measured TMA points are not declared here (no tensor maps)"
    got = dict(c, space=space, want=want, maps=maps)
    problem.memo["attention_wgmma"] = got
    return got


_applies, _space = FA.case_hooks(_case)


def _default(problem, space) -> dict:
    want = _case(problem)["want"]
    if isinstance(want, dict) and want in space:
        return dict(want)
    for p in TMA_DEFAULT_POINTS:
        if p in space:
            return dict(p)
    return dict(DEFAULT_POINT) if DEFAULT_POINT in space else dict(space[0])


def _cost(problem, params) -> float:
    """Waves of CTAs x one CTA's MMA work at a nominal 4 TFLOP/s per SM (not a measurement)."""
    c = _case(problem)
    rows = 64 * params["cw"]
    ctas = -(-c["S"] // rows) * c["B0"] * c["B1"]
    per_sm = ctas_per_sm(params["cw"], params["bc"], point_smem(params, c["D"], c["Dv"]), problem.target.smem_per_sm)
    waves = -(-ctas // (problem.target.sm_count * per_sm))
    return waves * 2.0 * rows * c["T"] * (c["D"] + c["Dv"]) / 4e12


def _render(ctx: LowerCtx, problem, params: dict):
    op = ctx.op
    c = _case(problem)
    S, T, D, Dv, dt, B0, B1 = (c[k] for k in ("S", "T", "D", "Dv", "dt", "B0", "B1"))
    cw, bc, stages, persist = params["cw"], params["bc"], params["stages"], params["persist"]
    use_tma = bool(params.get("tma"))
    qt = -(-S // (64 * cw))
    items = qt * B1 * B0
    per_sm = ctas_per_sm(cw, bc, point_smem(params, D, Dv), problem.target.smem_per_sm)
    ctas = min(items, problem.target.sm_count * per_sm) if persist else items
    b = FA.bind_operands(ctx, problem, pair_masks=True)
    y, o4 = b["y"], b["o4"]
    steps, post = b["steps"], b["post"]
    tparams = dict(T=y.ctype, T2=FA.PAIR[dt], mma=FA.MMA[dt], D=D, DV=Dv, CW=cw, BC=bc, STAGES=stages, MAXNREG=setmaxnreg(cw),
                   QT=qt, NB1=B1, ITEMS=items, PERSIST=bool(persist), PINGPONG=bool(params.get("pingpong")),
                   vec_o=o4[3] == 1 and FA._pair_aligned(y, o4[:3]), masks=b["masks"], steps=steps, post=post,
                   post_fma=not steps and post != 1.0, tail=T % bc != 0, TMA=use_tma,
                   EMU=int(params.get("emu", 0)))
    k = ctx.render("flash_attention_wgmma.cu.j2", "flash_attention_wgmma", **tparams)
    k.add_op(f"flash attention (wgmma) tile: {64 * cw}x{bc} rows x kv rows, {cw} consumer warp group(s), "
             f"{stages} stages" + (f", persistent: {ctas} CTAs over {items} tiles" if persist else "")
             + (", warp groups issue in turn" if params.get("pingpong") else "")
             + (", Q/K/V by TMA, Q double-buffered" if use_tma else "")
             + (f", every {params['emu']}th column block's exponentials on the FMA pipe" if params.get("emu") else ""))
    for bop in op.attrs.body.ops:  # the header names every op of the group
        if bop.name != "const":
            k.add_op(describe_op(bop))
    grid = (ctas, 1, 1)
    args = [b["qb"], b["kb"], b["vb"], y] + b["margs"] + [ctx.i32(S), ctx.i32(T)]
    args += [ctx.i64(x) for x in b["q4"] + b["k4"] + b["v4"] + o4 + b["mstr"]]
    if use_tma:  # specs' "arg": 0 / 1 / 2 = the Q / K / V buffers above (the runtime encodes their addresses)
        args += [Scalar(tmap.TMAP_CTYPE, tmap.spec_dict(sp)) for sp in c["maps"][bc]]
    ctx.launch(k, grid, (128 * (cw + 1), 1, 1), args, smem=point_smem(params, D, Dv))
    return True


FLASH_ATTENTION_WGMMA = register(Variant("flash_attention.wgmma", "flash_attention", ("fused",), _render, _applies,
                                         _space, _default, priority=PRIORITY, kinds=("attention",), regions=True,
                                         cost=_cost))
