"""Elementwise family: n-ary ops with numpy broadcasting, one template (elementwise.cu.j2).

The body is an expression tree: each op has an entry in EXPR mapping (attrs, argument
expressions, compute types) -> a C expression. `op_expr` is the public entry point a fusion pass
uses to inline a chain of ops into one kernel (`elementwise_params` builds the template params).
"""
from __future__ import annotations

import math
from typing import Callable

from ..dtypes import compute_type
from ...ir.symbolic import floordiv
from ..lower import LowerCtx, lowering
from ..runtime_sizes import static_factor
from ..render import cfloat


def lit(v, ct: str) -> str:
    """A literal in compute type ct."""
    if ct == "float":
        return cfloat(v)
    if ct == "double":
        v = float(v)
        if math.isnan(v):
            return "(0.0/0.0)"
        if math.isinf(v):
            return "(1.0/0.0)" if v > 0 else "(-1.0/0.0)"
        return repr(v)
    if ct == "bool":
        return "true" if v else "false"
    return f"(({ct}){int(v)}LL)"


def _f(ct: str) -> str:  # libm suffix
    return "f" if ct == "float" else ""


def _isfloat(ct: str) -> bool:
    return ct in ("float", "double")


# Each entry: fn(a: attrs, x: list[str] arg exprs, ct: list[str] arg compute types, ot: out compute type) -> str
EXPR: dict[str, Callable] = {}


def _e(*names):
    def deco(fn):
        for n in names:
            EXPR[n] = fn
        return fn
    return deco


def _unary_f(fname):
    return lambda a, x, ct, ot: f"{fname}{_f(ct[0])}({x[0]})" if _isfloat(ct[0]) else f"static_cast<{ot}>({fname}((double){x[0]}))"


for _n, _fn in {"Exp": "exp", "Log": "log", "Sqrt": "sqrt", "Tanh": "tanh", "Erf": "erf", "Sin": "sin",
                "Cos": "cos", "Tan": "tan", "Asin": "asin", "Acos": "acos", "Atan": "atan", "Sinh": "sinh",
                "Cosh": "cosh", "Asinh": "asinh", "Acosh": "acosh", "Atanh": "atanh", "Floor": "floor",
                "Ceil": "ceil"}.items():
    EXPR[_n] = _unary_f(_fn)

_e("Add", "Sum")(lambda a, x, ct, ot: "(" + " + ".join(x) + ")")
_e("Sub")(lambda a, x, ct, ot: f"({x[0]} - {x[1]})")
_e("Mul")(lambda a, x, ct, ot: f"({x[0]} * {x[1]})")
_e("Div")(lambda a, x, ct, ot: f"({x[0]} / {x[1]})")
_e("Mean")(lambda a, x, ct, ot: f"(({' + '.join(x)}) / {lit(len(x), ot)})")


EXPR["Max"] = lambda a, x, ct, ot: _fold("nnc_max", x)
EXPR["Min"] = lambda a, x, ct, ot: _fold("nnc_min", x)


def _fold(fn, x):
    e = x[0]
    for y in x[1:]:
        e = f"{fn}({e}, {y})"
    return e


_e("Pow")(lambda a, x, ct, ot: (f"pow{_f(ot)}({x[0]}, static_cast<{ot}>({x[1]}))" if _isfloat(ot)
                                else f"nnc_ipow<{ot}>({x[0]}, static_cast<{ot}>({x[1]}))"))


@_e("Mod")
def _mod(a, x, ct, ot):
    if getattr(a, "fmod", 0):
        return f"fmod{_f(ot)}({x[0]}, {x[1]})" if _isfloat(ot) else f"({x[0]} % {x[1]})"
    return f"nnc_pymod({x[0]}, {x[1]})" if _isfloat(ot) else f"nnc_mod<{ot}>({x[0]}, {x[1]})"


