"""The group C API of a `nnc compile --devices K` directory (compiler/multi_device_capi.py,
templates/multi_device.*.j2): step tables (two streams per device, cross-stream waits, the
pipeline's receive of micro-batch i + 1 before its send of i), the executor's walk simulated
(and a stalling program refused), model strings escaped, the group source compiled with nvcc, the
CMake project (every build + the group + the example runner) built and its exports checked on
the CPU, and the executor run on the host over CUDA and NCCL stand-ins. GPU: the example runner (the C API) on one GPU in transport copy, a 2-stage pipeline and
a 2-way tensor-parallel transformer block, against the single-device build; NCCL on >= 2 GPUs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import nnc
from nnc.multi_device_capi import (COMM, COMPUTE, RECV, RUN, SEND, Buffer, GroupApiError, GroupTables, GStep,
                                   _hazards, simulate, tables_for_dir)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)
needs_cmake = pytest.mark.skipif(NVCC is None or shutil.which("cmake") is None, reason="needs nvcc and cmake")
JOBS = str(min(os.cpu_count() or 2, 16))


def _compile(model, out, devices, parallel="pipeline", micro_batches=1, shapes=None, codegen=False):
    from nnc.api import CompileOptions
    from nnc.multi_device import compile_multi_device
    opts = CompileOptions(shapes=shapes, backend="cuda" if codegen else "reference", codegen=codegen,
                          tune=False if codegen else None, precision="fp16" if codegen else "fp32",
                          arch="sm_90" if codegen else None)
    return compile_multi_device(str(model), out, opts, devices, parallel, micro_batches)


def _cmd(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kw)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r


@pytest.fixture(scope="module")
def cnn3(tmp_path_factory):
    """tiny_cnn over 3 pipeline stages, 4 micro-batches of 2 (IR only)."""
    out = tmp_path_factory.mktemp("cnn3") / "out"
    _compile(EXAMPLES / "tiny_cnn.onnx", out, 3, "pipeline", 4, {"input": [8, 3, 32, 32]})
    return out


@pytest.fixture(scope="module")
def pipe2(tmp_path_factory):
    """tiny_cnn fp16, 2 stages x 2 micro-batches of 4, CUDA builds for sm_90 (no GPU needed)."""
    out = tmp_path_factory.mktemp("pipe2") / "out"
    plan = _compile(EXAMPLES / "tiny_cnn.onnx", out, 2, "pipeline", 2, {"input": [8, 3, 32, 32]}, codegen=True)
    return out, plan


# ---------------------------------------------------------------- tables

def test_pipeline_tables_two_streams_and_hoisted_receives(cnn3):
    t = tables_for_dir(cnn3)
    mid = [t.steps[i] for i in t.device_steps[1]]
    assert [(s.kind, s.mb) for s in mid] == [(RECV, 0), (RUN, 0), (RECV, 1), (SEND, 0), (RUN, 1), (RECV, 2),
                                            (SEND, 1), (RUN, 2), (RECV, 3), (SEND, 2), (RUN, 3), (SEND, 3)]
    assert all(s.stream == (COMM if s.kind in (RECV, SEND) else COMPUTE) for s in t.steps)
    idx = t.device_steps[1]
    at = {(t.steps[i].kind, t.steps[i].mb): i for i in idx}
    # the run waits for its receive; the send for its run; the run of mb 2 for the send of mb 0
    # (that output slot); the receive of mb 2 for the run of mb 0 (that receive slot)
    assert at[(RECV, 0)] in t.steps[at[(RUN, 0)]].waits
    assert t.steps[at[(SEND, 0)]].waits == [at[(RUN, 0)]]
    assert set(t.steps[at[(RUN, 2)]].waits) == {at[(RECV, 2)], at[(SEND, 0)]}
    assert t.steps[at[(RECV, 2)]].waits == [at[(RUN, 0)]]
    assert at[(SEND, 1)] not in t.steps[at[(RUN, 2)]].waits  # the send of mb 1 overlaps the run of mb 2
    # double buffering: receive buffers and build outputs have two slots
    assert all(b.slots == 2 for b in t.buffers if b.input < 0)
    assert {b["slots"] for b in t.builds} == {2}
    done = simulate(t)
    assert len(done) == len(t.steps)


def test_tensor_parallel_tables(tmp_path):
    pytest.importorskip("nnc.passes.shard_tensor_parallel")
    out = tmp_path / "tp"
    _compile(EXAMPLES / "tiny_transformer.onnx", out, 2, "tensor")
    t = tables_for_dir(out)
    kinds = [[t.steps[i].kind for i in ix] for ix in t.device_steps]
    assert kinds[0][:-1] == kinds[1]  # the same steps; y is copied out from device 0 only
    from nnc.multi_device_capi import ALLREDUCE, LOAD, OUTPUT
    assert kinds[0].count(ALLREDUCE) == 2 and kinds[0][0] == LOAD
    assert [t.steps[i].kind for i in t.device_steps[0]][-1] == OUTPUT  # y from device 0 only
    assert OUTPUT not in kinds[1]
    assert all(b.slots == 1 for b in t.buffers)
    simulate(t)


def test_race_check_finds_a_missing_wait(cnn3):
    """check_races (run on every table build) proves the waits complete; drop one and it names the race."""
    from nnc.multi_device_capi import check_races
    for kind, device in ((RUN, 1), (SEND, 0)):
        t = tables_for_dir(cnn3)
        check_races(t)
        st = next(s for s in t.steps if s.device == device and s.kind == kind and s.mb == 2)
        st.waits = []
        with pytest.raises(GroupApiError, match=r"race on buffer \d+ .* slot 0: step \d+ .* micro-batch 2, device "
                                                 rf"{device}\) .* are not ordered"):
            check_races(t)


def test_a_stalling_program_is_refused():
    """Both devices receive before they send: the walk cannot move and says where each waits."""
    bufs = [Buffer(0, 16), Buffer(0, 16), Buffer(1, 16), Buffer(1, 16)]
    steps = [GStep(0, RECV, COMM, 0, [0, 1], what="a"), GStep(0, SEND, COMM, 0, [1, 1], what="b"),
             GStep(1, RECV, COMM, 0, [2, 0], what="c"), GStep(1, SEND, COMM, 0, [3, 0], what="d")]
    t = GroupTables("m", 2, 1, bufs, steps, [[0, 1], [2, 3]], [], [], [])
    _hazards(t)
    with pytest.raises(GroupApiError, match=r"stall: device 0 at recv of micro-batch 0 \(a\); device 1 at recv"):
        simulate(t)
    steps[2], steps[3] = GStep(1, SEND, COMM, 0, [3, 0]), GStep(1, RECV, COMM, 0, [2, 0])
    assert len(simulate(t)) == 4


def _emulate(out, tables, feeds: dict) -> dict:
    """The C executor's data semantics in numpy: every step of the tables on byte buffers (slots,
    micro-batch offsets, staging, build argument order, AllReduce / AllGather layouts as transport
    copy computes them), sends buffered. Checks the tables' refs and offsets, not the streams."""
    from collections import deque
    from nnc.ir.interp import Interpreter
    from nnc.multi_device import load_multi, segments
    from nnc.multi_device_capi import ALLGATHER, ALLREDUCE, LOAD, OUTPUT, STAGE
    mdm = load_multi(Path(out) / "ir")
    mods = [[sg.module for sg in segments(m) if sg.module is not None] for m in mdm.devices]
    seen = [0] * tables.devices
    build_mod = []
    for b in tables.builds:
        build_mod.append(mods[b["device"]][seen[b["device"]]])
        seen[b["device"]] += 1
    M = tables.micro_batches
    mem = {}

    def buf(b, mb, nbytes=None):
        info = tables.buffers[b]
        if info.input >= 0:
            whole = np.ascontiguousarray(feeds[tables.inputs[info.input]["name"]]).view(np.uint8).reshape(-1)
            st = info.stride(M)
            return whole[mb * st: mb * st + (nbytes or st)] if M > 1 else whole
        key = (b, mb % info.slots)
        if key not in mem:
            mem[key] = np.full(info.nbytes, 0xAB, np.uint8)
        return mem[key]
    outs = {e["name"]: np.zeros(e["nbytes"], np.uint8) for e in tables.outputs}
    pos = [0] * tables.devices
    fifo: dict = {}
    coll: dict = {}
    while any(pos[k] < len(ix) for k, ix in enumerate(tables.device_steps)):
        moved = False
        for k, ix in enumerate(tables.device_steps):
            while pos[k] < len(ix):
                st = tables.steps[ix[pos[k]]]
                r = st.refs
                if st.kind == SEND:
                    for b, peer in zip(r[0::2], r[1::2]):
                        fifo.setdefault((k, peer), deque()).append(buf(b, st.mb).copy())
                elif st.kind == RECV:
                    if any(not fifo.get((peer, k)) for peer in r[1::2]):
                        break
                    for b, peer in zip(r[0::2], r[1::2]):
                        buf(b, st.mb)[:] = fifo[(peer, k)].popleft()
                elif st.kind in (ALLREDUCE, ALLGATHER):
                    seq = coll.setdefault(("seq", k), 0)
                    slot = coll.setdefault(seq, {})
                    slot[k] = (st, buf(r[0], st.mb).copy())
                    if len(slot) < tables.devices:
                        break
                    members = [slot[d][1] for d in range(tables.devices)]
                    for d in range(tables.devices):
                        sd, _ = slot[d]
                        rd = sd.refs
                        if sd.kind == ALLREDUCE:
                            dt = np.dtype({6: np.float16, 7: np.float32}[sd.a0])
                            acc = sum(m.view(dt).astype(np.float64) for m in members)
                            buf(rd[1], sd.mb)[:] = acc.astype(dt).view(np.uint8)
                        else:
                            dst = buf(rd[2] if rd[2] >= 0 else rd[1], sd.mb).reshape(sd.p1, -1)
                            for j, m in enumerate(members):
                                dst[:, j * sd.p2:(j + 1) * sd.p2] = m.reshape(sd.p1, sd.p2)
                        coll[("seq", d)] = seq + 1
                        pos[d] += 1
                    del coll[seq]
                    moved = True
                    continue
                elif st.kind == STAGE:
                    buf(r[1], st.mb)[:] = buf(r[0], st.mb, st.p1)
                elif st.kind == RUN:
                    b = tables.builds[st.build]
                    m = build_mod[st.build]
                    feed = {a.name: buf(ref, st.mb)[:nb].view(a.type.dtype.np).reshape(a.type.shape)
                            for a, ref, nb in zip(m.main.args, r[:st.n_in], b["inputs"])}
                    res = Interpreter(m).run(feed)
                    for v, ref in zip(m.main.results, r[st.n_in:]):
                        raw = np.ascontiguousarray(res[v.name]).view(np.uint8).reshape(-1)
                        buf(ref, st.mb)[:raw.size] = raw
                elif st.kind == OUTPUT:
                    e = tables.outputs[st.a0]
                    outs[e["name"]][st.p0:st.p0 + st.p1] = buf(r[0], st.mb)[:st.p1]
                elif st.kind != LOAD:
                    raise AssertionError(st)
                pos[k] += 1
                moved = True
        assert moved, "the emulation stalled"
    return {e["name"]: outs[e["name"]].view(np.dtype(e["dtype"])).reshape(e["shape"]) for e in tables.outputs}


