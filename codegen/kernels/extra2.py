"""More rarely used ops, direct kernels of misc2.cu.j2 (one thread per output element unless noted):

  ReverseSequence, MaxUnpool (zero fill + scatter), Resize cubic / antialias (per-axis tap tables
  computed at compile time with the reference's own 1-D resampler), RoiAlign, TensorScatter, Det,
  CausalConvWithState, ArrayFeatureExtractor, CenterCropPad, Col2Im, AffineGrid, DeformConv,
  LinearAttention (one thread per state column), GlobalLpPool (through the reduce path's rownorm-free
  form: a small kernel), window functions and MelWeightMatrix (compile-time constants).
"""
from __future__ import annotations

import numpy as np

from ..lower import LowerCtx, lowering


def _acc(dt) -> str:
    return "double" if dt.short == "f64" else "float"


def _norm(a, r):
    return a + r if a < 0 else a


def _launch(ctx, kind, hint, args, bufs, count, **p):
    k = ctx.render("misc2.cu.j2", hint, kind=kind, args=args, **p)
    ctx.launch(k, ctx.grid1d(count), 256, bufs + [ctx.i64(count)])


def _zero(ctx, y):
    k = ctx.render("fill.cu.j2", "fill", kind="fill", ctype=y.ctype, value="0")
    ctx.launch(k, ctx.grid1d(y.numel), 256, [y, ctx.i64(y.numel)])


def _const(ctx, i, what):
    v = ctx.value(i)
    if v is None:
        ctx.fail(f"{what} (operand {i}) must be a compile-time constant")
    return np.asarray(v)


def _empty(ctx, i=0):
    y = ctx.out(i)
    if y.numel == 0:
        ctx.alias(i, ctx.new_weight(np.zeros(y.shape, y.dtype.np)))
        return True
    return False


@lowering("ReverseSequence")
def _revseq(ctx: LowerCtx):
    x, lens, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    if _empty(ctx):
        return True
    ba, ta = int(ctx.attr("batch_axis", 1)), int(ctx.attr("time_axis", 0))
    inner = int(np.prod(x.shape[2:], dtype=np.int64))
    _launch(ctx, "revseq", "revseq", [f"const {x.ctype}* __restrict__ x", f"const {lens.ctype}* __restrict__ lens",
                                      f"{y.ctype}* __restrict__ y"], [x, lens, y], y.numel,
            inner=inner, d1=x.shape[1], batch_axis=ba, T=x.shape[ta])
    return True


@lowering("MaxUnpool")
def _maxunpool(ctx: LowerCtx):
    x, ind, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    if _empty(ctx):
        return True
    _zero(ctx, y)
    if x.numel:
        _launch(ctx, "unpool", "maxunpool", [f"const {x.ctype}* __restrict__ x", f"const {ind.ctype}* __restrict__ ind",
                                             f"{y.ctype}* __restrict__ y"], [x, ind, y], x.numel, ynumel=y.numel)
    return True


@lowering("Resize", priority=5)
def _resize_taps(ctx: LowerCtx):
    a = ctx.attrs
    mode = getattr(a, "mode", "nearest")
    if not (mode == "cubic" or (mode == "linear" and getattr(a, "antialias", 0))):
        return None
    if a.coordinate_transformation_mode == "tf_crop_and_resize":
        ctx.fail("tf_crop_and_resize is not supported with cubic / antialias")
    from ...ir.ops.nn import _resize_axis
    x, y = ctx.inp(0), ctx.out(0)
    if _empty(ctx):
        return True
    rank = len(x.shape)
    scales = None
    if ctx.has(2):
        v = ctx.value(2)
        if v is not None and np.asarray(v).size:
            scales = [float(s) for s in np.asarray(v).reshape(-1)]
            if a.axes and len(scales) != rank:
                full = [1.0] * rank
                for ax, s in zip(a.axes, scales):
                    full[_norm(ax, rank)] = s
                scales = full
    if scales is None or a.keep_aspect_ratio_policy != "stretch":
        scales = [o / i for o, i in zip(y.shape, x.shape)]
    resized = [d for d in range(rank) if y.shape[d] != x.shape[d] or scales[d] != 1.0]
    idx_t, w_t, T, toff = [], [], [], []
    off = 0
    for d in resized:
        n_in, n_out = x.shape[d], y.shape[d]
        mat = _resize_axis(a, np.eye(n_in), 0, scales[d], n_out, None)  # [out, in]
        t = max(1, int((mat != 0).sum(axis=1).max()))
        ii = np.zeros((n_out, t), np.int32)
        ww = np.zeros((n_out, t), np.float32)
        for o in range(n_out):
            nz = np.nonzero(mat[o])[0]
            ii[o, :len(nz)] = nz
            ww[o, :len(nz)] = mat[o, nz]
        idx_t.append(ii.reshape(-1))
        w_t.append(ww.reshape(-1))
        T.append(t)
        toff.append(off)
        off += n_out * t
    if not resized:
        ctx.alias(0, x)
        return True
    tb = ctx.new_weight(np.concatenate(idx_t), "taps_i")
    wb = ctx.new_weight(np.concatenate(w_t), "taps_w")
    _launch(ctx, "taps", "resize_taps", [f"const {x.ctype}* __restrict__ x", "const int32_t* __restrict__ tidx",
                                         "const float* __restrict__ tw", f"{y.ctype}* __restrict__ y"],
            [x, tb, wb, y], y.numel, ctype=y.ctype, oshape=list(y.shape), in_strides=x.strides(), resized=resized,
            T=T, toff=toff, ntaps=int(np.prod(T)))
    return True


