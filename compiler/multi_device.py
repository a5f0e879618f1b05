"""A K-device program: one IR Module per device, its text form, its verifier, and the reference
(numpy) multi-device executor.

- `MultiDeviceModule.devices[k]` is device k's Module: an ordinary Module whose `@main` may hold
  the communication ops of ir/ops/comm.py (Send, Recv, AllReduce, AllGather), each with
  `device = k`. Its arguments are model inputs (by name; an input read on several devices is fed
  to each), its results model outputs or Send tokens (`bool[0]`, dropped from the outputs).
  `output_device` says which device's value of an output is the model's (default: the lowest
  device returning it).
- Text (`print_multi` / `parse_multi`, byte-identical round trip): one header line, then each
  device's function after a `// ===== device K` line. Both are IR comments, so each section is
  also a plain .nnir file. On disk (`save_multi` / `load_multi`): `multi.json` plus
  `device<K>.nnir` and its weights, one per device.
- `verify_multi`: every device Module verifies; comm ops sit at the top level of @main and name
  their own device; peers and group members exist; and a dry run of the schedule (the executor
  below, without data) pairs every Send with a Recv of the same type (by sender, receiver, tag,
  in order), sees the collectives of a group in the same order with equal ops and types on every
  member, and finds no deadlock. Errors are NncErrors naming the device and the op.
- `run_multi`: simulated devices (one environment each) under a deterministic step scheduler:
  each device runs its ops in order until a Recv whose message has not been sent, a Send whose
  message has not been received (rendezvous, NCCL's semantics; `rendezvous=False`: buffered, a
  copy into a FIFO per (sender, receiver, tag)) or a collective some member has not reached; a
  round in which no device moves is a deadlock, reported with what every device waits for (never
  a hang). Collectives are exact numpy reductions in group order. With micro_batches M > 1
  the inputs are split into M equal parts along axis 0 (`check_batch_split` proves beforehand that
  the graph keeps batch rows apart, else a clear error) and every device runs its function once per
  micro-batch, in order, as a GPipe-style forward pipeline; the outputs are concatenated back.
"""
from __future__ import annotations

import json
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .ir import registry
from .ir.builder import const_value
from .ir.errors import InputError, NncError, VerifyError
from .ir.graph import Module, Op
from .ir.interp import Interpreter, RefCtx, call_ref, check_input
from .ir.ops.comm import COMM_OPS, all_gather, all_reduce
from .ir.parser import parse, read_ir_file
from .ir.printer import print_module, vname
from .ir.verify import verify
from .ir.weights import WeightStore

HEADER = "// nnc-multi-device "
SECTION = "// ===== device "


class MultiDeviceError(NncError):
    """A multi-device program that is malformed, or whose run cannot complete."""


@dataclass
class MultiDeviceModule:
    devices: list  # list[Module]; index = device id
    parallel: str = ""  # "pipeline" | "tensor" | "" (how it was made; informational)
    micro_batches: int = 1  # run_multi's default M
    output_device: dict = field(default_factory=dict)  # output name -> device whose value is the model's
    plan: dict = field(default_factory=dict)  # what made it (the partitioner's stages, cuts, costs); not printed

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def input_names(self) -> list[str]:
        """Model inputs in first-seen order over the devices."""
        out: list[str] = []
        for m in self.devices:
            out += [a.name for a in m.main.args if a.name not in out]
        return out

    def output_names(self) -> list[str]:
        out: list[str] = []
        for m in self.devices:
            out += [v.name for v in m.main.results if not is_token(v) and v.name not in out]
        return out

    def source_of(self, name: str) -> int:
        """The device whose value of output `name` the model returns."""
        if name in self.output_device:
            return self.output_device[name]
        return next(k for k, m in enumerate(self.devices) if any(v.name == name for v in m.main.results))


def is_token(v) -> bool:
    """A Send's token result (not data: executors drop it from the outputs)."""
    return v.producer is not None and v.producer.name == "Send"


def comm_ops(module: Module) -> list[Op]:
    return [op for op in module.main.ops if op.name in COMM_OPS]


def describe(op: Op, device: int) -> str:
    """`device 1: %y = Recv() {peer = 0, tag = 3}` (for messages)."""
    a = op.attrs
    keys = [k for k in ("peer", "tag", "group", "op", "axis") if hasattr(a, k)]
    at = ", ".join(f"{k} = {list(getattr(a, k)) if k == 'group' else getattr(a, k)}" for k in keys)
    res = ", ".join(vname(r.name) for r in op.results)
    ops = ", ".join(vname(v.name) for v in op.operands if v is not None)
    return f"device {device}: {res} = {op.name}({ops}) {{{at}}}" + (f" loc({op.loc.node!r})" if op.loc.node else "")


# ---------------------------------------------------------------- text and files

def print_multi(mdm: MultiDeviceModule) -> str:
    head = {"devices": mdm.num_devices, "parallel": mdm.parallel, "micro_batches": mdm.micro_batches,
            "output_device": mdm.output_device}
    parts = [HEADER + json.dumps(head) + "\n"]
    for k, m in enumerate(mdm.devices):
        parts.append(f"{SECTION}{k}\n" + print_module(m))
    return "".join(parts)


def parse_multi(text: str, filename: str = "<string>") -> MultiDeviceModule:
    """The text of print_multi back to a MultiDeviceModule (weights are not loaded: load_multi)."""
    first, _, rest = text.partition("\n")
    if not first.startswith(HEADER):
        raise MultiDeviceError(f"{filename}:1: expected a `{HEADER.strip()} {{...}}` header line")
    try:
        head = json.loads(first[len(HEADER):])
        k = int(head["devices"])
    except (ValueError, KeyError, TypeError) as e:
        raise MultiDeviceError(f"{filename}:1: bad multi-device header: {e}") from None
    chunks = re.split(r"^// ===== device (\d+)\n", rest, flags=re.M)
    if chunks[0].strip():
        raise MultiDeviceError(f"{filename}: text before the first `{SECTION}0` line")
    ids = [int(x) for x in chunks[1::2]]
    if ids != list(range(k)):
        raise MultiDeviceError(f"{filename}: device sections {ids}, the header says {k} devices (0..{k - 1} in order)")
    devices = [parse(body, f"{filename}[device {i}]") for i, body in zip(ids, chunks[2::2])]
    return MultiDeviceModule(devices, str(head.get("parallel", "")), int(head.get("micro_batches", 1)),
                             {str(n): int(d) for n, d in dict(head.get("output_device") or {}).items()})


def save_multi(mdm: MultiDeviceModule, directory) -> None:
    """multi.json + device<K>.nnir (+ device<K>.weights.*) in `directory` (created)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for k, m in enumerate(mdm.devices):
        (d / f"device{k}.nnir").write_text(print_module(m))
        (m.weights or WeightStore()).save(d / f"device{k}")
    (d / "multi.json").write_text(json.dumps({"devices": mdm.num_devices, "parallel": mdm.parallel,
                                              "micro_batches": mdm.micro_batches,
                                              "output_device": mdm.output_device}, indent=1) + "\n")


def load_multi(directory) -> MultiDeviceModule:
    d = Path(directory)
    try:
        head = json.loads((d / "multi.json").read_text())
        k = int(head["devices"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MultiDeviceError(f"{d}: not a multi-device IR directory (multi.json: {e})") from None
    devices = []
    for i in range(k):
        m = parse(read_ir_file(d / f"device{i}.nnir"), str(d / f"device{i}.nnir"))
        m.weights = WeightStore.load(d / f"device{i}")
        devices.append(m)
    return MultiDeviceModule(devices, str(head.get("parallel", "")), int(head.get("micro_batches", 1)),
                             {str(n): int(v) for n, v in dict(head.get("output_device") or {}).items()})


# ---------------------------------------------------------------- the step scheduler

@dataclass
class _Task:
    device: int
    micro_batch: int
    env: dict
    pc: int = 0
    pending: Optional[list] = None  # rendezvous: the posted message its Send waits on


@dataclass
class TraceEvent:
    """One scheduler round's work on one device: ops [first, last) of micro-batch `micro_batch`."""
    round: int
    device: int
    micro_batch: int
    first: int
    last: int


