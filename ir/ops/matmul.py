"""Matrix products and attention: Gemm, MatMul, MatMulInteger, QLinearMatMul, Einsum, Det,
Attention (opset 23+), RotaryEmbedding."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import NncError
from ..registry import NoAttrs, register
from ..types import I32, TensorType, dtype
from ._util import broadcast_shapes, is_float
from .conv import acc_dtype, requantize


# ---------------------------------------------------------------- Gemm

@dataclass(frozen=True)
class GemmAttrs:
    alpha: float = 1.0
    beta: float = 1.0
    transA: int = 0
    transB: int = 0


def _gemm_infer(ctx):
    a = ctx.attrs
    sa, sb = ctx.shape(0), ctx.shape(1)
    if len(sa) != 2 or len(sb) != 2:
        ctx.fail(f"Gemm needs 2-D operands, got ranks {len(sa)} and {len(sb)}")
    m = sa[1] if a.transA else sa[0]
    n = sb[0] if a.transB else sb[1]
    return [TensorType(ctx.dtype(0), (m, n))]


def _gemm_ref(a: GemmAttrs, A, B, C=None):
    acc = acc_dtype(A.dtype) if is_float(A.dtype) else A.dtype
    x = A.astype(acc, copy=False)
    y = B.astype(acc, copy=False)
    if a.transA:
        x = x.T
    if a.transB:
        y = y.T
    r = x @ y
    if a.alpha != 1.0:
        r = r * acc.type(a.alpha) if is_float(A.dtype) else (r * a.alpha).astype(acc)
    if C is not None:
        c = C.astype(acc, copy=False)
        r = r + (c * acc.type(a.beta) if a.beta != 1.0 else c)
    return r.astype(A.dtype, copy=False)


register("Gemm", GemmAttrs, infer=_gemm_infer, ref=_gemm_ref, inputs=(2, 3))


# ---------------------------------------------------------------- MatMul

def matmul_shape(sa, sb):
    if len(sa) == 0 or len(sb) == 0:
        raise NncError("MatMul operands must have rank >= 1")
    a1, b1 = len(sa) == 1, len(sb) == 1
    if a1:
        sa = (1,) + tuple(sa)
    if b1:
        sb = tuple(sb) + (1,)
    ka, kb = sa[-1], sb[-2]
    if isinstance(ka, int) and isinstance(kb, int) and ka != kb:
        raise NncError(f"MatMul inner dims differ: {ka} vs {kb}")
    batch = broadcast_shapes(tuple(sa[:-2]), tuple(sb[:-2]))
    out = tuple(batch) + (sa[-2], sb[-1])
    if a1:
        out = out[:-2] + out[-1:]
    if b1:
        out = out[:-1]
    return out


def _matmul_infer(ctx):
    return [TensorType(ctx.dtype(0), matmul_shape(ctx.shape(0), ctx.shape(1)))]


def lowp_float(dt) -> bool:
    """f16 / bf16 / f8: computed in f32."""
    dt = np.dtype(dt)
    return dt not in (np.float32, np.float64) and (dt.kind == "f" or "float" in dt.name)


def _matmul_ref(a, x, y):
    if lowp_float(x.dtype):
        return np.matmul(x.astype(np.float32), y.astype(np.float32)).astype(x.dtype)
    return np.matmul(x, y).astype(x.dtype, copy=False)


register("MatMul", NoAttrs, infer=_matmul_infer, ref=_matmul_ref, inputs=2)


def _mmint_infer(ctx):
    return [TensorType(I32, matmul_shape(ctx.shape(0), ctx.shape(1)))]


def _zp_rows(z, x):
    """Zero point of A: scalar, or per-row (1-D of M) -> column vector."""
    if z is None:
        return 0.0
    z = z.astype(np.float64)
    if z.ndim == 1 and z.size > 1 and x.ndim >= 2:
        return z.reshape(-1, 1)
    if z.ndim >= 1 and x.ndim >= 2 and z.shape[-1] == 1 and z.ndim == x.ndim:
        return z
    return z.reshape(()) if z.size == 1 else z


def _mmint_ref(a, A, B, az=None, bz=None):
    x = A.astype(np.float64) - _zp_rows(az, A)
    y = B.astype(np.float64) - (0.0 if bz is None else bz.astype(np.float64))
    return np.rint(np.matmul(x, y)).astype(np.int32)


register("MatMulInteger", NoAttrs, infer=_mmint_infer, ref=_mmint_ref, inputs=(2, 4))


def _qlmm_infer(ctx):
    return [TensorType(ctx.dtype(7), matmul_shape(ctx.shape(0), ctx.shape(3)))]


def _qlmm_ref(a, A, as_, az, B, bs, bz, ys, yz):
    x = A.astype(np.float64) - _zp_rows(az, A)
    y = B.astype(np.float64) - bz.astype(np.float64)
    acc = np.matmul(x, y)
    sa = as_.astype(np.float64)
    if sa.ndim == 1 and sa.size > 1:
        sa = sa.reshape(-1, 1)
    scale = sa * bs.astype(np.float64) / ys.astype(np.float64)
    if yz.dtype.kind in "iu":
        return requantize(acc, scale, yz, yz.dtype)
    # float8 outputs: saturating cast
    r = acc * scale + yz.astype(np.float64)
    return r.astype(yz.dtype)


register("QLinearMatMul", NoAttrs, infer=_qlmm_infer, ref=_qlmm_ref, inputs=8)


# ---------------------------------------------------------------- Einsum

@dataclass(frozen=True)
class EinsumAttrs:
    equation: str


def _parse_einsum(eq: str, ranks: list):
    eq = eq.replace(" ", "")
    if "->" in eq:
        lhs, rhs = eq.split("->")
    else:
        lhs, rhs = eq, None
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise NncError(f"einsum equation {eq!r} has {len(terms)} operands, got {len(ranks)}")
    return terms, rhs


def _einsum_infer(ctx):
    eq = ctx.attrs.equation
    shapes = [ctx.shape(i) for i in range(ctx.n)]
    terms, rhs = _parse_einsum(eq, shapes)
    dims: dict = {}
    ell = None
    counts: dict = {}
    for t, s in zip(terms, shapes):
        if "..." in t:
            pre, post = t.split("...")
            ne = len(s) - len(pre) - len(post)
            es = tuple(s[len(pre):len(pre) + ne])
            ell = es if ell is None else broadcast_shapes(ell, es)
            letters = list(pre) + list(post)
            ldims = list(s[:len(pre)]) + list(s[len(pre) + ne:])
        else:
            if len(t) != len(s):
                ctx.fail(f"einsum term {t!r} does not match operand rank {len(s)}")
            letters, ldims = list(t), list(s)
        for c, d in zip(letters, ldims):
            counts[c] = counts.get(c, 0) + 1
            if c not in dims or dims[c] == 1:
                dims[c] = d
    if rhs is None:
        rhs = ("..." if ell is not None else "") + "".join(sorted(c for c, n in counts.items() if n == 1))
    out = []
    if "..." in rhs:
        pre, post = rhs.split("...")
        out = [dims[c] for c in pre] + list(ell or ()) + [dims[c] for c in post]
    else:
        out = [dims[c] for c in rhs]
    return [TensorType(ctx.dtype(0), tuple(out))]


def _einsum_ref(a: EinsumAttrs, *xs):
    dt = xs[0].dtype
    if lowp_float(dt):
        ys = [x.astype(np.float32) for x in xs]
    else:
        ys = list(xs)
    r = np.einsum(a.equation.replace(" ", ""), *ys, optimize=len(ys) > 2)
    return np.asarray(r).astype(dt, copy=False)


register("Einsum", EinsumAttrs, infer=_einsum_infer, ref=_einsum_ref, inputs=(1, -1))


# ---------------------------------------------------------------- Det

def _det_infer(ctx):
    s = ctx.shape(0)
    return [TensorType(ctx.dtype(0), tuple(s[:-2]))]


def _det_ref(a, x):
    acc = np.float64
    return np.asarray(np.linalg.det(x.astype(acc))).astype(x.dtype)


register("Det", NoAttrs, infer=_det_infer, ref=_det_ref)


# ---------------------------------------------------------------- Attention

@dataclass(frozen=True)
class AttentionAttrs:
    is_causal: int = 0
    kv_num_heads: Optional[int] = None
    q_num_heads: Optional[int] = None
    qk_matmul_output_mode: int = 0
    left_window_size: int = -1
    right_window_size: int = -1
    scale: Optional[float] = None
    softcap: Optional[float] = None
    softmax_precision: Optional[int] = None


def _att_infer(ctx):
    a = ctx.attrs
    q, k, v = ctx.shape(0), ctx.shape(1), ctx.shape(2)
    dt = ctx.dtype(0)
    if len(q) == 3:
        if a.q_num_heads is None or a.kv_num_heads is None:
            ctx.fail("3-D inputs need q_num_heads and kv_num_heads")
        B, S = q[0], q[1]
        hq, hkv = a.q_num_heads, a.kv_num_heads
        dk = k[2] // hkv
        dv = v[2] // hkv
        kv_seq = k[1]
        y = (B, S, hq * dv)
    else:
        B, hq, S = q[0], q[1], q[2]
        hkv, kv_seq, dk, dv = k[1], k[2], k[3], v[3]
        y = (B, hq, S, dv)
    total = kv_seq
    if ctx.has(4):
        total = ctx.shape(4)[2] + kv_seq
    out = [TensorType(dt, y), TensorType(dt, (B, hkv, total, dk)), TensorType(dt, (B, hkv, total, dv)),
           TensorType(dt, (B, hq, S, total))]
    return out[: ctx.num_results]


def _att_softmax(x):
    m = np.max(x, axis=-1, keepdims=True)
    safe = np.where(np.isneginf(m), np.zeros((), x.dtype), m)
    e = np.exp(x - safe)
    s = np.sum(e, axis=-1, keepdims=True)
    s = np.where(s == 0, np.ones((), x.dtype), s)
    return e / s


def _att_ref(a: AttentionAttrs, Q, K, V, mask=None, past_key=None, past_value=None, nonpad=None):
    odt = Q.dtype
    wt = odt
    Q, K, V = Q.astype(wt), K.astype(wt), V.astype(wt)
    if past_key is not None:
        past_key = past_key.astype(wt)
        past_value = past_value.astype(wt)
    if mask is not None and mask.dtype != np.bool_:
        mask = mask.astype(wt)
    rank3 = Q.ndim == 3
    B = Q.shape[0]
    if rank3:
        hq, hkv = a.q_num_heads, a.kv_num_heads
        Q = Q.reshape(B, Q.shape[1], hq, -1).transpose(0, 2, 1, 3)
        K = K.reshape(B, K.shape[1], hkv, -1).transpose(0, 2, 1, 3)
        V = V.reshape(B, V.shape[1], hkv, -1).transpose(0, 2, 1, 3)
    scale = a.scale if a.scale is not None else 1 / np.sqrt(Q.shape[3])
    scale = wt.type(np.sqrt(scale)) if hasattr(wt, "type") else np.dtype(wt).type(np.sqrt(scale))
    K = np.concatenate((past_key, K), axis=2) if past_key is not None else K
    V = np.concatenate((past_value, V), axis=2) if past_value is not None else V
    present_key, present_value = K, V
    qs, kvs = Q.shape[2], K.shape[2]
    z = np.zeros((), wt)
    bias = np.zeros((qs, kvs), wt)
    if mask is not None:
        pw = kvs - mask.shape[-1]
        if pw > 0:
            mask = np.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, pw)],
                          constant_values=False if mask.dtype == np.bool_ else -np.inf)
    if a.is_causal:
        if mask is not None and mask.dtype == np.bool_:
            mask = np.where(mask, z, wt.type(-np.inf) if hasattr(wt, "type") else -np.inf).astype(wt)
        base = np.zeros((qs, kvs), wt) if mask is None else mask.copy()
        if a.left_window_size >= 0 or a.right_window_size >= 0:
            base = np.zeros((qs, kvs), wt) + base
        i = np.arange(qs).reshape(qs, 1)
        j = np.arange(kvs).reshape(1, kvs)
        if past_key is None and nonpad is not None:
            off = (nonpad.reshape(-1) - qs).reshape(-1, 1, 1)
            allowed = j <= i + off
            c = np.where(allowed, 0, -np.inf).astype(wt)
            bias = base + c.reshape(c.shape[0], 1, qs, kvs)
        else:
            off = past_key.shape[2] if past_key is not None else 0
            bias = base + np.where(j <= i + off, 0, -np.inf).astype(wt)
    elif mask is not None:
        if mask.dtype == np.bool_:
            mask = np.where(mask, 0, -np.inf).astype(wt)
        bias = bias + mask
    lw, rw = a.left_window_size, a.right_window_size
    if lw >= 0 or rw >= 0:
        if past_key is None and nonpad is not None:
            woff = (nonpad.reshape(-1) - qs).reshape(-1, 1, 1)
        else:
            woff = past_key.shape[2] if past_key is not None else 0
        bias = np.zeros((qs, kvs), wt) + bias
        diff = (np.arange(qs).reshape(qs, 1) + woff) - np.arange(kvs).reshape(1, kvs)
        allowed = np.ones_like(diff, dtype=np.bool_)
        if lw >= 0:
            allowed &= diff <= lw
        if rw >= 0:
            allowed &= -diff <= rw
        win = np.where(allowed, 0, -np.inf).astype(wt)
        if np.ndim(woff) > 0:
            win = win.reshape(win.shape[0], 1, qs, kvs)
        bias = bias + win
    if nonpad is not None:
        pm = np.arange(kvs) < nonpad[:, None]
        bias = bias + np.where(pm, 0, -np.inf).astype(wt).reshape(B, 1, 1, kvs)
    nq, nk = Q.shape[1], K.shape[1]
    if nq != nk and nq % nk == 0:
        K = np.repeat(K, nq // nk, axis=1)
        V = np.repeat(V, nq // nk, axis=1)
    qk = np.matmul(Q * scale, K.transpose(0, 1, 3, 2) * scale)
    if a.softcap is not None and a.softcap > 0:
        qk = np.tanh(qk / wt.type(a.softcap)) * wt.type(a.softcap)
    qkb = qk + bias
    if a.qk_matmul_output_mode == 2:
        qk = qkb.copy()
    sm_in = qkb
    if a.softmax_precision is not None:
        sdt = dtype(a.softmax_precision).np
        if sdt.itemsize >= np.dtype(wt).itemsize:
            sm_in = qkb.astype(sdt)
    sm = _att_softmax(sm_in)
    allm = np.isneginf(np.max(bias, axis=-1, keepdims=True))
    sm = np.where(allm, np.zeros((), sm.dtype), sm).astype(wt)
    if a.qk_matmul_output_mode == 3:
        qk = sm
    out = np.matmul(sm, V)
    if rank3:
        out = out.transpose(0, 2, 1, 3).reshape(out.shape[0], out.shape[2], -1)
    qkb_full = np.broadcast_to(qk, out.shape[:1] + qk.shape[1:]) if qk.ndim == 4 else qk
    return (out.astype(odt), present_key.astype(odt), present_value.astype(odt),
            np.ascontiguousarray(qkb_full).astype(odt))


register("Attention", AttentionAttrs, infer=_att_infer, ref=_att_ref, inputs=(3, 7), outputs=(1, 4))


# ---------------------------------------------------------------- RotaryEmbedding

@dataclass(frozen=True)
class RotaryAttrs:
    interleaved: int = 0
    num_heads: int = 0
    rotary_embedding_dim: int = 0


def _rot_infer(ctx):
    return [ctx.type(0)]


def _rot_ref(a: RotaryAttrs, x, cos, sin, pos=None):
    odt = x.dtype
    orig = x.shape
    if x.ndim == 4:
        x = x.transpose(0, 2, 1, 3)
    B, S = x.shape[:2]
    if x.ndim == 3:
        x = x.reshape(B, S, a.num_heads, -1)
    hd = x.shape[3]
    rd = a.rotary_embedding_dim or hd
    xr, xn = x[..., :rd], x[..., rd:]
    if pos is not None:
        cos = cos[pos]
        sin = sin[pos]
    cos = np.expand_dims(cos, 2)
    sin = np.expand_dims(sin, 2)
    if a.interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
    else:
        x1, x2 = np.split(xr, 2, axis=-1)
    real = cos * x1 - sin * x2
    imag = sin * x1 + cos * x2
    if a.interleaved:
        xr = np.stack([real, imag], axis=-1).reshape(xr.shape)
    else:
        xr = np.concatenate([real, imag], axis=-1)
    out = np.concatenate([xr, xn], axis=-1)
    if len(orig) == 3:
        out = out.reshape(orig)
    else:
        out = out.transpose(0, 2, 1, 3)
    return np.ascontiguousarray(out).astype(odt)


register("RotaryEmbedding", RotaryAttrs, infer=_rot_infer, ref=_rot_ref, inputs=(3, 4))
