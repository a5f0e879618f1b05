"""ai.onnx.ml ops (registered under their ONNX names): Binarizer, ArrayFeatureExtractor,
TreeEnsemble. String tensors are out of scope (no LabelEncoder).

TreeEnsemble's tensor attributes (nodes_splits, leaf_weights, ...) are held as float tuples.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Optional

import numpy as np

from ..errors import NncError
from ..registry import NoAttrs, register
from ..types import I64
from ._util import same_as
from .gather import _fix_index


# ---------------------------------------------------------------- Binarizer

@dataclass(frozen=True)
class BinarizerAttrs:
    threshold: float = 0.0


def _binarizer_ref(a: BinarizerAttrs, x):
    return (x > a.threshold).astype(x.dtype)


register("Binarizer", BinarizerAttrs, infer=same_as(0), ref=_binarizer_ref,
         doc="1 where X > threshold else 0, in X's dtype.")


# ---------------------------------------------------------------- ArrayFeatureExtractor

def _afe_infer(ctx):
    s, si = ctx.shape(0), ctx.shape(1)
    if ctx.dtype(1) != I64:
        ctx.fail(f"indices must be i64, got {ctx.dtype(1)}")
    n = 1
    for d in si:
        n = n * d
    if len(s) <= 1:
        return [ctx.type(0).with_shape((1, n))]
    return [ctx.type(0).with_shape(tuple(s[:-1]) + (n,))]


def _afe_ref(a, x, idx):
    flat = _fix_index(idx.reshape(-1), x.shape[-1])
    y = np.take(x, flat, axis=-1)
    return y.reshape((1, flat.size) if x.ndim <= 1 else x.shape[:-1] + (flat.size,))


register("ArrayFeatureExtractor", NoAttrs, infer=_afe_infer, ref=_afe_ref, inputs=2,
         doc="Selects elements along the last axis by a flat index list (1-D data gives (1, n)).")


# ---------------------------------------------------------------- TreeEnsemble

@dataclass(frozen=True)
class TreeEnsembleAttrs:
    tree_roots: tuple[int, ...]
    nodes_modes: tuple[int, ...]  # 0 LEQ 1 LT 2 GTE 3 GT 4 EQ 5 NEQ 6 MEMBER
    nodes_featureids: tuple[int, ...]
    nodes_splits: tuple[float, ...]
    nodes_truenodeids: tuple[int, ...]
    nodes_trueleafs: tuple[int, ...]
    nodes_falsenodeids: tuple[int, ...]
    nodes_falseleafs: tuple[int, ...]
    leaf_targetids: tuple[int, ...]
    leaf_weights: tuple[float, ...]
    aggregate_function: int = 1  # 0 AVERAGE 1 SUM 2 MIN 3 MAX
    post_transform: int = 0  # 0 NONE 1 SOFTMAX 2 LOGISTIC 3 SOFTMAX_ZERO 4 PROBIT
    n_targets: Optional[int] = None
    nodes_hitrates: Optional[tuple[float, ...]] = None
    nodes_missing_value_tracks_true: Optional[tuple[int, ...]] = None
    membership_values: Optional[tuple[float, ...]] = None


def _n_targets(a: TreeEnsembleAttrs) -> int:
    if a.n_targets is not None:
        return a.n_targets
    return max(a.leaf_targetids, default=-1) + 1


def _te_check(a: TreeEnsembleAttrs):
    nn = len(a.nodes_modes)
    for f in ("nodes_featureids", "nodes_splits", "nodes_truenodeids", "nodes_trueleafs",
              "nodes_falsenodeids", "nodes_falseleafs"):
        if len(getattr(a, f)) != nn:
            raise NncError(f"TreeEnsemble: {f} has {len(getattr(a, f))} entries, nodes_modes {nn}")
    if a.nodes_missing_value_tracks_true is not None and len(a.nodes_missing_value_tracks_true) != nn:
        raise NncError("TreeEnsemble: nodes_missing_value_tracks_true length differs from nodes_modes")
    if len(a.leaf_targetids) != len(a.leaf_weights):
        raise NncError("TreeEnsemble: leaf_targetids and leaf_weights lengths differ")
    if any(m < 0 or m > 6 for m in a.nodes_modes):
        raise NncError(f"TreeEnsemble: unknown node mode in {a.nodes_modes}")
    if a.aggregate_function not in (0, 1, 2, 3):
        raise NncError(f"TreeEnsemble: unknown aggregate_function {a.aggregate_function}")
    if a.post_transform not in (0, 1, 2, 3, 4):
        raise NncError(f"TreeEnsemble: unknown post_transform {a.post_transform}")
    n_member = sum(m == 6 for m in a.nodes_modes)
    if n_member:
        if a.membership_values is None:
            raise NncError("TreeEnsemble: BRANCH_MEMBER nodes need membership_values")
        if sum(np.isnan(v) for v in a.membership_values) != n_member:
            raise NncError("TreeEnsemble: membership_values must hold one NaN-ended set per member node")
    nt = _n_targets(a)
    if any(t < 0 or t >= nt for t in a.leaf_targetids):
        raise NncError(f"TreeEnsemble: leaf_targetids out of range for {nt} targets")


def _te_infer(ctx):
    a = ctx.attrs
    _te_check(a)
    s = ctx.shape(0)
    if not ctx.dtype(0).is_float:
        ctx.fail(f"X must be floating point, got {ctx.dtype(0)}")
    if len(s) != 2:
        ctx.fail(f"X must be rank 2 (N, F), got rank {len(s)}")
    return [ctx.type(0).with_shape((s[0], _n_targets(a)))]


def _te_ref(a: TreeEnsembleAttrs, x):
    _te_check(a)
    cdt = np.float64 if x.dtype == np.float64 else np.float32
    xf = x.astype(cdt)
    n = xf.shape[0]
    nt = _n_targets(a)
    modes = np.array(a.nodes_modes, np.int64)
    feat = np.array(a.nodes_featureids, np.int64)
    if feat.size and (feat.min() < 0 or feat.max() >= xf.shape[1]):
        raise NncError(f"TreeEnsemble: feature ids out of range for {xf.shape[1]} features")
    split = np.array(a.nodes_splits, np.float64).astype(cdt)  # thresholds in the input precision
    tnode, fnode = np.array(a.nodes_truenodeids, np.int64), np.array(a.nodes_falsenodeids, np.int64)
    tleaf, fleaf = np.array(a.nodes_trueleafs, bool), np.array(a.nodes_falseleafs, bool)
    miss = (np.array(a.nodes_missing_value_tracks_true, bool) if a.nodes_missing_value_tracks_true
            is not None else np.zeros(len(modes), bool))
    members: dict[int, np.ndarray] = {}
    if a.membership_values is not None:
        it = iter(a.membership_values)
        for i in np.nonzero(modes == 6)[0]:
            s = []
            for v in it:
                if np.isnan(v):
                    break
                s.append(v)
            members[int(i)] = np.array(s, np.float64).astype(cdt)
    leaf_w = np.array(a.leaf_weights, np.float64)
    leaf_t = np.array(a.leaf_targetids, np.int64)

    agg = a.aggregate_function
    acc = np.zeros((n, nt), np.float64)
    if agg == 2:
        acc[:] = np.inf
    elif agg == 3:
        acc[:] = -np.inf
    hit = np.zeros((n, nt), bool)
    rows = np.arange(n)
    for root in a.tree_roots:
        node = np.full(n, root, np.int64)
        at_leaf = np.zeros(n, bool)
        if tleaf[root] and fleaf[root] and tnode[root] == fnode[root]:  # a single-leaf tree
            node[:], at_leaf[:] = tnode[root], True
        for _ in range(len(modes) + 1):
            act = ~at_leaf
            if not act.any():
                break
            r, nd = rows[act], node[act]
            v = xf[r, feat[nd]]
            sp = split[nd]
            md = modes[nd]
            with np.errstate(invalid="ignore"):
                res = np.select([md == 0, md == 1, md == 2, md == 3, md == 4, md == 5],
                                [v <= sp, v < sp, v >= sp, v > sp, v == sp, v != sp], False)
            for i, s in members.items():
                sel = nd == i
                if sel.any():
                    res[sel] = np.isin(v[sel], s)
            res |= miss[nd] & np.isnan(v)
            node[act] = np.where(res, tnode[nd], fnode[nd])
            at_leaf[act] = np.where(res, tleaf[nd], fleaf[nd])
        else:
            raise NncError("TreeEnsemble: a tree has a cycle")
        w, t = leaf_w[node], leaf_t[node]
        if agg in (0, 1):
            np.add.at(acc, (rows, t), w)
        elif agg == 2:
            np.minimum.at(acc, (rows, t), w)
        else:
            np.maximum.at(acc, (rows, t), w)
        hit[rows, t] = True
    if agg == 0 and a.tree_roots:
        acc /= len(a.tree_roots)
    acc = np.where(hit, acc, 0.0)
    pt = a.post_transform
    if pt == 1:
        e = np.exp(acc - acc.max(axis=1, keepdims=True))
        acc = e / e.sum(axis=1, keepdims=True)
    elif pt == 2:
        acc = 1.0 / (1.0 + np.exp(-acc))
    elif pt == 3:
        nz = acc != 0
        mx = np.where(nz, acc, -np.inf).max(axis=1, keepdims=True)
        e = np.where(nz, np.exp(acc - np.where(np.isfinite(mx), mx, 0)), 0.0)
        sm = e.sum(axis=1, keepdims=True)
        acc = np.where(sm > 0, e / np.where(sm > 0, sm, 1), 0.0)
    elif pt == 4:
        inv = NormalDist().inv_cdf
        acc = np.vectorize(lambda p: inv(p) if 0 < p < 1 else (np.inf if p >= 1 else -np.inf),
                           otypes=[np.float64])(acc)
    return acc.astype(x.dtype)


register("TreeEnsemble", TreeEnsembleAttrs, infer=_te_infer, ref=_te_ref,
         doc="ai.onnx.ml tree ensemble (regressor / classifier scores), one row per sample.")
