"""Einsum as a direct contraction (einsum.cu.j2, one thread per output element looping over the
reduced letters): the equation (implicit output and ellipses included) is planned at compile time
into per-operand output / reduction strides."""
from __future__ import annotations

import numpy as np

from ..lower import LowerCtx, lowering
from .reduce import _acc_type


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
    acc = _acc_type(y.dtype)
    k = ctx.render("einsum.cu.j2", "einsum", inputs=inputs, ctype=y.ctype, acc=acc, out_ext=out_ext, red_ext=red_ext,
                   red_total=int(np.prod(red_ext, dtype=np.int64)))
    if y.numel:
        ctx.launch(k, ctx.grid1d(y.numel), 256, [*ins, y, ctx.i64(y.numel)])
    else:
        ctx.alias(0, ctx.new_weight(np.zeros(y.shape, y.dtype.np)))
    return True
