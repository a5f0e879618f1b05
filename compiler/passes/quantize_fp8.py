"""FP8 (E4M3) post-training quantization of MatMul / Gemm from calibration amax
(`nnc compile --precision fp8 --calib calib.json`), and the fp8 QDQ fold that both this pass and
ONNX float8 QDQ models go through (fold_qdq's fp8 sweep calls `fold_fp8`).

Pass `quantize-fp8` (runs after to-fp16 / mixed-precision, so every other op is already fp16 and
--keep-fp32 pins hold: a layer left at f32 is not quantized). Rewrites, in @main:
- every MatMul (b a 2-D constant [K, N]), Gemm (transA 0, alpha 1, a 2-D constant B) and NCHW Conv
  (a constant W [O, C/g, k..]; per-output-channel scales along axis 0) whose result is f16 / bf16 gets
      %x.fp8q  = QuantizeLinear(%x, s_x) {output_dtype = f8e4m3}     s_x = amax_x / 448 (f32)
      %x.fp8dq = DequantizeLinear(%x.fp8q, s_x) {output_dtype = <x's dtype>}
  on its activation x (one pair per tensor, shared by its readers; amax from the table under x's
  name, or under the name of the model input x is a Cast of), and its weight becomes
      DequantizeLinear(w_q : f8e4m3 const, s_w : f32[N], axis = N's axis) {output_dtype = <W's dtype>}
  with per-column s_w = max|W[:, n]| / 448 (1 for an all-zero column), w_q = e4m3(W / s_w) (round
  to nearest even, saturating);
- fold-qdq then folds each into `matmul_fp8` / `conv_fp8` (ir/ops/gemm_fp8.py).
A tensor the table lacks is an error naming it and its op. The weights are quantized from the
constant as this pass sees it (f16 after to-fp16: one extra rounding, far below e4m3's 2^-4).

`fold_fp8` (fold-qdq's fp8 sweep): MatMul(DQ(a : f8, s_a), DQ(b : f8 const [K, N], s_b)) [-> Add
of a constant along N] and Gemm(DQ(a), DQ(b)[, C]) (transA 0, alpha 1; transB folded into b, C a
constant along N times beta) -> matmul_fp8(a, s_a, b, s_b[, bias]) {out_dtype = the MatMul's dtype,
or that of a float Cast that is the result's only reader: it folds in, one rounding fewer;
activation = "relu" when a Relu is the (bias-added) result's only reader, before that Cast},
with s_a a per-tensor f32 constant, s_b per tensor or per output column (the DQ's axis on N), zero
points absent or 0 (ONNX float8 zero points are 0), no block_size; or b a float const that is
bit for bit DQ(q, s) of fp8 codes (a small DQ(w) the importer folded; `recover_fp8_weight`, tried
only when a is an fp8 DQ). Equal to the literal graph
within fp32 rounding (ir/ops/gemm_fp8.py says how).
`fold_fp8_conv` (the same sweep): Conv(DQ(x : f8, s_x), DQ(w : f8 const, s_w per tensor or per output
channel)[, B const]) (NCHW; or a recovered float const w) -> conv_fp8(x, s_x, w, s_w[, B]) {Conv's
attrs, out_dtype = the Conv's dtype}; a Relu / Cast after it stays a separate op.
Requires: a verified module with folded constants (scales are `const`s).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from nnc.ir import narrow_types
from nnc.ir.builder import Builder, const_value
from nnc.ir.errors import NncError
from nnc.ir.graph import Module, NameGen, Op, Region, users, value_names
from nnc.ir.types import F32, dtype as ir_dtype

FP8 = ("f8e4m3", "f8e5m2")
FP8_MAX = {"f8e4m3": 448.0, "f8e5m2": 57344.0}  # the largest finite values (scale = amax / max)
LOW = ("f16", "bf16")


# ---------------------------------------------------------------- the fold (fold-qdq's fp8 sweep)

def _dq_parts(v, weights, const_input: bool):
    """(q value or array, scale f32 array, axis) of v = DequantizeLinear(q : f8, scale f32 const,
    zero point absent or 0) without block_size; q a const array when const_input, else None."""
    op = v.producer
    if op is None or op.name != "DequantizeLinear" or len(op.results) != 1 or op.attrs.block_size:
        return None
    q = op.operands[0]
    if q.type.dtype.short not in FP8:
        return None
    s = const_value(op.operands[1], weights)
    if s is None or s.dtype != np.float32 or not np.all(np.isfinite(s)) or not np.all(s > 0):
        return None
    if len(op.operands) > 2 and op.operands[2] is not None:
        z = const_value(op.operands[2], weights)
        if z is None or np.any(narrow_types.decode(np.asarray(z)) != 0):
            return None
    if const_input:
        q = const_value(q, weights)
        if q is None:
            return None
    return q, s, op.attrs.axis


def fold_fp8(op: Op, b: Builder, uses: dict, returned: set, weights) -> Optional[list]:
    """Emits matmul_fp8 for op (MatMul / Gemm over fp8 DQs, see the module docstring), taking over
    op's result (or the folded bias Add's). Returns the ops to drop later (the Add), or None."""
    from nnc.passes.quantize_weights_int4 import bias_after, bias_vector
    if op.name not in ("MatMul", "Gemm") or len(op.results) != 1 or len(op.operands) < 2:
        return None
    if op.name == "Gemm" and (op.attrs.transA or op.attrs.alpha != 1.0):
        return None
    res = op.results[0]
    if res.type.dtype.short not in ("f32",) + LOW or res.type.rank is None or not res.type.is_static:
        return None
    a = _dq_parts(op.operands[0], weights, False)
    w = _dq_parts(op.operands[1], weights, True)
    recovered = False
    if a is not None and w is None:  # an fp8 model whose small DQ(w) import folded to a float const
        wc = const_value(op.operands[1], weights)
        n_ax = 0 if op.name == "Gemm" and op.attrs.transB else 1
        r = recover_fp8_weight(wc, n_ax, (a[0].type.dtype.short,) + tuple(f for f in FP8 if f != a[0].type.dtype.short)) \
            if wc is not None and wc.ndim == 2 else None
        if r is not None:
            w, recovered = (r[0], r[1], n_ax), True
    if a is None or w is None:
        return None
    aq, sa, _ = a
    wq, sw, waxis = w
    if sa.size != 1 or wq.ndim != 2 or aq.type.rank is None or aq.type.rank < 1:
        return None
    trans_b = op.name == "Gemm" and bool(op.attrs.transB)
    n_axis = 0 if trans_b else 1
    if sw.size > 1 and (sw.ndim != 1 or waxis % 2 != n_axis):
        return None  # per-K-row scales cannot leave the accumulation
    if trans_b:
        wq = wq.T
    wq = np.ascontiguousarray(wq)
    K, N = wq.shape
    if sw.size > 1 and sw.size != N:
        return None
    bias, drop, target = None, [], res
    if op.name == "Gemm" and len(op.operands) > 2 and op.operands[2] is not None:
        cv = const_value(op.operands[2], weights)
        bias = None if cv is None else bias_vector((cv.astype(np.float64) * op.attrs.beta).astype(np.float32), N, np.float32)
        if bias is None:
            return None
    elif op.name == "MatMul":
        after = bias_after(res, uses, returned, weights)
        if after is not None:
            drop, target = [after[0]], after[0].results[0]
            bias = after[1].astype(np.float32)
    act = "none"
    readers = uses.get(id(target), ())
    if len(readers) == 1 and readers[0].name == "Relu" and id(target) not in returned and \
            readers[0].results[0].type == target.type:
        drop.append(readers[0])  # a Relu after it (and after the bias) is its activation
        target, act = readers[0].results[0], "relu"
        readers = uses.get(id(target), ())
    if len(readers) == 1 and readers[0].name == "Cast" and id(target) not in returned and \
            readers[0].results[0].type.dtype.short in ("f32",) + LOW:
        drop.append(readers[0])  # a Cast after it (mixed-precision's, at an output) is its out_dtype
        target = readers[0].results[0]
    loc, hint = op.loc, res.name
    wdq = op.operands[1].producer
    wv = wdq.operands[0] if not (trans_b or recovered) else \
        b.constant(wq, f"{hint}_w_fp8", loc, weight_hint=f"{hint}_w_fp8")
    sav = op.operands[0].producer.operands[1]
    swv = wdq.operands[1] if sw.ndim == 0 and not recovered else None
    if swv is None:  # a scalar, or [N] per column, as the op takes them
        sw_c = sw.reshape(()) if sw.size == 1 else sw.reshape(-1)
        same = not recovered and sw.ndim == 1 and sw.size > 1
        swv = wdq.operands[1] if same else b.constant(sw_c, f"{hint}_w_scale", loc, weight_hint=f"{hint}_w_scale")
    if sa.ndim != 0:
        sav = b.constant(sa.reshape(()), f"{hint}_x_scale", loc)
    operands = [aq, sav, wv, swv]
    if bias is not None:
        operands.append(b.constant(bias, f"{hint}_bias", loc, weight_hint=f"{hint}_bias"))
    start = b.mark()
    attrs = {"out_dtype": target.type.dtype, **({"activation": act} if act != "none" else {})}
    y = b.create("matmul_fp8", operands, attrs, names=[hint], loc=loc)[0]
    if not b.take_over_or_roll_back(target, y, start):
        return None
    return drop


def fold_fp8_conv(op: Op, b: Builder, weights) -> bool:
    """Conv(DQ(x : f8, s_x), DQ(w : f8 const, s_w per tensor or per output channel, axis 0)[, B const])
    (NCHW; or w a float const that is bit for bit such a product: recover_fp8_weight) ->
    conv_fp8(x, s_x, w, s_w[, B]) {Conv's attrs, out_dtype = the Conv's dtype}, taking over the
    Conv's result. False (nothing emitted) when the pattern does not hold."""
    if op.name != "Conv" or len(op.results) != 1 or getattr(op.attrs, "layout", "NCHW") != "NCHW":
        return False
    res = op.results[0]
    if res.type.dtype.short not in ("f32",) + LOW or not res.type.is_static:
        return False
    a = _dq_parts(op.operands[0], weights, False)
    if a is None or a[1].size != 1:
        return False
    w = _dq_parts(op.operands[1], weights, True)
    recovered = False
    if w is None:
        wc = const_value(op.operands[1], weights)
        fmts = (a[0].type.dtype.short,) + tuple(f for f in FP8 if f != a[0].type.dtype.short)
        r = recover_fp8_weight(wc, 0, fmts) if wc is not None and wc.ndim >= 3 else None
        if r is None:
            return False
        w, recovered = (r[0], r[1], 0), True
    wq, sw, waxis = w
    O = wq.shape[0]
    if sw.size > 1 and (sw.ndim != 1 or sw.size != O or waxis % wq.ndim != 0):
        return False  # scales along another axis cannot leave the accumulation
    bias = None
    if len(op.operands) > 2 and op.operands[2] is not None:
        bias = const_value(op.operands[2], weights)
        if bias is None or bias.dtype.kind != "f" or bias.size != O:
            return False
    loc, hint = op.loc, res.name
    wdq = op.operands[1].producer
    wv = b.constant(wq, f"{hint}_w_fp8", loc, weight_hint=f"{hint}_w_fp8") if recovered else wdq.operands[0]
    sw_c = sw.reshape(()) if sw.size == 1 else sw.reshape(-1)
    swv = wdq.operands[1] if not recovered and sw.ndim == sw_c.ndim else \
        b.constant(sw_c, f"{hint}_w_scale", loc, weight_hint=f"{hint}_w_scale")
    sav = op.operands[0].producer.operands[1]
    if a[1].ndim != 0:
        sav = b.constant(a[1].reshape(()), f"{hint}_x_scale", loc)
    operands = [a[0], sav, wv, swv]
    if bias is not None:
        operands.append(b.constant(np.asarray(bias, np.float32).reshape(-1), f"{hint}_bias", loc, weight_hint=f"{hint}_bias"))
    at = op.attrs
    attrs = {"out_dtype": res.type.dtype, "auto_pad": at.auto_pad, "group": at.group,
             **{k: getattr(at, k) for k in ("dilations", "kernel_shape", "pads", "strides") if getattr(at, k) is not None}}
    start = b.mark()
    y = b.create("conv_fp8", operands, attrs, names=[hint], loc=loc)[0]
    return b.take_over_or_roll_back(res, y, start)


