"""Graph-only models (written by tools/export_graphs.py on the GPU machine) made runnable again.

    from tools.graph_models import load_graph_model, GRAPHS
    model = load_graph_model(GRAPHS / "bert_base.graph.onnx")   # onnx.ModelProto with weights

Every stripped float initializer is refilled with normal(mean, std) of the original tensor, seeded by
its name (crc32), so a given file always gives the same weights. Kept small float parameters get
seeded noise (PERTURB_STD) so that layers do not share bit-identical biases. Everything else (small tensors,
integer and bool tables, the graph) is the exported model itself. The models are the issue's real
graph structure for launch counts, pass development and CPU runs; their outputs are not the
originals' (the weights differ), so numerical checks compare nnc against onnxruntime or the
interpreter on the refilled model.

    python tools/graph_models.py NAME.graph.onnx -o NAME.onnx    # write the refilled model
"""
from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GRAPHS = ROOT / "tests" / "models" / "graphs"
STATS_KEY = "nnc.stripped_weights"


# Kept small float parameters (biases, LayerNorm gains) come out of random initialisation all
# equal (zeros, ones): cse would then merge them across layers, which trained weights never allow,
# and launch counts would flatter nnc. They get this much seeded noise.
PERTURB_STD = 0.02


def _is_parameter(t) -> bool:
    """A named float module parameter of the export (torch.onnx names constants it makes 'onnx::...')."""
    from onnx import TensorProto
    n = 1
    for d in t.dims:
        n *= d
    return (t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
            and n > 1 and not t.name.startswith("onnx::"))


def _unshare_parameters(m) -> None:
    """torch.onnx stores bit-identical initializers once: every zero bias and every unit LayerNorm
    gain of a randomly initialised model is ONE tensor read by all layers. Trained weights are
    distinct per layer, so each further use of a shared parameter gets its own perturbed copy."""
    from onnx import numpy_helper
    params = {t.name: t for t in m.graph.initializer if _is_parameter(t)}
    seen: dict = {}
    for node in m.graph.node:
        for i, name in enumerate(node.input):
            if name not in params:
                continue
            k = seen.get(name, 0)
            seen[name] = k + 1
            if k == 0:
                continue
            new = f"{name}.use{k}"
            rng = np.random.default_rng(zlib.crc32(new.encode()))
            a = numpy_helper.to_array(params[name])
            a = (a + rng.standard_normal(a.shape) * PERTURB_STD).astype(a.dtype)
            m.graph.initializer.append(numpy_helper.from_array(a, new))
            node.input[i] = new


def load_graph_model(path, perturb: bool = True):
    import onnx
    from onnx import helper, numpy_helper
    m = onnx.load(str(path))
    props = {p.key: p.value for p in m.metadata_props}
    stats = json.loads(props.get(STATS_KEY, "{}"))
    for t in m.graph.initializer:
        if t.name not in stats:
            if perturb and _is_parameter(t):
                rng = np.random.default_rng(zlib.crc32(t.name.encode()))
                a = numpy_helper.to_array(t)
                a = (a + rng.standard_normal(a.shape) * PERTURB_STD).astype(a.dtype)
                t.CopyFrom(numpy_helper.from_array(a, t.name))
            continue
        mean, std = stats[t.name]
        rng = np.random.default_rng(zlib.crc32(t.name.encode()))
        dt = helper.tensor_dtype_to_np_dtype(t.data_type)
        a = (rng.standard_normal(tuple(t.dims)) * std + mean).astype(dt)
        t.CopyFrom(numpy_helper.from_array(a, t.name))
    if perturb:
        _unshare_parameters(m)
    keep = [p for p in m.metadata_props if p.key != STATS_KEY]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    return m


def main() -> int:
    import onnx
    ap = argparse.ArgumentParser()
    ap.add_argument("graph")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    onnx.save(load_graph_model(a.graph), a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
