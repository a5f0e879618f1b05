"""fused.rowreduce over a range profile's runtime rows (issue 10, codegen/runtime_sizes.py): a row
group over [B, S, C] (symbolic B, S; static C) runs the kernel of the max shape with the row count
per run; an input broadcast along only some row dims declines to the op-by-op fallback."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import nnc

PROFILE = "x:1x1x64/2x77x64/4x128x64,r:1x1x64/2x77x64/4x128x64"


def _model(tmp_path, partial: bool = False) -> Path:
    """LayerNorm(x + r) * 2 -> y [B,S,64] (partial: r [1,S,64] broadcast over B)."""
    rng = np.random.default_rng(3)
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "r"], ["h"]),
         helper.make_node("LayerNormalization", ["h", "g", "b"], ["ln"], axis=-1, epsilon=1e-5),
         helper.make_node("Mul", ["ln", "two"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 64]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, [1 if partial else "B", "S", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", 64])],
        [onnx.numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "g"),
         onnx.numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b"),
         onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    p = tmp_path / ("partial.onnx" if partial else "rows.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(p))
    return p


def _ort(model, feed):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _feed(rng, b, s, partial=False):
    return {"x": rng.standard_normal((b, s, 64)).astype(np.float32),
            "r": rng.standard_normal((1 if partial else b, s, 64)).astype(np.float32)}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_row_group_takes_runtime_rows(tmp_path, precision):
    p = _model(tmp_path)
    out = tmp_path / "o"
    nnc.compile(p, profiles=[PROFILE], out=out, backend="reference", codegen=True, tune=False, precision=precision)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["cubins"] and all((out / c["file"]).is_file() for c in plan["cubins"])  # NVRTC compiled them
    (row,) = [l for l in plan["launches"] if l["kind"] == "kernel" and "fused_row" in l["kernel"]]
    assert "grid_expr" in row and row["args"][-1]["expr"] == {"op": "mul", "args": [{"sym": "B"}, {"sym": "S"}]}
    assert "long long nnc_rows" in (out / "model.cu").read_text()
    m = nnc.load(out, backend="reference")
    rng = np.random.default_rng(4)
    tol = 1e-4 if precision == "fp32" else 3e-2
    for b, s in ((1, 1), (2, 77), (3, 50), (4, 128)):
        feed = _feed(rng, b, s)
        np.testing.assert_allclose(m.run(feed)["y"], _ort(p, feed), rtol=tol, atol=tol)


def test_partial_broadcast_over_symbolic_rows_declines(tmp_path):
    profile = "x:1x1x64/2x77x64/4x128x64,r:1x1x64/1x77x64/1x128x64"
    p = _model(tmp_path, partial=True)
    out = tmp_path / "o"
    nnc.compile(p, profiles=[profile], out=out, backend="reference", codegen=True, tune=False)
    plan = json.loads((out / "plan.json").read_text())
    assert not [l for l in plan["launches"] if l["kind"] == "kernel" and "fused_row" in l["kernel"]]
    m = nnc.load(out, backend="reference")
    feed = _feed(np.random.default_rng(5), 3, 50, partial=True)
    np.testing.assert_allclose(m.run(feed)["y"], _ort(p, feed), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_row_group_runtime_rows(tmp_path, precision):
    from nnc.runtime import require_gpu
    require_gpu()
    p = _model(tmp_path)
    m = nnc.compile(p, profiles=[PROFILE], out=tmp_path / "o", tune=False, precision=precision)
    rng = np.random.default_rng(6)
    tol = 1e-3 if precision == "fp32" else 3e-2
    for b, s in ((1, 1), (2, 77), (4, 128), (3, 50), (1, 1)):
        feed = _feed(rng, b, s)
        got = m.run(feed, output="numpy", poison=True)["y"]
        np.testing.assert_allclose(got.astype(np.float32), _ort(p, feed), rtol=tol, atol=tol)
