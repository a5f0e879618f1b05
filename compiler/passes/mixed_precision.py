"""Per-layer float precision: each op of the main function runs at the dtype a chooser gives it
(f32, f16 or bf16), with casts only where precision changes (`--keep-fp32`, `--precision best`).

Rewrites: every op whose float results are f32 is rebuilt at its chosen dtype D: its f32 operands
are converted to D (a constant is narrowed at compile time, like to-fp16 does; any other value
gets one Cast, shared by every consumer wanting that dtype), its dtype-carrying attributes that
produce f32 are retargeted (to_precision._retarget_attrs). So a run of ops at one dtype has no
casts inside it, and a cast sits exactly on an edge whose two ends differ. The function's
arguments and results keep their declared types (a Cast at the first use / before the return).
An op whose inference rejects D runs at f32 (as to-fp16 does); an op with regions runs at f32.
Values the model already declares in a non-f32 type are left alone. Quantization scales
(to_precision.EXACT_OPERANDS) stay f32 in every layer, as to-fp16 keeps them.

The chooser keys layers by `layer_key(op)`: its first result's name, which this pass keeps (so a
decision made on one build of the model applies to the next; compiler/precision_search.py).
`PrecisionChoice.decisions` records, per layer, the dtype asked for and the dtype it got.

Requires: a verified module; run where to-fp16 runs (compiler/driver.pipeline_passes: after the
cleanups, before the layout and fusion passes, which then fuse the casts: fuse-epilogue takes a
Cast after a GEMM/conv into its epilogue, fuse-elementwise takes the others into their groups).
Pattern and node name strings are only compared (fnmatch), never written into any source.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from nnc.ir.builder import Builder, const_value
from nnc.ir.errors import NncError
from nnc.ir.graph import Module, NameGen, Op, Value, value_names
from nnc.ir.types import F32, DType, dtype
from nnc.passes.to_precision import _cast_takes_int, _narrow, exact_operand, keep_output_names, lowered_attrs

FLOAT_PRECISIONS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}  # CLI name -> IR dtype short name


def ir_dtype(precision: str) -> DType:
    if precision not in FLOAT_PRECISIONS:
        raise NncError(f"unknown float precision {precision!r}; expected one of {', '.join(FLOAT_PRECISIONS)}")
    return dtype(FLOAT_PRECISIONS[precision])


def precision_name(dt: DType) -> str:
    return next(k for k, v in FLOAT_PRECISIONS.items() if v == dt.short)


def layer_key(op: Op) -> str:
    return op.results[0].name if op.results else ""


def is_layer(op: Op) -> bool:
    """An op this pass chooses a dtype for: not a constant, with an f32 result."""
    return op.name != "const" and any(r.type.dtype == F32 for r in op.results)


@dataclass
class Decision:
    layer: str   # layer_key
    op: str      # IR op name
    node: str    # ONNX node name ("" when unknown)
    wanted: str  # precision asked for (fp32/fp16/bf16)
    got: str     # precision it runs at (fp32 when the op rejects the low type)
    why: str = ""
    result: Optional[Value] = None  # the layer's first result in the rebuilt function (its name may
    # have changed: an output's value is renamed "<name>.low" when a Cast after it takes the name)

    def to_json(self) -> dict:
        return {"layer": self.layer, "op": self.op, "node": self.node, "precision": self.got,
                **({"wanted": self.wanted} if self.wanted != self.got else {}), **({"why": self.why} if self.why else {})}


@dataclass
class PrecisionChoice:
    """What dtype each layer runs at. per_layer: {layer_key: precision}; default: the rest (a float
    precision). reasons: {layer_key: why} for the record.

    A layer at "int8" or "fp8" (precision best with --calib; `amax` then holds the calibration
    table's {tensor: amax}) is lowered as a float layer first (int8: f32, the form quantize-int8
    writes; fp8: QUANT_FLOAT["fp8"]), then gets Q/DQ on its activation and its weight quantized
    (quantize_int8.quantize_layers, quantize_fp8.insert), and with fold=True fold-qdq makes it an
    integer / matmul_fp8 op. fold=False leaves the literal Q/DQ graph (equal within fp32 rounding,
    and every layer's result keeps its name: what precision_search measures)."""
    default: str
    per_layer: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)
    keep_patterns: tuple = ()  # --keep-fp32: resolved against the module when the pass runs
    imported_nodes: frozenset = frozenset()  # ONNX node names at import (for the warning's hint)
    warn: Optional[Callable[[str], None]] = None  # where a pattern matching nothing is reported
    decisions: list = field(default_factory=list)  # filled by run()
    amax: Optional[dict] = None  # calibration amax per tensor name (int8 / fp8 layers)
    fold: bool = True

    _flow: dict = field(default_factory=dict, repr=False)  # {layer: int8 layer it follows} (run())

    def choose(self, op: Op) -> str:
        p = self.per_layer.get(layer_key(op), self.default)
        if p in QUANT_FLOAT:
            return QUANT_FLOAT[p]
        if layer_key(op) in self._flow:
            self.reasons[layer_key(op)] = f"between int8 layers (int8 flows through it to {self._flow[layer_key(op)]!r})"
            return "fp32"
        src = op.operands[0].producer if op.name == "Relu" and op.operands and op.operands[0] is not None else None
        if src is not None and self.per_layer.get(layer_key(src)) == "int8":
            # the Relu of an int8 layer: f32 like it, so Q(Relu(Conv)) folds (int8 flows on)
            self.reasons[layer_key(op)] = f"the Relu of int8 layer {layer_key(src)!r} (runs with it)"
            return "fp32"
        return p

    def run(self, module: Module) -> bool:
        if self.keep_patterns:
            pinned = keep_fp32_choice(module, self.default, self.keep_patterns, self.warn or (lambda s: None),
                                      self.imported_nodes)
            self.per_layer = {**self.per_layer, **pinned.per_layer}
            self.reasons = {**self.reasons, **pinned.reasons}
        self.decisions = []
        int8 = {k for k, v in self.per_layer.items() if v == "int8"}
        if int8:  # the MaxPool / view / Relu ops between two int8 layers run with them (int8 flows)
            from nnc.passes.quantize_int8 import flow_pins
            self._flow = flow_pins(module, int8)
        changed = lower_mixed(module, self.choose, self.decisions, self.reasons)
        quant = {p: {d.result.name for d in self.decisions if self.per_layer.get(d.layer) == p and d.result is not None}
                 for p in QUANT_FLOAT}
        if any(quant.values()):
            changed |= self._quantize(module, quant)
        return changed

    __call__ = run

    def _quantize(self, module: Module, quant: dict) -> bool:
        from nnc.passes import fold_qdq, quantize_fp8, quantize_int8
        if self.amax is None:
            raise NncError("int8 / fp8 layers need the calibration table (amax); precision best takes it from --calib")
        done = set()
        if quant["int8"]:
            scales = {k: v / quantize_int8.INT8_MAX for k, v in self.amax.items()}
            done |= quantize_int8.quantize_layers(module, scales, quant["int8"])
        if quant["fp8"]:
            done |= quantize_fp8.insert(module, self.amax, only=quant["fp8"])
        for d in self.decisions:
            if d.result is not None and d.result.name in done:
                d.wanted = d.got = self.per_layer[d.layer]
            elif self.per_layer.get(d.layer) in QUANT_FLOAT:
                d.wanted = self.per_layer[d.layer]
                d.why = (d.why + "; " if d.why else "") + f"not quantizable to {d.wanted}, runs at {d.got}"
        if self.fold:
            fold_qdq.rewrite(module)
        return bool(done)


