"""Attention fusion: scores = Q @ K^T, an optional scale and masks, Softmax over the last axis and
the product with V become one `fused` op (kind "attention"), lowered to one flash-attention-style
kernel (codegen/kernels/flash_attention.py): online softmax, no S x T tensor in global memory.

Rewrites, per Softmax, the pattern as exporters write it

    s = MatMul(Q, Kt)                Kt: [.., D, T], a Transpose of K or a tensor already transposed
    s = Mul(s, c) | Div(s, c)        optional, any number: a constant scalar c (also on Q or Kt)
    s = Add(s, mask)                 optional: any mask that broadcasts onto s ([B,1,1,T], [B,1,S,T], ...)
    s = Where(cond, s, fill)         optional: a boolean mask with a constant scalar fill (GPT-2 causal)
    p = Softmax(s, axis=-1)
    o = MatMul(p, V)                 V: [.., T, Dv]

and takes into the group, so that the kernel reads through strides instead of copying:
- rank-3/4 Transposes producing Q, Kt or V (the head split Transpose(0,2,1,3) of a Reshape
  [B,S,H*D] -> [B,S,H,D], (0,2,3,1) for K^T, or the split followed by (0,1,3,2) as GPT-2 writes
  K^T; composed), each when the group is its only user;
- a Transpose of o, when it is o's only user (the head merge back to [B,S,H,Dv]);
- the packed form, qkv Reshape [B,S,3,H,D] -> Transpose(2,0,3,1,4) -> q/k/v = Gather(.., i,
  axis 0) or Squeeze(Split(.., axis 0)) (torch's `qkv[i]` / `unbind(0)`, ViT-style exports):
  the rank-5 Transpose and the pickers, when every use of them is in the group.
The scale/mask steps may come in any order; the kernel applies them in program order.

Must hold: static shapes; float (f16/bf16/f32) types without layout tags; Q, Kt, V, o and the
scores of one dtype; scores of rank 3 or 4 whose batch dims are those of Q (K^T and V may broadcast
along them); every value inside the group has its only users inside it and is not a function
result (only o, or its Transpose, leaves the group); Softmax over the last axis. A Softmax over
another axis, a mask that does not broadcast, or a scores tensor used elsewhere does not match.

Ordering (compiler/pipeline.py): after the precision passes (they see fused ops as f32 islands)
and before fuse-epilogue, which would otherwise take `MatMul(Q, Kt) * c` as a GEMM epilogue and
leave nothing to match; the Q/K/V projection GEMMs are outside the group, so fuse-epilogue still
gives them their bias epilogues.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from nnc.ir.builder import const_value
from nnc.ir.graph import Module, Op, Value
from nnc.ir.outline import Outliner
from nnc.ir.rewrite import used_values

FLOATS = ("f16", "bf16", "f32")
MAX_STEPS = 8  # scale/mask steps between the MatMul and the Softmax
# The kernel's tile is decided here (params, shown in dumps) for the default target, sm_90's 132
# SMs; the lowering (codegen/kernels/flash_attention.py) follows it and only shrinks it when the
# shared memory of another target would not hold it.
DEFAULT_SM_COUNT = 132
TC_DTYPES = ("f16", "bf16")
TC_MAX_D = 128
KV_TILE = 64
ConstOf = Callable[[Value], Optional[np.ndarray]]
Producer = Callable[[Value], Optional[Op]]
OnlyUser = Callable[[Value], Optional[Op]]  # v's only user (None: several, none, or returned)


@dataclass(frozen=True)
class Step:
    """One op between the scores MatMul and the Softmax, in program order."""
    role: str                        # scale | add | where
    op: Op
    scale: float = 1.0               # scale: the factor (Div: its reciprocal)
    operand: Optional[Value] = None  # add: the mask; where: the condition
    fill: float = 0.0                # where: the constant taken where the condition says so
    keep_if_true: bool = True        # where: Where(cond, s, fill) (True) or Where(cond, fill, s)


@dataclass(frozen=True)
class Operand:
    """Q, Kt or V as the kernel reads it: `source` (a contiguous value outside the group), when
    `pick` is set first seen through a rank-5 Transpose (pick[0], its perm) and indexed at
    pick[1] along the transposed axis 0 (the packed q/k/v of [B,S,3,H,D]), then through absorbed
    Transposes (`perm`, composed; None: none) and scalar scales."""
    source: Value
    perm: Optional[tuple]
    ops: tuple      # the group's ops producing the operand from source (Transpose, Mul/Div, ...)
    scale: float    # product of the absorbed scalar scales
    pick: Optional[tuple] = None  # (rank-5 perm, index)


@dataclass(frozen=True)
class Attention:
    qk: Op
    softmax: Op
    pv: Op
    steps: tuple                 # Step
    q: Operand
    kt: Operand
    v: Operand
    out_perm: Optional[tuple]    # the absorbed Transpose of o
    out_op: Optional[Op]

    @property
    def result(self) -> Value:
        return (self.out_op or self.pv).results[0]

    @property
    def scale(self) -> float:
        return self.q.scale * self.kt.scale

    @property
    def ops(self) -> list:
        ops = list(self.q.ops) + list(self.kt.ops) + list(self.v.ops) + [self.qk]
        ops += [s.op for s in self.steps] + [self.softmax, self.pv]
        ops += [self.out_op] if self.out_op is not None else []
        seen, out = set(), []  # a packed q/k/v Transpose (and Split) serves several operands
        for op in ops:
            if id(op) not in seen:
                seen.add(id(op))
                out.append(op)
        return out

    @property
    def shape(self) -> tuple:
        """(batch dims..., S, T, D, Dv) of the scores and operands."""
        s = tuple(self.qk.results[0].type.shape)
        return s[:-2], s[-2], s[-1], self.q_shape[-1], tuple(self.pv.results[0].type.shape)[-1]

    @property
    def q_shape(self) -> tuple:
        return tuple(self.qk.operands[0].type.shape)

    def params(self, tile: str = "") -> str:
        batch, S, T, D, Dv = self.shape
        words = [f"S={S} T={T} D={D}" + (f" Dv={Dv}" if Dv != D else "")]
        if self.scale != 1.0 or any(s.role == "scale" for s in self.steps):
            sc = self.scale * math.prod(s.scale for s in self.steps if s.role == "scale")
            words.append("scale=%g" % sc)
        n_add = sum(s.role == "add" for s in self.steps)
        if n_add:
            words.append("mask" if n_add == 1 else f"mask x{n_add}")
        if any(s.role == "where" for s in self.steps):
            words.append("where")
        absorbed = [n for n, o in (("q", self.q), ("k", self.kt), ("v", self.v))
                    if o.perm is not None or o.pick is not None]
        if self.out_perm is not None:
            absorbed.append("o")
        if absorbed:
            words.append("transposes=" + ",".join(absorbed))
        if tile:
            words.append(tile)
        return " ".join(words)


def choose_tile(S: int, batch_ctas: int, D: int = 64, Dv: int = 64, sm_count: int = DEFAULT_SM_COUNT) -> tuple:
    """(m-tiles per warp, warps per CTA) of the tensor-core kernel; a CTA takes 16 * mi * warps
    query rows. The first candidate that still gives two CTAs per SM, else one per SM, else the
    smallest: FlashAttention-2's 4 warps of 32 rows (mi = 2: every K/V fragment a warp loads from
    shared memory serves two m-tiles) where the head dims are <= 64 (at 128 the accumulators of
    two m-tiles do not fit 255 registers), then 8, 4 and 2 warps of 16 rows. Short sequences at
    batch 1 get more, smaller CTAs; long ones fewer, larger CTAs that reuse each K/V tile for more
    rows. One warp is never chosen: its unrolled tile loads spill."""
    cands = ([(2, 4)] if D <= 64 and Dv <= 64 else []) + [(1, 8), (1, 4), (1, 2)]
    for need in (2 * sm_count, sm_count):
        for mi, w in cands:
            if -(-S // (16 * mi * w)) * batch_ctas >= need:
                return mi, w
    return cands[-1]


def tile_of(at: "Attention") -> str:
    """The kernel decision written into params: "tile=<rows>x<kv rows> warps=<w>" (tensor cores)
    or "simt"."""
    batch, S, T, D, Dv = at.shape
    dt = at.qk.results[0].type.dtype.short
    if dt not in TC_DTYPES or D % 16 or Dv % 16 or D > TC_MAX_D or Dv > TC_MAX_D:
        return "simt"
    mi, w = choose_tile(S, math.prod(batch), D, Dv)
    return f"tile={16 * mi * w}x{KV_TILE} warps={w}"


def parse_tile(params: str) -> Optional[tuple]:
    """(m-tiles per warp, warps) from params written by tile_of; None when absent or malformed."""
    rows = warps = None
    for word in params.split():
        try:
            if word.startswith("tile="):
                rows = int(word[len("tile="):].split("x")[0])
            elif word.startswith("warps="):
                warps = int(word[len("warps="):])
        except ValueError:
            return None
    if rows is None or warps not in (1, 2, 4, 8) or rows % (16 * warps) or rows // (16 * warps) not in (1, 2):
        return None
    return rows // (16 * warps), warps


def _ok_type(v: Value) -> bool:
    t = v.type
    return t.is_static and t.dtype.short in FLOATS and getattr(t, "layout", None) is None


def _scalar(v: Value, const_of: ConstOf) -> Optional[float]:
    a = const_of(v)
    if a is None or a.size != 1 or a.ndim > 1:
        return None
    x = float(np.asarray(a, dtype=np.float64).reshape(()))
    return x if math.isfinite(x) else None


def _fill(v: Value, const_of: ConstOf) -> Optional[float]:
    """Where's fill: a constant scalar, -inf allowed (a masked score)."""
    a = const_of(v)
    if a is None or a.size != 1 or a.ndim > 1:
        return None
    x = float(np.asarray(a, dtype=np.float64).reshape(()))
    return None if math.isnan(x) or x == math.inf else x


