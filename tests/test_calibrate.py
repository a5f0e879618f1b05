"""INT8 post-training calibration (compiler/calibrate.py) and Q/DQ insertion (quantize-int8)."""
from __future__ import annotations

import json
from pathlib import Path
import struct

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnc.calibrate import (NUM_BINS, CalibrationError, CalibTable, TensorStats, calibrate, entropy_amax,
                           load_table, parse_trt_cache, percentile_amax)


def _stats(x, method, pct=99.99):
    s = TensorStats()
    s.observe_range(x)
    if method != "minmax":
        s.observe_hist(x)
    return s.amax_for(method, pct)


# ---- the methods on synthetic data with known answers ----------------------------------------

def test_minmax_is_max_abs_exact():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 100)).astype(np.float32)
    x[3, 7] = -9.25
    assert _stats(x, "minmax") == 9.25


def test_percentile_on_uniform_grid_within_one_bin():
    # |x| uniform on [0, 2048): the p-th percentile is 2048 * p / 100 (bins are 1 wide)
    x = (np.arange(2048 * 100, dtype=np.float32) / 100.0) * np.where(np.arange(2048 * 100) % 2, 1, -1)
    for p in (50.0, 90.0, 99.0, 99.99):
        got = _stats(x, "percentile", p)
        want = float(np.percentile(np.abs(x), p))
        assert abs(got - want) <= 2048 / NUM_BINS, (p, got, want)


def test_percentile_from_histogram_exact():
    hist = np.zeros(NUM_BINS)
    hist[:100] = 1.0  # 100 values spread over bins 0..99, bin width 0.5
    assert percentile_amax(hist, 0.5, 50.0) == pytest.approx(25.0)
    assert percentile_amax(hist, 0.5, 100.0) == pytest.approx(50.0)


def test_entropy_clips_outliers_and_stays_below_max():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(200_000).astype(np.float32)
    x[:5] = [40.0, -35.0, 30.0, 38.0, -39.0]  # a few huge outliers
    amax = _stats(x, "entropy")
    assert amax <= 40.0
    assert 2.0 < amax < 10.0, amax  # clips the outliers, keeps the bulk of N(0, 1)
    # without outliers the threshold is still inside the range and not degenerate
    y = rng.uniform(-1, 1, 100_000).astype(np.float32)
    a2 = _stats(y, "entropy")
    assert 0.5 < a2 <= 1.0 + 1.0 / NUM_BINS


def test_entropy_on_all_mass_in_first_bins():
    hist = np.zeros(NUM_BINS)
    hist[:128] = 10.0
    # everything fits in 128 bins: the first candidate (128) represents it exactly
    assert entropy_amax(hist, 1.0) == pytest.approx(128.5)


# ---- the files ---------------------------------------------------------------------------------

def test_trt_cache_round_trip(tmp_path):
    t = CalibTable("entropy", {"input": 1.0, "conv1/out:0": 12.7, "fc_in": 0.0031})
    text = t.to_trt_cache()
    assert text.splitlines()[0] == "TRT-8601-EntropyCalibration2"
    assert "conv1/out:0: " + "%08x" % struct.unpack(">I", struct.pack(">f", 0.1))[0] in text
    (tmp_path / "c.cache").write_text(text)
    back = load_table(tmp_path / "c.cache")
    assert back.method == "entropy"
    assert set(back.amax) == set(t.amax)
    for k, v in t.amax.items():  # float32 scale: rel 1e-7
        assert back.amax[k] == pytest.approx(v, rel=1e-6)


def test_parse_hand_written_trt_cache():
    # as TensorRT writes it: leading zeros dropped, names with spaces, parens and colons
    text = ("TRT-8601-EntropyCalibration2\n"
            "input: 3c010a14\n"
            "(Unnamed Layer* 3) [Convolution]_output: 3d4ccccd\n"
            "a:b: 3f800000\n")
    t = parse_trt_cache(text, "x")
    assert t.method == "entropy"
    assert t.scale("input") == pytest.approx(0.00787594, rel=1e-5)
    assert t.scale("(Unnamed Layer* 3) [Convolution]_output") == pytest.approx(0.05, rel=1e-6)
    assert t.scale("a:b") == 1.0
    assert parse_trt_cache("TRT-7134-MinMaxCalibration\nx: 3f800000\n", "y").method == "minmax"


