"""Int8 QDQ test models whose scales are not fp16 values, for tests/passes/test_qdq_precision.py and
tools/check_fp8_gpu.py (`--precision fp16` of a QDQ model must keep its scales exact).

    conv_qdq_model(C=8, O=16, HW=10)
      x f32 [1, C, HW, HW] -> Q(x, SX, 3) -> DQ -> Conv(DQ(w_q i8 per channel, sw), b) -> Q(SY, -2) -> DQ -> y
      and, from the same DQ(x), Add(DQ(x), x) -> z (a Q/DQ pair fold-qdq leaves literal)
    q_only_model(N=4096)
      x f32 [N] -> Q(x, SX, 3) -> q i8 (returned), DQ(q) -> d f32

SX, SY and the per-channel sw are chosen off the fp16 grid (f16(s) != s); every weight channel has
a +-127 so that fold-qdq recovers the int8 weight when import folds DQ(w) into a float constant.
"""
from __future__ import annotations

import numpy as np

SX = np.float32(0.0123457)   # fp16 would store 0.012344
SY = np.float32(0.0377123)


def off_f16(s) -> bool:
    s = np.asarray(s, np.float32)
    return bool(np.all(s.astype(np.float16).astype(np.float32) != s))


def conv_weights(C=8, O=16, seed=0):
    rng = np.random.default_rng(seed)
    wq = rng.integers(-127, 128, (O, C, 3, 3)).astype(np.int8)
    wq[:, 0, 0, 0] = 127
    sw = (0.003 + 0.0007 * np.arange(O) + 1.1e-6).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32) * 0.1
    return wq, sw, b


def conv_qdq_model(C=8, O=16, HW=10, seed=0):
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh
    wq, sw, b = conv_weights(C, O, seed)
    inits = [nh.from_array(np.asarray(SX), "sx"), nh.from_array(np.asarray(3, np.int8), "zx"),
             nh.from_array(wq, "w_q"), nh.from_array(sw, "sw"), nh.from_array(np.zeros(O, np.int8), "zw"),
             nh.from_array(b, "b"), nh.from_array(np.asarray(SY), "sy"),
             nh.from_array(np.asarray(-2, np.int8), "zy")]
    nodes = [h.make_node("QuantizeLinear", ["x", "sx", "zx"], ["x_q"]),
             h.make_node("DequantizeLinear", ["x_q", "sx", "zx"], ["x_dq"]),
             h.make_node("DequantizeLinear", ["w_q", "sw", "zw"], ["w"], axis=0),
             h.make_node("Conv", ["x_dq", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             h.make_node("QuantizeLinear", ["c", "sy", "zy"], ["c_q"]),
             h.make_node("DequantizeLinear", ["c_q", "sy", "zy"], ["y"]),
             h.make_node("Add", ["x_dq", "x"], ["z"], name="add")]
    shape = [1, C, HW, HW]
    g = h.make_graph(nodes, "conv_qdq", [h.make_tensor_value_info("x", TP.FLOAT, shape)],
                     [h.make_tensor_value_info("y", TP.FLOAT, [1, O, HW, HW]),
                      h.make_tensor_value_info("z", TP.FLOAT, shape)], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 19)], ir_version=9)


def q_only_model(N=4096):
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh
    inits = [nh.from_array(np.asarray(SX), "sx"), nh.from_array(np.asarray(3, np.int8), "zx")]
    nodes = [h.make_node("QuantizeLinear", ["x", "sx", "zx"], ["q"]),
             h.make_node("DequantizeLinear", ["q", "sx", "zx"], ["d"])]
    g = h.make_graph(nodes, "q_only", [h.make_tensor_value_info("x", TP.FLOAT, [N])],
                     [h.make_tensor_value_info("q", TP.INT8, [N]), h.make_tensor_value_info("d", TP.FLOAT, [N])],
                     inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 19)], ir_version=9)


def f16_exact_input(shape, seed=0, spread=1.2):
    """Random f32 values that fp16 holds exactly (so the fp16 build quantizes the same x)."""
    x = np.random.default_rng(seed).uniform(-spread, spread, shape)
    return x.astype(np.float16).astype(np.float32)
