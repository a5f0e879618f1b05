"""Reading OUT/plan.json: the one reader the CLI, the Python runtime and the reference backend
share. plan.json is as untrusted as a model (someone may have edited the directory): it must be
a plain file inside OUT, valid JSON, and its "inputs"/"outputs" entries well-formed, so a tampered
plan is an error naming the field, never a KeyError or a giant allocation."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .ir.errors import NncError
from .ir.registry import MAX_ELEMENTS
from .ir.types import dtype as to_dtype
from .outdir import member


def read_plan(out_dir) -> dict:
    """OUT/plan.json, with its "inputs" and "outputs" checked to be what `nnc run` reads
    (names, known dtypes, shapes of ints >= 0 or symbol names): a tampered plan is an error
    naming the field, not a KeyError or a giant allocation."""
    d = Path(out_dir)
    if not d.is_dir():
        raise NncError(f"{d}: not a directory (give the output directory of `nnc compile`)")
    if not os.path.lexists(d / "plan.json"):
        raise NncError(f"{d}: no plan.json (is this a directory written by `nnc compile`?)")
    p = member(d, "plan.json", "plan")  # a plain regular file inside OUT, never a symlink
    try:
        plan = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise NncError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(plan, dict):
        raise NncError(f"{p}: expected a JSON object (an nnc plan)")
    for key in ("inputs", "outputs"):
        entries = plan.get(key)
        if not isinstance(entries, list):
            raise NncError(f"{p}: {key!r} must be a list")
        names = set()
        for k, e in enumerate(entries):
            where = f"{p}: {key}[{k}]"
            if not isinstance(e, dict) or not isinstance(e.get("name"), str):
                raise NncError(f"{where}: expected an object with a string 'name'")
            if e["name"] in names:
                raise NncError(f"{where}: name {e['name']!r} is listed twice")
            names.add(e["name"])
            try:
                if not isinstance(e.get("dtype"), str):
                    raise TypeError
                to_dtype(e["dtype"])
            except (ValueError, TypeError):
                raise NncError(f"{where}: unknown dtype {e.get('dtype')!r}") from None
            if "shape" not in e:
                raise NncError(f"{where}: has no 'shape'")
            shape = e["shape"]
            if shape is not None and (not isinstance(shape, list) or not all(
                    (isinstance(d, int) and not isinstance(d, bool) and d >= 0) or isinstance(d, str) for d in shape)):
                raise NncError(f"{where}: shape {shape!r} must be a list of ints >= 0 and symbol names")
            if shape and int(np.prod([d for d in shape if isinstance(d, int)], dtype=object)) > MAX_ELEMENTS:
                raise NncError(f"{where}: shape {shape} has more elements than nnc accepts")
    return plan


def check_against_ir(plan: dict, func, out_dir) -> None:
    """The IR that will run takes the inputs plan.json describes (both come from one compile)."""
    from .ir.symbolic import fmt
    ir = [(a.name, a.type.dtype.np_name, None if a.type.shape is None else
           [d if isinstance(d, int) else fmt(d) for d in a.type.shape]) for a in func.args]
    plan_in = [(e["name"], e["dtype"], e.get("shape")) for e in plan["inputs"]]
    if ir != plan_in:
        raise NncError(f"{out_dir}: plan.json's inputs {plan_in} differ from ir/final.nnir's {ir}")
