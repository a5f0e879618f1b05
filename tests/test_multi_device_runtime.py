"""The multi-device runtime: nnc.load of a `--devices K` directory, the NCCL transport's executor
(nnc.multi_device_nccl: one host thread per device, steps in GPipe order, NCCL groups and
collectives) run on the CPU over a numpy stand-in for the devices, the transport choice, the
environment set before NCCL initialises, and `nnc bench` of a multi-device directory. GPU tests:
the one-GPU path through nnc.load and nnc bench; the NCCL path on >= 2 GPUs."""
import contextlib
import os
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

import nnc
from nnc.ir.errors import NncError
from nnc.ir.interp import Interpreter
from nnc.multi_device import MultiDeviceError, MultiDeviceProgram, run_multi
from nnc.multi_device_nccl import (SAFE_ENV, DeviceGroup, DeviceSide, NcclDevice, RunTiming, TransportError,
                                   check_message_order, choose_transport, device_steps, micro_batch_order,
                                   set_safe_env)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _compile(model, out, devices, parallel="pipeline", micro_batches=1, shapes=None, codegen=False):
    from nnc.api import CompileOptions
    from nnc.multi_device import compile_multi_device
    opts = CompileOptions(shapes=shapes, backend="cuda" if codegen else "reference", codegen=codegen,
                          tune=False if codegen else None)
    compile_multi_device(str(model), out, opts, devices, parallel, micro_batches)
    return out


@pytest.fixture(scope="module")
def cnn3(tmp_path_factory):
    """tiny_cnn over 3 pipeline stages, 2 micro-batches of 4 (IR only)."""
    return _compile(EXAMPLES / "tiny_cnn.onnx", tmp_path_factory.mktemp("cnn3") / "out", 3, "pipeline", 2,
                    {"input": [8, 3, 32, 32]})


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    pytest.importorskip("nnc.passes.shard_tensor_parallel")
    return _compile(EXAMPLES / "tiny_transformer.onnx", tmp_path_factory.mktemp("tp2") / "out", 2, "tensor")


# ---------------------------------------------------------------- a numpy stand-in for K devices

class Hub:
    """What the fake devices share: per (sender, receiver) FIFO of messages (NCCL pairs them by
    order), rendezvous sends (a send returns once received), collectives by (group, sequence)."""

    def __init__(self, timeout=20.0):
        self.timeout = timeout
        self.cv = threading.Condition()
        self.msgs: dict = {}
        self.coll: dict = {}
        self.aborted = False

    def wait(self, pred, what):
        end = time.monotonic() + self.timeout
        while not pred():
            if self.aborted:
                raise TransportError(f"fake transport aborted while waiting for {what}")
            left = end - time.monotonic()
            if left <= 0:
                raise TransportError(f"fake transport: timed out waiting for {what}")
            self.cv.wait(min(left, 0.05))


