"""Control flow with tensor-typed bodies: If, Loop, Scan (ONNX semantics, newest opset).

Bodies are `Region` attributes. They may read values of enclosing scopes (ONNX outer-scope
references); the interpreter's environment chain resolves them.

- If(cond) {then_branch, else_branch}: the branches take no arguments and return the results.
- Loop(M?, cond?, v_initial...) {body}: body(iter_num: i64[], cond: bool[], v...) ->
  (cond, v..., scan_out...). Results: final v..., then each scan output stacked on a new axis 0.
- Scan(state..., scan_in...) {body, num_scan_inputs, ...axes/directions}: body(state...,
  slice...) -> (state..., scan_out_slice...). Results: final states, then scan outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import NncError
from ..graph import Region
from ..registry import register
from ..symbolic import UNKNOWN
from ..types import TensorType
from ._util import norm_axis


def merge_types(a: TensorType, b: TensorType) -> TensorType:
    """A type covering both: differing dims become `?`, differing ranks an unknown rank."""
    if a.dtype != b.dtype:
        raise NncError(f"types {a} and {b} have different dtypes")
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return TensorType(a.dtype, None)
    return TensorType(a.dtype, tuple(x if x == y else UNKNOWN for x, y in zip(a.shape, b.shape)))


def _fit(x: np.ndarray, t: TensorType) -> np.ndarray:
    """Body results must have the declared dtype (ONNX bodies are typed, a mismatch is an error)."""
    x = np.asarray(x)
    if x.dtype != t.dtype.np:
        raise NncError(f"body result has dtype {x.dtype}, declared {t}")
    return x


# ---------------------------------------------------------------- If

@dataclass(frozen=True)
class IfAttrs:
    then_branch: Region
    else_branch: Region


def _if_infer(ctx):
    a = ctx.attrs
    ct = ctx.type(0)
    if ct.is_static and ct.numel != 1:
        ctx.fail(f"cond must hold one element, got {ctx.type(0)}")
    tr, er = a.then_branch.results, a.else_branch.results
    if len(tr) != len(er):
        ctx.fail(f"then_branch returns {len(tr)} values, else_branch {len(er)}")
    if len(tr) != ctx.num_results:
        ctx.fail(f"branches return {len(tr)} values, the op has {ctx.num_results} results")
    if a.then_branch.args or a.else_branch.args:
        ctx.fail("If branches take no arguments")
    try:
        return [merge_types(x.type, y.type) for x, y in zip(tr, er)]
    except NncError as e:
        ctx.fail(f"branches disagree: {e}")


def _if_ref(a: IfAttrs, cond, *, ctx):
    c = np.asarray(cond)
    if c.size != 1:
        raise NncError(f"If: cond has {c.size} elements, expected 1")
    region = a.then_branch if bool(c.reshape(-1)[0]) else a.else_branch
    return tuple(ctx.run_region(region, []))


register("If", IfAttrs, infer=_if_infer, ref=_if_ref, inputs=1, outputs=(1, -1), ref_ctx=True,
         doc="Runs then_branch or else_branch by a boolean scalar.")


# ---------------------------------------------------------------- Loop

@dataclass(frozen=True)
class LoopAttrs:
    body: Region


def _body_const(region: Region, v):
    """The value of a region result if a `const` op of the region defines it."""
    op = v.producer
    if op is not None and op.name == "const" and op in region.ops and op.attrs.value is not None:
        return op.attrs.value
    return None


def _loop_infer(ctx):
    body = ctx.attrs.body
    n_carried = max(ctx.n - 2, 0)
    if len(body.args) != 2 + n_carried:
        ctx.fail(f"body takes {len(body.args)} arguments, expected 2 + {n_carried} loop-carried values")
    if len(body.results) < 1 + n_carried:
        ctx.fail(f"body returns {len(body.results)} values, expected at least 1 + {n_carried}")
    n_scan = len(body.results) - 1 - n_carried
    if ctx.num_results != n_carried + n_scan:
        ctx.fail(f"the op has {ctx.num_results} results, the body gives {n_carried} loop-carried + "
                 f"{n_scan} scan outputs")
    out = []
    for i in range(n_carried):
        init = ctx.type(2 + i)
        try:
            out.append(merge_types(init, body.results[1 + i].type))
        except NncError as e:
            ctx.fail(f"loop-carried value {i}: {e}")
    # trip count of the scan outputs: M when it is constant and the body cannot stop early
    trip = UNKNOWN
    m = ctx.value(0)
    if m is not None and m.size == 1:
        cres = body.results[0]
        while cres.producer is not None and cres.producer.name == "Identity" and cres.producer in body.ops:
            cres = cres.producer.operands[0]
        cv = _body_const(body, cres)
        cond_in = ctx.value(1) if ctx.has(1) else np.array(True)
        stays_true = (cv is not None and cv.size == 1 and bool(cv.reshape(-1)[0])) or (
            cres is body.args[1] and cond_in is not None and bool(np.asarray(cond_in).reshape(-1)[0]))
        if stays_true:
            trip = max(int(m.reshape(-1)[0]), 0)
    for j in range(n_scan):
        t = body.results[1 + n_carried + j].type
        out.append(TensorType(t.dtype, None if t.shape is None else (trip,) + tuple(t.shape)))
    return out


def _loop_ref(a: LoopAttrs, *operands, ctx):
    ops = list(operands) + [None] * max(0, 2 - len(operands))
    M, cond, carried = ops[0], ops[1], list(ops[2:])
    body = a.body
    n_carried = len(carried)
    n_scan = len(body.results) - 1 - n_carried
    max_trip = None if M is None else int(np.asarray(M).reshape(-1)[0])
    c = True if cond is None else bool(np.asarray(cond).reshape(-1)[0])
    cond_t = body.args[1].type
    scans = [[] for _ in range(n_scan)]
    i = 0
    while (max_trip is None or i < max_trip) and c:
        it = np.array(i, np.int64).reshape(() if body.args[0].type.shape in ((), None) else (1,))
        cv = np.array(c, np.bool_).reshape(() if cond_t.shape in ((), None) else (1,))
        outs = ctx.run_region(body, [it, cv] + carried)
        c = bool(np.asarray(outs[0]).reshape(-1)[0])
        carried = list(outs[1:1 + n_carried])
        for j in range(n_scan):
            scans[j].append(np.asarray(outs[1 + n_carried + j]))
        i += 1
    res = [np.asarray(v) for v in carried]
    for j in range(n_scan):
        t = ctx.result_types[n_carried + j]
        if scans[j]:
            res.append(np.stack(scans[j]).astype(t.dtype.np, copy=False))
        else:
            inner = () if t.shape is None else tuple(d if isinstance(d, int) else 0 for d in t.shape[1:])
            res.append(np.zeros((0,) + inner, t.dtype.np))
    return tuple(res)


register("Loop", LoopAttrs, infer=_loop_infer, ref=_loop_ref, inputs=(0, -1), outputs=(0, -1),
         ref_ctx=True, doc="Generic loop: trip count M and/or condition, loop-carried values, scan outputs.")


# ---------------------------------------------------------------- Scan

@dataclass(frozen=True)
class ScanAttrs:
    body: Region
    num_scan_inputs: int
    scan_input_axes: Optional[tuple[int, ...]] = None
    scan_input_directions: Optional[tuple[int, ...]] = None
    scan_output_axes: Optional[tuple[int, ...]] = None
    scan_output_directions: Optional[tuple[int, ...]] = None


def _scan_layout(a: ScanAttrs, n_in: int, n_out: int):
    m = a.num_scan_inputs
    in_axes = list(a.scan_input_axes) if a.scan_input_axes is not None else [0] * m
    in_dirs = list(a.scan_input_directions) if a.scan_input_directions is not None else [0] * m
    out_axes = list(a.scan_output_axes) if a.scan_output_axes is not None else [0] * n_out
    out_dirs = list(a.scan_output_directions) if a.scan_output_directions is not None else [0] * n_out
    if len(in_axes) != m or len(in_dirs) != m:
        raise NncError(f"scan_input_axes/directions need {m} entries")
    if len(out_axes) != n_out or len(out_dirs) != n_out:
        raise NncError(f"scan_output_axes/directions need {n_out} entries")
    return in_axes, in_dirs, out_axes, out_dirs


def _scan_infer(ctx):
    a = ctx.attrs
    body = a.body
    m = a.num_scan_inputs
    n_state = ctx.n - m
    if m < 1 or n_state < 0:
        ctx.fail(f"num_scan_inputs={m} with {ctx.n} operands")
    if len(body.args) != ctx.n:
        ctx.fail(f"body takes {len(body.args)} arguments, the op has {ctx.n} operands")
    n_out = len(body.results) - n_state
    if n_out < 0 or ctx.num_results != len(body.results):
        ctx.fail(f"the op has {ctx.num_results} results, the body returns {len(body.results)}")
    in_axes, _, out_axes, _ = _scan_layout(a, m, n_out)
    length = UNKNOWN
    for k in range(m):
        s = ctx.type(n_state + k).shape
        if s is not None:
            ax = norm_axis(in_axes[k], len(s), "scan_input_axes entry")
            length = s[ax]
            break
    out = []
    for i in range(n_state):
        try:
            out.append(merge_types(ctx.type(i), body.results[i].type))
        except NncError as e:
            ctx.fail(f"state {i}: {e}")
    for j in range(n_out):
        t = body.results[n_state + j].type
        if t.shape is None:
            out.append(TensorType(t.dtype, None))
            continue
        r = len(t.shape) + 1
        ax = norm_axis(out_axes[j], r, "scan_output_axes entry")
        shp = list(t.shape)
        shp.insert(ax, length)
        out.append(TensorType(t.dtype, tuple(shp)))
    return out


def _scan_ref(a: ScanAttrs, *operands, ctx):
    body = a.body
    m = a.num_scan_inputs
    n_state = len(operands) - m
    n_out = len(body.results) - n_state
    in_axes, in_dirs, out_axes, out_dirs = _scan_layout(a, m, n_out)
    states = list(operands[:n_state])
    scan_in = []
    for k in range(m):
        x = np.asarray(operands[n_state + k])
        ax = norm_axis(in_axes[k], x.ndim)
        x = np.moveaxis(x, ax, 0)
        if in_dirs[k]:
            x = x[::-1]
        scan_in.append(x)
    length = scan_in[0].shape[0]
    if any(x.shape[0] != length for x in scan_in):
        raise NncError(f"Scan: scan inputs have different lengths {[x.shape[0] for x in scan_in]}")
    outs = [[] for _ in range(n_out)]
    for t in range(length):
        res = ctx.run_region(body, states + [x[t] for x in scan_in])
        states = list(res[:n_state])
        for j in range(n_out):
            outs[j].append(np.asarray(res[n_state + j]))
    result = [np.asarray(s) for s in states]
    for j in range(n_out):
        rt = ctx.result_types[n_state + j]
        if outs[j]:
            y = np.stack(outs[j])
        else:
            bt = body.results[n_state + j].type
            inner = () if bt.shape is None else tuple(d if isinstance(d, int) else 0 for d in bt.shape)
            y = np.zeros((0,) + inner, rt.dtype.np)
        if out_dirs[j]:
            y = y[::-1]
        ax = norm_axis(out_axes[j], y.ndim)
        result.append(np.ascontiguousarray(np.moveaxis(y, 0, ax)))
    return tuple(result)


register("Scan", ScanAttrs, infer=_scan_infer, ref=_scan_ref, inputs=(1, -1), outputs=(1, -1),
         ref_ctx=True, doc="Iterates a body over slices of scan inputs, carrying state.")