def test_calib_json_round_trip_and_errors(tmp_path):
    t = CalibTable("percentile", {"a": 2.0, "b": 0.5}, percentile=99.9, samples=10)
    t.save(tmp_path / "c.json")
    back = load_table(tmp_path / "c.json")
    assert (back.method, back.amax, back.percentile, back.samples) == ("percentile", t.amax, 99.9, 10)
    doc = json.loads((tmp_path / "c.json").read_text())
    bad = dict(doc, tensors={"a": {"amax": -1.0}})
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(CalibrationError, match=r"tensors\.a\.amax"):
        load_table(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text(json.dumps(dict(doc, version=99)))
    with pytest.raises(CalibrationError, match="'version'"):
        load_table(tmp_path / "bad2.json")
    (tmp_path / "bad3.json").write_text(json.dumps(dict(doc, tensors={"a": {"amax": 1.0, "scale": 5.0}})))
    with pytest.raises(CalibrationError, match=r"tensors\.a.*amax / 127"):
        load_table(tmp_path / "bad3.json")
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CalibrationError, match="neither calib.json"):
        load_table(tmp_path / "junk.bin")
    with pytest.raises(CalibrationError, match="no such file"):
        load_table(tmp_path / "missing.json")
    (tmp_path / "bad.cache").write_text("TRT-8601-EntropyCalibration2\ninput 3c010a14\n")
    with pytest.raises(CalibrationError, match="line 2"):
        load_table(tmp_path / "bad.cache")


# ---- calibrating a model -----------------------------------------------------------------------

def _mlp(tmp_path):
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("MatMul", ["hr", "w2"], ["y"], name="fc2")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w1, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    p = tmp_path / "mlp.onnx"
    onnx.save(m, p)
    return p, rng.standard_normal((40, 16)).astype(np.float32), numpy_helper.to_array(w1)


def test_calibrate_minmax_on_a_model_exact(tmp_path):
    model, x, w1 = _mlp(tmp_path)
    np.savez(tmp_path / "d.npz", x=x)
    t = calibrate(str(model), tmp_path / "d.npz", "minmax")
    assert set(t.amax) == {"x", "hr"}
    assert t.amax["x"] == float(np.abs(x).max())
    assert t.amax["hr"] == pytest.approx(float(np.maximum(x @ w1, 0).max()), rel=1e-6)
    assert t.samples == 40


def test_calibrate_bad_data(tmp_path):
    model, x, _ = _mlp(tmp_path)
    np.savez(tmp_path / "wrong.npz", z=x)
    with pytest.raises(Exception, match="no input 'z'"):
        calibrate(str(model), tmp_path / "wrong.npz", "minmax")
    np.savez(tmp_path / "none.npz")
    with pytest.raises(CalibrationError, match="no array for model input"):
        calibrate(str(model), tmp_path / "none.npz", "minmax")
    with pytest.raises(CalibrationError, match="no such file"):
        calibrate(str(model), tmp_path / "nope.npz", "minmax")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no .npz files"):
        calibrate(str(model), tmp_path / "empty", "minmax")
    with pytest.raises(CalibrationError, match="--method"):
        calibrate(str(model), tmp_path / "wrong.npz", "kl")


# ---- the quantize-int8 pass --------------------------------------------------------------------

def _q(x, s):
    return np.clip(np.rint(x.astype(np.float64) / s), -128, 127)


