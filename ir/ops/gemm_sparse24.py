"""2:4 structured-sparse weight matrix product: `matmul_sparse24`, nnc's own op (the same family
name as codegen/kernels/gemm_sparse24.py and templates/gemm_sparse24.cu.j2).

    %y = matmul_sparse24(%x, %w_values, %w_meta[, %bias]) {activation = "none"} : T[.., N]

x: T[.., K] (float: f32 / f16 / bf16), K % 4 == 0; the weight W [K, N] is stored compressed along
its reduction dimension K, row n of W^T (column n of W) in groups of 4 consecutive k:

    w_values: T[N, K/2]  the two kept values of each group, in k order (group g -> columns 2g, 2g+1)
    w_meta:   u8[N, K/4] the group's code i0 | i1 << 2 (0 <= i0 < i1 <= 3: the kept positions in
                         the group; the PTX ISA's ordered 2:4 metadata, one group per byte)
    bias:     T[N] (optional)

    W[4g + i0, n] = w_values[n, 2g], W[4g + i1, n] = w_values[n, 2g + 1], the other two are 0
    y = act(f32(x) @ f32(W) [+ f32(bias)]) as T                         (fp32 accumulation)

activation: "none" | "relu" | "gelu" (erf) | "gelu_tanh" (the epilogue of the kernel family;
compiler/passes/sparsify_weights_24.py folds a following Relu or Gelu op). The meaning is exactly the MatMul it replaces when W is already 2:4-sparse
(`--sparsity enable`); `--sparsity force` prunes W first (a different model: see the pass).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..registry import register
from ..types import TensorType

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh")
# the six valid (i0 < i1) codes: i0 | i1 << 2
VALID_CODES = tuple(i0 | i1 << 2 for i1 in range(4) for i0 in range(i1))


@dataclass(frozen=True)
class MatMulSparse24Attrs:
    activation: str = "none"  # applied in fp32 after the bias, before the store


def _infer(ctx):
    xs, vs, ms = ctx.shape(0), ctx.shape(1), ctx.shape(2)
    if ctx.attrs.activation not in ACTIVATIONS:
        ctx.fail(f"activation must be one of {ACTIVATIONS}, got {ctx.attrs.activation!r}")
    if not ctx.dtype(0).is_float:
        ctx.fail(f"x must be float, got {ctx.dtype(0)}")
    if ctx.dtype(1) != ctx.dtype(0):
        ctx.fail(f"w_values must have x's dtype {ctx.dtype(0)}, got {ctx.dtype(1)}")
    if ctx.dtype(2).short != "u8":
        ctx.fail(f"w_meta must be u8, got {ctx.dtype(2)}")
    if len(xs) < 1 or len(vs) != 2 or len(ms) != 2:
        ctx.fail(f"needs x of rank >= 1, w_values [N, K/2] and w_meta [N, K/4]; got {ctx.type(0)}, "
                 f"{ctx.type(1)}, {ctx.type(2)}")
    N, KH = vs
    K = xs[-1]
    if isinstance(K, int):
        if K % 4:
            ctx.fail(f"x's last dim K = {K} is not a multiple of 4 (2:4 groups along K)")
        if isinstance(KH, int) and KH * 2 != K:
            ctx.fail(f"w_values must be [N, {K // 2}] for K = {K}, got {ctx.type(1)}")
        if tuple(ms) != (N, K // 4):
            ctx.fail(f"w_meta must be [{N}, {K // 4}] for K = {K}, got {ctx.type(2)}")
    if ctx.has(3):
        if ctx.dtype(3) != ctx.dtype(0) or tuple(ctx.shape(3)) != (N,):
            ctx.fail(f"bias must be {ctx.dtype(0)}[{N}], got {ctx.type(3)}")
    return [TensorType(ctx.dtype(0), tuple(xs[:-1]) + (N,))]


def decompress(w_values: np.ndarray, w_meta: np.ndarray) -> np.ndarray:
    """W [K, N] in w_values' dtype from the compressed form (the op's definition above)."""
    N, KH = w_values.shape
    G = KH // 2
    meta = np.asarray(w_meta, np.uint8).reshape(N, G)
    i0, i1 = (meta & 3).astype(np.int64), (meta >> 2 & 3).astype(np.int64)
    if np.any(i0 >= i1):
        raise ValueError("w_meta holds a code that is not i0 | i1 << 2 with i0 < i1")
    wt = np.zeros((N, G, 4), w_values.dtype)
    v = w_values.reshape(N, G, 2)
    n_idx, g_idx = np.meshgrid(np.arange(N), np.arange(G), indexing="ij")
    wt[n_idx, g_idx, i0] = v[..., 0]
    wt[n_idx, g_idx, i1] = v[..., 1]
    return np.ascontiguousarray(wt.reshape(N, 4 * G).T)


def _ref(a, x, w_values, w_meta, bias=None):
    w = decompress(w_values, w_meta)
    y = np.matmul(x.astype(np.float32), w.astype(np.float32))
    if bias is not None:
        y = y + bias.astype(np.float32)
    if a.activation == "relu":
        y = np.maximum(y, np.float32(0))
    elif a.activation in ("gelu", "gelu_tanh"):
        from .elementwise import GeluAttrs, _gelu
        y = _gelu(GeluAttrs("tanh" if a.activation == "gelu_tanh" else "none"), y)
    return y.astype(x.dtype)


register("matmul_sparse24", MatMulSparse24Attrs, infer=_infer, ref=_ref, inputs=(3, 4),
         doc="y = act(x @ W [+ bias]) with W [K, N] 2:4-sparse along K, stored as w_values [N, K/2] and "
             "w_meta u8 [N, K/4] (i0 | i1 << 2 per group of 4), fp32 accumulation")
