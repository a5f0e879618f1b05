"""Timing-based kernel selection (codegen/tuning.py) on the CPU, with the deterministic stand-in
runner: candidates rendered in a sandbox that leaves the lowering untouched, the fastest correct
candidate picked, a wrong or failing one rejected and recorded, identical problems timed once,
the budget falling back to the heuristic, the records in plan.json, and the options/CLI flags.
(The timing cache: test_timing_cache.py; the real GPU timer: test_tuning_gpu.py.)"""
import json
import time
from pathlib import Path

import numpy as np

import pytest

from nnc.codegen import tuning
from nnc.codegen.emit import plan_to_json
from nnc.codegen.lower import Lowerer, lower
from nnc.codegen.options import LowerOptions
from nnc.codegen.target import for_arch
from nnc.codegen.variants import _params_key, stand_in_time
from nnc.driver import pipeline_passes
from nnc.ir.errors import NncError
from nnc.onnx_import import import_model
from nnc.pipeline import Pipeline

from .cuda_models import F, N, mk

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _module(model, precision="fp16", shapes=None):
    mod = import_model(model, shapes=shapes)
    Pipeline(pipeline_passes(precision)).run(mod)
    return mod


def _matmul(m=256, k=512, n=512):
    rng = np.random.default_rng(0)
    return mk([N("MatMul", ["x", "w"], ["y"])], [("x", F, [m, k])], [("y", F)],
              [("w", rng.standard_normal((k, n)).astype(np.float32))])


def _two_matmuls():
    """Two MatMuls of the same signature (one problem, timed once) and one of another."""
    rng = np.random.default_rng(0)
    w = lambda k, n: rng.standard_normal((k, n)).astype(np.float32)
    return mk([N("MatMul", ["x", "w1"], ["a"]), N("Relu", ["a"], ["r"]), N("MatMul", ["r", "w2"], ["b"]),
               N("Relu", ["b"], ["s"]), N("MatMul", ["s", "w3"], ["y"])],
              [("x", F, [128, 256])], [("y", F)], [("w1", w(256, 256)), ("w2", w(256, 256)), ("w3", w(256, 128))])


def _opts(precision="fp16", **kw):
    return LowerOptions(for_arch("sm_90"), precision=precision, tune=True, **kw)


def _tiny_cnn():
    return _module(str(EXAMPLES / "tiny_cnn.onnx"), "fp16", {"input": [1, 3, 32, 32]})


def _plan_fingerprint(plan):
    return ([(k.name, k.body) for k in plan.kernels.values()],
            [(l.kind, l.kernel, l.grid, l.block, l.smem, [getattr(a, "id", getattr(a, "value", None)) for a in l.args])
             for l in plan.launches],
            [(b.id, b.name, b.shape, b.kind, b.offset, b.alias_of) for b in plan.buffers])


def _gemm_problem(survey):
    """The GEMM anchor's problem (its tile space); the fused group around it is a problem too
    (epilogue.gemm / epilogue.split / op by op)."""
    (p,) = [p for p in survey.problems.values() if p.baseline.variant == "gemm.matmul"]
    return p


def _records(plan):
    """Every launch's tuning record, and the fused group's record its anchor's carries ("group")."""
    out = []
    for l in plan.launches:
        r = getattr(l, "tuning", None)
        if r:
            out.append(r)
            if "group" in r:
                out.append(r["group"])
    return out


def _selected(plan):
    return [(k.params["selected"]["variant"], _params_key(k.params["selected"]["params"]))
            for k in plan.kernels.values()]


# ---------------------------------------------------------------- the sandbox

def test_sandbox_renders_leave_the_lowering_unchanged():
    # pass 1 captures every candidate of every problem and rolls back: its plan is the heuristic's
    mod = _tiny_cnn()
    heur = Lowerer(mod, LowerOptions(for_arch("sm_90"), precision="fp16")).run()
    survey = tuning.SurveySelector(None)
    got = Lowerer(mod, _opts(), survey).run()
    assert _plan_fingerprint(got) == _plan_fingerprint(heur)
    assert survey.problems, "tiny_cnn has tunable convolutions"
    for p in survey.problems.values():
        assert not p.baseline.why_not
        caps = [p.baseline] + p.others
        # kernels are named by their code: one name per distinct kernel (shared where two
        # candidates emit the same one: compiled once), never one name for two kernels
        bodies: dict = {}
        for c in caps:
            for n, k in c.kernels.items():
                assert bodies.setdefault(n, k.body) == k.body
        assert len(set(bodies.values())) == len(bodies)
        for c in caps:
            if c.why_not:
                continue
            assert c.launches and c.outputs
            for name, k in c.kernels.items():
                assert f"void {name}(" in k.body or f" {name}(" in k.body
            assert any(r.data is None and r.shared for r in c.roots.values())  # operands: random
            assert any(r.result for r in c.roots.values())  # results: poisoned, compared
    # conv weights are captured with their real (pre-transformed) bytes
    assert any(r.data is not None for p in survey.problems.values() for c in [p.baseline] + p.others
               for r in c.roots.values())


