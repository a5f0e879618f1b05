"""Importer behaviour beyond single ops: external-data weights, --shapes binding across inputs,
value binding (constants=) that specialises shape inputs, and clear errors."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnc.ir import print_module, verify
from nnc.ir.errors import ImportError_
from nnc.ir.interp import Interpreter
from nnc.onnx_import import import_model, parse_shapes
from nnc.pipeline import run_passes


def _matmul_model(w):
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[1]])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_external_data_weights(tmp_path, rng):
    w = rng.standard_normal((64, 32)).astype(np.float32)
    p = tmp_path / "m.onnx"
    onnx.save_model(_matmul_model(w), p, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.data", size_threshold=0)
    assert (tmp_path / "m.data").exists()
    m = import_model(p)
    verify(m)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(Interpreter(m).run({"x": x})["y"], x @ w, rtol=1e-5)


def test_shapes_bind_symbols_across_inputs():
    g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", "S"]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", "S"])],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", "S"])])
    m = import_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]),
                     shapes=parse_shapes("a:2x5"))
    assert print_module(m).startswith("func @main(%a: f32[2,5], %b: f32[2,5]) -> (f32[2,5])")


def test_unbound_symbols_stay_symbolic():
    m = import_model(_matmul_model(np.ones((4, 2), np.float32)))
    assert str(m.main.results[0].type) == "f32[N,2]"


def test_constants_specialise_shape_inputs():
    g = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6]),
                           helper.make_tensor_value_info("s", TensorProto.INT64, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert str(import_model(model).main.results[0].type) == "f32[?,?]"
    m = import_model(model, constants={"s": np.array([3, 4])})
    run_passes(m, verify_each=True)
    assert [a.name for a in m.main.args] == ["x"]
    assert str(m.main.results[0].type) == "f32[3,4]"
    with pytest.raises(ImportError_, match="constant for input 's'"):
        import_model(model, constants={"s": np.array([3.0, 4.0])})


def test_bad_shapes_spec():
    from nnc.ir.errors import NncError
    with pytest.raises(NncError, match="NAME:DIMxDIM"):
        parse_shapes("input1x3")
    with pytest.raises(NncError, match="integers"):
        parse_shapes("input:1xAx3")


def test_undefined_node_input_is_named():
    g = helper.make_graph([helper.make_node("Relu", ["nope"], ["y"], name="r1")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    with pytest.raises(ImportError_, match=r"'r1' \(Relu.*input 'nope' is not defined"):
        import_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))


def test_bad_attribute_is_named():
    g = helper.make_graph([helper.make_node("LeakyRelu", ["x"], ["y"], name="lr", alpha_typo=0.1)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    with pytest.raises(ImportError_, match=r"'lr' \(LeakyRelu.*unknown attribute 'alpha_typo'"):
        import_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
