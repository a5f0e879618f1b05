"""A `nnc compile --devices K` program on K GPUs of one host, NCCL doing the communication.

Each device k of the program runs on GPU `gpus[k]`: its segment builds (plan.json's
device_builds, ordinary single-device CUDA outputs) loaded there, with one CUDA stream of its
own. A host thread per device walks that device's steps (`device_steps`) for every micro-batch in
the order of plan.json's GPipe schedule and only *enqueues* work on the device's stream:

- recv: the segment's Recv ops as one ncclGroupStart / ncclRecv... / ncclGroupEnd (bytes into
  buffers allocated at load, one per Recv op);
- run: the segment's arguments copied (device to device) into the build's input buffers, then
  the build's CUDA graph (or its eager launches) on the stream;
- send: the segment's Send ops as one NCCL group of ncclSend from the values' buffers;
- collective: AllReduce / AllGather as ncclAllReduce / ncclAllGather on the stream (an
  AllGather along an axis other than 0 is gathered into [n, ...] and concatenated).

Everything a device does is ordered by its stream, so a buffer that the next micro-batch
overwrites (a build's outputs, a receive buffer) has been read by then. Nothing waits on the
host until the run's end, so stage k computes micro-batch i while stage k + 1 computes i - 1:
the pipeline overlaps on the GPUs. NCCL's send completes when its receive does (the programs
verify_multi accepts are safe under that rule), so a device is never more than its stages'
messages ahead of its peers.

Why threads (one per GPU) and not processes: the builds, the weights and the inputs are loaded
once in one address space, results come back without serialisation, and ncclCommInitAll makes
every communicator in one call with no unique-id exchange. Host work per run is small (the
threads only enqueue; cupy and NCCL drop the GIL inside their calls), and a thread per device is
what NCCL asks for when one process drives several GPUs (a blocking connection setup on one GPU
would otherwise stop the others from reaching theirs). One process per GPU would matter for
several hosts, which this does not do.

NVLink multicast (NVLS) stays off: `set_safe_env` sets NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 in this process before NCCL is
imported or initialised (a program using multicast can take a shared host's GPUs out of service);
nothing here calls cuMulticastCreate.

The device side is an interface (`DeviceSide`): `NcclDevice` is the GPU one; tests run the same
executor on the CPU with a numpy stand-in (tests/test_multi_device_runtime.py).
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .ir.errors import InputError, NncError

TRANSPORTS = ("auto", "nccl", "copy")
# NVLink multicast off in NCCL, PyTorch and NVSHMEM (the machines' notes: it can take shared GPUs down)
SAFE_ENV = (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1"))
NCCL_DTYPES = {"int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5, "float16": 6,
               "float32": 7, "float64": 8, "bfloat16": 9}
NCCL_OPS = {"sum": 0, "prod": 1, "max": 2, "min": 3}
NCCL_UINT8 = 1


class TransportError(NncError):
    """The transport asked for cannot run here (too few GPUs, no NCCL), or a multi-GPU run failed."""


def set_safe_env(environ=None) -> None:
    """Sets SAFE_ENV in `environ` (default os.environ), overriding what is there: before NCCL
    initialises, which reads them once."""
    env = os.environ if environ is None else environ
    for k, v in SAFE_ENV:
        env[k] = v


def gpu_count() -> int:
    """CUDA devices cupy sees (0 without cupy or a driver)."""
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def nccl_available() -> bool:
    set_safe_env()  # before cupy.cuda.nccl is first imported
    try:
        from cupy.cuda import nccl
        return bool(getattr(nccl, "available", True))
    except Exception:
        return False


@dataclass(frozen=True)
class TransportChoice:
    name: str    # "nccl" | "copy"
    reason: str  # a sentence: why this one


def choose_transport(transport: str, devices: int, gpus: int, have_nccl: bool) -> TransportChoice:
    """"nccl": K GPUs and NCCL, else a TransportError; "copy": the one-GPU path (K instances on
    one GPU, device-to-device copies and cupy sums standing in for NCCL); "auto": nccl when
    there are at least K >= 2 GPUs and NCCL, else copy, saying why."""
    if transport not in TRANSPORTS:
        raise TransportError(f"transport must be one of {', '.join(map(repr, TRANSPORTS))}, not {transport!r}")
    if transport == "copy":
        return TransportChoice("copy", "transport='copy': every device on the current GPU, copies standing in for NCCL")
    short = None
    if gpus < devices:
        short = f"the program has {devices} devices and {gpus} GPU{'s' if gpus != 1 else ''} are present"
    elif not have_nccl:
        short = "cupy.cuda.nccl is not available"
    if transport == "nccl":
        if short:
            raise TransportError(f"transport='nccl': {short}; use transport='copy' (or 'auto') for the one-GPU path")
        return TransportChoice("nccl", f"transport='nccl': {devices} GPUs, NCCL")
    if devices < 2:
        return TransportChoice("copy", "one device: no communication")
    if short:
        return TransportChoice("copy", f"{short}: the one-GPU path (all {devices} devices on GPU 0, "
                                       f"copies standing in for NCCL; nothing overlaps)")
    return TransportChoice("nccl", f"{devices} GPUs and NCCL: one GPU per device")


# ---------------------------------------------------------------- what each device does

@dataclass(frozen=True)
class Step:
    kind: str        # "recv" | "run" | "send" | "collective"
    device: int
    micro_batch: int
    segment: int     # the Segment's index in segments(device module)
    ops: tuple = ()  # the comm ops of a recv / send group, or the one collective


def micro_batch_order(plan: dict, devices: int, micro_batches: int) -> list:
    """Per device, the micro-batches in the order it runs them: plan.json's GPipe slots (stage s
    runs micro-batch i in slot s + i), each checked to hold every micro-batch once; without a
    schedule (tensor parallel) 0..M-1."""
    sched = plan.get("schedule")
    if not isinstance(sched, dict) or not sched.get("slots"):
        return [list(range(micro_batches)) for _ in range(devices)]
    order: list = [[] for _ in range(devices)]
    for slot in sched["slots"]:
        for e in slot:
            d, m = int(e["device"]), int(e["micro_batch"])
            if not 0 <= d < devices:
                raise NncError(f"plan.json schedule: device {d} does not exist (the program has {devices})")
            order[d].append(m)
    for d, o in enumerate(order):
        if sorted(o) != list(range(micro_batches)):
            raise NncError(f"plan.json schedule: device {d} runs micro-batches {o}, not each of "
                           f"0..{micro_batches - 1} once")
    return order


def device_steps(segments: list, device: int, order: list) -> list:
    """Device `device`'s steps: for each micro-batch of `order`, each segment's receives (one
    group), its compute, its sends (one group), then the collective that ends it."""
    steps = []
    for mb in order:
        for sg in segments:
            if sg.recvs:
                steps.append(Step("recv", device, mb, sg.index, tuple(sg.recvs)))
            if sg.module is not None:
                steps.append(Step("run", device, mb, sg.index))
            if sg.sends:
                steps.append(Step("send", device, mb, sg.index, tuple(sg.sends)))
            if sg.collective is not None:
                steps.append(Step("collective", device, mb, sg.index, (sg.collective,)))
    return steps


def hoist_receives(steps: list) -> list:
    """A pipeline stage's steps with the receive of micro-batch i + 1 moved before the send of
    micro-batch i (the comm stream then has it posted while the stage computes i, and the send of
    i overlaps the compute of i + 1). Deadlock-free: a stage's receive waits only on lower stages,
    and the first stage receives nothing."""
    out = list(steps)
    i = 0
    while i < len(out):
        if out[i].kind == "send" and i + 1 < len(out) and out[i + 1].kind == "recv" and out[i + 1].micro_batch != out[i].micro_batch:
            out[i], out[i + 1] = out[i + 1], out[i]
            i += 1
        i += 1
    return out


def _static_shape(t, what: str) -> tuple:
    if t.shape is None or not all(isinstance(d, int) for d in t.shape):
        raise NncError(f"{what}: {t} has symbolic dims; multi-GPU runs need static shapes (--shapes)")
    return tuple(t.shape)


# ---------------------------------------------------------------- the device side

class DeviceSide:
    """What a device worker needs of its device: arrays, copies and the transport, all queued
    in the device's order (its stream). NcclDevice is the GPU's; tests pass a numpy stand-in."""

    index: int
    # True: a second (comm) stream for sends / receives, ordered by marks (DeviceGroup's overlap);
    # the numpy stand-in of the tests runs everything in order (False)
    overlap: bool = False

    def mark(self, comm: bool = False):
        """overlap: an event recorded now on the compute (or comm) stream."""
        raise NotImplementedError

    def wait(self, mark, comm: bool = False) -> None:
        """overlap: the compute (or comm) stream waits for `mark` (None: nothing to wait for)."""
        raise NotImplementedError

    def current(self):  # a context manager: this device current on the calling thread
        raise NotImplementedError

    def empty(self, shape: tuple, dtype: str):
        raise NotImplementedError

    def upload(self, a: np.ndarray):
        raise NotImplementedError

    def download(self, a, dtype: str) -> np.ndarray:
        raise NotImplementedError

    def copy(self, dst, src) -> None:
        raise NotImplementedError

    def run_build(self, build, feed: dict) -> dict:
        """The build's arguments from feed (name -> array), one run queued; name -> result arrays."""
        raise NotImplementedError

    def recv_group(self, items: list) -> None:  # [(array, peer)]
        raise NotImplementedError

    def send_group(self, items: list) -> None:  # [(array, peer)]
        raise NotImplementedError

    def all_reduce(self, src, dst, op: str, dtype: str, group: tuple) -> None:
        raise NotImplementedError

    def all_gather(self, src, dst, dtype: str, group: tuple) -> None:
        """dst: [len(group), *src.shape], member i's src in dst[i]."""
        raise NotImplementedError

    def concat_gathered(self, gathered, axis: int, dst) -> None:
        raise NotImplementedError

    def event(self):
        raise NotImplementedError

    def elapsed_ms(self, e0, e1) -> float:
        raise NotImplementedError

    def synchronize(self, timeout_s: Optional[float] = None) -> None:
        """Waits for everything queued; a TransportError after timeout_s seconds (None: no limit)."""
        raise NotImplementedError

    def abort(self) -> None:
        """After a failed run: stop what is queued (NCCL: abort the communicator)."""

    def new_run(self) -> None:
        """Called before each run's first step (the GPU side recycles its timing events)."""

    def upload_into(self, dst, a: np.ndarray) -> None:
        """a (host) into the device array dst, queued."""
        raise NotImplementedError

    def capture(self, enqueue):
        """What enqueue() queues on this device, captured as one replayable graph (raises if it cannot)."""
        raise NotImplementedError

    def replay(self, graph) -> None:
        raise NotImplementedError


