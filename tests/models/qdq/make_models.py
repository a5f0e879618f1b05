"""Generate the small QDQ test models with onnxruntime.quantization.quantize_static.

Float models: a Conv->Relu->Conv CNN and a Gemm->Relu->MatMul MLP (random weights, fixed seed);
quantized in QDQ format with per-tensor or per-channel weights and QInt8 / QUInt8 activations.
Run: .venv/bin/python tests/models/qdq/make_models.py [OUTDIR]   (tests call `make(...)` into tmp)
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def cnn_model(seed=0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1")
    b1 = numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b1")
    w2 = numpy_helper.from_array((rng.standard_normal((4, 8, 3, 3)) * 0.2).astype(np.float32), "w2")
    b2 = numpy_helper.from_array((rng.standard_normal(4) * 0.1).astype(np.float32), "b2")
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
    ]
    g = helper.make_graph(nodes, "qdq_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], [w1, b1, w2, b2])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def mlp_model(seed=1) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array((rng.standard_normal((16, 12)) * 0.3).astype(np.float32), "w1")  # Gemm transB
    b1 = numpy_helper.from_array((rng.standard_normal(16) * 0.1).astype(np.float32), "b1")
    w2 = numpy_helper.from_array((rng.standard_normal((16, 5)) * 0.3).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    g = helper.make_graph(nodes, "qdq_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 5])], [w1, b1, w2])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def cnn2_model(seed=3) -> onnx.ModelProto:
    """Conv -> Relu -> MaxPool -> Conv -> Relu -> Flatten -> Gemm: int8 through the pool and the reshape."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array((rng.standard_normal((6, 2, 3, 3)) * 0.3).astype(np.float32), "w1")
    b1 = numpy_helper.from_array((rng.standard_normal(6) * 0.1).astype(np.float32), "b1")
    w2 = numpy_helper.from_array((rng.standard_normal((4, 6, 3, 3)) * 0.2).astype(np.float32), "w2")
    w3 = numpy_helper.from_array((rng.standard_normal((3, 64)) * 0.2).astype(np.float32), "w3")
    b3 = numpy_helper.from_array((rng.standard_normal(3) * 0.1).astype(np.float32), "b3")
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1),
    ]
    g = helper.make_graph(nodes, "qdq_cnn2", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w1, b1, w2, w3, b3])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def bigconv_model(seed=4) -> onnx.ModelProto:
    """One Conv whose weight (128x64x3x3 = 73728 elements) is over the importer's constant-folding
    limit: its DequantizeLinear(w) stays an op in the IR (fold-qdq's DQ-weight path)."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((rng.standard_normal((128, 64, 3, 3)) * 0.05).astype(np.float32), "w")
    b = numpy_helper.from_array((rng.standard_normal(128) * 0.1).astype(np.float32), "b")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                          "qdq_bigconv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128, 6, 6])], [w, b])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


MODELS = {"cnn": cnn_model, "mlp": mlp_model, "cnn2": cnn2_model, "bigconv": bigconv_model}


def calib_data(model: onnx.ModelProto, n=8, seed=2):
    inp = model.graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    return [{inp.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def make(kind: str, per_channel: bool, activation: str, out_dir: Path, weights: str = "s8") -> Path:
    """Write the float model and its QDQ quantization; returns the QDQ model's path."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = MODELS[kind]()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fp = out_dir / f"{kind}_fp32.onnx"
    onnx.save(model, fp)
    data = calib_data(model)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(data)

        def get_next(self):
            return next(self.it, None)

    act = QuantType.QInt8 if activation == "s8" else QuantType.QUInt8
    q = out_dir / f"{kind}_{'pc' if per_channel else 'pt'}_{activation}{'_w' + weights if weights != 's8' else ''}.qdq.onnx"
    quantize_static(str(fp), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=act,
                    weight_type=QuantType.QInt8 if weights == "s8" else QuantType.QUInt8)
    return q


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
    for kind in MODELS:
        for pc in (False, True):
            for a in ("s8", "u8"):
                print(make(kind, pc, a, out))
