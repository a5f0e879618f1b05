"""The newest default-domain ops (opset 22..28): LinearAttention, CausalConvWithState, DeformConv,
SwiGLU.

Half-precision inputs compute in float32 and cast back; float64 stays float64.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import NncError
from ..registry import register
from ..types import TensorType


def _cdt(dt: np.dtype) -> np.dtype:
    """Compute dtype: float64 stays, everything else (f16, bf16, f32) computes in float32."""
    return np.dtype(np.float64) if np.dtype(dt) == np.float64 else np.dtype(np.float32)


def _float_only(ctx, i: int):
    if not ctx.dtype(i).is_float:
        ctx.fail(f"operand {i} must be floating point, got {ctx.dtype(i)}")


# ---------------------------------------------------------------- SwiGLU

@dataclass(frozen=True)
class SwiGLUAttrs:
    alpha: float = 1.0


def _swiglu_infer(ctx):
    _float_only(ctx, 0)
    if ctx.dtype(0) != ctx.dtype(1):
        ctx.fail(f"A is {ctx.dtype(0)} but B is {ctx.dtype(1)}")
    sa, sb = ctx.shape(0), ctx.shape(1)
    if len(sa) != len(sb):
        ctx.fail(f"A and B must have identical shapes (no broadcasting), ranks {len(sa)} and {len(sb)}")
    out = []
    for x, y in zip(sa, sb):
        if isinstance(x, int) and isinstance(y, int) and x != y:
            ctx.fail(f"A and B must have identical shapes (no broadcasting), got {sa} and {sb}")
        out.append(x if isinstance(x, int) or not isinstance(y, int) else y)
    return [ctx.type(0).with_shape(tuple(out))]


def _swiglu_ref(at: SwiGLUAttrs, a, b):
    if a.shape != b.shape:
        raise NncError(f"SwiGLU: A {a.shape} and B {b.shape} differ (no broadcasting)")
    c = _cdt(a.dtype)
    af, bf = a.astype(c), b.astype(c)
    with np.errstate(over="ignore"):
        sig = 1.0 / (1.0 + np.exp(-c.type(at.alpha) * af))
    return (af * sig * bf).astype(a.dtype)


register("SwiGLU", SwiGLUAttrs, infer=_swiglu_infer, ref=_swiglu_ref, inputs=2,
         doc="Y = A * sigmoid(alpha * A) * B (A gate, B value; identical shapes).")


# ---------------------------------------------------------------- CausalConvWithState

@dataclass(frozen=True)
class CausalConvAttrs:
    activation: str = "none"  # none | silu | swish


def _causal_conv_infer(ctx):
    a = ctx.attrs
    if a.activation not in ("none", "silu", "swish"):
        ctx.fail(f"activation {a.activation!r} is not one of none, silu, swish")
    _float_only(ctx, 0)
    s, w = ctx.shape(0), ctx.shape(1)
    if len(s) != 3:
        ctx.fail(f"input must be rank 3 (batch, channels, length), got rank {len(s)}")
    if len(w) != 3:
        ctx.fail(f"weight must be rank 3 (channels, 1, k), got rank {len(w)}")
    if isinstance(w[1], int) and w[1] != 1:
        ctx.fail(f"weight middle dim must be 1 (depthwise), got {w[1]}")
    if isinstance(w[0], int) and isinstance(s[1], int) and w[0] != s[1]:
        ctx.fail(f"weight has {w[0]} channels, input {s[1]}")
    if ctx.has(2):
        bs = ctx.shape(2)
        if len(bs) != 1:
            ctx.fail(f"bias must be rank 1, got rank {len(bs)}")
    k = w[2]
    state = (s[0], s[1], k - 1)
    if ctx.has(3):
        ps = ctx.shape(3)
        if len(ps) != 3:
            ctx.fail(f"past_state must be rank 3, got rank {len(ps)}")
        if isinstance(ps[2], int) and isinstance(k, int) and ps[2] != k - 1:
            ctx.fail(f"past_state length {ps[2]} must be k - 1 = {k - 1}")
    t = ctx.type(0)
    return [t, t.with_shape(state)]


def _causal_conv_ref(a: CausalConvAttrs, x, w, bias=None, past=None):
    bsz, ch, length = x.shape
    k = w.shape[2]
    if w.shape[0] != ch or w.shape[1] != 1:
        raise NncError(f"CausalConvWithState: weight {w.shape} does not fit input {x.shape}")
    if past is None:
        past = np.zeros((bsz, ch, k - 1), x.dtype)
    elif past.shape != (bsz, ch, k - 1):
        raise NncError(f"CausalConvWithState: past_state {past.shape}, expected {(bsz, ch, k - 1)}")
    padded = np.concatenate([past.astype(x.dtype), x], axis=2)  # (B, C, L + k - 1)
    c = _cdt(x.dtype)
    pf = padded.astype(c)
    wf = w[:, 0, :].astype(c)  # (C, k)
    acc = np.zeros((bsz, ch, length), c)
    for j in range(k):
        acc += pf[:, :, j:j + length] * wf[None, :, j:j + 1]
    if bias is not None:
        acc += bias.astype(c)[None, :, None]
    y = acc.astype(x.dtype)
    if a.activation in ("silu", "swish"):
        yf = y.astype(c)
        with np.errstate(over="ignore"):
            y = (yf / (1.0 + np.exp(-yf))).astype(x.dtype)
    elif a.activation != "none":
        raise NncError(f"CausalConvWithState: unknown activation {a.activation!r}")
    present = np.ascontiguousarray(padded[:, :, padded.shape[2] - (k - 1):])
    return y, present


register("CausalConvWithState", CausalConvAttrs, infer=_causal_conv_infer, ref=_causal_conv_ref,
         inputs=(2, 4), outputs=(1, 2),
         doc="Causal depthwise 1-D conv over concat(past_state, input); present_state = last k-1 steps.")


# ---------------------------------------------------------------- LinearAttention

@dataclass(frozen=True)
class LinearAttentionAttrs:
    q_num_heads: int
    kv_num_heads: int
    chunk_size: int = 64  # tuning hint only
    scale: float = 0.0  # 0: 1/sqrt(d_k)
    update_rule: str = "gated_delta"  # linear | gated | delta | gated_delta


_RULES = ("linear", "gated", "delta", "gated_delta")


def _la_check(a: LinearAttentionAttrs, has_decay: bool, has_beta: bool, fail):
    if a.update_rule not in _RULES:
        fail(f"update_rule {a.update_rule!r} is not one of {', '.join(_RULES)}")
    if a.q_num_heads <= 0 or a.kv_num_heads <= 0 or a.q_num_heads % a.kv_num_heads:
        fail(f"q_num_heads {a.q_num_heads} must be a positive multiple of kv_num_heads {a.kv_num_heads}")
    gating = a.update_rule in ("gated", "gated_delta")
    delta = a.update_rule in ("delta", "gated_delta")
    if gating != has_decay:
        fail(f"update_rule {a.update_rule!r} {'requires' if gating else 'forbids'} the decay input")
    if delta != has_beta:
        fail(f"update_rule {a.update_rule!r} {'requires' if delta else 'forbids'} the beta input")


def _la_infer(ctx):
    a = ctx.attrs
    _la_check(a, ctx.has(4), ctx.has(5), ctx.fail)
    _float_only(ctx, 0)
    q, k, v = ctx.shape(0), ctx.shape(1), ctx.shape(2)
    for name, s in (("query", q), ("key", k), ("value", v)):
        if len(s) != 3:
            ctx.fail(f"{name} must be rank 3 (B, T, H*D), got rank {len(s)}")
    hq, hkv = a.q_num_heads, a.kv_num_heads
    for name, s, h in (("query", q, hq), ("key", k, hkv), ("value", v, hkv)):
        if isinstance(s[2], int) and s[2] % h:
            ctx.fail(f"{name} last dim {s[2]} is not divisible by its head count {h}")
    d_k = q[2] // hq
    d_v = v[2] // hkv
    if isinstance(k[2], int) and isinstance(q[2], int) and k[2] // hkv != d_k:
        ctx.fail(f"key head size {k[2] // hkv} differs from query head size {d_k}")
    state = (q[0], hkv, d_k, d_v)
    sdt = ctx.dtype(0)
    if ctx.has(3):
        ps = ctx.shape(3)
        if len(ps) != 4:
            ctx.fail(f"past_state must be rank 4 (B, H_kv, d_k, d_v), got rank {len(ps)}")
        for x, y in zip(ps, state):
            if isinstance(x, int) and isinstance(y, int) and x != y:
                ctx.fail(f"past_state shape {ps} does not match {state}")
        sdt = ctx.dtype(3)
    return [TensorType(ctx.dtype(0), (q[0], q[1], hq * d_v)), TensorType(sdt, state)]


def _la_ref(a: LinearAttentionAttrs, q, k, v, past=None, decay=None, beta=None):
    def fail(msg):
        raise NncError(f"LinearAttention: {msg}")
    _la_check(a, decay is not None, beta is not None, fail)
    b, t, _ = q.shape
    hq, hkv = a.q_num_heads, a.kv_num_heads
    d_k, d_v = q.shape[2] // hq, v.shape[2] // hkv
    c = _cdt(q.dtype)

    def heads(x, h):  # (B, T, H*D) -> (B, H, T, D)
        return x.reshape(b, t, h, -1).transpose(0, 2, 1, 3).astype(c)

    q4, k4, v4 = heads(q, hq), heads(k, hkv), heads(v, hkv)
    if decay is not None:
        if decay.shape[2] == hkv:
            g4 = heads(decay, hkv)  # (B, H, T, 1)
        elif decay.shape[2] == hkv * d_k:
            g4 = heads(decay, hkv)  # (B, H, T, d_k)
        else:
            fail(f"decay last dim {decay.shape[2]} must be {hkv} or {hkv * d_k}")
    if beta is not None:
        if beta.shape[2] not in (hkv, 1):
            fail(f"beta last dim {beta.shape[2]} must be {hkv} or 1")
        b4 = heads(beta, beta.shape[2])  # (B, H|1, T, 1)
    if past is not None:
        if past.shape != (b, hkv, d_k, d_v):
            fail(f"past_state {past.shape} does not match {(b, hkv, d_k, d_v)}")
        state = past.astype(c)
        sdt = past.dtype
    else:
        state = np.zeros((b, hkv, d_k, d_v), c)
        sdt = q.dtype
    scale = c.type(a.scale if a.scale != 0.0 else 1.0 / np.sqrt(d_k))
    group = hq // hkv
    out = np.empty((b, hq, t, d_v), c)
    for i in range(t):
        kt, vt = k4[:, :, i, :], v4[:, :, i, :]
        if decay is not None:
            state = state * np.exp(g4[:, :, i, :])[..., None]
        if beta is not None:
            vt = b4[:, :, i, :] * (vt - np.einsum("bhdm,bhd->bhm", state, kt))
        state = state + kt[..., :, None] * vt[..., None, :]
        qt = q4[:, :, i, :].reshape(b, hkv, group, d_k)  # query head j reads kv head j // group
        out[:, :, i, :] = (scale * np.einsum("bhgd,bhdm->bhgm", qt, state)).reshape(b, hq, d_v)
    y = out.transpose(0, 2, 1, 3).reshape(b, t, hq * d_v).astype(q.dtype)
    return y, state.astype(sdt)


register("LinearAttention", LinearAttentionAttrs, infer=_la_infer, ref=_la_ref, inputs=(3, 6),
         outputs=(1, 2),
         doc="Recurrent linear attention (linear/gated/delta/gated_delta) over packed (B, T, H*D).")


# ---------------------------------------------------------------- DeformConv

@dataclass(frozen=True)
class DeformConvAttrs:
    dilations: Optional[tuple[int, ...]] = None
    group: int = 1
    kernel_shape: Optional[tuple[int, ...]] = None
    offset_group: int = 1
    pads: Optional[tuple[int, ...]] = None
    strides: Optional[tuple[int, ...]] = None


def _dc_params(a: DeformConvAttrs, nd: int, wspatial):
    ks = tuple(a.kernel_shape) if a.kernel_shape is not None else tuple(wspatial)
    dil = tuple(a.dilations) if a.dilations is not None else (1,) * nd
    st = tuple(a.strides) if a.strides is not None else (1,) * nd
    pads = tuple(a.pads) if a.pads is not None else (0,) * (2 * nd)
    if len(ks) != nd or len(dil) != nd or len(st) != nd or len(pads) != 2 * nd:
        raise NncError(f"DeformConv: kernel_shape/dilations/strides/pads do not fit {nd} spatial dims")
    return ks, dil, st, pads


def _deform_infer(ctx):
    a = ctx.attrs
    _float_only(ctx, 0)
    x, w, off = ctx.shape(0), ctx.shape(1), ctx.shape(2)
    if len(x) < 3 or len(w) != len(x) or len(off) != len(x):
        ctx.fail(f"X, W, offset must share a rank >= 3, got {len(x)}, {len(w)}, {len(off)}")
    nd = len(x) - 2
    ks, dil, st, pads = _dc_params(a, nd, w[2:])
    if isinstance(x[1], int) and isinstance(w[1], int) and x[1] != w[1] * a.group:
        ctx.fail(f"X has {x[1]} channels, W expects {w[1]} x group {a.group}")
    if isinstance(x[1], int) and x[1] % a.offset_group:
        ctx.fail(f"channels {x[1]} are not divisible by offset_group {a.offset_group}")
    if isinstance(w[0], int) and w[0] % a.group:
        ctx.fail(f"output channels {w[0]} are not divisible by group {a.group}")
    kprod = 1
    for kk in ks:
        kprod = kprod * kk
    if isinstance(off[1], int) and isinstance(kprod, int) and off[1] != a.offset_group * kprod * nd:
        ctx.fail(f"offset has {off[1]} channels, expected offset_group*prod(kernel)*{nd} = "
                 f"{a.offset_group * kprod * nd}")
    out = [(x[2 + i] + pads[i] + pads[nd + i] - ((ks[i] - 1) * dil[i] + 1)) // st[i] + 1 for i in range(nd)]
    if ctx.has(3) and len(ctx.shape(3)) != 1:
        ctx.fail("B must be rank 1")
    if ctx.has(4) and len(ctx.shape(4)) != len(x):
        ctx.fail(f"mask must be rank {len(x)}")
    return [ctx.type(0).with_shape((x[0], w[0], *out))]


def _deform_ref(a: DeformConvAttrs, x, w, offset, bias=None, mask=None):
    n, cin = x.shape[:2]
    nd = x.ndim - 2
    ks, dil, st, pads = _dc_params(a, nd, w.shape[2:])
    cout = w.shape[0]
    g, og = a.group, a.offset_group
    if cin != w.shape[1] * g or cout % g or cin % og:
        raise NncError(f"DeformConv: X {x.shape}, W {w.shape}, group {g}, offset_group {og} do not fit")
    ins = x.shape[2:]
    outs = tuple((ins[i] + pads[i] + pads[nd + i] - ((ks[i] - 1) * dil[i] + 1)) // st[i] + 1
                 for i in range(nd))
    kp, op_ = int(np.prod(ks)), int(np.prod(outs))
    if offset.shape != (n, og * kp * nd, *outs):
        raise NncError(f"DeformConv: offset {offset.shape}, expected {(n, og * kp * nd, *outs)}")
    c = _cdt(x.dtype)
    off = offset.astype(c).reshape(n, og, kp, nd, op_)
    if mask is None:
        m = np.ones((n, og, kp, op_), c)
    else:
        if mask.shape != (n, og * kp, *outs):
            raise NncError(f"DeformConv: mask {mask.shape}, expected {(n, og * kp, *outs)}")
        m = mask.astype(c).reshape(n, og, kp, op_)
    # sampling positions (n, og, kp, op) per spatial dim
    kgrid = np.stack(np.meshgrid(*[np.arange(k) for k in ks], indexing="ij"), 0).reshape(nd, kp)
    ogrid = np.stack(np.meshgrid(*[np.arange(o) for o in outs], indexing="ij"), 0).reshape(nd, op_)
    pos = [(-pads[d] + ogrid[d] * st[d])[None, None, None, :] + (kgrid[d] * dil[d])[None, None, :, None]
           + off[:, :, :, d, :] for d in range(nd)]
    lo = [np.floor(p) for p in pos]
    fr = [p - l for p, l in zip(pos, lo)]
    lo = [l.astype(np.int64) for l in lo]
    xf = x.astype(c).reshape(n, og, cin // og, -1)  # (n, og, cpo, prod(ins))
    cols = np.zeros((n, og, cin // og, kp, op_), c)
    for corner in itertools.product((0, 1), repeat=nd):
        wgt = m.copy()
        lin = np.zeros(lo[0].shape, np.int64)
        valid = np.ones(lo[0].shape, bool)
        for d, bit in enumerate(corner):
            idx = lo[d] + bit
            wgt = wgt * (fr[d] if bit else 1 - fr[d])
            valid &= (idx >= 0) & (idx < ins[d])
            lin = lin * ins[d] + np.clip(idx, 0, ins[d] - 1)
        wgt = np.where(valid, wgt, 0)
        vals = np.take_along_axis(xf, lin.reshape(n, og, 1, kp * op_), axis=3)  # (n, og, cpo, kp*op)
        cols += vals.reshape(n, og, cin // og, kp, op_) * wgt[:, :, None]
    cols = cols.reshape(n, g, cin // g * kp, op_)
    wg = w.astype(c).reshape(g, cout // g, cin // g * kp)
    y = np.einsum("gok,ngkp->ngop", wg, cols).reshape(n, cout, *outs)
    if bias is not None:
        y = y + bias.astype(c).reshape((1, cout) + (1,) * nd)
    return y.astype(x.dtype)


register("DeformConv", DeformConvAttrs, infer=_deform_infer, ref=_deform_ref, inputs=(3, 5),
         doc="Deformable convolution: bilinear sampling at kernel positions shifted by offset, times mask.")