class NcclDevice(DeviceSide):
    """GPU `gpu` with its own non-blocking stream and its NCCL communicator (rank = device)."""

    overlap = True

    def __init__(self, index: int, gpu: int, comm, cp, nccl):
        self.index, self.gpu, self.comm, self.cp, self.nccl = index, gpu, comm, cp, nccl
        self.size = comm.size()
        self._events, self._next_event = [], 0
        self._marks, self._next_mark = [], 0
        with cp.cuda.Device(gpu):
            self.stream = cp.cuda.Stream(non_blocking=True)
            self.comm_stream = cp.cuda.Stream(non_blocking=True)  # sends and receives (overlap)

    def mark(self, comm=False):
        if self._next_mark == len(self._marks):
            with self.cp.cuda.Device(self.gpu):
                self._marks.append(self.cp.cuda.Event(disable_timing=True))
        e = self._marks[self._next_mark]
        self._next_mark += 1
        e.record(self.comm_stream if comm else self.stream)
        return e

    def wait(self, mark, comm=False):
        if mark is not None:
            (self.comm_stream if comm else self.stream).wait_event(mark)

    def current(self):
        import contextlib
        stack = contextlib.ExitStack()
        stack.enter_context(self.cp.cuda.Device(self.gpu))
        stack.enter_context(self.stream)
        return stack

    def empty(self, shape, dtype):
        from .runtime import _dev_dtype
        with self.cp.cuda.Device(self.gpu):
            return self.cp.empty(shape, _dev_dtype(dtype))

    def upload(self, a):
        if a.dtype.kind not in "biufc":  # ml_dtypes (bfloat16, float8...): their raw bits
            a = a.view(np.dtype(f"u{a.dtype.itemsize}"))
        with self.cp.cuda.Device(self.gpu):
            d = self.cp.empty(a.shape, a.dtype)
            if d.nbytes:
                self.cp.cuda.runtime.memcpyAsync(d.data.ptr, np.ascontiguousarray(a).ctypes.data, d.nbytes, 1,
                                                 self.stream.ptr)
            return d

    def upload_into(self, dst, a):
        if a.dtype.kind not in "biufc":
            a = a.view(np.dtype(f"u{a.dtype.itemsize}"))
        a = np.ascontiguousarray(a)
        if a.nbytes != dst.nbytes:
            raise NncError(f"device {self.index}: {a.nbytes} bytes into an input buffer of {dst.nbytes}")
        if a.nbytes:
            self.cp.cuda.runtime.memcpyAsync(dst.data.ptr, a.ctypes.data, a.nbytes, 1, self.stream.ptr)

    def capture(self, enqueue):
        from .runtime import capture_graph
        graph, why = capture_graph(self.cp, self.stream, enqueue)
        if graph is None:
            raise TransportError(f"device {self.index}: {why}")
        return graph

    def replay(self, graph):
        graph.launch(self.stream)

    def download(self, a, dtype):
        from .runtime import _np_dtype
        h = np.empty(a.shape, a.dtype)
        if h.nbytes:
            self.cp.cuda.runtime.memcpyAsync(h.ctypes.data, a.data.ptr, h.nbytes, 2, self.stream.ptr)
        self.stream.synchronize()
        want = _np_dtype(dtype)
        return h.view(want) if h.dtype != want else h

    def copy(self, dst, src):
        if dst.nbytes != src.nbytes:
            raise NncError(f"device {self.index}: copy of {src.nbytes} bytes into a buffer of {dst.nbytes}")
        if dst.nbytes and dst.data.ptr != src.data.ptr:
            self.cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, dst.nbytes, 3, self.stream.ptr)

    def run_build(self, build, feed):
        ins, outs = build.io_buffers()
        for t, buf in zip(build.plan["inputs"], ins):
            self.copy(buf, feed[t["name"]])
        build.launch(self.stream)
        return {t["name"]: buf for t, buf in zip(build.plan["outputs"], outs)}

    def recv_group(self, items, comm=False):
        q = (self.comm_stream if comm else self.stream).ptr
        self.nccl.groupStart()
        try:
            for a, peer in items:
                self.comm.recv(a.data.ptr, a.nbytes, NCCL_UINT8, peer, q)
        finally:
            self.nccl.groupEnd()

    def send_group(self, items, comm=False):
        q = (self.comm_stream if comm else self.stream).ptr
        self.nccl.groupStart()
        try:
            for a, peer in items:
                self.comm.send(a.data.ptr, a.nbytes, NCCL_UINT8, peer, q)
        finally:
            self.nccl.groupEnd()

    def _check_group(self, group):
        if tuple(group) != tuple(range(self.size)):
            raise NncError(f"device {self.index}: collective over group {list(group)}: only the whole program "
                           f"(devices 0..{self.size - 1}) is a communicator so far")

    def all_reduce(self, src, dst, op, dtype, group):
        self._check_group(group)
        self.comm.allReduce(src.data.ptr, dst.data.ptr, src.size, NCCL_DTYPES[dtype], NCCL_OPS[op], self.stream.ptr)

    def all_gather(self, src, dst, dtype, group):
        self._check_group(group)
        self.comm.allGather(src.data.ptr, dst.data.ptr, src.size, NCCL_DTYPES[dtype], self.stream.ptr)

    def concat_gathered(self, gathered, axis, dst):
        n, w = gathered.shape[0], gathered.shape[1 + axis]
        with self.cp.cuda.Device(self.gpu), self.stream:  # one strided copy per member: nothing allocated
            for i in range(n):
                dst[(slice(None),) * axis + (slice(i * w, (i + 1) * w),)] = gathered[i]

    def event(self, comm=False):
        """A timing event recorded on the (compute or comm) stream now: from a pool reused run after
        run (a run synchronizes before the next one starts), so timing costs a record, not a create."""
        if self._next_event == len(self._events):
            with self.cp.cuda.Device(self.gpu):
                self._events.append(self.cp.cuda.Event())
        e = self._events[self._next_event]
        self._next_event += 1
        e.record(self.comm_stream if comm else self.stream)
        return e

    def new_run(self):
        self._next_event = 0
        self._next_mark = 0

    def elapsed_ms(self, e0, e1):
        return float(self.cp.cuda.get_elapsed_time(e0, e1))

    def synchronize(self, timeout_s: Optional[float] = None):
        if timeout_s is None:
            self.stream.synchronize()
            self.comm_stream.synchronize()
            return
        end = time.monotonic() + timeout_s
        spins = 0
        while not (self.stream.done and self.comm_stream.done):  # cudaStreamQuery: a hung NCCL call must not hang the caller forever
            if time.monotonic() > end:
                raise TransportError(f"device {self.index} (GPU {self.gpu}): its work did not finish within "
                                     f"{timeout_s:g} s (a communication that never completes?)")
            spins += 1
            time.sleep(0 if spins < 2000 else 1e-4)

    def abort(self):
        try:
            self.comm.abort()
        except Exception:
            pass


