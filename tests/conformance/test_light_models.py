"""The nine `light_*` models in onnx's backend test data (ResNet-50, DenseNet-121, Inception
v1/v2, ShuffleNet, SqueezeNet, VGG-19, ZFNet-512, AlexNet) must match their stored outputs
through the reference interpreter, and round-trip through print/parse. Inputs are onnx's own
dummy data (arange(n)/n), as its backend test runner builds them."""
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

LIGHT = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light"
MODELS = sorted(p.stem for p in LIGHT.glob("light_*.onnx"))


def dummy_inputs(model: onnx.ModelProto) -> dict:
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for x in model.graph.input:
        if x.name in inits:
            continue
        shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in x.type.tensor_type.shape.dim)
        n = int(np.prod(shape))
        feeds[x.name] = (np.arange(n).reshape(shape) / n).astype(np.float32)
    return feeds


def test_there_are_nine():
    assert len(MODELS) == 9, MODELS


@pytest.mark.parametrize("name", MODELS)
def test_light_model_matches_stored_output(name):
    from nnc.ir import parse, print_module, verify
    from nnc.ir.equal import first_difference
    from nnc.ir.interp import Interpreter
    from nnc.onnx_import import import_model
    model = onnx.load(str(LIGHT / f"{name}.onnx"))
    m = import_model(model)
    verify(m)
    text = print_module(m)
    m2 = parse(text, name)
    m2.weights = m.weights
    assert print_module(m2) == text
    assert first_difference(m, m2) is None
    out = Interpreter(m2).run(dummy_inputs(model))
    expected = numpy_helper.to_array(onnx.load_tensor(str(LIGHT / f"{name}_output_0.pb")))
    got = out[m2.main.results[0].name]
    assert got.shape == expected.shape and got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-7)
