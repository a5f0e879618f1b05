"""2:4 structured sparsity of constant weights (`nnc compile --sparsity enable|force`, TensorRT's
`--sparsity` meanings).

Rewrites: MatMul(X, W) [-> Add of a constant along N] [-> Relu | Gelu] and Gemm(X, W[, C]) (transA 0,
alpha 1; transB folded; C absent or a constant bias along N) with a float X and a constant float W
[K, N] (2-D, K % 4 == 0) -> matmul_sparse24(X, w_values [N, K/2], w_meta u8 [N, K/4][, bias])
{activation} (ir/ops/gemm_sparse24.py), when W is 2:4-sparse along K: in every column n, each group
of 4 consecutive k (rows 4g .. 4g+3) holds at most 2 non-zeros.

    mode "enable": only weights that are already 2:4-sparse (the op's meaning is then exactly the
                   MatMul's: the kernel family still races a dense GEMM of the decompressed weight)
    mode "force":  every eligible weight is pruned first, by magnitude: in each group the 2 largest
                   |w| are kept (ties: the lower k), the other 2 set to 0. THIS CHANGES THE MODEL'S
                   NUMBERS (a UserWarning says how many weights and their relative L2 change): it is
                   for timing the sparse kernels on a model that was not trained 2:4-sparse, as
                   TensorRT's --sparsity=force is. A model fine-tuned after pruning is "enable".

Each kept group stores its 2 values in k order and the code i0 | i1 << 2 (i0 < i1 the kept
positions; a group with fewer than 2 non-zeros keeps a zero in a free position), so the compressed
form is exact for a 2:4 weight. A following Add of a constant bias along N folds into the bias
operand, then a Relu or Gelu op, or a GELU written out as ops (BERT's Div/Erf/Add/Mul, GPT-2's tanh
form: fuse_epilogue.match_gelu), into activation "relu" / "gelu" / "gelu_tanh" (each only when nothing
else reads the value it takes, and that value is not a result).
Requires: a verified module with folded constants; runs before fuse-horizontal (which stacks Q/K/V
into one batched [3, K, N] weight this pass does not take: three sparse GEMMs instead of one dense
one; BERT-base: 48 of its 48 encoder GEMMs sparse instead of 36) and before the precision passes (which convert w_values like any constant) and the
fusion passes (compiler/driver.pipeline_passes). Not combined with --weights int4.
"""
from __future__ import annotations

import warnings
from collections import Counter

import numpy as np

from nnc.ir.builder import Builder, const_value
from nnc.ir.graph import Module, NameGen, Op, value_names

from .quantize_weights_int4 import bias_after, bias_vector
from .weight_rewrite import WeightOpRewriter, float_weight_kn

MODES = ("enable", "force")


