"""CUDA graphs: nnc.load captures the whole run once and replays it (compiler/runtime.py), and the
C API does the same (templates/host.cu.j2). On the CPU: the host code with graphs builds with nvcc.
On a GPU: replay == eager == the reference on fresh random inputs with outputs poisoned first,
new inputs give new outputs (the owned-buffer binding), returned arrays never alias the module's
buffers, and a plan with a readback (NonZero's data-dependent extent) stays correct."""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from nnc.cli import _random_inputs
from nnc.driver import compile_model

from .cuda_models import nonzero_view_model

ROOT = Path(__file__).resolve().parents[2]
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)
# tiny_lstm's recurrence is one cooperative kernel (grid-wide barriers): capture must take it or fall back
EXAMPLES = {"tiny_cnn": {"input": [2, 3, 32, 32]}, "tiny_transformer": {}, "tiny_lstm": {}}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    import onnx
    base = tmp_path_factory.mktemp("graphs")
    out = {}
    for name, shapes in EXAMPLES.items():
        compile_model(str(ROOT / "examples" / f"{name}.onnx"), base / name, shapes=shapes, arch="sm_90")
        out[name] = base / name
    onnx.save(nonzero_view_model(), base / "nz.onnx")
    compile_model(str(base / "nz.onnx"), base / "nz", arch="sm_90", name="nz")
    out["nz"] = base / "nz"
    return out


def _plan(d):
    import json
    return json.loads((d / "plan.json").read_text())


def _close(got, want, what, rtol=1e-3):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    tol = rtol * (np.abs(want).max(initial=0) + np.abs(want))
    bad = np.abs(got - want) > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.size} values off, max |d| {np.abs(got - want).max()}"


def test_readback_plan_has_a_readback_the_graph_must_keep(dirs):
    assert any(l["kind"] == "readback" for l in _plan(dirs["nz"])["launches"])
    src = (dirs["nz"] / "model.cu").read_text()
    assert "kHasReadback = true" in src and "cudaStreamSynchronize(stream);  // data" not in src
    assert "kHasReadback = false" in (dirs["tiny_cnn"] / "model.cu").read_text()


# ---------------------------------------------------------------- GPU: Python runtime

@pytest.mark.gpu
@pytest.mark.parametrize("name", list(EXAMPLES) + ["nz"])
def test_graph_replay_matches_eager_and_reference(dirs, name):
    import nnc
    d = dirs[name]
    plan = _plan(d)
    g, e = nnc.load(d), nnc.load(d, cuda_graph=False)
    ref = nnc.load(d, backend="reference")
    assert not e.uses_cuda_graph and e.graph_fallback == "cuda_graph=False"
    if name != "tiny_lstm":
        assert g.uses_cuda_graph, g.graph_fallback
    else:  # a cooperative launch: captured, or refused with the reason said
        assert g.uses_cuda_graph or "capture failed" in g.graph_fallback
    print(f"{name}: graph {g.uses_cuda_graph} ({g.graph_fallback})")
    seen = []
    for seed in (1, 2, 3):  # fresh inputs each time: a replay bound to stale inputs repeats itself
        feed = _random_inputs(plan, seed)
        want = ref.run(feed)
        got_g = g.run(feed, output="numpy", poison=True)
        got_e = e.run(feed, output="numpy", poison=True)
        for n in g.output_names:
            _close(got_g[n], want[n], f"{name} {n} seed {seed} graph vs reference")
            _close(got_g[n], got_e[n], f"{name} {n} seed {seed} graph vs eager", rtol=1e-5)
        seen.append(got_g)
    for n in g.output_names:
        a, b = seen[0][n], seen[1][n]
        assert a.shape != b.shape or not np.array_equal(a, b), f"{name} {n}: two inputs, one output"


