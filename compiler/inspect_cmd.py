"""`nnc inspect OUT`: the per-kernel table of a compiled directory, from plan.json.

One row per kernel (in the order its first launch runs): the launches of it in one run, the IR
ops it implements (kernels[].ops, the lines its header comment lists, op names in order), its
template, the chosen tactic (kernels[].params.selected: variant and parameters; when the tuner
timed it, launches[].tuning's variant, params and time_ms, and the runner-up: the second-fastest
correct candidate of its "timings" and how much slower it was), and with --time the device time per
run (every launch of it, timed alone on the planned arena: Module.time_launches) and its share
of the total. Device copies (memcpy launches) get one row of their own. plan.json is read
defensively: a field it lacks is shown as "-".

--plot F.png draws the times as horizontal bars (needs matplotlib, which nnc does not depend on).

A directory compiled with several static --profile (one build each under OUT/profiles/<i>/, an
index OUT/plan.json) gets one section per build (inspect_sections): a title naming the profile
and its input shapes, then that build's table and footer; --profile I keeps only build I, --time
measures each, and --plot F.png writes one file per section, F-<i>.png (F.png itself when only
one section is shown).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .ir.errors import NncError

_OP = re.compile(r"=\s*([A-Za-z_][\w.]*)\(")
COPIES = "(device copies)"


@dataclass
class KernelRow:
    kernel: str
    launches: list = field(default_factory=list)  # indices into plan.json "launches"
    ops: str = "-"
    template: str = "-"
    tactic: str = "-"
    tuned_ms: Optional[float] = None  # the tuner's time of one launch x launches (plan.json)
    runner_up: str = "-"              # the tuner's second-fastest correct candidate and how much slower
    time_ms: Optional[float] = None   # measured per run (--time)
    share: Optional[float] = None     # of the measured total


def op_names(lines) -> str:
    """'Add+Relu' from kernels[].ops lines: each op name once, in order (not `fused`, whose inner ops
    follow it; header lines without an `=` name no op)."""
    seen = []
    for line in lines if isinstance(lines, list) else []:
        m = _OP.search(str(line))
        if m and m.group(1) != "fused" and m.group(1) not in seen:
            seen.append(m.group(1))
    return "+".join(seen) or "-"


def _fmt_params(params) -> str:
    if not isinstance(params, dict) or not params:
        return ""
    return " " + " ".join(f"{k}={v}" for k, v in params.items())


def _tactic(kernel: dict, tuning: Optional[dict]) -> str:
    if isinstance(tuning, dict) and tuning.get("variant"):
        src = tuning.get("source")
        return f"{tuning['variant']}{_fmt_params(tuning.get('params'))} (tuned{f', {src}' if src else ''})"
    sel = kernel.get("params", {}).get("selected") if isinstance(kernel.get("params"), dict) else None
    if isinstance(sel, dict) and sel.get("variant"):
        return f"{sel['variant']}{_fmt_params(sel.get('params'))}"
    return "-"


def _runner_up(tuning: dict) -> str:
    """'variant params (+x%)' of the second-fastest timed candidate (plan.json tuning "timings"),
    or '-': how close the choice was."""
    timed = [r for r in tuning.get("timings") or () if isinstance(r, dict)
             and isinstance(r.get("time_ms"), (int, float)) and r["time_ms"] > 0]
    if len(timed) < 2:
        return "-"
    best, second = sorted(timed, key=lambda r: r["time_ms"])[:2]
    return f"{second.get('variant', '?')}{_fmt_params(second.get('params'))} (+{100 * (second['time_ms'] / best['time_ms'] - 1):.1f}%)"


def kernel_rows(plan: dict) -> list:
    """The table's rows from plan.json, without times (see the module docstring)."""
    kernels = {k.get("name"): k for k in plan.get("kernels", []) if isinstance(k, dict)}
    rows: dict = {}
    launches = plan.get("launches", [])
    for i, l in enumerate(launches if isinstance(launches, list) else []):
        if not isinstance(l, dict):
            continue
        if l.get("kind") == "memcpy":
            rows.setdefault(COPIES, KernelRow(COPIES, ops="copy", template="cudaMemcpyAsync")).launches.append(i)
            continue
        if l.get("kind") != "kernel":
            continue
        name = str(l.get("kernel"))
        if name not in rows:
            k = kernels.get(name, {})
            rows[name] = KernelRow(name, ops=op_names(k.get("ops")), template=str(k.get("template", "-")),
                                   tactic=_tactic(k, l.get("tuning")))
        row = rows[name]
        row.launches.append(i)
        t = l.get("tuning")
        if isinstance(t, dict) and isinstance(t.get("time_ms"), (int, float)):
            row.tuned_ms = (row.tuned_ms or 0.0) + float(t["time_ms"])
            if row.runner_up == "-":
                row.runner_up = _runner_up(t)
    return list(rows.values())


