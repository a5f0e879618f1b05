"""FP8 convolutions: the conv_fp8 op (ir/ops/gemm_fp8.py), the float8 QDQ Conv fold (fold-qdq's fp8
sweep, quantize_fp8.fold_fp8_conv), Conv layers under --precision fp8 (per-output-channel e4m3
weights), and the CUDA path (conv_fp8.dequant: DQ(x) kernel + compile-time f16 weight + the normal
f16 conv kernels).

CPU: the op against the literal Conv(DQ(x), DQ(w)) graph in float64/numpy and against onnxruntime,
IR round trip and verifier errors, the fold's golden ops, --precision fp8 on the digits CNN (both
convs conv_fp8, held-out accuracy), --keep-fp32 pinning a conv, NVRTC compiles for sm_90a.
GPU: the CUDA builds against the interpreter of the same final IR, outputs poisoned first.
"""
from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest

from nnc.ir import print_module
from nnc.ir.interp import Interpreter
from tools.fp8_models import qdq_conv_model, random_conv_x

DIGITS = Path(__file__).parent / "models" / "digits"


def _folded(model):
    from nnc.driver import pipeline_passes
    from nnc.onnx_import import import_model
    from nnc.pipeline import Pipeline
    m = import_model(model)
    Pipeline(pipeline_passes("fp32", fuse=False), verify_each=True).run(m)
    return m


def _ops(m):
    return [o.name for o in m.main.ops if o.name != "const"]


def _literal(x, sx, w, sw, b, stride, group, pads):
    """Conv(DQ(x), DQ(w, axis 0)) + b in float64 (numpy; ml_dtypes' own fp8 decode)."""
    from nnc.ir.ops.conv import conv_core
    xf = x.astype(np.float64) * np.float64(sx)
    s = np.asarray(sw, np.float64)
    wf = w.astype(np.float64) * (s.reshape(-1, 1, 1, 1) if s.ndim else s)
    y = conv_core(xf, wf, (stride, stride), [(pads, pads)] * 2, (1, 1), group)
    return y if b is None else y + np.asarray(b, np.float64).reshape(1, -1, 1, 1)


@pytest.mark.parametrize("fmt,group,stride,per_channel", [("float8_e4m3fn", 1, 1, True), ("float8_e5m2", 2, 2, False),
                                                          ("float8_e4m3fn", 4, 1, True)])
