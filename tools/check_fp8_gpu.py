"""Reduced precision on the GPU: correctness and GPU compute time of fp8 / int8 / mixed builds against
fp16 builds of the same model (one table, printed last). Run on a GPU machine:

    python tools/check_fp8_gpu.py [--only gemm,conv,exact,best] [--shapes 256x4096x4096,...]
                                  [--conv-shapes 32x64x56x56x64x3x1,...] [--iterations 50]

Sections:
- gemm, per M x K x N, one-layer MatMul: fp16 (--precision fp16), fp8 (calib) (--precision fp8
  --calib, minmax over random data), fp8 QDQ (the ONNX float8 QDQ model, tools/fp8_models.py);
- conv, per NxCxHxW x O x k x stride, one Conv + bias: fp16, fp8 (calib) (conv_fp8), fp8 QDQ;
- exact: the fp16 build of an int8 QDQ conv model whose scales are off the fp16 grid
  (tools/qdq_scale_models.py): its int8 conv must give the fp32 build's integers, so y must equal
  the fp32 interpreter's y rounded to fp16 (column "rel err" is then 0, "note" counts mismatches);
- best: the digits CNN at --precision best --allow fp16,bf16,fp8,int8 --calib --max-rel-err 2e-2 (heuristic cost) and
  at fp16: held-out accuracy and time; besttimed (not in the default --only): the same with --tune,
  so the search times every layer alone on the GPU at each allowed precision (compiler/layer_timer.py).
- bert (not in the default --only): BERT-base at fp16 and at --precision fp8 (minmax calibration), batch
  1 and 32 (--bert-batches): on sm_90a the fp8 build's encoder GEMMs are the fp8 wgmma kernel
  (codegen/kernels/gemm_fp8_wgmma.py); the note counts fp8 / f16 GEMM launches.
Each row: the kernels, max |gpu - interpreter| / max |interpreter| on fresh inputs (outputs poisoned
first), the median GPU compute time (nnc bench's CUDA events around the graph). On sm_90a the fp8
GEMMs run on the fp8 tensor cores (gemm_fp8.wgmma); fp8 convs, and fp8 GEMMs elsewhere, dequantize
into the fp16 kernels (docs/fp8.md).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "tests" / "models" / "digits"
ROWS: list = []


def _float_model(M, K, N):
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh
    from tools.fp8_models import weights
    w, _, _ = weights(K, N)
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "mm",
                     [h.make_tensor_value_info("x", TP.FLOAT, [M, K])],
                     [h.make_tensor_value_info("y", TP.FLOAT, [M, N])], [nh.from_array(w, "w")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)


def _float_conv_model(N, C, HW, O, k, stride):
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh
    from tools.fp8_models import conv_weights
    w, _, _ = conv_weights(O, C, k)
    b = np.random.default_rng(3).standard_normal(O).astype(np.float32)
    p = k // 2
    Ho = (HW + 2 * p - k) // stride + 1
    g = h.make_graph([h.make_node("Conv", ["x", "w", "b"], ["y"], pads=[p] * 4, strides=[stride] * 2, name="conv")],
                     "conv", [h.make_tensor_value_info("x", TP.FLOAT, [N, C, HW, HW])],
                     [h.make_tensor_value_info("y", TP.FLOAT, [N, O, Ho, Ho])],
                     [nh.from_array(w, "w"), nh.from_array(b, "b")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)


def _build(model, out, **kw):
    import nnc
    from nnc.driver import compile_model
    kw.setdefault("tune", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_model(str(model), out, options=nnc.CompileOptions(backend="cuda", **kw))


def _check(out, feed, name, iters):
    import nnc
    from nnc.bench import BenchOptions, bench
    gpu, ref = nnc.load(out), nnc.load(out, backend="reference")
    got = np.asarray(gpu.run(feed, output="numpy", poison=True)[name], np.float32)
    want = np.asarray(ref.run(feed, output="numpy")[name], np.float32)
    rel = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)) if np.all(np.isfinite(got)) else float("nan")
    r = bench(out, BenchOptions(iterations=iters, warmup=5))
    return gpu, got, rel, (r.gpu_compute_ms or {}).get("median", float("nan")), len(gpu.plan["kernels"])


def _row(case, build, fn):
    try:
        nk, rel, ms, note = fn()
        ROWS.append(f"{case:>24} {build:>12} {nk:>8} {rel:>10.2e} {ms:>9.4f}  {note}")
    except Exception as err:  # one failing build must not hide the others
        ROWS.append(f"{case:>24} {build:>12} FAILED: {type(err).__name__}: {str(err)[:200]}")
    print(ROWS[-1], flush=True)


def gemm(td, shapes, iters):
    import onnx
    from nnc.calibrate import calibrate
    from tools.fp8_models import qdq_model, random_x
    for spec in shapes:
        M, K, N = (int(v) for v in spec.split("x"))
        fm, qm = td / f"f_{spec}.onnx", td / f"q_{spec}.onnx"
        onnx.save(_float_model(M, K, N), fm)
        onnx.save(qdq_model(M, K, N), qm)
        np.savez(td / "calib.npz", x=random_x(M, K, seed=1))
        calibrate(str(fm), td / "calib.npz", "minmax").save(td / f"calib_{spec}.json")
        for name, model, kw in (("fp16", fm, dict(precision="fp16")),
                                ("fp8 (calib)", fm, dict(precision="fp8", calib=td / f"calib_{spec}.json")),
                                ("fp8 QDQ", qm, {})):
            out = td / f"g_{name.split()[0]}_{len(kw)}_{spec}"

            def run(model=model, kw=kw, out=out):
                _build(model, out, **kw)
                _, _, rel, ms, nk = _check(out, {"x": random_x(M, K, seed=11)}, "y", iters)
                return nk, rel, ms, ""
            _row(f"mm {spec}", name, run)


def conv(td, shapes, iters):
    import onnx
    from nnc.calibrate import calibrate
    from tools.fp8_models import qdq_conv_model, random_conv_x
    for spec in shapes:
        N, C, H, W, O, k, s = (int(v) for v in spec.split("x"))
        assert H == W, "square inputs only"
        fm, qm = td / f"fc_{spec}.onnx", td / f"qc_{spec}.onnx"
        onnx.save(_float_conv_model(N, C, H, O, k, s), fm)
        onnx.save(qdq_conv_model(N, C, O, H, k, s), qm)
        np.savez(td / "calibc.npz", x=random_conv_x(N, C, H, seed=1))
        calibrate(str(fm), td / "calibc.npz", "minmax").save(td / f"calibc_{spec}.json")
        for name, model, kw in (("fp16", fm, dict(precision="fp16")),
                                ("fp8 (calib)", fm, dict(precision="fp8", calib=td / f"calibc_{spec}.json")),
                                ("fp8 QDQ", qm, {})):
            out = td / f"c_{name.split()[0]}_{len(kw)}_{spec}"

            def run(model=model, kw=kw, out=out):
                plan = _build(model, out, **kw)
                _, _, rel, ms, nk = _check(out, {"x": random_conv_x(N, C, H, seed=11)}, "y", iters)
                fp8 = any("conv_fp8(" in op for kk in plan["kernels"] for op in kk["ops"])
                return nk, rel, ms, "conv_fp8" if fp8 else ""
            _row(f"conv {spec}", name, run)


def exact(td, iters):
    import onnx
    from nnc.driver import pipeline_passes
    from nnc.ir.interp import Interpreter
    from nnc.onnx_import import import_model
    from nnc.pipeline import Pipeline
    from tools.qdq_scale_models import conv_qdq_model, f16_exact_input
    p = td / "qdq_scales.onnx"
    onnx.save(conv_qdq_model(), p)
    ref = import_model(str(p))
    Pipeline(pipeline_passes("fp32", fuse=False)).run(ref)

    def run():
        out = td / "exact_fp16"
        _build(p, out, precision="fp16")
        x = f16_exact_input((1, 8, 10, 10), seed=5)
        _, got, rel, ms, nk = _check(out, {"x": x}, "y", iters)
        want = Interpreter(ref).run({"x": x})["y"].astype(np.float16).astype(np.float32)
        bad = int(np.count_nonzero(got != want))
        return nk, float(np.abs(got - want).max() / np.abs(want).max()), ms, f"{bad} of {want.size} differ from fp32's integers"
    _row("int8 QDQ, odd scales", "fp16", run)


def best(td, iters, timed=False):
    from nnc.calibrate import calibrate
    calibrate(str(DIGITS / "digits_cnn.onnx"), DIGITS / "calib.npz", "minmax").save(td / "digits.json")
    np.savez(td / "digits_data.npz", input=np.load(DIGITS / "calib.npz")["input"][:40])
    h = np.load(DIGITS / "holdout.npz")
    shapes = {"input": [40, 1, 8, 8]}

    def accuracy(mod):
        ok = sum(int((np.asarray(mod.run({"input": h["input"][i:i + 40]}, output="numpy")["logits"]).argmax(1)
                      == h["labels"][i:i + 40]).sum()) for i in range(0, 360, 40))
        return 100.0 * ok / 360

    best_kw = dict(precision="best", allow="fp16,bf16,fp8,int8", calib=td / "digits.json",
                   calib_data=td / "digits_data.npz", max_rel_err=2e-2)  # all-int8 digits: 1.4e-2
    builds = (("best timed", dict(best_kw, tune=True)),) if timed else \
        (("fp16", dict(precision="fp16")), ("best", best_kw))
    for name, kw in builds:
        def run(kw=kw, name=name):
            out = td / f"digits_{name}"
            plan = _build(DIGITS / "digits_cnn.onnx", out, shapes=shapes, **kw)
            gpu, _, rel, ms, nk = _check(out, {"input": h["input"][:40]}, "logits", iters)
            lp = plan.get("layer_precision", {})
            mix = ",".join(f"{d['layer']}:{d['precision']}" for d in lp.get("layers", []))
            cm = lp.get("search", {}).get("cost_model", "")
            return nk, rel, ms, f"acc {accuracy(gpu):.2f}% cost {cm} {mix}"
        _row("digits CNN b40", name.replace(" timed", "+tune"), run)


def _time_only(out, feed, name, iters):
    """(output, median GPU compute ms, kernels, launches by template) of a build, no reference run."""
    import json

    import nnc
    from nnc.bench import BenchOptions, bench
    gpu = nnc.load(out)
    got = np.asarray(gpu.run(feed, output="numpy", poison=True)[name], np.float32)
    r = bench(out, BenchOptions(iterations=iters, warmup=5))
    plan = json.loads((Path(out) / "plan.json").read_text())
    tpl = {k["name"]: k["template"] for k in plan["kernels"]}
    n8 = sum(1 for l in plan["launches"] if tpl.get(l.get("kernel")) == "gemm_fp8_wgmma.cu.j2")
    n16 = sum(1 for l in plan["launches"] if tpl.get(l.get("kernel")) in ("gemm_wgmma.cu.j2", "gemm_tc.cu.j2"))
    return got, (r.gpu_compute_ms or {}).get("median", float("nan")), len(plan["kernels"]), f"{n8} fp8 / {n16} f16 GEMM launches"


def bert(td, batches, iters):
    """BERT-base (tests/models/graphs, refilled weights; batch > 1 by the torch export of
    tools/export_graphs.py where torch and transformers are installed) at fp16 and at fp8 (minmax
    calibration on one random batch-1 input). rel err: batch 1 against the interpreter of the fp8
    build's own final IR; batch > 1 against the fp16 build's GPU output (a sanity check: fp8's
    quantization error is in it)."""
    import onnx
    from nnc.calibrate import calibrate
    from tools.graph_models import GRAPHS, load_graph_model
    m1 = td / "bert_b1.onnx"
    onnx.save(load_graph_model(GRAPHS / "bert_base.graph.onnx"), m1)
    rng = np.random.default_rng(0)

    def feed(b):
        return {"input_ids": rng.integers(0, 30000, (b, 128)).astype(np.int64),
                "attention_mask": np.ones((b, 128), np.int64)}
    np.savez(td / "bert_cal.npz", **feed(1))
    calibrate(str(m1), td / "bert_cal.npz", "minmax").save(td / "bert_cal.json")
    for b in batches:
        path = m1
        if b != 1:
            try:
                sys.path.insert(0, str(ROOT / "tools"))
                from export_graphs import torch_export, torch_model
                mod, inputs, names = torch_model("bert_base", b)
                path = td / f"bert_b{b}.onnx"
                torch_export(mod, inputs, path, names)
            except Exception as err:  # noqa: BLE001
                ROWS.append(f"{'bert-base b%d' % b:>24} {'export':>12} FAILED: {type(err).__name__}: {str(err)[:200]}")
                print(ROWS[-1], flush=True)
                continue
        x = feed(b)
        outs = {}
        for name, kw in (("fp16", dict(precision="fp16")),
                         ("fp8 (calib)", dict(precision="fp8", calib=td / "bert_cal.json"))):
            def run(name=name, kw=kw, path=path, b=b, x=x):
                out = td / f"bert_b{b}_{name.split()[0]}"
                _build(path, out, arch="sm_90a", **kw)
                if b == 1:
                    _, got, rel, ms, nk = _check(out, x, "output", iters)
                    _, _, _, note = _time_only(out, x, "output", 3)
                else:
                    got, ms, nk, note = _time_only(out, x, "output", iters)
                    ref = outs.get("fp16")
                    rel = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6)) if ref is not None else float("nan")
                    note += " (rel err vs the fp16 build)"
                outs[name.split()[0]] = got
                return nk, rel, ms, note
            _row(f"bert-base b{b}", name, run)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="gemm,conv,exact,best")
    ap.add_argument("--shapes", default="256x4096x4096,32x768x3072")
    ap.add_argument("--conv-shapes", default="32x64x56x56x64x3x1,32x256x14x14x256x3x1")
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--bert-batches", default="1,32", help="batches of the bert section (--only bert)")
    args = ap.parse_args(argv)
    parts = set(args.only.split(","))
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        if "gemm" in parts:
            gemm(td, args.shapes.split(","), args.iterations)
        if "conv" in parts:
            conv(td, args.conv_shapes.split(","), args.iterations)
        if "exact" in parts:
            exact(td, args.iterations)
        if "best" in parts:
            best(td, args.iterations)
        if "bert" in parts:  # not in the default --only: four BERT-base builds (minutes of compile)
            bert(td, [int(v) for v in args.bert_batches.split(",")], args.iterations)
        if "besttimed" in parts:  # best with --tune: each layer timed alone on the GPU (compiler/layer_timer.py)
            best(td, args.iterations, timed=True)
    print(f"\n{'case':>24} {'build':>12} {'kernels':>8} {'rel err':>10} {'gpu ms':>9}  note")
    print("\n".join(ROWS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
