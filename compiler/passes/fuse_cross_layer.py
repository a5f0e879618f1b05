"""Cross-layer tiling: a depthwise 3x3 conv (with its bias + activation epilogue) and the pointwise
1x1 conv that reads it (with its bias / residual / activation epilogue) become ONE `fused` op of
kind "dw_pw", lowered to one kernel that computes the pair tile by tile (codegen/kernels/
conv_cross_layer.py, templates/conv_dw_pw.cu.j2): a block computes a spatial tile of the
depthwise output for a chunk of its channels into shared memory (the 3x3 halo read from the
input), multiplies it by the pointwise weights with tensor cores, and moves on to the next
chunk; the depthwise intermediate never goes to global memory. MobileNetV2's inverted residual
(expand 1x1 -> dw 3x3 -> project 1x1 (+ residual)) has one such pair per block.

Rewrites, in the top-level region of each function,

    %d = fused(%x, %wd, ...) {kind = "conv_epilogue", body = {Conv group=C 3x3 -> [Add bias] -> [act]}}
    %y = fused(%d, %wp, ..., %res) {kind = "conv_epilogue", body = {Conv 1x1 -> [bias] [residual] [act]}}
      (either side may also be a plain Conv without an epilogue)
  ->
    %y = fused(%x, %wd, ..., %wp, ..., %res) {kind = "dw_pw", params = "tile=.. kn=.. cc=.. warps=..",
                                              body = {the ops of both, in order}}

Grouped only where it pays (`pays`: the output sizes and channel counts where the pair kernel was
measured faster than the two kernels). The body is the two groups' ops, unchanged, so the interpreter computes exactly what it did
before. `params` records the tile the heuristic picks for the default Target (sm_90 table:
`default_tile`); the lowering's variant starts from it (the selector may choose another point of
the declared space: `tile_space`), and the kernel header names the tile it was rendered with.
A group whose tile does not fit (shared memory of the Target, channels not a multiple of 8,
misaligned buffers) is lowered as the two kernels it was before ("dw_pw.split").

Must hold: run after assign-layout (only NHWC convs group: `layout = "NHWC"`, which assign-layout
gives convs at fp16/bf16; at fp32 convs stay NCHW and this pass changes nothing) and after
fuse-epilogue (the convs already carry their epilogues: the pair is read through fuse-epilogue's
own matcher). The depthwise result has exactly one user, the pointwise conv's input (a read inside
a nested region, an If or Loop body, counts as a user), and is not a function result; the depthwise epilogue has no residual. Static shapes, f16/bf16.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from nnc.ir.graph import Module, Op, users
from nnc.ir.layout import op_is_nhwc
from nnc.ir.outline import Outliner
from nnc.passes.fuse_epilogue import match_group

KIND = "dw_pw"
DTYPES = ("f16", "bf16")
ELEM_BYTES = 2
VEC = 8  # channels a thread loads at once (16 bytes): channel counts must be multiples of it


def conv_is_nhwc(conv: Op) -> bool:
    """Whether assign-layout made this Conv NHWC (ir/layout.py's op_is_nhwc: the one place this
    pass asks about the layout representation)."""
    return conv.name == "Conv" and op_is_nhwc(conv)


# ---------------------------------------------------------------- the tile space (pure: no codegen)

@dataclass(frozen=True)
class DwPwShape:
    """The pair's geometry: input [N, H, W, C] -> dw 3x3 (stride, pads) [N, P, Q, C] -> pw [N, P, Q, K]."""
    N: int
    H: int
    W: int
    C: int
    P: int
    Q: int
    K: int
    SH: int
    SW: int
    PH: int
    PW: int


TILES = ((2, 8), (4, 4), (4, 8), (8, 4), (8, 8), (4, 16), (8, 16))  # (TH, TW) output pixels
WARPS = ((1, 2), (2, 1), (2, 2), (1, 4), (4, 1), (2, 4))  # (WARPS_M, WARPS_N)
CHUNKS = (32, 64)  # dw channels a block holds in shared memory at once
MAX_ACC = 64  # fp32 accumulators a thread may hold (MT * NT8 * 4)


