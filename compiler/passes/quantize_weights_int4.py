"""Weight-only int4 at compile time (`nnc compile --weights int4 [--int4-block 32|64|128]`).

Rewrites: MatMul(X, W) and Gemm(X, W[, C]) (transA 0, alpha 1; transB folded) with a float X and a
constant float W [K, N] (2-D) -> matmul_int4_weight(X, w_q i4 [K, N], w_scale [ceil(K/B), N])
{block_size = B} [-> Add(beta*C)] (ir/ops/gemm_int4.py), symmetric group-wise: for column n and
group g (rows g*B .. g*B+B-1 of K; the last group may be short)

    s[g, n] = max|W[group, n]| / d, d in DIVISORS (7 .. 10) with the least squared error of the group,
              rounded to f16 (bf16 for a bf16 W; at least 2^-14), stored in W's dtype
    w_q[k, n] = clip(rint(W[k, n] / s[g, n]), -8, 7)

(no zero point: the i4 value 0 is the float 0). The scales are fp16-representable, so the fp16 /
bf16 precision passes convert them exactly and the int4 kernel reads them as they are.

Accuracy effect (measured on N(0, 1) weights [4096, 1024]; tests/test_gemm_int4.py checks it): the
relative L2 error of W, and of X @ W for a random X, is about 8.7% at B = 32, 9.5% at B = 64, 10.2%
at B = 128 (9.7 / 10.8 / 11.9% with d = 7 alone) — the usual cost of round-to-nearest 4-bit weights
(no calibration data, no GPTQ/AWQ-style correction): for models trained or calibrated for int4
weights; too coarse for an arbitrary float model (check with `nnc verify`).
Requires: a verified module with folded constants; run after fuse-horizontal (stacked Q/K/V weights
quantize as one) and before the precision and fusion passes (compiler/driver.pipeline_passes).
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from nnc.ir import narrow_types
from nnc.ir.builder import Builder, const_value
from nnc.ir.graph import Module, NameGen, Op, Region, value_names
from nnc.ir.types import dtype as ir_dtype

BLOCK_SIZES = (32, 64, 128)
_F16_MIN_NORMAL = 2.0 ** -14
# max|w| / d: 7 maps the largest weight onto 7 exactly; larger d clip it (onto -8 or 7) for a finer step
DIVISORS = (7.0, 7.25, 7.5, 7.75, 8.0, 8.5, 9.0, 10.0)


def _round_scale(s: np.ndarray, bf16: bool) -> np.ndarray:
    """Scales rounded to f16 (bf16) and kept >= 2^-14, as f32."""
    import ml_dtypes
    s = np.maximum(s, np.float32(_F16_MIN_NORMAL))
    return s.astype(ml_dtypes.bfloat16 if bf16 else np.float16).astype(np.float32)


def quantize_int4(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(w_q int4 [K, N], scale [ceil(K/B), N] in w's dtype): symmetric group-wise along K, each
    group's scale max|w| / d for the d of DIVISORS with the least squared error."""
    import ml_dtypes
    K, N = w.shape
    KB = -(-K // block_size)
    pad = np.zeros((KB * block_size, N), np.float32)
    pad[:K] = w.astype(np.float32)
    g = pad.reshape(KB, block_size, N)
    amax = np.abs(g).max(axis=1)
    bf16 = w.dtype == ml_dtypes.bfloat16
    best_err, best_s = None, None
    for d in DIVISORS:
        s = _round_scale(amax / np.float32(d), bf16)
        err = np.square(np.clip(np.rint(g / s[:, None]), -8, 7) * s[:, None] - g).sum(axis=1)
        if best_err is None:
            best_err, best_s = err, s
        else:
            better = err < best_err
            best_err, best_s = np.where(better, err, best_err), np.where(better, s, best_s)
    q = np.clip(np.rint(g / best_s[:, None]), -8, 7).reshape(KB * block_size, N)[:K].astype(np.int8)
    return narrow_types.cast_to_narrow(q, ir_dtype("i4")), best_s.astype(w.dtype)


class _Quantize:
    def __init__(self, module: Module, block_size: int):
        self.module = module
        self.bs = block_size
        self.names = NameGen(value_names(module))
        self.counts: Counter = Counter()

    def op(self, op: Op, b: Builder) -> bool:
        if op.name not in ("MatMul", "Gemm") or len(op.results) != 1:
            return False
        if op.name == "Gemm" and (op.attrs.transA or op.attrs.alpha != 1.0):
            return False
        x, res = op.operands[0], op.results[0]
        w = const_value(op.operands[1], self.module.weights)
        if not x.type.dtype.is_float or x.type.rank is None or x.type.rank < 1 or w is None or w.ndim != 2:
            return False
        if w.dtype.kind != "f" and w.dtype.name != "bfloat16" or w.dtype == np.float64 or w.size == 0:
            return False
        if op.name == "Gemm" and op.attrs.transB:
            w = w.T
        bias = op.operands[2] if op.name == "Gemm" and len(op.operands) > 2 else None
        cb = None
        if bias is not None and op.attrs.beta != 1.0:
            cb = const_value(bias, self.module.weights)
            if cb is None:
                return False
        q, s = quantize_int4(np.ascontiguousarray(w), self.bs)
        loc, hint = op.loc, res.name
        start = len(b.region.ops)
        ops = [x, b.constant(q, f"{hint}_w_int4", loc, weight_hint=f"{hint}_w_int4"),
               b.constant(s, f"{hint}_w_scale", loc, weight_hint=f"{hint}_w_scale")]
        y = b.create("matmul_int4_weight", ops, {"block_size": self.bs},
                     names=[f"{hint}_int4" if bias is not None else hint], loc=loc)[0]
        if bias is not None:
            c = bias if cb is None else b.constant((cb * cb.dtype.type(op.attrs.beta)).astype(cb.dtype),
                                                   f"{hint}_bias", loc)
            y = b.create("Add", [y, c], names=[hint], loc=loc)[0]
        if y.type != res.type:
            del b.region.ops[start:]
            return False
        last = y.producer
        self.names.taken.discard(y.name)
        last.results = [res]
        res.producer = last
        self.counts[f"{op.name}->matmul_int4_weight"] += 1
        return True

    def region(self, r: Region) -> None:
        new_ops: list = []
        b = Builder(Region([], new_ops, []), self.module.weights, self.names)
        for op in r.ops:
            for _, sub in op.regions():
                self.region(sub)
            if self.op(op, b):
                continue
            new_ops.append(op)
        r.ops = new_ops


def rewrite(module: Module, block_size: int = 32) -> Counter:
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"int4 block size must be one of {BLOCK_SIZES}, not {block_size!r}")
    q = _Quantize(module, block_size)
    for f in module.functions:
        q.region(f)
    return q.counts


def make_pass(block_size: int = 32):
    """The pipeline entry's function for --int4-block B (compiler/driver.pipeline_passes)."""
    def quantize_weights_int4(module: Module) -> bool:
        return bool(rewrite(module, block_size))
    return quantize_weights_int4


def run(module: Module) -> bool:
    """`nnc opt --passes quantize-weights-int4`: block size 32."""
    return bool(rewrite(module, 32))
