"""How far a tuning budget goes (codegen/tuning.py), on the CPU with the deterministic stand-in
runner: ops of one signature tuned once and a kernel shared by candidates compiled once, problems
ordered by their estimated share of the model's time, the quick screen dropping only the clearly
slower candidates and still picking the fastest, --tune-budget bounding the timing (the compile is
not charged), a wrong candidate never picked, and plan.json's per-problem report."""
import numpy as np

import pytest

from nnc.codegen import tuning
from nnc.codegen.lower import Lowerer
from nnc.codegen.tuning_runners import REPEATS, SCREEN_REPEATS
from nnc.codegen.variants import _params_key

from .cuda_models import F, N, mk
from .test_tuning import _gemm_problem, _matmul, _module, _opts, _selected, _tiny_cnn, _two_matmuls


def _label(c, p) -> tuple:
    return (c.name, _params_key(p))


class Recording(tuning.StandInRunner):
    """The stand-in runner, keeping what was compiled and in which order problems were run."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.batches: list = []
        self.order: list = []  # problem keys, at their first run

    def prepare(self, caps, progress=None):
        self.batches.append(list(caps))
        return super().prepare(caps, progress)

    def run(self, cap, seed, gate=None, cutoff=None):
        key = cap.candidate.problem.key
        if key not in self.order:
            self.order.append(key)
        return super().run(cap, seed, gate, cutoff)


# ---------------------------------------------------------------- dedupe

def test_ops_of_one_signature_are_tuned_once_and_shared_kernels_compiled_once():
    mod = _module(_two_matmuls(), "fp16")
    runs: list = []

    def timer(c, p):
        runs.append((c.problem.key, _label(c, p)))
        return 1e-3
    r = Recording(timer=timer)
    plan = tuning.lower_tuned(mod, _opts(), r)
    t = plan.tuning
    assert len(runs) == len(set(runs)), "each (signature, candidate) timed once"
    assert t["tunable_ops"] > t["signatures"] == t["problems"]  # the two MatMul+Relu of one shape: one signature
    shared = [row for row in t["by_problem"] if row["ops"] == 2]
    assert shared and all(row["source"] == "tuned" for row in t["by_problem"])
    # a group's fused variant emits its anchor's kernel: one kernel, compiled once for both
    caps = [c for batch in r.batches for c in batch]
    launched = sum(len(c.kernels) for c in caps)
    distinct = {n for c in caps for n in c.kernels}
    assert t["kernels_compiled"] == len(distinct) < launched


def test_a_kernel_is_named_by_its_code_the_same_in_every_build():
    # (the cubin cache key is the kernel's source: a second build, or another model with the
    # same GEMM, finds the candidates compiled)
    def names(model):
        survey = tuning.SurveySelector(None)
        Lowerer(_module(model, "fp16"), _opts(), survey).run()
        return {n for p in survey.problems.values() for c in [p.baseline] + p.others for n in c.kernels}
    a, b = names(_matmul(256, 512, 512)), names(_matmul(256, 512, 512))
    assert a and a == b
    assert a != names(_matmul(256, 512, 256))  # another shape: some other kernels (sizes as arguments: some shared)


# ---------------------------------------------------------------- ordering

def _small_then_big():
    rng = np.random.default_rng(0)
    w = lambda k, n: rng.standard_normal((k, n)).astype(np.float32)  # noqa: E731
    return mk([N("MatMul", ["z", "ws"], ["s"]), N("MatMul", ["x", "wb"], ["b"])],
              [("z", F, [16, 64]), ("x", F, [512, 1024])], [("s", F), ("b", F)],
              [("ws", w(64, 64)), ("wb", w(1024, 1024))])


def test_under_a_budget_the_largest_estimated_share_goes_first():
    mod = _module(_small_then_big(), "fp16")
    survey = tuning.SurveySelector(None)
    Lowerer(mod, _opts(), survey).run()
    est = {k: tuning.estimated_share(p) for k, p in survey.problems.items()}
    met = list(survey.problems)
    assert est[met[0]] < est[met[-1]]  # the small MatMul is met first
    r = Recording()
    tuning.lower_tuned(mod, _opts(tune_budget=60), r)
    first = [k for k in r.order if k in est]
    assert [est[k] for k in first] == sorted((est[k] for k in first), reverse=True)
    r = Recording()
    tuning.lower_tuned(mod, _opts(), r)  # no budget: the order met
    assert [k for k in r.order if k in est] == met


def test_the_estimate_is_a_roofline_of_the_op():
    mod = _module(_small_then_big(), "fp16")
    survey = tuning.SurveySelector(None)
    Lowerer(mod, _opts(), survey).run()
    gemms = sorted((p for p in survey.problems.values() if p.baseline.variant == "gemm.matmul"),
                   key=lambda p: p.est_s)
    small, big = gemms
    # 512 x 1024 x 1024 is 2^13 x the FLOPs of 16 x 64 x 64 (both over a launch's fixed cost)
    from nnc.passes.partition_pipeline import LAUNCH_S
    assert big.est_s - LAUNCH_S > 50 * (small.est_s - LAUNCH_S) > 0


# ---------------------------------------------------------------- early rejection

def test_the_quick_screen_drops_the_clearly_slower_and_picks_the_fastest():
    mod = _module(_matmul(256, 512, 512), "fp16")
    survey = tuning.SurveySelector(None)
    Lowerer(mod, _opts(), survey).run()
    p = _gemm_problem(survey)
    caps = [c for c in p.others if not c.why_not]
    assert len(caps) >= 4
    want, close = caps[-1], caps[0]
    base_key = _label(p.baseline.candidate, p.baseline.params)
    times = {base_key: 1e-3, _label(want.candidate, want.params): 0.5e-3,
             _label(close.candidate, close.params): 1.2e-3}

    def full(c, q):
        return times.get(_label(c, q), 4e-3)  # the rest: 4x the baseline, clearly slower

    def quick(c, q):  # a noisy screen: the fastest looks 2.8x slower than it is (still under 1.5 x 1 ms)
        return 1.4e-3 if _label(c, q) == _label(want.candidate, want.params) else full(c, q)
    r = tuning.StandInRunner(full, screen_timer=quick)
    plan = tuning.lower_tuned(mod, _opts(), r)
    assert _label(want.candidate, want.params) in _selected(plan)
    rec = next(l.tuning for l in plan.launches if getattr(l, "tuning", None)
               and l.tuning.get("variant") == want.variant)
    screened = [x for x in rec["timings"] if x.get("screened")]
    slow = len(caps) - 2
    assert rec["screened"] == len(screened) == slow and all(x["time_ms"] == pytest.approx(4.0) for x in screened)
    assert rec["time_ms"] == pytest.approx(0.5)
    close_rows = [x for x in rec["timings"] if (x["variant"], _params_key(x["params"])) ==
                  (close.variant, _params_key(close.params))]
    assert close_rows and not close_rows[0].get("screened")  # within 1.5x when it ran: timed in full
    assert plan.tuning["screened"] >= slow
    n_all = sum(1 + len([c for c in q.others if not c.why_not]) for q in survey.problems.values())
    # every screened-out candidate saved REPEATS - SCREEN_REPEATS timed runs
    assert r.repeats_run <= n_all * REPEATS - slow * (REPEATS - SCREEN_REPEATS)


def test_a_wrong_candidate_is_never_picked_nor_screened():
    # the gate comes before the screen: a wrong candidate is rejected as wrong, fast or slow
    mod = _module(_matmul(256, 512, 512), "fp16")
    survey = tuning.SurveySelector(None)
    Lowerer(mod, _opts(), survey).run()
    p = _gemm_problem(survey)
    fast_bad, slow_bad = p.others[0], p.others[1]
    bad = {_label(fast_bad.candidate, fast_bad.params), _label(slow_bad.candidate, slow_bad.params)}
    timer = lambda c, q: {_label(fast_bad.candidate, fast_bad.params): 1e-6,  # noqa: E731
                          _label(slow_bad.candidate, slow_bad.params): 1.0}.get(_label(c, q), 1e-3)
    with pytest.warns(tuning.WrongCandidateWarning):
        plan = tuning.lower_tuned(mod, _opts(), tuning.StandInRunner(
            timer, wrong=lambda cap: _label(cap.candidate, cap.params) in bad))
    assert not bad & set(_selected(plan))
    rec = next(l.tuning for l in plan.launches if getattr(l, "tuning", None) and l.tuning.get("rejected"))
    wrong = {(x["variant"], _params_key(x["params"])) for x in rec["rejected"] if x["why"].startswith("wrong output")}
    assert wrong == bad
    assert not any(x.get("screened") and (x["variant"], _params_key(x["params"])) in bad for x in rec["timings"])


# ---------------------------------------------------------------- the budget

def test_the_budget_bounds_the_timing_and_not_the_compile():
    budget, delay = 0.15, 0.01
    r = tuning.StandInRunner(delay=delay, compile_delay=0.3)
    plan = tuning.lower_tuned(_tiny_cnn(), _opts(tune_budget=budget), r)
    t = plan.tuning
    assert t["timing_seconds"] <= budget + 2 * delay + 0.05, t  # stops at the first check past it
    assert t["compile_seconds"] >= 0.3  # the slow compile ran in full, not charged
    assert t["heuristic"] >= 1 and t["tuned"] >= 1, t
    rows = {row["source"] for row in t["by_problem"]}
    assert rows == {"tuned", "heuristic"}
    assert any(row.get("why") == "budget" for row in t["by_problem"])


def test_plan_json_reports_each_problem_and_a_summary():
    plan = tuning.lower_tuned(_tiny_cnn(), _opts(), tuning.StandInRunner())
    t = plan.tuning
    for k in ("problems", "signatures", "tunable_ops", "tuned", "tuned_ops", "heuristic", "candidates",
              "kernels_compiled", "screened", "seconds", "lowering_seconds", "compile_seconds", "timing_seconds"):
        assert k in t, k
    assert t["tuned"] == t["signatures"] and t["tuned_ops"] == t["tunable_ops"] == sum(r["ops"] for r in t["by_problem"])
    assert len(t["by_problem"]) == t["signatures"]
    ests = [row["estimated_ms"] for row in t["by_problem"]]
    assert ests == sorted(ests, reverse=True)
    for row in t["by_problem"]:
        assert row["source"] == "tuned" and row["variant"] and row["time_ms"] > 0 and row["heuristic_ms"] > 0
        assert row["time_ms"] <= row["heuristic_ms"]


def test_a_budget_spent_in_one_round_leaves_the_next_round_s_new_problems_on_the_heuristic():
    b = tuning.Budget(0.5)
    b.start()
    b.stop()
    assert not b.out() and b.used() < 0.5
    b.spent = 0.6  # an earlier round's timing
    assert b.out()
    survey = tuning.SurveySelector(None, b)
    Lowerer(_tiny_cnn(), _opts(), survey).run()
    assert not survey.problems and survey.skipped and set(survey.skipped.values()) == {"budget"}
    assert tuning.Budget(None).out() is False
