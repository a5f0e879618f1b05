"""The load-time init phase (codegen/init_phase.py): values computed from constants only (big
ConstantOfShape/Range/EyeLike results that constant folding leaves as ops, and everything derived
from them and other constants) are computed once at load into the persistent region, never on
every run. CPU: plan structure, plan.json, the generated host code, and a plan simulation with
the arena poisoned between runs; GPU (marked): nnc.load and the C API give the interpreter's
(stored) results on consecutive poisoned runs, the init phase having run exactly once."""
from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import numpy_helper

from nnc.codegen import init_phase
from nnc.codegen.emit import compile_to_dir, plan_to_json
from nnc.codegen.lower import lower
from nnc.codegen.plan import Buffer
from nnc.ir.builder import FOLD_MAX_ELEMENTS
from nnc.ir.interp import Interpreter
from nnc.onnx_import import import_model
from nnc.pipeline import run_passes
from tests.conformance.test_light_models import LIGHT, dummy_inputs

from .cuda_models import N, mk
from .test_plan_sim import simulate

BIG = FOLD_MAX_ELEMENTS + 1  # the smallest result constant folding leaves as an op


def _f32(v):
    return np.array(v, np.float32)


def _i64(v):
    return np.array(v, np.int64)


def _cos(shape, value, out):
    return N("ConstantOfShape", [f"{out}_shape"], [out], value=numpy_helper.from_array(_f32([value]))), \
        (f"{out}_shape", _i64(shape))


def mixed_model():
    """Init values (ConstantOfShape, Range, EyeLike and ops on them) feeding Conv, MatMul and Add
    with runtime inputs, and one init value returned as an output."""
    w, w_s = _cos([64, 64, 5, 5], 0.01, "w")          # 102400 elements: not folded
    b, b_s = _cos([256, 512], 0.5, "b")
    nodes = [w, b,
             N("Range", ["r0", "rn", "rd"], ["r"]),          # [131072] = 0, 1, 2, ...
             N("Reshape", ["r", "b_shape"], ["rr"]),          # a view of the init buffer
             N("Mul", ["b", "rr"], ["b2"]),                   # init, computed from init values
             N("ReduceSum", ["b2", "ax0"], ["colsum"], keepdims=0),  # init, and a graph output
             N("Conv", ["x", "w"], ["c"], pads=[2, 2, 2, 2]),
             N("MatMul", ["x2", "b2"], ["m"]),
             N("Range", ["r0", "an", "ad"], ["ra"]),          # [70000]
             N("Add", ["x3", "ra"], ["a"]),
             N("EyeLike", ["b"], ["eye"], k=3),               # init from an init value
             N("MatMul", ["x2", "eye"], ["me"])]
    inits = [w_s, b_s, ("r0", _f32(0.0)), ("rn", _f32(131072.0)), ("rd", _f32(1.0)),
             ("ax0", _i64([0])), ("an", _f32(70000.0)), ("ad", _f32(1.0))]
    spec = {"x": [1, 64, 8, 8], "x2": [4, 256], "x3": [70000]}
    model = mk(nodes, [(k, T.FLOAT, s) for k, s in spec.items()],
               [("c", T.FLOAT), ("m", T.FLOAT), ("a", T.FLOAT), ("colsum", T.FLOAT), ("me", T.FLOAT)], inits)
    return model, spec


def sim_model():
    """Init values read at run time by the templates test_plan_sim simulates (gather, reduce,
    pad), next to run-time temps that share the arena."""
    s, s_s = _cos([300, 300], 0.25, "s")
    nodes = [s,
             N("Range", ["r0", "rn", "rd"], ["r"]),           # [70000]
             N("Gather", ["r", "idx"], ["g"], axis=0),
             N("EyeLike", ["s"], ["e"], k=1),
             N("Gather", ["e", "idx"], ["rows"], axis=0),
             N("ReduceSum", ["e", "ax0"], ["cs"], keepdims=0),  # init, returned
             N("ReduceMax", ["s", "ax1"], ["smax"], keepdims=0),  # init, returned
             N("Pad", ["x", "pads"], ["px"], mode="constant"),
             N("ReduceSum", ["px", "ax1"], ["sp"], keepdims=0)]
    inits = [s_s, ("r0", _f32(3.0)), ("rn", _f32(70003.0)), ("rd", _f32(1.0)), ("ax0", _i64([0])),
             ("ax1", _i64([1])), ("pads", _i64([1, 1, 1, 1]))]
    model = mk(nodes, [("idx", T.INT64, [5]), ("x", T.FLOAT, [4, 6])],
               [("g", T.FLOAT), ("rows", T.FLOAT), ("cs", T.FLOAT), ("smax", T.FLOAT), ("sp", T.FLOAT)], inits)
    return model


