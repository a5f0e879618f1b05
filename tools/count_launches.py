"""Launch accounting: ONNX nodes against CUDA launches per model, fused and unfused.

    python tools/count_launches.py                       # the nine light_* models + the real graphs
    python tools/count_launches.py light_resnet50 resnet50 --precision fp16 --by-kernel
    python tools/count_launches.py path/to/model.onnx --json

For each model and precision: import, the pass pipeline `nnc compile` runs (compiler/driver.py
`pipeline_passes(precision, fuse)`, fused and with `--no-fuse`), then the CUDA lowering
(codegen/lower.py) at batch 1 for sm_90 -- lowering only, no kernel is rendered into a cubin (no
NVRTC), so a model takes seconds. Prints a markdown table: ONNX nodes, launches per run fused /
unfused, the load-time init-phase launches (codegen/init_phase.py), and the fused plan's arena and
peak-live bytes. `--by-kernel` adds the fused plan's launches per kernel family (the template a
kernel was rendered from, e.g. gemm_tc, conv_igemm, direct_conv; memcpy/readback by kind).

Model names: `light_<x>` is onnx's backend test model of that name; resnet50, mobilenet_v2,
bert_base, fcn_resnet50 are tests/models/graphs/<name>.graph.onnx refilled in memory with seeded
weights (tools/graph_models.py); anything else is a path to an .onnx file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python tools/count_launches.py` from anywhere: tools.graph_models
    sys.path.insert(0, str(ROOT))

GRAPHS = ROOT / "tests" / "models" / "graphs"


def light_dir() -> Path:
    import onnx
    return Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light"


def light_models() -> list[str]:
    return sorted(p.stem for p in light_dir().glob("light_*.onnx"))


def graph_models() -> list[str]:
    return sorted(p.name[: -len(".graph.onnx")] for p in GRAPHS.glob("*.graph.onnx"))


def load_model(name: str):
    """The onnx.ModelProto a model name stands for (see the module docstring)."""
    import onnx
    if name.startswith("light_") and (light_dir() / f"{name}.onnx").exists():
        return onnx.load(str(light_dir() / f"{name}.onnx"))
    g = GRAPHS / f"{name}.graph.onnx"
    if g.exists():
        from tools.graph_models import load_graph_model
        return load_graph_model(g)
    p = Path(name)
    if p.suffix == ".onnx" and p.exists():
        return onnx.load(str(p))
    raise SystemExit(f"count_launches: unknown model {name!r} (not a light_* model, a graph in "
                     f"{GRAPHS}, or an .onnx file)")


@dataclass(frozen=True)
class Count:
    """One lowered plan's launch numbers."""
    launches: int  # every run (not the split-K counter zeroing copy: splitk_zeroing)
    init_launches: int  # once, at load
    arena_bytes: int
    peak_live_bytes: int
    persistent_bytes: int
    by_kernel: dict = field(default_factory=dict)  # family -> launches per run
    seconds: float = 0.0


def family(plan, launch) -> str:
    """The kernel family of a launch: its template's stem (memcpy/readback: the launch kind)."""
    if launch.kind != "kernel":
        return launch.kind
    k = plan.kernels.get(launch.kernel)
    t = (k.template if k is not None else "") or ""
    return t.split(".")[0] or (launch.kernel or "?")


def splitk_zeroing(launch) -> bool:
    """The copy that zeroes a run's split-K tile counters (codegen/kernels/gemm_lowering.py
    splitk_scratch): part of split-K's reduction, which the issue's launch budgets do not count."""
    return (launch.kind == "memcpy" and bool(launch.args)
            and getattr(launch.args[0], "name", "").endswith("splitk_tile_counters"))


def count_plan(plan) -> Count:
    mem = plan.memory
    runs = [l for l in plan.launches if not splitk_zeroing(l)]
    return Count(len(runs), len(plan.init_launches), int(mem.get("arena_bytes", 0)),
                 int(mem.get("peak_live_bytes", 0)), int(mem.get("persistent_bytes", 0)),
                 dict(Counter(family(plan, l) for l in runs).most_common()))


def lower_model(model, precision: str, fuse: bool, arch: str = "sm_90"):
    """The plan `nnc compile --precision P [--no-fuse]` would generate code from (no NVRTC)."""
    from nnc.codegen.lower import lower
    from nnc.driver import pipeline_passes
    from nnc.ir.verify import verify
    from nnc.onnx_import import import_model
    from nnc.pipeline import Pipeline
    m = import_model(model, shapes={})
    verify(m)
    Pipeline(pipeline_passes(precision, fuse), False, None).run(m)
    return lower(m, {"arch": arch, "precision": precision})


def count(model, precision: str, fuse: bool) -> Count:
    t = time.perf_counter()
    c = count_plan(lower_model(model, precision, fuse))
    return Count(**{**asdict(c), "seconds": round(time.perf_counter() - t, 2)})


def batch1(model) -> None:
    """Symbolic (or zero) leading dims of the graph inputs bound to 1: the batch-1 plan."""
    inits = {i.name for i in model.graph.initializer}
    for x in model.graph.input:
        if x.name in inits:
            continue
        for d in x.type.tensor_type.shape.dim:
            if not d.HasField("dim_value") or d.dim_value <= 0:
                d.Clear()
                d.dim_value = 1


def measure(names, precisions, progress=None) -> list[dict]:
    rows = []
    for name in names:
        model = load_model(name)
        batch1(model)
        nodes = len(model.graph.node)
        for prec in precisions:
            row = {"model": name, "precision": prec, "onnx_nodes": nodes}
            for fuse in (True, False):
                c = count(model, prec, fuse)
                row["fused" if fuse else "unfused"] = asdict(c)
                if progress is not None:
                    progress(name, prec, fuse, c)
            rows.append(row)
    return rows


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def markdown(rows, by_kernel: bool = False) -> str:
    head = ["model", "prec", "ONNX nodes", "launches fused", "unfused", "init (fused)",
            "arena MB", "peak live MB"]
    if by_kernel:
        head.append("fused launches by kernel")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        f, u = r["fused"], r["unfused"]
        cells = [r["model"], r["precision"], str(r["onnx_nodes"]), str(f["launches"]), str(u["launches"]),
                 str(f["init_launches"]), _mb(f["arena_bytes"]), _mb(f["peak_live_bytes"])]
        if by_kernel:
            cells.append(", ".join(f"{k} {v}" for k, v in f["by_kernel"].items()))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", help="model names or .onnx paths (default: light_* and the graphs)")
    ap.add_argument("--precision", action="append", choices=["fp32", "fp16", "bf16"],
                    help="repeatable (default: fp16 and fp32)")
    ap.add_argument("--by-kernel", action="store_true", help="per-kernel-family breakdown of the fused plan")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    ap.add_argument("--no-graphs", action="store_true", help="default set without tests/models/graphs")
    args = ap.parse_args(argv)
    names = args.models or light_models() + ([] if args.no_graphs else graph_models())
    precisions = args.precision or ["fp16", "fp32"]
    from rich.progress import Progress
    with Progress(transient=True, disable=args.json or not sys.stderr.isatty()) as bar:
        task = bar.add_task("lowering", total=len(names) * len(precisions) * 2)

        def tick(name, prec, fuse, c):
            bar.update(task, advance=1, description=f"{name} {prec} {'fused' if fuse else 'unfused'}")
        rows = measure(names, precisions, tick)
    print(json.dumps(rows, indent=1) if args.json else markdown(rows, args.by_kernel))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
