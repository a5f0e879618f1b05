"""`nnc bench OUT`: what trtexec reports, for a compiled output directory.

One request = host-to-device copies of the inputs (from pinned host memory) + the run (the CUDA
graph replay, or eager launches with --no-cuda-graph) + device-to-host copies of every output
(into pinned memory), then a synchronize. Per request:

- latency: host wall clock (time.perf_counter) from before the input copies to after the
  synchronize: end to end, as a caller waiting on each request sees it;
- GPU compute: CUDA events around the run alone (graph launch / kernel sequence);
- H2D / D2H: CUDA events around the input / output copies;
- enqueue: host time of the call that queues the run (graph launch or the eager launches).

Throughput: inferences per second over the timed loop's wall time, batch taken into account
(batch: the leading dim of the first input). Statistics: min, mean, median, p90, p99, max over
the timed iterations (percentiles by linear interpolation, numpy's default), after `warmup`
untimed requests. Inputs are random (normal floats, small positive-and-zero ints, coin-flip
bools) of each input's dtype and shape, never all zeros.

--backend reference runs the numpy reference (ReferenceModule) instead: latency and throughput
only (no device, so no GPU compute or copy times); slow, but it exercises the statistics on a
machine without a GPU.

A directory compiled with several static --profile (one build each under OUT/profiles/<i>/, an
index OUT/plan.json) is benched build by build (bench_builds): every profile, one result each, or
the one --profile I names, or the one whose profile holds --shapes (an InputError naming the input,
its shape and every profile's shapes when none does). Each result records its profile index and
input shapes; --json writes one record for one build, a list of records for several.
"""
from __future__ import annotations

import datetime
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .ir.errors import NncError

STATS = ("min", "mean", "median", "p90", "p99", "max")
PROGRESS_EVERY = 50  # requests between progress-bar updates (each update is host work)


@dataclass(frozen=True)
class BenchOptions:
    """What `nnc bench` measures: iterations timed after warmup untimed ones."""
    iterations: int = 200
    warmup: int = 20
    cuda_graph: bool = True
    backend: str = "cuda"
    seed: int = 0
    transport: str = "auto"  # a multi-device directory: "nccl" | "copy" | "auto" (nnc.multi_device_nccl)
    device_graphs: bool = False  # a multi-device directory on NCCL: each device's run as one CUDA graph (opt-in)

    def __post_init__(self):
        for what, v, lo in (("iterations", self.iterations, 1), ("warmup", self.warmup, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise NncError(f"--{what} must be an integer >= {lo}, not {v!r}")
        if self.backend not in ("cuda", "reference"):
            raise NncError(f"backend must be 'cuda' or 'reference', not {self.backend!r}")
        from .multi_device_nccl import TRANSPORTS
        if self.transport not in TRANSPORTS:
            raise NncError(f"transport must be one of {', '.join(map(repr, TRANSPORTS))}, not {self.transport!r}")


def summarize(samples_ms) -> Optional[dict]:
    """{min, mean, median, p90, p99, max} of a list of milliseconds (None for no samples)."""
    a = np.asarray(list(samples_ms), np.float64)
    if a.size == 0:
        return None
    return {"min": float(a.min()), "mean": float(a.mean()), "median": float(np.median(a)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)), "max": float(a.max())}


@dataclass
class BenchResult:
    model: str
    backend: str
    cuda_graph: bool
    graph_fallback: Optional[str]
    batch: int
    iterations: int
    warmup: int
    latency_ms: dict
    throughput_per_s: float
    gpu_compute_ms: Optional[dict] = None
    h2d_ms: Optional[dict] = None
    d2h_ms: Optional[dict] = None
    enqueue_ms: Optional[dict] = None
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    environment: dict = field(default_factory=dict)
    profile: Optional[int] = None  # the build's profile in a directory of several builds (None: OUT is one)
    shapes: dict = field(default_factory=dict)  # {input: dims} the build runs

    def to_json(self) -> dict:
        return asdict(self)


def _batch(plan: dict) -> int:
    ins = plan.get("inputs") or []
    shape = ins[0].get("shape") if ins else None
    if shape and isinstance(shape[0], int) and shape[0] > 0:
        return int(shape[0])
    return 1


def random_inputs(plan: dict, seed: int) -> dict:
    """Random arrays of each input's dtype and static shape (the same draws as `nnc run`)."""
    from .cli import _random_inputs
    return _random_inputs(plan, seed)


def _environment(cp=None) -> dict:
    from . import __version__
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "nnc": __version__, "numpy": np.__version__, "python": platform.python_version(),
           "host": platform.node()}
    if cp is not None:
        rt = cp.cuda.runtime
        dev = cp.cuda.Device()
        props = rt.getDeviceProperties(dev.id)
        name = props.get("name", b"")
        env.update(gpu=name.decode() if isinstance(name, bytes) else str(name), cupy=cp.__version__,
                   cuda_runtime=rt.runtimeGetVersion(), cuda_driver=rt.driverGetVersion(),
                   sm=f"{props.get('major')}{props.get('minor')}")
    return env