_e("Relu")(lambda a, x, ct, ot: f"({x[0]} < {lit(0, ot)} ? {lit(0, ot)} : {x[0]})")
_e("Neg")(lambda a, x, ct, ot: f"(-{x[0]})")
_e("Abs")(lambda a, x, ct, ot: f"nnc_abs({x[0]})")
_e("Sign")(lambda a, x, ct, ot: f"nnc_sign({x[0]})")
_e("Reciprocal")(lambda a, x, ct, ot: f"({lit(1, ot)} / {x[0]})")
_e("Round")(lambda a, x, ct, ot: f"nnc_round({x[0]})")
_e("Sigmoid")(lambda a, x, ct, ot: f"nnc_sigmoid({x[0]})")
_e("Softplus")(lambda a, x, ct, ot: f"nnc_softplus({x[0]})" if ot == "float" else f"log1p(exp({x[0]}))")
_e("Softsign")(lambda a, x, ct, ot: f"({x[0]} / ({lit(1, ot)} + nnc_abs({x[0]})))")
_e("Elu")(lambda a, x, ct, ot: f"({x[0]} > {lit(0, ot)} ? {x[0]} : {lit(getattr(a, 'alpha', 1.0), ot)} * (exp{_f(ot)}({x[0]}) - {lit(1, ot)}))")
_e("Selu")(lambda a, x, ct, ot: (f"({lit(getattr(a, 'gamma', 1.0507009873554805), ot)} * ({x[0]} > {lit(0, ot)} ? {x[0]} : "
                                 f"{lit(getattr(a, 'alpha', 1.6732632423543772), ot)} * (exp{_f(ot)}({x[0]}) - {lit(1, ot)})))"))
_e("Celu")(lambda a, x, ct, ot: (f"(nnc_max({lit(0, ot)}, {x[0]}) + nnc_min({lit(0, ot)}, {lit(getattr(a, 'alpha', 1.0), ot)} * "
                                 f"(exp{_f(ot)}({x[0]} / {lit(getattr(a, 'alpha', 1.0), ot)}) - {lit(1, ot)})))"))
_e("LeakyRelu")(lambda a, x, ct, ot: f"({x[0]} >= {lit(0, ot)} ? {x[0]} : {lit(getattr(a, 'alpha', 0.01), ot)} * {x[0]})")
_e("ThresholdedRelu")(lambda a, x, ct, ot: f"({x[0]} > {lit(getattr(a, 'alpha', 1.0), ot)} ? {x[0]} : {lit(0, ot)})")
_e("HardSigmoid")(lambda a, x, ct, ot: (f"nnc_max({lit(0, ot)}, nnc_min({lit(1, ot)}, {lit(getattr(a, 'alpha', 0.2), ot)} * {x[0]} + "
                                        f"{lit(getattr(a, 'beta', 0.5), ot)}))"))
_e("HardSwish")(lambda a, x, ct, ot: f"({x[0]} * nnc_max({lit(0, ot)}, nnc_min({lit(1, ot)}, {x[0]} * {lit(1 / 6, ot)} + {lit(0.5, ot)})))")
_e("Mish")(lambda a, x, ct, ot: f"({x[0]} * tanh{_f(ot)}(log1p{_f(ot)}(exp{_f(ot)}({x[0]}))))")
_e("PRelu")(lambda a, x, ct, ot: f"({x[0]} < {lit(0, ot)} ? {x[0]} * static_cast<{ot}>({x[1]}) : {x[0]})")


@_e("Gelu")
def _gelu(a, x, ct, ot):
    if getattr(a, "approximate", "none") == "tanh":
        return f"nnc_gelu_tanh({x[0]})" if ot == "float" else \
            f"(0.5 * {x[0]} * (1.0 + tanh(0.7978845608028654 * ({x[0]} + 0.044715 * {x[0]} * {x[0]} * {x[0]}))))"
    return f"({lit(0.5, ot)} * {x[0]} * ({lit(1, ot)} + erf{_f(ot)}({x[0]} * {lit(0.7071067811865476, ot)})))"


