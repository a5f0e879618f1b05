"""Epilogue fusion: a Conv / Gemm / MatMul and the elementwise chain after it become one `fused`
op (kind "conv_epilogue" or "gemm_epilogue"), lowered to ONE conv/GEMM kernel whose epilogue does
the chain (codegen/kernels/epilogue_fusion.py).

Rewrites, per anchor (Conv 1-D/2-D, Gemm, MatMul of rank >= 2), the longest chain of its single
consumers that the kernel templates' epilogue can compute,

    D = cast(act(scale * (A @ B) + residual_scale * residual + bias))

in this form (templates/gemm_tc_core.cu.j2, gemm_f32.cu.j2, conv_direct.cu.j2):
- Add (or two-operand Sum) of a constant that broadcasts along the output channel only (conv: axis
  1, e.g. [K,1,1] or [1,K,1,1], the last axis for an NHWC conv; Gemm/MatMul: the last axis, [N] or [1,N]; or a scalar) -> `bias`;
- Add / Sum of a tensor of the result's own shape, at most one -> `residual` (a Gemm whose own C is
  not a per-column constant takes no residual: the kernel has one C operand); for a Gemm/MatMul
  also a constant that broadcasts onto the result another way (fuse-horizontal's per-member bias
  [G, 1.., 1, N] of a batched GEMM, a per-row [M, 1]): the kernel reads C with zero strides along
  its broadcast axes (gemm_lowering.c_strides; where the GEMM's two batch levels cannot express
  them the lowering splits the group again). Broadcast non-constant tensors stay out (mask Adds
  and the like keep going to fuse-reduction / fuse-elementwise);
- Mul by a scalar constant, Gemm/MatMul only, before the activation -> `scale` (the kernel's alpha
  and beta; the conv epilogue has no scale);
- one activation: Relu, LeakyRelu, Sigmoid, Tanh, Gelu (erf or tanh form; also written out as
  ops, see match_gelu: those become a Gelu op first), Clip with constant
  finite bounds (Relu6); nothing but a Cast may follow it (the kernel applies it last);
- Cast to f16/bf16/f32, Gemm/MatMul only, last -> `cast` (the GEMM's output dtype);
- Reshape / Flatten / Squeeze / Unsqueeze that keeps the last axis (N), Gemm/MatMul only -> `view`:
  the GEMM writes its output contiguously, so a view of it is the same bytes and the ops after it
  still act per element / per column (GPT-2: Gemm (addmm) -> Reshape [1, S, N] -> GELU / residual
  Add). A view ends the chain only where an epilogue op follows it (trailing views stay outside).
  VIEW_RESIDUAL: at f32 a tensor residual after a view stays outside: there such an Add usually
  feeds a LayerNorm (GPT-2's residual stream), whose fuse-reduction kernel takes it for free, and
  strict-fp32 GEMMs this small often go to the fallback GEMM, which takes no epilogue (the group
  would split into GEMM + one more elementwise launch; GPT-2 fp32 99 -> 123 launches).
The fused op's `params` names the epilogue in the kernel's order, e.g. "bias residual relu".

Must hold: static shapes (a Gemm/MatMul chain: or a range profile's symbolic dims anywhere but the
last axis, the runtime rows of codegen/kernels/gemm_lowering.runtime_rows) and float (f16/bf16/f32) types without layout tags on the whole chain;
every intermediate has exactly one user (the next op of the chain) and is not a function result,
so only the chain's last value leaves the kernel; the group is convex (ir/outline.py checks).
A Conv's own bias must be a constant when the chain adds another (the two are summed at compile
time). Run after the cleanups (cse, fold-batchnorm folds BN into the conv's weights and bias,
simplify) so the chains are visible, and before fuse-elementwise, which would otherwise take the
Add/Relu chains into elementwise groups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from nnc.ir.builder import const_value
from nnc.ir.graph import Module, Op, Value
from nnc.ir.layout import op_is_nhwc
from nnc.ir.outline import Outliner
from nnc.ir.rewrite import used_values

ANCHORS = ("Conv", "Gemm", "MatMul")
FLOATS = ("f16", "bf16", "f32")
# activation ops -> the templates' epilogue activation name (common.ACTIVATIONS)
ACTIVATION_OPS = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "Clip")
# ops that only re-view a contiguous tensor (the GEMM's output: same bytes, same order)
VIEW_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
FLT_MAX = 3.4028234663852886e38
ConstOf = Callable[[Value], Optional[np.ndarray]]  # a value's compile-time constant, or None


@dataclass(frozen=True)
class Step:
    """One op of the chain and what it does in the epilogue."""
    role: str                 # bias | residual | scale | act | cast | view
    op: Op
    operand: Optional[Value] = None  # bias / residual: the other operand of the Add
    scale: float = 1.0        # scale: the scalar
    act: str = "none"         # act: template activation name
    act_params: tuple = ()    # act: (("alpha", a),) or (("lo", lo), ("hi", hi))


@dataclass(frozen=True)
class Chain:
    anchor: Op
    steps: tuple              # Step, program order

    @property
    def kind(self) -> str:
        return "conv_epilogue" if self.anchor.name == "Conv" else "gemm_epilogue"

    @property
    def params(self) -> str:
        """The epilogue in the kernel's order of application."""
        roles = [s.role for s in self.steps]
        words = []
        if "scale" in roles:
            words.append("scale=%g" % math.prod(s.scale for s in self.steps if s.role == "scale"))
        if "residual" in roles:
            words.append("residual")
        if "bias" in roles:
            words.append("bias" if roles.count("bias") == 1 else f"bias x{roles.count('bias')}")
        for s in self.steps:
            if s.role == "act":
                words.append(s.act)
            if s.role == "cast":
                words.append(f"cast={s.op.results[0].type.dtype.short}")
        return " ".join(words)

    @property
    def ops(self) -> list:
        return [self.anchor] + [s.op for s in self.steps]