def test_identical_problems_are_timed_once():
    mod = _module(_two_matmuls(), "fp16")
    timed = []

    def timer(c, p):
        timed.append((c.problem.key, c.name, _params_key(p)))
        return stand_in_time(c, p)
    plan = tuning.lower_tuned(mod, _opts(), tuning.StandInRunner(timer))
    assert len(timed) == len(set(timed)), "each (problem, candidate) timed once"
    assert plan.tuning["problems"] <= len({k for k, _, _ in timed})  # (a round may time problems a choice drops)
    survey = tuning.SurveySelector(None)
    Lowerer(mod, _opts(), survey).run()
    assert sorted(p.count for p in survey.problems.values())[-1] == 2  # the two MatMul+Relu of one shape
    shared = next(k for k, p in survey.problems.items() if p.count == 2)
    n_timed = len({(c, q) for k, c, q in timed if k == shared})
    assert n_timed == 1 + len(survey.problems[shared].others)
    recs = [l.tuning for l in plan.launches if getattr(l, "tuning", None)]
    assert len(recs) >= 3  # every MatMul's launches carry its problem's record


# ---------------------------------------------------------------- picking

def _fastest_by(pref):
    """A stand-in timer where `pref(candidate, params)` sorts: the smallest is fastest."""
    return lambda c, p: 1e-3 + 1e-6 * pref(c, p)


def test_picks_the_fastest_correct_candidate():
    mod = _module(_matmul(256, 512, 512), "fp16")
    survey = tuning.SurveySelector(None)
    Lowerer(mod, _opts(), survey).run()
    p = _gemm_problem(survey)
    caps = [c for c in [p.baseline] + p.others if not c.why_not]
    assert len(caps) > 2
    want = caps[-1]  # the last of the space: not the heuristic's default
    timer = lambda c, q: 1e-4 if (c.name, _params_key(q)) == (want.variant, _params_key(want.params)) else 1e-3
    plan = tuning.lower_tuned(mod, _opts(), tuning.StandInRunner(timer))
    assert (want.variant, _params_key(want.params)) in _selected(plan)
    (rec,) = {json.dumps(l.tuning, sort_keys=True) for l in plan.launches if getattr(l, "tuning", None)}
    rec = json.loads(rec)
    assert rec["source"] == "tuned" and rec["variant"] == want.variant and rec["params"] == want.params
    assert rec["time_ms"] == pytest.approx(0.1)
    assert rec["heuristic"]["variant"] == p.baseline.variant and rec["heuristic"]["time_ms"] == pytest.approx(1.0)
    assert rec["tried"] == len(caps) and rec["rejected"] == []
    assert plan.tuning["changed_from_heuristic"] == 1


def test_a_wrong_candidate_is_rejected_never_picked():
    mod = _module(_matmul(256, 512, 512), "fp16")
    survey = tuning.SurveySelector(None)
    Lowerer(mod, _opts(), survey).run()
    p = _gemm_problem(survey)
    bad = p.others[0]
    fastest_bad = lambda c, q: 1e-6 if (c.name, _params_key(q)) == (bad.variant, _params_key(bad.params)) else 1e-3
    is_bad = lambda cap: (cap.variant, _params_key(cap.params)) == (bad.variant, _params_key(bad.params))
    with pytest.warns(tuning.WrongCandidateWarning, match="rejected: wrong output"):
        plan = tuning.lower_tuned(mod, _opts(), tuning.StandInRunner(fastest_bad, wrong=is_bad))
    assert (bad.variant, _params_key(bad.params)) not in _selected(plan)
    rec = next(l.tuning for l in plan.launches if getattr(l, "tuning", None))
    (rej,) = [r for r in rec["rejected"] if r["why"].startswith("wrong output")]
    assert rej["variant"] == bad.variant and rej["params"] == bad.params
    assert plan.tuning["wrong_candidates"] == 1
    # the plan.json record says it too
    pj = plan_to_json(plan, arch="sm_90", precision="fp16", tf32=False, passes=[], weights_sha="0",
                      source_sha="0", backend="nvrtc")
    assert pj["tuning"]["mode"] == "tuned" and pj["tuning"]["wrong_candidates"] == 1
    recs = [l["tuning"] for l in pj["launches"] if "tuning" in l]
    assert recs and any(r["why"].startswith("wrong output") for r in recs[0]["rejected"])


