"""FP8 matrix product with per-tensor activation and per-tensor / per-column weight scales:
`matmul_fp8`, nnc's own op (the same family name as codegen/kernels/gemm_fp8.py).

    %y = matmul_fp8(%a, %a_scale, %b, %b_scale[, %bias]) {out_dtype = f16[, activation = "relu"]} : f16[.., N]

a: f8e4m3 or f8e5m2 [.., K] (the quantized activations); a_scale: f32 [] (per tensor);
b: f8e4m3 or f8e5m2 [K, N] (the weights, usually a const); b_scale: f32 [] or [N] (per output
column); bias (optional): float [N]; out_dtype: f32, f16 or bf16; activation: "none" or "relu"
(the folds take a Relu that is the result's only reader). The meaning:

    acc = f32(a) @ f32(b)                  (every fp8 product is exact in f32; the sum is in f32)
    y   = out_dtype(act(acc * (a_scale * b_scale[n]) [+ f32(bias[n])]))

which is what a Hopper fp8 wgmma with a scaling epilogue computes, and equal within fp32 rounding
to the QDQ graph it folds (compiler/passes/fold_qdq.py, compiler/passes/quantize_fp8.py):

    MatMul(DequantizeLinear(a, a_scale), DequantizeLinear(b, b_scale, axis=1)) [+ bias]

(the literal graph rounds each dequantized operand to f32 first; here the scales are applied once
to the exact sum).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..registry import register
from ..types import DType, TensorType

FP8 = ("f8e4m3", "f8e5m2")
OUT = ("f32", "f16", "bf16")
ACTIVATIONS = ("none", "relu")


@dataclass(frozen=True)
class MatMulFp8Attrs:
    out_dtype: DType  # the result's dtype (f32 / f16 / bf16)
    activation: str = "none"  # none | relu, applied in f32 before the cast to out_dtype


def _infer(ctx):
    a = ctx.attrs
    xs, ws = ctx.shape(0), ctx.shape(2)
    for i, what in ((0, "a"), (2, "b")):
        if ctx.dtype(i).short not in FP8:
            ctx.fail(f"{what} must be f8e4m3 or f8e5m2, got {ctx.dtype(i)}")
    for i, what in ((1, "a_scale"), (3, "b_scale")):
        if ctx.dtype(i).short != "f32":
            ctx.fail(f"{what} must be f32, got {ctx.type(i)}")
    if a.activation not in ACTIVATIONS:
        ctx.fail(f"activation must be one of {', '.join(ACTIVATIONS)}, got {a.activation!r}")
    if a.out_dtype.short not in OUT:
        ctx.fail(f"out_dtype must be f32, f16 or bf16, got {a.out_dtype}")
    if xs is None or len(xs) < 1 or ws is None or len(ws) != 2:
        ctx.fail(f"needs a of rank >= 1 and b [K, N]; got {ctx.type(0)}, {ctx.type(2)}")
    K, N = ws
    if isinstance(xs[-1], int) and isinstance(K, int) and xs[-1] != K:
        ctx.fail(f"a's last dim {xs[-1]} differs from b's K = {K}")
    if len(ctx.shape(1)) != 0:
        ctx.fail(f"a_scale must be a scalar (per tensor), got {ctx.type(1)}")
    bs = ctx.shape(3)
    if not (len(bs) == 0 or (len(bs) == 1 and (not isinstance(bs[0], int) or not isinstance(N, int) or bs[0] == N))):
        ctx.fail(f"b_scale must be a scalar or [{N}] (per column), got {ctx.type(3)}")
    if ctx.has(4):
        if not ctx.dtype(4).is_float or ctx.dtype(4).short in FP8 or tuple(ctx.shape(4)) != (N,):
            ctx.fail(f"bias must be a float [{N}], got {ctx.type(4)}")
    return [TensorType(a.out_dtype, tuple(xs[:-1]) + (N,))]


def _ref(attrs, a, a_scale, b, b_scale, bias=None):
    from ..narrow_types import decode
    af = decode(a).astype(np.float32)  # exact: fp8 values are f32 values
    bf = decode(b).astype(np.float32)
    acc = np.matmul(af, bf)  # f32 accumulation of exact products
    s = np.float32(a_scale) * np.asarray(b_scale, np.float32).reshape(-1 if np.ndim(b_scale) else ())
    y = acc * s
    if bias is not None:
        y = y + np.asarray(bias).astype(np.float32)
    if attrs.activation == "relu":
        y = np.maximum(y, np.float32(0))
    return y.astype(attrs.out_dtype.np)


register("matmul_fp8", MatMulFp8Attrs, infer=_infer, ref=_ref, inputs=(4, 5),
         doc="y = (f32(a_fp8) @ f32(b_fp8)) * (a_scale * b_scale[n]) [+ bias], fp32 accumulation, "
             "cast to out_dtype (fp8 GEMM with per-tensor / per-column scales)")
