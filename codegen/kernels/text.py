"""Text featurisation (tfidf.cu.j2): TfIdfVectorizer over an int64 pool. The pool is known at
compile time, so the n-grams are regrouped by output column into CSR tables stored as weights;
one thread then computes one output element without atomics."""
from __future__ import annotations

import numpy as np

from ..lower import LowerCtx, lowering


def _tables(a) -> tuple:
    """(col_begin, entry offsets, entry lengths, tokens) grouping the pool's n-grams by column."""
    pool = list(a.pool_int64s)
    entries = []  # (column, n-gram tokens), in pool order
    gid = 0
    for n, start in enumerate(a.ngram_counts, 1):
        end = a.ngram_counts[n] if n < len(a.ngram_counts) else len(pool)
        for i in range(start, end, n):
            entries.append((a.ngram_indexes[gid], pool[i:i + n]))
            gid += 1
    size = max(a.ngram_indexes) + 1
    entries.sort(key=lambda e: e[0])
    col_begin = np.searchsorted([c for c, _ in entries], np.arange(size + 1)).astype(np.int64)
    lens = np.array([len(t) for _, t in entries] or [0], np.int64)
    offs = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    tokens = np.array([x for _, t in entries for x in t] or [0], np.int64)
    return col_begin, offs, lens, tokens


@lowering("TfIdfVectorizer")
def _tfidf(ctx: LowerCtx):
    a = ctx.attrs
    x, y = ctx.inp(0), ctx.out(0)
    size = max(a.ngram_indexes) + 1
    C = x.shape[-1] if x.shape else 1
    col_begin, offs, lens, tokens = _tables(a)
    bufs = [ctx.new_weight(t, name) for t, name in ((col_begin, "col_begin"), (offs, "ent_off"),
                                                    (lens, "ent_len"), (tokens, "tokens"))]
    has_w = bool(a.weights)
    if has_w:
        bufs.append(ctx.new_weight(np.asarray(a.weights, np.float32), "w"))
    k = ctx.render("tfidf.cu.j2", "tfidf", xctype=x.ctype, size=size, C=C, mode=a.mode, has_w=has_w,
                   min_gram=int(a.min_gram_length), max_gram=int(a.max_gram_length),
                   skips=int(a.max_skip_count) + 1)
    ctx.launch(k, ctx.grid1d(y.numel), 256, [x, *bufs, y, ctx.i64(y.numel)])
    return True
