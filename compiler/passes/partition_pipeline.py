"""Pipeline partitioning: one Module -> a K-device MultiDeviceModule of contiguous stages.

Rewrites: the top-level ops of @main (in program order) are cut into K contiguous, non-empty
stages; stage k becomes device k's @main. A value computed in stage i and read in a later stage j
is sent *directly* from i to every j that reads it (a `Send` right after the op that computes it,
a `Recv` at the start of j: no forwarding through the stages between, so a skip connection
costs one message). Each stage receives, in tag order, before it computes; tags follow the
program order of the values, so every device meets its messages in increasing tag order and
sends that complete only when received (NCCL's) cannot deadlock (verify_multi's dry run checks). The Recv
keeps the value's name, so a value has the same name on every device; the Send's token is
`%<name>.sent`, returned after the stage's outputs. Every sent value has its own tag (its index in
the order the sends appear), so messages never pair up wrongly. Model inputs go straight to every
stage that reads them (function arguments of those devices; an input nobody reads stays on
device 0), each model output is returned by the stage that computes it (`output_device`).
`const` ops are not cut: each stage gets its own copy of the constants it reads (and of their
weights), so no weights travel.

Balance: minimise the costliest stage, a stage's cost being the sum of its ops' costs plus the
time to send what crosses its end. An op's cost is its measured time when `measured` names it
(result name -> s, from a plan.json's launches tuned on the GPU: `measured_times`; a fused
group split into several kernels sums its launches, which name the ops of its body), else an
estimate from FLOPs and bytes (`op_cost`): max(flops / peak, bytes / bandwidth) with peak and
bandwidth of an H100-class part, a relative measure only. Exact minimax over contiguous cuts
(dynamic programming, O(K n^2) with numpy over the inner loop).

Requires: a verified module whose @main ops are in program order; no op with a region that reads
values of the enclosing function (the CUDA pipeline has inlined If/Loop by then; `fused` bodies
are closed); 1 <= K <= the number of non-const ops. Errors otherwise are NncErrors that say which.
The input module is consumed (its ops move into the stages).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from nnc.ir.errors import NncError
from nnc.ir.graph import Function, Module, NameGen, Op, Value
from nnc.ir.ops.comm import RecvAttrs, SendAttrs, TOKEN
from nnc.ir.rewrite import used_values
from nnc.ir.weights import WeightStore
from nnc.multi_device import MultiDeviceModule

# An H100-class part, for estimates only (ratios matter, not the values): dense tensor-core and
# SIMT throughput, HBM bandwidth and the NVLink bandwidth one Send crosses.
PEAK_FLOPS = {"float16": 400e12, "bfloat16": 400e12, "float32": 50e12}
PEAK_FLOPS_DEFAULT = 50e12
HBM_BYTES_S = 3.0e12
LINK_BYTES_S = 150e9
LAUNCH_S = 3e-6  # a kernel launch's fixed cost: keeps near-empty ops from costing nothing


def _numel(t) -> int:
    """Static element count; a symbolic dim counts 1 (an estimate, for ratios)."""
    if t is None or t.shape is None:
        return 1
    n = 1
    for d in t.shape:
        n *= d if isinstance(d, int) else 1
    return n


def _bytes(t) -> int:
    if t is None:
        return 0
    return _numel(t) * max(t.dtype.bits, 8) // 8


def op_flops(op: Op) -> int:
    """Multiply-adds x 2 for MatMul / Gemm / Conv (and inside fused bodies), one per result
    element otherwise."""
    if op.name == "fused":
        return sum(op_flops(o) for o in op.attrs.body.ops)
    if op.name == "const":
        return 0
    out = sum(_numel(r.type) for r in op.results)
    x = op.operands[0] if op.operands else None
    if op.name in ("MatMul", "MatMulInteger", "Gemm") and x is not None and x.type.shape:
        k = x.type.shape[0 if getattr(op.attrs, "transA", 0) else -1]
        return 2 * out * (k if isinstance(k, int) else 1)
    if op.name in ("Conv", "ConvInteger", "QLinearConv", "ConvTranspose") and len(op.operands) > 1:
        w = op.operands[3 if op.name == "QLinearConv" else 1]
        if w is not None and w.type.shape:  # [OC, IC/g, k...]: IC/g x k... multiply-adds per output
            oc = w.type.shape[0] if isinstance(w.type.shape[0], int) and w.type.shape[0] > 0 else 1
            return 2 * out * max(_numel(w.type) // oc, 1)
    return out


def op_cost(op: Op) -> float:
    """Estimated seconds of one op (see the module docstring)."""
    if op.name == "const":
        return 0.0
    nbytes = sum(_bytes(v.type) for v in op.operands if v is not None) + sum(_bytes(r.type) for r in op.results)
    dt = op.results[0].type.dtype.np_name if op.results else "float32"
    return LAUNCH_S + max(op_flops(op) / PEAK_FLOPS.get(dt, PEAK_FLOPS_DEFAULT), nbytes / HBM_BYTES_S)


def measured_times(plan_path) -> dict[str, float]:
    """result name -> seconds, from a plan.json whose launches were tuned on a GPU (each launch's
    "op" names its IR op, "tuning"'s "time_ms" its measured time). Launches of one op add up."""
    p = Path(plan_path)
    try:
        plan = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise NncError(f"{p}: cannot read measured times ({e})") from None
    out: dict[str, float] = {}
    for launch in plan.get("launches", []) if isinstance(plan, dict) else []:
        t = (launch.get("tuning") or {}).get("time_ms") if isinstance(launch, dict) else None
        op = launch.get("op") if isinstance(launch, dict) else None
        if not isinstance(t, (int, float)) or not isinstance(op, str) or not op.startswith("%"):
            continue
        name = op[1:].split(":", 1)[0].strip().strip('"')
        out[name] = out.get(name, 0.0) + float(t) * 1e-3
    return out


def _launch_names(op: Op) -> set[str]:
    """The names a launch of this op may carry in plan.json: its results and, for a fused group
    lowered as several kernels, those of the ops in its body."""
    names = {r.name for r in op.results}
    for _, r in op.regions():
        names |= {x.name for o in r.walk() for x in o.results}
    return names


def _outer_reads(op: Op) -> set[int]:
    """id() of values read inside op's regions that the regions do not define."""
    out: set[int] = set()
    for _, r in op.regions():
        inner = {id(a) for a in r.args}
        for o in r.walk():
            inner |= {id(x) for x in o.results}
            for _, s in o.regions():
                inner |= {id(a) for a in s.args}
        out |= used_values(r) - inner
    return out


def balanced_cuts(costs: list, cut_costs: list, k: int) -> list[int]:
    """Start indices of stages 1..k-1 minimising the costliest stage. costs[i]: op i's cost;
    cut_costs[j]: the cost of a cut before op j (what crosses it, added to the stage that ends
    there). Exact: dp over (stage, end)."""
    n = len(costs)
    pre = np.concatenate([[0.0], np.cumsum(costs)])
    cut = np.asarray(list(cut_costs) + [0.0], dtype=float)  # cut[n]: the end of the graph, free
    inf = float("inf")
    best = np.full((k + 1, n + 1), inf)
    arg = np.zeros((k + 1, n + 1), dtype=int)
    best[0, 0] = 0.0
    for s in range(1, k + 1):
        for j in range(s, n - (k - s) + 1):
            i = np.arange(s - 1, j)  # the previous stage ends at i, this one is ops [i, j)
            cand = np.maximum(best[s - 1, i], pre[j] - pre[i] + cut[j])
            m = int(np.argmin(cand))
            best[s, j], arg[s, j] = cand[m], i[m]
    cuts, j = [], n
    for s in range(k, 0, -1):
        j = int(arg[s, j])
        cuts.append(j)
    cuts = cuts[::-1][1:]  # drop stage 0's start (0)
    return cuts


def partition(module: Module, k: int, measured: Optional[dict] = None, micro_batches: int = 1) -> MultiDeviceModule:
    """Cuts module's @main into k pipeline stages (see the module docstring)."""
    if not isinstance(k, int) or k < 1:
        raise NncError(f"--devices {k}: a pipeline needs at least one device")
    f = module.main
    if len(module.functions) > 1:
        raise NncError("pipeline partitioning takes a module of one function")
    work = [op for op in f.ops if op.name != "const"]
    if k > len(work):
        raise NncError(f"--devices {k}: the graph has only {len(work)} ops to place (each stage needs one); "
                       f"use at most {len(work)} devices")
    if any(op.name in ("Send", "Recv", "AllReduce", "AllGather") for op in f.ops):
        raise NncError("the module already holds communication ops; partition a single-device module")
    measured = measured or {}

    def cost(op):
        t = [measured[n] for n in _launch_names(op) if n in measured]
        return sum(t) if t else op_cost(op)
    costs = [cost(op) for op in work]
    # bytes crossing a cut before work[j]: values defined before j and read at or after j
    last_use: dict[int, int] = {}
    defined_at: dict[int, int] = {}
    for i, op in enumerate(work):
        for r in op.results:
            defined_at[id(r)] = i
    for i, op in enumerate(work):
        for vid in {id(v) for v in op.operands if v is not None} | _outer_reads(op):
            if vid in defined_at:
                last_use[vid] = max(last_use.get(vid, -1), i)
    for v in f.results:
        if id(v) in defined_at:
            last_use[id(v)] = max(last_use.get(id(v), -1), defined_at[id(v)])
    delta = np.zeros(len(work) + 1)
    sizes = {id(r): _bytes(r.type) for op in work for r in op.results}
    for vid, lu in last_use.items():
        d = defined_at[vid]
        if lu > d:  # live on the cuts before d+1 .. lu
            delta[d + 1] += sizes[vid]
            delta[lu + 1] -= sizes[vid]
    crossing = np.cumsum(delta)[: len(work)]
    cut_costs = [float(b) / LINK_BYTES_S for b in crossing]
    cuts = balanced_cuts(costs, cut_costs, k) if k > 1 else []
    bounds = [0] + cuts + [len(work)]
    stage_of = {}
    for s in range(k):
        for op in work[bounds[s]:bounds[s + 1]]:
            stage_of[id(op)] = s
    mdm = _build(module, work, stage_of, k)
    mdm.micro_batches = micro_batches
    mdm.plan = {"stages": [{"device": s, "ops": bounds[s + 1] - bounds[s],
                            "first_op": _label(work[bounds[s]]), "last_op": _label(work[bounds[s + 1] - 1]),
                            "cost_ms": float(sum(costs[bounds[s]:bounds[s + 1]])) * 1e3,
                            "measured_ops": sum(any(n in measured for n in _launch_names(op))
                                                for op in work[bounds[s]:bounds[s + 1]])}
                           for s in range(k)],
                "cuts": [{"before_op": _label(work[c]), "bytes": int(crossing[c])} for c in cuts],
                "cost_model": "measured (plan.json launches)" if measured else "estimate (flops, bytes)"}
    return mdm


def _label(op: Op) -> str:
    return f"%{op.results[0].name} = {op.name}" + (f" ({op.loc.node})" if op.loc.node else "")


def _build(module: Module, work: list, stage_of: dict, k: int) -> MultiDeviceModule:
    f = module.main
    consts = {id(op.results[0]): op for op in f.ops if op.name == "const"}
    args = {id(a): a for a in f.args}
    producer_stage = {id(r): stage_of[id(op)] for op in work for r in op.results}
    # for every value read in a later stage: the stages that read it
    readers: dict[int, list[int]] = {}
    for op in work:
        s = stage_of[id(op)]
        reads = {id(v) for v in op.operands if v is not None}
        outer = _outer_reads(op)
        for vid in outer:
            if vid in producer_stage and producer_stage[vid] != s or vid in consts:
                raise NncError(f"{op.loc}: {op.name} has a region reading a value computed outside it; "
                               f"pipeline partitioning needs closed regions (inline If/Loop first)")
        for vid in reads | outer:
            if vid in producer_stage and producer_stage[vid] != s and s not in readers.setdefault(vid, []):
                readers[vid].append(s)
    stages_ops: list[list[Op]] = [[] for _ in range(k)]
    stage_vals: list[dict] = [dict() for _ in range(k)]  # id(original value) -> value in stage
    names = [NameGen(_all_names(f)) for _ in range(k)]
    tokens: list[list[Value]] = [[] for _ in range(k)]
    stage_args: list[list] = [[] for _ in range(k)]
    weights = [WeightStore() for _ in range(k)]
    tag = [0]

    def local(s: int, v: Value, at: list) -> Value:
        vid = id(v)
        if vid in stage_vals[s]:
            return stage_vals[s][vid]
        if vid in args:  # a model input: an argument of this stage too
            stage_vals[s][vid] = v
            stage_args[s].append(v)
            return v
        if vid in consts:
            c = consts[vid]
            nv = Value(v.name, v.type)
            at.append(Op("const", [], [nv], c.attrs, c.loc))
            if c.attrs.weight is not None and module.weights is not None and c.attrs.weight in module.weights:
                weights[s][c.attrs.weight] = module.weights[c.attrs.weight]
            stage_vals[s][vid] = nv
            return nv
        src = producer_stage[vid]
        nv = Value(v.name, v.type)
        shape = tuple(d if isinstance(d, int) else -1 for d in v.type.shape)
        at.append(Op("Recv", [], [nv], RecvAttrs(device=s, peer=src, shape=shape, dtype=v.type.dtype,
                                                 tag=message_tags[(vid, s)]), v.producer.loc))
        stage_vals[s][vid] = nv
        return nv

    message_tags: dict[tuple, int] = {}
    for op in work:  # tags in program order of the sends
        for r in op.results:
            for s in readers.get(id(r), []):
                message_tags[(id(r), s)] = tag[0]
                tag[0] += 1
    # every stage first receives all it reads from earlier stages, in tag order: each device then
    # meets its messages in increasing tag order (receives, then its own sends: all larger), so
    # sends that complete only when received (NCCL) cannot deadlock
    value_of = {id(r): r for op in work for r in op.results}
    for (vid, dst), t in sorted(message_tags.items(), key=lambda e: e[1]):
        local(dst, value_of[vid], stages_ops[dst])
    for op in work:
        s = stage_of[id(op)]
        if any(r.type.shape is None for r in op.results if id(r) in readers):
            raise NncError(f"{op.loc}: {op.name} gives a value of unknown rank that another stage reads; "
                           f"it cannot be sent")
        pre: list[Op] = []
        operands = [None if v is None else local(s, v, pre) for v in op.operands]
        stages_ops[s] += pre
        moved = Op(op.name, operands, op.results, op.attrs, op.loc)
        stages_ops[s].append(moved)
        for r in op.results:
            stage_vals[s][id(r)] = r
            for dst in readers.get(id(r), []):
                tok = Value(names[s](f"{r.name}.sent"), TOKEN)
                attrs = SendAttrs(device=s, peer=dst, tag=message_tags[(id(r), dst)])
                stages_ops[s].append(Op("Send", [r], [tok], attrs, op.loc))
                tokens[s].append(tok)
    # model outputs: returned by the stage that computes them (inputs / constants: device 0 / last)
    results: list[list[Value]] = [[] for _ in range(k)]
    output_device = {}
    for v in f.results:
        vid = id(v)
        s = producer_stage.get(vid, 0 if vid in args else k - 1)
        pre = []
        lv = local(s, v, pre)
        stages_ops[s] += pre
        results[s].append(lv)
        output_device[v.name] = s
    for a in f.args:  # an input no stage reads stays on device 0, so the model's inputs stay whole
        if not any(a is x for st in stage_args for x in st):
            stage_args[0].append(a)
    devices = []
    for s in range(k):
        ordered_args = [a for a in f.args if any(a is x for x in stage_args[s])]
        fn = Function(ordered_args, stages_ops[s], results[s] + tokens[s], name=f.name)
        m = Module([fn], weights[s], module.loc_file)
        devices.append(m)
    return MultiDeviceModule(devices, "pipeline", 1, output_device)


def _all_names(f: Function) -> set[str]:
    out = {a.name for a in f.args}
    for op in f.walk():
        out |= {r.name for r in op.results}
    return out


def gpipe_schedule(k: int, m: int) -> dict:
    """The forward GPipe schedule of m micro-batches over k stages: stage s runs micro-batch i in
    slot s + i (k + m - 1 slots); the bubble fraction is (k - 1) / (k + m - 1) of each stage's time
    with equal stage times."""
    slots = [[{"device": s, "micro_batch": t - s} for s in range(k) if 0 <= t - s < m] for t in range(k + m - 1)]
    return {"kind": "gpipe-forward", "micro_batches": m, "slots": slots,
            "bubble_fraction": (k - 1) / (k + m - 1)}
