"""The verifier: def-before-use, operand/result counts, attrs schema, declared result types
against re-inferred ones, and layout tags (ir/layout.py: a known tag of the right rank; no #nhwc
value into an op that reads NCHW implicitly). Each error names the op and its line:col (or ONNX node).
"""
from __future__ import annotations

from . import layout, registry
from .registry import check_extents
from .builder import const_value
from .errors import NncError, ShapeError, VerifyError
from .graph import Function, Module, Region
from .types import types_compatible

# Regions (If branches, loop bodies) nest at most this deep. The parser, the ONNX importer and
# this verifier refuse deeper nesting up front with a clear error; every walk over the IR
# (printer, passes, interpreter) recurses per level, and this keeps them far from Python's limit.
MAX_REGION_DEPTH = 64


def verify(module: Module) -> None:
    names = [f.name for f in module.functions]
    if len(set(names)) != len(names):
        raise VerifyError(f"duplicate function names: {names}")
    for f in module.functions:
        _check_depth(f)
        for a in f.args:
            _check_type(a.type, f"@{f.name}: argument %{a.name}")
        seen = set()
        for v in f.results:  # outputs are keyed by name (run results, plan.json, the C API)
            if v.name in seen:
                raise VerifyError(f"@{f.name}: returns %{v.name} twice; each output needs its own value")
            seen.add(v.name)
        _region(f, [], module, f"@{f.name}")


def _check_depth(f: Function) -> None:
    stack = [(f, 0)]
    while stack:
        r, k = stack.pop()
        for op in r.ops:
            for _, sub in op.regions():
                if k + 1 > MAX_REGION_DEPTH:
                    raise VerifyError(f"{_where(op)}: regions nested too deep (more than {MAX_REGION_DEPTH} levels)")
                stack.append((sub, k + 1))


def _check_type(t, what: str) -> None:
    def fail(msg):
        raise VerifyError(f"{what}: {msg}")
    check_extents(t, fail)
    layout.check_type(t, fail)


def _fail(msg):
    raise VerifyError(msg)


def _where(op) -> str:
    res = ", ".join("%" + r.name for r in op.results)
    return f"{op.loc}: {res} = {op.name}"


def _region(r: Region, outer: list, module: Module, what: str) -> None:
    defined = set(id(a) for a in r.args)
    scope = outer + [defined]

    def visible(v):
        return any(id(v) in s for s in scope)

    for op in r.ops:
        w = _where(op)
        try:
            opdef = registry.get(op.name)
        except NncError:
            raise VerifyError(f"{w}: unknown op") from None
        for i, v in enumerate(op.operands):
            if v is not None and not visible(v):
                raise VerifyError(f"{w}: operand {i} %{v.name} is used before it is defined")
        lo, hi = opdef.inputs
        if len(op.operands) < lo or (hi >= 0 and len(op.operands) > hi):
            raise VerifyError(f"{w}: has {len(op.operands)} operands, the op takes {lo}..{'any' if hi < 0 else hi}")
        olo, ohi = opdef.outputs
        if len(op.results) < olo or (ohi >= 0 and len(op.results) > ohi):
            raise VerifyError(f"{w}: has {len(op.results)} results, the op gives {olo}..{'any' if ohi < 0 else ohi}")
        if not isinstance(op.attrs, opdef.attrs):
            raise VerifyError(f"{w}: attributes are {type(op.attrs).__name__}, expected {opdef.attrs.__name__}")
        for name, sub in op.regions():
            _region(sub, scope, module, f"{w}.{name}")
        try:
            inferred = registry.run_infer(opdef, op.attrs, op.operands, len(op.results), op.loc,
                                          lambda v: const_value(v, module.weights),
                                          [x.type for x in op.results])
        except ShapeError as e:
            raise VerifyError(f"{w}: {e}") from None
        layout.check_op(op, lambda msg: _fail(f"{w}: {msg}"))
        for i, (res, t) in enumerate(zip(op.results, inferred)):
            if not types_compatible(res.type, t):
                raise VerifyError(f"{w}: result {i} %{res.name} is declared {res.type} but inference gives {t}")
        for res in op.results:
            _check_type(res.type, f"{w}: result %{res.name}")
            if any(id(res) in s for s in scope):
                raise VerifyError(f"{w}: %{res.name} is defined twice")
            defined.add(id(res))
    for v in r.results:
        if not visible(v):
            raise VerifyError(f"{what}: returns %{v.name}, which is not defined")
    if isinstance(r, Function):
        pass