def test_a_failing_baseline_keeps_the_heuristic_and_says_why():
    mod = _module(_matmul(256, 512, 512), "fp16")
    heur = Lowerer(mod, LowerOptions(for_arch("sm_90"), precision="fp16")).run()
    plan = tuning.lower_tuned(mod, _opts(), tuning.StandInRunner(fail=lambda cap: "launch failed: bad"))
    assert _selected(plan) == _selected(heur)
    rec = next(l.tuning for l in plan.launches if getattr(l, "tuning", None))
    assert rec["source"] == "heuristic" and "baseline failed" in rec["why"]
    assert plan.tuning["heuristic"] == plan.tuning["problems"] == 2 and plan.tuning["tuned"] == 0


def test_a_failing_candidate_is_rejected():
    mod = _module(_matmul(256, 512, 512), "fp16")
    survey = tuning.SurveySelector(None)
    Lowerer(mod, _opts(), survey).run()
    p = _gemm_problem(survey)
    victim = p.others[0]
    hit = lambda cap: (cap.variant, _params_key(cap.params)) == (victim.variant, _params_key(victim.params))
    plan = tuning.lower_tuned(mod, _opts(), tuning.StandInRunner(
        lambda c, q: 1e-6 if (c.name, _params_key(q)) == (victim.variant, _params_key(victim.params)) else 1e-3,
        fail=lambda cap: "too many resources requested for launch" if hit(cap) else None))
    assert (victim.variant, _params_key(victim.params)) not in _selected(plan)
    rec = next(l.tuning for l in plan.launches if getattr(l, "tuning", None))
    assert any(r["why"].startswith("failed: too many resources") for r in rec["rejected"])


def test_integer_operands_that_are_not_constants_are_not_randomised(monkeypatch):
    # a Gather with runtime indices, made tunable (two params) for the test: random indices
    # could be out of range, so the problem keeps the heuristic and says why
    import dataclasses
    from nnc.codegen import variants
    from nnc.codegen.lower import _ensure_loaded
    _ensure_loaded()
    real = variants.REGISTRY["Gather"][0]
    twin = dataclasses.replace(real, space=lambda p: [{"t": 1}, {"t": 2}], may_decline=True)
    monkeypatch.setitem(variants.REGISTRY, "Gather", [twin])
    rng = np.random.default_rng(0)
    m = mk([N("Gather", ["table", "idx"], ["y"], axis=0)], [("idx", 7, [64])], [("y", F)],
           [("table", rng.standard_normal((100, 256)).astype(np.float32))])
    mod = _module(m, "fp32")
    survey = tuning.SurveySelector(None)
    Lowerer(mod, _opts("fp32"), survey).run()
    (p,) = survey.problems.values()
    assert "integer operand" in p.skip and "not a constant" in p.skip
    plan = tuning.lower_tuned(mod, _opts("fp32"), tuning.StandInRunner())
    rec = next(l.tuning for l in plan.launches if getattr(l, "tuning", None))
    assert rec["source"] == "heuristic" and "integer operand" in rec["why"]


def test_mismatch_tolerances_come_from_the_dtype():
    cap = tuning.Capture("v", {}, outputs=[(0, 0, "float16", (4,))])
    ref = [np.array([1.0, 2.0, -3.0, np.nan])]
    assert tuning.mismatch([np.array([1.005, 2.0, -3.0, np.nan])], ref, cap) == ""
    assert "off" in tuning.mismatch([np.array([1.2, 2.0, -3.0, np.nan])], ref, cap)
    assert "finite" in tuning.mismatch([np.array([1.0, 2.0, -3.0, 0.0])], ref, cap)
    cap32 = tuning.Capture("v", {}, outputs=[(0, 0, "float32", (3,))])
    assert tuning.mismatch([np.array([1.0, 2.0, 3.0 + 3e-2])], [np.array([1.0, 2.0, 3.0])], cap32) != ""
    assert tuning.tolerance("float32") == 1e-3 and tuning.tolerance("float32", tf32=True) == 3e-3
    assert tuning.tolerance("bfloat16") == 1e-2 and tuning.tolerance("int64") is None
    capi = tuning.Capture("v", {}, outputs=[(0, 0, "int64", (2,))])
    assert "differ" in tuning.mismatch([np.array([1, 3])], [np.array([1, 2])], capi)


