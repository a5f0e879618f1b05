"""Elementwise / math / cast / quantization ops: nnc's reference vs onnxruntime (or onnx's reference
evaluator where onnxruntime lacks the type) on fresh random inputs, symbolic broadcasting inference,
IR text round trip."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import nnc
from nnc.ir import Interpreter, parse, print_module, verify
from nnc.ir.errors import NncError
from tests.ops.util import run_nnc

ort = pytest.importorskip("onnxruntime")

rng = np.random.default_rng(1234)
N = helper.make_node


def make_model(nodes, inputs: dict, outputs: list, opset=21, inits=None):
    ins = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
           for k, v in inputs.items()]
    outs = [helper.make_empty_tensor_value_info(o) for o in outputs]
    g = helper.make_graph(nodes, "g", ins, outs,
                          initializer=[onnx.numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    m = onnx.shape_inference.infer_shapes(m)
    del m.graph.value_info[:]
    return m




def run_ref(m, inputs, oracle):
    if oracle == "ort":
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, dict(inputs))
    from onnx.reference import ReferenceEvaluator
    return ReferenceEvaluator(m).run(None, dict(inputs))


def check(nodes, inputs: dict, outputs: list, opset=21, inits=None, rtol=1e-5, atol=1e-6, oracle="ort"):
    m = make_model(nodes, inputs, outputs, opset, inits)
    got = run_nnc(m, inputs)
    exp = run_ref(m, inputs, oracle)
    assert len(got) == len(exp)
    for g, e in zip(got, exp):
        e = np.asarray(e)
        assert g.dtype == e.dtype, (g.dtype, e.dtype)
        assert g.shape == e.shape, (g.shape, e.shape)
        if e.dtype.kind == "f" or e.dtype.name.startswith(("float", "bfloat")):
            np.testing.assert_allclose(g.astype(np.float64), e.astype(np.float64), rtol=rtol, atol=atol)
        else:
            np.testing.assert_array_equal(g, e)
    return got


def rnd(*shape, dt=np.float32, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dt)


# ---------------------------------------------------------------- unary

UNARY = ["Abs", "Neg", "Exp", "Tanh", "Sigmoid", "Sin", "Cos", "Atan", "Asinh", "Erf", "Floor", "Ceil",
         "Round", "Sign", "Relu", "Softplus", "Softsign", "Mish", "HardSwish", "Tan", "Sinh", "Cosh"]


@pytest.mark.parametrize("op", UNARY)
def test_unary(op):
    check([N(op, ["x"], ["y"])], {"x": rnd(3, 4, 5, scale=2)}, ["y"], opset=22)


@pytest.mark.parametrize("op", ["Sqrt", "Log", "Reciprocal", "Acos", "Asin", "Atanh", "Acosh"])
def test_unary_domain(op):
    x = rng.uniform(0.05, 0.95, (4, 6)).astype(np.float32)
    if op == "Acosh":
        x = x + 1
    check([N(op, ["x"], ["y"])], {"x": x}, ["y"])


@pytest.mark.parametrize("op,attrs", [
    ("LeakyRelu", dict(alpha=0.2)), ("Elu", dict(alpha=0.7)), ("Selu", {}), ("Celu", dict(alpha=1.5)),
    ("HardSigmoid", dict(alpha=0.3, beta=0.4)), ("ThresholdedRelu", dict(alpha=0.5)),
    ("Shrink", dict(bias=0.25, lambd=0.6)), ("Gelu", {}), ("Gelu", dict(approximate="tanh")),
])
def test_activation_attrs(op, attrs):
    check([N(op, ["x"], ["y"], **attrs)], {"x": rnd(2, 3, 7, scale=2)}, ["y"], opset=22, rtol=1e-5, atol=1e-6)


def test_f16_unary_and_predicates():
    x = rnd(4, 5, dt=np.float16, scale=3)
    x[0, 0], x[1, 1], x[2, 2] = np.nan, np.inf, -np.inf
    check([N("Sigmoid", ["x"], ["a"]), N("IsNaN", ["x"], ["b"]), N("IsInf", ["x"], ["c"], detect_negative=0),
           N("Exp", ["x"], ["d"])], {"x": x}, ["a", "b", "c", "d"], rtol=1e-3, atol=1e-3)


def test_prelu_clip():
    x = rnd(2, 3, 4, 4)
    slope = rnd(3, 1, 1)
    check([N("PRelu", ["x", "s"], ["y"]), N("Clip", ["x", "lo", "hi"], ["c"]), N("Clip", ["x", "", "hi"], ["c2"])],
          {"x": x}, ["y", "c", "c2"], inits={"s": slope, "lo": np.float32(-0.5), "hi": np.float32(0.7)})


def test_clip_opset6_attributes():
    check([N("Clip", ["x"], ["y"], min=-0.3, max=0.4), N("Clip", ["x"], ["z"], max=0.1)],
          {"x": rnd(5, 6)}, ["y", "z"], opset=10)


# ---------------------------------------------------------------- binary / variadic

@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Equal", "Less", "LessOrEqual", "Greater",
                                "GreaterOrEqual"])
def test_binary_broadcast(op):
    check([N(op, ["a", "b"], ["y"])], {"a": rnd(2, 1, 4, 5), "b": rnd(3, 1, 5)}, ["y"])


def test_int_div_mod_truncates():
    a = rng.integers(-50, 50, (6, 7)).astype(np.int32)
    b = rng.integers(1, 9, (7,)).astype(np.int32) * rng.choice([-1, 1], (7,)).astype(np.int32)
    check([N("Div", ["a", "b"], ["q"]), N("Mod", ["a", "b"], ["m"]), N("Mod", ["a", "b"], ["f"], fmod=1)],
          {"a": a, "b": b}, ["q", "m", "f"])
    af, bf = rnd(5, 4, scale=5), rnd(4, scale=3)
    check([N("Mod", ["a", "b"], ["f"], fmod=1)], {"a": af, "b": bf}, ["f"])


def test_pow_mixed_types():
    x = rng.uniform(0.1, 3, (3, 4)).astype(np.float32)
    check([N("Pow", ["x", "e"], ["y"]), N("Pow", ["x", "ei"], ["z"])], {"x": x},
          ["y", "z"], inits={"e": np.array([0.5, 2, -1, 3], np.float32), "ei": np.array([2], np.int64)}, rtol=1e-5)
    xi = rng.integers(-4, 5, (3, 4)).astype(np.int64)
    check([N("Pow", ["x", "e"], ["y"])], {"x": xi}, ["y"], inits={"e": np.array([0, 1, 2, 3], np.int64)})


def test_logic_and_bitwise():
    a, b = rng.integers(0, 2, (3, 4)).astype(bool), rng.integers(0, 2, (4,)).astype(bool)
    check([N("And", ["a", "b"], ["x"]), N("Or", ["a", "b"], ["y"]), N("Xor", ["a", "b"], ["z"]),
           N("Not", ["a"], ["w"])], {"a": a, "b": b}, ["x", "y", "z", "w"])
    i, j = rng.integers(-100, 100, (3, 4)).astype(np.int32), rng.integers(-100, 100, (4,)).astype(np.int32)
    check([N("BitwiseAnd", ["i", "j"], ["x"]), N("BitwiseOr", ["i", "j"], ["y"]),
           N("BitwiseXor", ["i", "j"], ["z"]), N("BitwiseNot", ["i"], ["w"])], {"i": i, "j": j}, ["x", "y", "z", "w"])
    u, s = rng.integers(0, 255, (8,)).astype(np.uint8), np.arange(8).astype(np.uint8)
    check([N("BitShift", ["u", "s"], ["l"], direction="LEFT"), N("BitShift", ["u", "s"], ["r"], direction="RIGHT")],
          {"u": u, "s": s}, ["l", "r"])


def test_variadic_where():
    a, b, c = rnd(3, 1), rnd(1, 4), rnd(4)
    check([N("Max", ["a", "b", "c"], ["mx"]), N("Min", ["a", "b"], ["mn"]), N("Sum", ["a", "b", "c"], ["s"]),
           N("Mean", ["a", "b", "c"], ["m"]), N("Where", ["k", "a", "b"], ["w"])],
          {"a": a, "b": b, "c": c, "k": rng.integers(0, 2, (3, 4)).astype(bool)}, ["mx", "mn", "s", "m", "w"])
    h = {"a": rnd(3, 4, dt=np.float16), "b": rnd(4, dt=np.float16)}
    check([N("Mean", ["a", "b"], ["m"]), N("Add", ["a", "b"], ["s"])], h, ["m", "s"], rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- cast

@pytest.mark.parametrize("to", [TensorProto.FLOAT16, TensorProto.INT32, TensorProto.BOOL, TensorProto.DOUBLE,
                                TensorProto.UINT8, TensorProto.BFLOAT16])
def test_cast(to):
    x = rnd(4, 5, scale=10)
    if to == TensorProto.UINT8:
        x = np.abs(x)
    check([N("Cast", ["x"], ["y"], to=to), N("CastLike", ["x", "like"], ["z"])], {"x": x}, ["y", "z"],
          inits={"like": np.zeros(1, helper.tensor_dtype_to_np_dtype(to))},
          oracle="reference" if to == TensorProto.BFLOAT16 else "ort")  # onnxruntime cannot return bf16


@pytest.mark.parametrize("to", [TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E4M3FNUZ,
                                TensorProto.INT4, TensorProto.UINT4, TensorProto.INT2, TensorProto.UINT2,
                                TensorProto.FLOAT4E2M1])
@pytest.mark.parametrize("saturate", [0, 1])
def test_cast_exotic(to, saturate):
    """Against onnx's reference evaluator where the spec and every ml_dtypes version agree: the f8
    tables, f4's finite values, and integral in-range values for the narrow ints. Everything the
    evaluator gets from ml_dtypes' astype (narrow-int ties and out-of-range values, f4 NaN) is
    checked by hand in tests/ops/test_cast_spec.py."""
    x = np.concatenate([rnd(20, scale=100), np.array([np.inf, -np.inf, 1e6, -1e6, 0.0], np.float32)])
    if to == TensorProto.FLOAT4E2M1:
        x = np.concatenate([rnd(20, scale=4), np.array([1e6, -1e6, 0.0, 0.25, 0.75], np.float32)])
    narrow_int = {TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15), TensorProto.INT2: (-2, 1),
                  TensorProto.UINT2: (0, 3)}
    if to in narrow_int:
        lo, hi = narrow_int[to]
        x = np.arange(lo, hi + 1).astype(np.float32)
    attrs = {"saturate": saturate} if to not in narrow_int and to != TensorProto.FLOAT4E2M1 else {}
    check([N("Cast", ["x"], ["y"], to=to, **attrs), N("Cast", ["y"], ["z"], to=TensorProto.FLOAT)], {"x": x},
          ["y", "z"], opset=25, oracle="reference")


def test_bitcast():
    x = rnd(3, 4)
    m = make_model([N("BitCast", ["x"], ["y"], to=TensorProto.INT32)], {"x": x}, ["y"], opset=26)
    (y,) = run_nnc(m, {"x": x})
    np.testing.assert_array_equal(y, x.view(np.int32))


# ---------------------------------------------------------------- quantization

def test_quantize_dequantize_per_tensor_and_axis():
    x = rnd(2, 3, 4, scale=3)
    inits = {"s": np.float32(0.05), "z": np.uint8(128), "sa": np.array([0.02, 0.05, 0.1], np.float32),
             "za": np.array([-3, 0, 7], np.int8)}
    check([N("QuantizeLinear", ["x", "s", "z"], ["q"]), N("DequantizeLinear", ["q", "s", "z"], ["d"]),
           N("QuantizeLinear", ["x", "sa", "za"], ["qa"], axis=1), N("DequantizeLinear", ["qa", "sa", "za"], ["da"]),
           N("QuantizeLinear", ["x", "s"], ["q0"])],
          {"x": x}, ["q", "d", "qa", "da", "q0"], inits=inits)


def test_dynamic_quantize():
    check([N("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])], {"x": rnd(4, 8, scale=2)}, ["y", "s", "z"])


@pytest.mark.parametrize("qt", [np.int8, np.uint8, ml_dtypes.int4, ml_dtypes.float8_e4m3fn])
def test_quantize_blocked(qt):
    x = rnd(3, 10, scale=4)
    s = rng.uniform(0.01, 0.5, (3, 3)).astype(np.float32)  # block 4 along axis 1: 4+4+2
    z = np.zeros((3, 3), qt)
    check([N("QuantizeLinear", ["x", "s", "z"], ["q"], axis=1, block_size=4),
           N("DequantizeLinear", ["q", "s", "z"], ["d"], axis=1, block_size=4)],
          {"x": x}, ["q", "d"], opset=21, inits={"s": s, "z": z}, oracle="reference")


def test_quantize_output_dtype_attr():
    x = rnd(2, 6, scale=2)
    check([N("QuantizeLinear", ["x", "s"], ["q"], output_dtype=TensorProto.INT8),
           N("DequantizeLinear", ["q", "s"], ["d"], output_dtype=TensorProto.FLOAT16)],
          {"x": x}, ["q", "d"], opset=23, inits={"s": np.float32(0.03)}, oracle="reference")


# ---------------------------------------------------------------- inference / IR text

SYM = """
func @main(%x: f32[N,3], %b: f32[3], %c: f32[M,1,1], %k: bool[N,1]) -> (f32[N,3]) {
  %y = Add(%x, %b) : f32[N,3]
  %r = Relu(%y) : f32[N,3]
  %z = Mul(%c, %r) : f32[M,N,3]
  %e = Less(%x, %b) : bool[N,3]
  %w = Where(%k, %x, %b) : f32[N,3]
  %q = QuantizeLinear(%x, %b) {axis = 1} : u8[N,3]
  %t = Cast(%q) {to = f16} : f16[N,3]
  return %r
}
"""


def test_symbolic_inference():
    m = parse(SYM)
    verify(m)
    types = {op.results[0].name: str(op.results[0].type) for op in m.main.ops}
    assert types == {"y": "f32[N,3]", "r": "f32[N,3]", "z": "f32[M,N,3]", "e": "bool[N,3]",
                     "w": "f32[N,3]", "q": "u8[N,3]", "t": "f16[N,3]"}


def test_inference_rejects_bad_types():
    with pytest.raises(NncError):
        verify(parse("func @main(%x: f32[N,3], %b: f32[4]) -> (f32[N,3]) {\n"
                     "  %y = Add(%x, %b) : f32[N,3]\n  return %y\n}\n"))
    with pytest.raises(NncError):
        verify(parse("func @main(%x: i32[3]) -> (i32[3]) {\n  %y = Exp(%x) : i32[3]\n  return %y\n}\n"))


def test_round_trip():
    nodes = [N("Add", ["x", "b"], ["a"]), N("LeakyRelu", ["a"], ["l"], alpha=0.1), N("Gelu", ["l"], ["g"],
             approximate="tanh"), N("Clip", ["g", "lo", ""], ["c"]), N("Cast", ["c"], ["h"], to=TensorProto.FLOAT16),
             N("QuantizeLinear", ["c", "s", "z"], ["q"], axis=1), N("DequantizeLinear", ["q", "s", "z"], ["d"]),
             N("Max", ["d", "c", "x"], ["m"]), N("Greater", ["m", "b"], ["k"]), N("Where", ["k", "m", "x"], ["w"])]
    inits = {"b": rnd(4), "lo": np.float32(-0.2), "s": np.array([0.1, 0.2, 0.3], np.float32),
             "z": np.array([1, 2, 3], np.int8)}
    x = rnd(2, 3, 4)
    m = make_model(nodes, {"x": x}, ["h", "w"], inits=inits)
    mod = nnc.import_onnx(m)
    verify(mod)
    text = print_module(mod)
    again = parse(text)
    verify(again)
    assert print_module(again) == text
    a = Interpreter(mod).run({"x": x})
    b = Interpreter(again).run({"x": x})
    for v1, v2 in zip(mod.main.results, again.main.results):
        np.testing.assert_array_equal(a[v1.name], b[v2.name])
