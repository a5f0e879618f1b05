"""INT8 post-training quantization: QuantizeLinear/DequantizeLinear around Conv / Gemm / MatMul
from calibration scales (`nnc compile --precision int8 --calib calib.json`).

Rewrites, in @main (ops inside regions are left float):
- every quantized tensor t (`quantized_tensors`: the float activation operands of Conv / Gemm /
  MatMul that are not constants, and each such op's output, taken after a Relu when a Relu is its
  only reader; never a function result) gets, right after its definition,
      %t.q  = QuantizeLinear(%t, s_t, 0 : i8)     s_t = amax_t / 127 (per tensor, symmetric)
      %t.dq = DequantizeLinear(%t.q, s_t, 0 : i8)
  and every reader of t reads %t.dq instead (one pair per tensor, shared by all its readers:
  onnxruntime's QDQ layout); the output of a MaxPool / view (SCALE_PRESERVING) of a quantized
  tensor takes that tensor's scale, whatever the table says (`scale_sources`), so the op is exact
  on the integers;
- the constant weight of each such op (Conv W[O, C/g, k..]: axis 0; Gemm B: axis 0 with transB,
  else 1; MatMul B[.., K, N]: the last axis) becomes DequantizeLinear(w_q : i8 const, s_w : f32[O],
  axis) with per-channel symmetric s_w = max|W[o]| / 127 (1 for an all-zero channel) and
  w_q = clip(rint(W / s_w), -127, 127), computed here from the constant.
Biases stay float constants; everything else stays fp32 (the precision of the non-quantized ops:
fp32 here, so the reference backend's simulated quantization is the only source of error).
This is the form compiler/passes/fold_qdq.py folds into integer ops (/work/notes/qdq_interface.md):
Q(Relu?(OP(DQ(x_q), DQ(w_q), B))) with per-tensor activations and per-channel weights.

Requires: a verified module after the cleanups (fold-constants, fold-batchnorm: BN already in the
conv weights, and no fold-constants after this pass, which would fold DQ(const) back to float);
run where the precision passes run (compiler/driver.pipeline_passes). A tensor without a scale in
the table is an error naming it and the op reading it.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from nnc.ir.builder import Builder, const_value
from nnc.ir.errors import NncError
from nnc.ir.graph import Loc, Module, NameGen, Region, users, value_names

QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
INT8_MAX = 127.0
# ops whose output takes their input's scale: max / views commute with a positive per-tensor
# scale, so Q(op(DQ(q, s)), s) == op(q) exactly (what TensorRT does across pooling and reshapes)
SCALE_PRESERVING = ("MaxPool", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity")


def _is_const(v) -> bool:
    return v.producer is not None and v.producer.name == "const"


def _activation_operands(op) -> tuple[int, ...]:
    return (0, 1) if op.name == "MatMul" else (0,)


def quantized_tensors(module: Module) -> dict[str, str]:
    """{tensor name: why} for every tensor the pass quantizes, in graph order (calibrate.py
    collects statistics for exactly these)."""
    f = module.main
    uses = users(f)
    returned = {id(v) for v in f.results}
    out: dict[str, str] = {}
    for op in f.ops:
        if op.name not in QUANTIZED_OPS:
            continue
        for i in _activation_operands(op):
            v = op.operands[i]
            if not _is_const(v) and v.type.dtype.short == "f32" and id(v) not in returned:
                out.setdefault(v.name, f"input {i} of {op.name} {op.loc.node or op.results[0].name!r}")
        r = op.results[0]
        rd = uses.get(id(r), [])
        if len(rd) == 1 and rd[0].name == "Relu" and id(r) not in returned:
            r = rd[0].results[0]
        if r.type.dtype.short == "f32" and id(r) not in returned:
            out.setdefault(r.name, f"output of {op.name} {op.loc.node or op.results[0].name!r}")
    return out


def scale_sources(module: Module, want: Optional[dict] = None) -> dict[str, str]:
    """{quantized tensor: the quantized tensor whose scale it takes} for results of chains of
    SCALE_PRESERVING ops starting at a quantized tensor (Relu -> MaxPool -> Flatten -> Gemm).
    want: quantized_tensors(module), when the caller has it already."""
    want = quantized_tensors(module) if want is None else want
    origin: dict[str, str] = {}  # value -> the quantized tensor it is a max/view of
    for op in module.main.ops:
        if op.name in SCALE_PRESERVING and op.results and op.operands and op.operands[0] is not None:
            u = op.operands[0].name
            o = origin.get(u, u if u in want else None)
            if o is not None:
                origin[op.results[0].name] = o
    return {t: u for t, u in origin.items() if t in want}


def weight_axis(op, w) -> Optional[int]:
    """The output-channel axis of op's constant weight (operand 1), or None if not quantizable."""
    nd = len(w.type.shape or ())
    if op.name == "Conv":
        return 0 if nd >= 3 else None
    if op.name == "Gemm":
        return (0 if op.attrs.transB else 1) if nd == 2 else None
    return nd - 1 if nd >= 2 else None  # MatMul B[.., K, N]


