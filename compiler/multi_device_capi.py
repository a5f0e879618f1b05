"""The C API of a `nnc compile --devices K` directory: nnc_<name>_group_* over every device's builds.

Each device's compute segments are ordinary single-device builds with their own C API
(device<K>[/segment<I>]/nnc_model.h, prefix nnc_<name>_dev<K>[_seg<I>]_*). This module turns the
multi-device program into *step tables* that a generic host executor in the group's source
(templates/multi_device.cu.j2) walks; Python decides what each device does and in which order,
the template only how. OUT/ gains nnc_<name>_group.{h,cu}, an example runner and a CMakeLists.txt
that links every build and the group into one library.

Per device there are two streams: compute (builds, collectives, staging and output copies) and
comm (NCCL send / recv). A step names its stream; it waits (cudaStreamWaitEvent) on the events
of the earlier steps of the same device on the other stream whose buffers it reads or
overwrites (`_hazards`: read-after-write, write-after-read, write-after-write), so the comm
stream's send of micro-batch i runs beside the compute of micro-batch i + 1. Double buffering
makes that safe: with M >= 2 micro-batches every receive buffer, build output and staging buffer
has two slots (micro-batch parity) and every build two execution contexts (slot 0 the model, slot
1 a context of it), so a build's CUDA graph keeps fixed pointers per slot. Pipeline stages issue
the receive of micro-batch i + 1 before the send of micro-batch i (`_hoist_receives`).

The executor is one host thread over all devices (NCCL's single-thread multi-GPU mode: one
communicator per GPU from ncclCommInitAll): each device's cursor advances until a receive or send
whose peer has not posted the matching message, or a collective that some device has not
reached. A matched pair (in (sender, receiver) FIFO order, as NCCL pairs them) is issued as one
ncclGroupStart / ncclSend / ncclRecv / ncclGroupEnd; a collective as one group over every
member. `simulate` is the same walk in Python: compile time proves it never stalls.

Transport "copy" (the one-GPU fallback): every device on the first GPU given, a message is a
device-to-device copy on the receiver's comm stream (ordered after the sender's send point by an
event, and the sender's stream waits for the copy), an AllReduce a small kernel per member over
the members' buffers, an AllGather strided copies. It checks the tables, the builds and the
numbers on one GPU; it is not a speed measurement.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .ir.errors import NncError

# step kinds (the template's enum has the same numbers)
LOAD, RECV, RUN, SEND, ALLREDUCE, ALLGATHER, OUTPUT, STAGE = range(8)
KIND_NAMES = ("load", "recv", "run", "send", "allreduce", "allgather", "output", "stage")
COMPUTE, COMM = 0, 1
ALIGN = 256


class GroupApiError(NncError):
    """The program cannot be given a group C API (symbolic shapes, data-dependent outputs...)."""


@dataclass
class Buffer:
    device: int
    nbytes: int
    slots: int = 1          # alloc: copies, micro-batch mb uses slot mb % slots
    input: int = -1         # >= 0: the model input (whole batch); micro-batch mb at mb * nbytes / M
    what: str = ""          # for the generated comment only

    def stride(self, M: int) -> int:
        if self.input >= 0:
            return self.nbytes // M
        return -(-self.nbytes // ALIGN) * ALIGN

    def mod(self, M: int) -> int:
        return M if self.input >= 0 else self.slots


@dataclass
class GStep:
    device: int
    kind: int
    stream: int
    mb: int
    refs: list = field(default_factory=list)   # buffer ids (RECV / SEND: (buffer, peer) pairs flattened)
    build: int = -1
    n_in: int = 0
    a0: int = 0             # dtype code / output index / input index
    a1: int = 0             # reduce op
    p0: int = 0             # count / byte offset
    p1: int = 0             # outer / bytes
    p2: int = 0             # inner bytes
    waits: list = field(default_factory=list)  # global step indices (same device, other stream)
    what: str = ""

    def reads_writes(self) -> tuple[list, list]:
        r = self.refs
        if self.kind == RECV:
            return [], r[0::2]
        if self.kind == SEND:
            return r[0::2], []
        if self.kind == RUN:
            return r[:self.n_in], r[self.n_in:]
        if self.kind in (STAGE, ALLREDUCE):
            return [r[0]], [r[1]]
        if self.kind == ALLGATHER:
            return [r[0]], [x for x in r[1:] if x >= 0]
        if self.kind == OUTPUT:
            return [r[0]], []
        if self.kind == LOAD:
            return [], [r[0]]
        return [], []


@dataclass
class GroupTables:
    name: str
    devices: int
    micro_batches: int
    buffers: list
    steps: list             # global, each device's in its order
    device_steps: list      # per device: indices into steps
    builds: list            # {"api", "dir", "device", "inputs": [nbytes], "outputs": [nbytes], "slots"}
    inputs: list            # plan.json inputs
    outputs: list           # plan.json outputs (+ "device")


def _static_bytes(t, what: str) -> int:
    if t.shape is None or not all(isinstance(d, int) for d in t.shape):
        raise GroupApiError(f"{what}: {t} has symbolic dims; the group C API needs static shapes (--shapes)")
    return int(np.prod(t.shape, dtype=np.int64)) * max(t.dtype.bits, 8) // 8


def _entry_bytes(e: dict) -> int:
    """Bytes of a plan.json input / output entry (whole batch, static shape)."""
    from .ir.types import dtype
    if e.get("shape") is None or not all(isinstance(d, int) for d in e["shape"]):
        raise GroupApiError(f"{e['name']!r}: shape {e['shape']} is not static; the group C API needs --shapes")
    return int(np.prod(e["shape"], dtype=np.int64)) * max(dtype(e["dtype"]).bits, 8) // 8


def build_tables(plan: dict, mdm, segs: list, build_plans: dict) -> GroupTables:
    """plan: the multi-device plan.json; segs: segments() of every device; build_plans:
    (device, segment index) -> that build's plan.json (its C API name, inputs and outputs)."""
    from .multi_device_nccl import NCCL_DTYPES, NCCL_OPS, micro_batch_order
    K, M = mdm.num_devices, mdm.micro_batches
    slots = 2 if M >= 2 else 1
    buffers: list[Buffer] = []
    steps: list[GStep] = []
    in_index = {e["name"]: i for i, e in enumerate(plan["inputs"])}
    out_index = {e["name"]: i for i, e in enumerate(plan["outputs"])}
    builds, build_id = [], {}
    for k in range(K):
        for sg in segs[k]:
            if sg.module is None:
                continue
            bp = build_plans[(k, sg.index)]
            if any(t.get("shape_known_after_run") for t in bp["outputs"]):
                raise GroupApiError(f"device {k}: build {bp['name']} has outputs of data-dependent shape; the group "
                                    f"C API does not support them")
            names = [a.name for a in sg.module.main.args]
            if [t["name"] for t in bp["inputs"]] != names:
                raise GroupApiError(f"device {k}: build {bp['name']} takes {[t['name'] for t in bp['inputs']]}, "
                                    f"its segment {names}")
            build_id[(k, sg.index)] = len(builds)
            builds.append({"api": bp.get("c_api_prefix", f"nnc_{bp['name']}"), "device": k,
                           "dir": bp["dir"], "inputs": [_entry_bytes(t) for t in bp["inputs"]],
                           "outputs": [_entry_bytes(t) for t in bp["outputs"]],
                           "input_names": names, "output_names": [t["name"] for t in bp["outputs"]],
                           "slots": slots})

    def alloc(k, nbytes, what, n_slots=slots):
        buffers.append(Buffer(k, int(nbytes), n_slots, -1, what))
        return len(buffers) - 1

    order = micro_batch_order(plan, K, M)
    device_steps: list[list[int]] = []
    for k, m in enumerate(mdm.devices):
        mine: list[GStep] = []
        in_buf = {}
        for a in m.main.args:
            e = plan["inputs"][in_index[a.name]]
            buffers.append(Buffer(k, _entry_bytes(e), 1, in_index[a.name], f"model input {a.name}"))
            in_buf[a.name] = len(buffers) - 1
            mine.append(GStep(k, LOAD, COMPUTE, 0, [in_buf[a.name]], a0=in_index[a.name], what=f"load {a.name}"))
        persistent: dict = {}  # buffers made once per device: per (op id / build output), reused every micro-batch

        def once(key, make):
            if key not in persistent:
                persistent[key] = make()
            return persistent[key]
        outputs_here = [r.name for r in m.main.results if r.name in out_index and mdm.source_of(r.name) == k]
        for mb in order[k]:
            env = dict(in_buf)
            for sg in segs[k]:
                if sg.recvs:
                    refs = []
                    for op in sg.recvs:
                        v = op.results[0]
                        b = once(id(op), lambda: alloc(k, _static_bytes(v.type, f"device {k}: Recv {v.name}"),
                                                                f"recv {v.name} from device {op.attrs.peer}"))
                        env[v.name] = b
                        refs += [b, int(op.attrs.peer)]
                    mine.append(GStep(k, RECV, COMM, mb, refs, what=f"recv segment {sg.index}"))
                if sg.module is not None:
                    bid = build_id[(k, sg.index)]
                    bl = builds[bid]
                    ins = []
                    for n, nb in zip(bl["input_names"], bl["inputs"]):
                        src = env[n]
                        if buffers[src].input >= 0 and M > 1:  # a slice per micro-batch: staged (fixed pointers)
                            dst = once(("stage", bid, n), lambda: alloc(k, nb, f"staged {n}"))
                            mine.append(GStep(k, STAGE, COMPUTE, mb, [src, dst], p1=nb, what=f"stage {n}"))
                            src = dst
                        ins.append(src)
                    outs = []
                    for n, nb in zip(bl["output_names"], bl["outputs"]):
                        b = once(("out", bid, n), lambda: alloc(k, nb, f"build {bid} output {n}"))
                        env[n] = b
                        outs.append(b)
                    mine.append(GStep(k, RUN, COMPUTE, mb, ins + outs, build=bid, n_in=len(ins),
                                      what=f"run {bl['api']}"))
                if sg.sends:
                    refs = []
                    for op in sg.sends:
                        refs += [env[op.operands[0].name], int(op.attrs.peer)]
                    mine.append(GStep(k, SEND, COMM, mb, refs, what=f"send segment {sg.index}"))
                c = sg.collective
                if c is not None:
                    if tuple(c.attrs.group) != tuple(range(K)):
                        raise GroupApiError(f"device {k}: {c.name} over {list(c.attrs.group)}: only collectives over "
                                            f"every device are supported")
                    x, t = c.operands[0].type, c.results[0].type
                    dt = x.dtype.np_name
                    if dt not in NCCL_DTYPES:
                        raise GroupApiError(f"device {k}: {c.name} of {x}: NCCL has no {dt} type")
                    src = env[c.operands[0].name]
                    xb = _static_bytes(x, f"device {k}: {c.name}")
                    rb = _static_bytes(t, f"device {k}: {c.name} result")
                    count = int(np.prod(x.shape, dtype=np.int64))
                    if c.name == "AllReduce":
                        dst = once(id(c), lambda: alloc(k, rb, f"all-reduce {c.results[0].name}", 1))
                        mine.append(GStep(k, ALLREDUCE, COMPUTE, mb, [src, dst], a0=NCCL_DTYPES[dt],
                                          a1=NCCL_OPS[c.attrs.op], p0=count, what=f"all-reduce {c.results[0].name}"))
                    else:
                        axis = c.attrs.axis % len(t.shape)
                        outer = int(np.prod(x.shape[:axis], dtype=np.int64))
                        gather = once(id(c), lambda: alloc(k, rb, f"all-gather {c.results[0].name}", 1))
                        dst = gather
                        if outer > 1:
                            dst = once(("cat", id(c)), lambda: alloc(k, rb, f"concat {c.results[0].name}", 1))
                        mine.append(GStep(k, ALLGATHER, COMPUTE, mb, [src, gather, dst if outer > 1 else -1],
                                          a0=NCCL_DTYPES[dt], p0=count, p1=outer, p2=xb // max(outer, 1),
                                          what=f"all-gather {c.results[0].name} axis {axis}"))
                    env[c.results[0].name] = dst
            for n in outputs_here:
                e = plan["outputs"][out_index[n]]
                per = _entry_bytes(e) // M
                mine.append(GStep(k, OUTPUT, COMPUTE, mb, [env[n]], a0=out_index[n], p0=mb * per, p1=per,
                                  what=f"output {n}"))
        if len(segs[k]) == 1 and M > 1:
            mine = _hoist_receives(mine)
        base = len(steps)
        steps += mine
        device_steps.append(list(range(base, base + len(mine))))
    tables = GroupTables(plan["name"], K, M, buffers, steps, device_steps, builds,
                         [{**e, "nbytes": _entry_bytes(e)} for e in plan["inputs"]],
                         [{**e, "nbytes": _entry_bytes(e), "device": mdm.source_of(e["name"])} for e in plan["outputs"]])
    _hazards(tables)
    simulate(tables)
    check_races(tables)
    return tables