def test_tables_compute_what_run_multi_computes(cnn3, tmp_path, rng):
    """The tables' data flow (every ref, slot, offset and argument order) gives run_multi's results."""
    from nnc.multi_device import load_multi, run_multi
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    t = tables_for_dir(cnn3)
    want = run_multi(load_multi(cnn3 / "ir"), {"input": x})
    np.testing.assert_array_equal(_emulate(cnn3, t, {"input": x})["probs"], want["probs"])
    pytest.importorskip("nnc.passes.shard_tensor_parallel")
    out = tmp_path / "tp"
    _compile(EXAMPLES / "tiny_transformer.onnx", out, 2, "tensor")
    xt = rng.standard_normal((1, 16, 64)).astype(np.float32)
    got = _emulate(out, tables_for_dir(out), {"x": xt})["y"]
    np.testing.assert_allclose(got, run_multi(load_multi(out / "ir"), {"x": xt})["y"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- rendered sources

def test_plan_and_header(pipe2):
    out, plan = pipe2
    assert plan["c_api"]["prefix"] == "nnc_tiny_cnn_group"
    assert set(plan["c_api"]["files"]) == {"CMakeLists.txt", "nnc_group_example.cpp", "nnc_tiny_cnn_group.cu",
                                           "nnc_tiny_cnn_group.h"}
    h = (out / "nnc_tiny_cnn_group.h").read_text()
    for decl in ("NNC_API int nnc_tiny_cnn_group_create(const char* out_dir, const int* device_ids, int num_device_ids, "
                 "int transport,", "NNC_API int nnc_tiny_cnn_group_run(nnc_tiny_cnn_group* group, cudaStream_t stream, "
                 "const void* const* inputs, void* const* outputs);", "NNC_API void nnc_tiny_cnn_group_destroy(",
                 "NNC_GROUP_COPY = 2"):
        assert decl in h, decl
    cu = (out / "nnc_tiny_cnn_group.cu").read_text()
    assert '#include "device0/nnc_model.h"' in cu and '#include "device1/nnc_model.h"' in cu
    assert "#include <nccl.h>" not in cu and 'dlsym(n.lib, sym)' in cu and 'setenv("NCCL_NVLS_ENABLE", "0", 1)' in cu
    assert "cuMulticast" not in cu
    assert "// IR op AllReduce" in cu  # the copy transport's kernel says what it computes
    cm = (out / "CMakeLists.txt").read_text()
    assert "device0/model.cu" in cm and "device1/model.cu" in cm and "nnc_group_example" in cm
    assert cm.index("CMAKE_CUDA_ARCHITECTURES 90") < cm.index("\nproject(")


HOSTILE = 'in"*/\n#define x \\??='


def test_model_strings_are_escaped(pipe2, tmp_path):
    """A hostile value / input name reaches the group source only as an escaped string or comment."""
    from nnc.multi_device_capi import render_group
    out, _ = pipe2
    t = tables_for_dir(out)
    t.inputs = [{**e, "name": HOSTILE} for e in t.inputs]
    for b in t.buffers:
        b.what = f"recv {HOSTILE}"
    for s in t.steps:
        s.what = HOSTILE
    files = render_group(t, "sm_90")
    for name, text in files.items():
        assert HOSTILE not in text and "??" not in text, name
        assert "#define x" not in [line.strip()[:9] for line in text.splitlines()], name
    assert r'{ "in\042*/\012#define x \134\077\077=", nullptr }' in files["nnc_tiny_cnn_group.cu"]


@pytest.fixture(scope="module")
def group_lib(pipe2):
    """OUT's CMake project built: one libnnc_tiny_cnn_group.so (both builds and the group) and
    the example runner, with nvcc on the CPU."""
    if NVCC is None or shutil.which("cmake") is None:
        pytest.skip("needs nvcc and cmake")
    out, _ = pipe2
    build = out.parent / "build"
    _cmd(["cmake", "-S", out, "-B", build, f"-DCMAKE_CUDA_COMPILER={NVCC}"])
    _cmd(["cmake", "--build", build, "-j", JOBS])
    return build


@needs_cmake
def test_library_exports_the_group_and_every_build(group_lib):
    r = _cmd(["nm", "-D", "--defined-only", group_lib / "libnnc_tiny_cnn_group.so"])
    exported = {l.split()[-1] for l in r.stdout.splitlines() if not l.split()[-1].startswith("_")}
    group = {s for s in exported if s.startswith("nnc_tiny_cnn_group_")}
    assert {f"nnc_tiny_cnn_group_{f}" for f in ("create", "run", "destroy", "transport", "set_timing", "device_ms",
                                                 "num_devices", "output_device", "last_error")} <= group
    assert {"nnc_tiny_cnn_dev0_create", "nnc_tiny_cnn_dev1_run"} <= exported
    assert (group_lib / "nnc_group_example").exists()


# ---------------------------------------------------------------- the executor itself, on the host

FAKE_CUDA_RUNTIME = r'''// a CUDA runtime stand-in for host tests: "device" memory is host memory, every call synchronous
#pragma once
#include <cstddef>
#include <cstdlib>
#include <cstring>
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2 };
typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;
enum { cudaEventDisableTiming = 2, cudaStreamNonBlocking = 1 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2, cudaMemcpyDeviceToDevice = 3 };
inline const char* cudaGetErrorString(cudaError_t e) { return e ? "fake error" : "no error"; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 2; return cudaSuccess; }
static int nnc_fake_device = 0;
inline cudaError_t cudaSetDevice(int d) { nnc_fake_device = d; return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = nnc_fake_device; return cudaSuccess; }
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) { *s = (cudaStream_t)std::malloc(1); return cudaSuccess; }
inline cudaError_t cudaStreamDestroy(cudaStream_t s) { std::free(s); return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) { *e = (cudaEvent_t)std::malloc(1); return cudaSuccess; }
inline cudaError_t cudaEventCreate(cudaEvent_t* e) { *e = (cudaEvent_t)std::malloc(1); return cudaSuccess; }
inline cudaError_t cudaEventDestroy(cudaEvent_t e) { std::free(e); return cudaSuccess; }
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t) { return e ? cudaSuccess : cudaErrorInvalidValue; }
inline cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t e, unsigned) { return e ? cudaSuccess : cudaErrorInvalidValue; }
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t, cudaEvent_t) { *ms = 0.f; return cudaSuccess; }
inline cudaError_t cudaMalloc(void** p, size_t n) { *p = std::malloc(n); return *p ? cudaSuccess : cudaErrorMemoryAllocation; }
inline cudaError_t cudaFree(void* p) { std::free(p); return cudaSuccess; }
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t) { std::memmove(d, s, n); return cudaSuccess; }
inline cudaError_t cudaMemcpyPeerAsync(void* d, int, const void* s, int, size_t n, cudaStream_t) { std::memmove(d, s, n); return cudaSuccess; }
inline cudaError_t cudaMemcpy2DAsync(void* d, size_t dp, const void* s, size_t sp, size_t w, size_t h, cudaMemcpyKind, cudaStream_t) {
  for (size_t r = 0; r < h; ++r) std::memmove((char*)d + r * dp, (const char*)s + r * sp, w);
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
'''

FAKE_BUILD_H = r'''#pragma once
#include <cuda_runtime.h>
typedef struct {api} {api};
typedef struct {api}_context {api}_context;
extern "C" {{
int {api}_create(const char* path, {api}** m);
int {api}_run({api}* m, cudaStream_t s, const void* const* in, void* const* out);
void {api}_destroy({api}* m);
int {api}_context_create(const {api}* m, {api}_context** c);
int {api}_context_run({api}_context* c, cudaStream_t s, const void* const* in, void* const* out);
void {api}_context_destroy({api}_context* c);
const char* {api}_last_error(void);
}}
'''

FAKE_BUILD_CPP = r'''#include "{dir}/nnc_model.h"
#include <string>
typedef int (*nnc_fake_runner)(int build, int slot, const void* const* in, void* const* out);
extern nnc_fake_runner nnc_fake_run;
struct {api} {{ int slot; }};
struct {api}_context {{ int slot; }};
extern "C" {{
int {api}_create(const char* path, {api}** m) {{
  if (std::string(path).find("{dir}") == std::string::npos) return 2;
  *m = new {api}{{0}};
  return 0;
}}
int {api}_run({api}* m, cudaStream_t, const void* const* in, void* const* out) {{ return nnc_fake_run({index}, m->slot, in, out); }}
void {api}_destroy({api}* m) {{ delete m; }}
int {api}_context_create(const {api}*, {api}_context** c) {{ *c = new {api}_context{{1}}; return 0; }}
int {api}_context_run({api}_context* c, cudaStream_t, const void* const* in, void* const* out) {{ return nnc_fake_run({index}, c->slot, in, out); }}
void {api}_context_destroy({api}_context* c) {{ delete c; }}
const char* {api}_last_error(void) {{ return "fake build error"; }}
}}
'''

FAKE_RUNNER_CPP = r'''typedef int (*nnc_fake_runner)(int build, int slot, const void* const* in, void* const* out);
nnc_fake_runner nnc_fake_run = nullptr;
extern "C" void nnc_fake_set_runner(nnc_fake_runner r) { nnc_fake_run = r; }
'''


FAKE_NCCL_CPP = r'''// an NCCL stand-in for host tests: ranks in one process, every operation done at the outermost
// ncclGroupEnd (sends matched to receives per (sender, receiver) in order, collectives over all ranks)
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
struct FakeComm { int rank, n; };
struct FakeOp { int kind; FakeComm* c; const void* s; void* r; size_t count; int dt, op, peer; };
static std::vector<FakeOp> g_ops;
static int g_depth = 0, g_groups = 0, g_ungrouped = 0;
static std::string g_nvls = "unset";
static size_t esize(int dt) { return dt == 0 || dt == 1 ? 1 : dt == 6 || dt == 9 ? 2 : dt == 4 || dt == 5 || dt == 8 ? 8 : 4; }
static int flush() {
  ++g_groups;
  std::vector<bool> used(g_ops.size(), false);
  for (size_t i = 0; i < g_ops.size(); ++i) {
    FakeOp& a = g_ops[i];
    if (a.kind != 0 || used[i]) continue;
    for (size_t j = 0; j < g_ops.size(); ++j) {
      FakeOp& b = g_ops[j];
      if (used[j] || b.kind != 1 || b.c->rank != a.peer || b.peer != a.c->rank) continue;
      std::memmove(b.r, a.s, a.count * esize(a.dt));
      used[i] = used[j] = true;
      break;
    }
    if (!used[i]) return 5;  // a send without its receive in the group: would hang
  }
  std::vector<FakeOp*> coll;
  for (size_t i = 0; i < g_ops.size(); ++i) if (g_ops[i].kind >= 2) coll.push_back(&g_ops[i]);
  if (!coll.empty()) {
    const int n = coll[0]->c->n;
    if ((int)coll.size() != n) return 5;
    std::vector<FakeOp*> by(n);
    for (FakeOp* o : coll) by[o->c->rank] = o;
    if (by[0]->kind == 2) {  // all-reduce, float32 sum only
      if (by[0]->dt != 7 || by[0]->op != 0) return 5;
      std::vector<float> acc(by[0]->count, 0.f);
      for (int r = 0; r < n; ++r) for (size_t k = 0; k < acc.size(); ++k) acc[k] += ((const float*)by[r]->s)[k];
      for (int r = 0; r < n; ++r) std::memcpy(by[r]->r, acc.data(), acc.size() * 4);
    } else {
      const size_t b = by[0]->count * esize(by[0]->dt);
      for (int r = 0; r < n; ++r) for (int j = 0; j < n; ++j) std::memmove((char*)by[r]->r + j * b, by[j]->s, b);
    }
  }
  g_ops.clear();
  return 0;
}
extern "C" {
int ncclCommInitAll(void** comms, int n, const int*) {
  const char* v = std::getenv("NCCL_NVLS_ENABLE");
  g_nvls = v ? v : "unset";
  for (int i = 0; i < n; ++i) comms[i] = new FakeComm{i, n};
  return 0;
}
int ncclCommDestroy(void* c) { delete (FakeComm*)c; return 0; }
int ncclCommAbort(void* c) { delete (FakeComm*)c; return 0; }
int ncclGroupStart(void) { ++g_depth; return 0; }
int ncclGroupEnd(void) { return --g_depth == 0 ? flush() : 0; }
static int push(FakeOp o) { if (!g_depth) ++g_ungrouped; g_ops.push_back(o); return g_depth ? 0 : flush(); }
int ncclSend(const void* b, size_t n, int dt, int peer, void* c, void*) { return push({0, (FakeComm*)c, b, nullptr, n, dt, 0, peer}); }
int ncclRecv(void* b, size_t n, int dt, int peer, void* c, void*) { return push({1, (FakeComm*)c, nullptr, b, n, dt, 0, peer}); }
int ncclAllReduce(const void* s, void* r, size_t n, int dt, int op, void* c, void*) { return push({2, (FakeComm*)c, s, r, n, dt, op, -1}); }
int ncclAllGather(const void* s, void* r, size_t n, int dt, void* c, void*) { return push({3, (FakeComm*)c, s, r, n, dt, 0, -1}); }
const char* ncclGetErrorString(int) { return "fake nccl error"; }
const char* fake_nccl_nvls(void) { return g_nvls.c_str(); }
int fake_nccl_groups(void) { return g_groups; }
int fake_nccl_ungrouped(void) { return g_ungrouped; }
}
'''


def _fake_nccl(work: Path) -> Path:
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("needs g++")
    work.mkdir(parents=True, exist_ok=True)
    (work / "fake_nccl.cpp").write_text(FAKE_NCCL_CPP)
    lib = work / "libfakenccl.so"
    _cmd([gxx, "-std=c++17", "-shared", "-fPIC", work / "fake_nccl.cpp", "-o", lib])
    return lib


_HOST_GROUPS: dict = {}  # OUT -> (library, tables): one g++ build per program


def _host_group(out, work: Path):
    """OUT's group source compiled with g++ over a CUDA stand-in (host memory, synchronous calls)
    and fake builds that call back into Python: (ctypes library, tables)."""
    import ctypes
    if str(out) in _HOST_GROUPS:
        return _HOST_GROUPS[str(out)]
    from nnc.multi_device_capi import render_group
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("needs g++")
    t = tables_for_dir(out)
    files = render_group(t, "sm_90")
    (work / "inc").mkdir(parents=True, exist_ok=True)
    (work / "inc" / "cuda_runtime.h").write_text(FAKE_CUDA_RUNTIME)
    srcs = []
    for fname, text in files.items():
        (work / fname).write_text(text)
    for i, b in enumerate(t.builds):
        (work / b["dir"]).mkdir(parents=True, exist_ok=True)
        (work / b["dir"] / "nnc_model.h").write_text(FAKE_BUILD_H.format(api=b["api"]))
        (work / f"build{i}.cpp").write_text(FAKE_BUILD_CPP.format(api=b["api"], dir=b["dir"], index=i))
        srcs.append(work / f"build{i}.cpp")
    (work / "runner.cpp").write_text(FAKE_RUNNER_CPP)
    group_cu = next(work / f for f in files if f.endswith("_group.cu"))
    lib = work / "libhostgroup.so"
    _cmd([gxx, "-std=c++17", "-O0", "-g", "-shared", "-fPIC", "-DNNC_GROUP_HOST_EMULATION", "-I", work / "inc",
          "-I", work, "-x", "c++", group_cu, "-x", "none", *srcs, work / "runner.cpp", "-ldl", "-o", lib])
    _HOST_GROUPS[str(out)] = ctypes.CDLL(str(lib)), t
    return _HOST_GROUPS[str(out)]


def _host_run(out, work, feeds, transport=2, ids=(0,), nccl=b"/nonexistent/libnccl.so.2"):
    """Runs the group once through its C API on the host stand-in; returns (outputs, reason, build calls)."""
    import ctypes
    from nnc.ir.interp import Interpreter
    from nnc.multi_device import load_multi, segments
    lib, t = _host_group(out, work)
    mdm = load_multi(Path(out) / "ir")
    mods = [[sg.module for sg in segments(m) if sg.module is not None] for m in mdm.devices]
    order = {}
    for i, b in enumerate(t.builds):
        order.setdefault(b["device"], []).append(i)
    build_mod = {i: mods[d][j] for d, ix in order.items() for j, i in enumerate(ix)}
    calls = []
    RUNNER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p),
                              ctypes.POINTER(ctypes.c_void_p))

    def runner(build, slot, ins, outs):
        try:
            m = build_mod[build]
            feed = {}
            for i, a in enumerate(m.main.args):
                dt = np.dtype(a.type.dtype.np)
                n = int(np.prod(a.type.shape)) * dt.itemsize
                feed[a.name] = np.frombuffer(ctypes.string_at(ins[i], n), dt).reshape(a.type.shape)
            res = Interpreter(m).run(feed)
            for i, v in enumerate(m.main.results):
                raw = np.ascontiguousarray(res[v.name]).tobytes()
                ctypes.memmove(outs[i], raw, len(raw))
            calls.append((build, slot))
            return 0
        except Exception:  # noqa: reported as a failed build run
            import traceback
            traceback.print_exc()
            return 4
    cb = RUNNER(runner)
    lib.nnc_fake_set_runner(cb)
    api = t.builds[0]["api"].rsplit("_dev", 1)[0] + "_group"
    fn = lambda name: getattr(lib, f"{api}_{name}")
    fn("last_error").restype = ctypes.c_char_p
    fn("transport_reason").restype = ctypes.c_char_p
    grp = ctypes.c_void_p()
    id_arr = (ctypes.c_int * len(ids))(*ids)
    rc = fn("create")(str(out).encode(), id_arr, len(ids), transport, nccl, ctypes.byref(grp))
    if rc != 0:
        return None, fn("last_error")().decode(), calls
    reason = fn("transport_reason")(grp).decode()
    ins = [np.ascontiguousarray(feeds[e["name"]]) for e in t.inputs]
    outs = [np.full(e["shape"], np.nan, np.dtype(e["dtype"])) for e in t.outputs]  # poisoned
    in_p = (ctypes.c_void_p * len(ins))(*[a.ctypes.data for a in ins])
    out_p = (ctypes.c_void_p * len(outs))(*[a.ctypes.data for a in outs])
    for _ in range(2):  # a second run reuses every buffer
        rc = fn("run")(grp, None, in_p, out_p)
        assert rc == 0, fn("last_error")().decode()
    assert fn("set_timing")(grp, 1) == 0 and fn("run")(grp, None, in_p, out_p) == 0
    c, m_, sp = ctypes.c_float(), ctypes.c_float(), ctypes.c_float()
    assert fn("device_ms")(grp, 0, ctypes.byref(c), ctypes.byref(m_), ctypes.byref(sp)) == 0
    fn("destroy")(grp)
    return {e["name"]: o for e, o in zip(t.outputs, outs)}, reason, calls


