"""The reference backend inside the planned arena (codegen/plan_exec.py): the plan itself runs on
the CPU, every value at its plan.json offset in one byte arena, temporaries poisoned.

- The example models at fp32 and fp16, the kernel-family models and onnx's light_* models give
  exactly the plain interpreter's outputs (the same reference semantics on the same bytes), on two
  fresh inputs (the arena is poisoned before each run; the init phase runs once, at load).
- A broken plan gives wrong answers: two live buffers placed over each other (the memory planner
  and its checker monkeypatched), a scratch temp moved over a tensor that outlives its step (only
  the poison writes a temp here, so the poison is what catches it), a view's offset shifted.
- plan.json carries the steps and memory["fused_away_bytes"]; `nnc run` and nnc.load run in the
  arena by default when the plan has steps; a tampered plan is a one-line error.

The light models at full size cost seconds each through numpy: CI runs LIGHT_CI (the six whose
weights are small); the three whose weights are ConstantOfShape fills of hundreds of MB (AlexNet,
VGG-19, ZFNet-512: 240-570 MB of persistent init values) are marked slow.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from nnc.codegen import memory
from nnc.codegen.emit import weights_blob
from nnc.codegen.lower import lower
from nnc.codegen.plan_exec import PlanExecError, PlanExecutor
from nnc.ir.interp import Interpreter
from nnc.onnx_import import import_model, parse_shapes
from nnc.pipeline import DEFAULT_PIPELINE, run_passes
from tests.conformance.test_light_models import LIGHT, MODELS as LIGHT_MODELS, dummy_inputs

from .cuda_models import models, random_feed

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = {"tiny_cnn": "input:1x3x32x32", "tiny_transformer": "", "tiny_lstm": ""}
LIGHT_BIG = ("light_bvlc_alexnet", "light_vgg19", "light_zfnet512")
LIGHT_CI = [n for n in LIGHT_MODELS if n not in LIGHT_BIG]


def _module(model, shapes="", precision="fp32"):
    m = import_model(model, shapes=parse_shapes(shapes))
    passes = list(DEFAULT_PIPELINE)
    if precision != "fp32":
        passes += [f"to-{precision}", "canonicalize", "dce"]
    run_passes(m, passes)
    return m


def _lower(m, precision="fp32"):
    try:
        from nnc.codegen.options import LowerOptions
        from nnc.codegen.target import resolve_target
        return lower(m, LowerOptions(resolve_target("sm_90"), precision, False))
    except ImportError:  # before typed options
        return lower(m, {"arch": "sm_90", "precision": precision, "tf32": False})


def _feed(m, rng):
    out = {}
    for a in m.main.args:
        shape, dt = [int(d) for d in a.type.shape], a.type.dtype
        if dt.is_float:
            out[a.name] = rng.standard_normal(shape).astype(dt.np)
        elif dt.kind == "bool":
            out[a.name] = rng.random(shape) < 0.5
        else:
            out[a.name] = rng.integers(0, 4, shape).astype(dt.np)
    return out


def _same(got: dict, ref: dict) -> list:
    """Names of the outputs that differ (bit for bit, NaN equal to NaN; shapes too)."""
    bad = []
    for k, r in ref.items():
        g = got[k]
        if g.shape != r.shape or g.dtype != r.dtype or not np.array_equal(g, r, equal_nan=r.dtype.kind in "fc"):
            bad.append(k)
    return bad


def _check_exact(m, plan, feeds):
    t0 = time.perf_counter()
    ex = PlanExecutor.from_plan(plan, m)
    t_load = time.perf_counter() - t0
    t_arena = t_interp = 0.0
    for feed in feeds:
        t0 = time.perf_counter()
        ref = Interpreter(m).run(feed)
        t_interp += time.perf_counter() - t0
        t0 = time.perf_counter()
        got = ex.run(feed)
        t_arena += time.perf_counter() - t0
        assert set(got) == set(ref)
        assert _same(got, ref) == [], f"outputs {_same(got, ref)} differ from the interpreter's"
    return ex, got, (t_load, t_arena / len(feeds), t_interp / len(feeds))


# ---------------------------------------------------------------- matches the interpreter

@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_runs_in_the_arena(name, precision):
    m = _module(str(ROOT / "examples" / f"{name}.onnx"), EXAMPLES[name], precision)
    plan = _lower(m, precision)
    rng = np.random.default_rng(0)
    _, _, (tl, ta, ti) = _check_exact(m, plan, [_feed(m, rng), _feed(m, rng)])
    print(f"{name} {precision}: {len(plan.steps)} steps, load {tl * 1e3:.0f} ms, run {ta * 1e3:.0f} ms "
          f"(interpreter {ti * 1e3:.0f} ms)")


@pytest.mark.parametrize("name", sorted(models()))
def test_kernel_family_model_runs_in_the_arena(name):
    model, spec = models()[name]
    m = import_model(model)
    run_passes(m)
    plan = _lower(m)
    rng = np.random.default_rng(1)
    _check_exact(m, plan, [random_feed(spec, rng), random_feed(spec, rng)])


def _light(name, precision="fp32"):
    model = onnx.load(str(LIGHT / f"{name}.onnx"))
    t0 = time.perf_counter()
    m = _module(model, precision=precision)
    plan = _lower(m, precision)
    t_compile = time.perf_counter() - t0
    feed = dummy_inputs(model)
    _, out, (tl, ta, ti) = _check_exact(m, plan, [feed])
    if precision == "fp32":
        expected = numpy_helper.to_array(onnx.load_tensor(str(LIGHT / f"{name}_output_0.pb")))
        np.testing.assert_allclose(out[m.main.results[0].name], expected, rtol=1e-3, atol=1e-7)
    print(f"{name} {precision}: {len(plan.steps)} steps, {len(plan.launches)} launches, arena {plan.memory['arena_bytes']} B; "
          f"import+passes+lowering {t_compile:.2f} s, load (init phase) {tl:.2f} s, run {ta:.2f} s, "
          f"interpreter {ti:.2f} s")


@pytest.mark.parametrize("name", LIGHT_CI)
def test_light_model_runs_in_the_arena(name):
    _light(name)


def test_light_resnet50_fp16_runs_in_the_arena():
    _light("light_resnet50", "fp16")


@pytest.mark.slow
@pytest.mark.parametrize("name", LIGHT_BIG)
def test_big_light_model_runs_in_the_arena(name):
    _light(name)


def test_dynamic_outputs_in_the_arena():
    """NonZero's output: written compact at the start of its max-size buffer, its true extent
    carried to the output (the layout the CUDA runtime reads back)."""
    from .cuda_models import nonzero_view_model
    m = import_model(nonzero_view_model())
    run_passes(m)
    plan = _lower(m)
    rng = np.random.default_rng(2)
    ex, _, _ = _check_exact(m, plan, [_feed(m, rng), {"x": np.zeros((4, 6), np.float32)}])
    assert ex.run({"x": np.ones((4, 6), np.float32)})["nz"].shape == (2, 24)


# ---------------------------------------------------------------- a wrong plan gives wrong answers

def _tiny_cnn():
    m = _module(str(ROOT / "examples" / "tiny_cnn.onnx"), EXAMPLES["tiny_cnn"])
    return m, _feed(m, np.random.default_rng(3))


def test_overlapping_live_buffers_give_wrong_answers(monkeypatch):
    """Every arena buffer at offset 0 (the placement and its checker monkeypatched): the plan is
    wrong, and the arena run says so; the honest plan of the same model is exact."""
    m, feed = _tiny_cnn()
    ref = Interpreter(m).run(feed)
    assert _same(PlanExecutor.from_plan(_lower(m), m).run(feed), ref) == []
    monkeypatch.setattr(memory, "place", lambda iv: ([0] * len(iv), "all-at-zero"))
    monkeypatch.setattr(memory, "check_placement", lambda *a, **k: None)
    bad = _lower(m)
    assert bad.memory_method == "all-at-zero"
    assert _same(PlanExecutor.from_plan(bad, m).run(feed), ref) != []
    monkeypatch.undo()
    with pytest.raises(memory.ArenaOverlapError):  # what the real checker says of such a placement
        monkeypatch.setattr(memory, "place", lambda iv: ([0] * len(iv), "all-at-zero"))
        _lower(m)


def _executor_json(plan, m):
    ex = PlanExecutor.from_plan(plan, m)
    return copy.deepcopy(ex.plan), weights_blob(plan)


def _live_across(pj: dict, step: dict) -> list:
    """Root arena buffers produced before `step` and read after it (they outlive the step)."""
    steps = pj["steps"]
    k = steps.index(step)
    bufs = pj["buffers"]
    root = lambda i: bufs[i]["alias_of"] if bufs[i]["alias_of"] is not None else i
    before = {root(r) for s in steps[:k] for r in s["results"] if not s["init"]}
    after = {root(o) for s in steps[k + 1:] for o in s["operands"] if o is not None}
    return sorted(b for b in before & after if bufs[b]["region"] == "arena")


def test_a_temp_over_a_live_tensor_gives_wrong_answers():
    """A step's scratch temp moved onto a tensor that outlives the step: nothing but the poison
    writes a temp in the CPU run, so the poison is what makes the answer wrong."""
    m, feed = _tiny_cnn()
    plan = _lower(m)
    pj, blob = _executor_json(plan, m)
    ref = Interpreter(m).run(feed)
    hit = None
    for st in pj["steps"]:
        temps = [t for t in st["temps"] if pj["buffers"][t]["region"] == "arena"]
        live = _live_across(pj, st)
        if temps and live:
            hit = (temps[0], live[0])
            break
    assert hit is not None, "tiny_cnn has a step with a temp while another tensor is live"
    t, victim = hit
    pj["buffers"][t]["offset"] = pj["buffers"][victim]["offset"]
    end = pj["buffers"][t]["offset"] + pj["buffers"][t]["nbytes"]
    pj["memory"]["arena_bytes"] = max(pj["memory"]["arena_bytes"], end)
    assert _same(PlanExecutor(pj, m, blob).run(feed), ref) != []


def test_a_shifted_view_offset_gives_wrong_answers():
    """A view (a reshape without a kernel) that reads 4 bytes past where its root was written."""
    # tiny_cnn's view read by a later step is the Flatten of the pooled vector, which fuse-pooling
    # takes into the classifier's kernel: built without it
    m = import_model(str(ROOT / "examples" / "tiny_cnn.onnx"), shapes=parse_shapes(EXAMPLES["tiny_cnn"]))
    run_passes(m, [p for p in DEFAULT_PIPELINE if p != "fuse-pooling"])
    feed = _feed(m, np.random.default_rng(3))
    plan = _lower(m)
    pj, blob = _executor_json(plan, m)
    ref = Interpreter(m).run(feed)
    read = {o for s in pj["steps"] for o in s["operands"] if o is not None}
    views = [b for b in pj["buffers"] if b["alias_of"] is not None and b["id"] in read and b["region"] == "arena"
             and b["nbytes"] >= 4]
    assert views, "tiny_cnn has a view read by a later step"
    v = views[0]
    v["offset"] += 4
    pj["memory"]["arena_bytes"] += 256
    assert _same(PlanExecutor(pj, m, blob).run(feed), ref) != []


def test_malformed_plans_are_clear_errors():
    m, feed = _tiny_cnn()
    pj, blob = _executor_json(_lower(m), m)
    bad = copy.deepcopy(pj)
    b = next(b for b in bad["buffers"] if b["region"] == "arena")
    b["offset"] = bad["memory"]["arena_bytes"]
    with pytest.raises(PlanExecError, match=rf"buffer {b['id']} .* lies outside region arena"):
        PlanExecutor(bad, m, blob)
    bad = copy.deepcopy(pj)
    bad["memory"]["arena_bytes"] = 1 << 50  # a tampered size allocates nothing
    b = next(b for b in bad["buffers"] if b["region"] == "arena" and b["alias_of"] is None)
    b["offset"] = 1 << 45
    with pytest.raises(PlanExecError, match="the arena buffers reach byte"):
        PlanExecutor(bad, m, blob)
    bad = copy.deepcopy(pj)
    bad["steps"][0]["op"] = 10 ** 6
    with pytest.raises(PlanExecError, match=r"steps\[0\]: op 1000000 is not an op"):
        PlanExecutor(bad, m, blob)
    bad = copy.deepcopy(pj)
    bad["steps"] = [s for s in bad["steps"] if s["launches"] != [0, 0]][1:]
    with pytest.raises(PlanExecError, match="belongs to no step"):
        PlanExecutor(bad, m, blob)
    bad = copy.deepcopy(pj)
    del bad["steps"]
    with pytest.raises(PlanExecError, match="no \"steps\""):
        PlanExecutor(bad, m, blob)
    ex = PlanExecutor(pj, m, blob)
    with pytest.raises(Exception, match="expected float32"):
        ex.run({k: v.astype(np.float64) for k, v in feed.items()})


# ---------------------------------------------------------------- plan.json, nnc run, nnc.load

def test_plan_json_steps_and_fused_away_bytes():
    m, _ = _tiny_cnn()
    plan = _lower(m)
    pj, _ = _executor_json(plan, m)
    mem = pj["memory"]
    assert {"arena_bytes", "naive_bytes", "peak_live_bytes", "fused_away_bytes"} <= set(mem)
    # independently: over fused ops, the bytes of what their bodies define and do not return
    want = 0
    for op in m.main.ops:
        if op.name == "fused":
            ret = {id(v) for v in op.attrs.body.results}
            want += sum(int(np.prod(r.type.shape)) * r.type.dtype.np.itemsize for o in op.attrs.body.ops
                        if o.name != "const" for r in o.results if id(r) not in ret)
    assert mem["fused_away_bytes"] == want
    assert len(pj["steps"]) == sum(op.name != "const" for op in m.main.ops)
    s = pj["steps"][0]
    assert set(s) == {"op", "operands", "results", "temps", "launches", "init_launches", "init"}
    covered = sorted(t for s in pj["steps"] for t in range(*s["launches"]))
    assert covered == sorted(set(covered)) and len(covered) >= len(pj["launches"]) - len(pj["outputs"])


def _nnc(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "nnc.cli", *map(str, args)], capture_output=True, text=True)
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def cnn_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn")
    _nnc("compile", ROOT / "examples" / "tiny_cnn.onnx", "-o", out, "--shapes", "input:2x3x32x32")
    return out


def test_nnc_run_reference_runs_in_the_arena(cnn_out, tmp_path):
    p = _nnc("run", cnn_out, "--save", tmp_path / "a.npz")
    assert "(reference in the plan's arena," in p.stdout
    p = _nnc("run", cnn_out, "--no-arena", "--save", tmp_path / "b.npz")
    assert "(reference," in p.stdout
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    p = _nnc("run", cnn_out, "--in-arena", "--backend", "cuda", check=False)
    assert p.returncode == 1 and "not with --backend cuda" in p.stderr


def test_nnc_run_in_arena_errors(cnn_out, tmp_path):
    import shutil
    d = tmp_path / "tampered"
    shutil.copytree(cnn_out, d)
    pj = json.loads((d / "plan.json").read_text())
    b = next(b for b in pj["buffers"] if b["region"] == "arena")
    b["offset"] = 1 << 40
    (d / "plan.json").write_text(json.dumps(pj))
    p = _nnc("run", d, check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "lies outside region arena" in p.stderr
    assert _nnc("run", d, "--no-arena").returncode == 0  # the interpreter never reads the offsets
    nocg = tmp_path / "nocg"
    _nnc("compile", ROOT / "examples" / "tiny_cnn.onnx", "-o", nocg, "--shapes", "input:1x3x32x32", "--no-codegen")
    assert "(reference," in _nnc("run", nocg).stdout  # no steps: the plain interpreter
    p = _nnc("run", nocg, "--in-arena", check=False)
    assert p.returncode == 1 and "no \"steps\"" in p.stderr


def test_load_reference_in_the_arena(cnn_out):
    import nnc
    m = nnc.load(cnn_out, backend="reference")
    plain = nnc.load(cnn_out, backend="reference", in_arena=False)
    assert m.in_arena and not plain.in_arena
    x = np.random.default_rng(4).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert np.array_equal(m(x), plain(x))
    with pytest.raises(nnc.NncError, match="not with backend='cuda'"):
        nnc.load(cnn_out, backend="cuda", in_arena=True)
