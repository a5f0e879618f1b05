"""Data-dependent sizes downstream of NonZero (issue 10): one runtime size symbol per extent.

NonZero's result is i64[rank, ?]: its count is known only after its kernel ran (a device count,
then one host read-back: templates/nonzero.cu.j2, kernels/special.py). Before lowering, `symbolize`
gives each such `?` a fresh symbol nnc_nz<k> (bounded by the numel of NonZero's input) and
re-infers the types of the ops downstream, so Transpose / GatherND / elementwise / reductions over
it see the same symbol. Lowering then treats it like a range profile's symbol
(codegen/runtime_sizes.py): buffers sized at the bound, runtime-size kernel variants, sizes and
grids as expressions per run. Only the binding differs: a range symbol comes from an input shape
before the run; a data-dependent one from the read-back of the NonZero result whose buffer has it
in its sym_shape ("dynamic": true in plan.json), after that launch. The CPU plan executor
(codegen/plan_exec.py) and the CUDA runtime (compiler/runtime.py) bind it there; launches after
it use the exact size.

The IR keeps its `?` dims (restore() after lowering): ir/final.nnir and the reference interpreter
are unchanged; only the plan's buffers carry the symbols. A `?` that re-inference cannot express
with the symbol (an op without a shape rule over it, a region op) stays `?`, and lowering reports
that value as before ("needs static shapes").
"""
from __future__ import annotations

from ..ir.builder import const_value
from ..ir.errors import NncError
from ..ir.registry import get as get_op, run_infer
from ..ir.symbolic import Expr, sym
from ..ir.types import TensorType

PREFIX = "nnc_nz"


def _unknown(d) -> bool:
    return isinstance(d, Expr) and d.kind == "unknown"


def _symbols_of(module) -> set:
    out = set()
    for v in list(module.main.args) + [r for op in module.main.ops for r in op.results]:
        for d in (v.type.shape or ()):
            if isinstance(d, Expr):
                out |= set(d.symbols)
    return out


class Symbolized:
    """What symbolize did: the new symbols [(name, max)] and the original types to restore."""

    def __init__(self):
        self.symbols: list = []
        self._saved: list = []  # (Value, original TensorType)

    def set_type(self, v, t: TensorType) -> None:
        self._saved.append((v, v.type))
        v.type = t

    def restore(self) -> None:
        for v, t in reversed(self._saved):
            v.type = t
        self._saved.clear()


def symbolize(module) -> Symbolized:
    """Gives the unknown count of each top-level NonZero that some op consumes (over a static
    input) a symbol and re-infers the ops downstream (in place; call .restore() when lowering is
    done). A model with no such NonZero (one only returned, say): no change."""
    s = Symbolized()
    f = module.main
    taken = _symbols_of(module)
    changed: set = set()
    used = {id(v) for op in f.ops for v in op.operands if v is not None}  # a NonZero only returned keeps its `?`
    try:
        for op in f.ops:
            if op.name == "NonZero" and not op.regions() and len(op.results) == 1:
                x, (r,) = op.operands[0], op.results
                t = r.type
                if x is not None and x.type.is_static and t.shape is not None and len(t.shape) == 2 \
                        and _unknown(t.shape[1]) and id(r) in used:
                    k = len(s.symbols)
                    while f"{PREFIX}{k}" in taken:
                        k += 1
                    name = f"{PREFIX}{k}"
                    taken.add(name)
                    numel = 1
                    for d in x.type.shape:
                        numel *= int(d)
                    s.symbols.append((name, numel))
                    s.set_type(r, TensorType(t.dtype, (t.shape[0], sym(name)), t.layout))
                    changed.add(id(r))
                continue
            if op.regions() or not any(v is not None and id(v) in changed for v in op.operands):
                continue
            try:
                types = run_infer(get_op(op.name), op.attrs, list(op.operands), len(op.results), op.loc,
                                  lambda v: const_value(v, module.weights) if v.producer is not None
                                  and v.producer.name == "const" else None)
            except NncError:  # no shape rule over the symbol: its `?` stays (lowering names it)
                continue
            for r, t in zip(op.results, types):
                if t.shape is not None and r.type.shape is not None and t.shape != r.type.shape \
                        and t.dtype == r.type.dtype and len(t.shape) == len(r.type.shape) \
                        and all(_unknown(a) or a == b for a, b in zip(r.type.shape, t.shape)):
                    s.set_type(r, TensorType(r.type.dtype, tuple(t.shape), r.type.layout))
                    changed.add(id(r))
    except Exception:
        s.restore()
        raise
    return s
