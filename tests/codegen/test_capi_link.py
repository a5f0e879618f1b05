"""Two compiled models link into one binary: every exported symbol carries the model's prefix
(nnc compile --name), the kernels are renamed in the host build, internals live in a namespace
named for the model. Compiling and linking needs nvcc only; running needs a GPU."""
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnc.driver import compile_model

NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)
pytestmark = pytest.mark.skipif(NVCC is None, reason="needs nvcc")

W_A = np.array([1, -2, 3, -4], dtype=np.float32)
W_B = np.array([0.5, 0.25, -8, 2, 1, 1], dtype=np.float32)


def _model(w: np.ndarray) -> onnx.ModelProto:
    """Add(x, w) -> Relu -> Sigmoid: the same ops in both models, so the same kernel names."""
    n = w.size
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["s"]), helper.make_node("Relu", ["s"], ["r"]),
                           helper.make_node("Sigmoid", ["r"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


MAIN = r"""
#include "a/nnc_model.h"
#include "b/nnc_model.h"
#include <cstdio>
#include <cstring>
#include <vector>

template <class M, class Create, class Run, class Destroy, class Err>
static int run_one(const char* dir, int n, Create create, Run run, Destroy destroy, Err err) {
  M* m = nullptr;
  if (create(dir, &m) != NNC_OK) { std::printf("create failed: %s\n", err()); return 1; }
  std::vector<float> x(n), y(n);
  for (int i = 0; i < n; ++i) x[i] = 0.5f * i - 1.0f;
  float *dx = nullptr, *dy = nullptr;
  cudaMalloc(&dx, n * sizeof(float));
  cudaMalloc(&dy, n * sizeof(float));
  cudaMemcpy(dx, x.data(), n * sizeof(float), cudaMemcpyHostToDevice);
  const void* ins[] = {dx};
  void* outs[] = {dy};
  if (run(m, 0, ins, outs) != NNC_OK) { std::printf("run failed: %s\n", err()); return 1; }
  cudaMemcpy(y.data(), dy, n * sizeof(float), cudaMemcpyDeviceToHost);
  std::printf("%s", dir);
  for (float v : y) std::printf(" %.7g", v);
  std::printf("\n");
  cudaFree(dx);
  cudaFree(dy);
  destroy(m);
  return 0;
}

int main(int argc, char** argv) {
  std::printf("a: %d in %s %s[%zu bytes], %d out %s\n", nnc_a_num_inputs(), nnc_a_input_name(0), nnc_a_input_dtype(0),
              nnc_a_input_nbytes(0), nnc_a_num_outputs(), nnc_a_output_name(0));
  std::printf("b: %d in %s %s[%zu bytes], %d out %s\n", nnc_b_num_inputs(), nnc_b_input_name(0), nnc_b_input_dtype(0),
              nnc_b_input_nbytes(0), nnc_b_num_outputs(), nnc_b_output_name(0));
  if (argc < 3) return 0;
  if (run_one<nnc_a>(argv[1], (int)(nnc_a_input_nbytes(0) / 4), nnc_a_create, nnc_a_run, nnc_a_destroy, nnc_a_last_error)) return 1;
  if (run_one<nnc_b>(argv[2], (int)(nnc_b_input_nbytes(0) / 4), nnc_b_create, nnc_b_run, nnc_b_destroy, nnc_b_last_error)) return 1;
  return 0;
}
"""


def _nvcc(*args, cwd):
    r = subprocess.run([NVCC, "-std=c++17", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _defined_globals(obj: Path) -> set:
    """Strong (non-weak) global symbols an object defines."""
    r = subprocess.run(["nm", "-g", "--defined-only", str(obj)], capture_output=True, text=True, check=True)
    return {l.split()[-1] for l in r.stdout.splitlines() if len(l.split()) == 3 and l.split()[1] in "TDBR"}


@pytest.fixture(scope="module")
def linked(tmp_path_factory):
    d = tmp_path_factory.mktemp("capi")
    for tag, w in (("a", W_A), ("b", W_B)):
        onnx.save(_model(w), d / f"{tag}.onnx")
        compile_model(str(d / f"{tag}.onnx"), d / tag, arch="sm_90", name=tag)
    (d / "main.cpp").write_text(MAIN)
    for tag in ("a", "b"):
        _nvcc("-c", "-arch=sm_90", "-I", d / tag, d / tag / "model.cu", "-o", d / f"{tag}.o", cwd=d)
    _nvcc("-c", "-I", d, d / "main.cpp", "-o", d / "main.o", cwd=d)
    _nvcc("-arch=sm_90", d / "main.o", d / "a.o", d / "b.o", "-o", d / "app", cwd=d)  # must link
    return d


def test_same_kernels_in_both_models(linked):
    ka = re.findall(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(', (linked / "a" / "model.cu").read_text())
    kb = re.findall(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(', (linked / "b" / "model.cu").read_text())
    assert ka and set(ka) & set(kb)  # the clash the prefix has to avoid


def test_exported_symbols_carry_the_prefix_and_never_clash(linked):
    sa, sb = _defined_globals(linked / "a.o"), _defined_globals(linked / "b.o")
    assert not sa & sb
    for tag, syms in (("a", sa), ("b", sb)):
        c_syms = {s for s in syms if not s.startswith("_Z")}  # extern "C": the API and the kernels
        assert f"nnc_{tag}_create" in c_syms and f"nnc_{tag}_last_error" in c_syms
        assert all(s.startswith(f"nnc_{tag}_") for s in c_syms), sorted(c_syms)
    hdr = (linked / "a" / "nnc_model.h").read_text()
    assert "NNC_MODEL_nnc_a_H_" in hdr and "nnc_a_run(" in hdr and "nnc_model_" not in hdr


def test_linked_binary_queries_both_models(linked):
    r = subprocess.run([str(linked / "app")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["a: 1 in x float32[16 bytes], 1 out y", "b: 1 in x float32[24 bytes], 1 out y"]


def test_cmake_project_names_follow_the_model(linked):
    cm = (linked / "a" / "CMakeLists.txt").read_text()
    assert "add_library(nnc_a SHARED model.cu)" in cm and "OUTPUT_NAME nnc_run_example" in cm


@pytest.mark.gpu
def test_linked_binary_runs_both_models(linked):
    r = subprocess.run([str(linked / "app"), str(linked / "a"), str(linked / "b")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()[2:]
    for line, w in zip(lines, (W_A, W_B)):
        got = np.array([float(v) for v in line.split()[1:]], dtype=np.float32)
        x = 0.5 * np.arange(w.size, dtype=np.float32) - 1
        np.testing.assert_allclose(got, 1 / (1 + np.exp(-np.maximum(x + w, 0))), rtol=1e-6)


@pytest.mark.gpu
def test_run_example_prints_timing(tmp_path):
    """The generated runner (built with nvcc like CMakeLists.txt does) writes outputs and times runs."""
    onnx.save(_model(W_A), tmp_path / "m.onnx")
    out = tmp_path / "out"
    compile_model(str(tmp_path / "m.onnx"), out, arch="sm_90", name="m")
    _nvcc("-arch=sm_90", "-I", out, out / "model.cu", out / "nnc_run_example.cpp", "-o", tmp_path / "run", cwd=tmp_path)
    x = (0.5 * np.arange(4, dtype=np.float32) - 1)
    x.tofile(tmp_path / "x.bin")
    res = tmp_path / "res"
    res.mkdir()
    r = subprocess.run([str(tmp_path / "run"), str(out), str(tmp_path / "x.bin"), "--out", str(res), "--iters", "7"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"time: median [0-9.]+ ms, min [0-9.]+ ms, max [0-9.]+ ms over 7 runs \(3 warm-up", r.stdout)
    assert "CUDA graph)" in r.stdout  # the C API replays a captured graph by default
    y = np.fromfile(res / "y.bin", dtype=np.float32)
    np.testing.assert_allclose(y, 1 / (1 + np.exp(-np.maximum(x + W_A, 0))), rtol=1e-6)
    (res / "y.bin").unlink()
    r = subprocess.run([str(tmp_path / "run"), str(out), str(tmp_path / "x.bin"), "--out", str(res), "--iters", "3",
                        "--no-cuda-graph"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "eager launches)" in r.stdout, r.stdout + r.stderr
    np.testing.assert_array_equal(np.fromfile(res / "y.bin", dtype=np.float32), y)


API = {"create", "run", "destroy", "num_inputs", "num_outputs", "input_name", "output_name", "input_dtype",
       "output_dtype", "input_rank", "output_rank", "input_shape", "output_shape", "input_nbytes",
       "output_nbytes", "last_error", "set_cuda_graph", "used_cuda_graph",
       "context_create", "context_run", "context_output_shape", "context_destroy"}  # execution contexts


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_cmake_build_exports_only_the_prefixed_api(linked, tmp_path):
    build = tmp_path / "build"
    for cmd in (["cmake", "-S", str(linked / "a"), "-B", str(build), f"-DCMAKE_CUDA_COMPILER={NVCC}"],
                ["cmake", "--build", str(build)]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    r = subprocess.run(["nm", "-D", "--defined-only", str(build / "libnnc_a.so")], capture_output=True, text=True, check=True)
    exported = {l.split()[-1] for l in r.stdout.splitlines() if not l.split()[-1].startswith("_")}
    assert exported == {f"nnc_a_{f}" for f in API}
    r = subprocess.run([str(build / "nnc_run_example")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--iters N" in r.stderr