@pytest.mark.gpu
def test_device_inputs_outputs_and_out_arrays(dirs):
    """cupy inputs (device-to-device into the owned buffers), cupy outputs that are the caller's own
    (a later run leaves them alone), out= arrays filled, a subset of outputs, a side stream."""
    import cupy as cp
    import nnc
    d = dirs["nz"]
    plan = _plan(d)
    g = nnc.load(d)
    ref = nnc.load(d, backend="reference")
    f1, f2 = _random_inputs(plan, 11), _random_inputs(plan, 12)
    r1 = g.run({k: cp.asarray(v) for k, v in f1.items()})
    keep = {k: cp.asnumpy(v) for k, v in r1.items()}
    r2 = g.run({k: cp.asarray(v) for k, v in f2.items()}, outputs=["s"])
    assert list(r2) == ["s"]
    for k in r1:  # r1 is not a view of the module's output buffers
        np.testing.assert_array_equal(cp.asnumpy(r1[k]), keep[k])
    w1, w2 = ref.run(f1), ref.run(f2)
    _close(keep["s"], w1["s"], "s run 1")
    _close(keep["nz"], w1["nz"], "nz run 1")
    _close(cp.asnumpy(r2["s"]), w2["s"], "s run 2")
    s_out = cp.full(tuple(plan["outputs"][1]["shape"]), cp.nan, cp.float32)
    side = cp.cuda.Stream(non_blocking=True)
    r3 = g.run(f1, out={"s": s_out}, stream=side)
    side.synchronize()
    assert r3["s"] is s_out
    _close(cp.asnumpy(s_out), w1["s"], "s into out=")
    _close(cp.asnumpy(r3["nz"]), w1["nz"], "nz on a side stream")


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [True, False])
def test_inputs_off_a_16_byte_boundary_are_copied_and_such_out_arrays_refused(dirs, cuda_graph):
    """The kernels use 16-byte vector loads/stores on model inputs/outputs: an input view that starts
    2 bytes into an allocation still gives the reference's answer (copied to an aligned buffer), and
    an out= array that does not start on 16 bytes is a clear error, not a misaligned-address fault."""
    import cupy as cp
    import nnc
    from nnc.runtime import InputError
    d = dirs["tiny_cnn"]
    plan = _plan(d)
    g = nnc.load(d, cuda_graph=cuda_graph)
    feed = _random_inputs(plan, 5)
    want = nnc.load(d, backend="reference").run(feed)
    (name, x), = feed.items()
    big = cp.empty(x.size + 8, x.dtype)
    view = big[1:1 + x.size].reshape(x.shape)  # 4 bytes (fp32) past the allocation's start
    view[...] = cp.asarray(x)
    assert view.data.ptr % 16
    got = g.run({name: view})
    for k in want:
        _close(cp.asnumpy(got[k]), want[k], f"{k} from a misaligned input")
    t = plan["outputs"][0]
    raw = cp.empty(int(np.prod(t["shape"])) + 8, np.float32)
    bad = raw[1:1 + int(np.prod(t["shape"]))].reshape(t["shape"])
    with pytest.raises(InputError, match="16-byte boundary"):
        g.run(feed, out={t["name"]: bad})


@pytest.mark.gpu
def test_graph_is_captured_once(dirs):
    import nnc
    d = dirs["tiny_cnn"]
    g = nnc.load(d)
    graph = g.graph
    for seed in range(3):
        g.run(_random_inputs(_plan(d), seed))
    assert g.graph is graph and g.init_runs == 1


@pytest.mark.gpu
def test_cuda_graph_option_is_checked(dirs):
    import nnc
    from nnc.ir.errors import NncError
    with pytest.raises(NncError, match="cuda_graph must be True or False"):
        nnc.load(dirs["tiny_cnn"], cuda_graph="yes")


# ---------------------------------------------------------------- the C API