def match_keep_fp32(op: Op, pattern: str) -> bool:
    """A --keep-fp32 pattern matches an op by its op type (exactly) or, as a glob, its ONNX node
    name or its first result's name."""
    if op.name == pattern:
        return True
    names = [op.loc.node] if op.loc.node else []
    names += [r.name for r in op.results[:1]]
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)


def keep_fp32_choice(module: Module, low: str, patterns, warn: Callable[[str], None],
                     imported_nodes=frozenset()) -> PrecisionChoice:
    """The choice for --keep-fp32: the layers matched by any pattern at fp32, the rest at `low`.
    A pattern matching no layer is reported through warn (naming it, and the imported ONNX nodes
    it matched that the cleanups merged away, e.g. a Conv that fold-batchnorm folded into its BN)."""
    ch = PrecisionChoice(low)
    for pat in patterns:
        hits = [op for op in module.main.ops if is_layer(op) and match_keep_fp32(op, pat)]
        if not hits:
            gone = sorted(n for n in imported_nodes if fnmatch.fnmatchcase(n, pat))
            hint = (f"; it matches ONNX node(s) {', '.join(map(repr, gone[:5]))}{' ...' if len(gone) > 5 else ''} "
                    "that the cleanup passes merged into other layers (nnc compile -v or plan.json "
                    "layer_precision lists the layers left)" if gone else "")
            warn(f"--keep-fp32 {pat!r} matches no layer (node name, result name or op type) of the model{hint}")
        for op in hits:
            ch.per_layer[layer_key(op)] = "fp32"
            ch.reasons.setdefault(layer_key(op), f"--keep-fp32 {pat}")
    return ch


