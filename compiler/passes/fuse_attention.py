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

and takes into the group, so that the kernel reads through strides instead of copying, the view
ops between Q, Kt, V and the values they come from: Transpose, Reshape/Squeeze/Unsqueeze/Flatten,
and the parts Split / Slice (step > 0, constant bounds) / Gather (one constant index) take of a
packed projection, as long as each is exactly a strided view (`view_step`: element offset plus
one stride per dim; a reshape merging dims that are not one stride apart is kept as a dim of
several factors, valid only if a later reshape splits it again, so [B*H,S,D] of a packed buffer
at B > 1 reaches the kernel only as [B,H,S,D]). Forms this covers: the head split Reshape [B,S,H*D]
-> [B,S,H,D] + Transpose(0,2,1,3) / (0,2,3,1) (BERT); GPT-2's c_attn output [B,S,3E] Split on
the last axis (each part at offset i*E, seq stride 3E, head stride D); ViT's packed [B,S,3,H,D]
-> Transpose(2,0,3,1,4) -> Gather / Split+Squeeze, and torch nn.MultiheadAttention's seq-first
[S,B,3E] -> Unsqueeze -> Transpose(3,1,2,0,4) -> Squeeze -> Gather(i) -> Reshape [S,B*H,D] ->
Transpose(1,0,2) (-> Reshape [B,H,S,D]), its q / K^T scaled by a Mul. A view op whose result is
also read outside the group stays outside (the chains stop before it, `_leaky`); plain reshapes
at the start of a chain stay outside too (free views either way). On the output side, the run of
Transposes/Reshapes after o up to its last Transpose (the head merge, also [B*H,S,D] ->
Transpose(1,0,2) -> [S,B*H,D]) becomes o's strides into that Transpose's result.
The scale/mask steps may come in any order; the kernel applies them in program order.

Must hold: static shapes, or a range profile's symbolic ones (ir/symbolic.Expr: S and T of BERT's
[B,S,H*D]; the views' strides and sizes are then Exprs, a dim divides another only as cancelling
monomials, Split/Slice/Gather only along static dims, the head dims static, a Where's condition
static; the lowering passes the sizes and strides per run, codegen/runtime_sizes.py); float
(f16/bf16/f32) types without layout tags; Q, Kt, V, o and the
scores of one dtype; scores of rank 3 or 4 whose batch dims are those of Q (K^T and V may broadcast
along them); every value inside the group has its users inside it and is not a function result
(only o, or the end of its absorbed head merge, leaves the group); Softmax over the last axis. A Softmax over
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
from nnc.ir.symbolic import Expr, evaluate, sym

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
class View:
    """A strided view into the buffer of a contiguous value: element offset, then one stride per
    dim (a size-1 dim has stride 0)."""
    shape: tuple
    strides: tuple
    offset: int = 0


@dataclass(frozen=True)
class Operand:
    """Q, Kt or V as the kernel reads it: `layout`, a strided view into the buffer of `source` (a
    value outside the group, read contiguous), made by the view ops in `ops` (Transpose, Reshape,
    Squeeze/Unsqueeze/Flatten, Split/Slice/Gather taking one part: each exactly a new view, see
    `view_step`); `ops` also holds the absorbed scalar scales (their product is `scale`)."""
    source: Value
    layout: View     # of the operand as the group's MatMul sees it ([.., S, D], [.., D, T], [.., T, Dv])
    ops: tuple       # the group's ops producing the operand from source
    scale: float     # product of the absorbed scalar scales
    absorbed: bool = False  # some view op (not only scales) is read through strides


