"""Lowering as data (codegen/variants.py, Lowerer.lower_op): variants' applies() emit nothing, the
heuristic selector makes the choices the old first-that-emits driver made, a timed selector on a
deterministic fake timer picks (and caches) the fastest candidate of the declared spaces, a
candidate whose render declines falls to the next, and plan.json / the kernel headers name the
variant and params chosen.

(The full before/after comparison — 30 model/precision cases incl. MobileNetV2, ResNet-50 and
BERT-base, every kernel source, launch and buffer identical, the header params aside — was run
against the tree before this change; the cases below pin its essentials so they stay true.)"""
import json
from pathlib import Path

import numpy as np
import pytest

from nnc.codegen import lower as lower_mod
from nnc.codegen import variants
from nnc.codegen.emit import plan_to_json, render_sources
from nnc.codegen.errors import LoweringError
from nnc.codegen.kernels import gemm, gemm_lowering
from nnc.codegen.lower import lower, lowering
from nnc.codegen.options import LowerOptions
from nnc.codegen.target import for_arch
from nnc.codegen.variants import Candidate, HeuristicSelector, TimedSelector, Variant, register, stand_in_time
from nnc.driver import pipeline_passes
from nnc.ir.errors import NncError
from nnc.onnx_import import import_model
from nnc.pipeline import Pipeline

from .cuda_models import F, N, mk, models
from .test_epilogue_fusion import gemm_block, matmul_block

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _module(model, precision="fp32", shapes=None):
    """The default pipeline without fuse-attention: attention groups are their own family's
    (flash attention); here the attention MatMuls stay GEMMs, which these tests are about."""
    mod = import_model(model, shapes=shapes)
    Pipeline([p for p in pipeline_passes(precision) if p != "fuse-attention"]).run(mod)
    return mod


def _opts(precision="fp32", **kw):
    return LowerOptions(for_arch("sm_90"), precision=precision, **kw)


def _matmul(m=256, k=512, n=512):
    rng = np.random.default_rng(0)
    return mk([N("MatMul", ["x", "w"], ["y"])], [("x", F, [m, k])], [("y", F)],
              [("w", rng.standard_normal((k, n)).astype(np.float32))])


def _kernels_by_variant(plan):
    return [(k.template, k.params["selected"]["variant"]) for k in plan.kernels.values()]


# ---------------------------------------------------------------- applies() emits nothing

def test_applies_has_no_side_effects(monkeypatch):
    real = Variant.check
    seen = {"checks": 0, "no": 0}

    def state(L):
        return (len(L.buffers), len(L.launches), len(L.init_launches), len(L.kernels), len(L.values),
                dict(L.equiv), len(L.transformed))

    def check(self, problem):
        before = state(problem.L)
        fit = real(self, problem)
        assert state(problem.L) == before, f"{self.name}.applies changed the lowering state"
        assert isinstance(fit, variants.Fit) and (fit.ok or fit.why)
        seen["checks"] += 1
        seen["no"] += not fit.ok
        return fit

    monkeypatch.setattr(Variant, "check", check)
    cases = [(str(EXAMPLES / "tiny_transformer.onnx"), "fp32", None), (str(EXAMPLES / "tiny_transformer.onnx"), "fp16", None),
             (str(EXAMPLES / "tiny_cnn.onnx"), "fp16", {"input": [1, 3, 32, 32]}),
             (gemm_block(), "fp16", None), (matmul_block(), "fp32", None), (models()["elementwise"][0], "fp32", None)]
    for model, prec, shapes in cases:
        lower(_module(model, prec, shapes), _opts(prec))
    assert seen["checks"] > 50 and seen["no"] > 5, seen


# ---------------------------------------------------------------- the heuristic = the old choices