def _fp8_values(fmt: str) -> np.ndarray:
    """The positive finite values of fmt, largest first (float64)."""
    codes = np.arange(1, 0x80, dtype=np.uint8)
    v = narrow_types.decode_minifloat(codes, fmt)
    return np.sort(v[np.isfinite(v)])[::-1]


def _recover_slice(sl: np.ndarray, fmt: str):
    """(q : fmt, scale f32) with f32(f32(q) * scale) == sl bit for bit, or None."""
    amax = np.float32(np.abs(sl).max()) if sl.size else np.float32(0)
    if amax == 0:
        return narrow_types.cast_to_narrow(np.zeros(sl.shape), ir_dtype(fmt)), np.float32(1)
    bits = sl.view(np.int32)
    for v in _fp8_values(fmt):  # the code the largest |w| had (its scale makes v * s == amax exactly)
        s0 = np.float32(amax / v)
        for s in (s0, np.nextafter(s0, np.float32(0)), np.nextafter(s0, np.float32(np.inf))):
            if not s > 0 or np.float32(np.float32(v) * s) != amax:
                continue
            q = narrow_types.cast_to_narrow(sl.astype(np.float64) / np.float64(s), ir_dtype(fmt))
            if np.array_equal((decode_f32(q) * s).astype(np.float32).view(np.int32), bits):
                return q, s
    return None


