"""Timing-based kernel selection: every candidate (variant, params) of every tunable problem is
rendered in a sandbox, compiled in one parallel batch, checked against the heuristic's output and
timed on the GPU; the fastest correct one is kept (a TensorRT-style tactic search).

    plan = lower_tuned(module, options)               # options.tune; codegen/lower.lower calls it
    plan.tuning                                       # the summary plan.json keeps as "tuning"

How (codegen/variants.py has the variants and the selector protocol):

1. Survey: the module is lowered with a `SurveySelector`. A problem (one op or fused group, by its
   Problem.key: op or group kind, shapes, dtypes, layouts/views, epilogue) with more than one
   (candidate, params) is a tunable problem. A problem in the timing cache (codegen/timing_cache.py)
   takes the cached choice. Otherwise every (candidate, params) is rendered in a sandbox: the
   Lowerer's state is snapshotted, the variant's render runs (nested problems inside it take the
   heuristic), what it emitted (kernels, launches, the buffers those read and write) is captured,
   and the state is rolled back. The heuristic's choice renders for real. Identical problems
   (same key) are captured once.
2. Tune: the runner compiles every distinct captured kernel at once (codegen/cuda.compile_many:
   parallel, cubin-cached; a kernel is named by its code, so one emitted by several candidates or
   problems compiles once and the next build finds it cached), then per problem runs the baseline
   (the heuristic's choice, itself checked by the test suite against the reference interpreter)
   and every other candidate on the same random inputs (never zeros; constants are the op's real,
   pre-transformed weights; outputs poisoned first). A candidate whose output differs from the
   baseline's beyond the dtype's tolerance is rejected (recorded in plan.json and logged), never
   picked; the compare runs where the outputs are (on the GPU for CudaRunner). Eligible candidates
   are timed with CUDA events: warm-up, a quick screen of SCREEN_REPEATS runs (one slower than
   SCREEN_RATIO x the best so far stops there: "screened", never picked), else the median of
   REPEATS runs, the L2 flushed before each.
3. Again: with new choices the module is lowered again (the survey now hits them in the
   in-memory cache), until a lowering meets no new problem (a choice can reveal problems: a
   fused group tuned to op by op has its body's); with a warm cache there is one lowering only.
   Every launch of a tunable problem gets `launch.tuning` (plan.json launches[i]["tuning"]:
   source tuned/cache/heuristic, variant, params, time_ms, the heuristic's time, candidates,
   tried, screened, rejected with why; or why the heuristic stayed); plan.json "tuning" sums it
   up (signatures, the ops they stand for, tuned, screened, seconds of lowering / compile /
   timing) with one row per signature ("by_problem").

A problem that cannot be timed safely (an integer operand that is not a constant: indices could
go out of range; a readback or cooperative launch; the baseline failing) keeps the heuristic, and
says why. `--tune-budget` bounds the timing (running, checking and timing candidates on the
device, summed over the rounds); the sandbox renders and the compile come before it and are not
charged (their size is the spaces': TUNE_TOP_K points of a variant with a cost model, the whole space
of one without). Under a budget problems go by their
estimated share of the model's time (a roofline of the op's FLOPs and bytes times the ops sharing
it), the largest first; what is left when it runs out keeps the heuristic ("budget"). A launch
error that the CUDA context cannot survive stops the tuning; the rest keeps the heuristic.

Runners (codegen/tuning_runners.py): `CudaRunner` (the GPU: cupy, imported lazily) and
`StandInRunner` (CPU tests: times from variants.stand_in_time, outputs a deterministic function of
the problem unless a test makes a candidate wrong). Both see only `Capture`s (the sandbox render:
codegen/tuning_capture.py), so any registered variant is handled generically. This file: the
correctness gate (mismatch), the selectors of the rounds and the tuner.
"""
from __future__ import annotations

import hashlib
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from ..ir.errors import NncError
from ..progress import current
from .dtypes import info as dtype_info
from .tuning_capture import Capture, RootSpec, capture  # noqa: F401  (the sandbox render)
from .tuning_runners import (REPEATS, WARMUP, CudaRunner, Runner, StandInRunner,  # noqa: F401
                             Unrecoverable, compile_captures)