def _ok_type(v: Value) -> bool:
    t = v.type
    return t.is_static and t.dtype.short in FLOATS  # a layout tag: same physical dims (ir/layout.py)


def _ok_type_rows(v: Value) -> bool:
    """_ok_type, or a range profile's symbolic dims (no `?`) anywhere but the last axis: a
    Gemm/MatMul chain over runtime rows (the lowering runs M per run where its GEMM variant can,
    codegen/kernels/gemm_lowering.runtime_rows, else splits the group again)."""
    if _ok_type(v):
        return True
    t = v.type
    if t.shape is None or t.dtype.short not in FLOATS or not t.shape or not isinstance(t.shape[-1], int):
        return False
    return all(isinstance(d, int) or d.kind != "unknown" for d in t.shape)


def _scalar(v: Value, const_of) -> Optional[float]:
    a = const_of(v)
    if a is None or a.size != 1 or a.ndim > 1:
        return None
    x = float(np.asarray(a, dtype=np.float64).reshape(()))
    return x if math.isfinite(x) else None


def _bias_shape_ok(shape, out_shape, channel_axis: int) -> bool:
    """A constant of this shape broadcast onto out_shape varies at most along channel_axis."""
    if len(shape) > len(out_shape):
        return False
    full = (1,) * (len(out_shape) - len(shape)) + tuple(shape)
    return all(d == 1 or (i == channel_axis and d == out_shape[i]) for i, d in enumerate(full))


def _broadcasts_onto(shape, out_shape) -> bool:
    """A tensor of this shape broadcasts (numpy rules) onto out_shape without changing it."""
    if len(shape) > len(out_shape):
        return False
    full = (1,) * (len(out_shape) - len(shape)) + tuple(shape)
    return all(d in (1, o) for d, o in zip(full, out_shape))