class FakeDevice(DeviceSide):
    def __init__(self, index, hub, log):
        self.index, self.hub, self.log = index, hub, log
        self.seq: dict = {}
        self.aborts = 0

    def current(self):
        return contextlib.nullcontext()

    def empty(self, shape, dtype):
        from nnc.ir.types import dtype as dt
        return np.full(shape, 7, dt(dtype).np)  # never zeros: a value not written shows

    def upload(self, a):
        return np.array(a, copy=True)

    def download(self, a, dtype):
        return np.array(a, copy=True)

    def copy(self, dst, src):
        np.copyto(dst, src)

    def run_build(self, build, feed):
        return build.run(feed)

    def recv_group(self, items):
        self.log.append((self.index, "recv", [p for _, p in items]))
        for buf, peer in items:
            with self.hub.cv:
                q = self.hub.msgs.setdefault((peer, self.index), [])
                self.hub.wait(lambda: q, f"device {self.index} receiving from {peer}")
                entry = q.pop(0)
                np.copyto(buf.reshape(-1).view(np.uint8), entry["data"])
                entry["taken"] = True
                self.hub.cv.notify_all()

    def send_group(self, items):
        self.log.append((self.index, "send", [p for _, p in items]))
        posted = []
        with self.hub.cv:
            for a, peer in items:
                e = {"data": np.ascontiguousarray(a).reshape(-1).view(np.uint8).copy(), "taken": False}
                self.hub.msgs.setdefault((self.index, peer), []).append(e)
                posted.append(e)
            self.hub.cv.notify_all()
            self.hub.wait(lambda: all(e["taken"] for e in posted), f"device {self.index}'s sends to be received")

    def _collective(self, group, src, combine):
        n = self.seq.get(group, 0)
        self.seq[group] = n + 1
        with self.hub.cv:
            slot = self.hub.coll.setdefault((group, n), {})
            slot[self.index] = np.array(src, copy=True)
            self.hub.cv.notify_all()
            self.hub.wait(lambda: all(d in slot for d in group), f"collective #{n} of {list(group)}")
            return combine([slot[d] for d in group])

    def all_reduce(self, src, dst, op, dtype, group):
        self.log.append((self.index, "all_reduce", list(group)))
        from nnc.ir.ops.comm import all_reduce
        np.copyto(dst, self._collective(group, src, lambda v: all_reduce(op, v)))

    def all_gather(self, src, dst, dtype, group):
        self.log.append((self.index, "all_gather", list(group)))
        np.copyto(dst, self._collective(group, src, np.stack))

    def concat_gathered(self, gathered, axis, dst):
        np.copyto(dst, np.concatenate(list(gathered), axis=axis))

    def event(self):
        return time.perf_counter()

    def elapsed_ms(self, e0, e1):
        return (e1 - e0) * 1e3

    def synchronize(self, timeout_s=None):
        t = getattr(self, "_thread", None)
        if t is not None:
            t.join(timeout_s)
            self._thread = None
            if self._replay_error is not None:
                raise self._replay_error

    def upload_into(self, dst, a):
        np.copyto(dst, a)

    def capture(self, enqueue):
        self.captures = getattr(self, "captures", 0) + 1
        return enqueue  # replayed on a thread of its own: the devices' graphs run at once

    def replay(self, graph):
        self.replays = getattr(self, "replays", 0) + 1
        self._replay_error = None

        def run():
            try:
                graph()
            except BaseException as e:
                self._replay_error = e
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def abort(self):
        self.aborts += 1
        with self.hub.cv:
            self.hub.aborted = True
            self.hub.cv.notify_all()


class FakeBuild:
    """A segment module on the reference interpreter, its results written into buffers it owns
    (as a CUDA build's output buffers, overwritten by its next run)."""

    def __init__(self, module, fail=False):
        self.m, self.fail, self.bufs, self.runs = module, fail, None, 0

    def run(self, feed):
        assert {a.name for a in self.m.main.args} == set(feed)
        if self.fail:
            raise RuntimeError("planted failure")
        res = Interpreter(self.m).run({k: np.array(v, copy=True) for k, v in feed.items()})
        if self.bufs is None:
            self.bufs = {n: np.empty_like(np.asarray(v)) for n, v in res.items()}
        for n, v in res.items():
            np.copyto(self.bufs[n], v)
        self.runs += 1
        return dict(self.bufs)


def _fake_group(prog, fail=None, device_graphs=False):
    hub, log = Hub(), []
    sides = [FakeDevice(k, hub, log) for k in range(prog.mdm.num_devices)]
    builds = {(k, sg.index): FakeBuild(sg.module, fail == (k, sg.index))
              for k, segs in enumerate(prog.segments) for sg in segs if sg.module is not None}
    return DeviceGroup(prog.mdm, prog.segments, builds, sides, prog.plan, prog.mdm.micro_batches,
                       device_graphs=device_graphs), log


@pytest.mark.parametrize("which", ["cnn3", "tp2"])
def test_device_graphs_on_fake_devices(which, request, rng):
    """device_graphs: each device's run captured once (over fixed input / output buffers) and
    replayed; new inputs go into the fixed buffers; timing runs still go step by step."""
    prog = MultiDeviceProgram(request.getfixturevalue(which))
    g, _ = _fake_group(prog, device_graphs=True)
    shape = tuple(prog.plan["inputs"][0]["shape"])
    name = prog.plan["inputs"][0]["name"]
    for i in range(3):
        x = rng.standard_normal(shape).astype(np.float32)
        want = run_multi(prog.mdm, {name: x})
        got = g.run({name: x}, timing=(i == 2))
        for n in want:
            np.testing.assert_allclose(got[n], want[n], rtol=1e-6, atol=1e-6)
    assert all(s.captures == 1 and s.replays == 2 for s in g.sides)
    assert g.timing is not None and len(g.timing.span_ms) == prog.mdm.num_devices


