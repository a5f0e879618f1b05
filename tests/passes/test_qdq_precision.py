"""Quantization scales stay exact through the precision passes (to-fp16 / to-bf16 / mixed-precision):
an fp16 build of a QDQ model quantizes with the model's own f32 scales, not their fp16 roundings.

The models' scales are off the fp16 grid (tools/qdq_scale_models.py); inputs are fp16 values, so an
fp16 build quantizes the same x as the fp32 build and its integer tensors must be equal exactly.
Each test also shows that fp16-rounded scales would give different integers (the test has teeth).
The golden IR of to-fp16 on Q/DQ and QLinearMatMul is tests/passes/golden/to_precision_qdq.nnir.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from nnc.ir.interp import Interpreter
from tools.qdq_scale_models import SX, SY, conv_qdq_model, conv_weights, f16_exact_input, off_f16, q_only_model


def _build(path, precision, **kw):
    from nnc.driver import pipeline_passes
    from nnc.onnx_import import import_model
    from nnc.pipeline import Pipeline
    m = import_model(str(path))
    Pipeline(pipeline_passes(precision, fuse=False, **kw), verify_each=True).run(m)
    return m


def _f32_scales(m):
    """{op name: [dtype of each scale operand]} of the quantized ops left in m."""
    from nnc.passes.to_precision import EXACT_OPERANDS
    out = []
    for op in m.main.ops:
        for i in EXACT_OPERANDS.get(op.name, ()):
            if i < len(op.operands) and op.operands[i] is not None:
                out.append((op.name, op.operands[i].type.dtype.short))
    return out


def test_scales_are_off_the_fp16_grid():
    assert off_f16(SX) and off_f16(SY) and off_f16(conv_weights()[1])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_literal_q_dq_keeps_exact_scale(precision, tmp_path):
    p = tmp_path / "q.onnx"
    onnx.save(q_only_model(), p)
    ref, low = _build(p, "fp32"), _build(p, precision)
    assert _f32_scales(low) and all(dt == "f32" for _, dt in _f32_scales(low)), _f32_scales(low)
    dq = next(op for op in low.main.ops if op.name == "DequantizeLinear")
    assert dq.results[0].type.dtype.short == {"fp16": "f16", "bf16": "bf16"}[precision]
    x = f16_exact_input((4096,), spread=1.5)
    if precision == "bf16":
        x = x.astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
        x = x.view(np.float32)
    a, b = Interpreter(ref).run({"x": x}), Interpreter(low).run({"x": x})
    np.testing.assert_array_equal(b["q"], a["q"])  # the integers: exactly the fp32 build's
    want = (a["q"].astype(np.float32) - 3) * SX
    np.testing.assert_array_equal(b["d"], want.astype(dq.results[0].type.dtype.np).astype(np.float32))
    rounded = np.clip(np.rint(x / np.float32(np.float16(SX))) + 3, -128, 127).astype(np.int8)
    assert np.count_nonzero(rounded != a["q"]) > 0  # an fp16 scale would change some integers


def test_folded_conv_and_literal_add_fp16_match_fp32_integers(tmp_path):
    p = tmp_path / "conv.onnx"
    onnx.save(conv_qdq_model(), p)
    ref, low = _build(p, "fp32"), _build(p, "fp16")
    names = [op.name for op in low.main.ops]
    assert "QLinearConv" in names and "Conv" not in names, names
    assert all(dt == "f32" for _, dt in _f32_scales(low)), _f32_scales(low)
    assert {n for n, _ in _f32_scales(low)} >= {"QLinearConv", "QuantizeLinear", "DequantizeLinear"}
    x = f16_exact_input((1, 8, 10, 10), seed=3)
    a, b = Interpreter(ref).run({"x": x}), Interpreter(low).run({"x": x})
    # y = DQ(int8 conv result): equal integers, so y is the fp32 value rounded once to fp16
    np.testing.assert_array_equal(b["y"], a["y"].astype(np.float16).astype(np.float32))
    # z = DQ(Q(x)) + x at fp16: DQ(x) rounded once, then an fp16 add
    want_z = (a["z"] - x).astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(b["z"] - x, want_z, rtol=0, atol=float(np.abs(x).max()) * 2 ** -10)
    # with fp16-rounded scales the integer conv output would differ (what this guards against)
    bad = conv_qdq_model()
    for t in bad.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT and t.name != "b":
            arr = onnx.numpy_helper.to_array(t).astype(np.float16).astype(np.float32)
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    pb = tmp_path / "bad.onnx"
    onnx.save(bad, pb)
    c = Interpreter(_build(pb, "fp32")).run({"x": x})
    assert np.count_nonzero(c["y"] != a["y"]) > 0


def test_keep_fp32_mixed_build_keeps_exact_scales(tmp_path):
    from nnc.passes.mixed_precision import PrecisionChoice
    p = tmp_path / "conv.onnx"
    onnx.save(conv_qdq_model(), p)
    ref = _build(p, "fp32")
    low = _build(p, "fp16", per_layer=PrecisionChoice("fp16", keep_patterns=("add",)))
    assert all(dt == "f32" for _, dt in _f32_scales(low)), _f32_scales(low)
    x = f16_exact_input((1, 8, 10, 10), seed=4)
    a, b = Interpreter(ref).run({"x": x}), Interpreter(low).run({"x": x})
    np.testing.assert_array_equal(b["y"], a["y"].astype(np.float16).astype(np.float32))
    add = next(op for op in low.main.ops if op.name == "Add")
    assert add.results[0].type.dtype.short == "f32"  # pinned; DQ(x) is a layer of its own at fp16
    dq16 = (a["z"] - x).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(b["z"], dq16 + x)


def test_fp8_qdq_model_at_fp16_keeps_f32_scales(tmp_path):
    from tools.fp8_models import qdq_model, random_x
    p = tmp_path / "f8.onnx"
    onnx.save(qdq_model(8, 256, 320, per_channel=True, sx=float(SX)), p)
    ref, low = _build(p, "fp32"), _build(p, "fp16")
    mm = [op for op in low.main.ops if op.name == "matmul_fp8"]
    assert len(mm) == 1 and mm[0].attrs.out_dtype.short == "f16"
    assert [v.type.dtype.short for v in (mm[0].operands[1], mm[0].operands[3])] == ["f32", "f32"]
    x = random_x(8, 256, seed=2, sx=float(SX)).astype(np.float16).astype(np.float32)
    a, b = Interpreter(ref).run({"x": x})["y"], Interpreter(low).run({"x": x})["y"]
    np.testing.assert_array_equal(b, a.astype(np.float16).astype(np.float32))


def test_fp16_qdq_cuda_build_nvrtc_compiles(tmp_path):
    import nnc
    from nnc.driver import compile_model
    p = tmp_path / "conv.onnx"
    onnx.save(conv_qdq_model(), p)
    out = tmp_path / "out"
    compile_model(str(p), out, options=nnc.CompileOptions(tune=False, backend="cuda", codegen=True,
                                                         arch="sm_90a", precision="fp16"))
    assert list(out.glob("model.*.cubin"))
    final = (out / "ir" / "final.nnir").read_text()
    assert "QLinearConv(" in final and " : f16[]" not in final, final


@pytest.mark.gpu
def test_gpu_fp16_qdq_build_matches_interpreter(tmp_path):
    import nnc
    from nnc.driver import compile_model
    p = tmp_path / "conv.onnx"
    onnx.save(conv_qdq_model(), p)
    out = tmp_path / "out"
    compile_model(str(p), out, options=nnc.CompileOptions(tune=False, backend="cuda", precision="fp16"))
    gpu, ref = nnc.load(out), nnc.load(out, backend="reference")
    f32 = Interpreter(_build(p, "fp32"))
    for seed in (0, 1):
        x = f16_exact_input((1, 8, 10, 10), seed=seed)
        got = gpu.run({"x": x}, output="numpy", poison=True)
        want = ref.run({"x": x}, output="numpy")
        # the int8 conv is exact: y equals the interpreter's, and fp32's rounded to fp16
        np.testing.assert_array_equal(np.asarray(got["y"], np.float32), np.asarray(want["y"], np.float32))
        exact = f32.run({"x": x})["y"].astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(got["y"], np.float32), exact)
        g, w = np.asarray(got["z"], np.float32), np.asarray(want["z"], np.float32)
        assert np.abs(g - w).max() <= 2 ** -9 * np.abs(w).max()
