"""Horizontal fusion: parallel GEMMs / 1x1-style convs that read the same activation with constant
weights become ONE bigger GEMM / conv whose per-member results are contiguous views of its output.

Rewrites, per region, groups of two or more "members" reading the same value x:
- MatMul(x[*b, M, K], W_i[K, N]) and Gemm(x[M, K], W_i, C_i) (transA 0, alpha 1, beta 1; transB
  either way, folded into the stacked weight), W_i constant, every W_i of one shape and dtype. The
  group becomes (BERT's Q/K/V projections)
      W  = const [G, 1.., K, N]                      (stacked at compile time)
      Y  = MatMul(Unsqueeze(x, 0) [1, *b, M, K], W) -> [G, *b, M, N]   (A broadcast: batch stride 0)
      Y' = Add(Y, bias [G, 1.., 1, N])               (when every member has a per-column bias:
                                                      its own Gemm C, or an Add of a constant;
                                                      bias [N] when all members' are equal)
      member i = Squeeze(Slice(Y', i:i+1, axis 0), 0)
  The outermost-axis slices are contiguous, so the CUDA backend lowers Slice and Squeeze as views
  (codegen/kernels/movement.py): one batched GEMM, no copies.
- Conv(x[1, C, ...], W_i[O_i, C, k...], B_i) with group 1 and identical attributes and kernel
  shapes (Inception's parallel 1x1 branches): W = concat(W_i) along output channels, one Conv, and
  member i = Slice(Y, o_i:o_i+O_i, axis 1), contiguous because the batch is 1.
After the bias, a unary activation that every member applies to its result alone (the same op,
attributes and constant extra operands: ACTIVATIONS) is hoisted onto the fused result, so the
fused op keeps the epilogue the members had (fuse-epilogue puts a Conv's bias + Relu into the
conv's kernel, a MatMul's per-column bias into the GEMM's; a bias that differs per member,
[G, 1.., 1, N], is the batched GEMM's C read per batch (fuse-epilogue's broadcast residual):
G GEMM launches -> 1). Members are partitioned by their
chain (bias or not, activations) and each partition of two or more is fused.

Over a range profile's symbolic rows (x [*b, S, K] with symbolic dims before K) the outer slices
would start at runtime offsets, so MatMul/Gemm members whose results feed only a head split
(Reshape -> Transpose: fuse-attention reads strided operands) become column slices instead:
W = [K, G*N], Y = MatMul(x, W) [*b, S, G*N] (+ the biases side by side), member i =
Slice(Y, i*N:(i+1)*N, last axis); fuse-epilogue gives the one GEMM its bias, fuse-attention
absorbs the slices (GPT-2's packed c_attn form).

Must hold: static shapes (or the symbolic rows above); every chain intermediate has one user and is no region result, so the
members' final values (kept as the same Values: names and outputs unchanged) are the only ones
that leave; the fused ops are emitted at the first member's place (they read only x and
constants, so every later reader still comes after its definition). Slices start at multiples of
8 elements (16 bytes at fp16): the GEMM/conv fast paths need 16-byte aligned views.
Not rewritten: members with non-constant weights, grouped convs, batch > 1 convs (channel slices
would be strided), different kernel shapes or attributes.
Linear: one sweep per region with use counts computed once; groups are keyed by (x, shape).
"""
from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from typing import Optional

import numpy as np

from nnc.ir import registry
from nnc.ir.builder import Builder, const_value
from nnc.ir.graph import Function, Module, NameGen, Op, Region, Value, users, value_names
from nnc.ir.symbolic import Expr

# Unary elementwise ops hoisted past the split when every member applies the same one: the
# activations fuse-epilogue can put into a conv/GEMM epilogue, plus the other common pointwise ones
# (hoisting one of those is still one kernel instead of G)
ACTIVATIONS = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "Clip", "Elu", "HardSigmoid",
               "HardSwish", "Softplus", "Erf")