def _prepared(model):
    m = import_model(model)
    run_passes(m)
    return m


def _template(plan, l):
    return plan.kernels[l.kernel].template if l.kind == "kernel" else l.kind


def _roots(plan, l):
    return [plan.root(a) for a in l.args if isinstance(a, Buffer)]


def _check_phases(plan):
    """Init launches touch only constants, init buffers and scratch temps; init buffers are in the
    persistent region, disjoint and inside it."""
    assert all(l.init for l in plan.init_launches) and not any(l.init for l in plan.launches)
    for l in plan.init_launches:
        assert {r.kind for r in _roots(plan, l)} <= {"weight", "const", "init", "temp"}, l.op
    spans = sorted((b.offset, b.offset + b.nbytes) for b in plan.buffers
                   if b.kind == "init" and b.alias_of is None and any(
                       b is r for l in plan.init_launches for r in _roots(plan, l)))
    assert spans and spans[-1][1] <= plan.persistent_bytes == plan.memory["persistent_bytes"]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "init buffers overlap"


# ---------------------------------------------------------------- CPU

def test_input_independent_is_transitive_and_stops_at_inputs():
    m = _prepared(mixed_model()[0])
    init = init_phase.input_independent(m.main)
    names = {r.name for op in m.main.ops for r in op.results if id(r) in init}
    assert {"w", "b", "r", "rr", "b2", "colsum", "ra", "eye"} <= names, names
    assert not names & {"c", "m", "a", "me"}, names


def test_mixed_model_plan(tmp_path):
    m = _prepared(mixed_model()[0])
    plan = lower(m, {"arch": "sm_90"})
    _check_phases(plan)
    assert not [l.op for l in plan.launches if _template(plan, l) == "fill.cu.j2"]
    assert Counter(_template(plan, l) for l in plan.init_launches)["fill.cu.j2"] == 5  # 2 fills, 2 ranges, eye
    # run-time launches read the init values from the persistent region
    read = {r.name for l in plan.launches for r in _roots(plan, l) if r.kind == "init"}
    assert {"w", "ra", "eye", "b2"} <= read, read
    # the init value returned as an output is copied out on every run (the caller owns outputs)
    cs = next(b for b in plan.outputs if b.name == "colsum")
    assert any(l.kind == "memcpy" and l.args[0] is cs and plan.root(l.args[1]).kind == "init" for l in plan.launches)
    # the arena holds only activations: far less than the init values
    assert plan.memory["arena_bytes"] < plan.persistent_bytes

    pj = compile_to_dir(m, tmp_path, arch="sm_90")
    on_disk = json.loads((tmp_path / "plan.json").read_text())
    assert on_disk["init_launches"] == pj["init_launches"] and len(pj["init_launches"]) == len(plan.init_launches)
    assert on_disk["memory"]["persistent_bytes"] == plan.persistent_bytes > 0
    by_id = {b["id"]: b for b in on_disk["buffers"]}
    assert {by_id[b.id]["region"] for b in plan.buffers if b.kind == "init"} == {"persistent"}
    kernels = {k["name"]: k["template"] for k in on_disk["kernels"]}
    assert not [l for l in on_disk["launches"] if kernels.get(l["kernel"]) == "fill.cu.j2"]
    assert {l["kernel"] for l in on_disk["launches"] + on_disk["init_launches"] if l["kind"] == "kernel"} == set(kernels)
    src = (tmp_path / "model.cu").read_text()
    assert "init_phase(m, 0, nullptr, nullptr)" in src and "m->persistent +" in src
    assert "kPersistentBytes = %dULL" % plan.persistent_bytes in src