def add_times(rows: list, launch_ms: list) -> float:
    """Fills time_ms (sum over each row's launches) and share; returns the total."""
    for r in rows:
        r.time_ms = sum(launch_ms[i] or 0.0 for i in r.launches if i < len(launch_ms))
    total = sum(r.time_ms for r in rows)
    for r in rows:
        r.share = r.time_ms / total if total > 0 else 0.0
    return total


def measure(out_dir, reps: int = 20, repeats: int = 5, seed: int = 0, cuda_graph: bool = True) -> tuple:
    """(per-launch ms, whole-run median ms): Module.time_launches on random inputs, and the whole
    run (graph replay, or eager) timed the same way for comparison."""
    from .bench import BenchOptions, bench, random_inputs
    from .runtime import GpuUnavailableError, load, require_gpu
    try:
        require_gpu()
    except GpuUnavailableError as e:
        raise GpuUnavailableError(f"--time measures on the GPU: {e}".split("; use backend=")[0]
                                  + "; without a GPU, leave out --time") from None
    m = load(out_dir, cuda_graph=cuda_graph)
    per = m.time_launches(random_inputs(m.plan, seed), reps=reps, repeats=repeats)
    whole = bench(out_dir, BenchOptions(iterations=50, warmup=10, cuda_graph=cuda_graph, seed=seed))
    return per, whole.gpu_compute_ms["median"]


def _cells(r: KernelRow) -> list:
    return [r.kernel, str(len(r.launches)), r.ops, r.template, r.tactic,
            "-" if r.tuned_ms is None else f"{r.tuned_ms:.4f}", r.runner_up,
            "-" if r.time_ms is None else f"{r.time_ms:.4f}",
            "-" if r.share is None else f"{100 * r.share:.1f}%"]


HEADERS = ["kernel", "launches", "ops fused", "template", "tactic", "tuned ms", "runner-up", "time ms", "share"]


def format_text(rows: list, footer: str = "") -> str:
    cells = [HEADERS] + [_cells(r) for r in rows]
    width = [max(len(c[i]) for c in cells) for i in range(len(HEADERS))]
    lines = ["  ".join(c[i].ljust(width[i]) for i in range(len(HEADERS))).rstrip() for c in cells]
    return "\n".join(lines) + "\n" + (footer + "\n" if footer else "")


def print_rich(rows: list, console, title: str, footer: str = "") -> None:
    from rich.table import Table
    t = Table(title=title, title_justify="left")
    for h in HEADERS:
        t.add_column(h, justify="right" if h in ("launches", "tuned ms", "time ms", "share") else "left",
                     overflow="fold")
    for r in rows:
        t.add_row(*_cells(r))
    console.print(t)
    if footer:
        console.print(footer)