# ---------------------------------------------------------------- the executor

@dataclass
class RunTiming:
    """One run, measured on the devices (CUDA events on each device's stream): per device and
    micro-batch the compute time of its segment builds and the time in its receives, sends and
    collectives (waiting for a peer included), each device's span (first step queued to last
    done), and the host's wall time of the whole run (inputs uploaded to outputs downloaded)."""
    compute_ms: list = field(default_factory=list)  # [device][micro-batch]
    comm_ms: list = field(default_factory=list)     # [device][micro-batch]
    span_ms: list = field(default_factory=list)     # [device]
    wall_ms: float = 0.0

    def bubble_fraction(self) -> float:
        """1 - (compute of all devices) / (K x the longest span): the share of the devices' time
        not spent computing (pipeline fill and drain, communication, waits)."""
        k, span = len(self.span_ms), max(self.span_ms or [0.0])
        busy = sum(sum(c) for c in self.compute_ms)
        return 1.0 - busy / (k * span) if k and span > 0 else 0.0

    def comm_hidden(self) -> list:
        """Per device: the share of its communication that ran beside its compute,
        (compute + communication - span) / communication, clipped to [0, 1] (0: none overlapped,
        or no communication)."""
        out = []
        for comp, comm, span in zip(self.compute_ms, self.comm_ms, self.span_ms):
            c = sum(comm)
            out.append(min(1.0, max(0.0, (sum(comp) + c - span) / c)) if c > 0 else 0.0)
        return out

    def comm_share(self) -> list:
        """Per device: time in communication / its span."""
        return [sum(c) / s if s > 0 else 0.0 for c, s in zip(self.comm_ms, self.span_ms)]


