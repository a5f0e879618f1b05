"""The C API of a profile set (several static --profile; compiler/profiles.py render_profile_set,
templates/profile_set.*.j2): OUT/nnc_<name>_profiles.{h,cu} put nnc_<name>_set_* over every
build (build i: nnc_<name>_p<i>_*), OUT/CMakeLists.txt links them into one library. On the CPU:
the rendered files, model strings escaped, the selection compiled host-only and run, the whole
library built with nvcc (CMake) and linked into a program; on a GPU: both profiles run through
the set and agree with nnc.load(OUT)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import nnc
from nnc.driver import compile_model
from nnc.ir.errors import InputError
from nnc.profiles import ProfileError, normalize_profiles, render_profile_set

NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="needs nvcc")
needs_cmake = pytest.mark.skipif(NVCC is None or shutil.which("cmake") is None, reason="needs nvcc and cmake")

PROFILES = ["a:2x4/2x4/2x4", "a:8x4/8x4/8x4"]  # b shares a's symbol S; c is static


def set_model(path: Path, names=("a", "b", "c")) -> Path:
    """y = (a + b) * c, r = relu(y): a[S,4], b[S,4], c[1,4] -> y[S,4], r[S,4]."""
    a, b, c = names
    g = helper.make_graph(
        [helper.make_node("Add", [a, b], ["s"]), helper.make_node("Mul", ["s", c], ["y"]),
         helper.make_node("Relu", ["y"], ["r"])], "g",
        [helper.make_tensor_value_info(a, TensorProto.FLOAT, ["S", 4]),
         helper.make_tensor_value_info(b, TensorProto.FLOAT, ["S", 4]),
         helper.make_tensor_value_info(c, TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["S", 4]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, ["S", 4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("profile_set")
    o = d / "out"
    compile_model(str(set_model(d / "m.onnx")), o, options=nnc.CompileOptions(
        backend="reference", codegen=True, tune=False, arch="sm_90", profiles=PROFILES))
    return o


# ---------------------------------------------------------------------------- the rendered files


def test_index_and_builds_name_the_c_apis(out):
    index = json.loads((out / "plan.json").read_text())
    assert index["name"] == "m" and index["profile_builds"] == 2
    assert index["c_api"] == {"prefix": "nnc_m_set", "files": ["CMakeLists.txt", "nnc_m_profiles.cu", "nnc_m_profiles.h"]}
    for i in (0, 1):
        plan = json.loads((out / "profiles" / str(i) / "plan.json").read_text())
        assert plan["name"] == f"m_p{i}" and plan["c_api_prefix"] == f"nnc_m_p{i}"
        assert f"nnc_m_p{i}_run(" in (out / "profiles" / str(i) / "nnc_model.h").read_text()


def test_header(out):
    h = (out / "nnc_m_profiles.h").read_text()
    assert "#ifndef NNC_PROFILE_SET_nnc_m_H_" in h and "#ifndef NNC_STATUS_CODES_" in h
    assert "//   0: a:2x4/2x4/2x4\n//   1: a:8x4/8x4/8x4\n" in h
    for decl in ("typedef struct nnc_m_set nnc_m_set;",
                 "NNC_API int nnc_m_set_create(const char* out_dir, nnc_m_set** set);",
                 "NNC_API int nnc_m_set_select(const nnc_m_set* set, const int64_t* const* input_dims, int* profile);",
                 "NNC_API int nnc_m_set_run(nnc_m_set* set, cudaStream_t stream, const int64_t* const* input_dims,",
                 "NNC_API int nnc_m_set_output_shape(const nnc_m_set* set, int profile, int i, int64_t* dims);",
                 "NNC_API void nnc_m_set_destroy(nnc_m_set* set);",
                 "NNC_API const char* nnc_m_set_last_error(void);"):
        assert decl in h, decl
    assert "profiles/" not in h.split("#ifndef NNC_PROFILE_SET_")[1].split("typedef")[0]  # no build header needed


def test_source_tables_and_dispatch(out):
    cu = (out / "nnc_m_profiles.cu").read_text()
    assert '#include "nnc_m_profiles.h"' in cu
    assert '#include "profiles/0/nnc_model.h"\n#include "profiles/1/nnc_model.h"\n' in cu
    assert 'const char* kInputNames[] = { "a", "b", "c", nullptr };' in cu
    assert "const int kInputRanks[] = { 2, 2, 2, 0 };" in cu
    assert "const int64_t kInputDims[][7] = {\n  { 2, 4, 2, 4, 1, 4, 0 },\n  { 8, 4, 8, 4, 1, 4, 0 },\n};" in cu
    assert "const size_t kOutputBytes[][kNumOutputs + 1] = {\n  { 32ULL, 32ULL, 0 },\n  { 128ULL, 128ULL, 0 },\n};" in cu
    assert 'rc = nnc_m_p0_create(dir.c_str(), &set->p0);' in cu and 'dir = std::string(out_dir) + "/profiles/1";' in cu
    assert "rc = nnc_m_p1_run(set->p1, stream, inputs, outputs);" in cu
    cm = (out / "CMakeLists.txt").read_text()
    assert "add_library(nnc_m_profiles SHARED nnc_m_profiles.cu\n  profiles/0/model.cu\n  profiles/1/model.cu\n)" in cm
    assert "set(CMAKE_CUDA_ARCHITECTURES 90)" in cm


HOSTILE = 'in"*/\n#define x \\??='  # ends a comment, a string, a line; a backslash and a trigraph


def test_model_strings_are_escaped(out):
    plan0 = json.loads((out / "profiles" / "0" / "plan.json").read_text())
    plan1 = json.loads((out / "profiles" / "1" / "plan.json").read_text())
    for p in (plan0, plan1):
        p["inputs"][0]["name"] = HOSTILE
    profiles = normalize_profiles([f"{HOSTILE}:2x4/2x4/2x4", f"{HOSTILE}:8x4/8x4/8x4"])
    files = render_profile_set("m", profiles, [plan0, plan1])
    cu, h = files["nnc_m_profiles.cu"], files["nnc_m_profiles.h"]
    assert r'{ "in\042*/\012#define x \134\077\077=", "b", "c", nullptr }' in cu
    assert r'//   0: in"\x2a/\x0a#define x \x5c\x3f?=:2x4/2x4/2x4' in h
    for text in (cu, h):
        assert "#define x" not in [line.strip()[:9] for line in text.splitlines()]
        assert HOSTILE not in text and "??" not in text


@needs_nvcc
def test_escaped_names_compile_and_read_back(out, tmp_path):
    """The hostile name's set source is valid C++ and gives the name back byte for byte."""
    plans = [json.loads((out / "profiles" / str(i) / "plan.json").read_text()) for i in (0, 1)]
    for p in plans:
        p["inputs"][0]["name"] = HOSTILE
    files = render_profile_set("m", normalize_profiles([f"{HOSTILE}:2x4/2x4/2x4", f"{HOSTILE}:8x4/8x4/8x4"]), plans)
    for fname, text in files.items():
        (tmp_path / fname).write_text(text)
    (tmp_path / "main.cpp").write_text('#include "nnc_m_profiles.h"\n#include <cstdio>\n'
                                       'int main() { std::fputs(nnc_m_set_input_name(0), stdout); return 0; }\n')
    _cmd([NVCC, "-std=c++17", "-DNNC_SET_SELECT_ONLY", "-I", tmp_path, tmp_path / "nnc_m_profiles.cu",
          tmp_path / "main.cpp", "-o", tmp_path / "names"])
    assert subprocess.run([str(tmp_path / "names")], capture_output=True, timeout=60).stdout == HOSTILE.encode()


