"""The issue's model table on the GPU machine: exports torchvision / transformers models with
torch.onnx, compiles them with nnc (fused and unfused), checks them against onnxruntime on fresh
random inputs and times them against torch eager and torch.compile in the same process.

    python tools/gpu_models.py --out $OUT --part check [--models resnet50,bert_base] [--batches 1]
    python tools/gpu_models.py --out $OUT --part bench [--models resnet50,bert_base] [--batches 1,32]

check: per model and batch, fp32 (rel-L2 1e-3) and fp16 (1e-2) fused builds, plus the unfused fp16
       build, against onnxruntime (CPU) on the fp32 export; launches per run; compile seconds.
bench: fp16, median of CUDA-event times (warm-up first): nnc fused, nnc unfused, torch eager,
       torch.compile (mode "reduce-overhead": CUDA graphs), all in this process on this GPU.
Prints one line per result as it goes and a short table last; writes results.json under --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from export_graphs import torch_export, torch_model  # noqa: E402
from cuda_timing import time_cuda  # noqa: E402

ROWS: list[dict] = []
WORK = Path("/tmp/nnc_gpu_models")


def row(**r):
    ROWS.append(r)
    print("ROW " + json.dumps(r), flush=True)


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape or not np.isfinite(got).all():
        return float("inf")
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def export(name: str, batch: int) -> tuple[Path, dict, object, tuple]:
    mod, inputs, names = torch_model(name, batch)
    p = WORK / f"{name}_b{batch}.onnx"
    if not p.exists():
        torch_export(mod, inputs, p, names)
    return p, {n: t.numpy() for n, t in zip(names, inputs)}, mod, inputs


def fresh_inputs(feeds: dict) -> dict:
    rng = np.random.default_rng()
    out = {}
    for k, v in feeds.items():
        if v.dtype.kind == "f":
            out[k] = rng.standard_normal(v.shape).astype(v.dtype)
        elif k == "attention_mask":
            m = np.ones_like(v)
            m[:, -int(rng.integers(1, 16)):] = 0
            out[k] = m
        else:
            out[k] = rng.integers(0, 30000, v.shape).astype(v.dtype)
    return out


def build(path: Path, name: str, batch: int, prec: str, fuse: bool) -> tuple[Path, float]:
    from nnc.driver import compile_model
    od = WORK / f"{name}_b{batch}_{prec}{'' if fuse else '_unfused'}"
    t0 = time.time()
    if not (od / "plan.json").exists():
        compile_model(str(path), od, precision=prec, fuse=fuse)
    return od, time.time() - t0


def torch_fp16_error(mod, feeds, x, ref) -> float:
    """rel-L2 of torch's own fp16 run (eager, CUDA) against the fp32 reference: what fp16 storage
    costs on this model with these random weights, the yardstick for nnc's fp16 error."""
    import copy

    import torch
    try:
        tm = copy.deepcopy(mod).to("cuda").half()
        ti = [torch.from_numpy(x[k]).to("cuda") for k in feeds]
        ti = [t.half() if t.is_floating_point() else t for t in ti]
        with torch.no_grad():
            out = tm(*ti)
        return rel_err(out.float().cpu().numpy(), ref)
    except Exception as e:  # the yardstick is optional, the check is not
        print(f"torch fp16 run failed: {type(e).__name__}: {e}", flush=True)
        return float("nan")