def decode_f32(q: np.ndarray) -> np.ndarray:
    return narrow_types.decode(q).astype(np.float32)


def recover_fp8_weight(w: np.ndarray, axis: int, fmts=FP8):
    """(w_q, scale f32 [] or [C along axis]) with DequantizeLinear(w_q, scale, axis) == w bit for
    bit, per tensor else per slice along axis, trying the formats in order; None when w is no
    such product (an ordinary float weight is never taken for an fp8 one)."""
    if w is None or w.dtype != np.float32 or w.size == 0 or not np.all(np.isfinite(w)):
        return None
    for fmt in fmts:
        r = _recover_slice(w, fmt)
        if r is not None:
            return r[0], np.asarray(r[1], np.float32)
        qs, ss = [], []
        for i in range(w.shape[axis]):
            r = _recover_slice(np.ascontiguousarray(np.take(w, i, axis=axis)), fmt)
            if r is None:
                break
            qs.append(r[0])
            ss.append(r[1])
        else:
            return np.stack(qs, axis=axis), np.asarray(ss, np.float32)
    return None


# ---------------------------------------------------------------- --precision fp8

def quantize_weight_fp8(w: np.ndarray, axis: int, fmt: str = "f8e4m3") -> tuple[np.ndarray, np.ndarray]:
    """(w_q : fmt, scale f32[channels along axis]) with w ~ w_q * scale: per-channel amax / max."""
    wf = np.asarray(w, np.float64)
    red = tuple(i for i in range(wf.ndim) if i != axis)
    amax = np.abs(wf).max(axis=red)
    scale = np.where(amax > 0, amax / FP8_MAX[fmt], 1.0).astype(np.float32)
    shape = [1] * wf.ndim
    shape[axis] = -1
    q = narrow_types.cast_to_narrow(wf / scale.astype(np.float64).reshape(shape), ir_dtype(fmt), saturate=True)
    return q, scale


