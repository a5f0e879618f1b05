"""Weight-only int4 at compile time (`nnc compile --weights int4 [--int4-block 32|64|128]`).

Rewrites: MatMul(X, W) [-> Add of a constant along N] and Gemm(X, W[, C]) (transA 0, alpha 1;
transB folded) with a float X and a constant float W [K, N] (2-D) -> matmul_int4_weight(X, w_q i4
[K, N], w_scale [ceil(K/B), N][, none, bias]) {block_size = B} (ir/ops/gemm_int4.py; a C that is
no bias along N: Add(beta*C) after it), symmetric group-wise: for column n and group g (rows
g*B .. g*B+B-1 of K; the last group may be short)

    s[g, n] = max|W[group, n]| / d, d in DIVISORS (7 .. 10) with the least squared error of the group,
              rounded to f16 (bf16 for a bf16 W; at least 2^-14), stored in W's dtype
    w_q[k, n] = clip(rint(W[k, n] / s[g, n]), -8, 7)

(no zero point: the i4 value 0 is the float 0). The scales are fp16-representable, so the fp16 /
bf16 precision passes convert them exactly and the int4 kernel reads them as they are.

Accuracy effect (measured on N(0, 1) weights [4096, 1024]; tests/test_gemm_int4.py checks it): the
relative L2 error of W, and of X @ W for a random X, is about 8.7% at B = 32, 9.5% at B = 64, 10.2%
at B = 128 (9.7 / 10.8 / 11.9% with d = 7 alone) — the usual cost of round-to-nearest 4-bit weights
(no calibration data, no GPTQ/AWQ-style correction): for models trained or calibrated for int4
weights; too coarse for an arbitrary float model (measure it on your data: the build with
CompileOptions(weights="int4") against the float one; `nnc verify` has no --weights yet).
Requires: a verified module with folded constants; run after fuse-horizontal (stacked Q/K/V weights
quantize as one) and before the precision and fusion passes (compiler/driver.pipeline_passes).
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

import numpy as np

from nnc.ir import narrow_types
from nnc.ir.builder import Builder, const_value
from nnc.ir.graph import Module, NameGen, Op, value_names
from nnc.ir.types import dtype as ir_dtype

from .weight_rewrite import WeightOpRewriter, float_weight_kn

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


def bias_vector(b: Optional[np.ndarray], n: int, dt) -> Optional[np.ndarray]:
    """b (a constant) as an [n] bias in dt when it broadcasts along the last axis only ([n], [1, n],
    .. or one element), else None."""
    if b is None or b.dtype.kind != "f" and b.dtype.name != "bfloat16":
        return None
    if b.size == 1:
        return np.full(n, b.reshape(()), dtype=dt)
    if b.shape[-1] != n or b.size != n:
        return None
    return np.ascontiguousarray(b.reshape(n).astype(dt))


def bias_after(res, uses: dict, returned: set, weights):
    """(the Add, bias [N]) when res's only reader is Add(res, constant bias along N) (either
    order) of res's type, else None: the Add folds into matmul_int4_weight's bias operand."""
    readers = uses.get(id(res), ())
    if len(readers) != 1 or id(res) in returned:
        return None
    add = readers[0]
    if add.name != "Add" or len(add.operands) != 2 or add.results[0].type != res.type:
        return None
    other = add.operands[1] if add.operands[0] is res else add.operands[0]
    if other is res:
        return None
    b = bias_vector(const_value(other, weights), int(res.type.shape[-1]), res.type.dtype.np)
    return None if b is None else (add, b)


def matmul_int4_ops(b: Builder, x, consts: list, block_size: int, res, gemm_c, beta: float, after,
                    hint: str, loc, weights) -> Optional[list]:
    """Emits matmul_int4_weight(x, *consts[, bias]) [-> Add(beta * C)] whose last op takes over
    `res` (or the folded Add's result); gemm_c: a Gemm's C (a constant along N becomes the bias),
    after: bias_after's answer for a MatMul. Returns the ops to drop later (the folded Add), or
    None (nothing emitted: the types would not match)."""
    start = b.mark()
    n = int(res.type.shape[-1])
    bias, add_c, drop = None, None, []
    if gemm_c is not None:
        cv = const_value(gemm_c, weights)
        bias = None if cv is None else bias_vector((cv.astype(np.float64) * beta).astype(cv.dtype), n, res.type.dtype.np)
        if bias is None:
            if beta != 1.0:
                if cv is None:
                    return None
                add_c = b.constant((cv * cv.dtype.type(beta)).astype(cv.dtype), f"{hint}_bias", loc)
            else:
                add_c = gemm_c
    elif after is not None:
        drop, bias = [after[0]], after[1]
        res = after[0].results[0]
    operands = [x] + list(consts)
    if bias is not None:
        operands += [None] * (4 - len(operands)) + [b.constant(bias, f"{hint}_bias", loc, weight_hint=f"{hint}_bias")]
    y = b.create("matmul_int4_weight", operands, {"block_size": block_size},
                 names=[f"{hint}_int4" if add_c is not None else hint], loc=loc)[0]
    if add_c is not None:
        y = b.create("Add", [y, add_c], names=[hint], loc=loc)[0]
    if not b.take_over_or_roll_back(res, y, start):
        return None
    return drop


class _Quantize(WeightOpRewriter):
    def __init__(self, module: Module, block_size: int):
        self.module = module
        self.bs = block_size
        self.names = NameGen(value_names(module))
        self.counts: Counter = Counter()

    def op(self, op: Op, b: Builder, uses: dict, returned: set, drop: set) -> bool:
        w = float_weight_kn(op, self.module.weights)
        if w is None:
            return False
        x, res = op.operands[0], op.results[0]
        gemm_c = op.operands[2] if op.name == "Gemm" and len(op.operands) > 2 else None
        after = bias_after(res, uses, returned, self.module.weights) if gemm_c is None else None
        q, s = quantize_int4(w, self.bs)
        loc, hint = op.loc, res.name
        consts = [b.constant(q, f"{hint}_w_int4", loc, weight_hint=f"{hint}_w_int4"),
                  b.constant(s, f"{hint}_w_scale", loc, weight_hint=f"{hint}_w_scale")]
        got = matmul_int4_ops(b, x, consts, self.bs, res, gemm_c, op.attrs.beta if gemm_c is not None else 1.0,
                              after, hint, loc, self.module.weights)
        if got is None:
            return False
        drop.update(id(o) for o in got)
        self.counts[f"{op.name}{'+Add' if got else ''}->matmul_int4_weight"] += 1
        return True


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