def _activation(op: Op, const_of) -> Optional[tuple]:
    """(template activation, params) for an activation op, or None."""
    n = op.name
    if n == "Relu":
        return "relu", ()
    if n == "Sigmoid":
        return "sigmoid", ()
    if n == "Tanh":
        return "tanh", ()
    if n == "LeakyRelu":
        return "leaky_relu", (("alpha", float(op.attrs.alpha)),)
    if n == "Gelu":
        return {"none": ("gelu", ()), "tanh": ("gelu_tanh", ())}.get(op.attrs.approximate)
    if n == "Clip":
        bounds = []
        for i, default in ((1, -FLT_MAX), (2, FLT_MAX)):
            if i < len(op.operands) and op.operands[i] is not None:
                b = _scalar(op.operands[i], const_of)
                if b is None:
                    return None
                bounds.append(max(-FLT_MAX, min(FLT_MAX, b)))
            else:
                bounds.append(default)
        return "clip", (("lo", bounds[0]), ("hi", bounds[1]))
    return None


def anchor_ok(op: Op) -> bool:
    ok = _ok_type if op.name == "Conv" else _ok_type_rows
    if op.name not in ANCHORS or len(op.results) != 1 or not ok(op.results[0]):
        return False
    ins = [v for v in op.operands if v is not None]
    if not all(ok(v) for v in ins) or len({v.type.dtype for v in ins} | {op.results[0].type.dtype}) != 1:
        return False
    if op.name == "Conv":
        return op.results[0].type.rank in (3, 4)  # 1-D and 2-D convs (the kernels' geometries)
    if op.name == "MatMul":
        return all(v.type.rank >= 2 for v in ins)
    return True


def classify(anchor: Op, op: Op, cur: Value, seen: set, const_of: ConstOf) -> Optional[Step]:
    """What `op` (reading the chain's current value `cur`) does in the epilogue, given the roles
    `seen` so far; None when the kernel cannot do it there."""
    out = op.results[0] if len(op.results) == 1 else None
    ok = _ok_type if anchor.name == "Conv" else _ok_type_rows
    if out is None or not ok(out) or ("act" in seen and op.name != "Cast") or "cast" in seen:
        return None
    shape = tuple(cur.type.shape)  # the anchor's, or a view's of it (Gemm/MatMul: last axis N)
    conv = anchor.name == "Conv"
    if op.name in VIEW_OPS and not conv and op.operands[0] is cur and "cast" not in seen:
        n = anchor.results[0].type.shape[-1]
        if out.type.rank >= 1 and out.type.shape[-1] == n and out.type.dtype == cur.type.dtype:
            return Step("view", op)
        return None
    if op.name in ("Add", "Sum") and len(op.operands) == 2:
        a, b = op.operands
        other = b if a is cur else a
        if (a is cur) == (b is cur) or other is None or tuple(out.type.shape) != shape:
            return None
        if out.type.dtype != cur.type.dtype:
            return None
        if const_of(other) is not None:
            if _bias_shape_ok(tuple(other.type.shape), shape, conv_channel_axis(anchor) if conv else len(shape) - 1):
                if conv and not _conv_bias_ok(anchor, const_of):
                    return None
                return Step("bias", op, operand=other)
        if "residual" in seen or not _other_c_free(anchor, const_of):
            return None
        if tuple(other.type.shape) == shape:
            if "view" in seen and cur.type.dtype.short == "f32" and const_of(other) is None:
                return None  # see VIEW_RESIDUAL in the docstring
            return Step("residual", op, operand=other)
        if not conv and const_of(other) is not None and _broadcasts_onto(tuple(other.type.shape), shape):
            return Step("residual", op, operand=other)  # read with zero strides along its 1-axes
        return None
    if op.name == "Mul" and len(op.operands) == 2 and not conv:
        a, b = op.operands
        other = b if a is cur else a
        if (a is cur) == (b is cur) or tuple(out.type.shape) != shape:
            return None
        s = _scalar(other, const_of)
        return None if s is None else Step("scale", op, scale=s)
    if op.name in ACTIVATION_OPS and op.operands[0] is cur and out.type.dtype == cur.type.dtype:
        got = _activation(op, const_of)
        return None if got is None else Step("act", op, act=got[0], act_params=got[1])
    if op.name == "Cast" and not conv and out.type.dtype.short in FLOATS and op.operands[0] is cur:
        return Step("cast", op)
    return None