# ---------------------------------------------------------------- budget

def test_budget_exhaustion_falls_back_to_the_heuristic():
    mod = _tiny_cnn()
    heur = Lowerer(mod, LowerOptions(for_arch("sm_90"), precision="fp16")).run()
    plan = tuning.lower_tuned(mod, _opts(tune_budget=0.05), tuning.StandInRunner(delay=0.02))
    t = plan.tuning
    assert t["heuristic"] >= 1, t
    recs = [l.tuning for l in plan.launches if getattr(l, "tuning", None)]
    assert any(r.get("why") == "budget" or any(x["why"] == "budget" for x in r.get("rejected", ())) for r in recs)
    assert all(r["source"] == "heuristic" for r in recs if r.get("why") == "budget")


def test_a_variant_with_a_cost_model_is_timed_on_its_best_ranked_points():
    """The wgmma GEMM's ~40-point space: the tuner times the TUNE_TOP_K points its calibrated cost
    model ranks fastest plus the heuristic's default; a variant without a model keeps its space."""
    from nnc.codegen.kernels import gemm, gemm_wgmma as W
    from nnc.codegen.variants import Candidate, Variant
    sm90a = for_arch("sm_90a")

    class P:  # the Problem fields the wgmma variant's space/default/cost read
        target = sm90a
        memo = {"gemm_wgmma": gemm.GemmProblem(4096, 2304, 768, trans_b=True), "gemm_wgmma_bulk": True}
    c = Candidate(W.MATMUL, P())
    assert len(c.space) > tuning.TUNE_TOP_K + 1
    opts = tuning._options([c])
    keys = [_params_key(p) for _, p in opts]
    assert len(keys) <= tuning.TUNE_TOP_K + 1 and _params_key(c.default_params()) in keys
    best = min(c.space, key=lambda p: W.MATMUL.cost(P(), p))
    assert _params_key(best) in keys
    plain = Variant("t.plain", "t", ("T",), None, lambda p: True, lambda p: [{"a": i} for i in range(20)],
                    lambda p, space: space[0])
    assert len(tuning._options([Candidate(plain, None)])) == 20


def test_under_a_budget_the_costliest_problems_are_timed_first():
    from nnc.codegen.tuning_capture import Capture

    def prob(key, grid, count=1):
        base = Capture("v", {}, launches=[("kernel", "k", grid, (128, 1, 1), 0, [], 0)])
        return tuning.TuneProblem(key, key, base, [], count=count)
    seen = []

    class Runner(tuning.Runner):
        def run(self, c, seed, gate=None, cutoff=None):
            seen.append(c.launches[0][2])
            return 1e-3, []
    small, big, shared = prob("a", (4, 1, 1)), prob("b", (400, 1, 1)), prob("c", (60, 1, 1), count=10)
    tuning.tune_problems([small, big, shared], Runner(), tuning.Budget(60), False, lambda m: None)
    assert seen == [(60, 1, 1), (400, 1, 1), (4, 1, 1)]  # no estimate: threads, 60 x 10 ops, then 400, then 4
    seen.clear()
    tuning.tune_problems([small, big, shared], Runner(), None, False, lambda m: None)  # no budget: met order
    assert seen == [(4, 1, 1), (400, 1, 1), (60, 1, 1)]
    # the roofline estimate (FLOPs / bytes of the op, times the ops sharing it) comes first
    seen.clear()
    small.est_s, big.est_s, shared.est_s = 5e-3, 1e-4, 2e-4  # 5 ms; 0.1 ms; 10 x 0.2 ms
    tuning.tune_problems([small, big, shared], Runner(), tuning.Budget(60), False, lambda m: None)
    assert seen == [(4, 1, 1), (60, 1, 1), (400, 1, 1)]


def test_budget_out_before_the_survey_ends():
    mod = _tiny_cnn()
    heur = Lowerer(mod, LowerOptions(for_arch("sm_90"), precision="fp16")).run()
    plan = tuning.lower_tuned(mod, _opts(tune_budget=1e-9), tuning.StandInRunner())
    assert plan.tuning["tuned"] == 0 and plan.tuning["heuristic"] == plan.tuning["problems"] > 0
    assert _plan_fingerprint(plan) == _plan_fingerprint(heur)  # exactly the heuristic's plan
    recs = _records(plan)
    assert recs and all((r["source"], r["why"]) == ("heuristic", "budget") for r in recs)


