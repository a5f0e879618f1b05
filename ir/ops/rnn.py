"""Recurrent sequence ops: RNN, GRU, LSTM.

They stay whole-sequence ops in the IR (not unrolled): codegen fuses the time loop later.
Semantics follow ONNX (opset 22) and onnxruntime's CPU kernels where ONNX is silent (clip is
applied to each gate's pre-activation, bias and peephole included; LSTM input_forget couples the
forget gate as 1 - input gate). Directions forward / reverse / bidirectional, layout 0
([seq, batch, ...]) and 1 ([batch, seq, ...]), per-batch sequence_lens (steps past a sequence's
end give zeros in Y and leave the state untouched).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import NncError
from ..registry import register
from ..types import TensorType


@dataclass(frozen=True)
class RNNAttrs:
    activation_alpha: tuple[float, ...] = ()
    activation_beta: tuple[float, ...] = ()
    activations: tuple[str, ...] = ()
    clip: Optional[float] = None
    direction: str = "forward"
    hidden_size: Optional[int] = None
    layout: int = 0


@dataclass(frozen=True)
class GRUAttrs(RNNAttrs):
    linear_before_reset: int = 0


@dataclass(frozen=True)
class LSTMAttrs(RNNAttrs):
    input_forget: int = 0


# gates per direction, default activations per direction
_KIND = {"RNN": (1, ("Tanh",)), "GRU": (3, ("Sigmoid", "Tanh")), "LSTM": (4, ("Sigmoid", "Tanh", "Tanh"))}

# name -> (number of alphas, number of betas, default alpha, default beta) as in onnxruntime
_ACT = {
    "relu": (0, 0, 0.0, 0.0), "tanh": (0, 0, 0.0, 0.0), "sigmoid": (0, 0, 0.0, 0.0),
    "affine": (1, 1, 1.0, 0.0), "leakyrelu": (1, 0, 0.01, 0.0), "thresholdedrelu": (1, 0, 1.0, 0.0),
    "scaledtanh": (1, 1, 1.0, 1.0), "hardsigmoid": (1, 1, 0.2, 0.5), "elu": (1, 0, 1.0, 0.0),
    "softsign": (0, 0, 0.0, 0.0), "softplus": (0, 0, 0.0, 0.0),
}


def _num_dirs(a) -> int:
    if a.direction not in ("forward", "reverse", "bidirectional"):
        raise NncError(f"direction must be forward, reverse or bidirectional, got {a.direction!r}")
    return 2 if a.direction == "bidirectional" else 1


def activation_slots(kind: str, a) -> list[list[tuple[str, float, float]]]:
    """Per direction, the op's activation slots as (name, alpha, beta): the defaults filled in,
    one list repeated for both directions when only one is given. Codegen reads the same."""
    nd = _num_dirs(a)
    per = _KIND[kind][1]
    names = list(a.activations) or list(per) * nd
    if len(names) == len(per) and nd == 2:
        names = names * 2
    if len(names) != len(per) * nd:
        raise NncError(f"{kind}: {len(names)} activations given, {len(per) * nd} expected")
    alphas, betas = list(a.activation_alpha), list(a.activation_beta)
    slots = []
    for n in names:
        key = n.lower()
        if key not in _ACT:
            raise NncError(f"{kind}: unsupported activation {n!r}")
        na, nb, al, be = _ACT[key]
        if na and alphas:
            al = alphas.pop(0)
        if nb and betas:
            be = betas.pop(0)
        slots.append((key, float(al), float(be)))
    return [slots[i * len(per):(i + 1) * len(per)] for i in range(nd)]


def _activation_fns(kind: str, a) -> list:
    """Per direction, the activation functions of the op's slots."""
    return [[_make_act(k, al, be) for k, al, be in d] for d in activation_slots(kind, a)]


