"""The Python API: nnc.compile / nnc.load, the Module interface both backends share (inputs and
outputs metadata, __call__, run with output selection), CompileOptions, nnc.__version__, the
no-GPU error, and the progress reporter. CPU tests use backend="reference"; the CUDA ones are
marked gpu."""
import dataclasses
import gc
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import nnc
from nnc import progress
from nnc.api import CompileOptions, ReferenceModule, TensorInfo
from nnc.ir.errors import InputError, NncError
from nnc.runtime import GpuUnavailableError, gpu_available, require_gpu

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_cnn.onnx"
no_gpu = pytest.mark.skipif(gpu_available(), reason="checks the error on a machine without a GPU")


def ort_run(model, feed):
    import onnxruntime as ort
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))


def two_outputs_model(n: int = 4) -> onnx.ModelProto:
    """x:[N,n], y:[N,n] -> relu = Relu(x + y), sig = Sigmoid(x * y), idx = ArgMax(x) (int64)."""
    nodes = [helper.make_node("Add", ["x", "y"], ["s"]), helper.make_node("Relu", ["s"], ["relu"]),
             helper.make_node("Mul", ["x", "y"], ["p"]), helper.make_node("Sigmoid", ["p"], ["sig"]),
             helper.make_node("ArgMax", ["x"], ["idx"], axis=1, keepdims=0)]
    g = helper.make_graph(nodes, "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n]),
                           helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
                          [helper.make_tensor_value_info("relu", TensorProto.FLOAT, ["N", n]),
                           helper.make_tensor_value_info("sig", TensorProto.FLOAT, ["N", n]),
                           helper.make_tensor_value_info("idx", TensorProto.INT64, ["N"])])
    # IR version 10: older onnxruntime (1.30 on the GPU machine) reads up to IR 13
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


# ---------------------------------------------------------------------------- reference backend


def test_compile_reference_matches_onnxruntime(rng):
    m = nnc.compile(EXAMPLE, shapes={"input": [2, 3, 32, 32]}, backend="reference")
    assert isinstance(m, nnc.Module) and isinstance(m, ReferenceModule) and m.backend == "reference"
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    ref = ort_run(EXAMPLE, {"input": x})["probs"]
    np.testing.assert_allclose(m(x), ref, rtol=1e-4, atol=1e-6)
    got = m.run({"input": x})
    assert list(got) == ["probs"] and isinstance(got["probs"], np.ndarray)
    np.testing.assert_allclose(got["probs"], ref, rtol=1e-4, atol=1e-6)


def test_symbolic_dims_stay_symbolic_on_reference(rng):
    m = nnc.compile(EXAMPLE, backend="reference")  # no shapes: N stays a symbol
    assert m.inputs == (TensorInfo("input", "float32", ("N", 3, 32, 32)),)
    assert m.outputs == (TensorInfo("probs", "float32", ("N", 10)),)
    for n in (1, 3):
        x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
        np.testing.assert_allclose(m(x), ort_run(EXAMPLE, {"input": x})["probs"], rtol=1e-4, atol=1e-6)
    with pytest.raises(InputError, match=r"input 'input'.*\[2, 3, 16, 16\]"):
        m(np.zeros((2, 3, 16, 16), np.float32))