def _input_shapes(plan: dict) -> dict:
    return {t["name"]: t.get("shape") for t in plan.get("inputs") or []}


def bench_builds(out_dir, options: BenchOptions = BenchOptions(), profile: Optional[int] = None,
                 shapes: Optional[dict] = None) -> list:
    """bench() of each build of OUT that profiles.select_builds picks (see the module docstring):
    OUT itself, or builds of a directory with one per static profile, each result carrying its
    profile index (model: OUT as given)."""
    from .multi_device import is_multi_device_dir
    if is_multi_device_dir(out_dir):  # nnc compile --devices K: one result for the whole group
        if profile is not None or shapes is not None:
            raise NncError(f"{out_dir} is a multi-device directory (one build per device): no --profile / --shapes")
        return [bench_multi(out_dir, options)]
    from .profiles import select_builds
    results = []
    for b in select_builds(out_dir, profile=profile, shapes=shapes):
        r = bench(b.dir, options)
        r.model, r.profile = str(out_dir), b.index
        results.append(r)
    return results


def bench(out_dir, options: BenchOptions = BenchOptions()) -> BenchResult:
    """Measures OUT (see the module docstring); a progress bar (nnc.progress stage "bench") when
    the caller installed a drawing reporter."""
    from .progress import current
    out = Path(out_dir)
    total = options.warmup + options.iterations
    with current().stage("bench", total=total) as task:
        if options.backend == "reference":
            return _bench_reference(out, options, task.advance)
        return _bench_cuda(out, options, task.advance)


def _bench_cuda(out: Path, options: BenchOptions, advance) -> BenchResult:
    from .runtime import load, require_gpu
    cp = require_gpu()  # GpuUnavailableError, naming --backend reference, before anything else
    m = load(out, cuda_graph=options.cuda_graph)
    plan = m.plan
    feed = random_inputs(plan, options.seed)
    ins, outs = m.io_buffers()
    host_in = []
    for t, buf in zip(plan["inputs"], ins):
        h = _pinned(cp, buf.shape, buf.dtype)
        h[...] = np.ascontiguousarray(feed[t["name"]]).view(buf.dtype)  # ml_dtypes: their raw bits
        host_in.append(h)
    host_out = [_pinned(cp, b.shape, b.dtype) for b in outs]
    st = cp.cuda.Stream(non_blocking=True)
    rt = cp.cuda.runtime
    ev = [cp.cuda.Event() for _ in range(4)]
    lat, gpu, h2d, d2h, enq = [], [], [], [], []
    total = options.warmup + options.iterations
    wall0 = None
    for it in range(total):
        if it == options.warmup:
            st.synchronize()
            wall0 = time.perf_counter()
        t0 = time.perf_counter()
        ev[0].record(st)
        for h, b in zip(host_in, ins):
            if b.nbytes:
                rt.memcpyAsync(b.data.ptr, h.ctypes.data, b.nbytes, 1, st.ptr)
        ev[1].record(st)
        q0 = time.perf_counter()
        m.launch(st)
        q1 = time.perf_counter()
        ev[2].record(st)
        for h, b in zip(host_out, outs):
            if b.nbytes:
                rt.memcpyAsync(h.ctypes.data, b.data.ptr, b.nbytes, 2, st.ptr)
        ev[3].record(st)
        st.synchronize()
        t1 = time.perf_counter()
        if it >= options.warmup:
            lat.append((t1 - t0) * 1e3)
            enq.append((q1 - q0) * 1e3)
            h2d.append(cp.cuda.get_elapsed_time(ev[0], ev[1]))
            gpu.append(cp.cuda.get_elapsed_time(ev[1], ev[2]))
            d2h.append(cp.cuda.get_elapsed_time(ev[2], ev[3]))
        if (it + 1) % PROGRESS_EVERY == 0:
            advance(PROGRESS_EVERY)  # outside the timed request
    wall = time.perf_counter() - wall0
    batch = _batch(plan)
    return BenchResult(str(out), "cuda", m.uses_cuda_graph, m.graph_fallback, batch, options.iterations,
                       options.warmup, summarize(lat), options.iterations * batch / wall,
                       gpu_compute_ms=summarize(gpu), h2d_ms=summarize(h2d), d2h_ms=summarize(d2h),
                       enqueue_ms=summarize(enq), h2d_bytes=int(sum(b.nbytes for b in ins)),
                       d2h_bytes=int(sum(b.nbytes for b in outs)), environment=_environment(cp),
                       shapes=_input_shapes(plan))


