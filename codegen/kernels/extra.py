"""Less common ops, each a small direct kernel (correctness first, one thread per output element or
per line unless noted):

  fill.cu.j2       ConstantOfShape, EyeLike, Trilu, Range, OneHot, Dropout's mask
  rownorm.cu.j2    InstanceNormalization, GroupNormalization, RMSNormalization, LpNormalization,
                   MeanVarianceNormalization
  scan.cu.j2       CumSum, CumProd, Hardmax, LRN
  scatter.cu.j2    GatherND, ScatterND, ScatterElements
  loss.cu.j2       NegativeLogLikelihoodLoss, SoftmaxCrossEntropyLoss (after a LogSoftmax)
  einsum.cu.j2     Einsum (direct contraction)
  attention.cu.j2  Attention (opset 23; KV concat + one thread per query row)
  rotary.cu.j2     RotaryEmbedding
Also: Shape / Size (compile-time constants), Dropout (inference: a view), Quantize/DequantizeLinear
(through the elementwise template with per-axis / blocked parameters).
"""
from __future__ import annotations

import math

import numpy as np

from ..lower import LowerCtx, compute_type, lowering
from .elementwise import elementwise_params, lit
from .movement import strided_copy
from .reduce import _axis_view


def _acc(dt) -> str:
    ct = compute_type(dt)
    if ct in ("float", "double"):
        return ct
    if ct == "bool":
        return "int64_t"
    return "uint64_t" if dt.kind == "uint" else "int64_t"


def _norm(a, rank):
    return a + rank if a < 0 else a


def _scalar_const(ctx, i, default=None):
    v = ctx.value(i)
    if v is None:
        return default
    a = np.asarray(v).reshape(-1)
    return a[0].item() if a.size else default


# ---------------------------------------------------------------- fill family

@lowering("ConstantOfShape")
def _constant_of_shape(ctx: LowerCtx):
    y = ctx.out(0)
    v = ctx.attr("value")
    val = 0 if v is None else np.asarray(v).reshape(-1)[0].item()
    if y.numel == 0:
        ctx.alias(0, ctx.new_weight(np.zeros(y.shape, y.dtype.np)))
        return True
    k = ctx.render("fill.cu.j2", "fill", kind="fill", ctype=y.ctype, value=lit(val, y.compute))
    ctx.launch(k, ctx.grid1d(y.numel), 256, [y, ctx.i64(y.numel)])
    return True


@lowering("EyeLike")
def _eyelike(ctx: LowerCtx):
    y = ctx.out(0)
    k = ctx.render("fill.cu.j2", "eyelike", kind="eye", ctype=y.ctype, cols=y.shape[1], k=int(ctx.attr("k", 0)))
    ctx.launch(k, ctx.grid1d(y.numel), 256, [y, ctx.i64(y.numel)])
    return True