def lower_mixed(module: Module, choose: Callable[[Op], str], decisions: Optional[list] = None,
                reasons: Optional[dict] = None) -> bool:
    """Rebuilds main with each layer at choose(op) (see the module docstring)."""
    f = module.main
    names = NameGen(value_names(module))
    old_ops = f.ops
    f.ops = []
    b = Builder(f, module.weights, names)
    cur: dict[int, Value] = {}             # id(original value) -> its value in the new function
    conv: dict[tuple, Value] = {}          # (id(original value), dtype short) -> converted value
    consts: dict[int, np.ndarray] = {}     # id(original f32 constant) -> its array
    changed = False

    def cast(v: Value, to: DType) -> Value:
        return b.create("Cast", [v], {"to": to.onnx if _cast_takes_int() else to})[0]

    def get(orig: Optional[Value], to: DType) -> Optional[Value]:
        nonlocal changed
        if orig is None:
            return None
        v = cur[id(orig)]
        if orig.type.dtype != F32 or v.type.dtype == to:
            return v
        key = (id(orig), to.short)
        if key not in conv:
            if id(orig) in consts and to != F32:
                conv[key] = b.constant(_narrow(consts[id(orig)], to), orig.name, orig.producer.loc,
                                       weight_hint=orig.name)
            else:
                conv[key] = cast(v, to)
            changed = True
        return conv[key]

    for a in f.args:
        cur[id(a)] = a
    for op in old_ops:
        if op.name == "const":
            val = const_value(op.results[0], module.weights)
            if val is not None and val.dtype == np.float32:
                consts[id(op.results[0])] = val
            f.ops.append(op)
            cur[id(op.results[0])] = op.results[0]
            continue
        if not is_layer(op) and not any(v is not None and v.type.dtype == F32 for v in op.operands):
            op.operands = [None if v is None else cur[id(v)] for v in op.operands]
            f.ops.append(op)
            for r in op.results:
                cur[id(r)] = r
            continue
        if is_layer(op):
            wanted = choose(op)
        else:  # float operands, no f32 result (Shape, ArgMax, ...): at its first float operand's dtype
            first = next(cur[id(v)] for v in op.operands if v is not None and v.type.dtype == F32)
            wanted = precision_name(first.type.dtype)
        low = ir_dtype(wanted)
        why = (reasons or {}).get(layer_key(op), "")
        if op.regions():  # sub-graphs keep their own types: run the op at f32
            low, why = F32, "has regions (runs at fp32)"
        outs = None
        if low != F32:
            for r in op.results:
                names.taken.discard(r.name)
            try:
                ins = [get(v, F32 if exact_operand(op, i) else low) for i, v in enumerate(op.operands)]
                outs = b.create(op.name, ins, lowered_attrs(op, low, ins),
                                num_results=len(op.results), names=[r.name for r in op.results], loc=op.loc)
                changed = True
            except NncError as e:  # the op insists on f32 somewhere: run it at f32
                low, why = F32, f"rejects {wanted}: {e}"[:200]
        if outs is None:
            op.operands = [get(v, F32) for v in op.operands]
            f.ops.append(op)
            for r in op.results:
                names.taken.add(r.name)
            outs = op.results
        for r, o in zip(op.results, outs):
            cur[id(r)] = o
        if decisions is not None and is_layer(op):
            decisions.append(Decision(layer_key(op), op.name, op.loc.node, wanted, precision_name(low), why,
                                      outs[0] if outs else None))
    results = [get(r, r.type.dtype) for r in f.results]
    keep_output_names(f, results, names)
    f.results = results
    return changed


