"""Explicit quantization: Q/DQ pairs around Conv / MatMul / Gemm become integer ops (int8 flows on).

Sources: onnxruntime quantize_static's QDQ format, PyTorch-style exports, IR Q/DQ inserted by
calibration (`--precision int8`).

Rewrites (x_q: an i8/u8 value; every scale and zero point a `const`; sx, sy per-tensor):
  Q(OP(DQ(x_q, sx, zx), W [, B]), sy, zy)                 and the same with Relu between OP and Q,
  - Conv(X, W, B?)                  -> QLinearConv(x_q, sx, zx, w_q, sw, zw, sy, zy [, b_i32])
  - MatMul(X, W[K,N])               -> QLinearMatMul(x_q, sx, zx, w_q, sw, zw, sy, zy)
  - Gemm(X, W, C?) (alpha = beta = 1, transA = 0; transB folded into w_q) and Add(MatMul(..), B)
                                    -> MatMulInteger(x_q, w_q, zx, zw) [+ Add(b_i32)]
                                       -> DequantizeLinear(acc, sx*sw) [-> Relu] -> QuantizeLinear(sy, zy)
    (QLinearMatMul has no bias input; without a bias a Gemm takes the QLinearMatMul form too)
  - Q(DQ(q, s, z), s, z) with equal constants and dtype -> q (the identity: int8 flows on), and
    Q(OP(..OP(DQ(q, s, z))..), s, z) (per-tensor s > 0; a chain of single-use ops) -> the chain on q
    for Reshape / Flatten / Squeeze / Unsqueeze / Transpose / Identity / MaxPool (monotone), Relu ->
    max(q, z) (or nothing when z is the type's minimum): what onnxruntime writes around pools and
    reshapes between quantized layers (one op per Q/DQ pair), and calibration's MaxPool->Flatten.
  - a second sweep: OP(DQ(x_q), W [, B]) left over, its f32 result read by no Q (a QDQ model's
    classifier) -> ConvInteger / MatMulInteger -> DequantizeLinear(acc, sx*sw) [-> Add(B)]: int8
    inputs, exact int32 sums, f32 out (equal to the literal graph within fp32 rounding, not bitwise).
  - a third sweep, weight-only int4: MatMul(X, DQ(w_q int4/uint4 const [K, N], sw, zw?)) [-> Add
    of a constant along N] and Gemm(X, DQ(..)[, C]) (transA 0, alpha 1; transB folded into w_q)
    with a float X, the DQ blocked along K (opset 21) or per output channel (one block of K) ->
    matmul_int4_weight(X, w_q [K, N], sw [ceil(K/B), N][, zw][, bias]) {block_size = B} (a C
    that is no bias along N: an Add after it) (ir/ops/gemm_int4.py: exactly dequantize-then-matmul). A DQ small enough to be folded to a float constant first
    (fold-constants: <= 65536 weights) is an ordinary float MatMul by then.
  - a fourth sweep, float8: MatMul / Gemm(DQ(a_q f8e4m3|f8e5m2, sa), DQ(w_q f8 const, sw per tensor
    or per output column)) [-> Add of a constant along N] -> matmul_fp8(a_q, sa, w_q, sw[, bias])
    (compiler/passes/quantize_fp8.fold_fp8 holds the matcher; ir/ops/gemm_fp8.py the semantics).
  W is DQ(w_q const, sw, zw?) (int8/uint8; per-tensor, per-channel along the output-channel axis:
  Conv axis 0, MatMul axis 1, Gemm transB axis 0, or any layout, opset 21 blocked included, whose
  scale/zero point is constant across all other axes; blocks along K with unequal scales are not
  folded: the int32 accumulation has one scale per output),
  or a float const that is bit-for-bit DQ(w_q, sw, 0) for symmetric int8 w_q, per-tensor or else
  per-channel (the ONNX importer folds an onnxruntime model's DQ(w) into such a const; the scale is
  recovered from max|W|/127 (/128: PyTorch's -128; /63, /64: reduce_range) and its neighbouring
  floats; or onnxruntime's asymmetric uint8 weights, scale (max - min)/255 and its zero point),
  and the round trip is checked exactly,
  so an ordinary float weight is never taken for a quantized one).
  B (a float const, or DQ(i32 const, ..) folded to one): b_i32 = rint(B / (sx*sw)) in f64 (exact when
  B came from DQ(b_i32, f32(sx*sw)) as onnxruntime writes it, else rounded to the accumulator's quantum).
  Relu: max(q, zy) after the requantize (exact: Q is monotone and rint(0) = 0); dropped when zy is the
  type's minimum (the clamp already does it).
The fused op takes over the Q's result Value; the float ops and DQs left unread go to dce.
Exactness (ONNX leaves the float path's rounding to the implementation): the integer accumulation is
exact; QLinear* round once, rint(acc * (sx*sw/sy)) in f64, half to even; the literal graph rounds the
float conv to f32 and then y/sy in f32. The int8 results are equal except at rounding ties (<= 1
quantum); bit-identical whenever those float steps are exact (power-of-two scales, tests).
Requires: a verified module, constants folded (scales, zero points and weights are `const`s).
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from nnc.ir import registry
from nnc.ir.builder import Builder, const_value
from nnc.ir.graph import Module, NameGen, Op, Region, users, value_names
from nnc.ir.ops.quant import dequantize, expand_param
from nnc.ir.rewrite import Substitution

_INT8 = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}
# ops that commute with a per-tensor Q/DQ of equal scale and zero point (int8 flows through them)
_PASSTHROUGH = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "MaxPool", "Relu")


def _same_const(a, b) -> bool:
    """Equal dtype, shape and bits."""
    return a is not None and b is not None and a.dtype == b.dtype and a.shape == b.shape and \
        np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def _scale_candidates(s0, ulps: int = 4):
    """s0, then the f32 values 1..ulps ulps below and above it, alternating (nearest first)."""
    cands, lo, hi = [s0], s0, s0
    for _ in range(ulps):
        lo, hi = np.nextafter(lo, np.float32(0)), np.nextafter(hi, np.float32(np.inf))
        cands += [lo, hi]
    return cands


def _recover_symmetric(w: np.ndarray, axis):
    """(w_q int8, scale f32 scalar or [C]) with dequantize(w_q, scale) == w bit for bit (per tensor
    when axis is None, else per slice along axis), or None."""
    if w.dtype != np.float32:
        return None
    slices = [w] if axis is None else [np.take(w, i, axis=axis) for i in range(w.shape[axis])]
    qs, scales = [], []
    for sl in slices:
        amax = float(np.abs(sl).max()) if sl.size else 0.0
        found = None
        if amax == 0.0:
            found = (np.zeros(sl.shape, np.int8), np.float32(1.0))
        else:
            cands = []
            # the largest |w_q|: 127 (onnxruntime's symmetric int8), 128 (the -128 of PyTorch's
            # [-128, 127] range), 63/64 (reduce_range); the stored f32 scale is within a few ulps
            for top in (127.0, 128.0, 63.0, 64.0):
                cands += _scale_candidates(np.float32(amax / top))
            for s in cands:
                if not s > 0:
                    continue
                q = np.rint(sl.astype(np.float64) / np.float64(s))
                if q.max() > 127 or q.min() < -128:
                    continue
                q = q.astype(np.int8)
                if np.array_equal(dequantize(q, np.float32(s), None, np.float32).view(np.int32), sl.view(np.int32)):
                    found = (q, np.float32(s))
                    break
        if found is None:
            return None
        qs.append(found[0])
        scales.append(found[1])
    if axis is None:
        return qs[0], np.asarray(scales[0], np.float32)
    return np.stack(qs, axis=axis), np.asarray(scales, np.float32)


def _recover_asymmetric_u8(w: np.ndarray, axis):
    """(w_q u8, scale f32, zero point u8), scalar or per slice along axis, with dequantize(w_q, scale,
    zp) == w bit for bit, for onnxruntime's asymmetric uint8 weights (range [min(w,0), max(w,0)] onto
    [0, 255]), or None."""
    if w.dtype != np.float32 or w.size == 0:
        return None
    slices = [w] if axis is None else [np.take(w, i, axis=axis) for i in range(w.shape[axis])]
    out = []
    for sl in slices:
        lo, hi = min(float(sl.min()), 0.0), max(float(sl.max()), 0.0)
        found = None
        if hi == lo:
            found = (np.zeros(sl.shape, np.uint8), np.float32(1.0), np.uint8(0))
        else:
            for sc in _scale_candidates(np.float32((hi - lo) / 255.0)):
                if not sc > 0:
                    continue
                z0 = int(np.rint(-lo / float(sc)))
                for z in (z0, z0 - 1, z0 + 1):
                    if not 0 <= z <= 255:
                        continue
                    q = np.rint(sl.astype(np.float64) / np.float64(sc)) + z
                    if q.min() < 0 or q.max() > 255:
                        continue
                    q = q.astype(np.uint8)
                    zq = np.uint8(z)
                    if np.array_equal(dequantize(q, sc, zq, np.float32).view(np.int32), sl.view(np.int32)):
                        found = (q, np.float32(sc), zq)
                        break
                if found is not None:
                    break
        if found is None:
            return None
        out.append(found)
    if axis is None:
        q, sc, z = out[0]
        return q, np.asarray(sc, np.float32), np.asarray(z, np.uint8)
    return (np.stack([o[0] for o in out], axis=axis), np.asarray([o[1] for o in out], np.float32),
            np.asarray([o[2] for o in out], np.uint8))


def _per_channel(wq, s, z, q_axis: int, block: int, out_axis: int):
    """(w_q, sw, zw) with sw/zw scalar or 1-D along out_axis when the DQ's scale and zero point
    (per axis, or blocked: opset 21) are constant across every other axis, else None. A block
    structure along the reduction (K) axis with unequal scales cannot leave the int32
    accumulation (each block needs its own scale): not folded."""
    sf = np.broadcast_to(expand_param(s, wq.shape, q_axis, block), wq.shape)
    zf = np.broadcast_to(expand_param(z, wq.shape, q_axis, block), wq.shape)
    idx = [0] * wq.ndim
    idx[out_axis] = slice(None)
    s_c, z_c = sf[tuple(idx)], zf[tuple(idx)]
    shape = [1] * wq.ndim
    shape[out_axis] = wq.shape[out_axis]
    if not (np.array_equal(sf, np.broadcast_to(s_c.reshape(shape), wq.shape))
            and np.array_equal(zf, np.broadcast_to(z_c.reshape(shape), wq.shape))):
        return None
    s_c, z_c = np.ascontiguousarray(s_c, np.float32), np.ascontiguousarray(z_c, wq.dtype)
    if np.all(s_c == s_c[0]) and np.all(z_c == z_c[0]):
        return wq, s_c[0].reshape(()), z_c[0].reshape(())
    return wq, s_c, z_c


class _Fold:
    def __init__(self, module: Module, f):
        self.module = module
        self.w = module.weights
        self.names = NameGen(value_names(module))
        self.uses = users(f)
        self.counts: Counter = Counter()

    def c(self, v):
        return None if v is None else const_value(v, self.w)

    def _only_use(self, v, returned) -> bool:
        return len(self.uses.get(id(v), ())) == 1 and id(v) not in returned

    # ---------------------------------------------------------------- pieces of the pattern

    def _act_dq(self, v):
        """(x_q, sx, zx) of X = DQ(x_q, sx, zx) with per-tensor constant params, else None."""
        op = v.producer
        if op is None or op.name != "DequantizeLinear" or op.attrs.block_size:
            return None
        xq = op.operands[0]
        if np.dtype(xq.type.dtype.np) not in _INT8:
            return None
        s = self.c(op.operands[1])
        z = self.c(op.operands[2]) if len(op.operands) > 2 and op.operands[2] is not None else \
            np.zeros((), xq.type.dtype.np)
        if s is None or z is None or s.size != 1 or z.size != 1 or s.dtype != np.float32:
            return None
        return xq, s.reshape(()), z.reshape(())

    def _weight(self, v, axis: int):
        """(w_q, sw, zw) for the weight operand: sw/zw scalar or 1-D along `axis`, else None."""
        op = v.producer
        if op is not None and op.name == "DequantizeLinear":
            wq = self.c(op.operands[0])
            s = self.c(op.operands[1])
            z = self.c(op.operands[2]) if len(op.operands) > 2 and op.operands[2] is not None else None
            if wq is None or s is None or wq.dtype not in _INT8 or s.dtype != np.float32:
                return None
            z = np.zeros(s.shape, wq.dtype) if z is None else z
            if s.size == 1 and z.size == 1 and not op.attrs.block_size:
                return wq, s.reshape(()), z.reshape(())
            return _per_channel(wq, s, z, op.attrs.axis % wq.ndim, op.attrs.block_size, axis % wq.ndim)
        a = self.c(v)
        if a is None or a.ndim < 1:
            return None
        r = _recover_symmetric(a, None) or _recover_symmetric(a, axis % a.ndim)
        if r is not None:
            return r[0], r[1], np.zeros(r[1].shape, np.int8)
        return _recover_asymmetric_u8(a, None) or _recover_asymmetric_u8(a, axis % a.ndim)

    def _bias(self, v, sx, sw, n: int):
        """b_i32 [n] = rint(B / (sx*sw)) for a constant B of n (or broadcast 1) elements, else None."""
        op = v.producer
        b = self.c(v)
        if b is None and op is not None and op.name == "DequantizeLinear":
            vals = [self.c(x) if x is not None else None for x in op.operands]
            if vals[0] is None or vals[1] is None or op.attrs.block_size:
                return None
            b = dequantize(vals[0], vals[1], vals[2] if len(vals) > 2 else None, np.float32, op.attrs.axis)
        if b is None or b.dtype.kind != "f" or b.size not in (1, n):
            return None
        b = np.broadcast_to(np.asarray(b, np.float64).reshape(-1), (n,))
        q = np.rint(b / (np.float64(sx) * np.broadcast_to(sw.astype(np.float64), (n,))))
        if not np.all(np.isfinite(q)) or np.abs(q).max(initial=0) >= 2 ** 31 - 1:
            return None
        return q.astype(np.int32)

    # ---------------------------------------------------------------- the rewrite

    def _match(self, q: Op, returned):
        """(kind, op, relu, bias_value) for Q's producer chain, else None."""
        y = q.operands[0]
        op = y.producer
        relu = False
        if op is not None and op.name == "Relu" and self._only_use(y, returned):
            relu, y = True, op.operands[0]
            op = y.producer
        if op is None or not self._only_use(y, returned):
            return None
        bias = None
        if op.name == "Add":
            for i in (0, 1):
                m = op.operands[i].producer
                if m is not None and m.name == "MatMul" and self._only_use(op.operands[i], returned):
                    bias, op = op.operands[1 - i], m
                    break
            else:
                return None
        if op.name not in ("Conv", "MatMul", "Gemm") or len(op.results) != 1:
            return None
        if op.name == "Conv" and getattr(op.attrs, "layout", "NCHW") != "NCHW":
            return None
        if op.name == "Conv" and len(op.operands) > 2 and op.operands[2] is not None:
            bias = op.operands[2]
        if op.name == "Gemm":
            a = op.attrs
            if a.transA or a.alpha != 1.0 or (len(op.operands) > 2 and op.operands[2] is not None and a.beta != 1.0):
                return None
            if len(op.operands) > 2:
                bias = op.operands[2]
        return op, relu, bias

    def _int_inputs(self, op: Op):
        """(x_q, sx, zx, W, w_q, sw, zw) for OP(DQ(x_q), W) with an int8 W (w_q as [O, ..] for Conv,
        [K, N] for MatMul/Gemm, transB applied), else None."""
        act = self._act_dq(op.operands[0])
        if act is None:
            return None
        xq, sx, zx = act
        wv = op.operands[1]
        if wv.type.shape is None or len(wv.type.shape) < 2:
            return None
        trans_b = op.name == "Gemm" and bool(op.attrs.transB)
        if op.name == "Conv":
            axis = 0
        elif len(wv.type.shape) != 2:  # a batched weight has no single output-channel axis
            return None
        else:
            axis = 0 if trans_b else 1
        w = self._weight(wv, axis)
        if w is None:
            return None
        wq, sw, zw = w
        if not all(np.all(np.isfinite(a)) and np.all(a > 0) for a in (sx, sw)):
            return None  # a zero / non-finite scale: the literal graph's inf/NaN stays literal
        if trans_b:
            wq = np.ascontiguousarray(wq.T)
        return xq, sx, zx, wv, wq, sw, zw

    def float_out(self, op: Op, b: Builder) -> bool:
        """OP(DQ(x_q), W int8 [, B]) whose f32 result is read by no Q (the classifier of a QDQ model)
        -> ConvInteger / MatMulInteger(x_q, w_q, zx, zw) -> DequantizeLinear(acc, sx*sw) [-> Add(B)]:
        int8 inputs, exact int32 accumulation, f32 output (onnxruntime's MatMulIntegerToFloat)."""
        if op.name not in ("Conv", "MatMul", "Gemm") or len(op.results) != 1:
            return False
        res = op.results[0]
        if res.type.dtype.np != np.float32 or res.type.rank is None:
            return False
        if op.name == "Conv" and getattr(op.attrs, "layout", "NCHW") != "NCHW":
            return False
        bias = op.operands[2] if len(op.operands) > 2 else None
        if op.name == "Gemm" and (op.attrs.transA or op.attrs.alpha != 1.0 or (bias is not None and op.attrs.beta != 1.0)):
            return False
        ins = self._int_inputs(op)
        if ins is None:
            return False
        xq, sx, zx, wv, wq, sw, zw = ins
        bv = None
        if bias is not None:
            bv = self.c(bias)
            if bv is None or bv.dtype != np.float32:
                return False
        loc, hint = op.loc, res.name
        k = b.constant
        xdq, wdq = op.operands[0].producer, wv.producer
        wops = wdq.operands if wdq is not None and wdq.name == "DequantizeLinear" else [None] * 3
        cwq = wops[0] if wops[0] is not None and _same_const(self.c(wops[0]), wq) else \
            k(wq, f"{hint}_w_quantized", loc, weight_hint=f"{hint}_w_quantized")
        czx = xdq.operands[2] if len(xdq.operands) > 2 and xdq.operands[2] is not None else k(zx, f"{hint}_x_zero_point", loc)
        czw = k(zw, f"{hint}_w_zero_point", loc)
        start = b.mark()
        if op.name == "Conv":
            attrs = registry.make_attrs(registry.get("ConvInteger").attrs, {
                f: getattr(op.attrs, f) for f in ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")
                if getattr(op.attrs, f, None) is not None}, "ConvInteger")
            acc = b.create("ConvInteger", [xq, cwq, czx, czw], attrs, names=[f"{hint}_acc"], loc=loc)[0]
            axis = 1
        else:
            acc = b.create("MatMulInteger", [xq, cwq, czx, czw], names=[f"{hint}_acc"], loc=loc)[0]
            axis = -1
        s_acc = (np.float64(sx) * sw.astype(np.float64)).astype(np.float32)
        y = b.create("DequantizeLinear", [acc, k(s_acc, f"{hint}_acc_scale", loc)], {"axis": axis},
                     names=[f"{hint}_f32" if bv is not None else hint], loc=loc)[0]
        if bv is not None:
            bshape = (-1,) + (1,) * (res.type.rank - 2) if op.name == "Conv" else bv.shape
            y = b.create("Add", [y, k(bv.reshape(bshape), f"{hint}_bias", loc)], names=[hint], loc=loc)[0]
        if not b.take_over_or_roll_back(res, y, start):
            return False
        self.counts[f"{op.name}->{acc.producer.name}+float"] += 1
        return True

    def float_region(self, r: Region) -> None:
        """Second sweep: the Conv/MatMul/Gemm the Q folds left (their results go to no Q)."""
        new_ops: list = []
        b = Builder(Region([], new_ops, []), self.w, self.names)
        for op in r.ops:
            for _, sub in op.regions():
                self.float_region(sub)
            if op.name in ("Conv", "MatMul", "Gemm") and self.float_out(op, b):
                continue
            new_ops.append(op)
        r.ops = new_ops

    def fold(self, q: Op, b: Builder, returned) -> bool:
        if q.attrs.block_size or q.attrs.precision is not None:
            return False
        out_dt = np.dtype(q.results[0].type.dtype.np)
        if out_dt not in _INT8:
            return False
        sy = self.c(q.operands[1])
        zy = self.c(q.operands[2]) if len(q.operands) > 2 and q.operands[2] is not None else np.zeros((), out_dt)
        if sy is None or zy is None or sy.size != 1 or zy.size != 1 or sy.dtype != np.float32:
            return False
        sy, zy = sy.reshape(()), zy.reshape(()).astype(out_dt)
        m = self._match(q, returned)
        if m is None:
            return False
        op, relu, bias = m
        ins = self._int_inputs(op)
        if ins is None or not (np.isfinite(sy) and sy > 0):
            return False
        xq, sx, zx, wv, wq, sw, zw = ins
        n = wq.shape[0] if op.name == "Conv" else wq.shape[1]
        b_i32 = None
        if bias is not None:
            b_i32 = self._bias(bias, sx, sw, n)
            if b_i32 is None:
                return False
        loc, hint = op.loc, op.results[0].name
        k = b.constant

        def param(arr, hint_, *candidates):
            """An existing const Value holding exactly `arr` (the Q/DQ's own operand), else a new one."""
            for v in candidates:
                if v is not None and _same_const(self.c(v), arr):
                    return v
            return k(arr, hint_, loc, weight_hint=hint_)

        xdq, wdq = op.operands[0].producer, wv.producer
        wops = wdq.operands if wdq is not None and wdq.name == "DequantizeLinear" else [None] * 3
        csx = param(sx, f"{hint}_x_scale", *xdq.operands[1:])
        czx = param(zx, f"{hint}_x_zero_point", *xdq.operands[2:])
        cwq = param(wq, f"{hint}_w_quantized", wops[0])
        csw = param(sw, f"{hint}_w_scale", *wops[1:2])
        czw = param(zw, f"{hint}_w_zero_point", *wops[2:3])
        csy = param(sy, f"{hint}_y_scale", *q.operands[1:2])
        czy = param(zy, f"{hint}_y_zero_point", *q.operands[2:3])
        start = b.mark()
        lo = _INT8[out_dt][0]
        if op.name == "Conv" or b_i32 is None:
            operands = [xq, csx, czx, cwq, csw, czw, csy, czy]
            if op.name == "Conv":
                if b_i32 is not None:
                    bdq = bias.producer
                    operands.append(param(b_i32, f"{hint}_bias_i32",
                                          bdq.operands[0] if bdq is not None and bdq.name == "DequantizeLinear" else None))
                kind, attrs = "QLinearConv", op.attrs
                attrs = registry.make_attrs(registry.get("QLinearConv").attrs, {
                    f: getattr(attrs, f) for f in ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")
                    if getattr(attrs, f, None) is not None}, "QLinearConv")
            else:
                kind, attrs = "QLinearMatMul", None
            r = b.create(kind, operands, attrs, names=[f"{hint}_q"], loc=loc)[0]
            if relu and zy > lo:
                r = b.create("Max", [r, czy], names=[f"{hint}_q_relu"], loc=loc)[0]
            pattern = f"{kind}{'+Relu' if relu else ''}"
        else:
            acc = b.create("MatMulInteger", [xq, cwq, czx, czw], names=[f"{hint}_acc"], loc=loc)[0]
            acc = b.create("Add", [acc, k(b_i32, f"{hint}_bias_i32", loc, weight_hint=f"{hint}_bias_i32")],
                           names=[f"{hint}_acc_bias"], loc=loc)[0]
            s_acc = (np.float64(sx) * sw.astype(np.float64)).astype(np.float32)
            fl = b.create("DequantizeLinear", [acc, k(s_acc, f"{hint}_acc_scale", loc)],
                          {"axis": -1}, names=[f"{hint}_requant"], loc=loc)[0]
            if relu:
                fl = b.create("Relu", [fl], names=[f"{hint}_requant_relu"], loc=loc)[0]
            r = b.create("QuantizeLinear", [fl, csy, czy], names=[f"{hint}_q"], loc=loc)[0]
            pattern = f"MatMulInteger+bias{'+Relu' if relu else ''}"
        # the last new op computes the Q's result: it takes over that Value (readers unchanged);
        # a type mismatch cannot happen for a verified module: be safe rather than retype
        if not b.take_over_or_roll_back(q.results[0], r, start, loc=q.loc):
            return False
        self.counts[f"{op.name}->{pattern}"] += 1
        return True

    def identity(self, q: Op):
        """x_q for Q(DQ(x_q, s, z), s, z) with equal constant params and dtype, else None."""
        dq = q.operands[0].producer
        if dq is None or dq.name != "DequantizeLinear" or q.attrs.precision is not None:
            return None
        xq = dq.operands[0]
        if xq.type != q.results[0].type or dq.attrs.block_size != q.attrs.block_size:
            return None
        if np.dtype(xq.type.dtype.np) not in _INT8:
            return None
        sq, sd = self.c(q.operands[1]), self.c(dq.operands[1])
        if not _same_const(sq, sd):
            return None
        zq = self.c(q.operands[2]) if len(q.operands) > 2 and q.operands[2] is not None else None
        zd = self.c(dq.operands[2]) if len(dq.operands) > 2 and dq.operands[2] is not None else None
        if (zq is None) != (zd is None) or (zq is not None and not _same_const(zq, zd)):
            return None
        if sq.size > 1 and (q.attrs.axis % xq.type.rank) != (dq.attrs.axis % xq.type.rank):
            return None
        return xq

    def passthrough(self, q: Op, b: Builder, returned, subst: Substitution) -> bool:
        """Q(OP_k(..OP_1(DQ(x_q, s, z))..), s, z), a chain of single-use data movement / MaxPool / Relu
        ops, with the same per-tensor s > 0, z and dtype -> the chain on x_q: movement and MaxPool as
        they are (monotone; exact: rint((x-z)*s/s) = x-z), Relu -> max(x_q, z) (nothing when z is the
        type's minimum)."""
        chain, v = [], q.operands[0]
        while v.producer is not None and v.producer.name in _PASSTHROUGH and len(v.producer.results) == 1 \
                and self._only_use(v, returned):
            chain.append(v.producer)
            v = v.producer.operands[0]
        act = self._act_dq(v)
        if not chain or act is None or q.attrs.precision is not None:
            return False
        xq, sx, zx = act
        dq = v.producer
        sq = self.c(q.operands[1])
        zq = self.c(q.operands[2]) if len(q.operands) > 2 and q.operands[2] is not None else None
        if xq.type.dtype != q.results[0].type.dtype or sq is None or sq.size != 1 or not sx > 0:
            return False
        if sq.reshape(()).tobytes() != sx.tobytes() or (zq if zq is not None else np.zeros((), zx.dtype)).reshape(()) \
                .astype(zx.dtype).tobytes() != zx.tobytes() or (zq is not None and zq.dtype != zx.dtype):
            return False
        res = q.results[0]
        start = b.mark()
        cur, zv = xq, None
        for op in reversed(chain):
            hint = op.results[0].name + "_q"
            if op.name == "Relu":
                if zx == _INT8[np.dtype(zx.dtype)][0]:  # max(x, type minimum) is x
                    continue
                if zv is None:
                    zv = dq.operands[2] if len(dq.operands) > 2 and dq.operands[2] is not None else \
                        b.constant(zx, f"{xq.name}_zero_point", op.loc)
                cur = b.create("Max", [cur, zv], names=[hint], loc=op.loc)[0]
            else:
                cur = b.create(op.name, [cur] + list(op.operands[1:]), op.attrs, names=[hint], loc=op.loc)[0]
        if cur is xq:  # every op of the chain vanished: the Q's readers read x_q
            if xq.type != res.type:
                return False
            subst[res] = xq
        elif not b.take_over_or_roll_back(res, cur, start, loc=q.loc):
            return False
        self.counts[f"Q({'('.join(op.name for op in chain)}(DQ(x)){')' * (len(chain) - 1)})->int8"] += 1
        return True

    def region(self, r: Region, subst: Substitution) -> None:
        returned = {id(v) for v in r.results}
        new_ops: list = []
        b = Builder(Region([], new_ops, []), self.w, self.names)
        for op in r.ops:
            subst.apply(op)
            for _, sub in op.regions():
                self.region(sub, subst)
            if op.name == "QuantizeLinear":
                xq = self.identity(op)
                if xq is not None:
                    subst[op.results[0]] = xq
                    self.counts["Q(DQ(x))->x"] += 1
                    continue
                if self.fold(op, b, returned) or self.passthrough(op, b, returned, subst):
                    continue
            new_ops.append(op)
        r.ops = new_ops
        subst.apply_results(r)

    # ---------------------------------------------------------------- weight-only int4

    def _int4_weight(self, v, trans_b: bool):
        """(w_q [K, N], w_scale [KB, N], w_zero_point or None, block_size) for v = DQ(w_q int4 const,
        scale const, zero point const?) blocked along K (or per output channel: one block of K),
        else None."""
        op = v.producer
        if op is None or op.name != "DequantizeLinear" or len(op.results) != 1:
            return None
        wq = self.c(op.operands[0])
        s = self.c(op.operands[1])
        z = self.c(op.operands[2]) if len(op.operands) > 2 and op.operands[2] is not None else None
        if wq is None or s is None or wq.ndim != 2 or wq.dtype.name not in ("int4", "uint4") \
                or s.dtype.kind != "f" and "float" not in s.dtype.name:
            return None
        if op.results[0].type.dtype.np != s.dtype:
            return None  # (an output_dtype other than the scale's)
        k_axis = 1 if trans_b else 0
        K = wq.shape[k_axis]
        axis = op.attrs.axis % 2
        if op.attrs.block_size:
            if axis != k_axis:
                return None  # blocks along N: not one scale per (K group, column)
            bs = int(op.attrs.block_size)
        elif s.ndim == 1 and s.size > 1 and axis != k_axis:
            bs = K  # per output channel: one group of all K
            s = s.reshape((1, -1)) if not trans_b else s.reshape((-1, 1))
            z = None if z is None else (z.reshape((1, -1)) if not trans_b else z.reshape((-1, 1)))
        else:
            return None
        if trans_b:
            wq, s = wq.T, s.T
            z = None if z is None else z.T
        wq, s = np.ascontiguousarray(wq), np.ascontiguousarray(s)
        if z is not None:
            z = np.ascontiguousarray(z)
            if not np.any(z.astype(np.int64)) and wq.dtype.name == "int4":
                z = None  # an all-zero i4 zero point is the default
        return wq, s, z, bs

    def int4_out(self, op: Op, b: Builder, uses: dict, returned: set, drop: set) -> bool:
        """MatMul(X, DQ(w_q int4 [K, N], ..)) [-> Add(bias along N)] / Gemm(X, DQ(..)[, C]) (transA 0,
        alpha 1; transB folded into w_q) with a float X -> matmul_int4_weight(X, w_q, w_scale[, w_zp]
        [, bias]) (a C or Add that is no bias along N stays an Add)."""
        from nnc.passes.quantize_weights_int4 import bias_after, matmul_int4_ops
        if len(op.results) != 1 or len(op.operands) < 2:
            return False
        trans_b = op.name == "Gemm" and bool(op.attrs.transB)
        if op.name == "Gemm" and (op.attrs.transA or op.attrs.alpha != 1.0):
            return False
        x, res = op.operands[0], op.results[0]
        if not x.type.dtype.is_float or x.type.rank is None or x.type.rank < 1:
            return False
        w = self._int4_weight(op.operands[1], trans_b)
        if w is None:
            return False
        wq, s, z, bs = w
        gemm_c = op.operands[2] if op.name == "Gemm" and len(op.operands) > 2 else None
        after = bias_after(res, uses, returned, self.w) if gemm_c is None else None
        loc, hint = op.loc, res.name
        dq = op.operands[1].producer

        def param(arr, hint_, cand):
            return cand if cand is not None and _same_const(self.c(cand), arr) else \
                b.constant(arr, hint_, loc, weight_hint=hint_)
        consts = [param(wq, f"{hint}_w_int4", dq.operands[0]), param(s, f"{hint}_w_scale", dq.operands[1])]
        if z is not None:
            consts.append(param(z, f"{hint}_w_zero_point", dq.operands[2] if len(dq.operands) > 2 else None))
        got = matmul_int4_ops(b, x, consts, bs, res, gemm_c, op.attrs.beta if gemm_c is not None else 1.0,
                              after, hint, loc, self.w)
        if got is None:
            return False
        drop.update(id(o) for o in got)
        self.counts[f"{op.name}(DQ(int4)){'+Add' if got else ''}->matmul_int4_weight"] += 1
        return True

    def int4_region(self, r: Region) -> None:
        """Third sweep: MatMul / Gemm reading a DQ'd int4 weight (a float X: weight-only int4)."""
        from nnc.ir.graph import users as users_of
        new_ops: list = []
        b = Builder(Region([], new_ops, []), self.w, self.names)
        uses, returned, drop = users_of(r), {id(v) for v in r.results}, set()
        for op in r.ops:
            if id(op) in drop:
                continue
            for _, sub in op.regions():
                self.int4_region(sub)
            if op.name in ("MatMul", "Gemm") and self.int4_out(op, b, uses, returned, drop):
                continue
            new_ops.append(op)
        r.ops = new_ops

def rewrite(module: Module) -> Counter:
    """The folds done, by pattern (what `run` reports as changed)."""
    total: Counter = Counter()
    for f in module.functions:
        fo = _Fold(module, f)
        fo.region(f, Substitution())
        fo.float_region(f)
        fo.int4_region(f)
        from nnc.passes.quantize_fp8 import fold_sweep  # a fourth sweep: float8 QDQ -> matmul_fp8
        fp8 = fold_sweep(module, f, fo.names)
        if fp8:
            fo.counts["MatMul/Gemm(DQ(fp8), DQ(fp8 const))->matmul_fp8"] += fp8
        total += fo.counts
    return total


def run(module: Module) -> bool:
    return bool(rewrite(module))
