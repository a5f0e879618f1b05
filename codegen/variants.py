"""Lowering as data: kernel variants, the candidates of one op, and the selector that chooses.

A kernel family declares what it can render as `Variant`s:

    GEMM_TC = register(Variant(
        name="gemm.matmul", family="gemm", ops=("MatMul",), priority=10,
        applies=lambda p: ...,          # Problem -> bool | Fit: may it render p? NO emission
        space=lambda p: [...],          # Problem -> list[dict]: the declared parameter space
        default=lambda p, space: ...,   # the family's heuristic pick from that space
        render=lambda ctx, p, params: ...))  # emits through the LowerCtx (codegen/lower.py)

For every op (a `fused` group is one op) the driver (Lowerer.lower_op) collects the variants
registered for its name whose `applies` holds — the `Candidate`s, each with its problem and
declared space — and asks ONE `Selector` to choose: `choose(problem_key, candidates) ->
(candidate, params)`. The driver renders that choice and records it: the kernels it emitted
carry `variant` (and, where the kernel's own params do not already hold them, `variant_params`)
in their params, so plan.json "kernels" and the kernel header comment show them.

"render may decline": a variant made by the legacy `@lowering` adapter (codegen/lower.py) has
`applies` = its `when` and a render that may still return None having emitted nothing
(`may_decline=True`). The driver then removes that candidate and asks the selector again: the
selector ranks, the driver tries in that order. A real variant's render must not decline (its
`applies` decided); one that does is an internal error.

Selectors: `HeuristicSelector` (today's order: the highest priority, then `rank`, with the
family's default params) is the default; `TimedSelector` times every (candidate, params) of the
declared spaces with a `timer(candidate, params) -> seconds` and caches the fastest per problem
key; `stand_in_time` is a deterministic fake timer for tests (no GPU). LowerOptions.selector
names one of SELECTORS.

Timing on the GPU is codegen/tuning.py (LowerOptions.tune, `nnc compile --tune`): it renders every
(candidate, params) in a sandbox, compiles them in one batch, rejects those whose output differs
from the heuristic's and keeps the fastest, with a timing cache (codegen/timing_cache.py). It sees
variants only through this file's interface, so a newly registered variant is tuned like any other.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence


@dataclass(frozen=True)
class Fit:
    """What `applies` answers: whether, and (when not) why not."""
    ok: bool
    why: str = ""

    def __bool__(self) -> bool:
        return self.ok


YES = Fit(True)


def no(why: str) -> Fit:
    return Fit(False, why)


def _always(problem) -> bool:
    return True


def _no_space(problem) -> list[dict]:
    return [{}]


def _first(problem, space: list[dict]) -> dict:
    return dict(space[0]) if space else {}


@dataclass(frozen=True)
class Variant:
    """One way to lower an op (or a fused group). name: unique, nnc's own text (it reaches kernel
    headers); family: the kernel family; ops: the op names it is registered for; priority / rank:
    the heuristic order (higher priority first, then lower rank; variants of one op at one
    priority must be of one family); kinds: for `fused`, the group kinds it takes (None: any);
    regions: it lowers an op with regions itself; may_decline: render may decline (legacy);
    cost(problem, params): an optional model of the run time (seconds) a stand-in timer uses;
    fn: the legacy lowering function this variant adapts (None for a declared variant)."""
    name: str
    family: str
    ops: tuple
    render: Callable[..., Any]  # (ctx: LowerCtx, problem: Problem, params: dict) -> truthy, or None: declined
    applies: Callable[[Any], Any] = _always  # (problem) -> bool | Fit, without emitting
    space: Callable[[Any], list] = _no_space  # (problem) -> [params]
    default: Callable[[Any, list], dict] = _first  # (problem, space) -> params
    priority: int = 0
    rank: int = 0
    kinds: Optional[tuple] = None
    regions: bool = False
    may_decline: bool = False
    cost: Optional[Callable[[Any, dict], float]] = None
    fn: Optional[Callable] = None
    # its kernels take symbolic sizes at run time (codegen/runtime_sizes.py): only such variants
    # apply to a symbolic problem (a range profile's op); the others bake sizes in as constants
    runtime_sizes: bool = False

    def check(self, problem) -> Fit:
        """applies(problem) as a Fit (a `fused` group of a kind not in `kinds` never applies; a
        symbolic problem needs a runtime_sizes variant)."""
        if self.kinds is not None and getattr(getattr(problem.op, "attrs", None), "kind", None) not in self.kinds:
            return no("group kind not taken")
        if not self.runtime_sizes and getattr(problem, "symbolic", False):
            return no("needs compile-time sizes (the op has symbolic dims of a range profile)")
        got = self.applies(problem)
        if isinstance(got, Fit):
            return got
        return YES if got else no("declined")


# ---------------------------------------------------------------- the registry

REGISTRY: dict[str, list[Variant]] = {}  # op name -> variants, highest priority (then lowest rank) first


def order_key(v: Variant):
    return (-v.priority, v.rank)


def register(v: Variant) -> Variant:
    """Adds v under each of its ops. Variants of one op at one priority must be of one family
    (their order is the family's `rank`); two families at one priority is an error (ambiguous
    order), as is a name registered twice."""
    for op in v.ops:
        lst = REGISTRY.setdefault(op, [])
        for e in lst:
            if e.name == v.name and v.fn is None:  # (legacy adapters: the priority check below)
                raise RuntimeError(f"variant {v.name!r} for {op!r} registered twice")
            if e.priority == v.priority and (e.family != v.family or e.rank == v.rank):
                raise RuntimeError(f"lowering for {op!r} at priority {v.priority} registered twice "
                                   f"({e.name} and {v.name})")
        lst.append(v)
        lst.sort(key=order_key)
    return v


# ---------------------------------------------------------------- candidates and selectors

@dataclass
class Candidate:
    """A variant that applies to a problem, with its declared parameter space (made once, lazily:
    the heuristic selector only needs the default)."""
    variant: Variant
    problem: Any
    _space: Optional[list] = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.variant.name

    @property
    def space(self) -> list:
        if self._space is None:
            self._space = [dict(p) for p in self.variant.space(self.problem)] or [{}]
        return self._space

    def default_params(self) -> dict:
        return dict(self.variant.default(self.problem, self.space))


class Selector(Protocol):
    def choose(self, problem_key: str, candidates: Sequence[Candidate]) -> tuple[Candidate, dict]:
        """One of `candidates` (never empty; in the heuristic order) and params from its space."""
        ...


class HeuristicSelector:
    """Today's choice: the first candidate (highest priority, then rank) with its family's default."""
    name = "heuristic"

    def choose(self, problem_key: str, candidates: Sequence[Candidate]) -> tuple[Candidate, dict]:
        c = candidates[0]
        return c, c.default_params()


class ForcedSelector:
    """One variant (by name) with the given params (None: its default) wherever it is a candidate;
    elsewhere the heuristic's choice, or with strict=True a LookupError naming the candidates. For
    benchmarks and tests that time or check one kernel (tools/bench_int8.py, tools/bench_rownorm.py)."""
    name = "forced"

    def __init__(self, variant: str, params: Optional[dict] = None, strict: bool = False):
        self.variant, self.params, self.strict = variant, params, strict

    def choose(self, problem_key: str, candidates: Sequence[Candidate]) -> tuple[Candidate, dict]:
        for c in candidates:
            if c.name == self.variant:
                return c, dict(c.default_params() if self.params is None else self.params)
        if self.strict:
            raise LookupError(f"{self.variant} is not a candidate ({[c.name for c in candidates]})")
        return candidates[0], candidates[0].default_params()


def _params_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)


class TimedSelector:
    """Times every (candidate, params) of the candidates' declared spaces with `timer(candidate,
    params) -> seconds` and picks the fastest (ties: the heuristic order, then the space's order).
    The result is cached per problem key (variant name + params), so each distinct problem is
    timed once; `timings[problem_key]` keeps what was measured. A cached choice whose variant is
    not among the candidates (it declined) is timed again without it."""
    name = "timed"

    def __init__(self, timer: Callable[[Candidate, dict], float], cache: Optional[dict] = None):
        self.timer = timer
        self.cache: dict = {} if cache is None else cache
        self.timings: dict[str, list[tuple[str, dict, float]]] = {}

    def choose(self, problem_key: str, candidates: Sequence[Candidate]) -> tuple[Candidate, dict]:
        by_name = {c.name: c for c in candidates}
        hit = self.cache.get(problem_key)
        if hit is not None and hit[0] in by_name:
            return by_name[hit[0]], dict(hit[1])
        best, rows = None, []
        for c in candidates:
            for params in c.space:
                t = float(self.timer(c, params))
                rows.append((c.name, dict(params), t))
                if best is None or t < best[0]:
                    best = (t, c, params)
        self.timings[problem_key] = rows
        _, c, params = best
        self.cache[problem_key] = (c.name, dict(params))
        return c, dict(params)


def stand_in_time(candidate: Candidate, params: dict) -> float:
    """A deterministic fake timer (no GPU): the variant's cost model where it has one, else a
    stable pseudo-random time in [1, 2) ms from the problem key, variant name and params."""
    v = candidate.variant
    if v.cost is not None:
        return float(v.cost(candidate.problem, params))
    h = hashlib.sha256(f"{candidate.problem.key}|{v.name}|{_params_key(params)}".encode()).digest()
    return 1e-3 * (1.0 + int.from_bytes(h[:4], "little") / 2 ** 32)


SELECTORS: dict[str, Callable[[], Selector]] = {
    "heuristic": HeuristicSelector,
    "stand-in": lambda: TimedSelector(stand_in_time),  # the timed selector on the fake timer (tests, dry runs)
}


def make_selector(name: str) -> Selector:
    try:
        return SELECTORS[name]()
    except KeyError:
        raise ValueError(f"unknown selector {name!r} (known: {', '.join(sorted(SELECTORS))})") from None


@dataclass(frozen=True)
class Selection:
    """What was chosen for one op: the plan's record (Plan.selections)."""
    op: str  # describe_op of the op
    variant: str
    params: dict
    candidates: tuple  # names, in the heuristic order
    declined: tuple = ()  # names of candidates whose render declined first