def test_quantize_weight_per_channel_exact():
    from nnc.passes.quantize_int8 import quantize_weight
    w = np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [0.1, 0.2, -0.3]], np.float32)
    q, s = quantize_weight(w, 0)
    assert s.dtype == np.float32 and q.dtype == np.int8
    np.testing.assert_array_equal(s, np.array([2 / 127, 1.0, 0.3 / 127], np.float32))
    np.testing.assert_array_equal(q[0], [64, -127, 32])  # rint(63.5) = 64 (half to even)
    np.testing.assert_array_equal(q[1], [0, 0, 0])
    np.testing.assert_array_equal(q[2], [42, 85, -127])
    _, s1 = quantize_weight(w, 1)  # Gemm without transB / MatMul: the columns
    np.testing.assert_array_equal(s1, np.array([1.0 / 127, 2.0 / 127, 0.5 / 127], np.float32))


def test_qdq_inserted_in_fold_qdq_form_and_matches_numpy(tmp_path):
    from nnc.calibrate import calibration_module
    from nnc.ir.interp import Interpreter
    from nnc.ir.printer import print_module
    from nnc.ir.verify import verify
    from nnc.passes.quantize_int8 import make_pass, quantize_weight
    model, x, w1 = _mlp(tmp_path)
    w2 = onnx.numpy_helper.to_array(onnx.load(model).graph.initializer[1])
    m = calibration_module(str(model))
    scales = {"x": 0.02, "hr": 0.05}
    assert make_pass(scales)(m)
    verify(m)
    text = print_module(m)
    # x -> Q -> DQ -> MatMul(., DQ(w_q i8, per-channel scale, axis 1 = the default, not printed)) -> Relu -> Q -> DQ -> MatMul
    order = ["%x.q = QuantizeLinear(%x, %x.scale, %x.zp) : i8[N,16]",
             "%x.dq = DequantizeLinear(%x.q, %x.scale, %x.zp) : f32[N,16]",
             "DequantizeLinear(%w1.q, %w1.scale) : f32[16,8]",
             "%h = MatMul(%x.dq, %w1.dq)", "%hr = Relu(%h)", "%hr.q = QuantizeLinear(%hr",
             "%hr.dq = DequantizeLinear(%hr.q", "%y = MatMul(%hr.dq, %w2.dq)"]
    pos = [text.find(s) for s in order]
    assert all(p >= 0 for p in pos) and pos == sorted(pos), (pos, text)
    assert "i8[16,8]" in text and "%y.q" not in text  # the model output stays float
    got = Interpreter(m).run({"x": x})["y"]
    q1, s1 = quantize_weight(w1, 1)
    q2, s2 = quantize_weight(w2, 1)
    xd = (_q(x, 0.02) * np.float32(0.02)).astype(np.float32)
    hr = np.maximum(xd @ (q1 * s1).astype(np.float32), 0)
    hd = (_q(hr, 0.05) * np.float32(0.05)).astype(np.float32)
    want = hd @ (q2 * s2).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_missing_tensor_scale_is_an_error_naming_it(tmp_path):
    from nnc.calibrate import calibration_module
    from nnc.ir.errors import NncError
    from nnc.passes.quantize_int8 import make_pass
    model, _, _ = _mlp(tmp_path)
    m = calibration_module(str(model))
    with pytest.raises(NncError, match=r"no scale for tensor 'hr' \(output of MatMul 'fc1'\)"):
        make_pass({"x": 0.1})(m)
    with pytest.raises(NncError, match=r"tensor 'x' .* has scale 0.0"):
        make_pass({"x": 0.0, "hr": 0.1})(calibration_module(str(model)))


# ---- accuracy on real data: the digits CNN (tools/train_digits.py) -----------------------------

DIGITS = Path(__file__).parent / "models" / "digits"


def _accuracy(module, x, y) -> float:
    from nnc.ir.interp import Interpreter
    return float((Interpreter(module).run({"input": x})["logits"].argmax(1) == y).mean() * 100)


@pytest.fixture(scope="module")
def digits_fp32():
    from nnc.calibrate import calibration_module
    h = np.load(DIGITS / "holdout.npz", allow_pickle=False)
    x, y = h["input"], h["labels"]
    return x, y, _accuracy(calibration_module(str(DIGITS / "digits_cnn.onnx")), x, y)


