"""Writes a compiled model directory:

    model.cu        all kernels (NVRTC-compilable) + host launch code implementing the C API
    nnc_model.h     the C API
    CMakeLists.txt  shared library + nnc_run_example
    nnc_run_example.cpp
    weights.bin     pre-transformed weights (sha256 in plan.json)
    model.<i>.cubin the kernels compiled for `arch`, one cubin per compile unit (codegen/units.py;
                    what the Python runtime loads; plan.json "cubins" lists each with its sha256)
    plan.json       the contract (inputs, outputs, kernels, launches, buffers, memory, ...)
    ir/final.nnir   the IR that was lowered (+ ir/final.weights.{bin,json})
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np

from ..ir.errors import NncError
from ..ir.graph import Module
from ..integrity import ir_hashes
from ..ir.printer import print_module
from ..outdir import staged_dir
from ..progress import current, stage
from . import cuda
from .init_phase import INIT_KIND, PERSISTENT
from .lower import lower
from .options import CodegenOptions, LowerOptions
from .plan import Buffer, Plan, Scalar
from .target import Target, resolve_target
from .escape import is_c_identifier
from .render import render
from ..ir.symbolic import Expr, fmt
from .runtime_sizes import _c as host_c, expr_json
from .units import make_units

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
    if r.kind == INIT_KIND:  # computed once at load (codegen/init_phase.py)
        return PERSISTENT, -1, r.offset + off
    return "arena", -1, r.offset + off


def _arg(plan: Plan, a) -> dict:
    if isinstance(a, Scalar):
        return {"kind": "scalar", "ctype": a.type, "value": a.value}
    region, index, off = _region(plan, a)
    return {"kind": "buf", "buf": a.id, "ctype": a.ctype, "region": region, "index": index, "offset": off}


def _io(plan: Plan, b: Buffer) -> dict:
    d = {"name": b.name, "dtype": b.dtype.np_name, "shape": list(b.shape), "buffer": b.id, "nbytes": b.nbytes}
    if b.sym_shape is not None:  # a range build: the model's symbolic shape, nbytes at max_shape, the
        # per-run shape from the symbols' values (sym_shape: codegen/runtime_sizes.py)
        d["shape"] = [x if isinstance(x, int) else fmt(x) for x in b.sym_shape]
        d["max_shape"] = list(b.shape)
        d["sym_shape"] = [expr_json(x) for x in b.sym_shape]
    if b.dynamic:
        info = plan.dynamic.get(b.id) or plan.dynamic.get(plan.root(b).id)
        src = _copies(plan)[0].get(id(b))
        if info is None and src is not None:
            info = plan.dynamic.get(plan.root(src).id)
        d["shape_known_after_run"] = True
        d["max_shape"] = list(b.shape)
        d["dynamic_axis"] = info["axis"] if info else -1
        d["count_buffer"] = info["count_buffer"] if info else -1
    return d


def weights_blob(plan: Plan) -> bytes:
    buf = bytearray(plan.weights_bytes)
    used = {id(plan.root(a)) for l in plan.init_launches + plan.launches for a in l.args if isinstance(a, Buffer)}
    for b in plan.buffers:
        if b.kind in ("weight", "const") and b.alias_of is None and b.data is not None and b.offset >= 0:
            if id(b) not in used:
                continue
            raw = np.ascontiguousarray(b.data).astype(b.dtype.np, copy=False).tobytes()
            buf[b.offset:b.offset + len(raw)] = raw
    return bytes(buf)


def plan_to_json(plan: Plan, *, arch: str, precision: str, tf32: bool, passes, weights_sha: str,
                 source_sha: str, backend: str, cubins: list = (), target: Optional[Target] = None) -> dict:
    outputs = [_io(plan, b) for b in plan.outputs]
    # readback launches name the output they size
    def launch_json(l) -> dict:
        d = {"kind": l.kind, "kernel": l.kernel, "grid": list(l.grid), "block": list(l.block), "smem": l.smem,
             "args": [{"buf": a.id} if isinstance(a, Buffer) else
                      {"type": a.type, "value": a.value, **({"expr": expr_json(a.expr)} if a.expr is not None else {})}
                      for a in l.args],
             "op": l.op}
        if l.grid_expr is not None:  # a range build's grid per run (codegen/runtime_sizes.py)
            d["grid_expr"] = [expr_json(g) for g in l.grid_expr]
        if l.kind != "kernel":
            d["nbytes"] = l.nbytes
        if l.kind == "readback":
            d["output_index"] = _readback_output(plan, l)
        if getattr(l, "tuning", None) is not None:  # codegen/tuning.py: tactic, time, candidates
            d["tuning"] = l.tuning
        return d
    launches = [launch_json(l) for l in plan.launches]
    init_launches = [launch_json(l) for l in plan.init_launches]  # run once at load, in order
    buffers = []
    for b in plan.buffers:
        region, index, off = _region(plan, b)
        buffers.append({"id": b.id, "name": b.name, "dtype": b.dtype.np_name, "shape": list(b.shape),
                        "nbytes": b.nbytes, "kind": b.kind, "region": region, "index": index, "offset": off,
                        "alias_of": b.alias_of, "dynamic": b.dynamic,
                        **({"sym_shape": [expr_json(x) for x in b.sym_shape]} if b.sym_shape is not None else {}),
                        **({"inplace_of": b.inplace_of} if b.inplace_of is not None else {})})
    return {
        "version": PLAN_VERSION,
        "arch": arch,
        # the device limits lowering assumed (codegen/target.py): the table's for an explicit
        # --arch (cross-compiling), else the GPU's own
        "target": (target or plan.options.target).to_json(),
        "precision": precision,
        "tf32": bool(tf32),
        "backend": backend,
        "inputs": [_io(plan, b) for b in plan.inputs],
        "outputs": outputs,
        "passes": list(passes or []),
        "kernels": [{"name": k.name, "ops": k.ops, "template": k.template, "params": k.params}
                    for k in plan.kernels.values()],
        "launches": launches,
        "init_launches": init_launches,
        "buffers": buffers,
        "steps": [s.to_json() for s in getattr(plan, "steps", ())],  # codegen/steps.py, run by codegen/plan_exec.py
        "memory": dict(plan.memory),
        "weights_file": "weights.bin",
        "weights_bytes": plan.weights_bytes,
        "weights_sha256": weights_sha,
        "persistent_bytes": plan.persistent_bytes,
        "cubins": list(cubins),  # [{"file", "sha256", "kernels"}]: one per compile unit (codegen/units.py)
        "source_sha256": source_sha,
        # how kernels were chosen (codegen/tuning.py): heuristic (why) or tuned (counts, cache, time)
        "tuning": getattr(plan, "tuning", None) or {"mode": "heuristic", "why": "tuning off"},
    }


def _readback_output(plan: Plan, l) -> int:
    target = id(plan.root(l.args[1]))
    _, copied_out, output_of = _copies(plan)
    if target in output_of:
        return output_of[target]
    if target in copied_out:  # copied out to an output later
        return copied_out[target]
    return len(plan.outputs)  # not an output: the extent slot past the end


def _copies(plan: Plan) -> tuple[dict, dict, dict]:
    """Indexes built once per plan (a scan per output or readback would make emission quadratic):
    id(memcpy destination) -> its source (first copy), id(root of a source copied into an output)
    -> that output's index, id(root of an output) -> the output's index (first)."""
    key = (len(plan.launches), len(plan.outputs))
    cached = getattr(plan, "_copies_index", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    src_of, copied_out, output_of = {}, {}, {}
    for m in plan.launches:
        if m.kind == "memcpy":
            src_of.setdefault(id(m.args[0]), m.args[1])
            dst = plan.root(m.args[0])
            if dst.kind == "output":
                copied_out.setdefault(id(plan.root(m.args[1])), dst.io_index)
    for i, o in enumerate(plan.outputs):
        output_of.setdefault(id(plan.root(o)), i)
    plan._copies_index = (key, (src_of, copied_out, output_of))
    return src_of, copied_out, output_of


def c_api_prefix(name: str) -> str:
    """The prefix of every exported symbol of a model named `name` (a C identifier, nnc compile
    --name): nnc_<name>_create, ..., so several models link into one binary."""
    if not is_c_identifier(name):
        raise NncError(f"model name {name!r} is not a C identifier ([A-Za-z_][A-Za-z0-9_]*)")
    return f"nnc_{name}"


def render_sources(plan: Plan, module_name: str, arch: str, precision: str,
                   weights_sha256: str = "") -> dict[str, str]:
    """The text files of OUT. weights_sha256: weights.bin's, checked by the C API's create ("": no check)."""
    ranges = getattr(plan.options, "symbol_ranges", ()) if plan.options is not None else ()
    # a range build's C API (codegen/runtime_sizes.py): the symbols live in m->sym (set by
    # <api>_set_input_shape), grids and size arguments are C over them
    host_names = {r[0]: f"m->sym[{i}]" for i, r in enumerate(ranges)}

    def launch_src(l) -> dict:
        d = {"kind": l.kind, "kernel": l.kernel, "grid": list(l.grid), "block": list(l.block), "smem": l.smem,
             "args": [_arg(plan, a) for a in l.args], "op": l.op, "nbytes": l.nbytes}
        if l.grid_expr is not None:  # >= 1 block: a data-dependent count may be 0 (codegen/data_dependent.py)
            d["grid"] = [g if isinstance(g, int) else f"nnc_grid1((int64_t)({host_c(g, host_names)}))"
                         for g in l.grid_expr]
        for a, ad in zip(l.args, d["args"]):
            if isinstance(a, Scalar) and a.expr is not None:
                ad["expr"] = host_c(a.expr, host_names)
        if l.kind == "readback":
            d["output_index"] = _readback_output(plan, l)
            # a NonZero count sized downstream: the host binds its symbol here (m->sym[k])
            dd = set(getattr(plan, "data_dependent", ()))
            syms = [x.name for x in (l.args[1].sym_shape or ()) if isinstance(x, Expr) and x.kind == "sym"
                    and x.name in dd]
            d["binds_sym"] = sym_index[syms[0]] if syms else -1
        return d
    sym_index = {r[0]: i for i, r in enumerate(ranges)}
    jplan_launches = [launch_src(l) for l in plan.launches]
    init_launches = [launch_src(l) for l in plan.init_launches]

    def io(b):
        d = dict(_io(plan, b), shape=list(b.shape), max_shape=list(b.shape), max_nbytes=b.nbytes,
                 dynamic_axis=_io(plan, b).get("dynamic_axis", -1))
        if ranges:  # per dim: the symbol's index (a bare symbol), -1 static; the output dims as C
            sh = b.sym_shape if b.sym_shape is not None else b.shape
            d["sym_index"] = [sym_index[x.name] if isinstance(x, Expr) and x.kind == "sym" else -1 for x in sh]
            d["dims_c"] = [str(x) if isinstance(x, int) else host_c(x, host_names) for x in sh]
        return d
    inputs, outputs = [io(b) for b in plan.inputs], [io(b) for b in plan.outputs]
    for t in inputs:
        for x, k in zip(plan.inputs[inputs.index(t)].sym_shape or (), t.get("sym_index", ())):
            if isinstance(x, Expr) and k < 0:
                raise NncError(f"input {t['name']!r}: a dim {fmt(x)} that is not one symbol: a range build binds "
                               f"each symbol from an input dim of its own")
    symbols = [{"min": int(r[1]), "max": int(r[3])} for r in ranges]
    common = dict(model_name=module_name, api=c_api_prefix(module_name), arch=arch, precision=precision,
                  memory=plan.memory, inputs=inputs, outputs=outputs, symbols=symbols)
    host = render("host.cu.j2", launches=jplan_launches, init_launches=init_launches,
                  weights_sha256=weights_sha256, **common)
    kernels_src = render("model.cu.j2", prelude=render("prelude.cu.j2"), kernels=list(plan.kernels.values()),
                         launches=jplan_launches, host=host, **common)
    files = {
        "model.cu": kernels_src,
        "nnc_model.h": render("nnc_model.h.j2", **common),
        "CMakeLists.txt": render("CMakeLists.txt.j2", arch_num=arch.replace("sm_", ""), **common),
        "nnc_run_example.cpp": render("nnc_run_example.cpp.j2", **common),
    }
    return {f: str(text) for f, text in files.items()}  # plain str (NVRTC's binding wants exactly str)


def compile_to_dir(module: Module, out_dir, arch: Optional[str] = None, precision: str = "fp32",
                   tf32: bool = False, backend: str = "nvrtc", passes=None, name: str = "model",
                   base_plan: Optional[dict] = None, no_cache: bool = False, jobs: Optional[int] = None,
                   *, options: Optional[CodegenOptions] = None) -> dict:
    """Lowers `module` (static shapes), writes the model directory and returns the plan dict
    (JSON-ready). `base_plan`: fields of the caller's plan to keep (e.g. "passes").
    options: a CodegenOptions (codegen/options.py: the Target, precision, tf32, the CUDA compiler,
    cache, jobs); without one it is made from the keyword arguments: arch (None: the GPU present,
    else sm_90; codegen/target.py), no_cache (neither read nor write the cubin cache,
    codegen/cuda.py), jobs (compile processes, default: the CPUs)."""
    if options is None:
        options = CodegenOptions(LowerOptions(resolve_target(arch), precision, tf32), backend,
                                 cache=not no_cache, jobs=jobs)
    lo = options.lower
    if base_plan and base_plan.get("runtime_sizes"):  # a range profile's build (codegen/runtime_sizes.py)
        lo = dataclasses.replace(lo, symbol_ranges=tuple((n, *v) for n, v in base_plan["runtime_sizes"].items()))
    arch, precision, tf32, backend = lo.arch, lo.precision, lo.tf32, options.backend
    if passes is None and base_plan:
        passes = base_plan.get("passes")
    final = Path(out_dir)
    with stage("lowering"):  # stage times: `nnc compile -v` (see nnc.progress)
        plan = lower(module, lo)
    blob = weights_blob(plan)  # before rendering: the C API checks its sha256 at create
    wsha = hashlib.sha256(blob).hexdigest()
    with stage("render"):
        sources = render_sources(plan, name, arch, precision, weights_sha256=wsha)
    src = sources["model.cu"]
    source_sha = hashlib.sha256((arch + backend + src).encode()).hexdigest()
    # written into a fresh directory renamed into place (nnc/outdir.py): all or nothing, no symlinks
    with staged_dir(final) as out:
        cubin_entries = _build_cubins(out, plan, arch, backend, not options.cache, options.jobs)
        for fname, text in sources.items():
            (out / fname).write_text(text)
        (out / "weights.bin").write_bytes(blob)
        (out / "ir").mkdir(exist_ok=True)
        (out / "ir" / "final.nnir").write_text(print_module(module))
        if module.weights is not None:
            module.weights.save(out / "ir" / "final")
        ir_sha = ir_hashes(out / "ir")  # what the reference backend loads (nnc.integrity)
        pj = plan_to_json(plan, arch=arch, precision=precision, tf32=tf32, passes=passes, weights_sha=wsha,
                          source_sha=source_sha, backend=backend, cubins=cubin_entries, target=lo.target)
        pj = json.loads(json.dumps(pj, default=_json_default))
        pj["name"], pj["c_api_prefix"] = name, c_api_prefix(name)
        pj["ir_sha256"] = ir_sha
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


def _build_cubins(out: Path, plan: Plan, arch: str, backend: str, no_cache: bool, jobs) -> list:
    """Compiles the plan's kernels as units (codegen/units.py) in parallel through the cubin cache
    (codegen/cuda.py) and writes model.<i>.cubin per unit; returns plan.json's "cubins" entries."""
    units = make_units(list(plan.kernels.values()))
    with stage(backend) as task:  # the CUDA compile; a progress bar per finished unit
        task.set_total(len(units))
        shown = [0]

        def progress(done, total):
            task.advance(done - shown[0])
            shown[0] = done
        cache = None if no_cache else cuda.CubinCache.default()
        cubins = cuda.compile_many(units, arch, jobs=jobs, backend=backend, progress=progress, cache=cache)
    current().log(f"  {backend}: {len(units)} compile units, " +
                  (f"{cache.hits} from the cubin cache {cache.dir}" if cache is not None else "no cache"))
    entries = []
    for i, (u, data) in enumerate(zip(units, cubins)):
        fname = f"model.{i}.cubin"
        (out / fname).write_bytes(data)
        entries.append({"file": fname, "sha256": hashlib.sha256(data).hexdigest(), "kernels": list(u.kernels)})
    return entries