from .variants import Candidate, HeuristicSelector, _params_key

# candidate vs baseline, by the output's dtype (the project's accuracy standard, nnc.accuracy)
RTOL = {"float32": 1e-3, "float64": 1e-6, "float16": 1e-2, "bfloat16": 1e-2}
RTOL_TF32 = 3e-3


def tolerance(np_name: str, tf32: bool = False) -> Optional[float]:
    """Relative tolerance of a candidate's output against the baseline's (atol: rtol x max|baseline|);
    None: must match exactly (integers, bool)."""
    if np_name == "float32" and tf32:
        return RTOL_TF32
    if np_name in RTOL:
        return RTOL[np_name]
    kind = dtype_info(np_name).dtype.np.kind
    return 1e-2 if kind == "f" else None  # narrow floats: the fp16 band



class WrongCandidateWarning(UserWarning):
    """A candidate kernel whose output differs from the baseline's (rejected; plan.json says which)."""



def _xp(a):
    """numpy, or cupy for a device array (CudaRunner's outputs: compared where they are)."""
    if isinstance(a, np.ndarray):
        return np
    import sys
    cp = sys.modules.get("cupy")
    return cp.get_array_module(a) if cp is not None else np


def mismatch(outs: list, ref: list, cap: Capture, tf32: bool = False) -> str:
    """"" when every output matches the baseline's (same non-finite pattern, finite elements
    within atol + rtol|ref|, atol = rtol x max|ref|; integers exactly), else why not. numpy or
    device (cupy) arrays: a few reductions, no boolean-indexed copies."""
    for i, ((_, _, np_name, _), a, r) in enumerate(zip(cap.outputs, outs, ref)):
        xp = _xp(r)
        a, r = xp.asarray(a), xp.asarray(r)
        if a.shape != r.shape:
            return f"result {i}: shape {a.shape} vs {r.shape}"
        rtol = tolerance(np_name, tf32)
        if rtol is None or a.dtype.kind not in "fc":
            if not bool(xp.array_equal(a, r)):
                return f"result {i}: {int(xp.count_nonzero(a != r))} of {a.size} elements differ"
            continue
        fa, fr = xp.isfinite(a), xp.isfinite(r)
        n_fin = int(xp.count_nonzero(fa != fr))
        if n_fin:
            return f"result {i}: {n_fin} of {a.size} elements finite in one, not the other"
        if not bool(fr.any()):
            continue
        zero = xp.zeros((), dtype=r.dtype)
        m = xp.abs(xp.where(fr, r, zero))  # non-finite places (equal in both): 0, never "off"
        d = xp.abs(xp.where(fr, a, zero) - xp.where(fr, r, zero))
        m_max = float(m.max())
        atol = rtol * m_max
        n_bad = int(xp.count_nonzero(d > atol + rtol * m))
        if n_bad:
            return f"result {i}: {n_bad} of {a.size} elements off (max |diff| {float(d.max()):.3g}, " \
                   f"max |baseline| {m_max:.3g}, rtol {rtol:g})"
    return ""


def _problem_seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


# ---------------------------------------------------------------- selectors

@dataclass
class TuneProblem:
    """One distinct tunable problem: its key, where it was met (the layer), the heuristic's
    choice (the baseline) and every other (candidate, params), captured."""
    key: str
    layer: str
    baseline: Capture
    others: list
    count: int = 1  # how many ops of the model share it
    skip: str = ""  # why it is not timed (then: the heuristic)
    space: str = ""  # space_digest of the (candidate, params) it is tuned over (the cache entry's)
    est_s: float = 0.0  # estimated seconds of one such op (estimated_seconds: FLOPs and bytes)


def estimated_seconds(op) -> float:
    """A roofline estimate of one op's run time (max(FLOPs / peak, bytes / bandwidth): the
    pipeline partitioner's op_cost), for ordering problems by their share of the model's time;
    0 when it cannot say."""
    try:
        from ..passes.partition_pipeline import op_cost
        return float(op_cost(op))
    except Exception:  # an estimate only: an op it cannot read orders last, never fails a build
        return 0.0


