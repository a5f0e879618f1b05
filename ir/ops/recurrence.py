"""`recurrence`: the time loop of an LSTM / GRU / RNN after time fusion (compiler/passes/time_fusion.py).

    %y, %yh, %yc = recurrence(%G, %R, none, %P, %h0, %c0, %lens) {kind = "LSTM", direction = "forward",
        hidden_size = 512, body = region(%g: f32[B,4H], %h: f32[B,H], %c: f32[B,H], %r: f32[4H,H],
        %p: f32[3H]) { ... per-step gate math ... return %h_next, %c_next }}

Operands (fixed positions, `none` where absent):
  0 G              the input projection of every step and direction, biases folded in:
                   [S, B, D*gates*H] (layout 0) or [B, S, D*gates*H] (layout 1), or as g_layout
                   says ("sb" / "bs": a batch_first model's input, no transpose); the columns of
                   direction d are [d*gates*H, (d+1)*gates*H), gates in ONNX order (LSTM i o f c,
                   GRU z r h, RNN one). Storage dtype f32/f16/bf16/f64.
  1 R              recurrent weights, ONNX layout [D, gates*H, H].
  2 rbh            GRU with linear_before_reset only: the hidden gate's recurrent bias [D, H]
                   (it sits inside r * (h Rh^T + Rbh), so it cannot be folded into G).
  3 P              LSTM peepholes [D, 3H] (i, o, f).
  4 initial_h      [D, B, H] (layout 0) / [B, D, H] (layout 1); absent: zeros.
  5 initial_c      LSTM only, like initial_h.
  6 sequence_lens  [B] integers; absent: every sequence has S steps.
Results: Y, then Y_h (and Y_c for LSTM) as many as the op has. Y is [S, D, B, H] (layout 0) or
[B, S, D, H] (layout 1) with y_layout = ""; y_layout "sbdh" writes it as [S, B, D*H] and "bsdh" as
[B, S, D*H] directly (what the exporters' Transpose/Reshape between stacked layers make of it).
Y_h / Y_c: [D, B, H] (layout 0) or [B, D, H] (layout 1).

The body (`body`, and `body_backward` for the second direction of a bidirectional op when its
activations differ) is ONE step of ONE direction. It is closed (reads only its arguments and its own
consts) and takes, in order:
  g [B, gates*H] (G's dtype), h [B, H] and, for LSTM, c [B, H] (the state dtype: f32, f64 for f64
  storage: the state is never rounded to the storage dtype between steps), R_d [gates*H, H],
  rbh_d [H] if operand 2 is given, p_d [3H] if operand 3 is given;
and returns the new h (and c) in the state dtype. The op itself does what is not per-step math:
the time order of each direction (forward: t = 0..S-1; reverse and the second direction of
bidirectional: t = S-1..0), sequence_lens (steps at or past a batch entry's length keep its state
and write zeros to Y), the initial states, and the output layouts.

`cell_body` builds the canonical body of a cell and `cell_of` recognises one (the CUDA lowering
reads the cell from the body that way), so the body is the one place the gate math is written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import NncError
from ..graph import NameGen, Region, Value
from ..registry import register
from ..types import TensorType, dtype
from .rnn import _KIND, _num_dirs

Y_LAYOUTS = ("", "sbdh", "bsdh")

# activation key (ir/ops/rnn.py's parsing) -> the one IR op that computes it, and its attributes
# from (alpha, beta). affine and scaledtanh are not one op: time-fusion leaves such cells alone.
ACT_OPS = {
    "sigmoid": ("Sigmoid", lambda al, be: {}),
    "tanh": ("Tanh", lambda al, be: {}),
    "relu": ("Relu", lambda al, be: {}),
    "leakyrelu": ("LeakyRelu", lambda al, be: {"alpha": al}),
    "thresholdedrelu": ("ThresholdedRelu", lambda al, be: {"alpha": al}),
    "hardsigmoid": ("HardSigmoid", lambda al, be: {"alpha": al, "beta": be}),
    "elu": ("Elu", lambda al, be: {"alpha": al}),
    "softsign": ("Softsign", lambda al, be: {}),
    "softplus": ("Softplus", lambda al, be: {}),
}
_OP_ACT = {op: key for key, (op, _) in ACT_OPS.items()}


@dataclass(frozen=True)
class RecurrenceAttrs:
    body: Region
    kind: str  # no defaults: dumps and launch records always show the cell kind and size
    hidden_size: int
    direction: str = "forward"
    layout: int = 0
    y_layout: str = ""
    g_layout: str = ""  # "": G's rows as `layout` says; "sb" / "bs": [S, B, ...] / [B, S, ...] regardless
    body_backward: Optional[Region] = None


@dataclass(frozen=True)
class Cell:
    """What one direction's per-step math is: kind, activation slots [(key, alpha, beta)] as
    ir/ops/rnn.py's activation_slots gives them, clip, LSTM input_forget, GRU linear_before_reset,
    and which optional arguments the body takes."""
    kind: str
    acts: tuple
    clip: Optional[float] = None
    input_forget: bool = False
    linear_before_reset: bool = False
    has_rbh: bool = False
    has_peep: bool = False


def g_batch_major(a) -> bool:
    """Whether G is [B, S, ...] (else [S, B, ...])."""
    return a.g_layout == "bs" or (a.g_layout == "" and a.layout == 1)


def state_dtype(storage):
    return dtype("f64") if storage == dtype("f64") else dtype("f32")


# ---------------------------------------------------------------- the canonical body

def cell_body(cell: Cell, batch, hidden: int, storage, names: NameGen, weights=None) -> Region:
    """The body region of one step of `cell` (see the module docstring for its arguments)."""
    from ..builder import Builder  # builder imports the registry, which imports the op families
    from ..weights import WeightStore
    kind, H = cell.kind, int(hidden)
    gates = _KIND[kind][0]
    st = state_dtype(storage)
    region = Region([], [], [])
    b = Builder(region, weights if weights is not None else WeightStore(), names)

    def arg(name, dt, shape):
        v = Value(names(name), TensorType(dt, tuple(shape)))
        region.args.append(v)
        return v

    g = arg("g", storage, (batch, gates * H))
    h = arg("h", st, (batch, H))
    c = arg("c", st, (batch, H)) if kind == "LSTM" else None
    r = arg("r", storage, (gates * H, H))
    rbh = arg("rbh", storage, (H,)) if cell.has_rbh else None
    p = arg("p", storage, (3 * H,)) if cell.has_peep else None

    def op(name, operands, attrs=None, n=1, hint=None):  # hint: the value name(s) dumps show
        hints = None if hint is None else ([hint] if isinstance(hint, str) else list(hint))
        out = b.create(name, operands, attrs, num_results=n, names=hints)
        return out if n > 1 else out[0]

    def up(v):  # storage -> state dtype (math in fp32 whatever the storage)
        return v if v is None or v.type.dtype == st else op("Cast", [v], {"to": st})

    def const(x):
        return b.constant(np.asarray(x, st.np))

    lo_hi = (const(-cell.clip), const(cell.clip)) if cell.clip is not None else None

    def clip(v):
        return op("Clip", [v, *lo_hi]) if lo_hi else v

    def act(slot, v, hint=None):
        key, al, be = cell.acts[slot]
        name, attrs = ACT_OPS[key]
        return op(name, [v], attrs(al, be), hint=hint)

    def split(v, n, axis, hint=None):
        return op("Split", [v], {"axis": axis, "num_outputs": n}, n=n, hint=hint)

    g, r, rbh, p = up(g), up(r), up(rbh), up(p)
    if kind == "RNN":
        hn = act(0, clip(op("Add", [g, op("Gemm", [h, r], {"transB": 1}, hint="hr")])), hint="h_next")
        region.results = [hn]
        return region
    if kind == "GRU":
        gz, gr, gh = split(g, 3, 1, hint=("gz", "gr", "gh"))
        if cell.linear_before_reset:
            hz, hr, hh = split(op("Gemm", [h, r], {"transB": 1}, hint="hr"), 3, 1, hint=("hz", "hrr", "hh"))
            if rbh is not None:
                hh = op("Add", [hh, rbh])
        else:
            rzr, rh = op("Split", [r, b.constant(np.array([2 * H, H], np.int64))], {"axis": 0}, n=2)
            hz, hr = split(op("Gemm", [h, rzr], {"transB": 1}, hint="hzr"), 2, 1, hint=("hz", "hrr"))
        z = act(0, clip(op("Add", [gz, hz])), hint="z")
        rr = act(0, clip(op("Add", [gr, hr])), hint="rg")
        if cell.linear_before_reset:
            pre = op("Add", [gh, op("Mul", [rr, hh])])
        else:
            pre = op("Add", [gh, op("Gemm", [op("Mul", [rr, h]), rh], {"transB": 1})])
        hh = act(1, clip(pre), hint="hbar")
        one = const(1.0)
        hn = op("Add", [op("Mul", [op("Sub", [one, z]), hh]), op("Mul", [z, h])], hint="h_next")
        region.results = [hn]
        return region
    # LSTM, gates i o f c
    pre = op("Add", [g, op("Gemm", [h, r], {"transB": 1}, hint="hr")], hint="gates")
    gi, go, gf, gc = split(pre, 4, 1, hint=("gi", "go", "gf", "gc"))
    pi, po, pf = split(p, 3, 0, hint=("pi", "po", "pf")) if p is not None else (None, None, None)

    def peep(v, pv, cv):
        return op("Add", [v, op("Mul", [pv, cv])]) if pv is not None else v

    i = act(0, clip(peep(gi, pi, c)), hint="i")
    if cell.input_forget:
        f = op("Sub", [const(1.0), i], hint="f")
    else:
        f = act(0, clip(peep(gf, pf, c)), hint="f")
    cc = act(1, clip(gc), hint="cbar")
    cn = op("Add", [op("Mul", [f, c]), op("Mul", [i, cc])], hint="c_next")
    o = act(0, clip(peep(go, po, cn)), hint="o")
    hn = op("Mul", [o, act(2, cn)], hint="h_next")
    region.results = [hn, cn]
    return region


def cell_of(kind: str, body: Region) -> Cell:
    """The Cell whose canonical body `body` is; NncError when it is not one (a pass changed it):
    the activation ops in program order give the slots, the rest is rebuilt and compared."""
    from ..equal import _region  # structural comparison of two regions
    if kind not in _KIND:
        raise NncError(f"recurrence: kind must be RNN, GRU or LSTM, got {kind!r}")
    acts = []
    for o in body.ops:
        if o.name in _OP_ACT:
            a = o.attrs
            acts.append((_OP_ACT[o.name], float(getattr(a, "alpha", 0.0)), float(getattr(a, "beta", 0.0))))
    clip = None
    for o in body.ops:
        if o.name == "Clip":
            hi = o.operands[2].producer
            clip = float(hi.attrs.value) if hi is not None and hi.name == "const" and hi.attrs.value is not None else None
            break
    nargs = len(body.args)
    has_c = kind == "LSTM"
    base = 3 + has_c
    if nargs < base:
        raise NncError(f"recurrence: a {kind} body takes at least {base} arguments, this one {nargs}")
    extra = body.args[base:]
    H = body.args[1].type.shape[1]
    has_peep = kind == "LSTM" and any(a.type.shape == (3 * H,) for a in extra)
    has_rbh = kind == "GRU" and any(a.type.shape == (H,) for a in extra)
    n_default = len(_KIND[kind][1])
    cands = []
    if kind == "LSTM":
        cands = [Cell(kind, tuple(acts), clip, False, False, False, has_peep)]
        if len(acts) == 4:  # input_forget: no forget activation (slot order i, c, o, h -> i, g, h)
            cands = [Cell(kind, (acts[0], acts[1], acts[3]), clip, True, False, False, has_peep)]
        elif len(acts) == 5:
            cands = [Cell(kind, (acts[0], acts[2], acts[4]), clip, False, False, False, has_peep)]
    elif kind == "GRU" and len(acts) == 3:
        cands = [Cell(kind, (acts[0], acts[2]), clip, False, lbr, has_rbh, False) for lbr in (True, False)]
    elif kind == "RNN" and len(acts) == 1:
        cands = [Cell(kind, tuple(acts), clip, False, False, False, False)]
    for cell in cands:
        if len(cell.acts) != n_default:
            continue
        try:
            canon = cell_body(cell, body.args[0].type.shape[0], H, body.args[0].type.dtype,
                              NameGen(), None)
        except NncError:
            continue
        # compare wiring and attrs, not names: rename the canonical copy's values after the body's
        for a, x in zip(canon.args, body.args):
            a.name = x.name
        for oa, ob in zip(canon.ops, body.ops):
            for ra, rb in zip(oa.results, ob.results):
                ra.name = rb.name
        if len(canon.ops) == len(body.ops) and _region(canon, body, {}, "body") is None:
            return cell
    raise NncError(f"recurrence: the {kind} body is not a cell the recurrence kernels know "
                   f"(activations {[a[0] for a in acts]}, {len(body.ops)} ops)")


# ---------------------------------------------------------------- inference

def _check_body(ctx, body: Region, which: str, B, H, GH, storage, st):
    kind = ctx.attrs.kind
    want = [("g", storage, (B, GH)), ("h", st, (B, H))]
    if kind == "LSTM":
        want.append(("c", st, (B, H)))
    want.append(("R_d", ctx.dtype(1), (GH, H)))
    if ctx.has(2):
        want.append(("rbh_d", ctx.dtype(2), (H,)))
    if ctx.has(3):
        want.append(("p_d", ctx.dtype(3), (3 * H,)))
    check_step_body(ctx, body, which, want, B, H, st)


def check_step_body(ctx, body: Region, which: str, want: list, B, H, st) -> None:
    """A recurrence step body (of `recurrence` or `recurrence_stack`): its arguments are `want`
    ([(name, dtype, shape)]) in order; it is flat and reads only its arguments; it returns the cell's
    states (h, and c for an LSTM), each [B, H] of dtype st, defined inside it."""
    kind = ctx.attrs.kind
    if len(body.args) != len(want):
        ctx.fail(f"{which} takes {len(body.args)} arguments, expected {len(want)} "
                 f"({', '.join(w[0] for w in want)})")
    for a, (nm, dt, shape) in zip(body.args, want):
        t = TensorType(dt, tuple(shape))
        if a.type != t:
            ctx.fail(f"{which} argument %{a.name} ({nm}) has type {a.type}, expected {t}")
    inside = {id(a) for a in body.args}
    for op in body.ops:
        if op.regions():
            ctx.fail(f"{which}: {op.name} has regions (a recurrence body is flat)")
        for v in op.operands:
            if v is not None and id(v) not in inside:
                ctx.fail(f"{which} reads %{v.name} from outside (a recurrence body reads only its arguments)")
        inside.update(id(r) for r in op.results)
    n_state = 2 if kind == "LSTM" else 1
    if len(body.results) != n_state:
        ctx.fail(f"{which} returns {len(body.results)} values, a {kind} step returns {n_state}")
    for v in body.results:
        if id(v) not in inside:
            ctx.fail(f"{which} returns %{v.name}, which it does not define")
        if v.type != TensorType(st, (B, H)):
            ctx.fail(f"{which} returns %{v.name}: {v.type}, expected {TensorType(st, (B, H))}")


def _infer(ctx):
    a = ctx.attrs
    if a.kind not in _KIND:
        ctx.fail(f"kind must be RNN, GRU or LSTM, got {a.kind!r}")
    nd = _num_dirs(a)
    if a.layout not in (0, 1):
        ctx.fail(f"layout must be 0 or 1, got {a.layout}")
    if a.y_layout not in Y_LAYOUTS:
        ctx.fail(f"y_layout must be one of {Y_LAYOUTS}, got {a.y_layout!r}")
    if a.body_backward is not None and nd != 2:
        ctx.fail("body_backward is only for direction = \"bidirectional\"")
    gates = _KIND[a.kind][0]
    H = a.hidden_size
    if not isinstance(H, int) or H <= 0:
        ctx.fail(f"hidden_size must be a positive integer, got {H}")
    GH = gates * H
    gs = ctx.shape(0)
    if len(gs) != 3:
        ctx.fail(f"G must have rank 3, got {ctx.type(0)}")
    if a.g_layout not in ("", "sb", "bs"):
        ctx.fail(f"g_layout must be \"\", \"sb\" or \"bs\", got {a.g_layout!r}")
    S, B = (gs[1], gs[0]) if g_batch_major(a) else (gs[0], gs[1])
    if isinstance(gs[2], int) and gs[2] != nd * GH:
        ctx.fail(f"G has {gs[2]} columns, expected directions*gates*hidden = {nd}*{gates}*{H} = {nd * GH}")
    storage = ctx.dtype(0)
    if not storage.is_float:
        ctx.fail(f"G must be floating point, got {ctx.type(0)}")
    st = state_dtype(storage)
    state = (nd, B, H) if a.layout == 0 else (B, nd, H)
    for i, nm, shape in ((1, "R", (nd, GH, H)), (2, "rbh", (nd, H)), (3, "P", (nd, 3 * H)),
                         (4, "initial_h", state), (5, "initial_c", state), (6, "sequence_lens", (B,))):
        if not ctx.has(i):
            continue
        t = ctx.type(i)
        if t.shape is not None and (len(t.shape) != len(shape) or
                                    any(isinstance(x, int) and isinstance(y, int) and x != y
                                        for x, y in zip(t.shape, shape))):
            ctx.fail(f"{nm} is {t}, expected shape {list(shape)}")
        if i == 6:
            if t.dtype.kind not in ("int", "uint"):
                ctx.fail(f"sequence_lens has dtype {t.dtype}, an integer type is expected")
        elif i >= 4 and t.dtype != storage:
            ctx.fail(f"{nm} has dtype {t.dtype}, G is {storage}")
    if ctx.has(2) and a.kind != "GRU":
        ctx.fail("rbh (operand 2) is only for GRU with linear_before_reset")
    if ctx.has(3) and a.kind != "LSTM":
        ctx.fail("P (operand 3) is only for LSTM")
    if ctx.has(5) and a.kind != "LSTM":
        ctx.fail("initial_c (operand 5) is only for LSTM")
    _check_body(ctx, a.body, "body", B, H, GH, storage, st)
    if a.body_backward is not None:
        _check_body(ctx, a.body_backward, "body_backward", B, H, GH, storage, st)
    max_res = 3 if a.kind == "LSTM" else 2
    if ctx.num_results > max_res:
        ctx.fail(f"a {a.kind} recurrence has at most {max_res} results, {ctx.num_results} requested")
    if a.y_layout == "sbdh":
        y = (S, B, nd * H)
    elif a.y_layout == "bsdh":
        y = (B, S, nd * H)
    else:
        y = (S, nd, B, H) if a.layout == 0 else (B, S, nd, H)
    return [TensorType(storage, y)] + [TensorType(storage, state)] * (ctx.num_results - 1)


# ---------------------------------------------------------------- reference

def _ref(a: RecurrenceAttrs, G, R, rbh=None, P=None, h0=None, c0=None, lens=None, *, ctx):
    nd = _num_dirs(a)
    gates = _KIND[a.kind][0]
    H = a.hidden_size
    GH = gates * H
    lstm = a.kind == "LSTM"
    storage = G.dtype
    st = np.float64 if storage == np.float64 else np.float32
    if g_batch_major(a):  # work in [S, B, ...]
        G = G.transpose(1, 0, 2)
    if a.layout == 1:
        h0 = None if h0 is None else h0.transpose(1, 0, 2)
        c0 = None if c0 is None else c0.transpose(1, 0, 2)
    S, B = G.shape[0], G.shape[1]
    steps = np.full(B, S, np.int64) if lens is None else np.asarray(lens).astype(np.int64)
    Y = np.zeros((S, nd, B, H), st)
    Yh = np.zeros((nd, B, H), st)
    Yc = np.zeros((nd, B, H), st)
    for d in range(nd):
        body = a.body_backward if (d == 1 and a.body_backward is not None) else a.body
        reverse = a.direction == "reverse" or d == 1
        h = np.zeros((B, H), st) if h0 is None else h0[d].astype(st)
        c = np.zeros((B, H), st) if c0 is None else c0[d].astype(st)
        extra = [R[d]] + ([rbh[d]] if rbh is not None else []) + ([P[d]] if P is not None else [])
        for step in range(S):
            t = S - 1 - step if reverse else step
            live = (t < steps)[:, None]
            if not live.any():
                continue
            g = np.ascontiguousarray(G[t, :, d * GH:(d + 1) * GH])
            outs = ctx.run_region(body, [g, h] + ([c] if lstm else []) + extra)
            h = np.where(live, outs[0], h).astype(st)
            if lstm:
                c = np.where(live, outs[1], c).astype(st)
            Y[t, d] = np.where(live, h, 0)
        Yh[d], Yc[d] = h, c
    if a.y_layout == "sbdh":
        Y = Y.transpose(0, 2, 1, 3).reshape(S, B, nd * H)
    elif a.y_layout == "bsdh":
        Y = Y.transpose(2, 0, 1, 3).reshape(B, S, nd * H)
    elif a.layout == 1:
        Y = Y.transpose(2, 0, 1, 3)
    if a.layout == 1:
        Yh, Yc = Yh.transpose(1, 0, 2), Yc.transpose(1, 0, 2)
    outs = [Y, Yh, Yc][:len(ctx.result_types)]
    return tuple(np.ascontiguousarray(o).astype(storage) for o in outs)


register("recurrence", RecurrenceAttrs, infer=_infer, ref=_ref, inputs=(2, 7), outputs=(1, 3),
         foldable=False, ref_ctx=True,
         doc="The time loop of an LSTM/GRU/RNN: per-step body over a hoisted projection G (time-fusion).")