# ---------------------------------------------------------------- options and the CLI

def test_default_is_heuristic_without_a_gpu(monkeypatch):
    from nnc.api import CompileOptions
    monkeypatch.setattr("nnc.codegen.target.gpu_present", lambda: False)
    monkeypatch.delenv("NNC_TUNE", raising=False)
    lo = CompileOptions().codegen_options(for_arch("sm_90")).lower
    assert lo.tune is False and "no GPU" in lo.tune_reason
    lo = CompileOptions(tune=False).codegen_options(for_arch("sm_90")).lower
    assert lo.tune is False and lo.tune_reason == "--no-tune"
    with pytest.raises(NncError, match="needs a CUDA GPU"):
        CompileOptions(tune=True).codegen_options(for_arch("sm_90"))
    monkeypatch.setattr("nnc.codegen.target.gpu_present", lambda: True)
    lo = CompileOptions(tune_budget=30, timing_cache="tc.json").codegen_options(for_arch("sm_90")).lower
    assert lo.tune and lo.tune_budget == 30.0 and lo.timing_cache == "tc.json" and "GPU is present" in lo.tune_reason
    lo = CompileOptions(backend="reference", codegen=True).codegen_options(for_arch("sm_90")).lower
    assert lo.tune is False and "reference" in lo.tune_reason
    monkeypatch.setenv("NNC_TUNE", "0")
    assert CompileOptions().codegen_options(for_arch("sm_90")).lower.tune is False
    with pytest.raises(NncError, match="tune_budget"):
        CompileOptions(tune_budget=0)
    with pytest.raises(NncError, match="tune_budget"):
        LowerOptions(tune_budget=-1)


def test_cli_no_tune_compiles_with_the_heuristic_and_says_so(tmp_path, capsys):
    from nnc.cli import main
    out = tmp_path / "o"
    assert main(["compile", str(EXAMPLES / "tiny_cnn.onnx"), "-o", str(out), "--shapes", "input:1x3x32x32",
                 "--no-tune", "-v"]) == 0
    pj = json.loads((out / "plan.json").read_text())
    assert pj["tuning"] == {"mode": "heuristic", "why": "--no-tune"}
    assert not any("tuning" in l for l in pj["launches"])
    assert "kernel selection: heuristic (--no-tune)" in capsys.readouterr().err


def test_cli_flags_parse():
    from nnc.cli import build_parser
    a = build_parser().parse_args(["compile", "m.onnx", "-o", "o", "--tune-budget", "12.5", "--timing-cache", "t.json"])
    assert a.tune is None and a.tune_budget == 12.5 and a.timing_cache == "t.json"
    assert build_parser().parse_args(["compile", "m.onnx", "-o", "o", "--tune"]).tune is True
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compile", "m.onnx", "-o", "o", "--tune", "--no-tune"])


def test_progress_reports_the_layer_and_the_best_time():
    from nnc import progress

    class Rec(progress.Reporter):
        def __init__(self):
            super().__init__()
            self.texts = []

        def _start(self, name, total):
            rep = self

            class T(progress.Task):
                def describe(self, text):
                    rep.texts.append((name, text))
            return T()
    rep = Rec()
    with progress.use(rep):
        tuning.lower_tuned(_tiny_cnn(), _opts(), tuning.StandInRunner())
    texts = [t for n, t in rep.texts if n == "tune"]
    assert texts and all("candidates left" in t and "best" in t and " ms" in t for t in texts)
    assert any("Conv" in t or "fused" in t for t in texts)
    assert "tune" in rep.times and "tune-compile" in rep.times


def test_a_problem_cut_by_the_budget_is_used_but_not_cached(tmp_path):
    # the budget runs out inside the first problem's candidates: its best so far is used by this
    # build, recorded as partial, and not written to the timing cache (a later compile tunes it in full)
    mod = _tiny_cnn()
    path = tmp_path / "tc.json"
    class SlowSecond(tuning.StandInRunner):
        runs: dict = {}
        slept = False

        def run(self, cap, seed, gate=None, cutoff=None):
            key = cap.candidate.problem.key
            self.runs[key] = self.runs.get(key, 0) + 1
            if not self.slept and cap.variant == "epilogue.split" and self.runs[key] == 2:
                # a group's second candidate takes the rest of the budget: op by op is cut
                import time
                time.sleep(1.2)
                self.slept = True
            return super().run(cap, seed, gate, cutoff)
    plan = tuning.lower_tuned(mod, _opts(tune_budget=1.0, timing_cache=str(path)), SlowSecond())
    recs = _records(plan)
    assert any(any(x["why"] == "budget" for x in r.get("rejected", ())) for r in recs)
    partial = [r for r in recs if r["source"] == "tuned" and any(x["why"] == "budget" for x in r["rejected"])]
    assert partial
    doc = json.loads(path.read_text())
    for r in partial:
        assert not any(e["variant"] == r["variant"] and e["params"] == r["params"] and
                       any(x["why"] == "budget" for x in e.get("rejected", ())) for e in doc["entries"].values())