# Where grouping pays, from the H200 measurement of 2026-12-02 (tools/bench_dw_pw.py, fp16, one
# MobileNetV2 block with and without this pass, CUDA-event medians): the pair kernel wins at 56x56
# (c144 -> 24, stride 1: 1.02-1.04x at batch 1, 1.47x at 32; stride 2 to 28x28: 1.11x / 1.03x) and
# loses at 14x14 (c576 -> 96: 0.95x / 0.89x) and 7x7 (c960 -> 160: 0.84x / 0.78x): there the block
# loops over many channel chunks one after the other with few blocks in flight. 112x112 was not
# measured alone and stays out until it is. Whole MobileNetV2 with every pair grouped: 0.53 vs
# 0.31 ms at batch 1, 1.26 vs 1.22 ms at 32 (slower), hence this bound.
PAYS_MIN_PIXELS = 28 * 28  # output pixels per image
PAYS_MAX_PIXELS = 56 * 56
PAYS_MAX_CHANNELS = 192  # depthwise channels


def pays(s: "DwPwShape") -> bool:
    """Whether grouping this pair was measured (or is bracketed by measurements) to be faster."""
    return PAYS_MIN_PIXELS <= s.P * s.Q <= PAYS_MAX_PIXELS and s.C <= PAYS_MAX_CHANNELS


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def smem_bytes(p: dict) -> int:
    """The dw tile [M, CC] and the pw weight chunk [KN, CC], rows padded by 8 elements."""
    m = p["TH"] * p["TW"]
    return (m + p["KN"]) * (p["CC"] + 8) * ELEM_BYTES