class _Scheduler:
    """Runs every device's @main `runs` times (once per micro-batch) under one round-robin.

    evaluate(device, op, task) -> list of result arrays, for non-comm ops; None = a dry run (the
    verifier's): values are the result types, and only the communication is checked.
    rendezvous: a Send completes only when its Recv has taken the message (NCCL's semantics: a
    program that needs buffered sends deadlocks here as it would on the GPUs); False: buffered."""

    def __init__(self, mdm: MultiDeviceModule, runs: int, feeds: Optional[list] = None,
                 evaluate: Optional[Callable] = None, rendezvous: bool = True):
        self.mdm = mdm
        self.rendezvous = rendezvous
        self.posted = False  # a round's state change that moves no program counter
        self.runs = runs
        self.feeds = feeds  # feeds[m][device] -> {arg name: array}
        self.evaluate = evaluate
        self.queues: dict[tuple, deque] = {}  # (src, dst, tag) -> (send op, value)
        self.coll_seq: dict[tuple, int] = {}  # (group, device) -> collectives done
        self.coll: dict[tuple, dict] = {}  # (group, seq) -> {device: (op, value)} and "result"
        self.trace: list[TraceEvent] = []
        self.results: list[list] = [[None] * mdm.num_devices for _ in range(runs)]

    def _start(self, k: int, m: int) -> _Task:
        f = self.mdm.devices[k].main
        env: dict = {}
        for a in f.args:
            env[id(a)] = a.type if self.feeds is None else self.feeds[m][k][a.name]
        return _Task(k, m, env)

    def run(self) -> None:
        K = self.mdm.num_devices
        tasks = [self._start(k, 0) for k in range(K)]
        done = [False] * K
        rnd = 0
        while not all(done):
            rnd += 1
            moved = False
            self.posted = False
            for k in range(K):
                while not done[k]:
                    t = tasks[k]
                    first = t.pc
                    finished = self._advance(t)
                    if t.pc > first:
                        moved = True
                        self.trace.append(TraceEvent(rnd, k, t.micro_batch, first, t.pc))
                    if not finished:
                        break
                    f = self.mdm.devices[k].main
                    self.results[t.micro_batch][k] = [t.env[id(v)] for v in f.results]
                    moved = True
                    if t.micro_batch + 1 < self.runs:
                        tasks[k] = self._start(k, t.micro_batch + 1)
                    else:
                        done[k] = True
            if not moved and not self.posted:
                self._deadlock(tasks, done)
        for (src, dst, tag), q in self.queues.items():
            if q:
                op = q[0][0]
                raise MultiDeviceError(f"{describe(op, src)}: no matching Recv on device {dst} "
                                       f"(peer = {src}, tag = {tag}); {len(q)} message(s) never received")

    def _deadlock(self, tasks, done) -> None:
        waits = []
        for k, t in enumerate(tasks):
            if done[k]:
                waits.append(f"device {k} has finished")
                continue
            op = self.mdm.devices[k].main.ops[t.pc]
            a = op.attrs
            if op.name == "Recv":
                why = f"waits for a message from device {a.peer} with tag {a.tag} that is never sent"
            elif op.name == "Send":
                why = (f"waits until device {a.peer} receives it (tag {a.tag}; a send completes when its "
                       f"receive does, as in NCCL); no matching Recv on device {a.peer} is reached")
            else:
                g = tuple(a.group)
                seq = self.coll_seq.get((g, k), 0)
                there = sorted(self.coll.get((g, seq), {}).keys() - {"result"})
                why = (f"waits at collective #{seq} of group {list(g)}; devices {there} reached it, "
                       f"devices {[d for d in g if d not in there]} never do")
            mb = f" (micro-batch {t.micro_batch})" if self.runs > 1 else ""
            waits.append(f"{describe(op, k)}{mb} {why}")
        for (src, dst, tag), q in self.queues.items():
            for sop, *_ in q:
                waits.append(f"undelivered: {describe(sop, src)} to device {dst} with tag {tag}")
        raise MultiDeviceError("deadlock: no device can make progress:\n  " + "\n  ".join(waits))

    def _advance(self, t: _Task) -> bool:
        """Runs task t's ops until one blocks (False) or the function ends (True)."""
        ops = self.mdm.devices[t.device].main.ops
        while t.pc < len(ops):
            op = ops[t.pc]
            if op.name in COMM_OPS:
                out = self._comm(t, op)
                if out is None:
                    return False
            elif self.evaluate is None:
                out = [r.type for r in op.results]
            else:
                out = self.evaluate(t.device, op, t)
            for r, o in zip(op.results, out):
                t.env[id(r)] = o
            t.pc += 1
        return True

    def _comm(self, t: _Task, op: Op) -> Optional[list]:
        k, a = t.device, op.attrs
        dry = self.evaluate is None
        if op.name == "Send":
            token = [op.results[0].type if dry else np.zeros((0,), dtype=bool)]
            if t.pending is not None:  # posted earlier: done once received
                if not t.pending[2]:
                    return None
                t.pending = None
                return token
            x = t.env[id(op.operands[0])]
            entry = [op, x if dry else np.array(x, copy=True), False]  # send op, value, received
            self.queues.setdefault((k, a.peer, a.tag), deque()).append(entry)
            if not self.rendezvous:
                return token
            t.pending = entry
            self.posted = True
            return None
        if op.name == "Recv":
            q = self.queues.get((a.peer, k, a.tag))
            if not q:
                return None
            entry = q.popleft()
            entry[2] = True
            sop, x = entry[0], entry[1]
            want = op.results[0].type
            got = sop.operands[0].type
            if got.dtype != want.dtype or got.shape is None or want.shape is None or len(got.shape) != len(want.shape) \
                    or any(isinstance(g, int) and isinstance(w, int) and g != w for g, w in zip(got.shape, want.shape)):
                raise MultiDeviceError(f"{describe(op, k)} expects {want}, but its matching "
                                       f"{describe(sop, a.peer)} sends {got}")
            if not dry:
                x = check_input(f"message from device {a.peer} (tag {a.tag})", want, x)
            return [x]
        # collectives
        g = tuple(a.group)
        seq = self.coll_seq.get((g, k), 0)
        slot = self.coll.setdefault((g, seq), {})
        if k not in slot:
            slot[k] = (op, t.env[id(op.operands[0])])
        if "result" not in slot:
            if any(d not in slot for d in g):
                return None
            slot["result"] = self._collective(g, seq, slot)
        self.coll_seq[(g, k)] = seq + 1
        res = slot["result"]
        slot.setdefault("taken", set()).add(k)
        if slot["taken"] >= set(g):
            del self.coll[(g, seq)]
        return [res if dry else np.array(res, copy=True)]

    def _collective(self, g: tuple, seq: int, slot: dict):
        op0, _ = slot[g[0]]

        def sig(op):
            at = {k: v for k, v in vars(op.attrs).items() if k != "device"}
            return (op.name, tuple(sorted(at.items())), str(op.operands[0].type))
        for d in g[1:]:
            op, _ = slot[d]
            if sig(op) != sig(op0):
                raise MultiDeviceError(
                    f"collective #{seq} of group {list(g)} differs between devices: "
                    f"{describe(op0, g[0])} on {op0.operands[0].type} but "
                    f"{describe(op, d)} on {op.operands[0].type}")
        if self.evaluate is None:
            return op0.results[0].type
        vals = [slot[d][1] for d in g]
        if op0.name == "AllReduce":
            return all_reduce(op0.attrs.op, vals)
        return all_gather(op0.attrs.axis, vals)


