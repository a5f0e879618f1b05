"""Execution contexts (nnc.api.ExecutionContext): one loaded model, many contexts, each with its
own activation memory. CPU: the reference backend in the plan's arena (PlanExecutor forks), run
concurrently from threads, checked against the plain interpreter; run_async futures. GPU-marked:
CUDA contexts (own arena, stream, graph) and the pipelined run_async copies."""
import threading
from pathlib import Path

import numpy as np
import pytest

import nnc
from nnc.api import ContextBusyError, ExecutionContext
from nnc.driver import compile_model
from nnc.ir.interp import Interpreter

ROOT = Path(__file__).resolve().parents[1]
SHAPE = [2, 3, 32, 32]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("ctx") / "tiny_cnn"
    compile_model(str(ROOT / "examples" / "tiny_cnn.onnx"), d, shapes={"input": SHAPE}, arch="sm_90")
    return d


def _feeds(n, seed=1):
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal(SHAPE).astype(np.float32)} for _ in range(n)]


def _expected(m, feed):
    return Interpreter(m.ir).run(feed)  # the plain interpreter: no arena at all


def _close(got, want):
    for k, w in want.items():
        np.testing.assert_allclose(got[k], w, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(w).max())))


def test_contexts_share_weights_own_arena(tiny):
    m = nnc.load(tiny, backend="reference")
    assert m.in_arena
    a, b = m.context(), m.context()
    assert isinstance(a, ExecutionContext) and a.module is m
    ra, rb, rm = a.executor._regions, b.executor._regions, m.executor._regions
    assert ra["weights"] is rm["weights"] and ra["persistent"] is rm["persistent"]  # shared
    assert ra["arena"] is not rb["arena"] and ra["arena"] is not rm["arena"]          # owned
    assert ra[("input", 0)] is not rb[("input", 0)] and ra[("output", 0)] is not rb[("output", 0)]
    f = _feeds(1)[0]
    _close(a.run(f), _expected(m, f))
    assert a.outputs == m.outputs and a.inputs == m.inputs


def test_concurrent_threads_independent_and_correct(tiny):
    m = nnc.load(tiny, backend="reference")
    n_threads, per = 4, 3
    feeds = _feeds(n_threads * per, seed=7)
    want = [_expected(m, f) for f in feeds]
    got, errors = {}, []
    start = threading.Barrier(n_threads)

    def worker(t):
        try:
            ctx = m.context()
            start.wait()
            for j in range(per):
                k = t * per + j
                got[k] = ctx.run(feeds[k])
        except BaseException as e:  # reported below
            errors.append(e)

    ths = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert not errors, errors
    for k in range(len(feeds)):
        _close(got[k], want[k])
    # different inputs gave different outputs: no context returned another's result
    outs = [got[k]["output"].tobytes() if "output" in got[k] else next(iter(got[k].values())).tobytes()
            for k in range(len(feeds))]
    assert len(set(outs)) == len(feeds)


def test_one_context_two_threads_is_a_clear_error(tiny):
    m = nnc.load(tiny, backend="reference")
    ctx = m.context()
    ctx._busy.acquire()  # as if another thread were inside run()
    try:
        with pytest.raises(ContextBusyError, match="one context per thread"):
            ctx.run(_feeds(1)[0])
    finally:
        ctx._busy.release()


def test_run_async_futures_in_order(tiny):
    m = nnc.load(tiny, backend="reference")
    feeds = _feeds(4, seed=3)
    futs = [m.run_async(f) for f in feeds]
    for f, fut in zip(feeds, futs):
        _close(fut.result(timeout=120), _expected(m, f))
    ctx = m.context()
    fut = ctx.run_async({"input": np.zeros([1, 3, 32, 32], np.float32)})  # wrong shape
    with pytest.raises(nnc.ir.errors.InputError, match="input 'input'"):
        fut.result(timeout=60)
    ctx.close()


def test_plain_interpreter_contexts(tiny):
    m = nnc.load(tiny, backend="reference", in_arena=False)
    ctx = m.context()
    assert ctx.executor is None
    f = _feeds(1, seed=5)[0]
    _close(ctx(f["input"]) if len(m.outputs) > 1 else {m.output_names[0]: ctx(f["input"])}, _expected(m, f))


# ---------------------------------------------------------------- GPU (not run on the CPU machine)

@pytest.mark.gpu
def test_cuda_contexts_concurrent_threads(tiny):
    m = nnc.load(tiny)
    ref = nnc.load(tiny, backend="reference")
    n_threads, per = 4, 8
    feeds = _feeds(n_threads * per, seed=11)
    got, errors = {}, []

    def worker(t):
        try:
            ctx = m.context()
            assert ctx.uses_cuda_graph == m.uses_cuda_graph
            for j in range(per):
                k = t * per + j
                got[k] = ctx.run(feeds[k], output="numpy")
        except BaseException as e:
            errors.append(e)

    ths = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert not errors, errors
    for k, f in enumerate(feeds):
        _close(got[k], ref.run(f))
    _close(m.run(feeds[0], output="numpy"), ref.run(feeds[0]))  # the module's own run still works
    _close(m.run_async(feeds[1], output="numpy").result(timeout=60), ref.run(feeds[1]))


