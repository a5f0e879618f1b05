"""Tensor parallelism over K devices, Megatron-style: one Module per device, transformer blocks
split across them, everything else replicated.

    prog = shard_tensor_parallel(module, k)      # prog.devices[d]: device d's Module
    prog.blocks, prog.plan_json()                # what was split; prog.to_multi_device()

Rewrites, per block (found by `find_blocks`): the column GEMMs (Q/K/V, GPT-2's packed c_attn,
fuse-horizontal's stacked [3, 1, E, E] Q/K/V or gate/up, FFN up) take the device's part of the
weight's output columns and of their bias; attention then runs on the device's heads (the
head-split Reshape / Split / Slice / Expand constants get the device's sizes, a per-head mask is
sliced); the row GEMM (attention output projection, FFN down) takes the matching rows of its
weight and gives a partial sum:

    %y.partial = MatMul(%a, %w.shard)             (a Gemm loses its C here)
    %y = AllReduce(%y.partial) {device = d, group = [0, .., K-1]}
    ... bias Add, residual Add, LayerNorm as before (a Gemm's C: an Add after the AllReduce, or
        after the Reshape back to [B, S, E] that is its only reader, next to the residual Add)

so the bias is added once, after the sum. A block is found by propagating a split state from
column weights: a value is either replicated or `Split(axis, groups)` (dim `axis` seen as
[groups, K, n / (groups * K)], device d holding [:, d, :]; groups = 3 for a packed QKV's columns).
The rules (`_Propagation.rule`): views (Reshape/Squeeze/Unsqueeze/Flatten: where the split lands
in one dim of the result, `reshape_split`; Transpose; Slice/Split/Gather along other dims or whole
groups; Concat and Expand along other dims), elementwise ops (a replicated operand spanning the
split dim is read as the device's part: a bias sliced at compile time, an activation by a Slice /
Gather on the device), Softmax / LayerNorm / Reduce* over other dims, batched MatMuls split alike on a batch
dim (the heads), up to MatMuls / Gemms contracting over the split dim (-> partial sum, AllReduce).
Column weights reading one activation are tried together (Q, K and V), then all but one, then
alone with groups 1, 3 and 2. Every rule keeps the meaning, so any propagation that closes is a
correct split. Not a block (stays replicated, identical ops): a split value that would reach a
function result or a region, an op the rules do not know, a reduction over the split dim; a column
GEMM whose result reaches no row GEMM (a classifier or LM head).

Input: a Module after the default pipeline (fused groups are looked through: the `fused` ops
holding a block's ops are inlined, the blocks rewritten, and the fusion passes of the default
pipeline run again on each device's Module, so the GEMM epilogues, the attention kernel of H/K
heads and the rowreduce kernels are chosen for the shard's shapes; fused groups without block ops
stay as they are); before fusion or with --no-fuse no fusion pass runs. Must hold: static shapes on
the block's values; constant column and row weights (Gemm transA = 0); SSA names unique in the
function, fused bodies included. The input module is not changed.
Errors: a recognised block whose split dim does not divide by K (heads, hidden or FFN size) is an
NncError naming the op, its shape and the sizes; K < 1 too. K = 1 and models without blocks give
copies of the input.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from nnc.ir import registry
from nnc.ir.builder import const_value
from nnc.ir.errors import NncError
from nnc.ir.graph import Function, Module, Op, Value, value_names
from nnc.ir.rewrite import used_values
from nnc.ir.types import type_of_array
from nnc.ir.weights import WeightStore

# ops whose one result is computed element by element from operands that broadcast onto it
UNARY = ("Relu", "Gelu", "Tanh", "Sigmoid", "Erf", "Exp", "Log", "Sqrt", "Neg", "Abs", "Cast", "Identity",
         "LeakyRelu", "Elu", "Celu", "Selu", "Softplus", "Softsign", "Swish", "Mish", "HardSigmoid",
         "HardSwish", "Reciprocal", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "Not", "IsNaN", "IsInf")
BROADCAST = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu", "Clip", "Equal",
             "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Mod")
RESHAPES = ("Reshape", "Squeeze", "Unsqueeze", "Flatten")
REDUCES = tuple(f"Reduce{k}" for k in ("Sum", "Mean", "Max", "Min", "Prod", "L1", "L2", "SumSquare", "LogSum",
                                        "LogSumExp"))
GROUP_TRIALS = (1, 3, 2)  # groups of a column weight tried alone: plain, packed QKV, packed gate/up
MAX_GROUP = 6  # column GEMMs of one activation tried also all-but-one (bounds the attempts)


@dataclass(frozen=True)
class Split:
    """Dim `axis` of a value seen as [groups, K, n / (groups * K)]; device d holds [:, d, :]."""
    axis: int
    groups: int = 1


class _NoBlock(Exception):
    """Propagation met something the rules do not split: not a block (stays replicated)."""


@dataclass
class Block:
    """One recognised block of the analysed (flat) function; keys are SSA names."""
    state: dict                      # value name -> Split
    ops: list                        # names (first result) of the ops reading a split value, program order
    columns: list                    # column GEMM op names
    rows: list                       # row GEMM op names (an AllReduce follows each)
    slices: dict                     # (op name, operand index) -> Split of a replicated operand read in part
    kind: str = "mlp"                # "attention" when a Softmax runs on split values
    heads: int = 0                   # attention heads in all (0: no attention)

    def info(self, k: int, flat_values: dict) -> dict:
        def shape(n):
            return [int(d) for d in flat_values[n].type.shape]

        def per_device(n):
            s = shape(n)
            sp = self.state[n]
            s[sp.axis] //= k
            return s
        out = {"kind": self.kind,
               "columns": [{"op": c, "shape": shape(c), "per_device": per_device(c)} for c in self.columns],
               "rows": [{"op": r, "shape": shape(r)} for r in self.rows]}
        if self.heads:
            out["heads"] = self.heads
            out["heads_per_device"] = self.heads // k
        return out


@dataclass
class TensorParallelProgram:
    """The K-device program: devices[d] is device d's Module (rank order)."""
    devices: list
    blocks: list = field(default_factory=list)  # Block.info dicts
    not_split: list = field(default_factory=list)  # {"op", "why"}: column-GEMM candidates left replicated

    @property
    def k(self) -> int:
        return len(self.devices)

    def to_multi_device(self):
        """The program as compiler/multi_device.py's MultiDeviceModule (plan: plan_json())."""
        from nnc.multi_device import MultiDeviceModule
        return MultiDeviceModule(list(self.devices), "tensor", 1, {}, {"tensor_parallel": self.plan_json()})

    def plan_json(self) -> dict:
        allreduces = sum(len(b["rows"]) for b in self.blocks)
        return {"parallel": "tensor", "devices": self.k, "blocks": self.blocks,
                "allreduces_per_forward": allreduces,
                "allreduce_bytes_per_forward": self.allreduce_bytes(), "not_split": self.not_split}

    def allreduce_bytes(self) -> int:
        """Bytes of the AllReduce operands of one forward on one device (the message sizes)."""
        if not self.devices:
            return 0
        return sum(_nbytes(op.results[0]) for op in self.devices[0].main.walk() if op.name == "AllReduce")