# model -> (precision, the kernels' (template, variant) in plan order): the old driver's choices
EPILOGUE_CASES = {
    # fp16 Gemm + scale + bias + Gelu: the input Cast, then one tensor-core GEMM with the epilogue
    # (epilogue.gemm -> gemm.gemm; the output Cast is its out_dtype)
    "gemm_f16": (gemm_block, "fp16", [("elementwise.cu.j2", "elementwise._elementwise"), ("gemm_tc.cu.j2", "gemm.gemm")]),
    # strict fp32, too small for the FFMA kernel: the group splits (epilogue.split): the tiled
    # fallback, then the chain as one fused elementwise kernel
    "matmul_f32_split": (matmul_block, "fp32", [("matmul_fallback.cu.j2", "linalg.matmul"),
                                                ("elementwise.cu.j2", "fused.elementwise")]),
    "matmul_f16": (matmul_block, "fp16", [("elementwise.cu.j2", "elementwise._elementwise"),
                                          ("gemm_tc.cu.j2", "gemm.matmul")]),
}


@pytest.mark.parametrize("name", sorted(EPILOGUE_CASES))
def test_heuristic_keeps_the_old_choices(name):
    build, prec, want = EPILOGUE_CASES[name]
    plan = lower(_module(build(), prec), _opts(prec))
    assert _kernels_by_variant(plan) == want
    (group,) = [s for s in plan.selections if s.variant.startswith("epilogue.")]
    assert group.variant == ("epilogue.split" if "split" in name else "epilogue.gemm")
    assert group.candidates[-1] == "fused.op_by_op" and not group.declined


def test_heuristic_gemm_params_are_the_family_default():
    """Every GEMM the heuristic chose runs gemm.default_params of its problem (the old params_for)."""
    picks = []

    class Recording(HeuristicSelector):
        def choose(self, key, cands):
            c, p = super().choose(key, cands)
            picks.append((c, p, [x.name for x in cands]))
            return c, p

    mod = _module(str(EXAMPLES / "tiny_transformer.onnx"), "fp16")
    plan = lower(mod, _opts("fp16"), selector=Recording())
    gemms = [(c, p) for c, p, names in picks if c.name.startswith("gemm.")]
    assert gemms, "no GEMM chosen"
    for c, p, names in picks:
        assert names[0] == c.name  # the highest priority candidate
    for c, p in gemms:
        assert p == gemm.default_params(c.problem.memo["gemm"], c.problem.target)
        assert p in c.space and c.space == gemm.candidates(c.problem.memo["gemm"], c.problem.target)
    for k in plan.kernels.values():
        if k.params["selected"]["variant"].startswith("gemm."):
            sel = k.params["selected"]["params"]
            assert all(k.params[a] == sel[a] for a in ("BM", "BN", "BK"))


def test_small_fp32_matmul_keeps_the_fallback_large_takes_ffma():
    small = lower(_module(_matmul(64, 64, 64)), _opts())
    assert _kernels_by_variant(small) == [("matmul_fallback.cu.j2", "linalg.matmul")]
    (sel,) = small.selections
    assert "MatMul(" in sel.op and sel.candidates == ("linalg.matmul",)  # gemm.matmul does not apply (F32_MIN_CTAS)
    big = lower(_module(_matmul(2048, 512, 2048)), _opts())
    assert _kernels_by_variant(big) == [("gemm_f32.cu.j2", "gemm.matmul")]
    (sel,) = big.selections
    assert sel.candidates == ("gemm.matmul", "linalg.matmul") and sel.variant == "gemm.matmul"


def test_gemm_applies_explains_why_not():
    mod = _module(_matmul(64, 64, 64))
    L = lower_mod.Lowerer(mod, _opts())
    lower_mod._ensure_loaded()
    op = next(o for o in mod.main.ops if o.name == "MatMul")
    for a in mod.main.args:
        L.values[id(a)] = L.new_buffer(a.name, a.type.dtype, L.static_shape(a), "input")
    fit = gemm_lowering.MATMUL.check(lower_mod.Problem(L, op))
    assert not fit and "F32_MIN_CTAS" in fit.why
    assert len(L.buffers) == 1  # only the input made above


# ---------------------------------------------------------------- a timed selector on a fake timer

def _fastest_tile(pr, target, timer):
    return min(gemm.candidates(pr, target), key=lambda p: timer(p))