# ---------------------------------------------------------------- the executor on the stand-in

def test_pipeline_on_fake_devices(cnn3, rng):
    prog = MultiDeviceProgram(cnn3)
    g, log = _fake_group(prog)
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    want = run_multi(prog.mdm, {"input": x})
    for _ in range(2):  # buffers made once are reused by the second run
        got = g.run({"input": x}, timing=True)
        np.testing.assert_array_equal(got["probs"], want["probs"])
    # which device runs what, in which order: each device its micro-batches in order
    per_dev = {k: [(kind, mb) for d, kind, mb, _ in g.trace if d == k] for k in range(3)}
    assert per_dev[0] == [("run", 0), ("send", 0), ("run", 1), ("send", 1)]
    assert per_dev[1] == [("recv", 0), ("run", 0), ("send", 0), ("recv", 1), ("run", 1), ("send", 1)]
    assert [kind for kind, _ in per_dev[2]] == ["recv", "run"] * 2
    assert all(b.runs == 4 for b in g.builds.values())  # 2 runs x 2 micro-batches
    tm = g.timing
    assert len(tm.compute_ms) == 3 and all(len(c) == 2 and min(c) > 0 for c in tm.compute_ms)
    assert 0.0 <= tm.bubble_fraction() < 1.0 and tm.wall_ms > 0
    # every message went over NCCL-style groups: device 2 receives from 0 and / or 1
    assert {e[0] for e in log if e[1] == "send"} == {0, 1} and {e[0] for e in log if e[1] == "recv"} == {1, 2}


class OverlapFakeDevice(FakeDevice):
    """The stand-in with a comm stream (overlap): marks and waits logged, everything still in order."""
    overlap = True

    def mark(self, comm=False):
        self.log.append((self.index, "mark", "comm" if comm else "compute"))
        return (self.index, len(self.log))

    def wait(self, mark, comm=False):
        if mark is not None:
            self.log.append((self.index, "wait", "comm" if comm else "compute"))

    def recv_group(self, items, comm=False):
        assert comm, "overlap: receives go on the comm stream"
        super().recv_group(items)

    def send_group(self, items, comm=False):
        assert comm, "overlap: sends go on the comm stream"
        super().send_group(items)

    def event(self, comm=False):
        return time.perf_counter()


def test_pipeline_overlap_on_fake_devices(cnn3, rng):
    """overlap (the GPU sides' default): a middle stage queues the receive of micro-batch i + 1
    before the send of i; messages use two slots (parity); results as run_multi, run after run."""
    from nnc.multi_device_nccl import hoist_receives
    prog = MultiDeviceProgram(cnn3)
    hub, log = Hub(), []
    sides = [OverlapFakeDevice(k, hub, log) for k in range(3)]
    builds = {(k, sg.index): FakeBuild(sg.module) for k, segs in enumerate(prog.segments) for sg in segs
              if sg.module is not None}
    g = DeviceGroup(prog.mdm, prog.segments, builds, sides, prog.plan, prog.mdm.micro_batches)
    assert g.overlap
    for _ in range(2):
        x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
        got = g.run({"input": x}, timing=True)
        np.testing.assert_array_equal(got["probs"], run_multi(prog.mdm, {"input": x})["probs"])
    per_dev = {k: [(kind, mb) for d, kind, mb, _ in g.trace if d == k] for k in range(3)}
    assert per_dev[1] == [("recv", 0), ("run", 0), ("recv", 1), ("send", 0), ("run", 1), ("send", 1)]
    assert per_dev[0] == [("run", 0), ("send", 0), ("run", 1), ("send", 1)]
    n_msgs = sum(len(sg.recvs) for segs in prog.segments for sg in segs)
    assert len(g._slot_buf) == 2 * 2 * n_msgs  # a receive and a send buffer per message, two slots each
    assert any(e[1] == "wait" and e[2] == "comm" for e in log) and any(e[1] == "wait" and e[2] == "compute" for e in log)
    assert hoist_receives(device_steps(prog.segments[0], 0, [0, 1])) == device_steps(prog.segments[0], 0, [0, 1])