def _hoist_receives(steps: list) -> list:
    """A pipeline stage's receive of micro-batch i + 1 moves before its send of micro-batch i, so
    the comm stream has it posted while the stage computes i (the send then overlaps i + 1's
    compute). Only output copies (compute stream) lie between the two; nothing else moves."""
    out = list(steps)
    i = 0
    while i < len(out):
        if out[i].kind == SEND:
            j = i + 1
            while j < len(out) and out[j].kind not in (RECV, RUN, SEND):
                j += 1
            if j < len(out) and out[j].kind == RECV and out[j].mb != out[i].mb:
                out.insert(i, out.pop(j))
                i += 1
        i += 1
    return out


def _hazards(t: GroupTables) -> None:
    """Each step's cross-stream waits: per (buffer, slot), the last writer and the readers since,
    on the device's other stream (read after write, write after read, write after write)."""
    M = t.micro_batches

    def slot(b, mb):  # a model input's whole-batch buffer is one piece (LOAD writes all of it)
        buf = t.buffers[b]
        return (b, 0) if buf.input >= 0 else (b, mb % buf.mod(M))
    for k, idx in enumerate(t.device_steps):
        last_w: dict = {}
        readers: dict = {}
        for gi in idx:
            st = t.steps[gi]
            rd, wr = st.reads_writes()
            waits = set()
            for b in rd:
                key = slot(b, st.mb)
                w = last_w.get(key)
                if w is not None and t.steps[w].stream != st.stream:
                    waits.add(w)
            for b in wr:
                key = slot(b, st.mb)
                w = last_w.get(key)
                if w is not None and t.steps[w].stream != st.stream:
                    waits.add(w)
                waits |= {r for r in readers.get(key, ()) if t.steps[r].stream != st.stream}
            for b in rd:
                readers.setdefault(slot(b, st.mb), []).append(gi)
            for b in wr:
                key = slot(b, st.mb)
                last_w[key] = gi
                readers[key] = []
            st.waits = sorted(waits)