# ---------------------------------------------------------------- verifier

def verify_multi(mdm: MultiDeviceModule, rendezvous: bool = True) -> None:
    """rendezvous: sends complete only when received (NCCL); False accepts programs that need
    buffered sends."""
    K = mdm.num_devices
    if K < 1:
        raise MultiDeviceError("a multi-device module needs at least one device")
    for k, m in enumerate(mdm.devices):
        try:
            verify(m)
        except NncError as e:
            raise VerifyError(f"device {k}: {e}") from None
        top = set(map(id, m.main.ops))
        for op in m.main.walk():
            if op.name not in COMM_OPS:
                continue
            a = op.attrs
            if id(op) not in top:
                raise VerifyError(f"{describe(op, k)}: communication ops belong at the top level of @main, not in a region")
            if a.device != k:
                raise VerifyError(f"{describe(op, k)}: says device = {a.device}, but it is in device {k}'s module")
            for d in ([a.peer] if hasattr(a, "peer") else list(a.group)):
                if not 0 <= d < K:
                    raise VerifyError(f"{describe(op, k)}: device {d} does not exist (the program has {K})")
        returned = {id(v) for v in m.main.results}
        for op in m.main.ops:
            if op.name == "Send" and id(op.results[0]) not in returned:
                raise VerifyError(f"{describe(op, k)}: its token {vname(op.results[0].name)} is not returned "
                                  f"by @main (dead-code elimination would erase the send)")
        for v in m.main.results:
            if v.type.dtype.kind == "bool" and v.type.shape == (0,) and not is_token(v):
                raise VerifyError(f"device {k}: @main returns {vname(v.name)}: bool[0], which is not a Send token")
    for name, d in mdm.output_device.items():
        if not 0 <= d < K or not any(v.name == name for v in mdm.devices[d].main.results):
            raise VerifyError(f"output {name!r} is assigned to device {d}, which does not return it")
    _Scheduler(mdm, 1, rendezvous=rendezvous).run()  # dry run: pairs Send/Recv, orders collectives, finds deadlocks


# ---------------------------------------------------------------- reference execution

def run_multi(mdm: MultiDeviceModule, inputs: dict, micro_batches: Optional[int] = None,
              trace: Optional[list] = None, rendezvous: bool = True) -> dict[str, np.ndarray]:
    """Runs the K-device program on the numpy interpreter (simulated devices). inputs: model
    input name -> array (the whole batch). micro_batches: M (default mdm.micro_batches); with
    M > 1 every input is split along axis 0 into M equal parts. trace: a list that receives the
    scheduler's TraceEvents. rendezvous: a Send waits for its Recv (NCCL's semantics, the
    default); False: buffered sends. Returns model output name -> array."""
    M = mdm.micro_batches if micro_batches is None else int(micro_batches)
    if M < 1:
        raise MultiDeviceError(f"micro_batches {M}: must be at least 1")
    names = mdm.input_names()
    missing = [n for n in names if n not in inputs]
    if missing:
        raise InputError(f"missing inputs {missing}; the model takes {names}")
    extra = sorted(set(inputs) - set(names))
    if extra:
        raise InputError(f"unknown inputs {extra}; the model takes {names}")
    if M > 1:
        check_batch_split(mdm)
    parts: dict[str, list] = {}
    for n in names:
        x = np.asarray(inputs[n])
        if M > 1:
            if x.ndim == 0 or x.shape[0] % M:
                raise InputError(f"input {n!r}: shape {list(x.shape)} does not split into {M} micro-batches along axis 0")
            parts[n] = np.split(x, M, axis=0)
        else:
            parts[n] = [x]
    feeds = []
    for m in range(M):
        per_dev = []
        for k, mod in enumerate(mdm.devices):
            per_dev.append({a.name: check_input(a.name, a.type, parts[a.name][m]) for a in mod.main.args})
        feeds.append(per_dev)
    interps = [Interpreter(mod) for mod in mdm.devices]

    def evaluate(k, op, task):
        vals = [None if v is None else task.env[id(v)] for v in op.operands]
        ctx = RefCtx(interps[k], task.env, op, [r.type for r in op.results])
        try:
            return call_ref(registry.get(op.name), op.attrs, vals, ctx.result_types, ctx)
        except NncError as e:
            raise NncError(f"device {k}: {op.loc}: {e}") from e.__cause__

    sched = _Scheduler(mdm, M, feeds, evaluate, rendezvous)
    sched.run()
    if trace is not None:
        trace.extend(sched.trace)
    out = {}
    for name in mdm.output_names():
        k = mdm.source_of(name)
        i = next(i for i, v in enumerate(mdm.devices[k].main.results) if v.name == name)
        vals = [sched.results[m][k][i] for m in range(M)]
        out[name] = vals[0] if M == 1 else np.concatenate(vals, axis=0)
    return out


# ---------------------------------------------------------------- micro-batching

def check_batch_split(mdm: MultiDeviceModule) -> None:
    """Raises a MultiDeviceError naming the first op that could mix rows of different samples
    (so the program cannot run on micro-batches split along axis 0 of its inputs); returns if every
    model output has the batch on its axis 0. Conservative: patterns it does not know are refused.

    Every value is either *batched*, with the axis that holds the batch (inputs: axis 0; a
    Transpose, Reshape, MatMul... moves it) and its block (how many consecutive entries of that
    axis one sample spans: [B, S, D] -> [B*S, D] gives S), or *free* (weights, constants: no
    batched value reaches it). An op is accepted when it treats the batch axis as independent rows (elementwise,
    broadcasting, the M / batch dims of a MatMul, the N of a conv, a reduction over other axes) and
    its result keeps the batch extent on the axis it maps to. Devices are checked in order; a Recv
    is batched as its matching Send's value was (pipelines send forward only)."""
    sent: dict[tuple, deque] = {}
    for k, m in enumerate(mdm.devices):
        f = m.main
        status: dict[int, Optional[int]] = {}
        blk: dict[int, int] = {}  # batched value -> consecutive entries of one sample on its axis
        for a in f.args:
            if a.type.shape is None or len(a.type.shape) == 0:
                raise MultiDeviceError(f"device {k}: input {vname(a.name)}: {a.type} has no axis 0 to split "
                                       f"into micro-batches")
            status[id(a)] = 0
        for op in f.ops:
            if op.name == "Recv":
                q = sent.get((op.attrs.peer, k, op.attrs.tag))
                if not q:
                    raise MultiDeviceError(f"{describe(op, k)}: receives from a later device; micro-batching "
                                           f"checks only forward (pipeline) communication")
                status[id(op.results[0])], blk[id(op.results[0])] = q.popleft()
                continue
            _batch_op(op, status, blk, m, k)
            if op.name == "Send":
                x = op.operands[0]
                sent.setdefault((k, op.attrs.peer, op.attrs.tag), deque()).append((status.get(id(x)), blk.get(id(x), 1)))
        for v in f.results:
            if not is_token(v) and status.get(id(v)) != 0:
                why = "does not depend on the batch" if status.get(id(v)) is None else \
                    f"has the batch on axis {status[id(v)]}, not 0"
                raise MultiDeviceError(f"device {k}: output {vname(v.name)} {why}; micro-batches could not be "
                                       f"concatenated back along axis 0")


