"""CUDA code generation backbone: structure of the emitted directory and an NVRTC compile for sm_90
(CPU, no GPU needed); GPU correctness vs the reference interpreter (marked `gpu`)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from nnc.codegen import lower as lower_mod
from nnc.codegen.emit import compile_to_dir
from nnc.ir.interp import Interpreter
from nnc.onnx_import import import_model

from .cuda_models import models, random_feed, compile_models

MODELS = models()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """name -> (out dir, plan, module): every model compiled once (NVRTC, sm_90)."""
    return compile_models(MODELS, tmp_path_factory)


@pytest.mark.parametrize("name", list(MODELS))
def test_plan_contract(compiled, name):
    d, plan, mod = compiled[name]
    on_disk = json.loads((d / "plan.json").read_text())
    assert on_disk == json.loads(json.dumps(plan))
    for key in ("arch", "inputs", "outputs", "passes", "kernels", "memory", "launches", "buffers", "weights_sha256"):
        assert key in plan, key
    assert plan["arch"] == "sm_90"
    assert set(plan["memory"]) >= {"arena_bytes", "naive_bytes", "peak_live_bytes"}
    assert plan["memory"]["arena_bytes"] <= plan["memory"]["naive_bytes"]
    assert plan["memory"]["peak_live_bytes"] <= plan["memory"]["arena_bytes"]
    assert [t["name"] for t in plan["inputs"]] == [a.name for a in mod.main.args]
    assert [t["name"] for t in plan["outputs"]] == [v.name for v in mod.main.results]
    for t in plan["inputs"] + plan["outputs"]:
        assert {"name", "dtype", "shape"} <= set(t)
    for k in plan["kernels"]:
        assert {"name", "ops", "template", "params"} <= set(k) and k["ops"]
    names = {k["name"] for k in plan["kernels"]}
    assert {l["kernel"] for l in plan["launches"] if l["kind"] == "kernel"} == names
    for f in ("model.cu", "nnc_model.h", "CMakeLists.txt", "nnc_run_example.cpp", "weights.bin",
              "ir/final.nnir", *(c["file"] for c in plan["cubins"])):
        assert (d / f).exists(), f
    assert sorted(k for c in plan["cubins"] for k in c["kernels"]) == sorted(names)
    import hashlib
    assert hashlib.sha256((d / "weights.bin").read_bytes()).hexdigest() == plan["weights_sha256"]


@pytest.mark.parametrize("name", list(MODELS))
def test_model_cu_structure(compiled, name):
    d, plan, _ = compiled[name]
    src = (d / "model.cu").read_text()
    defs = re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', src)
    assert sorted(defs) == sorted(k["name"] for k in plan["kernels"])  # one kernel per plan entry
    for k in plan["kernels"]:
        i = src.index(f"// kernel {k['name']}\n")
        head = src[i:src.index("__global__", i)]
        assert f"// template: {k['template']}" in head
        assert "// params: " in head
        for op in k["ops"]:
            assert op in head  # the IR ops, with %names and types
        assert "%" in head
    assert "nnc_model_run" in src and "#if !defined(__CUDACC_RTC__) && !defined(NNC_KERNELS_ONLY)" in src
    hdr = (d / "nnc_model.h").read_text()
    for fn in ("nnc_model_create", "nnc_model_run", "nnc_model_destroy", "nnc_model_num_inputs",
               "nnc_model_num_outputs", "nnc_model_input_name", "nnc_model_output_shape", "nnc_model_last_error"):
        assert fn in hdr


def test_all_families_compile_nvrtc(compiled):
    """Every model's kernels compiled (NVRTC units, codegen/units.py) for sm_90: cubins exist and the
    kernel families all appear."""
    templates = set()
    for name, (d, plan, _) in compiled.items():
        assert sum((d / c["file"]).stat().st_size for c in plan["cubins"]) > 1000
        templates |= {k["template"] for k in plan["kernels"]}
    for t in ("elementwise.cu.j2", "reduce.cu.j2", "softmax.cu.j2", "rownorm_regs.cu.j2", "argreduce.cu.j2",
              "strided_copy.cu.j2", "gather.cu.j2", "gather_elements.cu.j2", "pad.cu.j2", "resize.cu.j2",
              "pool.cu.j2", "batchnorm.cu.j2", "topk.cu.j2", "nonzero.cu.j2"):
        assert t in templates, t
    assert templates & {"matmul_fallback.cu.j2", "direct_conv.cu.j2"} or any("gemm" in t or "conv" in t for t in templates)


def test_dynamic_output_recorded(compiled):
    _, plan, _ = compiled["select"]
    nz = next(t for t in plan["outputs"] if t["name"] == "nz")
    assert nz["shape_known_after_run"] and nz["dynamic_axis"] == 1
    assert any(l["kind"] == "readback" for l in plan["launches"])


def test_views_are_aliases(compiled):
    _, plan, _ = compiled["movement"]
    ops = " ".join(op for k in plan["kernels"] for op in k["ops"])
    assert "Reshape(" not in ops and "Flatten(" not in ops and "Unsqueeze(" not in ops
    assert any(b["alias_of"] is not None for b in plan["buffers"])


def test_symbolic_shapes_rejected(tmp_path):
    from onnx import TensorProto as T
    from .cuda_models import N, mk
    m = mk([N("Relu", ["x"], ["y"])], [("x", T.FLOAT, ["N", 4])], [("y", T.FLOAT)])
    with pytest.raises(lower_mod.LoweringError, match="--shapes"):
        compile_to_dir(import_model(m), tmp_path)
    compile_to_dir(import_model(m, shapes={"x": [2, 4]}), tmp_path)


def test_duplicate_lowering_fails():
    lower_mod._ensure_loaded()
    with pytest.raises(RuntimeError, match="twice"):
        lower_mod.lowering("Relu")(lambda ctx: None)


def test_priority_decline(tmp_path):
    """A higher-priority lowering that declines (returns None, emits nothing) falls through."""
    from onnx import TensorProto as T
    from .cuda_models import N, mk
    lower_mod._ensure_loaded()
    seen = []

    def decline(ctx):
        seen.append(ctx.op.name)
        return None
    lower_mod.lowering("Softsign", priority=99)(decline)
    try:
        m = mk([N("Softsign", ["x"], ["y"])], [("x", T.FLOAT, [3])], [("y", T.FLOAT)])
        plan = compile_to_dir(import_model(m), tmp_path)
        assert seen == ["Softsign"] and plan["kernels"][0]["template"] == "elementwise.cu.j2"
    finally:
        lower_mod.LOWERINGS["Softsign"] = [e for e in lower_mod.LOWERINGS["Softsign"] if e.fn is not decline]


def test_importing_nnc_does_not_import_cupy():
    import subprocess
    import sys
    code = "import sys, nnc, nnc.runtime, nnc.codegen.emit; print('cupy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


# ---------------------------------------------------------------- GPU

def _check(name, out_dir, mod, spec, rng):
    import nnc
    m = nnc.load(out_dir)
    feed = random_feed(spec, rng)
    ref = Interpreter(mod).run(feed)
    got = m.run(feed, output="numpy", poison=True)
    for k, r in ref.items():
        g = got[k]
        assert g.shape == r.shape, (name, k, g.shape, r.shape)
        if r.dtype.kind == "f":
            tol = 1e-2 if r.dtype == np.float16 else 1e-3
            rr, gg = r.astype(np.float64), g.astype(np.float64)
            scale = max(1.0, float(np.max(np.abs(rr)))) if rr.size else 1.0
            err = float(np.max(np.abs(gg - rr))) / scale if rr.size else 0.0
            assert err <= tol, f"{name}/{k}: max rel err {err:.3g} > {tol}"
        else:
            np.testing.assert_array_equal(g, r, err_msg=f"{name}/{k}")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MODELS))
def test_gpu_matches_interpreter(compiled, name, rng):
    d, _, mod = compiled[name]
    _check(name, d, mod, MODELS[name][1], rng)


@pytest.mark.gpu
def test_gpu_runtime_api(compiled, rng):
    import cupy
    import nnc
    from nnc.ir.errors import InputError
    d, plan, mod = compiled["reduce"]
    m = nnc.load(d)
    x = rng.standard_normal((4, 5, 33)).astype(np.float32)
    outs = m(cupy.asarray(x))
    assert isinstance(outs, tuple) and isinstance(outs[0], cupy.ndarray)
    with pytest.raises(InputError, match="expected dtype float32"):
        m(x.astype(np.float64))
    with pytest.raises(InputError, match=r"expected shape \[4, 5, 33\]"):
        m(x[:2])
    with pytest.raises(InputError, match="missing"):
        m.run({"y": x})
    # numpy in -> same result; an explicit stream; torch CUDA tensors through DLPack
    ref = [cupy.asnumpy(o) for o in outs]
    st = cupy.cuda.Stream(non_blocking=True)
    got = m.run({m.input_names[0]: x}, stream=st, output="numpy")
    for r, n in zip(ref, m.output_names):
        np.testing.assert_array_equal(got[n], r)
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        t_out = m(torch.from_numpy(x).cuda())
        for r, o in zip(ref, t_out):
            np.testing.assert_array_equal(cupy.asnumpy(o), r)


@pytest.mark.gpu
def test_gpu_onnx_backend_cuda(rng):
    import nnc.onnx_backend as backend
    m, spec = MODELS["cnn"]
    feed = random_feed(spec, rng)
    got = backend.prepare(m, "CUDA").run(feed)
    ref = backend.prepare(m, "CPU").run(feed)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-3 * max(1.0, float(np.max(np.abs(r)))))
