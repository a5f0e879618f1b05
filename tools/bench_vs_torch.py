"""nnc against PyTorch on the GPU machine, one model per call, resumable (issue 9's benchmark).

    python tools/bench_vs_torch.py --model resnet50 --results benchmarks/h200.jsonl [--batches 1,32]
        [--precisions fp16,fp32] [--peers eager,compile,reduce_overhead,nnc_unfused] [--out $OUT]
    python tools/bench_vs_torch.py --report --results benchmarks/h200.jsonl --md docs/benchmarks.md [--png F]

One row per (model, batch, precision): nnc (`nnc.load` defaults) and every peer timed in the SAME
process on the SAME GPU: torch eager, torch.compile (default mode) and torch.compile(mode=
"reduce-overhead", CUDA graphs), all with CUDA events, warm-up first, median of the runs
(tools/cuda_timing.py). Inputs are fresh random data (never zeros). Each row carries the date, GPU,
driver, torch/cupy versions and the nnc commit, and ratios are only ever formed inside a row, so
numbers from another day or GPU never mix into one.

torch.compile costs 7-17 s a build, so the script does one model per call and appends to the
results file (JSON lines); a row already there for the same model, batch, precision, GPU and commit
is skipped, so a call cut by its time limit resumes where it stopped. Carry the results file back
into the checkout between calls (it lives in the repository, e.g. benchmarks/).

--report turns the results into a markdown table (nnc ms, peers ms, nnc speedup over each) and,
where matplotlib is installed, a PNG of the speedups over torch.compile reduce-overhead.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

# the matrix: fp16 everywhere at batch 1 and 32, fp32 too for ResNet-50 and BERT-base
MATRIX = {
    "resnet50": ("fp16", "fp32"),
    "mobilenet_v2": ("fp16",),
    "bert_base": ("fp16", "fp32"),
    "vit_b_16": ("fp16",),
    "lstm_2x512": ("fp16",),
}
PEERS = ("eager", "compile", "reduce_overhead")  # and "nnc_unfused": nnc with the fusion passes off


def environment(commit: str = "") -> dict:
    import cupy
    import torch
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        driver = "?"
    if not commit:  # the device's copy of the tree may have no .git: pass --commit there
        try:
            commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True, timeout=20).stdout.strip() or "?"
        except Exception:
            commit = "?"
    return {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
            "driver": driver, "torch": torch.__version__, "cupy": cupy.__version__, "nnc_commit": commit}


def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def bench_one(name: str, batch: int, prec: str, peers, tune_budget=None) -> dict:
    import cupy as cp
    import torch
    import nnc
    from cuda_timing import time_cuda
    from gpu_models import WORK, export, fresh_inputs
    from nnc.api import CompileOptions
    from nnc.driver import compile_model
    r: dict = {}
    WORK.mkdir(exist_ok=True)
    path, feeds, mod, _ = export(name, batch)
    x = fresh_inputs(feeds)
    for key, fuse in (("nnc", True), ("nnc_unfused", False)):
        if key == "nnc_unfused" and "nnc_unfused" not in peers:
            continue
        try:
            # nnc's defaults (timing-based selection when a GPU is present), bounded by --tune-budget;
            # the unfused peer is the same build with the fusion passes off (issue 7's ratio)
            od = WORK / f"{name}_b{batch}_{prec}_bench{'' if fuse else '_unfused'}"
            t0 = time.time()
            compile_model(str(path), od, options=CompileOptions(precision=prec, tune_budget=tune_budget, fuse=fuse))
            compile_s = time.time() - t0
            m = nnc.load(od)
            if fuse:
                r["nnc_tuning"] = {k: v for k, v in (m.plan.get("tuning") or {}).items()
                                   if not isinstance(v, (list, dict))}
            dev = {k: cp.asarray(v) for k, v in x.items()}
            r[f"{key}_ms"] = time_cuda(lambda: m.run(dev))
            r[f"{key}_compile_s"] = round(compile_s, 1)
            r[f"{key}_launches"] = len(m.plan.get("launches", []))
            del m
        except Exception as e:
            r[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            traceback.print_exc()
    half = prec == "fp16"
    # fp32 rows compare like with like: nnc's fp32 is strict fp32, so cuDNN's TF32 convs are off
    torch.backends.cudnn.allow_tf32 = half
    torch.backends.cuda.matmul.allow_tf32 = False
    r["torch_tf32"] = half
    tm = mod.to("cuda")
    tm = tm.half() if half else tm.float()
    ti = [torch.from_numpy(x[k]).to("cuda") for k in feeds]
    ti = [(t.half() if half else t.float()) if t.is_floating_point() else t for t in ti]
    with torch.no_grad():
        for peer in (p for p in peers if p != "nnc_unfused"):
            try:
                if peer == "eager":
                    fn = tm
                else:
                    torch._dynamo.reset()
                    fn = torch.compile(tm, mode="reduce-overhead" if peer == "reduce_overhead" else None)
                r[f"{peer}_ms"] = time_cuda(lambda: fn(*ti), warmup=5 if peer != "eager" else 10)
            except Exception as e:
                r[f"{peer}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                traceback.print_exc()
    del tm
    torch.cuda.empty_cache()
    return r


def run(a) -> int:
    results = Path(a.results)
    env = environment(a.commit)
    done = {(r["model"], r["batch"], r["precision"]) for r in load_rows(results)
            if r.get("gpu") == env["gpu"] and r.get("nnc_commit") == env["nnc_commit"]}
    precisions = a.precisions.split(",") if a.precisions else MATRIX[a.model]
    peers = a.peers.split(",")
    new = []
    for batch in (int(b) for b in a.batches.split(",")):
        for prec in precisions:
            if (a.model, batch, prec) in done:
                print(f"skip {a.model} b{batch} {prec}: already in {results}", flush=True)
                continue
            row = {"model": a.model, "batch": batch, "precision": prec, **env}
            row.update(bench_one(a.model, batch, prec, peers, a.tune_budget))
            print("ROW " + json.dumps(row), flush=True)
            results.parent.mkdir(parents=True, exist_ok=True)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            new.append(row)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / results.name).write_text(results.read_text() if results.exists() else "")
    print(markdown(new))
    return 0


def _ms(r, k) -> str:
    return f"{r[k]:.3f}" if k in r else "—"


def _ratio(r, peer) -> str:
    if "nnc_ms" in r and f"{peer}_ms" in r:
        return f"{r[peer + '_ms'] / r['nnc_ms']:.2f}×"
    return "—"


def markdown(rows: list[dict]) -> str:
    head = ("| model | batch | prec | nnc | eager | torch.compile | compile+graphs | nnc vs eager | "
            "nnc vs compile | nnc vs compile+graphs | nnc unfused (fused speedup) | GPU, date, commit |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    lines = []
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['precision']} | {_ms(r, 'nnc_ms')} | {_ms(r, 'eager_ms')} | "
                     f"{_ms(r, 'compile_ms')} | {_ms(r, 'reduce_overhead_ms')} | {_ratio(r, 'eager')} | "
                     f"{_ratio(r, 'compile')} | {_ratio(r, 'reduce_overhead')} | "
                     f"{_ms(r, 'nnc_unfused_ms')} ({_ratio(r, 'nnc_unfused')}) | "
                     f"{r.get('gpu', '?')}, {r.get('date', '?')}, {r.get('nnc_commit', '?')} |")
    errors = [f"- {r['model']} b{r['batch']} {r['precision']}: {k}: {v}" for r in rows for k, v in r.items()
              if k.endswith("_error")]
    return head + "\n".join(lines) + ("\n\nErrors:\n" + "\n".join(errors) if errors else "") + "\n"


def report(a) -> int:
    # --report may read several days' files, comma-separated, in order
    rows = [r for f in a.results.split(",") for r in load_rows(Path(f))]
    text = markdown(rows)
    if a.md:
        env = rows[-1] if rows else {}
        Path(a.md).write_text(
            "# nnc against PyTorch\n\nWritten by `tools/bench_vs_torch.py --report` from "
            f"`{a.results}`. Times are medians in ms of CUDA-event timings; every row's peers ran in the "
            "same process on the same GPU as its nnc number, and a ratio is only formed inside a row "
            "(> 1× means nnc is faster).\n"
            f"Last row: {env.get('gpu', '?')}, driver {env.get('driver', '?')}, torch {env.get('torch', '?')}, "
            f"cupy {env.get('cupy', '?')}.\n\n" + text)
    print(text)
    if a.png:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("no PNG: matplotlib is not installed (it is optional)", file=sys.stderr)
            return 0
        keep = [r for r in rows if "nnc_ms" in r and "reduce_overhead_ms" in r]
        labels = [f"{r['model']}\nb{r['batch']} {r['precision']}" for r in keep]
        vals = [r["reduce_overhead_ms"] / r["nnc_ms"] for r in keep]
        fig, ax = plt.subplots(figsize=(max(6, len(keep) * 0.9), 4))
        ax.bar(range(len(keep)), vals)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(keep)), labels, fontsize=7)
        ax.set_ylabel("speedup of nnc over torch.compile (reduce-overhead)")
        fig.tight_layout()
        fig.savefig(a.png, dpi=120)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, help="JSON-lines results file (appended to); --report: a comma list of them")
    ap.add_argument("--model", choices=sorted(MATRIX))
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--precisions", default="", help="default: the model's row of the matrix")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--out", help="also copy the results file here (the device's $OUT)")
    ap.add_argument("--tune-budget", type=float, default=None, help="seconds of nnc tuning per build")
    ap.add_argument("--commit", default="", help="the nnc commit measured (default: git HEAD)")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--md")
    ap.add_argument("--png")
    a = ap.parse_args()
    if a.report:
        return report(a)
    if not a.model:
        ap.error("--model is required unless --report")
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