def test_timed_selector_picks_the_fastest_and_records_it():
    # the fake timer: the linalg fallback slow, GEMM tiles by a fixed preference the heuristic does
    # not share (the largest BM*BN tile, then the most stages) -> a deterministic unique minimum.
    # TF32: a plain MatMul (no casts, so no epilogue group) with two candidates.
    calls = []

    def tile_time(p):
        return 1.0 - p["BM"] * p["BN"] * 1e-6 - p.get("STAGES", 0) * 1e-9 + p["BK"] * 1e-12

    def timer(c: Candidate, params: dict) -> float:
        calls.append((c.name, json.dumps(params, sort_keys=True)))
        return 1.0 if "BM" not in params else tile_time(params)

    sel = TimedSelector(timer)
    mod = _module(_matmul(256, 512, 512))
    plan = lower(mod, _opts(tf32=True), selector=sel)
    (k,) = [k for k in plan.kernels.values() if k.template == "gemm_tc.cu.j2"]
    chosen = k.params["selected"]
    assert chosen["variant"] == "gemm.matmul"
    pr = gemm.matmul_problem([256, 512], [512, 512], "float32", tf32=True)
    target = for_arch("sm_90")
    best = _fastest_tile(pr, target, tile_time)
    assert best != gemm.default_params(pr, target)  # so the test can tell the selectors apart
    assert chosen["params"] == best and all(k.params[a] == best[a] for a in ("BM", "BN", "BK", "STAGES"))
    (s,) = [s for s in plan.selections if s.variant == "gemm.matmul"]
    assert s.params == best and s.candidates == ("gemm.matmul", "linalg.matmul")
    # every point of both declared spaces was timed, once
    n_space = len(gemm.candidates(pr, target)) + 1
    assert len(calls) == n_space and len(set(calls)) == n_space
    (rows,) = [r for key, r in sel.timings.items() if "MatMul" in key]
    assert min(rows, key=lambda r: r[2])[:2] == ("gemm.matmul", best)
    # the cache: the same problem again is not timed again, and gets the same choice
    plan2 = lower(_module(_matmul(256, 512, 512)), _opts(tf32=True), selector=sel)
    assert len(calls) == n_space
    assert [k.params for k in plan2.kernels.values()] == [k.params for k in plan.kernels.values()]


def test_timed_selector_can_choose_a_lower_priority_variant():
    sel = TimedSelector(lambda c, p: 0.5 if c.name.startswith("linalg.") else 1.0)
    plan = lower(_module(_matmul(256, 512, 512)), _opts(tf32=True), selector=sel)
    assert _kernels_by_variant(plan) == [("matmul_fallback.cu.j2", "linalg.matmul")]
    assert lower(_module(_matmul(256, 512, 512)), _opts(tf32=True)).selections[-1].variant == "gemm.matmul"


def test_stand_in_selector_option_is_deterministic():
    def run():
        mod = _module(str(EXAMPLES / "tiny_transformer.onnx"), "fp16")
        plan = lower(mod, _opts("fp16", selector="stand-in"))
        return [(k.name, k.template, json.dumps(k.params, sort_keys=True, default=str)) for k in plan.kernels.values()]
    a, b = run(), run()
    assert a == b and any('"gemm.' in p for _, _, p in a)
    with pytest.raises(NncError, match="selector"):
        _opts(selector="fastest-please")


def test_stand_in_time_uses_the_cost_model():
    mod = _module(_matmul(256, 512, 512))
    L = lower_mod.Lowerer(mod, _opts(tf32=True))
    op = next(o for o in mod.main.ops if o.name == "MatMul")
    p = lower_mod.Problem(L, op)
    assert gemm_lowering.MATMUL.check(p)
    c = Candidate(gemm_lowering.MATMUL, p)
    times = [stand_in_time(c, q) for q in c.space]
    assert len(set(times)) > 1 and all(t > 0 for t in times)
    assert stand_in_time(c, c.space[0]) == stand_in_time(c, c.space[0])


# ---------------------------------------------------------------- a declining render falls through