def estimated_share(p: TuneProblem) -> tuple:
    """What orders problems under a budget, largest first: the estimated seconds of all the ops
    sharing the problem, then (a tie, or no estimate) the threads its baseline launches."""
    return (p.est_s * max(1, p.count), baseline_work(p))


def baseline_work(p: TuneProblem) -> int:
    """A stand-in for a problem's share of the run time: threads the baseline launches (grid x block
    of each launch), times the ops sharing it."""
    total = 0
    for launch in p.baseline.launches:
        grid, block = launch[2], launch[3]
        if isinstance(grid, (tuple, list)) and isinstance(block, (tuple, list)):
            total += math.prod(int(g) for g in grid) * math.prod(int(b) for b in block)
    return total * max(1, p.count)


def layer_name(op) -> str:
    """What the progress bar and warnings call a problem: op (group kind) and its first result's
    name, model text made inert for the rich bar (no markup brackets, printable, bounded)."""
    kind = getattr(op.attrs, "kind", None) if op.name == "fused" else None
    res = op.results[0].name if op.results else "?"
    res = "".join(ch if ch.isprintable() and ch not in "[]\\" else "?" for ch in res)
    res = res if len(res) <= 60 else res[:28] + "..." + res[-28:]
    return f"{op.name}{f'({kind})' if kind else ''} %{res}"


def record_of(entry: dict, source: str) -> dict:
    """plan.json launches[i]["tuning"] from a cache/tuning entry."""
    rec = {"source": source, "variant": entry["variant"], "params": entry["params"]}
    if "candidates" in entry:
        rec["candidates"] = entry["candidates"]
    for k in ("time_ms", "heuristic", "tried", "screened", "rejected", "why", "timings"):
        if k in entry:
            rec[k] = entry[k]
    return rec


class SurveySelector:
    """Pass 1: cached choices where the timing cache has one (the candidate set unchanged), else
    the heuristic's, capturing every (candidate, params) of each new tunable problem (once per
    key). Nested problems inside a sandbox render take the heuristic."""
    name = "survey"

    def __init__(self, cache, budget: Optional["Budget"] = None, enabled: bool = True,
                 skips: Optional[dict] = None, fresh: Optional[dict] = None, final: bool = False):
        self.cache = cache
        self.budget = budget  # spent (an earlier round's timing): new problems keep the heuristic
        self.enabled = enabled and not final  # final: capture nothing more (the last round)
        self.known_skips = skips or {}  # key -> why (an earlier round): the heuristic, not captured again
        self.fresh = fresh or {}  # keys tuned by this run (their records say "tuned", not "cache")
        self.problems: dict[str, TuneProblem] = {}
        self.met: dict[str, int] = {}  # key -> tunable ops of that signature this lowering met
        self.layers: dict[str, tuple] = {}  # key -> (layer_name of the first op met, estimated_seconds)
        self.hits: dict[str, dict] = {}
        self.skipped: dict[str, str] = {}  # key -> why it was not captured
        self._depth = 0
        self._heur = HeuristicSelector()

    def choose(self, key: str, cands: Sequence[Candidate]):
        if self._depth:
            return self._heur.choose(key, cands)
        self.met[key] = self.met.get(key, 0) + 1
        if key not in self.layers:
            op = cands[0].problem.op
            self.layers[key] = (layer_name(op), estimated_seconds(op))
        options = _options(cands)
        space = space_digest(options)
        hit = self.fresh.get(key)  # this run's own choice (also one cut short by the budget: not cached)
        if hit is not None and hit.get("space", space) != space:
            hit = None
        if hit is None and self.cache is not None:
            hit = self.cache.get(key, space)
        if hit is not None:
            # only a point of a candidate's declared space: a cache file is input, its params reach
            # templates only when they are exactly what the variant itself declares
            want = (hit.get("variant"), _params_key(hit.get("params")))
            for c, p in options:
                if (c.name, _params_key(p)) == want:
                    self.hits[key] = hit
                    return c, dict(p)
        base_c, base_p = self._heur.choose(key, cands)
        if key in self.known_skips:
            self.skipped[key] = self.known_skips[key]
        elif key in self.problems:
            self.problems[key].count += 1
        elif key not in self.skipped:
            problem = cands[0].problem
            if not self.enabled:
                self.skipped[key] = "met only in the last lowering round"
            elif problem.L.launches is problem.L.init_launches:
                self.skipped[key] = "init phase (runs once at load)"
            elif self.budget is not None and self.budget.out():
                self.skipped[key] = "budget"
            else:
                self.problems[key] = self._capture(key, problem, cands, base_c, base_p, options, space)
        return base_c, base_p

    def record(self, key: str) -> Optional[dict]:
        """What the launches of problem `key` carry into plan.json when this pass is final."""
        if key in self.hits:
            return record_of(self.hits[key], "tuned" if key in self.fresh else "cache")
        if key in self.skipped:
            return {"source": "heuristic", "why": self.skipped[key]}
        return None

    def _capture(self, key, problem, cands, base_c, base_p, options, space) -> TuneProblem:
        self._depth += 1
        try:
            caps = [capture(problem, c, p) for c, p in [(base_c, base_p)] + [
                (c, p) for c, p in options if not (c is base_c and _params_key(p) == _params_key(base_p))]]
        finally:
            self._depth -= 1
        tp = TuneProblem(key, layer_name(problem.op), caps[0], caps[1:], space=space,
                         est_s=estimated_seconds(problem.op))
        if caps[0].why_not:
            tp.skip = f"baseline: {caps[0].why_not}"
        return tp


