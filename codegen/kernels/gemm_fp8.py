"""FP8 GEMM: `matmul_fp8` (ir/ops/gemm_fp8.py) as declared Variants of family "gemm_fp8".

Two variants:

* gemm_fp8.wgmma (priority 5, codegen/kernels/gemm_fp8_wgmma.py): Hopper's fp8 tensor cores
  (`wgmma.mma_async.m64nNk32.f32.e4m3.e4m3`, e5m2 too), reading a and the [N, K]-stored weight as
  they are (1 byte a value), fp32 accumulators, a_scale * b_scale[n], bias, relu and the output
  cast in its epilogue. applies: sm_90a, K % 16 == 0, constant b and b_scale.
* gemm_fp8.dequant (priority 0), the fallback for every other target and shape: the fp8 operands
  dequantized into f16 (bf16 when the result is bf16), then the normal GEMM family with an
  epilogue (gemm_epilogue: mma / wgmma f16 tensor cores, fp32 accumulators):
  - a: one elementwise DequantizeLinear kernel, f16(a * a_scale) (templates/elementwise.cu.j2,
    through the Q/DQ lowering of codegen/kernels/quantize.py) into a temp [.., K];
  - b: at compile time, f16(b * b_scale[n]) [K, N] in weights.bin (2 bytes a weight: no memory
    saving over an fp16 build);
  - one `fused {kind = "gemm_epilogue"}` group MatMul -> Add(bias) -> Relu -> Cast(out_dtype), so
    the bias, the activation and the output dtype are the GEMM kernel's epilogue
    (codegen/kernels/epilogue_fusion.py).
  Each operand is rounded to f16 once (relative 2^-11, far below e4m3's 2^-4 quantum), so the result
  equals the op's semantics within fp16-GEMM tolerance. Cost: one extra pass over a (read 1 byte,
  write 2) and the fp16 GEMM itself: about an fp16 build's speed, never faster.

    applies(problem) -> Fit   dequant: static shapes, constant b and b_scale
"""
from __future__ import annotations

import numpy as np

from ...ir.graph import Op, Region, Value
from ...ir.narrow_types import decode
from ...ir.ops.core import ConstAttrs
from ...ir.ops.fused import FusedAttrs
from ...ir.ops.quant import DequantizeAttrs, CastAttrs
from ...ir.registry import NoAttrs
from ...ir.types import TensorType, dtype
from ..lower import LowerCtx, describe_op
from ..variants import YES, Variant, no, register

FAMILY = "gemm_fp8"


def _constant_weights(weight: str):
    """applies() of a dequantizing variant: operands 2 (the fp8 weight), 3 (its scale) and the
    optional bias 4 are compile-time constants (they are dequantized into weights.bin)."""
    def applies(problem):
        if problem.value(2) is None or problem.value(3) is None:
            return no(f"{weight} / {weight}_scale are not compile-time constants")
        if problem.has(4) and problem.value(4) is None:
            return no("the bias is not a compile-time constant")
        return YES
    return applies


_applies_dequant = _constant_weights("b")


def dequantized_weight(b: np.ndarray, b_scale: np.ndarray, dt) -> np.ndarray:
    """f16 / bf16 [K, N]: decode(b) * b_scale[n] (in f64, one rounding to dt)."""
    w = decode(np.asarray(b)) * np.asarray(b_scale, np.float64).reshape(-1 if np.ndim(b_scale) else ())
    return w.astype(np.float32).astype(dt)  # (f64 -> f32 is exact here: the product has <= 28 bits)


def params_text(group: Op) -> str:
    return "; ".join(describe_op(o) for o in group.attrs.body.ops if o.name != "const")


def _const(v: Value, array: np.ndarray, loc) -> Op:
    return Op("const", [], [v], ConstAttrs(value=array), loc)