_SLEEP = r"""extern "C" __global__ void nnc_test_spin(long long cycles) {
  long long t0 = clock64();
  while (clock64() - t0 < cycles) {}
}"""


@pytest.mark.gpu
def test_cuda_run_async_pipelines_copies(tmp_path):
    """Requests in flight on one context give the right answers in order; and with the compute
    stream held back by a spinning kernel (about 0.5 s), the H2D of request 1 completes while the
    compute of request 0 has not: the copies run on their own stream, overlapping compute."""
    import time
    import cupy
    d = tmp_path / "big"
    compile_model(str(ROOT / "examples" / "tiny_cnn.onnx"), d, shapes={"input": [64, 3, 32, 32]})
    m = nnc.load(d)
    ref = nnc.load(d, backend="reference")
    ctx = m.context(slots=3)
    rng = np.random.default_rng(2)
    feeds = [{"input": rng.standard_normal([64, 3, 32, 32]).astype(np.float32)} for _ in range(12)]
    res = [f.result(timeout=60) for f in [ctx.run_async(f, output="numpy") for f in feeds]]
    for f, r in zip(feeds, res):
        _close(r, ref.run(f))
    spin = cupy.RawKernel(_SLEEP, "nnc_test_spin")
    with ctx.stream:
        spin((1,), (1,), (np.int64(1_000_000_000),))  # ~1e9 cycles: about 0.5 s at H200 clocks
    f0, f1 = ctx.run_async(feeds[0], output="numpy"), ctx.run_async(feeds[1], output="numpy")
    a, b = ctx.slots[12 % 3], ctx.slots[13 % 3]
    t0 = time.perf_counter()
    while not b.h2d_done.done and time.perf_counter() - t0 < 0.2:
        time.sleep(0.001)
    assert b.h2d_done.done, "request 1's H2D did not finish while the compute stream was busy"
    assert not a.compute_done.done, "the spin kernel ended too early for this check"
    r0, r1 = f0.result(timeout=60), f1.result(timeout=60)
    _close(r0, ref.run(feeds[0]))
    _close(r1, ref.run(feeds[1]))
    cupy_out = ctx.run(feeds[2])  # output="cupy" by default on cuda
    _close({k: cupy.asnumpy(v) for k, v in cupy_out.items()}, ref.run(feeds[2]))
    ctx.close()


# ---------------------------------------------------------------- the C API (nvcc builds on the CPU)

CTX_MAIN = r"""
#include "nnc_model.h"
#include <cmath>
#include <cstdio>
#include <thread>
#include <vector>

// two contexts of one model run on two threads and streams, each on its own input; each result
// must equal the model's own run of the same input
int main(int argc, char** argv) {
  if (argc < 2) { std::printf("contexts: %s\n", "built"); return 0; }
  nnc_ctxm* m = nullptr;
  if (nnc_ctxm_create(argv[1], &m) != NNC_OK) { std::printf("create: %s\n", nnc_ctxm_last_error()); return 1; }
  const size_t nin = nnc_ctxm_input_nbytes(0) / 4, nout = nnc_ctxm_output_nbytes(0) / 4;
  const int K = 2;
  nnc_ctxm_context* ctx[K];
  std::vector<float> want[K], got[K];
  float *din[K], *dout[K];
  for (int k = 0; k < K; ++k) {
    if (nnc_ctxm_context_create(m, &ctx[k]) != NNC_OK) { std::printf("ctx: %s\n", nnc_ctxm_last_error()); return 1; }
    std::vector<float> x(nin);
    for (size_t i = 0; i < nin; ++i) x[i] = std::sin(0.37f * i + k);
    cudaMalloc(&din[k], nin * 4);
    cudaMalloc(&dout[k], nout * 4);
    cudaMemcpy(din[k], x.data(), nin * 4, cudaMemcpyHostToDevice);
    const void* ins[] = {din[k]};
    void* outs[] = {dout[k]};
    if (nnc_ctxm_run(m, 0, ins, outs) != NNC_OK) return 1;
    cudaDeviceSynchronize();
    want[k].resize(nout);
    cudaMemcpy(want[k].data(), dout[k], nout * 4, cudaMemcpyDeviceToHost);
    cudaMemset(dout[k], 0xFF, nout * 4);  // poisoned before the contexts write it
  }
  std::vector<std::thread> th;
  int rc[K] = {};
  for (int k = 0; k < K; ++k)
    th.emplace_back([&, k] {
      cudaStream_t s;
      cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
      const void* ins[] = {din[k]};
      void* outs[] = {dout[k]};
      for (int r = 0; r < 20 && !rc[k]; ++r) rc[k] = nnc_ctxm_context_run(ctx[k], s, ins, outs);
      cudaStreamSynchronize(s);
      cudaStreamDestroy(s);
    });
  for (auto& t : th) t.join();
  for (int k = 0; k < K; ++k) {
    if (rc[k]) { std::printf("context_run: %s\n", nnc_ctxm_last_error()); return 1; }
    got[k].resize(nout);
    cudaMemcpy(got[k].data(), dout[k], nout * 4, cudaMemcpyDeviceToHost);
    for (size_t i = 0; i < nout; ++i)
      if (std::fabs(got[k][i] - want[k][i]) > 1e-5f * (1 + std::fabs(want[k][i]))) {
        std::printf("context %d output %zu: %g, the model gave %g\n", k, i, got[k][i], want[k][i]);
        return 1;
      }
    nnc_ctxm_context_destroy(ctx[k]);
  }
  nnc_ctxm_destroy(m);
  std::printf("contexts ok\n");
  return 0;
}
"""