def tile_space(s: DwPwShape, smem_limit: int) -> list[dict]:
    """Every (spatial tile, pw channels a block, dw channel chunk, warps) the kernel can render
    for this shape within `smem_limit` bytes of shared memory and MAX_ACC accumulators."""
    out = []
    for th, tw in TILES:
        m = th * tw
        for wm, wn in WARPS:
            if m % (16 * wm):
                continue
            for kn in sorted({min(cdiv(s.K, 8 * wn) * 8 * wn, x) for x in (32, 64, 96, 128, 160, 256)}):
                if kn % (8 * wn):
                    continue
                acc = (m // wm // 16) * (kn // wn // 8) * 4
                if acc > MAX_ACC:
                    continue
                for cc in CHUNKS:
                    if cc > cdiv(s.C, 16) * 16 and cc != CHUNKS[0]:
                        continue
                    p = dict(TH=th, TW=tw, KN=kn, CC=cc, WARPS_M=wm, WARPS_N=wn)
                    if smem_bytes(p) <= smem_limit:
                        out.append(p)
    return out


def cost(s: DwPwShape, p: dict, sm_count: int = 132) -> float:
    """A rough run-time model (arbitrary units) the heuristic ranks the space by: waves of blocks
    x each block's dw FMAs on CUDA cores (recomputed once per pw channel block), its tensor-core
    MMAs, and the bytes it reads (input halo, pw weights)."""
    m = p["TH"] * p["TW"]
    nt = 32 * p["WARPS_M"] * p["WARPS_N"]
    tiles = cdiv(s.P, p["TH"]) * cdiv(s.Q, p["TW"])
    blocks = s.N * tiles * cdiv(s.K, p["KN"])
    per_sm = max(1, min(2048 // nt, (228 * 1024) // max(1, smem_bytes(p)), 16))
    waves = cdiv(blocks, sm_count * per_sm)
    cpad = cdiv(s.C, p["CC"]) * p["CC"]
    dw = m * cpad * 9 / nt  # FMAs per thread
    mma = m * p["KN"] * cpad / (nt * 16.0)  # tensor cores: ~16x the FMA rate
    halo = (p["TH"] * s.SH + 2) * (p["TW"] * s.SW + 2) * s.C * ELEM_BYTES
    loads = (halo + p["KN"] * s.C * ELEM_BYTES) / (nt * 8.0)
    waste = (tiles * m) / float(s.P * s.Q)
    sync = cdiv(s.C, p["CC"]) * 40.0  # two barriers a chunk
    return waves * (dw + mma + loads + sync) * (per_sm if blocks >= sm_count * per_sm else 1) * waste ** 0.25


def default_tile(s: DwPwShape, smem_limit: int, sm_count: int = 132) -> Optional[dict]:
    """The heuristic's pick: the cheapest point of the space by `cost` (None: empty space)."""
    space = tile_space(s, smem_limit)
    return min(space, key=lambda p: cost(s, p, sm_count)) if space else None


def format_tile(p: dict) -> str:
    return f"tile={p['TH']}x{p['TW']} kn={p['KN']} cc={p['CC']} warps={p['WARPS_M']}x{p['WARPS_N']}"


def parse_tile(params: str) -> Optional[dict]:
    """The tile a dw_pw op's params records (format_tile), or None."""
    kv = dict(w.split("=", 1) for w in params.split() if "=" in w)
    try:
        th, tw = (int(x) for x in kv["tile"].split("x"))
        wm, wn = (int(x) for x in kv["warps"].split("x"))
        return dict(TH=th, TW=tw, KN=int(kv["kn"]), CC=int(kv["cc"]), WARPS_M=wm, WARPS_N=wn)
    except (KeyError, ValueError):
        return None


# ---------------------------------------------------------------- matching

@dataclass
class Part:
    """One side of the pair as it stands in the function: a Conv, or a conv_epilogue group."""
    op: Op  # the function-level op
    conv: Op  # the Conv (the group's anchor: a body op)
    chain: object  # fuse_epilogue Chain (None for a plain Conv)


def _part(op: Op, weights) -> Optional[Part]:
    if op.name == "Conv":
        return Part(op, op, None)
    if op.name != "fused" or op.attrs.kind != "conv_epilogue" or len(op.results) != 1:
        return None
    ch = match_group(op, weights)
    if ch is None or ch.anchor.name != "Conv":
        return None
    return Part(op, ch.anchor, ch)


def _ints(xs, n, default):
    return [int(x) for x in xs] if xs else [default] * n


def _conv_geom(conv: Op):
    a = conv.attrs
    x, w, y = conv.operands[0].type, conv.operands[1].type, conv.results[0].type
    if x.rank != 4 or not (x.is_static and w.is_static and y.is_static):
        return None
    if (getattr(a, "auto_pad", "NOTSET") or "NOTSET") != "NOTSET":
        return None
    return dict(x=tuple(x.shape), w=tuple(w.shape), y=tuple(y.shape), group=int(a.group or 1),
                k=[int(k) for k in a.kernel_shape] if a.kernel_shape else list(w.shape[1:3]), s=_ints(a.strides, 2, 1),
                d=_ints(a.dilations, 2, 1), p=_ints(a.pads, 4, 0), dt=y.dtype.short)


def pair_shape(dw: Op, pw: Op) -> Optional[DwPwShape]:
    """The pair's DwPwShape when dw is an NHWC depthwise 3x3 and pw an NHWC 1x1 reading it, else None."""
    if not (conv_is_nhwc(dw) and conv_is_nhwc(pw)):
        return None
    g, h = _conv_geom(dw), _conv_geom(pw)
    if g is None or h is None or g["dt"] not in DTYPES or h["dt"] != g["dt"]:
        return None
    n, H, W, C = g["x"]
    if g["group"] != C or g["w"] != (C, 3, 3, 1) or g["y"][3] != C or g["d"] != [1, 1] or \
            list(g["k"]) != [3, 3] or g["s"][0] not in (1, 2) or g["s"][1] not in (1, 2) or \
            any(p > 1 for p in g["p"]):
        return None
    _, P, Q, _ = g["y"]
    K = h["y"][3]
    if h["group"] != 1 or h["w"] != (K, 1, 1, C) or list(h["k"]) != [1, 1] or h["s"] != [1, 1] or \
            h["p"] != [0, 0, 0, 0] or h["x"] != g["y"] or h["y"][:3] != (n, P, Q):
        return None
    return DwPwShape(n, H, W, C, P, Q, K, g["s"][0], g["s"][1], g["p"][0], g["p"][1])


def _dw_ok(part: Part) -> bool:
    """No residual in the depthwise epilogue (the kernel's dw stage takes bias + activation)."""
    return part.chain is None or all(s.role in ("bias", "act") for s in part.chain.steps)


def _flat(part: Part) -> list[Op]:
    """The part's ops as function-level ops: a group's body ops reading the group's operands and
    defining its result (the Outliner then copies them into the new body)."""
    op = part.op
    if op.name == "Conv":
        return [op]
    body = op.attrs.body
    sub = {id(a): v for a, v in zip(body.args, op.operands)}
    sub.update({id(r): o for r, o in zip(body.results, op.results)})
    flat = []
    for b in body.ops:
        operands = [None if v is None else sub.get(id(v), v) for v in b.operands]
        results = [sub.get(id(r), r) for r in b.results]
        flat.append(Op(b.name, operands, results, b.attrs, b.loc))
    return flat


def _run_func(func, module: Module, smem_limit: int) -> bool:
    weights = module.weights
    # readers anywhere, nested regions included (an If / Loop body may read the depthwise result):
    # a pair groups only when its one reader is the pointwise op, at the top level
    readers = users(func)
    top = {id(op) for op in func.ops}
    returned = {id(v) for v in func.results}
    pairs = []  # (dw Part, pw Part, shape)
    taken: set[int] = set()
    for op in func.ops:
        d = _part(op, weights)
        if d is None or id(op) in taken or not _dw_ok(d):
            continue
        y = op.results[0]
        us = readers.get(id(y), [])
        if id(y) in returned or len(us) != 1 or id(us[0]) not in top or id(us[0]) in taken:
            continue
        p = _part(us[0], weights)
        if p is None or p.op is op:
            continue
        # the pw conv's input is the dw result, and nothing else in the pw group reads it
        if us[0].operands.count(y) != 1:
            continue
        if p.op.name == "Conv":
            if p.conv.operands[0] is not y or any(v is y for v in p.conv.operands[1:]):
                continue
        else:
            body = p.op.attrs.body
            arg = body.args[p.op.operands.index(y)]
            if p.conv.operands[0] is not arg:
                continue
        s = pair_shape(d.conv, p.conv)
        if s is None or not pays(s):
            continue
        pairs.append((d, p, s))
        taken.update((id(op), id(us[0])))
    if not pairs:
        return False
    # the two parts' ops back in the function, then the union outlined as one group
    flat_of = {}
    for d, p, _ in pairs:
        flat_of[id(d.op)] = _flat(d)
        flat_of[id(p.op)] = _flat(p)
    func.ops = [o for op in func.ops for o in flat_of.get(id(op), [op])]
    out = Outliner(func, module=module)
    for d, p, s in pairs:
        fd, fp = flat_of[id(d.op)], flat_of[id(p.op)]
        tile = default_tile(s, smem_limit)
        params = (format_tile(tile) + " " if tile else "") + \
            f"dw=[{d.chain.params if d.chain else ''}] pw=[{p.chain.params if p.chain else ''}]"
        if out.can_outline(fd + fp):
            out.outline(fd + fp, kind=KIND, params=params)
        else:  # (cannot happen for a single-use pair; kept as it was if it does)
            for part, f in ((d, fd), (p, fp)):
                if part.chain is not None:
                    out.outline(f, kind=part.op.attrs.kind, params=part.op.attrs.params)
    out.finish()
    return True


def run(module: Module) -> bool:
    from nnc.codegen.target import for_arch, DEFAULT_ARCH
    smem_limit = for_arch(DEFAULT_ARCH).smem_per_block_optin
    changed = False
    for f in module.functions:
        changed |= _run_func(f, module, smem_limit)
    return changed
