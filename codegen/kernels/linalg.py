"""Small linear algebra: Det (det.cu.j2, one thread per matrix: Gaussian elimination with
partial pivoting in double, in a temp workspace). MatMul / Gemm / Conv fallbacks are in fallback_linalg.py."""
from __future__ import annotations

import numpy as np

from ..lower import LowerCtx, lowering
from ._helpers import grid_stride_launch


@lowering("Det")
def _det(ctx: LowerCtx):
    x, y = ctx.inp(0), ctx.out(0)
    n = x.shape[-1]
    nb = int(np.prod(x.shape[:-2], dtype=np.int64))
    ws = ctx.temp("f64", [max(nb, 1), n, n], "det_ws")
    grid_stride_launch(ctx, "det.cu.j2", "det", [f"const {x.ctype}* __restrict__ x", "double* __restrict__ ws",
                       f"{y.ctype}* __restrict__ y"], [x, ws, y], nb, ctype=y.ctype, n=n)
    return True