SLICE_ALIGN_ELEMS = 8  # 16 bytes at fp16: gemm_lowering/conv fast paths need aligned views


@dataclasses.dataclass
class _Member:
    op: Op
    kind: str                    # "mm" (MatMul/Gemm) | "conv"
    weight: np.ndarray           # mm: [K, N]; conv: [O, C, k...]
    bias: Optional[np.ndarray]   # mm: [N]; conv: [O]
    chain: list                  # ops after the anchor that the fusion absorbs (bias Add, activations)
    final: Value                 # the member's last value: a view of the fused result afterwards
    acts: list = dataclasses.field(default_factory=list)  # the hoisted activation ops (in chain too)
    sig: tuple = ()              # partition key: bias or not, the hoisted activations


def _static(v: Value) -> bool:
    s = v.type.shape
    return s is not None and all(isinstance(d, int) and d > 0 for d in s)


def _rows_symbolic(v: Value) -> bool:
    """A range profile's activation: symbolic dims (no `?`) before a static last axis."""
    s = v.type.shape
    if s is None or len(s) < 2 or not isinstance(s[-1], int) or s[-1] <= 0 or _static(v):
        return False
    return all((isinstance(d, int) and d > 0) or (isinstance(d, Expr) and d.kind != "unknown") for d in s)


def _attrs_key(op: Op) -> tuple:
    return tuple((k, repr(v)) for k, v in registry.attrs_items(op.attrs)) if op.attrs is not None else ()