def _broadcasts(shape, onto) -> bool:
    """`shape` broadcasts onto `onto` (numpy rules, without growing `onto`)."""
    if len(shape) > len(onto):
        return False
    full = (1,) * (len(onto) - len(shape)) + tuple(shape)
    return all(d == 1 or d == o for d, o in zip(full, onto))


def _scale_of(op: Op, cur: Value, const_of: ConstOf) -> Optional[float]:
    """The factor of a Mul/Div of `cur` by a constant scalar (Div: cur must be the dividend)."""
    if op.name not in ("Mul", "Div") or len(op.operands) != 2 or len(op.results) != 1:
        return None
    a, b = op.operands
    if (a is cur) == (b is cur) or op.results[0].type != cur.type:
        return None
    if op.name == "Div" and a is not cur:
        return None
    c = _scalar(b if a is cur else a, const_of)
    if c is None or c == 0.0:
        return None
    return c if op.name == "Mul" else 1.0 / c


def _operand(v: Value, producer: Producer, only_user: OnlyUser, const_of: ConstOf, allow_scale: bool,
             allow_pick: bool = True) -> Operand:
    """Q / Kt / V behind `v`: absorbs scalar scales (Q and Kt only), then rank-3/4 Transposes (their
    perms composed), each only when the group is the sole user of its result."""
    ops, scale, perm = [], 1.0, None
    while allow_scale:
        p = producer(v)
        if p is None or only_user(v) is None or len(p.operands) != 2:
            break
        x = p.operands[0]
        s = _scale_of(p, x, const_of) if x is not None else None
        if s is None:
            break
        ops.insert(0, p)
        scale *= s
        v = x
    while True:  # Transposes, composed (GPT-2: the head split, then K's last two axes swapped)
        p = producer(v)
        if not (p is not None and p.name == "Transpose" and only_user(v) is not None and v.type.rank in (3, 4)
                and p.operands[0] is not None and _ok_type(p.operands[0])):
            break
        inner = _perm(p)
        perm = inner if perm is None else tuple(inner[k] for k in perm)
        ops.insert(0, p)
        v = p.operands[0]
    got = _pick(v, producer, only_user, const_of) if allow_pick and v.type.rank == 4 else None
    if got is not None:
        t5, index, pick_ops = got
        return Operand(t5.operands[0], perm, tuple([t5] + pick_ops + ops), scale, (_perm(t5), index))
    return Operand(v, perm, tuple(ops), scale)