def conv_channel_axis(anchor: Op) -> int:
    """1, or the last axis for a Conv {layout = "NHWC"} (compiler/passes/assign_layout.py)."""
    return 3 if op_is_nhwc(anchor) else 1


def _conv_bias_ok(anchor: Op, const_of: ConstOf) -> bool:
    """A second bias is summed into the Conv's own at compile time: that one must be constant."""
    b = anchor.operands[2] if len(anchor.operands) > 2 else None
    return b is None or const_of(b) is not None


def gemm_c_is_bias(anchor: Op, const_of: ConstOf) -> bool:
    """A Gemm's C that is a per-column constant (it moves into the kernel's bias)."""
    c = anchor.operands[2] if len(anchor.operands) > 2 else None
    n = anchor.results[0].type.shape[1]
    return c is not None and const_of(c) is not None and _bias_shape_ok(tuple(c.type.shape), (1, n), 1)


def _other_c_free(anchor: Op, const_of: ConstOf) -> bool:
    """Gemm's own C takes the kernel's C operand unless it is a per-column constant (then it moves
    into the bias)."""
    if anchor.name != "Gemm" or len(anchor.operands) < 3 or anchor.operands[2] is None:
        return True
    return gemm_c_is_bias(anchor, const_of)


def match(anchor: Op, next_user: Callable[[Value], Optional[Op]], const_of: ConstOf) -> Optional[Chain]:
    """The longest fusible chain after `anchor`, without trailing views; next_user(v) is v's only
    user, or None when v has another user, is a function result, or has none."""
    steps = _steps(anchor, next_user, const_of)
    while steps and steps[-1].role == "view":
        steps.pop()
    return Chain(anchor, tuple(steps)) if steps else None


def _steps(anchor: Op, next_user, const_of) -> list:
    """The longest fusible chain's steps, trailing views included (an activation written out as
    ops may read the last one: _chain_end)."""
    if not anchor_ok(anchor):
        return []
    steps, seen, cur = [], set(), anchor.results[0]
    while True:
        op = next_user(cur)
        if op is None:
            break
        s = classify(anchor, op, cur, seen, const_of)
        if s is None:
            break
        steps.append(s)
        seen.add(s.role)
        cur = op.results[0]
    return steps


def match_body(body, const_of: ConstOf) -> Optional[Chain]:
    """The Chain of a fused body made by this pass (the lowering's view of the group): the first op
    is the anchor, each next op reads the previous op's result. const_of sees through the body's
    arguments to the constants they stand for."""
    ops = body.ops
    if not ops or len(body.results) != 1:
        return None
    nxt = {id(a.results[0]): b for a, b in zip(ops, ops[1:]) if len(a.results) == 1}
    ch = match(ops[0], lambda v: nxt.get(id(v)), const_of)
    if ch is None or len(ch.ops) != len(ops) or ch.ops[-1].results[0] is not body.results[0]:
        return None
    return ch


def match_group(op: Op, weights) -> Optional[Chain]:
    """match_body of a function-level fused op, constants seen through its operands (the passes
    that build on this pass's groups: fuse-cross-layer, fuse-pooling)."""
    body = op.attrs.body
    outer = {id(a): v for a, v in zip(body.args, op.operands)}
    return match_body(body, lambda v: const_value(outer.get(id(v), v), weights))