def simulate(t: GroupTables) -> list:
    """The executor's walk (templates/multi_device.cu.j2, run_group) without data: each device's
    cursor, messages paired per (sender, receiver) in FIFO order, a collective once every device
    has reached it. Returns the order in which steps complete ([(device, step index)]); a walk that
    stalls is a GroupApiError naming what every device waits for."""
    K = t.devices
    pos = [0] * K
    posted = [False] * K          # the current comm step's messages are in the queues
    left = [0] * K                # its messages not yet paired
    sendq: dict = {}
    recvq: dict = {}
    coll_waiting: list = [None] * K
    done = []

    def pair(s, r):
        while sendq.get((s, r)) and recvq.get((s, r)):
            a, b = sendq[(s, r)].pop(0), recvq[(s, r)].pop(0)
            left[a] -= 1
            left[b] -= 1

    while any(pos[k] < len(t.device_steps[k]) for k in range(K)):
        moved = False
        for k in range(K):
            while pos[k] < len(t.device_steps[k]):
                st = t.steps[t.device_steps[k][pos[k]]]
                if st.kind in (RECV, SEND):
                    if not posted[k]:
                        posted[k] = True
                        left[k] = len(st.refs) // 2
                        for peer in st.refs[1::2]:
                            q = sendq if st.kind == SEND else recvq
                            key = (k, peer) if st.kind == SEND else (peer, k)
                            q.setdefault(key, []).append(k)
                            pair(*key)
                        moved = True
                    if left[k]:
                        break
                    posted[k] = False
                elif st.kind in (ALLREDUCE, ALLGATHER):
                    coll_waiting[k] = st
                    if any(coll_waiting[d] is None for d in range(K)):
                        break
                    for d in range(K):  # everyone at a collective: it is issued, they all move on
                        coll_waiting[d] = None
                        done.append((d, pos[d]))
                        pos[d] += 1
                    moved = True
                    continue
                done.append((k, pos[k]))
                pos[k] += 1
                moved = True
        if not moved:
            why = []
            for k in range(K):
                if pos[k] < len(t.device_steps[k]):
                    st = t.steps[t.device_steps[k][pos[k]]]
                    why.append(f"device {k} at {KIND_NAMES[st.kind]} of micro-batch {st.mb} ({st.what})")
            raise GroupApiError("the group executor would stall: " + "; ".join(why))
    return done