def test_executor_on_the_host_pipeline(cnn3, tmp_path, rng):
    """The generated executor (walk, pairing, slots, staging, contexts, output offsets) run for real
    on the host stand-in in transport copy: run_multi's results, every build slot used."""
    from nnc.multi_device import load_multi, run_multi
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    got, reason, calls = _host_run(cnn3, tmp_path, {"input": x})
    assert "copies standing in for NCCL" in reason
    np.testing.assert_array_equal(got["probs"], run_multi(load_multi(cnn3 / "ir"), {"input": x})["probs"])
    assert sorted(set(calls)) == [(b, s) for b in range(3) for s in (0, 1)]  # 3 builds x 2 contexts
    assert len(calls) == 3 * 4 * 3  # 3 runs x 4 micro-batches x 3 stages


def test_executor_on_the_host_tensor_parallel_and_transport_choice(tmp_path, rng):
    pytest.importorskip("nnc.passes.shard_tensor_parallel")
    from nnc.multi_device import load_multi, run_multi
    out = tmp_path / "tp"
    _compile(EXAMPLES / "tiny_transformer.onnx", out, 2, "tensor")
    x = rng.standard_normal((1, 16, 64)).astype(np.float32)
    want = run_multi(load_multi(out / "ir"), {"x": x})["y"]
    got, reason, _ = _host_run(out, tmp_path / "copy", {"x": x})
    np.testing.assert_allclose(got["y"], want, rtol=1e-5, atol=1e-5)
    # AUTO with two ids and no NCCL: the copy path, saying why; NCCL asked for: a clear error
    got, reason, _ = _host_run(out, tmp_path / "auto", {"x": x}, transport=0, ids=(0, 1))
    assert "cannot load NCCL (/nonexistent/libnccl.so.2)" in reason and "copies standing in" in reason
    np.testing.assert_allclose(got["y"], want, rtol=1e-5, atol=1e-5)
    got, err, _ = _host_run(out, tmp_path / "nccl", {"x": x}, transport=1, ids=(0, 1))
    assert got is None and "NNC_GROUP_NCCL: cannot load NCCL" in err