# ---------------------------------------------------------------- GELU written out as ops
# Exporters write GELU as elementwise ops (BERT: Div(x, sqrt2) -> Erf -> Add 1 -> Mul x -> Mul 0.5;
# GPT-2: 0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3)))). Where such a subgraph reads the end of an
# anchor's chain it is replaced by one Gelu op (approximate "none" / "tanh"), which the epilogue
# then takes as its activation. Constants match within GELU_RTOL (f16 rounds them: sqrt2 becomes
# 1.4140625), any operand order of the commutative Add/Mul.
GELU_RTOL = 2e-3
SQRT2 = math.sqrt(2.0)
SQRT_2_PI = math.sqrt(2.0 / math.pi)


def _near(v: Optional[float], want: float) -> bool:
    return v is not None and abs(v - want) <= GELU_RTOL * abs(want)


def _other(op: Op, v: Value) -> Optional[Value]:
    """The other operand of a binary op that reads v once."""
    if len(op.operands) != 2 or (op.operands[0] is v) == (op.operands[1] is v):
        return None
    return op.operands[1] if op.operands[0] is v else op.operands[0]


def match_gelu(x: Value, users: Callable[[Value], list], const_of: ConstOf) -> Optional[tuple]:
    """(ops of the subgraph, its result, approximate) when the users of x compute GELU(x) as
    written-out ops; every intermediate is read only inside the subgraph."""
    def only(v):  # v's single user, or None
        us = users(v)
        return us[0] if len(us) == 1 else None

    def scalar_other(op, v):
        o = _other(op, v)
        return None if o is None else _scalar(o, const_of)

    for first in users(x):
        ops, approx, t = [first], None, None
        if first.name == "Div" and first.operands[0] is x and _near(_scalar(first.operands[1], const_of), SQRT2):
            e = only(first.results[0])
            if e is not None and e.name == "Erf":
                ops.append(e)
                approx, t = "none", e.results[0]
        elif first.name == "Mul" and _near(scalar_other(first, x), 1 / SQRT2):
            e = only(first.results[0])
            if e is not None and e.name == "Erf":
                ops.append(e)
                approx, t = "none", e.results[0]
        elif first.name in ("Pow", "Mul"):
            got = _gelu_tanh_inner(x, first, only, scalar_other, const_of)
            if got is not None:
                ops, t = got
                approx = "tanh"
        if t is None:
            continue
        a = only(t)  # 1 + erf(..) / 1 + tanh(..)
        if a is None or a.name != "Add" or not _near(scalar_other(a, t), 1.0):
            continue
        ops.append(a)
        cur, have_x, have_half = a.results[0], False, False
        while not (have_x and have_half):
            m = only(cur)
            o = None if m is None or m.name != "Mul" else _other(m, cur)
            if o is None:
                break
            if o is x and not have_x:
                have_x = True
            elif not have_half and _near(_scalar(o, const_of), 0.5):
                have_half = True
            elif (not have_x and not have_half and o.producer is not None and o.producer.name == "Mul"
                  and _near(scalar_other(o.producer, x), 0.5) and len(users(o)) == 1):
                ops.append(o.producer)  # 0.5 * x computed first
                have_x = have_half = True
            else:
                break
            ops.append(m)
            cur = m.results[0]
        if have_x and have_half and all(len(op.results) == 1 for op in ops):
            inner = {id(op) for op in ops}
            y = cur
            if all(all(id(u) in inner for u in users(op.results[0])) for op in ops if op.results[0] is not y):
                return ops, y, approx
    return None


