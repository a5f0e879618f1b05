"""`--precision best`: choose each layer's float precision under an accuracy budget.

    choice, record = search(model, options, warn)   # options: a CompileOptions, precision "best"

The algorithm (bounded, deterministic):
1. Layers are the non-constant ops with an f32 result after the cleanups (the IR the precision
   pass sees; compiler/passes/mixed_precision.py keys them by their first result's name).
   Layers matched by `keep_fp32` are pinned at fp32 and never move.
2. Every other layer starts at the fastest allowed type by the cost model. Without per-layer
   timings (no GPU: the CPU case) the heuristic is "lower precision is faster", fp16 before bf16
   (same width, more mantissa) before fp32; plan.json's "layer_precision" records that it was a
   heuristic. A timing-based cost model plugs in at `cost_model()` (see there).
3. The fp32 build and the candidate build run on the calibration inputs in the reference
   interpreter (numpy, CPU). The error of each model output is its relative L2 against the fp32
   build's (accuracy.compare: the measure `nnc verify` reports; a non-finite value where fp32 is
   finite counts as infinite); the worst over outputs and samples must be <= max_rel_err.
4. While it is not, sensitive layers move up and the build is measured again, at most
   MAX_ITERATIONS times:
   - overflow first: the layers whose output turns non-finite while all their float inputs are
     finite (the first overflowing layers of `nnc verify --per-layer`), and with them every fp16
     layer whose fp32 values (its output's or its inputs') exceed FP16_SAFE_MAX on the
     calibration data (else the overflow would just move one layer down per iteration), move to
     bf16 when it is allowed and they are at fp16 (bf16 has fp32's range), else to fp32;
   - otherwise the layers with the largest own error contribution (the rel-L2 of the layer's
     output against fp32 minus the largest rel-L2 of its inputs) move to fp32: 1 layer in the
     first such round, then 2, 4, ... (so a model needing many moves takes few iterations).
5. If the budget still fails after the last iteration, every layer goes back to fp32 (which
   meets any budget: it is the reference) and a warning says so.
Calibration inputs: an .npz keyed by input name (one sample) or a directory of such files; without
one, CALIB_RANDOM_SAMPLES seeded random samples (accuracy.random_inputs, seeds 0..), with a warning:
random data hides errors that real data shows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

import numpy as np

from .ir.errors import InputError, NncError
from .passes.mixed_precision import PrecisionChoice, is_layer, keep_fp32_choice, layer_key

MAX_ITERATIONS = 8
CALIB_RANDOM_SAMPLES = 2
MAX_CALIB_FILES = 64
FP16_SAFE_MAX = 32768.0  # half of fp16's largest finite value (65504): headroom for the next op


class LayerCost(Protocol):
    """Orders the allowed precisions of one layer fastest first."""
    name: str
    why: str

    def order(self, op, allowed: tuple[str, ...]) -> list[str]: ...


@dataclass
class HeuristicCost:
    """No timings: lower precision is faster (fp16, then bf16, then fp32)."""
    name: str = "heuristic"
    why: str = "lower precision is faster (no per-layer timings)"

    def order(self, op, allowed):
        rank = {"fp16": 0, "bf16": 1, "fp32": 2}
        return sorted(allowed, key=rank.__getitem__)


def cost_model(options) -> LayerCost:
    """The cost model `best` uses. Per-layer timings need a GPU: codegen/tuning.py times kernel
    variants of the lowered plan, so a timing cost model would compile the candidate build, time
    each layer's kernels at each allowed dtype through the tuner (its timing cache keyed by
    op+shape+dtype) and order by those times. That is not implemented: with or without a GPU
    the heuristic is used, and plan.json says so."""
    from .codegen.target import gpu_present
    why = HeuristicCost.why + ("; GPU present, but per-layer timing is not wired into the search yet"
                               if gpu_present() else "; no GPU present")
    return HeuristicCost(why=why)


@dataclass
class Calibration:
    samples: list  # list[{input name: array}]
    source: str


def calibration(model, module, calib_data, warn: Callable[[str], None]) -> Calibration:
    from .accuracy import _load_proto, load_npz, random_inputs
    if calib_data is None:
        warn(f"--precision best: no --calib-data; measuring on {CALIB_RANDOM_SAMPLES} seeded random samples "
             "(random data can hide errors real inputs show)")
        try:
            samples = [random_inputs(module.main.args, s) for s in range(CALIB_RANDOM_SAMPLES)]
        except NncError as e:
            raise InputError(f"--precision best: random calibration inputs need static shapes ({e}); "
                             "bind them with --shapes or pass --calib-data") from None
        return Calibration(samples, f"{CALIB_RANDOM_SAMPLES} seeded random samples (seeds 0..{CALIB_RANDOM_SAMPLES - 1})")
    p = Path(calib_data)
    if p.is_dir():
        files = sorted(x for x in p.iterdir() if x.suffix == ".npz" and x.is_file())
        if not files:
            raise InputError(f"--calib-data {str(p)!r}: the directory has no .npz files")
        if len(files) > MAX_CALIB_FILES:
            warn(f"--calib-data {str(p)!r}: {len(files)} files, using the first {MAX_CALIB_FILES}")
            files = files[:MAX_CALIB_FILES]
    elif p.is_file():
        files = [p]
    else:
        raise InputError(f"--calib-data {str(p)!r}: no such file or directory")
    proto = _load_proto(model, external=False)
    want = {a.name for a in module.main.args}
    samples = []
    for f in files:
        s = load_npz(f, proto)
        if set(s) != want:
            raise InputError(f"--calib-data {str(f)!r}: the model takes {sorted(want)}; missing "
                             f"{sorted(want - set(s))}, unknown {sorted(set(s) - want)}")
        samples.append(s)
    return Calibration(samples, f"{len(samples)} sample(s) from {p.name}")


def _run(module, samples) -> list[tuple[dict, dict]]:
    """Per sample: ({output name: array}, {value name: array of every top-level op result})."""
    from .ir.interp import Interpreter
    runs = []
    for feed in samples:
        seen: dict = {}

        def observe(op, outs):
            for r, o in zip(op.results, outs):
                seen[r.name] = o

        with np.errstate(all="ignore"):
            res = Interpreter(module, observe=observe).run(feed)
        runs.append(({r.name: np.asarray(res[r.name]) for r in module.main.results}, seen))
    return runs


def _err(got, ref) -> float:
    from .accuracy import compare
    got, ref = np.asarray(got), np.asarray(ref)
    if got.dtype.kind not in "fc" or ref.dtype.kind not in "fc":
        return 0.0
    return compare("", got, ref, 1e-2, None).rel_l2


@dataclass
class SearchRecord:
    allow: tuple
    max_rel_err: float
    cost: LayerCost
    calibration: str
    iterations: list = field(default_factory=list)
    met: bool = False
    fallback_all_fp32: bool = False  # the bounded search did not meet the budget (step 5)
    rel_err: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"allow": list(self.allow), "max_rel_err": self.max_rel_err, "cost_model": self.cost.name,
                "cost_model_why": self.cost.why, "calibration": self.calibration, "met": self.met,
                "fallback_all_fp32": self.fallback_all_fp32,
                "rel_err": {k: _num(v) for k, v in self.rel_err.items()}, "iterations": self.iterations}


def _num(x: float):
    return x if math.isfinite(x) else str(x)


def search(model, options, warn: Callable[[str], None], log: Callable[[str], None] = lambda s: None,
           import_shapes: Optional[dict] = None, cost: Optional[LayerCost] = None) -> tuple[PrecisionChoice, SearchRecord]:
    """The per-layer choice for `options` (precision "best"): see the module docstring.
    cost: the LayerCost ordering each layer's allowed types (None: cost_model(options))."""
    from .calibrate import pre_quant_passes
    from .ir.verify import verify
    from .onnx_import import import_model
    from .pipeline import Pipeline

    pre = pre_quant_passes()  # the pipeline up to where the precision pass runs
    shapes = import_shapes if import_shapes is not None else {k: list(v) for k, v in options.shapes}

    def build(choice: Optional[PrecisionChoice]):
        m = import_model(model, shapes=shapes)
        verify(m)
        passes = pre + ([("mixed-precision", choice), "canonicalize", "dce"] if choice else [])
        Pipeline(passes).run(m)
        return m

    imported = import_model(model, shapes=shapes)
    imported_nodes = frozenset(op.loc.node for op in imported.main.ops if op.loc.node)
    del imported
    ref_module = build(None)
    layers = [op for op in ref_module.main.ops if is_layer(op)]
    inputs_of = {layer_key(op): [v.name for v in op.operands if v is not None and v.type.dtype.is_float]
                 for op in layers}
    pinned = keep_fp32_choice(ref_module, "fp16", options.keep_fp32, warn,
                              imported_nodes).per_layer if options.keep_fp32 else {}
    cost = cost or cost_model(options)
    low_allowed = tuple(p for p in options.allow if p != "fp32") or ("fp32",)
    per_layer = {}
    reasons = {}
    for op in layers:
        k = layer_key(op)
        if k in pinned:
            per_layer[k], reasons[k] = "fp32", "--keep-fp32"
        else:
            per_layer[k] = cost.order(op, low_allowed)[0]
            reasons[k] = f"fastest allowed ({cost.name})"
    calib = calibration(model, ref_module, options.calib_data, warn)
    refs = _run(ref_module, calib.samples)
    rec = SearchRecord(options.allow, options.max_rel_err, cost, calib.source)
    budget = options.max_rel_err
    step = 1
    choice = PrecisionChoice(options.allow[0], dict(per_layer), dict(reasons))
    for it in range(MAX_ITERATIONS + 1):
        choice = PrecisionChoice(options.allow[0], dict(per_layer), dict(reasons))
        runs = _run(build(choice), calib.samples)
        errs = {}
        for (outs, _), (ref_outs, _) in zip(runs, refs):
            for name, r in ref_outs.items():
                errs[name] = max(errs.get(name, 0.0), _err(outs[name], r))
        worst = max(errs.values(), default=0.0)
        entry = {"iteration": it, "rel_err": {k: _num(v) for k, v in errs.items()},
                 "layers_not_fp32": sum(p != "fp32" for p in per_layer.values())}
        rec.iterations.append(entry)
        rec.rel_err = errs
        log(f"  precision best: iteration {it}: worst output rel-L2 {worst:.3g} (budget {budget:g}), "
            f"{entry['layers_not_fp32']}/{len(per_layer)} layers below fp32")
        if worst <= budget:
            rec.met = True
            break
        if it == MAX_ITERATIONS:
            break
        moved = _moves(per_layer, inputs_of, runs, refs, options.allow, step)
        if not moved:
            break
        overflow = any(why.startswith("overflow") for _, _, why in moved)
        if not overflow:
            step *= 2
        for k, to, why in moved:
            per_layer[k], reasons[k] = to, why
        entry["moved"] = [{"layer": k, "to": to, "why": why} for k, to, why in moved]
        for k, to, why in moved:
            log(f"    {k!r}: -> {to} ({why})")
    if not rec.met:
        warn(f"--precision best: the budget --max-rel-err {budget:g} is not met after {len(rec.iterations)} "
             f"measurements (worst {max(rec.rel_err.values(), default=0.0):.3g}); every layer falls back to fp32")
        for k in per_layer:
            if per_layer[k] != "fp32":
                per_layer[k], reasons[k] = "fp32", "budget not met: all layers fp32"
        rec.rel_err = {k: 0.0 for k in rec.rel_err}  # the fp32 build is the reference itself
        rec.met = rec.fallback_all_fp32 = True
        choice = PrecisionChoice(options.allow[0], dict(per_layer), dict(reasons))
    return choice, rec


