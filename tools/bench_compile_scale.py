#!/usr/bin/env python3
"""How `nnc compile` scales with graph size: every compiler stage timed on chains of N blocks.

    python tools/bench_compile_scale.py [--blocks 1000,3000,6667,10000] [--no-nvrtc] [--e2e]

A block is MatMul(x, W[16x16] constant) -> Add(bias[16] constant) -> Tanh, so N blocks are 3N
nodes (6,667 blocks = 20,001 nodes, the size the 30 s target of issue 6 is set for). Each size is
compiled in its own child process (so peak RSS is per size) through the real `compile_model`, with
timers wrapped around the functions it calls: import, verify, each pass of the pipeline, lowering,
memory planning, rendering, NVRTC, and writing out/ (IR text, weights, plan.json, sources).

The table shows seconds per stage and size, and per stage the growth exponent between the two
largest sizes, log(t2/t1) / log(n2/n1): about 1 for a linear stage, 2 for a quadratic one (stages
under 50 ms at the largest size show '-', their ratio is noise). --e2e also times the `nnc
compile` command itself (a fresh process: interpreter start and imports included). CPU seconds
(user + system, NVRTC worker processes included) are shown too: on a loaded machine they say
more than wall time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve()


def build_chain(n_blocks: int, path: Path, dim: int = 16, seed: int = 0) -> None:
    """An ONNX chain of n_blocks x (MatMul with a constant dim x dim weight, Add a constant bias,
    Tanh) on an input x: f32[dim, dim]; every block has its own weights."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    cur = "x"
    for i in range(n_blocks):
        w = (rng.standard_normal((dim, dim)) / math.sqrt(dim)).astype(np.float32)
        b = (0.1 * rng.standard_normal(dim)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("MatMul", [cur, f"w{i}"], [f"m{i}"], name=f"matmul{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"),
                  helper.make_node("Tanh", [f"a{i}"], [f"t{i}"], name=f"tanh{i}")]
        cur = f"t{i}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [dim, dim])],
                          [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [dim, dim])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(m, str(path))


# ---------------------------------------------------------------- one size, in a child process

class _Timers:
    def __init__(self):
        self.t = defaultdict(float)
        self.order: list[str] = []

    def add(self, name: str, dt: float):
        if name not in self.t:
            self.order.append(name)
        self.t[name] += dt

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def wrap(self, name: str, fn):
        def timed(*a, **k):
            with self.stage(name):
                return fn(*a, **k)
        return timed


def measure_one(model: Path, out: Path, nvrtc: bool) -> dict:
    """Compiles `model` into `out` through nnc.driver.compile_model with every stage timed."""
    import nnc.codegen.cuda as cuda
    import nnc.codegen.emit as emit
    import nnc.codegen.lower as lower_mod
    import nnc.driver as comp
    import nnc.onnx_import as onnx_import
    import nnc.pipeline as pipeline

    T = _Timers()
    seen: dict[str, int] = defaultdict(int)
    get_pass = pipeline.get_pass

    def timed_get_pass(name):
        seen[name] += 1
        label = f"pass {name}" + (f" #{seen[name]}" if seen[name] > 1 else "")
        return T.wrap(label, get_pass(name))

    pipeline.get_pass = timed_get_pass
    onnx_import.import_model = T.wrap("import", onnx_import.import_model)
    comp.verify = T.wrap("verify", comp.verify)
    plan_memory = lower_mod.plan_memory
    lower_mod.plan_memory = T.wrap("memory planning", plan_memory)
    emit.lower = T.wrap("lower+plan", emit.lower)
    emit.render_sources = T.wrap("render sources", emit.render_sources)
    # the CUDA compile: compile_many (parallel units, cubin cache) where present, else one program
    if nvrtc:
        for fn in ("compile_many", "compile_source"):
            if hasattr(cuda, fn):
                setattr(cuda, fn, T.wrap("NVRTC", getattr(cuda, fn)))
    else:
        cuda.compile_source = lambda *a, **k: b""
        cuda.compile_many = lambda units, *a, **k: [b""] * len(units)
    if hasattr(emit, "make_units"):
        emit.make_units = T.wrap("split into units", emit.make_units)
    emit.compile_to_dir = T.wrap("codegen total", emit.compile_to_dir)
    for name in ("print_module", "weights_blob", "plan_to_json", "ir_hashes"):
        if hasattr(emit, name):
            setattr(emit, name, T.wrap(f"write: {name}", getattr(emit, name)))
    with T.stage("total"):
        plan = comp.compile_model(str(model), str(out), arch="sm_90")
    t = dict(T.t)
    t["lowering"] = t.pop("lower+plan", 0.0) - t.get("memory planning", 0.0)
    inner = sum(t.get(k, 0.0) for k in ("lowering", "memory planning", "render sources", "NVRTC", "split into units"))
    t["write out/ (rest)"] = t.pop("codegen total", 0.0) - inner - sum(v for k, v in t.items() if k.startswith("write: "))
    order = [k for k in T.order if k in t and k not in ("total",)]
    order = [k for k in order if k != "codegen total"]
    for k in ("lowering", "write out/ (rest)"):
        if k not in order:
            order.append(k)
    stage_order = ["import", "verify"] + [k for k in order if k.startswith("pass ")] + \
        ["lowering", "memory planning", "render sources", "split into units", "NVRTC"] + \
        [k for k in order if k.startswith("write: ")] + ["write out/ (rest)"]
    stages = {k: t[k] for k in stage_order if k in t}
    stages["total"] = t["total"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    cpu = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))  # NVRTC workers are child processes
    src = out / "model.cu"
    if t.get("NVRTC", 0.0) == 0.0 and nvrtc:
        raise SystemExit("the CUDA compile was not timed: nnc.codegen.emit no longer calls "
                         "cuda.compile_many / cuda.compile_source (update the benchmark)")
    return {"stages": stages, "peak_rss_mib": rss, "cpu_s": cpu, "launches": len(plan.get("launches", [])),
            "kernels": len(plan.get("kernels", [])), "arena_bytes": plan.get("memory", {}).get("arena_bytes"),
            "model_cu_bytes": src.stat().st_size if src.exists() else 0}