def _pick(v: Value, producer: Producer, only_user: OnlyUser, const_of: ConstOf):
    """(the rank-5 Transpose, index, [the ops between]) when `v` is one of the packed q/k/v
    taken along axis 0 of a rank-5 Transpose: Gather(t, i, axis=0) with a constant scalar i, or
    Squeeze(Split(t, axis=0)[i], [0]) with parts of size 1 (torch's `qkv[i]` and `unbind(0)`).
    The Transpose (and Split) then has several users, all of which must be in the group
    (match checks that)."""
    p = producer(v)
    if p is None or only_user(v) is None or len(p.results) != 1:
        return None
    if p.name == "Gather" and len(p.operands) == 2 and int(p.attrs.axis) == 0 and p.operands[0] is not None:
        data, idx = p.operands
        a = const_of(idx) if idx is not None else None
        if a is None or a.size != 1 or a.ndim != 0:
            return None
        i = int(np.asarray(a).reshape(()))
        n0 = data.type.shape[0] if data.type.is_static else None
        if n0 is None or not -n0 <= i < n0:
            return None
        t5 = producer(data)
        if t5 is None or t5.name != "Transpose" or data.type.rank != 5 or not _ok_type(t5.operands[0]):
            return None
        return t5, i % n0, [p]
    if p.name == "Squeeze" and len(p.operands) == 2 and p.operands[0] is not None and p.operands[1] is not None:
        axes = const_of(p.operands[1])
        part = p.operands[0]
        sp = producer(part)
        if axes is None or [int(x) % 5 for x in np.asarray(axes).reshape(-1)] != [0] or sp is None \
                or sp.name != "Split" or int(sp.attrs.axis) % 5 != 0 or only_user(part) is None:
            return None
        if any(not r.type.is_static or r.type.shape[0] != 1 for r in sp.results):
            return None
        t5 = producer(sp.operands[0])
        if t5 is None or t5.name != "Transpose" or sp.operands[0].type.rank != 5 or not _ok_type(t5.operands[0]):
            return None
        i = next(k for k, r in enumerate(sp.results) if r is part)
        return t5, i, [sp, p]
    return None


