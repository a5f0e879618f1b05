"""FP8 test models: ONNX float8 QDQ MatMul / Gemm (opset 21), for tests/test_fp8.py and
tools/check_fp8_gpu.py.

    qdq_model(M, K, N, fmt="f8e4m3", per_channel=False, gemm=False, trans_b=False, bias=False)
      x f32 [M, K] -> Q(x, sx) f8 -> DQ -> MatMul / Gemm with DQ(w_q f8 const, sw) [+ bias] -> y f32 [M, N]

Weights are big enough (K * N > 65536) that import does not fold DQ(w) to a float constant.
"""
from __future__ import annotations

import numpy as np

ONNX_FP8 = {"f8e4m3": 17, "f8e5m2": 19}  # onnx.TensorProto.FLOAT8E4M3FN / FLOAT8E5M2


def weights(K, N, fmt="f8e4m3", per_channel=False, seed=0):
    """(w f32 [K, N], w_q (ml_dtypes fp8) [K, N], sw f32 [] or [N])."""
    from nnc.passes.quantize_fp8 import quantize_weight_fp8
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((K, N)).astype(np.float32) * np.linspace(0.5, 2.0, N, dtype=np.float32)
    if per_channel:
        wq, sw = quantize_weight_fp8(w, 1, fmt)
    else:
        from nnc.ir import narrow_types
        from nnc.ir.types import dtype
        sw = np.float32(np.abs(w).max() / {"f8e4m3": 448.0, "f8e5m2": 57344.0}[fmt])
        wq = narrow_types.cast_to_narrow(w / sw, dtype(fmt))
        sw = np.asarray(sw, np.float32)
    return w, wq, sw


def qdq_model(M, K, N, fmt="f8e4m3", per_channel=False, gemm=False, trans_b=False, bias=False, seed=0,
              sx=0.01):
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh
    _, wq, sw = weights(K, N, fmt, per_channel, seed)
    if trans_b:
        wq = np.ascontiguousarray(wq.T)
    t = ONNX_FP8[fmt]
    wq_t = h.make_tensor("w_q", t, list(wq.shape), np.ascontiguousarray(wq).view(np.uint8).tobytes(), raw=True)
    zp = h.make_tensor("x_zp", t, [], np.zeros(1, np.uint8).tobytes(), raw=True)
    inits = [wq_t, nh.from_array(np.asarray(sx, np.float32), "x_scale"), zp, nh.from_array(sw, "w_scale")]
    nodes = [h.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"]),
             h.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"]),
             h.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=0 if trans_b else 1)]
    rng = np.random.default_rng(seed + 1)
    if bias:
        inits.append(nh.from_array(rng.standard_normal(N).astype(np.float32), "b"))
    if gemm:
        nodes.append(h.make_node("Gemm", ["x_dq", "w"] + (["b"] if bias else []), ["y"], transB=int(trans_b)))
    else:
        nodes.append(h.make_node("MatMul", ["x_dq", "w"], ["xw" if bias else "y"]))
        if bias:
            nodes.append(h.make_node("Add", ["xw", "b"], ["y"]))
    g = h.make_graph(nodes, "fp8_mm", [h.make_tensor_value_info("x", TP.FLOAT, [M, K])],
                     [h.make_tensor_value_info("y", TP.FLOAT, [M, N])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)


def random_x(M, K, seed=0, sx=0.01):
    """Inputs spread over e4m3's range at scale sx (|x| up to ~3 * sx * 100)."""
    return (np.random.default_rng(seed + 7).standard_normal((M, K)) * 100 * sx).astype(np.float32)


def conv_weights(O, Cg, k, fmt="f8e4m3", per_channel=True, seed=0):
    """(w f32 [O, Cg, k, k], w_q (ml_dtypes fp8), sw f32 [] or [O])."""
    from nnc.passes.quantize_fp8 import quantize_weight_fp8
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((O, Cg, k, k)).astype(np.float32) * np.linspace(0.5, 2.0, O, dtype=np.float32)[:, None, None, None]
    if per_channel:
        wq, sw = quantize_weight_fp8(w, 0, fmt)
    else:
        from nnc.ir import narrow_types
        from nnc.ir.types import dtype
        sw = np.float32(np.abs(w).max() / {"f8e4m3": 448.0, "f8e5m2": 57344.0}[fmt])
        wq = narrow_types.cast_to_narrow(w / sw, dtype(fmt))
        sw = np.asarray(sw, np.float32)
    return w, wq, sw


def qdq_conv_model(N=2, C=16, O=32, HW=12, k=3, stride=1, group=1, fmt="f8e4m3", per_channel=True, bias=True,
                   seed=0, sx=0.01):
    """x f32 [N, C, HW, HW] -> Q(x, sx) f8 -> DQ -> Conv(DQ(w_q f8 const [O, C/group, k, k], sw, axis 0)
    [, b]) {pads k//2, strides} -> y f32 (opset 21). Weights of more than 65536 elements stay DQ
    ops at import; smaller ones import folds to a float constant, which fold-qdq recovers."""
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh
    _, wq, sw = conv_weights(O, C // group, k, fmt, per_channel, seed)
    t = ONNX_FP8[fmt]
    wq_t = h.make_tensor("w_q", t, list(wq.shape), np.ascontiguousarray(wq).view(np.uint8).tobytes(), raw=True)
    zp = h.make_tensor("x_zp", t, [], np.zeros(1, np.uint8).tobytes(), raw=True)
    inits = [wq_t, nh.from_array(np.asarray(sx, np.float32), "x_scale"), zp, nh.from_array(sw, "w_scale")]
    rng = np.random.default_rng(seed + 1)
    if bias:
        inits.append(nh.from_array(rng.standard_normal(O).astype(np.float32), "b"))
    p = k // 2
    nodes = [h.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"]),
             h.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"]),
             h.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=0),
             h.make_node("Conv", ["x_dq", "w"] + (["b"] if bias else []), ["y"], pads=[p] * 4,
                         strides=[stride] * 2, group=group, name="conv")]
    Ho = (HW + 2 * p - k) // stride + 1
    g = h.make_graph(nodes, "fp8_conv", [h.make_tensor_value_info("x", TP.FLOAT, [N, C, HW, HW])],
                     [h.make_tensor_value_info("y", TP.FLOAT, [N, O, Ho, Ho])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)


def random_conv_x(N, C, HW, seed=0, sx=0.01):
    return (np.random.default_rng(seed + 7).standard_normal((N, C, HW, HW)) * 100 * sx).astype(np.float32)