def test_tensor_parallel_on_fake_devices(tp2, rng):
    prog = MultiDeviceProgram(tp2)
    g, log = _fake_group(prog)
    x = rng.standard_normal((1, 16, 64)).astype(np.float32)
    want = run_multi(prog.mdm, {"x": x})
    got = g.run({"x": x}, timing=True)
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-6, atol=1e-6)
    n_coll = [sum(1 for sg in segs if sg.collective is not None) for segs in prog.segments]
    assert n_coll[0] == n_coll[1] > 0
    assert sum(1 for e in log if e[0] == 0 and e[1] in ("all_reduce", "all_gather")) == n_coll[0]
    share = g.timing.comm_share()
    assert len(share) == 2 and all(0.0 <= s <= 1.0 for s in share)


def test_worker_failure_aborts_everyone(cnn3, rng):
    prog = MultiDeviceProgram(cnn3)
    g, _ = _fake_group(prog, fail=(1, 0))
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    with pytest.raises(MultiDeviceError, match="device 1: RuntimeError: planted failure"):
        g.run({"input": x})
    assert all(s.aborts == 1 for s in g.sides)  # device 0 (blocked in a send) was released
    with pytest.raises(MultiDeviceError, match="unusable after an earlier failure"):
        g.run({"input": x})


def test_unfinished_run_times_out_and_aborts(cnn3, rng):
    """A device whose queued work never finishes (a hung NCCL call) fails the run after
    DeviceGroup.timeout_s instead of hanging the caller; every communicator is aborted."""
    prog = MultiDeviceProgram(cnn3)
    g, _ = _fake_group(prog)
    seen = []

    def hung(timeout_s=None):
        seen.append(timeout_s)
        raise TransportError(f"did not finish within {timeout_s:g} s")
    g.sides[2].synchronize = hung
    g.timeout_s = 0.5
    with pytest.raises(TransportError, match="within 0.5 s"):
        g.run({"input": rng.standard_normal((8, 3, 32, 32)).astype(np.float32)})
    assert seen == [0.5] and all(s.aborts == 1 for s in g.sides) and g.broken


def test_inputs_checked(cnn3, rng):
    g, _ = _fake_group(MultiDeviceProgram(cnn3))
    with pytest.raises(NncError, match="missing"):
        g.run({})
    with pytest.raises(NncError, match="expected shape"):
        g.run({"input": np.zeros((4, 3, 32, 32), np.float32)})
    with pytest.raises(NncError, match="expected dtype"):
        g.run({"input": np.zeros((8, 3, 32, 32), np.float16)})


def test_steps_and_schedule_order():
    from nnc.multi_device import Segment
    from nnc.passes.partition_pipeline import gpipe_schedule
    plan = {"schedule": gpipe_schedule(3, 4)}
    assert micro_batch_order(plan, 3, 4) == [[0, 1, 2, 3]] * 3
    assert micro_batch_order({}, 2, 3) == [[0, 1, 2], [0, 1, 2]]
    bad = {"schedule": {"slots": [[{"device": 0, "micro_batch": 0}], [{"device": 0, "micro_batch": 0}]]}}
    with pytest.raises(NncError, match="not each of"):
        micro_batch_order(bad, 1, 2)
    segs = [Segment(0, object(), ["r"], ["s"], None), Segment(1, None, [], [], "c"), Segment(2, object(), [], [], None)]
    kinds = [(s.kind, s.micro_batch, s.segment) for s in device_steps(segs, 1, [0, 1])]
    assert kinds == [("recv", 0, 0), ("run", 0, 0), ("send", 0, 0), ("collective", 0, 1), ("run", 0, 2),
                     ("recv", 1, 0), ("run", 1, 0), ("send", 1, 0), ("collective", 1, 1), ("run", 1, 2)]


def test_message_order_must_match_tags():
    from nnc.multi_device import parse_multi
    text = """// nnc-multi-device {"devices": 2, "parallel": "pipeline", "micro_batches": 1, "output_device": {}}
// ===== device 0
func @main(%x: f32[2]) -> (bool[0], bool[0]) {
  %a = Relu(%x) : f32[2]
  %a.s = Send(%a) {device = 0, peer = 1, tag = 0} : bool[0]
  %b = Neg(%x) : f32[2]
  %b.s = Send(%b) {device = 0, peer = 1, tag = 1} : bool[0]
  return %a.s, %b.s
}
// ===== device 1
func @main() -> (f32[2]) {
  %b = Recv() {device = 1, peer = 0, tag = 1, shape = [2], dtype = f32} : f32[2]
  %a = Recv() {device = 1, peer = 0, tag = 0, shape = [2], dtype = f32} : f32[2]
  %c = Add(%a, %b) : f32[2]
  return %c
}
"""
    with pytest.raises(MultiDeviceError, match=r"sends tags \[0, 1\] to device 1, which receives tags \[1, 0\]"):
        check_message_order(parse_multi(text))


