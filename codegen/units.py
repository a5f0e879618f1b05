"""Cuts a model's kernels into compile units: the programs codegen/cuda.py compiles in parallel.

model.cu stays one readable file with the whole prelude (what the C API's nvcc build compiles);
the cubins the Python runtime loads are built from units instead. A unit is a run of consecutive
kernels (plan order) with only the prelude pieces those kernels use:

- few kernels per unit, so the units of a big model spread over the CPUs, and many per unit
  where they are small, so the fixed cost of an NVRTC program (~15 ms, more than many kernels)
  is paid rarely;
- a unit's source depends only on its kernels, so recompiling the same model hits the cubin
  cache for every unit, and an edited model recompiles only the units whose kernels changed.

Prelude pieces (templates/prelude.cu.j2 lists them): prelude_base always; prelude_fp16 (CUDA's
fp16/bf16 headers, the costliest to parse) when a kernel mentions half or bfloat16 names; every
other piece when a kernel uses an nnc_ / NNC_ name the piece mentions. The match is loose on
purpose (an extra piece only costs time), and each unit keeps a fallback with the whole prelude
that cuda.compile_many tries if the trimmed one fails. With NNC_STRICT_PRELUDE=1 (the test suite
sets it) units have no fallback, so a kernel whose trimmed prelude lacks a piece fails loudly.
"""
from __future__ import annotations

import functools
import re
from typing import Sequence

from .cuda import Unit
from .options import env_strict_prelude
from .render import env, render

# a unit closes at either bound (a kernel larger than MAX_UNIT_CHARS is a unit alone)
MAX_UNIT_KERNELS = 16
MAX_UNIT_CHARS = 60_000

ALWAYS = "prelude_base.cu.j2"
HALF_PIECE = "prelude_fp16.cu.j2"
_HALF_NAMES = re.compile(r"half|bfloat16|__h[a-z]")
_NNC_NAMES = re.compile(r"\b(?:nnc|NNC)_\w+")


@functools.lru_cache(maxsize=1)
def all_pieces() -> tuple[str, ...]:
    return tuple(env().get_template("prelude.cu.j2").module.all_pieces)


@functools.lru_cache(maxsize=1)
def _piece_names() -> dict[str, frozenset]:
    """piece -> the nnc_/NNC_ names it mentions (what a kernel naming one of them needs)."""
    return {p: frozenset(_NNC_NAMES.findall(render(p))) for p in all_pieces()}


def prelude(pieces: Sequence[str] | None = None) -> str:
    """The prelude text: every piece (model.cu), or the given ones in the prelude's order."""
    return _prelude(None if pieces is None else tuple(p for p in all_pieces() if p in set(pieces)))


@functools.lru_cache(maxsize=64)
def _prelude(pieces) -> str:
    return render("prelude.cu.j2") if pieces is None else render("prelude.cu.j2", pieces=list(pieces))


def pieces_for(sources: Sequence[str]) -> list[str]:
    """The prelude pieces kernels with these sources use, closed over the pieces' own uses."""
    names = _piece_names()
    text = "".join(sources)
    used = set(_NNC_NAMES.findall(text))
    need = {ALWAYS}
    if _HALF_NAMES.search(text):
        need.add(HALF_PIECE)
    changed = True
    while changed:  # a piece may use another piece's names
        changed = False
        for p, provided in names.items():
            if p not in need and p not in (ALWAYS, HALF_PIECE) and used & provided:
                need.add(p)
                used |= provided
                changed = True
    return [p for p in all_pieces() if p in need]


def group(kernels: Sequence) -> list[list]:
    """Consecutive runs of kernels (objects with .source), each within the unit bounds."""
    groups: list[list] = []
    cur: list = []
    size = 0
    for k in kernels:
        n = len(k.source)
        if cur and (len(cur) >= MAX_UNIT_KERNELS or size + n > MAX_UNIT_CHARS):
            groups.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += n
    if cur:
        groups.append(cur)
    return groups


def make_units(kernels: Sequence) -> list[Unit]:
    """Compile units for kernels (objects with .name and .source, e.g. codegen.lower.Kernel)."""
    groups = group(kernels)
    full = None if env_strict_prelude() else prelude()
    units = []
    for i, g in enumerate(groups):
        body = "\n".join(k.source for k in g)
        names = tuple(k.name for k in g)
        shown = ", ".join(names[:3]) + (f", ... ({len(names)} kernels)" if len(names) > 3 else "")
        units.append(Unit(name=f"unit {i + 1} of {len(groups)} ({shown})",
                          source=prelude(pieces_for([k.source for k in g])) + body,
                          kernels=names, fallback=None if full is None else full + body))
    return units