def test_declining_candidate_falls_to_the_next():
    lower_mod._ensure_loaded()
    seen = []

    def decline(ctx):
        seen.append(ctx.op.name)
        return None
    lowering("Softsign", priority=97)(decline)
    try:
        m = mk([N("Softsign", ["x"], ["y"])], [("x", F, [3])], [("y", F)])
        # the timed selector ranks the declining one first: the driver still falls to the next
        sel = TimedSelector(lambda c, p: 0.0 if c.variant.fn is decline else 1.0)
        for selector in (None, sel):
            seen.clear()
            plan = lower(import_model(m), _opts(), selector=selector)
            assert seen == ["Softsign"]
            (s,) = plan.selections
            assert s.declined == ("test_variants.decline",) and s.variant != "test_variants.decline"
            assert plan.kernels[plan.launches[0].kernel].params["selected"]["variant"] == s.variant
    finally:
        lower_mod.LOWERINGS["Softsign"] = [e for e in lower_mod.LOWERINGS["Softsign"] if e.fn is not decline]


def test_a_declared_variant_may_not_decline():
    lower_mod._ensure_loaded()
    v = register(Variant("test.silent", "test", ("Softsign",), lambda ctx, p, params: None, priority=96))
    try:
        m = mk([N("Softsign", ["x"], ["y"])], [("x", F, [3])], [("y", F)])
        with pytest.raises(LoweringError, match="test.silent applies .* but its render declined"):
            lower(import_model(m), _opts())
    finally:
        lower_mod.LOWERINGS["Softsign"] = [e for e in lower_mod.LOWERINGS["Softsign"] if e is not v]


def test_two_families_at_one_priority_is_an_error():
    lower_mod._ensure_loaded()
    with pytest.raises(RuntimeError, match="twice"):
        register(Variant("test.other", "other", ("MatMul",), lambda ctx, p, params: True,
                         priority=gemm_lowering.FAST_PRIORITY))
    assert all(v.name != "test.other" for v in lower_mod.LOWERINGS["MatMul"])


# ---------------------------------------------------------------- plan.json and headers

def test_plan_json_and_headers_name_the_variant():
    mod = _module(gemm_block(), "fp16")
    plan = lower(mod, _opts("fp16"))
    pj = plan_to_json(plan, arch="sm_90", precision="fp16", tf32=False, passes=[], weights_sha="0",
                      source_sha="0", backend="nvrtc")
    for k in pj["kernels"]:
        assert k["params"]["selected"]["variant"] in {v.name for vs in lower_mod.LOWERINGS.values() for v in vs}
    (g,) = [k for k in pj["kernels"] if k["template"] == "gemm_tc.cu.j2"]
    assert g["params"]["selected"]["variant"] == "gemm.gemm"
    assert {"BM", "BN", "BK", "WARPS_M", "WARPS_N", "STAGES"} <= set(g["params"]["selected"]["params"])
    json.dumps(pj, default=str)  # JSON-ready
    src = render_sources(plan, "m", "sm_90", "fp16", weights_sha256="0")["model.cu"]
    head = src[src.index(f"// kernel {g['name']}"):]
    head = head[:head.index("\n// implements:")]
    assert '"selected":{"params":{' in head and '"variant":"gemm.gemm"' in head


def test_forced_selector_takes_its_variant_or_says_which_were_candidates():
    from nnc.codegen.variants import ForcedSelector

    def v(name, space):
        return Variant(name, "t", ("T",), None, lambda p: True, lambda p: space, lambda p, sp: sp[0])
    a, b = Candidate(v("t.a", [{"x": 1}, {"x": 2}]), None), Candidate(v("t.b", [{"y": 3}]), None)
    assert ForcedSelector("t.b").choose("k", [a, b]) == (b, {"y": 3})
    assert ForcedSelector("t.a", {"x": 2}).choose("k", [a, b]) == (a, {"x": 2})
    assert ForcedSelector("t.z").choose("k", [a, b]) == (a, {"x": 1})  # elsewhere: the heuristic
    with pytest.raises(LookupError, match=r"t.z is not a candidate \(\['t.a', 't.b'\]\)"):
        ForcedSelector("t.z", strict=True).choose("k", [a, b])
