"""Writes examples/tiny_lstm.onnx: a 2-layer LSTM stack (hidden 32) over x: f32[8,1,16] followed
by a Gemm on the last step, seeded random weights. Run: python examples/make_tiny_lstm.py"""
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

T, B, I, Hd = 8, 1, 16, 32


def build(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def t(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def r(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    x = "x"
    for layer, inp in enumerate((I, Hd)):
        nodes.append(helper.make_node(
            "LSTM", [x, t(f"W{layer}", r(1, 4 * Hd, inp)), t(f"R{layer}", r(1, 4 * Hd, Hd)), t(f"B{layer}", r(1, 8 * Hd))],
            [f"Y{layer}", f"Yh{layer}"], name=f"lstm{layer}", hidden_size=Hd))
        nodes.append(helper.make_node("Squeeze", [f"Y{layer}", t(f"ax{layer}", np.array([1], np.int64))],
                                      [f"seq{layer}"], name=f"squeeze{layer}"))
        x = f"seq{layer}"
    nodes.append(helper.make_node("Squeeze", ["Yh1", t("ax_h", np.array([0], np.int64))], ["h_last"], name="last"))
    nodes.append(helper.make_node("Gemm", ["h_last", t("Wo", r(Hd, 4)), t("bo", r(4))], ["y"], name="head"))
    graph = helper.make_graph(nodes, "tiny_lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, B, I])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="nnc-examples",
                              ir_version=10)  # IR 10: loadable by onnxruntime 1.18 and newer
    onnx.checker.check_model(model)
    return model


if __name__ == "__main__":
    out = Path(__file__).parent / "tiny_lstm.onnx"
    onnx.save(build(), out)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
