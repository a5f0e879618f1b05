"""`nnc compile`: import -> pass pipeline -> OUT/ir/final.nnir + plan.json -> generated CUDA.

plan.json contract (kept stable, extended freely):
{"arch", "inputs": [{"name", "dtype", "shape"}], "outputs": [...], "passes": [...],
 "kernels": [{"name", "ops", "template", "params"}],
 "launches": [...] (every run), "init_launches": [...] (once, at load: codegen/init_phase.py),
 "memory": {"arena_bytes", "naive_bytes", "peak_live_bytes", "weights_bytes", "persistent_bytes"},
 "layer_precision" (only with --keep-fp32 / --precision best): {"mode", "keep_fp32",
   "layers": [{"layer", "op", "node", "precision", "wanted"?, "why"?}], "search"? (best's record)}}
 "int8" / "fp8" (only with --precision int8 / fp8): {"calib": the --calib file's name, "method", "tensors": how many
   amax entries it has}
Shapes list ints or symbol names; dtypes use numpy names. "precision" is code generation's
storage type: for best, the fastest allowed type (each layer's own is in "layer_precision").
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .api import CompileOptions, normalize_shapes
from .codegen.target import resolve_target
from .integrity import ir_hashes
from .codegen.escape import c_identifier, is_c_identifier
from .ir.errors import NncError
from .ir.gc_pause import gc_paused
from .outdir import staged_dir
from .ir.printer import print_module
from .ir.symbolic import fmt
from .ir.verify import verify
from . import progress
from .pipeline import DEFAULT_PIPELINE, FOLDING_FUSIONS, FUSION_PASSES, LAYOUT_PASSES, Pipeline, count_ops


def io_entry(v) -> dict:
    shape = None if v.type.shape is None else [d if isinstance(d, int) else fmt(d) for d in v.type.shape]
    return {"name": v.name, "dtype": v.type.dtype.np_name, "shape": shape}


def precision_point(passes: list) -> int:
    """Where the precision passes go in `passes`: before the first fusion / layout pass."""
    return next((i for i, p in enumerate(passes) if p in FUSION_PASSES + LAYOUT_PASSES), len(passes))


def pipeline_passes(precision: str = "fp32", fuse: bool = True, per_layer=None, int8_scales=None,
                    int4_block=None, fp8_amax=None, sparsity=None) -> list:
    """The pass list `nnc compile` runs at this precision (`nnc verify` runs the same one).
    fuse=False leaves out the fusion passes and the folding fusions (`--no-fuse`: about one kernel per
    op, to compare against; pipeline.FOLDING_FUSIONS).
    per_layer: a mixed_precision.PrecisionChoice (--keep-fp32, --precision best), run in the
    precision passes' place as the entry ("mixed-precision", choice).
    int8_scales: {tensor name: scale} for precision int8: quantize-int8 runs there instead, then
    fold-qdq (its Q/DQ into integer ops; compiler/passes/quantize_int8.py says the form).
    int4_block: --weights int4's group size: quantize-weights-int4 runs after fuse-horizontal.
    sparsity: --sparsity enable|force (None: off): sparsify-weights-24 runs before fuse-horizontal
    (MatMul/Gemm with 2:4-sparse constant weights -> matmul_sparse24; compiler/passes/sparsify_weights_24.py).
    fp8_amax: {tensor name: amax} for precision fp8: to-fp16 (or mixed-precision for --keep-fp32)
    first, then quantize-fp8 and fold-qdq (MatMul/Gemm -> matmul_fp8; compiler/passes/quantize_fp8.py)."""
    passes = [p for p in DEFAULT_PIPELINE if fuse or p not in FUSION_PASSES + FOLDING_FUSIONS]
    if int4_block is not None:
        from .passes.quantize_weights_int4 import make_pass as int4_pass
        passes.insert(passes.index("fuse-horizontal") + 1, ("quantize-weights-int4", int4_pass(int4_block)))
    if sparsity not in (None, "off"):
        from .passes.sparsify_weights_24 import make_pass as sparse24_pass
        # before fuse-horizontal: its stacked Q/K/V are a batched [3, K, N] weight the pass does not take
        passes.insert(passes.index("fuse-horizontal"), ("sparsify-weights-24", sparse24_pass(sparsity)))
    if precision == "int8":
        from .passes.quantize_int8 import make_pass
        at = precision_point(passes)
        passes[at:at] = [("quantize-int8", make_pass(int8_scales or {})), "fold-qdq", "canonicalize", "dce"]
        return passes
    if precision in ("fp16", "bf16", "fp8") or per_layer is not None:
        # before the fusion passes: to-fp16 would run a fused op's body at f32 (casts around it)
        at = precision_point(passes)
        if per_layer is None and precision == "fp8":  # mixed-precision keeps the names calib.json uses
            from .passes.mixed_precision import PrecisionChoice
            per_layer = PrecisionChoice("fp16")
        lower = ("mixed-precision", per_layer) if per_layer is not None else f"to-{precision}"
        passes[at:at] = [lower, "canonicalize", "dce"]
        if precision == "fp8":  # after to-fp16: the fp8 scales stay f32, pinned f32 layers stay float
            from .passes.quantize_fp8 import make_pass as fp8_pass
            passes[at + 3:at + 3] = [("quantize-fp8", fp8_pass(fp8_amax or {})), "fold-qdq", "canonicalize", "dce"]
    return passes


def precision_choice(model, options, shapes: dict, module=None):
    """The per-layer choice for --keep-fp32 / --precision best (None: one precision for all) and
    the search record (None unless best). Warnings go to stderr and to `-v`'s log."""
    import warnings
    from .passes.mixed_precision import PrecisionChoice
    rep = progress.current()

    def warn(msg: str) -> None:  # python's warnings: on stderr for the CLI, catchable for API users
        warnings.warn(msg, UserWarning, stacklevel=2)

    if options.precision == "best":
        from .precision_search import search
        with rep.stage("precision search"):
            return search(model, options, warn, rep.log if rep.verbose else (lambda s: None), import_shapes=shapes)
    if options.keep_fp32:
        nodes = frozenset(op.loc.node for op in module.main.ops if op.loc.node) if module is not None else frozenset()
        return PrecisionChoice("fp16" if options.precision == "fp8" else options.precision,
                               keep_patterns=options.keep_fp32, warn=warn,
                               imported_nodes=nodes), None
    return None, None


