"""A decorator that keeps Python's cyclic garbage collector out of one long, allocation-heavy call.

Building or rewriting a graph of 20,000 ops allocates millions of small objects (ops, values,
parse-tree nodes, plan entries) that all stay alive, and the collector re-scans all of them again
and again while they accumulate: on a 20,001-node chain it made `ir.parser.parse` 3-4 times
slower (and grow faster than linearly) and `nnc compile` about a quarter slower. Nothing the
compiler creates needs the collector to be freed promptly: reference counting frees what is not
in a cycle, and the few dropped op<->value cycles are collected once the call returns. The
collector's previous state is restored (a caller who disabled it keeps it disabled).
"""
from __future__ import annotations

import functools
import gc


def gc_paused(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()
    return wrapper
