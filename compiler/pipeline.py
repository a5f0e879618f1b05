"""The pass pipeline: one flat, ordered list, plus instruments around every pass.

Instruments: `verify_each` runs the verifier after every pass (tests always do), `dump_dir`
writes `NN-<pass>.nnir` after each pass (MLIR's print-ir-after-all), and each pass is timed.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import progress
from .ir.errors import NncError
from .ir.graph import Module
from .ir.printer import print_module
from .ir.verify import verify

# name -> "module[:function]" under nnc.passes; the function (default `run`) takes the module and
# returns whether it changed anything
PASSES = {
    "canonicalize": "canonicalize",
    "fold-constants": "fold_constants",
    "dce": "dce",
    "inline-if": "inline_if",
    "unroll-loops": "unroll_loops",
    "simplify": "simplify",
    "cse": "cse",
    "fold-batchnorm": "fold_batchnorm",
    "fold-qdq": "fold_qdq",
    "quantize-weights-int4": "quantize_weights_int4",  # --weights int4 (compiler/driver.pipeline_passes)
    "sparsify-weights-24": "sparsify_weights_24",  # --sparsity enable|force (compiler/driver.pipeline_passes)
    "fuse-horizontal": "fuse_horizontal",
    "fuse-attention": "fuse_attention",
    "assign-layout": "assign_layout",
    "fuse-epilogue": "fuse_epilogue",
    "fuse-cross-layer": "fuse_cross_layer",
    "fuse-pooling": "fuse_pooling",
    "fuse-reduction": "fuse_reduction",
    "fuse-elementwise": "fuse_elementwise",
    "schedule-memory": "schedule_memory",
    "time-fusion": "time_fusion",
    "layer-wavefront": "layer_wavefront",
    "to-fp16": "to_precision:run_fp16",
    "to-bf16": "to_precision:run_bf16",
}

# The default pipeline, top to bottom. Order matters where commented.
DEFAULT_PIPELINE = [
    "fold-constants",   # first: turns shape subgraphs left after import into constants
    "inline-if",        # after folding: needs constant conds (and static branch types) to flatten Ifs
    "unroll-loops",     # after inline-if: a constant If around a Loop/Scan must be gone first; needs
                        # folded trip counts. The CUDA backend has no control flow, so both precede it
    "fold-constants",   # again: unrolled copies and inlined branches leave all-constant chains
    "canonicalize",     # needs folded constants to see no-op Reshape/Expand/Cast
    # cleanups: after fold-constants/inline-if/unroll-loops (their constants and flattened graph)
    # and before any fusion pass
    "simplify",         # after canonicalize (which merged Reshape/Transpose pairs): Dropout, exact
                        # Cast round trips, view chains; before cse so that the copies it unwraps merge
    "cse",              # before fold-batchnorm: two equal BNs reading one conv would block the fold
    "fold-qdq",         # Q(Conv/MatMul/Gemm(DQ(x_q), DQ(w_q))) -> QLinearConv/QLinearMatMul/MatMulInteger.
                        # After fold-constants/canonicalize (scales, zero points, weights are consts)
                        # and cse (equal DQs merged); before fold-batchnorm (which would scale a DQ'd
                        # weight by a Mul) and every fusion pass (they would take the float conv)
    "fold-batchnorm",   # needs the BN parameters folded to consts; its new weights are unique
    "fuse-horizontal",  # after cse (equal readers of x merged) and fold-batchnorm (conv biases final),
                        # before the fusion passes: they then put the stacked bias/activation into the
                        # one GEMM/conv's epilogue; before dce, which sweeps the members' old weights
    "dce",              # sweeps what folding, canonicalisation and the cleanups left unused
    "time-fusion",      # LSTM/GRU/RNN -> projection Gemm + `recurrence`. After fold-constants /
                        # canonicalize / simplify (W, B, zero initial states and the exporters' glue
                        # must be folded constants and plain views) and, at fp16/bf16, after the
                        # precision passes (in LAYOUT_PASSES: the recurrence takes the storage dtype;
                        # to-fp16 would keep an op with a region at f32); before assign-layout and the
                        # fusion passes, so the projection gets fuse-epilogue's bias epilogue and the
                        # GEMM variants like any Gemm. (fuse-horizontal has nothing to merge: the
                        # directions' gate weights are already one [I, D*gates*H] constant)
    "layer-wavefront",  # right after time-fusion (it takes the recurrence -> Gemm -> recurrence chains that
                        # pass leaves): stacked unidirectional layers -> one recurrence_stack, lowered
                        # hoisted (per layer) or as a wavefront (compiler/passes/layer_wavefront.py)
    # fusion: after the cleanups (cse, fold-batchnorm, simplify: BN must already be in the conv's
    # weights and bias for conv+bias+act+residual chains to be visible) and, at fp16/bf16, after
    # the precision passes (see FUSION_PASSES). fuse-epilogue comes before fuse-elementwise, which
    # would otherwise take the Add/Relu chains after convs and GEMMs into elementwise groups
    "assign-layout",    # after fold-batchnorm (BN already in the NCHW weights) and, at fp16/bf16,
                        # after the precision passes (it picks convs by dtype: see LAYOUT_PASSES);
                        # before fuse-epilogue, so conv+bias+act+residual fuse into the NHWC conv
    "fuse-attention",   # first fusion pass: before fuse-epilogue, which would take MatMul(Q, K^T) * c
                        # as a GEMM epilogue and break the pattern; the Q/K/V projection GEMMs stay
                        # outside the group, so fuse-epilogue still gives them their bias epilogues
    "fuse-epilogue",
    "fuse-cross-layer",  # after fuse-epilogue (it pairs a depthwise conv group with the 1x1 conv group
                        # reading it, each already carrying its epilogue) and assign-layout (NHWC only)
    "fuse-pooling",     # after fuse-epilogue (the classifier Gemm carries its bias/cast epilogue) and
                        # assign-layout (its NHWC ReduceMean form of a GlobalAveragePool); before
                        # fuse-reduction, which could take the ReduceMean
    "fuse-reduction",   # after fuse-epilogue (a residual Add already in a GEMM's epilogue stays
                        # there) and fuse-attention (which takes attention's Softmax first); before
                        # fuse-elementwise, which would take the mask Add / scale / residual Add
                        # around Softmax and LayerNorm into elementwise groups
    "fuse-elementwise",  # after fuse-epilogue: takes the elementwise/broadcast groups it left
    "schedule-memory",  # last: after fusion, because fusion changes which tensors exist; only
                        # reorders ops, and only where the estimated peak of live bytes drops
]
# Passes that outline `fused` ops. The precision passes treat ops with regions as opaque f32
# islands, so `pipeline_passes(precision)` (compiler/driver.py) runs them before the first of these.
FUSION_PASSES = ("fuse-attention", "fuse-epilogue", "fuse-cross-layer", "fuse-pooling", "fuse-reduction",
                 "fuse-elementwise")
# Passes that fuse ops without outlining a region: a BatchNormalization folded into its conv's weights,
# parallel GEMMs merged into one. `--no-fuse` (fuse=False: about one kernel per ONNX op, the baseline
# the fused build is measured against) leaves these out as well as FUSION_PASSES.
FOLDING_FUSIONS = ("fold-batchnorm", "fuse-horizontal")
# Passes that pick ops by dtype: `pipeline_passes(precision)` runs the precision passes before these too.
LAYOUT_PASSES = ("time-fusion", "assign-layout")


def get_pass(name: str) -> Callable[[Module], bool]:
    if name not in PASSES:
        raise NncError(f"unknown pass {name!r}; known passes: {', '.join(PASSES)}")
    mod, _, fn = PASSES[name].partition(":")
    return getattr(importlib.import_module(f"nnc.passes.{mod}"), fn or "run")


@dataclass
class PassRecord:
    name: str
    seconds: float
    changed: bool
    ops: int = 0  # ops in the module after the pass (nested regions included)


def count_ops(module: Module) -> int:
    return sum(1 for f in module.functions for _ in f.walk())


@dataclass
class Pipeline:
    passes: list = field(default_factory=lambda: list(DEFAULT_PIPELINE))
    verify_each: bool = False
    dump_dir: Path | None = None
    records: list = field(default_factory=list)

    def run(self, module: Module) -> Module:
        # unknown names fail before any work; an entry may also be a (name, callable) pair: a pass
        # configured by the driver (mixed-precision's per-layer choice, compiler/driver.py)
        fns = [(n, get_pass(n)) if isinstance(n, str) else tuple(n) for n in self.passes]
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / "00-input.nnir").write_text(print_module(module))
        rep = progress.current()  # the progress bar / `-v` lines (silent unless the CLI set one)
        with rep.stage("passes", total=len(fns)) as task:
            for i, (name, fn) in enumerate(fns, 1):
                task.describe(name)
                t0 = time.perf_counter()
                changed = fn(module)
                rec = PassRecord(name, time.perf_counter() - t0, bool(changed), count_ops(module))
                self.records.append(rec)
                rep.log(f"  pass {name:<16} {rec.seconds * 1e3:9.1f} ms {rec.ops:8d} ops"
                        f"{'  (changed)' if rec.changed else ''}")
                if self.verify_each:
                    try:
                        verify(module)
                    except NncError as e:
                        raise NncError(f"after pass {name!r}: {e}") from None
                if self.dump_dir is not None:
                    (self.dump_dir / f"{i:02d}-{name}.nnir").write_text(print_module(module))
                task.advance()
        return module


def run_passes(module: Module, passes=None, verify_each=False, dump_dir=None) -> Module:
    return Pipeline(list(DEFAULT_PIPELINE if passes is None else passes), verify_each,
                    Path(dump_dir) if dump_dir else None).run(module)