@lowering("RoiAlign")
def _roialign(ctx: LowerCtx):
    X, rois, bi, y = ctx.inp(0), ctx.inp(1), ctx.inp(2), ctx.out(0)
    if _empty(ctx):
        return True
    a = ctx.attrs
    _, C, H, W = X.shape
    _launch(ctx, "roialign", "roialign", [f"const {X.ctype}* __restrict__ X", f"const {rois.ctype}* __restrict__ rois",
                                          f"const {bi.ctype}* __restrict__ bidx", f"{y.ctype}* __restrict__ y"],
            [X, rois, bi, y], y.numel, ctype=y.ctype, OH=a.output_height, OW=a.output_width, C=C, H=H, W=W,
            off="0.5" if a.coordinate_transformation_mode == "half_pixel" else "0.0",
            scale=repr(float(a.spatial_scale)), sr=int(a.sampling_ratio), mode=a.mode)
    return True


@lowering("TensorScatter")
def _tscatter(ctx: LowerCtx):
    cache, upd, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    wi = ctx.inp(2)
    ctx.copy(y, cache)
    if upd.numel == 0:
        return True
    ax = _norm(int(ctx.attr("axis", -2)), len(cache.shape))
    if ax == 0:
        ctx.fail("axis cannot be the batch axis")
    inner = int(np.prod(cache.shape[ax + 1:], dtype=np.int64))
    mid = int(np.prod(cache.shape[1:ax], dtype=np.int64))
    args = [f"const {upd.ctype}* __restrict__ u"] + ([f"const {wi.ctype}* __restrict__ wi"] if wi else []) + \
        [f"{y.ctype}* __restrict__ y"]
    _launch(ctx, "tscatter", "tensor_scatter", args, [upd] + ([wi] if wi else []) + [y], upd.numel,
            inner=inner, S=upd.shape[ax], L=cache.shape[ax], mid=mid, has_wi=wi is not None,
            circular=ctx.attr("mode", "linear") == "circular")
    return True


