"""QuantizeLinear / DequantizeLinear through the elementwise template (elementwise.cu.j2): scale and
zero point broadcast as scalars, per axis, or blocked (a blocked operand carries per-dim coordinate
divisors); integer targets round and saturate to _QRANGE, float8 / float4 targets divide, offset and
cast (saturating where the attribute asks)."""
from __future__ import annotations

from ..lower import LowerCtx, lowering
from ._helpers import norm_axis
from .elementwise import elementwise_params


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
    axis = norm_axis(int(ctx.attr("axis", 1)), rank) if (s.numel > 1 or block) else 0
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