class _Horizontal:
    def __init__(self, module: Module, f: Function):
        self.module = module
        self.names = NameGen(value_names(module))
        self.uses = users(f)
        self.counts: Counter = Counter()

    def const(self, v: Optional[Value]) -> Optional[np.ndarray]:
        return None if v is None else const_value(v, self.module.weights)

    def only_user(self, v: Value, returned: set[int]) -> Optional[Op]:
        u = self.uses.get(id(v), [])
        return u[0] if len(u) == 1 and id(v) not in returned else None

    # ------------------------------------------------------------ members

    def member(self, op: Op, returned: set[int]) -> Optional[_Member]:
        if op.name in ("MatMul", "Gemm"):
            return self._mm_member(op, returned)
        if op.name == "Conv":
            return self._conv_member(op, returned)
        return None

    def _mm_member(self, op: Op, returned: set[int]) -> Optional[_Member]:
        x, y = op.operands[0], op.results[0]
        w = self.const(op.operands[1])
        if w is None or w.ndim != 2 or len(x.type.shape) < 2:
            return None
        if not (_static(x) and _static(y)) and not (_rows_symbolic(x) and _rows_symbolic(y)):
            return None
        if not x.type.dtype.is_float or w.dtype != x.type.dtype.np:
            return None
        bias = None
        if op.name == "Gemm":
            a = op.attrs
            if a.transA or a.alpha != 1.0:
                return None
            w = w.T if a.transB else w
            if len(op.operands) > 2 and op.operands[2] is not None:
                c = self.const(op.operands[2])
                if c is None or a.beta != 1.0 or c.size not in (1, w.shape[1]) or c.ndim > 2 or \
                        (c.ndim == 2 and c.shape[0] != 1):
                    return None
                bias = np.broadcast_to(c.reshape(-1), (w.shape[1],))
        if y.type.shape[-1] != w.shape[1]:
            return None
        m = _Member(op, "mm", w, bias, [], y)
        if bias is None:
            self._bias_add(m, returned, axis=-1)
        return self._hoist(m, returned)

    def _conv_member(self, op: Op, returned: set[int]) -> Optional[_Member]:
        x, y = op.operands[0], op.results[0]
        w = self.const(op.operands[1])
        if w is None or not _static(x) or not _static(y) or x.type.shape[0] != 1 or op.attrs.group != 1:
            return None
        if not x.type.dtype.is_float or w.dtype != x.type.dtype.np or w.ndim != len(x.type.shape):
            return None
        bias = None
        if len(op.operands) > 2 and op.operands[2] is not None:
            bias = self.const(op.operands[2])
            if bias is None:
                return None
            bias = bias.reshape(-1)
        return self._hoist(_Member(op, "conv", w, bias, [], y), returned)

    def _bias_add(self, m: _Member, returned: set[int], axis: int) -> None:
        """Takes an Add of a per-column constant (numel N or 1, result shape unchanged)."""
        u = self.only_user(m.final, returned)
        if u is None or u.name != "Add" or len(u.operands) != 2:
            return
        other = u.operands[1] if u.operands[0] is m.final else u.operands[0]
        if other is m.final:
            return
        c = self.const(other)
        n = m.final.type.shape[axis]
        if c is None or c.dtype != m.weight.dtype or c.size not in (1, n) or c.ndim > len(m.final.type.shape):
            return
        if c.size == n and c.ndim and (c.shape[-1] != n):  # per-column: the last axis only
            return
        if tuple(u.results[0].type.shape) != tuple(m.final.type.shape):
            return
        m.bias = np.broadcast_to(c.reshape(-1), (n,))
        m.chain.append(u)
        m.final = u.results[0]

    def _hoist(self, m: _Member, returned: set[int]) -> _Member:
        """Activations the member applies to its result alone (the partition key compares them)."""
        acts = []
        while True:
            u = self.only_user(m.final, returned)
            if u is None or u.name not in ACTIVATIONS or u.operands[0] is not m.final or len(u.results) != 1:
                break
            extra = u.operands[1:]
            if any(v is not None and self.const(v) is None for v in extra):
                break
            if tuple(u.results[0].type.shape) != tuple(m.final.type.shape) or \
                    u.results[0].type.dtype != m.final.type.dtype:
                break
            consts = tuple(None if v is None else self._key(self.const(v)) for v in extra)
            acts.append((u.name, _attrs_key(u), consts))
            m.acts.append(u)
            m.chain.append(u)
            m.final = u.results[0]
        m.sig = (m.bias is not None, tuple(acts))
        return m

    @staticmethod
    def _key(a: np.ndarray) -> tuple:
        a = np.asarray(a)
        return (str(a.dtype), a.shape, a.tobytes())

    # ------------------------------------------------------------ the rewrite

    def region(self, r: Region) -> None:
        for op in r.ops:
            for _, sub in op.regions():
                self.region(sub)
        returned = {id(v) for v in r.results}
        groups: dict[tuple, list[_Member]] = defaultdict(list)
        for op in r.ops:
            if op.name not in ("MatMul", "Gemm", "Conv"):
                continue
            m = self.member(op, returned)
            if m is None:
                continue
            x = op.operands[0]
            if m.kind == "mm":
                if not _static(x) and not self._head_split(m, returned):
                    continue
                key = ("mm", id(x), m.weight.shape, str(m.weight.dtype), m.sig)
            else:
                key = ("conv", id(x), m.weight.shape[1:], str(m.weight.dtype), _attrs_key(op), m.sig)
            groups[key].append(m)
        plans: dict[int, list[_Member]] = {}  # id(first member's op) -> its group
        drop: set[int] = set()
        for ms in groups.values():
            if len(ms) < 2 or not self._aligned(ms):
                continue
            plans[id(ms[0].op)] = ms
            for m in ms:
                drop.add(id(m.op))
                drop.update(id(c) for c in m.chain)
        if not plans:
            return
        new_ops: list = []
        b = Builder(Region([], new_ops, []), self.module.weights, self.names)
        for op in r.ops:
            ms = plans.get(id(op))
            if ms is not None:
                (self._emit_mm if ms[0].kind == "mm" else self._emit_conv)(ms, b)
                self.counts[f"{op.name}x{len(ms)}"] += 1
            elif id(op) not in drop:
                new_ops.append(op)
        r.ops = new_ops

    def _head_split(self, m: _Member, returned: set[int]) -> bool:
        """Over symbolic rows the members become column slices of one [*b, M, G*N] result
        (_emit_mm_columns): strided, so a view only where fuse-attention reads them through strides
        (GPT-2's packed c_attn form). Taken only when the member's result feeds nothing but a
        Reshape (a head split) whose only user is a Transpose (elsewhere a slice copy per member
        would cost what the fusion saves)."""
        u = self.only_user(m.final, returned)
        if u is None or u.name != "Reshape" or u.operands[0] is not m.final:
            return False
        t = self.only_user(u.results[0], returned)
        return t is not None and t.name == "Transpose"

    @staticmethod
    def _aligned(ms: list[_Member]) -> bool:
        if ms[0].kind == "mm" and not _static(ms[0].op.operands[0]):
            return ms[0].weight.shape[1] % SLICE_ALIGN_ELEMS == 0  # column slices start at i * N
        if ms[0].kind == "mm":
            step = int(np.prod(ms[0].final.type.shape))
            return step % SLICE_ALIGN_ELEMS == 0
        plane = int(np.prod(ms[0].final.type.shape[2:]))
        return all(m.weight.shape[0] * plane % SLICE_ALIGN_ELEMS == 0 for m in ms)

    def _tail(self, ms: list[_Member], y: Value, b: Builder, loc) -> Value:
        """The members' common activations, applied once to the fused result. Their constant extra
        operands are re-made here: the originals may be defined after the first member."""
        for c in ms[0].acts:
            extra = [None if v is None else b.constant(self.const(v), f"{v.name}_h", loc) for v in c.operands[1:]]
            y = b.create(c.name, [y] + extra, c.attrs, names=[f"{c.results[0].name}_h"], loc=loc)[0]
        return y

    def _own(self, b: Builder, final: Value) -> None:
        """The op just emitted defines `final` (the member's Value) instead of its fresh result."""
        op = b.region.ops[-1]
        got = op.results[0]
        if tuple(got.type.shape) != tuple(final.type.shape) or got.type.dtype != final.type.dtype:
            raise AssertionError(f"fuse-horizontal: {got.type} != {final.type}")  # a pass bug, never input
        b.take_over(final, got)

    def _i64(self, b: Builder, vals, hint: str, loc) -> Value:
        return b.constant(np.asarray(vals, np.int64), hint, loc)

    def _emit_mm_columns(self, ms: list[_Member], b: Builder) -> None:
        """Symbolic rows: W = [K, G*N] (the members' weights side by side), Y = MatMul(x, W) [*b, M,
        G*N] (+ the biases side by side), member i = Slice(Y, i*N:(i+1)*N, last axis). The outer
        slices of the static form would start at i * M * N, a runtime offset no view has."""
        first = ms[0].op
        loc, x = first.loc, first.operands[0]
        hint = first.results[0].name
        K, N = ms[0].weight.shape
        w = np.concatenate([np.asarray(m.weight) for m in ms], axis=1)
        wv = b.constant(np.ascontiguousarray(w), f"{hint}_hw", loc, weight_hint=f"{hint}_hw")
        y = b.create("MatMul", [x, wv], names=[f"{hint}_h"], loc=loc)[0]
        if ms[0].bias is not None:
            bias = np.concatenate([m.bias for m in ms]).astype(w.dtype)
            bv = b.constant(np.ascontiguousarray(bias), f"{hint}_hb", loc, weight_hint=f"{hint}_hb")
            y = b.create("Add", [y, bv], names=[f"{hint}_hbias"], loc=loc)[0]
        y = self._tail(ms, y, b, loc)
        axis = self._i64(b, [-1], f"{hint}_hax", loc)
        for i, m in enumerate(ms):
            b.create("Slice", [y, self._i64(b, [i * N], f"{hint}_hs", loc), self._i64(b, [(i + 1) * N], f"{hint}_he", loc),
                               axis], names=[m.final.name + "_hview"], loc=m.op.loc)
            self._own(b, m.final)

    def _emit_mm(self, ms: list[_Member], b: Builder) -> None:
        first = ms[0].op
        loc, x = first.loc, first.operands[0]
        if not _static(x):
            return self._emit_mm_columns(ms, b)
        hint = ms[0].op.results[0].name
        nb = len(x.type.shape) - 2  # x's batch dims
        G = len(ms)
        K, N = ms[0].weight.shape
        w = np.stack([np.asarray(m.weight) for m in ms]).reshape((G,) + (1,) * nb + (K, N))
        wv = b.constant(np.ascontiguousarray(w), f"{hint}_hw", loc, weight_hint=f"{hint}_hw")
        xu = b.create("Unsqueeze", [x, self._i64(b, [0], f"{hint}_h0", loc)], names=[f"{hint}_hx"], loc=loc)[0]
        y = b.create("MatMul", [xu, wv], names=[f"{hint}_h"], loc=loc)[0]
        if ms[0].bias is not None:
            bias = np.stack([m.bias for m in ms]).reshape((G,) + (1,) * (nb + 1) + (N,)).astype(w.dtype)
            if all(np.array_equal(m.bias, ms[0].bias) for m in ms):  # one per-column bias: the GEMM
                bias = np.ascontiguousarray(bias[0].reshape(N))      # epilogue takes it (fuse-epilogue)
            bv = b.constant(np.ascontiguousarray(bias), f"{hint}_hb", loc, weight_hint=f"{hint}_hb")
            y = b.create("Add", [y, bv], names=[f"{hint}_hbias"], loc=loc)[0]
        y = self._tail(ms, y, b, loc)
        ax0 = self._i64(b, [0], f"{hint}_hax", loc)
        for i, m in enumerate(ms):
            s = b.create("Slice", [y, self._i64(b, [i], f"{hint}_hs", loc), self._i64(b, [i + 1], f"{hint}_he", loc), ax0],
                         names=[f"{m.final.name}_hslice"], loc=m.op.loc)[0]
            b.create("Squeeze", [s, ax0], names=[m.final.name + "_hview"], loc=m.op.loc)
            self._own(b, m.final)

    def _emit_conv(self, ms: list[_Member], b: Builder) -> None:
        first = ms[0].op
        loc, x = first.loc, first.operands[0]
        hint = first.results[0].name
        w = np.concatenate([np.asarray(m.weight) for m in ms], axis=0)
        wv = b.constant(np.ascontiguousarray(w), f"{hint}_hw", loc, weight_hint=f"{hint}_hw")
        ops = [x, wv]
        if ms[0].bias is not None:
            bias = np.concatenate([m.bias for m in ms]).astype(w.dtype)
            ops.append(b.constant(bias, f"{hint}_hb", loc, weight_hint=f"{hint}_hb"))
        y = b.create("Conv", ops, first.attrs, names=[f"{hint}_h"], loc=loc)[0]
        y = self._tail(ms, y, b, loc)
        ax1 = self._i64(b, [1], f"{hint}_hax", loc)
        o = 0
        for m in ms:
            n = m.weight.shape[0]
            b.create("Slice", [y, self._i64(b, [o], f"{hint}_hs", loc), self._i64(b, [o + n], f"{hint}_he", loc), ax1],
                     names=[m.final.name + "_hview"], loc=m.op.loc)
            self._own(b, m.final)
            o += n


def rewrite(module: Module) -> Counter:
    """The groups fused, by anchor op and size (what `run` reports as changed)."""
    total: Counter = Counter()
    for f in module.functions:
        h = _Horizontal(module, f)
        h.region(f)
        total += h.counts
    return total


def run(module: Module) -> bool:
    return bool(rewrite(module))
