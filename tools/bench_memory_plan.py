"""Memory-plan figures for the light models and the examples, at fp32 and fp16, full pipeline.

For each build: ONNX nodes, launches per run, and plan.json memory: arena_bytes, peak_live_bytes
(the lower bound of any placement for the final schedule), arena/peak, naive_bytes (every temp in
its own slot), fused_away_bytes, the placement method that won, and the bytes written in place.
Lowering runs on the CPU (codegen.lower.lower for sm_90, the kernels are rendered, not compiled).

    python tools/bench_memory_plan.py [--models light_resnet50,tiny_cnn] [--precisions fp32,fp16]
        [--json out.json]

The big light models (AlexNet, VGG-19, ZFNet-512) take a few seconds each to fold.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import onnx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from nnc.codegen.lower import lower
from nnc.codegen.options import LowerOptions
from nnc.codegen.target import resolve_target
from nnc.driver import pipeline_passes
from nnc.onnx_import import import_model, parse_shapes
from nnc.pipeline import run_passes

ROOT = Path(__file__).resolve().parents[1]
LIGHT = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light"
EXAMPLE_SHAPES = {"tiny_cnn": "input:1x3x32x32"}


def model_paths() -> dict[str, tuple[Path, str]]:
    out = {p.stem: (p, "") for p in sorted(LIGHT.glob("light_*.onnx"))}
    for p in sorted((ROOT / "examples").glob("*.onnx")):
        out[p.stem] = (p, EXAMPLE_SHAPES.get(p.stem, ""))
    return out


def measure(path: Path, shapes: str, precision: str) -> dict:
    model = onnx.load(str(path))
    t0 = time.perf_counter()
    m = import_model(model, shapes=parse_shapes(shapes))
    run_passes(m, pipeline_passes(precision))
    plan = lower(m, LowerOptions(resolve_target("sm_90"), precision, False))
    mem = plan.memory
    return {"model": path.stem, "precision": precision, "nodes": len(model.graph.node),
            "launches": len(plan.launches), "arena": mem["arena_bytes"], "peak": mem["peak_live_bytes"],
            "naive": mem["naive_bytes"], "fused_away": mem.get("fused_away_bytes", 0),
            "inplace": mem.get("inplace_bytes", 0), "method": getattr(plan, "memory_method", ""),
            "seconds": time.perf_counter() - t0}


def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="", help="comma-separated names (default: all)")
    ap.add_argument("--precisions", default="fp32,fp16")
    ap.add_argument("--json", default="", help="also write the rows here")
    a = ap.parse_args(argv)
    paths = model_paths()
    names = [n for n in a.models.split(",") if n] or list(paths)
    unknown = [n for n in names if n not in paths]
    if unknown:
        print(f"unknown models {unknown}; known: {', '.join(paths)}", file=sys.stderr)
        return 1
    precs = [p for p in a.precisions.split(",") if p]
    rows = []
    con = Console(width=None if sys.stdout.isatty() else 150)
    with Progress(console=con, transient=True) as prog:
        task = prog.add_task("planning", total=len(names) * len(precs))
        for n in names:
            for p in precs:
                prog.update(task, description=f"{n} {p}")
                rows.append(measure(*paths[n], p))
                prog.advance(task)
    t = Table(title="memory plan (MiB)")
    for c in ("model", "prec", "nodes", "launches", "arena", "peak_live", "arena/peak", "naive", "fused_away",
              "in-place", "method", "s"):
        t.add_column(c, justify="left" if c in ("model", "prec", "method") else "right")
    for r in rows:
        ratio = r["arena"] / r["peak"] if r["peak"] else 1.0
        t.add_row(r["model"], r["precision"], str(r["nodes"]), str(r["launches"]), mib(r["arena"]), mib(r["peak"]),
                  f"[red]{ratio:.3f}[/red]" if ratio > 1.05 else f"{ratio:.3f}", mib(r["naive"]),
                  mib(r["fused_away"]), mib(r["inplace"]), r["method"], f"{r['seconds']:.1f}")
    con.print(t)
    # the short table last: one line per build, bytes exact
    print(f"{'model':<24} {'prec':<5} {'nodes':>5} {'launch':>6} {'arena_B':>11} {'peak_B':>11} {'ratio':>6}")
    for r in rows:
        ratio = r["arena"] / r["peak"] if r["peak"] else 1.0
        print(f"{r['model']:<24} {r['precision']:<5} {r['nodes']:>5} {r['launches']:>6} {r['arena']:>11} "
              f"{r['peak']:>11} {ratio:>6.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