# Points of one variant the tuner times: those its cost model (Variant.cost) ranks fastest, plus its
# default. A whole space costs a compile per point (wgmma GEMM / conv: ~40 points). The wgmma model
# (calibrated) ranks the measured best within its first 3 on the BERT / ResNet-50 shapes of
# 2026-12-02; the other families' models (mma.sync GEMM, flash attention, int8, row norms) are not
# calibrated against timings, which is why 6 are kept, not 1. Variants without a model are timed
# over their whole space.
TUNE_TOP_K = 6


def _cost_or_inf(cost, problem, params) -> float:
    try:
        return float(cost(problem, params))
    except Exception:  # a model that cannot score a point: last, not a failed build
        return float("inf")


def _options(cands) -> list:
    out = []
    for c in cands:
        points = [dict(p) for p in c.space]
        if c.variant.cost is not None and len(points) > TUNE_TOP_K + 1:
            ranked = sorted(points, key=lambda p: _cost_or_inf(c.variant.cost, c.problem, p))
            keep = {_params_key(p) for p in ranked[:TUNE_TOP_K]} | {_params_key(c.default_params())}
            points = [p for p in points if _params_key(p) in keep]  # in the declared order
        out += [(c, p) for p in points]
    return out


def space_digest(options) -> str:
    """What a cache entry was tuned over (a new variant or tile makes it stale)."""
    text = "\n".join(sorted(f"{c.name} {_params_key(p)}" for c, p in options))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the tuner

# Early rejection: a candidate whose quick screen (tuning_runners.SCREEN_REPEATS runs) is slower
# than this times the best so far is not timed further (a screen's median is noisy, so the margin
# is wide: it only drops the clearly slower; the close ones get the full repeats and are compared)
SCREEN_RATIO = 1.5


class Budget:
    """--tune-budget: seconds of timing (running, checking and timing candidates on the device)
    summed over the rounds. The sandbox renders and the NVRTC compile of the candidates come
    before it and are not charged (plan.json "tuning" reports them apart). None: no bound."""

    def __init__(self, seconds: Optional[float]):
        self.seconds = None if seconds is None else float(seconds)
        self.spent = 0.0
        self._since: Optional[float] = None

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> None:
        if self._since is not None:
            self.spent += time.perf_counter() - self._since
            self._since = None

    def used(self) -> float:
        return self.spent + (0.0 if self._since is None else time.perf_counter() - self._since)

    def out(self) -> bool:
        return self.seconds is not None and self.used() > self.seconds


