"""The issue's LoadGen targets on the GPU: one model (default ResNet-50 fp16), nnc and
torch.compile each driven through the same MLPerf scenario by the same SUT (nnc.loadgen_sut) and
LoadGen settings, in one process on one GPU.

    python tools/loadgen_vs_torch.py --model resnet50 --batch 32 --scenario offline --out /tmp/lg
    python tools/loadgen_vs_torch.py --model resnet50 --batch 1 --scenario server --latency-bound-ms 15 --out /tmp/lg
    python tools/loadgen_vs_torch.py --batch 16,32,64 --contexts 1,2 --scenario offline --out /tmp/lg  # a sweep

nnc: the compiled model on the cuda backend, `--contexts` execution contexts (run_async
pipelined). torch: torch.compile(mode="reduce-overhead") of the same torchvision module, on
--torch-contexts threads (default 1), each on its own torch CUDA stream; inputs converted from the
same numpy samples, outputs copied back to the host (as nnc's are). Prints both tables and one
JSON row per system (LoadGen's logs under OUT/<system>/).

Needs a GPU, torch and torchvision; written without one (not yet run).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def torch_system(mod, plan: dict, half: bool):
    import torch
    from nnc.loadgen_sut import CallableSystem
    tm = mod.to("cuda").eval()
    tm = tm.half() if half else tm.float()
    torch._dynamo.reset()
    fn = torch.compile(tm, mode="reduce-overhead")
    names = [t["name"] for t in plan["inputs"]]
    out_name = plan["outputs"][0]["name"]

    def make_runner():
        stream = torch.cuda.Stream()

        def run(feed):
            with torch.no_grad(), torch.cuda.stream(stream):
                xs = [torch.from_numpy(feed[n]).to("cuda", non_blocking=False) for n in names]
                xs = [(x.half() if half else x) if x.is_floating_point() else x for x in xs]
                y = fn(*xs)
                y = y[0] if isinstance(y, (tuple, list)) else y
                host = y.float().cpu().numpy()  # synchronizes this stream
            return {out_name: host}
        return run
    return CallableSystem(plan, make_runner, backend="torch.compile")


def run_batch(a, batch: int) -> list:
    """Compile the model at this batch (nnc, --tune-budget) and run each of --systems through it,
    nnc once per --contexts entry."""
    from gpu_models import WORK, export
    from nnc.api import CompileOptions
    from nnc.driver import compile_model
    from nnc.loadgen_sut import ScenarioOptions, format_text, run_scenario
    from nnc.plan_file import read_plan
    path, _, mod, _ = export(a.model, batch)
    od = WORK / f"{a.model}_b{batch}_{a.precision}_loadgen"
    if not (od / "plan.json").exists():
        compile_model(str(path), od, options=CompileOptions(precision=a.precision, tune_budget=a.tune_budget))
    runs = []
    for system in a.systems.split(","):
        if system == "nnc":
            runs += [("nnc", int(c)) for c in str(a.contexts).split(",")]
        elif system == "torch":
            # torch.compile(mode="reduce-overhead")'s CUDA graph trees are not meant to be shared
            # across threads: its contexts are --torch-contexts (default 1)
            runs.append(("torch", a.torch_contexts))
        else:
            raise SystemExit(f"--systems: unknown {system!r} (nnc, torch)")
    rows = []
    for system, contexts in runs:
        opts = ScenarioOptions(a.scenario, backend="cuda", duration_s=a.duration_s, target_qps=a.target_qps,
                               latency_bound_ms=a.latency_bound_ms, contexts=contexts,
                               log_dir=str(a.out / f"{system}_b{batch}_c{contexts}"))
        peer = torch_system(mod, read_plan(od), a.precision == "fp16") if system == "torch" else None
        r = run_scenario(od, opts, system=peer)
        sys.stdout.write(format_text(r))
        row = {"system": system, "model": a.model, "batch": batch, "precision": a.precision, **r.to_json()}
        rows.append(row)
        print("ROW " + json.dumps(row), flush=True)
    return rows


def _summary_line(r: dict) -> str:
    pts = r.get("points") or [{}]
    best = pts[r["best"]] if r.get("best") is not None else pts[-1]
    return (f"{r['system']:<6} {r['batch']:>5} {r['contexts']:>8}  {best.get('result', '?'):<8} "
            f"{best.get('metric', '?')} = {best.get('value', float('nan')):.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", default="1", help="one batch, or a comma list to sweep (offline: the best batch)")
    ap.add_argument("--tune-budget", type=float, default=25.0, help="nnc's timing-based selection, seconds per build")
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16"])
    ap.add_argument("--scenario", default="offline", choices=["single-stream", "multi-stream", "server", "offline"])
    ap.add_argument("--latency-bound-ms", type=float)
    ap.add_argument("--target-qps", type=float)
    ap.add_argument("--duration-s", type=float, default=20.0)
    ap.add_argument("--contexts", default="2", help="nnc's execution contexts; a comma list runs nnc once per entry")
    ap.add_argument("--torch-contexts", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--systems", default="nnc,torch", help="comma list of nnc, torch")
    a = ap.parse_args()
    from gpu_models import WORK
    WORK.mkdir(exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for batch in [int(b) for b in str(a.batch).split(",")]:
        rows += run_batch(a, batch)
        (a.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")  # kept if a later batch dies
    print(f"\n{a.scenario}: system batch contexts  result")
    for r in rows:
        print(_summary_line(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
