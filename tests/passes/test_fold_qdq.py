"""fold-qdq (compiler/passes/fold_qdq.py): golden IR in -> IR out, the reference interpreter bit-identical
before/after (power-of-two scales: every float step of the literal Q/DQ graph is exact there), and the
onnxruntime quantize_static QDQ models (tests/models/qdq/make_models.py: Conv->Relu->Conv CNN and a
Gemm->Relu->MatMul MLP; per-tensor / per-channel weights; QInt8 / QUInt8 activations): folded to integer
ops by the default pipeline, nnc's reference backend against onnxruntime CPU on fresh random inputs,
NVRTC compile of the CUDA build on the CPU, and a GPU-marked CUDA-vs-reference check."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from nnc.ir import parse, print_module, verify
from nnc.ir.interp import Interpreter
from nnc.ir.weights import WeightStore
from nnc.pipeline import Pipeline

_GEN = Path(__file__).resolve().parents[1] / "models" / "qdq" / "make_models.py"


def _gen():
    pytest.importorskip("onnxruntime")
    spec = importlib.util.spec_from_file_location("qdq_make_models", _GEN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- golden IR

CNN_IN = """func @main(%x: f32[1,2,4,4]) -> (f32[1,2,2,2]) {
  %sx = const() {value = dense<[0.0625]> : f32[]} : f32[]
  %zx = const() {value = dense<[3]> : i8[]} : i8[]
  %wq = const() {value = dense<[1, -2, 3, 4, -5, 6, 7, -8, 9, 10, 11, -12, 13, -14, 15, 16, -17, 18]> : i8[2,1,3,3]} : i8[2,1,3,3]
  %sw = const() {value = dense<[0.125, 0.25]> : f32[2]} : f32[2]
  %zw = const() {value = dense<[0, 0]> : i8[2]} : i8[2]
  %bq = const() {value = dense<[5, -7]> : i32[2]} : i32[2]
  %sb = const() {value = dense<[0.0078125, 0.015625]> : f32[2]} : f32[2]
  %s1 = const() {value = dense<[0.5]> : f32[]} : f32[]
  %z1 = const() {value = dense<[-4]> : i8[]} : i8[]
  %xq = QuantizeLinear(%x, %sx, %zx) : i8[1,2,4,4]
  %xd = DequantizeLinear(%xq, %sx, %zx) : f32[1,2,4,4]
  %wd = DequantizeLinear(%wq, %sw, %zw) {axis = 0} : f32[2,1,3,3]
  %bd = DequantizeLinear(%bq, %sb) {axis = 0} : f32[2]
  %c = Conv(%xd, %wd, %bd) {group = 2, pads = [1, 1, 1, 1]} : f32[1,2,4,4]
  %r = Relu(%c) : f32[1,2,4,4]
  %rq = QuantizeLinear(%r, %s1, %z1) : i8[1,2,4,4]
  %rd = DequantizeLinear(%rq, %s1, %z1) : f32[1,2,4,4]
  %rq2 = QuantizeLinear(%rd, %s1, %z1) : i8[1,2,4,4]
  %rd2 = DequantizeLinear(%rq2, %s1, %z1) : f32[1,2,4,4]
  %w2 = const() {value = dense<[0.9921875, -0.5, 0.25, 0.0078125, -0.125, 0.4921875, -0.25, 0.0625]> : f32[2,2,1,2]} : f32[2,2,1,2]
  %c2 = Conv(%rd2, %w2) {kernel_shape = [1, 2], strides = [2, 2]} : f32[1,2,2,2]
  %s2 = const() {value = dense<[1.0]> : f32[]} : f32[]
  %z2 = const() {value = dense<[0]> : i8[]} : i8[]
  %yq = QuantizeLinear(%c2, %s2, %z2) : i8[1,2,2,2]
  %y = DequantizeLinear(%yq, %s2, %z2) : f32[1,2,2,2]
  return %y
}
"""
# conv 1: DQ(i8 const) per-channel weight + DQ(i32) bias + Relu (zy = -4 > -128: a Max); the
# Q(DQ(rq)) round trip is the identity; conv 2: a float const weight recovered as int8 per-tensor
CNN_OUT = """func @main(%x: f32[1,2,4,4]) -> (f32[1,2,2,2]) {
  %sx = const() {value = dense<[0.0625]> : f32[]} : f32[]
  %zx = const() {value = dense<[3]> : i8[]} : i8[]
  %wq = const() {value = dense<[1, -2, 3, 4, -5, 6, 7, -8, 9, 10, 11, -12, 13, -14, 15, 16, -17, 18]> : i8[2,1,3,3]} : i8[2,1,3,3]
  %sw = const() {value = dense<[0.125, 0.25]> : f32[2]} : f32[2]
  %zw = const() {value = dense<[0, 0]> : i8[2]} : i8[2]
  %bq = const() {value = dense<[5, -7]> : i32[2]} : i32[2]
  %s1 = const() {value = dense<[0.5]> : f32[]} : f32[]
  %z1 = const() {value = dense<[-4]> : i8[]} : i8[]
  %xq = QuantizeLinear(%x, %sx, %zx) : i8[1,2,4,4]
  %c_q = QLinearConv(%xq, %sx, %zx, %wq, %sw, %zw, %s1, %z1, %bq) {group = 2, pads = [1, 1, 1, 1]} : i8[1,2,4,4]
  %rq = Max(%c_q, %z1) : i8[1,2,4,4]
  %s2 = const() {value = dense<[1.0]> : f32[]} : f32[]
  %z2 = const() {value = dense<[0]> : i8[]} : i8[]
  %c2_w_quantized = const() {value = dense<[127, -64, 32, 1, -16, 63, -32, 8]> : i8[2,2,1,2]} : i8[2,2,1,2]
  %c2_w_scale = const() {value = dense<[0.0078125]> : f32[]} : f32[]
  %c2_w_zero_point = const() {value = dense<[0]> : i8[]} : i8[]
  %yq = QLinearConv(%rq, %s1, %z1, %c2_w_quantized, %c2_w_scale, %c2_w_zero_point, %s2, %z2) {kernel_shape = [1, 2], strides = [2, 2]} : i8[1,2,2,2]
  %y = DequantizeLinear(%yq, %s2, %z2) : f32[1,2,2,2]
  return %y
}
"""

MLP_IN = """func @main(%x: f32[3,4]) -> (f32[3,2], f32[3,2]) {
  %sx = const() {value = dense<[0.03125]> : f32[]} : f32[]
  %zx = const() {value = dense<[128]> : u8[]} : u8[]
  %w = const() {value = dense<[0.5, -0.25, 0.125, 0.9921875, -0.5, 0.0078125, 0.25, -0.75]> : f32[2,4]} : f32[2,4]
  %bias = const() {value = dense<[0.0390625, -0.01171875]> : f32[2]} : f32[2]
  %sh = const() {value = dense<[0.0625]> : f32[]} : f32[]
  %zh = const() {value = dense<[0]> : u8[]} : u8[]
  %xq = QuantizeLinear(%x, %sx, %zx) : u8[3,4]
  %xd = DequantizeLinear(%xq, %sx, %zx) : f32[3,4]
  %g = Gemm(%xd, %w, %bias) {transB = 1} : f32[3,2]
  %gr = Relu(%g) : f32[3,2]
  %hq = QuantizeLinear(%gr, %sh, %zh) : u8[3,2]
  %hd = DequantizeLinear(%hq, %sh, %zh) : f32[3,2]
  %w2 = const() {value = dense<[0.9921875, -0.5, 0.25, 0.0078125]> : f32[2,2]} : f32[2,2]
  %m = MatMul(%hd, %w2) : f32[3,2]
  %s2 = const() {value = dense<[0.125]> : f32[]} : f32[]
  %z2 = const() {value = dense<[100]> : u8[]} : u8[]
  %yq = QuantizeLinear(%m, %s2, %z2) : u8[3,2]
  %y = DequantizeLinear(%yq, %s2, %z2) : f32[3,2]
  %w3 = const() {value = dense<[0.3, -1.7, 0.2, 0.01]> : f32[2,2]} : f32[2,2]
  %m3 = MatMul(%hd, %w3) : f32[3,2]
  %y3q = QuantizeLinear(%m3, %s2, %z2) : u8[3,2]
  %y3 = DequantizeLinear(%y3q, %s2, %z2) : f32[3,2]
  return %y, %y3
}
"""
# Gemm (transB, float bias, Relu) -> MatMulInteger + Add(i32 bias) + requantize; MatMul -> QLinearMatMul
# reading the u8 activation directly; %w3 is no int8 weight (not DQ(w_q, s) bit for bit): left as is
MLP_OUT = """func @main(%x: f32[3,4]) -> (f32[3,2], f32[3,2]) {
  %sx = const() {value = dense<[0.03125]> : f32[]} : f32[]
  %zx = const() {value = dense<[128]> : u8[]} : u8[]
  %sh = const() {value = dense<[0.0625]> : f32[]} : f32[]
  %zh = const() {value = dense<[0]> : u8[]} : u8[]
  %xq = QuantizeLinear(%x, %sx, %zx) : u8[3,4]
  %g_w_quantized = const() {value = dense<[64, -64, -32, 1, 16, 32, 127, -96]> : i8[4,2]} : i8[4,2]
  %g_w_zero_point = const() {value = dense<[0]> : i8[]} : i8[]
  %g_acc = MatMulInteger(%xq, %g_w_quantized, %zx, %g_w_zero_point) : i32[3,2]
  %g_bias_i32 = const() {value = dense<[160, -48]> : i32[2]} : i32[2]
  %g_acc_bias = Add(%g_acc, %g_bias_i32) : i32[3,2]
  %g_acc_scale = const() {value = dense<[0.00024414062]> : f32[]} : f32[]
  %g_requant = DequantizeLinear(%g_acc_bias, %g_acc_scale) {axis = -1} : f32[3,2]
  %g_requant_relu = Relu(%g_requant) : f32[3,2]
  %hq = QuantizeLinear(%g_requant_relu, %sh, %zh) : u8[3,2]
  %hd = DequantizeLinear(%hq, %sh, %zh) : f32[3,2]
  %s2 = const() {value = dense<[0.125]> : f32[]} : f32[]
  %z2 = const() {value = dense<[100]> : u8[]} : u8[]
  %m_w_quantized = const() {value = dense<[127, -64, 32, 1]> : i8[2,2]} : i8[2,2]
  %m_w_scale = const() {value = dense<[0.0078125]> : f32[]} : f32[]
  %m_w_zero_point = const() {value = dense<[0]> : i8[]} : i8[]
  %yq = QLinearMatMul(%hq, %sh, %zh, %m_w_quantized, %m_w_scale, %m_w_zero_point, %s2, %z2) : u8[3,2]
  %y = DequantizeLinear(%yq, %s2, %z2) : f32[3,2]
  %w3 = const() {value = dense<[0.3, -1.7, 0.2, 0.01]> : f32[2,2]} : f32[2,2]
  %m3 = MatMul(%hd, %w3) : f32[3,2]
  %y3q = QuantizeLinear(%m3, %s2, %z2) : u8[3,2]
  %y3 = DequantizeLinear(%y3q, %s2, %z2) : f32[3,2]
  return %y, %y3
}
"""


@pytest.mark.parametrize("text,expected", [(CNN_IN, CNN_OUT), (MLP_IN, MLP_OUT)], ids=["cnn", "mlp"])
def test_golden_bit_identical(text, expected, rng):
    m = parse(text)
    m.weights = WeightStore()
    verify(m)
    for trial in range(3):  # fresh random inputs, wide enough to saturate some int8 values
        feed = {a.name: (rng.standard_normal(a.type.shape) * 3).astype(np.float32) for a in m.main.args}
        if trial == 0:
            before = Interpreter(m).run(feed)
            Pipeline(["fold-qdq", "dce"], verify_each=True).run(m)
            assert print_module(m) == expected
            after = Interpreter(m).run(feed)
        else:
            before = Interpreter(parse(text)).run(feed)
            after = Interpreter(m).run(feed)
        assert list(before) == list(after)
        for k in before:
            np.testing.assert_array_equal(before[k], after[k], err_msg=k)


def test_float_output_conv_becomes_convinteger(rng):
    """A DQ'd conv whose result stays float (no Q after it: a QDQ model's classifier) becomes
    ConvInteger -> DequantizeLinear(acc, sx*sw): int8 inputs, exact int32 accumulation, f32 out
    (fp32 tolerance: the literal graph sums f32 products; float bias added after)."""
    text = CNN_IN.replace("%yq = QuantizeLinear(%c2, %s2, %z2) : i8[1,2,2,2]\n", "") \
                 .replace("%y = DequantizeLinear(%yq, %s2, %z2) : f32[1,2,2,2]\n", "%y = Relu(%c2) : f32[1,2,2,2]\n") \
                 .replace("%c2 = Conv(%rd2, %w2)", "%b2 = const() {value = dense<[0.3, -0.7]> : f32[2]} : f32[2]\n"
                          "  %c2 = Conv(%rd2, %w2, %b2)")
    m = parse(text)
    m.weights = WeightStore()
    verify(m)
    feeds = [{"x": (rng.standard_normal((1, 2, 4, 4)) * 3).astype(np.float32)} for _ in range(3)]
    before = [Interpreter(m).run(f)["y"] for f in feeds]
    from nnc.passes import fold_qdq
    counts = fold_qdq.rewrite(m)
    verify(m)
    assert dict(counts) == {"Conv->QLinearConv+Relu": 1, "Q(DQ(x))->x": 1, "Conv->ConvInteger+float": 1}
    Pipeline(["dce"], verify_each=True).run(m)
    names = [op.name for op in m.main.ops if op.name != "const"]
    assert names == ["QuantizeLinear", "QLinearConv", "Max", "ConvInteger", "DequantizeLinear", "Add", "Relu"], names
    for f, b in zip(feeds, before):
        np.testing.assert_allclose(Interpreter(m).run(f)["y"], b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))


# ---------------------------------------------------------------- onnxruntime quantize_static models

CASES = [(k, pc, a) for k in ("cnn", "mlp", "cnn2") for pc in (False, True) for a in ("s8", "u8")]
IDS = [f"{k}-{'pc' if pc else 'pt'}-{a}" for k, pc, a in CASES]


# the ops after the default pipeline; DequantizeLinear: the model output's (+ the requantize of a
# biased Gemm); QuantizeLinear: the input's (+ the requantize)
WANT = {"cnn": {"QLinearConv": 2, "DequantizeLinear": 1, "QuantizeLinear": 1},
        "mlp": {"MatMulInteger": 1, "QLinearMatMul": 1, "DequantizeLinear": 2, "QuantizeLinear": 2},
        "cnn2": {"QLinearConv": 2, "MaxPool": 1, "Flatten": 1, "MatMulInteger": 1, "DequantizeLinear": 2,
                 "QuantizeLinear": 2}}


@pytest.fixture(scope="module")
def qdq_models(tmp_path_factory):
    gen = _gen()
    d = tmp_path_factory.mktemp("qdq")
    return {i: gen.make(k, pc, a, d) for i, (k, pc, a) in zip(IDS, CASES)}


def _quantum(path):
    """The output DequantizeLinear's scale (the onnx file's last node)."""
    import onnx
    from onnx import numpy_helper
    m = onnx.load(path)
    last = m.graph.node[-1]
    assert last.op_type == "DequantizeLinear"
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    return float(inits[last.input[1]])


@pytest.mark.parametrize("case", IDS)
def test_ort_models_fold_and_match(qdq_models, case, rng):
    ort = pytest.importorskip("onnxruntime")  # the oracle (a test dependency); the IR tests need none

    import nnc
    path = qdq_models[case]
    m = nnc.compile(str(path), backend="reference")
    from nnc.onnx_import import import_model
    from nnc.pipeline import DEFAULT_PIPELINE
    mod = import_model(str(path))
    literal = Interpreter(import_model(str(path)))
    Pipeline(list(DEFAULT_PIPELINE), verify_each=True).run(mod)
    names = [op.name for f in mod.functions for op in f.walk()]
    assert not {"Conv", "Gemm", "MatMul"} & set(names), names  # every layer went integer
    want = WANT[case.split("-")[0]]
    assert {k: names.count(k) for k in want} == want, names
    # int8 between the layers: MaxPool / Flatten read the int8 values (no float copy of them)
    for op in (op for f in mod.functions for op in f.walk() if op.name in ("MaxPool", "Flatten")):
        assert op.operands[0].type.dtype.np in (np.int8, np.uint8), op
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = m.inputs[0]
    q = _quantum(path)
    folded = Interpreter(mod)
    for _ in range(4):
        x = (rng.standard_normal(inp.shape) * 1.5).astype(np.float32)
        got = m(x)
        ref = sess.run(None, {inp.name: x})[0]
        np.testing.assert_array_equal(got, ref)  # exact: same int8 outputs, same final DQ
        lit = literal.run({inp.name: x})
        fo = folded.run({inp.name: x})
        (k,) = list(lit)
        np.testing.assert_array_equal(fo[k], got)
        # the literal float Q/DQ graph: equal except at rounding ties, never more than 1 quantum
        assert float(np.max(np.abs(lit[k].astype(np.float64) - got))) <= q * 1.0001


@pytest.mark.parametrize("case", IDS)
def test_ort_models_nvrtc_compile(qdq_models, case, tmp_path):
    """The CUDA build of the folded model NVRTC-compiles on the CPU (existing int kernels)."""
    import json

    from nnc.driver import compile_model
    compile_model(str(qdq_models[case]), tmp_path / "out", arch="sm_90")
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["kernels"] and all((tmp_path / "out" / c["file"]).stat().st_size > 0 for c in plan["cubins"])
    ir = (tmp_path / "out" / "ir" / "final.nnir").read_text()
    assert all(f"= {k}(" in ir for k in WANT[case.split("-")[0]])


@pytest.mark.gpu
@pytest.mark.parametrize("case", IDS)
def test_ort_models_cuda_matches_reference(qdq_models, case, tmp_path, rng):
    """CUDA vs the reference backend on the same compiled directory; integer accumulation is exact,
    so the int8 outputs (and their final DQ) must be equal."""
    import nnc
    from nnc.driver import compile_model
    out = tmp_path / "out"
    compile_model(str(qdq_models[case]), out, arch="sm_90")
    gpu, refm = nnc.load(out), nnc.load(out, backend="reference")
    inp = refm.inputs[0]
    for _ in range(3):
        x = (rng.standard_normal(inp.shape) * 1.5).astype(np.float32)
        ref = refm.run({inp.name: x}, output="numpy")
        got = gpu.run({inp.name: x}, output="numpy", poison=True)
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{case}/{k}")


BLOCKED = """func @main(%x: f32[3,4]) -> (f32[3,4]) {
  %sx = const() {value = dense<[0.0625]> : f32[]} : f32[]
  %zx = const() {value = dense<[-2]> : i8[]} : i8[]
  %wq = const() {value = dense<[1, -2, 3, 4, -5, 6, 7, -8, 9, 10, 11, -12, 13, -14, 15, 16]> : i8[4,4]} : i8[4,4]
  %sw = const() {value = dense<[SCALES]> : f32[BSHAPE]} : f32[BSHAPE]
  %xq = QuantizeLinear(%x, %sx, %zx) : i8[3,4]
  %xd = DequantizeLinear(%xq, %sx, %zx) : f32[3,4]
  %wd = DequantizeLinear(%wq, %sw) {axis = AXIS, block_size = 2} : f32[4,4]
  %m = MatMul(%xd, %wd) : f32[3,4]
  %s2 = const() {value = dense<[0.25]> : f32[]} : f32[]
  %z2 = const() {value = dense<[7]> : i8[]} : i8[]
  %yq = QuantizeLinear(%m, %s2, %z2) : i8[3,4]
  %y = DequantizeLinear(%yq, %s2, %z2) : f32[3,4]
  return %y
}
"""


@pytest.mark.parametrize("axis,bshape,scales,folds", [
    # blocks of 2 output columns (axis 1 of W[K,N]): one scale per column -> per-channel QLinearMatMul
    (1, "4,2", "0.125, 0.25, 0.125, 0.25, 0.125, 0.25, 0.125, 0.25", True),
    # blocks along K (axis 0) with equal scales down each column: also per-channel
    (0, "2,4", "0.125, 0.25, 0.5, 0.0625, 0.125, 0.25, 0.5, 0.0625", True),
    # blocks along K with different scales: each K block needs its own scale -> left as float
    (0, "2,4", "0.125, 0.25, 0.5, 0.0625, 0.25, 0.25, 0.5, 0.0625", False),
], ids=["blocks-along-N", "blocks-along-K-equal", "blocks-along-K-unequal"])
def test_blocked_weights_opset21(axis, bshape, scales, folds, rng):
    text = BLOCKED.replace("SCALES", scales).replace("BSHAPE", bshape).replace("AXIS", str(axis))
    m = parse(text)
    m.weights = WeightStore()
    verify(m)
    feeds = [{"x": (rng.standard_normal((3, 4)) * 3).astype(np.float32)} for _ in range(3)]
    before = [Interpreter(m).run(f) for f in feeds]
    Pipeline(["fold-qdq", "dce"], verify_each=True).run(m)
    names = [op.name for op in m.main.ops]
    assert ("QLinearMatMul" in names) == folds and ("MatMul" in names) != folds, names
    if folds:
        (ql,) = [op for op in m.main.ops if op.name == "QLinearMatMul"]
        assert ql.operands[4].type.shape == (4,)  # the per-column scale the blocks factor into
    for f, b in zip(feeds, before):
        np.testing.assert_array_equal(Interpreter(m).run(f)["y"], b["y"])


PASS_IN = """func @main(%x: i8[1,2,4,4]) -> (i8[1,2,2,2], i8[1,4,2,4], i8[1,2,4,4], i8[1,2,4,4]) {
  %s = const() {value = dense<[0.3]> : f32[]} : f32[]
  %z = const() {value = dense<[-3]> : i8[]} : i8[]
  %s2 = const() {value = dense<[0.6]> : f32[]} : f32[]
  %d = DequantizeLinear(%x, %s, %z) : f32[1,2,4,4]
  %p = MaxPool(%d) {kernel_shape = [2, 2], strides = [2, 2]} : f32[1,2,2,2]
  %pq = QuantizeLinear(%p, %s, %z) : i8[1,2,2,2]
  %t = Transpose(%d) {perm = [0, 2, 1, 3]} : f32[1,4,2,4]
  %tq = QuantizeLinear(%t, %s, %z) : i8[1,4,2,4]
  %r = Relu(%d) : f32[1,2,4,4]
  %rq = QuantizeLinear(%r, %s, %z) : i8[1,2,4,4]
  %r2 = Relu(%d) : f32[1,2,4,4]
  %rq2 = QuantizeLinear(%r2, %s2, %z) : i8[1,2,4,4]
  return %pq, %tq, %rq, %rq2
}
"""
# int8 through MaxPool / Transpose, Relu as max(x, z); a Relu re-quantized to another scale stays
PASS_OUT = """func @main(%x: i8[1,2,4,4]) -> (i8[1,2,2,2], i8[1,4,2,4], i8[1,2,4,4], i8[1,2,4,4]) {
  %s = const() {value = dense<[0.3]> : f32[]} : f32[]
  %z = const() {value = dense<[-3]> : i8[]} : i8[]
  %s2 = const() {value = dense<[0.6]> : f32[]} : f32[]
  %d = DequantizeLinear(%x, %s, %z) : f32[1,2,4,4]
  %pq = MaxPool(%x) {kernel_shape = [2, 2], strides = [2, 2]} : i8[1,2,2,2]
  %tq = Transpose(%x) {perm = [0, 2, 1, 3]} : i8[1,4,2,4]
  %rq = Max(%x, %z) : i8[1,2,4,4]
  %r2 = Relu(%d) : f32[1,2,4,4]
  %rq2 = QuantizeLinear(%r2, %s2, %z) : i8[1,2,4,4]
  return %pq, %tq, %rq, %rq2
}
"""


def test_passthrough_int8_flow(rng):
    """Exact on every int8 input (drawn over the whole range), at a scale that is no power of two."""
    m = parse(PASS_IN)
    m.weights = WeightStore()
    verify(m)
    feeds = [{"x": rng.integers(-128, 128, (1, 2, 4, 4)).astype(np.int8)} for _ in range(4)]
    before = [Interpreter(m).run(f) for f in feeds]
    Pipeline(["fold-qdq", "dce"], verify_each=True).run(m)
    assert print_module(m) == PASS_OUT
    for f, b in zip(feeds, before):
        a = Interpreter(m).run(f)
        for k in b:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits"


@pytest.mark.parametrize("per_channel,act", [(False, "s8"), (True, "u8")], ids=["pt-s8", "pc-u8"])
def test_digits_cnn_quantize_static_accuracy(per_channel, act, tmp_path):
    """The trained digits CNN (tests/models/digits), quantize_static QDQ on its calibration split:
    nnc's reference backend on the 360 held-out images agrees with onnxruntime CPU (logits equal, or
    1 output quantum apart at a rounding tie) and stays within 0.5 accuracy points of fp32."""
    ort = pytest.importorskip("onnxruntime")  # the oracle (a test dependency); the IR tests need none
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    import nnc
    cal = np.load(DIGITS / "calib.npz", allow_pickle=False)["input"]
    hold = np.load(DIGITS / "holdout.npz", allow_pickle=False)
    x, y = hold["input"], hold["labels"]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": cal[i:i + 32]} for i in range(0, len(cal), 32)])

        def get_next(self):
            return next(self.it, None)

    path = tmp_path / "digits.qdq.onnx"
    quantize_static(str(DIGITS / "digits_cnn.onnx"), str(path), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QInt8 if act == "s8" else QuantType.QUInt8)
    q = _quantum(path)
    batch = 40
    m = nnc.compile(str(path), shapes={"input": [batch, 1, 8, 8]}, backend="reference")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    fp32 = ort.InferenceSession(str(DIGITS / "digits_cnn.onnx"), providers=["CPUExecutionProvider"])
    pred, pred32, off = [], [], 0
    for i in range(0, len(y) - len(y) % batch, batch):
        got, ref = m(x[i:i + batch]), sess.run(None, {"input": x[i:i + batch]})[0]
        assert float(np.max(np.abs(got.astype(np.float64) - ref))) <= q * 1.0001
        off += int((got != ref).sum())
        pred.append(got.argmax(1))
        pred32.append(fp32.run(None, {"input": x[i:i + batch]})[0].argmax(1))
    n = len(np.concatenate(pred))
    acc8 = float((np.concatenate(pred) == y[:n]).mean() * 100)
    acc32 = float((np.concatenate(pred32) == y[:n]).mean() * 100)
    print(f"\ndigits QDQ {'per-channel' if per_channel else 'per-tensor'} {act}: nnc {acc8:.2f}% "
          f"fp32 {acc32:.2f}%; logits differing from onnxruntime by 1 quantum: {off}/{n * 10}")
    assert off <= n * 10 // 100  # ties are rare: at most 1% of the logits
    assert acc32 - acc8 <= 0.5


def test_recovered_weight_torch_range_and_gemm_without_bias(rng):
    """A float weight whose largest magnitude is -128 * s (PyTorch's int8 range) is recovered exactly,
    per channel; a Gemm (transB) without bias becomes a QLinearMatMul on the transposed int8 weight."""
    from nnc.passes import fold_qdq
    wq = rng.integers(-100, 100, (3, 5)).astype(np.int8)
    wq[0, 1], wq[1, 4], wq[2, 0] = -128, 127, -128
    sw = np.array([0.011, 0.0071, 0.023], np.float32)
    w = (wq.astype(np.float32) * sw[:, None]).astype(np.float32)
    got = fold_qdq._recover_symmetric(w, None) or fold_qdq._recover_symmetric(w, 0)
    assert got is not None and np.array_equal(got[0], wq) and np.array_equal(got[1], sw)
    assert fold_qdq._recover_symmetric(w + np.float32(1e-3), 0) is None  # not int8 data: refused
    wtxt = ", ".join(repr(float(v)) for v in w.reshape(-1))
    text = f"""func @main(%x: f32[2,5]) -> (f32[2,3]) {{
  %sx = const() {{value = dense<[0.05]> : f32[]}} : f32[]
  %zx = const() {{value = dense<[0]> : i8[]}} : i8[]
  %w = const() {{value = dense<[{wtxt}]> : f32[3,5]}} : f32[3,5]
  %sy = const() {{value = dense<[0.07]> : f32[]}} : f32[]
  %zy = const() {{value = dense<[5]> : i8[]}} : i8[]
  %xq = QuantizeLinear(%x, %sx, %zx) : i8[2,5]
  %xd = DequantizeLinear(%xq, %sx, %zx) : f32[2,5]
  %g = Gemm(%xd, %w) {{transB = 1}} : f32[2,3]
  %yq = QuantizeLinear(%g, %sy, %zy) : i8[2,3]
  %y = DequantizeLinear(%yq, %sy, %zy) : f32[2,3]
  return %y
}}
"""
    m = parse(text)
    m.weights = WeightStore()
    verify(m)
    feeds = [{"x": (rng.standard_normal((2, 5)) * 3).astype(np.float32)} for _ in range(4)]
    before = [Interpreter(m).run(f)["y"] for f in feeds]
    Pipeline(["fold-qdq", "dce"], verify_each=True).run(m)
    (ql,) = [op for op in m.main.ops if op.name == "QLinearMatMul"]
    assert not [op for op in m.main.ops if op.name == "Gemm"]
    np.testing.assert_array_equal(const_of(m, ql.operands[3]), wq.T)
    for f, b in zip(feeds, before):  # random scales: equal, or 1 quantum apart at a rounding tie
        assert float(np.max(np.abs(Interpreter(m).run(f)["y"] - b))) <= 0.07 * 1.0001


def const_of(m, v):
    from nnc.ir.builder import const_value
    return const_value(v, m.weights)


def test_zero_scale_not_folded():
    """A zero output scale (division by zero in Q) is left to the literal graph, not folded into an
    infinite requantize multiplier."""
    text = MLP_IN.replace('%s2 = const() {value = dense<[0.125]> : f32[]}', '%s2 = const() {value = dense<[0.0]> : f32[]}')
    m = parse(text)
    m.weights = WeightStore()
    verify(m)
    Pipeline(["fold-qdq", "dce"], verify_each=True).run(m)
    names = [op.name for op in m.main.ops]
    assert "QLinearMatMul" not in names  # (the float-output sweep may still take the MatMul itself)
    assert sum(op.name == "QuantizeLinear" and op.operands[1].name == "s2" for op in m.main.ops) == 2


CHAIN_IN = """func @main(%x: u8[1,2,4,4]) -> (u8[1,8]) {
  %s = const() {value = dense<[0.3]> : f32[]} : f32[]
  %z = const() {value = dense<[7]> : u8[]} : u8[]
  %d = DequantizeLinear(%x, %s, %z) : f32[1,2,4,4]
  %r = Relu(%d) : f32[1,2,4,4]
  %p = MaxPool(%r) {kernel_shape = [2, 2], strides = [2, 2]} : f32[1,2,2,2]
  %f = Flatten(%p) : f32[1,8]
  %fq = QuantizeLinear(%f, %s, %z) : u8[1,8]
  return %fq
}
"""
CHAIN_OUT = """func @main(%x: u8[1,2,4,4]) -> (u8[1,8]) {
  %z = const() {value = dense<[7]> : u8[]} : u8[]
  %r_q = Max(%x, %z) : u8[1,2,4,4]
  %p_q = MaxPool(%r_q) {kernel_shape = [2, 2], strides = [2, 2]} : u8[1,2,2,2]
  %fq = Flatten(%p_q) : u8[1,8]
  return %fq
}
"""


def test_passthrough_chain(rng):
    """Relu -> MaxPool -> Flatten between one DQ and one Q of equal scale (calibration's form): all int8."""
    m = parse(CHAIN_IN)
    m.weights = WeightStore()
    verify(m)
    feeds = [{"x": rng.integers(0, 256, (1, 2, 4, 4)).astype(np.uint8)} for _ in range(4)]
    before = [Interpreter(m).run(f) for f in feeds]
    Pipeline(["fold-qdq", "dce"], verify_each=True).run(m)
    assert print_module(m) == CHAIN_OUT
    for f, b in zip(feeds, before):
        np.testing.assert_array_equal(Interpreter(m).run(f)["fq"], b["fq"])


def _float_out_module():
    text = CNN_IN.replace("%yq = QuantizeLinear(%c2, %s2, %z2) : i8[1,2,2,2]\n", "") \
                 .replace("%y = DequantizeLinear(%yq, %s2, %z2) : f32[1,2,2,2]\n", "%y = Relu(%c2) : f32[1,2,2,2]\n") \
                 .replace("%c2 = Conv(%rd2, %w2)", "%b2 = const() {value = dense<[0.3, -0.7]> : f32[2]} : f32[2]\n"
                          "  %c2 = Conv(%rd2, %w2, %b2)")
    m = parse(text)
    m.weights = WeightStore()
    verify(m)
    return m


def test_float_output_nvrtc_compile(tmp_path):
    """ConvInteger + per-channel DequantizeLinear of int32 + bias (the float-output form) lowers and
    NVRTC-compiles for sm_90 on the CPU."""
    from nnc.codegen.emit import compile_to_dir
    m = _float_out_module()
    Pipeline(["fold-qdq", "dce"], verify_each=True).run(m)
    assert "ConvInteger" in [op.name for op in m.main.ops]
    plan = compile_to_dir(m, tmp_path / "out", arch="sm_90")
    assert plan["kernels"] and all((tmp_path / "out" / c["file"]).stat().st_size > 0 for c in plan["cubins"])


@pytest.mark.gpu
def test_float_output_cuda_matches_reference(tmp_path, rng):
    """The float-output form on the GPU against the reference backend of the same directory."""
    import nnc
    from nnc.codegen.emit import compile_to_dir
    m = _float_out_module()
    Pipeline(["fold-qdq", "dce"], verify_each=True).run(m)
    compile_to_dir(m, tmp_path / "out", arch="sm_90")
    gpu, refm = nnc.load(tmp_path / "out"), nnc.load(tmp_path / "out", backend="reference")
    for _ in range(3):
        x = {"x": (rng.standard_normal((1, 2, 4, 4)) * 3).astype(np.float32)}
        want = refm.run(x, output="numpy")["y"]
        got = gpu.run(x, output="numpy", poison=True)["y"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))


@pytest.mark.parametrize("per_channel", [False, True], ids=["pt", "pc"])
def test_big_weight_keeps_its_dq_op_and_folds(per_channel, tmp_path, rng):
    """A weight over the importer's folding limit arrives as DequantizeLinear(int8 const) (not a float
    const): folded from the DQ's own w_q / scale; nnc reference == onnxruntime CPU exactly."""
    ort = pytest.importorskip("onnxruntime")  # the oracle (a test dependency); the IR tests need none

    import nnc
    from nnc.onnx_import import import_model
    from nnc.pipeline import DEFAULT_PIPELINE
    path = _gen().make("bigconv", per_channel, "s8", tmp_path)
    mod = import_model(str(path))
    assert [op.name for op in mod.main.ops if op.name != "const"].count("DequantizeLinear") >= 2  # x and w
    Pipeline(list(DEFAULT_PIPELINE), verify_each=True).run(mod)
    assert [op.name for op in mod.main.ops if op.name != "const"] == ["QuantizeLinear", "QLinearConv", "DequantizeLinear"]
    m = nnc.compile(str(path), backend="reference")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for _ in range(2):
        x = rng.standard_normal((1, 64, 6, 6)).astype(np.float32)
        np.testing.assert_array_equal(m(x), sess.run(None, {"x": x})[0])


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["pt", "pc"])
def test_ort_uint8_weights(kind, per_channel, tmp_path, rng):
    """quantize_static with QUInt8 (asymmetric) weights: the importer's folded float weights are
    recovered as u8 + zero point bit for bit; every layer integer; == onnxruntime CPU exactly."""
    ort = pytest.importorskip("onnxruntime")  # the oracle (a test dependency); the IR tests need none

    import nnc
    from nnc.onnx_import import import_model
    from nnc.pipeline import DEFAULT_PIPELINE
    path = _gen().make(kind, per_channel, "u8", tmp_path, weights="u8")
    mod = import_model(str(path))
    Pipeline(list(DEFAULT_PIPELINE), verify_each=True).run(mod)
    names = [op.name for op in mod.main.ops]
    assert not {"Conv", "Gemm", "MatMul"} & set(names), names
    m = nnc.compile(str(path), backend="reference")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = m.inputs[0]
    for _ in range(3):
        x = (rng.standard_normal(inp.shape) * 1.5).astype(np.float32)
        np.testing.assert_array_equal(m(x), sess.run(None, {inp.name: x})[0])
