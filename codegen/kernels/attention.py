"""Attention-style ops. attention.cu.j2: Attention (opset 23; past/current KV concatenated into the
present outputs or temps, then one thread per query row: mask, causal / windowed, softcap, optional
QK output). rotary.cu.j2: RotaryEmbedding (rank 3 or 4, interleaved or not, optional position ids).
linear_attention.cu.j2: LinearAttention (one thread per state column). causal_conv.cu.j2:
CausalConvWithState (output and the carried state)."""
from __future__ import annotations

import math

import numpy as np

from ..lower import LowerCtx, lowering
from ._helpers import empty_result, float_acc, grid_stride_launch
from .elementwise import lit


@lowering("Attention")
def _attention(ctx: LowerCtx):
    q, kk, v = ctx.inp(0), ctx.inp(1), ctx.inp(2)
    mask, pk, pv, nonpad = ctx.inp(3), ctx.inp(4), ctx.inp(5), ctx.inp(6)
    y = ctx.out(0)
    rank3 = len(q.shape) == 3
    B = q.shape[0]
    if rank3:
        Hq, Hkv = int(ctx.attr("q_num_heads")), int(ctx.attr("kv_num_heads"))
        S, L = q.shape[1], kk.shape[1]
        Dk, Dv = kk.shape[2] // Hkv, v.shape[2] // Hkv
    else:
        Hq, S = q.shape[1], q.shape[2]
        Hkv, L, Dk, Dv = kk.shape[1], kk.shape[2], kk.shape[3], v.shape[3]
    P = pk.shape[2] if pk is not None else 0
    T = P + L
    if Hq % Hkv:
        ctx.fail(f"q heads {Hq} not a multiple of kv heads {Hkv}")
    acc = "double" if q.dtype.short == "f64" else "float"
    presents = []
    for idx, (cur, past, D) in enumerate(((kk, pk, Dk), (v, pv, Dv))):
        pres = ctx.out(1 + idx) if ctx.n_out > 1 + idx else ctx.temp(q.dtype, (B, Hkv, T, D), "present_kv" + str(idx))
        kern = ctx.render("attention.cu.j2", "attention_kv", kind="kv", ctype=q.ctype, P=P, L=L, T=T, H=Hkv, D=D,
                          rank3=rank3)
        n = B * Hkv * T * D
        if n:
            ctx.launch(kern, ctx.grid1d(n), 256, ([past] if P else []) + [cur, pres, ctx.i64(n)])
        presents.append(pres)
    mstr, mask_T = [0, 0, 0, 0], T
    if mask is not None:
        ms = list(mask.shape)
        full = [1] * (4 - len(ms)) + ms
        st = [0] * (4 - len(ms)) + mask.strides()
        mask_T = full[3]
        mstr = [0 if full[d] == 1 else st[d] for d in range(4)]
    scale = ctx.attr("scale")
    scale = 1 / math.sqrt(Dk) if scale is None else float(scale)
    softcap = ctx.attr("softcap")
    qk = ctx.out(3) if ctx.n_out > 3 else None
    sc = ctx.temp(acc == "double" and "f64" or "f32", (B, Hq, S, max(T, 1)), "scores")
    kern = ctx.render("attention.cu.j2", "attention", kind="attn", ctype=q.ctype, acc=acc, ninf=lit(float("-inf"), acc),
                      B=B, Hq=Hq, Hkv=Hkv, S=S, T=T, P=P, Dk=Dk, Dv=Dv, group=Hq // Hkv, rank3=rank3,
                      has_mask=mask is not None, mctype=mask.ctype if mask is not None else "", mstr=mstr,
                      mask_T=mask_T, has_nonpad=nonpad is not None, npctype=nonpad.ctype if nonpad is not None else "",
                      offset_nonpad=nonpad is not None and P == 0, causal=bool(ctx.attr("is_causal", 0)),
                      lw=int(ctx.attr("left_window_size", -1)), rw=int(ctx.attr("right_window_size", -1)),
                      scale=repr(scale), softcap=repr(float(softcap)) if softcap else "",
                      has_qk=qk is not None, qk_mode=int(ctx.attr("qk_matmul_output_mode", 0) or 0))
    args = [q, presents[0], presents[1]] + [b for b in (mask, nonpad) if b is not None] + [sc, y] + ([qk] if qk is not None else [])
    ctx.launch(kern, ctx.grid1d(B * Hq * S, 128), 128, args)
    return True


