"""Recurrence family: the `recurrence` op (ir/ops/recurrence.py, made by compiler/passes/time_fusion.py).

The input projection G is an ordinary GEMM before it (its own launch, through the GEMM variants);
this lowers only the time loop. The cell (activations, clip, input_forget, linear_before_reset)
is read back from the op's body (`cell_of`: the body must be the canonical body of a cell; a
body some pass changed is refused with a clear error rather than run wrong).

Variants (family "recurrence"):
  recurrence.persistent  priority 10: rnn-kernel's persistent on-chip recurrence
                         (codegen/kernels/rnn.py emit_recurrence, contract in its RecurrenceSpec):
                         G, Y, Y_h/Y_c read and written in place through strides (layout 1 and the
                         y_layouts "sbdh"/"bsdh" cost nothing); its space (sync scheme, blocks per
                         direction, matvec tiling, and step_mma: the step's h x R^T on tensor cores,
                         mma.sync m16n8k16, for f16/bf16 with hidden % 8 == 0, the default from
                         batch rnn.MMA_MIN_BATCH) is rnn.recurrence_space.
  recurrence.fallback    priority 0, every cell: rnn.emit_recurrence_fallback, the warp-per-item
                         step kernel (R read from global every step) with the same strided G / Y /
                         state indexing (cooperative, or one launch a stage with rnn_stepwise).
                         Two-phase GRU (linear_before_reset = 0), hidden sizes not a multiple of 4,
                         shapes whose h/R slices do not fit, and rnn_stepwise go here.
"""
from __future__ import annotations

from ...ir.ops.recurrence import cell_of, g_batch_major
from ...ir.ops.rnn import _KIND, _num_dirs
from ..lower import LowerCtx
from ..variants import Variant, no, register
from . import rnn

FLOATS = ("f32", "f16", "bf16")


def _cells(op):
    a = op.attrs
    c0 = cell_of(a.kind, a.body)
    c1 = cell_of(a.kind, a.body_backward) if a.body_backward is not None else c0
    return [c0, c1][:_num_dirs(a)]


def _dims(op, shape_of):
    a = op.attrs
    gs = shape_of(0)
    S, B = (gs[1], gs[0]) if g_batch_major(a) else (gs[0], gs[1])
    return int(S), int(B), _num_dirs(a), int(a.hidden_size)


def _strides(a, S, B, D, H, GH):
    """(g_strides, y_strides, state_strides) in elements (None: rnn's defaults, i.e. layout 0)."""
    g = (D * GH, S * D * GH, GH) if g_batch_major(a) else None
    if a.y_layout == "sbdh":
        y = (B * D * H, D * H, H)
    elif a.y_layout == "bsdh" or a.layout == 1:
        y = (D * H, S * D * H, H)
    else:
        y = None
    st = (D * H, H) if a.layout == 1 else None
    return g, y, st


def y_is_read(op, func) -> bool:
    """Whether anything reads the recurrence's Y (a graph output, an op's operand, a region's
    result): when nothing does (an encoder passing on only Y_h), the kernels do not write it."""
    y = op.results[0]
    if any(r is y for r in func.results):
        return True
    for o in func.walk():
        if any(v is y for v in o.operands) or any(r is y for _, reg in o.regions() for r in reg.results):
            return True
    return False


def spec_of(op, tensor, y_read: bool = True) -> rnn.RecurrenceSpec:
    """The RecurrenceSpec of a recurrence op; tensor(i): operand i's TensorInfo/Buffer or None."""
    a = op.attrs
    cells = _cells(op)
    S, B, D, H = _dims(op, lambda i: tensor(i).shape)
    GH = _KIND[a.kind][0] * H
    g_st, y_st, s_st = _strides(a, S, B, D, H, GH)
    lens = tensor(6)
    n = len(op.results)
    return rnn.RecurrenceSpec(
        kind=a.kind, S=S, B=B, D=D, H=H, direction=a.direction, storage=tensor(1).dtype.short,
        g_dtype=tensor(0).dtype.short, g_strides=g_st, y_strides=y_st, state_strides=s_st,
        acts=[[{"kind": k, "alpha": al, "beta": be} for k, al, be in c.acts] for c in cells],
        clip=cells[0].clip, input_forget=cells[0].input_forget,
        linear_before_reset=cells[0].linear_before_reset if a.kind == "GRU" else True,
        has_h0=tensor(4) is not None, has_c0=tensor(5) is not None, has_peep=tensor(3) is not None,
        has_rbh=tensor(2) is not None, has_lens=lens is not None,
        lens_dtype=lens.dtype.short if lens is not None else "i32",
        has_y=y_read, has_yh=n > 1, has_yc=a.kind == "LSTM" and n > 2)