def test_executor_on_the_host_through_nccl(cnn3, tmp_path, rng):
    """NNC_GROUP_NCCL over an NCCL stand-in (libfakenccl.so, dlopen'ed by path): every NCCL call
    inside a group holding both ends of each message or every member of a collective (one host
    thread drives all GPUs), NCCL_NVLS_ENABLE=0 at ncclCommInitAll, results as run_multi."""
    import ctypes
    from nnc.multi_device import load_multi, run_multi
    lib = _fake_nccl(tmp_path / "nccl")
    fake = ctypes.CDLL(str(lib))  # held open: the group's dlopen gets this instance (its dlclose keeps it)
    fake.fake_nccl_nvls.restype = ctypes.c_char_p
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    got, err, _ = _host_run(cnn3, tmp_path / "pipe3", {"input": x}, transport=1, ids=(0, 1), nccl=str(lib).encode())
    assert got is None and "the program has 3 devices and 2 different GPU ids were given" in err
    out = tmp_path / "pipe2"  # the stand-in has 2 "GPUs"
    _compile(EXAMPLES / "tiny_cnn.onnx", out, 2, "pipeline", 2, {"input": [8, 3, 32, 32]})
    got, reason, _ = _host_run(out, tmp_path / "pipe2w", {"input": x}, transport=1, ids=(0, 1), nccl=str(lib).encode())
    assert reason == "2 GPUs and NCCL: one GPU per device"
    np.testing.assert_array_equal(got["probs"], run_multi(load_multi(out / "ir"), {"input": x})["probs"])
    # every message of the 3 runs its own group with both ends; nothing outside a group
    messages = sum(len(st.refs) // 2 for st in tables_for_dir(out).steps if st.kind == RECV)
    assert fake.fake_nccl_nvls() == b"0" and fake.fake_nccl_ungrouped() == 0
    assert fake.fake_nccl_groups() == 3 * messages and messages >= 2
    pytest.importorskip("nnc.passes.shard_tensor_parallel")
    tp = tmp_path / "tp"
    _compile(EXAMPLES / "tiny_transformer.onnx", tp, 2, "tensor")
    xt = rng.standard_normal((1, 16, 64)).astype(np.float32)
    got, reason, _ = _host_run(tp, tmp_path / "tpw", {"x": xt}, transport=1, ids=(0, 1), nccl=str(lib).encode())
    np.testing.assert_allclose(got["y"], run_multi(load_multi(tp / "ir"), {"x": xt})["y"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- GPU

def _gpus():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _nccl_library():
    try:
        import nvidia.nccl
        p = Path(list(nvidia.nccl.__path__)[0]) / "lib" / "libnccl.so.2"
        return str(p) if p.exists() else None
    except Exception:
        return None


def _run_example(out, build, feeds: dict, tmp_path, transport, devices="0"):
    plan = json.loads((Path(out) / "plan.json").read_text())
    files = []
    for i, e in enumerate(plan["inputs"]):
        f = tmp_path / f"in{i}.bin"
        np.ascontiguousarray(feeds[e["name"]]).astype(e["dtype"]).tofile(f)
        files.append(f)
    res = tmp_path / f"res_{transport}"
    res.mkdir(exist_ok=True)
    cmd = [build / "nnc_group_example", out, *files, "--out", res, "--transport", transport, "--devices", devices,
           "--iters", "3", "--warmup", "1"]
    if transport == "nccl" and _nccl_library():
        cmd += ["--nccl", _nccl_library()]
    r = _cmd(cmd)
    outs = {e["name"]: np.fromfile(res / f"output{i}.bin", dtype=e["dtype"]).reshape(e["shape"])
            for i, e in enumerate(plan["outputs"])}
    return outs, r.stdout


@pytest.mark.gpu
@needs_cmake
def test_gpu_c_api_pipeline_copy_matches_single(pipe2, group_lib, tmp_path):
    out, _ = pipe2
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    single = nnc.compile(EXAMPLES / "tiny_cnn.onnx", shapes={"input": [8, 3, 32, 32]}, precision="fp16",
                         out=tmp_path / "one", tune=False)
    want = single.run({"input": x}, output="numpy")["probs"]
    got, text = _run_example(out, group_lib, {"input": x}, tmp_path, "copy")
    assert "transport: copy" in text and "device 1: compute" in text
    assert np.isfinite(got["probs"]).all() and _rel(got["probs"], want) < 1e-2
    py = nnc.load(out, transport="copy")(x)
    assert _rel(got["probs"], py) < 1e-3  # the C API and nnc.load run the same builds


@pytest.mark.gpu
@needs_cmake
def test_gpu_c_api_tensor_parallel_copy_matches_single(tmp_path):
    pytest.importorskip("nnc.passes.shard_tensor_parallel")
    out = tmp_path / "tp"
    _compile(EXAMPLES / "tiny_transformer.onnx", out, 2, "tensor", codegen=True)
    build = tmp_path / "build"
    _cmd(["cmake", "-S", out, "-B", build, f"-DCMAKE_CUDA_COMPILER={NVCC}"])
    _cmd(["cmake", "--build", build, "-j", JOBS])
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 16, 64)).astype(np.float32)
    single = nnc.compile(EXAMPLES / "tiny_transformer.onnx", precision="fp16", out=tmp_path / "one", tune=False)
    want = single.run({"x": x}, output="numpy")["y"]
    got, text = _run_example(out, build, {"x": x}, tmp_path, "copy")
    assert "transport: copy" in text
    assert np.isfinite(got["y"]).all() and _rel(got["y"], want) < 1e-2
    if _gpus() >= 2:
        got2, text2 = _run_example(out, build, {"x": x}, tmp_path, "nccl", "0,1")
        assert "transport: nccl" in text2 and _rel(got2["y"], want) < 1e-2


@pytest.mark.gpu
@needs_cmake
@pytest.mark.skipif(_gpus() < 2, reason="needs >= 2 GPUs")
def test_gpu_c_api_pipeline_nccl(pipe2, group_lib, tmp_path):
    out, _ = pipe2
    rng = np.random.default_rng(7)
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    want = nnc.load(out, transport="copy")(x)
    got, text = _run_example(out, group_lib, {"input": x}, tmp_path, "nccl", "0,1")
    assert "transport: nccl" in text and _rel(got["probs"], want) < 1e-3


def test_no_group_api_is_a_warning_not_a_failed_compile(tmp_path, monkeypatch):
    """A program the group C API cannot take (symbolic shapes, data-dependent outputs...) still
    compiles: plan.json says why there is no C API, nnc.load runs it as before."""
    import nnc.multi_device_capi as capi

    def refuse(*a, **k):
        raise GroupApiError("planted refusal")
    monkeypatch.setattr(capi, "write_group_api", refuse)
    with pytest.warns(UserWarning, match="no group C API: planted refusal"):
        plan = _compile(EXAMPLES / "tiny_cnn.onnx", tmp_path / "o", 2, "pipeline", 1, {"input": [2, 3, 32, 32]},
                        codegen=True)
    assert plan["c_api"] == {"prefix": None, "not_written": "planted refusal"}
    assert not list((tmp_path / "o").glob("nnc_*_group.*"))
