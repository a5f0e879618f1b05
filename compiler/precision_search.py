"""`--precision best`: choose each layer's float precision under an accuracy budget.

    choice, record = search(model, options, warn)   # options: a CompileOptions, precision "best"

The algorithm (bounded, deterministic):
1. Layers are the non-constant ops with an f32 result after the cleanups (the IR the precision
   pass sees; compiler/passes/mixed_precision.py keys them by their first result's name).
   Layers matched by `keep_fp32` are pinned at fp32 and never move.
   A layer's allowed types are the float types of --allow, plus int8 / fp8 when --allow names them
   (which needs --calib: check_options refuses them without) and the layer can take them
   (`quant_allowed`: a Conv / Gemm / MatMul with a constant weight whose activation the
   calibration table has).
2. Every other layer starts at the fastest of its allowed types by the cost model. Without
   per-layer timings the heuristic is mixed_precision.SPEED_ORDER (int8, fp16, bf16 (same width,
   less mantissa), fp8 (its CUDA path still dequantizes into the fp16 GEMM), fp32); plan.json's
   "layer_precision" records which cost model it was. `TimedCost(timer)` orders by
   timer(op, precision) -> seconds instead and records the times; `stand_in_cost()` is its
   deterministic roofline stand-in (tests, no GPU). With --tune and a GPU, `cost_model` times
   each layer alone on the GPU at each allowed precision (compiler/layer_timer.py).
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
     output against fp32 minus the largest rel-L2 of its inputs) move up: an int8 / fp8 layer to
     the fastest float type it allows, a float layer to fp32; 1 layer in the first such round,
     then 2, 4, ... (so a model needing many moves takes few iterations).
   The measured builds keep int8 / fp8 layers as literal Q/DQ graphs (PrecisionChoice(fold=False):
   equal to the folded integer / matmul_fp8 ops within fp32 rounding, and every layer keeps its
   name to be measured); the returned choice folds them.
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
from .passes.mixed_precision import (FLOAT_PRECISIONS, QUANT_FLOAT, SPEED_ORDER, PrecisionChoice, is_layer,
                                     keep_fp32_choice, layer_key)

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
    """No timings: mixed_precision.SPEED_ORDER (int8, fp16, bf16, fp8, fp32: lower precision is
    faster, except fp8, whose CUDA path still runs the fp16 GEMM after dequantizing)."""
    name: str = "heuristic"
    why: str = "lower precision is faster (no per-layer timings)"

    def order(self, op, allowed):
        return sorted(allowed, key=SPEED_ORDER.index)


@dataclass
class TimedCost:
    """Orders each layer's precisions by `timer(op, precision) -> seconds` (ties: SPEED_ORDER);
    `times` keeps {layer: {precision: seconds}} for plan.json's record."""
    timer: Callable
    name: str = "timed"
    why: str = ""
    times: dict = field(default_factory=dict)

    def order(self, op, allowed):
        t = {p: float(self.timer(op, p)) for p in allowed}
        self.times[layer_key(op)] = t
        return sorted(allowed, key=lambda p: (t[p], SPEED_ORDER.index(p)))


# the stand-in timer's machine: an H200's dense tensor-core peaks (ops/s) and HBM bandwidth (B/s)
STAND_IN_PEAK = {"fp32": 67e12, "fp16": 989e12, "bf16": 989e12, "fp8": 1979e12, "int8": 1979e12}
STAND_IN_SIMT = 67e12  # non-GEMM ops (CUDA cores)
STAND_IN_BW = 4.8e12
STAND_IN_LAUNCH = 2e-6
WIDTH = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}


def _numel(t) -> int:
    n = 1
    for d in (t.shape or ()):
        n *= d if isinstance(d, int) else 1  # a symbol counts 1: the stand-in needs an order only
    return n


def _gemm_flops(op) -> int:
    out = op.results[0].type
    if op.name == "Conv" and op.operands[1].type.shape:
        w = op.operands[1].type.shape  # [O, C/g, k..]: each output takes C/g * prod(k) MACs
        macs = 1
        for d in w[1:]:
            macs *= d if isinstance(d, int) else 1
        return 2 * _numel(out) * macs
    if op.name in ("MatMul", "Gemm"):
        a = op.operands[0].type.shape or ()
        k = a[-1] if a and isinstance(a[-1], int) else 1
        if op.name == "Gemm" and op.attrs.transA and len(a) == 2 and isinstance(a[0], int):
            k = a[0]
        return 2 * _numel(out) * k
    return 0