def _pinned(cp, shape, dtype) -> np.ndarray:
    """A numpy array in page-locked host memory (asynchronous copies, as trtexec uses)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    mem = cp.cuda.alloc_pinned_memory(max(n, 1))
    return np.frombuffer(mem, dtype, int(np.prod(shape))).reshape(shape)


def load_reference(out):
    """out's reference-backend module, refused when its inputs have symbolic dims (benchmarks need shapes)."""
    from .api import load
    m = load(out, backend="reference")
    if any(not isinstance(d, int) for t in m.plan["inputs"] for d in (t.get("shape") or [])):
        raise NncError(f"{out}: inputs have symbolic dims; compile with --shapes to bench")
    return m


def _bench_reference(out: Path, options: BenchOptions, advance) -> BenchResult:
    m = load_reference(out)
    plan = m.plan
    feed = random_inputs(plan, options.seed)
    lat = []
    total = options.warmup + options.iterations
    wall0 = None
    for it in range(total):
        if it == options.warmup:
            wall0 = time.perf_counter()
        t0 = time.perf_counter()
        m.run(feed)
        if it >= options.warmup:
            lat.append((time.perf_counter() - t0) * 1e3)
        advance()
    wall = time.perf_counter() - wall0
    batch = _batch(plan)
    return BenchResult(str(out), "reference", False, "the reference backend has no launches", batch,
                       options.iterations, options.warmup, summarize(lat), options.iterations * batch / wall,
                       environment=_environment(), shapes=_input_shapes(plan))


# ---------------------------------------------------------------- a multi-device directory

@dataclass
class MultiBenchResult:
    """`nnc bench` of a `nnc compile --devices K` directory. latency: host wall per run (inputs
    uploaded to every device that reads them, outputs downloaded). stage_ms[k]: device k's
    compute per micro-batch; comm_ms[k]: its time in receives, sends and collectives per run.
    transport nccl: CUDA events on each device's stream (the waits for a peer count as
    communication), span_ms the longest device's span per run, bubble_fraction (pipeline)
    1 - compute / (K x span) measured per run (median), comm_share (tensor) per device median of
    communication / its span. transport copy (all devices on one GPU, nothing overlaps): host
    wall times around each build / each stand-in collective with synchronizes, comm_share =
    communication / (compute + communication) per device, and for pipelines `estimate`
    (multi_device.pipeline_estimate: what K GPUs would take, communication not counted), not
    a measurement. Reference backend: latency and throughput only."""
    model: str
    backend: str
    transport: str
    transport_reason: str
    devices: int
    parallel: str
    micro_batches: int
    batch: int
    iterations: int
    warmup: int
    latency_ms: dict
    throughput_per_s: float
    stage_ms: list = field(default_factory=list)  # per device: summarize() of its compute ms per micro-batch
    comm_ms: list = field(default_factory=list)   # per device: summarize() of its communication ms per run
    span_ms: Optional[dict] = None
    bubble_fraction: Optional[float] = None
    comm_share: Optional[list] = None
    estimate: Optional[dict] = None
    measured: str = ""
    environment: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"kind": "multi_device", **asdict(self)}