@_e("Shrink")
def _shrink(a, x, ct, ot):
    L, B = lit(getattr(a, "lambd", 0.5), ot), lit(getattr(a, "bias", 0.0), ot)
    return f"({x[0]} < -{L} ? {x[0]} + {B} : ({x[0]} > {L} ? {x[0]} - {B} : {lit(0, ot)}))"


@_e("Clip")
def _clip(a, x, ct, ot):
    e = x[0]
    if len(x) > 1 and x[1] is not None:
        e = f"({e} < {x[1]} ? static_cast<{ot}>({x[1]}) : {e})"
    if len(x) > 2 and x[2] is not None:
        e = f"({e} > {x[2]} ? static_cast<{ot}>({x[2]}) : {e})"
    return e


for _n, _o in {"Equal": "==", "Less": "<", "Greater": ">", "LessOrEqual": "<=", "GreaterOrEqual": ">=",
               "And": "&&", "Or": "||", "Xor": "!=", "BitwiseAnd": "&", "BitwiseOr": "|", "BitwiseXor": "^"}.items():
    EXPR[_n] = (lambda o: lambda a, x, ct, ot: f"({x[0]} {o} {x[1]})")(_o)
_e("Not")(lambda a, x, ct, ot: f"(!{x[0]})")
_e("BitwiseNot")(lambda a, x, ct, ot: f"static_cast<{ot}>(~{x[0]})")
_e("BitShift")(lambda a, x, ct, ot: f"static_cast<{ot}>({x[0]} {'<<' if getattr(a, 'direction', 'LEFT') == 'LEFT' else '>>'} {x[1]})")
_e("IsNaN")(lambda a, x, ct, ot: f"({x[0]} != {x[0]})")
_e("IsInf")(lambda a, x, ct, ot: (f"nnc_isinf((float){x[0]}, {'true' if getattr(a, 'detect_positive', 1) else 'false'}, "
                                  f"{'true' if getattr(a, 'detect_negative', 1) else 'false'})"))
_e("Where")(lambda a, x, ct, ot: f"({x[0]} ? static_cast<{ot}>({x[1]}) : static_cast<{ot}>({x[2]}))")
_e("Cast", "CastLike")(lambda a, x, ct, ot: f"static_cast<{ot}>({x[0]})")
_e("Swish")(lambda a, x, ct, ot: f"({x[0]} * nnc_sigmoid({x[0]} * {lit(getattr(a, 'alpha', 1.0), ot)}))")
_e("SwiGLU")(lambda a, x, ct, ot: f"({x[0]} * nnc_sigmoid({x[0]} * {lit(getattr(a, 'alpha', 1.0), ot)}) * {x[1]})")
_e("Binarizer")(lambda a, x, ct, ot: f"({x[0]} > {lit(getattr(a, 'threshold', 0.0), ct[0])} ? {lit(1, ot)} : {lit(0, ot)})")


# largest finite value of the f8 types: ONNX Cast / QuantizeLinear `saturate` clamps to it
F8_MAX = {"f8e4m3": 448.0, "f8e4m3fnuz": 240.0, "f8e5m2": 57344.0, "f8e5m2fnuz": 57344.0}
NARROW_INT = ("i4", "u4", "i2", "u2")


def cast_expr(attrs, x: str, src, dst) -> str:
    """ONNX Cast of expression x (compute type of dtype src) to dtype dst, as a value of dst's
    compute type; the store into dst's C type finishes it (templates/exotic_types.cu.j2: the rules
    of ir/narrow_types.py). Wider sources reach the float encoders rounded to odd (nnc_odd_f32),
    so every value is rounded once."""
    ot = compute_type(dst)
    if dst.short == "f8e8m0":  # ONNX round_mode / saturate rule
        mode = {"up": 0, "down": 1, "nearest": 2}[str(getattr(attrs, "round_mode", "up") or "up")]
        sat = "true" if getattr(attrs, "saturate", 1) else "false"
        return f"nnc_dec_f8e8m0(nnc_onnx_f8e8m0(nnc_odd_f32({x}), {mode}, {sat}))"
    if dst.short in F8_MAX or dst.short == "f4e2m1":
        e = f"nnc_odd_f32({x})"
        if dst.short in F8_MAX and getattr(attrs, "saturate", 1):
            e = f"nnc_satf({e}, {F8_MAX[dst.short]!r}f)"
        return e
    if dst.short in NARROW_INT:  # nearest integer, ties to even (NaN / inf -> 0); the store keeps the low bits
        return f"static_cast<int32_t>(nnc_round_i64({x}))"
    return f"static_cast<{ot}>({x})"


