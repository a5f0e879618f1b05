"""`nnc bench --scenario ...`: MLPerf scenarios driven by MLCommons LoadGen (`mlperf_loadgen`).

LoadGen decides when queries arrive and computes the statistics; nnc only provides the system
under test (SUT) and the query sample library (QSL), as an MLPerf submission does:

- QSL: `samples` random samples (never zeros) of the model's inputs with a leading batch dim of
  one (every input shares the compiled batch B as its leading dim; otherwise one sample is the
  whole input set and B is 1).
- SUT: issue_queries() puts LoadGen's samples on a queue; N worker threads, each with its own
  execution context (Module.context()), take up to B waiting samples, stack them into one run of
  the compiled batch (padding a short batch with copies of its first sample), and report each
  sample with lg.QuerySamplesComplete (its row of the first output as the response data). On
  cuda a worker submits with run_async (the context's slots pipeline the copies) and the
  context's completion thread answers LoadGen.
  Where dynamic shapes have not landed the compiled batch is fixed: --batch must equal it.
- Scenarios, with LoadGen's semantics: single-stream (one sample per query, the next after the
  last completes; metric: p90 latency), multi-stream (8 samples per query; p99 latency), server
  (Poisson arrivals at a target QPS; its p99 must meet --latency-bound-ms), offline (all samples
  in one query; samples per second).
- Server: the highest QPS whose p99 meets the bound, by a bounded search of at most
  MAX_SERVER_POINTS LoadGen runs of --duration-s each: double while a point passes, then bisect
  between the best pass and the lowest failure. A point passes when LoadGen reports "Performance
  constraints satisfied : Yes" (its p99 at or under server_target_latency_ns, the bound).
  Before the first point, a few untimed runs calibrate the expected latency LoadGen is told.

Each LoadGen run writes its own logs (mlperf_log_summary.txt, mlperf_log_detail.txt) under the
log directory; the summary's "Result is : VALID|INVALID" line and metric go into the table.
Short runs are usually INVALID (LoadGen's early-stopping and minimum-query rules): the table says
so rather than hiding it. mlperf_loadgen is imported lazily (the optional extra `nnc[bench]`).
"""
from __future__ import annotations

import math
import os
import queue
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .ir.errors import NncError

SCENARIOS = {"single-stream": "SingleStream", "multi-stream": "MultiStream", "server": "Server",
             "offline": "Offline"}
MULTI_STREAM_SAMPLES = 8    # MLPerf's multi-stream query size
MAX_SERVER_POINTS = 5       # LoadGen runs the server search may take
OFFLINE_QPS_MARGIN = 1.6    # offline: the expected QPS LoadGen is told, over the calibrated capacity
DEFAULT_DURATION_S = {"cuda": 20.0, "reference": 5.0}
SUMMARY = "mlperf_log_summary.txt"


def require_loadgen():
    """The mlperf_loadgen module, or an NncError naming how to install it."""
    try:
        import mlperf_loadgen
    except ImportError as e:
        raise NncError(f"nnc bench --scenario needs MLCommons LoadGen, which is not installed ({e}); "
                       "install it with: pip install 'nnc[bench]' (the mlcommons-loadgen package)") from None
    return mlperf_loadgen