def tune_problems(problems: Sequence[TuneProblem], runner: Runner, budget: Optional[Budget], tf32: bool,
                  log: Callable[[str], None], stats: Optional[dict] = None) -> dict:
    """Compiles every capture of `problems` up front in one parallel batch (not charged to the
    budget), then gates and times each problem's candidates, under a bound the largest estimated
    share first (estimated_share). Returns key -> entry {"variant", "params", "time_ms",
    "heuristic", "tried", "screened", "rejected", "timings"} or {"skip": why} (the heuristic stays).
    stats (optional) gets compile_s, timing_s, kernel_names (distinct, over the rounds), candidates,
    screened added."""
    budget = budget or Budget(None)
    stats = stats if stats is not None else {}
    out: dict = {}
    todo = [p for p in problems if not p.skip]
    if budget.seconds is not None:  # under a budget the costliest problems first: they are where time goes
        todo.sort(key=estimated_share, reverse=True)
    for p in problems:
        if p.skip:
            out[p.key] = {"skip": p.skip}
    rep = current()
    caps = [c for p in todo for c in [p.baseline] + p.others if not c.why_not]
    failed: dict = {}
    t0 = time.perf_counter()
    if caps:
        n_kernels = len({k for c in caps for k in c.kernels})
        with rep.stage("tune-compile", total=n_kernels) as task:
            task.describe(f"{n_kernels} distinct kernels of {len(caps)} candidates")
            shown = [0]

            def compiled(done, total, task=task, shown=shown):  # the bar: kernels compiled or cached
                task.advance(done - shown[0])
                shown[0] = done
            failed.update(runner.prepare(caps, progress=compiled))
        stats.setdefault("kernel_names", set()).update(k for c in caps for k in c.kernels)
    stats["compile_s"] = stats.get("compile_s", 0.0) + time.perf_counter() - t0
    stats["candidates"] = stats.get("candidates", 0) + len(caps)
    n_total = sum(1 + len(p.others) for p in todo)
    stopped = ""
    n_screened = 0
    if todo:
        runner.warm_up()  # one-time device set-up (the gate's own kernels), before the clock starts
    t1 = time.perf_counter()
    budget.start()
    try:
        with rep.stage("tune", total=n_total) as task:
            for p in todo:
                if stopped or budget.out():
                    out[p.key] = {"skip": stopped or "budget"}
                    task.advance(1 + len(p.others))
                    continue
                entry, stopped, screened = _tune_one(p, runner, budget, tf32, log, failed, task)
                n_screened += screened
                out[p.key] = entry
    finally:
        budget.stop()
        stats["timing_s"] = stats.get("timing_s", 0.0) + time.perf_counter() - t1
        stats["screened"] = stats.get("screened", 0) + n_screened
    return out