@lowering("Det")
def _det(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    n = x.shape[-1]
    nb = int(np.prod(x.shape[:-2], dtype=np.int64))
    ws = ctx.temp("f64", [max(nb, 1), n, n], "det_ws")
    _launch(ctx, "det", "det", [f"const {x.ctype}* __restrict__ x", "double* __restrict__ ws",
                                f"{y.ctype}* __restrict__ y"], [x, ws, y], nb, ctype=y.ctype, n=n)
    return True


@lowering("CausalConvWithState")
def _causal(ctx: LowerCtx):
    x, w, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    bias, past = ctx.inp(2), ctx.inp(3)
    B, C, L = x.shape
    K = w.shape[2]
    common = dict(L=L, C=C, K=K, has_past=past is not None, has_bias=bias is not None, ctype=x.ctype,
                  acc=_acc(x.dtype), silu=ctx.attr("activation", "none") in ("silu", "swish"))
    args = [f"const {x.ctype}* __restrict__ x", f"const {w.ctype}* __restrict__ w"]
    bufs = [x, w]
    if bias is not None:
        args.append(f"const {bias.ctype}* __restrict__ bias")
        bufs.append(bias)
    if past is not None:
        args.append(f"const {past.ctype}* __restrict__ past")
        bufs.append(past)
    if y.numel:
        _launch(ctx, "causal", "causal_conv", args + [f"{y.ctype}* __restrict__ y"], bufs + [y], y.numel,
                part="y", **common)
    if ctx.n_out > 1:
        st = ctx.out(1)
        if st.numel:
            _launch(ctx, "causal", "causal_state", args + [f"{st.ctype}* __restrict__ y"], bufs + [st], st.numel,
                    part="state", **common)
        elif _empty(ctx, 1):
            pass
    return True


@lowering("ArrayFeatureExtractor")
def _afe(ctx: LowerCtx):
    x, ind, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    if _empty(ctx):
        return True
    _launch(ctx, "afe", "array_feature_extractor", [f"const {x.ctype}* __restrict__ x",
                                                     f"const {ind.ctype}* __restrict__ ind", f"{y.ctype}* __restrict__ y"],
            [x, ind, y], y.numel, J=ind.numel, D=x.shape[-1] if x.shape else 1)
    return True


@lowering("CenterCropPad")
def _ccp(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    if _empty(ctx):
        return True
    delta = []
    for d in range(len(x.shape)):
        i, o = x.shape[d], y.shape[d]
        delta.append((i - o) // 2 if o < i else -((o - i) // 2))
    _launch(ctx, "ccp", "center_crop_pad", [f"const {x.ctype}* __restrict__ x", f"{y.ctype}* __restrict__ y"],
            [x, y], y.numel, ctype=y.ctype, oshape=list(y.shape), ishape=list(x.shape), istr=x.strides(), delta=delta)
    return True


@lowering("Col2Im")
def _col2im(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    img = [int(v) for v in _const(ctx, 1, "image_shape").reshape(-1)]
    ks = [int(v) for v in _const(ctx, 2, "block_shape").reshape(-1)]
    nd = len(img)
    st = list(ctx.attr("strides") or [1] * nd)
    dl = list(ctx.attr("dilations") or [1] * nd)
    p = list(ctx.attr("pads") or [0] * (2 * nd))
    O = [(img[i] + p[i] + p[i + nd] - ((ks[i] - 1) * dl[i] + 1)) // st[i] + 1 for i in range(nd)]
    Ostr = [int(np.prod(O[i + 1:], dtype=np.int64)) for i in range(nd)]
    if _empty(ctx):
        return True
    _launch(ctx, "col2im", "col2im", [f"const {x.ctype}* __restrict__ x", f"{y.ctype}* __restrict__ y"], [x, y],
            y.numel, ctype=y.ctype, acc=_acc(x.dtype), nd=nd, img=img, kshape=ks, KK=int(np.prod(ks)), pads=p[:nd],
            dil=dl, strides=st, O=O, Ostr=Ostr, OP=int(np.prod(O)))
    return True


@lowering("AffineGrid")
def _affine(ctx: LowerCtx):
    th, y = ctx.inp(0), ctx.out(0)
    if _empty(ctx):
        return True
    sp = list(y.shape[1:-1])
    _launch(ctx, "affine", "affine_grid", [f"const {th.ctype}* __restrict__ theta", f"{y.ctype}* __restrict__ y"],
            [th, y], y.numel, ctype=y.ctype, nd=len(sp), sp=sp, align=bool(ctx.attr("align_corners", 0)))
    return True


@lowering("DeformConv")
def _deform(ctx: LowerCtx):
    from ...ir.ops.modern import _dc_params
    x, w, off, y = ctx.inp(0), ctx.inp(1), ctx.inp(2), ctx.out(0)
    bias, mask = ctx.inp(3), ctx.inp(4)
    if _empty(ctx):
        return True
    nd = len(x.shape) - 2
    ks, dil, st, pads = _dc_params(ctx.attrs, nd, w.shape[2:])
    G, OG = int(ctx.attr("group", 1)), int(ctx.attr("offset_group", 1))
    C, M = x.shape[1], w.shape[0]
    outs = list(y.shape[2:])
    args = [f"const {x.ctype}* __restrict__ x", f"const {w.ctype}* __restrict__ w", f"const {off.ctype}* __restrict__ off"]
    bufs = [x, w, off]
    if bias is not None:
        args.append(f"const {bias.ctype}* __restrict__ bias")
        bufs.append(bias)
    if mask is not None:
        args.append(f"const {mask.ctype}* __restrict__ mask")
        bufs.append(mask)
    _launch(ctx, "deform", "deform_conv", args + [f"{y.ctype}* __restrict__ y"], bufs + [y], y.numel,
            ctype=y.ctype, acc=_acc(x.dtype), nd=nd, outs=outs, ins=list(x.shape[2:]), ks=list(ks), dil=list(dil),
            st=list(st), pads=list(pads[:nd]), M=M, Mg=M // G, Cg=C // G, C=C, cpo=C // OG, OG=OG,
            KP=int(np.prod(ks)), OP=int(np.prod(outs)), IP=int(np.prod(x.shape[2:])), has_bias=bias is not None,
            has_mask=mask is not None)
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
    acc = _acc(q.dtype)
    _launch(ctx, "linattn", "linear_attention", args, bufs, Bn * hkv * dv, ctype=q.ctype, sctype=state.ctype,
            acc=acc, dk=dk, dv=dv, hkv=hkv, hq_n=hq, group=hq // hkv, T=T, has_past=past is not None,
            has_decay=decay is not None, has_beta=beta is not None,
            gw=decay.shape[2] if decay is not None else 1, gper=decay is not None and decay.shape[2] == hkv * dk,
            bw=beta.shape[2] if beta is not None else 1, bper=beta is not None and beta.shape[2] == hkv and hkv > 1,
            scale=repr(float(np.float32(scale))) if acc == "float" else repr(float(scale)))
    return True


@lowering("HannWindow", "HammingWindow", "BlackmanWindow", "MelWeightMatrix")
def _const_signal(ctx: LowerCtx):
    """Fully determined by compile-time constant operands: evaluated by the reference at compile time."""
    from ...ir import registry
    vals = []
    for i in range(ctx.n_in):
        v = ctx.value(i)
        if v is None:
            ctx.fail(f"operand {i} must be a compile-time constant")
        vals.append(np.asarray(v))
    out = registry.REGISTRY[ctx.op.name].ref(ctx.attrs, *vals)
    ctx.alias(0, ctx.new_weight(np.asarray(out).astype(ctx.out(0).dtype.np).reshape(ctx.out_shape(0)), "const"))
    return True


@lowering("TreeEnsemble")
def _tree_ensemble(ctx: LowerCtx):
    """tree_ensemble.cu.j2: node tables become weights; one thread per sample."""
    from ...ir.ops.ml import _n_targets, _te_check
    a = ctx.attrs
    _te_check(a)
    x, y = ctx.inp(0), ctx.out(0)
    Nn, F = x.shape
    nt = _n_targets(a)
    nn = len(a.nodes_modes)
    miss = a.nodes_missing_value_tracks_true or (0,) * nn
    mem_off, mem_cnt, mvals = [0] * nn, [0] * nn, []
    if a.membership_values is not None:
        it = iter(a.membership_values)
        for i in range(nn):
            if a.nodes_modes[i] != 6:
                continue
            mem_off[i] = len(mvals)
            for v in it:
                if np.isnan(v):
                    break
                mvals.append(v)
            mem_cnt[i] = len(mvals) - mem_off[i]
    tab = np.array([[a.nodes_modes[i], a.nodes_featureids[i], a.nodes_truenodeids[i], a.nodes_trueleafs[i],
                     a.nodes_falsenodeids[i], a.nodes_falseleafs[i], miss[i], mem_off[i], mem_cnt[i]]
                    for i in range(nn)], np.int32).reshape(-1, 9)
    npdt = x.dtype.np
    bufs = [x, ctx.new_weight(tab, "nodes"), ctx.new_weight(np.asarray(a.nodes_splits, np.float64).astype(npdt), "splits"),
            ctx.new_weight(np.asarray(mvals or [0.0], np.float64).astype(npdt), "members"),
            ctx.new_weight(np.asarray(a.leaf_targetids, np.int32), "leaf_t"),
            ctx.new_weight(np.asarray(a.leaf_weights, np.float64), "leaf_w"),
            ctx.new_weight(np.asarray(a.tree_roots or [0], np.int32), "roots"),
            ctx.temp("f64", [max(Nn, 1), max(nt, 1)], "acc"), ctx.temp("u8", [max(Nn, 1), max(nt, 1)], "hit"), y]
    agg = a.aggregate_function
    k = ctx.render("tree_ensemble.cu.j2", "tree_ensemble", ctype=x.ctype, NT=nt, F=F, NTREES=len(a.tree_roots),
                   NNODES=nn, agg=agg, post=a.post_transform,
                   init={2: "__longlong_as_double(0x7ff0000000000000LL)", 3: "__longlong_as_double(0xfff0000000000000LL)"}.get(agg, "0.0"))
    if Nn:
        ctx.launch(k, ctx.grid1d(Nn, 128), 128, bufs + [ctx.i64(Nn)])
    return True