def test_model_without_generators_has_no_init_phase(tmp_path):
    x = mk([N("Relu", ["x"], ["y"])], [("x", T.FLOAT, [4])], [("y", T.FLOAT)])
    plan = lower(_prepared(x), {"arch": "sm_90"})
    assert plan.init_launches == [] and plan.persistent_bytes == 0
    pj = compile_to_dir(_prepared(x), tmp_path, arch="sm_90")
    assert pj["init_launches"] == [] and "init_phase(" not in (tmp_path / "model.cu").read_text()


def test_simulated_runs_with_poisoned_arena_match_interpreter():
    """Init phase once, then two runs with the arena poisoned before each: every output equals
    the interpreter's, so nothing a run reads was left in (or overwritten in) the arena."""
    mod = _prepared(sim_model())
    plan = lower(mod, {"arch": "sm_90"})
    _check_phases(plan)
    assert not [l for l in plan.launches if _template(plan, l) == "fill.cu.j2"]
    rng = np.random.default_rng(0)
    feed = {"idx": rng.integers(0, 300, 5).astype(np.int64), "x": rng.standard_normal((4, 6)).astype(np.float32)}
    ref = Interpreter(mod).run(feed)

    def outputs(p):
        mem, ok = simulate(p, feed, regions=True, runs=2)
        assert all(ok[p.root(b).id] for b in p.outputs), [b.name for b in p.outputs if not ok[p.root(b).id]]
        return {b.name: mem[p.root(b).id][:b.numel].reshape(b.shape) for b in p.outputs}

    got = outputs(plan)
    for k, r in ref.items():
        np.testing.assert_allclose(got[k], r, rtol=1e-6, atol=1e-6, err_msg=k)
    # the check can fail: without its init phase the plan reads unwritten persistent bytes
    plan.init_launches = []
    bad = outputs(plan)
    assert not all(np.array_equal(bad[k], ref[k]) for k in ("g", "rows", "cs", "smax"))


def test_light_resnet50_fills_run_once_at_load():
    model = onnx.load(str(LIGHT / "light_resnet50.onnx"))
    prepared = _prepared(model)
    # the pipeline's cse merges identical ConstantOfShape weights (35 in the model): one fill each
    fills = sum(op.name == "ConstantOfShape" for op in prepared.main.ops)
    assert 0 < fills <= 35
    plan = lower(prepared, {"arch": "sm_90"})
    run = Counter(_template(plan, l) for l in plan.launches)
    init = Counter(_template(plan, l) for l in plan.init_launches)
    assert run["fill.cu.j2"] == 0 and init["fill.cu.j2"] == fills, (run, init)
    _check_phases(plan)
    pj = plan_to_json(plan, arch="sm_90", precision="fp32", tf32=False, passes=[], weights_sha="",
                      source_sha="", backend="nvrtc")
    kernels = {k["name"]: k["template"] for k in pj["kernels"]}
    assert sum(kernels.get(l["kernel"]) == "fill.cu.j2" for l in pj["launches"]) == 0
    assert sum(kernels.get(l["kernel"]) == "fill.cu.j2" for l in pj["init_launches"]) == fills
    # the ConstantOfShape weights (about 100 MB) live in the persistent region, not weights.bin
    assert pj["memory"]["persistent_bytes"] > 90e6 and pj["weights_bytes"] < 10e6
    assert pj["memory"]["arena_bytes"] < 20e6


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
def test_host_code_with_init_phase_compiles(tmp_path):
    """The C API part of model.cu (nnc_model_create runs the init phase) builds with nvcc."""
    m = _prepared(sim_model())
    compile_to_dir(m, tmp_path, arch="sm_90")
    r = subprocess.run(["nvcc", "-c", "-arch=sm_90", "-I", str(tmp_path), str(tmp_path / "model.cu"),
                        "-o", str(tmp_path / "model.o")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


# ---------------------------------------------------------------- GPU

def _feed_mixed(spec, rng):
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in spec.items()}


def _close(got, ref, name):
    scale = max(1.0, float(np.max(np.abs(ref))))
    err = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) / scale
    assert err <= 1e-3, f"{name}: max rel err {err:.3g}"