def _make_act(key, al, be):
    if key == "relu":
        return lambda x: np.maximum(x, 0)
    if key == "tanh":
        return np.tanh
    if key == "sigmoid":
        return lambda x: 1.0 / (1.0 + np.exp(-x))
    if key == "affine":
        return lambda x: al * x + be
    if key == "leakyrelu":
        return lambda x: np.where(x >= 0, x, al * x)
    if key == "thresholdedrelu":
        return lambda x: np.where(x > al, x, 0.0)
    if key == "scaledtanh":
        return lambda x: al * np.tanh(be * x)
    if key == "hardsigmoid":
        return lambda x: np.clip(al * x + be, 0.0, 1.0)
    if key == "elu":
        return lambda x: np.where(x >= 0, x, al * (np.exp(x) - 1.0))
    if key == "softsign":
        return lambda x: x / (1.0 + np.abs(x))
    if key == "softplus":
        return lambda x: np.logaddexp(0.0, x)
    raise AssertionError(key)


# ---------------------------------------------------------------- inference

def _infer(kind: str):
    def infer(ctx):
        a = ctx.attrs
        nd = _num_dirs(a)
        if a.layout not in (0, 1):
            ctx.fail(f"layout must be 0 or 1, got {a.layout}")
        xs = ctx.shape(0)
        if len(xs) != 3:
            ctx.fail(f"X must have rank 3, got {ctx.type(0)}")
        seq, batch = (xs[0], xs[1]) if a.layout == 0 else (xs[1], xs[0])
        hidden = a.hidden_size
        if hidden is None:
            rs = ctx.shape(2)
            if len(rs) != 3:
                ctx.fail(f"R must have rank 3, got {ctx.type(2)}")
            hidden = rs[2]
        gates = _KIND[kind][0]
        for i, nm in ((1, "W"), (2, "R")):
            s = ctx.type(i).shape
            if s is not None and len(s) != 3:
                ctx.fail(f"{nm} must have rank 3, got {ctx.type(i)}")
            if s is not None and isinstance(s[0], int) and s[0] != nd:
                ctx.fail(f"{nm} has {s[0]} directions, direction={a.direction!r} needs {nd}")
            if s is not None and isinstance(s[1], int) and isinstance(hidden, int) and s[1] != gates * hidden:
                ctx.fail(f"{nm} dim 1 is {s[1]}, expected {gates}*hidden_size = {gates * hidden}")
        _activation_fns(kind, a)  # validates the activation lists
        dt = ctx.dtype(0)
        if a.layout == 0:
            y, yh = (seq, nd, batch, hidden), (nd, batch, hidden)
        else:
            y, yh = (batch, seq, nd, hidden), (batch, nd, hidden)
        return [TensorType(dt, y)] + [TensorType(dt, yh)] * (ctx.num_results - 1)
    return infer


# ---------------------------------------------------------------- reference

def _prep(a, x, h0, c0=None):
    """To compute dtype and layout 0."""
    cdt = np.float64
    x = x.astype(cdt)
    if a.layout == 1:
        x = x.transpose(1, 0, 2)
        h0 = None if h0 is None else h0.transpose(1, 0, 2)
        c0 = None if c0 is None else c0.transpose(1, 0, 2)
    return x, (None if h0 is None else h0.astype(cdt)), (None if c0 is None else c0.astype(cdt))


def _clipper(a):
    if a.clip is None:
        return lambda v: v
    c = float(a.clip)
    return lambda v: np.clip(v, -c, c)


