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
Storage f32 / f16 / bf16 (the IR types), math in fp32. Time fusion (R held on chip across steps,
several layers in one launch) builds on the persistent form.
"""
from __future__ import annotations

from ...ir.ops.rnn import _KIND, _num_dirs, activation_slots
from ..lower import LowerCtx, lowering

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
    acts = activations(kind, a)  # NncError names the bad activation; lowering adds the op's location
    nd = _num_dirs(a)
    layout = int(a.layout)
    S, NB = (x.shape[0], x.shape[1]) if layout == 0 else (x.shape[1], x.shape[0])
    I = x.shape[2]
    H = r.shape[2]
    gates = _KIND[kind][0]
    GH = gates * H
    lbr = bool(getattr(a, "linear_before_reset", 0)) if kind == "GRU" else False
    input_forget = bool(getattr(a, "input_forget", 0)) if lstm else False
    two_phase = kind == "GRU" and not lbr
    y = ctx.out(0)
    yh = ctx.out(1) if ctx.n_out > 1 else None
    yc = ctx.out(2) if ctx.n_out > 2 and lstm else None
    yt = y.ctype
    common = dict(kind=kind, S=S, NB=NB, ND=nd, H=H, GH=GH, I=I, layout=layout, lbr=lbr)

    # fp32 intermediates: projections, state, GRU's z and r*h, the grid barrier words
    g = ctx.temp("f32", (nd, S, NB, GH), "rnn_proj")
    hs = ctx.temp("f32", (2, nd, NB, H), "rnn_h")
    cs = ctx.temp("f32", (nd, NB, H), "rnn_c") if lstm else None
    aux = ctx.temp("f32", (2, nd, NB, H), "rnn_aux") if two_phase else None
    bar = ctx.temp("u32", (2,), "rnn_barrier")

    # (1) input projection, all steps and directions
    kp = ctx.render("rnn.cu.j2", "rnn_proj", variant="proj", xt=x.ctype, wt=w.ctype,
                    has_b=bias is not None, bt=bias.ctype if bias is not None else "", **common)
    ctx.launch(kp, (-(-nd * GH // 64), -(-S * NB // 64)), BLOCK, [x, w] + ([bias] if bias is not None else []) + [g])

    # (2) state
    ki = ctx.render("rnn.cu.j2", "rnn_init", variant="init", has_h0=h0 is not None, has_c0=c0 is not None,
                    h0t=h0.ctype if h0 is not None else "", c0t=c0.ctype if c0 is not None else "", **common)
    ctx.launch(ki, ctx.grid1d(nd * NB * H), BLOCK,
               [hs] + ([cs] if lstm else []) + [b for b in (h0, c0) if b is not None] + [bar])

    # (3) the recurrence
    BT = min(NB, 8 if kind == "RNN" else 4)
    NBT = -(-NB // BT)
    items = nd * NBT * H
    stepwise = _stepwise(ctx)
    params = dict(variant="step", coop=not stepwise, direction=a.direction, acts=acts,
                  clip=None if a.clip is None else float(a.clip), input_forget=input_forget,
                  two_phase=two_phase, BT=BT, NBT=NBT, rt=r.ctype,
                  has_b=bias is not None, bt=bias.ctype if bias is not None else "",
                  has_lens=lens is not None, lt=lens.ctype if lens is not None else "",
                  has_p=peep is not None, pt=peep.ctype if peep is not None else "",
                  has_y=True, has_yh=yh is not None, has_yc=yc is not None, yt=yt, **common)
    ks = ctx.render("rnn.cu.j2", ("coop_" if not stepwise else "") + kind.lower() + "_step", **params)
    args = [g, r]
    if kind == "GRU" and lbr and bias is not None:
        args.append(bias)
    args += [b for b in (lens, peep, hs, cs, aux) if b is not None] + [bar, y]
    args += [b for b in (yh, yc) if b is not None]
    stages = S * (2 if two_phase else 1)
    blocks = -(-items // WARPS)
    if stepwise:
        for u in range(stages):
            ctx.launch(ks, min(blocks, 65535), BLOCK, args + [ctx.i32(u), ctx.i32(u + 1)])
    else:
        ctx.launch(ks, min(blocks, COOP_MAX_GRID), BLOCK, args + [ctx.i32(0), ctx.i32(stages)])
    return True