def part_check(models, batches):
    import onnxruntime as ort
    import nnc
    for name in models:
        for batch in batches:
            try:
                path, feeds, mod, _ = export(name, batch)
                sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                x = fresh_inputs(feeds)
                ref = sess.run(None, x)[0]
                torch_fp16 = torch_fp16_error(mod, feeds, x, ref)  # how fp16 itself does on this model
                for prec, tol, fuse in (("fp32", 1e-3, True), ("fp16", 1e-2, True), ("fp16", 1e-2, False)):
                    build_name = f"{prec}{'' if fuse else ' unfused'}"
                    try:
                        od, tc = build(path, name, batch, prec, fuse)
                        m = nnc.load(od)
                        got = m.run(x, output="numpy")[m.output_names[0]]
                        e = rel_err(got, ref)
                        row(part="check", model=name, batch=batch, build=build_name, ok=e <= tol, rel=e,
                            launches=len(m.plan.get("launches", [])), compile_s=round(tc, 1),
                            max_abs_ref=float(np.abs(ref).max()), torch_fp16_rel=torch_fp16)
                    except Exception as e:
                        row(part="check", model=name, batch=batch, build=build_name, ok=False,
                            error=f"{type(e).__name__}: {str(e)[:300]}")
                        traceback.print_exc()
            except Exception as e:
                row(part="check", model=name, batch=batch, build="export", ok=False,
                    error=f"{type(e).__name__}: {str(e)[:300]}")
                traceback.print_exc()


def part_bench(models, batches, compile_models):
    import cupy as cp
    import torch
    import nnc
    for name in models:
        for batch in batches:
            r = {"part": "bench", "model": name, "batch": batch}
            try:
                path, feeds, mod, inputs = export(name, batch)
                x = fresh_inputs(feeds)
                dev = {k: cp.asarray(v) for k, v in x.items()}
                for fuse, key in ((True, "nnc"), (False, "nnc_unfused")):
                    od, _ = build(path, name, batch, "fp16", fuse)
                    m = nnc.load(od)
                    r[key + "_ms"] = time_cuda(lambda m=m: m.run(dev))
                    r[key + "_launches"] = len(m.plan.get("launches", []))
            except Exception as e:
                r["nnc_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                traceback.print_exc()
            try:
                tm = mod.to("cuda").half()
                ti = [torch.from_numpy(x[k]).to("cuda") for k in feeds]
                ti = [t.half() if t.is_floating_point() else t for t in ti]
                with torch.no_grad():
                    r["eager_ms"] = time_cuda(lambda tm=tm: tm(*ti))
                    if name in compile_models:
                        cm = torch.compile(tm, mode="reduce-overhead")
                        r["compile_ms"] = time_cuda(lambda: cm(*ti), warmup=5)
                torch.cuda.empty_cache()
            except Exception as e:
                r["torch_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                traceback.print_exc()
            row(**r)


def table():
    print("\n==== summary ====")
    for r in ROWS:
        if r["part"] == "check":
            extra = (f"rel {r['rel']:.2e} (torch fp16 {r.get('torch_fp16_rel', float('nan')):.2e}), "
                     f"{r['launches']} launches, compile {r['compile_s']}s"
                     if "rel" in r else r.get("error", ""))
            print(f"check | {r['model']} b{r['batch']} {r['build']} | {'ok' if r['ok'] else 'FAIL'} | {extra}")
        else:
            f = lambda k: f"{r[k]:.3f}" if k in r else "-"  # noqa: E731
            print(f"bench | {r['model']} b{r['batch']} fp16 | nnc {f('nnc_ms')} ({r.get('nnc_launches')}) | "
                  f"unfused {f('nnc_unfused_ms')} ({r.get('nnc_unfused_launches')}) | eager {f('eager_ms')} | "
                  f"compile+graphs {f('compile_ms')}"
                  + "".join(f" | {k}: {r[k]}" for k in r if k.endswith("_error")))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--part", choices=["check", "bench"], required=True)
    ap.add_argument("--models", default="resnet50,mobilenet_v2,vit_b_16,fcn_resnet50,bert_base,gpt2")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--compile-models", default="resnet50,bert_base,mobilenet_v2",
                    help="models also timed under torch.compile (each costs a minute of compiling)")
    a = ap.parse_args()
    WORK.mkdir(exist_ok=True)
    models, batches = a.models.split(","), [int(b) for b in a.batches.split(",")]
    try:
        if a.part == "check":
            part_check(models, batches)
        else:
            part_bench(models, batches, set(a.compile_models.split(",")))
    finally:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{a.part}.json").write_text(json.dumps(ROWS, indent=1))
        table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