def _nbytes(v: Value) -> int:
    return int(math.prod(int(d) for d in v.type.shape)) * v.type.dtype.np.itemsize


# ---------------------------------------------------------------- inlining fused groups

def _name_body_values(func: Function, which: Optional[set] = None) -> None:
    """Before inlining: the values made inside fused bodies get names unique in the whole function
    (the outliner makes them so already; this only guards other producers), and the outliner's
    `_<n>` suffix comes off where the plain name is free again (it was the original value's, gone
    with the group), so inlined ops read as before fusion. The names are planned over all bodies
    and given to those of the fused ops in `which` (None: all): the analysis copy and every device
    copy agree on names, and the bodies left fused keep theirs."""
    taken = {a.name for a in func.args} | {r.name for op in func.ops for r in op.results}
    bodies = [op.attrs.body for op in func.ops if op.name == "fused"]
    taken |= {a.name for body in bodies for a in body.args}  # bodies left fused keep their arguments
    inner = {r.name for body in bodies for bop in body.ops for r in bop.results}
    for k, body in enumerate(bodies):
        for v in [r for bop in body.ops for r in bop.results]:
            name = v.name
            plain = re.sub(r"_[0-9]+$", "", name)
            if plain != name and plain not in taken and plain not in inner:
                name = plain
            elif name in taken:
                n = 0
                while f"{name}.{n}" in taken or f"{name}.{n}" in inner:
                    n += 1
                name = f"{name}.{n}"
            taken.add(name)
            if which is None or k in which:
                v.name = name


def _inline(func: Function, which: Optional[set] = None) -> set:
    """Replaces the fused ops of `func` (their index among its fused ops in program order is in
    `which`; None: all) by their bodies' ops. The body's results become the fused op's own result
    Values (same names, users unchanged). Returns the indices inlined."""
    out, done, k = [], set(), -1
    subst: dict[int, Value] = {}  # a fused result that was a body argument -> the operand
    for op in func.ops:
        if subst:
            op.operands = [None if v is None else subst.get(id(v), v) for v in op.operands]
        if op.name != "fused":
            out.append(op)
            continue
        k += 1
        if which is not None and k not in which:
            out.append(op)
            continue
        done.add(k)
        body = op.attrs.body
        inner = {id(a): v for a, v in zip(body.args, op.operands)}
        outer_of: dict[int, Value] = {}
        for r, outer in zip(body.results, op.results):
            if id(r) in inner or id(r) in outer_of:  # returns an argument, or one value twice
                subst[id(outer)] = inner.get(id(r), outer_of.get(id(r)))
            else:
                outer_of[id(r)] = outer
        for bop in body.ops:
            bop.operands = [None if v is None else inner.get(id(v), v) for v in bop.operands]
            res = []
            for r in bop.results:
                v = outer_of.get(id(r), r)
                v.producer = bop
                inner[id(r)] = v
                res.append(v)
            bop.results = res
            out.append(bop)
    func.ops = out
    if subst:
        func.results = [subst.get(id(v), v) for v in func.results]
    return done


def _fused_index_of_ops(func: Function) -> dict:
    """first-result name of each op inside a fused body -> index of that fused op."""
    out, k = {}, -1
    for op in func.ops:
        if op.name == "fused":
            k += 1
            for bop in op.attrs.body.ops:
                if bop.results:
                    out[bop.results[0].name] = k
    return out


# ---------------------------------------------------------------- the analysis

def _static(v: Optional[Value]) -> bool:
    return v is not None and v.type.shape is not None and v.type.is_static


def _shape(v: Value) -> tuple:
    return tuple(int(d) for d in v.type.shape)


def _inner(shape, axis: int) -> int:
    return int(math.prod(shape[axis + 1:]))