@lowering("Trilu")
def _trilu(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    if y.numel == 0:
        ctx.alias(0, x)
        return True
    kv = _scalar_const(ctx, 1, 0) if (not ctx.has(1) or ctx.value(1) is not None) else None
    kb = ctx.inp(1) if kv is None else None
    k = ctx.render("fill.cu.j2", "trilu", kind="trilu", ctype=x.ctype, k_ptr=kb is not None,
                   kctype=kb.ctype if kb is not None else "", k=int(kv or 0), rows=x.shape[-2], cols=x.shape[-1],
                   upper=bool(ctx.attr("upper", 1)))
    ctx.launch(k, ctx.grid1d(y.numel), 256, [x] + ([kb] if kb is not None else []) + [y, ctx.i64(y.numel)])
    return True


@lowering("Range")
def _range(ctx: LowerCtx):
    y = ctx.out(0)
    if y.numel == 0:
        ctx.alias(0, ctx.new_weight(np.zeros(y.shape, y.dtype.np)))
        return True
    k = ctx.render("fill.cu.j2", "range", kind="range", ctype=y.ctype)
    ctx.launch(k, ctx.grid1d(y.numel), 256, [ctx.inp(0), ctx.inp(2), y, ctx.i64(y.numel)])
    return True


@lowering("OneHot")
def _onehot(ctx: LowerCtx):
    ind, vals, y = ctx.inp(0), ctx.inp(2), ctx.out(0)
    rank = len(y.shape)
    axis = _norm(int(ctx.attr("axis", -1)), rank)
    depth = y.shape[axis]
    inner = int(np.prod(y.shape[axis + 1:], dtype=np.int64))
    k = ctx.render("fill.cu.j2", "onehot", kind="onehot", ctype=y.ctype, ictype=ind.ctype, depth=depth, inner=inner)
    ctx.launch(k, ctx.grid1d(y.numel), 256, [ind, vals, y, ctx.i64(y.numel)])
    return True


@lowering("Dropout")
def _dropout(ctx: LowerCtx):
    if ctx.has(2):
        t = ctx.value(2)
        if t is None or bool(np.asarray(t).reshape(-1)[0]):
            ratio = _scalar_const(ctx, 1, 0.5) if ctx.has(1) else 0.5
            if t is None or ratio != 0:
                ctx.fail("training-mode Dropout is not supported by the CUDA backend (inference only)")
    ctx.alias(0, ctx.inp(0))
    if ctx.n_out > 1:
        m = ctx.out(1)
        k = ctx.render("fill.cu.j2", "fill", kind="fill", ctype=m.ctype, value="true")
        ctx.launch(k, ctx.grid1d(max(m.numel, 1)), 256, [m, ctx.i64(m.numel)])
    return True


@lowering("Shape", "Size")
def _shape(ctx: LowerCtx):
    s = ctx.shape(0)
    if ctx.op.name == "Size":
        arr = np.asarray(int(np.prod(s, dtype=np.int64)), np.int64)
    else:
        r = len(s)
        st = ctx.attr("start", 0) or 0
        en = ctx.attr("end", None)
        st = min(max(st + r if st < 0 else st, 0), r)
        en = r if en is None else min(max(en + r if en < 0 else en, 0), r)
        arr = np.asarray(s[st:en], np.int64)
    ctx.alias(0, ctx.new_weight(arr.reshape(ctx.out_shape(0)), "shape"))
    return True


# ---------------------------------------------------------------- quantization (elementwise template)

_QRANGE = {"i8": (-128, 127), "u8": (0, 255), "i16": (-32768, 32767), "u16": (0, 65535),
           "i32": (-2147483648, 2147483647), "u32": (0, 4294967295),
           "i4": (-8, 7), "u4": (0, 15), "i2": (-2, 1), "u2": (0, 3)}
_QFLOAT = ("f8e4m3", "f8e4m3fnuz", "f8e5m2", "f8e5m2fnuz", "f4e2m1")  # float targets: x / s (+ zp), cast


def _param_strides(ctx, i, xshape, axis, block):
    """Broadcast element strides (per x dim) of parameter operand i: scalar, per axis, or blocked
    (blocked needs a compile-time constant: expanded into a full weight)."""
    b = ctx.inp(i)
    n = b.numel
    rank = len(xshape)
    if len(b.shape) == 0 or (n == 1 and not block):
        return b, [0] * rank
    if not block:
        st = [0] * rank
        st[axis] = 1
        return b, st
    if len(b.shape) != rank:
        ctx.fail("a blocked scale / zero point must have the input's rank")
    divs = [1] * rank
    divs[axis] = block
    return b, (list(b.strides()), divs)


@lowering("QuantizeLinear", "DequantizeLinear")
def _quant(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    rank = len(x.shape)
    block = int(ctx.attr("block_size", 0) or 0)
    s = ctx.inp(1)
    axis = _norm(int(ctx.attr("axis", 1)), rank) if (s.numel > 1 or block) else 0
    bufs, strides = [x], [None]
    for i in (1, 2):
        if ctx.has(i):
            b, st = _param_strides(ctx, i, x.shape, axis, block)
            bufs.append(b)
            strides.append(st)
    has_zp = len(bufs) > 2
    wide = "f64" in (x.dtype.short, s.dtype.short, y.dtype.short) or x.dtype.short == "i32"
    cd = "double" if wide else "float"
    st = "double" if ctx.op.name == "QuantizeLinear" else cd
    if ctx.op.name == "QuantizeLinear" and y.dtype.short in _QFLOAT:
        from .elementwise import F8_MAX
        e = f"(({cd})x0 / ({cd})x1)"
        if has_zp:
            e = f"({e} + ({cd})x2)"
        expr = f"static_cast<float>({e})"
        if y.dtype.short in F8_MAX and int(ctx.attr("saturate", 1)):
            expr = f"nnc_satf({expr}, {F8_MAX[y.dtype.short]!r}f)"
        st = "float"
    elif ctx.op.name == "QuantizeLinear":
        if y.dtype.short not in _QRANGE:
            ctx.fail(f"quantizing to {y.dtype} is not supported by the CUDA backend")
        lo, hi = _QRANGE[y.dtype.short]
        e = f"rint((double)(({cd})x0 / ({cd})x1))"
        if has_zp:
            e = f"({e} + (double)x2)"
        expr = f"fmin(fmax({e}, {float(lo)!r}), {float(hi)!r})"
    else:
        e = f"(({cd})x0 - ({cd})x2)" if has_zp else f"({cd})x0"
        expr = f"({e} * ({cd})x1)"
    params = elementwise_params(bufs, y.shape, [(st, "t0", expr)], [(y, "t0")])
    for p, st in zip(params["inputs"], strides):
        if isinstance(st, tuple):  # blocked: (strides, per-dim coordinate divisors)
            st, p["divs"] = st
        p["strides"] = st
    params["need_coords"] = any(st is not None for st in strides)
    k = ctx.render("elementwise.cu.j2", "ew_" + ctx.op.name.lower(), **params)
    ctx.launch(k, ctx.grid1d(y.numel), 256, [*bufs, y, ctx.i64(y.numel)])
    return True


# ---------------------------------------------------------------- normalisations

def _rownorm(ctx, kind, x, y, outer, R, inner, scale=None, bias=None, **extra):
    acc = "double" if x.dtype.short == "f64" else "float"
    p = dict(kind=kind, ctype=x.ctype, acc=acc, outer=outer, R=R, inner=inner, has_scale=scale is not None,
             has_bias=bias is not None, sctype=scale.ctype if scale is not None else "",
             bctype=bias.ctype if bias is not None else "", epsilon=repr(float(ctx.attr("epsilon", 1e-5) or 0.0)),
             groups=1, cpg=1, spatial=1, scale_n=1, p=2)
    p.update(extra)
    k = ctx.render("rownorm.cu.j2", kind + "norm", **p)
    args = [x] + [b for b in (scale, bias) if b is not None] + [y]
    ctx.launch(k, max(1, min(outer * inner, 65535)), 256, args)


@lowering("InstanceNormalization", "GroupNormalization")
def _group_norm(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    N, C = x.shape[:2]
    spatial = int(np.prod(x.shape[2:], dtype=np.int64))
    G = C if ctx.op.name == "InstanceNormalization" else int(ctx.attr("num_groups"))
    sc, bi = ctx.inp(1), ctx.inp(2)
    if sc.numel != C or bi.numel != C:
        ctx.fail(f"scale/bias must have C={C} elements")
    _rownorm(ctx, "group", x, y, N * G, (C // G) * spatial, 1, sc, bi, groups=G, cpg=C // G, spatial=spatial)
    return True


@lowering("RMSNormalization")
def _rms_norm(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    rank = len(x.shape)
    axis = _norm(int(ctx.attr("axis", -1)), rank)
    outer = int(np.prod(x.shape[:axis], dtype=np.int64))
    R = int(np.prod(x.shape[axis:], dtype=np.int64))
    sc = ctx.inp(1)
    if sc.numel not in (1, R) or (sc.numel == R and tuple(sc.shape[-(rank - axis):]) != tuple(x.shape[axis:])
                                  and len(sc.shape) >= rank - axis):
        ctx.fail("scale must cover the normalised dims")
    _rownorm(ctx, "rms", x, y, outer, R, 1, sc, scale_n=sc.numel)
    return True


@lowering("LpNormalization")
def _lp_norm(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    p = int(ctx.attr("p", 2))
    if p not in (1, 2):
        ctx.fail("p must be 1 or 2")
    outer, R, inner = _axis_view(x.shape, int(ctx.attr("axis", -1)))
    _rownorm(ctx, "lp", x, y, outer, R, inner, p=p)
    return True


@lowering("MeanVarianceNormalization")
def _mvn(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    rank = len(x.shape)
    axes = sorted({_norm(int(a), rank) for a in (ctx.attr("axes") or (0, 2, 3))})
    kept = [d for d in range(rank) if d not in axes]
    perm = kept + axes
    st = x.strides()
    tshape = [x.shape[p] for p in perm]
    outer = int(np.prod([x.shape[d] for d in kept], dtype=np.int64))
    R = int(np.prod([x.shape[d] for d in axes], dtype=np.int64))
    if perm == list(range(rank)):
        _rownorm(ctx, "mvn", x, y, outer, R, 1)
        return True
    t = ctx.temp(x.dtype, tshape, "mvn_t")
    strided_copy(ctx, x, t, tshape, [st[p] for p in perm])
    t2 = ctx.temp(x.dtype, tshape, "mvn_n")
    _rownorm(ctx, "mvn", t, t2, outer, R, 1)
    inv = [perm.index(d) for d in range(rank)]
    tst = t2.strides()
    strided_copy(ctx, t2, y, y.shape, [tst[i] for i in inv])
    return True


# ---------------------------------------------------------------- scans

@lowering("CumSum", "CumProd")
def _cum(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    rank = len(x.shape)
    if y.numel == 0:
        ctx.alias(0, x)
        return True
    av = ctx.value(1)
    common = dict(kind="cum", ctype=x.ctype, acc=_acc(x.dtype), op="prod" if ctx.op.name == "CumProd" else "sum",
                  exclusive=bool(ctx.attr("exclusive", 0)), reverse=bool(ctx.attr("reverse", 0)))
    if av is not None:
        outer, R, inner = _axis_view(x.shape, int(np.asarray(av).reshape(-1)[0]))
        k = ctx.render("scan.cu.j2", ctx.op.name.lower(), ax_ptr=False, outer=outer, R=R, inner=inner, **common)
        ctx.launch(k, ctx.grid1d(outer * inner), 256, [x, y])
    else:
        ab = ctx.inp(1)
        k = ctx.render("scan.cu.j2", ctx.op.name.lower(), ax_ptr=True, axctype=ab.ctype, shape=list(x.shape) or [1],
                       **common)
        ctx.launch(k, ctx.grid1d(x.numel), 256, [x, ab, y])
    return True


@lowering("Hardmax")
def _hardmax(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    outer, R, inner = _axis_view(x.shape, int(ctx.attr("axis", -1)))
    k = ctx.render("scan.cu.j2", "hardmax", kind="hardmax", ctype=x.ctype, acc=_acc(x.dtype), ax_ptr=False,
                   outer=outer, R=R, inner=inner)
    ctx.launch(k, ctx.grid1d(outer * inner), 256, [x, y])
    return True


@lowering("LRN")
def _lrn(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    size = int(ctx.attr("size"))
    C = x.shape[1]
    inner = int(np.prod(x.shape[2:], dtype=np.int64))
    lo = (size - 1) // 2
    k = ctx.render("scan.cu.j2", "lrn", kind="lrn", ctype=x.ctype, acc="double" if x.dtype.short == "f64" else "float",
                   numel=x.numel, inner=inner, C=C, lo=lo, hi=size - 1 - lo, size=size,
                   alpha=repr(float(ctx.attr("alpha", 1e-4))), beta=repr(float(ctx.attr("beta", 0.75))),
                   bias=repr(float(ctx.attr("bias", 1.0))))
    ctx.launch(k, ctx.grid1d(x.numel), 256, [x, y])
    return True


# ---------------------------------------------------------------- gather / scatter

@lowering("GatherND")
def _gathernd(ctx: LowerCtx):
    x, ind, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    b = int(ctx.attr("batch_dims", 0))
    kk = ind.shape[-1]
    if y.numel == 0:
        ctx.alias(0, ctx.new_weight(np.zeros(y.shape, y.dtype.np)))
        return True
    nb = int(np.prod(x.shape[:b], dtype=np.int64))
    slice_ = int(np.prod(x.shape[b + kk:], dtype=np.int64))
    nj = int(np.prod(ind.shape[b:-1], dtype=np.int64))
    xs = x.strides()
    k = ctx.render("scatter.cu.j2", "gathernd", kind="gathernd", ctype=x.ctype, ictype=ind.ctype, k=max(kk, 1),
                   dims=list(x.shape[b:b + kk]) or [1], xstrides=xs[b:b + kk] or [0], slice=slice_, nj=nj,
                   bstride=(xs[b - 1] if b > 0 else 0) if b else 0, reduction="none", acc="")
    if kk == 0:
        ctx.fail("GatherND with an empty index depth is not supported")
    ctx.launch(k, ctx.grid1d(y.numel), 256, [x, ind, y, ctx.i64(y.numel)])
    return True


def _scatter_prologue(ctx):
    x, y = ctx.inp(0), ctx.out(0)
    ctx.copy(y, x)
    return x, ctx.inp(1), ctx.inp(2), y


@lowering("ScatterND")
def _scatternd(ctx: LowerCtx):
    x, ind, upd, y = _scatter_prologue(ctx)
    kk = ind.shape[-1]
    nupd = int(np.prod(ind.shape[:-1], dtype=np.int64))
    slice_ = int(np.prod(x.shape[kk:], dtype=np.int64))
    if nupd == 0 or slice_ == 0:
        return True
    k = ctx.render("scatter.cu.j2", "scatternd", kind="scatternd", ctype=x.ctype, ictype=ind.ctype, k=kk,
                   dims=list(x.shape[:kk]), xstrides=x.strides()[:kk], slice=slice_, nupd=nupd,
                   reduction=ctx.attr("reduction", "none"), acc=_acc(x.dtype))
    ctx.launch(k, ctx.grid1d(slice_), 256, [ind, upd, y])
    return True


@lowering("ScatterElements")
def _scatter_elements(ctx: LowerCtx):
    x, ind, upd, y = _scatter_prologue(ctx)
    if ind.numel == 0:
        return True
    rank = len(x.shape)
    axis = _norm(int(ctx.attr("axis", 0)), rank)
    outer, A, inner = _axis_view(ind.shape, axis)
    k = ctx.render("scatter.cu.j2", "scatter_elements", kind="scatterel", ctype=x.ctype, ictype=ind.ctype,
                   ishape=list(ind.shape), xstrides=x.strides(), axis=axis, outer=outer, inner=inner, A=A,
                   D=x.shape[axis], reduction=ctx.attr("reduction", "none"), acc=_acc(x.dtype))
    ctx.launch(k, ctx.grid1d(outer * inner), 256, [ind, upd, y])
    return True


# ---------------------------------------------------------------- losses

@lowering("NegativeLogLikelihoodLoss", "SoftmaxCrossEntropyLoss")
def _loss(ctx: LowerCtx):
    x, tgt = ctx.inp(0), ctx.inp(1)
    w = ctx.inp(2)
    y = ctx.out(0)
    N, C = x.shape[0], x.shape[1]
    D = int(np.prod(x.shape[2:], dtype=np.int64))
    lp = x
    if ctx.op.name == "SoftmaxCrossEntropyLoss":
        lp = ctx.out(1) if ctx.n_out > 1 else ctx.temp(x.dtype, x.shape, "logp")
        variant = "row" if D == 1 else "col"
        k = ctx.render("softmax.cu.j2", "logsoftmax", variant=variant, outer=N, R=C, inner=D, ctype=x.ctype, log=True)
        ctx.launch(k, min(N, 65535) if variant == "row" else ctx.grid1d(N * D), 256, [x, lp])
    ign = ctx.attr("ignore_index")
    red = ctx.attr("reduction", "mean")
    k = ctx.render("loss.cu.j2", "nll_loss", ctype=lp.ctype, tctype=tgt.ctype, has_weight=w is not None,
                   wctype=w.ctype if w is not None else "", octype=y.ctype, acc="double" if x.dtype.short == "f64" else "float",
                   N=N, C=C, D=D, has_ignore=ign is not None, ignore=int(ign or 0), reduction=red,
                   weighted=w is not None or ign is not None)
    ctx.launch(k, 1, 256, [lp, tgt] + ([w] if w is not None else []) + [y])
    return True


# ---------------------------------------------------------------- Einsum

def _einsum_plan(eq: str, shapes):
    eq = eq.replace(" ", "")
    lhs, rhs = eq.split("->") if "->" in eq else (eq, None)
    terms = lhs.split(",")
    pool = [c for c in "0123456789!@#$%^&*" if c not in eq]
    ell_rank = 0
    for t, s in zip(terms, shapes):
        if "..." in t:
            ell_rank = max(ell_rank, len(s) - (len(t) - 3))
    ell = "".join(pool[:ell_rank])
    letters_of = []
    for t, s in zip(terms, shapes):
        if "..." in t:
            pre, post = t.split("...")
            n = len(s) - len(pre) - len(post)
            t = pre + ell[ell_rank - n:] + post
        if len(t) != len(s):
            raise ValueError(f"term {t!r} does not match rank {len(s)}")
        letters_of.append(t)
    ext = {}
    for t, s in zip(letters_of, shapes):
        for c, d in zip(t, s):
            if c not in ext or ext[c] == 1:
                ext[c] = int(d)
    if rhs is None:
        cnt = {}
        for t in letters_of:
            for c in t:
                cnt[c] = cnt.get(c, 0) + 1
        rhs = ell + "".join(sorted(c for c, n in cnt.items() if n == 1 and c not in ell))
    else:
        rhs = rhs.replace("...", ell)
    red = [c for c in dict.fromkeys("".join(letters_of)) if c not in rhs]
    return letters_of, rhs, red, ext


@lowering("Einsum")
def _einsum(ctx: LowerCtx):
    y = ctx.out(0)
    ins = [ctx.inp(i) for i in range(ctx.n_in)]
    try:
        letters_of, rhs, red, ext = _einsum_plan(ctx.attr("equation"), [b.shape for b in ins])
    except ValueError as e:
        ctx.fail(str(e))
    inputs = []
    for b, t in zip(ins, letters_of):
        st = b.strides()
        per = {}
        for c, d, s in zip(t, b.shape, st):
            if d == 1 and ext[c] != 1:
                continue
            per[c] = per.get(c, 0) + s
        inputs.append({"ctype": b.ctype, "out_strides": [per.get(c, 0) for c in rhs] or [0],
                       "red_strides": [per.get(c, 0) for c in red] or [0]})
    out_ext = [ext[c] for c in rhs] or [1]
    red_ext = [ext[c] for c in red] or [1]
    acc = _acc(y.dtype)
    k = ctx.render("einsum.cu.j2", "einsum", inputs=inputs, ctype=y.ctype, acc=acc, out_ext=out_ext, red_ext=red_ext,
                   red_total=int(np.prod(red_ext, dtype=np.int64)))
    if y.numel:
        ctx.launch(k, ctx.grid1d(y.numel), 256, [*ins, y, ctx.i64(y.numel)])
    else:
        ctx.alias(0, ctx.new_weight(np.zeros(y.shape, y.dtype.np)))
    return True


# ---------------------------------------------------------------- Attention / RotaryEmbedding

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


@lowering("BitCast")
def _bitcast(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    if x.dtype.bits != y.dtype.bits:
        ctx.fail(f"BitCast {x.dtype} -> {y.dtype} changes the element size")
    ctx.alias(0, x)  # a reinterpreting view
    return True


@lowering("GridSample")
def _grid_sample(ctx: LowerCtx):
    x, g, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    nd = len(x.shape) - 2
    if not 1 <= nd <= 3:
        ctx.fail(f"{nd}-D GridSample is not supported")
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(ctx.attr("mode", "linear"), ctx.attr("mode", "linear"))
    if mode not in ("nearest", "linear", "cubic"):
        ctx.fail(f"mode {mode!r} is not supported")
    k = ctx.render("gridsample.cu.j2", "grid_sample", ctype=x.ctype, gctype=g.ctype, nd=nd, dims=list(x.shape[2:]),
                   C=x.shape[1], out_total=int(np.prod(y.shape[2:], dtype=np.int64)),
                   in_total=int(np.prod(x.shape[2:], dtype=np.int64)), mode=mode,
                   padding=ctx.attr("padding_mode", "zeros"), align_corners=bool(ctx.attr("align_corners", 0)))
    if y.numel:
        ctx.launch(k, ctx.grid1d(y.numel), 256, [x, g, y, ctx.i64(y.numel)])
    else:
        ctx.alias(0, ctx.new_weight(np.zeros(y.shape, y.dtype.np)))
    return True