class DeviceGroup:
    """K device workers over DeviceSides, one host thread each (see the module docstring).

    mdm: the MultiDeviceModule; segments: per device, multi_device.segments(its module); builds:
    (device, segment index) -> a loaded build (what sides[k].run_build takes); plan: the OUT's
    plan.json (inputs / outputs at whole-batch shapes, the schedule)."""

    def __init__(self, mdm, segments: list, builds: dict, sides: list, plan: dict, micro_batches: int,
                 timeout_s: float = 120.0, device_graphs: bool = False):
        from .multi_device import MultiDeviceError
        self.mdm, self.segments, self.builds, self.sides, self.plan = mdm, segments, builds, sides, plan
        self.timeout_s = float(timeout_s)  # a run that has not finished on the devices by then fails (and aborts)
        # device_graphs: each device's whole run (builds' launches, NCCL calls, copies) captured once as one CUDA
        # graph over fixed input / output buffers, then one replay per device a run (the builds must be eager:
        # loaded with cuda_graph=False). Runs with timing=True still go step by step (events per step).
        self.device_graphs = bool(device_graphs)
        self._graphs: Optional[list] = None
        self._fixed: Optional[tuple] = None  # (per device {input: whole-batch array}, {output: array})
        self.M = int(micro_batches)
        K = mdm.num_devices
        if len(sides) != K:
            raise MultiDeviceError(f"{len(sides)} device sides for a program of {K} devices")
        self.order = micro_batch_order(plan, K, self.M)
        check_message_order(mdm)
        for e in plan["inputs"] + plan["outputs"]:
            if e.get("shape") is None or not all(isinstance(d, int) for d in e["shape"]):
                raise MultiDeviceError(f"{e['name']!r}: shape {e.get('shape')} is not static; multi-GPU runs need "
                                       f"static shapes (compile with --shapes)")
        self.steps = [device_steps(segments[k], k, self.order[k]) for k in range(K)]
        # overlap (GPU sides, step-by-step runs): sends and receives on each device's comm stream, two
        # slots per message buffer (micro-batch parity), a pipeline stage's receive of micro-batch i + 1
        # queued before its send of i, so the send of i runs beside the compute of i + 1
        self.overlap = all(getattr(s, "overlap", False) for s in sides) and not self.device_graphs
        if self.overlap:
            self.steps = [hoist_receives(st) if len(segments[k]) == 1 else st for k, st in enumerate(self.steps)]
        self._slot_buf: dict = {}  # overlap: (id(op), slot) -> a receive or send buffer
        self._marks: list = [dict() for _ in range(K)]  # overlap, per device: ("sent" | "consumed", slot) -> mark
        self.trace: list = []  # (device, step kind, micro-batch, segment) in the order each thread queued them
        self._trace_lock = threading.Lock()
        self.timing: Optional[RunTiming] = None
        self.broken: Optional[str] = None
        # buffers made once, reused by every run (stream order keeps each micro-batch's uses apart)
        self._recv_buf, self._coll_buf, self._gather_buf = {}, {}, {}
        for k, segs in enumerate(segments):
            for sg in segs:
                for op in sg.recvs:
                    t = op.results[0].type
                    self._recv_buf[id(op)] = sides[k].empty(_static_shape(t, f"device {k}: Recv {op.results[0].name}"),
                                                            t.dtype.np_name)
                c = sg.collective
                if c is not None:
                    t, x = c.results[0].type, c.operands[0].type
                    dt = x.dtype.np_name
                    if dt not in NCCL_DTYPES:
                        raise MultiDeviceError(f"device {k}: {c.name} of {x}: NCCL has no {dt} type")
                    shape = _static_shape(t, f"device {k}: {c.name} {c.results[0].name}")
                    if c.name == "AllGather":
                        n = len(c.attrs.group)
                        self._gather_buf[id(c)] = sides[k].empty((n,) + _static_shape(x, f"device {k}: AllGather"), dt)
                        if c.attrs.axis % len(shape) != 0:
                            self._coll_buf[id(c)] = sides[k].empty(shape, dt)
                    else:
                        self._coll_buf[id(c)] = sides[k].empty(shape, dt)

    def run(self, inputs: dict, timing: bool = False, output: str = "numpy") -> dict:
        """inputs: name -> whole-batch numpy array. Returns name -> array: numpy, or (output="cupy")
        the device array on the GPU of the device that computes it."""
        from .api import _to_numpy
        from .multi_device import MultiDeviceError
        if self.broken:
            raise MultiDeviceError(f"this multi-GPU program is unusable after an earlier failure: {self.broken}")
        K, M = self.mdm.num_devices, self.M
        check_inputs(self.plan, inputs)
        for a in self.plan["inputs"] if M > 1 else ():
            if not a["shape"] or a["shape"][0] % M:
                raise InputError(f"input {a['name']!r}: shape {a['shape']} does not split into {M} micro-batches "
                                 f"along axis 0")
        t0 = time.perf_counter()
        graphed = self.device_graphs and not timing
        if graphed and self._fixed is None:
            self._fixed = (self._input_buffers(), self._output_buffers())
        feeds = []
        for k, m in enumerate(self.mdm.devices):
            whole = {}
            with self.sides[k].current():
                for a in m.main.args:
                    x = _to_numpy(a.name, inputs[a.name])
                    if graphed:
                        whole[a.name] = self._fixed[0][k][a.name]
                        self.sides[k].upload_into(whole[a.name], x)
                    else:
                        whole[a.name] = self.sides[k].upload(np.ascontiguousarray(x))
            if M == 1:
                feeds.append([whole])
                continue
            rows = {n: v.shape[0] // M for n, v in whole.items()}
            feeds.append([{n: v[i * rows[n]:(i + 1) * rows[n]] for n, v in whole.items()} for i in range(M)])
        outs = self._fixed[1] if graphed else self._output_buffers()
        self._aborted = False
        for s in self.sides:
            s.new_run()
        self._marks = [dict() for _ in range(K)]  # the last run synchronized both streams of every device
        marks: list = [None] * K
        if graphed:
            if self._graphs is None:  # the first graphed run captures: every device at once (NCCL connects)
                graphs: list = [None] * K
                self._threads(lambda k: self._capture(k, feeds[k], outs, graphs), "capturing")
                self._graphs = graphs
            for k, side in enumerate(self.sides):
                with side.current():
                    side.replay(self._graphs[k])
        else:
            self.trace = []
            self._threads(lambda k: self._worker(k, feeds[k], outs, timing, marks), "running")
        try:
            for s in self.sides:
                s.synchronize(self.timeout_s)
        except BaseException as e:
            for s in self.sides:
                s.abort()
            self.broken = str(e)
            raise
        res = {}
        for e in self.plan["outputs"]:
            k = self.mdm.source_of(e["name"])
            o = outs[e["name"]]
            res[e["name"]] = o if output == "cupy" else self.sides[k].download(o, e["dtype"])
        wall = (time.perf_counter() - t0) * 1e3
        if timing:
            tm = RunTiming(wall_ms=wall)
            for k in range(K):
                begin, end, per = marks[k]
                side = self.sides[k]
                tm.span_ms.append(side.elapsed_ms(begin, end))
                comp, comm = [0.0] * M, [0.0] * M
                for kind, mb, e0, e1 in per:
                    (comp if kind == "run" else comm)[mb] += side.elapsed_ms(e0, e1)
                tm.compute_ms.append(comp)
                tm.comm_ms.append(comm)
            self.timing = tm
        return res

    def _threads(self, work, what: str) -> None:
        """work(k) on a thread per device; the first failure aborts every device at once (the
        others may be waiting for the one that failed) and is raised, naming the device."""
        from .multi_device import MultiDeviceError
        K = self.mdm.num_devices
        errors: list = [None] * K

        def run(k):
            try:
                work(k)
            except BaseException as e:  # reported below
                errors[k] = e
                with self._trace_lock:
                    if not self._aborted:  # the first failure; the others' may follow from the abort
                        self._aborted = (k, e)
                        for s in self.sides:
                            s.abort()
        threads = [threading.Thread(target=run, args=(k,), name=f"nnc-device{k}", daemon=True) for k in range(K)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if any(e is not None for e in errors):
            k, e = self._aborted
            self.broken = f"device {k} ({what}): {e}"
            if isinstance(e, NncError):
                raise type(e)(f"device {k}: {e}") from e
            raise MultiDeviceError(f"device {k}: {type(e).__name__}: {e}") from e

    def _input_buffers(self) -> list:
        """Per device, a whole-batch device array for each model input it reads."""
        spec = {e["name"]: e for e in self.plan["inputs"]}
        return [{a.name: self.sides[k].empty(tuple(spec[a.name]["shape"]), spec[a.name]["dtype"])
                 for a in m.main.args} for k, m in enumerate(self.mdm.devices)]

    def _output_buffers(self) -> dict:
        return {e["name"]: self.sides[self.mdm.source_of(e["name"])].empty(tuple(e["shape"]), e["dtype"])
                for e in self.plan["outputs"]}

    def _capture(self, k: int, feeds: list, outs: dict, graphs: list) -> None:
        side = self.sides[k]
        with side.current():
            graphs[k] = side.capture(lambda: self._enqueue(k, feeds, outs, False, []))

    def _worker(self, k: int, feeds: list, outs: dict, timing: bool, marks: list) -> None:
        side = self.sides[k]
        per: list = []
        with side.current():
            begin = side.event() if timing else None
            self._enqueue(k, feeds, outs, timing, per)
            if self.overlap:  # the compute stream's end (the span's) after the comm stream's last send
                side.wait(side.mark(comm=True))
            end = side.event() if timing else None
        marks[k] = (begin, end, per)

    def _enqueue(self, k: int, feeds: list, outs: dict, timing: bool, per: list) -> None:
        """Queues device k's steps for every micro-batch (per: (kind, micro-batch, e0, e1) when timing)."""
        side = self.sides[k]
        f = self.mdm.devices[k].main
        mine = [(r.name, self.plan_rows(r.name)) for r in f.results
                if r.name in outs and self.mdm.source_of(r.name) == k]  # the model outputs this device gives
        envs: dict = {}  # micro-batch -> its values (a hoisted receive starts the next one early)
        last = {st.micro_batch: i for i, st in enumerate(self.steps[k])}
        for i, st in enumerate(self.steps[k]):
            env = envs.setdefault(st.micro_batch, dict(feeds[st.micro_batch]))
            with self._trace_lock:
                self.trace.append((k, st.kind, st.micro_batch, st.segment))
            on_comm = self.overlap and st.kind in ("recv", "send")
            e0 = (side.event(comm=True) if on_comm else side.event()) if timing else None
            if self.overlap and st.kind in ("recv", "run", "send"):
                self._overlapped_step(k, side, st, env)
            else:
                self._step(side, st, env)
            if timing:
                per.append((st.kind, st.micro_batch, e0, side.event(comm=True) if on_comm else side.event()))
            if last[st.micro_batch] == i:
                self._store_outputs(side, envs.pop(st.micro_batch), mine, outs, st.micro_batch)

    def plan_rows(self, name: str) -> int:
        e = next(e for e in self.plan["outputs"] if e["name"] == name)
        return int(e["shape"][0]) // self.M if e["shape"] else 1

    def _store_outputs(self, side, env, mine, outs, mb):
        for name, rows in mine:
            dst = outs[name] if self.M == 1 else outs[name][mb * rows:(mb + 1) * rows]
            side.copy(dst, env[name])

    def _slot(self, k: int, op, slot: int, value):
        key = (id(op), slot)
        if key not in self._slot_buf:
            t = value.type
            self._slot_buf[key] = self.sides[k].empty(_static_shape(t, f"device {k}: {value.name}"), t.dtype.np_name)
        return self._slot_buf[key]

    def _overlapped_step(self, k: int, side: DeviceSide, st: Step, env: dict) -> None:
        """A receive / run / send with the comm stream beside the compute stream. Receive of
        micro-batch i into slot i % 2 on the comm stream once the run of i - 2 has read that slot;
        the compute stream waits for it. Send: the values copied (compute stream) into slot i % 2
        once the send of i - 2 has left it, then sent from there on the comm stream, so the builds'
        output buffers are free for micro-batch i + 1 at once."""
        slot = st.micro_batch % 2
        marks = self._marks[k]
        if st.kind == "recv":
            side.wait(marks.get(("consumed", slot)), comm=True)
            items = []
            for op in st.ops:
                buf = self._slot(k, op, slot, op.results[0])
                items.append((buf, op.attrs.peer))
                env[op.results[0].name] = buf
            side.recv_group(items, comm=True)
            side.wait(side.mark(comm=True))  # the compute stream: what follows reads the received values
        elif st.kind == "run":
            self._step(side, st, env)
            marks[("consumed", slot)] = side.mark()  # the run has copied its arguments (received ones too)
        else:
            side.wait(marks.get(("sent", slot)))
            items = []
            for op in st.ops:
                buf = self._slot(k, op, slot, op.operands[0])
                side.copy(buf, env[op.operands[0].name])
                items.append((buf, op.attrs.peer))
            side.wait(side.mark(), comm=True)
            side.send_group(items, comm=True)
            marks[("sent", slot)] = side.mark(comm=True)

    def _step(self, side: DeviceSide, st: Step, env: dict) -> None:
        if st.kind == "recv":
            items = []
            for op in st.ops:
                buf = self._recv_buf[id(op)]
                items.append((buf, op.attrs.peer))
                env[op.results[0].name] = buf
            side.recv_group(items)
        elif st.kind == "run":
            build = self.builds[(st.device, st.segment)]
            seg = self.segments[st.device][st.segment]
            feed = {a.name: env[a.name] for a in seg.module.main.args}
            env.update(side.run_build(build, feed))
        elif st.kind == "send":
            side.send_group([(env[op.operands[0].name], op.attrs.peer) for op in st.ops])
        else:
            c = st.ops[0]
            src = env[c.operands[0].name]
            dt = c.operands[0].type.dtype.np_name
            g = tuple(c.attrs.group)
            if c.name == "AllReduce":
                dst = self._coll_buf[id(c)]
                side.all_reduce(src, dst, c.attrs.op, dt, g)
            else:
                gathered = self._gather_buf[id(c)]
                side.all_gather(src, gathered, dt, g)
                shape = tuple(c.results[0].type.shape)
                if id(c) in self._coll_buf:
                    dst = self._coll_buf[id(c)]
                    side.concat_gathered(gathered, c.attrs.axis % len(shape), dst)
                else:
                    dst = gathered.reshape(shape)
            env[c.results[0].name] = dst


def check_message_order(mdm) -> None:
    """NCCL matches the sends and receives between two devices by their order; the IR by tag.
    Refuses a program whose receives on a device take one peer's messages in another order than
    that peer sends them (the partitioner's never do: they send and receive in tag order)."""
    from .multi_device import MultiDeviceError, describe
    sent: dict = {}
    got: dict = {}
    for k, m in enumerate(mdm.devices):
        for op in m.main.ops:
            if op.name == "Send":
                sent.setdefault((k, op.attrs.peer), []).append((op.attrs.tag, op))
            elif op.name == "Recv":
                got.setdefault((op.attrs.peer, k), []).append((op.attrs.tag, op))
    for pair in sorted(set(sent) | set(got)):
        s, r = [t for t, _ in sent.get(pair, [])], [t for t, _ in got.get(pair, [])]
        if s != r:
            op = next((o for (t, o), u in zip(got.get(pair, []), s) if t != u), got.get(pair, [(0, None)])[0][1])
            where = describe(op, pair[1]) if op is not None else f"device {pair[1]}"
            raise MultiDeviceError(f"{where}: device {pair[0]} sends tags {s} to device {pair[1]}, which receives "
                                   f"tags {r}; NCCL pairs two devices' messages in order, so they must agree")


def check_inputs(plan: dict, inputs: dict) -> None:
    """Every model input given, of its dtype and whole-batch shape (plan.json's), nothing else."""
    from .ir.types import dtype
    names = [e["name"] for e in plan["inputs"]]
    missing = [n for n in names if n not in inputs]
    extra = sorted(set(inputs) - set(names))
    if missing or extra:
        raise InputError(f"inputs: expected {names}; missing {missing}, unknown {extra}")
    for e in plan["inputs"]:
        x = inputs[e["name"]]
        got = np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
        if got != np.dtype(dtype(e["dtype"]).np):
            raise InputError(f"input {e['name']!r}: expected dtype {e['dtype']}, given {got}")
        if list(np.shape(x)) != list(e["shape"]):
            raise InputError(f"input {e['name']!r}: expected shape {list(e['shape'])}, given {list(np.shape(x))}")


def open_nccl_group(prog, gpus: Optional[list] = None, cuda_graph: bool = True,
                    device_graphs: bool = False) -> DeviceGroup:
    """prog: a MultiDeviceProgram (plan, mdm, segments, out). Device k on GPU gpus[k] (default k):
    NCCL communicators for all (ncclCommInitAll, after set_safe_env), each device's builds
    loaded on its GPU. device_graphs: see DeviceGroup (the builds are then loaded eager)."""
    if device_graphs:
        cuda_graph = False  # their launches go into the device's graph
    from .multi_device import MultiDeviceError
    set_safe_env()  # before cupy.cuda.nccl initialises anything
    import cupy as cp
    from cupy.cuda import nccl
    from .runtime import load
    K = prog.mdm.num_devices
    gpus = list(range(K)) if gpus is None else [int(g) for g in gpus]
    if len(gpus) != K or len(set(gpus)) != K:
        raise TransportError(f"gpus {gpus}: need {K} different GPUs, one per device")
    have = gpu_count()
    if any(not 0 <= g < have for g in gpus):
        raise TransportError(f"gpus {gpus}: {have} GPU(s) present")
    comms = nccl.NcclCommunicator.initAll(gpus)
    sides = [NcclDevice(k, g, comms[k], cp, nccl) for k, g in enumerate(gpus)]
    builds = {}
    dirs = prog.plan.get("device_builds")
    for k, segs in enumerate(prog.segments):
        have_segs = [sg for sg in segs if sg.module is not None]
        if not isinstance(dirs, list) or len(dirs) != K or len(dirs[k]) != len(have_segs):
            raise MultiDeviceError(f"{prog.out}: plan.json's device_builds does not match the device programs")
        with cp.cuda.Device(gpus[k]):
            for sg, rel in zip(have_segs, dirs[k]):
                m = load(prog.out / rel, cuda_graph=cuda_graph)
                if any(t.get("shape_known_after_run") for t in m.plan["outputs"]):
                    raise MultiDeviceError(f"{prog.out / rel}: outputs of data-dependent shape are not supported "
                                           f"across GPUs")
                builds[(k, sg.index)] = m
    return DeviceGroup(prog.mdm, prog.segments, builds, sides, prog.plan, prog.mdm.micro_batches,
                       device_graphs=device_graphs)