def is_sparse24(w: np.ndarray) -> bool:
    """Whether W [K, N] (K % 4 == 0) has at most 2 non-zeros in each group of 4 consecutive k."""
    K, N = w.shape
    return bool(((w.reshape(K // 4, 4, N) != 0).sum(axis=1) <= 2).all())


def prune24(w: np.ndarray) -> np.ndarray:
    """W with, in each group of 4 consecutive k of each column, the 2 largest |w| kept (ties: the
    lower k) and the other 2 zeroed (magnitude pruning); a 2:4 W comes back unchanged."""
    K, N = w.shape
    g = w.reshape(K // 4, 4, N)
    order = np.argsort(-np.abs(g.astype(np.float32)), axis=1, kind="stable")
    keep = np.zeros(g.shape, bool)
    np.put_along_axis(keep, order[:, :2], True, axis=1)
    return np.where(keep, g, np.zeros((), w.dtype)).reshape(K, N)


def compress24(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(w_values [N, K/2] in w's dtype, w_meta u8 [N, K/4]) of a 2:4-sparse W [K, N]: per group the
    two kept positions i0 < i1 (the non-zeros, completed with the lowest zero positions) and their
    values; ir/ops/gemm_sparse24.decompress inverts it exactly."""
    K, N = w.shape
    g = np.ascontiguousarray(w.T).reshape(N, K // 4, 4)
    nz = g != 0
    # rank: non-zeros first, then by position (a stable sort on "is zero")
    pos = np.sort(np.argsort(~nz, axis=2, kind="stable")[..., :2], axis=2)
    vals = np.take_along_axis(g, pos, axis=2)
    meta = (pos[..., 0] | pos[..., 1] << 2).astype(np.uint8)
    return np.ascontiguousarray(vals.reshape(N, K // 2)), np.ascontiguousarray(meta)


def _activation_after(res, uses: dict, returned: set, weights):
    """([the Relu / Gelu op, or the ops of a GELU written out as Div/Erf/Add/Mul (BERT) or the tanh
    form (GPT-2): fuse_epilogue.match_gelu], the result, its activation name) when they are all of
    res's readers and res is no result, else None."""
    if id(res) in returned:
        return None
    readers = uses.get(id(res), ())
    if len(readers) == 1 and len(readers[0].results) == 1 and readers[0].results[0].type == res.type:
        r = readers[0]
        if r.name == "Relu":
            return [r], r.results[0], "relu"
        if r.name == "Gelu":
            return [r], r.results[0], "gelu_tanh" if r.attrs.approximate == "tanh" else "gelu"
    from .fuse_epilogue import match_gelu
    got = match_gelu(res, lambda v: list(uses.get(id(v), ())), lambda v: const_value(v, weights))
    if got is None:
        return None
    ops, out, approx = got
    if out.type != res.type or not all(any(o is r for o in ops) for r in readers):
        return None
    return list(ops), out, "gelu_tanh" if approx == "tanh" else "gelu"


class _Sparsify(WeightOpRewriter):
    def __init__(self, module: Module, mode: str):
        self.module, self.mode = module, mode
        self.names = NameGen(value_names(module))
        self.counts: Counter = Counter()
        self.pruned_sq = self.weight_sq = 0.0

    def weight_of(self, op: Op):
        """W [K, N] (transB folded) when op is an eligible MatMul/Gemm with K % 4 == 0, else None."""
        w = float_weight_kn(op, self.module.weights)
        return w if w is not None and w.shape[0] % 4 == 0 else None

    def op(self, op: Op, b: Builder, uses: dict, returned: set, drop: set) -> bool:
        w = self.weight_of(op)
        if w is None:
            return False
        res = op.results[0]
        n = int(res.type.shape[-1])
        bias, folded = None, []
        if op.name == "Gemm" and len(op.operands) > 2 and op.operands[2] is not None:
            cv = const_value(op.operands[2], self.module.weights)
            if cv is None:
                return False
            bias = bias_vector((cv.astype(np.float64) * op.attrs.beta).astype(cv.dtype), n, res.type.dtype.np)
            if bias is None:
                return False
        else:
            after = bias_after(res, uses, returned, self.module.weights)
            if after is not None:
                folded, bias = [after[0]], after[1]
                res = after[0].results[0]
        if not is_sparse24(w):
            if self.mode != "force":
                return False
            pruned = prune24(w)
            self.pruned_sq += float(np.square((w - pruned).astype(np.float64)).sum())
            self.weight_sq += float(np.square(w.astype(np.float64)).sum())
            self.counts["pruned"] += 1
            w = pruned
        act = _activation_after(res, uses, returned, self.module.weights)
        if act is not None:
            folded += act[0]
            res = act[1]
        vals, meta = compress24(w)
        loc, hint = op.loc, op.results[0].name
        operands = [op.operands[0], b.constant(vals, f"{hint}_w_sp24", loc, weight_hint=f"{hint}_w_sp24"),
                    b.constant(meta, f"{hint}_w_meta", loc, weight_hint=f"{hint}_w_meta")]
        if bias is not None:
            operands.append(b.constant(bias, f"{hint}_bias", loc, weight_hint=f"{hint}_bias"))
        start = b.mark()
        y = b.create("matmul_sparse24", operands, {"activation": act[2] if act is not None else "none"},
                     names=[res.name], loc=loc)[0]
        if not b.take_over_or_roll_back(res, y, start):  # (the weight's dtype differs from x's)
            return False
        drop.update(id(o) for o in folded)
        self.counts[f"{op.name}{'+Add' if bias is not None and op.name == 'MatMul' else ''}"
                    f"{'+' + (act[0][0].name if len(act[0]) == 1 else 'GELU ops') if act is not None else ''}"
                    f"->matmul_sparse24"] += 1
        return True


def rewrite(module: Module, mode: str = "enable") -> Counter:
    """The rewrite; returns counts by pattern ("pruned": weights --sparsity force changed)."""
    if mode not in MODES:
        raise ValueError(f"sparsity mode must be one of {MODES}, not {mode!r}")
    s = _Sparsify(module, mode)
    for f in module.functions:
        s.region(f)
    if s.counts["pruned"]:
        rel = (s.pruned_sq / s.weight_sq) ** 0.5 if s.weight_sq else 0.0
        warnings.warn(f"--sparsity force pruned {s.counts['pruned']} MatMul/Gemm weight(s) to 2:4 by magnitude "
                      f"(relative L2 change of those weights {rel:.3f}): this changes the model's outputs; it is "
                      f"for timing sparse kernels, not for accuracy (use a model fine-tuned 2:4-sparse with "
                      f"--sparsity enable)", UserWarning, stacklevel=2)
    return s.counts


def make_pass(mode: str = "enable"):
    """The pipeline entry's function for --sparsity MODE (compiler/driver.pipeline_passes)."""
    if mode not in MODES:
        raise ValueError(f"sparsity mode must be one of {MODES}, not {mode!r}")

    def sparsify_weights_24(module: Module) -> bool:
        c = rewrite(module, mode)
        return any(v for k, v in c.items() if k != "pruned")
    return sparsify_weights_24


def run(module: Module) -> bool:
    """`nnc opt --passes sparsify-weights-24`: mode "enable" (weights already 2:4-sparse only)."""
    return make_pass("enable")(module)