def reshape_split(in_shape, out_shape, sp: Split) -> Split:
    """Where a Split of dim sp.axis of in_shape lands in the row-major reshape to out_shape: the
    dim b holding the top of each group's block (the K factor is the outermost part of a group),
    with the block a whole number of b's units and b's extent a whole number of blocks."""
    n = in_shape[sp.axis]
    if n % sp.groups:
        raise _NoBlock(f"dim {sp.axis} of {list(in_shape)} is not {sp.groups} groups")
    block = (n // sp.groups) * _inner(in_shape, sp.axis)  # elements of one group's block
    for b in range(len(out_shape)):
        unit = _inner(out_shape, b)
        span = unit * out_shape[b]
        if unit < block <= span:
            if block % unit or span % block:
                raise _NoBlock(f"reshape {list(in_shape)} -> {list(out_shape)} cuts the split dim {sp.axis}")
            return Split(b, span // block)
    raise _NoBlock(f"reshape {list(in_shape)} -> {list(out_shape)} has no dim for the split dim {sp.axis}")


def _perm(op: Op) -> tuple:
    rank = op.results[0].type.rank
    p = op.attrs.perm
    return tuple(range(rank))[::-1] if p is None else tuple(int(x) % rank for x in p)


def _ints(a) -> list:
    return [int(x) for x in np.asarray(a).reshape(-1)]


class _Propagation:
    """One attempt: the split states from a set of column weights, op by op in program order."""

    def __init__(self, flat: Function, weights, users: dict, pos: dict, claimed: set, region_read: set):
        self.flat = flat
        self.weights = weights
        self.users = users        # id(value) -> its readers, once per operand slot (and region use)
        self.pos = pos            # id(op) -> index in flat.ops
        self.claimed = claimed    # names of the ops of blocks found before
        self.returned = {id(v) for v in flat.results}
        self.region_read = region_read  # ids of values read inside regions

    def const_of(self, v: Optional[Value]):
        return None if v is None else const_value(v, self.weights)

    def run(self, seeds: dict) -> Block:
        """seeds: id(const weight value) -> (value, Split)."""
        state: dict[int, Split] = {}
        pending: dict[int, int] = {}
        slices: dict = {}
        ops, rows, columns = [], [], []
        kind, heads = "mlp", 0

        def mark(v: Value, sp: Split):
            if id(v) in self.returned:
                raise _NoBlock(f"split value %{v.name} is a function result")
            if id(v) in self.region_read:
                raise _NoBlock(f"split value %{v.name} is read inside a region")
            if not _static(v) or not 0 <= sp.axis < v.type.rank or _shape(v)[sp.axis] % sp.groups:
                raise _NoBlock(f"split value %{v.name} {v.type} cannot be split on dim {sp.axis}")
            state[id(v)] = sp
            pending[id(v)] = len(self.users.get(id(v), ()))

        for v, sp in seeds.values():
            mark(v, sp)
        start = min((self.pos[id(u)] for v, _ in seeds.values() for u in self.users.get(id(v), ())), default=None)
        if start is None:
            raise _NoBlock("the weights are unused")
        for op in self.flat.ops[start:]:
            if not any(pending.values()):
                break
            ins = [None if v is None else state.get(id(v)) for v in op.operands]
            if all(s is None for s in ins):
                continue
            key = op.results[0].name
            if key in self.claimed:
                raise _NoBlock(f"{op.name} %{key} is in another block")
            for v in op.operands:  # users holds op once per operand slot
                if v is not None and id(v) in pending:
                    pending[id(v)] -= 1
            outs, partial = self.rule(op, ins, slices)
            ops.append(key)
            if partial:
                rows.append(key)
            elif any(isinstance(s, Split) for s in outs) and any(
                    id(v) in seeds for v in op.operands if v is not None):
                columns.append(key)
            if op.name == "Softmax":
                kind = "attention"
                sp = ins[0]
                shp = _shape(op.operands[0])
                heads = max(heads, shp[sp.axis] // sp.groups)
            for r, s in zip(op.results, outs):
                if s is not None:
                    mark(r, s)
        if any(pending.values()):
            raise _NoBlock("split values are left unused")  # cannot happen: users are all later ops
        if not rows:
            raise _NoBlock("no row GEMM closes the split (a column GEMM alone)")
        names = {id(v): v.name for v in self.flat.args}
        for op in self.flat.ops:
            for r in op.results:
                names[id(r)] = r.name
        return Block({names[i]: sp for i, sp in state.items()}, ops, columns, rows, slices, kind, heads)

    # -- rules: the result states of an op reading split values, or _NoBlock

    def _slice_operand(self, op: Op, i: int, sp: Split, slices: dict) -> None:
        """Replicated operand i is read as the device's part: a constant is sliced at compile time,
        another value by a Slice (groups 1) or Gather (groups > 1) on the device."""
        v = op.operands[i]
        if not _static(v) or _shape(v)[sp.axis] % sp.groups:
            raise _NoBlock(f"{op.name} %{op.results[0].name}: operand %{v.name} cannot be split on dim {sp.axis}")
        slices[(op.results[0].name, i)] = sp

    def _broadcast_operand(self, op: Op, i: int, out_axis: int, groups: int, out_rank: int, slices: dict):
        """A replicated operand i of an op whose result is split on out_axis: broadcast along it
        (dim absent or 1) stays, one spanning it is read as the device's part."""
        v = op.operands[i]
        j = out_axis - (out_rank - v.type.rank)
        if j < 0:
            return
        if not _static(v):
            raise _NoBlock(f"operand %{v.name} has no static shape")
        d = _shape(v)[j]
        if d == 1:
            return
        if d != _shape(op.results[0])[out_axis]:
            raise _NoBlock(f"operand %{v.name} does not broadcast onto the result")
        self._slice_operand(op, i, Split(j, groups), slices)

    def rule(self, op: Op, ins: list, slices: dict):
        """(result states, whether the result is a partial sum)."""
        name = op.name
        res = op.results
        if not all(_static(r) for r in res):
            raise _NoBlock(f"{name} %{res[0].name} has a result without a static shape")
        if op.regions():
            raise _NoBlock(f"{name} has regions")
        if name in UNARY or name in BROADCAST:
            if len(res) != 1:
                raise _NoBlock(f"{name} with {len(res)} results")
            rout = res[0].type.rank
            axes = {(s.axis + rout - v.type.rank, s.groups) for v, s in zip(op.operands, ins) if s is not None}
            if len(axes) != 1:
                raise _NoBlock(f"{name} %{res[0].name}: operands split on different dims")
            (axis, groups), = axes
            for i, (v, s) in enumerate(zip(op.operands, ins)):
                if v is None:
                    continue
                if s is not None:
                    if _shape(v)[s.axis] != _shape(res[0])[axis]:
                        raise _NoBlock(f"{name}: a split operand is broadcast")
                else:
                    self._broadcast_operand(op, i, axis, groups, rout, slices)
            return [Split(axis, groups)], False
        if name == "Concat":
            return [self._concat_rule(op, ins, slices)], False
        x = op.operands[0]
        sx = ins[0]
        if sx is None and name not in ("MatMul", "Gemm"):
            raise _NoBlock(f"{name} %{res[0].name}: only an operand past the first is split")
        if any(s is not None for s in ins[1:]) and name not in ("MatMul", "Gemm"):
            raise _NoBlock(f"{name} %{res[0].name}: a split operand past the first")
        if name in ("Softmax", "LogSoftmax"):
            if op.attrs.axis % x.type.rank == sx.axis:
                raise _NoBlock(f"{name} over the split dim")
            return [sx], False
        if name == "LayerNormalization":
            if len(res) != 1 or sx.axis >= op.attrs.axis % x.type.rank:
                raise _NoBlock("LayerNormalization over the split dim")
            return [sx], False
        if name == "Transpose":
            return [Split(_perm(op).index(sx.axis), sx.groups)], False
        if name in RESHAPES:
            return [reshape_split(_shape(x), _shape(res[0]), sx)], False
        if name == "Slice":
            return [self._slice_rule(op, sx)], False
        if name == "Split":
            return self._split_rule(op, sx), False
        if name in REDUCES:  # over other dims (a per-head RMSNorm of Q / K)
            rank = x.type.rank
            if len(op.operands) > 1 and op.operands[1] is not None:
                a = self.const_of(op.operands[1])
                if a is None:
                    raise _NoBlock(f"{name} with non-constant axes")
                axes = {int(i) % rank for i in np.asarray(a).reshape(-1)}
            else:
                axes = set() if op.attrs.noop_with_empty_axes else set(range(rank))
            if sx.axis in axes:
                raise _NoBlock(f"{name} over the split dim")
            return [Split(sx.axis if op.attrs.keepdims else sx.axis - sum(i < sx.axis for i in axes),
                          sx.groups)], False
        if name == "Expand":  # not along the split dim (the device's shape operand is rewritten)
            axis = sx.axis + res[0].type.rank - x.type.rank
            if _shape(res[0])[axis] != _shape(x)[sx.axis]:
                raise _NoBlock("Expand along the split dim")
            return [Split(axis, sx.groups)], False
        if name == "Gather":
            ax = op.attrs.axis % x.type.rank
            if ax == sx.axis:
                raise _NoBlock("Gather along the split dim")
            q = op.operands[1].type.rank
            return [Split(sx.axis if sx.axis < ax else sx.axis - 1 + q, sx.groups)], False
        if name == "MatMul":
            return self._matmul_rule(op, ins, slices)
        if name == "Gemm":
            return self._gemm_rule(op, ins, slices)
        raise _NoBlock(f"{name} %{res[0].name} is not split by these rules")

    def _concat_rule(self, op: Op, ins: list, slices: dict) -> Split:
        """Concat along another dim (RoPE's halves): the split operands alike, a replicated one
        read as the device's part."""
        rank = op.results[0].type.rank
        ax = op.attrs.axis % rank
        splits = {s for s in ins if s is not None}
        if len(splits) != 1:
            raise _NoBlock("Concat of operands split differently")
        sp, = splits
        if sp.axis == ax:
            raise _NoBlock("Concat along the split dim")
        for i, s in enumerate(ins):
            if s is None:
                self._slice_operand(op, i, sp, slices)
        return sp

    def _slice_rule(self, op: Op, sx: Split) -> Split:
        x = op.operands[0]
        args = [self.const_of(v) if v is not None else None for v in op.operands[1:]]
        if any(a is None and v is not None for a, v in zip(args, op.operands[1:])):
            raise _NoBlock("Slice with non-constant bounds")
        starts, ends = _ints(args[0]), _ints(args[1])
        rank = x.type.rank
        axes = _ints(args[2]) if len(args) > 2 and args[2] is not None else list(range(len(starts)))
        steps = _ints(args[3]) if len(args) > 3 and args[3] is not None else [1] * len(starts)
        groups = sx.groups
        for a, b, e, st in zip(axes, starts, ends, steps):
            if a % rank != sx.axis:
                continue
            n = _shape(x)[sx.axis]
            r = n // sx.groups
            b, e, st = slice(b, e, st).indices(n)
            if st != 1 or b % r or e % r or e <= b:
                raise _NoBlock(f"Slice [{b}:{e}:{st}] of the split dim does not take whole groups of {r}")
            groups = (e - b) // r
        return Split(sx.axis, groups)

    def _split_rule(self, op: Op, sx: Split) -> list:
        x = op.operands[0]
        ax = op.attrs.axis % x.type.rank
        if ax != sx.axis:
            return [sx] * len(op.results)
        r = _shape(x)[ax] // sx.groups
        out = []
        for v in op.results:
            p = _shape(v)[ax]
            if p % r or p == 0:
                raise _NoBlock(f"Split part of {p} along the split dim is not whole groups of {r}")
            out.append(Split(ax, p // r))
        return out

    def _matmul_rule(self, op: Op, ins: list, slices: dict):
        a, b = op.operands
        sa, sb = ins
        ra, rb, ro = a.type.rank, b.type.rank, op.results[0].type.rank
        if ra < 2 or rb < 2:
            raise _NoBlock("MatMul of a vector")
        if sa is not None and sa.axis == ra - 1:  # contraction: partial sums
            if sb is None:
                self._slice_operand(op, 1, Split(rb - 2, sa.groups), slices)
            elif sb != Split(rb - 2, sa.groups):
                raise _NoBlock("MatMul contracting a split dim against another split")
            return [None], True
        if sb is not None and sb.axis == rb - 2:
            raise _NoBlock("MatMul contracting a split weight with a replicated activation")
        if sa is not None and sa.axis == ra - 2:
            if sb is not None:
                raise _NoBlock("MatMul with rows and columns split")
            return [Split(ro - 2, sa.groups)], False
        if sb is not None and sb.axis == rb - 1:
            if sa is not None:
                raise _NoBlock("MatMul with a batch dim and columns split")
            return [Split(ro - 1, sb.groups)], False
        # a batch dim (the heads): both split on it alike, or the other broadcasting along it
        outs = set()
        for v, s in ((a, sa), (b, sb)):
            if s is not None:
                outs.add((s.axis + ro - v.type.rank, s.groups))
        if len(outs) != 1:
            raise _NoBlock("MatMul operands split on different batch dims")
        (axis, groups), = outs
        for i, (v, s) in enumerate(((a, sa), (b, sb))):
            if s is None:
                j = axis - (ro - v.type.rank)
                if j >= 0 and _shape(v)[j] != 1:
                    if j >= v.type.rank - 2:
                        raise _NoBlock("MatMul batch split meets a matrix dim")
                    self._slice_operand(op, i, Split(j, groups), slices)
        return [Split(axis, groups)], False

    def _gemm_rule(self, op: Op, ins: list, slices: dict):
        at = op.attrs
        sa, sb = ins[0], ins[1]
        sc = ins[2] if len(ins) > 2 else None
        a_k, a_m = (0, 1) if at.transA else (1, 0)
        b_k, b_n = (1, 0) if at.transB else (0, 1)
        c = op.operands[2] if len(op.operands) > 2 else None
        if sa is not None and sa.axis == a_k:
            if sb is None:
                self._slice_operand(op, 1, Split(b_k, sa.groups), slices)
            elif sb != Split(b_k, sa.groups):
                raise _NoBlock("Gemm contracting a split dim against another split")
            if sc is not None:
                raise _NoBlock("Gemm with a split C and a partial product")
            if c is not None and at.beta != 1.0 and self.const_of(c) is None:
                raise _NoBlock("Gemm with beta != 1 and a non-constant C")
            return [None], True
        if sb is not None and sb.axis == b_k:
            raise _NoBlock("Gemm contracting a split weight with a replicated activation")
        if sa is not None and sb is not None:
            raise _NoBlock("Gemm with rows and columns split")
        sp = Split(0, sa.groups) if sa is not None else Split(1, sb.groups)
        if sa is not None and sa.axis != a_m:
            raise _NoBlock("Gemm split on an unknown dim")
        if c is not None:
            if sc is not None:
                if sc.axis + 2 - c.type.rank != sp.axis or sc.groups != sp.groups:
                    raise _NoBlock("Gemm C split on another dim")
            else:
                self._broadcast_operand(op, 2, sp.axis, sp.groups, 2, slices)
        return [sp], False


def _candidates(flat: Function, weights) -> list:
    """(activation, [(gemm op, weight value, axis of the weight's columns)]) per activation read
    (directly or through views) by column-GEMM candidates, in program order: MatMul(x, W) /
    Gemm(x, W, C) with W a constant of rank >= 2 and x not one."""
    groups: dict[int, tuple] = {}
    order = []
    for op in flat.ops:
        if op.name not in ("MatMul", "Gemm") or len(op.operands) < 2:
            continue
        x, w = op.operands[0], op.operands[1]
        if x is None or w is None or const_value(x, weights) is not None or const_value(w, weights) is None:
            continue
        if not _static(w) or w.type.rank < 2 or (op.name == "Gemm" and op.attrs.transA):
            continue
        axis = (0 if op.attrs.transB else 1) if op.name == "Gemm" else w.type.rank - 1
        root = x  # through views: fuse-horizontal's stacked K/V reads Unsqueeze(x), Q (GQA) x itself
        while root.producer is not None and root.producer.name in RESHAPES and root.producer.operands:
            root = root.producer.operands[0]
        if id(root) not in groups:
            groups[id(root)] = (root, [])
            order.append(id(root))
        groups[id(root)][1].append((op, w, axis))
    return [groups[i] for i in order]


def _trials(members: list) -> list:
    """Seed sets to try for the column GEMMs reading one activation, most split first."""
    trials = []
    if len(members) > 1:  # all of them (Q, K, V), then all but one (another reader of x)
        trials.append({id(w): (w, Split(ax, 1)) for _, w, ax in members})
    if 2 < len(members) <= MAX_GROUP:
        for skip in range(len(members)):
            trials.append({id(w): (w, Split(ax, 1)) for i, (_, w, ax) in enumerate(members) if i != skip})
    for _, w, ax in members:
        trials += [{id(w): (w, Split(ax, g))} for g in GROUP_TRIALS]
    return trials


def find_blocks(flat: Function, weights, k: int, skipped: Optional[list] = None) -> list:
    """The blocks of `flat` (fused groups already inlined), in program order. Raises NncError when
    a block's split dims do not divide by k. skipped: gets {"op", "why"} for each column-GEMM
    candidate left replicated (why its first attempt did not close)."""
    users: dict[int, list] = {}
    for op in flat.ops:
        for v in op.operands:
            if v is not None:
                users.setdefault(id(v), []).append(op)
        for _, r in op.regions():
            for vid in used_values(r):
                users.setdefault(vid, []).append(op)
    pos = {id(op): i for i, op in enumerate(flat.ops)}
    region_read = set()
    for op in flat.ops:
        for _, r in op.regions():
            region_read |= used_values(r)
    claimed: set = set()
    blocks = []
    for x, members in _candidates(flat, weights):
        first_why = {}
        while True:  # after a block, the readers of x it did not take are tried again
            members = [m for m in members if m[0].results[0].name not in claimed]
            found = None
            for seeds in _trials(members):
                try:
                    found = _Propagation(flat, weights, users, pos, claimed, region_read).run(seeds)
                    break
                except _NoBlock as e:
                    for op, w, _ in members:
                        if id(w) in seeds:
                            first_why.setdefault(op.results[0].name, str(e))
            if found is None:
                break
            _check_divides(found, flat, k)
            claimed |= set(found.ops)
            blocks.append(found)
        if skipped is not None:
            skipped += [{"op": m[0].results[0].name, "why": first_why.get(m[0].results[0].name, "")}
                        for m in members]
    return blocks


def _check_divides(blk: Block, flat: Function, k: int) -> None:
    vals = {r.name: (r, op) for op in flat.ops for r in op.results}
    for name, sp in blk.state.items():
        if name not in vals:
            continue
        v, op = vals[name]
        if op.name == "const":  # named through the GEMM reading it (checked next)
            continue
        n = _shape(v)[sp.axis]
        r = n // sp.groups
        if r % k:
            what = "attention heads" if sp.axis != v.type.rank - 1 else "columns"
            grp = f"{sp.groups} groups of {r}" if sp.groups > 1 else f"{r}"
            user = next((c for c in blk.columns + blk.rows), "")
            raise NncError(f"tensor parallel over {k} devices: {op.name} %{name} ({op.loc}) has {list(_shape(v))}; "
                           f"its split dim {sp.axis} ({what}: {grp}) does not divide by {k} "
                           f"(block of {blk.kind} at %{user})")


# ---------------------------------------------------------------- per-device modules

def part_index(n: int, sp: Split, k: int, d: int) -> np.ndarray:
    """The indices along a split dim of extent n that device d holds: n as [groups, k, c], [:, d, :]."""
    r = n // sp.groups
    c = r // k
    return np.concatenate([np.arange(g * r + d * c, g * r + (d + 1) * c) for g in range(sp.groups)])


def shard_array(a: np.ndarray, sp: Split, k: int, d: int) -> np.ndarray:
    """Device d's part of a along sp.axis."""
    return np.ascontiguousarray(np.take(a, part_index(a.shape[sp.axis], sp, k, d), axis=sp.axis))


class _DeviceBuilder:
    def __init__(self, func: Function, weights: WeightStore, k: int, d: int):
        self.func = func
        self.weights = weights
        self.k = k
        self.d = d
        self.names = value_names(Module([func]))
        self.new_ops: dict[int, list] = {}   # id(op) -> consts to insert before it
        self.after: dict[int, list] = {}     # id(op) -> ops to insert after it
        self.memo: dict = {}

    def fresh(self, hint: str) -> str:
        name, n = hint, 0
        while name in self.names:
            n += 1
            name = f"{hint}.{n}"
        self.names.add(name)
        return name

    def const(self, before: Op, a: np.ndarray, hint: str, weight_hint: str = "") -> Value:
        key = (a.dtype.str, a.shape, a.tobytes()) if a.size <= 64 else None
        if key is not None and key in self.memo:
            return self.memo[key]
        cdef = registry.get("const").attrs
        if a.size > 8:
            wname = self.weights.fresh_name(weight_hint or hint)
            self.weights[wname] = a
            attrs = registry.make_attrs(cdef, {"weight": wname}, "const")
        else:
            attrs = registry.make_attrs(cdef, {"value": a}, "const")
        v = Value(self.fresh(hint), type_of_array(a))
        self.new_ops.setdefault(id(before), []).append(Op("const", [], [v], attrs, before.loc))
        if key is not None:
            self.memo[key] = v
        return v

    def sliced(self, before: Op, v: Value, sp: Split) -> Value:
        key = ("slice", id(v), sp)
        if key in self.memo:
            return self.memo[key]
        a = const_value(v, self.weights)
        if a is None:  # a replicated activation (a per-head mask): the device takes its part
            n = _shape(v)[sp.axis]
            c = n // sp.groups // self.k
            if sp.groups == 1:
                name, attrs = "Slice", {}
                operands = [v, self.const(before, np.array([self.d * c], np.int64), f"{v.name}.start"),
                            self.const(before, np.array([(self.d + 1) * c], np.int64), f"{v.name}.end"),
                            self.const(before, np.array([sp.axis], np.int64), f"{v.name}.axis")]
            else:
                idx = part_index(n, sp, self.k, self.d)
                name, attrs = "Gather", {"axis": sp.axis}
                operands = [v, self.const(before, idx.astype(np.int64), f"{v.name}.index")]
            out = Value(self.fresh(f"{v.name}.shard"), v.type)
            op = Op(name, operands, [out], registry.make_attrs(registry.get(name).attrs, attrs, name), before.loc)
            _retype(op, self.weights)
            self.new_ops.setdefault(id(before), []).append(op)
            self.memo[key] = out
            return out
        part = shard_array(a, sp, self.k, self.d)
        wname = v.producer.attrs.weight if v.producer.attrs.weight else v.name
        out = self.const(before, part, f"{v.name}.shard", f"{wname}.tp{self.d}of{self.k}")
        self.memo[key] = out
        return out

    def finish(self) -> None:
        ops = []
        for op in self.func.ops:
            ops += self.new_ops.get(id(op), [])
            ops.append(op)
            ops += self.after.get(id(op), [])
        self.func.ops = ops


def _retype(op: Op, weights) -> None:
    opdef = registry.get(op.name)
    types = registry.run_infer(opdef, op.attrs, op.operands, len(op.results), op.loc,
                               lambda v: const_value(v, weights))
    for r, t in zip(op.results, types):
        r.type = t


def _rewrite_device(func: Function, weights: WeightStore, blocks: list, k: int, d: int) -> None:
    """Device d's part of every block, in place."""
    b = _DeviceBuilder(func, weights, k, d)
    by_name = {}
    for op in func.ops:
        for r in op.results:
            by_name[r.name] = (r, op)
    group = tuple(range(k))
    global_shape = {n: _shape(v) for n, (v, _) in by_name.items() if _static(v)}
    for blk in blocks:
        # the column weights (seed constants): every use reads the device's columns
        seeds = {n: sp for n, sp in blk.state.items() if n in by_name and by_name[n][1].name == "const"}
        for n, sp in seeds.items():
            v, cop = by_name[n]
            a = shard_array(const_value(v, weights), sp, k, d)
            cdef = registry.get("const").attrs
            if cop.attrs.weight:
                wname = weights.fresh_name(f"{cop.attrs.weight}.tp{d}of{k}")
                weights[wname] = a
                cop.attrs = registry.make_attrs(cdef, {"weight": wname}, "const")
            else:
                cop.attrs = registry.make_attrs(cdef, {"value": a}, "const")
            v.type = type_of_array(a)
        for key in blk.ops:
            v0, op = by_name[key]
            for (okey, i), sp in blk.slices.items():
                if okey == key:
                    op.operands[i] = b.sliced(op, op.operands[i], sp)
            split_in = [blk.state.get(v.name) if v is not None else None for v in op.operands]
            sx = split_in[0]
            if op.name in RESHAPES and sx is not None:
                out = list(_shape(op.results[0]))
                sp = blk.state[op.results[0].name]
                out[sp.axis] //= k
                if op.name == "Reshape" or (op.name == "Squeeze" and len(op.operands) < 2):
                    shape_v = b.const(op, np.array(out, np.int64), f"{key}.shape")
                    if op.name != "Reshape":
                        op.name = "Reshape"
                        op.attrs = registry.make_attrs(registry.get("Reshape").attrs, {}, "Reshape")
                    op.operands = [op.operands[0], shape_v]
            elif op.name == "Split" and sx is not None and op.attrs.axis % op.operands[0].type.rank == sx.axis \
                    and len(op.operands) > 1 and op.operands[1] is not None:
                sizes = [_shape(r)[sx.axis] // k for r in op.results]
                op.operands[1] = b.const(op, np.array(sizes, np.int64), f"{key}.split")
            elif op.name == "Slice" and sx is not None:
                _rewrite_slice(b, op, sx, k)
            elif op.name == "Expand" and sx is not None:
                out = list(global_shape[op.results[0].name])
                out[blk.state[op.results[0].name].axis] //= k
                op.operands[1] = b.const(op, np.array(out, np.int64), f"{key}.shape")
            if key in blk.rows:
                _close_row(b, op, group, d, weights)
            else:
                _retype(op, weights)
                for r in op.results:  # inference agrees with the analysis: the split dim / k
                    sp = blk.state.get(r.name)
                    want = list(global_shape[r.name])
                    if sp is not None:
                        want[sp.axis] //= k
                    if list(_shape(r)) != want:
                        raise NncError(f"shard-tensor-parallel: %{r.name} is {r.type} on device {d}, "
                                       f"expected {want}")
    b.finish()


def _rewrite_slice(b: _DeviceBuilder, op: Op, sx: Split, k: int) -> None:
    x = op.operands[0]
    rank = x.type.rank
    starts = _ints(const_value(op.operands[1], b.weights))
    ends = _ints(const_value(op.operands[2], b.weights))
    axes_v = op.operands[3] if len(op.operands) > 3 else None
    axes = _ints(const_value(axes_v, b.weights)) if axes_v is not None else list(range(len(starts)))
    changed = False
    for i, a in enumerate(axes):
        if a % rank != sx.axis:
            continue
        full = _shape(x)[sx.axis] * k  # x (an earlier op of the block) is already the device's
        s, e, _ = slice(starts[i], ends[i], 1).indices(full)
        starts[i], ends[i] = s // k, e // k
        changed = True
    if changed:
        op.operands[1] = b.const(op, np.array(starts, np.int64), f"{op.results[0].name}.starts")
        op.operands[2] = b.const(op, np.array(ends, np.int64), f"{op.results[0].name}.ends")


def _close_row(b: _DeviceBuilder, op: Op, group: tuple, d: int, weights) -> None:
    """The row GEMM gives a partial sum: AllReduce it; a Gemm's C is added after the sum."""
    res = op.results[0]
    final_name = res.name
    c = None
    if op.name == "Gemm" and len(op.operands) > 2 and op.operands[2] is not None:
        c = op.operands[2]
        beta = op.attrs.beta
        op.operands = op.operands[:2]
        op.attrs = registry.make_attrs(registry.get("Gemm").attrs,
                                       {"alpha": op.attrs.alpha, "transA": op.attrs.transA,
                                        "transB": op.attrs.transB}, "Gemm")
        if beta != 1.0:
            c = b.const(op, (const_value(c, weights) * np.asarray(beta, dtype=c.type.dtype.np)).astype(
                c.type.dtype.np), f"{c.name}.beta")
    _retype(op, weights)
    partial = Value(b.fresh(f"{final_name}.partial"), res.type)
    # the GEMM writes the partial value; the original Value (name, users) becomes the sum's
    op.results = [partial]
    partial.producer = op
    ar_attrs = registry.make_attrs(registry.get("AllReduce").attrs, {"device": d, "group": list(group), "op": "sum"},
                                   "AllReduce")
    if c is None:
        ar = Op("AllReduce", [partial], [res], ar_attrs, op.loc)
        b.after[id(op)] = [ar]
        res.producer = ar
        return
    summed = Value(b.fresh(f"{final_name}.reduced"), res.type)
    ar = Op("AllReduce", [partial], [summed], ar_attrs, op.loc)
    add_attrs = registry.make_attrs(registry.get("Add").attrs, {}, "Add")
    view = _only_view_user(b.func, res, c)
    if view is None:
        add = Op("Add", [summed, c], [res], add_attrs, op.loc)
        b.after[id(op)] = [ar, add]
        res.producer = add
    else:  # Gemm -> Reshape (GPT-2's addmm): the bias after the view, next to the residual Add
        b.after[id(op)] = [ar]
        out = view.results[0]
        viewed = Value(b.fresh(f"{out.name}.reduced"), out.type)
        view.operands = [summed] + view.operands[1:]
        view.results = [viewed]
        viewed.producer = view
        add = Op("Add", [viewed, c], [out], add_attrs, view.loc)
        out.producer = add
        b.after.setdefault(id(view), []).append(add)
    _retype(add, weights)


def _only_view_user(func: Function, v: Value, bias: Value) -> Optional[Op]:
    """The one reader of v when it is a view op keeping the last dim, v is no function result and
    the bias broadcasts along that last dim only ([N], [1, N] or a scalar), so the bias Add may
    follow the view; else None."""
    if any(r is v for r in func.results) or not _static(bias) or math.prod(_shape(bias)[:-1]) != 1:
        return None
    readers = [op for op in func.ops if any(x is v for x in op.operands)]
    if len(readers) != 1 or readers[0].name not in RESHAPES or readers[0].operands[0] is not v \
            or readers[0].operands.count(v) != 1 or len(readers[0].results) != 1:
        return None
    out = readers[0].results[0]
    n = _shape(v)[-1]
    if not _static(out) or _shape(out)[-1] != n or (bias.type.rank and _shape(bias)[-1] not in (1, n)):
        return None
    return readers[0]


def _fusion_passes() -> list:
    """The default pipeline's fusion passes in its order, then dce (the unsliced weights) and, as
    there, schedule-memory last."""
    from nnc.pipeline import DEFAULT_PIPELINE, FUSION_PASSES
    return [p for p in DEFAULT_PIPELINE if p in FUSION_PASSES] + ["dce", "schedule-memory"]


def shard_tensor_parallel(module: Module, k: int, refuse: bool = True) -> TensorParallelProgram:
    """The k-device program of `module` (not changed): blocks split, the rest replicated.
    refuse: run the default pipeline's fusion passes again on each device's Module when fused
    groups were inlined (the per-shard kernels)."""
    from nnc.pipeline import Pipeline
    from nnc.ir.verify import verify
    if not isinstance(k, int) or k < 1:
        raise NncError(f"tensor parallel needs a device count >= 1, got {k!r}")
    def replicated(n):
        return TensorParallelProgram([Module(copy.deepcopy(module.functions), WeightStore(
            dict((module.weights or WeightStore()).arrays)), module.loc_file) for _ in range(n)], [])
    if k == 1:  # one device: nothing to split (an AllReduce over one device would be a copy)
        return replicated(1)
    base = module.main
    named = copy.deepcopy(base)
    _name_body_values(named)
    in_fused = _fused_index_of_ops(named)
    flat = named
    _inline(flat)
    weights = module.weights if module.weights is not None else WeightStore()
    skipped: list = []
    blocks = find_blocks(flat, weights, k, skipped)
    if not blocks:
        prog = replicated(k)
        prog.not_split = skipped
        return prog
    flat_values = {r.name: r for op in flat.ops for r in op.results}
    touched = {in_fused[n] for blk in blocks for n in blk.ops + list(blk.state) if n in in_fused}
    others = [f for f in module.functions if f is not module.main]
    devices = []
    for d in range(k):
        func = copy.deepcopy(base)
        _name_body_values(func, touched)
        inlined = _inline(func, touched)
        dev_weights = WeightStore(dict(weights.arrays))
        _rewrite_device(func, dev_weights, blocks, k, d)
        m = Module([func] + copy.deepcopy(others), dev_weights, module.loc_file)
        if refuse and inlined:
            Pipeline(_fusion_passes()).run(m)
        else:
            from nnc.passes import dce
            dce.run(m)
        verify(m)
        devices.append(m)
    infos = [blk.info(k, flat_values) for blk in blocks]
    # each row GEMM added one AllReduce, in program order: name what it reads and gives
    reduces = iter([op for op in devices[0].main.ops if op.name == "AllReduce"])
    for info in infos:
        for row in info["rows"]:
            ar = next(reduces)
            row["allreduce"] = {"operand": ar.operands[0].name, "result": ar.results[0].name}
    return TensorParallelProgram(devices, infos, skipped)


def tp_allreduce_bytes(layers: int, batch: int, seq: int, hidden: int, dtype_bytes: int = 2,
                       allreduces_per_layer: int = 2) -> int:
    """Bytes all-reduced per forward by Megatron tensor parallelism: each layer all-reduces the
    [batch, seq, hidden] output of its attention projection and of its FFN down GEMM (the
    message size; independent of the device count)."""
    return layers * allreduces_per_layer * batch * seq * hidden * dtype_bytes


def ring_allreduce_seconds(message_bytes: int, k: int, bus_bytes_per_s: float) -> float:
    """Link-bound time of one all-reduce of `message_bytes` over k devices, from the bus bandwidth
    as nccl-tests reports it (busbw = algbw * 2 (k - 1) / k, so t = bytes * 2 (k - 1) / k / busbw)."""
    if k <= 1:
        return 0.0
    return message_bytes * 2 * (k - 1) / k / bus_bytes_per_s
