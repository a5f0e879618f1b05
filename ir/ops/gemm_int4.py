"""Weight-only int4 matrix product: `matmul_int4_weight`, nnc's own op (the same family name as
codegen/kernels/gemm_int4.py and templates/gemm_int4.cu.j2).

    %y = matmul_int4_weight(%x, %w_q, %w_scale[, %w_zero_point | none[, %bias]]) {block_size = B} : T[.., N]

x: T[.., K] (float: f32 / f16 / bf16); w_q: i4 or u4 [K, N]; w_scale: [ceil(K/B), N] float;
w_zero_point (optional): w_q's dtype, w_scale's shape; bias (optional): T[N]. The meaning is
exactly the graph it folds (compiler/passes/fold_qdq.py, compiler/passes/quantize_weights_int4.py):

    W = DequantizeLinear(w_q, w_scale, w_zero_point, axis=0, block_size=B)   (W in w_scale's dtype)
    y = (f32(x) @ f32(W) [+ f32(bias)]) as T                                  (fp32 accumulation)

so with f16 scales each dequantized weight is rounded to f16 once (as ONNX's DQ with an f16 scale
writes it), and the product accumulates in f32. Group-wise along K: block k // B of column n has
its own scale (and zero point).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..registry import register
from ..types import TensorType
from .quant import dequantize

INT4 = ("i4", "u4")


@dataclass(frozen=True)
class MatMulInt4WeightAttrs:
    block_size: int  # weights per group along K (one scale / zero point per group and column)


def _infer(ctx):
    bs = ctx.attrs.block_size
    xs, ws, ss = ctx.shape(0), ctx.shape(1), ctx.shape(2)
    if bs <= 0:
        ctx.fail(f"block_size must be > 0, got {bs}")
    if not ctx.dtype(0).is_float:
        ctx.fail(f"x must be float, got {ctx.dtype(0)}")
    if ctx.dtype(1).short not in INT4:
        ctx.fail(f"w_q must be i4 or u4, got {ctx.dtype(1)}")
    if not ctx.dtype(2).is_float:
        ctx.fail(f"w_scale must be float, got {ctx.dtype(2)}")
    if len(xs) < 1 or len(ws) != 2 or len(ss) != 2:
        ctx.fail(f"needs x of rank >= 1, w_q [K, N] and w_scale [ceil(K/B), N]; got {ctx.type(0)}, "
                 f"{ctx.type(1)}, {ctx.type(2)}")
    K, N = ws
    if isinstance(xs[-1], int) and isinstance(K, int) and xs[-1] != K:
        ctx.fail(f"x's last dim {xs[-1]} differs from w_q's K = {K}")
    if isinstance(K, int) and isinstance(N, int) and tuple(ss) != ((K + bs - 1) // bs, N):
        ctx.fail(f"w_scale must be [{(K + bs - 1) // bs}, {N}] (block_size {bs}), got {ctx.type(2)}")
    if ctx.has(3):
        if ctx.dtype(3) != ctx.dtype(1):
            ctx.fail(f"w_zero_point dtype {ctx.dtype(3)} differs from w_q's {ctx.dtype(1)}")
        if tuple(ctx.shape(3)) != tuple(ss):
            ctx.fail(f"w_zero_point must have w_scale's shape {list(ss)}, got {ctx.type(3)}")
    if ctx.has(4):
        if ctx.dtype(4) != ctx.dtype(0) or tuple(ctx.shape(4)) != (N,):
            ctx.fail(f"bias must be {ctx.dtype(0)}[{N}], got {ctx.type(4)}")
    return [TensorType(ctx.dtype(0), tuple(xs[:-1]) + (N,))]


def dequantized_weight(a: MatMulInt4WeightAttrs, w_q, w_scale, w_zero_point=None) -> np.ndarray:
    """W [K, N] in w_scale's dtype: DequantizeLinear(w_q, w_scale, w_zero_point, axis=0, block_size)."""
    return dequantize(w_q, w_scale, w_zero_point, w_scale.dtype, 0, a.block_size)


def _ref(a, x, w_q, w_scale, w_zero_point=None, bias=None):
    w = dequantized_weight(a, w_q, w_scale, w_zero_point)
    y = np.matmul(x.astype(np.float32), w.astype(np.float32))
    if bias is not None:
        y = y + bias.astype(np.float32)
    return y.astype(x.dtype)


register("matmul_int4_weight", MatMulInt4WeightAttrs, infer=_infer, ref=_ref, inputs=(3, 5),
         doc="y = x @ DequantizeLinear(w_q int4 [K, N], w_scale, w_zero_point, axis 0, block_size) "
             "[+ bias], fp32 accumulation (weight-only int4)")
