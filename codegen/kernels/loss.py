"""NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss (loss.cu.j2, one block; the latter after a
LogSoftmax of softmax.cu.j2 into its log_prob output or a temp): class weights, ignore_index, every
reduction."""
from __future__ import annotations

import numpy as np

from ..lower import LowerCtx, lowering


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