def check_races(t: GroupTables) -> None:
    """Proves the waits complete: every two steps of a run that touch the same (buffer, slot),
    one of them writing, are ordered by happens-before on the GPUs. Edges: program order on each
    (device, stream); each step's waits; a send before its matched receive (only that way: NCCL
    may finish a small send before the receive is posted); a collective is one node over its
    members (none finishes before all have contributed). Message pairs and collectives come from `simulate`'s matching (FIFO per (sender,
    receiver), collectives in order). A race is a GroupApiError (a bug in the tables, not in the
    model)."""
    n = len(t.steps)
    node = list(range(n))

    def find(a):
        while node[a] != a:
            node[a] = node[node[a]]
            a = node[a]
        return a

    def union(a, b):
        node[find(a)] = find(b)
    sendq: dict = {}
    recvq: dict = {}
    for k, ix in enumerate(t.device_steps):  # messages: the i-th send (s -> r) pairs with the i-th recv
        for gi in ix:
            st = t.steps[gi]
            if st.kind in (SEND, RECV):
                for peer in st.refs[1::2]:
                    key = (k, peer) if st.kind == SEND else (peer, k)
                    (sendq if st.kind == SEND else recvq).setdefault(key, []).append(gi)
    pairs = [(a, b) for key, sends in sendq.items() for a, b in zip(sends, recvq.get(key, []))]
    colls = [[gi for gi in ix if t.steps[gi].kind in (ALLREDUCE, ALLGATHER)] for ix in t.device_steps]
    for members in zip(*colls):
        for gi in members[1:]:
            union(gi, members[0])
    succ: dict = {}

    def edge(a, b):
        a, b = find(a), find(b)
        if a != b:
            succ.setdefault(a, set()).add(b)
    for ix in t.device_steps:
        last = {}
        for gi in ix:
            st = t.steps[gi]
            if st.stream in last:
                edge(last[st.stream], gi)
            last[st.stream] = gi
            for w in st.waits:
                edge(w, gi)
    for a, b in pairs:  # what precedes a send precedes what follows its receive (not the other way:
        edge(a, b)      # NCCL may finish a small send before the receive is posted)
    roots = sorted({find(i) for i in range(n)})
    reach: dict = {}

    def reachable(a):  # nodes reachable from a (a DAG: memoised DFS)
        if a in reach:
            return reach[a]
        reach[a] = set()  # a cycle would show as a missing order, not a hang
        out = set()
        for b in succ.get(a, ()):
            out |= {b} | reachable(b)
        reach[a] = out
        return out
    for r in roots:
        reachable(r)
    M = t.micro_batches
    touches: dict = {}  # (buffer, slot) -> [(step, writes)]
    for gi, st in enumerate(t.steps):
        rd, wr = st.reads_writes()
        for b, w in [(b, False) for b in rd] + [(b, True) for b in wr]:
            buf = t.buffers[b]
            slot = 0 if buf.input >= 0 else st.mb % buf.mod(M)
            touches.setdefault((b, slot), []).append((gi, w))
    for (b, slot), acc in touches.items():
        for i, (x, wx) in enumerate(acc):
            for y, wy in acc[i + 1:]:
                if not (wx or wy) or x == y:
                    continue
                fx, fy = find(x), find(y)
                if fx == fy or fy in reach.get(fx, ()) or fx in reach.get(fy, ()):
                    continue
                sx, sy = t.steps[x], t.steps[y]
                raise GroupApiError(f"the group tables race on buffer {b} ({t.buffers[b].what}) slot {slot}: step {x} "
                                    f"({KIND_NAMES[sx.kind]} of micro-batch {sx.mb}, device {sx.device}) and step {y} "
                                    f"({KIND_NAMES[sy.kind]} of micro-batch {sy.mb}, device {sy.device}) are not ordered")