def _refuse(op: Op, k: int, why: str):
    raise MultiDeviceError(f"device {k}: {vname(op.results[0].name)} = {op.name} at {op.loc}: {why}; "
                           f"this graph cannot run split into micro-batches (use --micro-batches 1)")


# ops whose axis 0 is the batch (N of NCHW / NHWC) and that mix everything else
_BATCH_FIRST = {"Conv", "ConvInteger", "QLinearConv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool",
                "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "BatchNormalization", "InstanceNormalization",
                "GroupNormalization", "LRN", "MaxRoiPool", "SpaceToDepth", "DepthToSpace", "Col2Im"}
_MATMULS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3), "matmul_int4_weight": (0, None)}
_REFUSED = {"Shape": "reads the batch size", "Size": "reads the batch size", "Einsum": "einsum is not analysed",
            "NonZero": "data-dependent extents", "Compress": "data-dependent extents"}


def _axes_of(op: Op, module: Module, i: int, alias: dict):
    """Ints of a const operand i (axes given as an input), None when absent or not constant.
    alias: a fused body's argument -> the operand outside (whose const it is)."""
    if len(op.operands) <= i or op.operands[i] is None:
        return None
    v = op.operands[i]
    while id(v) in alias:
        v = alias[id(v)]
    cv = const_value(v, module.weights)
    return None if cv is None else [int(x) for x in np.asarray(cv).reshape(-1)]


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def _reshape_axis(src: tuple, a: int, block: int, dst: tuple) -> Optional[tuple[int, int]]:
    """(axis, block) of the batch after a row-major reshape of `src` (batch on axis a, each sample
    `block` consecutive entries of it) to `dst`; None: samples would mix. A sample is a contiguous
    run of S = block * prod(src[a+1:]) elements per index of the axes before a, so it survives as
    `block'` entries of the dst axis j whose leading product matches and whose extent is b * block'
    ([B, S, D] -> [B*S, D] gives block S; back to [B, S, D] gives block 1)."""
    if not (_static(src) and _static(dst)) or src[a] % block:
        return None
    lead = int(np.prod(src[:a], dtype=np.int64))
    b = src[a] // block
    S = block * int(np.prod(src[a + 1:], dtype=np.int64))
    for j in range(len(dst)):
        inner = int(np.prod(dst[j + 1:], dtype=np.int64))
        if int(np.prod(dst[:j], dtype=np.int64)) == lead and inner and S % inner == 0 and dst[j] == b * (S // inner):
            return j, S // inner
    return None


def _batch_op(op: Op, status: dict, blk: dict, module: Module, k: int, alias: Optional[dict] = None) -> None:
    alias = {} if alias is None else alias
    batched = [(i, v, status[id(v)]) for i, v in enumerate(op.operands)
               if v is not None and status.get(id(v)) is not None]
    if not batched:
        for r in op.results:
            status[id(r)] = None
        return
    if op.name == "Send":
        status[id(op.results[0])] = None
        return
    if op.name == "fused":
        body = op.attrs.body
        inner = {id(x): status.get(id(v)) for x, v in zip(body.args, op.operands) if v is not None}
        inner_blk = {id(x): blk.get(id(v), 1) for x, v in zip(body.args, op.operands) if v is not None}
        alias.update({id(x): v for x, v in zip(body.args, op.operands) if v is not None})
        for sub in body.ops:
            _batch_op(sub, inner, inner_blk, module, k, alias)
        for r, v in zip(op.results, body.results):
            status[id(r)] = inner.get(id(v))
            blk[id(r)] = inner_blk.get(id(v), 1)
        return
    if op.regions():
        _refuse(op, k, "ops with regions are not analysed")
    if op.name in _REFUSED:
        _refuse(op, k, _REFUSED[op.name])
    for _, v, ax in batched:
        if v.type.shape is None or ax >= len(v.type.shape):
            _refuse(op, k, f"operand {vname(v.name)}: {v.type} has unknown rank")
    res0 = op.results[0].type
    if res0.shape is None:
        _refuse(op, k, f"result {res0} has unknown rank")
    R = len(res0.shape)
    at = op.attrs
    x0 = op.operands[0]
    a0 = status.get(id(x0)) if x0 is not None else None
    b = batched[0][1].type.shape[batched[0][2]]  # the batch's extent on its axis (samples x block)
    blocks = {blk.get(id(v), 1) for _, v, _ in batched}
    if len(blocks) != 1:
        _refuse(op, k, f"its batched operands lay samples out differently (blocks {sorted(blocks)})")
    block = blocks.pop()

    def norm(ax, rank):
        return ax + rank if ax < 0 else ax

    want: set = set()  # result axis each batched operand maps to
    name = op.name
    if name in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
        if len(batched) != 1 or batched[0][0] != 0:
            _refuse(op, k, "its shape operand depends on the batch")
        got = _reshape_axis(tuple(x0.type.shape), a0, block, tuple(res0.shape))
        if got is None:
            _refuse(op, k, f"reshaping {x0.type} to {res0} mixes samples (batch axis {a0})")
        j, block = got
        b = res0.shape[j]
        want.add(j)
    elif name == "Transpose":
        perm = list(at.perm) if getattr(at, "perm", None) else list(range(R))[::-1]
        want.add(perm.index(a0))
    elif name in _MATMULS:
        ia, ib = _MATMULS[name]
        for i, v, ax in batched:
            r = len(v.type.shape)
            if i == ia:
                if r < 2 or ax == r - 1:
                    _refuse(op, k, "the batch axis is contracted (the left operand's K)")
                want.add(ax + R - r)
            elif i == ib:
                if r < 2 or ax == r - 2:
                    _refuse(op, k, "the batch axis is contracted (the right operand's K)")
                want.add(R - 1 if ax == r - 1 else ax + R - r)
            else:
                _refuse(op, k, f"operand {i} (scales / zero points) depends on the batch")
    elif name == "Gemm":
        for i, v, ax in batched:
            if i == 0:
                if ax != (1 if at.transA else 0):
                    _refuse(op, k, "the batch axis is contracted (A's K)")
                want.add(0)
            elif i == 1:
                if ax != (0 if at.transB else 1):
                    _refuse(op, k, "the batch axis is contracted (B's K)")
                want.add(1)
            else:
                want.add(ax + R - len(v.type.shape))
    elif name == "Gather":
        g = norm(at.axis, len(x0.type.shape))
        idx = op.operands[1]
        ri = len(idx.type.shape) if idx.type.shape is not None else 0
        for i, v, ax in batched:
            if i == 0:
                if ax == g:
                    _refuse(op, k, "gathers along the batch axis")
                want.add(ax if ax < g else ax + ri - 1)
            else:
                want.add(g + ax)
    elif name in _BATCH_FIRST:
        for i, v, ax in batched:
            if i != 0 or ax != 0:
                _refuse(op, k, f"{name} treats only axis 0 of its input as the batch")
        want.add(0)
    else:
        axis = getattr(at, "axis", None)
        axes = getattr(at, "axes", None)
        if name.startswith("Reduce") or name == "CumSum" or name == "Slice":
            axes = _axes_of(op, module, 3 if name == "Slice" else 1, alias)
            if axes is None and name == "CumSum":
                _refuse(op, k, "its axis is not a constant")
            if axes is None and not (name.startswith("Reduce") and getattr(at, "noop_with_empty_axes", 0)):
                _refuse(op, k, "works along every axis, the batch axis included")
        r0 = len(x0.type.shape) if x0 is not None and x0.type.shape is not None else R
        for _, v, ax in batched:
            r = len(v.type.shape)
            if isinstance(axis, int):
                if name in ("LayerNormalization", "RMSNormalization") and ax >= norm(axis, r):
                    _refuse(op, k, f"normalises axes {norm(axis, r)}.. which include the batch axis {ax}")
                if norm(axis, r) == ax:
                    _refuse(op, k, f"works along axis {axis}, the batch axis")
            if axes is not None and any(norm(int(x), r) == ax for x in axes):
                _refuse(op, k, f"axes {list(axes)} include the batch axis {ax}")
        if name == "Trilu" and a0 is not None and a0 >= r0 - 2:
            _refuse(op, k, "the batch axis is one of the matrix axes")
        for i, v, ax in batched:
            r = len(v.type.shape)
            if name.startswith(("Reduce", "ArgM")) and not getattr(at, "keepdims", 1) and i == 0:
                red = [norm(int(x), r) for x in (axes if axes is not None else [axis])]
                want.add(ax - sum(1 for x in red if x < ax))
            else:
                want.add(ax + R - r)  # numpy broadcasting aligns trailing axes
    if len(want) != 1:
        _refuse(op, k, f"its batched operands put the batch on different result axes {sorted(want)}")
    ra = want.pop()
    for r in op.results:
        if r.type.shape is None or not 0 <= ra < len(r.type.shape) or r.type.shape[ra] != b:
            _refuse(op, k, f"result {r.type} does not keep the batch extent {b} on axis {ra}")
        status[id(r)] = ra
        blk[id(r)] = block


# ---------------------------------------------------------------- segments (for codegen)

@dataclass
class Segment:
    """A run of a device's compute ops between communication points, as an ordinary Module the
    single-device lowering takes: its arguments are what it reads from before it (model inputs,
    earlier segments' values, received messages, collective results), its results what is read
    after it (later segments, messages, collectives, the model's outputs). The host does the
    communication around it: `recvs` before (their values are arguments), `sends` after (their
    values are results), then `collective` (None: none follows)."""
    index: int
    module: Optional[Module]  # None: no compute ops (only communication)
    recvs: list
    sends: list
    collective: Optional[Op]


def segments(module: Module) -> list[Segment]:
    """Cuts device @main at every collective, and before a Recv that follows a Send of the same
    segment (its message may depend on that send); pipelines from the partitioner are one segment."""
    from .ir.graph import Function
    f = module.main
    runs: list[dict] = []
    cur = {"ops": [], "recvs": [], "sends": [], "collective": None}
    for op in f.ops:
        if op.name == "Recv" and cur["sends"]:
            runs.append(cur)
            cur = {"ops": [], "recvs": [], "sends": [], "collective": None}
        if op.name == "Recv":
            cur["recvs"].append(op)
        elif op.name == "Send":
            cur["sends"].append(op)
        elif op.name in ("AllReduce", "AllGather"):
            cur["collective"] = op
            runs.append(cur)
            cur = {"ops": [], "recvs": [], "sends": [], "collective": None}
        else:
            cur["ops"].append(op)
    runs.append(cur)
    # what each run reads (consts are copied into every run that reads them)
    consts = {id(op.results[0]): op for op in f.ops if op.name == "const"}
    reads = []
    for r in runs:
        ids: list = []
        for op in r["ops"]:
            for v in list(op.operands) + [x for _, reg in op.regions() for x in _outer_values(reg)]:
                if v is not None and all(v is not w for w in ids):
                    ids.append(v)
        reads.append(ids)
    later_need: list[set] = []
    need: set = {id(v) for v in f.results}
    for i in range(len(runs) - 1, -1, -1):
        later_need.append(set(need))
        r = runs[i]
        need |= {id(op.operands[0]) for op in r["sends"]}
        if r["collective"] is not None:
            need.add(id(r["collective"].operands[0]))
        need |= {id(v) for v in reads[i]}
    later_need.reverse()
    out = []
    for i, r in enumerate(runs):
        compute = [op for op in r["ops"] if op.name != "const"]
        if not compute:
            out.append(Segment(i, None, r["recvs"], r["sends"], r["collective"]))
            continue
        defined = {id(x) for op in r["ops"] for x in op.results}
        args = [v for v in reads[i] if id(v) not in defined and id(v) not in consts]
        used_consts = [consts[id(v)] for v in reads[i] if id(v) in consts]
        own = [x for op in compute for x in op.results]
        sent_here = {id(op.operands[0]) for op in r["sends"]}
        coll = {id(r["collective"].operands[0])} if r["collective"] is not None else set()
        results = [x for x in own if id(x) in later_need[i] or id(x) in sent_here or id(x) in coll]
        if not results:  # dead code: nothing it computes is read (DCE would have erased it)
            out.append(Segment(i, None, r["recvs"], r["sends"], r["collective"]))
            continue
        fn = Function([_Arg(v) for v in args], [op for op in used_consts] + compute, results, name=f.name)
        text = print_module(Module([fn]))
        seg = parse(text, f"<device {_device_of(module)} segment {i}>")
        names = {op.attrs.weight for op in used_consts if op.attrs.weight is not None}
        store = WeightStore({n: module.weights[n] for n in names} if module.weights is not None else {})
        for o in seg.main.walk():  # consts inside fused bodies
            if o.name == "const" and o.attrs.weight is not None and module.weights is not None:
                store[o.attrs.weight] = module.weights[o.attrs.weight]
        seg.weights = store
        out.append(Segment(i, seg, r["recvs"], r["sends"], r["collective"]))
    return out


def _Arg(v):
    """A stand-in argument for printing: the value's name and type, no producer."""
    from .ir.graph import Value
    return Value(v.name, v.type)


def _outer_values(region) -> list:
    inner = {id(a) for a in region.args}
    out = []
    for op in region.walk():
        inner |= {id(x) for x in op.results}
        for _, sub in op.regions():
            inner |= {id(a) for a in sub.args}
    for op in region.walk():
        for v in op.operands:
            if v is not None and id(v) not in inner:
                out.append(v)
    return out


def _device_of(module: Module) -> str:
    ops = comm_ops(module)
    return str(ops[0].attrs.device) if ops else "?"


def compute_module(module: Module) -> Module:
    """The one segment of a device module without collectives (a pipeline stage): Recv values as
    arguments, sent values and outputs as results."""
    segs = [s for s in segments(module) if s.module is not None]
    if len(segs) != 1:
        raise MultiDeviceError(f"device {_device_of(module)}: {len(segs)} compute segments, not one")
    return segs[0].module


def communication_json(mdm: MultiDeviceModule) -> list[dict]:
    """plan.json's "communication": every message and collective, in each device's program order."""
    out = []
    for k, m in enumerate(mdm.devices):
        for op in comm_ops(m):
            a = op.attrs
            t = op.results[0].type if op.name == "Recv" else op.operands[0].type
            e = {"device": k, "op": op.name, "value": (op.results[0] if op.name == "Recv" else op.operands[0]).name,
                 "dtype": t.dtype.np_name, "shape": [d if isinstance(d, int) else str(d) for d in (t.shape or ())]}
            if hasattr(a, "peer"):
                e.update(peer=a.peer, tag=a.tag)
            else:
                e.update(group=list(a.group), **({"reduce": a.op} if op.name == "AllReduce" else {"axis": a.axis}))
            from .passes.partition_pipeline import _bytes
            e["bytes"] = _bytes(t)
            out.append(e)
    return out


# ---------------------------------------------------------------- nnc compile --devices K

PARALLEL_MODES = ("pipeline", "tensor", "auto")


def _tensor_parallel(module: Module, k: int) -> Optional[MultiDeviceModule]:
    try:
        from .passes.shard_tensor_parallel import shard_tensor_parallel
    except ImportError as e:
        raise MultiDeviceError(f"--parallel tensor: the tensor-parallel pass is not available "
                               f"(nnc.passes.shard_tensor_parallel: {e})") from None
    prog = shard_tensor_parallel(module, k)
    if hasattr(prog, "to_multi_device"):
        mdm = prog.to_multi_device()
    else:
        mdm = MultiDeviceModule(list(prog.devices), "tensor", 1, {})
    mdm.parallel = "tensor"
    if hasattr(prog, "plan_json"):
        mdm.plan = {"tensor_parallel": prog.plan_json(), **mdm.plan}
    mdm.plan.setdefault("sharded_blocks", len(getattr(prog, "blocks", []) or []))
    return mdm


def compile_multi_device(model, out, options, devices: int, parallel: str = "pipeline", micro_batches: int = 1,
                         stage_times=None, dump_ir=None) -> dict:
    """`nnc compile --devices K --parallel P`: import, the default pass pipeline, then the
    partitioner (pipeline: compiler/passes/partition_pipeline.py; tensor: H2's
    shard_tensor_parallel; auto: tensor where it shards a block, else pipeline), then OUT/:
    plan.json (the whole program: devices, stages, communication, schedule), ir/ (the
    multi-device IR: multi.nnmd text plus device<K>.nnir and weights) and device<K>/ (each
    device's compute segments (cut at collectives) compiled as ordinary single-device outputs; CUDA when codegen)."""
    from .driver import io_entry, model_name, pipeline_passes
    from .integrity import ir_hashes
    from .onnx_import import import_model
    from .outdir import staged_dir
    from .pipeline import Pipeline
    from .passes.partition_pipeline import gpipe_schedule, measured_times, partition
    from . import profiles, progress
    import warnings
    if not isinstance(devices, int) or devices < 1:
        raise MultiDeviceError(f"--devices {devices}: must be at least 1")
    if parallel not in PARALLEL_MODES:
        raise MultiDeviceError(f"--parallel {parallel!r}: one of {', '.join(PARALLEL_MODES)}")
    if micro_batches < 1:
        raise MultiDeviceError(f"--micro-batches {micro_batches}: must be at least 1")
    if micro_batches > 1 and parallel != "pipeline":
        raise MultiDeviceError("--micro-batches is for --parallel pipeline")
    if options.profiles or options.precision in ("best", "int8") or options.keep_fp32:
        raise MultiDeviceError("--devices: profiles, --precision best/int8 and --keep-fp32 are not supported "
                               "with several devices yet")
    options = profiles.default_shapes(model, options, lambda m: warnings.warn(m, UserWarning, stacklevel=3))
    shapes = {k: list(v) for k, v in options.shapes}
    if micro_batches > 1:  # each device compiles for one micro-batch: axis 0 of every input / M
        if not shapes:
            raise MultiDeviceError("--micro-batches needs --shapes (the batch dim of every input is split M ways)")
        for n, dims in shapes.items():
            if not dims or dims[0] % micro_batches:
                raise MultiDeviceError(f"--micro-batches {micro_batches}: input {n!r} of shape {dims} does not "
                                       f"split along axis 0 into {micro_batches} equal micro-batches")
        shapes = {n: [dims[0] // micro_batches] + dims[1:] for n, dims in shapes.items()}
    name = model_name(options.name, model)
    rep = progress.current()
    with rep.stage("import"):
        module = import_model(model, shapes=shapes)
        verify(module)
    full_inputs = [io_entry(a) for a in module.main.args]
    pipe = Pipeline(pipeline_passes(options.precision, options.fuse), options.verify_each,
                    Path(dump_ir) if dump_ir else None)
    pipe.run(module)
    model_outputs = [io_entry(r) for r in module.main.results]
    if micro_batches > 1:
        for e in full_inputs + model_outputs:
            if e["shape"] and isinstance(e["shape"][0], int):
                e["shape"][0] *= micro_batches
    with rep.stage("partition"):
        mdm = None
        if parallel in ("tensor", "auto"):
            try:
                mdm = _tensor_parallel(module, devices)
            except NncError as e:
                if parallel == "tensor":
                    raise
                rep.log(f"  --parallel auto: no tensor parallelism ({e}); pipeline")
            if parallel == "auto" and mdm is not None and not mdm.plan.get("sharded_blocks"):
                mdm = None  # nothing sharded: a pipeline does better
            if parallel == "auto" and mdm is None:  # the sharding pass may have left the module changed
                module = import_model(model, shapes=shapes)
                Pipeline(pipeline_passes(options.precision, options.fuse)).run(module)
        if mdm is None:
            measured = measured_times(stage_times) if stage_times else None
            mdm = partition(module, devices, measured, micro_batches)
        verify_multi(mdm)
        if micro_batches > 1:
            check_batch_split(mdm)
    plan = {
        "name": name, "kind": "multi_device", "devices": devices, "parallel": mdm.parallel,
        "micro_batches": mdm.micro_batches, "precision": options.precision,
        "inputs": full_inputs, "outputs": model_outputs,
        "passes": [r.name for r in pipe.records],
        "output_device": {n: mdm.source_of(n) for n in mdm.output_names()},
        **mdm.plan,
        "communication": communication_json(mdm),
        **({"schedule": gpipe_schedule(devices, mdm.micro_batches)} if mdm.parallel == "pipeline" else {}),
        "device_dirs": [f"device{k}" for k in range(devices)],
        "device_builds": [],  # per device: the build of each compute segment (between collectives), in order
        "codegen": bool(options.generates_cuda),
        "kernels": [],  # with codegen: {"device", "name"} of every device's kernels (each device<K>/plan.json has them all)
    }
    target = None
    if options.generates_cuda:
        from .codegen.target import resolve_target
        target = resolve_target(options.arch)
        plan["arch"] = target.arch
    with rep.stage("write"), staged_dir(out) as tmp:
        (tmp / "ir").mkdir()
        (tmp / "ir" / "multi.nnmd").write_text(print_multi(mdm))
        save_multi(mdm, tmp / "ir")
        plan["ir_sha256"] = multi_ir_hashes(tmp / "ir")
        build_plans: dict = {}  # (device, segment) -> its build's plan.json (codegen), for the group C API
        for k, m in enumerate(mdm.devices):
            segs = [sg for sg in segments(m) if sg.module is not None]
            dirs = [f"device{k}"] if len(segs) == 1 else [f"device{k}/segment{sg.index}" for sg in segs]
            plan["device_builds"].append(dirs)
            for sg, rel in zip(segs, dirs):
                cm, sub = sg.module, tmp / rel
                label = f"{name}_dev{k}" + (f"_seg{sg.index}" if len(segs) > 1 else "")
                base = {"name": label, "device": k, "of_devices": devices, "segment": sg.index,
                        "inputs": [io_entry(a) for a in cm.main.args],
                        "outputs": [io_entry(r) for r in cm.main.results], "passes": plan["passes"],
                        "precision": options.precision, "kernels": [],
                        "memory": {"arena_bytes": 0, "naive_bytes": 0, "peak_live_bytes": 0}}
                if options.generates_cuda:
                    from .codegen.emit import compile_to_dir
                    sub.parent.mkdir(parents=True, exist_ok=True)
                    dev_plan = compile_to_dir(cm, sub, base_plan={**base, "arch": target.arch, "target": target.to_json()},
                                              name=label, options=options.codegen_options(target))
                    plan["kernels"] += [{"device": k, "segment": sg.index, "name": kern["name"]}
                                        for kern in dev_plan.get("kernels", [])]
                    build_plans[(k, sg.index)] = {**dev_plan, "dir": rel}
                else:
                    (sub / "ir").mkdir(parents=True)
                    (sub / "ir" / "final.nnir").write_text(print_module(cm))
                    (cm.weights or WeightStore()).save(sub / "ir" / "final")
                    base["ir_sha256"] = ir_hashes(sub / "ir")
                    (sub / "plan.json").write_text(json.dumps(base, indent=1) + "\n")
        if options.generates_cuda:  # nnc_<name>_group_* over every build (compiler/multi_device_capi.py)
            from .multi_device_capi import GroupApiError, write_group_api
            try:
                plan["c_api"] = write_group_api(tmp, plan, mdm, build_plans)
            except GroupApiError as e:  # the builds still load through nnc.load
                warnings.warn(f"--devices {devices}: no group C API: {e}", UserWarning, stacklevel=2)
                plan["c_api"] = {"prefix": None, "not_written": str(e)}
        (tmp / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    return plan


# ---------------------------------------------------------------- loading an OUT of several devices

def multi_ir_hashes(ir_dir) -> dict:
    """sha256 of every file of OUT/ir (the multi-device IR), for plan.json's "ir_sha256"."""
    from .integrity import sha256_file
    return {p.name: sha256_file(p) for p in sorted(Path(ir_dir).iterdir()) if p.is_file()}


def check_multi_ir(out, plan: dict) -> None:
    from .integrity import check_file
    from .outdir import member
    want = plan.get("ir_sha256")
    if not isinstance(want, dict) or not want:
        raise MultiDeviceError(f"{out}: plan.json has no ir_sha256 for the multi-device IR")
    for fname, digest in want.items():
        check_file(member(Path(out) / "ir", fname, "IR file"), digest, "IR file")

def is_multi_device_dir(out) -> bool:
    try:
        return json.loads((Path(out) / "plan.json").read_text()).get("kind") == "multi_device"
    except (OSError, ValueError, AttributeError):
        return False


class MultiDeviceProgram:
    """A `nnc compile --devices K` directory, loaded (what nnc.load returns for one). backend
    "reference": run_multi on the multi-device IR (ir/), simulated devices. backend "cuda", by
    `transport` (multi_device_nccl.choose_transport):
    - "nccl": device k on GPU k (or gpus[k]), its builds loaded there with a stream of its own,
      a host thread per device queueing its steps, Send / Recv / AllReduce / AllGather as NCCL
      calls, micro-batches in flight (multi_device_nccl.DeviceGroup);
    - "copy": every device's segment builds (plan.json's device_builds) loaded as module
      instances on the one current GPU and run by a host step scheduler: a Recv is a
      device-to-device copy of the sender's value (cupy), a collective a cupy sum /
      concatenation of the members' values, each standing in for NCCL. This checks the plan,
      the per-device builds and the results, not multi-GPU speed (nothing overlaps);
    - "auto" (default): nccl when there are K >= 2 GPUs and NCCL, else copy (a UserWarning says so).
    `transport_used` / `transport_reason` say which ran and why. device_graphs (nccl, opt-in, not
    yet run on GPUs): each device's whole run captured once as one CUDA graph and replayed
    (multi_device_nccl.DeviceGroup); runs with timing=True still go step by step."""

    def __init__(self, out, backend: str = "reference", transport: str = "auto", *, cuda_graph: bool = True,
                 gpus: Optional[list] = None, device_graphs: bool = False):
        from .multi_device_nccl import TRANSPORTS, TransportError
        from .plan_file import read_plan
        if backend not in ("reference", "cuda"):
            raise MultiDeviceError(f"backend must be 'cuda' or 'reference', not {backend!r}")
        if transport not in TRANSPORTS:
            raise TransportError(f"transport must be one of {', '.join(map(repr, TRANSPORTS))}, not {transport!r}")
        if backend == "reference" and transport == "nccl":
            raise TransportError("transport='nccl' needs backend='cuda' (the reference simulates the devices)")
        self.out = self.dir = Path(out)
        self.plan = read_plan(self.out)
        if self.plan.get("kind") != "multi_device":
            raise MultiDeviceError(f"{self.out}: not a multi-device output (plan.json has no kind 'multi_device')")
        check_multi_ir(self.out, self.plan)
        self.mdm = load_multi(self.out / "ir")
        verify_multi(self.mdm)
        self.backend = backend
        self.segments = [[sg for sg in segments(m)] for m in self.mdm.devices]
        self._builds = None  # (device, segment index) -> a loaded build
        self.group = None  # transport "nccl": the multi_device_nccl.DeviceGroup
        self.stage_ms: list = []  # copy: per device, per micro-batch, host wall ms of its segment builds
        self.comm_ms: list = []   # copy: per device, per micro-batch, host wall ms of its collectives
        self.transport_used, self.transport_reason = "reference", "backend 'reference': simulated devices"
        if backend == "cuda":
            if not self.plan.get("codegen"):
                raise MultiDeviceError(f"{self.out}: compiled with --no-codegen; the cuda backend needs the builds")
            from .multi_device_nccl import choose_transport, gpu_count, nccl_available
            from .runtime import load, require_gpu
            require_gpu()
            K = self.mdm.num_devices
            need_nccl = transport != "copy" and K > 1
            choice = choose_transport(transport, K, gpu_count() if need_nccl else 1,
                                      nccl_available() if need_nccl else False)
            self.transport_used, self.transport_reason = choice.name, choice.reason
            if choice.name == "nccl":
                from .multi_device_nccl import open_nccl_group
                self.group = open_nccl_group(self, gpus, cuda_graph, device_graphs)
            else:
                if transport == "auto" and K > 1:
                    import warnings
                    warnings.warn(f"{self.out}: {choice.reason}", UserWarning, stacklevel=2)
                self._builds = self._load_builds(lambda rel: load(self.out / rel, cuda_graph=cuda_graph))

    def __repr__(self):
        return (f"<nnc.MultiDeviceProgram {self.backend} ({self.transport_used}) {self.out}: "
                f"{self.mdm.num_devices} devices, {self.plan.get('parallel')}>")

    def close(self) -> None:
        """Frees the NCCL communicators (transport nccl); the program is unusable after."""
        if self.group is not None:
            for s in self.group.sides:
                comm = getattr(s, "comm", None)
                if comm is not None:
                    comm.destroy()
            self.group.broken = "closed"

    def _load_builds(self, load) -> dict:
        dirs = self.plan.get("device_builds")
        if not isinstance(dirs, list) or len(dirs) != self.mdm.num_devices:
            raise MultiDeviceError(f"{self.out}: plan.json's device_builds does not list {self.mdm.num_devices} devices")
        builds = {}
        for k, segs in enumerate(self.segments):
            have = [sg for sg in segs if sg.module is not None]
            if len(dirs[k]) != len(have):
                raise MultiDeviceError(f"{self.out}: device {k} has {len(have)} compute segments, plan.json lists "
                                       f"{len(dirs[k])} builds")
            for sg, rel in zip(have, dirs[k]):
                if not isinstance(rel, str) or ".." in Path(rel).parts or Path(rel).is_absolute():
                    raise MultiDeviceError(f"{self.out}: device_builds entry {rel!r} is not a directory inside OUT")
                builds[(k, sg.index)] = load(rel)
        return builds

    @property
    def inputs(self) -> tuple:
        """TensorInfo of every model input (whole-batch shapes), as nnc.Module's."""
        from .api import TensorInfo
        return tuple(TensorInfo.from_plan(e) for e in self.plan["inputs"])

    @property
    def outputs(self) -> tuple:
        from .api import TensorInfo
        return tuple(TensorInfo.from_plan(e) for e in self.plan["outputs"])

    @property
    def input_names(self) -> list:
        return [e["name"] for e in self.plan["inputs"]]

    @property
    def output_names(self) -> list:
        return [e["name"] for e in self.plan["outputs"]]

    def __call__(self, *args, **kwargs):
        names = [t.name for t in self.inputs]
        if len(args) == 1 and isinstance(args[0], dict) and not kwargs:
            feed = dict(args[0])
        else:
            if len(args) > len(names):
                raise InputError(f"the model takes {len(names)} inputs {names}, given {len(args)}")
            feed = {**dict(zip(names, args)), **kwargs}
        res = self.run(feed)
        vals = [res[t.name] for t in self.outputs]
        return vals[0] if len(vals) == 1 else tuple(vals)

    def run(self, inputs: dict, outputs=None, *, output: str = "numpy", micro_batches: Optional[int] = None,
            trace: Optional[list] = None, timing: bool = False) -> dict:
        """inputs: name -> array (whole batch). outputs: the names to return (default all).
        output: "numpy" (default) or "cupy" (transport nccl: on the GPU of the device that computes
        it). micro_batches: the reference's M (the cuda builds are compiled for plan.json's).
        trace: the reference scheduler's TraceEvents. timing (transport nccl): CUDA events around
        every step, read into self.group.timing (a RunTiming)."""
        if output not in ("numpy", "cupy"):
            raise NncError(f"output must be 'numpy' or 'cupy', not {output!r}")
        sel = self._selected(outputs)
        if self.backend == "reference":
            res = run_multi(self.mdm, inputs, micro_batches, trace)
        else:
            if micro_batches is not None and micro_batches != self.mdm.micro_batches:
                raise MultiDeviceError(f"micro_batches {micro_batches}: the builds are compiled for "
                                       f"{self.mdm.micro_batches} micro-batches")
            if self.group is not None:
                res = self.group.run(inputs, timing=timing, output=output)
                return {n: res[n] for n in sel}
            res = self._run_builds(inputs, self.mdm.micro_batches)
        if output == "cupy":
            import cupy as cp
            return {n: cp.asarray(res[n]) for n in sel}
        return {n: res[n] for n in sel}

    def _selected(self, outputs) -> list:
        names = self.output_names
        if outputs is None:
            return names
        sel = [outputs] if isinstance(outputs, str) else list(outputs)
        unknown = [n for n in sel if n not in names]
        if unknown:
            raise InputError(f"unknown outputs {unknown}; the model's outputs are {names}")
        return sel

    def _run_builds(self, inputs: dict, M: int) -> dict:
        import cupy as cp
        names = self.mdm.input_names()
        parts = {n: (np.split(np.asarray(inputs[n]), M, axis=0) if M > 1 else [np.asarray(inputs[n])]) for n in names}
        outs: dict[str, list] = {n: [] for n in self.mdm.output_names()}
        K = self.mdm.num_devices
        self.stage_ms = [[] for _ in range(K)]  # per device, per micro-batch: host wall ms of its segments
        self.comm_ms = [[] for _ in range(K)]  # per device, per micro-batch: host wall ms of its collectives
        for mb in range(M):
            env = [{a.name: cp.asarray(parts[a.name][mb]) for a in m.main.args} for m in self.mdm.devices]
            ms = [0.0] * K
            cms = [0.0] * K
            pos, phase = [0] * K, [0] * K  # segment, and where in it: 0 receive, 1 run, 2 send, 3 collective
            queues: dict[tuple, deque] = {}
            slots: dict[tuple, dict] = {}
            seq: dict[tuple, int] = {}
            while any(pos[k] < len(self.segments[k]) for k in range(K)):
                moved = False
                for k in range(K):
                    while pos[k] < len(self.segments[k]):
                        sg = self.segments[k][pos[k]]
                        if phase[k] == 0:
                            if any(not queues.get((op.attrs.peer, k, op.attrs.tag)) for op in sg.recvs):
                                break
                            for op in sg.recvs:  # the D2D copy standing in for ncclRecv
                                msg = queues[(op.attrs.peer, k, op.attrs.tag)].popleft()
                                env[k][op.results[0].name] = cp.array(msg, copy=True)
                            phase[k] = 1
                        if phase[k] == 1:
                            if sg.module is not None:
                                feed = {a.name: env[k][a.name] for a in sg.module.main.args}
                                cp.cuda.Device().synchronize()
                                t0 = time.perf_counter()
                                res = self._builds[(k, sg.index)].run(feed, output="cupy")
                                cp.cuda.Device().synchronize()
                                ms[k] += (time.perf_counter() - t0) * 1e3
                                env[k].update({n: cp.array(v, copy=True) for n, v in res.items()})  # builds reuse buffers
                            phase[k] = 2
                        if phase[k] == 2:
                            for op in sg.sends:
                                q = queues.setdefault((k, op.attrs.peer, op.attrs.tag), deque())
                                q.append(env[k][op.operands[0].name])
                            phase[k] = 3
                        if phase[k] == 3 and sg.collective is not None:
                            c = sg.collective
                            g = tuple(c.attrs.group)
                            n = seq.get((g, k), 0)
                            slot = slots.setdefault((g, n), {})
                            slot[k] = env[k][c.operands[0].name]
                            if any(d not in slot for d in g):
                                break
                            if "result" not in slot:
                                cp.cuda.Device().synchronize()
                                c0 = time.perf_counter()
                                vals = [slot[d] for d in g]
                                if c.name == "AllGather":
                                    slot["result"] = cp.concatenate(vals, axis=c.attrs.axis)
                                else:
                                    acc = cp.array(vals[0], copy=True)
                                    fn = {"sum": cp.add, "max": cp.maximum, "min": cp.minimum,
                                          "prod": cp.multiply}[c.attrs.op]
                                    for v in vals[1:]:
                                        acc = fn(acc, v).astype(acc.dtype, copy=False)
                                    slot["result"] = acc
                                cp.cuda.Device().synchronize()
                                for d in g:  # each member waits for the one reduction
                                    cms[d] += (time.perf_counter() - c0) * 1e3
                            env[k][c.results[0].name] = cp.array(slot["result"], copy=True)
                            seq[(g, k)] = n + 1
                        pos[k], phase[k] = pos[k] + 1, 0
                        moved = True
                if not moved:
                    raise MultiDeviceError("the CUDA stage run made no progress (a program verify_multi should "
                                           "have refused)")
            for k in range(K):
                self.stage_ms[k].append(ms[k])
                self.comm_ms[k].append(cms[k])
            for n in outs:
                outs[n].append(cp.asnumpy(env[self.mdm.source_of(n)][n]))
        return {n: v[0] if M == 1 else np.concatenate(v, axis=0) for n, v in outs.items()}


def pipeline_estimate(stage_ms: list, micro_batches: int) -> dict:
    """What K GPUs would take for a GPipe forward pass with these per-stage times (ms per
    micro-batch, one list per stage): makespan = sum of the stages + (M - 1) x the slowest one
    (communication not counted), and the bubble fraction 1 - busy / (K x makespan). An estimate
    from one-GPU stage times, not a multi-GPU measurement."""
    t = [float(np.median(s)) for s in stage_ms]
    k, m = len(t), micro_batches
    makespan = sum(t) + (m - 1) * max(t)
    return {"stage_ms": t, "sequential_ms": m * sum(t), "pipelined_ms": makespan,
            "bubble_fraction": 1.0 - m * sum(t) / (k * makespan) if makespan > 0 else 0.0,
            "speedup": m * sum(t) / makespan if makespan > 0 else 1.0}