def test_builds_that_disagree_on_an_input_are_refused(out):
    plan0 = json.loads((out / "profiles" / "0" / "plan.json").read_text())
    plan1 = json.loads((out / "profiles" / "1" / "plan.json").read_text())
    plan1["inputs"][1]["shape"] = [8, 4, 1]
    with pytest.raises(ProfileError, match=r"profile 1: input 1 is 'b' float32 of rank 3, profile 0's 'b' float32 "
                                           r"of rank 2: the set's C API needs one name, dtype and rank"):
        render_profile_set("m", normalize_profiles(PROFILES), [plan0, plan1])


# ---------------------------------------------------------------------------- the selection, host only

SELECT_MAIN = r"""
#include "nnc_m_profiles.h"
#include <cstdio>
#include <cstring>

static int check(const char* what, bool ok) { std::printf("%s %s\n", ok ? "ok" : "FAIL", what); return ok ? 0 : 1; }

int main() {
  int bad = 0, p = -1;
  int64_t a2[] = {2, 4}, a8[] = {8, 4}, a3[] = {3, 4}, c[] = {1, 4}, c2[] = {2, 4};
  const int64_t* two[] = {a2, a2, c};
  const int64_t* eight[] = {a8, a8, c};
  bad += check("select 2", nnc_m_set_select(nullptr, two, &p) == NNC_OK && p == 0);
  bad += check("select 8", nnc_m_set_select(nullptr, eight, &p) == NNC_OK && p == 1);
  const int64_t* three[] = {a3, a3, c};
  p = -7;
  bad += check("select 3 fails", nnc_m_set_select(nullptr, three, &p) == NNC_ERR_INVALID_ARGUMENT && p == -7);
  std::printf("error: %s\n", nnc_m_set_last_error());
  const int64_t* mixed[] = {a2, a8, c2};
  bad += check("select mixed fails", nnc_m_set_select(nullptr, mixed, &p) == NNC_ERR_INVALID_ARGUMENT);
  std::printf("error: %s\n", nnc_m_set_last_error());
  const int64_t* null_b[] = {a2, nullptr, c};
  bad += check("null dims", nnc_m_set_select(nullptr, null_b, &p) == NNC_ERR_INVALID_ARGUMENT);
  std::printf("error: %s\n", nnc_m_set_last_error());
  bad += check("null profile", nnc_m_set_select(nullptr, two, nullptr) == NNC_ERR_INVALID_ARGUMENT);
  int64_t d[2] = {0, 0};
  bad += check("input_shape", nnc_m_set_input_shape(1, 0, d) == NNC_OK && d[0] == 8 && d[1] == 4);
  bad += check("queries", nnc_m_set_num_profiles() == 2 && nnc_m_set_num_inputs() == 3 && nnc_m_set_num_outputs() == 2 &&
                          !std::strcmp(nnc_m_set_output_name(1), "r") && nnc_m_set_input_rank(2) == 2 &&
                          nnc_m_set_input_nbytes(1, 0) == 128 && nnc_m_set_output_nbytes(0, 1) == 32 &&
                          nnc_m_set_output_nbytes(2, 0) == 0 && !std::strcmp(nnc_m_set_input_dtype(0), "float32"));
  bad += check("bad profile", nnc_m_set_input_shape(2, 0, d) == NNC_ERR_INVALID_ARGUMENT);
  bad += check("output_shape", nnc_m_set_output_shape(nullptr, 1, 1, d) == NNC_OK && d[0] == 8 && d[1] == 4);
  bad += check("output_shape bad", nnc_m_set_output_shape(nullptr, 0, 2, d) == NNC_ERR_INVALID_ARGUMENT &&
                                   nnc_m_set_output_shape(nullptr, -1, 0, d) == NNC_ERR_INVALID_ARGUMENT);
  return bad;
}
"""