@pytest.fixture(scope="module")
def ctx_app(tmp_path_factory):
    import shutil
    import subprocess
    nvcc = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)
    if nvcc is None:
        pytest.skip("needs nvcc")
    d = tmp_path_factory.mktemp("capi_ctx")
    out = d / "ctxm"
    compile_model(str(ROOT / "examples" / "tiny_cnn.onnx"), out, shapes={"input": SHAPE}, arch="sm_90", name="ctxm")
    (d / "main.cpp").write_text(CTX_MAIN)
    r = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90", "-I", str(out), str(out / "model.cu"), str(d / "main.cpp"),
                        "-o", str(d / "app")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "app", out


def test_c_api_contexts_build(ctx_app):
    import subprocess
    app, _ = ctx_app
    r = subprocess.run([str(app)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "contexts: built" in r.stdout


@pytest.mark.gpu
def test_c_api_contexts_run_concurrently(ctx_app):
    import subprocess
    app, out = ctx_app
    r = subprocess.run([str(app), str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "contexts ok" in r.stdout, r.stdout + r.stderr


@pytest.mark.gpu
def test_cuda_context_host_cost_per_request(tmp_path):
    """Steady-state host cost of one request at batch 1 (run_async submit: input staging into
    pinned memory and the queued copies, events and graph launch), median over 300 requests
    after 50 warm-up: printed, and bounded (a loose 1 ms: the measurement is the point)."""
    import time
    d = tmp_path / "b1"
    compile_model(str(ROOT / "examples" / "tiny_cnn.onnx"), d, shapes={"input": [1, 3, 32, 32]})
    m = nnc.load(d)
    ctx = m.context(slots=3)
    assert ctx.uses_cuda_graph
    x = {"input": np.random.default_rng(0).standard_normal([1, 3, 32, 32]).astype(np.float32)}
    submit = []
    futs = []
    for i in range(350):
        if len(futs) >= 2:  # 2 in flight of 3 slots: a submit never waits for a free slot
            futs.pop(0).result(timeout=30)
        t0 = time.perf_counter()
        futs.append(ctx.run_async(x, output="numpy"))
        submit.append(time.perf_counter() - t0)
    for f in futs:
        f.result(timeout=30)
    us = float(np.median(submit[50:])) * 1e6
    print(f"host cost per request (run_async submit, batch 1): {us:.1f} us median")
    assert 0 < us < 1000
    ctx.close()


# ---------------------------------------------------------------- CudaContext's bookkeeping, no GPU

class _Ptr:
    def __init__(self, p):
        self.ptr = p


class _DevArray:
    """A stand-in for a cupy array: host bytes with a .data.ptr (so memcpyAsync can memmove)."""

    def __init__(self, a):
        self._a = a
        self.shape, self.dtype, self.nbytes = a.shape, a.dtype, a.nbytes
        self.flags = a.flags
        self.data = _Ptr(a.ctypes.data)

    def reshape(self, *s):
        return _DevArray(self._a.reshape(*s))

    def __getitem__(self, k):
        return _DevArray(self._a[k])


class _FakeCupy:
    """Just what compiler/contexts.py calls, executed at once on the host (every stream
    synchronous): checks CudaContext's Python logic, not the device's asynchrony."""

    def __init__(self):
        import ctypes
        import types
        self.uint8 = np.uint8
        self.ndarray = _DevArray
        fake = self

        class Stream:
            def __init__(self, non_blocking=False):
                self.ptr, self.capturing = id(self), None

            def __enter__(self):
                return self

            def __exit__(self, *a):
                return False

            def begin_capture(self, mode=None):
                self.capturing = []

            def end_capture(self):
                ops, self.capturing = self.capturing, None
                return types.SimpleNamespace(launch=lambda st: [op() for op in ops], upload=lambda st: None)

            def synchronize(self):
                pass

            def wait_event(self, e):
                fake.waits.append(e)

        class Event:
            def record(self, st=None):
                fake.records.append(self)

            def synchronize(self):
                pass

        def memcpy(dst, src, n, kind, stream):
            ctypes.memmove(dst, src, n)
        self.records, self.waits = [], []
        self.cuda = types.SimpleNamespace(Stream=Stream, Event=Event, alloc_pinned_memory=lambda n: bytearray(n),
                                          runtime=types.SimpleNamespace(memcpyAsync=memcpy))

    def empty(self, shape, dtype):
        return _DevArray(np.full(shape, 0x7F, np.dtype(dtype)) if np.dtype(dtype) == np.uint8
                         else np.full(shape, np.nan if np.dtype(dtype).kind == "f" else 7, np.dtype(dtype)))

    def ascontiguousarray(self, a):
        return _DevArray(np.ascontiguousarray(a._a))

    def asarray(self, a):
        return a if isinstance(a, _DevArray) else _DevArray(np.asarray(a))


def _fake_module(cp):
    """A nnc.runtime.Module whose one 'launch' computes y = 2 * x + 1 through the arena."""
    import ctypes
    from nnc import runtime
    m = object.__new__(runtime.Module)
    m._cp = cp
    m.dir = Path("<fake>")
    m.plan = {"inputs": [{"name": "x", "dtype": "float32", "shape": [2, 4]}],
              "outputs": [{"name": "y", "dtype": "float32", "shape": [2, 4]}],
              "memory": {"arena_bytes": 32}}
    m.graph, m.graph_fallback = object(), None  # as if the module's own capture worked
    m.calls = 0

    def execute(ins, outs, st, launches=None, capture=False, arena=None, extent_host=None):
        def op():
            m.calls += 1
            x = np.ctypeslib.as_array((ctypes.c_float * 8).from_address(ins[0].data.ptr))
            a = np.ctypeslib.as_array((ctypes.c_float * 8).from_address(arena.data.ptr))
            y = np.ctypeslib.as_array((ctypes.c_float * 8).from_address(outs[0].data.ptr))
            a[:] = 2 * x
            y[:] = a + 1
        if st.capturing is not None:
            st.capturing.append(op)
        else:
            op()
    m._execute = execute
    return m


def test_cuda_context_bookkeeping_on_a_fake_device():
    from nnc.contexts import CudaContext
    cp = _FakeCupy()
    m = _fake_module(cp)
    ctx = CudaContext(m, slots=2)
    assert ctx.uses_cuda_graph and len(ctx.slots) == 2 and m.calls == 0  # captured, not run
    assert ctx.slots[0].in_bufs[0].data.ptr != ctx.slots[1].in_bufs[0].data.ptr
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal([2, 4]).astype(np.float32) for _ in range(7)]
    futs = [ctx.run_async({"x": x}, output="numpy") for x in xs]
    for x, f in zip(xs, futs):
        np.testing.assert_array_equal(f.result(timeout=10)["y"], 2 * x + 1)
    assert m.calls == 7
    # every compute waited on its H2D, every D2H on its compute: 2 waits, 3 events per request
    assert len(cp.waits) == 14 and len(cp.records) == 21
    dev = ctx.run({"x": xs[0]})  # output="cupy": a device array the caller owns
    assert isinstance(dev["y"], _DevArray)
    np.testing.assert_array_equal(dev["y"]._a, 2 * xs[0] + 1)
    assert dev["y"].data.ptr not in {b.data.ptr for s in ctx.slots for b in s.out_bufs}
    with pytest.raises(nnc.ir.errors.InputError, match="expected shape"):
        ctx.run_async({"x": np.zeros([3], np.float32)})
    with pytest.raises(nnc.ir.errors.InputError, match="missing"):
        ctx.run_async({})
    assert ctx._free._value == 2  # bad inputs took no slot
    ctx._submit.acquire()
    try:
        with pytest.raises(ContextBusyError):
            ctx.run_async({"x": xs[0]})
    finally:
        ctx._submit.release()
    ctx.close()
    m.graph = None  # an eager module: contexts launch eagerly too
    m.graph_fallback = "cuda_graph=False"
    e = CudaContext(m, slots=1)
    assert not e.uses_cuda_graph and e.graph_fallback == "cuda_graph=False"
    np.testing.assert_array_equal(e.run({"x": xs[1]}, output="numpy")["y"], 2 * xs[1] + 1)
    e.close()