def test_run_timing_numbers():
    tm = RunTiming(compute_ms=[[1.0, 1.0], [1.0, 1.0]], comm_ms=[[0.5, 0.5], [0.0, 0.0]], span_ms=[3.0, 4.0])
    assert tm.bubble_fraction() == pytest.approx(1 - 4.0 / 8.0)
    assert tm.comm_share() == pytest.approx([1.0 / 3.0, 0.0])
    assert tm.comm_hidden() == [0.0, 0.0]  # device 0's sends ran after its compute; device 1 has none
    tm.span_ms = [2.5, 2.0]
    assert tm.comm_hidden() == pytest.approx([0.5, 0.0])


# ---------------------------------------------------------------- transport choice, environment, NCCL calls

def test_choose_transport():
    assert choose_transport("auto", 2, 2, True).name == "nccl"
    c = choose_transport("auto", 2, 1, True)
    assert c.name == "copy" and "2 devices and 1 GPU are present" in c.reason
    assert choose_transport("auto", 2, 4, False).name == "copy"
    assert choose_transport("copy", 2, 8, True).name == "copy"
    assert choose_transport("auto", 1, 0, False).name == "copy"
    with pytest.raises(TransportError, match="transport='nccl': the program has 4 devices and 2 GPUs are present"):
        choose_transport("nccl", 4, 2, True)
    with pytest.raises(TransportError, match="not available"):
        choose_transport("nccl", 2, 2, False)
    with pytest.raises(TransportError, match="must be one of"):
        choose_transport("mpi", 2, 2, True)


def test_safe_env_overrides():
    env = {"NCCL_NVLS_ENABLE": "1", "OTHER": "x"}
    set_safe_env(env)
    assert env == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
                   "OTHER": "x"}
    assert dict(SAFE_ENV)["NCCL_NVLS_ENABLE"] == "0"


def _fake_cupy(monkeypatch, gpus, calls):
    """A cupy with `gpus` GPUs whose nccl records calls (and the environment at init)."""
    class Comm:
        def __init__(self, rank):
            self.rank = rank

        def size(self):
            return gpus

        def __getattr__(self, name):
            return lambda *a: calls.append((self.rank, name, a))

    def init_all(devs):
        calls.append(("initAll", list(devs), {k: os.environ.get(k) for k, _ in SAFE_ENV}))
        return [Comm(i) for i in range(len(devs))]

    nccl = types.ModuleType("cupy.cuda.nccl")
    nccl.NcclCommunicator = types.SimpleNamespace(initAll=init_all)
    nccl.groupStart = lambda: calls.append(("groupStart",))
    nccl.groupEnd = lambda: calls.append(("groupEnd",))
    cuda = types.ModuleType("cupy.cuda")
    cuda.nccl = nccl
    cuda.runtime = types.SimpleNamespace(getDeviceCount=lambda: gpus)
    cuda.Device = lambda i=0: contextlib.nullcontext()
    cuda.Stream = lambda non_blocking=False: types.SimpleNamespace(ptr=4242)
    cp = types.ModuleType("cupy")
    cp.cuda = cuda
    cp.empty = lambda shape, dtype: np.empty(shape, dtype)
    for name, mod in (("cupy", cp), ("cupy.cuda", cuda), ("cupy.cuda.nccl", nccl)):
        monkeypatch.setitem(sys.modules, name, mod)
    return cp, nccl


def test_env_set_before_nccl_init(cnn3, monkeypatch):
    from nnc import multi_device_nccl, runtime
    for k, _ in SAFE_ENV:
        monkeypatch.setenv(k, "1")
    calls = []
    _fake_cupy(monkeypatch, 3, calls)
    loaded = []

    def fake_load(d, cuda_graph=True):
        loaded.append(Path(d).name)
        return types.SimpleNamespace(plan={"outputs": []})
    monkeypatch.setattr(runtime, "load", fake_load)
    prog = MultiDeviceProgram(cnn3)
    prog.plan = {**prog.plan, "device_builds": [["device0"], ["device1"], ["device2"]]}
    g = multi_device_nccl.open_nccl_group(prog)
    init = [c for c in calls if c[0] == "initAll"]
    assert init == [("initAll", [0, 1, 2], {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                                             "NVSHMEM_DISABLE_NVLS": "1"})]
    assert loaded == ["device0", "device1", "device2"] and len(g.sides) == 3
    with pytest.raises(TransportError, match=r"3 GPU\(s\) present"):
        multi_device_nccl.open_nccl_group(prog, gpus=[0, 1, 5])


