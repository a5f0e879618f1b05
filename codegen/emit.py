"""Writes a compiled model directory:

    model.cu        all kernels (NVRTC-compilable) + host launch code implementing the C API
    nnc_model.h     the C API
    CMakeLists.txt  shared library + nnc_run_example
    nnc_run_example.cpp
    weights.bin     pre-transformed weights (sha256 in plan.json)
    model.cubin     the kernels compiled for `arch` (what the Python runtime loads)
    plan.json       the contract (inputs, outputs, kernels, launches, buffers, memory, ...)
    ir/final.nnir   the IR that was lowered (+ ir/final.weights.{bin,json})
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np

from ..ir.graph import Module
from ..ir.printer import print_module
from ..progress import stage
from . import cuda
from .lower import Buffer, Plan, Scalar, lower
from .render import render

PLAN_VERSION = 1


def _region(plan: Plan, b: Buffer) -> tuple[str, int, int]:
    """(region, io index, byte offset) where a buffer lives."""
    r = plan.root(b)
    off = b.alias_offset if b.alias_of is not None else 0
    if r.kind == "input":
        return "input", r.io_index, off
    if r.kind == "output":
        return "output", r.io_index, off
    if r.kind in ("weight", "const"):
        return "weights", -1, r.offset + off
    return "arena", -1, r.offset + off


def _arg(plan: Plan, a) -> dict:
    if isinstance(a, Scalar):
        return {"kind": "scalar", "ctype": a.type, "value": a.value}
    region, index, off = _region(plan, a)
    return {"kind": "buf", "buf": a.id, "ctype": a.ctype, "region": region, "index": index, "offset": off}


def _io(plan: Plan, b: Buffer) -> dict:
    d = {"name": b.name, "dtype": b.dtype.np_name, "shape": list(b.shape), "buffer": b.id, "nbytes": b.nbytes}
    if b.dynamic:
        info = plan.dynamic.get(b.id) or next((v for k, v in plan.dynamic.items()
                                                if plan.buffers[k] is plan.root(b)), None)
        src = next((l.args[1] for l in plan.launches if l.kind == "memcpy" and l.args[0] is b), None)
        if info is None and src is not None:
            info = plan.dynamic.get(plan.root(src).id)
        d["shape_known_after_run"] = True
        d["max_shape"] = list(b.shape)
        d["dynamic_axis"] = info["axis"] if info else -1
        d["count_buffer"] = info["count_buffer"] if info else -1
    return d


def weights_blob(plan: Plan) -> bytes:
    buf = bytearray(plan.weights_bytes)
    for b in plan.buffers:
        if b.kind in ("weight", "const") and b.alias_of is None and b.data is not None and b.offset >= 0:
            used = any(isinstance(a, Buffer) and plan.root(a) is b for l in plan.launches for a in l.args)
            if not used:
                continue
            raw = np.ascontiguousarray(b.data).astype(b.dtype.np, copy=False).tobytes()
            buf[b.offset:b.offset + len(raw)] = raw
    return bytes(buf)


def plan_to_json(plan: Plan, *, arch: str, precision: str, tf32: bool, passes, weights_sha: str,
                 source_sha: str, backend: str) -> dict:
    outputs = [_io(plan, b) for b in plan.outputs]
    # readback launches name the output they size
    launches = []
    for l in plan.launches:
        d = {"kind": l.kind, "kernel": l.kernel, "grid": list(l.grid), "block": list(l.block), "smem": l.smem,
             "args": [{"buf": a.id} if isinstance(a, Buffer) else {"type": a.type, "value": a.value} for a in l.args],
             "op": l.op}
        if l.kind != "kernel":
            d["nbytes"] = l.nbytes
        if l.kind == "readback":
            d["output_index"] = _readback_output(plan, l)
        launches.append(d)
    buffers = []
    for b in plan.buffers:
        region, index, off = _region(plan, b)
        buffers.append({"id": b.id, "name": b.name, "dtype": b.dtype.np_name, "shape": list(b.shape),
                        "nbytes": b.nbytes, "kind": b.kind, "region": region, "index": index, "offset": off,
                        "alias_of": b.alias_of, "dynamic": b.dynamic})
    return {
        "version": PLAN_VERSION,
        "arch": arch,
        "precision": precision,
        "tf32": bool(tf32),
        "backend": backend,
        "inputs": [_io(plan, b) for b in plan.inputs],
        "outputs": outputs,
        "passes": list(passes or []),
        "kernels": [{"name": k.name, "ops": k.ops, "template": k.template, "params": k.params}
                    for k in plan.kernels.values()],
        "launches": launches,
        "buffers": buffers,
        "memory": dict(plan.memory),
        "weights_file": "weights.bin",
        "weights_bytes": plan.weights_bytes,
        "weights_sha256": weights_sha,
        "cubin_file": "model.cubin",
        "source_sha256": source_sha,
    }


def _readback_output(plan: Plan, l) -> int:
    target = plan.root(l.args[1])
    for i, o in enumerate(plan.outputs):
        if plan.root(o) is target:
            return i
    for m in plan.launches:  # copied out to an output later
        if m.kind == "memcpy" and plan.root(m.args[1]) is target and plan.root(m.args[0]).kind == "output":
            return plan.root(m.args[0]).io_index
    return len(plan.outputs)  # not an output: the extent slot past the end


def render_sources(plan: Plan, module_name: str, arch: str, precision: str) -> dict[str, str]:
    jplan_launches = []
    for l in plan.launches:
        d = {"kind": l.kind, "kernel": l.kernel, "grid": list(l.grid), "block": list(l.block), "smem": l.smem,
             "args": [_arg(plan, a) for a in l.args], "op": l.op.replace("\n", " "), "nbytes": l.nbytes}
        if l.kind == "readback":
            d["output_index"] = _readback_output(plan, l)
        jplan_launches.append(d)
    ios = lambda bs: [dict(_io(plan, b), max_shape=list(b.shape), max_nbytes=b.nbytes,
                           dynamic_axis=_io(plan, b).get("dynamic_axis", -1)) for b in bs]
    inputs, outputs = ios(plan.inputs), ios(plan.outputs)
    common = dict(model_name=module_name, arch=arch, precision=precision, memory=plan.memory,
                  inputs=inputs, outputs=outputs)
    host = render("host.cu.j2", launches=jplan_launches, **common)
    kernels_src = render("model.cu.j2", prelude=render("prelude.cu.j2"), kernels=list(plan.kernels.values()),
                         launches=jplan_launches, host=host, **common)
    return {
        "model.cu": kernels_src,
        "nnc_model.h": render("nnc_model.h.j2", **common),
        "CMakeLists.txt": render("CMakeLists.txt.j2", arch_num=arch.replace("sm_", ""), **common),
        "nnc_run_example.cpp": render("nnc_run_example.cpp.j2", **common),
    }


def compile_to_dir(module: Module, out_dir, arch: Optional[str] = None, precision: str = "fp32",
                   tf32: bool = False, backend: str = "nvrtc", passes=None, name: str = "model",
                   base_plan: Optional[dict] = None) -> dict:
    """Lowers `module` (static shapes), writes the model directory and returns the plan dict
    (JSON-ready). `base_plan`: fields of the caller's plan to keep (e.g. "passes")."""
    if passes is None and base_plan:
        passes = base_plan.get("passes")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arch = cuda.normalize_arch(arch)
    with stage("lowering"):  # stage times: `nnc compile -v` (see nnc.progress)
        plan = lower(module, {"arch": arch, "precision": precision, "tf32": bool(tf32)})
    with stage("render"):
        sources = render_sources(plan, name, arch, precision)
    src = sources["model.cu"]
    source_sha = hashlib.sha256((arch + backend + src).encode()).hexdigest()
    cubin_path = out / "model.cubin"
    old = _read_json(out / "plan.json")
    if not (cubin_path.exists() and old and old.get("source_sha256") == source_sha):
        with stage(backend):  # the CUDA compile: parallel code reports through current().task
            cubin = cuda.compile_source(src, arch, backend)
        cubin_path.write_bytes(cubin)
    for fname, text in sources.items():
        (out / fname).write_text(text)
    blob = weights_blob(plan)
    (out / "weights.bin").write_bytes(blob)
    wsha = hashlib.sha256(blob).hexdigest()
    (out / "ir").mkdir(exist_ok=True)
    (out / "ir" / "final.nnir").write_text(print_module(module))
    if module.weights is not None:
        module.weights.save(out / "ir" / "final")
    pj = plan_to_json(plan, arch=arch, precision=precision, tf32=tf32, passes=passes, weights_sha=wsha,
                      source_sha=source_sha, backend=backend)
    pj = json.loads(json.dumps(pj, default=_json_default))
    if base_plan:
        pj = {**{k: v for k, v in base_plan.items() if k not in pj}, **pj}
    (out / "plan.json").write_text(json.dumps(pj, indent=1) + "\n")
    return pj


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _read_json(p: Path):
    try:
        return json.loads(p.read_text())
    except Exception:
        return None
