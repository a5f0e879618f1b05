"""Lowering of `fused {kind = "elementwise"}` (compiler/passes/fuse_elementwise.py): the whole
expression DAG of the body as ONE elementwise.cu.j2 kernel, one thread per element of the output.

- Every body op is rendered by the elementwise family's expression table (`EXPR`,
  codegen/kernels/elementwise.py, through `op_expr`): `can_render(op)` is the one test the fusion
  pass and this lowering share of which ops are "elementwise".
- Inputs whose shape differs from the output are read with broadcast index math (stride 0 on
  broadcast dims, numpy rules); every result of the group has the output's shape, so each is
  stored at the flat index (several outputs per kernel).
- Arithmetic happens in compute types: f16/bf16 values stay fp32 between the ops of the group
  (a single op rounds to storage after each op; here only the stored outputs round), except an
  explicit Cast to f16/bf16, which still rounds (what a Cast is for).
- The kernel's header comment names every IR op of the group.
The Variant "fused.elementwise" (codegen/variants.py): `applies` is false (the fallback of
codegen/kernels/fused.py then lowers the body op by op) when an op is not renderable, shapes are
not static, results differ in shape, or a value read from memory does not broadcast to the output;
it decides on types alone, so render never declines. No parameter space yet.
"""
from __future__ import annotations

from ..dtypes import compute_type, ctype
from ..lower import LowerCtx, LoweringError, Problem, describe_op
from ..variants import YES, Variant, no, register
from ...ir.symbolic import Expr, floordiv
from .elementwise import EXPR, elementwise_params, launch_threads, op_expr, runtime_params

PRIORITY = 10  # above the op-by-op fallback


def _plain_dtype(dt) -> bool:
    """Types the expression table computes in directly: the C types of ir/types.py that are their
    own compute type, and f16/bf16 (computed in fp32). Narrow / exotic types are not fused (their
    rounding at every op is part of their meaning)."""
    try:
        return compute_type(dt) == ctype(dt) or dt.short in ("f16", "bf16")
    except LoweringError:
        return False


def _static(t) -> bool:
    """Known dims: ints, or symbolic dims of a range profile (sizes per run: codegen/runtime_sizes.py)."""
    return t.shape is not None and all((isinstance(d, int) and d >= 0) or (isinstance(d, Expr) and d.kind != "unknown")
                                       for d in t.shape)


def can_render(op) -> bool:
    """op can be one expression of a fused elementwise kernel: in the family's table, one result,
    static shapes, plain dtypes, every operand broadcasting to the result."""
    if op.name not in EXPR or len(op.results) != 1 or op.regions():
        return False
    r = op.results[0].type
    if not _static(r) or not _plain_dtype(r.dtype):
        return False
    for v in op.operands:
        if v is None:
            continue
        if not _static(v.type) or not _plain_dtype(v.type.dtype) or not broadcasts(v.type.shape, r.shape):
            return False
    return True


def broadcasts(shape, to) -> bool:
    """numpy broadcasting of `shape` to `to` without growing `to`."""
    shape, to = tuple(shape), tuple(to)
    if len(shape) > len(to):
        return False
    return all(d == t or d == 1 for d, t in zip(shape[::-1], to[::-1]))


def _round_through_storage(expr: str, dt) -> str:
    """A Cast to f16/bf16 inside the group rounds as the unfused Cast's store would."""
    if compute_type(dt) != ctype(dt):
        return f"static_cast<{compute_type(dt)}>(static_cast<{ctype(dt)}>({expr}))"
    return expr


