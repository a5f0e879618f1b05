"""A kernel's pre-transformed weight when the weight is an init value, not a `const`.

`LowerCtx.weight(i, transform)` re-lays a constant operand out at compile time with numpy (e.g. a
conv weight OIHW -> OHWI for the implicit GEMM). An operand computed from constants only (an init
value, codegen/init_phase.py: light_resnet50's ConstantOfShape weights, scaled by fold-batchnorm's
`Mul`, stay ops because folding them would put ~100 MB into weights.bin) has no value at compile
time, but it is fixed once the init phase has run. So the same transform runs on the device, in
the init phase: `init_transformed` allocates the transformed buffer in the persistent region
(kind "init") and lets the lowering emit the transform's launches into `Plan.init_launches`.
The per-run launches then read the transformed buffer like any weight; nothing is recomputed per
run. Cached per (value, key) like `ctx.weight`, so a weight two ops read is transformed once.
"""
from __future__ import annotations

from typing import Callable, Optional

from . import init_phase
from .plan import Buffer


def is_init_operand(ctx, i: int) -> bool:
    """Operand i of the op being lowered is an init value (computed at load, read-only per run)."""
    return ctx.has(i) and id(ctx.L.canon(ctx.op.operands[i])) in ctx.L.init_values


def init_transformed(ctx, i: int, key: str, dtype, shape, emit: Callable[[Buffer, Buffer], None]) -> Optional[Buffer]:
    """The persistent buffer (dtype, shape) holding operand i transformed by `emit(src, dst)`,
    whose launches (through `ctx`) go to the init phase; None when operand i is no init value.
    `emit` must launch only kernels reading `src` and writing `dst` (init_phase.check holds)."""
    if not is_init_operand(ctx, i):
        return None
    L = ctx.L
    v = L.canon(ctx.op.operands[i])
    ck = (id(v), "init:" + key)
    if ck not in L.transformed:
        src = L.buffer(v)
        dst = L.new_buffer(f"{v.name}.{key}", dtype, tuple(int(d) for d in shape), init_phase.INIT_KIND)
        run, n0 = L.launches, len(L.init_launches)
        L.launches = L.init_launches
        try:
            emit(src, dst)
        finally:
            L.launches = run
        for launch in L.init_launches[n0:]:
            launch.init = True
        L.transformed[ck] = dst
    return L.transformed[ck]