@dataclass(frozen=True)
class Attention:
    qk: Op
    softmax: Op
    pv: Op
    steps: tuple                 # Step
    q: Operand
    kt: Operand
    v: Operand
    out_ops: tuple = ()          # the absorbed Transposes/Reshapes after o (head merge), in order
    out_strides: tuple = ()      # o's strides into the buffer of `result` (contiguous)

    @property
    def result(self) -> Value:
        return (self.out_ops[-1] if self.out_ops else self.pv).results[0]

    @property
    def scale(self) -> float:
        return self.q.scale * self.kt.scale

    @property
    def ops(self) -> list:
        ops = list(self.q.ops) + list(self.kt.ops) + list(self.v.ops) + [self.qk]
        ops += [s.op for s in self.steps] + [self.softmax, self.pv]
        ops += list(self.out_ops)
        seen, out = set(), []  # a packed q/k/v Transpose / Split serves several operands
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
        absorbed = [n for n, o in (("q", self.q), ("k", self.kt), ("v", self.v)) if o.absorbed]
        if self.out_ops:
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
    rows. One warp is never chosen: its unrolled tile loads spill. Head dims <= 64 follow the
    H200 measurement below instead."""
    if D <= 64 and Dv <= 64:
        # measured on the H200 (tools/bench_attention.py --sweep, 2026-12-01, fp16, H=12, D=64,
        # CUDA-graph times): with >= one wave of 128-row CTAs, 4 warps of 32 rows win (B=32:
        # S=128 0.0112 ms, S=512 0.1076 ms); with fewer, 4 warps of 16 rows over 128 K/V rows
        # (B=1: S=128 0.0038 ms, S=512 0.0087 ms against 0.0122 ms for the 2-warp tile)
        return (2, 4) if -(-S // 128) * batch_ctas >= sm_count else (1, 4)
    cands = [(1, 8), (1, 4), (1, 2)]
    for need in (2 * sm_count, sm_count):
        for mi, w in cands:
            if -(-S // (16 * mi * w)) * batch_ctas >= need:
                return mi, w
    return cands[-1]


def choose_kv_rows(S: int, batch_ctas: int, D: int = 64, Dv: int = 64, sm_count: int = DEFAULT_SM_COUNT) -> int:
    """K/V rows per tile for choose_tile's CTA (the same sweep): 32 for short sequences filling
    the GPU (B=32 S=128: 0.0112 against 0.0150 ms at 64), 128 for the 64-row CTAs of few heads
    (B=1), else 64."""
    if D > 64 or Dv > 64:
        return KV_TILE
    if choose_tile(S, batch_ctas, D, Dv, sm_count) == (1, 4):
        return 128
    return 32 if S <= 128 else KV_TILE


def tile_of(at: "Attention") -> str:
    """The kernel decision written into params: "tile=<rows>x<kv rows> warps=<w>" (tensor cores)
    or "simt"."""
    batch, S, T, D, Dv = at.shape
    dt = at.qk.results[0].type.dtype.short
    if any(isinstance(d, Expr) for d in batch + (S, T)):
        return ""  # a range profile: the lowering picks the tile at the profile's opt sizes
    if dt not in TC_DTYPES or D % 16 or Dv % 16 or D > TC_MAX_D or Dv > TC_MAX_D:
        return "simt"
    mi, w = choose_tile(S, math.prod(batch), D, Dv)
    return f"tile={16 * mi * w}x{choose_kv_rows(S, math.prod(batch), D, Dv)} warps={w}"


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
    """A float type whose dims are ints or symbolic expressions of a range profile (no `?`)."""
    t = v.type
    return _known_shape(t.shape) and t.dtype.short in FLOATS  # a layout tag: same physical dims (ir/layout.py)


def _known_shape(shape) -> bool:
    # (the Expr constructors make any expression with a `?` part UNKNOWN itself)
    return shape is not None and all(isinstance(d, int) or (isinstance(d, Expr) and d.kind != "unknown")
                                     for d in shape)


# ---------------------------------------------------------------- symbolic dims
# A range profile's IR keeps its symbols (codegen/runtime_sizes.py): S of BERT's [B,S,H*D] is an
# Expr. The strided-view algebra below works on dims that are ints or Exprs: equal dims are taken
# whole, and a dim divides another when both are monomials (a constant times symbols) whose
# factors cancel, which holds at every value of the symbols. Anything else is no view.

def _same(a, b) -> bool:
    """a and b are the same dim at every value of the symbols: equal trees, or (sums, reordered
    products) equal at several distinct symbol values."""
    if a == b:
        return True
    if isinstance(a, int) and isinstance(b, int):
        return False
    names = sorted((a.symbols if isinstance(a, Expr) else set()) | (b.symbols if isinstance(b, Expr) else set()))
    for seed in (2654435761, 40503, 2246822519):  # unrelated values per symbol and probe (fixed: deterministic)
        env = {n: 1000 + (seed * (i + 1) * (i + 7)) % 1000003 for i, n in enumerate(names)}
        if evaluate(a, env) != evaluate(b, env):
            return False
    return True


def _monomial(d) -> Optional[tuple]:
    """(constant, sorted symbol names with repetition) of a product of ints and symbols; None for
    anything else (a sum, a division)."""
    if isinstance(d, int):
        return d, ()
    if d.kind == "sym":
        return 1, (d.name,)
    if d.kind == "mul":
        c, names = 1, []
        for a in d.args:
            m = _monomial(a)
            if m is None:
                return None
            c *= m[0]
            names += m[1]
        return c, tuple(sorted(names))
    return None


def _quot(n, f):
    """n / f when f divides n at every value of the symbols (an int or an Expr), else None."""
    if isinstance(n, int) and isinstance(f, int):
        return n // f if f and n % f == 0 else None
    if _same(n, f):
        return 1
    mn, mf = _monomial(n), _monomial(f)
    if mn is None or mf is None or mf[0] == 0 or mn[0] % mf[0]:
        return None
    rest = list(mn[1])
    for name in mf[1]:
        if name not in rest:
            return None
        rest.remove(name)
    out = mn[0] // mf[0]
    for name in rest:
        out = out * sym(name)
    return out


def _is_one(d) -> bool:
    return isinstance(d, int) and d == 1


def _shape_same(a, b) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


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


# ---------------------------------------------------------------- strided views

RESHAPES = ("Reshape", "Squeeze", "Unsqueeze", "Flatten")  # row-major order kept: a reshape to the result
VIEW_OPS = RESHAPES + ("Transpose", "Gather", "Split", "Slice")
MAX_CHAIN = 16  # ops walked back from an operand / forward from o (bounds the work per Softmax)
MAX_FANOUT = 8  # users of a value an operand chain walks through (q/k/v share the packed ones: 3)


def contiguous(shape) -> tuple:
    """Row-major strides (ints, or Exprs over a range profile's symbols); a size-1 dim gets 0
    (never stepped along)."""
    st, acc = [], 1
    for d in reversed(shape):
        st.insert(0, 0 if _is_one(d) else acc)
        acc = acc * d
    return tuple(st)


def _merge(factors) -> tuple:
    """(size, stride) factors of one dim, outer first, size-1 ones dropped and neighbours one
    stride apart merged."""
    out = []
    for f, s in factors:
        if _is_one(f):
            continue
        if out and _same(out[-1][1], s * f):
            out[-1] = (out[-1][0] * f, s)
        else:
            out.append((f, s))
    return tuple(out)


@dataclass(frozen=True)
class NView:
    """A view whose dims may each be several (size, stride) factors, outer first: what merging
    dims that are not one stride apart makes (the B*H of a packed projection with B > 1); a later
    reshape may split them apart again. Only where every dim is one factor are there kernel strides
    (flat)."""
    dims: tuple
    offset: int = 0

    @staticmethod
    def of(v: View) -> "NView":
        return NView(tuple(_merge([(d, s)]) for d, s in zip(v.shape, v.strides)), v.offset)

    @property
    def shape(self) -> tuple:
        return tuple(math.prod(f for f, _ in d) for d in self.dims)

    def flat(self) -> Optional[View]:
        if any(len(d) > 1 for d in self.dims):
            return None
        return View(self.shape, tuple(d[0][1] if d else 0 for d in self.dims), self.offset)

    def permute(self, p) -> "NView":
        return NView(tuple(self.dims[k] for k in p), self.offset)

    def reshape(self, new_shape) -> Optional["NView"]:
        """Row-major reshape without a copy: each new dim takes factors from the front of the
        stream (splitting one where it is larger than what the dim still needs); None where a
        dim size does not divide a factor (no strides express it)."""
        new_shape = tuple(new_shape)
        if not _same(math.prod(self.shape), math.prod(new_shape)) or any(isinstance(d, int) and d < 1
                                                                          for d in new_shape):
            return None
        stream = [f for d in self.dims for f in d]
        out, k = [], 0
        for n in new_shape:
            need, fs = n, []
            while not _is_one(need):
                if k == len(stream):
                    return None
                f, s = stream[k]
                rest = _quot(need, f)
                if rest is not None:  # f divides what the dim still needs: take the factor whole
                    fs.append((f, s))
                    need = rest
                    k += 1
                    continue
                outer = _quot(f, need)
                if outer is None:
                    return None
                fs.append((need, s * outer))  # the factor is larger: split it
                stream[k] = (outer, s)
                need = 1
            out.append(_merge(fs))
        return NView(tuple(out), self.offset) if k == len(stream) else None


def reshape_view(v: View, new_shape) -> Optional[View]:
    """`v` reshaped (row-major) to `new_shape` without a copy, or None where no strides express it
    (torch's view rule: the dims merged into one must be one stride apart)."""
    got = NView.of(v).reshape(new_shape)
    return got.flat() if got is not None else None


def _single(dim) -> Optional[tuple]:
    """(size, stride) of a dim of one factor (or size 1), else None."""
    if len(dim) > 1:
        return None
    return dim[0] if dim else (1, 0)


def view_step(op: Op, result: Value, x: NView, const_of: ConstOf) -> Optional[NView]:
    """The view of `result` (one result of the view op `op`) given the view `x` of its data
    operand, or None where `result` is not exactly a strided view of the same buffer (a Gather of
    several or computed indices, a Slice with a step <= 0 or computed bounds, a Split / Slice along
    a dim of several factors, ...)."""
    if not _known_shape(result.type.shape):
        return None
    rshape = tuple(result.type.shape)
    rank = len(x.dims)
    if op.name in RESHAPES:
        return x.reshape(rshape)
    if op.name == "Transpose":
        p = _perm(op)
        return x.permute(p) if sorted(p) == list(range(rank)) else None
    if op.name == "Gather" and len(op.operands) == 2 and op.operands[1] is not None:
        axis = int(op.attrs.axis)
        a = const_of(op.operands[1])
        if not -rank <= axis < rank or a is None or a.size != 1 or a.dtype.kind not in "iu":
            return None
        axis %= rank
        i, n = int(np.asarray(a).reshape(())), x.shape[axis]
        if not isinstance(n, int) or not -n <= i < n:  # (a symbolic axis: the index may be past it)
            return None
        i %= n
        off = x.offset
        for f, s in reversed(x.dims[axis]):  # the index split over the dim's factors, inner first
            off += (i % f) * s
            i //= f
        return NView(x.dims[:axis] + ((),) + x.dims[axis + 1:], off).reshape(rshape)
    if op.name == "Split":
        axis = int(op.attrs.axis)
        if not -rank <= axis < rank or any(not _known_shape(r.type.shape) for r in op.results):
            return None
        axis %= rank
        one = _single(x.dims[axis])
        k = next(n for n, r in enumerate(op.results) if r is result)
        if any(not isinstance(r.type.shape[axis], int) for r in op.results[:k + 1]) or one is None \
                or not isinstance(one[0], int):
            return None  # split sizes along a symbolic dim: no static offsets
        start = sum(int(r.type.shape[axis]) for r in op.results[:k])
        if not _shape_same(rshape[:axis] + rshape[axis + 1:], x.shape[:axis] + x.shape[axis + 1:]) \
                or start + rshape[axis] > one[0]:
            return None
        dims = x.dims[:axis] + (_merge([(rshape[axis], one[1])]),) + x.dims[axis + 1:]
        return NView(dims, x.offset + start * one[1])
    if op.name == "Slice" and len(op.operands) >= 3:
        args = [const_of(v) if v is not None else None for v in op.operands[1:]]
        if any(a is None for a in args[:2]) or any(a is None and v is not None for a, v in zip(args, op.operands[1:])):
            return None
        ints = [None if a is None else [int(t) for t in np.asarray(a).reshape(-1)] for a in args]
        starts, ends = ints[0], ints[1]
        axes = ints[2] if len(ints) > 2 and ints[2] is not None else list(range(len(starts)))
        steps = ints[3] if len(ints) > 3 and ints[3] is not None else [1] * len(starts)
        if not len(starts) == len(ends) == len(axes) == len(steps) or any(not -rank <= a < rank for a in axes) \
                or len({a % rank for a in axes}) != len(axes):
            return None
        dims, off = list(x.dims), x.offset
        for a, b, e, sp in zip(axes, starts, ends, steps):
            a %= rank
            one = _single(dims[a])
            if sp <= 0 or one is None or not isinstance(one[0], int):  # (bounds on a symbolic dim: no static view)
                return None
            b, e, sp = slice(b, e, sp).indices(one[0])
            off += b * one[1]
            dims[a] = _merge([(len(range(b, e, sp)), one[1] * sp)])
        got = NView(tuple(dims), off)
        return got if _shape_same(got.shape, rshape) else None
    return None


def _chain_view(source: Value, chain, const_of: ConstOf) -> Optional[View]:
    """The view the ops of `chain` ((op, result, role) from source towards the operand; scales
    keep the layout) make of `source`'s contiguous buffer, or None when one is no strided view or
    the end has a dim of several factors."""
    shape = tuple(source.type.shape)
    v = NView.of(View(shape, contiguous(shape)))
    for op, res, role in chain:
        if role == "view":
            v = view_step(op, res, v, const_of)
            if v is None:
                return None
    return v.flat()


def _chain_back(v: Value, producer: Producer, only_user: OnlyUser, const_of: ConstOf, allow_scale: bool,
                users: Optional[Callable] = None) -> list:
    """The (op, result, role) steps behind operand `v`, from v backwards: scalar scales (Q and Kt
    only) and view ops, as far as they go (MAX_CHAIN). With `users` a value may have a few users
    (the packed q/k/v shared by three operands; closure is checked on the whole group; a value
    with more than MAX_FANOUT cannot be all in it), else each value's only user must be the next
    op of the chain."""
    out = []
    cur = v
    while len(out) < MAX_CHAIN:
        p = producer(cur)
        us = users(cur) if users is not None else None
        if p is None or (only_user(cur) is None if users is None else us is None or len(us) > MAX_FANOUT):
            break
        if allow_scale and len(p.results) == 1 and len(p.operands) == 2:
            s = None
            for x in (p.operands if p.name == "Mul" else p.operands[:1]):
                s = _scale_of(p, x, const_of) if x is not None else None
                if s is not None:
                    break
            if s is not None:
                out.append((p, cur, "scale", s))
                cur = x
                continue
        x = p.operands[0] if p.operands else None
        if p.name in VIEW_OPS and x is not None and _ok_type(x) and x.type.dtype == cur.type.dtype \
                and _ok_type(cur) and not p.regions():
            out.append((p, cur, "view", 1.0))
            cur = x
            continue
        break
    return out


def _operand(v: Value, steps: list, upto: int, const_of: ConstOf) -> Operand:
    """Operand `v` absorbing at most the first `upto` of its chain `steps`: the longest prefix whose
    view ops are all strided views of the value it starts from, less the plain reshapes at its
    start (a reshape of a contiguous value is a free view outside too; leaving it there keeps the
    group minimal)."""
    def values(k):
        return steps[k - 1][0].operands[0] if k else v

    k = min(upto, len(steps))
    while k > 0:
        fwd = [(op, res, role) for op, res, role, _ in reversed(steps[:k])]
        if _chain_view(values(k), fwd, const_of) is not None:
            break
        k -= 1
    while k > 0 and steps[k - 1][2] == "view" and steps[k - 1][0].name in RESHAPES:
        k -= 1
    src = values(k)
    fwd = [(op, res, role) for op, res, role, _ in reversed(steps[:k])]
    layout = _chain_view(src, fwd, const_of)
    return Operand(src, layout, tuple(op for op, _, _, _ in reversed(steps[:k])),
                   math.prod(s for _, _, role, s in steps[:k] if role == "scale"),
                   any(role == "view" for _, _, role, _ in steps[:k]))


def _out_chain(o: Value, only_user: OnlyUser) -> tuple:
    """(the Transposes/reshapes after o the kernel writes through, o's strides into the last one's
    buffer): the longest run of only users ending in a Transpose whose inverse is a strided view
    (trailing reshapes stay outside: free views)."""
    chain, cur = [], o
    while len(chain) < MAX_CHAIN:
        u = only_user(cur)
        if u is None or u.name not in RESHAPES + ("Transpose",) or not u.operands or u.operands[0] is not cur \
                or len(u.results) != 1 or not _ok_type(u.results[0]) or u.results[0].type.dtype != cur.type.dtype:
            break
        chain.append(u)
        cur = u.results[0]
    oshape = tuple(o.type.shape)
    for n in range(len(chain), 0, -1):
        if chain[n - 1].name != "Transpose":
            continue
        rshape = tuple(chain[n - 1].results[0].type.shape)
        v = NView.of(View(rshape, contiguous(rshape)))
        for op in reversed(chain[:n]):  # back from the result to o: inverse permutations, reshapes
            if op.name == "Transpose":
                p = _perm(op)
                inv = [0] * len(p)
                for k, a in enumerate(p):
                    inv[a] = k
                v = v.permute(inv)
            else:
                v = v.reshape(tuple(op.operands[0].type.shape))
            if v is None:
                break
        flat = v.flat() if v is not None else None
        if flat is not None and _shape_same(flat.shape, oshape):
            return tuple(chain[:n]), flat.strides
    return (), contiguous(oshape)


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
    if any(isinstance(d, int) and d < 1 for d in scores_shape + (D, Dv)) or not isinstance(D, int) \
            or not isinstance(Dv, int) or any(isinstance(d, int) and d >= 2 ** 31 for d in (S, T)):
        return None  # empty, a symbolic head dim, or past int32 rows (a symbolic S/T: checked at its max by the lowering)
    if not _broadcasts(tuple(ktv.type.shape)[:-2], scores_shape[:-2]) \
            or not _broadcasts(tuple(vv.type.shape)[:-2], scores_shape[:-2]) \
            or tuple(o.type.shape) != scores_shape[:-2] + (S, Dv):
        return None
    out_ops, out_strides = _out_chain(o, only_user)
    permissive = users is not None
    operands = ((qv, True), (ktv, True), (vv, False))
    chains = [_chain_back(x, producer, only_user, const_of, sc, users) for x, sc in operands]
    upto = [len(c) for c in chains]
    while True:  # each round cuts some chain: at most sum(len(chains)) rounds
        q, kt, v = (_operand(x, c, u, const_of) for (x, _), c, u in zip(operands, chains, upto))
        at = Attention(qk, softmax, pv, tuple(steps), q, kt, v, out_ops, out_strides)
        leaky = _leaky(at, users) if permissive else set()
        if not leaky:
            return at
        # an op whose result is also read outside cannot be in the group: each chain stops before it
        cut = [next((k for k in range(u) if id(c[k][0]) in leaky), u) for c, u in zip(chains, upto)]
        if cut == upto:
            return None  # a leak outside the operand chains (the scores / probabilities)
        upto = cut


def _leaky(at: Attention, users: Callable) -> set:
    """ids of the group's ops with a result (other than the group's) that is read outside the
    group or returned: a packed q/k/v Transpose / Split also needed elsewhere."""
    ids = {id(op) for op in at.ops}
    out = set()
    for op in at.ops:
        for r in op.results:
            if r is at.result:
                continue
            us = users(r)
            if us is None or any(id(u) not in ids for u in us):
                out.add(id(op))
    return out


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