def _applies(problem: Problem):
    """The whole group renders as one kernel: every op in the table, one output shape, every value
    read from memory (an operand or a body const) broadcasting to it. Types only, no buffers."""
    op = problem.op
    body = op.attrs.body
    if not all(can_render(b) for b in body.ops if b.name != "const"):
        return no("an op of the group is not elementwise-renderable")
    shape = problem.L.static_shape(op.results[0])
    if any(problem.L.static_shape(r) != shape for r in op.results) or (
            problem.symbolic and any(r.type.shape != op.results[0].type.shape for r in op.results)):
        return no("the group's results differ in shape")
    arg_of = {id(a): i for i, a in enumerate(body.args)}
    computed = set()  # results of the body's (non-const) ops: registers, not memory
    for bop in body.ops:
        if bop.name == "const":
            continue
        for v in (bop.operands[:1] if bop.name == "CastLike" else bop.operands):
            if v is None or id(v) in computed:
                continue
            read = problem.tensor(arg_of[id(v)]).shape if id(v) in arg_of else problem.L.static_shape(v)
            if not broadcasts(read, shape):
                return no(f"%{v.name} does not broadcast to the output")
        computed.update(id(r) for r in bop.results)
    return YES


def _render(ctx: LowerCtx, problem: Problem, params: dict):
    op, L = ctx.op, ctx.L
    body = op.attrs.body
    shape = ctx.out_shape(0)
    arg_of = {id(a): i for i, a in enumerate(body.args)}
    bufs, var_of_buf = [], {}
    var: dict[int, str] = {}  # id(body value) -> C variable

    def ref(v) -> str:
        if id(v) in var:
            return var[id(v)]
        b = ctx.inp(arg_of[id(v)]) if id(v) in arg_of else L.buffer(v)  # an operand, or a body const
        if not broadcasts(b.shape, shape):
            raise _Decline
        if b.id not in var_of_buf:
            var_of_buf[b.id] = f"x{len(bufs)}"
            bufs.append(b)
        var[id(v)] = var_of_buf[b.id]
        return var[id(v)]

    stmts, descs = [], []
    outer = {id(a): v for a, v in zip(body.args, op.operands)}  # headers show the function's names
    outer.update((id(r), v) for r, v in zip(body.results, op.results))

    def name(v) -> str:
        return outer.get(id(v), v).name

    try:
        for bop in body.ops:
            if bop.name == "const":
                continue
            used = bop.operands[:1] if bop.name == "CastLike" else bop.operands
            args = [None if v is None else ref(v) for v in used]
            dts = [None if v is None else v.type.dtype for v in used]
            r = bop.results[0]
            expr = op_expr(bop.name, bop.attrs, args, dts, r.type.dtype)
            if bop.name in ("Cast", "CastLike"):
                expr = _round_through_storage(expr, r.type.dtype)
            v = f"t{len(stmts)}"
            stmts.append((compute_type(r.type.dtype), v, expr))
            var[id(r)] = v
            descs.append(describe_op(bop, name))
    except _Decline:
        ctx.fail("internal error: fused.elementwise applied but a value does not broadcast")
    outs = [(ctx.out(i), var[id(r)]) for i, r in enumerate(body.results)]
    if problem.symbolic:  # a range build: sizes per run (codegen/runtime_sizes.py)
        params = runtime_params(ctx, bufs, ctx.sym_out_shape(0), stmts, outs)
    else:
        params = elementwise_params(bufs, shape, stmts, outs, vectors=True)
    names = "_".join(dict.fromkeys(b.name.lower() for b in body.ops if b.name != "const"))[:40]
    k = L.kernel("elementwise.cu.j2", "fused_ew_" + names, params)
    k.add_op(f"fused elementwise group of {len(descs)} ops -> " + ", ".join(f"%{r.name}" for r in op.results))
    for d in descs:
        k.add_op(d)
    if problem.symbolic:
        n = outs[0][0].sym_numel
        ctx.launch(k, ctx.grid1d(floordiv(n, int(params.get("VEC", 1)))), 256,
                   [*bufs, *(b for b, _ in outs), ctx.i64(n), *ctx.rt_args()])
        return True
    n = max(1, outs[0][0].numel)
    ctx.launch(k, ctx.grid1d(launch_threads(params, n)), 256, [*bufs, *(b for b, _ in outs), ctx.i64(outs[0][0].numel)])
    return True


class _Decline(Exception):
    pass


FUSED_ELEMENTWISE = register(Variant("fused.elementwise", "fused_elementwise", ("fused",), _render, _applies,
                                     priority=PRIORITY, kinds=("elementwise",), regions=True, runtime_sizes=True))
