"""mixed-precision (--keep-fp32): the pinned layers stay f32, the rest turns fp16/bf16, a Cast sits
exactly on each edge whose ends differ (shared by the consumers wanting one dtype), the model's
interface stays f32, and the reference interpreter agrees with the f32 model within fp16's
tolerance. Also the CUDA build of a mixed model compiles through NVRTC (no GPU needed)."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import nnc
from nnc.ir import parse, print_module, verify
from nnc.ir.errors import NncError
from nnc.ir.interp import Interpreter
from nnc.ir.weights import WeightStore
from nnc.passes.mixed_precision import PrecisionChoice
from nnc.pipeline import Pipeline

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_cnn.onnx"

SRC = """func @main(%x: f32[2,4]) -> (f32[2,4], f32[2,4]) {
  %w = const() {value = dense<[0.5, -0.25, 1.0, 0.75, -0.5, 0.25, 0.125, -1.0, 0.5, 0.5, -0.75, 0.25, 1.0, -0.125, 0.25, 0.5]> : f32[4,4]} : f32[4,4]
  %a = MatMul(%x, %w) : f32[2,4]
  %r = Relu(%a) : f32[2,4]
  %s = Sigmoid(%r) : f32[2,4]
  %m = MatMul(%s, %w) : f32[2,4]
  %t = Tanh(%m) : f32[2,4]
  %u = Add(%t, %r) : f32[2,4]
  return %u, %m
}
"""
# %a pinned by its name, Tanh by its op type: casts on the four edges where precision changes
# (a->r, m->t and m->output share one, t->u) and at the f32 results; %w narrowed at compile time
# for the fp16 MatMul while the f32 MatMul keeps the f32 constant
EXPECTED = """func @main(%x: f32[2,4]) -> (f32[2,4], f32[2,4]) {
  %w = const() {value = dense<[0.5, -0.25, 1.0, 0.75, -0.5, 0.25, 0.125, -1.0, 0.5, 0.5, -0.75, 0.25, 1.0, -0.125, 0.25, 0.5]> : f32[4,4]} : f32[4,4]
  %a = MatMul(%x, %w) : f32[2,4]
  %0 = Cast(%a) {to = f16} : f16[2,4]
  %r = Relu(%0) : f16[2,4]
  %s = Sigmoid(%r) : f16[2,4]
  %w_1 = const() {weight = "w"} : f16[4,4]
  %m.low = MatMul(%s, %w_1) : f16[2,4]
  %m = Cast(%m.low) {to = f32} : f32[2,4]
  %t = Tanh(%m) : f32[2,4]
  %3 = Cast(%t) {to = f16} : f16[2,4]
  %u.low = Add(%3, %r) : f16[2,4]
  %u = Cast(%u.low) {to = f32} : f32[2,4]
  return %u, %m
}
"""


def _lower(src: str, choice: PrecisionChoice):
    m = parse(src)
    m.weights = WeightStore()
    verify(m)
    Pipeline([("mixed-precision", choice), "dce"], verify_each=True).run(m)
    return m


def test_golden_casts_only_at_boundaries(rng):
    m0 = parse(SRC)
    m0.weights = WeightStore()
    x = rng.standard_normal((2, 4)).astype(np.float32)
    ref = Interpreter(m0).run({"x": x})
    ch = PrecisionChoice("fp16", keep_patterns=("a", "Tanh"))
    m = _lower(SRC, ch)
    assert print_module(m) == EXPECTED
    got = Interpreter(m).run({"x": x})
    for k in ("u", "m"):
        assert got[k].dtype == np.float32
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-2, atol=1e-2 * np.abs(ref[k]).max())
    by_layer = {d.layer: d.got for d in ch.decisions}
    assert by_layer == {"a": "fp32", "r": "fp16", "s": "fp16", "m": "fp16", "t": "fp32", "u": "fp16"}


def test_every_cast_is_on_a_precision_change():
    m = _lower(SRC, PrecisionChoice("bf16", keep_patterns=("Sigmoid",)))
    f = m.main
    for op in f.ops:
        if op.name == "Cast":
            assert op.operands[0].type.dtype != op.results[0].type.dtype
    # one Cast per (value, dtype): no two casts of one value to one dtype
    keys = [(id(op.operands[0]), op.results[0].type.dtype.short) for op in f.ops if op.name == "Cast"]
    assert len(keys) == len(set(keys))
    assert {op.results[0].type.dtype.short for op in f.ops if op.name == "Sigmoid"} == {"f32"}
    assert {op.results[0].type.dtype.short for op in f.ops if op.name in ("Relu", "Tanh")} == {"bf16"}


def test_per_layer_choice_of_three_types(rng):
    ch = PrecisionChoice("fp16", per_layer={"r": "bf16", "t": "fp32"})
    m = _lower(SRC, ch)
    types = {op.results[0].name: op.results[0].type.dtype.short for op in m.main.ops if op.name != "Cast"}
    assert types["r"] == "bf16" and types["t"] == "f32" and types["s"] == "f16"
    x = rng.standard_normal((2, 4)).astype(np.float32)
    m0 = parse(SRC)
    m0.weights = WeightStore()
    ref, got = Interpreter(m0).run({"x": x}), Interpreter(m).run({"x": x})
    assert np.linalg.norm(got["u"] - ref["u"]) / np.linalg.norm(ref["u"]) < 3e-2


def test_pattern_matching_nothing_warns_naming_it():
    seen = []
    _lower(SRC, PrecisionChoice("fp16", keep_patterns=("conv*", "Tanh"), warn=seen.append))
    assert len(seen) == 1 and "'conv*'" in seen[0]


def _tiny_cnn_fp32(x):
    return Interpreter(nnc.import_onnx(str(EXAMPLE), shapes={"input": list(x.shape)})).run({"input": x})["probs"]


def test_keep_fp32_node_glob_through_compile(tmp_path, rng):
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both patterns match: no warning
        m = nnc.compile(str(EXAMPLE), shapes={"input": [2, 3, 32, 32]}, precision="fp16", backend="reference",
                        keep_fp32="fc,block.a/*", out=tmp_path / "o")
    text = (tmp_path / "o" / "ir" / "final.nnir").read_text()
    gemm = [ln for ln in text.splitlines() if " Gemm(" in ln]
    assert gemm and all(": f32[" in ln for ln in gemm)
    assert "f16[" in text
    layers = {d["node"]: d["precision"] for d in m.plan["layer_precision"]["layers"]}
    assert layers["fc"] == "fp32" and layers["block.a/relu"] == "fp32" and layers["down/relu"] == "fp16"
    got = m(x)
    ref = _tiny_cnn_fp32(x)
    assert got.dtype == np.float32
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-2


def test_keep_fp32_warning_through_compile(tmp_path):
    with pytest.warns(UserWarning, match="'no_such_layer'"):
        nnc.compile(str(EXAMPLE), shapes={"input": [1, 3, 32, 32]}, precision="bf16", backend="reference",
                    keep_fp32=["no_such_layer"], out=tmp_path / "o")


@pytest.mark.parametrize("kw,msg", [
    (dict(precision="fp32", keep_fp32="fc"), "keep_fp32"),
    (dict(precision="fp16", keep_fp32="fc,,x"), "empty entry"),
    (dict(precision="fp16", keep_fp32=[3]), "keep_fp32"),
])
def test_bad_keep_fp32(kw, msg):
    with pytest.raises(NncError, match=msg):
        nnc.compile(str(EXAMPLE), backend="reference", **kw)


def test_mixed_cuda_build_compiles_with_nvrtc(tmp_path, rng):
    """The CUDA build of a mixed fp16/fp32 model: every kernel NVRTC-compiles (CPU), and the plan
    run by the reference backend in its arena (poisoned temporaries) agrees with fp32."""
    from nnc.driver import compile_model
    out = tmp_path / "cuda"
    plan = compile_model(str(EXAMPLE), out, shapes="input:1x3x32x32", precision="fp16",
                         options=nnc.CompileOptions(shapes={"input": [1, 3, 32, 32]}, precision="fp16",
                                                    keep_fp32=("fc", "block.a/*"), tune=False))
    assert plan["kernels"] and (out / "plan.json").is_file()
    ctypes = {json.dumps(k["params"]).count('"ctype": "float"') > 0 for k in plan["kernels"]}
    assert ctypes == {True, False}  # fp32 kernels (the pinned layers) beside fp16 ones
    assert plan["layer_precision"]["mode"] == "keep-fp32"
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    m = nnc.load(out, backend="reference")
    assert m.in_arena
    got = m(x)
    ref = _tiny_cnn_fp32(x)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-2


def test_pattern_of_a_folded_node_says_so(tmp_path):
    # fold-batchnorm folds the Conv "stem/conv" into the BN: the layer left is the node "stem/bn"
    with pytest.warns(UserWarning, match=r"'stem/conv'.*merged into other layers"):
        m = nnc.compile(str(EXAMPLE), shapes={"input": [1, 3, 32, 32]}, precision="fp16", backend="reference",
                        keep_fp32="stem/conv", out=tmp_path / "o")
    assert {d["precision"] for d in m.plan["layer_precision"]["layers"]} == {"fp16"}


def test_hostile_node_name_pinned_by_glob(tmp_path):
    """A model's node name is only matched, never written into the generated source raw."""
    from onnx import TensorProto, helper, numpy_helper
    from nnc.driver import compile_model
    evil = 'mm"); system("x"); /*\n*/'
    w = numpy_helper.from_array(np.full((8, 8), 0.1, np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name=evil),
                           helper.make_node("Relu", ["h"], ["y"], name="relu")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    plan = compile_model(model, tmp_path / "o", options=nnc.CompileOptions(precision="fp16", keep_fp32=("mm*",),
                                                                           tune=False))
    layers = {d["node"]: d["precision"] for d in plan["layer_precision"]["layers"]}
    assert layers == {evil: "fp32", "relu": "fp16"}
    src = "".join(p.read_text() for p in (tmp_path / "o").glob("*.cu"))
    assert 'system("x")' not in src