@pytest.mark.parametrize("method,max_drop", [("entropy", 0.5), ("minmax", 1.0), ("percentile", 1.0)])
def test_digits_int8_ptq_accuracy(method, max_drop, digits_fp32):
    from nnc.calibrate import calibration_module
    from nnc.passes.quantize_int8 import make_pass
    x, y, fp32 = digits_fp32
    assert fp32 > 95.0  # the committed model is trained (98.06% on the 360 held-out images)
    t = calibrate(str(DIGITS / "digits_cnn.onnx"), DIGITS / "calib.npz", method)
    m = calibration_module(str(DIGITS / "digits_cnn.onnx"))
    make_pass({k: t.scale(k) for k in t.amax})(m)
    assert sum(op.name == "QuantizeLinear" for op in m.main.ops) == 5
    int8 = _accuracy(m, x, y)
    print(f"\ndigits held-out ({len(y)} images): fp32 {fp32:.2f}%, int8 {method} {int8:.2f}% "
          f"(drop {fp32 - int8:+.2f} points)")
    assert fp32 - int8 <= max_drop


# ---- nnc calibrate / nnc compile --precision int8 ----------------------------------------------

def _cli(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "nnc.cli", *args], capture_output=True, text=True)


def test_cli_calibrate_then_compile_int8(tmp_path):
    model = str(DIGITS / "digits_cnn.onnx")
    r = _cli("calibrate", model, "--data", str(DIGITS / "calib.npz"), "--method", "percentile", "--percentile",
             "99.9", "-o", str(tmp_path / "c.json"), "--trt-cache", str(tmp_path / "c.cache"))
    assert r.returncode == 0, r.stderr
    assert "5 tensors, 256 samples" in r.stdout
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["method"] == "percentile" and doc["percentile"] == 99.9 and set(doc["tensors"]) == \
        {"input", "r1", "p1", "r2", "flat"}
    assert (tmp_path / "c.cache").read_text().startswith("TRT-8601-LegacyCalibration\n")
    for calib in ("c.json", "c.cache"):  # both files drive the compile
        out = tmp_path / f"o_{calib}"
        r = _cli("compile", model, "-o", str(out), "--precision", "int8", "--calib", str(tmp_path / calib),
                 "--no-codegen")
        assert r.returncode == 0, r.stderr
        plan = json.loads((out / "plan.json").read_text())
        assert plan["int8"] == {"calib": calib, "method": "percentile", "tensors": 5}
        assert "quantize-int8" in plan["passes"]
    # errors: clear, no traceback
    for args, msg in [(("--precision", "int8"), "needs calib"),
                      (("--precision", "fp16", "--calib", str(tmp_path / "c.json")), "only goes with precision 'int8'"),
                      (("--precision", "int8", "--calib", str(tmp_path / "nope.json")), "no such file"),
                      (("--precision", "int8", "--calib", model), "neither calib.json")]:
        r = _cli("compile", model, "-o", str(tmp_path / "bad"), "--no-codegen", *args)
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    (tmp_path / "partial.cache").write_text("TRT-8601-EntropyCalibration2\ninput: 3c010204\n")
    r = _cli("compile", model, "-o", str(tmp_path / "bad"), "--no-codegen", "--precision", "int8",
             "--calib", str(tmp_path / "partial.cache"))
    assert r.returncode != 0 and "no scale for tensor 'r1'" in r.stderr and "Traceback" not in r.stderr
    r = _cli("calibrate", model, "--data", str(DIGITS / "calib.npz"))
    assert r.returncode != 0 and "nowhere to write" in r.stderr


def _holdout_batches(m, batch):
    h = np.load(DIGITS / "holdout.npz", allow_pickle=False)
    x, y = h["input"], h["labels"]
    n = len(y) - len(y) % batch
    pred = np.concatenate([np.asarray(m.run({"input": x[i:i + batch]}, output="numpy")["logits"]).argmax(1)
                           for i in range(0, n, batch)])
    return float((pred == y[:n]).mean() * 100)