@lowering("RotaryEmbedding")
def _rotary(ctx: LowerCtx):
    x, cos, sin, y = ctx.inp(0), ctx.inp(1), ctx.inp(2), ctx.out(0)
    pos = ctx.inp(3)
    rank4 = len(x.shape) == 4
    if rank4:
        B, H, S, hd = x.shape
    else:
        B, S = x.shape[:2]
        H = int(ctx.attr("num_heads", 0) or 0)
        if H <= 0:
            ctx.fail("rank-3 input needs num_heads")
        hd = x.shape[2] // H
    half = cos.shape[-1]
    rd = int(ctx.attr("rotary_embedding_dim", 0) or 0) or hd
    k = ctx.render("rotary.cu.j2", "rotary", ctype=x.ctype, acc="double" if x.dtype.short == "f64" else "float",
                   has_pos=pos is not None, pctype=pos.ctype if pos is not None else "", rank4=rank4, B=B, H=H, S=S,
                   hd=hd, rd=rd, half=half, interleaved=bool(ctx.attr("interleaved", 0)))
    ctx.launch(k, ctx.grid1d(y.numel), 256, [x, cos, sin] + ([pos] if pos is not None else []) + [y, ctx.i64(y.numel)])
    return True


@lowering("CausalConvWithState")
def _causal(ctx: LowerCtx):
    x, w, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    bias, past = ctx.inp(2), ctx.inp(3)
    B, C, L = x.shape
    K = w.shape[2]
    common = dict(L=L, C=C, K=K, has_past=past is not None, has_bias=bias is not None, ctype=x.ctype,
                  acc=float_acc(x.dtype), silu=ctx.attr("activation", "none") in ("silu", "swish"))
    args = [f"const {x.ctype}* __restrict__ x", f"const {w.ctype}* __restrict__ w"]
    bufs = [x, w]
    if bias is not None:
        args.append(f"const {bias.ctype}* __restrict__ bias")
        bufs.append(bias)
    if past is not None:
        args.append(f"const {past.ctype}* __restrict__ past")
        bufs.append(past)
    if y.numel:
        grid_stride_launch(ctx, "causal_conv.cu.j2", "causal_conv", args + [f"{y.ctype}* __restrict__ y"],
                           bufs + [y], y.numel, part="y", **common)
    if ctx.n_out > 1:
        st = ctx.out(1)
        if st.numel:
            grid_stride_launch(ctx, "causal_conv.cu.j2", "causal_state", args + [f"{st.ctype}* __restrict__ y"],
                               bufs + [st], st.numel, part="state", **common)
        elif empty_result(ctx, 1):
            pass
    return True


@lowering("LinearAttention")
def _linattn(ctx: LowerCtx):
    q, k, v, y = ctx.inp(0), ctx.inp(1), ctx.inp(2), ctx.out(0)
    past, decay, beta = ctx.inp(3), ctx.inp(4), ctx.inp(5)
    a = ctx.attrs
    Bn, T, _ = q.shape
    hq, hkv = a.q_num_heads, a.kv_num_heads
    dk, dv = q.shape[2] // hq, v.shape[2] // hkv
    state = ctx.out(1) if ctx.n_out > 1 else ctx.temp(past.dtype if past is not None else q.dtype,
                                                       [Bn, hkv, dk, dv], "state")
    scale = a.scale if a.scale != 0.0 else 1.0 / np.sqrt(dk)
    args = [f"const {q.ctype}* __restrict__ q", f"const {k.ctype}* __restrict__ k", f"const {v.ctype}* __restrict__ v"]
    bufs = [q, k, v]
    for nm, b in (("past", past), ("decay", decay), ("beta", beta)):
        if b is not None:
            args.append(f"const {b.ctype}* __restrict__ {nm}")
            bufs.append(b)
    args += [f"{state.ctype}* __restrict__ state", f"{y.ctype}* __restrict__ y"]
    bufs += [state, y]
    acc = float_acc(q.dtype)
    grid_stride_launch(ctx, "linear_attention.cu.j2", "linear_attention", args, bufs, Bn * hkv * dv,
                       ctype=q.ctype, sctype=state.ctype, acc=acc, dk=dk, dv=dv, hkv=hkv, hq_n=hq, group=hq // hkv, T=T,
                       has_past=past is not None,
                       has_decay=decay is not None, has_beta=beta is not None,
                       gw=decay.shape[2] if decay is not None else 1,
                       gper=decay is not None and decay.shape[2] == hkv * dk,
                       bw=beta.shape[2] if beta is not None else 1,
                       bper=beta is not None and beta.shape[2] == hkv and hkv > 1,
                       scale=repr(float(np.float32(scale))) if acc == "float" else repr(float(scale)))
    return True