# ---------------------------------------------------------------- rendering

def render_group(tables: GroupTables, arch: str) -> dict:
    """{file name in OUT: text}: nnc_<name>_group.h, nnc_<name>_group.cu, nnc_group_example.cpp,
    CMakeLists.txt (one library: every build's model.cu plus the group)."""
    from .codegen.render import render
    name = tables.name
    M = tables.micro_batches
    header, source = f"nnc_{name}_group.h", f"nnc_{name}_group.cu"
    bufs = [{"device": b.device, "nbytes": b.nbytes, "slots": b.slots, "input": b.input, "stride": b.stride(M),
             "mod": b.mod(M), "what": b.what} for b in tables.buffers]
    refs, waits, steps = [], [], []
    for st in tables.steps:
        steps.append({"device": st.device, "kind": st.kind, "stream": st.stream, "mb": st.mb, "build": st.build,
                      "n_in": st.n_in, "a0": st.a0, "a1": st.a1, "p0": st.p0, "p1": st.p1, "p2": st.p2,
                      "ref_first": len(refs), "ref_n": len(st.refs), "wait_first": len(waits),
                      "wait_n": len(st.waits), "what": st.what, "kind_name": KIND_NAMES[st.kind]})
        refs += st.refs
        waits += st.waits
    common = dict(model_name=name, api=f"nnc_{name}", header=header, source=source, devices=tables.devices,
                  micro_batches=M, buffers=bufs, steps=steps, refs=refs, waits=waits, builds=tables.builds,
                  inputs=tables.inputs, outputs=tables.outputs,
                  device_first=[ix[0] if ix else 0 for ix in tables.device_steps],
                  device_count=[len(ix) for ix in tables.device_steps])
    return {header: str(render("multi_device.h.j2", **common)),
            source: str(render("multi_device.cu.j2", **common)),
            "nnc_group_example.cpp": str(render("multi_device_example.cpp.j2", **common)),
            "CMakeLists.txt": str(render("multi_device.CMakeLists.txt.j2", target=f"nnc_{name}_group",
                                         arch_num=str(arch).replace("sm_", ""), **common))}