# ----------------------------------------------------------------------------- options

# fastest first under the heuristic (precision_search.HeuristicCost): int8 (the int8 tensor-core
# kernels), then fp16 / bf16, then fp8 (its CUDA path still dequantizes into the fp16 GEMM:
# docs/fp8.md, so it is no faster than fp16 today), then fp32
SPEED_ORDER = ("int8", "fp16", "bf16", "fp8", "fp32")
QUANT_FLOAT = {"int8": "fp32", "fp8": "fp16"}  # quantized layer types -> the float form they are lowered from
DEFAULT_ALLOW = ("fp16", "bf16", "fp32")
DEFAULT_MAX_REL_ERR = 1e-2  # the project's fp16/bf16 tolerance


def _names(what: str, val) -> tuple[str, ...]:
    if val is None or val == "":
        return ()
    items = val.split(",") if isinstance(val, str) else list(val)
    if not all(isinstance(x, str) for x in items):
        raise NncError(f"{what}: expected a comma-separated string or a list of strings, given {val!r}")
    items = [x.strip() for x in items]
    if any(not x for x in items):
        raise NncError(f"{what}: empty entry in {val!r}")
    return tuple(dict.fromkeys(items))


def check_options(o) -> None:
    """Validates and normalises CompileOptions' per-layer precision fields (called from its
    __post_init__)."""
    import math
    import os
    keep = _names("keep_fp32", o.keep_fp32)
    allow = _names("allow", o.allow)
    object.__setattr__(o, "keep_fp32", keep)
    if keep and o.precision == "fp32":
        raise NncError("keep_fp32 (--keep-fp32) needs precision fp16, bf16 or best: at fp32 every layer already is")
    best = o.precision == "best"
    for what, given in (("allow (--allow)", allow), ("max_rel_err (--max-rel-err)", o.max_rel_err),
                        ("calib_data (--calib-data)", o.calib_data)):
        if given not in ((), None) and not best:
            raise NncError(f"{what} only goes with precision 'best', not {o.precision!r}")
    if not best:
        return
    for a in allow:
        if a not in FLOAT_PRECISIONS and a not in QUANT_FLOAT:
            raise NncError(f"allow: unknown type {a!r}; expected some of {', '.join(SPEED_ORDER)}")
    quant = [a for a in allow if a in QUANT_FLOAT]
    if quant and o.calib is None:
        raise NncError(f"allow {','.join(quant)}: int8 / fp8 layers need calibration scales; pass --calib "
                       "calib.json (from `nnc calibrate`) or a TensorRT cache, or allow only float types")
    allow = allow or DEFAULT_ALLOW
    object.__setattr__(o, "allow", tuple(p for p in SPEED_ORDER if p in allow))
    e = DEFAULT_MAX_REL_ERR if o.max_rel_err is None else o.max_rel_err
    if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or not e > 0:
        raise NncError(f"max_rel_err (--max-rel-err) must be a positive finite number, not {o.max_rel_err!r}")
    object.__setattr__(o, "max_rel_err", float(e))
    if o.calib_data is not None:
        object.__setattr__(o, "calib_data", os.fspath(o.calib_data))


def storage_precision(o) -> str:
    """The precision code generation is told (its cache key and plan.json's codegen view): for
    'best' the fastest allowed type, which most layers start at."""
    if o.precision != "best":
        return o.precision
    return next((p for p in o.allow if p in FLOAT_PRECISIONS), "fp32")  # int8 / fp8 layers: their float form
