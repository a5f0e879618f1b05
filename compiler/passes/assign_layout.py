"""Layout assignment: activations between convolutions stay NHWC.

Rewrites (top-level ops of each function, one sweep in program order, linear time):
- an eligible Conv -> Conv {layout = "NHWC"} reading the NHWC form of its input, with its weight
  pre-transformed at compile time to OHWI [K, R, S, C/group] (a new const; shared weights are
  transformed once; a weight computed from constants only gets a Transpose, which the CUDA backend
  runs once in its init phase). Eligible: 2-D (rank-4 static input), f16/bf16, groups 1,
  depthwise (C/group == 1) or C/group a multiple of 8 (16-byte igemm loads); a 1x1 stride-1 unpadded
  conv only when its input already has an NHWC form (on NCHW it is one GEMM with no layout kernel). fp32 convs stay NCHW:
  without tf32 the CUDA backend runs them as im2col + FFMA GEMM on NCHW, which has no NHWC form;
- MaxPool (no Indices) / AveragePool / LRN whose input already has an NHWC form -> {layout = "NHWC"}
  (LRN's window then runs over the last axis: AlexNet/ZFNet/GoogLeNet's conv -> LRN -> pool stems);
- GlobalAveragePool / GlobalMaxPool of an NHWC form -> ReduceMean / ReduceMax over axes [1, 2]
  (keepdims) on it;
- an elementwise op (the CUDA elementwise family's table, numpy broadcasting) with an operand that
  has an NHWC form, the others being 4-D with NHWC forms, constants (permuted at compile time, e.g.
  a per-channel [1,C,1,1] -> [1,1,1,C]), all-ones shapes, or NCHW activations of the result's shape
  (given an edge transpose: one in, instead of one back out) -> the same op on the NHWC forms;
- an inference BatchNormalization (constant parameters) of an NHWC form -> Mul and Add by
  per-channel [1,1,1,C] constants computed at compile time (the elementwise fusion takes them);
- ShuffleNet's channel shuffle (Reshape [N,g,C/g,H,W] -> Transpose [0,2,1,3,4] -> Reshape [N,C,H,W],
  each intermediate read once) of an NHWC form -> the same three ops on it ([N,H,W,g,C/g], perm
  [0,1,2,4,3]): one strided copy either way;
- a spatial Resize (constant scales/sizes) of an NHWC form whose result feeds a Conv, Concat, Resize
  or pool -> Resize of it with scales/sizes permuted (resizing is separable per axis);
- Slice (constant starts/ends/axes/steps) of an NHWC form -> Slice of it on the physical axes;
- Concat of 4-D values one of which has an NHWC form -> Concat of the NHWC forms along the axis's
  physical position (the channel axis 1 -> 3); it costs a launch where the NCHW one was zero-copy
  (batch 1: every input written in its slot), which the launch balance below counts;
- a Transpose of a value with an NHWC form -> one Transpose of that form with the composed
  permutation (nothing when it is the identity): transposes cancel.
The rewrite is kept for a function only where it adds no launches: the transposes it leaves must not
outnumber the launches it saves (the NCHW igemm path's layout kernel of every conv but pointwise and
depthwise ones, and cancelled transposes); otherwise the function is restored as it was (densenet's
channel Concats, shufflenet's channel shuffles keep NCHW: on NCHW at batch 1 a channel Concat is
zero-copy, on NHWC it is a copy).
Every rewritten op's original NCHW result is re-defined right after it as Transpose(NHWC form,
[0,3,1,2]) (a Reshape when only extent-1 dims move, e.g. [1,1,1,C] -> [1,C,1,1], which is a view), so
every other user and the function results see the same value under the same name; the ones
nobody reads any more are removed at the end, as are the original weights the rewritten convs no
longer read. An NHWC form of a value that has none is a Transpose(x, [0,2,3,1]) placed before its first NHWC
user (and shared by the later ones): what is left are transposes at the
model's edges (after the input, before Flatten/the classifier).

Every NHWC form (a rewritten op's result, an edge Transpose's, a re-laid per-channel constant) has
the layout tag `#nhwc` in its type (ir/layout.py: the shape is the physical [N,H,W,C], the tensor it
stands for the NCHW one): `nnc verify --per-layer` maps an ONNX node's tensor to its op's result and
transposes a tagged value back before comparing it (its shape may equal the NCHW one: [N,C,C,C]),
and the verifier refuses a tagged value reaching an op that reads NCHW implicitly. A user Transpose
that composes with an NHWC form to the identity becomes a Reshape of it to the same shape (a view):
the user's tensor is untagged, the NHWC form is not.

Must hold: a verified module; run after fold-batchnorm (BN folded into the NCHW weights first) and
after the precision passes (eligibility reads the dtype), before fuse-epilogue (the NHWC conv's
bias/residual/activation then fuse into its NHWC epilogue; bias is per channel = per column).
How Conv and pools read their operands stays an op attribute (ir/ops/conv.py, ir/ops/pool.py: the
OHWI weight is not a tagged activation), with exact reference semantics; the values carry NHWC
shapes and the `#nhwc` tag.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from nnc.codegen.init_phase import input_independent
from nnc.codegen.kernels.elementwise import EXPR
from nnc.codegen.kernels.movement import contiguous_slice
from nnc.codegen.lower import DYNAMIC_OPS
from nnc.ir.builder import Builder, const_value
from nnc.ir.graph import Module, NameGen, Op, Region, Value, users, value_names
from nnc.ir.layout import NHWC, tag
from nnc.ir.ops.conv import TO_NCHW, TO_NHWC
from nnc.ir.rewrite import Substitution, used_values

FLOATS = ("f16", "bf16")
POOLS = ("MaxPool", "AveragePool", "LRN")  # ops with a layout attribute (LRN: its channel window)
GLOBAL_POOLS = {"GlobalAveragePool": "ReduceMean", "GlobalMaxPool": "ReduceMax"}
NHWC_USERS = ("Conv", "Concat", "Resize", "MaxPool", "AveragePool")  # a Resize feeding these goes NHWC
IGEMM_VEC_ELEMS = 8  # 16-byte loads of f16/bf16: a grouped conv's C/group must be a multiple


def _static4(v: Optional[Value]) -> bool:
    return v is not None and v.type.is_static and v.type.rank == 4 and v.type.layout is None


def _only_unit_moves(shape, perm) -> bool:
    """Transposing `shape` by `perm` keeps the order of its non-unit dims: a Reshape does it."""
    moved = [p for p in perm if shape[p] != 1]
    return moved == sorted(moved)


class _Assign:
    def __init__(self, module: Module, func):
        self.module, self.func = module, func
        self.names = NameGen(value_names(module))
        self.nhwc: dict[int, Value] = {}      # id(NCHW value) -> its NHWC form
        self.ohwi: dict[int, Value] = {}      # id(OIHW weight) -> its OHWI const
        self.created: set[int] = set()        # ids of ops this pass added (removed again if unused)
        self.orphans: list[Value] = []        # weights of rewritten convs (removed if unused)
        self.changed = False
        self.recorded: list[Value] = []  # values tagged #nhwc (untagged again on restore)
        self.uses = users(func)  # of the ops as they were (Resize, channel shuffles look at users)
        self.absorbed: set[int] = set()  # ids of ops a pattern rewrite replaced with its first op
        self.init = input_independent(func, DYNAMIC_OPS)  # ids of values computed from constants only
        self.saved = 0  # launches the rewrite saves: NCHW convs' layout kernels, cancelled transposes
        self.extra = 0  # launches it adds besides its transposes: NHWC channel Concats' copies
        self.subst = Substitution()  # cancelled transposes: their result -> the value they restore
        # values a function result or a nested region reads stay defined by an op of their own
        self.keep_defined = {id(v) for v in func.results}
        for op in func.ops:
            for _, sub in op.regions():
                self.keep_defined |= used_values(sub)

    # ------------------------------------------------------------ helpers
    def _const(self, v):
        return None if v is None else const_value(v, self.module.weights)

    def _emit(self, b: Builder, name, operands, attrs, loc, hint) -> Value:
        r = b.create(name, operands, attrs, names=[hint], loc=loc)[0]
        self.created.add(id(b.region.ops[-1]))
        return r

    def _relayout(self, b: Builder, x: Value, perm, loc, hint) -> Value:
        """x transposed by perm: a Reshape (a view) when only extent-1 dims move."""
        shape = tuple(x.type.shape)
        if tuple(perm) == tuple(range(len(perm))):
            return x
        if _only_unit_moves(shape, perm):
            sh = b.constant(np.array([shape[p] for p in perm], np.int64), hint + "_shape", loc)
            self.created.add(id(b.region.ops[-1]))
            return self._emit(b, "Reshape", [x, sh], {}, loc, hint)
        return self._emit(b, "Transpose", [x], {"perm": list(perm)}, loc, hint)

    def _tag(self, v: Value) -> Value:
        self.recorded.append(tag(v, NHWC))
        return v

    def _define_as(self, b: Builder, y: Value, src: Value, perm, loc):
        """Re-defines the original value y as src transposed by perm (y keeps name and users)."""
        r = self._relayout(b, src, perm, loc, y.name + "_nchw")
        if r is src and y.type.layout == src.type.layout:  # the transposes cancel: later ops read
            if id(y) not in self.keep_defined:                 # src (a function result needs an op)
                self.subst[y] = src
                return
            r = self._emit(b, "Identity", [src], {}, loc, y.name + "_nchw")
        elif r is src:  # same bytes, but y is the user's (untagged) tensor: a view of src
            sh = b.constant(np.array(y.type.shape, np.int64), y.name + "_shape", loc)
            self.created.add(id(b.region.ops[-1]))
            r = self._emit(b, "Reshape", [src, sh], {}, loc, y.name + "_nchw")
        op = b.region.ops[-1]
        assert r.type == y.type, (r.type, y.type)
        op.results = [y]
        y.producer = op

    def nhwc_of(self, x: Value, b: Builder, loc) -> Value:
        """x's NHWC form (a new edge Transpose when x has none yet)."""
        got = self.nhwc.get(id(x))
        if got is None:
            got = self._tag(self._relayout(b, x, TO_NHWC, loc, x.name + "_nhwc"))
            self.nhwc[id(x)] = got
        return got

    def _has(self, v) -> bool:
        return v is not None and id(v) in self.nhwc

    # ------------------------------------------------------------ eligibility
    def _conv_ok(self, op: Op) -> bool:
        if len(op.results) != 1 or len(op.operands) < 2:
            return False
        x, w, y = op.operands[0], op.operands[1], op.results[0]
        if not (_static4(x) and _static4(y) and _static4(w)) or x.type.dtype.short not in FLOATS:
            return False
        ins = [v for v in op.operands if v is not None]
        if len({v.type.dtype for v in ins} | {y.type.dtype}) != 1 or \
                (self._const(w) is None and id(w) not in self.init):
            return False
        if getattr(op.attrs, "layout", "NCHW") != "NCHW":
            return False
        g = int(op.attrs.group or 1)
        cg = w.type.shape[1]
        if not (g == 1 or cg == 1 or cg % IGEMM_VEC_ELEMS == 0):
            return False
        # a pointwise conv on an NCHW-only input is already one GEMM on NCHW: moving it alone would
        # only add transposes; every other conv reads NHWC on the GPU anyway (a layout kernel)
        pointwise = tuple(w.type.shape[2:]) == (1, 1) and tuple(op.attrs.strides or (1, 1)) == (1, 1) \
            and not any(op.attrs.pads or ()) and op.attrs.auto_pad in ("NOTSET", "VALID")
        return self._has(x) or not pointwise

    def _elementwise_ok(self, op: Op) -> bool:
        if op.name not in EXPR or len(op.results) != 1 or op.regions() or not _static4(op.results[0]):
            return False
        some = False
        for v in op.operands:
            if v is None:
                continue
            if self._has(v) and v.type.rank == 4:  # e.g. x * SE-gate: [1,C,H,W] * [1,C,1,1]
                some = True
            elif not (v.type.is_static and v.type.rank is not None and v.type.rank <= 4):
                return False
            elif self._const(v) is None and any(d != 1 for d in v.type.shape) and \
                    tuple(v.type.shape) != tuple(op.results[0].type.shape):
                return False
        return some

    # ------------------------------------------------------------ rewrites
    def region(self, r: Region) -> None:
        new_ops: list = []
        b = Builder(Region([], new_ops, []), self.module.weights, self.names)
        for op in r.ops:
            if id(op) in self.absorbed:  # the rest of a channel shuffle rewritten at its first op
                continue
            self.subst.apply(op)
            done = False
            shuffle = self._shuffle_of(op) if op.name == "Reshape" else None
            if shuffle is not None:
                self._shuffle(op, shuffle, b)
                done = True
            elif op.name == "Conv" and self._conv_ok(op):
                self._conv(op, b)
                done = True
            elif op.name in POOLS and len(op.results) == 1 and _static4(op.operands[0]) \
                    and self._has(op.operands[0]) and getattr(op.attrs, "layout", "NCHW") == "NCHW":
                x = self.nhwc[id(op.operands[0])]
                yn = self._emit(b, op.name, [x], dataclasses.replace(op.attrs, layout="NHWC"), op.loc,
                                op.results[0].name + "_nhwc")
                self._finish(op, yn, b)
                done = True
            elif op.name in GLOBAL_POOLS and _static4(op.operands[0]) and self._has(op.operands[0]):
                x = self.nhwc[id(op.operands[0])]
                axes = b.constant(np.array([1, 2], np.int64), op.results[0].name + "_axes", op.loc)
                self.created.add(id(new_ops[-1]))
                yn = self._emit(b, GLOBAL_POOLS[op.name], [x, axes], {"keepdims": 1}, op.loc,
                                op.results[0].name + "_nhwc")
                self._finish(op, yn, b)
                done = True
            elif op.name == "Transpose" and self._has(op.operands[0]) and op.attrs.perm:
                # x = T(xn, TO_NCHW), so T(x, p) = T(xn, q) with q[i] = TO_NCHW[p[i]]
                xn = self.nhwc[id(op.operands[0])]
                q = [TO_NCHW[p] for p in op.attrs.perm]
                self.saved += not _only_unit_moves(tuple(op.operands[0].type.shape), op.attrs.perm)
                self._define_as(b, op.results[0], xn, q, op.loc)
                self.changed = True
                done = True
            elif op.name in _REWRITES and _REWRITES[op.name][0](self, op):
                _REWRITES[op.name][1](self, op, b)
                done = True
            elif self._elementwise_ok(op):
                self._elementwise(op, b)
                done = True
            if not done:
                new_ops.append(op)
        r.ops = new_ops
        self.subst.apply_results(r)

    def _finish(self, op: Op, yn: Value, b: Builder):
        y = op.results[0]
        self.nhwc[id(y)] = yn
        # yn stands for the node's result y (same loc, same op name but pools' globals): tagged, so
        # that `nnc verify --per-layer`, which maps a node's tensor to its op's result, transposes it back
        self._tag(yn)
        self._define_as(b, y, yn, TO_NCHW, op.loc)
        self.changed = True

    def _conv(self, op: Op, b: Builder):
        x, w = op.operands[0], op.operands[1]
        # on NCHW, convs other than pointwise and depthwise transpose their input first (a launch)
        pointwise = tuple(w.type.shape[2:]) == (1, 1) and tuple(op.attrs.strides or (1, 1)) == (1, 1) \
            and not any(op.attrs.pads or ()) and op.attrs.auto_pad in ("NOTSET", "VALID")
        self.saved += not pointwise and w.type.shape[1] != 1
        xn = self.nhwc_of(x, b, op.loc)
        wn = self.ohwi.get(id(w))
        if wn is None and self._const(w) is None:
            # computed from constants only (light_resnet50's ConstantOfShape weights): a Transpose
            # of it is too, so the CUDA backend runs it once, in the init phase
            wn = self._emit(b, "Transpose", [w], {"perm": list(TO_NHWC)}, op.loc, w.name + "_ohwi")
            self.created.discard(id(b.region.ops[-1]))  # no launch per run: not an added transpose
            self.ohwi[id(w)] = wn
        elif wn is None:
            a = np.ascontiguousarray(np.transpose(self._const(w), TO_NHWC))
            wn = b.constant(a, w.name + "_ohwi", w.producer.loc if w.producer else op.loc,
                            weight_hint=w.name + "_ohwi")
            self.ohwi[id(w)] = wn
            self.orphans.append(w)
        yn = self._emit(b, "Conv", [xn, wn] + list(op.operands[2:]), dataclasses.replace(op.attrs, layout="NHWC"),
                        op.loc, op.results[0].name + "_nhwc")
        self._finish(op, yn, b)

    def _bn_ok(self, op: Op) -> bool:
        return len(op.results) == 1 and not op.attrs.training_mode and _static4(op.operands[0]) and \
            self._has(op.operands[0]) and all(self._const(v) is not None for v in op.operands[1:5])

    def _bn(self, op: Op, b: Builder):
        """Inference BatchNormalization of an NHWC form (one not folded into a conv: DenseNet's
        BN -> ReLU -> conv after each Concat) -> Mul by scale/sqrt(var+eps) and Add of
        bias - mean*that, per-channel [1,1,1,C] constants computed at compile time in f64 (the
        elementwise fusion then takes them with the ReLU after: one launch, not two)."""
        y = op.results[0]
        scale, bias, mean, var = (np.asarray(self._const(v), np.float64) for v in op.operands[1:5])
        mul = scale / np.sqrt(var + float(op.attrs.epsilon))
        add = bias - mean * mul
        dt = y.type.dtype.np
        ins = []
        for a, hint in ((mul, "_scale"), (add, "_shift")):
            c = b.constant(np.ascontiguousarray(a.reshape(1, 1, 1, -1).astype(dt)), y.name + hint, op.loc,
                           weight_hint=y.name + hint)
            self.created.add(id(b.region.ops[-1]))
            ins.append(self._tag(c))
        xn = self.nhwc[id(op.operands[0])]
        m = self._tag(self._emit(b, "Mul", [xn, ins[0]], {}, op.loc, y.name + "_mul_nhwc"))
        yn = self._emit(b, "Add", [m, ins[1]], {}, op.loc, y.name + "_nhwc")
        self._finish(op, yn, b)

    def _only_user(self, v: Value) -> Optional[Op]:
        us = self.uses.get(id(v), ())
        return us[0] if len(us) == 1 and id(v) not in self.keep_defined else None

    def _shuffle_of(self, op: Op):
        """ShuffleNet's channel shuffle Reshape [N,C,H,W] -> [N,g,C/g,H,W], Transpose [0,2,1,3,4],
        Reshape -> [N,C,H,W] of a value with an NHWC form: (g, the Transpose, the last Reshape)."""
        x, r1 = op.operands[0], op.results[0]
        if not (_static4(x) and self._has(x) and r1.type.is_static and r1.type.rank == 5):
            return None
        N, C, H, W = x.type.shape
        n, g, cg, h, w = r1.type.shape
        if (n, h, w) != (N, H, W) or g * cg != C or g == 1 or cg == 1:
            return None
        t = self._only_user(r1)
        if t is None or t.name != "Transpose" or tuple(t.attrs.perm or ()) != (0, 2, 1, 3, 4):
            return None
        r2 = self._only_user(t.results[0])
        if r2 is None or r2.name != "Reshape" or r2.operands[0] is not t.results[0] or \
                tuple(r2.results[0].type.shape or ()) != (N, C, H, W):
            return None
        return g, t, r2

    def _shuffle(self, op: Op, shuffle, b: Builder):
        """The shuffle on the NHWC form: Reshape [N,H,W,g,C/g], Transpose [0,1,2,4,3], Reshape
        [N,H,W,C] (one strided copy, as on NCHW); the NCHW chain's other two ops are dropped."""
        g, t, r2 = shuffle
        x, y = op.operands[0], r2.results[0]
        N, C, H, W = x.type.shape
        loc = op.loc
        s5 = b.constant(np.array([N, H, W, g, C // g], np.int64), y.name + "_groups_shape", loc)
        self.created.add(id(b.region.ops[-1]))
        v5 = self._emit(b, "Reshape", [self.nhwc[id(x)], s5], {}, loc, y.name + "_groups_nhwc")
        t5 = self._emit(b, "Transpose", [v5], {"perm": [0, 1, 2, 4, 3]}, t.loc, y.name + "_shuffled_nhwc")
        self.created.discard(id(b.region.ops[-1]))  # the shuffle's own copy, not an added transpose
        s4 = b.constant(np.array([N, H, W, C], np.int64), y.name + "_shape_nhwc", loc)
        self.created.add(id(b.region.ops[-1]))
        yn = self._emit(b, "Reshape", [t5, s4], {}, r2.loc, y.name + "_nhwc")
        self.absorbed |= {id(t), id(r2)}
        self._finish(r2, yn, b)

    def _resize_ok(self, op: Op) -> bool:
        """Spatial-only Resize of an NHWC form whose result feeds an op that runs NHWC (else the
        transpose back is cheaper before it, on the smaller tensor: FCN's final upsampling)."""
        x, a = op.operands[0], op.attrs
        if len(op.results) != 1 or not (_static4(x) and _static4(op.results[0]) and self._has(x)):
            return False
        y = op.results[0]
        if a.axes or a.coordinate_transformation_mode == "tf_crop_and_resize" or \
                a.keep_aspect_ratio_policy != "stretch" or tuple(y.type.shape[:2]) != tuple(x.type.shape[:2]):
            return False
        if any(v is not None and self._const(v) is None for v in op.operands[1:]):
            return False
        return any(u.name in NHWC_USERS for u in self.uses.get(id(y), ()))

    def _resize(self, op: Op, b: Builder):
        """Resize is separable per axis: on the NHWC form with its scales / sizes permuted."""
        y = op.results[0]
        ins = [self.nhwc[id(op.operands[0])]]
        for i, v in enumerate(op.operands[1:], 1):
            a = None if v is None else np.asarray(self._const(v))
            if i == 1 or a is None or a.size == 0:  # roi: read by tf_crop_and_resize only
                ins.append(v)
                continue
            c = b.constant(np.ascontiguousarray(a.reshape(-1)[list(TO_NHWC)]), y.name + ("_scales", "_sizes")[i - 2]
                           + "_nhwc", op.loc)
            self.created.add(id(b.region.ops[-1]))
            ins.append(c)
        yn = self._emit(b, "Resize", ins, op.attrs, op.loc, y.name + "_nhwc")
        self._finish(op, yn, b)

    def _slice_ok(self, op: Op) -> bool:
        x = op.operands[0]
        return len(op.results) == 1 and _static4(x) and _static4(op.results[0]) and self._has(x) and \
            all(v is None or self._const(v) is not None for v in op.operands[1:])

    def _slice(self, op: Op, b: Builder):
        """Slice of an NHWC form with its axes moved to their physical positions (starts, ends and
        steps keep their order). Launches: none where the slice is one contiguous run (a view: a
        channel range at batch 1 on NCHW, a row range on NHWC), else one copy; the balance counts."""
        x, y = op.operands[0], op.results[0]
        ops = list(op.operands) + [None] * (5 - len(op.operands))
        starts = np.asarray(self._const(ops[1])).reshape(-1)
        axes = np.arange(len(starts)) if ops[3] is None else np.asarray(self._const(ops[3])).reshape(-1)
        steps = np.ones(len(starts), np.int64) if ops[4] is None else np.asarray(self._const(ops[4])).reshape(-1)
        step4 = [1] * 4
        for a, k in zip(axes, steps):
            step4[int(a) % 4] = int(k)
        nchw = 0 if contiguous_slice(tuple(x.type.shape), tuple(y.type.shape), step4) else 1
        ph = [step4[p] for p in TO_NHWC]
        nhwc = 0 if contiguous_slice(tuple(x.type.shape[p] for p in TO_NHWC),
                                     tuple(y.type.shape[p] for p in TO_NHWC), ph) else 1
        self._balance(nchw, nhwc)
        phys = b.constant(np.array([TO_NHWC.index(int(a) % 4) for a in axes], np.int64), y.name + "_axes_nhwc",
                          op.loc)
        self.created.add(id(b.region.ops[-1]))
        yn = self._emit(b, "Slice", [self.nhwc[id(x)], ops[1], ops[2], phys, ops[4]], {}, op.loc, y.name + "_nhwc")
        self._finish(op, yn, b)

    def _balance(self, nchw: int, nhwc: int) -> None:
        """Counts the launches an op takes on NCHW vs on NHWC: saved, or extra (added)."""
        self.saved += max(0, nchw - nhwc)
        self.extra += max(0, nhwc - nchw)

    def _concat_ok(self, op: Op) -> bool:
        ins = op.operands
        return len(op.results) == 1 and _static4(op.results[0]) and bool(ins) and \
            all(_static4(v) for v in ins) and any(self._has(v) for v in ins)

    def _concat(self, op: Op, b: Builder):
        """Concat on the NHWC forms along the axis's physical position (channels: the last). Its
        launches: NCHW, none where the axis has only extent-1 dims before it (batch-1 channel
        Concats: every input written in its slot, codegen/memory.py concat_slots), else a copy
        per input; NHWC, one (codegen/kernels/movement.py's concat kernel) unless the same holds."""
        y = op.results[0]
        axis = int(op.attrs.axis) % 4
        phys = TO_NHWC.index(axis)
        shape = tuple(y.type.shape)
        nchw = 0 if int(np.prod(shape[:axis])) == 1 else len(op.operands)
        nhwc = 0 if int(np.prod([shape[p] for p in TO_NHWC][:phys])) == 1 else 1
        self._balance(nchw, nhwc)
        ins = [self.nhwc_of(v, b, op.loc) for v in op.operands]
        yn = self._emit(b, "Concat", ins, {"axis": phys}, op.loc, y.name + "_nhwc")
        self._finish(op, yn, b)

    def _elementwise(self, op: Op, b: Builder):
        ins = []
        for v in op.operands:
            if v is None:
                ins.append(None)
            elif self._has(v) and v.type.rank == 4:
                ins.append(self.nhwc[id(v)])
            elif all(d == 1 for d in v.type.shape):
                ins.append(v)
            elif self._const(v) is None:  # an NCHW activation of the result's shape (a residual
                # input): transposed once, instead of transposing this op's result back
                ins.append(self.nhwc_of(v, b, op.loc))
            else:  # a constant broadcasting onto the NCHW result: permuted at compile time
                a = np.asarray(self._const(v))
                a4 = a.reshape((1,) * (4 - a.ndim) + a.shape)
                c = b.constant(np.ascontiguousarray(np.transpose(a4, TO_NHWC)), v.name + "_nhwc", op.loc,
                               weight_hint=v.name + "_nhwc")
                self.created.add(id(b.region.ops[-1]))
                ins.append(self._tag(c))
        yn = self._emit(b, op.name, ins, op.attrs, op.loc, op.results[0].name + "_nhwc")
        self._finish(op, yn, b)

    # ------------------------------------------------------------ cleanup
    def added(self) -> int:
        """Launches the rewrite adds: its transposes left after the sweep (its Reshapes are views)."""
        return self.extra + sum(1 for op in self.func.ops if op.name == "Transpose" and id(op) in self.created)

    def sweep(self) -> None:
        """Drops what this pass added that nobody reads."""
        f = self.func
        uses = users(f)
        returned = {id(v) for v in f.results}
        count = {k: len(v) for k, v in uses.items()}
        orphan_ops = {id(w.producer) for w in self.orphans if w.producer is not None}
        keep = []
        for op in reversed(f.ops):
            cand = id(op) in self.created or id(op) in orphan_ops
            if cand and all(count.get(id(r), 0) == 0 and id(r) not in returned for r in op.results):
                for v in op.operands:
                    if v is not None:
                        count[id(v)] = count.get(id(v), 0) - 1
                continue
            keep.append(op)
        keep.reverse()
        f.ops = keep

    def drop_orphan_weights(self) -> None:
        ws = self.module.weights
        if ws is not None:
            named = {op.attrs.weight for g in self.module.functions for op in g.walk()
                     if op.name == "const" and op.attrs.weight}
            for w in self.orphans:
                p = w.producer
                nm = getattr(p.attrs, "weight", None) if p is not None else None
                if nm and nm not in named and nm in ws:
                    del ws.arrays[nm]


# op name -> (applies, rewrite) of the _Assign methods for the ops rewritten by one method each
_REWRITES = {"BatchNormalization": (_Assign._bn_ok, _Assign._bn), "Resize": (_Assign._resize_ok, _Assign._resize),
             "Slice": (_Assign._slice_ok, _Assign._slice), "Concat": (_Assign._concat_ok, _Assign._concat)}


def run(module: Module) -> bool:
    changed = False
    for f in module.functions:
        # kept only where it does not add launches (transposes added <= launches saved): densenet's
        # channel Concats and shufflenet's channel shuffles want NCHW and would pay transposes
        snap = [(op, list(op.operands)) for op in f.ops]
        results = list(f.results)
        ws = module.weights
        before = set(ws.names()) if ws is not None else set()
        a = _Assign(module, f)
        a.region(f)
        if not a.changed:
            continue
        a.sweep()
        if a.added() > a.saved:
            _restore(f, snap, results, ws, before)
            for v in a.recorded:
                tag(v, None)
            continue
        a.drop_orphan_weights()
        changed = True
    return changed


def _restore(f, snap, results, ws, before) -> None:
    """The function as it was before the rewrite (operand lists, producers, results, weights)."""
    f.ops = [op for op, _ in snap]
    for op, operands in snap:
        op.operands = operands
        for r in op.results:
            r.producer = op
    f.results = results
    if ws is not None:
        for name in [n for n in ws.names() if n not in before]:
            del ws.arrays[name]
