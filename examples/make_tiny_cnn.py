"""Writes examples/tiny_cnn.onnx: a small CNN (Conv/BN/Relu/MaxPool/residual Add/GlobalAveragePool/
Gemm/Softmax) with seeded random weights and a symbolic batch dim `N`. Run: python examples/make_tiny_cnn.py"""
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def w(name, *shape, scale=None):
        scale = scale or (1.0 / np.sqrt(np.prod(shape[1:]) if len(shape) > 1 else 1.0))
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def conv_bn_relu(x, cin, cout, k, stride, name, relu=True):
        nodes.append(helper.make_node("Conv", [x, w(f"{name}.w", cout, cin, k, k)], [f"{name}.c"], name=f"{name}/conv",
                                      kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4))
        inits.append(numpy_helper.from_array(rng.uniform(0.5, 1.5, cout).astype(np.float32), f"{name}.g"))
        inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32) * 0.1, f"{name}.b"))
        inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32) * 0.1, f"{name}.m"))
        inits.append(numpy_helper.from_array(rng.uniform(0.5, 1.5, cout).astype(np.float32), f"{name}.v"))
        out = f"{name}.bn"
        nodes.append(helper.make_node("BatchNormalization", [f"{name}.c", f"{name}.g", f"{name}.b", f"{name}.m", f"{name}.v"],
                                      [out], name=f"{name}/bn", epsilon=1e-5))
        if relu:
            nodes.append(helper.make_node("Relu", [out], [f"{name}.r"], name=f"{name}/relu"))
            out = f"{name}.r"
        return out

    x = conv_bn_relu("input", 3, 16, 3, 1, "stem")
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]))
    y = conv_bn_relu("pool", 16, 16, 3, 1, "block.a")
    y = conv_bn_relu(y, 16, 16, 3, 1, "block.b", relu=False)
    nodes.append(helper.make_node("Add", ["pool", y], ["res"], name="block/add"))
    nodes.append(helper.make_node("Relu", ["res"], ["res.r"], name="block/relu"))
    z = conv_bn_relu("res.r", 16, 32, 3, 2, "down")
    nodes.append(helper.make_node("GlobalAveragePool", [z], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1))
    nodes.append(helper.make_node("Gemm", ["flat", w("fc.w", 10, 32), w("fc.b", 10, scale=0.1)], ["logits"],
                                  name="fc", transB=1))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1))
    graph = helper.make_graph(nodes, "tiny_cnn",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="nnc-examples",
                              ir_version=10)  # IR 10: loadable by onnxruntime 1.18 and newer
    onnx.checker.check_model(model)
    return model


if __name__ == "__main__":
    out = Path(__file__).parent / "tiny_cnn.onnx"
    onnx.save(build(), out)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
