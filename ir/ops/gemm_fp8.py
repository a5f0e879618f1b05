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

`conv_fp8` is the same for a convolution (NCHW, Conv's attributes):

    %y = conv_fp8(%x, %x_scale, %w, %w_scale[, %bias]) {out_dtype = f16, pads = [..], ..} : f16[N, O, ..]

x: f8 [N, C, ..]; x_scale: f32 []; w: f8 [O, C/group, k..] (a const); w_scale: f32 [] or [O] (per
output channel); bias: float [O]. acc = conv(f32(x), f32(w)) (exact products; summed here in f64
and rounded once to f32), y = out_dtype(acc * (x_scale * w_scale[o]) [+ bias[o]]): equal within
fp32 rounding to Conv(DequantizeLinear(x, x_scale), DequantizeLinear(w, w_scale, axis=0)) [+ bias].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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


# ---------------------------------------------------------------- conv_fp8

@dataclass(frozen=True)
class ConvFp8Attrs:
    """Conv's attributes (NCHW) plus the result dtype."""
    out_dtype: DType
    auto_pad: str = "NOTSET"
    dilations: Optional[tuple[int, ...]] = None
    group: int = 1
    kernel_shape: Optional[tuple[int, ...]] = None
    pads: Optional[tuple[int, ...]] = None
    strides: Optional[tuple[int, ...]] = None


def conv_attrs(a: ConvFp8Attrs):
    from .conv import ConvAttrs
    return ConvAttrs(a.auto_pad, a.dilations, a.group, a.kernel_shape, a.pads, a.strides)


def _conv_infer(ctx):
    from .conv import _conv_infer_nchw
    a = ctx.attrs
    xs, ws = ctx.shape(0), ctx.shape(2)
    for i, what in ((0, "x"), (2, "w")):
        if ctx.dtype(i).short not in FP8:
            ctx.fail(f"{what} must be f8e4m3 or f8e5m2, got {ctx.dtype(i)}")
    for i, what in ((1, "x_scale"), (3, "w_scale")):
        if ctx.dtype(i).short != "f32":
            ctx.fail(f"{what} must be f32, got {ctx.type(i)}")
    if a.out_dtype.short not in OUT:
        ctx.fail(f"out_dtype must be f32, f16 or bf16, got {a.out_dtype}")
    if xs is None or ws is None or len(xs) < 3 or len(ws) != len(xs):
        ctx.fail(f"needs x [N, C, ..] and w [O, C/group, ..] of one rank; got {ctx.type(0)}, {ctx.type(2)}")
    if len(ctx.shape(1)) != 0:
        ctx.fail(f"x_scale must be a scalar (per tensor), got {ctx.type(1)}")
    O = ws[0]
    ss = ctx.shape(3)
    if not (len(ss) == 0 or (len(ss) == 1 and (not isinstance(ss[0], int) or not isinstance(O, int) or ss[0] == O))):
        ctx.fail(f"w_scale must be a scalar or [{O}] (per output channel), got {ctx.type(3)}")
    if ctx.has(4):
        if not ctx.dtype(4).is_float or ctx.dtype(4).short in FP8 or tuple(ctx.shape(4)) != (O,):
            ctx.fail(f"bias must be a float [{O}], got {ctx.type(4)}")
    t = _conv_infer_nchw(ctx, conv_attrs(a), xs, ws)
    return [TensorType(a.out_dtype, t.shape)]


def _conv_ref(attrs, x, x_scale, w, w_scale, bias=None):
    from ..narrow_types import decode
    from .conv import _conv_params, conv_core
    xf, wf = decode(x).astype(np.float64), decode(w).astype(np.float64)  # exact fp8 values
    ca = conv_attrs(attrs)
    s, d, pads = _conv_params(ca, xf, wf)
    acc = conv_core(xf, wf, s, pads, d, ca.group).astype(np.float32)  # exact products, one rounding to f32
    shape = (1, -1) + (1,) * (x.ndim - 2)
    sc = np.float32(x_scale) * np.asarray(w_scale, np.float32).reshape(shape if np.ndim(w_scale) else ())
    y = acc * sc
    if bias is not None:
        y = y + np.asarray(bias).astype(np.float32).reshape(shape)
    return y.astype(attrs.out_dtype.np)


register("conv_fp8", ConvFp8Attrs, infer=_conv_infer, ref=_conv_ref, inputs=(4, 5),
         doc="y = conv(f32(x_fp8), f32(w_fp8)) * (x_scale * w_scale[o]) [+ bias[o]], exact products summed "
             "in f32 (f64 here, one rounding), cast to out_dtype (NCHW; fp8 conv with per-tensor / "
             "per-output-channel scales)")