def _perm(op: Op) -> tuple:
    rank = op.results[0].type.rank
    p = op.attrs.perm
    return tuple(range(rank))[::-1] if p is None else tuple(int(x) % rank for x in p)


def match(softmax: Op, producer: Producer, only_user: OnlyUser, const_of: ConstOf,
          users: Optional[Callable] = None) -> Optional[Attention]:
    """The attention pattern ending in `softmax`, or None. producer(v): v's defining op (None:
    an argument or outside the region); only_user(v): v's only user, None when v has several, is
    a function result, or has none; users(v): all of v's users, None when v is a function result
    (needed for a packed q/k/v Transpose that several operands share; without it none matches)."""
    if softmax.name != "Softmax" or len(softmax.results) != 1:
        return None
    x = softmax.operands[0]
    if x is None or not _ok_type(x) or x.type.rank not in (3, 4):
        return None
    rank = x.type.rank
    if int(softmax.attrs.axis) % rank != rank - 1:
        return None
    scores_shape = tuple(x.type.shape)
    dt = x.type.dtype
    # backwards: the steps between the scores MatMul and the Softmax
    got = _walk_back(x, producer, only_user, const_of, 0)
    if got is None:
        return None
    qk, steps = got
    # forwards: Softmax -> MatMul(P, V)
    pv = only_user(softmax.results[0])
    if pv is None or pv.name != "MatMul" or pv.operands[0] is not softmax.results[0] \
            or pv.operands[1] is softmax.results[0]:
        return None
    qv, ktv, vv = qk.operands[0], qk.operands[1], pv.operands[1]
    o = pv.results[0]
    if any(v is None or not _ok_type(v) or v.type.dtype != dt or v.type.rank > rank for v in (qv, ktv, vv, o)):
        return None
    if qv.type.rank != rank or tuple(qv.type.shape)[:-2] != scores_shape[:-2] or o.type.rank != rank:
        return None
    if ktv.type.rank < 2 or vv.type.rank < 2:
        return None
    S, T = scores_shape[-2:]
    D, Dv = qv.type.shape[-1], vv.type.shape[-1]
    if tuple(ktv.type.shape)[-2:] != (D, T) or tuple(vv.type.shape)[-2] != T:
        return None
    if min(scores_shape) < 1 or D < 1 or Dv < 1 or max(S, T) >= 2 ** 31:  # empty, or past int32 rows
        return None
    if not _broadcasts(tuple(ktv.type.shape)[:-2], scores_shape[:-2]) \
            or not _broadcasts(tuple(vv.type.shape)[:-2], scores_shape[:-2]) \
            or tuple(o.type.shape) != scores_shape[:-2] + (S, Dv):
        return None
    out_op, out_perm = None, None
    u = only_user(o)
    if u is not None and u.name == "Transpose" and _ok_type(u.results[0]):
        out_op, out_perm = u, _perm(u)
    for allow_pick in (users is not None, False):
        q = _operand(qv, producer, only_user, const_of, True, allow_pick)
        kt = _operand(ktv, producer, only_user, const_of, True, allow_pick)
        v = _operand(vv, producer, only_user, const_of, False, allow_pick)
        at = Attention(qk, softmax, pv, tuple(steps), q, kt, v, out_perm, out_op)
        if not any(o.pick is not None for o in (q, kt, v)) or _closed(at, users):
            return at
    return None


def _closed(at: Attention, users: Callable) -> bool:
    """Every use of every value made in the group (but its result) is in the group: the shared
    packed q/k/v Transpose / Split must not be needed outside."""
    ids = {id(op) for op in at.ops}
    for op in at.ops:
        for r in op.results:
            if r is at.result:
                continue
            us = users(r)
            if us is None or any(id(u) not in ids for u in us):
                return False
    return True


