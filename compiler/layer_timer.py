"""Per-layer GPU timing for `--precision best --tune`: the time of one layer at one precision.

    timer = LayerTimer(options, amax, storage)        # options: the CompileOptions of the build
    seconds = timer(op, "int8")                       # op: a layer of the module best searches

For (op, precision) it builds a one-layer module: the op's non-constant float operands become
function arguments at the storage type (the type most layers run at, `storage`), each cast to the
op's f32 operand type (the cast result keeps the operand's name, so the calibration table finds
it), the op's constants are copied, and its first result is cast back to the storage type and
returned. Then the precision pass with that one layer at `precision`
(mixed_precision.PrecisionChoice: int8 / fp8 get their Q/DQ and fold as in the real build), the
rest of `nnc compile`'s pipeline from the precision point on (layout, fusion), code generation
(`compile_to_dir`, no kernel tuning) and `measure(out_dir) -> seconds` (default: nnc bench's
median GPU compute time of 20 runs). So the time includes what that precision costs around the
layer in a storage-typed neighbourhood: the Q of an int8 / fp8 layer's input, the casts of an
fp32 layer. Results are cached by the layer's op, attributes, operand types and precision, so the
repeated blocks of a network are built once.
Requires: a static-shaped layer (lowering needs it) and, for measure's default, a GPU.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

BENCH_ITERATIONS = 20


def gpu_median_seconds(out_dir) -> float:
    from .bench import BenchOptions, bench
    r = bench(out_dir, BenchOptions(iterations=BENCH_ITERATIONS, warmup=3))
    ms = (r.gpu_compute_ms or {}).get("median")
    if ms is None:
        raise RuntimeError(f"nnc bench gave no GPU time for {out_dir}")
    return float(ms) * 1e-3


class LayerTimer:
    def __init__(self, options, amax: Optional[dict], storage: str,
                 measure: Callable[[Path], float] = gpu_median_seconds, workdir=None):
        self.options = options
        self.amax = amax
        self.storage = storage
        self.measure = measure
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="nnc_layer_time_"))
        self.cache: dict = {}
        self.builds = 0
        self.src_weights = None  # the searched module's WeightStore (precision_search sets it)

    def key(self, op, precision: str) -> tuple:
        return (op.name, repr(op.attrs), precision,
                tuple("-" if v is None else str(v.type) + ("c" if _is_const(v) else "") for v in op.operands))

    def __call__(self, op, precision: str) -> float:
        k = self.key(op, precision)
        if k not in self.cache:
            out = self.workdir / f"layer{len(self.cache)}"
            self.compile(op, precision, out)
            self.cache[k] = float(self.measure(out))
        return self.cache[k]

    def module(self, op):
        """(the one-layer module before the precision pass, its layer key): see the module docstring."""
        from .ir.builder import Builder, const_value
        from .ir.graph import Function, Module, NameGen, Value
        from .ir.types import TensorType
        from .ir.weights import WeightStore
        from .passes.mixed_precision import ir_dtype
        from .passes.to_precision import _cast_takes_int
        low = ir_dtype(self.storage)
        weights = WeightStore()
        f = Function([], [], [], "main")
        names = NameGen()
        b = Builder(f, weights, names)  # names are hints: the operands' and results' own names are free

        def cast(v, to, name):
            return b.create("Cast", [v], {"to": to.onnx if _cast_takes_int() else to}, names=[name])[0]

        operands, made = [], {}
        for v in op.operands:
            if v is None:
                operands.append(None)
            elif id(v) in made:  # the same activation twice (MatMul(x, x))
                operands.append(made[id(v)])
            elif _is_const(v):
                operands.append(b.constant(np.asarray(const_value(v, self.src_weights)), v.name + ".c",
                                           weight_hint=v.name))
            elif v.type.dtype.short == "f32" and low.short != "f32":
                a = Value(names(f"{v.name}.in"), TensorType(low, v.type.shape))
                f.args.append(a)
                operands.append(cast(a, v.type.dtype, v.name))  # the calibration table's name
                made[id(v)] = operands[-1]
            else:
                a = Value(names(v.name), v.type)
                f.args.append(a)
                operands.append(a)
                made[id(v)] = a
        outs = b.create(op.name, operands, op.attrs, num_results=len(op.results),
                        names=[r.name for r in op.results], loc=op.loc)
        y = outs[0]
        if y.type.dtype.short == "f32" and low.short != "f32":
            y = cast(y, low, f"{y.name}.out")
        f.results = [y]
        return Module([f], weights), outs[0].name

    def compile(self, op, precision: str, out: Path) -> dict:
        from .codegen.emit import compile_to_dir
        from .codegen.target import resolve_target
        from .driver import pipeline_passes, precision_point
        from .ir.verify import verify
        from .passes.mixed_precision import PrecisionChoice
        from .pipeline import Pipeline
        m, key = self.module(op)
        verify(m)
        choice = PrecisionChoice(self.storage, {key: precision}, amax=self.amax, fold=True)
        rest = pipeline_passes("fp32", self.options.fuse)
        rest = rest[precision_point(rest):]
        Pipeline([("mixed-precision", choice), "canonicalize", "dce"] + rest).run(m)
        co = self.options.codegen_options(resolve_target(self.options.arch))
        co = dataclasses.replace(co, lower=dataclasses.replace(co.lower, tune=False, tune_reason="layer timing"))
        self.builds += 1
        return compile_to_dir(m, out, name="layer", options=co)



def _is_const(v) -> bool:
    return v.producer is not None and v.producer.name == "const"