def _common_checks(p):
    """A reason the op cannot lower at all (dtypes), or None."""
    op = p.op
    for i, what in ((0, "G"), (1, "R"), (2, "rbh"), (3, "P"), (4, "initial_h"), (5, "initial_c")):
        t = p.tensor(i)
        if t is not None and t.dtype.short not in FLOATS:
            return f"{what} has dtype {t.dtype}: the CUDA recurrence kernels take f32 / f16 / bf16"
    st = p.tensor(1).dtype.short
    for i, what in ((2, "rbh"), (3, "P"), (4, "initial_h"), (5, "initial_c")):
        t = p.tensor(i)
        if t is not None and t.dtype.short != st:
            return f"{what} has dtype {t.dtype}, R is {st}: one storage dtype is expected"
    if p.result(0).dtype.short != st:
        return f"Y has dtype {p.result(0).dtype}, R is {st}"
    lens = p.tensor(6)
    if lens is not None and lens.dtype.short not in ("i32", "i64"):
        return f"sequence_lens has dtype {lens.dtype}: i32 or i64 expected"
    del op
    return None


def _spec(p):
    if "rec_spec" not in p.memo:
        # NncError (a body that is no cell) -> located by the driver
        p.memo["rec_spec"] = spec_of(p.op, p.tensor, len(p.op.results) == 1 or y_is_read(p.op, p.L.module.main))
    return p.memo["rec_spec"]


# ---------------------------------------------------------------- persistent (rnn-kernel's kernel)

def _persistent_applies(p):
    why = _common_checks(p)
    if why:
        return no(why)
    if p.options.rnn_stepwise:
        return no("rnn_stepwise: one launch a step asked for")
    return rnn.recurrence_fits(_spec(p), p.target)


def _buffers(ctx: LowerCtx, spec) -> dict:
    """The recurrence's operands and results as emit_recurrence{,_fallback} take them."""
    y = ctx.out(0)  # defined even when unread (then no kernel writes it)
    return dict(g=ctx.inp(0), r=ctx.inp(1), y=y if spec.has_y else None,
                yh=ctx.out(1) if spec.has_yh else None, yc=ctx.out(2) if spec.has_yc else None,
                h0=ctx.inp(4), c0=ctx.inp(5) if ctx.attrs.kind == "LSTM" else None,
                peep=ctx.inp(3), rbh=ctx.inp(2), lens=ctx.inp(6))


def _persistent_render(ctx: LowerCtx, p, params):
    spec = _spec(p)
    rnn.emit_recurrence(ctx, spec, params, **_buffers(ctx, spec))
    return True


register(Variant("recurrence.persistent", "recurrence", ("recurrence",), _persistent_render, _persistent_applies,
                 space=lambda p: rnn.recurrence_space(_spec(p), p.target),
                 default=lambda p, space: rnn.recurrence_default(_spec(p), p.target, space),
                 priority=10, regions=True))


# ---------------------------------------------------------------- fallback (every cell)

def _fallback_applies(p):
    why = _common_checks(p)
    if why:
        return no(why)
    _spec(p)  # the body must be a known cell
    return True


def _fallback_render(ctx: LowerCtx, p, params):
    spec = _spec(p)
    rnn.emit_recurrence_fallback(ctx, spec, params, **_buffers(ctx, spec))
    return True


register(Variant("recurrence.fallback", "recurrence", ("recurrence",), _fallback_render, _fallback_applies,
                 priority=0, regions=True))