def fp8_layer_kind(op):
    """"gemm" for a MatMul / Gemm this pass can quantize by its form alone (a 2-D constant weight,
    Gemm transA 0 and alpha 1), "conv" for an NCHW Conv with a constant weight, else None (result
    dtype and calibration are checked elsewhere)."""
    if op.name not in ("MatMul", "Gemm", "Conv") or len(op.results) != 1 or len(op.operands) < 2:
        return None
    if op.name == "Gemm" and (op.attrs.transA or op.attrs.alpha != 1.0):
        return None
    if op.name == "Conv" and getattr(op.attrs, "layout", "NCHW") != "NCHW":
        return None
    x, w = op.operands[0], op.operands[1]
    rank_ok = (w.type.rank or 0) >= 3 if op.name == "Conv" else w.type.rank == 2
    if w.producer is None or w.producer.name != "const" or not rank_ok:
        return None
    if x.producer is not None and x.producer.name == "const":
        return None
    return "conv" if op.name == "Conv" else "gemm"


def quantized_layers(module: Module) -> list:
    """[(op, activation operand value, weight axis of the output channels / columns)] for the
    MatMul / Gemm / Conv ops the pass quantizes (fp8_layer_kind, an f16 / bf16 result), in graph order."""
    out = []
    for op in module.main.ops:
        kind = fp8_layer_kind(op)
        if kind is None or op.results[0].type.dtype.short not in LOW:
            continue  # an f32 layer (--keep-fp32), an integer one, or no fp8 form
        axis = 0 if kind == "conv" or (op.name == "Gemm" and op.attrs.transB) else 1
        out.append((op, op.operands[0], axis))
    return out