def _gelu_tanh_inner(x, first, only, scalar_other, const_of):
    """(ops, tanh result) for tanh(sqrt(2/pi) * (x + 0.044715 * x^3)) starting at the op making x^3
    (Pow(x, 3), or Mul(x, x) then Mul by x)."""
    ops = [first]
    if first.name == "Pow":
        if first.operands[0] is not x or not _near(_scalar(first.operands[1], const_of), 3.0):
            return None
        cube = first.results[0]
    else:
        if first.operands[0] is not x or first.operands[1] is not x:
            return None
        m = only(first.results[0])
        if m is None or m.name != "Mul" or _other(m, first.results[0]) is not x:
            return None
        ops.append(m)
        cube = m.results[0]
    k = only(cube)
    if k is None or k.name != "Mul" or not _near(scalar_other(k, cube), 0.044715):
        return None
    s = only(k.results[0])
    if s is None or s.name != "Add" or _other(s, k.results[0]) is not x:
        return None
    c = only(s.results[0])
    if c is None or c.name != "Mul" or not _near(scalar_other(c, s.results[0]), SQRT_2_PI):
        return None
    th = only(c.results[0])
    if th is None or th.name != "Tanh":
        return None
    return ops + [k, s, c, th], th.results[0]


def _chain_end(anchor: Op, next_user, const_of) -> Optional[Value]:
    """The value an activation would read after anchor's chain (None: the chain already has one)."""
    if not anchor_ok(anchor):
        return None
    steps = _steps(anchor, next_user, const_of)
    if any(s.role in ("act", "cast") for s in steps):
        return None
    return steps[-1].op.results[0] if steps else anchor.results[0]


def _gelus_to_ops(func, users, returned, const_of) -> bool:
    """Replaces written-out GELUs that read the end of an anchor's chain by Gelu ops."""
    from nnc.ir.ops.elementwise import GeluAttrs

    def next_user(v):
        us = users.get(id(v), ())
        return None if id(v) in returned or len(us) != 1 else us[0]

    def users_of(v):
        return list(users.get(id(v), ()))

    drop, put = set(), {}
    for op in func.ops:
        if op.name not in ANCHORS or id(op) in drop:
            continue
        x = _chain_end(op, next_user, const_of)
        if x is None or id(x) in returned:
            continue
        got = match_gelu(x, users_of, const_of)
        if got is None:
            continue
        ops, y, approx = got
        if any(id(o) in drop for o in ops) or any(id(o.results[0]) in returned for o in ops if o.results[0] is not y):
            continue
        drop.update(id(o) for o in ops)
        last = y.producer  # (Op() below makes the Gelu y's producer)
        put[id(last)] = Op("Gelu", [x], [y], GeluAttrs(approx), last.loc)
    if not put:
        return False
    func.ops = [put.get(id(op), op) for op in func.ops if id(op) not in drop or id(op) in put]
    return True


def _users(func) -> dict:
    users: dict[int, list] = {}
    for op in func.ops:
        for v in op.operands:
            if v is not None:
                users.setdefault(id(v), []).append(op)
        for _, r in op.regions():  # values read inside regions count as uses (never fused through)
            for vid in used_values(r):
                users.setdefault(vid, []).append(op)
    return users


def _run_func(func, weights) -> bool:
    returned = {id(v) for v in func.results}
    const_of = lambda v: const_value(v, weights)  # noqa: E731
    users = _users(func)
    gelus = _gelus_to_ops(func, users, returned, const_of)
    if gelus:  # the Gelu ops replaced subgraphs: users change
        users = _users(func)

    def next_user(v: Value) -> Optional[Op]:
        us = users.get(id(v), ())
        if id(v) in returned or len(us) != 1:
            return None
        return us[0]

    out = Outliner(func)
    changed = False
    for op in list(func.ops):
        if op.name not in ANCHORS:
            continue
        ch = match(op, next_user, const_of)
        if ch is None or not out.can_outline(ch.ops):
            continue
        out.outline(ch.ops, kind=ch.kind, params=ch.params)
        changed = True
    if changed:
        out.finish()
    return changed or gelus


def run(module: Module) -> bool:
    changed = False
    for f in module.functions:
        changed |= _run_func(f, module.weights)
    return changed