def _int8_build(tmp_path, codegen=True):
    import nnc
    from nnc.driver import compile_model
    t = calibrate(str(DIGITS / "digits_cnn.onnx"), DIGITS / "calib.npz", "entropy")
    t.save_trt_cache(tmp_path / "digits.cache")
    out = tmp_path / "int8"
    plan = compile_model(str(DIGITS / "digits_cnn.onnx"), out, options=nnc.CompileOptions(
        shapes={"input": [40, 1, 8, 8]}, precision="int8", calib=tmp_path / "digits.cache", tune=False,
        backend="cuda" if codegen else "reference", codegen=codegen))
    return plan, out


def test_int8_cuda_build_nvrtc_compiles_and_its_plan_keeps_accuracy(tmp_path):
    """The CUDA build of the int8 digits CNN: every kernel NVRTC-compiles on the CPU; where
    fold-qdq is in the pipeline the convolutions are integer kernels; the plan run in its arena by
    the reference backend stays within 0.5 points of fp32 on the held-out images."""
    import nnc
    from nnc.pipeline import PASSES
    plan, out = _int8_build(tmp_path)
    assert plan["kernels"]
    assert list(out.glob("model.*.cubin"))
    ops = [op for k in plan["kernels"] for op in k["ops"]]
    assert any("QuantizeLinear(" in op for op in ops)
    if "fold-qdq" in PASSES:
        assert len({op for op in ops if "QLinearConv(" in op}) == 2, ops  # (im2col + GEMM: one op, two kernels)
    m = nnc.load(out, backend="reference")
    fp32 = nnc.compile(str(DIGITS / "digits_cnn.onnx"), shapes={"input": [40, 1, 8, 8]}, backend="reference")
    a8, a32 = _holdout_batches(m, 40), _holdout_batches(fp32, 40)
    print(f"\ndigits CUDA-build plan (reference backend, in arena): fp32 {a32:.2f}%, int8 entropy {a8:.2f}%")
    assert a32 - a8 <= 0.5


@pytest.mark.gpu
def test_int8_cuda_build_matches_interpreter_on_gpu(tmp_path):
    """The int8 digits CNN's generated CUDA on the GPU against the reference interpreter of the
    same final IR (integer convs exact; float ops fp32 tolerance), on the held-out images."""
    import nnc
    _, out = _int8_build(tmp_path)
    gpu = nnc.load(out)
    ref = nnc.load(out, backend="reference")
    x = np.load(DIGITS / "holdout.npz", allow_pickle=False)["input"][:40]
    got = gpu.run({"input": x}, output="numpy")["logits"]
    want = ref.run({"input": x}, output="numpy")["logits"]
    # a rounding tie may flip one int8 quantum somewhere: allow that, no more
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-2 * float(np.abs(want).max()))
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.975


def test_maxpool_and_views_keep_their_input_scale():
    """Relu -> MaxPool -> Conv and Relu -> MaxPool -> Flatten -> Gemm: the pooled / flattened
    tensors take the Relu output's scale (in the table and in the IR), so pooling is exact on int8."""
    from nnc.calibrate import calibration_module
    from nnc.passes.quantize_int8 import make_pass, scale_sources
    m = calibration_module(str(DIGITS / "digits_cnn.onnx"))
    assert scale_sources(m) == {"p1": "r1", "flat": "r2"}
    t = calibrate(str(DIGITS / "digits_cnn.onnx"), DIGITS / "calib.npz", "entropy")
    assert t.amax["p1"] == t.amax["r1"] and t.amax["flat"] == t.amax["r2"]
    make_pass({"input": 1 / 127, "r1": 0.03, "p1": 0.5, "r2": 0.07, "flat": 0.9})(m)  # p1/flat's own: ignored
    consts = {op.results[0].name: op.attrs.value for op in m.main.ops if op.name == "const" and op.attrs.value is not None}
    assert float(consts["p1.scale"]) == np.float32(0.03) and float(consts["flat.scale"]) == np.float32(0.07)