def op_expr(op_name: str, attrs, args: list, arg_dtypes: list, out_dtype) -> str:
    """C expression of one elementwise op over argument expressions (None = omitted optional)."""
    if op_name in ("Cast", "CastLike") and arg_dtypes and arg_dtypes[0] is not None:
        return cast_expr(attrs, args[0], arg_dtypes[0], out_dtype)
    ct = [None if d is None else compute_type(d) for d in arg_dtypes]
    return EXPR[op_name](attrs, args, ct, compute_type(out_dtype))


def broadcast_strides(in_shape, out_shape):
    """Element strides of a contiguous `in_shape` read at each `out_shape` coordinate (0 = broadcast),
    or None when the input is exactly the output shape."""
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    if in_shape == out_shape:
        return None
    st, acc = [0] * len(out_shape), 1
    for k in range(1, len(in_shape) + 1):
        d = in_shape[-k]
        st[-k] = 0 if d == 1 else acc
        acc *= d
    return st


MAX_VEC = 8          # elements a thread takes per step (the unrolled per-element body)
VEC_BYTES = 16       # the widest load / store


def _itemsize(b) -> int:
    return b.dtype.bits // 8


def vector_width(vector_bufs: list, n: int) -> int:
    """Elements per vector for an elementwise kernel whose `vector_bufs` (its same-shape inputs and
    its outputs) are read / written at the flat index: the most that keeps every vector within
    VEC_BYTES, divides n and keeps every buffer's offset aligned; 1 where any is a packed or
    emulated type (ctype nnc_*: sub-byte and f8 stores go through helpers)."""
    if not vector_bufs or n <= 0:
        return 1
    if any(b.ctype is None or b.ctype.startswith("nnc_") or b.dtype.bits < 8 or b.dtype.bits % 8 for b in vector_bufs):
        return 1
    return widest_vector(n, max(_itemsize(b) for b in vector_bufs),
                         [(b.alias_offset if b.alias_of is not None else 0, _itemsize(b)) for b in vector_bufs])