def _calib_name(v, amax: dict) -> str:
    """The table's name for activation v: its own, else (a model input cast to f16 at entry) the
    Cast's input's."""
    if v.name in amax:
        return v.name
    p = v.producer
    if p is not None and p.name == "Cast" and p.operands[0].name in amax:
        return p.operands[0].name
    return v.name


def insert(module: Module, amax: dict, fmt: str = "f8e4m3", only=None) -> set:
    """The Q/DQ insertion (see the module docstring); returns the layer keys (first result names)
    quantized. only: the layer keys to quantize (precision best's fp8 layers), None: every one."""
    layers = [t for t in quantized_layers(module) if only is None or t[0].results[0].name in only]
    f = module.main
    for op, x, _ in layers:
        key = _calib_name(x, amax)
        why = f"input 0 of {op.name} {op.loc.node or op.results[0].name!r}"
        if key not in amax:
            raise NncError(f"--calib: no amax for tensor {x.name!r} ({why}); calibrate this model "
                           f"(`nnc calibrate`) with the same --shapes")
        a = amax[key]
        if not (a > 0 and np.isfinite(a)):
            raise NncError(f"--calib: tensor {key!r} ({why}) has amax {a!r}: it was all zeros or "
                           "non-finite in the calibration data")
    names = NameGen(value_names(module))
    want = {id(op): (x, axis) for op, x, axis in layers}
    new_ops: list = []
    b = Builder(Region([], new_ops, []), module.weights, names)
    repl: dict = {}
    fp8 = ir_dtype(fmt)
    for op in f.ops:
        if id(op) in want:
            x, axis = want[id(op)]
            if id(x) not in repl:
                s = b.constant(np.asarray(amax[_calib_name(x, amax)] / FP8_MAX[fmt], np.float32),
                               f"{x.name}.fp8_scale", op.loc)
                q = b.create("QuantizeLinear", [x, s], {"output_dtype": fp8}, names=[f"{x.name}.fp8q"], loc=op.loc)[0]
                repl[id(x)] = b.create("DequantizeLinear", [q, s], {"output_dtype": x.type.dtype},
                                       names=[f"{x.name}.fp8dq"], loc=op.loc)[0]
            w = op.operands[1]
            wv = const_value(w, module.weights)
            wq, ws = quantize_weight_fp8(wv, axis, fmt)
            qc = b.constant(wq, f"{w.name}.fp8", op.loc, weight_hint=f"{w.name}.fp8")
            sc = b.constant(ws, f"{w.name}.fp8_scale", op.loc, weight_hint=f"{w.name}.fp8_scale")
            wdq = b.create("DequantizeLinear", [qc, sc], {"axis": axis, "output_dtype": w.type.dtype},
                           names=[f"{w.name}.fp8dq"], loc=op.loc)[0]
            op.operands = [repl[id(x)], wdq] + list(op.operands[2:])
        new_ops.append(op)
    f.ops = new_ops
    return {op.results[0].name for op, _, _ in layers}


def make_pass(amax: dict, fmt: str = "f8e4m3"):
    """The configured pass: `amax` maps activation tensor names to their calibrated max |x|."""
    def quantize_fp8(module: Module) -> bool:
        return bool(insert(module, amax, fmt))
    return quantize_fp8


def fold_sweep(module: Module, f: Region, names: NameGen) -> int:
    """fold-qdq's fp8 sweep over region f (nested regions included): the folds done."""
    n = 0
    new_ops: list = []
    b = Builder(Region([], new_ops, []), module.weights, names)
    uses, returned, drop = users(f), {id(v) for v in f.results}, set()
    for op in f.ops:
        if id(op) in drop:
            continue
        for _, sub in op.regions():
            n += fold_sweep(module, sub, names)
        if op.name in ("MatMul", "Gemm"):
            got = fold_fp8(op, b, uses, returned, module.weights)
            if got is not None:
                drop.update(id(o) for o in got)
                n += 1
                continue
        if op.name == "Conv" and fold_fp8_conv(op, b, module.weights):
            n += 1
            continue
        new_ops.append(op)
    f.ops = new_ops
    return n


__all__ = ["fold_fp8", "fold_sweep", "insert", "make_pass", "quantize_weight_fp8", "quantized_layers", "F32"]