def bench_multi(out_dir, options: BenchOptions = BenchOptions()) -> MultiBenchResult:
    """Measures a multi-device OUT (MultiBenchResult says what each number is)."""
    from .multi_device import MultiDeviceProgram, pipeline_estimate
    from .progress import current
    out = Path(out_dir)
    if options.backend == "cuda":
        from .runtime import require_gpu
        cp = require_gpu()
    prog = MultiDeviceProgram(out, options.backend, options.transport if options.backend == "cuda" else "auto",
                              cuda_graph=options.cuda_graph, device_graphs=options.device_graphs)
    plan, K, M = prog.plan, prog.mdm.num_devices, prog.mdm.micro_batches
    feed = random_inputs(plan, options.seed)
    nccl = prog.transport_used == "nccl"
    lat, stage, comm, span, bubble, share = [], [[] for _ in range(K)], [[] for _ in range(K)], [], [], []
    # nccl: the latency loop runs without events; then timed_runs more runs with an event around every step
    timed_runs = max(3, options.iterations // 4) if nccl else 0
    total = options.warmup + options.iterations
    with current().stage("bench", total=total + timed_runs) as task:
        wall0 = None
        for it in range(total + timed_runs):
            if it == options.warmup:
                wall0 = time.perf_counter()
            if it == total:
                wall = time.perf_counter() - wall0
            t0 = time.perf_counter()
            prog.run(feed, timing=it >= total)
            t1 = time.perf_counter()
            task.advance()
            if it < options.warmup:
                continue
            if it < total:
                lat.append((t1 - t0) * 1e3)
            if nccl and it >= total:
                tm = prog.group.timing
                for k in range(K):
                    stage[k] += tm.compute_ms[k]
                    comm[k].append(sum(tm.comm_ms[k]))
                span.append(max(tm.span_ms))
                bubble.append(tm.bubble_fraction())
                share.append(tm.comm_share())
            elif options.backend == "cuda" and not nccl:
                for k in range(K):
                    stage[k] += prog.stage_ms[k]
                    comm[k].append(sum(prog.comm_ms[k]))
                share.append([c / (c + sum(s)) if c + sum(s) > 0 else 0.0
                              for c, s in zip((sum(x) for x in prog.comm_ms), prog.stage_ms)])
        if not timed_runs:
            wall = time.perf_counter() - wall0
    pipeline, tensor = plan.get("parallel") == "pipeline", plan.get("parallel") == "tensor"
    r = MultiBenchResult(str(out), options.backend, prog.transport_used, prog.transport_reason, K,
                         str(plan.get("parallel")), M, _batch(plan), options.iterations, options.warmup,
                         summarize(lat), options.iterations * _batch(plan) / wall,
                         environment=_environment(cp if options.backend == "cuda" else None))
    if options.backend == "reference":
        r.measured = "per-stage times, bubble and communication not measured (reference backend: simulated devices)"
        return r
    r.stage_ms = [summarize(s) for s in stage]
    r.comm_ms = [summarize(c) for c in comm]
    if tensor or not pipeline:
        r.comm_share = [float(np.median([s[k] for s in share])) for k in range(K)]
    if nccl:
        r.span_ms = summarize(span)
        if pipeline:
            r.bubble_fraction = float(np.median(bubble))
        graphs = "one CUDA graph per device, " if prog.group.device_graphs else ""
        r.measured = (f"measured on {K} GPUs: latency from {options.iterations} runs ({graphs}no events), the "
                      f"breakdown from {timed_runs} more with CUDA events around every step on each device's stream "
                      f"(communication includes the waits for peers)")
    else:
        if pipeline:
            r.estimate = pipeline_estimate([[x for x in s] for s in stage], M)
            r.bubble_fraction = None
        r.measured = ("one GPU, nothing overlaps: host wall times around each build and each stand-in collective "
                      "(cupy copies / sums, not NCCL); the pipeline numbers are an estimate (" +
                      prog.transport_reason + ")")
    r.environment["gpus"] = K if nccl else 1
    return r


def _format_multi(r: MultiBenchResult) -> str:
    where = f"{r.environment.get('gpus', 1)} x {r.environment.get('gpu', 'GPU')}" if r.backend == "cuda" else "CPU"
    lines = [f"{r.model}: {r.backend} on {where}, transport {r.transport}, {r.parallel}, {r.devices} devices, "
             f"{r.micro_batches} micro-batch{'es' if r.micro_batches != 1 else ''}, batch {r.batch}, "
             f"{r.iterations} iterations after {r.warmup} warm-up",
             f"{'ms':<34}" + "".join(f"{s:>10}" for s in STATS)]
    rows = [("latency (host, end to end)", r.latency_ms)]
    if r.span_ms:
        rows.append(("longest device span (GPU)", r.span_ms))
    for k, st in enumerate(r.stage_ms):
        rows.append((f"device {k} compute / micro-batch", st))
    for k, st in enumerate(r.comm_ms):
        rows.append((f"device {k} communication / run", st))
    for label, st in rows:
        if st is not None:
            lines.append(f"{label:<34}" + "".join(f"{st[s]:>10.4f}" for s in STATS))
    if r.bubble_fraction is not None:
        lines.append(f"bubble fraction (measured): {r.bubble_fraction:.3f}")
    if r.estimate is not None:
        e = r.estimate
        lines.append(f"pipeline estimate for {r.devices} GPUs (from one-GPU stage times, not measured): "
                     f"{e['pipelined_ms']:.3f} ms vs {e['sequential_ms']:.3f} sequential, bubble fraction "
                     f"{e['bubble_fraction']:.3f}, speedup {e['speedup']:.2f}x")
    if r.comm_share is not None:
        lines.append("communication share: " + ", ".join(f"device {k} {100 * c:.1f}%"
                                                       for k, c in enumerate(r.comm_share)))
    lines.append(f"throughput: {r.throughput_per_s:.1f} inferences/s")
    lines.append(f"({r.transport_reason}; {r.measured})")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- printing

ROWS = (("latency (host, end to end)", "latency_ms"), ("GPU compute", "gpu_compute_ms"),
        ("H2D copy", "h2d_ms"), ("D2H copy", "d2h_ms"), ("enqueue (host)", "enqueue_ms"))


def _head(r: BenchResult) -> str:
    how = ("CUDA graph" if r.cuda_graph else f"eager launches ({r.graph_fallback})") if r.backend == "cuda" \
        else "numpy reference"
    dev = r.environment.get("gpu", "CPU")
    which = ""
    if r.profile is not None:
        from .codegen.escape import terminal_text  # input names come from the model file
        from .profiles import shapes_text
        which = f" profile {r.profile} ({terminal_text(shapes_text(r.shapes))})"
    return (f"{r.model}{which}: {r.backend} on {dev}, {how}, batch {r.batch}, {r.iterations} iterations "
            f"after {r.warmup} warm-up")


def format_text(r: BenchResult) -> str:
    """The table as plain text (what a non-terminal gets)."""
    if isinstance(r, MultiBenchResult):
        return _format_multi(r)
    lines = [_head(r), f"{'ms':<28}" + "".join(f"{s:>10}" for s in STATS)]
    for label, key in ROWS:
        st = getattr(r, key)
        if st is not None:
            lines.append(f"{label:<28}" + "".join(f"{st[s]:>10.4f}" for s in STATS))
    lines.append(f"throughput: {r.throughput_per_s:.1f} inferences/s"
                 + (f"; H2D {r.h2d_bytes} bytes, D2H {r.d2h_bytes} bytes per request" if r.backend == "cuda" else ""))
    return "\n".join(lines) + "\n"


def print_rich(r: BenchResult, console) -> None:
    if isinstance(r, MultiBenchResult):
        console.print(_format_multi(r), end="", markup=False, highlight=False)
        return
    from rich.table import Table
    t = Table(title=_head(r), title_justify="left")
    t.add_column("ms", style="bold")
    for s in STATS:
        t.add_column(s, justify="right")
    for label, key in ROWS:
        st = getattr(r, key)
        if st is not None:
            t.add_row(label, *(f"{st[s]:.4f}" for s in STATS))
    console.print(t)
    console.print(f"throughput: [bold]{r.throughput_per_s:.1f}[/bold] inferences/s"
                  + (f"; H2D {r.h2d_bytes} bytes, D2H {r.d2h_bytes} bytes per request" if r.backend == "cuda" else ""))


def write_json(r, path) -> None:
    """One BenchResult as one record; a list of them (every build of a directory of several) as
    a list of records."""
    doc = [x.to_json() for x in r] if isinstance(r, (list, tuple)) else r.to_json()
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")