def require_matplotlib():
    """matplotlib.pyplot (Agg backend), or an NncError saying how to get it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NncError("--plot needs matplotlib, which nnc does not depend on: pip install matplotlib") from None
    return plt


def plot(rows: list, path, title: str) -> None:
    """Horizontal bars of each kernel's time per run (measured, else the tuner's)."""
    plt = require_matplotlib()
    key = "time_ms" if any(r.time_ms is not None for r in rows) else "tuned_ms"
    data = [(r.kernel, getattr(r, key)) for r in rows if getattr(r, key) is not None]
    if not data:
        raise NncError("--plot needs times: add --time (measured on the GPU), or compile with tuning")
    data.sort(key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.28 * len(data) + 1)))
    ax.barh([k for k, _ in data], [v for _, v in data])
    ax.set_xlabel("ms per run" + (" (measured)" if key == "time_ms" else " (tuner)"))
    ax.set_title(title)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)


def inspect(out_dir, time: bool = False, reps: int = 20, seed: int = 0) -> tuple:
    """(rows, footer) for OUT; time=True measures on the GPU (GpuUnavailableError without one)."""
    from .plan_file import read_plan
    out = Path(out_dir)
    plan = read_plan(out)
    if "profile_builds" in plan:  # an index of several builds (compiler/profiles.py): no kernels of its own
        n = plan["profile_builds"]
        raise NncError(f"{out} is a set of {n} builds, one per --profile, and has no kernels of its own: "
                       f"inspect one of them, {out / 'profiles' / '0'} to {out / 'profiles' / str(int(n) - 1)} "
                       f"(inspect_sections(OUT) gives all of them, as `nnc inspect OUT` prints)")
    rows = kernel_rows(plan)
    n_kl = sum(len(r.launches) for r in rows if r.kernel != COPIES)
    footer = f"{len([r for r in rows if r.kernel != COPIES])} kernels, {n_kl} kernel launches per run"
    if time:
        per, whole = measure(out, reps=reps, seed=seed)
        total = add_times(rows, per)
        footer += (f"; sum of launches timed alone {total:.4f} ms, whole run (GPU compute, "
                   f"nnc bench) {whole:.4f} ms")
    tuned = [r.tuned_ms for r in rows if r.tuned_ms is not None]
    if tuned:
        footer += f"; tuner's times cover {len(tuned)} kernels ({sum(tuned):.4f} ms)"
    return rows, footer


@dataclass
class Section:
    """One build's table: what `nnc inspect` prints for it (a directory of several builds prints
    one per build, with its title)."""
    title: str
    dir: Path
    profile: Optional[int]  # the build's profile index in a set of builds; None: OUT is one build
    rows: list
    footer: str


def input_shapes_text(out_dir) -> str:
    """'input:1x3x32x32,mask:1x128': a build's input shapes from its plan.json (symbols by name)."""
    from .plan_file import read_plan
    from .profiles import _dims_of, shapes_text
    return shapes_text(_dims_of(read_plan(out_dir).get("inputs", [])))


def inspect_sections(out_dir, profile: Optional[int] = None, time: bool = False, reps: int = 20,
                     seed: int = 0) -> list:
    """The Sections of OUT: one for a single build; one per build of a set of builds, or only
    build `profile` (an NncError naming the profiles when there is no such build)."""
    from .codegen.escape import terminal_text  # input names come from the model file
    from .profiles import select_builds
    out = Path(out_dir)
    builds = select_builds(out, profile=profile)
    n_builds = len(select_builds(out)) if profile is not None else len(builds)
    sections = []
    for b in builds:
        rows, footer = inspect(b.dir, time=time, reps=reps, seed=seed)
        shapes = terminal_text(input_shapes_text(b.dir))
        if b.index is None:
            title = f"{out}: per-kernel table ({shapes})"
        else:
            title = f"{out}: profile {b.index} of {n_builds} ({b.dir}), inputs {shapes}"
        sections.append(Section(title, b.dir, b.index, rows, footer))
    return sections


def plot_paths(path, sections: list) -> list:
    """Where --plot F.png draws each section: F.png for one section, F-<i>.png (i the profile)
    for several."""
    p = Path(path)
    if len(sections) == 1:
        return [p]
    return [p.with_name(f"{p.stem}-{s.profile}{p.suffix}") for s in sections]


def plot_sections(sections: list, path, name: str) -> list:
    """plot() of each section into plot_paths(path, sections); checks first that every section has
    times, so that a refusal leaves no partial set of files. Returns the paths written."""
    for s in sections:
        if not any(r.time_ms is not None or r.tuned_ms is not None for r in s.rows):
            which = f" (profile {s.profile})" if s.profile is not None else ""
            raise NncError(f"--plot needs times{which}: add --time (measured on the GPU), or compile with tuning")
    paths = plot_paths(path, sections)
    for s, p in zip(sections, paths):
        plot(s.rows, p, name + (f" profile {s.profile}" if s.profile is not None else "") + ": time per kernel")
    return paths
