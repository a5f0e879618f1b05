"""Graph-only models (written by tools/export_graphs.py on the GPU machine) made runnable again.

    from tools.graph_models import load_graph_model, GRAPHS
    model = load_graph_model(GRAPHS / "bert_base.graph.onnx")   # onnx.ModelProto with weights

Every stripped float initializer is refilled with normal(mean, std) of the original tensor, seeded by
its name (crc32), so a given file always gives the same weights. Everything else (small tensors,
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


def load_graph_model(path):
    import onnx
    from onnx import helper, numpy_helper
    m = onnx.load(str(path))
    props = {p.key: p.value for p in m.metadata_props}
    stats = json.loads(props.get(STATS_KEY, "{}"))
    for t in m.graph.initializer:
        if t.name not in stats:
            continue
        mean, std = stats[t.name]
        rng = np.random.default_rng(zlib.crc32(t.name.encode()))
        dt = helper.tensor_dtype_to_np_dtype(t.data_type)
        a = (rng.standard_normal(tuple(t.dims)) * std + mean).astype(dt)
        t.CopyFrom(numpy_helper.from_array(a, t.name))
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