@dataclass(frozen=True)
class ScenarioOptions:
    """One `nnc bench --scenario` run. duration_s: each LoadGen run's minimum duration (None: 20 s
    on cuda, 5 s on the reference). target_qps: server, the search's first point; offline, the
    expected QPS LoadGen sizes its query by (None: from the calibration runs). latency_bound_ms:
    server's p99 bound (required there). contexts: worker threads, one execution context each.
    batch: samples per run (None: the compiled batch; anything else is an error until dynamic
    shapes land). min_query_count: LoadGen's minimum queries per run."""
    scenario: str
    backend: str = "cuda"
    duration_s: Optional[float] = None
    target_qps: Optional[float] = None
    latency_bound_ms: Optional[float] = None
    contexts: int = 1
    batch: Optional[int] = None
    log_dir: Optional[str] = None
    samples: int = 64
    min_query_count: int = 64
    batch_window_us: float = 0.0   # server: wait this long for more samples to fill a batch
    seed: int = 0

    def __post_init__(self):
        if self.scenario not in SCENARIOS:
            raise NncError(f"--scenario must be one of {', '.join(SCENARIOS)}, not {self.scenario!r}")
        if self.backend not in ("cuda", "reference"):
            raise NncError(f"--backend must be 'cuda' or 'reference', not {self.backend!r}")
        for what, v in (("--duration-s", self.duration_s), ("--target-qps", self.target_qps),
                        ("--latency-bound-ms", self.latency_bound_ms)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0
                                  or not math.isfinite(v)):
                raise NncError(f"{what} must be a positive number, not {v!r}")
        for what, v in (("--contexts", self.contexts), ("--batch", self.batch), ("samples", self.samples),
                        ("min_query_count", self.min_query_count)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise NncError(f"{what} must be an integer >= 1, not {v!r}")
        if not (isinstance(self.batch_window_us, (int, float)) and self.batch_window_us >= 0):
            raise NncError(f"--batch-window-us must be >= 0, not {self.batch_window_us!r}")
        if self.scenario == "server" and self.latency_bound_ms is None:
            raise NncError("--scenario server needs --latency-bound-ms (the p99 bound the QPS search must meet)")
        if self.scenario != "server" and self.latency_bound_ms is not None:
            raise NncError(f"--latency-bound-ms applies to --scenario server, not {self.scenario}")
        if self.target_qps is not None and self.scenario not in ("server", "offline"):
            raise NncError(f"--target-qps applies to --scenario server or offline, not {self.scenario}")

    @property
    def duration(self) -> float:
        return self.duration_s if self.duration_s is not None else DEFAULT_DURATION_S[self.backend]


@dataclass
class ScenarioPoint:
    """One LoadGen run: what its summary says."""
    scenario: str
    result: str                       # "VALID" / "INVALID" (LoadGen's own verdict)
    metric: str                       # what the scenario reports, e.g. "p90 latency (ms)"
    value: float
    target_qps: Optional[float] = None
    constraints_ok: Optional[bool] = None  # server: "Performance constraints satisfied"
    samples_per_s: Optional[float] = None
    latency_ms: dict = field(default_factory=dict)  # p50 / p90 / p99 from Additional Stats
    summary_path: str = ""


@dataclass
class ScenarioResult:
    model: str
    backend: str
    scenario: str
    contexts: int
    batch: int
    duration_s: float
    points: list
    best: Optional[int]               # index into points: the reported one (server: highest passing QPS)
    calibration_ms: float
    latency_bound_ms: Optional[float] = None
    environment: dict = field(default_factory=dict)  # date, versions (LoadGen's too), GPU and driver

    def to_json(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- the summary file

def parse_summary(path) -> dict:
    """mlperf_log_summary.txt -> {key: value string} of its "key : value" lines (first wins)."""
    out = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        m = re.match(r"\s*([^:=]+?)\s*:\s*(.+?)\s*$", line)
        if m and m.group(1) not in out:
            out[m.group(1)] = m.group(2)
    return out


def _point(scenario: str, summary_path: Path, target_qps=None) -> ScenarioPoint:
    s = parse_summary(summary_path)
    result = s.get("Result is")
    if result not in ("VALID", "INVALID"):
        raise NncError(f"{summary_path}: LoadGen's summary has no 'Result is : VALID|INVALID' line")

    def num(key, scale=1.0):
        v = s.get(key)
        try:
            return float(v) * scale
        except (TypeError, ValueError):
            return None

    lat = {k: num(f"{p} percentile latency (ns)", 1e-6) for k, p in (("p50", "50.00"), ("p90", "90.00"),
                                                                      ("p99", "99.00"))}
    lat = {k: v for k, v in lat.items() if v is not None}
    if scenario == "single-stream":
        metric, value = "p90 latency (ms)", num("90.0th percentile latency (ns)", 1e-6)
    elif scenario == "multi-stream":
        metric, value = "p99 latency (ms)", num("99.0th percentile latency (ns)", 1e-6)
    elif scenario == "server":
        metric, value = "completed QPS", num("Completed samples per second")
    else:
        metric, value = "samples/s", num("Samples per second")
    if value is None:
        raise NncError(f"{summary_path}: LoadGen's summary has no {metric} line for {scenario}")
    ok = s.get("Performance constraints satisfied")
    sps = num("Completed samples per second") if scenario == "server" else \
        value if scenario == "offline" else None
    return ScenarioPoint(scenario, result, metric, value, target_qps, None if ok is None else ok == "Yes",
                         sps, lat, str(summary_path))


# ---------------------------------------------------------------- the system under test

def _sample_layout(plan: dict) -> int:
    """The compiled batch B: the leading dim every input shares (1 when they do not)."""
    shapes = [t.get("shape") or [] for t in plan["inputs"]]
    if not shapes or any(not s or not isinstance(s[0], int) for s in shapes):
        return 1
    b = shapes[0][0]
    return b if b >= 1 and all(s[0] == b for s in shapes) else 1


class _Sut:
    """LoadGen's SUT over N execution contexts (see the module docstring)."""

    def __init__(self, lg, module, batch: int, contexts: int, samples: list, window_s: float, output: str):
        self.lg, self.m, self.batch, self.samples, self.window_s = lg, module, batch, samples, window_s
        self.output = output
        self.q: queue.Queue = queue.Queue()
        self.errors: list = []
        self.contexts = [module.context() for _ in range(contexts)]
        self.pipelined = module.backend == "cuda"  # run_async overlaps copies with compute there
        self.first_out = module.output_names[0]
        self.threads = [threading.Thread(target=self._worker, args=(c,), daemon=True, name=f"nnc-sut-{i}")
                        for i, c in enumerate(self.contexts)]
        for t in self.threads:
            t.start()

    def issue(self, query_samples):
        for s in query_samples:
            self.q.put(s)

    def flush(self):
        pass

    def stop(self):
        for _ in self.threads:
            self.q.put(None)
        for t in self.threads:
            t.join()
        for c in self.contexts:
            c.close()

    def feed(self, indices) -> dict:
        """The stacked run of these sample indices, padded to the compiled batch."""
        idx = list(indices) + [indices[0]] * (self.batch - len(indices))
        names = self.m.input_names
        if self.batch == 1 and len(idx) == 1:
            return dict(self.samples[idx[0]])
        return {n: np.concatenate([self.samples[i][n] for i in idx], axis=0) for n in names}

    def _worker(self, ctx):
        stop = False
        while not stop:
            s = self.q.get()
            if s is None:
                return
            got = [s]
            deadline = time.perf_counter() + self.window_s
            while len(got) < self.batch:
                try:
                    wait = deadline - time.perf_counter()
                    nxt = self.q.get(timeout=wait) if wait > 0 else self.q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                got.append(nxt)
            if self.pipelined:  # cuda: up to `slots` runs in flight, completed by the context's thread
                try:
                    fut = ctx.run_async(self.feed([g.index for g in got]), [self.first_out], output=self.output)
                except BaseException as e:
                    self._complete(got, None, e)
                    continue
                fut.add_done_callback(lambda f, got=got: self._complete(got, f, None))
                continue
            try:
                out = ctx.run(self.feed([g.index for g in got]), [self.first_out], output=self.output)
                self._complete(got, out, None)
            except BaseException as e:
                self._complete(got, None, e)

    def _complete(self, got, out, err):
        """Answers LoadGen for these samples: each its row of the first output (or, after an
        error, no data: the error is raised once LoadGen's run is over)."""
        lg = self.lg
        try:
            if err is None and out is not None and hasattr(out, "result"):
                out = out.result()
            if err is None:
                y = np.asarray(out[self.first_out])
                rows = [np.ascontiguousarray(y[k] if self.batch > 1 else y) for k in range(len(got))]
                resp = [lg.QuerySampleResponse(g.id, r.ctypes.data, r.nbytes) for g, r in zip(got, rows)]
        except BaseException as e:
            err = e
        if err is not None:
            self.errors.append(err)
            resp = [lg.QuerySampleResponse(g.id, 0, 0) for g in got]
        lg.QuerySamplesComplete(resp)  # rows stay alive across the call (LoadGen copies)


def _random_samples(plan: dict, batch: int, n: int, seed: int) -> list:
    from .bench import random_inputs
    out = []
    for i in range(n):
        feed = random_inputs(plan, seed + i)
        out.append({k: np.ascontiguousarray(v[:1]) if batch > 1 else v for k, v in feed.items()})
    return out


def _load(out: Path, backend: str):
    if backend == "reference":
        from .bench import load_reference
        return load_reference(out), "numpy"
    from .runtime import load, require_gpu
    require_gpu()
    return load(out), "numpy"


def _settings(lg, o: ScenarioOptions, calib_s: float, batch: int, contexts: int, target_qps=None):
    s = lg.TestSettings()
    s.scenario = getattr(lg.TestScenario, SCENARIOS[o.scenario])
    s.mode = lg.TestMode.PerformanceOnly
    s.min_duration_ms = int(o.duration * 1000)
    s.max_duration_ms = int(o.duration * 3000) + 1000  # a bound on a slow run (then INVALID: too few queries)
    s.min_query_count = o.min_query_count
    capacity = contexts * batch / max(calib_s, 1e-6)  # samples/s all contexts could do
    if o.scenario == "single-stream":
        s.single_stream_expected_latency_ns = max(int(calib_s * 1e9), 1)
    elif o.scenario == "multi-stream":
        s.multi_stream_samples_per_query = MULTI_STREAM_SAMPLES
        runs = math.ceil(MULTI_STREAM_SAMPLES / batch)
        s.multi_stream_expected_latency_ns = max(int(calib_s * 1e9 * math.ceil(runs / contexts)), 1)
    elif o.scenario == "server":
        s.server_target_qps = float(target_qps)
        s.server_target_latency_ns = int(o.latency_bound_ms * 1e6)
    else:
        # LoadGen sizes the one offline query as expected QPS x min duration: an estimate below the
        # real rate ends the run early, INVALID ("Min duration satisfied : NO"). The calibration
        # runs are synchronous, so pipelined contexts beat it (H200, ResNet-50 b32: 13073 samples/s
        # against an estimate of 11170): overestimate, the run then lasts up to this many durations.
        s.offline_expected_qps = float(o.target_qps or OFFLINE_QPS_MARGIN * capacity)
    return s


def _run_loadgen(lg, sut: _Sut, n_samples: int, settings, log_dir: Path) -> Path:
    log_dir.mkdir(parents=True, exist_ok=True)
    handle = lg.ConstructSUT(sut.issue, sut.flush)
    qsl = lg.ConstructQSL(n_samples, n_samples, lambda idx: None, lambda idx: None)  # resident in memory
    try:
        ls = lg.LogSettings()
        ls.log_output.outdir = str(log_dir.resolve())
        ls.log_output.copy_summary_to_stdout = False
        lg.StartTestWithLogSettings(handle, qsl, settings, ls)
    finally:
        lg.DestroyQSL(qsl)
        lg.DestroySUT(handle)
    if sut.errors:
        e = sut.errors[0]
        raise NncError(f"a run failed during the LoadGen test ({len(sut.errors)} failed): {type(e).__name__}: {e}") from e
    path = log_dir / SUMMARY
    if not path.is_file():
        raise NncError(f"LoadGen wrote no {SUMMARY} under {log_dir}")
    return path


def server_search(run_point, start_qps: float, max_points: int = MAX_SERVER_POINTS) -> list:
    """The bounded QPS search: run_point(qps) -> ScenarioPoint; at most max_points calls. Doubles
    while a point passes (constraints_ok), halves while none has, then bisects between the best
    pass and the lowest failure. Returns the points in the order run."""
    points, lo, hi, q = [], None, None, float(start_qps)
    for _ in range(max_points):
        p = run_point(q)
        points.append(p)
        if p.constraints_ok:
            lo = q if lo is None else max(lo, q)
        else:
            hi = q if hi is None else min(hi, q)
        if lo is None:
            q = hi / 2
        elif hi is None:
            q = lo * 2
        else:
            q = (lo + hi) / 2
        q = float(f"{q:.4g}")
        if any(abs(p.target_qps - q) <= 1e-9 * q for p in points):
            break  # no new point left between them at this precision
    return points


class _CallableContext:
    def __init__(self, runner):
        self.runner = runner

    def run(self, feed, outputs=None, *, output="numpy"):
        res = self.runner(feed)
        return {n: np.asarray(res[n]) for n in (outputs or list(res))}

    def close(self):
        pass


class CallableSystem:
    """Another system under the same SUT and LoadGen settings (a peer measured the same way, say
    torch.compile in tools/loadgen_vs_torch.py): `plan` gives the "inputs" / "outputs" entries
    (name, dtype, shape) as plan.json does; make_runner() is called once per context and returns
    a function {input name: numpy array} -> {output name: array}."""

    def __init__(self, plan: dict, make_runner, backend: str = "peer"):
        self.plan = {"inputs": list(plan["inputs"]), "outputs": list(plan["outputs"])}
        self.make_runner = make_runner
        self.backend = backend

    @property
    def input_names(self):
        return [t["name"] for t in self.plan["inputs"]]

    @property
    def output_names(self):
        return [t["name"] for t in self.plan["outputs"]]

    def context(self):
        return _CallableContext(self.make_runner())


def run_scenario(out_dir, options: ScenarioOptions, system=None) -> ScenarioResult:
    """Runs one scenario on OUT through LoadGen (see the module docstring). system: run this
    instead of loading OUT (a CallableSystem peer); OUT then only names it and holds the logs."""
    lg = require_loadgen()
    out = Path(out_dir)
    m, output = _load(out, options.backend) if system is None else (system, "numpy")
    batch = _sample_layout(m.plan)
    if options.batch is not None and options.batch != batch:
        raise NncError(f"--batch {options.batch}: {out} was compiled for batch {batch} (the leading dim of its "
                       f"inputs); recompile with --shapes for batch {options.batch}")
    samples = _random_samples(m.plan, batch, options.samples, options.seed)
    # default: under the working directory, not inside OUT (a directory that ships as it was compiled)
    log_root = Path(options.log_dir) if options.log_dir else Path("mlperf_logs") / f"{out.name}_{options.scenario}"
    sut = _Sut(lg, m, batch, options.contexts, samples, options.batch_window_us * 1e-6, output)
    try:
        ctx = sut.contexts[0]  # calibration: the expected latency LoadGen is told, untimed by it
        feed = sut.feed([0])
        ctx.run(feed, output=output)
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            ctx.run(feed, output=output)
            ts.append(time.perf_counter() - t0)
        calib = float(np.median(ts))
        best = None
        if options.scenario == "server":
            start = options.target_qps or 0.5 * options.contexts * batch / calib

            def run_point(qps):
                d = log_root / f"qps_{qps:.4g}"
                return _point("server", _run_loadgen(lg, sut, len(samples),
                                                     _settings(lg, options, calib, batch, options.contexts, qps), d), qps)
            points = server_search(run_point, start)
            passing = [i for i, p in enumerate(points) if p.constraints_ok]
            best = max(passing, key=lambda i: points[i].target_qps) if passing else None
        else:
            path = _run_loadgen(lg, sut, len(samples), _settings(lg, options, calib, batch, options.contexts), log_root)
            points, best = [_point(options.scenario, path)], 0
    finally:
        sut.stop()
    return ScenarioResult(str(out), options.backend if system is None else system.backend, options.scenario,
                          options.contexts, batch, options.duration, points, best, calib * 1e3,
                          options.latency_bound_ms, _environment(options.backend))


def _environment(backend: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version
    from .bench import _environment as bench_environment
    cp = None
    if backend == "cuda":
        from .runtime import require_gpu
        cp = require_gpu()
    env = bench_environment(cp)
    try:
        env["mlcommons_loadgen"] = version("mlcommons-loadgen")
    except PackageNotFoundError:
        env["mlcommons_loadgen"] = "?"
    return env


# ---------------------------------------------------------------- printing

def _cells(r: ScenarioResult, i: int, p: ScenarioPoint) -> list:
    lat = p.latency_ms
    return [("*" if i == r.best and r.scenario == "server" else "") + ("" if p.target_qps is None else f"{p.target_qps:.4g}"),
            p.result, "" if p.constraints_ok is None else ("yes" if p.constraints_ok else "no"),
            f"{p.value:.4g}", *(f"{lat[k]:.4g}" if k in lat else "" for k in ("p50", "p90", "p99")),
            os.path.relpath(p.summary_path) if p.summary_path else ""]


HEADERS = ("target QPS", "LoadGen", "p99 <= bound", "metric", "p50 ms", "p90 ms", "p99 ms", "summary")


def _title(r: ScenarioResult) -> str:
    t = (f"{r.model}: {r.scenario} on {r.backend}, {r.contexts} context(s), batch {r.batch}, "
         f"{r.duration_s:g} s per LoadGen run; metric: {r.points[0].metric}")
    if r.scenario == "server":
        t += f"; p99 bound {r.latency_bound_ms:g} ms, " + (
            f"highest passing QPS {r.points[r.best].target_qps:.4g}" if r.best is not None else "no QPS point passed")
    return t


def format_text(r: ScenarioResult) -> str:
    rows = [list(HEADERS)] + [_cells(r, i, p) for i, p in enumerate(r.points)]
    w = [max(len(row[c]) for row in rows) for c in range(len(HEADERS))]
    lines = [_title(r)] + ["  ".join(c.ljust(w[k]) for k, c in enumerate(row)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


def print_rich(r: ScenarioResult, console) -> None:
    from rich.table import Table
    t = Table(title=_title(r), title_justify="left")
    for h in HEADERS:
        t.add_column(h, justify="left" if h in ("LoadGen", "summary") else "right")
    for i, p in enumerate(r.points):
        t.add_row(*_cells(r, i, p))
    console.print(t)


def loadgen_summary(r: ScenarioResult) -> str:
    """LoadGen's own summary of the reported point (server: the best, else the last one run)."""
    p = r.points[r.best if r.best is not None else -1]
    return Path(p.summary_path).read_text(errors="replace")