def test_compile_is_one_batch_up_front_and_not_charged_to_the_budget():
    # every candidate of a round compiled in one parallel batch before any timing, even under a
    # budget; a compile slower than the whole budget still leaves every problem tuned
    class Batches(tuning.StandInRunner):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.batches = []
            self.names: set = set()

        def prepare(self, caps, progress=None):
            self.batches.append(len({k for c in caps for k in c.kernels}))
            self.names.update(k for c in caps for k in c.kernels)
            return super().prepare(caps, progress)
    r = Batches()
    free = tuning.lower_tuned(_tiny_cnn(), _opts(), r)
    one_batch = r.batches
    assert 1 <= len(one_batch) <= tuning.MAX_ROUNDS
    r = Batches(compile_delay=0.3)
    plan = tuning.lower_tuned(_tiny_cnn(), _opts(tune_budget=0.25), r)
    assert r.batches == one_batch  # the same kernels, one batch a round
    t = plan.tuning
    assert t["tuned"] == free.tuning["tuned"] == t["problems"] and t["heuristic"] == 0, t
    assert t["compile_seconds"] >= 0.3 * len(one_batch) and t["timing_seconds"] < 0.25
    assert t["kernels_compiled"] == len(r.names) <= sum(one_batch)  # distinct over the rounds


def test_layer_names_from_the_model_are_inert_in_the_progress_bar():
    class V:
        def __init__(self, name):
            self.name = name

    class Op:
        name, attrs = "Conv", None

        def __init__(self, res):
            self.results = [V(res)]
    got = tuning.layer_name(Op("x[/bold]\x1b[2J" + "y" * 100))
    assert "[" not in got and "]" not in got and "\x1b" not in got and len(got) < 80


def test_every_candidate_kernel_compiles_with_nvrtc_in_one_batch():
    # what CudaRunner.prepare compiles (no GPU needed): each captured kernel renamed unique, one
    # kernel a unit; a candidate whose kernel does not compile is named, the others unaffected
    import dataclasses
    from nnc.codegen.plan import Kernel
    mod = _module(_matmul(128, 256, 256), "fp16")
    survey = tuning.SurveySelector(None)
    Lowerer(mod, _opts(), survey).run()
    caps = [c for p in survey.problems.values() for c in [p.baseline] + p.others if not c.why_not]
    assert len(caps) > 3
    bad = caps[-1]
    name, k = next(iter(bad.kernels.items()))
    broken = name + "_broken"
    bad.kernels = {broken: dataclasses.replace(k, name=broken, body=k.body.replace(name, broken) +
                                               "\nthis is not CUDA;\n")}
    units, cubins, failed = tuning.compile_captures(caps, "sm_90")
    assert len(units) == len({n for c in caps for n in c.kernels})  # each distinct kernel once
    assert list(failed) == [id(bad)] and failed[id(bad)].startswith("compile failed")
    assert sum(c is None for c in cubins) == 1
    for u, data in zip(units, cubins):
        if data is not None:
            assert data.startswith(b"\x7fELF") and all(b"\0" + n.encode() + b"\0" in data for n in u.kernels)


def test_the_nchw_fallback_conv_is_no_candidate_for_an_nhwc_conv():
    # the gate on the GPU rejected fallback_linalg._conv on ResNet-50's NHWC convs (it reads NCHW):
    # it is no longer a candidate there, so it costs no tuning time and no warning
    survey = tuning.SurveySelector(None)
    Lowerer(_tiny_cnn(), _opts(), survey).run()
    convs = [p for p in survey.problems.values() if "layout=NHWC" in p.key and p.key.split("|")[3].startswith("Conv")]
    assert convs
    for p in convs:
        assert "fallback_linalg._conv" not in [c.variant for c in [p.baseline] + p.others]