def widest_vector(n: int, itemsize: int, offsets=()) -> int:
    """The most elements a vector takes (a power of two, at most MAX_VEC and VEC_BYTES of
    `itemsize`) that divide n and keep every (byte offset, itemsize) of `offsets` aligned; 1 at
    least. The elementwise, fused rowreduce and rownorm kernels choose their widths with it."""
    vec = min(MAX_VEC, VEC_BYTES // itemsize)
    while vec > 1 and (n % vec or any(off % (vec * size) for off, size in offsets)):
        vec //= 2
    return vec


def elementwise_params(inputs: list, out_shape, stmts: list, outputs: list, vectors: bool = False) -> dict:
    """inputs: Buffers; outputs: [(Buffer, var)]; stmts: [(ctype, var, expr)]. vectors: VEC (and
    the itemsize of each buffer) where vectors apply (vector_width); a caller that edits the
    inputs' strides afterwards (quantize.py) leaves it off."""
    ins = [{"ctype": b.ctype, "compute": b.compute, "strides": broadcast_strides(b.shape, out_shape)} for b in inputs]
    params = {
        "inputs": ins,
        "outputs": [{"ctype": b.ctype, "var": v} for b, v in outputs],
        "stmts": [{"ctype": c, "var": v, "expr": e} for c, v, e in stmts],
        "shape": list(out_shape),
        "need_coords": any(i["strides"] is not None for i in ins),
    }
    n = int(math.prod(out_shape))
    vec = vector_width([b for b, i in zip(inputs, ins) if i["strides"] is None] + [b for b, _ in outputs],
                       n) if vectors else 1
    if vec > 1:
        for b, i in zip(inputs, ins):
            i["itemsize"] = _itemsize(b)
        for (b, _), o in zip(outputs, params["outputs"]):
            o["itemsize"] = _itemsize(b)
        params["VEC"] = vec
    return params


def runtime_params(ctx, inputs: list, out_sym_shape, stmts: list, outputs: list) -> dict:
    """elementwise_params of a range build (codegen/runtime_sizes.py): the shape and the broadcast
    strides as C text over the symbol parameters (rt_params), VEC dividing the static part of the
    element count (so every runtime count)."""
    shapes = [b.sym_shape if b.sym_shape is not None else b.shape for b in inputs]
    ins = [{"ctype": b.ctype, "compute": b.compute, "strides": broadcast_strides(sh, out_sym_shape)}
           for b, sh in zip(inputs, shapes)]
    for i in ins:
        if i["strides"] is not None:
            i["strides"] = [ctx.csize(d) for d in i["strides"]]
    params = {
        "inputs": ins,
        "outputs": [{"ctype": b.ctype, "var": v} for b, v in outputs],
        "stmts": [{"ctype": c, "var": v, "expr": e} for c, v, e in stmts],
        "shape": [ctx.csize(d) for d in out_sym_shape],
        "need_coords": any(i["strides"] is not None for i in ins),
        "rt_params": ctx.rt_params(),
    }
    vec = vector_width([b for b, i in zip(inputs, ins) if i["strides"] is None] + [b for b, _ in outputs],
                       static_factor(out_sym_shape))
    if vec > 1:
        for b, i in zip(inputs, ins):
            i["itemsize"] = _itemsize(b)
        for (b, _), o in zip(outputs, params["outputs"]):
            o["itemsize"] = _itemsize(b)
        params["VEC"] = vec
    return params


def launch_threads(params: dict, n: int) -> int:
    """Threads an elementwise kernel of these params needs for n elements (one per vector)."""
    return max(1, int(n) // int(params.get("VEC", 1)))


@lowering(*sorted(EXPR), runtime_sizes=True)  # a range build: runtime_params
def _elementwise(ctx: LowerCtx):
    op = ctx.op
    y = ctx.out(0)
    bufs, args, dts, var_of = [], [], [], {}
    n_args = ctx.n_in if op.name != "CastLike" else 1
    for i in range(n_args):
        b = ctx.inp(i)
        if b is None:
            args.append(None)
            dts.append(None)
            continue
        if b.id not in var_of:
            var_of[b.id] = f"x{len(bufs)}"
            bufs.append(b)
        args.append(var_of[b.id])
        dts.append(b.dtype)
    expr = op_expr(op.name, op.attrs, args, dts, y.dtype)
    if ctx.problem is not None and ctx.problem.symbolic:  # a range build: sizes per run
        params = runtime_params(ctx, bufs, ctx.sym_out_shape(0), [(y.compute, "t0", expr)], [(y, "t0")])
        k = ctx.render("elementwise.cu.j2", "ew_" + op.name.lower(), **params)
        n = y.sym_numel
        ctx.launch(k, ctx.grid1d(floordiv(n, int(params.get("VEC", 1)))), 256, [*bufs, y, ctx.i64(n), *ctx.rt_args()])
        return True
    params = elementwise_params(bufs, y.shape, [(y.compute, "t0", expr)], [(y, "t0")], vectors=True)
    k = ctx.render("elementwise.cu.j2", "ew_" + op.name.lower(), **params)
    n = y.numel
    ctx.launch(k, ctx.grid1d(launch_threads(params, n)), 256, [*bufs, y, ctx.i64(n)])
    return True
