"""--precision best with int8 / fp8 layers (--allow fp16,bf16,fp8,int8 --calib): each layer takes the
fastest of its allowed types by the cost model (here the deterministic stand-in timer, or a fake
timer the test controls), within --max-rel-err on the calibration data; sensitive quantized layers
fall back to a float type, then fp32; int8 / fp8 without --calib is refused (test_precision_best.py's
bad-option cases). Accuracy is re-measured on held-out digits, not read from the search's record.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

import nnc
from nnc import precision_search as ps

DIGITS = Path(__file__).parent / "models" / "digits"
SHAPES = {"input": [40, 1, 8, 8]}


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    from nnc.calibrate import calibrate
    d = tmp_path_factory.mktemp("bestq")
    calibrate(str(DIGITS / "digits_cnn.onnx"), DIGITS / "calib.npz", "minmax").save(d / "c.json")
    np.savez(d / "data.npz", input=np.load(DIGITS / "calib.npz")["input"][:40])
    return d


def _best(calib, monkeypatch, cost, allow="fp16,bf16,fp8,int8", max_rel_err=1e-2, backend="reference", **kw):
    monkeypatch.setattr(ps, "cost_model", lambda options, *a, **k: cost)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nnc.compile(str(DIGITS / "digits_cnn.onnx"), shapes=SHAPES, backend=backend, precision="best",
                           allow=allow, calib=calib / "c.json", calib_data=calib / "data.npz",
                           max_rel_err=max_rel_err, **kw)


def _layers(m) -> dict:
    return {d["layer"]: d["precision"] for d in m.plan["layer_precision"]["layers"]}


def _ops(m) -> list:
    text = (m.dir / "ir" / "final.nnir").read_text()
    return [ln.split("=", 1)[1].split("(")[0].strip() for ln in text.splitlines() if " = " in ln]


def _holdout(m):
    h = np.load(DIGITS / "holdout.npz")
    ok = sum(int((np.asarray(m.run({"input": h["input"][i:i + 40]}, output="numpy")["logits"]).argmax(1)
                  == h["labels"][i:i + 40]).sum())
             for i in range(0, 360, 40))
    return 100.0 * ok / 360


def _rel_err_on_calib(m, calib):
    f32 = nnc.compile(str(DIGITS / "digits_cnn.onnx"), shapes=SHAPES, backend="reference")
    x = {"input": np.load(calib / "data.npz")["input"]}
    a, b = f32.run(x)["logits"], m.run(x)["logits"]
    return float(np.linalg.norm(b - a) / np.linalg.norm(a))


class FakeTimer:
    """Seconds per (layer, precision) from a table; unlisted pairs cost 1 s."""
    def __init__(self, table):
        self.table = table

    def __call__(self, op, precision):
        return self.table.get((op.results[0].name, precision), self.table.get(precision, 1.0))


def test_stand_in_timer_picks_the_fastest_allowed_per_layer(calib, monkeypatch):
    cost = ps.stand_in_cost()
    m = _best(calib, monkeypatch, cost, max_rel_err=1.0)  # a loose budget: nothing moves
    rec = m.plan["layer_precision"]["search"]
    assert rec["cost_model"] == "stand-in" and rec["met"] and len(rec["iterations"]) == 1
    times = rec["layer_times_s"]
    got = _layers(m)
    for layer, t in times.items():
        fastest = min(t, key=lambda p: (t[p], ps.SPEED_ORDER.index(p)))
        # the Relu / MaxPool / Flatten between int8 layers run with them, at f32 (int8 flows through)
        assert got[layer] == fastest or (fastest in ("fp16", "bf16") and got[layer] == "fp32"
                                         and layer in ("r1", "p1", "r2", "p2", "flat")), (layer, t, got[layer])
    assert set(times["c1"]) == {"int8", "fp8", "fp16", "bf16"} and set(times["r1"]) == {"fp16", "bf16"}
    assert got["c1"] == got["c2"] == "int8" and got["logits"] == "int8"
    ops = _ops(m)
    # int8 flows: conv -> Relu (Max) -> MaxPool -> conv -> .. -> Flatten -> the int8 classifier, f32 out
    assert ops.count("QLinearConv") == 2 and "Conv" not in ops and "MatMulInteger" in ops, ops
    assert ops.count("QuantizeLinear") == 1 and "Cast" not in ops, ops
    text = (m.dir / "ir" / "final.nnir").read_text()
    assert "MaxPool(" in text and "= MaxPool(" in text and ": i8[40,16,4,4]" in text, text
    assert dict((d["layer"], d.get("why", "")) for d in m.plan["layer_precision"]["layers"])["p1"].startswith(
        "between int8 layers")


def test_fake_timer_choice_and_fp8_layer(calib, monkeypatch):
    # fp8 fastest for the classifier, int8 for the first conv, fp16 elsewhere
    table = {("logits", "fp8"): 0.1, ("c1", "int8"): 0.1, "fp16": 0.5, "bf16": 0.6, "int8": 0.9, "fp8": 0.9}
    m = _best(calib, monkeypatch, ps.TimedCost(FakeTimer(table), "fake"), max_rel_err=1e-1)
    got = _layers(m)
    assert got["logits"] == "fp8" and got["c1"] == "int8" and got["c2"] == "fp16", got
    ops = _ops(m)
    assert "matmul_fp8" in ops and ops.count("Conv") == 1, ops
    assert _rel_err_on_calib(m, calib) <= 1e-1


def test_sensitive_layers_fall_back_until_the_budget_holds(calib, monkeypatch):
    table = {"int8": 0.1, "fp8": 0.2, "fp16": 0.5, "bf16": 0.6}
    loose = _best(calib, monkeypatch, ps.TimedCost(FakeTimer(table), "fake"), max_rel_err=1.0)
    start_err = _rel_err_on_calib(loose, calib)
    budget = start_err * 0.8  # the all-quantized start breaks it
    m = _best(calib, monkeypatch, ps.TimedCost(FakeTimer(table), "fake"), max_rel_err=budget)
    rec = m.plan["layer_precision"]["search"]
    assert rec["met"] and not rec["fallback_all_fp32"], rec["iterations"]
    moved = [mv for it in rec["iterations"] for mv in it.get("moved", [])]
    assert moved and all("error contribution" in mv["why"] for mv in moved)
    # a quantized layer falls back to a float type first
    first = {}
    for mv in moved:
        first.setdefault(mv["layer"], mv["to"])
    assert any(to == "fp16" for to in first.values()), moved
    assert _rel_err_on_calib(m, calib) <= budget * 1.01
    assert "fp32" not in {p for k, p in _layers(m).items() if k in ("c1", "c2", "logits")}  # fp16 sufficed


def test_heuristic_picks_int8_and_never_fp8_over_fp16(calib, monkeypatch):
    m = _best(calib, monkeypatch, ps.HeuristicCost(), max_rel_err=1e-1)
    got = _layers(m)
    assert got["c1"] == "int8" and "fp8" not in got.values(), got
    acc32 = _holdout(nnc.compile(str(DIGITS / "digits_cnn.onnx"), shapes=SHAPES, backend="reference"))
    assert acc32 - _holdout(m) <= 0.5


def _cuda_best(calib, monkeypatch, tmp_path, cost, **kw):
    from nnc.driver import compile_model
    monkeypatch.setattr(ps, "cost_model", lambda options, *a, **k: cost)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = compile_model(str(DIGITS / "digits_cnn.onnx"), out, options=nnc.CompileOptions(
            shapes=SHAPES, backend="cuda", tune=False, precision="best", allow="fp16,bf16,fp8,int8",
            calib=calib / "c.json", calib_data=calib / "data.npz", max_rel_err=1e-1, **kw))
    return out, plan


MIXED = {("logits", "fp8"): 0.1, "int8": 0.2, "fp16": 0.5, "bf16": 0.6, "fp8": 0.9}


def test_int8_fp8_best_cuda_build_nvrtc_compiles(calib, monkeypatch, tmp_path):
    out, plan = _cuda_best(calib, monkeypatch, tmp_path, ps.TimedCost(FakeTimer(MIXED), "fake"), arch="sm_90a")
    assert list(out.glob("model.*.cubin"))
    ops = " ".join(op for k in plan["kernels"] for op in k["ops"])
    assert "matmul_fp8(" in ops and ("ConvInteger(" in ops or "QLinearConv(" in ops), ops


@pytest.mark.gpu
def test_gpu_int8_fp8_best_build_matches_interpreter(calib, monkeypatch, tmp_path):
    out, _ = _cuda_best(calib, monkeypatch, tmp_path, ps.TimedCost(FakeTimer(MIXED), "fake"))
    gpu, ref = nnc.load(out), nnc.load(out, backend="reference")
    h = np.load(DIGITS / "holdout.npz")["input"]
    for i in (0, 40):
        feed = {"input": h[i:i + 40]}
        got = np.asarray(gpu.run(feed, output="numpy", poison=True)["logits"], np.float32)
        want = np.asarray(ref.run(feed, output="numpy")["logits"], np.float32)
        assert np.all(np.isfinite(got))
        assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()
    acc = _holdout(gpu)
    print(f"\ndigits best (int8 convs, fp8 classifier) CUDA build on the GPU: {acc:.2f}%")
    assert acc >= 97.0


def test_layer_timer_builds_each_layer_alone_at_each_precision(calib, tmp_path):
    """compiler/layer_timer.py (best's GPU cost model with --tune) on the CPU: the one-layer builds
    compile through NVRTC for sm_90a with the precision's kernels; `measure` stands in for the GPU
    (the plan's kernel count); repeated (op, types, precision) are built once."""
    import json
    from nnc.calibrate import load_table, pre_quant_passes
    from nnc.layer_timer import LayerTimer
    from nnc.onnx_import import import_model
    from nnc.pipeline import Pipeline
    m = import_model(str(DIGITS / "digits_cnn.onnx"), shapes=SHAPES)
    Pipeline(pre_quant_passes()).run(m)
    ops = {op.results[0].name: op for op in m.main.ops if op.name != "const"}
    opts = nnc.CompileOptions(shapes=SHAPES, backend="cuda", arch="sm_90a", tune=False, precision="best",
                              allow="fp16,bf16,fp8,int8", calib=calib / "c.json")
    kernels = {}

    def measure(out):
        plan = json.loads((out / "plan.json").read_text())
        kernels[out.name] = " ".join(op for k in plan["kernels"] for op in k["ops"])
        return 1e-6 * len(plan["kernels"])

    timer = LayerTimer(opts, dict(load_table(calib / "c.json").amax), "fp16", measure, tmp_path)
    timer.src_weights = m.weights
    times = {p: timer(ops["c1"], p) for p in ("int8", "fp8", "fp16")}
    times["relu"] = timer(ops["r1"], "fp16")
    assert timer.builds == 4 and all(t > 0 for t in times.values())
    assert timer(ops["c1"], "int8") == times["int8"] and timer.builds == 4  # cached
    int8, fp8, fp16, relu = (kernels[f"layer{i}"] for i in range(4))
    assert "ConvInteger(" in int8 or "QLinearConv(" in int8, int8
    assert "conv_fp8(" in fp8 and "QuantizeLinear(" in fp8, fp8
    assert "Conv(" in fp16 and "QuantizeLinear" not in fp16, fp16
    assert "Relu(" in relu and "to=f32" not in relu and times["relu"] == 1e-6, relu  # f16 in and out: one kernel


@pytest.mark.gpu
def test_gpu_best_with_tune_times_layers_on_the_gpu(calib, tmp_path):
    """--precision best --tune: the cost model is the GPU layer timer; its times are in plan.json
    and the build it chose matches the interpreter."""
    from nnc.driver import compile_model
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = compile_model(str(DIGITS / "digits_cnn.onnx"), out, options=nnc.CompileOptions(
            shapes=SHAPES, backend="cuda", tune=True, precision="best", allow="fp16,bf16,fp8,int8",
            calib=calib / "c.json", calib_data=calib / "data.npz", max_rel_err=1e-2))
    rec = plan["layer_precision"]["search"]
    assert rec["cost_model"] == "gpu" and rec["met"]
    times = rec["layer_times_s"]
    assert set(times["c1"]) == {"int8", "fp8", "fp16", "bf16"} and all(t > 0 for t in times["c1"].values())
    print("\n" + "\n".join(f"{k}: " + ", ".join(f"{p} {t * 1e6:.1f} us" for p, t in v.items()) for k, v in times.items()))
    gpu, ref = nnc.load(out), nnc.load(out, backend="reference")
    x = {"input": np.load(DIGITS / "holdout.npz")["input"][:40]}
    got = np.asarray(gpu.run(x, output="numpy", poison=True)["logits"], np.float32)
    want = np.asarray(ref.run(x, output="numpy")["logits"], np.float32)
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()
