"""Lowers a float32 model to fp16 or bf16 storage (`--precision fp16|bf16`).

Rewrites: every f32 value inside the main function becomes f16/bf16; f32 constants are converted
(new weights); dtype-carrying attributes that produce f32 (Cast `to`, ConstantOfShape `value`, ...)
are retargeted; function arguments and results keep their declared f32 types, with a Cast at entry
and exit, so the model's interface does not change. An op whose inference rejects the low
precision keeps f32: its operands are cast up and its results cast down around it.
Quantization parameters stay exact (EXACT_OPERANDS): the f32 scales of QuantizeLinear /
DequantizeLinear / QLinearConv / QLinearMatMul / matmul_fp8 / conv_fp8 keep their f32 constants (a
DequantizeLinear then gets output_dtype = the low type, so only its result is narrowed), and a
QuantizeLinear keeps its `precision` attribute; so "scales and zero points are respected exactly"
holds at fp16/bf16 too (zero points are integer / fp8 and never change).
Requires: a verified module with static or symbolic shapes. Kernels still accumulate in fp32
(softmax, normalisation statistics and GEMM accumulators), so this changes storage only.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from nnc.ir import registry
from nnc.ir.builder import Builder, const_value
from nnc.ir.errors import NncError
from nnc.ir.graph import Module, NameGen, Value, value_names
from nnc.ir.types import F32, DType, dtype


# operand indices that are quantization scales, per op: a precision pass keeps them at their f32
# constant (a scale rounded to fp16 changes which integer every value quantizes to); the kernels
# read scales in their own dtype (codegen/kernels/quantize.py, intgemm, gemm_fp8). Not listed:
# matmul_int4_weight, whose scales take the activation's dtype like its weights (the int4 kernel
# applies them in that dtype; ir/ops/gemm_int4.py).
EXACT_OPERANDS = {"QuantizeLinear": (1,), "DequantizeLinear": (1,), "QLinearConv": (1, 4, 6),
                  "QLinearMatMul": (1, 4, 6), "matmul_fp8": (1, 3), "conv_fp8": (1, 3)}
_KEEP_ATTRS = {"QuantizeLinear": ("precision",)}  # dtype attributes a precision pass leaves alone


def exact_operand(op, i: int) -> bool:
    """Operand i of op is a quantization scale that the precision passes keep exact."""
    return i in EXACT_OPERANDS.get(op.name, ())


def lowered_attrs(op, low: DType, operands):
    """op's attributes at storage type `low` (_retarget_attrs), given its new operands: a
    DequantizeLinear whose scale stays f32 writes `low` (output_dtype), a QuantizeLinear keeps its
    division precision."""
    attrs = _retarget_attrs(op.attrs, low, _KEEP_ATTRS.get(op.name, ()))
    if op.name == "DequantizeLinear" and attrs.output_dtype is None and op.results[0].type.dtype == F32 \
            and operands[1] is not None and operands[1].type.dtype == F32:
        attrs = dataclasses.replace(attrs, output_dtype=low)
    return attrs


def _retarget_attrs(attrs, low: DType, keep=()):
    if attrs is None or not dataclasses.is_dataclass(attrs):
        return attrs
    changes = {}
    for f in dataclasses.fields(attrs):
        if f.name in keep:
            continue
        v = getattr(attrs, f.name)
        if isinstance(v, DType) and v == F32:
            changes[f.name] = low
        elif isinstance(v, np.ndarray) and v.dtype == np.float32:
            changes[f.name] = v.astype(low.np)
        elif f.name in ("to", "dtype", "output_datatype") and isinstance(v, int) and v == F32.onnx:
            changes[f.name] = low.onnx
    return dataclasses.replace(attrs, **changes) if changes else attrs


def lower(module: Module, low: DType) -> bool:
    f = module.main
    names = NameGen(value_names(module))
    old_ops = f.ops
    f.ops = []
    b = Builder(f, module.weights, names)
    vmap: dict[int, Value] = {}
    f32_consts: dict[int, object] = {}  # id(f32 const result) -> its const op (for EXACT_OPERANDS)
    kept: set = set()  # ids of those const ops already back in f.ops

    def exact(v: Value) -> Value:
        """v as the model had it: an f32 constant keeps its f32 op (not the narrowed copy)."""
        if id(v) in f32_consts:
            if id(v) not in kept:
                kept.add(id(v))
                f.ops.append(f32_consts[id(v)])
            return v
        return vmap[id(v)]

    def cast(v: Value, to: DType) -> Value:
        return b.create("Cast", [v], {"to": to.onnx if _cast_takes_int() else to})[0]

    for a in f.args:
        vmap[id(a)] = cast(a, low) if a.type.dtype == F32 else a
    changed = False
    for op in old_ops:
        if op.regions():  # sub-graphs keep their own types: run the op at f32
            ins = [None if v is None else (cast(vmap[id(v)], F32) if vmap[id(v)].type.dtype == low and v.type.dtype == F32
                                           else vmap[id(v)]) for v in op.operands]
            op.operands = ins
            f.ops.append(op)
            for r in op.results:
                vmap[id(r)] = cast(r, low) if r.type.dtype == F32 else r
            continue
        if op.name == "const":
            val = const_value(op.results[0], module.weights)
            if val is not None and val.dtype == np.float32:
                f32_consts[id(op.results[0])] = op
                vmap[id(op.results[0])] = b.constant(_narrow(val, low), op.results[0].name, op.loc,
                                                     weight_hint=op.results[0].name)
                changed = True
                continue
            f.ops.append(op)
            vmap[id(op.results[0])] = op.results[0]
            continue
        ins = [None if v is None else (exact(v) if exact_operand(op, i) else vmap[id(v)])
               for i, v in enumerate(op.operands)]
        opdef = registry.get(op.name)
        attrs = lowered_attrs(op, low, ins)
        try:
            outs = b.create(op.name, ins, attrs, num_results=len(op.results),
                            names=[r.name for r in op.results], loc=op.loc)
            changed = True
        except NncError:  # the op insists on f32 somewhere: run it at f32
            for r in op.results:
                names.taken.discard(r.name)
            # an f32 constant keeps its own op (no round trip through the low type)
            ins32 = [None if v is None else exact(o) if id(o) in f32_consts else
                     (cast(v, F32) if v.type.dtype == low else v) for o, v in zip(op.operands, ins)]
            outs = b.create(op.name, ins32, op.attrs, num_results=len(op.results),
                            names=[r.name + ".f32" for r in op.results], loc=op.loc)
            outs = [cast(o, low) if o.type.dtype == F32 else o for o in outs]
        del opdef
        for r, o in zip(op.results, outs):
            vmap[id(r)] = o
    results = []
    for r in f.results:
        v = vmap[id(r)]
        if r.type.dtype == F32 and v.type.dtype != F32:
            v = cast(v, F32)
        results.append(v)
    keep_output_names(f, results, names)
    f.results = results
    return changed


def keep_output_names(f, results, names) -> None:
    """The model's output names stay on the values finally returned (`results`, one per
    f.results): a value already holding such a name is renamed `<name>.low` (also mixed-precision's)."""
    by_name: dict = {}  # name -> values of that name, in program order (one index, not a scan per output)
    for op in f.ops:
        for x in op.results:
            by_name.setdefault(x.name, []).append(x)

    def rename(x, name):
        by_name[x.name] = [y for y in by_name.get(x.name, []) if y is not x]
        x.name = name
        by_name.setdefault(name, []).append(x)

    for r, v in zip(f.results, results):
        if v.name != r.name:
            names.taken.discard(v.name)
            clash = next((x for x in by_name.get(r.name, []) if x is not v), None)
            if clash is not None:
                rename(clash, names(r.name + ".low"))
            rename(v, r.name)


def _narrow(val: np.ndarray, low: DType) -> np.ndarray:
    """f32 constant -> low precision, finite values saturating at the type's largest finite value
    (attention masks written as -3.4e38 stay a huge negative instead of turning into -inf, which
    would make a fully masked softmax row NaN)."""
    import ml_dtypes
    big = float(ml_dtypes.finfo(low.np).max)
    finite = np.isfinite(val)
    return np.where(finite, np.clip(val, -big, big), val).astype(low.np)


def _cast_takes_int() -> bool:
    spec = registry.attr_specs(registry.get("Cast").attrs)["to"]
    return spec.base is int


def run_fp16(module: Module) -> bool:
    return lower(module, dtype("f16"))


def run_bf16(module: Module) -> bool:
    return lower(module, dtype("bf16"))