@needs_nvcc
def test_selection_compiled_host_only(out, tmp_path):
    """The set's source with NNC_SET_SELECT_ONLY: no build linked, no CUDA call, runs without a GPU."""
    (tmp_path / "main.cpp").write_text(SELECT_MAIN)
    r = subprocess.run([NVCC, "-std=c++17", "-DNNC_SET_SELECT_ONLY", "-I", str(out), str(out / "nnc_m_profiles.cu"),
                        str(tmp_path / "main.cpp"), "-o", str(tmp_path / "select")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(tmp_path / "select")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    errors = [line[len("error: "):] for line in r.stdout.splitlines() if line.startswith("error: ")]
    assert errors == [
        "nnc_m_set_select: input 'a' with shape [3, 4] is outside every profile (profile 0: a shape [3, 4] not in "
        "2x4, b shape [3, 4] not in 2x4; profile 1: a shape [3, 4] not in 8x4, b shape [3, 4] not in 8x4)",
        "nnc_m_set_select: input 'b' with shape [8, 4] is outside every profile (profile 0: b shape [8, 4] not in "
        "2x4, c shape [2, 4] not in 1x4; profile 1: a shape [2, 4] not in 8x4, c shape [2, 4] not in 1x4)",
        "nnc_m_set_select: input_dims[1] (b) is null"]


def test_selection_message_matches_nnc_load(out):
    """The same words as the Python runtime's (profiles.check_run), which nnc.load(OUT) raises."""
    m = nnc.load(out, backend="reference")
    with pytest.raises(InputError) as e:
        m(*(np.ones(s, np.float32) for s in ((3, 4), (3, 4), (1, 4))))
    assert "input 'a' with shape [3, 4] is outside every profile (profile 0: a shape [3, 4] not in 2x4; " \
           "profile 1: a shape [3, 4] not in 8x4)" in str(e.value)


# ---------------------------------------------------------------------------- the whole library

RUN_MAIN = r"""
#include "nnc_m_profiles.h"
#include <cstdio>
#include <string>
#include <vector>

// argv[1]: OUT; argv[2]: a folder with x<p>_<i>.bin per profile p and input i: writes y<p>_<o>.bin
int main(int argc, char** argv) {
  std::printf("set: %d profiles, %d inputs, %d outputs\n", nnc_m_set_num_profiles(), nnc_m_set_num_inputs(),
              nnc_m_set_num_outputs());
  if (argc < 3) return 0;
  nnc_m_set* set = nullptr;
  if (nnc_m_set_create(argv[1], &set) != NNC_OK) { std::printf("create failed: %s\n", nnc_m_set_last_error()); return 1; }
  const std::string dir = argv[2];
  const int ni = nnc_m_set_num_inputs(), no = nnc_m_set_num_outputs();
  for (int p = 0; p < nnc_m_set_num_profiles(); ++p) {
    std::vector<std::vector<int64_t>> dims(ni);
    std::vector<const int64_t*> dimp(ni);
    std::vector<const void*> ins(ni);
    std::vector<void*> outs(no);
    for (int i = 0; i < ni; ++i) {
      dims[i].resize(nnc_m_set_input_rank(i));
      nnc_m_set_input_shape(p, i, dims[i].data());
      dimp[i] = dims[i].data();
      std::vector<char> host(nnc_m_set_input_nbytes(p, i));
      FILE* f = std::fopen((dir + "/x" + std::to_string(p) + "_" + std::to_string(i) + ".bin").c_str(), "rb");
      if (!f || std::fread(host.data(), 1, host.size(), f) != host.size()) { std::printf("cannot read input\n"); return 1; }
      std::fclose(f);
      void* d = nullptr;
      cudaMalloc(&d, host.size());
      cudaMemcpy(d, host.data(), host.size(), cudaMemcpyHostToDevice);
      ins[i] = d;
    }
    for (int o = 0; o < no; ++o) cudaMalloc(&outs[o], nnc_m_set_output_nbytes(p, o));
    if (nnc_m_set_run(set, 0, dimp.data(), ins.data(), outs.data()) != NNC_OK) {
      std::printf("run failed: %s\n", nnc_m_set_last_error());
      return 1;
    }
    cudaStreamSynchronize(0);
    std::printf("profile %d ran as %d\n", p, nnc_m_set_last_profile(set));
    for (int o = 0; o < no; ++o) {
      std::vector<int64_t> shape(nnc_m_set_output_rank(o));
      nnc_m_set_output_shape(set, p, o, shape.data());
      std::printf("output %d:", o);
      for (int64_t d : shape) std::printf(" %lld", (long long)d);
      std::printf("\n");
      std::vector<char> host(nnc_m_set_output_nbytes(p, o));
      cudaMemcpy(host.data(), outs[o], host.size(), cudaMemcpyDeviceToHost);
      FILE* f = std::fopen((dir + "/y" + std::to_string(p) + "_" + std::to_string(o) + ".bin").c_str(), "wb");
      std::fwrite(host.data(), 1, host.size(), f);
      std::fclose(f);
      cudaFree(outs[o]);
    }
    for (int i = 0; i < ni; ++i) cudaFree(const_cast<void*>(ins[i]));
  }
  int64_t a3[] = {3, 4}, c[] = {1, 4};
  const int64_t* three[] = {a3, a3, c};
  std::vector<void*> none(no, nullptr);
  const void* no_in[] = {nullptr, nullptr, nullptr};
  if (nnc_m_set_run(set, 0, three, no_in, none.data()) == NNC_ERR_INVALID_ARGUMENT)
    std::printf("bad shape: %s\n", nnc_m_set_last_error());
  nnc_m_set_destroy(set);
  return 0;
}
"""


def _cmd(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kw)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r


@pytest.fixture(scope="module")
def library(out, tmp_path_factory) -> Path:
    """OUT's CMake project built (every build's model.cu and the set, one libnnc_m_profiles.so) and a
    program linked against it: compiles and links with nvcc on the CPU."""
    if NVCC is None or shutil.which("cmake") is None:
        pytest.skip("needs nvcc and cmake")
    build = tmp_path_factory.mktemp("set_build")
    _cmd(["cmake", "-S", out, "-B", build, f"-DCMAKE_CUDA_COMPILER={NVCC}"])
    _cmd(["cmake", "--build", build, "-j", "2"])
    (build / "main.cpp").write_text(RUN_MAIN)
    _cmd([NVCC, "-std=c++17", "-I", out, build / "main.cpp", "-L", build, "-lnnc_m_profiles",
          f"-Xlinker=-rpath,{build}", "-o", build / "app"])
    return build


@needs_cmake
def test_library_exports_the_set_and_every_build(library):
    r = _cmd(["nm", "-D", "--defined-only", library / "libnnc_m_profiles.so"])
    exported = {l.split()[-1] for l in r.stdout.splitlines() if not l.split()[-1].startswith("_")}
    set_api = {s for s in exported if s.startswith("nnc_m_set_")}
    assert set_api == {f"nnc_m_set_{f}" for f in (
        "create", "destroy", "select", "run", "last_profile", "output_shape", "build", "num_profiles", "num_inputs",
        "num_outputs", "input_name", "output_name", "input_dtype", "output_dtype", "input_rank", "output_rank",
        "input_shape", "input_nbytes", "output_nbytes", "last_error")}
    assert {"nnc_m_p0_create", "nnc_m_p1_create", "nnc_m_p0_run", "nnc_m_p1_run"} <= exported
    assert all(re.match(r"nnc_m_(set|p0|p1)_", s) for s in exported), sorted(exported)


@needs_cmake
def test_linked_program_queries_the_set(library):
    r = subprocess.run([str(library / "app")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == ["set: 2 profiles, 3 inputs, 2 outputs"]


@pytest.mark.gpu
@needs_cmake
def test_set_runs_every_profile_as_nnc_load(out, library, tmp_path):
    rng = np.random.default_rng(3)
    feeds = []
    for p, n in enumerate((2, 8)):
        x = {"a": rng.standard_normal((n, 4)).astype(np.float32), "b": rng.standard_normal((n, 4)).astype(np.float32),
             "c": rng.standard_normal((1, 4)).astype(np.float32)}
        for i, k in enumerate(("a", "b", "c")):
            x[k].tofile(tmp_path / f"x{p}_{i}.bin")
        feeds.append(x)
    r = subprocess.run([str(library / "app"), str(out), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert "profile 0 ran as 0" in lines and "profile 1 ran as 1" in lines
    assert lines.count("output 0: 8 4") == 1 and lines.count("output 1: 2 4") == 1
    assert ("bad shape: nnc_m_set_run: input 'a' with shape [3, 4] is outside every profile (profile 0: a shape "
            "[3, 4] not in 2x4, b shape [3, 4] not in 2x4; profile 1: a shape [3, 4] not in 8x4, b shape [3, 4] "
            "not in 8x4)") in lines
    m = nnc.load(out)
    for p, x in enumerate(feeds):
        assert m.pick(x) == p
        want = m.run(x, output="numpy")
        for o, name in enumerate(("y", "r")):
            got = np.fromfile(tmp_path / f"y{p}_{o}.bin", dtype=np.float32).reshape(want[name].shape)
            np.testing.assert_allclose(got, want[name], rtol=1e-6, atol=0)  # nvcc's build vs the cubins
            np.testing.assert_allclose(got, (x["a"] + x["b"]) * x["c"] if name == "y" else
                                       np.maximum((x["a"] + x["b"]) * x["c"], 0), rtol=1e-6)
