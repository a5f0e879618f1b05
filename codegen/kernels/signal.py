"""DFT (direct O(n^2) in double, forward / inverse / onesided / irfft) and STFT (framed, windowed direct
DFT): signal.cu.j2, one thread per output element. HannWindow / HammingWindow / BlackmanWindow and
MelWeightMatrix are compile-time constants (evaluated by the reference, emitted as weights)."""
from __future__ import annotations

import numpy as np

from ..lower import LowerCtx, lowering


def _scalar(ctx, i):
    v = ctx.value(i)
    if v is None:
        ctx.fail(f"operand {i} must be a compile-time constant")
    return int(np.asarray(v).reshape(-1)[0])


@lowering("DFT")
def _dft(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    r = len(x.shape)
    ax = (_scalar(ctx, 2) if ctx.has(2) else -2) % r
    inverse, onesided = bool(ctx.attr("inverse", 0)), bool(ctx.attr("onesided", 0))
    if ctx.has(1):
        n = _scalar(ctx, 1)
    elif inverse and onesided:
        n = 2 * (x.shape[ax] - 1)
    else:
        n = x.shape[ax]
    if y.numel == 0 or n <= 0:
        ctx.alias(0, ctx.new_weight(np.zeros(y.shape, y.dtype.np)))
        return True
    outer = int(np.prod(x.shape[:ax], dtype=np.int64))
    inner = int(np.prod(x.shape[ax + 1:-1], dtype=np.int64))
    nout = y.shape[ax]
    irfft = inverse and onesided
    k = ctx.render("signal.cu.j2", "dft", kind="dft", ctype=x.ctype, inner=inner, nout=nout, Lin=x.shape[ax],
                   cin=x.shape[-1], n=n, inverse=inverse, irfft=irfft)
    total = outer * nout * inner
    ctx.launch(k, ctx.grid1d(total), 256, [x, y, ctx.i64(total)])
    return True


@lowering("STFT")
def _stft(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    step = _scalar(ctx, 1)
    win = ctx.inp(2)
    B, L, cin = x.shape
    _, F, bins, _ = y.shape
    fl = _scalar(ctx, 3) if ctx.has(3) else (win.shape[0] if win is not None else L)
    if y.numel == 0:
        ctx.alias(0, ctx.new_weight(np.zeros(y.shape, y.dtype.np)))
        return True
    k = ctx.render("signal.cu.j2", "stft", kind="stft", ctype=x.ctype, has_win=win is not None,
                   wctype=win.ctype if win is not None else "", bins=bins, F=F, L=L, step=step, cin=cin, fl=fl)
    total = B * F * bins
    ctx.launch(k, ctx.grid1d(total), 256, [x] + ([win] if win is not None else []) + [y, ctx.i64(total)])
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