def _tune_one(p: TuneProblem, runner: Runner, budget: Budget, tf32: bool, log, failed: dict, task):
    """One problem: the baseline, then every other candidate gated and screened. Returns (entry,
    why the device stopped or "", candidates screened out)."""
    seed = _problem_seed(p.key)
    base = p.baseline
    why = failed.get(id(base))
    try:
        if why:
            raise NncError(why)
        t_base, ref = runner.run(base, seed)
    except Unrecoverable as e:
        stopped = f"stopped: the device failed ({e})"
        task.advance(1 + len(p.others))
        return {"skip": stopped}, stopped, 0
    except NncError as e:
        task.advance(1 + len(p.others))
        return {"skip": f"baseline failed: {e}"}, "", 0
    task.advance()
    best = (t_base, base)
    # every correct candidate's time (plan.json, `nnc inspect`): what the choice was made from
    timings = [{"variant": base.variant, "params": base.params, "time_ms": round(t_base * 1e3, 6)}]
    rejected, tried, screened, partial, stopped = [], 1, 0, "", ""
    left = len(p.others)
    for c in p.others:
        left -= 1
        task.describe(f"{p.layer} | {left} candidates left | best {best[0] * 1e3:.4f} ms")
        if budget.out():
            rejected.append({"variant": c.variant, "params": c.params, "why": "budget"})
            partial = "budget"
            task.advance(1 + left)
            break
        why = c.why_not or failed.get(id(c))
        if not why:
            tried += 1
            try:
                verdict: list = []  # the gate's mismatch, kept: not compared a second time

                def gate(o, c=c, verdict=verdict):
                    verdict.append(mismatch(o, ref, c, tf32))
                    return verdict[-1]
                cutoff = SCREEN_RATIO * best[0] if SCREEN_RATIO else None
                t, outs = runner.run(c, seed, gate=gate, cutoff=cutoff)
                why = verdict[-1] if verdict else mismatch(outs, ref, c, tf32)
                if why:
                    why = f"wrong output: {why}"
                elif cutoff is not None and t > cutoff:  # correct, clearly slower: not timed in full
                    screened += 1
                    timings.append({"variant": c.variant, "params": c.params, "time_ms": round(t * 1e3, 6),
                                    "screened": True})
                else:
                    timings.append({"variant": c.variant, "params": c.params, "time_ms": round(t * 1e3, 6)})
                    if t < best[0]:
                        best = (t, c)
            except Unrecoverable as e:
                why = f"device failed: {e}"
                stopped = partial = f"stopped: the device failed ({e}) running {c.label}"
            except NncError as e:
                why = f"failed: {e}"
        if why:
            if why.startswith(("wrong output", "device failed", "failed")):
                msg = f"tune: {p.layer}: {c.label} rejected: {why}"
                log(f"  {msg}")
                if why.startswith("wrong output"):  # a kernel bug the gate caught: always shown
                    warnings.warn(msg, WrongCandidateWarning, stacklevel=3)
            rejected.append({"variant": c.variant, "params": c.params, "why": why})
        task.advance()
        if stopped:
            task.advance(left)
            break
    t, c = best
    entry = {"variant": c.variant, "params": c.params, "time_ms": round(t * 1e3, 6),
             "heuristic": {"variant": base.variant, "params": base.params, "time_ms": round(t_base * 1e3, 6)},
             "tried": tried, "screened": screened, "candidates": 1 + len(p.others), "rejected": rejected,
             "space": p.space, "timings": timings}
    if partial:  # used by this build, never cached: a later compile tunes it in full
        entry["partial"] = partial
    return entry, stopped, screened


def per_problem(survey: SurveySelector) -> list:
    """plan.json tuning["by_problem"]: one row per signature of the final lowering, the largest
    estimated share first: the first layer met, how many ops share it, tuned / cache / heuristic
    (and why), the chosen (variant, params), its time and the heuristic's (ms)."""
    rows = []
    for key, n in survey.met.items():
        layer, est = survey.layers.get(key, ("?", 0.0))
        row = {"layer": layer, "ops": n, "estimated_ms": round(est * n * 1e3, 4)}
        rec = survey.record(key) or {"source": "heuristic", "why": "not tunable"}
        row["source"] = rec["source"]
        if rec["source"] == "heuristic":
            row["why"] = rec.get("why", "")
        else:
            row.update(variant=rec["variant"], params=rec["params"], time_ms=rec.get("time_ms"),
                       heuristic_ms=(rec.get("heuristic") or {}).get("time_ms"))
        rows.append(row)
    rows.sort(key=lambda r: -r["estimated_ms"])
    return rows


MAX_ROUNDS = 4  # lowerings that may meet new problems (a tuned group lowered op by op: its body's)