MAIN = r"""
#include "nnc_model.h"
#include <cmath>
#include <cstdio>
#include <vector>

// x: f32[4,6]; outputs nz: i64[2, <=24] (data-dependent), s: f32[6,4]
static void fill(std::vector<float>& x, int seed) {
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * (float)(i + 1) * (float)seed + (float)seed);
}

static int run(nnc_nz* m, int tag, const std::vector<float>& x, float* dx, void* dnz, void* ds) {
  cudaMemcpy(dx, x.data(), x.size() * 4, cudaMemcpyHostToDevice);
  const void* ins[] = {dx};
  void* outs[] = {dnz, ds};
  if (nnc_nz_run(m, 0, ins, outs) != NNC_OK) { std::printf("run failed: %s\n", nnc_nz_last_error()); return 1; }
  cudaDeviceSynchronize();
  int64_t dims[2];
  nnc_nz_output_shape(m, 0, dims);
  std::vector<long long> nz(2 * 24);
  std::vector<float> s(24);
  cudaMemcpy(nz.data(), dnz, nz.size() * 8, cudaMemcpyDeviceToHost);
  cudaMemcpy(s.data(), ds, s.size() * 4, cudaMemcpyDeviceToHost);
  std::printf("run %d graph %d n %lld s", tag, nnc_nz_used_cuda_graph(m), (long long)dims[1]);
  for (float v : s) std::printf(" %.9g", v);
  std::printf(" nz");
  for (long long i = 0; i < 2 * dims[1]; ++i) std::printf(" %lld", nz[i]);  // packed [2, n]
  std::printf("\n");
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 2) return 0;
  nnc_nz* m = nullptr;
  if (nnc_nz_create(argv[1], &m) != NNC_OK) { std::printf("create failed: %s\n", nnc_nz_last_error()); return 1; }
  std::vector<float> x1(24), x2(24);
  fill(x1, 1);
  fill(x2, 2);
  float *xa, *xb;
  void *nza, *nzb, *sa, *sb;
  cudaMalloc(&xa, 96); cudaMalloc(&xb, 96);
  cudaMalloc(&nza, nnc_nz_output_nbytes(0)); cudaMalloc(&nzb, nnc_nz_output_nbytes(0));
  cudaMalloc(&sa, 96); cudaMalloc(&sb, 96);
  int rc = run(m, 1, x1, xa, nza, sa)       // captures, bound to buffers a
        || run(m, 2, x2, xb, nzb, sb)       // other pointers: captured again, graph updated
        || run(m, 3, x2, xa, nza, sa)       // buffers a again, new data in them
        || run(m, 4, x1, xa, nza, sa);      // replay
  if (!rc && nnc_nz_set_cuda_graph(m, 0) != NNC_OK) rc = 1;
  if (!rc) rc = run(m, 5, x2, xa, nza, sa);  // eager
  nnc_nz_destroy(m);
  return rc;
}
"""


def _fill(seed):
    i = np.arange(24, dtype=np.float32)
    return np.sin(np.float32(0.37) * (i + 1) * np.float32(seed) + np.float32(seed)).astype(np.float32).reshape(4, 6)


@pytest.fixture(scope="module")
def capi_app(dirs, tmp_path_factory):
    if NVCC is None:
        pytest.skip("needs nvcc")
    d = tmp_path_factory.mktemp("graph_capi")
    (d / "main.cpp").write_text(MAIN)
    r = subprocess.run([NVCC, "-std=c++17", "-arch=sm_90", "-I", str(dirs["nz"]), str(dirs["nz"] / "model.cu"),
                        str(d / "main.cpp"), "-o", str(d / "app")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "app"


def test_capi_with_graphs_builds(capi_app):
    r = subprocess.run([str(capi_app)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.mark.gpu
def test_capi_graph_rebinds_and_keeps_readbacks(dirs, capi_app):
    import nnc
    ref = nnc.load(dirs["nz"], backend="reference")
    r = subprocess.run([str(capi_app), str(dirs["nz"])], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 5, r.stdout
    seeds = {1: 1, 2: 2, 3: 2, 4: 1, 5: 2}
    for line in lines:
        f = line.split()
        tag, graph, n = int(f[1]), int(f[3]), int(f[5])
        assert graph == (1 if tag < 5 else 0), line
        want = ref.run({"x": _fill(seeds[tag])})
        i = f.index("nz")
        _close(np.array(f[7:i], np.float32).reshape(6, 4), want["s"], f"C run {tag} s")
        assert n == want["nz"].shape[1], line
        np.testing.assert_array_equal(np.array(f[i + 1:], np.int64).reshape(2, n), want["nz"], err_msg=line)
    assert int(lines[0].split()[5]) != int(lines[1].split()[5])  # the two inputs differ in extent


@pytest.mark.gpu
def test_a_refused_capture_runs_eagerly_and_says_why(dirs, monkeypatch):
    import nnc
    from nnc.runtime import Module
    real = Module._execute

    def refuse(self, ins, outs, st, launches=None, capture=False):
        if capture:
            raise RuntimeError("stand-in for a launch the capture does not take")
        return real(self, ins, outs, st, launches)
    monkeypatch.setattr(Module, "_execute", refuse)
    d = dirs["nz"]
    g = nnc.load(d)
    assert not g.uses_cuda_graph and "capture failed" in g.graph_fallback and "stand-in" in g.graph_fallback
    feed = _random_inputs(_plan(d), 5)
    want = nnc.load(d, backend="reference").run(feed)
    got = g.run(feed, output="numpy", poison=True)
    for n in want:
        _close(got[n], want[n], f"eager fallback {n}")


def test_run_no_cuda_graph_flag_is_for_the_cuda_backend(dirs, capsys):
    from nnc.cli import main
    assert main(["run", str(dirs["tiny_cnn"]), "--no-cuda-graph"]) == 1
    assert "--no-cuda-graph chooses how the cuda backend launches" in capsys.readouterr().err
