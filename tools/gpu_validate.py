"""One-call GPU validation for nnc (run on the device machine; prints a short table last).

    python tools/gpu_validate.py --out $OUT [--parts node,light,models,cpp,bench] [--jobs 14]

Parts:
  pytest  the GPU-marked tests (`pytest -m gpu tests`), their pass count.
  node    ONNX node suite through nnc.onnx_backend device "CUDA" (parallel worker processes);
          writes node_cuda.tsv (case, status, detail) and the pass count.
  light   the nine onnx light_* models through the CUDA backend vs their stored outputs.
  models  a CNN (torchvision ResNet-18), a transformer encoder (transformers BERT, random
          weights) and an LSTM exported here with torch.onnx, compiled by nnc at fp32 and fp16,
          checked against onnxruntime on fresh random inputs (rel. L2 error: fp32 1e-3, fp16 1e-2).
  cpp     cmake build of one compiled out/ dir; its example runner's outputs vs the Python runtime.
  bench   median CUDA-event times: nnc vs torch eager vs torch.compile on the same models.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools.cuda_timing import time_cuda  # noqa: E402
from tools.export_graphs import torch_export  # noqa: E402
ROWS: list[tuple] = []  # (part, item, result, detail)


def row(part, item, result, detail=""):
    ROWS.append((part, item, result, detail))
    print(f"[{part}] {item}: {result} {detail}", flush=True)


def rel_err(got, ref) -> float:
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return float("inf")
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


# ------------------------------------------------------------------ GPU-marked tests

def part_pytest(args, out: Path):
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                       cwd=ROOT, capture_output=True, text=True, timeout=400)
    (out / "pytest_gpu.log").write_text(p.stdout + p.stderr)
    last = [l for l in p.stdout.splitlines() if " passed" in l or " failed" in l or " error" in l]
    row("pytest", "-m gpu tests", "ok" if p.returncode == 0 else "FAIL",
        f"{last[-1] if last else p.stdout[-200:]} ({time.time() - t0:.0f}s)")


# ------------------------------------------------------------------ node suite

def _node_worker(names):
    warnings.simplefilter("ignore")
    from tests.conformance.node_suite import load_cases, run_case
    cases = {c.name: c for c in load_cases(names)}
    out = []
    for n in names:
        tc = cases.get(n)
        if tc is None:
            continue
        try:
            st, det = run_case(tc, "CUDA")
        except Exception as e:  # a worker must never die on one case
            st, det = "crash", f"{type(e).__name__}: {e}"
        out.append((n, st, det.replace("\t", " ").replace("\n", " ")[:300]))
    return out


def part_node(args, out: Path):
    from tests.conformance.node_suite import load_cases
    names = [c.name for c in load_cases(args.filter or ())]
    chunks = [names[i::args.jobs * 4] for i in range(args.jobs * 4)]
    t0 = time.time()
    results = []
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for i, r in enumerate(pool.imap_unordered(_node_worker, chunks)):
            results += r
            if i % 8 == 0:
                print(f"  node suite: {len(results)}/{len(names)} ({time.time() - t0:.0f}s)", flush=True)
    results.sort()
    (out / "node_cuda.tsv").write_text("".join(f"{n}\t{s}\t{d}\n" for n, s, d in results))
    ok = sum(s == "ok" for _, s, _ in results)
    cpu_fail = set()
    xf = ROOT / "tests" / "conformance" / "node_xfail.txt"
    if xf.exists():
        cpu_fail = {l.split("\t")[0] for l in xf.read_text().splitlines() if l and not l.startswith("#")}
    cpu_ok = len(names) - len(cpu_fail & set(names))
    classes = {}
    for _, s, d in results:
        classes[s] = classes.get(s, 0) + 1
    classes["ok after value specialisation"] = sum(s == "ok" and d == "specialized" for _, s, d in results)
    classes["ok but no kernel ran (folded to constants)"] = sum(s == "ok" and d == "no kernel ran" for _, s, d in results)
    row("node", "CUDA pass count", f"{ok}/{len(names)}", f"(CPU reference passes {cpu_ok}) {classes} {time.time() - t0:.0f}s")


# ------------------------------------------------------------------ light models

def part_light(args, out: Path):
    import onnx
    from onnx import numpy_helper
    from nnc.onnx_backend import NncBackend
    from tests.conformance.test_light_models import LIGHT, MODELS, dummy_inputs
    for name in MODELS:
        t0 = time.time()
        try:
            model = onnx.load(str(LIGHT / f"{name}.onnx"))
            rep = NncBackend.prepare(model, "CUDA")
            feed = dummy_inputs(model)
            got = rep.run(feed)[0]
            exp = numpy_helper.to_array(onnx.load_tensor(str(LIGHT / f"{name}_output_0.pb")))
            ok = got.shape == exp.shape and np.allclose(got, exp, rtol=1e-3, atol=1e-5)
            row("light", name, "ok" if ok else "MISMATCH", f"rel {rel_err(got, exp):.2e} {time.time() - t0:.1f}s")
        except Exception as e:
            row("light", name, "FAIL", f"{type(e).__name__}: {str(e)[:200]}")
            traceback.print_exc()


# ------------------------------------------------------------------ own models

def torch_model(name: str):
    """(module, example inputs, input names) for one of the models, seeded (same weights each call)."""
    import torch
    torch.manual_seed(0)
    if name in ("resnet18", "resnet50"):
        import torchvision
        return getattr(torchvision.models, name)(weights=None).eval(), (torch.randn(1, 3, 224, 224),), ["input"]
    if name == "bert4":
        from transformers import BertConfig, BertModel
        cfg = BertConfig(hidden_size=768, num_hidden_layers=4, num_attention_heads=12, intermediate_size=3072,
                         vocab_size=30522, attn_implementation="eager")

        class Enc(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.bert = BertModel(cfg)

            def forward(self, ids, mask):
                return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

        ids = torch.randint(0, 30522, (1, 128))
        return Enc().eval(), (ids, torch.ones(1, 128, dtype=torch.int64)), ["input_ids", "attention_mask"]
    if name == "lstm2x512":
        class L(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lstm = torch.nn.LSTM(512, 512, num_layers=2)

            def forward(self, x):
                return self.lstm(x)[0]

        return L().eval(), (torch.randn(128, 1, 512),), ["x"]
    raise KeyError(name)


MODEL_NAMES = ["resnet18", "resnet50", "bert4", "lstm2x512"]
BUILDS = {"": True, "_unfused": False}  # out-dir suffix -> fuse (the fusion passes on or off)


def export_models(d: Path) -> dict:
    """name -> (onnx path, {input: array}, torch module, torch inputs)"""
    models = {}
    for name in MODEL_NAMES:
        mod, inputs, input_names = torch_model(name)
        p = d / f"{name}.onnx"
        torch_export(mod, inputs, p, input_names, output_names=None)
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(input_names, inputs)}
        models[name] = (p, feeds, mod, inputs)
    return models


def part_models(args, out: Path, models: dict):
    import onnxruntime as ort
    import nnc
    from nnc.driver import compile_model
    for name, (path, feeds, _, _) in models.items():
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng()
        fresh = {}
        for k, v in feeds.items():  # fresh random inputs of the exported kinds
            if v.dtype.kind == "f":
                fresh[k] = rng.standard_normal(v.shape).astype(v.dtype)
            elif k == "attention_mask":
                m = np.ones_like(v)
                m[:, -rng.integers(1, 16):] = 0
                fresh[k] = m
            else:
                fresh[k] = rng.integers(0, 30000, v.shape).astype(v.dtype)
        ref = sess.run(None, fresh)[0]
        for prec, tol, (suffix, fuse) in ((p, t, b) for p, t in (("fp32", 1e-3), ("fp16", 1e-2))
                                          for b in BUILDS.items()):
            od = out / "compiled" / f"{name}_{prec}{suffix}"
            try:
                t0 = time.time()
                compile_model(str(path), od, precision=prec, fuse=fuse)
                tc = time.time() - t0
                m = nnc.load(od)
                name0 = m.output_names[0]
                got = m.run(fresh, output="numpy")[name0]
                e = rel_err(got, ref)
                row("models", f"{name} {prec}{suffix}", "ok" if e <= tol else "MISMATCH",
                    f"rel {e:.2e} (tol {tol:g}), compile {tc:.1f}s, {len(m.plan.get('launches', []))} launches")
            except Exception as e:
                row("models", f"{name} {prec}{suffix}", "FAIL", f"{type(e).__name__}: {str(e)[:300]}")
                traceback.print_exc()


# ------------------------------------------------------------------ C++ embedding

def part_cpp(args, out: Path, models: dict):
    import nnc
    from nnc.driver import compile_model
    name = "resnet18"
    path, feeds, _, _ = models[name]
    od = out / "compiled" / f"{name}_fp32"
    if not (od / "plan.json").exists():
        compile_model(str(path), od)
    build = Path("/tmp/nnc_cpp_build")
    try:
        subprocess.run(["cmake", "-S", str(od), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release"],
                       check=True, capture_output=True, text=True)
        subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        row("cpp", "cmake build", "FAIL", (e.stdout + e.stderr)[-600:])
        return
    x = np.random.default_rng().standard_normal((1, 3, 224, 224)).astype(np.float32)
    io = Path("/tmp/nnc_cpp_io")
    io.mkdir(exist_ok=True)
    x.tofile(io / "input.bin")
    exe = next(build.glob("nnc_run_example*"), None) or build / "nnc_run_example"
    p = subprocess.run([str(exe), str(od), str(io / "input.bin"), "--out", str(io)], capture_output=True, text=True)
    if p.returncode != 0:
        row("cpp", "example runner", "FAIL", (p.stdout + p.stderr)[-600:])
        return
    m = nnc.load(od)
    py = m.run({"input": x}, output="numpy")[m.output_names[0]]
    outp = io / f"{m.output_names[0]}.bin"
    if not outp.exists():
        row("cpp", "example runner", "FAIL", f"no {outp.name} in {io}: {p.stdout[-300:]}")
        return
    cpp = np.fromfile(outp, dtype=np.float32).reshape(py.shape)
    e = rel_err(cpp, py)
    row("cpp", "cmake + nnc_run_example vs nnc.load", "ok" if e < 1e-6 else "MISMATCH", f"rel {e:.2e}")


# ------------------------------------------------------------------ timing

def bench_one(name: str, prec: str, out: Path) -> dict:
    """Times nnc, torch eager and torch.compile on one model in this process (CUDA events)."""
    import torch
    res = {"model": name, "precision": prec}
    od = out / "compiled" / f"{name}_{prec}"
    mod, inputs, input_names = torch_model(name)
    try:
        import cupy as cp
        import nnc
        dev = {k: cp.asarray(t.numpy()) for k, t in zip(input_names, inputs)}
        for suffix in BUILDS:
            m = nnc.load(Path(f"{od}{suffix}"))
            res[f"nnc{suffix}_ms"] = time_cuda(lambda: m.run(dev))
            res[f"nnc{suffix}_launches"] = len(m.plan["launches"])
    except Exception as e:
        res["nnc_error"] = f"{type(e).__name__}: {e}"[:200]
    tm = mod.to("cuda")
    ti = [t.to("cuda") for t in inputs]
    if prec == "fp16":
        tm = tm.half()
        ti = [t.half() if t.is_floating_point() else t for t in ti]
    with torch.no_grad():
        res["eager_ms"] = time_cuda(lambda: tm(*ti))
        try:
            cm = torch.compile(tm)
            res["compile_ms"] = time_cuda(lambda: cm(*ti), warmup=3)
        except Exception as e:
            res["compile_error"] = f"{type(e).__name__}: {e}"[:200]
    return res


def part_bench(args, out: Path, models: dict):
    for name in models:
        for prec in ("fp32", "fp16"):
            p = subprocess.run([sys.executable, __file__, "--bench-one", name, prec, "--out", str(out)],
                               capture_output=True, text=True, timeout=240)
            line = next((l for l in p.stdout.splitlines() if l.startswith("BENCH ")), None)
            if line is None:
                row("bench", f"{name} {prec}", "FAIL", (p.stdout + p.stderr)[-300:])
                continue
            r = json.loads(line[6:])
            fmt = lambda k: f"{r[k]:.3f} ms" if k in r else "n/a"  # noqa: E731
            row("bench", f"{name} {prec}", f"nnc {fmt('nnc_ms')} ({r.get('nnc_launches')} launches)",
                f"unfused {fmt('nnc_unfused_ms')} ({r.get('nnc_unfused_launches')}), "
                f"eager {fmt('eager_ms')}, torch.compile {fmt('compile_ms')}"
                + "".join(f"; {k}: {r[k]}" for k in r if k.endswith("_error")))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/nnc_gpu"))
    ap.add_argument("--parts", default="pytest,node,light,models,cpp,bench")
    ap.add_argument("--jobs", type=int, default=14)
    ap.add_argument("--filter", nargs="*")
    ap.add_argument("--bench-one", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bench_one:
        print("BENCH " + json.dumps(bench_one(*args.bench_one, Path(args.out))), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    models = {}
    if {"models", "cpp", "bench"} & set(parts):
        d = Path("/tmp/nnc_models")
        d.mkdir(exist_ok=True)
        try:
            models = export_models(d)
        except Exception as e:
            row("models", "export", "FAIL", f"{type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc()
    for p in parts:
        t0 = time.time()
        try:
            if p == "pytest":
                part_pytest(args, out)
            elif p == "node":
                part_node(args, out)
            elif p == "light":
                part_light(args, out)
            elif p == "models":
                part_models(args, out, models)
            elif p == "cpp":
                part_cpp(args, out, models)
            elif p == "bench":
                part_bench(args, out, models)
        except Exception as e:
            row(p, "part", "FAIL", f"{type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc()
        print(f"-- part {p} took {time.time() - t0:.0f}s", flush=True)
    (out / "summary.json").write_text(json.dumps(ROWS, indent=1))
    print("\n==== summary ====")
    for r in ROWS:
        print(" | ".join(str(x) for x in r))


if __name__ == "__main__":
    main()