def _moves(per_layer: dict, inputs_of: dict, runs, refs, allow, step: int) -> list[tuple[str, str, str]]:
    """The layers to move up, [(layer, to, why)]: see step 4 of the module docstring."""
    def value_err(name: str) -> float:
        worst = 0.0
        for (_, seen), (_, ref_seen) in zip(runs, refs):
            if name in seen and name in ref_seen:
                worst = max(worst, _err(seen[name], ref_seen[name]))
        return worst

    def finite(name: str) -> bool:
        return all(name not in seen or not np.asarray(seen[name]).dtype.kind == "f" or
                   bool(np.isfinite(np.asarray(seen[name], dtype=np.float32)).all()) for _, seen in runs)

    def ref_amax(name: str) -> float:
        worst = 0.0
        for _, ref_seen in refs:
            a = np.asarray(ref_seen.get(name, 0.0))
            if a.dtype.kind == "f" and a.size:
                worst = max(worst, float(np.nanmax(np.abs(a))))
        return worst

    low = [k for k, p in per_layer.items() if p != "fp32"]
    origins = [k for k in low if not finite(k) and all(finite(i) for i in inputs_of[k])]
    if origins:
        out = []
        # with the first overflowing layers go all fp16 layers whose fp32 values leave fp16's range
        # (else the overflow moves one layer down per iteration)
        big = [k for k in low if per_layer[k] == "fp16" and k not in origins
               and max([ref_amax(k)] + [ref_amax(i) for i in inputs_of[k]]) > FP16_SAFE_MAX]
        for k in origins + big:
            to = "bf16" if per_layer[k] == "fp16" and "bf16" in allow else "fp32"
            amax = max([ref_amax(k)] + [ref_amax(i) for i in inputs_of[k]])
            why = (f"overflow: non-finite at {per_layer[k]}, inputs finite" if k in origins else
                   f"range: fp32 values (output or inputs) up to {amax:.3g} exceed {FP16_SAFE_MAX:g}")
            out.append((k, to, why))
        return out
    contrib = []
    for k in low:
        e = value_err(k)
        base = max((value_err(i) for i in inputs_of[k]), default=0.0)
        contrib.append((e - base if math.isfinite(e) else math.inf, k))
    contrib.sort(key=lambda t: (-t[0], t[1]))
    return [(k, "fp32", f"error contribution {_fmt(c)} (rel-L2 added over its inputs)") for c, k in contrib[:step]]


def _fmt(x: float) -> str:
    return f"{x:.3g}"
