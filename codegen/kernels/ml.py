"""ai.onnx.ml ops: TreeEnsemble (tree_ensemble.cu.j2: node tables become weights; one thread per
sample), ArrayFeatureExtractor (array_feature_extractor.cu.j2, one thread per output element)."""
from __future__ import annotations

import numpy as np

from ..lower import LowerCtx, lowering
from ._helpers import empty_result, grid_stride_launch


@lowering("ArrayFeatureExtractor")
def _afe(ctx: LowerCtx):
    x, ind, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    if empty_result(ctx):
        return True
    grid_stride_launch(ctx, "array_feature_extractor.cu.j2", "array_feature_extractor",
                       [f"const {x.ctype}* __restrict__ x", f"const {ind.ctype}* __restrict__ ind",
                        f"{y.ctype}* __restrict__ y"],
                       [x, ind, y], y.numel, J=ind.numel, D=x.shape[-1] if x.shape else 1)
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
