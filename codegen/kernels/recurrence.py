"""Recurrence family: the `recurrence` op (ir/ops/recurrence.py, made by compiler/passes/time_fusion.py).

The input projection G is an ordinary GEMM before it (its own launch, through the GEMM variants);
this lowers only the time loop. The cell (activations, clip, input_forget, linear_before_reset)
is read back from the op's body (`cell_of`: the body must be the canonical body of a cell; a
body some pass changed is refused with a clear error rather than run wrong).

Variants (family "recurrence"):
  recurrence.persistent  priority 10: rnn-kernel's persistent on-chip recurrence
                         (codegen/kernels/rnn.py emit_recurrence, contract in its RecurrenceSpec):
                         G, Y, Y_h/Y_c read and written in place through strides (layout 1 and the
                         y_layouts "sbdh"/"bsdh" cost nothing); its space (sync scheme, blocks per
                         direction, matvec tiling, and step_mma: the step's h x R^T on tensor cores,
                         mma.sync m16n8k16, for f16/bf16 with hidden % 8 == 0, the default from
                         batch rnn.MMA_MIN_BATCH) is rnn.recurrence_space.
  recurrence.fallback    priority 0, every cell: rnn.emit_recurrence_fallback, the warp-per-item
                         step kernel (R read from global every step) with the same strided G / Y /
                         state indexing (cooperative, or one launch a stage with rnn_stepwise).
                         Two-phase GRU (linear_before_reset = 0), hidden sizes not a multiple of 4,
                         shapes whose h/R slices do not fit, and rnn_stepwise go here.
  recurrence.stack       the `recurrence_stack` op (compiler/passes/layer_wavefront.py): its space has
                         the form "hoisted" (per layer: emit_recurrence, then the next layer's
                         projection GEMM) and the "wavefront" points (templates/rnn_wavefront.cu.j2:
                         one cooperative launch, layer l at step s while layer l+1 at step s-1);
                         DEFAULT_STACK_FORM picks the form (below).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np

from ...ir.ops.recurrence import cell_of, g_batch_major
from ...ir.ops.rnn import _KIND, _num_dirs
from ..lower import LowerCtx
from ..variants import Variant, no, register
from . import rnn

FLOATS = ("f32", "f16", "bf16")


def _cells(op):
    a = op.attrs
    c0 = cell_of(a.kind, a.body)
    c1 = cell_of(a.kind, a.body_backward) if a.body_backward is not None else c0
    return [c0, c1][:_num_dirs(a)]


def _dims(op, shape_of):
    a = op.attrs
    gs = shape_of(0)
    S, B = (gs[1], gs[0]) if g_batch_major(a) else (gs[0], gs[1])
    return int(S), int(B), _num_dirs(a), int(a.hidden_size)


def _strides(a, S, B, D, H, GH):
    """(g_strides, y_strides, state_strides) in elements (None: rnn's defaults, i.e. layout 0)."""
    g = (D * GH, S * D * GH, GH) if g_batch_major(a) else None
    if a.y_layout == "sbdh":
        y = (B * D * H, D * H, H)
    elif a.y_layout == "bsdh" or a.layout == 1:
        y = (D * H, S * D * H, H)
    else:
        y = None
    st = (D * H, H) if a.layout == 1 else None
    return g, y, st


def y_is_read(op, func, index: int = 0) -> bool:
    """Whether anything reads the recurrence's Y (result `index`: a graph output, an op's operand,
    a region's result): when nothing does (an encoder passing on only Y_h), the kernels do not write it."""
    y = op.results[index]
    if any(r is y for r in func.results):
        return True
    for o in func.walk():
        if any(v is y for v in o.operands) or any(r is y for _, reg in o.regions() for r in reg.results):
            return True
    return False


def spec_of(op, tensor, y_read: bool = True) -> rnn.RecurrenceSpec:
    """The RecurrenceSpec of a recurrence op; tensor(i): operand i's TensorInfo/Buffer or None."""
    a = op.attrs
    cells = _cells(op)
    S, B, D, H = _dims(op, lambda i: tensor(i).shape)
    GH = _KIND[a.kind][0] * H
    g_st, y_st, s_st = _strides(a, S, B, D, H, GH)
    lens = tensor(6)
    n = len(op.results)
    return rnn.RecurrenceSpec(
        kind=a.kind, S=S, B=B, D=D, H=H, direction=a.direction, storage=tensor(1).dtype.short,
        g_dtype=tensor(0).dtype.short, g_strides=g_st, y_strides=y_st, state_strides=s_st,
        acts=[[{"kind": k, "alpha": al, "beta": be} for k, al, be in c.acts] for c in cells],
        clip=cells[0].clip, input_forget=cells[0].input_forget,
        linear_before_reset=cells[0].linear_before_reset if a.kind == "GRU" else True,
        has_h0=tensor(4) is not None, has_c0=tensor(5) is not None, has_peep=tensor(3) is not None,
        has_rbh=tensor(2) is not None, has_lens=lens is not None,
        lens_dtype=lens.dtype.short if lens is not None else "i32",
        has_y=y_read, has_yh=n > 1, has_yc=a.kind == "LSTM" and n > 2)


def _common_checks(p):
    """A reason the op cannot lower at all (dtypes), or None."""
    op = p.op
    for i, what in ((0, "G"), (1, "R"), (2, "rbh"), (3, "P"), (4, "initial_h"), (5, "initial_c")):
        t = p.tensor(i)
        if t is not None and t.dtype.short not in FLOATS:
            return f"{what} has dtype {t.dtype}: the CUDA recurrence kernels take f32 / f16 / bf16"
    st = p.tensor(1).dtype.short
    for i, what in ((2, "rbh"), (3, "P"), (4, "initial_h"), (5, "initial_c")):
        t = p.tensor(i)
        if t is not None and t.dtype.short != st:
            return f"{what} has dtype {t.dtype}, R is {st}: one storage dtype is expected"
    if p.result(0).dtype.short != st:
        return f"Y has dtype {p.result(0).dtype}, R is {st}"
    lens = p.tensor(6)
    if lens is not None and lens.dtype.short not in ("i32", "i64"):
        return f"sequence_lens has dtype {lens.dtype}: i32 or i64 expected"
    del op
    return None


def _spec(p):
    if "rec_spec" not in p.memo:
        # NncError (a body that is no cell) -> located by the driver
        p.memo["rec_spec"] = spec_of(p.op, p.tensor, len(p.op.results) == 1 or y_is_read(p.op, p.L.module.main))
    return p.memo["rec_spec"]


# ---------------------------------------------------------------- persistent (rnn-kernel's kernel)

def _persistent_applies(p):
    why = _common_checks(p)
    if why:
        return no(why)
    if p.options.rnn_stepwise:
        return no("rnn_stepwise: one launch a step asked for")
    return rnn.recurrence_fits(_spec(p), p.target)


def _buffers(ctx: LowerCtx, spec) -> dict:
    """The recurrence's operands and results as emit_recurrence{,_fallback} take them."""
    y = ctx.out(0)  # defined even when unread (then no kernel writes it)
    return dict(g=ctx.inp(0), r=ctx.inp(1), y=y if spec.has_y else None,
                yh=ctx.out(1) if spec.has_yh else None, yc=ctx.out(2) if spec.has_yc else None,
                h0=ctx.inp(4), c0=ctx.inp(5) if ctx.attrs.kind == "LSTM" else None,
                peep=ctx.inp(3), rbh=ctx.inp(2), lens=ctx.inp(6))


def _persistent_render(ctx: LowerCtx, p, params):
    spec = _spec(p)
    rnn.emit_recurrence(ctx, spec, params, **_buffers(ctx, spec))
    return True


register(Variant("recurrence.persistent", "recurrence", ("recurrence",), _persistent_render, _persistent_applies,
                 space=lambda p: rnn.recurrence_space(_spec(p), p.target),
                 default=lambda p, space: rnn.recurrence_default(_spec(p), p.target, space),
                 priority=10, regions=True))


# ---------------------------------------------------------------- fallback (every cell)

def _fallback_applies(p):
    why = _common_checks(p)
    if why:
        return no(why)
    _spec(p)  # the body must be a known cell
    return True


def _fallback_render(ctx: LowerCtx, p, params):
    spec = _spec(p)
    rnn.emit_recurrence_fallback(ctx, spec, params, **_buffers(ctx, spec))
    return True


register(Variant("recurrence.fallback", "recurrence", ("recurrence",), _fallback_render, _fallback_applies,
                 priority=0, regions=True))


# ---------------------------------------------------------------- recurrence_stack (layer-wavefront)
#
# One variant, two forms in its space (a measured choice, tools/bench_rnn.py --stack):
#   "hoisted":   per layer, as time-fusion alone lowers it: the persistent recurrence (emit_recurrence,
#                its own default point) into a temp Y_l, then the next layer's projection GEMM
#                (the GEMM family; the rnn "proj" kernel below GEMM_PROJ_MIN_FLOPS) into an fp32 G;
#   "wavefront": ONE cooperative launch of templates/rnn_wavefront.cu.j2, L*nsb blocks, layer l at
#                step s while layer l+1 at step s-1 (S + L - 1 serial steps), tagged sync.

#   "onchip":    ONE cluster of L*cluster CTAs (templates/rnn_onchip.cu.j2 with L > 1): every layer's
#                [R_l | W_l] rows on chip, h over distributed shared memory, one cluster barrier a
#                step, S + L - 1 steps (the on-chip recurrence's layer wavefront; 16-bit storage).

STACK_FORMS = ("hoisted", "wavefront", "onchip")
# the heuristic's form: "hoisted" / "wavefront", or {cell kind: form} (kinds not named: hoisted).
# "wavefront" since the H200 round of 2026-12-03 15:30 (tools/bench_rnn.py --stack wavefront,hoisted,
# fp16 batch 1, median of 3 rounds): RNN 2x256 seq 256 wavefront 0.289 ms vs hoisted/tagged 0.522
# (cuDNN 1.028); LSTM 2x512 seq 128 0.287 vs 0.423 (cuDNN 3.481). Where no wavefront point applies
# (batch > 8, tensor-core steps, states/lengths/peepholes) the hoisted form stays.
# Only RNN and LSTM, seq-first, batch <= WAVE_DEFAULT_MAX_BATCH: the one GPU case outside that (GRU
# 3x64 fp16 batch 3, batch_first, S 17; tests/passes/test_layer_wavefront.py) was WRONG on the H200
# (15:41, max rel err 0.41) while RNN b1, LSTM b1/b2 (fp16/fp32, 2-3 layers) matched. The cause
# found since (790318c): GRU layers >= 1 had r multiply their hidden gate's input part too. The fix
# passed on the H200 at 16:03 (all 7 GPU cases: GRU 3x64 b3 batch_first, GRU 2x64, RNN b3, LSTM
# batch_first among them), but the wavefront's speed for GRU, batch 3-8 and batch-major layouts is
# unmeasured, so the heuristic keeps it to the measured cases (the tuner, tools and tests may still
# ask for a wavefront point elsewhere).
DEFAULT_STACK_FORM = {"RNN": "wavefront", "LSTM": "wavefront"}
WAVE_DEFAULT_MAX_BATCH = 2
WAVE_DEFAULT_BATCH_MAJOR = False  # whether the heuristic's wavefront takes batch-major G0 / Y layouts too
WAVE_MAX_BATCH = 8  # the wavefront kernel keeps TR x B accumulators a thread: latency-bound batches only
WAVE_MAX_THREADS = 512  # the default tiling: the fewest rows a thread (TR) with at most this many threads
# the wavefront's tagged words keep every step of every layer ({fp32 h, tag}: 8 bytes an element, zeroed
# each run): at most this many bytes (RNN 2x256 b1 seq 256: 1 MB; LSTM 2x512 b1 seq 128: 1 MB)
WAVE_MAX_WORD_BYTES = 64 << 20
# the on-chip wavefront: RNN and LSTM (GRU's hidden gate needs its input part outside r's product,
# which one fused [R | W] matvec cannot keep apart); at most 8 CTAs (the portable cluster size) in all
ONCHIP_STACK_KINDS = ("RNN", "LSTM")
ONCHIP_STACK_MAX_CTAS = 8
# the heuristic's on-chip wavefront point (from batch rnn.ONCHIP_MIN_BATCH), None: off.
# hsplit None: h as hi + lo for RNN only (as the per-layer on-chip step)
DEFAULT_STACK_ONCHIP: Optional[dict] = None


def _stack_dims(op, shape_of):
    a = op.attrs
    gs = shape_of(0)
    S, B = (gs[1], gs[0]) if g_batch_major(a) else (gs[0], gs[1])
    return int(S), int(B), int(a.layers), int(a.hidden_size)


def _stack_y_strides(a, S, B, H):
    """(t, b) strides of the last layer's Y (D = 1)."""
    if a.y_layout == "bsdh" or (a.y_layout == "" and a.layout == 1):
        return H, S * H
    return B * H, H


def _stack_g_strides(a, S, B, GH):
    return (GH, S * GH) if g_batch_major(a) else (B * GH, GH)


def _stack_states(op) -> int:
    return (len(op.results) - 1) // op.attrs.layers


def wave_row_groups(kind: str) -> int:
    """The wavefront's matvec row groups (HS rows each): one a gate; GRU one more, its hidden gate's
    input part [0 | W_n] apart from the recurrent part [R_n | 0] (linear_before_reset: the reset gate
    multiplies R_n h + rbh only, so one fused sum over [h_l | h_{l-1}] would be wrong for those rows)."""
    return _KIND[kind][0] + (1 if kind == "GRU" else 0)


def _wave_layout(storage: str, kind: str, B: int, H: int, L: int, nsb: int, tr: int) -> dict:
    esz = rnn.ESIZE[storage]
    vec = 16 // esz
    hs = H // nsb
    rows = wave_row_groups(kind) * hs
    rowsp = -(-rows // tr) * tr
    kp = 2 * H if L > 1 else H
    w_bytes = rowsp * kp * esz
    smem = w_bytes + B * kp * 4 + B * rowsp * 4
    return dict(HS=hs, ROWS=rows, ROWSP=rowsp, KP=kp, VEC=vec, W_BYTES=w_bytes, smem=smem)


def wavefront_space(kind: str, storage: str, B: int, H: int, L: int, target, S: int = 1) -> list[dict]:
    """The wavefront's points: blocks a layer (nsb: H // nsb units each, L*nsb co-resident one an
    SM) x rows a thread (tr) x k-lanes (ks); threads <= 1024."""
    vec = 16 // rnn.ESIZE[storage]
    if H % vec or H % 4 or B > WAVE_MAX_BATCH or L * S * B * H * 8 > WAVE_MAX_WORD_BYTES:
        return []
    out = []
    for nsb in range(min(H, target.sm_count // L), 0, -1):
        if H % nsb:
            continue
        for tr in (1, 2, 4):
            lay = _wave_layout(storage, kind, B, H, L, nsb, tr)
            if lay["smem"] > target.smem_per_block_optin:
                continue
            for ks in (32, 16, 8):
                threads = -(-max(lay["ROWSP"] // tr * ks, B * lay["HS"], 32) // 32) * 32
                if threads > 1024 or (tr * B + vec * tr + 40) * threads > 65536:
                    continue
                out.append(dict(form="wavefront", nsb=nsb, tr=tr, ks=ks, threads=threads))
    return out


def wavefront_default(kind: str, B: int, H: int, space: list[dict]) -> Optional[dict]:
    """The most blocks a layer that give each at least rnn.MIN_ROWS_SMALL_BATCH rows (the measured
    rule of the per-layer tagged recurrence at small batch), then ks 32 and the fewest rows a thread
    within WAVE_MAX_THREADS threads."""
    pts = [p for p in space if p.get("form") == "wavefront"]
    if not pts:
        return None
    gates = _KIND[kind][0]
    roomy = [p for p in pts if gates * (H // p["nsb"]) >= rnn.MIN_ROWS_SMALL_BATCH] or pts
    most = max(p["nsb"] for p in roomy)
    pts = [p for p in roomy if p["nsb"] == most]
    fit = [p for p in pts if p["threads"] <= WAVE_MAX_THREADS] or pts
    return dict(min(fit, key=lambda p: (-p["ks"], p["tr"], p["threads"])))


def _stack_cell(op):
    return cell_of(op.attrs.kind, op.attrs.body)


def _stack_applies(p):
    op = p.op
    for i, what in ((0, "G0"), (1, "R"), (2, "W"), (3, "Bias"), (4, "rbh")):
        t = p.tensor(i)
        if t is not None and t.dtype.short not in FLOATS:
            return no(f"{what} has dtype {t.dtype}: the CUDA recurrence kernels take f32 / f16 / bf16")
    if "stack_cell" not in p.memo:
        p.memo["stack_cell"] = _stack_cell(op)  # NncError: a body that is no cell (located by the driver)
    cell = p.memo["stack_cell"]
    if op.attrs.kind == "GRU" and not cell.linear_before_reset:
        return no("GRU with linear_before_reset = 0: the stack's kernels take the one-phase cell only")
    return True


def _stack_space(p):
    S, B, L, H = _stack_dims(p.op, lambda i: p.tensor(i).shape)
    kind, storage = p.op.attrs.kind, p.tensor(0).dtype.short
    out = [dict(form="hoisted")] + wavefront_space(kind, storage, B, H, L, p.target, S)
    if all(p.value(i) is not None for i in (1, 2, 3)):  # (the on-chip form bakes [R_l | W_l] at compile time)
        out += onchip_stack_space(kind, storage, B, H, L, p.target)
    return out


def _stack_default(p, space):
    form = DEFAULT_STACK_FORM.get(p.op.attrs.kind, "hoisted") if isinstance(DEFAULT_STACK_FORM, dict) \
        else DEFAULT_STACK_FORM
    a = p.op.attrs
    got = onchip_stack_default(a.kind, _stack_dims(p.op, lambda i: p.tensor(i).shape)[1], space)
    if got is not None:
        return got
    seq_first = a.g_layout in ("", "sb") and a.y_layout in ("", "sbdh") and a.layout == 0
    if form == "wavefront" and (seq_first or WAVE_DEFAULT_BATCH_MAJOR):
        S, B, L, H = _stack_dims(p.op, lambda i: p.tensor(i).shape)
        got = wavefront_default(a.kind, B, H, space) if B <= WAVE_DEFAULT_MAX_BATCH else None
        if got is not None:
            return got
    return dict(form="hoisted")


def _layer_spec(a, cell, S, B, H, storage, g_dtype, g_strides, y_strides, has_rbh, has_y, n_states):
    return rnn.RecurrenceSpec(
        kind=a.kind, S=S, B=B, D=1, H=H, direction=a.direction, storage=storage, g_dtype=g_dtype,
        g_strides=g_strides, y_strides=y_strides, state_strides=(H, B * H),
        acts=[[{"kind": k, "alpha": al, "beta": be} for k, al, be in cell.acts]], clip=cell.clip,
        input_forget=cell.input_forget, linear_before_reset=True, has_rbh=has_rbh, has_y=has_y,
        has_yh=n_states >= 1, has_yc=a.kind == "LSTM" and n_states >= 2)


def _stack_projection(ctx: LowerCtx, x, w_kn, bias, S, B, H, GH, storage):
    """G [S*B, GH] fp32 = x [S*B, H] . w^T + bias on the GEMM family (or the rnn proj kernel);
    returns (G, g_strides (t, b, d))."""
    from . import gemm
    from .gemm_lowering import DTYPES, emit_spec
    wbuf = ctx.new_weight(np.ascontiguousarray(w_kn), "stack_w")  # [GH, H] (trans_b)
    if storage in DTYPES:  # (as time-fusion's Gemm op would be: the GEMM family at any size)
        pr = gemm.GemmProblem(M=S * B, N=GH, K=H, dtype=DTYPES[storage], out_dtype="float32", trans_b=True,
                              has_bias=True, bias_dtype="float32", tf32=ctx.options.tf32)
        try:
            ks = gemm.render(pr, gemm.default_params(pr, ctx.target))
        except Exception:  # a tile the family cannot render: the proj kernel below
            ks = None
        if ks is not None:
            g = ctx.temp("f32", (S * B, GH), "stack_proj")
            emit_spec(ctx, ks, {"A": x, "B": wbuf, "bias": ctx.new_weight(bias.astype(np.float32), "stack_bias"),
                                "D": g})
            return g, (B * GH, GH, GH)
    g = ctx.temp("f32", (S, B, GH), "stack_proj")
    both = np.concatenate([bias, np.zeros_like(bias)]).astype(np.float32)  # (Wb, Rb = 0)
    kp = ctx.render("rnn.cu.j2", "rnn_proj", variant="proj", xt=x.ctype, wt=wbuf.ctype, has_b=True, bt="float",
                    kind="RNN", S=S, NB=B, ND=1, H=H, GH=GH, I=H, layout=0, lbr=False)
    ctx.launch(kp, (-(-GH // 64), -(-S * B // 64)), rnn.BLOCK, [x, wbuf, ctx.new_weight(both, "stack_bias"), g])
    return g, (B * GH, GH, GH)


def _stack_frame(ctx: LowerCtx, p):
    """What both forms of a stack render from: the cell (applies' memo), S, B, L, H, the gate rows
    GH, the states returned K and the storage dtype (R's)."""
    S, B, L, H = _stack_dims(p.op, ctx.shape)
    return (p.memo["stack_cell"], S, B, L, H, _KIND[p.op.attrs.kind][0] * H, _stack_states(p.op),
            ctx.inp(1).dtype.short)


def _render_hoisted(ctx: LowerCtx, p):
    op, a = p.op, p.op.attrs
    cell, S, B, L, H, GH, K, storage = _stack_frame(ctx, p)
    R, W, Bias = ctx.value(1), ctx.value(2), ctx.value(3)
    rbh = ctx.value(4) if ctx.has(4) else None
    if R is None or W is None or Bias is None or (ctx.has(4) and rbh is None):
        ctx.fail("the hoisted stack needs constant R, W, Bias (and rbh)")
    g_buf, g_dtype = ctx.inp(0), ctx.inp(0).dtype.short
    gt, gb = _stack_g_strides(a, S, B, GH)
    g_strides = (gt, gb, GH)
    y_read = y_is_read(op, p.L.module.main)
    y_out = ctx.out(0)  # defined even when unread (then no kernel writes it)
    for layer in range(L):
        last = layer == L - 1
        if last:
            yt, yb = _stack_y_strides(a, S, B, H)
            y = y_out if y_read else None
        else:
            yt, yb = B * H, H
            y = ctx.temp(storage, (S * B, H), f"stack_y{layer}")
        spec = _layer_spec(a, cell, S, B, H, storage, g_dtype, g_strides, (yt, yb, H), rbh is not None,
                           y is not None, K)
        rbuf = ctx.new_weight(R[layer:layer + 1], f"stack_r{layer}")
        rb = ctx.new_weight(rbh[layer:layer + 1], f"stack_rbh{layer}") if rbh is not None else None
        yh = ctx.out(1 + layer) if K >= 1 else None  # (defined even when unread)
        yc = ctx.out(1 + L + layer) if K >= 2 else None
        func = p.L.module.main
        spec = replace(spec, has_yh=K >= 1 and y_is_read(op, func, 1 + layer),
                       has_yc=K >= 2 and y_is_read(op, func, 1 + L + layer))
        rnn.emit_recurrence(ctx, spec, None, g=g_buf, r=rbuf, y=y, yh=yh if spec.has_yh else None,
                            yc=yc if spec.has_yc else None, rbh=rb)
        if not last:
            g_buf, g_strides = _stack_projection(ctx, y, W[layer], Bias[layer].astype(np.float64), S, B, H, GH, storage)
            g_dtype = "f32"
    return True


def wavefront_params(kind, cell, a, S, B, H, L, storage, g_dtype, g_strides, y_strides, has_rbh, has_y,
                     n_states, params) -> dict:
    """Template parameters of rnn_wavefront.cu.j2 at a point of wavefront_space."""
    lay = _wave_layout(storage, kind, B, H, L, params["nsb"], params["tr"])
    chunks = B * H // 2
    extra = dict(NGM=wave_row_groups(kind)) if kind == "GRU" else {}  # (RNN / LSTM kernels: as before 790318c)
    return dict(kind=kind, S=S, B=B, H=H, L=L, NSB=params["nsb"], HS=lay["HS"], NG=_KIND[kind][0], **extra,
                ROWSP=lay["ROWSP"], KP=lay["KP"], VEC=lay["VEC"], W_BYTES=lay["W_BYTES"], TR=params["tr"],
                KS=params["ks"], NTHR=params["threads"],
                TAG_U=max(1, min(rnn.TAG_INFLIGHT, -(-2 * chunks // params["threads"]))),
                acts=[{"kind": k, "alpha": al, "beta": be} for k, al, be in cell.acts],
                clip=None if cell.clip is None else float(cell.clip), input_forget=bool(cell.input_forget),
                has_rbh=has_rbh, rt=rnn.CT[storage], gt=rnn.CT[g_dtype], g_st=g_strides[0], g_sb=g_strides[1],
                y_st=y_strides[0], y_sb=y_strides[1], has_y=has_y, NSTATE=n_states, direction=a.direction,
                smem=lay["smem"])


def _render_wavefront(ctx: LowerCtx, p, params):
    op, a = p.op, p.op.attrs
    cell, S, B, L, H, GH, K, storage = _stack_frame(ctx, p)
    y_read = y_is_read(op, p.L.module.main)
    y_out = ctx.out(0)  # defined even when unread (then the kernel does not write it)
    tp = wavefront_params(a.kind, cell, a, S, B, H, L, storage, ctx.inp(0).dtype.short,
                          _stack_g_strides(a, S, B, GH), _stack_y_strides(a, S, B, H), ctx.has(4), y_read, K,
                          params)
    smem = tp.pop("smem")
    func = p.L.module.main
    tp["state_read"] = [[y_is_read(op, func, 1 + kk * L + layer) for layer in range(L)] for kk in range(K)]
    nhw = L * S * B * H * 2
    words = ctx.temp("u32", (32,), "stack_sync")
    hw = ctx.temp("u32", (nhw,), "stack_h_tagged")
    ki = ctx.render("rnn.cu.j2", "rnn_sync_init", variant="sync_init", NWORDS=32, NHWORDS=nhw, kind=a.kind)
    ctx.launch(ki, ctx.grid1d(nhw), 256, [words, hw])
    k = ctx.render("rnn_wavefront.cu.j2", f"coop_{a.kind.lower()}_wavefront", **tp)
    args = [ctx.inp(0), ctx.inp(1), ctx.inp(2), ctx.inp(3)] + ([ctx.inp(4)] if ctx.has(4) else []) + [hw]
    if y_read:
        args.append(y_out)
    for kk in range(K):
        args += [ctx.out(1 + kk * L + layer) for layer in range(L)]
    args.append(ctx.i32(0))
    ctx.launch(k, L * params["nsb"], params["threads"], args, smem=smem)
    return True


def _onchip_stack_spec(kind: str, storage: str, B: int, H: int) -> rnn.RecurrenceSpec:
    """The per-layer spec the on-chip geometry (rnn.onchip_layout) reads: cell, batch, H, storage."""
    return rnn.RecurrenceSpec(kind=kind, S=1, B=B, D=1, H=H, storage=storage, g_dtype=storage)


def onchip_stack_space(kind: str, storage: str, B: int, H: int, L: int, target) -> list[dict]:
    """The on-chip wavefront's points: CTAs a layer (cluster; L * cluster in one portable cluster) x
    warps x k split x h as hi + lo, where [R_l | W_l]'s rows, the h tiles and the partial sums fit
    one SM's shared memory (16-bit storage, batch <= 64: the tensor-core step's own limits)."""
    if kind not in ONCHIP_STACK_KINDS or L < 2 or -(-B // 16) > rnn.ONCHIP_MAX_MT:
        return []
    spec = _onchip_stack_spec(kind, storage, B, H)
    out = []
    for cluster in rnn.ONCHIP_CLUSTERS:
        if L * cluster > ONCHIP_STACK_MAX_CTAS:
            continue
        for warps in rnn.ONCHIP_WARPS:
            for ksplit in rnn.ONCHIP_KSPLITS:
                for hsplit in (False, True):
                    lay = rnn.onchip_layout(spec, warps, hsplit, cluster, ksplit, k_width=2 * H)
                    if lay is None or lay["smem"] > target.smem_per_block_optin or lay["regs"] > 160:
                        continue
                    out.append(dict(form="onchip", cluster=cluster, ksplit=ksplit, mma_warps=warps, hsplit=hsplit,
                                    threads=32 * warps))
    return out


def onchip_stack_default(kind: str, B: int, space: list[dict]) -> Optional[dict]:
    """The heuristic's on-chip wavefront point (DEFAULT_STACK_ONCHIP's cluster / k split / warps, h as
    hi + lo for the cells whose only state is h), or None (off, batch below ONCHIP_MIN_BATCH, no point)."""
    want = DEFAULT_STACK_ONCHIP
    pts = [p for p in space if p.get("form") == "onchip"]
    if not want or not pts or B < rnn.ONCHIP_MIN_BATCH:
        return None
    hs = (kind == "RNN") if want.get("hsplit") is None else bool(want["hsplit"])

    def miss(p):  # how far a point is from the wanted one, field by field in this order
        return (p["cluster"] != want["cluster"], p["ksplit"] != want["ksplit"], p["mma_warps"] != want["warps"],
                p["hsplit"] != hs, -p["cluster"], -p["mma_warps"])
    return dict(min(pts, key=miss))


def _render_onchip(ctx: LowerCtx, p, params):
    op, a = p.op, p.op.attrs
    cell, S, B, L, H, GH, K, storage = _stack_frame(ctx, p)
    R, W, Bias = ctx.value(1), ctx.value(2), ctx.value(3)
    if R is None or W is None or Bias is None:
        ctx.fail("the on-chip stack needs constant R, W and Bias")
    rw = np.zeros((L, GH, 2 * H), R.dtype)  # [R_l | W_l] (layer 0: [R_0 | 0]; W[l-1] feeds layer l)
    rw[:, :, :H] = R
    rw[1:, :, H:] = W
    y_read = y_is_read(op, p.L.module.main)
    gt, gb = _stack_g_strides(a, S, B, GH)
    yt, yb = _stack_y_strides(a, S, B, H)
    spec = _layer_spec(a, cell, S, B, H, storage, ctx.inp(0).dtype.short, (gt, gb, GH), (yt, yb, H), False, y_read, K)
    tp = dict(rnn.onchip_render_params(spec, params, k_width=2 * H), L=L)
    lay = rnn.onchip_layout(spec, params["mma_warps"], bool(params["hsplit"]), params["cluster"], params["ksplit"],
                            k_width=2 * H)
    k = ctx.render("rnn_onchip.cu.j2", f"rnn_onchip_{a.kind.lower()}_stack", **tp)
    args = [ctx.inp(0), ctx.new_weight(rw, "stack_rw"), ctx.new_weight(np.asarray(Bias, R.dtype), "stack_wb")]
    if y_read:
        args.append(ctx.out(0))
    for kk in range(K):  # (every layer's states: the outputs exist, read or not)
        args += [ctx.out(1 + kk * L + layer) for layer in range(L)]
    args.append(ctx.i32(0))
    ctx.launch(k, L * params["cluster"], params["threads"], args, smem=lay["smem"])
    return True


def _stack_render(ctx: LowerCtx, p, params):
    if params.get("form") == "wavefront":
        return _render_wavefront(ctx, p, params)
    if params.get("form") == "onchip":
        return _render_onchip(ctx, p, params)
    return _render_hoisted(ctx, p)


register(Variant("recurrence.stack", "recurrence", ("recurrence_stack",), _stack_render, _stack_applies,
                 space=_stack_space, default=_stack_default, priority=10, regions=True))