def stand_in_layer_time(op, precision: str) -> float:
    """A deterministic stand-in for timing one layer at `precision` (no GPU; tests): a roofline
    over STAND_IN_PEAK / STAND_IN_BW of the layer's operands and results at that width, plus a
    launch. fp8 is modelled as its CUDA path runs today (docs/fp8.md): Q and DQ passes over the
    activation, then the fp16 GEMM; int8 as the int8 tensor-core kernels (1-byte operands)."""
    if precision == "fp8":
        x = _numel(op.operands[0].type)
        return stand_in_layer_time(op, "fp16") + 2 * STAND_IN_LAUNCH + 6 * x / STAND_IN_BW
    w = WIDTH[precision]
    moved = sum(_numel(v.type) * (v.type.dtype.itemsize if not v.type.dtype.is_float else w)
                for v in list(op.operands) + list(op.results) if v is not None and v.type.shape is not None)
    flops = _gemm_flops(op)
    compute = flops / STAND_IN_PEAK[precision] if flops else _numel(op.results[0].type) / STAND_IN_SIMT
    return STAND_IN_LAUNCH + max(compute, moved / STAND_IN_BW)


def stand_in_cost() -> TimedCost:
    return TimedCost(stand_in_layer_time, "stand-in",
                     "stand_in_layer_time: a roofline of each layer at each precision (deterministic, no GPU)")


def cost_model(options, amax: Optional[dict] = None, storage: str = "fp16", weights=None) -> LayerCost:
    """The cost model `best` uses: with --tune (options.tune True) and a GPU, a TimedCost over
    compiler/layer_timer.LayerTimer (each layer built and timed alone at each allowed precision,
    nnc bench's GPU median; `weights`: the searched module's, for the layers' constants);
    otherwise the heuristic, and plan.json says which and why. Any `timer(op, precision) ->
    seconds` plugs in as search(cost=TimedCost(timer)); tests and dry runs use stand_in_cost()."""
    from .codegen.target import gpu_present
    if options.tune is True and gpu_present():
        from .layer_timer import LayerTimer
        timer = LayerTimer(options, amax, storage)
        timer.src_weights = weights
        return TimedCost(timer, "gpu", "each layer compiled alone at each allowed precision and timed on the GPU "
                                       "(nnc bench median, compiler/layer_timer.py)")
    why = HeuristicCost.why + ("; GPU present, per-layer timing runs with --tune" if gpu_present() else "; no GPU present")
    return HeuristicCost(why=why)


