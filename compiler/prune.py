"""`nnc prune MODEL --2:4 -o pruned.onnx`: a 2:4-pruned copy of an ONNX model (issue 12).

Every constant weight of a MatMul (input B, [K, N]) or Gemm (input B, [K, N], or [N, K] with transB)
whose K is a multiple of 4 is pruned along K by magnitude (compiler/passes/sparsify_weights_24.prune24:
in each group of 4 consecutive k of each output column the 2 largest |w| stay), in the initializer
itself, so the copy runs anywhere (onnxruntime, TensorRT) and `nnc compile --sparsity enable` takes
it. The pruned model computes different numbers: it is for tests, and for fine-tuning the kept
weights afterwards (the usual 2:4 workflow). An initializer read in two orientations (MatMul and a
transposed Gemm) or by other ops is left alone, and said so.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PrunedWeight:
    name: str          # the initializer
    shape: tuple       # as stored
    rel_change: float  # ||W - pruned|| / ||W||
    was_sparse: bool   # already 2:4 along K (unchanged)


def _k_axis(node) -> int:
    """The axis of input B that is K: 0, or 1 for a Gemm with transB."""
    if node.op_type == "Gemm":
        for a in node.attribute:
            if a.name == "transB" and a.i:
                return 1
    return 0


def prune_model(model) -> tuple[object, list, list]:
    """(the model with its eligible weights pruned in place, [PrunedWeight], [skipped (name, why)])."""
    from onnx import numpy_helper as nh

    from .passes.sparsify_weights_24 import is_sparse24, prune24
    inits = {t.name: t for t in model.graph.initializer}
    uses: dict = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in inits:
                uses.setdefault(name, []).append((node, i))
    done, skipped = [], []
    for name, readers in uses.items():
        gemms = [(n, i) for n, i in readers if n.op_type in ("MatMul", "Gemm") and i == 1]
        if not gemms:
            continue
        axes = {_k_axis(n) for n, _ in gemms}
        if len(gemms) != len(readers) or len(axes) != 1:
            skipped.append((name, "also read by another op or in another orientation"))
            continue
        w = nh.to_array(inits[name])
        if w.ndim != 2 or w.dtype.kind != "f":
            skipped.append((name, f"not a 2-D float weight ({w.dtype}, {w.shape})"))
            continue
        wk = w if axes == {0} else w.T
        if wk.shape[0] % 4:
            skipped.append((name, f"K = {wk.shape[0]} is not a multiple of 4"))
            continue
        sparse = is_sparse24(wk)
        p = wk if sparse else prune24(np.ascontiguousarray(wk))
        norm = float(np.linalg.norm(wk.astype(np.float64)))
        rel = float(np.linalg.norm((wk - p).astype(np.float64)) / norm) if norm else 0.0
        out = p if axes == {0} else p.T
        inits[name].CopyFrom(nh.from_array(np.ascontiguousarray(out).astype(w.dtype), name))
        done.append(PrunedWeight(name, tuple(w.shape), rel, sparse))
    return model, done, skipped


def prune_file(src: str, dst: str) -> tuple[list, list]:
    """Reads src (external data included), writes the pruned copy to dst (external data beside it
    when the model is over 2 GB)."""
    import onnx
    model = onnx.load(src)
    model, done, skipped = prune_model(model)
    if model.ByteSize() > 2 ** 31 - 2 ** 20:
        from pathlib import Path
        onnx.save(model, dst, save_as_external_data=True, location=Path(dst).name + ".data")
    else:
        onnx.save(model, dst)
    return done, skipped
