"""Small ONNX models exercising every kernel family of the CUDA backend (shared by the CPU
structure/NVRTC tests and the GPU correctness tests)."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

F, F16, I64, B = T.FLOAT, T.FLOAT16, T.INT64, T.BOOL


def mk(nodes, inputs, outputs, inits=(), opset=18):
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                     [h.make_tensor_value_info(n, t, None) for n, t in outputs],
                     [nh.from_array(np.asarray(a), n) for n, a in inits])
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)])


def N(op, ins, outs, **attrs):
    return h.make_node(op, ins, outs, **attrs)


def models():
    """name -> (onnx model, {input name: (shape, dtype, kind)}) ; kind: normal | positive | int:K | bool.
    Deterministic: the same weights on every call."""
    _r = np.random.default_rng(1234)

    def _w(*shape, dt=np.float32):
        return _r.standard_normal(shape).astype(dt)

    M = {}
    M["elementwise"] = (mk([
        N("Add", ["x", "b"], ["a"]), N("Mul", ["a", "x"], ["m"]), N("Sub", ["m", "b"], ["s"]),
        N("Div", ["s", "p"], ["d"]), N("Relu", ["d"], ["r"]), N("Sigmoid", ["s"], ["sg"]), N("Tanh", ["a"], ["th"]),
        N("Exp", ["th"], ["e"]), N("Log", ["p"], ["lg"]), N("Sqrt", ["p"], ["sq"]), N("Abs", ["d"], ["ab"]),
        N("Neg", ["ab"], ["ng"]), N("Pow", ["p", "two"], ["pw"]), N("Max", ["r", "sg", "th"], ["mx"]),
        N("Min", ["r", "e"], ["mn"]), N("Erf", ["a"], ["erf"]), N("Gelu", ["a"], ["gl"]),
        N("LeakyRelu", ["a"], ["lr"], alpha=0.1), N("Clip", ["a", "lo", "hi"], ["cl"]), N("HardSwish", ["a"], ["hs"]),
        N("Sum", ["mx", "mn", "erf", "gl", "lr", "cl", "hs", "sq", "lg", "ng", "pw", "e"], ["sum"]),
        N("Greater", ["x", "b"], ["gt"]), N("Not", ["gt"], ["nt"]), N("Where", ["nt", "sum", "x"], ["wh"]),
        N("Cast", ["gt"], ["gti"], to=T.INT64), N("Equal", ["gti", "one"], ["eq"]), N("Softplus", ["x"], ["sp"]),
        N("Floor", ["x"], ["fl"]), N("Ceil", ["x"], ["ce"]), N("Round", ["x"], ["ro"]), N("Sign", ["x"], ["sgn"]),
        N("Elu", ["x"], ["elu"]), N("Reciprocal", ["p"], ["rc"]), N("IsNaN", ["x"], ["nan"]),
        N("Or", ["eq", "nan"], ["or"]), N("Xor", ["eq", "gt"], ["xor"]), N("Mod", ["gti", "two_i"], ["mod"]),
    ], [("x", F, [2, 3, 8]), ("b", F, [3, 1]), ("p", F, [8])],
        [("wh", F), ("eq", B), ("sp", F), ("fl", F), ("ce", F), ("ro", F), ("sgn", F), ("elu", F), ("rc", F),
         ("or", B), ("xor", B), ("mod", I64)],
        [("two", np.array(2.0, np.float32)), ("lo", np.array(-0.5, np.float32)), ("hi", np.array(0.7, np.float32)),
         ("one", np.array(1, np.int64)), ("two_i", np.array(2, np.int64))]),
        {"x": ([2, 3, 8], np.float32, "normal"), "b": ([3, 1], np.float32, "normal"), "p": ([8], np.float32, "positive")})
    M["reduce"] = (mk([
        N("ReduceSum", ["x", "ax1"], ["rs"], keepdims=1), N("ReduceMean", ["x", "ax02"], ["rm"], keepdims=0),
        N("ReduceMax", ["x", "ax2"], ["rx"], keepdims=0), N("ReduceMin", ["x"], ["rn"], keepdims=0),
        N("ReduceProd", ["x", "ax1"], ["rp"], keepdims=0), N("ReduceL2", ["x", "ax2"], ["l2"]),
        N("ReduceLogSumExp", ["x", "ax1"], ["lse"], keepdims=0), N("ReduceSumSquare", ["x", "ax12"], ["ss"]),
        N("ReduceL1", ["x", "ax0"], ["l1"]),
        N("Softmax", ["x"], ["sm"], axis=-1), N("Softmax", ["x"], ["sm1"], axis=1), N("LogSoftmax", ["x"], ["lsm"], axis=2),
        N("LayerNormalization", ["x", "g", "be"], ["ln"], axis=-1, epsilon=1e-5),
        N("ArgMax", ["x"], ["am"], axis=1, keepdims=0), N("ArgMin", ["x"], ["an"], axis=2, keepdims=1),
    ], [("x", F, [4, 5, 33])],
        [("rs", F), ("rm", F), ("rx", F), ("rn", F), ("rp", F), ("l2", F), ("lse", F), ("ss", F), ("l1", F), ("sm", F),
         ("sm1", F), ("lsm", F), ("ln", F), ("am", I64), ("an", I64)],
        [("ax1", np.array([1], np.int64)), ("ax02", np.array([0, 2], np.int64)), ("ax2", np.array([-1], np.int64)),
         ("ax12", np.array([1, 2], np.int64)), ("ax0", np.array([0], np.int64)), ("g", _w(33)), ("be", _w(33))]),
        {"x": ([4, 5, 33], np.float32, "normal")})
    M["movement"] = (mk([
        N("Transpose", ["x"], ["t"], perm=[2, 0, 1]), N("Slice", ["x", "st", "en", "axs", "stp"], ["sl"]),
        N("Concat", ["x", "x2"], ["cc"], axis=1), N("Split", ["x", "spl"], ["s0", "s1"], axis=2),
        N("Expand", ["e1", "eshape"], ["ex"]), N("Tile", ["x", "reps"], ["ti"]),
        N("Gather", ["x", "gi"], ["ga"], axis=1), N("GatherElements", ["x", "gei"], ["ge"], axis=2),
        N("Pad", ["x", "pads"], ["pc"], mode="constant"), N("Pad", ["x", "pads2", "pv"], ["pr"], mode="reflect"),
        N("Pad", ["x", "pads2"], ["pe"], mode="edge"),
        N("Reshape", ["x", "rsh"], ["rh"]), N("Flatten", ["x"], ["fl"], axis=1), N("Unsqueeze", ["fl", "ua"], ["us"]),
        N("Relu", ["us"], ["ur"]), N("Identity", ["x"], ["idn"]),
        N("DepthToSpace", ["d"], ["d2s"], blocksize=2, mode="DCR"), N("DepthToSpace", ["d"], ["d2c"], blocksize=2, mode="CRD"),
        N("SpaceToDepth", ["d"], ["s2d"], blocksize=2),
        N("Resize", ["d", "", "sc"], ["rn"], mode="nearest"),
        N("Resize", ["d", "", "sc"], ["rl"], mode="linear", coordinate_transformation_mode="half_pixel"),
        N("Resize", ["d", "", "sc"], ["ra"], mode="linear", coordinate_transformation_mode="align_corners"),
        N("Resize", ["d", "", "sc"], ["rasy"], mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        N("Cast", ["x"], ["xh"], to=T.FLOAT16), N("Transpose", ["xh"], ["th"], perm=[1, 0, 2]),
    ], [("x", F, [2, 3, 6]), ("x2", F, [2, 4, 6]), ("e1", F, [3, 1]), ("d", F, [1, 8, 4, 6])],
        [("t", F), ("sl", F), ("cc", F), ("s0", F), ("s1", F), ("ex", F), ("ti", F), ("ga", F), ("ge", F), ("pc", F),
         ("pr", F), ("pe", F), ("rh", F), ("ur", F), ("idn", F), ("d2s", F), ("d2c", F), ("s2d", F), ("rn", F),
         ("rl", F), ("ra", F), ("rasy", F), ("th", F16)],
        [("st", np.array([0, 5], np.int64)), ("en", np.array([2, 0], np.int64)), ("axs", np.array([1, 2], np.int64)),
         ("stp", np.array([1, -2], np.int64)), ("spl", np.array([2, 4], np.int64)),
         ("eshape", np.array([2, 3, 4], np.int64)), ("reps", np.array([1, 2, 2], np.int64)),
         ("gi", np.array([[2, 0], [-1, 1]], np.int64)), ("gei", _r.integers(0, 6, (2, 3, 4)).astype(np.int64)),
         ("pads", np.array([0, 1, 2, 1, 0, 1], np.int64)), ("pads2", np.array([0, 0, 2, 0, 1, 3], np.int64)),
         ("pv", np.array(0.0, np.float32)), ("rsh", np.array([6, 6], np.int64)), ("ua", np.array([0], np.int64)),
         ("sc", np.array([1, 1, 2, 1.5], np.float32))]),
        {"x": ([2, 3, 6], np.float32, "normal"), "x2": ([2, 4, 6], np.float32, "normal"),
         "e1": ([3, 1], np.float32, "normal"), "d": ([1, 8, 4, 6], np.float32, "normal")})
    M["cnn"] = (mk([
        N("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[1, 1]),
        N("BatchNormalization", ["c1", "bs", "bb", "bm", "bv"], ["bn"], epsilon=1e-5), N("Relu", ["bn"], ["r1"]),
        N("MaxPool", ["r1"], ["mp"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        N("Conv", ["mp", "w2"], ["c2"], group=2, strides=[2, 2], dilations=[1, 1], pads=[0, 1, 0, 1]),
        N("AveragePool", ["c2"], ["ap"], kernel_shape=[2, 2], strides=[1, 1], pads=[1, 1, 0, 0], count_include_pad=1),
        N("AveragePool", ["r1"], ["ap2"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
        N("GlobalAveragePool", ["ap"], ["gp"]), N("GlobalMaxPool", ["r1"], ["gm"]),
        N("Flatten", ["gp"], ["f"]), N("Gemm", ["f", "wf", "bf"], ["fc"], transB=1, alpha=0.5, beta=2.0),
        N("MatMul", ["x3", "w3"], ["mm"]), N("MatMul", ["x3", "v"], ["mv"]),
        N("Gemm", ["a2", "b2", "c2b"], ["g2"], transA=1),
    ], [("x", F, [2, 3, 9, 10]), ("x3", F, [2, 3, 17, 20]), ("a2", F, [19, 5])],
        [("fc", F), ("ap2", F), ("gm", F), ("mm", F), ("mv", F), ("g2", F)],
        [("w1", _w(8, 3, 3, 3)), ("b1", _w(8)), ("bs", _w(8)), ("bb", _w(8)), ("bm", _w(8)),
         ("bv", np.abs(_w(8)) + 0.5), ("w2", _w(6, 4, 3, 3)), ("wf", _w(10, 6)), ("bf", _w(10)),
         ("w3", _w(3, 20, 7)), ("v", _w(20)), ("b2", _w(19, 11)), ("c2b", _w(11))]),
        {"x": ([2, 3, 9, 10], np.float32, "normal"), "x3": ([2, 3, 17, 20], np.float32, "normal"),
         "a2": ([19, 5], np.float32, "normal")})
    M["fp16"] = (mk([
        N("Add", ["x", "y"], ["a"]), N("Softmax", ["a"], ["s"], axis=-1), N("MatMul", ["s", "w"], ["m"]),
        N("LayerNormalization", ["m", "g"], ["ln"], axis=-1), N("ReduceMean", ["ln", "ax"], ["rm"]),
        N("Conv", ["img", "cw"], ["cv"], pads=[1, 1, 1, 1]), N("Sigmoid", ["cv"], ["cs"]),
        N("Cast", ["cs"], ["cf"], to=T.FLOAT),
    ], [("x", F16, [3, 40]), ("y", F16, [3, 40]), ("img", F16, [1, 2, 5, 5])],
        [("ln", F16), ("rm", F16), ("cf", F)],
        [("w", _w(40, 24, dt=np.float16)), ("g", _w(24, dt=np.float16)), ("ax", np.array([1], np.int64)),
         ("cw", _w(3, 2, 3, 3, dt=np.float16))]),
        {"x": ([3, 40], np.float16, "normal"), "y": ([3, 40], np.float16, "normal"),
         "img": ([1, 2, 5, 5], np.float16, "normal")})
    M["select"] = (mk([
        N("TopK", ["x", "k"], ["tv", "ti"], axis=-1, largest=1), N("TopK", ["x", "k2"], ["bv", "bi"], axis=0, largest=0),
        N("Greater", ["x", "z"], ["pos"]), N("NonZero", ["pos"], ["nz"]),
    ], [("x", F, [4, 50])], [("tv", F), ("ti", I64), ("bv", F), ("bi", I64), ("nz", I64)],
        [("k", np.array([5], np.int64)), ("k2", np.array([2], np.int64)), ("z", np.array(0.5, np.float32))]),
        {"x": ([4, 50], np.float32, "normal")})
    return M


def nonzero_view_model():
    """x: f32[4,6] -> Relu -> Reshape view [6,4] -> Sigmoid (output s) and Tanh -> NonZero (output
    nz, data-dependent extent): views, a dynamic output and its readback in one small plan."""
    g = h.make_graph([
        h.make_node("Relu", ["x"], ["r"]),
        h.make_node("Reshape", ["r", "shp"], ["v"]),
        h.make_node("Sigmoid", ["v"], ["s"]),
        h.make_node("Tanh", ["v"], ["t"]),
        h.make_node("NonZero", ["t"], ["nz"]),
    ], "g", [h.make_tensor_value_info("x", T.FLOAT, [4, 6])],
        [h.make_tensor_value_info("nz", T.INT64, None), h.make_tensor_value_info("s", T.FLOAT, None)],
        [h.make_tensor(name="shp", data_type=T.INT64, dims=[2], vals=[6, 4])])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def random_feed(spec, rng):
    feed = {}
    for name, (shape, dt, kind) in spec.items():
        if kind == "positive":
            a = rng.uniform(0.5, 2.0, shape)
        elif kind.startswith("int:"):
            a = rng.integers(0, int(kind[4:]), shape)
        elif kind == "bool":
            a = rng.integers(0, 2, shape).astype(bool)
        else:
            a = rng.standard_normal(shape)
        feed[name] = np.asarray(a).astype(dt)
    return feed


def compile_models(models: dict, tmp_path_factory) -> dict:
    """name -> (out dir, plan, IR module): each model imported and compiled once (NVRTC, sm_90)."""
    from nnc.codegen.emit import compile_to_dir
    from nnc.onnx_import import import_model
    out = {}
    for name, (m, _) in models.items():
        d = tmp_path_factory.mktemp(name)
        mod = import_model(m)
        out[name] = (d, compile_to_dir(mod, d, arch="sm_90"), mod)
    return out