def test_trt_cache_hostile_names():
    t = CalibTable("minmax", {"a: b": 1.0, "x\ny": 2.0})
    with pytest.raises(CalibrationError, match="line break"):
        t.to_trt_cache()
    t = CalibTable("minmax", {"a: b": 1.27, "(Unnamed Layer* 1) [Shuffle]_output": 2.54})
    back = parse_trt_cache(t.to_trt_cache(), "x")
    assert back.scale("a: b") == pytest.approx(0.01) and back.method == "minmax"


def test_entropy_ignores_the_relu_zero_spike():
    # half the values of a Relu'd N(0, 1) are 0: that spike must not pull the threshold in
    rng = np.random.default_rng(2)
    x = np.maximum(rng.standard_normal(1_000_000), 0).astype(np.float32)
    assert 3.5 < _stats(x, "entropy") <= float(x.max())
    # discrete data (pixels k/16, bin 1 empty): the full range is kept
    px = (rng.integers(0, 17, 100_000) / 16).astype(np.float32)
    px[:50_000] = 0
    assert _stats(px, "entropy") >= 0.99


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_tiny_cnn_int8_output_error(method, tmp_path):
    """Random-weight example CNN (Conv+BN, residual Add, Gemm, Softmax), random inputs: the int8
    build's output against fp32 on inputs not used for calibration (rel-L2, cosine)."""
    import nnc
    example = Path(__file__).parent.parent / "examples" / "tiny_cnn.onnx"
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "c.npz", input=rng.standard_normal((64, 3, 32, 32)).astype(np.float32))
    x = {"input": rng.standard_normal((16, 3, 32, 32)).astype(np.float32)}
    calibrate(str(example), tmp_path / "c.npz", method).save(tmp_path / "c.json")
    ref = nnc.compile(str(example), backend="reference").run(x, output="numpy")
    got = nnc.compile(str(example), backend="reference", precision="int8", calib=tmp_path / "c.json").run(
        x, output="numpy")
    (name, r), = ref.items()
    g = got[name]
    rel = float(np.linalg.norm(g - r) / np.linalg.norm(r))
    cos = float((g * r).sum() / np.linalg.norm(g) / np.linalg.norm(r))
    print(f"\ntiny_cnn int8 {method}: rel-L2 {rel:.4f}, cosine {cos:.5f}")
    assert rel < 0.03 and cos > 0.999


def test_calibrate_directory_and_static_batch(tmp_path):
    """A directory of .npz files is one data set; a static batch (--shapes) cuts the samples into
    batches of it (the remainder left out); fewer samples than one batch is an error."""
    model, x, w1 = _mlp(tmp_path)
    (tmp_path / "d").mkdir()
    np.savez(tmp_path / "d" / "a.npz", x=x[:25])
    np.savez(tmp_path / "d" / "b.npz", x=x[25:])
    t = calibrate(str(model), tmp_path / "d", "minmax")
    assert t.samples == 40 and t.amax["x"] == float(np.abs(x).max())
    t8 = calibrate(str(model), tmp_path / "d", "minmax", shapes={"x": [8, 16]})
    assert t8.samples == 24 + 8  # 25 -> 3 batches of 8, 15 -> 1
    used = np.concatenate([x[:24], x[25:33]])
    assert t8.amax["x"] == float(np.abs(used).max())
    with pytest.raises(CalibrationError, match="fewer than the model's batch 32"):
        calibrate(str(model), tmp_path / "d", "minmax", shapes={"x": [32, 16]})
    np.savez(tmp_path / "zero.npz", x=np.zeros((0, 16), np.float32))
    with pytest.raises(CalibrationError, match="no samples"):
        calibrate(str(model), tmp_path / "zero.npz", "minmax")