def run_e2e(model: Path, out: Path, env: dict) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, the NVRTC worker processes included) of the command."""
    nnc = Path(sys.executable).with_name("nnc")
    cmd = [str(nnc) if nnc.exists() else sys.executable, *([] if nnc.exists() else ["-m", "nnc.cli"]),
           "compile", str(model), "-o", str(out), "--arch", "sm_90"]
    t0 = time.perf_counter()
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed:\n{r.stdout}{r.stderr}")
    return dt, (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)


# ---------------------------------------------------------------- driver

def _fmt(s: float) -> str:
    return f"{s:.2f}" if s >= 0.01 else f"{s * 1000:.1f}ms"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", default="1000,3000,6667,10000", help="comma-separated chain lengths in blocks")
    ap.add_argument("--no-nvrtc", action="store_true", help="skip the NVRTC compile (the cubin is left empty)")
    ap.add_argument("--e2e", action="store_true", help="also time the `nnc compile` command per size")
    ap.add_argument("--workdir", default="", help="where models and out/ dirs go (default: a temp dir)")
    ap.add_argument("--json", default="", help="write the raw results here")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--nvrtc", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(measure_one(Path(a.one[0]), Path(a.one[1]), bool(a.nvrtc))))
        return 0

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table
    sizes = [int(s) for s in a.blocks.split(",") if s.strip()]
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="nnc_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    console = Console() if sys.stdout.isatty() else Console(width=200)  # piped: no wrapped table
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as prog:
        task = prog.add_task("compile chains", total=len(sizes))
        for n in sizes:
            model = work / f"chain{n}.onnx"
            prog.update(task, description=f"{n} blocks: building")
            if not model.exists():
                build_chain(n, model)
            prog.update(task, description=f"{n} blocks ({3 * n} nodes): compiling")
            for d in (work / f"out{n}", work / f"e2e{n}"):  # a fresh out/: no cubin reuse
                shutil.rmtree(d, ignore_errors=True)
            cache = work / f"cache{n}"  # a cold cubin cache: NVRTC really runs
            shutil.rmtree(cache, ignore_errors=True)
            env = dict(os.environ, NNC_CACHE_DIR=str(cache))
            r = subprocess.run([sys.executable, str(HERE), "--one", str(model), str(work / f"out{n}"),
                                "--nvrtc", str(0 if a.no_nvrtc else 1)], capture_output=True, text=True, env=env)
            if r.returncode != 0:
                console.print(r.stdout, r.stderr)
                return 1
            res = json.loads(r.stdout.strip().splitlines()[-1])
            if a.e2e:
                prog.update(task, description=f"{n} blocks: nnc compile")
                shutil.rmtree(cache, ignore_errors=True)
                res["e2e_s"], res["e2e_cpu_s"] = run_e2e(model, work / f"e2e{n}", env)
            results[n] = res
            prog.advance(task)

    stages = []
    for n in sizes:
        for k in results[n]["stages"]:
            if k not in stages:
                stages.append(k)
    tab = Table(title=f"nnc compile scaling (seconds; nodes = 3 x blocks){' - NVRTC skipped' if a.no_nvrtc else ''}")
    tab.add_column("stage")
    for n in sizes:
        tab.add_column(f"{n} blk\n{3 * n} nodes", justify="right")
    if len(sizes) > 1:
        tab.add_column(f"exponent\n{sizes[-2]}->{sizes[-1]}", justify="right")
    for k in stages:
        row = [k] + [_fmt(results[n]["stages"].get(k, 0.0)) for n in sizes]
        if len(sizes) > 1:
            t1, t2 = (results[n]["stages"].get(k, 0.0) for n in sizes[-2:])
            ok = t2 >= 0.05 and t1 > 0
            row.append(f"{math.log(t2 / t1) / math.log(sizes[-1] / sizes[-2]):.2f}" if ok else "-")
        tab.add_row(*row, style="bold" if k == "total" else None)
    extra = [("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"), ("launches", "launches", "{}"),
             ("kernels", "kernels", "{}"), ("arena bytes", "arena_bytes", "{}"),
             ("model.cu bytes", "model_cu_bytes", "{}")]
    extra.insert(0, ("CPU s (user+sys, in-process run)", "cpu_s", "{:.2f}"))
    if a.e2e:
        extra[:0] = [("`nnc compile` wall (s)", "e2e_s", "{:.2f}"), ("`nnc compile` CPU s", "e2e_cpu_s", "{:.2f}")]
    for label, key, f in extra:
        tab.add_row(label, *[f.format(results[n].get(key)) for n in sizes], *([""] if len(sizes) > 1 else []))
    console.print(tab)
    if a.json:
        Path(a.json).write_text(json.dumps({str(n): r for n, r in results.items()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