def test_nccl_calls(monkeypatch):
    calls = []
    cp, nccl = _fake_cupy(monkeypatch, 2, calls)
    comm = nccl.NcclCommunicator.initAll([0, 1])[1]
    calls.clear()
    dev = NcclDevice(1, 1, comm, cp, nccl)
    arr = lambda ptr, n, size: types.SimpleNamespace(data=types.SimpleNamespace(ptr=ptr), nbytes=n, size=size)
    dev.recv_group([(arr(100, 64, 16), 0), (arr(200, 8, 2), 0)])
    dev.send_group([(arr(300, 16, 8), 0)])
    dev.all_reduce(arr(400, 32, 16), arr(500, 32, 16), "sum", "float16", (0, 1))
    dev.all_gather(arr(600, 32, 8), arr(700, 64, 16), "bfloat16", (0, 1))
    assert calls == [("groupStart",), (1, "recv", (100, 64, 1, 0, 4242)), (1, "recv", (200, 8, 1, 0, 4242)),
                     ("groupEnd",), ("groupStart",), (1, "send", (300, 16, 1, 0, 4242)), ("groupEnd",),
                     (1, "allReduce", (400, 500, 16, 6, 0, 4242)), (1, "allGather", (600, 700, 8, 9, 4242))]
    with pytest.raises(NncError, match="only the whole program"):
        dev.all_reduce(arr(1, 4, 1), arr(2, 4, 1), "sum", "float32", (1,))


# ---------------------------------------------------------------- nnc.load, nnc bench (CPU)

def test_nnc_load_multi_device_reference(cnn3, rng):
    m = nnc.load(cnn3, backend="reference")
    assert isinstance(m, MultiDeviceProgram) and m.transport_used == "reference"
    assert [t.name for t in m.inputs] == ["input"] and m.output_names == ["probs"]
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    want = run_multi(m.mdm, {"input": x})["probs"]
    np.testing.assert_array_equal(m(x), want)
    np.testing.assert_array_equal(m.run({"input": x}, outputs=["probs"])["probs"], want)
    with pytest.raises(NncError, match="unknown outputs"):
        m.run({"input": x}, outputs=["nope"])


def test_nnc_load_errors(cnn3, tmp_path):
    with pytest.raises(TransportError, match="needs backend='cuda'"):
        nnc.load(cnn3, backend="reference", transport="nccl")
    with pytest.raises(TransportError, match="must be one of"):
        nnc.load(cnn3, backend="reference", transport="tcp")
    with pytest.raises(NncError, match="in_arena"):
        nnc.load(cnn3, backend="reference", in_arena=True)
    single = tmp_path / "single"
    nnc.compile(EXAMPLES / "tiny_cnn.onnx", shapes={"input": [1, 3, 32, 32]}, out=single, backend="reference")
    with pytest.raises(NncError, match="only for a directory compiled with --devices"):
        nnc.load(single, backend="reference", transport="nccl")


def test_bench_reference_multi_device(cnn3):
    from nnc.bench import BenchOptions, bench_builds, format_text
    res = bench_builds(cnn3, BenchOptions(iterations=2, warmup=0, backend="reference"))
    assert len(res) == 1 and res[0].devices == 3 and res[0].parallel == "pipeline"
    text = format_text(res[0])
    assert "3 devices" in text and "throughput" in text and "not measured" in text


# ---------------------------------------------------------------- GPU

def _gpus():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


@pytest.fixture(scope="module")
def cnn2_cuda(tmp_path_factory):
    """tiny_cnn at fp16: 2 pipeline stages x 2 micro-batches of 4, and the single-device batch-8 build."""
    d = tmp_path_factory.mktemp("cnn2c")
    from nnc.api import CompileOptions
    from nnc.multi_device import compile_multi_device
    shapes = {"input": [8, 3, 32, 32]}
    compile_multi_device(str(EXAMPLES / "tiny_cnn.onnx"), d / "pipe", CompileOptions(shapes=shapes, precision="fp16",
                                                                                       tune=False), 2, "pipeline", 2)
    single = nnc.compile(EXAMPLES / "tiny_cnn.onnx", shapes=shapes, precision="fp16", out=d / "one", tune=False)
    return d / "pipe", single


