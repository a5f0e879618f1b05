"""NN op family: nnc's reference interpreter vs onnxruntime on fresh random inputs, plus symbolic
shape inference and IR text round trips."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import nnc
from nnc.ir import registry

ort = pytest.importorskip("onnxruntime")

RNG = np.random.default_rng(1234)


def _model(nodes, inputs, outputs, inits=(), opset=21):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def _vi(name, arr_or_shape, dt=TensorProto.FLOAT):
    shape = arr_or_shape.shape if isinstance(arr_or_shape, np.ndarray) else arr_or_shape
    return helper.make_tensor_value_info(name, dt, shape)


def _compare(model, feeds, rtol=1e-5, atol=1e-5):
    from nnc.onnx_backend import NncBackend
    rep = NncBackend.prepare(model, "CPU")
    got = rep.run(feeds)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    exp = sess.run(None, feeds)
    assert len(got) == len(exp)
    for g, e in zip(got, exp):
        assert g.dtype == e.dtype, (g.dtype, e.dtype)
        assert g.shape == e.shape, (g.shape, e.shape)
        np.testing.assert_allclose(g, e, rtol=rtol, atol=atol)


def _single(op, x, extra_inits=(), n_out=1, opset=21, rtol=1e-5, atol=1e-5, **attrs):
    """One node with input x (runtime) and constant initialisers."""
    inits = [numpy_helper.from_array(a, f"c{i}") for i, a in enumerate(extra_inits)]
    ins = ["x"] + [f"c{i}" for i in range(len(extra_inits))]
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, ins, outs, **attrs)
    model = _model([node], [_vi("x", x)], [_out(o) for o in outs], inits, opset)
    _compare(_typed(model), {"x": x}, rtol, atol)


def _out(name):
    return helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None)


def _typed(model):
    """Output types filled in by onnx shape inference (onnxruntime wants them)."""
    model = onnx.shape_inference.infer_shapes(model)
    for o in model.graph.output:
        vi = next((v for v in model.graph.value_info if v.name == o.name), None)
        if vi is not None:
            o.CopyFrom(vi)
    return model


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("kw,wshape,xshape", [
    (dict(), (8, 3, 3, 3), (2, 3, 10, 9)),
    (dict(pads=[1, 2, 1, 0], strides=[2, 1]), (8, 3, 3, 3), (2, 3, 11, 9)),
    (dict(dilations=[2, 2], pads=[2, 2, 2, 2]), (4, 3, 3, 3), (1, 3, 12, 12)),
    (dict(group=2, strides=[2, 2]), (6, 2, 3, 3), (1, 4, 9, 9)),
    (dict(group=6, pads=[1, 1, 1, 1]), (6, 1, 3, 3), (2, 6, 8, 8)),  # depthwise
    (dict(auto_pad="SAME_UPPER", strides=[2, 2]), (5, 3, 4, 4), (1, 3, 9, 10)),
    (dict(auto_pad="SAME_LOWER"), (5, 3, 2, 2), (1, 3, 7, 7)),
    (dict(pads=[1, 1], strides=[2]), (4, 3, 5), (2, 3, 17)),  # 1-D
    (dict(pads=[1, 1, 1, 1, 1, 1]), (2, 3, 3, 3, 3), (1, 3, 5, 6, 4)),  # 3-D
])
def test_conv(kw, wshape, xshape):
    w, b = rand(*wshape), rand(wshape[0])
    _single("Conv", rand(*xshape), [w, b], **kw)


@pytest.mark.parametrize("kw,wshape,xshape", [
    (dict(strides=[2, 2]), (3, 4, 3, 3), (1, 3, 5, 5)),
    (dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]), (3, 2, 4, 4), (2, 3, 4, 5)),
    (dict(group=2, dilations=[2, 1]), (4, 3, 3, 3), (1, 4, 5, 5)),
    (dict(strides=[3, 2], output_shape=[10, 8]), (1, 2, 3, 3), (1, 1, 3, 3)),
    (dict(auto_pad="SAME_UPPER", strides=[2, 2]), (2, 2, 3, 3), (1, 2, 4, 4)),
])
def test_conv_transpose(kw, wshape, xshape):
    _single("ConvTranspose", rand(*xshape), [rand(*wshape), rand(wshape[1] * kw.get("group", 1))], **kw)


@pytest.mark.parametrize("op,kw", [
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    ("MaxPool", dict(kernel_shape=[2, 2], dilations=[2, 2])),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)),
    ("AveragePool", dict(kernel_shape=[3, 2], strides=[2, 2], ceil_mode=1)),
    ("GlobalAveragePool", {}),
    ("GlobalMaxPool", {}),
])
def test_pools(op, kw):
    _single(op, rand(2, 3, 10, 11), **kw)


def test_maxpool_indices():
    _single("MaxPool", rand(1, 2, 7, 8), n_out=2, kernel_shape=[2, 2], strides=[2, 2], pads=[1, 0, 1, 0])


def test_batchnorm_layernorm_softmax():
    C = 4
    _single("BatchNormalization", rand(2, C, 5, 5),
            [rand(C), rand(C), rand(C), np.abs(rand(C)) + 0.5], epsilon=1e-3)
    _single("LayerNormalization", rand(2, 5, 8), [rand(8), rand(8)], axis=-1)
    _single("LayerNormalization", rand(2, 5, 8), [rand(5, 8)], axis=1, n_out=3)
    _single("Softmax", rand(3, 4, 5), axis=1)
    _single("LogSoftmax", rand(3, 4, 5))


def test_gemm_matmul():
    _single("Gemm", rand(4, 6), [rand(5, 6), rand(5)], transB=1, alpha=0.5, beta=2.0)
    _single("Gemm", rand(6, 4), [rand(6, 5), rand(1, 5)], transA=1)
    _single("MatMul", rand(2, 1, 3, 4), [rand(5, 4, 6)])
    _single("MatMul", rand(4), [rand(2, 4, 3)])
    _single("MatMul", rand(2, 3, 4), [rand(4)])


@pytest.mark.parametrize("kw,inits", [
    (dict(mode="nearest"), [np.array([1, 1, 2, 1.5], np.float32)]),
    (dict(mode="linear"), [np.array([1, 1, 0.6, 1.7], np.float32)]),
    (dict(mode="linear", coordinate_transformation_mode="align_corners"), [np.array([1, 1, 2, 2], np.float32)]),
    (dict(mode="cubic"), [np.array([1, 1, 0.8, 1.25], np.float32)]),
    (dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
     [np.array([1, 1, 3, 2], np.float32)]),
])
def test_resize(kw, inits):
    _single_resize(rand(1, 2, 6, 7), inits[0], None, kw)


def test_resize_sizes():
    _single_resize(rand(1, 2, 6, 7), None, np.array([1, 2, 4, 11], np.int64), dict(mode="linear"))


def _single_resize(x, scales, sizes, kw):
    inits = [numpy_helper.from_array(np.zeros(0, np.float32), "roi")]
    ins = ["x", "roi"]
    if scales is not None:
        inits.append(numpy_helper.from_array(scales, "scales"))
        ins.append("scales")
    else:
        ins.append("")
        inits.append(numpy_helper.from_array(sizes, "sizes"))
        ins.append("sizes")
    node = helper.make_node("Resize", ins, ["y"], **kw)
    model = _model([node], [_vi("x", x)], [_out("y")], inits, 19)
    _compare(_typed(model), {"x": x}, 1e-4, 1e-5)


def test_reduce_einsum():
    x = rand(3, 4, 5)
    _single("ReduceMean", x, [np.array([0, 2], np.int64)], keepdims=0, opset=18)
    _single("ReduceSum", x, [np.array([-1], np.int64)], opset=13)
    _single("ReduceLogSumExp", x, [np.array([1], np.int64)], opset=18)
    _single("ReduceMax", x, opset=11, axes=[1])  # attribute form
    _single("Einsum", x, [rand(5, 2)], equation="abc,cd->abd", opset=12)
    _single("Einsum", x, equation="abc->cb", opset=12)


# ---------------------------------------------------------------- IR level

CONV_IR = """
func @main(%x: f32[N,3,H,W], %w: f32[8,3,3,3]) -> (f32[N,8,(H-1)/2+1,(W-1)/2+1]) {
  %y = Conv(%x, %w) {pads = [1, 1, 1, 1], strides = [2, 2]} : f32[N,8,(H-1)/2+1,(W-1)/2+1]
  %z = MaxPool(%y) {kernel_shape = [2, 2], strides = [2, 2]} : f32[N,8,((H-1)/2+1-2)/2+1,((W-1)/2+1-2)/2+1]
  %r = ReduceMean(%z) {keepdims = 0} : f32[]
  return %y
}
"""


def _infer(op):
    opdef = registry.get(op.name)
    return registry.run_infer(opdef, op.attrs, op.operands, len(op.results), op.loc, lambda v: None)


def test_symbolic_conv_inference():
    mod = nnc.ir.parse(CONV_IR)
    nnc.ir.verify(mod)
    ops = {op.name: op for op in mod.main.ops}
    assert str(_infer(ops["Conv"])[0]) == "f32[N,8,(H-1)/2+1,(W-1)/2+1]"
    t = _infer(ops["MaxPool"])[0]
    assert t.shape[:2][1] == 8 and str(t.shape[0]) == "N"
    assert not any(isinstance(d, int) for d in t.shape[2:])
    # evaluates to the right static size
    from nnc.ir.symbolic import evaluate
    assert evaluate(t.shape[2], {"H": 224}) == 56
    assert str(_infer(ops["ReduceMean"])[0]) == "f32[]"


def test_symbolic_through_onnx_import():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    y = _out("y")
    w = numpy_helper.from_array(rand(8, 3, 3, 3), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Softmax", ["c"], ["y"], axis=1)]
    mod = nnc.import_onnx(_model(nodes, [x], [y], [w]))
    nnc.ir.verify(mod)
    assert str(mod.main.results[0].type) == "f32[N,8,(H-1)/2+1,(W-1)/2+1]"


def test_ir_round_trip():
    mod = nnc.ir.parse(CONV_IR)
    text = nnc.ir.print_module(mod)
    mod2 = nnc.ir.parse(text)
    nnc.ir.verify(mod2)
    assert nnc.ir.print_module(mod2) == text
    x = rand(2, 3, 9, 9)
    w = rand(8, 3, 3, 3)
    out = nnc.ir.run(mod2, {"x": x, "w": w})
    y = list(out.values())[0]
    assert y.shape == (2, 8, 5, 5) and y.dtype == np.float32


def test_ir_round_trip_imported_model():
    x = _vi("x", (1, 4, 8, 8))
    inits = [numpy_helper.from_array(rand(4, 1, 3, 3), "w"),
             numpy_helper.from_array(np.ones(4, np.float32), "s"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], group=4, pads=[1, 1, 1, 1]),
             helper.make_node("InstanceNormalization", ["c", "s", "b"], ["n"]),
             helper.make_node("Resize", ["n", "", "", "sz"], ["r"], mode="linear"),
             helper.make_node("GlobalAveragePool", ["r"], ["y"])]
    inits.append(numpy_helper.from_array(np.array([1, 4, 16, 16], np.int64), "sz"))
    mod = nnc.import_onnx(_typed(_model(nodes, [x], [_out("y")], inits)))
    text = nnc.ir.print_module(mod)
    mod2 = nnc.ir.parse(text)
    mod2.weights = mod.weights
    nnc.ir.verify(mod2)
    assert nnc.ir.print_module(mod2) == text
