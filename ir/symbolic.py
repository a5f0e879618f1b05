"""Symbolic dimension expressions: `N`, `N*S`, `(H+2*p-k)/s+1`, and `?` for unknown.

A dim is a plain `int` or an `Expr`. Arithmetic on dims goes through Python operators, so shape
inference written for ints works unchanged on symbols: `(h + 2 * p - k) // s + 1`. Construction
normalises (constants fold, sums and products flatten, x+0 / x*1 vanish), so the printer's output
parses back to an equal tree and prints identically. `/` in the text is floor division.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

Dim = Union[int, "Expr"]


@dataclass(frozen=True)
class Expr:
    kind: str  # "sym" | "unknown" | "add" | "mul" | "div" | "max"
    name: str = ""
    args: tuple = ()

    # ---- arithmetic (int op Expr lands here through the reflected methods) ----
    def __add__(self, o):
        return add(self, o)

    def __radd__(self, o):
        return add(o, self)

    def __sub__(self, o):
        return add(self, mul(-1, o))

    def __rsub__(self, o):
        return add(o, mul(-1, self))

    def __mul__(self, o):
        return mul(self, o)

    def __rmul__(self, o):
        return mul(o, self)

    def __floordiv__(self, o):
        return floordiv(self, o)

    def __rfloordiv__(self, o):
        return floordiv(o, self)

    def __neg__(self):
        return mul(-1, self)

    def __str__(self) -> str:
        return fmt(self)

    def __repr__(self) -> str:
        return f"Expr({fmt(self)})"

    @property
    def symbols(self) -> set[str]:
        if self.kind == "sym":
            return {self.name}
        out: set[str] = set()
        for a in self.args:
            if isinstance(a, Expr):
                out |= a.symbols
        return out


UNKNOWN = Expr("unknown")


def sym(name: str) -> Expr:
    return Expr("sym", name)


def is_static(d: Dim) -> bool:
    return isinstance(d, int)


# Deepest expression tree accepted from text (ir/parser.py): fmt, evaluate and substitute
# recurse on the tree. Sums and products are flat, so 20,000 terms are depth 1.
MAX_DEPTH = 128


def depth(d: Dim) -> int:
    """Height of the expression tree (0 for an int or a symbol), computed without recursion."""
    best = 0
    stack = [(d, 0)]
    while stack:
        x, k = stack.pop()
        if isinstance(x, Expr) and x.args:
            best = max(best, k + 1)
            stack.extend((a, k + 1) for a in x.args)
    return best


def _has_unknown(*ds: Dim) -> bool:
    """Whether any dim is or contains `?`. The normalising constructors below turn any
    expression with an unknown part into UNKNOWN itself, so looking one level down suffices
    (and keeps building a long sum linear)."""
    return any(isinstance(d, Expr) and (d.kind == "unknown" or any(
        isinstance(a, Expr) and a.kind == "unknown" for a in d.args)) for d in ds)


def add(a: Dim, b: Dim) -> Dim:
    return add_n((a, b))


def add_n(ds) -> Dim:
    """The normalised sum of several dims in one pass (what folding `add` over them gives)."""
    ds = tuple(ds)
    if _has_unknown(*ds):
        return UNKNOWN
    terms: list = []
    const = 0
    for x in ds:
        parts = x.args if isinstance(x, Expr) and x.kind == "add" else (x,)
        for p in parts:
            if isinstance(p, int):
                const += p
            else:
                terms.append(p)
    if not terms:
        return const
    if const:
        terms.append(const)
    return terms[0] if len(terms) == 1 else Expr("add", args=tuple(terms))


def mul(a: Dim, b: Dim) -> Dim:
    return mul_n((a, b))


def mul_n(ds) -> Dim:
    """The normalised product of several dims in one pass."""
    ds = tuple(ds)
    if _has_unknown(*ds):
        return UNKNOWN
    factors: list = []
    const = 1
    for x in ds:
        parts = x.args if isinstance(x, Expr) and x.kind == "mul" else (x,)
        for p in parts:
            if isinstance(p, int):
                const *= p
            else:
                factors.append(p)
    if not factors or const == 0:
        return const
    if const != 1:
        factors.insert(0, const)
    return factors[0] if len(factors) == 1 else Expr("mul", args=tuple(factors))


def floordiv(a: Dim, b: Dim) -> Dim:
    if _has_unknown(a, b):
        return UNKNOWN
    if isinstance(a, int) and isinstance(b, int):
        return a // b
    if b == 1:
        return a
    return Expr("div", args=(a, b))


def dmax(a: Dim, b: Dim) -> Dim:
    if _has_unknown(a, b):
        return UNKNOWN
    if isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    if a == b:
        return a
    return Expr("max", args=(a, b))


_PREC = {"add": 1, "mul": 2, "div": 2}


def fmt(d: Dim, parent: int = 0) -> str:
    """Prints with the fewest parentheses that keep the tree: left-assoc + - * /."""
    if isinstance(d, int):
        s = str(d)
        return f"({s})" if d < 0 and parent > 0 else s
    if d.kind == "sym":
        return d.name
    if d.kind == "unknown":
        return "?"
    if d.kind == "max":
        return f"max({fmt(d.args[0])}, {fmt(d.args[1])})"
    prec = _PREC[d.kind]
    if d.kind == "add":
        s = fmt(d.args[0], prec)
        for t in d.args[1:]:
            if isinstance(t, int) and t < 0:
                s += f"-{-t}"
            elif isinstance(t, Expr) and t.kind == "mul" and isinstance(t.args[0], int) and t.args[0] < 0:
                s += "-" + fmt(mul(-t.args[0], Expr("mul", args=t.args[1:]) if len(t.args) > 2 else t.args[1]), prec + 1)
            else:
                s += "+" + fmt(t, prec)
    elif d.kind == "mul":
        s = "*".join(fmt(t, prec + (i > 0)) for i, t in enumerate(d.args))
        if isinstance(d.args[0], int) and d.args[0] == -1:
            s = "-" + "*".join(fmt(t, prec + 1) for t in d.args[1:])
            return f"({s})" if parent > 0 else s
    else:  # div: right operand binds tighter
        s = fmt(d.args[0], prec) + "/" + fmt(d.args[1], prec + 1)
    return f"({s})" if prec < parent or (parent > prec) else s


def evaluate(d: Dim, env: dict[str, int]) -> int:
    """Value of a dim once its symbols are bound; KeyError names a missing symbol."""
    if isinstance(d, int):
        return d
    if d.kind == "sym":
        return env[d.name]
    if d.kind == "unknown":
        raise KeyError("?")
    vals = [evaluate(a, env) for a in d.args]
    if d.kind == "add":
        return sum(vals)
    if d.kind == "mul":
        out = 1
        for v in vals:
            out *= v
        return out
    if d.kind == "div":
        return vals[0] // vals[1]
    return max(vals)


def substitute(d: Dim, env: dict[str, Dim]) -> Dim:
    """Replaces bound symbols and renormalises (so fully bound dims become ints)."""
    if isinstance(d, int) or d.kind == "unknown":
        return d
    if d.kind == "sym":
        return env.get(d.name, d)
    args = [substitute(a, env) for a in d.args]
    if d.kind in ("add", "mul"):  # n-ary in one step: linear in the number of terms
        return add_n(args) if d.kind == "add" else mul_n(args)
    fn = {"div": floordiv, "max": dmax}[d.kind]
    out = args[0]
    for a in args[1:]:
        out = fn(out, a)
    return out