def quantize_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel symmetric int8: (w_q : int8, scale : f32[channels]) with w ~ w_q * scale."""
    wf = np.asarray(w, np.float64)
    red = tuple(a for a in range(wf.ndim) if a != axis)
    amax = np.abs(wf).max(axis=red)
    scale = np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)
    shape = [1] * wf.ndim
    shape[axis] = -1
    q = np.clip(np.rint(wf / scale.astype(np.float64).reshape(shape)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


class _Insert:
    def __init__(self, module: Module, scales: dict[str, float]):
        self.module = module
        self.scales = scales
        self.names = NameGen(value_names(module))
        self.count = 0

    def run(self) -> bool:
        f = self.module.main
        want = quantized_tensors(self.module)
        src = scale_sources(self.module, want)
        self.scales = {**self.scales, **{t: self.scales[u] for t, u in src.items() if u in self.scales}}
        for name, why in want.items():
            if name not in self.scales:
                raise NncError(f"--calib: no scale for tensor {name!r} ({why}); calibrate this model "
                               f"(`nnc calibrate`) with the same --shapes, or give a cache that names it")
            s = self.scales[name]
            if not (s > 0 and np.isfinite(s)):
                raise NncError(f"--calib: tensor {name!r} ({why}) has scale {s!r}: it was all zeros or "
                               "non-finite in the calibration data")
        new_ops: list = []
        b = Builder(Region([], new_ops, []), self.module.weights, self.names)
        repl: dict[int, object] = {}  # id(float value) -> its DequantizeLinear result

        def qdq(v, loc):
            s = b.constant(np.asarray(self.scales[v.name], np.float32), f"{v.name}.scale", loc)
            z = b.constant(np.asarray(0, np.int8), f"{v.name}.zp", loc)
            q = b.create("QuantizeLinear", [v, s, z], names=[f"{v.name}.q"], loc=loc)[0]
            repl[id(v)] = b.create("DequantizeLinear", [q, s, z], names=[f"{v.name}.dq"], loc=loc)[0]
            self.count += 1

        for a in f.args:
            if a.name in want:
                qdq(a, f.ops[0].loc if f.ops else Loc())
        for op in f.ops:
            op.operands = [repl.get(id(v), v) if v is not None else None for v in op.operands]
            if op.name in QUANTIZED_OPS and len(op.operands) > 1 and _is_const(op.operands[1]):
                w = op.operands[1]
                axis = weight_axis(op, w)
                wv = const_value(w, self.module.weights)
                if axis is not None and wv is not None and w.type.dtype.short == "f32":
                    wq, ws = quantize_weight(wv, axis)
                    qc = b.constant(wq, f"{w.name}.q", op.loc, weight_hint=f"{w.name}.q")
                    sc = b.constant(ws, f"{w.name}.scale", op.loc, weight_hint=f"{w.name}.scale")
                    op.operands[1] = b.create("DequantizeLinear", [qc, sc], {"axis": axis},
                                              names=[f"{w.name}.dq"], loc=op.loc)[0]
            new_ops.append(op)
            for r in op.results:
                if r.name in want:
                    qdq(r, op.loc)
        f.ops = new_ops
        return self.count > 0


def make_pass(scales: dict[str, float]):
    """The configured pass: `scales` maps tensor names to their int8 scale (calibrate.CalibTable)."""
    def quantize_int8(module: Module) -> bool:
        return _Insert(module, scales).run()
    return quantize_int8


def _calib_name(v, scales: dict) -> str:
    """The table's name for activation v: its own, else (a value the precision pass cast to f32)
    the Cast's input's."""
    p = v.producer
    if v.name not in scales and p is not None and p.name == "Cast" and p.operands[0].name in scales:
        return p.operands[0].name
    return v.name


FLOW_OPS = SCALE_PRESERVING + ("Relu",)  # what int8 flows through between two int8 layers (fold-qdq's passthrough)


def int8_chain(x, is_int8, uses, returned):
    """(the ops from x's producer back, the value where int8 flow starts) for x = FLOW_OPS(..(y)..)
    where y is the result of an op is_int8 accepts, every value on the way read once and not
    returned. The flow starts at y, or at Relu(y) when a Relu reads y (so fold-qdq sees
    Q(Relu(OP))). (None, None) when x is no such chain or the chain is that Relu alone (x's own
    pair already folds it)."""
    chain, v = [], x
    while v.producer is not None and v.producer.name in FLOW_OPS and len(v.producer.results) == 1:
        op = v.producer
        u = op.operands[0]
        if u is None or id(v) in returned or id(u) in returned or len(uses.get(id(v), ())) != 1 \
                or len(uses.get(id(u), ())) != 1:
            return None, None
        chain.append(op)
        if u.producer is not None and is_int8(u.producer):
            start = v if op.name == "Relu" else u
            return (chain, start) if start is not x else (None, None)
        v = u
    return None, None


def flow_pins(module: Module, layers) -> dict:
    """{layer key: the int8 layer it follows} for the max / view / Relu ops between two int8
    layers (`layers`: their keys): precision best runs them at f32 with the int8 layers, so that
    int8 flows through them (quantize_layers puts the pairs; fold-qdq folds them)."""
    f = module.main
    uses, returned = users(f), {id(v) for v in f.results}
    is_int8 = lambda op: op.name in QUANTIZED_OPS and op.results and op.results[0].name in layers
    out = {}
    for op in f.ops:
        if is_int8(op) and op.operands and op.operands[0] is not None:
            chain, _ = int8_chain(op.operands[0], is_int8, uses, returned)
            for c in chain or ():
                out[c.results[0].name] = op.results[0].name
    return out


def quantize_layers(module: Module, scales: dict[str, float], layers) -> set:
    """Per-layer int8 (`--precision best`): Q/DQ on the float activation operand(s) of each Conv /
    Gemm / MatMul of @main whose layer key (its first result's name) is in `layers` and whose
    weight is a 2-D+ f32 constant, and that weight per-channel int8 (as the pass above). One Q/DQ
    pair per tensor, read only by the int8 layers (a float reader keeps the exact value); outputs
    are not quantized here: the next int8 layer's input pair follows them, so fold-qdq makes
    Q(Relu?(OP(DQ, DQ))) an int8 op and the last one an int8-in, float-out op. Returns the
    layer keys quantized. A missing or non-positive scale is an error naming the tensor."""
    f = module.main
    names = NameGen(value_names(module))
    new_ops: list = []
    b = Builder(Region([], new_ops, []), module.weights, names)
    pairs: dict[int, object] = {}
    done = set()
    # int8 flow: for x = MaxPool/view/Relu chain of an int8 layer's output, a pair with x's scale
    # also right after that layer (or its Relu), so fold-qdq makes the chain int8 (passthrough)
    uses, returned = users(f), {id(v) for v in f.results}
    is_int8 = lambda op: op.name in QUANTIZED_OPS and op.results and op.results[0].name in layers
    flow: dict[int, float] = {}
    for op in f.ops:
        if is_int8(op) and op.operands and op.operands[0] is not None:
            chain, u = int8_chain(op.operands[0], is_int8, uses, returned)
            s = scales.get(_calib_name(op.operands[0], scales))
            if chain and s is not None and s > 0 and np.isfinite(s):
                flow[id(u)] = s
    flow_repl: dict[int, object] = {}
    for op in f.ops:
        op.operands = [flow_repl.get(id(v), v) if v is not None else None for v in op.operands]
        for r in op.results if op.name != "const" else ():
            if id(r) in flow:
                new_ops.append(op)
                sc = b.constant(np.asarray(flow[id(r)], np.float32), f"{r.name}.scale", op.loc)
                z = b.constant(np.asarray(0, np.int8), f"{r.name}.zp", op.loc)
                q = b.create("QuantizeLinear", [r, sc, z], names=[f"{r.name}.q"], loc=op.loc)[0]
                flow_repl[id(r)] = b.create("DequantizeLinear", [q, sc, z], names=[f"{r.name}.dq"], loc=op.loc)[0]
                break
        else:
            new_ops.append(op)
    f.ops, new_ops = new_ops, []
    b = Builder(Region([], new_ops, []), module.weights, names)
    for op in f.ops:
        key = op.results[0].name if op.results else ""
        w = op.operands[1] if op.name in QUANTIZED_OPS and len(op.operands) > 1 else None
        if key in layers and w is not None and _is_const(w) and w.type.dtype.short == "f32" and \
                op.results[0].type.dtype.short == "f32" and weight_axis(op, w) is not None:
            x = op.operands[0]
            if _is_const(x) or x.type.dtype.short not in ("f32", "f16", "bf16"):
                new_ops.append(op)
                continue
            if id(x) not in pairs:
                name = _calib_name(x, scales)
                s = scales.get(name)
                why = f"input 0 of {op.name} {op.loc.node or key!r}"
                if s is None:
                    raise NncError(f"--calib: no scale for tensor {name!r} ({why}); calibrate this model "
                                   f"(`nnc calibrate`) with the same --shapes")
                if not (s > 0 and np.isfinite(s)):
                    raise NncError(f"--calib: tensor {name!r} ({why}) has scale {s!r}: it was all zeros or "
                                   "non-finite in the calibration data")
                sc = b.constant(np.asarray(s, np.float32), f"{name}.scale", op.loc)
                z = b.constant(np.asarray(0, np.int8), f"{name}.zp", op.loc)
                q = b.create("QuantizeLinear", [x, sc, z], names=[f"{name}.q"], loc=op.loc)[0]
                pairs[id(x)] = b.create("DequantizeLinear", [q, sc, z], names=[f"{name}.dq"], loc=op.loc)[0]
            axis = weight_axis(op, w)
            wq, ws = quantize_weight(const_value(w, module.weights), axis)
            qc = b.constant(wq, f"{w.name}.q", op.loc, weight_hint=f"{w.name}.q")
            sc = b.constant(ws, f"{w.name}.scale", op.loc, weight_hint=f"{w.name}.scale")
            wdq = b.create("DequantizeLinear", [qc, sc], {"axis": axis}, names=[f"{w.name}.dq"], loc=op.loc)[0]
            op.operands = [pairs[id(x)], wdq] + list(op.operands[2:])
            done.add(key)
        new_ops.append(op)
    f.ops = new_ops
    return done
