"""fuse-horizontal over a range profile's symbolic rows (issue 10): Q/K/V projections that feed head
splits become one [*b, S, 3N] GEMM whose column slices fuse-attention reads through strides; members
over symbolic rows that feed anything else stay apart (a strided slice would be a copy each)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import nnc
from nnc.ir.parser import parse
from nnc.passes import fuse_horizontal

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import profile_models  # noqa: E402


def test_qkv_over_symbolic_rows_become_one_gemm_of_column_slices(tmp_path):
    model = profile_models.encoder(tmp_path / "enc.onnx")
    out = tmp_path / "o"
    nnc.compile(model, profiles=["x:1x1x64/2x77x64/2x128x64"], out=out, backend="reference", codegen=True, tune=False)
    ir = (out / "ir" / "final.nnir").read_text()
    assert "f32[B,S,192]" in ir and 'kind = "attention"' in ir  # one packed projection, one attention group
    m = nnc.load(out, backend="reference")
    ort = pytest.importorskip("onnxruntime")
    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 50, 64)).astype(np.float32)
    np.testing.assert_allclose(m.run({"x": x})["y"], s.run(None, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_symbolic_rows_not_feeding_a_head_split_stay_apart():
    w = ", ".join(["0.5"] * 64)
    text = f"""func @main(%x: f32[S,8]) -> (f32[S,8], f32[S,8]) {{
  %w1 = const() {{value = dense<[{w}]> : f32[8,8]}} : f32[8,8]
  %w2 = const() {{value = dense<[{w}]> : f32[8,8]}} : f32[8,8]
  %a = MatMul(%x, %w1) : f32[S,8]
  %b = MatMul(%x, %w2) : f32[S,8]
  %ra = Relu(%a) : f32[S,8]
  %rb = Relu(%b) : f32[S,8]
  return %ra, %rb
}}
"""
    m = parse(text)
    assert not fuse_horizontal.run(m)
