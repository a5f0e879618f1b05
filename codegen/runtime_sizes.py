"""Runtime sizes: one CUDA build for a range profile's shapes (issue 10).

A range profile (compiler/profiles.py) compiles with LowerOptions.symbol_ranges = ((symbol, min,
opt, max), ...). The IR keeps its symbolic dims (ir/symbolic.Expr). Lowering then works at the
profile's MAX: Lowerer.static_shape gives every value's shape with the symbols at their max, so
buffers, the memory plan and every offset are static, sized for the largest run. A tensor of a
smaller run is the contiguous prefix of its buffer (row-major at its runtime shape).

Kernels do not bake symbolic sizes in. A variant declares `runtime_sizes=True`
(codegen/variants.py) when its kernels take every size that depends on a symbol as an ordinary
argument and early-exit past the runtime extent; Variant.check refuses a symbolic problem to every
other variant, so a family that needs compile-time sizes is never chosen for one (and an op with
none left is a LoweringError naming the node and op). The sizes travel as:

- a Scalar argument with `expr` (an Expr over the symbols): plan.json {"type", "value": its value
  at max, "expr": <tree>}; the runtime evaluates the tree per run;
- a launch's grid with `grid_expr` (one Expr or int per dim): plan.json "grid" at max and
  "grid_expr"; the runtime launches the grid of the run's sizes.

Fused groups too: fuse-attention and fuse-epilogue form their groups over symbolic dims; the
flash-attention kernel takes S / T / strides per run (kernels/flash_attention.py) and the mma.sync /
FFMA GEMMs a runtime M where it folds into one GEMM's rows (kernels/gemm_lowering.runtime_rows), so
their epilogues stay fused.

Expression trees in plan.json (expr_json / expr_eval): an int, {"sym": name}, or {"op": "add" |
"mul" | "div" | "max", "args": [...]} ("div" is floor division). Symbol values per run come from
the input shapes (bind): each symbolic input dim gives its symbol's value.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from ..ir.errors import NncError
from ..ir.symbolic import Expr, evaluate, floordiv

Dim = object  # int | Expr


def is_symbolic(d) -> bool:
    return isinstance(d, Expr)


def shape_is_symbolic(shape) -> bool:
    return shape is not None and any(isinstance(d, Expr) for d in shape)


def numel(shape) -> Dim:
    out = 1
    for d in shape:
        out = out * d
    return out


def ceil_div(n: Dim, b: int) -> Dim:
    if isinstance(n, int):
        return -(-n // b)
    return floordiv(n + (b - 1), b)


def at_max(d: Dim, env_max: Mapping[str, int]) -> int:
    return int(evaluate(d, dict(env_max))) if isinstance(d, Expr) else int(d)


def expr_json(d: Dim):
    """The plan.json tree of a dim (see the module docstring)."""
    if isinstance(d, int):
        return int(d)
    if not isinstance(d, Expr):
        raise NncError(f"internal error: a runtime size must be an int or a symbolic Expr, not {d!r}")
    if d.kind == "sym":
        return {"sym": d.name}
    if d.kind in ("add", "mul", "div", "max"):
        return {"op": d.kind, "args": [expr_json(a) for a in d.args]}
    raise NncError(f"runtime size {d} has an unknown part: it cannot be evaluated at run time")


MAX_EXPR_DEPTH = 64


def tree_symbols(trees) -> set:
    """The symbols a list of plan.json size trees (expr_json) use."""
    out, todo = set(), list(trees)
    while todo:
        t = todo.pop()
        if isinstance(t, dict):
            if "sym" in t:
                out.add(t["sym"])
            todo.extend(t.get("args") or ())
    return out


def expr_eval(tree, env: Mapping[str, int], where: str = "plan.json", depth: int = 0) -> int:
    """The value of a plan.json tree once the symbols are bound (malformed trees: NncError)."""
    if isinstance(tree, bool):
        raise NncError(f"{where}: a size expression holds a boolean")
    if isinstance(tree, int):
        return tree
    if depth > MAX_EXPR_DEPTH or not isinstance(tree, dict):
        raise NncError(f"{where}: malformed size expression {str(tree)[:80]!r}")
    if "sym" in tree:
        name = tree["sym"]
        if name not in env:
            raise NncError(f"{where}: size expression uses symbol {name!r}, which no input binds")
        return int(env[name])
    op, args = tree.get("op"), tree.get("args")
    if op not in ("add", "mul", "div", "max") or not isinstance(args, list) or not args:
        raise NncError(f"{where}: malformed size expression {str(tree)[:80]!r}")
    vals = [expr_eval(a, env, where, depth + 1) for a in args]
    if op == "add":
        return sum(vals)
    if op == "mul":
        out = 1
        for v in vals:
            out *= v
        return out
    if op == "div":
        if vals[1] == 0:
            raise NncError(f"{where}: size expression divides by zero")
        return vals[0] // vals[1]
    return max(vals)


def grid_dim(n: Dim, block: int, env_max: Mapping[str, int], cap: int = 1 << 20) -> tuple[int, Dim]:
    """(grid at max, grid expression) for a 1-D launch over n elements, `block` a block, for a
    kernel that loops (grid-stride) or early-exits past n: ceil(n / block) blocks at run time while
    that stays <= cap at max; else the cap itself (a grid-stride loop covers any n)."""
    g = ceil_div(n, block)
    gmax = at_max(g, env_max)
    if gmax > cap:
        return cap, cap
    return max(1, gmax), g


def bind(inputs: Sequence[Mapping], shapes: Mapping[str, Sequence[int]]) -> dict:
    """{symbol: value} from the run's input shapes: plan.json "inputs" entries with "sym_shape"
    (a tree per dim) against the shapes given (already checked by profiles.check_run)."""
    env: dict = {}
    for e in inputs:
        sym = e.get("sym_shape")
        if not sym or e["name"] not in shapes:
            continue
        for d, got in zip(sym, shapes[e["name"]]):
            if isinstance(d, dict) and "sym" in d:
                env.setdefault(d["sym"], int(got))
    return env


def runtime_shape(entry: Mapping, env: Mapping[str, int], where: str = "plan.json") -> list:
    """An input/output/buffer entry's shape for this run (its "sym_shape" evaluated; else "shape")."""
    sym = entry.get("sym_shape")
    if not sym:
        return list(entry["shape"])
    return [expr_eval(d, env, where) for d in sym]