def test_conv_fp8_reference_matches_the_literal_graph(fmt, group, stride, per_channel):
    from nnc.ir.ops.gemm_fp8 import ConvFp8Attrs, _conv_ref
    from nnc.ir.types import dtype
    rng = np.random.default_rng(1)
    dt = getattr(ml_dtypes, fmt)
    x = (rng.standard_normal((2, 8, 9, 9)) * 20).astype(dt)
    w = (rng.standard_normal((12, 8 // group, 3, 3)) * 20).astype(dt)
    sx = np.float32(0.02)
    sw = (rng.random(12) * 0.01 + 1e-3).astype(np.float32) if per_channel else np.float32(0.004)
    b = rng.standard_normal(12).astype(np.float32)
    want = _literal(x, sx, w, sw, b, stride, group, 1)
    for out in ("f32", "f16", "bf16"):
        a = ConvFp8Attrs(dtype(out), group=group, pads=(1, 1, 1, 1), strides=(stride, stride), kernel_shape=(3, 3))
        got = _conv_ref(a, x, sx, w, sw, b)
        assert got.dtype == dtype(out).np and got.shape == want.shape
        tol = {"f32": 1e-6, "f16": 1e-3, "bf16": 8e-3}[out]
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=tol, atol=tol * np.abs(want).max())


def test_conv_fp8_ir_round_trip_and_verifier():
    from nnc.ir.errors import NncError
    from nnc.ir.parser import parse as parse_module
    from nnc.ir.verify import verify
    text = ("func @main(%x: f8e4m3[1,4,6,6], %sx: f32[], %w: f8e4m3[8,4,3,3], %sw: f32[8]) -> (f16[1,8,6,6]) {\n"
            "  %y = conv_fp8(%x, %sx, %w, %sw) {out_dtype = f16, pads = [1, 1, 1, 1]} : f16[1,8,6,6]\n"
            "  return %y\n}\n")
    m = parse_module(text)
    verify(m)
    assert "conv_fp8(%x, %sx, %w, %sw) {out_dtype = f16, pads = [1, 1, 1, 1]} : f16[1,8,6,6]" in print_module(m)
    with pytest.raises(NncError, match="w_scale must be a scalar or \\[8\\]"):
        verify(parse_module(text.replace("%sw: f32[8]", "%sw: f32[4]")))
    with pytest.raises(NncError, match="x must be f8e4m3 or f8e5m2"):
        verify(parse_module(text.replace("%x: f8e4m3", "%x: f16")))


CASES = {"pc_bias": dict(), "e5m2_tensor_s2": dict(fmt="f8e5m2", per_channel=False, stride=2),
         "group2_nobias": dict(group=2, bias=False), "big_w": dict(C=64, O=128, k=3, HW=8)}


@pytest.mark.parametrize("name", list(CASES))
def test_fold_and_interpreter_match_onnxruntime(name):
    ort = pytest.importorskip("onnxruntime")
    kw = CASES[name]
    model = qdq_conv_model(**kw)
    m = _folded(model)
    assert _ops(m) == ["QuantizeLinear", "conv_fp8"], print_module(m)
    conv = next(o for o in m.main.ops if o.name == "conv_fp8")
    assert conv.operands[2].type.dtype.short == kw.get("fmt", "f8e4m3")
    assert conv.operands[3].type.shape == ((kw.get("O", 32),) if kw.get("per_channel", True) else ())
    x = random_conv_x(2, kw.get("C", 16), kw.get("HW", 12), seed=4)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = Interpreter(m).run({"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_unfoldable_conv_stays_literal():
    """Per-input-channel weight scales (axis 1) cannot leave the accumulation: the graph stays."""
    model = qdq_conv_model(C=16, O=16, per_channel=True)
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] == "w_q":
            n.attribute[0].i = 1
    m = _folded(model)
    assert "conv_fp8" not in _ops(m) and "Conv" in _ops(m)


def _holdout_accuracy(mod):
    h = np.load(DIGITS / "holdout.npz", allow_pickle=False)
    ok = sum(int((np.asarray(mod.run({"input": h["input"][i:i + 40]}, output="numpy")["logits"]).argmax(1)
                  == h["labels"][i:i + 40]).sum())
             for i in range(0, 360, 40))
    return 100.0 * ok / 360


def test_precision_fp8_quantizes_the_convs(tmp_path):
    import nnc
    from nnc.calibrate import calibrate
    calibrate(str(DIGITS / "digits_cnn.onnx"), DIGITS / "calib.npz", "minmax").save(tmp_path / "c.json")
    shapes = {"input": [40, 1, 8, 8]}
    f8 = nnc.compile(str(DIGITS / "digits_cnn.onnx"), shapes=shapes, backend="reference", precision="fp8",
                     calib=tmp_path / "c.json")
    text = (f8.dir / "ir" / "final.nnir").read_text()
    assert text.count("= conv_fp8(") == 2 and text.count("= matmul_fp8(") == 1, text
    assert "f8e4m3[16,1,3,3]" in text and "f8e4m3[32,16,3,3]" in text  # the weights are e4m3 codes
    assert " Conv(" not in text
    f32 = nnc.compile(str(DIGITS / "digits_cnn.onnx"), shapes=shapes, backend="reference")
    a32, a8 = _holdout_accuracy(f32), _holdout_accuracy(f8)
    assert a32 - a8 <= 0.5, (a32, a8)
    # --keep-fp32 c1: that conv stays a float f32 Conv, the other is fp8
    k = nnc.compile(str(DIGITS / "digits_cnn.onnx"), shapes=shapes, backend="reference", precision="fp8",
                    calib=tmp_path / "c.json", keep_fp32="c1")
    text = (k.dir / "ir" / "final.nnir").read_text()
    assert text.count("= conv_fp8(") == 1 and "Conv(" in text and ": f32[40,16,8,8]" in text


def _cuda_build(model, out, **kw):
    import nnc
    from nnc.driver import compile_model
    return compile_model(str(model), out, options=nnc.CompileOptions(tune=False, backend="cuda", codegen=True, **kw))


def test_cuda_builds_nvrtc_compile(tmp_path):
    for name, kw in CASES.items():
        p = tmp_path / f"{name}.onnx"
        onnx.save(qdq_conv_model(**kw), p)
        plan = _cuda_build(p, tmp_path / name, arch="sm_90a")
        assert list((tmp_path / name).glob("model.*.cubin")), name
        descs = " ".join(op for k in plan["kernels"] for op in k["ops"])
        assert "conv_fp8(" in descs and "as f16 Conv on dequantized x and w" in descs, descs


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_conv_fp8_matches_interpreter(name, tmp_path):
    import nnc
    kw = CASES[name]
    p = tmp_path / f"{name}.onnx"
    onnx.save(qdq_conv_model(**kw), p)
    _cuda_build(p, tmp_path / name)
    gpu, ref = nnc.load(tmp_path / name), nnc.load(tmp_path / name, backend="reference")
    for seed in (0, 1):
        x = random_conv_x(2, kw.get("C", 16), kw.get("HW", 12), seed=10 + seed)
        got = np.asarray(gpu.run({"x": x}, output="numpy", poison=True)["y"], np.float32)
        want = np.asarray(ref.run({"x": x}, output="numpy")["y"], np.float32)
        assert np.all(np.isfinite(got))
        assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max(), (name, seed)


def test_fp8_qdq_conv_at_fp16_keeps_f32_scales():
    """--precision fp16 of a float8 QDQ conv model: conv_fp8 keeps its f32 scales (to_precision's
    EXACT_OPERANDS) and gives f16 out; equal to the fp32 build rounded to fp16 within fp16 steps."""
    from nnc.driver import pipeline_passes
    from nnc.onnx_import import import_model
    from nnc.pipeline import Pipeline
    from tools.qdq_scale_models import SX
    model = qdq_conv_model(sx=float(SX))
    builds = {}
    for prec in ("fp32", "fp16"):
        m = import_model(model)
        Pipeline(pipeline_passes(prec, fuse=False), verify_each=True).run(m)
        builds[prec] = m
    conv = next(o for o in builds["fp16"].main.ops if o.name == "conv_fp8")
    assert conv.attrs.out_dtype.short == "f16"
    assert [conv.operands[i].type.dtype.short for i in (1, 3)] == ["f32", "f32"]
    x = random_conv_x(2, 16, 12, seed=6, sx=float(SX)).astype(np.float16).astype(np.float32)
    a = Interpreter(builds["fp32"]).run({"x": x})["y"]
    b = Interpreter(builds["fp16"]).run({"x": x})["y"]
    np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-3 * float(np.abs(a).max()))