def _render_dequant(ctx: LowerCtx, problem, params: dict):
    op, L = ctx.op, ctx.L
    res = op.results[0]
    out = res.type.dtype
    low = dtype("bf16") if out.short == "bf16" else dtype("f16")
    a, a_scale = op.operands[0], op.operands[1]
    K, N = (int(d) for d in op.operands[2].type.shape)
    w = dequantized_weight(problem.value(2), problem.value(3), low.np)
    if not np.all(np.isfinite(w.astype(np.float32))):
        ctx.fail(f"matmul_fp8: b * b_scale overflows {low} (the dequantize variant needs it finite)")
    # a -> low: f16(a * a_scale), one elementwise kernel into a temp
    a_low = Value(f"{res.name}.a_dequant", TensorType(low, tuple(a.type.shape)))
    dq = Op("DequantizeLinear", [a, a_scale], [a_low], DequantizeAttrs(axis=1, output_dtype=low), op.loc)
    L.lower_op(dq, desc=f"{describe_op(dq)}  (a of {ctx.desc})")
    # b -> low at compile time (weights.bin)
    b_low = Value(f"{res.name}.w_dequant", TensorType(low, (K, N)))
    _const(b_low, w, op.loc)  # (its producer: problem.value reads it)
    L.values[id(b_low)] = ctx.new_weight(w, "w_dequant")
    # MatMul -> Add(bias) -> Cast(out) as one gemm_epilogue group (a closed body)
    xa = Value(f"{res.name}.x_arg", a_low.type)
    wa = Value(f"{res.name}.w_arg", b_low.type)
    body_ops = []
    y = Value(f"{res.name}.mm", TensorType(low, tuple(res.type.shape)))
    body_ops.append(Op("MatMul", [xa, wa], [y], NoAttrs(), op.loc))
    roles, args, operands = [], [xa, wa], [a_low, b_low]
    if problem.has(4):  # a constant operand of the group (the body's ops are the chain alone)
        bv = np.asarray(problem.value(4), np.float32).astype(low.np)
        bias = Value(f"{res.name}.bias_dequant", TensorType(low, (N,)))
        _const(bias, bv, op.loc)
        L.values[id(bias)] = ctx.new_weight(bv, "bias_dequant")
        ba = Value(f"{res.name}.bias_arg", bias.type)
        yb = Value(f"{res.name}.mm_bias", y.type)
        body_ops.append(Op("Add", [y, ba], [yb], NoAttrs(), op.loc))
        y = yb
        roles.append("bias")
        args.append(ba)
        operands.append(bias)
    if op.attrs.activation == "relu":
        yr = Value(f"{res.name}.mm_relu", y.type)
        body_ops.append(Op("Relu", [y], [yr], NoAttrs(), op.loc))
        y = yr
        roles.append("relu")
    if out != low:
        yc = Value(f"{res.name}.mm_cast", res.type)
        body_ops.append(Op("Cast", [y], [yc], CastAttrs(to=out), op.loc))
        y = yc
        roles.append("cast")
    outer = Value(f"{res.name}.gemm", res.type)
    group = Op("fused", operands, [outer],
               FusedAttrs(body=Region(args, body_ops, [y]), kind="gemm_epilogue", params=" ".join(roles)),
               op.loc)
    L.equiv[id(outer)] = L.canon(res)  # the group writes the op's result buffer
    L.lower_op(group, desc=f"{ctx.desc}  (as f16 GEMM + epilogue: {params_text(group)})")
    ctx.emitted += 1
    return True


DEQUANT = register(Variant("gemm_fp8.dequant", FAMILY, ("matmul_fp8",), _render_dequant, _applies_dequant,
                           priority=0))


# ---------------------------------------------------------------- conv_fp8

CONV_FAMILY = "conv_fp8"


_applies_conv_dequant = _constant_weights("w")


def dequantized_conv_weight(w: np.ndarray, w_scale: np.ndarray, dt) -> np.ndarray:
    """f16 / bf16 [O, C/g, k..]: decode(w) * w_scale[o] (in f64, one rounding to dt)."""
    s = np.asarray(w_scale, np.float64)
    s = s.reshape((-1,) + (1,) * (np.ndim(w) - 1)) if s.ndim else s
    return (decode(np.asarray(w)) * s).astype(np.float32).astype(dt)


def _render_conv_dequant(ctx: LowerCtx, problem, params: dict):
    """conv_fp8 as: DQ(x) -> f16 temp (one elementwise kernel), the weight dequantized to f16 at
    compile time (weights.bin), the bias in f16, then the normal NCHW f16 Conv lowering (its own
    variants and selector), and a Cast kernel when out_dtype is not the f16/bf16 compute type."""
    from ...ir.ops.conv import ConvOpAttrs
    from ...ir.ops.gemm_fp8 import conv_attrs
    op, L = ctx.op, ctx.L
    res = op.results[0]
    out = res.type.dtype
    low = dtype("bf16") if out.short == "bf16" else dtype("f16")
    x, x_scale = op.operands[0], op.operands[1]
    w = dequantized_conv_weight(problem.value(2), problem.value(3), low.np)
    if not np.all(np.isfinite(w.astype(np.float32))):
        ctx.fail(f"conv_fp8: w * w_scale overflows {low} (the dequantize variant needs it finite)")
    x_low = Value(f"{res.name}.x_dequant", TensorType(low, tuple(x.type.shape)))
    dq = Op("DequantizeLinear", [x, x_scale], [x_low], DequantizeAttrs(axis=1, output_dtype=low), op.loc)
    L.lower_op(dq, desc=f"{describe_op(dq)}  (x of {ctx.desc})")
    w_low = Value(f"{res.name}.w_dequant", TensorType(low, w.shape))
    _const(w_low, w, op.loc)
    L.values[id(w_low)] = ctx.new_weight(w, "w_dequant")
    operands = [x_low, w_low]
    if problem.has(4):
        bv = np.asarray(problem.value(4), np.float32).astype(low.np)
        b_low = Value(f"{res.name}.bias_dequant", TensorType(low, bv.shape))
        _const(b_low, bv, op.loc)
        L.values[id(b_low)] = ctx.new_weight(bv, "bias_dequant")
        operands.append(b_low)
    ca = conv_attrs(op.attrs)
    conv_res = res if out == low else Value(f"{res.name}.conv", TensorType(low, tuple(res.type.shape)))
    conv = Op("Conv", operands, [conv_res], ConvOpAttrs(ca.auto_pad, ca.dilations, ca.group, ca.kernel_shape,
                                                        ca.pads, ca.strides), op.loc)
    L.lower_op(conv, desc=f"{ctx.desc}  (as f16 Conv on dequantized x and w)")
    if out != low:
        cast = Op("Cast", [conv_res], [res], CastAttrs(to=out), op.loc)
        L.lower_op(cast, desc=f"{describe_op(cast)}  (out_dtype of {ctx.desc})")
    ctx.emitted += 1
    return True


CONV_DEQUANT = register(Variant("conv_fp8.dequant", CONV_FAMILY, ("conv_fp8",), _render_conv_dequant,
                                _applies_conv_dequant, priority=0))