def _fp16_tp(tmp_path):
    """tiny_transformer at fp16: 2-way tensor parallel and the single-device build."""
    pytest.importorskip("nnc.passes.shard_tensor_parallel")
    from nnc.api import CompileOptions
    from nnc.multi_device import compile_multi_device
    opts = CompileOptions(precision="fp16", tune=False)
    compile_multi_device(str(EXAMPLES / "tiny_transformer.onnx"), tmp_path / "tp", opts, 2, "tensor")
    single = nnc.compile(EXAMPLES / "tiny_transformer.onnx", precision="fp16", out=tmp_path / "one", tune=False)
    return tmp_path / "tp", single


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.gpu
def test_gpu_load_pipeline_copy_path(cnn2_cuda, rng):
    pipe, single = cnn2_cuda
    m = nnc.load(pipe, transport="copy")
    assert m.transport_used == "copy" and "copies standing in" in m.transport_reason
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    assert _rel(m(x), single.run({"input": x}, output="numpy")["probs"]) < 1e-2


@pytest.mark.gpu
def test_gpu_load_auto_says_why(cnn2_cuda):
    if _gpus() >= 2:
        pytest.skip("auto picks nccl here")
    with pytest.warns(UserWarning, match="the one-GPU path"):
        m = nnc.load(cnn2_cuda[0])
    assert m.transport_used == "copy"


@pytest.mark.gpu
def test_gpu_load_tensor_parallel_fp16_matches_single(tmp_path, rng):
    tp, single = _fp16_tp(tmp_path)
    m = nnc.load(tp, transport="copy")
    x = rng.standard_normal((1, 16, 64)).astype(np.float32)
    want = single.run({"x": x}, output="numpy")["y"]
    assert _rel(m(x), want) < 1e-2


@pytest.mark.gpu
def test_gpu_bench_copy_path(cnn2_cuda, tmp_path):
    from nnc.bench import BenchOptions, bench_builds, format_text
    r = bench_builds(cnn2_cuda[0], BenchOptions(iterations=3, warmup=1, transport="copy"))[0]
    assert r.transport == "copy" and len(r.stage_ms) == 2 and r.estimate is not None
    assert "bubble" in format_text(r)
    tp, _ = _fp16_tp(tmp_path)
    r = bench_builds(tp, BenchOptions(iterations=3, warmup=1, transport="copy"))[0]
    assert r.parallel == "tensor" and r.comm_share is not None and "communication share" in format_text(r)


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason="needs >= 2 GPUs")
def test_gpu_nccl_pipeline_and_tensor_parallel(cnn2_cuda, tmp_path, rng):
    pipe, single = cnn2_cuda
    m = nnc.load(pipe, transport="nccl")
    assert m.transport_used == "nccl" and os.environ["NCCL_NVLS_ENABLE"] == "0"
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    want = single.run({"input": x}, output="numpy")["probs"]
    for _ in range(3):
        assert _rel(m.run({"input": x}, timing=True)["probs"], want) < 1e-2
    tm = m.group.timing
    assert m.group.overlap  # sends / receives on each GPU's comm stream
    assert all(len(c) == 2 and min(c) > 0 for c in tm.compute_ms) and 0 <= tm.bubble_fraction() < 1
    print("pipeline comm hidden behind compute per device:", tm.comm_hidden())
    tp, single = _fp16_tp(tmp_path)
    mt = nnc.load(tp, transport="nccl")
    xt = rng.standard_normal((1, 16, 64)).astype(np.float32)
    assert _rel(mt(xt), single.run({"x": xt}, output="numpy")["y"]) < 1e-2
    from nnc.bench import BenchOptions, bench_builds
    r = bench_builds(tp, BenchOptions(iterations=5, warmup=2, transport="nccl"))[0]
    assert r.transport == "nccl" and len(r.comm_share) == 2
    mt.close()
    mg = MultiDeviceProgram(tp, "cuda", "nccl", device_graphs=True)  # opt-in: one CUDA graph per device
    for _ in range(2):
        assert _rel(mg(xt), single.run({"x": xt}, output="numpy")["y"]) < 1e-2
