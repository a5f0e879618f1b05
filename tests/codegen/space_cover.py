"""Which rendered points of a kernel space the CPU compile tests NVRTC-compile, and the compiling.

An sm_90a wgmma kernel takes NVRTC about half a CPU second on the 2-core CI machine (the 165 of
test_gemm_wgmma's full sweep: 80 s of CPU, 48 s wall, 2026-12-03), and the declared spaces hold
hundreds of points; most points differ from others only in numbers (tile sizes, stages) that
the template substitutes, not in the branches it takes. So by default a test compiles a covering
subset, in which each of these appears in one compiled kernel at least:
- every problem case the test lists (its label);
- every value of every parameter (a key a point leaves out counts as a value of its own: the
  template's default branch);
- every line of code any point's kernel has, comments dropped and numbers and kernel names blanked
  out (so every piece of text a template branch emits, whatever selected it, gets compiled);
- every extra feature the test names (e.g. "setmaxnreg: yes / no").
The subset is chosen greedily (the point that covers most of what is still uncovered, the earlier
in the test's order on a tie): deterministic, no sampling. Strength 2 (cover_points) asks for every
pair of case / parameter values instead, for properties that hang on combinations (register use).

NNC_FULL_SPACE=1 compiles every rendered point instead (the full sweep: run it after a change to a
kernel template or to a space, e.g. `NNC_FULL_SPACE=1 pytest -q tests/codegen/test_conv_tma.py`).
Every rendered point is still checked as text (the tests' assertions on sources) either way.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Iterable

FULL_SPACE_ENV = "NNC_FULL_SPACE"
DEFAULT = "<default>"  # the value of a parameter a point leaves out

_COMMENT = re.compile(r"//.*$")
_BLANKED = re.compile(r"nnc_\w+|0x[0-9a-fA-F]+|\d+")  # kernel names, numbers


def full_space() -> bool:
    return os.environ.get(FULL_SPACE_ENV, "") not in ("", "0")


def greedy_cover(items: list, features: Callable[[object], Iterable]) -> list:
    """The items (in their order) of a greedy cover: every feature of any item is a feature of at
    least one item returned."""
    feats = [set(features(it)) for it in items]
    todo = set().union(*feats) if feats else set()
    picked = []
    while todo:
        best = max(range(len(items)), key=lambda i: (len(feats[i] & todo), -i))
        picked.append(best)
        todo -= feats[best]
    return [items[i] for i in sorted(picked)]


def code_lines(source: str) -> set:
    """The kernel's lines of code as the template wrote them: no comments, numbers and kernel
    names blanked (tile sizes and strides are the point's numbers, not a branch)."""
    out = set()
    for line in source.splitlines():
        line = _BLANKED.sub("#", _COMMENT.sub("", line)).strip()
        if line:
            out.add(("line", line))
    return out


def point_features(case: str, params: dict, keys: Iterable[str], extra: Iterable = (), strength: int = 1) -> set:
    """What one labelled point covers: its case, each (parameter, value) and the extra features;
    strength 2: each pair of those (the case counting as a parameter)."""
    items = [("case", case)] + [(k, repr(params.get(k, DEFAULT))) for k in keys]
    items += [("extra", f) for f in extra]
    if strength == 1:
        return set(items)
    return {(a, b) for n, a in enumerate(items) for b in items[n + 1:]}


def cover_points(labelled: list, strength: int = 1, source: Callable | None = None) -> list:
    """The [(case, params dict)] to build: all under NNC_FULL_SPACE=1, else a covering subset;
    source(case, params), when given, is the point's kernel source (its code lines count too)."""
    if full_space():
        return list(labelled)
    keys = sorted({k for _, p in labelled for k in p})

    def features(cp):
        f = point_features(cp[0], cp[1], keys, (), strength)
        return f | code_lines(source(*cp)) if source else f
    return greedy_cover(labelled, features)


def to_compile(labelled: list, extra: Callable | None = None) -> list:
    """The specs of `labelled` ([(case label, KernelSpec)]) to NVRTC-compile, one per kernel name:
    all under NNC_FULL_SPACE=1, else the covering subset (module docstring). Points that render
    the same kernel (the same name) count as one with all their features."""
    keys = sorted({k for _, s in labelled for k in s.params})
    first: dict = {}  # kernel name -> (spec, its features)
    for case, s in labelled:
        spec, feats = first.setdefault(s.name, (s, code_lines(s.source)))
        feats |= point_features(case, s.params, keys, extra(s) if extra else ())
    uniq = list(first.values())
    if full_space():
        return [s for s, _ in uniq]
    return [s for s, _ in greedy_cover(uniq, lambda sf: sf[1])]


def nvrtc_compile_all(sources: list, arch: str = "sm_90a") -> list[int]:
    """Cubin sizes of `sources`, through codegen.cuda.compile_many (its NVRTC worker processes, one
    a CPU; no cache: each source really compiles)."""
    from nnc.codegen.cuda import Unit, compile_many
    units = [Unit(f"kernel{i}.cu", src) for i, src in enumerate(sources)]
    return [len(c) for c in compile_many(units, arch)]
