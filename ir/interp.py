"""The numpy reference interpreter: runs any IR graph, regions included.

Each op's registry entry holds its reference semantics; this file only walks the graph, feeds
operands, and checks what comes back (dtype and static dims against the declared result types),
so a wrong reference implementation fails loudly instead of drifting.
"""
from __future__ import annotations

from collections import ChainMap
from typing import Callable, Optional

import numpy as np

from . import registry
from .errors import InputError, NncError
from .graph import Module, Op, Region
from .types import TensorType, dims_compatible


class RefCtx:
    """What a region-aware reference function (`ref_ctx=True`) gets as `ctx=`."""

    def __init__(self, interp: Optional["Interpreter"], env, op: Optional[Op], types):
        self.interp = interp
        self.env = env
        self.op = op
        self.result_types = types

    @property
    def weights(self):
        return self.interp.module.weights if self.interp else None

    def run_region(self, region: Region, args: list) -> list[np.ndarray]:
        return self.interp.run_region(region, args, self.env)


def call_ref(opdef, attrs, vals: list, types: list, ctx: Optional[RefCtx]) -> list[np.ndarray]:
    kwargs = {"ctx": ctx} if opdef.ref_ctx else {}
    try:
        # overflow / invalid-value warnings would name nnc source lines; non-finite results are
        # data, which `nnc run` reports per output instead
        with np.errstate(all="ignore"):
            out = opdef.ref(attrs, *vals, **kwargs)
    except NncError:
        raise
    except Exception as e:  # numpy errors from bad data: report which op
        raise NncError(f"{opdef.name}: reference evaluation failed: {type(e).__name__}: {e}") from e
    if not isinstance(out, (tuple, list)):
        out = (out,)
    out = list(out)[: len(types)]
    if len(out) < len(types):
        raise NncError(f"{opdef.name}: reference gave {len(out)} results, {len(types)} declared")
    res = []
    for i, (a, t) in enumerate(zip(out, types)):
        a = np.asarray(a)
        if a.dtype != t.dtype.np:
            raise NncError(f"{opdef.name}: result {i} has dtype {a.dtype}, declared {t}")
        if t.shape is not None:
            if a.ndim != len(t.shape) or not all(dims_compatible(int(x), d) for x, d in zip(a.shape, t.shape)):
                raise NncError(f"{opdef.name}: result {i} has shape {list(a.shape)}, declared {t}")
        res.append(a)
    return res


class Interpreter:
    def __init__(self, module: Module, observe: Optional[Callable[[Op, list], None]] = None):
        """observe(op, results): called after every op runs (ops inside regions too, once per
        execution), with its result arrays; `nnc verify --per-layer` reads intermediates this way."""
        self.module = module
        self.observe = observe

    def run(self, inputs: dict, func: str = "main") -> dict[str, np.ndarray]:
        f = next((g for g in self.module.functions if g.name == func), None)
        if f is None:
            raise NncError(f"no function @{func}")
        args = []
        for a in f.args:
            if a.name not in inputs:
                raise InputError(f"missing input {a.name!r} ({a.type})")
            args.append(check_input(a.name, a.type, inputs[a.name]))
        extra = set(inputs) - {a.name for a in f.args}
        if extra:
            raise InputError(f"unknown inputs {sorted(extra)}; the model takes {[a.name for a in f.args]}")
        outs = self.run_region(f, args, {})
        return {v.name: o for v, o in zip(f.results, outs)}

    def run_region(self, region: Region, args: list, parent_env) -> list[np.ndarray]:
        env = ChainMap({}, parent_env) if parent_env else ChainMap({})
        for a, x in zip(region.args, args):
            env[id(a)] = x
        for op in region.ops:
            opdef = registry.get(op.name)
            vals = [None if v is None else env[id(v)] for v in op.operands]
            ctx = RefCtx(self, env, op, [r.type for r in op.results])
            try:
                outs = call_ref(opdef, op.attrs, vals, ctx.result_types, ctx)
            except NncError as e:
                raise NncError(f"{op.loc}: {e}") from e.__cause__
            for r, o in zip(op.results, outs):
                env[id(r)] = o
            if self.observe is not None:
                self.observe(op, outs)
        return [env[id(v)] for v in region.results]


def check_input(name: str, t: TensorType, x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != t.dtype.np:
        raise InputError(f"input {name!r}: expected dtype {t.dtype.np_name}, given {x.dtype}")
    if t.shape is not None:
        if x.ndim != len(t.shape) or not all(dims_compatible(int(g), d) for g, d in zip(x.shape, t.shape)):
            raise InputError(f"input {name!r}: expected shape {t}, given {list(x.shape)}")
    return x


def run(module: Module, inputs: dict) -> dict[str, np.ndarray]:
    return Interpreter(module).run(inputs)
