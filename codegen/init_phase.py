"""The load-time init phase: values computed from constants only, once, when a model is loaded.

Constant folding (compiler/passes/fold_constants.py) leaves an op unevaluated when its result is
big (over FOLD_MAX_ELEMENTS, e.g. light_resnet50's ConstantOfShape-made weights): folding it
would grow weights.bin by the result's bytes. Such a value, and everything computed from it and
other constants only, does not depend on the inputs, so its kernels belong to an init phase that
runs once at load (Python `Module.__init__`, C `nnc_model_create`), never on every run.

How the lowering uses this module:
- `input_independent(func)`: the ids of the values that are *init values*: results of
  deterministic ops (registry `foldable`, no regions, static result shapes, no data-dependent
  extent) whose every operand is a `const` or another init value. A property of the data flow,
  not a list of op names.
- The launches that compute init values go to `Plan.init_launches` (each `Launch.init` is True);
  their result buffers have kind "init" and live in their own region, "persistent", allocated at
  load next to the weights and never reused by activations (the arena is, every run).
  Scratch temps of init launches stay ordinary arena temps: the init phase runs before any run,
  so the memory planner sees one sequence, init launches first.
- `place_persistent(plan)`: lays out the init buffers back to back (256-byte aligned) and records
  `memory["persistent_bytes"]`; `check(plan)`: init launches never touch the inputs or outputs
  and never read extents back.
Values computed from both init values and inputs are ordinary run-time launches that read the
persistent buffer. The interpreter and the reference backend evaluate the IR as is.
"""
from __future__ import annotations

from ..ir import registry
from ..ir.graph import Function, Op

PERSISTENT = "persistent"  # region name in plan.json and the generated host code
INIT_KIND = "init"  # Buffer.kind of an init value's buffer


def _static(op: Op) -> bool:
    return all(r.type.shape is not None and all(isinstance(d, int) and d >= 0 for d in r.type.shape)
               for r in op.results)


def is_init_op(op: Op, init: set[int], data_dependent=frozenset()) -> bool:
    """True when op computes only from constants and already-known init values (`init`: value ids)."""
    if op.name == "const" or op.regions() or op.name in data_dependent or not _static(op):
        return False
    if not registry.get(op.name).foldable:  # not deterministic: recomputed on every run
        return False
    for v in op.operands:
        if v is None:
            continue
        p = v.producer
        if not ((p is not None and p.name == "const") or id(v) in init):
            return False
    return True


def input_independent(func: Function, data_dependent=frozenset()) -> set[int]:
    """Ids of the values of `func`'s top-level ops computed from constants only (see the module
    docstring). `data_dependent`: ops whose result extent is known only after they ran."""
    init: set[int] = set()
    for op in func.ops:
        if is_init_op(op, init, data_dependent):
            init.update(id(r) for r in op.results)
    return init


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def place_persistent(plan, align: int) -> int:
    """Offsets of the init buffers (roots) in the persistent region; returns its size in bytes."""
    from .plan import Buffer
    used = {id(plan.root(a)) for l in plan.init_launches + plan.launches for a in l.args
            if isinstance(a, Buffer)}
    off = 0
    for b in plan.buffers:
        if b.kind == INIT_KIND and b.alias_of is None:
            if id(b) not in used:
                continue  # no launch touches it: no bytes needed
            off = _align(off, align)
            b.offset = off
            off += max(b.nbytes, 1)
    size = _align(off, align) if off else 0
    plan.persistent_bytes = size
    plan.memory["persistent_bytes"] = size
    return size


def check(plan) -> None:
    """Internal invariants of the init phase (a violation is a compiler bug, reported as one)."""
    from .errors import LoweringError
    from .plan import Buffer
    for l in plan.init_launches:
        if l.kind not in ("kernel", "memcpy"):
            raise LoweringError(f"internal: init-phase launch of kind {l.kind!r} ({l.op})")
        for a in l.args:
            if isinstance(a, Buffer) and plan.root(a).kind in ("input", "output"):
                raise LoweringError(f"internal: init-phase launch touches {plan.root(a).kind} "
                                    f"%{plan.root(a).name} ({l.op})")