def symbol_ranges_of(plan: Mapping) -> dict:
    """plan.json "runtime_sizes": {symbol: [min, opt, max]} ({} for a static build)."""
    got = plan.get("runtime_sizes") or {}
    if not isinstance(got, dict):
        raise NncError("plan.json: 'runtime_sizes' must be an object {symbol: [min, opt, max]}")
    return got


def at_opt(symbol_ranges) -> dict:
    return {n: o for n, _, o, _ in symbol_ranges}



class CSize(str):
    """A size a runtime-size kernel computes from its symbol parameters: C text over nnc_s<i>
    (nnc's own names, never the model's), rendered by templates where an int size would be (the
    `ll` filter leaves it as it is, where an int gets its LL suffix)."""


def sym_names(symbol_ranges) -> dict:
    """{symbol: its kernel parameter name}: nnc_s0, nnc_s1, ... in the build's symbol order."""
    return {r[0]: f"nnc_s{i}" for i, r in enumerate(symbol_ranges)}


def c_expr(d, names: Mapping[str, str]):
    """An int as it is; an Expr as CSize C text (int64 arithmetic; '/' is floor division, exact
    for the non-negative sizes it computes)."""
    if isinstance(d, int):
        return int(d)
    return CSize(_c(d, names))


def _c(d, names) -> str:
    if isinstance(d, int):
        return f"{int(d)}LL"
    if d.kind == "sym":
        return names[d.name]
    parts = [_c(a, names) for a in d.args]
    if d.kind == "add":
        return "(" + " + ".join(parts) + ")"
    if d.kind == "mul":
        return "(" + " * ".join(parts) + ")"
    if d.kind == "div":
        return f"({parts[0]} / {parts[1]})"
    if d.kind == "max":  # a conditional, not max(): the same text compiles in device and host code
        out = parts[0]
        for p in parts[1:]:
            out = f"({out} > {p} ? {out} : {p})"
        return out
    raise NncError(f"runtime size {d} has an unknown part")


def leading_only(values) -> bool:
    """Every symbolic dim of these IR values is dim 0 (a batch): kernels whose index math is
    static below dim 0 and that stop at a runtime element count are correct at every size."""
    for v in values:
        if v is None or v.type.shape is None:
            continue
        if any(isinstance(d, Expr) for d in v.type.shape[1:]):
            return False
    return True


def static_factor(shape) -> int:
    """The product of a shape's static dims (divides its element count at every size)."""
    out = 1
    for d in shape:
        if isinstance(d, int):
            out *= d
    return out