def layer_precision_json(choice, record, options) -> dict:
    """plan.json's "layer_precision": what every layer runs at, and why (the search's record)."""
    out = {"mode": "best" if options.precision == "best" else "keep-fp32",
           "keep_fp32": list(options.keep_fp32),
           "layers": [d.to_json() for d in choice.decisions]}
    if record is not None:
        out["search"] = record.to_json()
    return out


def model_name(name, model) -> str:
    """The C API name of a model (its symbols are nnc_<name>_*): `name` checked, else the model
    file's stem made a C identifier ("model" for an in-memory model)."""
    if name is not None:
        if not is_c_identifier(name):
            raise NncError(f"--name {name!r}: must be a C identifier ([A-Za-z_][A-Za-z0-9_]*)")
        return name
    stem = Path(model).stem if isinstance(model, (str, Path)) else "model"
    ident = c_identifier(stem)
    return ident if ident[0].isalpha() or ident[0] == "_" else "m" + ident


@gc_paused  # allocation-heavy: see ir/gc_pause.py
def compile_model(model, out, shapes: str = "", arch=None, precision: str = "fp32", tf32: bool = False,
                  backend: str = "nvrtc", codegen: bool = True, verify_each: bool = False, dump_ir=None,
                  name=None, no_cache: bool = False, jobs=None, fuse: bool = True, *,
                  options: Optional[CompileOptions] = None, plan_extra: Optional[dict] = None) -> dict:
    """options: a CompileOptions (nnc.api) carrying everything below; without one it is made from
    the keyword arguments (backend: the CUDA compiler; no_cache: neither read nor write the cubin
    cache, nnc.codegen.cuda; jobs: compile processes). dump_ir: a directory for per-pass dumps.
    plan_extra: fields added to plan.json (the profile a build serves: compiler/profiles.py)."""
    if options is None:
        options = CompileOptions(shapes=normalize_shapes(shapes), precision=precision, arch=arch, tf32=tf32,
                                 name=name, backend="cuda" if codegen else "reference", codegen=codegen,
                                 cuda_compiler=backend, verify_each=verify_each, cache=not no_cache, jobs=jobs,
                                 fuse=fuse)
    from .onnx_import import import_model
    from . import profiles
    if options.profiles:  # one build, or one per static profile under OUT/profiles/<i>/
        return profiles.compile_with_profiles(model, out, options, dump_ir, compile_model)
    import warnings  # no shapes with CUDA codegen: every symbolic input dim 1, as trtexec does
    options = profiles.default_shapes(model, options, lambda m: warnings.warn(m, UserWarning, stacklevel=3))
    out = Path(out)
    name = model_name(options.name, model)
    precision = options.precision
    rep = progress.current()
    with rep.stage("import"):
        module = import_model(model, shapes={k: list(v) for k, v in options.shapes})
        verify(module)
    if rep.verbose:
        rep.log(f"  import {'':<14} {rep.times['import'] * 1e3:9.1f} ms {count_ops(module):8d} ops")
    choice, search_record = precision_choice(model, options, {k: list(v) for k, v in options.shapes}, module)
    calib = None
    if precision in ("int8", "fp8"):  # the calibration table: calib.json or a TensorRT cache
        from .calibrate import load_table
        calib = load_table(options.calib)
    pipe = Pipeline(pipeline_passes(precision, options.fuse, choice,
                                    calib and precision == "int8" and {k: calib.scale(k) for k in calib.amax},
                                    options.int4_block if options.weights == "int4" else None,
                                    calib and precision == "fp8" and dict(calib.amax), options.sparsity),
                    options.verify_each,
                    Path(dump_ir) if dump_ir else None)
    pipe.run(module)
    if choice is not None and rep.verbose:
        for d in choice.decisions:
            if d.got != choice.default or d.wanted != d.got:
                rep.log(f"  layer {d.layer!r} ({d.op}): {d.got}" + (f" ({d.why!r})" if d.why else ""))
        n = {p: sum(d.got == p for d in choice.decisions) for p in ("int8", "fp8", "fp16", "bf16", "fp32")}
        rep.log("  layer precision: " + ", ".join(f"{v} {k}" for k, v in n.items() if v))
    # the device limits lowering fits kernels to (codegen/target.py): --arch's table entry, else
    # the GPU present, else sm_90; an unknown arch is an error here, before any work is written
    target = resolve_target(options.arch)
    plan = {
        "name": name,
        "arch": target.arch,
        "target": target.to_json(),  # what a --no-tune / cross compile assumed about the device
        "inputs": [io_entry(a) for a in module.main.args],
        "outputs": [io_entry(r) for r in module.main.results],
        "passes": [r.name for r in pipe.records],
        "precision": precision,
        **({"layer_precision": layer_precision_json(choice, search_record, options)} if choice is not None else {}),
        "tf32": options.tf32,
        **({"int4_weights": {"block_size": options.int4_block}} if options.weights == "int4" else {}),
        **({"sparsity": options.sparsity} if options.sparsity != "off" else {}),
        **({precision: {"calib": Path(options.calib).name, "method": calib.method, "tensors": len(calib.amax)}}
           if calib is not None else {}),
        "kernels": [],
        "memory": {"arena_bytes": 0, "naive_bytes": 0, "peak_live_bytes": 0},
        **(plan_extra or {}),
    }
    if options.generates_cuda:  # writes ir/, the CUDA files and plan.json (this plan's fields kept)
        from .codegen.emit import compile_to_dir
        with rep.stage("codegen"):  # lowering, render, the CUDA compile and writing OUT
            return compile_to_dir(module, out, base_plan=plan, name=name,
                                  options=options.codegen_options(target))
    with rep.stage("write"), staged_dir(out) as tmp:  # all or nothing, see nnc/outdir.py
        (tmp / "ir").mkdir()
        (tmp / "ir" / "final.nnir").write_text(print_module(module))
        module.weights.save(tmp / "ir" / "final")
        plan["ir_sha256"] = ir_hashes(tmp / "ir")  # checked by the reference backend (nnc.integrity)
        (tmp / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    return plan