def test_metadata_is_frozen_and_typed():
    m = nnc.compile(two_outputs_model(), shapes="x:2x4", backend="reference")
    assert [t.name for t in m.inputs] == ["x", "y"] and m.input_names == ["x", "y"]
    # N bound through x binds it in y too, and in every output
    assert [t.shape for t in m.inputs] == [(2, 4), (2, 4)]
    assert m.outputs == (TensorInfo("relu", "float32", (2, 4)), TensorInfo("sig", "float32", (2, 4)),
                         TensorInfo("idx", "int64", (2,)))
    assert m.outputs[2].np_dtype == np.dtype(np.int64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.inputs[0].name = "z"
    assert "relu: float32[2, 4]" in repr(m)


def test_data_dependent_extent_is_a_question_mark_on_both_backends():
    g = helper.make_graph([helper.make_node("NonZero", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m = nnc.compile(model, backend="reference", codegen=True)
    assert m.outputs == (TensorInfo("y", "int64", (2, "?")),)
    entry = m.plan["outputs"][0]  # what the CUDA module reads its metadata from
    assert entry["shape_known_after_run"] and TensorInfo.from_plan(entry) == m.outputs[0]
    x = np.array([[1, 0, 0, 2]] * 3, np.float32)
    np.testing.assert_array_equal(m(x), np.stack(np.nonzero(x)))


def test_output_selection_and_call_forms(rng):
    model = two_outputs_model()
    m = nnc.compile(model, shapes={"x": [3, 4]}, backend="reference")
    x, y = (rng.standard_normal((3, 4)).astype(np.float32) for _ in range(2))
    ref = ort_run(model, {"x": x, "y": y})
    got = m.run({"x": x, "y": y}, outputs=["idx", "relu"])
    assert list(got) == ["idx", "relu"]  # only those, in the order asked
    np.testing.assert_array_equal(got["idx"], ref["idx"])
    np.testing.assert_allclose(got["relu"], ref["relu"], rtol=1e-6)
    assert list(m.run({"x": x, "y": y}, outputs="sig")) == ["sig"]
    with pytest.raises(InputError, match=r"unknown outputs \['nope'\]; the model's outputs are \['relu', 'sig', 'idx'\]"):
        m.run({"x": x, "y": y}, outputs=["relu", "nope"])
    with pytest.raises(InputError, match="twice"):
        m.run({"x": x, "y": y}, outputs=["sig", "sig"])
    # __call__: positional, keyword, mixed and a dict all bind the same way; several outputs -> tuple
    for res in (m(x, y), m(x=x, y=y), m(x, y=y), m({"x": x, "y": y})):
        assert isinstance(res, tuple) and len(res) == 3
        # fp32 against onnxruntime: its Sigmoid differs from numpy's by up to ~1.1e-6 relative
        np.testing.assert_allclose(res[1], ref["sig"], rtol=1e-5, atol=1e-7)
    with pytest.raises(InputError, match="takes 2 inputs"):
        m(x, y, x)
    with pytest.raises(InputError, match="both by position and by name"):
        m(x, x=x)
    with pytest.raises(InputError, match="missing input 'y'"):
        m(x)
    with pytest.raises(InputError, match="expected a dict"):
        m.run([x, y])
    with pytest.raises(NncError, match="output must be"):
        m.run({"x": x, "y": y}, output="torch")


def test_model_as_path_bytes_or_proto(rng, tmp_path):
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    want = ort_run(EXAMPLE, {"input": x})["probs"]
    for model in (str(EXAMPLE), EXAMPLE, EXAMPLE.read_bytes(), onnx.load(str(EXAMPLE))):
        m = nnc.compile(model, shapes="input:1x3x32x32", backend="reference")
        np.testing.assert_allclose(m(x), want, rtol=1e-4, atol=1e-6)
    with pytest.raises(NncError, match="model bytes are empty"):
        nnc.compile(b"", backend="reference")
    with pytest.raises(NncError, match="not an ONNX ModelProto"):
        nnc.compile(b"\x00\xff garbage", backend="reference")
    with pytest.raises(NncError, match="must be a path, bytes or an onnx.ModelProto, not int"):
        nnc.compile(3, backend="reference")


def test_out_none_is_a_temporary_directory_owned_by_the_module():
    m = nnc.compile(EXAMPLE, shapes="input:1x3x32x32", backend="reference")
    d = m.dir
    assert (d / "ir" / "final.nnir").is_file() and (d / "plan.json").is_file()
    assert not (d / "model.cu").exists()  # reference: codegen skipped by default
    m.close()
    assert not d.exists()
    m2 = nnc.compile(EXAMPLE, shapes="input:1x3x32x32", backend="reference")
    d2 = m2.dir
    del m2
    gc.collect()
    assert not d2.exists()


def test_out_dir_is_kept_and_loads_with_either_backend_name(rng, tmp_path):
    out = tmp_path / "out"
    m = nnc.compile(EXAMPLE, shapes="input:2x3x32x32", out=out, backend="reference")
    assert m.dir == out
    del m
    gc.collect()
    assert (out / "plan.json").is_file()  # a directory the user named is theirs
    r = nnc.load(out, backend="reference")
    assert isinstance(r, ReferenceModule) and r.plan["inputs"][0]["shape"] == [2, 3, 32, 32]
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(r(x), ort_run(EXAMPLE, {"input": x})["probs"], rtol=1e-4, atol=1e-6)
    with pytest.raises(NncError, match="no such directory"):
        nnc.load(tmp_path / "missing", backend="reference")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NncError, match="no ir/final.nnir"):
        nnc.load(tmp_path / "empty", backend="reference")
    with pytest.raises(NncError, match="backend must be one of 'cuda', 'reference'"):
        nnc.load(out, backend="cpu")


def test_reference_with_codegen_writes_the_cuda_files(tmp_path):
    out = tmp_path / "out"
    m = nnc.compile(EXAMPLE, shapes="input:1x3x32x32", out=out, backend="reference", codegen=True)
    assert (out / "model.cu").is_file() and list(out.glob("*.cubin"))
    assert m.plan["kernels"]


def test_compile_options():
    o = CompileOptions(shapes="x:2x4", precision="fp16", backend="reference")
    assert o.shapes == (("x", (2, 4)),) and not o.generates_cuda
    assert hash(o) == hash(CompileOptions(shapes={"x": [2, 4]}, precision="fp16", backend="reference"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.precision = "fp32"
    assert CompileOptions().generates_cuda and CompileOptions(backend="reference", codegen=True).generates_cuda
    for kw, msg in [({"precision": "fp4"}, "precision must be one of"), ({"backend": "cpu"}, "backend must be"),
                    ({"cuda_compiler": "clang"}, "cuda_compiler must be"),
                    ({"codegen": False}, "codegen=False only goes with backend='reference'"),
                    ({"shapes": {"x": [2, -1]}}, r"shapes\['x'\]: dims must be non-negative ints"),
                    ({"shapes": {"x": "2x4"}}, "expected a sequence of ints"),
                    ({"shapes": [("x", 2)]}, "expected a dict"),
                    ({"shapes": "x:2x"}, "dims must be integers"), ({"name": 3}, "name must be a string"),
                    ({"jobs": 0}, "jobs must be a positive int")]:
        with pytest.raises(NncError, match=msg):
            CompileOptions(**kw)
    m = nnc.compile(two_outputs_model(), options=CompileOptions(shapes="x:1x4", backend="reference"))
    assert m.inputs[1].shape == (1, 4)


def test_name_cache_and_jobs_reach_the_compile(tmp_path):
    m = nnc.compile(EXAMPLE, shapes="input:1x3x32x32", out=tmp_path / "o", backend="reference", codegen=True,
                    name="tiny", cache=False, jobs=1)
    assert m.plan["name"] == "tiny" and "nnc_tiny_" in (tmp_path / "o" / "nnc_model.h").read_text()
    with pytest.raises(NncError, match="C identifier"):
        nnc.compile(EXAMPLE, shapes="input:1x3x32x32", backend="reference", name="not an identifier")


def test_precision_reaches_the_reference(rng):
    m = nnc.compile(EXAMPLE, shapes="input:1x3x32x32", precision="fp16", backend="reference")
    assert "to-fp16" in m.plan["passes"]
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(m(x), ort_run(EXAMPLE, {"input": x})["probs"], rtol=3e-2, atol=1e-3)


def test_version_single_source():
    text = (ROOT / "pyproject.toml").read_text()
    want = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M).group(1)
    assert nnc.__version__ == importlib.metadata.version("nnc") == want
    p = subprocess.run([sys.executable, "-m", "nnc.cli", "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == f"nnc {want}"


def test_nnc_compile_is_the_api_function_after_the_driver_imports():
    import nnc.driver  # noqa: F401  (importing the driver module must not rebind nnc.compile)
    from nnc.api import compile as api_compile
    assert nnc.compile is api_compile
    import inspect
    assert list(inspect.signature(nnc.compile).parameters)[:4] == ["model", "shapes", "precision", "out"]


# ---------------------------------------------------------------------------- no GPU


def test_require_gpu_wraps_cupys_error(monkeypatch):
    cupy = pytest.importorskip("cupy")

    def broken():
        raise cupy.cuda.runtime.CUDARuntimeError(35)  # cudaErrorInsufficientDriver
    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", broken)
    with pytest.raises(GpuUnavailableError, match=r"no CUDA GPU is available \(cupy: .*\); use backend='reference'"):
        require_gpu()
    assert not gpu_available()
    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", lambda: 0)
    with pytest.raises(GpuUnavailableError, match="0 devices"):
        require_gpu()


@no_gpu
def test_no_gpu_gives_a_clear_error(tmp_path):
    out = tmp_path / "out"
    nnc.compile(EXAMPLE, shapes="input:1x3x32x32", out=out, backend="reference", codegen=True)
    with pytest.raises(GpuUnavailableError, match="no CUDA GPU is available.*backend='reference'"):
        nnc.load(out)
    with pytest.raises(GpuUnavailableError, match="no CUDA GPU is available"):
        nnc.compile(EXAMPLE, shapes="input:1x3x32x32", out=tmp_path / "cuda")
    assert not (tmp_path / "cuda").exists()  # the check comes before any compile work
    m = nnc.load(out, backend="reference")
    with pytest.raises(GpuUnavailableError):
        m.run({"input": np.zeros((1, 3, 32, 32), np.float32)}, output="cupy")
    p = subprocess.run([sys.executable, "-m", "nnc.cli", "run", str(out), "--backend", "cuda"],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1 and "no CUDA GPU is available" in p.stderr and "--backend reference" in p.stderr


# ---------------------------------------------------------------------------- progress


def test_reporter_times_stages_and_logs(capsys):
    rep = progress.Reporter(verbose=True)
    with progress.use(rep):
        assert progress.current() is rep
        with progress.stage("outer", total=2) as t:
            assert progress.current().task is t
            t.advance()
            t.describe("x")
            progress.current().log("hello")
    assert progress.current() is not rep and set(rep.times) == {"outer"}
    assert capsys.readouterr().err == "hello\n"
    quiet = progress.current()  # outside use(): silent and records nothing
    with quiet.stage("s") as t:
        t.advance()
    quiet.log("nothing")
    assert quiet.times == {} and capsys.readouterr().err == ""


def test_reporter_choice_and_rich_reporter_runs():
    import io
    assert type(progress.make_reporter(stream=io.StringIO())) is progress.Reporter  # not a terminal

    class Tty(io.StringIO):
        def isatty(self):
            return True
    s = Tty()
    rep = progress.make_reporter(verbose=True, stream=s)
    assert isinstance(rep, progress.RichReporter)
    old = progress.SHOW_AFTER_S
    progress.SHOW_AFTER_S = 0.0  # draw at once
    try:
        with progress.use(rep), progress.stage("passes", total=3) as t:
            import time
            time.sleep(0.05)
            for _ in range(3):
                t.advance()
            rep.log("a line")
    finally:
        progress.SHOW_AFTER_S = old
    assert "passes" in rep.times and "a line" in s.getvalue()


def test_compile_reports_every_stage(tmp_path):
    rep = progress.Reporter()
    with progress.use(rep):
        nnc.compile(EXAMPLE, shapes="input:1x3x32x32", out=tmp_path / "o", backend="reference", codegen=True)
    assert {"import", "passes", "lowering", "render", "codegen"} <= set(rep.times)
    assert all(v >= 0 for v in rep.times.values())


# ---------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_compile_cuda_matches_onnxruntime(rng):
    from nnc.runtime import Module as CudaModule
    m = nnc.compile(EXAMPLE, shapes={"input": [2, 3, 32, 32]})
    assert isinstance(m, CudaModule) and isinstance(m, nnc.Module) and m.backend == "cuda"
    assert m.inputs == (TensorInfo("input", "float32", (2, 3, 32, 32)),)
    assert m.outputs == (TensorInfo("probs", "float32", (2, 10)),)
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    ref = ort_run(EXAMPLE, {"input": x})["probs"]
    got = m.run({"input": x}, output="numpy", poison=True)
    assert list(got) == ["probs"]
    np.testing.assert_allclose(got["probs"], ref, rtol=1e-3, atol=1e-5)
    import cupy
    y = m(cupy.asarray(x))  # __call__: cupy in, cupy out
    assert isinstance(y, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(y), ref, rtol=1e-3, atol=1e-5)
    d = m.dir
    m.close()
    assert not d.exists()


@pytest.mark.gpu
def test_load_cuda_output_selection_matches_reference(rng, tmp_path):
    model = two_outputs_model(8)
    out = tmp_path / "out"
    ref_mod = nnc.compile(model, shapes="x:5x8", out=out, backend="reference", codegen=True)
    m = nnc.load(out)
    assert m.inputs == ref_mod.inputs and m.outputs == ref_mod.outputs
    x, y = (rng.standard_normal((5, 8)).astype(np.float32) for _ in range(2))
    want = ort_run(model, {"x": x, "y": y})
    got = m.run({"x": x, "y": y}, outputs=["sig", "idx"], output="numpy", poison=True)
    assert list(got) == ["sig", "idx"]
    np.testing.assert_allclose(got["sig"], want["sig"], rtol=1e-3, atol=1e-6)
    np.testing.assert_array_equal(got["idx"], want["idx"])
    import cupy
    dev = m.run({"x": x, "y": y}, outputs=["relu"], poison=True)
    assert list(dev) == ["relu"] and isinstance(dev["relu"], cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(dev["relu"]), want["relu"], rtol=1e-3, atol=1e-6)
    with pytest.raises(InputError, match="unknown outputs"):
        m.run({"x": x, "y": y}, outputs=["nope"])
    relu, sig, idx = m(x, y=y)
    np.testing.assert_allclose(cupy.asnumpy(relu), ref_mod(x, y)[0], rtol=1e-3, atol=1e-6)