def lower_tuned(module, options, runner: Optional[Runner] = None):
    """Lowers `module` choosing by timing (options.tune; see the module docstring). Returns the
    Plan with plan.tuning (the summary) and launch.tuning per tuned launch.

    Rounds: a lowering meets problems; the new ones are tuned and the module is lowered again
    with their choices. A choice can reveal problems the heuristic's never met (a fused group
    tuned to op by op: its body ops), so this repeats until a lowering meets nothing new (at
    most MAX_ROUNDS; what is left then keeps the heuristic). With a warm cache: one lowering."""
    from .lower import Lowerer
    from .timing_cache import TimingCache, TimingCacheWarning
    rep = current()
    t0 = time.perf_counter()
    budget = Budget(options.tune_budget)
    if runner is None:
        runner = CudaRunner(options.arch, options.target.l2_bytes)
    device = runner.device()
    cache = TimingCache.load(options.timing_cache, device, log=rep.log) if options.timing_cache \
        else TimingCache(device)
    fresh: dict = {}  # key -> entry tuned by this run
    skips: dict = {}  # key -> why it keeps the heuristic
    rounds, t_survey = 0, 0.0
    stats: dict = {}  # compile_s, timing_s, kernel_names, candidates, screened (tune_problems)
    try:
        while True:
            ts = time.perf_counter()
            survey = SurveySelector(cache, budget, skips=skips, fresh=fresh,
                                    final=rounds == MAX_ROUNDS)
            plan = Lowerer(module, options, survey).run()
            t_survey += time.perf_counter() - ts
            if not survey.problems:
                break
            tuned = tune_problems(list(survey.problems.values()), runner, budget, options.tf32, rep.log, stats)
            for k, e in tuned.items():
                if "skip" in e:
                    skips[k] = e["skip"]
                else:
                    fresh[k] = e
                    if "partial" not in e:
                        cache.put(k, e)
            rounds += 1
    finally:
        runner.close()
    if options.timing_cache:
        try:
            cache.save(options.timing_cache)
        except OSError as e:  # the build is good; only the reuse is lost: say so, do not fail
            msg = f"timing cache {options.timing_cache}: cannot write it ({e}); this build's timings are not kept"
            warnings.warn(msg, TimingCacheWarning, stacklevel=2)
            rep.log(f"  warning: {msg}")
            cache.status["write_error"] = str(e)
    hits = survey.hits
    n_tuned = sum(1 for k in hits if k in fresh)
    n_changed = sum(1 for e in hits.values() if isinstance(e.get("heuristic"), dict) and
                    (e["variant"], _params_key(e["params"])) != (e["heuristic"].get("variant"),
                                                                 _params_key(e["heuristic"].get("params", {}))))
    n_rej = sum(len([r for r in e.get("rejected", ()) if r["why"].startswith("wrong")])
                for k, e in hits.items() if k in fresh)
    cache.status["hits"] = len(hits) - n_tuned
    met = survey.met
    summary = {"mode": "tuned", "why": options.tune_reason or "--tune", "runner": runner.name, "device": device,
               # problems = signatures: distinct problem keys (ops sharing one are tuned once);
               # tunable_ops: the ops of the final lowering they stand for
               "problems": len(hits) + len(survey.skipped), "signatures": len(met),
               "tunable_ops": sum(met.values()), "tuned": n_tuned,
               "tuned_ops": sum(met.get(k, 0) for k in hits if k in fresh), "cache_hits": len(hits) - n_tuned,
               "heuristic": len(survey.skipped), "changed_from_heuristic": n_changed, "wrong_candidates": n_rej,
               "candidates": stats.get("candidates", 0), "kernels_compiled": len(stats.get("kernel_names", ())),
               "screened": stats.get("screened", 0),
               "rounds": rounds + 1, "budget_s": options.tune_budget, "seconds": round(time.perf_counter() - t0, 3),
               "lowering_seconds": round(t_survey, 3), "compile_seconds": round(stats.get("compile_s", 0.0), 3),
               "timing_seconds": round(stats.get("timing_s", 0.0), 3),
               "timing_cache": None if not options.timing_cache else {"file": str(options.timing_cache),
                                                                      **cache.status}}
    summary["by_problem"] = per_problem(survey)
    plan.tuning = summary
    rep.log(f"  tuning: {summary['problems']} tunable problems ({summary['tunable_ops']} ops): {n_tuned} timed, "
            f"{summary['cache_hits']} from the timing cache, {summary['heuristic']} heuristic; "
            f"{n_changed} differ from the heuristic, {n_rej} wrong candidates rejected, "
            f"{summary['screened']} screened out ({summary['seconds']:.1f} s: lowering {t_survey:.1f}, "
            f"compile {summary['compile_seconds']:.1f}, timing {summary['timing_seconds']:.1f}; {rounds + 1} lowerings)")
    return plan