def quant_allowed(op, allow, amax: Optional[dict]) -> tuple[str, ...]:
    """The quantized types (int8 / fp8 among `allow`) layer op can take: a Conv / Gemm / MatMul
    with a constant f32 weight the passes quantize (quantize_int8.weight_axis; fp8: MatMul / Gemm
    as quantize_fp8.quantized_layers takes them, and Conv, see quantize_fp8) whose activation has
    an amax in the calibration table."""
    from .passes import quantize_fp8, quantize_int8
    if amax is None or op.name not in quantize_int8.QUANTIZED_OPS or len(op.operands) < 2:
        return ()
    x, w = op.operands[0], op.operands[1]
    if w.producer is None or w.producer.name != "const" or w.type.dtype.short != "f32" or \
            (x.producer is not None and x.producer.name == "const") or x.name not in amax or \
            not amax[x.name] > 0 or not math.isfinite(amax[x.name]):
        return ()
    out = []
    if "int8" in allow and quantize_int8.weight_axis(op, w) is not None:
        out.append("int8")
    if "fp8" in allow and quantize_fp8.fp8_layer_kind(op) is not None:
        out.append("fp8")
    return tuple(out)


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
                "rel_err": {k: _num(v) for k, v in self.rel_err.items()}, "iterations": self.iterations,
                **({"layer_times_s": self.cost.times} if getattr(self.cost, "times", None) else {})}


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
    amax = None
    if any(p in QUANT_FLOAT for p in options.allow):  # check_options made sure --calib is given
        from .calibrate import load_table
        amax = dict(load_table(options.calib).amax)
    storage = next((p for p in options.allow if p in FLOAT_PRECISIONS), "fp32")

    def build(choice: Optional[PrecisionChoice]):
        m = import_model(model, shapes=shapes)
        verify(m)
        passes = pre + ([("mixed-precision", choice), "canonicalize", "dce"] if choice else [])
        Pipeline(passes).run(m)
        return m

    def make_choice(fold: bool) -> PrecisionChoice:
        return PrecisionChoice(storage, dict(per_layer), dict(reasons), amax=amax, fold=fold)

    imported = import_model(model, shapes=shapes)
    imported_nodes = frozenset(op.loc.node for op in imported.main.ops if op.loc.node)
    del imported
    ref_module = build(None)
    layers = [op for op in ref_module.main.ops if is_layer(op)]
    inputs_of = {layer_key(op): [v.name for v in op.operands if v is not None and v.type.dtype.is_float]
                 for op in layers}
    pinned = keep_fp32_choice(ref_module, "fp16", options.keep_fp32, warn,
                              imported_nodes).per_layer if options.keep_fp32 else {}
    cost = cost or cost_model(options, amax, storage, ref_module.weights)
    float_low = tuple(p for p in options.allow if p in FLOAT_PRECISIONS and p != "fp32")
    per_layer, reasons, order_of = {}, {}, {}
    for op in layers:
        k = layer_key(op)
        if k in pinned:
            per_layer[k], reasons[k] = "fp32", "--keep-fp32"
            continue
        allowed = (quant_allowed(op, options.allow, amax) + float_low) or ("fp32",)
        order_of[k] = cost.order(op, allowed)
        per_layer[k] = order_of[k][0]
        reasons[k] = f"fastest allowed ({cost.name})"
    calib = calibration(model, ref_module, options.calib_data, warn)
    refs = _run(ref_module, calib.samples)
    rec = SearchRecord(options.allow, options.max_rel_err, cost, calib.source)
    budget = options.max_rel_err
    step = 1

    def fallback(k: str) -> str:
        """Where a sensitive layer moves: a quantized one to its fastest float type, a float one to fp32."""
        if per_layer[k] in QUANT_FLOAT:
            return next((p for p in order_of.get(k, ()) if p in FLOAT_PRECISIONS), "fp32")
        return "fp32"

    for it in range(MAX_ITERATIONS + 1):
        runs = _run(build(make_choice(fold=False)), calib.samples)  # literal Q/DQ: every layer keeps its name
        errs = {}
        for (outs, _), (ref_outs, _) in zip(runs, refs):
            for name, r in ref_outs.items():
                errs[name] = max(errs.get(name, 0.0), _err(outs[name], r))
        worst = max(errs.values(), default=0.0)
        counts = {p: sum(v == p for v in per_layer.values()) for p in SPEED_ORDER}
        entry = {"iteration": it, "rel_err": {k: _num(v) for k, v in errs.items()},
                 "layers_not_fp32": sum(p != "fp32" for p in per_layer.values()),
                 "layers": {p: n for p, n in counts.items() if n}}
        rec.iterations.append(entry)
        rec.rel_err = errs
        log(f"  precision best: iteration {it}: worst output rel-L2 {worst:.3g} (budget {budget:g}), "
            f"{entry['layers_not_fp32']}/{len(per_layer)} layers below fp32 "
            f"({', '.join(f'{n} {p}' for p, n in entry['layers'].items())})")
        if worst <= budget:
            rec.met = True
            break
        if it == MAX_ITERATIONS:
            break
        moved = _moves(per_layer, inputs_of, runs, refs, options.allow, step, fallback)
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
    return make_choice(fold=True), rec


def _moves(per_layer: dict, inputs_of: dict, runs, refs, allow, step: int,
           fallback: Callable[[str], str] = lambda k: "fp32") -> list[tuple[str, str, str]]:
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
    origins = [k for k in low if per_layer[k] in ("fp16", "bf16") and not finite(k) and all(finite(i) for i in inputs_of[k])]
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
    return [(k, fallback(k), f"error contribution {_fmt(c)} (rel-L2 added over its inputs)") for c, k in contrib[:step]]


def _fmt(x: float) -> str:
    return f"{x:.3g}"