def _walk_back(cur: Value, producer: Producer, only_user: OnlyUser, const_of: ConstOf, depth: int):
    """(the scores MatMul, the steps after it in program order) behind `cur`, or None. An Add
    may have the chain on either side; the side that reaches a MatMul is the chain, the other the
    mask."""
    if depth > MAX_STEPS or only_user(cur) is None:
        return None
    p = producer(cur)
    t = cur.type
    if p is None or len(p.results) != 1 or p.results[0].type != t:
        return None
    if p.name == "MatMul":
        return p, ()
    shape = tuple(t.shape)
    cands = []  # (previous value of the chain, the step)
    if p.name in ("Mul", "Div") and len(p.operands) == 2:
        for c in p.operands[:1] if p.name == "Div" else p.operands:
            s = _scale_of(p, c, const_of) if c is not None and c.type == t else None
            if s is not None:
                cands.append((c, Step("scale", p, scale=s)))
    elif p.name == "Add" and len(p.operands) == 2:
        a, b = p.operands
        for mine, other in ((a, b), (b, a)):
            if (mine is not None and other is not None and mine is not other and mine.type == t
                    and other.type.dtype == t.dtype and _ok_type(other)
                    and _broadcasts(tuple(other.type.shape), shape)):
                cands.append((mine, Step("add", p, operand=other)))
    elif p.name == "Where" and len(p.operands) == 3:
        c, a, b = p.operands
        if c is not None and c.type.dtype.short == "bool" and c.type.is_static \
                and _broadcasts(tuple(c.type.shape), shape):
            if a is not None and a.type == t and b is not None and _fill(b, const_of) is not None:
                cands.append((a, Step("where", p, operand=c, fill=_fill(b, const_of), keep_if_true=True)))
            if b is not None and b.type == t and a is not None and _fill(a, const_of) is not None:
                cands.append((b, Step("where", p, operand=c, fill=_fill(a, const_of), keep_if_true=False)))
    for prev, step in cands:
        got = _walk_back(prev, producer, only_user, const_of, depth + 1)
        if got is not None:
            return got[0], got[1] + (step,)
    return None


def match_body(body, const_of: ConstOf) -> Optional[Attention]:
    """The Attention of a fused body made by this pass (the lowering's view of the group): the body
    holds exactly the matched ops and returns the pattern's result."""
    prod, users = {}, {}
    for op in body.ops:
        for r in op.results:
            prod[id(r)] = op
        for v in op.operands:
            if v is not None:
                users.setdefault(id(v), []).append(op)
    ret = {id(v) for v in body.results}

    def only_user(v):
        us = users.get(id(v), ())
        return us[0] if len(us) == 1 and id(v) not in ret else None

    def all_users(v):
        return None if id(v) in ret else users.get(id(v), [])

    sms = [op for op in body.ops if op.name == "Softmax"]
    if len(sms) != 1 or len(body.results) != 1:
        return None
    at = match(sms[0], lambda v: prod.get(id(v)), only_user, const_of, all_users)
    if at is None or len(at.ops) != sum(op.name != "const" for op in body.ops) or at.result is not body.results[0]:
        return None
    return at


def _run_func(func, weights) -> bool:
    users: dict[int, list] = {}
    prod: dict[int, Op] = {}
    for op in func.ops:
        for r in op.results:
            prod[id(r)] = op
        for v in op.operands:
            if v is not None:
                users.setdefault(id(v), []).append(op)
        for _, r in op.regions():  # values read inside regions count as uses (never fused through)
            for vid in used_values(r):
                users.setdefault(vid, []).append(op)
    returned = {id(v) for v in func.results}

    def only_user(v: Value) -> Optional[Op]:
        us = users.get(id(v), ())
        if id(v) in returned or len(us) != 1:
            return None
        return us[0]

    def const_of(v):
        return const_value(v, weights)

    def all_users(v: Value):
        return None if id(v) in returned else users.get(id(v), [])

    out = Outliner(func)
    changed = False
    for op in list(func.ops):
        if op.name != "Softmax":
            continue
        at = match(op, lambda v: prod.get(id(v)), only_user, const_of, all_users)
        if at is None or not out.can_outline(at.ops):
            continue
        out.outline(at.ops, kind="attention", params=at.params(tile_of(at)))
        changed = True
    if changed:
        out.finish()
    return changed


def run(module: Module) -> bool:
    changed = False
    for f in module.functions:
        changed |= _run_func(f, module.weights)
    return changed