def tables_for_dir(out) -> GroupTables:
    """The step tables of a `nnc compile --devices K` directory (with or without codegen), as
    write_group_api made them: for tests and tools."""
    import json
    from pathlib import Path
    from .multi_device import load_multi, segments
    out = Path(out)
    plan = json.loads((out / "plan.json").read_text())
    mdm = load_multi(out / "ir")
    segs = [segments(m) for m in mdm.devices]
    build_plans = {}
    for k, ss in enumerate(segs):
        for sg, rel in zip([s_ for s_ in ss if s_.module is not None], plan["device_builds"][k]):
            build_plans[(k, sg.index)] = {**json.loads((out / rel / "plan.json").read_text()), "dir": rel}
    return build_tables(plan, mdm, segs, build_plans)


def write_group_api(out_dir, plan: dict, mdm, build_plans: dict) -> dict:
    """Renders the group C API into out_dir (the staged OUT); returns plan.json's "c_api" entry."""
    from pathlib import Path
    from .multi_device import segments
    segs = [segments(m) for m in mdm.devices]
    tables = build_tables(plan, mdm, segs, build_plans)
    files = render_group(tables, plan["arch"])
    for fname, text in files.items():
        (Path(out_dir) / fname).write_text(text)
    return {"prefix": f"nnc_{plan['name']}_group", "files": sorted(files), "steps": len(tables.steps),
            "buffers": len(tables.buffers)}
