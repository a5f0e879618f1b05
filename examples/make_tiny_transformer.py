"""Writes examples/tiny_transformer.onnx: one pre-LN transformer encoder block (LayerNorm, QKV
MatMuls, 4-head attention with Softmax, output projection, residual, Gelu MLP) with seeded random
weights, input x: f32[1,16,64]. Run: python examples/make_tiny_transformer.py"""
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

D, H, S, FF = 64, 4, 16, 128


def build(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def t(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def w(name, *shape):
        return t(name, (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32))

    def n(op, ins, outs, **kw):
        nodes.append(helper.make_node(op, ins, outs, name=outs[0], **kw))
        return outs[0]

    heads = t("heads_shape", np.array([1, S, H, D // H], np.int64))
    flat = t("flat_shape", np.array([1, S, D], np.int64))
    ln1 = n("LayerNormalization", ["x", t("ln1.g", np.ones(D, np.float32)), t("ln1.b", np.zeros(D, np.float32))], ["ln1"], axis=-1)
    qkv = {}
    for p in "qkv":
        y = n("MatMul", [ln1, w(f"w{p}", D, D)], [f"{p}.mm"])
        y = n("Add", [y, t(f"b{p}", (rng.standard_normal(D) * 0.1).astype(np.float32))], [f"{p}.b"])
        y = n("Reshape", [y, heads], [f"{p}.heads"])
        qkv[p] = n("Transpose", [y], [f"{p}.t"], perm=[0, 2, 3, 1] if p == "k" else [0, 2, 1, 3])
    s = n("MatMul", [qkv["q"], qkv["k"]], ["scores"])
    s = n("Mul", [s, t("scale", np.array(1 / np.sqrt(D // H), np.float32))], ["scores.scaled"])
    pr = n("Softmax", [s], ["probs"], axis=-1)
    a = n("MatMul", [pr, qkv["v"]], ["attn"])
    a = n("Transpose", [a], ["attn.t"], perm=[0, 2, 1, 3])
    a = n("Reshape", [a, flat], ["attn.flat"])
    a = n("MatMul", [a, w("wo", D, D)], ["attn.out"])
    r1 = n("Add", ["x", a], ["res1"])
    ln2 = n("LayerNormalization", [r1, t("ln2.g", np.ones(D, np.float32)), t("ln2.b", np.zeros(D, np.float32))], ["ln2"], axis=-1)
    h = n("MatMul", [ln2, w("w1", D, FF)], ["ff1"])
    h = n("Gelu", [h], ["ff1.gelu"])
    h = n("MatMul", [h, w("w2", FF, D)], ["ff2"])
    n("Add", [r1, h], ["y"])
    graph = helper.make_graph(nodes, "tiny_transformer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, S, D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, S, D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], producer_name="nnc-examples",
                              ir_version=10)  # IR 10: loadable by onnxruntime 1.18 and newer
    onnx.checker.check_model(model)
    return model


if __name__ == "__main__":
    out = Path(__file__).parent / "tiny_transformer.onnx"
    onnx.save(build(), out)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
