"""Lowering of `fused {kind = "rowreduce"}` (compiler/passes/fuse_reduction.py): a group of row
reductions over the last axis and the elementwise ops around them as ONE fused_rowreduce.cu.j2
kernel: one CTA per row, fp32 accumulation, the row's values kept in registers between phases.

The group works on one row domain F = [..., C] (the shape a reduction reads): every body value is
either an F value (one per element) or an R value (shape [..., 1], one per row). Body ops:
- elementwise ops the elementwise family renders (`can_render`, codegen/kernels/fused_elementwise.py)
  whose result is F- or R-shaped; operands from outside broadcast (index math, nothing is
  materialised: the [B,1,1,S] mask of attention is read in place);
- row cores (`row_core`): ReduceSum/Mean/Max/Min over the last axis with keepdims, Softmax /
  LogSoftmax over the last axis, LayerNormalization over the last axis (only Y used),
  RMSNormalization over the last axis.
The lowering expands cores into a small graph of nodes (F/R elementwise expressions and
sum/max/min row reductions; Softmax = max, exp, sum, divide; LayerNorm = sum, centre, sum of
squares, ...) and schedules it in phases: phase k is one pass over the row computing the F values
the reductions of depth k need (and the F outputs available then), then the block reductions, then
the R values they make. An F value used in a later phase is cached in a per-thread register array
(columns j*block + threadIdx.x) when the row fits (`MAX_VPT` columns per thread); otherwise later
phases recompute it from the inputs (still one kernel, more loads).
Arithmetic is in fp32 (f16/bf16 loaded and converted; only stored outputs round, and a Cast inside
the group); every value is float (f16/bf16/f32). Declines (the op-by-op fallback of
codegen/kernels/fused.py then lowers the body) on anything else.

Range profiles (codegen/runtime_sizes.py): the variant takes runtime rows. A group over F =
[..., C] with symbolic dims before a static C runs the kernel made at the profile's max with the
row count an argument (nnc_rows, the grid from it per run), where every input is read either whole
(its shape F or [..., 1]: row r starts at r * C or r, at every size) or the same for every row
(broadcast along all row dims); other broadcasts would index with the max shape's extents: those
decline.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from nnc.ir.builder import const_value

from .. import runtime_sizes
from ..dtypes import compute_type
from ..lower import LowerCtx, describe_op
from ..variants import YES, Variant, no, register
from ..render import cfloat
from .common import cdiv
from .elementwise import broadcast_strides, op_expr, widest_vector
from .fused_elementwise import _round_through_storage, broadcasts, can_render

PRIORITY = 15  # above the op-by-op fallback; kind-specific (`when`); unique among the fused families
KIND = "rowreduce"
FLOATS = ("f16", "bf16", "f32")
MAX_VPT = 16        # columns per thread kept in registers
MAX_CACHED = 64     # registers per thread for cached row values, all arrays together
REDUCE_OPS = {"ReduceSum": "sum", "ReduceMean": "mean", "ReduceMax": "max", "ReduceMin": "min"}
NORM_OPS = ("LayerNormalization", "RMSNormalization")


def _float_static(t) -> bool:
    """A float type of static dims, or a range profile's symbolic ones (no `?`) before a static last
    axis (the row length: runtime rows, see the module docstring)."""
    if t.shape is None or t.dtype.short not in FLOATS:  # a layout tag: same physical dims (ir/layout.py)
        return False
    if all(isinstance(d, int) and d >= 0 for d in t.shape):
        return True
    return (len(t.shape) >= 1 and isinstance(t.shape[-1], int)
            and all(isinstance(d, int) or d.kind != "unknown" for d in t.shape))


def row_core(op, const_of) -> Optional[str]:
    """The row core `op` is ("sum"/"mean"/"max"/"min"/"softmax"/"logsoftmax"/"layernorm"/
    "rmsnorm"), or None; its first operand is the F value it reads (shape [..., C], C > 1)."""
    if op.regions() or not op.operands or op.operands[0] is None:
        return None
    x = op.operands[0]
    if not _float_static(x.type) or len(x.type.shape) < 1 or x.type.shape[-1] < 2:
        return None
    rank = len(x.type.shape)
    if not op.results or not _float_static(op.results[0].type):
        return None
    if op.name in REDUCE_OPS:
        if len(op.results) != 1 or int(op.attrs.keepdims) != 1 or len(op.operands) < 2 or op.operands[1] is None:
            return None
        axes = const_of(op.operands[1])
        if axes is None or [int(a) % rank for a in np.asarray(axes).reshape(-1)] != [rank - 1]:
            return None
        return REDUCE_OPS[op.name]
    if op.name in ("Softmax", "LogSoftmax"):
        if len(op.results) != 1 or int(op.attrs.axis) % rank != rank - 1:
            return None
        return op.name.lower()
    if op.name in NORM_OPS:
        if len(op.results) != 1 or int(op.attrs.axis) % rank != rank - 1:
            return None
        C = x.type.shape[-1]
        for v in op.operands[1:]:  # scale / bias broadcast along the row only
            if v is not None and (not _float_static(v.type) or not broadcasts(v.type.shape, (C,))):
                return None
        return "layernorm" if op.name == "LayerNormalization" else "rmsnorm"
    return None


def data_operands(op) -> list:
    """The operands an op of a rowreduce group reads as data (a Reduce's axes are not)."""
    if op.name in REDUCE_OPS:
        return [op.operands[0]]
    return [v for v in op.operands if v is not None]


def row_shape(F) -> tuple:
    return tuple(F[:-1]) + (1,)


@dataclass
class Node:
    """One value of the kernel's row program."""
    id: int
    space: str                  # "F" (per element) | "R" (per row)
    kind: str                   # "arg" | "lit" | "ew" | "red"
    level: int = 0              # phase from which it is available (F: the phase computing it)
    args: list = field(default_factory=list)   # Node operands
    arg: int = -1               # kind arg: input index
    text: str = ""              # kind lit: the C literal
    op: str = ""                # ew: op name; red: sum|max|min
    attrs: object = None
    dts: list = field(default_factory=list)    # ew: operand dtypes (None = omitted)
    dtype: object = None        # result dtype
    cast: bool = False          # ew Cast/CastLike to f16/bf16: round through storage


class _Decline(Exception):
    pass


class _Program:
    def __init__(self, F):
        self.F = tuple(F)
        self.C = int(F[-1])
        self.nodes: list[Node] = []
        self.args: dict[tuple, Node] = {}

    def add(self, **kw) -> Node:
        n = Node(id=len(self.nodes), **kw)
        if n.kind in ("ew", "red"):  # a reduction is there after the phase of its operand
            base = max((a.level for a in n.args if a is not None), default=0)
            n.level = base + 1 if n.kind == "red" else base
        self.nodes.append(n)
        return n

    def arg(self, i: int, space: str, dtype) -> Node:
        key = (i, space)
        if key not in self.args:
            self.args[key] = self.add(space=space, kind="arg", arg=i, dtype=dtype)
        return self.args[key]

    def lit(self, v: float, space: str = "R") -> Node:
        return self.add(space=space, kind="lit", text=cfloat(float(v)))

    def ew(self, name, args, dtype, attrs=None, dts=None, space=None) -> Node:
        space = space or ("F" if any(a.space == "F" for a in args if a is not None) else "R")
        return self.add(space=space, kind="ew", op=name, args=list(args), attrs=attrs, dtype=dtype,
                        dts=list(dts) if dts is not None else [dtype] * len(args))

    def red(self, how: str, x: Node, dtype) -> Node:
        if x.space != "F":
            raise _Decline
        return self.add(space="R", kind="red", op=how, args=[x], dtype=dtype)


def build_program(body, F, const_of, arg_of) -> tuple[_Program, dict]:
    """The row program of a fused body; node of each body value."""
    from nnc.ir.types import F32
    P = _Program(F)
    R = row_shape(F)
    node: dict[int, Node] = {}

    def space_of(shape) -> str:
        shape = tuple(shape)
        if shape == P.F:
            return "F"
        if shape == R:
            return "R"
        raise _Decline

    def get(v, space) -> Node:
        if id(v) in node:
            n = node[id(v)]
            if n.space == "F" and space == "R":
                raise _Decline
            return n
        if id(v) not in arg_of:
            raise _Decline
        if not broadcasts(v.type.shape, P.F if space == "F" else R):
            raise _Decline
        if space == "F" and broadcasts(v.type.shape, R):  # the same along the row: once per row
            space = "R"
        return P.arg(arg_of[id(v)], space, v.type.dtype)

    for op in body.ops:
        if op.name == "const":
            continue
        if any(not _float_static(r.type) for r in op.results):
            raise _Decline
        core = row_core(op, const_of)
        if core is not None:
            x = get(op.operands[0], "F")
            y = op.results[0]
            C = P.C
            if core in ("sum", "mean", "max", "min"):
                if tuple(y.type.shape) != R:
                    raise _Decline
                s = P.red("sum" if core == "mean" else core, x, F32)
                if core == "mean":
                    s = P.ew("Div", [s, P.lit(C)], F32)
                node[id(y)] = s
            elif core in ("softmax", "logsoftmax"):
                m = P.red("max", x, F32)
                d = P.ew("Sub", [x, m], F32)
                e = P.ew("Exp", [d], F32)
                s = P.red("sum", e, F32)
                node[id(y)] = (P.ew("Div", [e, s], F32) if core == "softmax"
                               else P.ew("Sub", [d, P.ew("Log", [s], F32)], F32))
            else:
                eps = P.lit(float(op.attrs.epsilon))
                if core == "layernorm":
                    mean = P.ew("Div", [P.red("sum", x, F32), P.lit(C)], F32)
                    x = P.ew("Sub", [x, mean], F32)
                ms = P.ew("Div", [P.red("sum", P.ew("Mul", [x, x], F32), F32), P.lit(C)], F32)
                n = P.ew("Div", [x, P.ew("Sqrt", [P.ew("Add", [ms, eps], F32)], F32)], F32)
                n = P.ew("Mul", [n, get(op.operands[1], "F")], F32)
                if core == "layernorm" and len(op.operands) > 2 and op.operands[2] is not None:
                    n = P.ew("Add", [n, get(op.operands[2], "F")], F32)
                node[id(y)] = n
            if node[id(y)].space != space_of(y.type.shape):
                raise _Decline
            continue
        if not can_render(op):
            raise _Decline
        r = op.results[0]
        sp = space_of(r.type.shape)
        used = op.operands[:1] if op.name == "CastLike" else op.operands
        args = [None if v is None else get(v, sp) for v in used]
        dts = [None if v is None else v.type.dtype for v in used]
        n = P.ew(op.name, args, r.type.dtype, attrs=op.attrs, dts=dts, space=sp)
        n.cast = op.name in ("Cast", "CastLike")
        node[id(r)] = n
    return P, node


def _row_coords(F) -> list:
    """C expressions of the row coordinates (dims 0..rank-2) of row index `r`."""
    out, acc = [], 1
    dims = list(F[:-1])
    exprs = [""] * len(dims)
    for d in range(len(dims) - 1, -1, -1):
        exprs[d] = f"((r / {acc}) % {dims[d]})" if acc > 1 else f"(r % {dims[d]})"
        acc *= dims[d]
    out.extend(exprs)
    return out


def _offsets(shape, target, coords) -> tuple[str, int]:
    """(row part of the offset, stride of the column) of an input of `shape` read at `target`
    (F = [..., C]: the column is the last coordinate; R = [..., 1]: the column stride is 0)."""
    st = broadcast_strides(shape, target)
    if st is None:
        return f"r * {target[-1]}", 1 if target[-1] > 1 else 0
    row = [f"{coords[d]} * {s}" for d, s in enumerate(st[:-1]) if s]
    return (" + ".join(row) or "0"), st[-1]


def legacy_block(C: int) -> int:
    """Threads of the one-CTA-per-row kernel: 256 (1024 past 4096 columns), at most C rounded up to a warp."""
    block = 256 if C <= 4096 else 1024
    return min(block, warp_cover(C))


def warp_cover(n: int) -> int:
    """Threads covering n columns, one a thread: n rounded up to a warp (a warp at least)."""
    return max(32, cdiv(n, 32) * 32)


def plan_phases(P: _Program, outputs: list, T: Optional[int] = None, RPB: int = 1, VEC: int = 1) -> dict:
    """Template parameters: the phases, loads, statements, caches and stores of the row program.
    outputs: [(Node, out index)]; T threads per row (None: legacy_block), RPB rows per CTA, VEC
    columns a thread takes per step (C % VEC == 0)."""
    nodes = P.nodes
    users: dict[int, list] = {}
    for n in nodes:
        for a in n.args:
            if a is not None:
                users.setdefault(a.id, []).append(n)
    reds = [n for n in nodes if n.kind == "red"]
    f_outs = [(n, i) for n, i in outputs if n.space == "F"]
    r_outs = [(n, i) for n, i in outputs if n.space == "R"]
    n_loops = max([r.args[0].level + 1 for r in reds] + [n.level + 1 for n, _ in f_outs] + [0])
    T = legacy_block(P.C) if T is None else int(T)
    block = T * int(RPB)
    VEC = int(VEC)
    if P.C % VEC:
        raise ValueError(f"fused rowreduce: VEC={VEC} does not divide C={P.C}")
    nvj = -(-P.C // (T * VEC))
    vpt = nvj * VEC
    # F values read in their own phase and in a later one: cached in registers if they fit (the
    # rest is computed in the phase that needs it, recomputed if two later phases do)
    later = [n for n in nodes if n.space == "F" and n.kind in ("arg", "ew")
             and any(u.level == n.level or u.kind == "red" for u in users.get(n.id, ()))
             and any(u.space == "F" and u.level > n.level for u in users.get(n.id, ()))]
    cache = vpt <= MAX_VPT and len(later) * vpt <= MAX_CACHED
    cached = {n.id for n in later} if cache else set()

    def var(n: Node, loop: int) -> str:
        if n.kind == "lit":
            return n.text
        if n.space == "R":
            return f"v{n.id}"
        if n.id in cached and n.level < loop:
            return f"c{n.id}[j]"
        return f"v{n.id}"

    def closure(targets, loop) -> list:
        seen, order = set(), []

        def visit(n):
            if n.id in seen or n.space == "R" or n.kind == "lit":
                return
            if n.id in cached and n.level < loop:
                return
            seen.add(n.id)
            for a in n.args:
                if a is not None:
                    visit(a)
            order.append(n)
        for t in targets:
            visit(t)
        return sorted(order, key=lambda n: n.id)

    def expr(n: Node, loop: int) -> str:
        args = [None if a is None else var(a, loop) for a in n.args]
        e = op_expr(n.op, n.attrs, args, n.dts, n.dtype)
        return _round_through_storage(e, n.dtype) if n.cast else e

    loops, rows = [], []
    r_nodes = [n for n in nodes if n.space == "R" and n.kind in ("arg", "ew")]
    for k in range(n_loops + 1):
        # row phase k: R values available at k (after phase k-1's reductions)
        stmts = []
        for n in r_nodes:
            if n.level == k:
                if n.kind == "arg":
                    stmts.append({"kind": "load", "var": f"v{n.id}", "input": n.arg})
                else:
                    stmts.append({"kind": "stmt", "var": f"v{n.id}", "expr": expr(n, k)})
        stores = [{"out": i, "var": var(n, k)} for n, i in r_outs if n.level == k]
        rows.append({"stmts": stmts, "stores": stores})
        if k == n_loops:
            break
        my_reds = [r for r in reds if r.args[0].level == k]
        my_outs = [(n, i) for n, i in f_outs if n.level == k]
        # the cached values of this phase too: a later phase reads them even where no target
        # of this one needs them
        mine = [n for n in nodes if n.id in cached and n.level == k]
        body = closure([r.args[0] for r in my_reds] + [n for n, _ in my_outs] + mine, k)
        lstmts = []
        for n in body:
            if n.kind == "arg":
                lstmts.append({"kind": "load", "var": f"v{n.id}", "input": n.arg})
            else:
                lstmts.append({"kind": "stmt", "var": f"v{n.id}", "expr": expr(n, k)})
            if n.id in cached:
                lstmts.append({"kind": "cache", "var": f"v{n.id}", "arr": f"c{n.id}"})
        loops.append({
            "stmts": lstmts,
            "accs": [{"var": f"v{r.id}", "how": r.op, "src": var(r.args[0], k)} for r in my_reds],
            "stores": [{"out": i, "var": var(n, k)} for n, i in my_outs],
        })
    return {"loops": loops, "rows": rows, "caches": [f"c{i}" for i in sorted(cached)],
            "block": block, "vpt": vpt, "C": P.C, "T": T, "RPB": int(RPB),
            **({"VEC": VEC, "nvj": nvj} if VEC > 1 else {})}


def _analyse(problem):
    """(F, program, outputs [(Node, out index)], arg_of) of a rowreduce group, or None when the
    kernel cannot take it (the op-by-op fallback of codegen/kernels/fused.py then lowers it).
    Memoised on the problem (applies, space and render share it)."""
    if "rowreduce" in problem.memo:
        return problem.memo["rowreduce"]
    problem.memo["rowreduce"] = got = _analyse_op(problem.op, problem.L)
    return got


def _analyse_op(op, L):
    body = op.attrs.body
    outer = {id(a): v for a, v in zip(body.args, op.operands)}

    def const_of(v):
        return const_value(outer.get(id(v), v), L.module.weights)

    cores = [b for b in body.ops if row_core(b, const_of) is not None]
    if not cores:
        return None
    F = tuple(cores[0].operands[0].type.shape)
    if any(tuple(c.operands[0].type.shape) != F for c in cores) or not F or not isinstance(F[-1], int):
        return None
    arg_of = {id(a): i for i, a in enumerate(body.args)}
    for b in body.ops:  # body consts (hand-written IR) are inputs too, numbered after the args
        if b.name == "const":
            arg_of[id(b.results[0])] = len(arg_of)
    try:
        P, node = build_program(body, F, const_of, arg_of)
        outs = []
        for i, r in enumerate(body.results):
            if id(r) not in node:
                raise _Decline
            outs.append((node[id(r)], i))
        plan_phases(P, outs)  # the schedule exists
    except _Decline:
        return None
    return F, P, outs, arg_of


ROW_THREADS = (32, 64, 128, 256, 512, 1024)
ROWS_PER_CTA = (1, 2, 4, 8)
TARGET_VPT = 8  # the heuristic's columns per thread for rows of at most WARP_ROWS_MAX columns
WARP_ROWS_MAX = 1024


def _applies(problem):
    got = _analyse(problem)
    if got is None:
        return no("not a row program the kernel takes")
    if getattr(problem, "symbolic", False) and isinstance(_runtime_rows(problem), str):
        return no(_runtime_rows(problem))
    return YES


def _runtime_rows(problem):
    """A range profile's group: (rows Expr, F at max), or why its inputs cannot be read at runtime
    rows (None for a static group). Memoised."""
    if "rowreduce_rt" in problem.memo:
        return problem.memo["rowreduce_rt"]
    F, P, _, arg_of = _analyse(problem)
    got = None
    if any(not isinstance(d, int) for d in F):
        body = problem.op.attrs.body
        values = {id(a): a for a in body.args}
        for b in body.ops:
            if b.name == "const":
                values[id(b.results[0])] = b.results[0]
        by_index = {i: a for a, i in arg_of.items()}
        R = row_shape(F)
        for (i, space), _ in P.args.items():
            shape = tuple(values[by_index[i]].type.shape)
            whole = shape == (F if space == "F" else R)
            per_row = all(isinstance(d, int) and d == 1 for d in shape[:-1])  # the same for every row
            if not whole and not per_row:
                got = "an input broadcast along some of a symbolic row domain's dims"
                break
        else:
            env = problem.L.sym_max
            got = (runtime_sizes.numel(F[:-1]), tuple(runtime_sizes.at_max(d, env) for d in F))
    problem.memo["rowreduce_rt"] = got
    return got


def _rows_of(problem, F, at: str = "max") -> int:
    """F's row count (a range profile's at its max or opt)."""
    rt = _runtime_rows(problem) if any(not isinstance(d, int) for d in F) else None
    if rt is None or isinstance(rt, str):
        return int(np.prod(F[:-1], dtype=np.int64))
    env = problem.L.sym_max if at == "max" else runtime_sizes.at_opt(problem.options.symbol_ranges)
    return max(1, runtime_sizes.at_max(rt[0], env))


def _static_F(problem, F) -> tuple:
    rt = _runtime_rows(problem) if any(not isinstance(d, int) for d in F) else None
    return rt[1] if isinstance(rt, tuple) else tuple(F)


def _itemsize(info) -> int:
    return max(1, info.dtype.bits // 8)


def max_vec(problem, F) -> int:
    """The widest vector: 16 bytes of the widest full-row (shape F) operand or result, at most 8
    columns, dividing C (a narrower [C] operand, f32 scale of an f16 row, loads 32 bytes)."""
    infos = [problem.tensor(i) for i in range(len(problem.op.operands)) if problem.has(i)]
    infos += [problem.result(i) for i in range(len(problem.op.results))]
    F = _static_F(problem, F)
    rows = [t for t in infos if tuple(t.shape) == tuple(F)] or infos
    return widest_vector(int(F[-1]), max(_itemsize(t) for t in rows))


def _row_threads(C: int, vec: int) -> list:
    """T: the powers of two up to the row, and the warp multiples that cover C / vec in 1-4 steps."""
    cols = cdiv(C, vec)
    ts = [t for t in ROW_THREADS if t <= warp_cover(cols)]
    for n in (1, 2, 3, 4):
        t = warp_cover(cdiv(cols, n))
        if t <= 1024 and t not in ts:
            ts.append(t)
    return sorted(ts)


def _space(problem) -> list:
    """(T threads per row, RPB rows per CTA, VEC columns a step): the one CTA per row of before
    first, then every T of _row_threads, RPB while the CTA stays within 1024 threads and the
    rows last, VEC 1 and the widest (max_vec)."""
    F, P, _, _ = _analyse(problem)
    rows = _rows_of(problem, F)
    space = [{"T": legacy_block(P.C), "RPB": 1, "VEC": 1}]
    for vec in sorted({1, max_vec(problem, F)}):
        for t in _row_threads(P.C, vec):
            for rpb in ROWS_PER_CTA:
                if t * rpb > 1024 or (rpb > 1 and rpb > rows):
                    continue
                p = {"T": t, "RPB": rpb, "VEC": vec}
                if p not in space:
                    space.append(p)
    return space


def _default(problem, space) -> dict:
    """Rows of at most WARP_ROWS_MAX columns: the widest vectors, T covering the row in one
    vector a thread (or the least T with <= TARGET_VPT columns a thread without vectors), RPB for
    ~256-thread CTAs while the grid keeps >= 2 CTAs an SM; longer rows: one CTA per row."""
    F, P, _, _ = _analyse(problem)
    if P.C > WARP_ROWS_MAX:
        return dict(space[0])
    rows = _rows_of(problem, F, "opt")
    vec = max_vec(problem, F)
    if vec > 1:
        t = warp_cover(cdiv(P.C, vec))
    else:
        t = next((t for t in ROW_THREADS if -(-P.C // t) <= TARGET_VPT), ROW_THREADS[-1])
    rpb = max(1, 256 // t)
    while rpb > 1 and -(-rows // rpb) < 2 * problem.target.sm_count:
        rpb //= 2
    while rpb not in ROWS_PER_CTA:
        rpb -= 1
    p = {"T": t, "RPB": rpb, "VEC": vec}
    return p if p in space else dict(space[0])


def _render(ctx: LowerCtx, problem, params: dict):
    op, L = ctx.op, ctx.L
    body = op.attrs.body
    F, P, outs, arg_of = _analyse(problem)
    rt = _runtime_rows(problem) if any(not isinstance(d, int) for d in F) else None
    if rt is not None:  # a range profile: the kernel of the max shape, the row count per run (applies checked it)
        F = rt[1]
    vec = int(params.get("VEC", 1))
    params = plan_phases(P, outs, int(params["T"]), int(params["RPB"]), vec)
    # inputs: the body args / consts the program reads, each once per space it is read in
    by_index = {i: a for a, i in arg_of.items()}
    values = {id(a): a for a in body.args}
    for b in body.ops:
        if b.name == "const":
            values[id(b.results[0])] = b.results[0]
    coords = _row_coords(F)
    bufs, inputs, slot = [], [], {}
    for (i, space), n in sorted(P.args.items(), key=lambda kv: kv[1].id):
        v = values[by_index[i]]
        b = ctx.inp(i) if i < len(op.operands) else L.buffer(v)
        if b.id not in slot:
            slot[b.id] = len(bufs)
            bufs.append(b)
        target = F if space == "F" else row_shape(F)
        row_off, col = _offsets(tuple(b.shape), target, coords)
        inputs.append({"node": n.id, "ptr": slot[b.id], "row": row_off, "col": col,
                       "compute": compute_type(b.dtype),
                       "vec": vec > 1 and space == "F" and _vector_loadable(b, target, vec)})
    load = {d["node"]: d for d in inputs}
    for ph in params["loops"] + params["rows"]:
        for s in ph["stmts"]:
            if s["kind"] == "load":
                s["src"] = load[int(s["var"][1:])]
    out_bufs = [ctx.out(i) for i in range(ctx.n_out)]
    params.update(ptrs=[{"ctype": b.ctype, "size": _itemsize(b)} for b in bufs],
                  outputs=[{"ctype": b.ctype, "size": _itemsize(b),
                            "vec": vec > 1 and tuple(b.shape) == tuple(F) and _aligned(b, vec)} for b in out_bufs],
                  rows_n=int(np.prod(F[:-1], dtype=np.int64)), rt_rows=rt is not None, row_inputs=[
                      {"ptr": d["ptr"], "row": d["row"], "node": d["node"]} for d in inputs])
    names = "_".join(dict.fromkeys(b.name.lower() for b in body.ops if b.name != "const"))[:40]
    k = L.kernel("fused_rowreduce.cu.j2", "fused_row_" + names, params)
    shown = {id(a): v for a, v in zip(body.args, op.operands)}
    shown.update((id(r), v) for r, v in zip(body.results, op.results))
    descs = [describe_op(b, lambda v: shown.get(id(v), v).name) for b in body.ops if b.name != "const"]
    k.add_op(f"fused row-reduction group of {len(descs)} ops -> " + ", ".join(f"%{r.name}" for r in op.results))
    for d in descs:
        k.add_op(d)
    rows = params["rows_n"]
    if rt is not None:
        grid = runtime_sizes.grid_dim(rt[0], params["RPB"], L.sym_max, 65535)[1]
        ctx.launch(k, grid, params["block"], [*bufs, *out_bufs, ctx.i64(rt[0])])
        return True
    grid = -(-rows // params["RPB"])
    ctx.launch(k, max(1, min(grid, 65535)), params["block"], [*bufs, *out_bufs])
    return True


def _aligned(b, vec: int) -> bool:
    off = b.alias_offset if b.alias_of is not None else 0
    return b.dtype.bits % 8 == 0 and not b.ctype.startswith("nnc_") and off % (vec * (b.dtype.bits // 8)) == 0


def _vector_loadable(b, target, vec: int) -> bool:
    """An F input read as VEC-element vectors: contiguous along the row (column stride 1), every
    row stride a multiple of VEC, its offset aligned."""
    st = broadcast_strides(tuple(b.shape), tuple(target))
    if st is None:
        st = [0] * (len(target) - 1) + [1]
        row_strides = [int(target[-1])]
    else:
        row_strides = [s for s in st[:-1] if s]
    return st[-1] == 1 and all(s % vec == 0 for s in row_strides) and _aligned(b, vec)


FUSED_ROWREDUCE = register(Variant(
    name="fused.rowreduce", family="fused_rowreduce", ops=("fused",), kinds=(KIND,), regions=True,
    priority=PRIORITY, applies=_applies, space=_space, default=_default, render=_render, runtime_sizes=True))