def _run(kind, a, x, w, r, b, seq_lens, h0, c0, p, out_dtype, nres):
    """Shared driver: x [S, B, I] (f64). Returns Y [S, D, B, H], Y_h [D, B, H], Y_c [D, B, H]."""
    nd = _num_dirs(a)
    S, B, _ = x.shape
    H = r.shape[-1]
    gates = _KIND[kind][0]
    acts = _activation_fns(kind, a)
    clip = _clipper(a)
    w = w.astype(np.float64)
    r = r.astype(np.float64)
    if b is None:
        b = np.zeros((nd, 2 * gates * H))
    b = b.astype(np.float64)
    lens = np.full(B, S, np.int64) if seq_lens is None else seq_lens.astype(np.int64)
    Y = np.zeros((S, nd, B, H))
    Yh = np.zeros((nd, B, H))
    Yc = np.zeros((nd, B, H))
    for d in range(nd):
        reverse = a.direction == "reverse" or d == 1
        h = np.zeros((B, H)) if h0 is None else h0[d].copy()
        c = np.zeros((B, H)) if c0 is None else c0[d].copy()
        W, R = w[d], r[d]
        Wb, Rb = b[d, :gates * H], b[d, gates * H:]
        xw = np.einsum("sbi,gi->sbg", x, W) + Wb  # all steps' input projections at once
        fs = acts[d]
        if kind == "LSTM":
            P = np.zeros(3 * H) if p is None else p[d].astype(np.float64)
            Pi, Po, Pf = P[:H], P[H:2 * H], P[2 * H:]
        for step in range(S):
            t = step if not reverse else S - 1 - step
            live = (t < lens)[:, None]  # batches whose sequence covers step t
            if not live.any():
                continue
            g = xw[t]
            if kind == "RNN":
                hn = fs[0](clip(g + h @ R.T + Rb))
                cn = c
            elif kind == "GRU":
                z = fs[0](clip(g[:, :H] + h @ R[:H].T + Rb[:H]))
                rr = fs[0](clip(g[:, H:2 * H] + h @ R[H:2 * H].T + Rb[H:2 * H]))
                if a.linear_before_reset:
                    hh = fs[1](clip(g[:, 2 * H:] + rr * (h @ R[2 * H:].T + Rb[2 * H:])))
                else:
                    hh = fs[1](clip(g[:, 2 * H:] + (rr * h) @ R[2 * H:].T + Rb[2 * H:]))
                hn = (1.0 - z) * hh + z * h
                cn = c
            else:  # LSTM, gate order i o f c
                gg = g + h @ R.T + Rb
                i = fs[0](clip(gg[:, :H] + Pi * c))
                if a.input_forget:
                    f = 1.0 - i
                else:
                    f = fs[0](clip(gg[:, 2 * H:3 * H] + Pf * c))
                cc = fs[1](clip(gg[:, 3 * H:]))
                cn = f * c + i * cc
                o = fs[0](clip(gg[:, H:2 * H] + Po * cn))
                hn = o * fs[2](cn)
            h = np.where(live, hn, h)
            c = np.where(live, cn, c)
            Y[t, d] = np.where(live, h, 0.0)
        Yh[d] = h
        Yc[d] = c
    if a.layout == 1:
        Y = Y.transpose(2, 0, 1, 3)
        Yh = Yh.transpose(1, 0, 2)
        Yc = Yc.transpose(1, 0, 2)
    outs = [Y.astype(out_dtype), Yh.astype(out_dtype), Yc.astype(out_dtype)]
    return tuple(outs[:nres])


def _rnn_ref(kind):
    def ref(a, X, W, R, B=None, sequence_lens=None, initial_h=None, initial_c=None, P=None):
        x, h0, c0 = _prep(a, X, initial_h, initial_c)
        if a.hidden_size is not None and R.shape[-1] != a.hidden_size:
            raise NncError(f"{kind}: R has hidden size {R.shape[-1]}, hidden_size={a.hidden_size}")
        return _run(kind, a, x, W, R, B, sequence_lens, h0, c0, P, X.dtype, 3)
    return ref


register("RNN", RNNAttrs, infer=_infer("RNN"), ref=_rnn_ref("RNN"), inputs=(3, 6), outputs=(1, 2),
         doc="Elman RNN over a whole sequence (ONNX RNN).")
register("GRU", GRUAttrs, infer=_infer("GRU"), ref=_rnn_ref("GRU"), inputs=(3, 6), outputs=(1, 2),
         doc="GRU over a whole sequence (ONNX GRU).")
register("LSTM", LSTMAttrs, infer=_infer("LSTM"), ref=_rnn_ref("LSTM"), inputs=(3, 8), outputs=(1, 3),
         doc="LSTM over a whole sequence (ONNX LSTM).")
