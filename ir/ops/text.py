"""Text featurisation over integer token ids: TfIdfVectorizer (int64 pools; string pools are out
of scope, as are string tensors)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..registry import register
from ..types import F32, TensorType


@dataclass(frozen=True)
class TfIdfAttrs:
    max_gram_length: int
    max_skip_count: int
    min_gram_length: int
    mode: str
    ngram_counts: tuple[int, ...]
    ngram_indexes: tuple[int, ...]
    pool_int64s: tuple[int, ...] = ()
    pool_strings: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()


def _infer(ctx):
    a = ctx.attrs
    if a.pool_strings:
        ctx.fail("string pools are not supported (string tensors are out of scope)")
    if a.mode not in ("TF", "IDF", "TFIDF"):
        ctx.fail(f"mode must be TF, IDF or TFIDF, not {a.mode!r}")
    size = max(a.ngram_indexes) + 1
    s = ctx.shape(0)
    if len(s) not in (1, 2):
        ctx.fail(f"input must be [C] or [N, C], got rank {len(s)}")
    return [TensorType(F32, (size,) if len(s) == 1 else (s[0], size))]


def _pool(a: TfIdfAttrs) -> dict:
    """n-gram tuple -> output column. Ids run over every pooled n-gram, in pool order."""
    out, gid, pool = {}, 0, list(a.pool_int64s)
    for n, start in enumerate(a.ngram_counts, 1):
        end = a.ngram_counts[n] if n < len(a.ngram_counts) else len(pool)
        for i in range(start, end, n):
            out[tuple(pool[i:i + n])] = a.ngram_indexes[gid]
            gid += 1
    return out


def _ref(a: TfIdfAttrs, x):
    pool = _pool(a)
    rows = x.reshape(1, -1) if x.ndim == 1 else x
    size = max(a.ngram_indexes) + 1
    counts = np.zeros((rows.shape[0], size), np.int64)
    for r, row in enumerate(rows.tolist()):
        lo = a.min_gram_length
        for skip in range(1, a.max_skip_count + 2):
            for start in range(len(row)):
                for n in range(lo, a.max_gram_length + 1):
                    idx = [start + k * skip for k in range(n)]
                    if idx[-1] >= len(row):
                        break
                    col = pool.get(tuple(row[i] for i in idx))
                    if col is not None:
                        counts[r, col] += 1
            if lo == 1:  # unigrams do not depend on the skip: count them once
                lo = 2
                if lo > a.max_gram_length:
                    break
    w = np.asarray(a.weights, np.float32) if a.weights else None
    if a.mode == "TF":
        y = counts.astype(np.float32)
    elif a.mode == "IDF":
        y = (counts > 0).astype(np.float32) * (w if w is not None else 1)
    else:
        y = counts.astype(np.float32) * (w if w is not None else 1)
    y = y.astype(np.float32)
    return y.reshape(size) if x.ndim == 1 else y


register("TfIdfVectorizer", TfIdfAttrs, infer=_infer, ref=_ref,
         doc="n-gram counts (TF), presence (IDF) or weighted counts (TFIDF) over an int64 pool.")
