"""`recurrence_stack`: L stacked unidirectional recurrences of one cell, layer l+1's input
projection fused into its step (compiler/passes/layer_wavefront.py makes it from
recurrence -> Reshape -> Gemm -> Reshape -> recurrence chains; issue 8's layer wavefront).

    %y, %yh0, %yh1 = recurrence_stack(%G0, %R, %W, %Bias, none) {kind = "RNN", layers = 2,
        hidden_size = 256, direction = "forward", body = region(...) { one step of one layer }}

Operands (fixed positions, `none` where absent):
  0 G0    layer 0's input projection, biases folded in, exactly a `recurrence`'s G for D = 1:
          [S, B, gates*H] (or [B, S, ...] as layout / g_layout say). Storage dtype f32/f16/bf16/f64.
  1 R     every layer's recurrent weights [L, gates*H, H] (ONNX orientation, G's dtype).
  2 W     layers 1..L-1's input weights [L-1, gates*H, H] (rows: gate units; columns: the layer
          below's hidden units), G's dtype.
  3 Bias  layers 1..L-1's projection bias [L-1, gates*H] (Wb + Rb as time-fusion folds it), G's dtype.
  4 rbh   GRU with linear_before_reset only: every layer's hidden-gate recurrent bias [L, H].
Results: Y of the LAST layer (shape and y_layout exactly as a `recurrence`'s Y with D = 1), then,
for k = 1 .. K (K = (results - 1) / L: 0, 1, or 2 for LSTM), state k of every layer in order:
Y_h of layers 0..L-1, then Y_c of layers 0..L-1, each [1, B, H] (layout 0) or [B, 1, H] (layout 1).

Semantics (the definition; `_ref`): layer 0 is `recurrence(G0, R[0], rbh[0])` with `body`; layer
l >= 1 is `recurrence(G_l, R[l], rbh[l])` with the same body, where
    G_l[t] = storage(state(Y_{l-1}[t]) . W[l-1]^T + Bias[l-1])
Y_{l-1}[t] being layer l-1's h after step t rounded to the storage dtype (what the unfused graph
holds between the layers), the product and sum in the unfused Gemm's accumulation dtype (ir/ops/conv.py acc_dtype) and
the result rounded to the storage dtype once (what the unfused Gemm's output holds). Every layer
runs the same time order (direction "forward": t = 0..S-1, "reverse": S-1..0), starts from zero
states, and runs all S steps (no sequence_lens, initial states or peepholes: the pass only stacks
layers without them).

What a kernel may do with it: layer l+1 at step t needs only Y_l[t] and its own h[t-1], so layer l
can run step t while layer l+1 runs step t-1 (a wavefront: S + L - 1 serial steps instead of
L*S). Its matvec is then over [h_{l+1}[t-1] | h_l[t]] with [R_{l+1} | W_{l+1}] (G_l is never
materialised; a kernel that skips the storage rounding of Y_l and G_l differs by rounding only).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..graph import Region
from ..registry import register
from ..types import TensorType
from .conv import acc_dtype
from .recurrence import Y_LAYOUTS, check_step_body, g_batch_major, state_dtype
from .rnn import _KIND

STACK_DIRECTIONS = ("forward", "reverse")
MAX_LAYERS = 64


@dataclass(frozen=True)
class RecurrenceStackAttrs:
    body: Region
    kind: str
    hidden_size: int
    layers: int
    direction: str = "forward"
    layout: int = 0
    y_layout: str = ""
    g_layout: str = ""


def states_per_layer(attrs, num_results: int) -> int:
    """K: how many states (Y_h, Y_c) of each layer the op returns."""
    return (num_results - 1) // attrs.layers


def _check_shape(ctx, i, what, want, dt):
    t = ctx.type(i)
    if t.shape is not None and (len(t.shape) != len(want) or any(
            isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(t.shape, want))):
        ctx.fail(f"{what} is {t}, expected shape {list(want)}")
    if t.dtype != dt:
        ctx.fail(f"{what} has dtype {t.dtype}, G0 is {dt}")


def _check_body(ctx, body: Region, B, H, GH, storage, st):
    kind = ctx.attrs.kind
    want = [("g", storage, (B, GH)), ("h", st, (B, H))]
    if kind == "LSTM":
        want.append(("c", st, (B, H)))
    want.append(("R_l", storage, (GH, H)))
    if ctx.has(4):
        want.append(("rbh_l", storage, (H,)))
    check_step_body(ctx, body, "body", want, B, H, st)


def _infer(ctx):
    a = ctx.attrs
    if a.kind not in _KIND:
        ctx.fail(f"kind must be RNN, GRU or LSTM, got {a.kind!r}")
    if a.direction not in STACK_DIRECTIONS:
        ctx.fail(f"direction must be one of {STACK_DIRECTIONS} (a stack is unidirectional), got {a.direction!r}")
    L = a.layers
    if not isinstance(L, int) or not 2 <= L <= MAX_LAYERS:
        ctx.fail(f"layers must be an integer in [2, {MAX_LAYERS}], got {L}")
    if a.layout not in (0, 1):
        ctx.fail(f"layout must be 0 or 1, got {a.layout}")
    if a.y_layout not in Y_LAYOUTS:
        ctx.fail(f"y_layout must be one of {Y_LAYOUTS}, got {a.y_layout!r}")
    if a.g_layout not in ("", "sb", "bs"):
        ctx.fail(f"g_layout must be \"\", \"sb\" or \"bs\", got {a.g_layout!r}")
    H = a.hidden_size
    if not isinstance(H, int) or H <= 0:
        ctx.fail(f"hidden_size must be a positive integer, got {H}")
    GH = _KIND[a.kind][0] * H
    gs = ctx.shape(0)
    if len(gs) != 3:
        ctx.fail(f"G0 must have rank 3, got {ctx.type(0)}")
    S, B = (gs[1], gs[0]) if g_batch_major(a) else (gs[0], gs[1])
    if isinstance(gs[2], int) and gs[2] != GH:
        ctx.fail(f"G0 has {gs[2]} columns, expected gates*hidden = {GH}")
    storage = ctx.dtype(0)
    if not storage.is_float:
        ctx.fail(f"G0 must be floating point, got {ctx.type(0)}")
    st = state_dtype(storage)
    _check_shape(ctx, 1, "R", (L, GH, H), storage)
    _check_shape(ctx, 2, "W", (L - 1, GH, H), storage)
    _check_shape(ctx, 3, "Bias", (L - 1, GH), storage)
    if ctx.has(4):
        if a.kind != "GRU":
            ctx.fail("rbh (operand 4) is only for GRU with linear_before_reset")
        _check_shape(ctx, 4, "rbh", (L, H), storage)
    _check_body(ctx, a.body, B, H, GH, storage, st)
    k_max = 2 if a.kind == "LSTM" else 1
    n = ctx.num_results
    if n < 1 or (n - 1) % L or (n - 1) // L > k_max:
        ctx.fail(f"a {L}-layer {a.kind} stack returns Y and then K states of every layer (K <= {k_max}): "
                 f"1 + K*{L} results, {n} requested")
    if a.y_layout == "sbdh":
        y = (S, B, H)
    elif a.y_layout == "bsdh":
        y = (B, S, H)
    else:
        y = (S, 1, B, H) if a.layout == 0 else (B, S, 1, H)
    state = (1, B, H) if a.layout == 0 else (B, 1, H)
    return [TensorType(storage, y)] + [TensorType(storage, state)] * (n - 1)


def _ref(a: RecurrenceStackAttrs, G0, R, W, Bias, rbh=None, *, ctx):
    L, H = a.layers, a.hidden_size
    lstm = a.kind == "LSTM"
    storage = G0.dtype
    st = np.float64 if storage == np.float64 else np.float32
    G = G0.transpose(1, 0, 2) if g_batch_major(a) else G0  # [S, B, GH]
    S, B = G.shape[0], G.shape[1]
    order = range(S - 1, -1, -1) if a.direction == "reverse" else range(S)
    states = []  # per layer (h, c)
    y = None
    for layer in range(L):
        if layer > 0:  # this layer's projection of the layer below's Y (storage-rounded, like the unfused graph)
            acc = acc_dtype(storage)  # the unfused Gemm's accumulation (ir/ops/matmul.py)
            G = (y.astype(acc) @ W[layer - 1].astype(acc).T + Bias[layer - 1].astype(acc)).astype(storage)
        h = np.zeros((B, H), st)
        c = np.zeros((B, H), st)
        extra = [R[layer]] + ([rbh[layer]] if rbh is not None else [])
        y = np.zeros((S, B, H), storage)
        for t in order:
            outs = ctx.run_region(a.body, [np.ascontiguousarray(G[t]), h] + ([c] if lstm else []) + extra)
            h = outs[0].astype(st)
            if lstm:
                c = outs[1].astype(st)
            y[t] = h.astype(storage)
        states.append((h, c))
    if a.y_layout == "sbdh":
        Y = y
    elif a.y_layout == "bsdh":
        Y = y.transpose(1, 0, 2)
    elif a.layout == 0:
        Y = y[:, None]
    else:
        Y = y.transpose(1, 0, 2)[:, :, None]
    K = states_per_layer(a, len(ctx.result_types))
    outs = [Y]
    for k in range(K):
        for layer in range(L):
            s = states[layer][k][None]  # [1, B, H]
            outs.append(s if a.layout == 0 else s.transpose(1, 0, 2))
    return tuple(np.ascontiguousarray(o).astype(storage) for o in outs)


register("recurrence_stack", RecurrenceStackAttrs, infer=_infer, ref=_ref, inputs=(4, 5), outputs=(1, 1 + 2 * MAX_LAYERS),
         foldable=False, ref_ctx=True,
         doc="L stacked unidirectional recurrences, layer l+1's input projection fused into its step (layer-wavefront).")