@pytest.mark.gpu
def test_gpu_init_phase_runs_once(tmp_path, rng):
    import nnc
    model, spec = mixed_model()
    mod = _prepared(model)
    compile_to_dir(mod, tmp_path, arch=None)
    m = nnc.load(tmp_path)
    assert m.init_runs == 1 and len(m._init_launches) == len(m.plan["init_launches"]) > 0
    feed = _feed_mixed(spec, rng)
    ref = Interpreter(mod).run(feed)
    for _ in range(2):  # consecutive runs, the arena poisoned before each
        got = m.run(feed, output="numpy", poison=True)
        for k, r in ref.items():
            _close(got[k], r, k)
    assert m.init_runs == 1
    # runs read what the init phase left in the persistent region and never recompute it
    m.persistent.fill(0xFF)
    got = m.run(feed, output="numpy")
    assert not np.allclose(got["c"], ref["c"], equal_nan=False)
    m._run_init()
    got = m.run(feed, output="numpy", poison=True)
    for k, r in ref.items():
        _close(got[k], r, k)


@pytest.mark.gpu
def test_gpu_light_resnet50_two_poisoned_runs(tmp_path):
    import nnc
    model = onnx.load(str(LIGHT / "light_resnet50.onnx"))
    compile_to_dir(_prepared(model), tmp_path, arch=None)
    m = nnc.load(tmp_path)
    assert len(m.plan["init_launches"]) >= 35 and m.init_runs == 1
    feed = dummy_inputs(model)
    exp = numpy_helper.to_array(onnx.load_tensor(str(LIGHT / "light_resnet50_output_0.pb")))
    for _ in range(2):
        got = m.run(feed, output="numpy", poison=True)[m.output_names[0]]
        np.testing.assert_allclose(got, exp, rtol=1e-3, atol=1e-5)
    assert m.init_runs == 1


@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
def test_gpu_c_api_create_runs_init_phase(tmp_path, rng):
    """The shared library: <prefix>_create computes the init values once; two runs (outputs
    poisoned with NaN before each) match the interpreter."""
    import cupy
    model, spec = mixed_model()
    mod = _prepared(model)
    pj = compile_to_dir(mod, tmp_path / "out", arch=None)
    out = tmp_path / "out"
    lib_path = tmp_path / "libm.so"
    arch = pj["arch"].replace("sm_", "")
    r = subprocess.run(["nvcc", "-shared", "-Xcompiler", "-fPIC", f"-arch=sm_{arch}", "-I", str(out),
                        str(out / "model.cu"), "-o", str(lib_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    lib = ctypes.CDLL(str(lib_path))
    p = pj["c_api_prefix"]
    create, run, destroy = getattr(lib, f"{p}_create"), getattr(lib, f"{p}_run"), getattr(lib, f"{p}_destroy")
    create.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    destroy.argtypes = [ctypes.c_void_p]
    handle = ctypes.c_void_p()
    assert create(str(out).encode(), ctypes.byref(handle)) == 0
    feed = _feed_mixed(spec, rng)
    ref = Interpreter(mod).run(feed)
    ins = [cupy.asarray(feed[t["name"]]) for t in pj["inputs"]]
    outs = [cupy.empty(t["shape"], np.float32) for t in pj["outputs"]]
    in_ptrs = (ctypes.c_void_p * len(ins))(*[a.data.ptr for a in ins])
    out_ptrs = (ctypes.c_void_p * len(outs))(*[a.data.ptr for a in outs])
    try:
        for _ in range(2):
            for o in outs:
                o.fill(np.nan)
            assert run(handle, None, in_ptrs, out_ptrs) == 0
            cupy.cuda.Device().synchronize()
            for t, o in zip(pj["outputs"], outs):
                _close(cupy.asnumpy(o), ref[t["name"]], t["name"])
    finally:
        destroy(handle)
