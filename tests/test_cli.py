"""The command line end to end: ir, opt (round trip + passes), compile, run, and clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_cnn.onnx"


def nnc(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "nnc.cli", *map(str, args)], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"nnc {' '.join(map(str, args))} failed:\n{p.stderr}")
    return p


def test_ir_prints_symbolic_batch():
    out = nnc("ir", EXAMPLE).stdout
    assert out.startswith("func @main(%input: f32[N,3,32,32]) -> (f32[N,10])")
    assert 'loc("stem/conv")' in out


def test_opt_roundtrip_and_passes(tmp_path):
    ir = tmp_path / "m.nnir"
    nnc("ir", EXAMPLE, "--shapes", "input:2x3x32x32", "-o", ir)
    text = ir.read_text()
    assert nnc("opt", ir).stdout == text
    out = nnc("opt", ir, "--passes", "fold-constants,canonicalize,dce", "--verify-each",
              "--dump-ir", tmp_path / "dump").stdout
    assert "Flatten" in out or "Reshape" in out
    dumps = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert dumps == ["00-input.nnir", "01-fold-constants.nnir", "02-canonicalize.nnir", "03-dce.nnir"]


def test_compile_and_run_reference(tmp_path):
    out = tmp_path / "out"
    nnc("compile", EXAMPLE, "-o", out, "--shapes", "input:2x3x32x32", "--no-codegen")
    plan = json.loads((out / "plan.json").read_text())
    assert plan["inputs"] == [{"name": "input", "dtype": "float32", "shape": [2, 3, 32, 32]}]
    assert plan["outputs"] == [{"name": "probs", "dtype": "float32", "shape": [2, 10]}]
    assert plan["passes"][:6] == ["fold-constants", "inline-if", "unroll-loops", "fold-constants",
                                  "canonicalize", "dce"]
    assert (out / "ir" / "final.nnir").exists() and (out / "ir" / "final.weights.bin").exists()
    x = np.random.default_rng().standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input=x)
    nnc("run", out, "--inputs", tmp_path / "in.npz", "--save", tmp_path / "res.npz")
    with np.load(tmp_path / "res.npz") as z:
        probs = z["probs"]
    import onnxruntime as ort
    ref = ort.InferenceSession(str(EXAMPLE), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(probs, ref, rtol=1e-4, atol=1e-6)


def test_symbolic_input_stays_symbolic(tmp_path):
    out = tmp_path / "out"
    nnc("compile", EXAMPLE, "-o", out, "--no-codegen")
    plan = json.loads((out / "plan.json").read_text())
    assert plan["inputs"][0]["shape"] == ["N", 3, 32, 32]


def _bad_model(tmp_path):
    node = helper.make_node("FancyOp", ["x"], ["y"], name="my_fancy_node")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    p = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), p)
    return p


def test_unsupported_op_error_is_clear(tmp_path):
    p = nnc("ir", _bad_model(tmp_path), check=False)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    assert "FancyOp" in p.stderr and "my_fancy_node" in p.stderr and "opset 17" in p.stderr


@pytest.mark.parametrize("args,needle", [
    (["ir", "missing.onnx"], "no such file"),
    (["ir", EXAMPLE, "--shapes", "input:1x3"], "rank 4"),
    (["ir", EXAMPLE, "--shapes", "nope:1x3x32x32"], "model's inputs are"),
    (["ir", EXAMPLE, "--shapes", "input:1x3x31x32"], "fixed to 32"),
    (["opt", "missing.nnir"], "no such file"),
])
def test_errors_name_what_and_where(args, needle):
    p = nnc(*args, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert needle in p.stderr, p.stderr


def test_run_rejects_wrong_input_shape(tmp_path):
    out = tmp_path / "out"
    nnc("compile", EXAMPLE, "-o", out, "--shapes", "input:1x3x32x32", "--no-codegen")
    np.savez(tmp_path / "in.npz", input=np.ones((1, 3, 16, 16), np.float32))
    p = nnc("run", out, "--inputs", tmp_path / "in.npz", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "input 'input'" in p.stderr and "f32[1,3,32,32]" in p.stderr and "[1, 3, 16, 16]" in p.stderr


def test_opt_parse_error_has_position(tmp_path):
    f = tmp_path / "bad.nnir"
    f.write_text("func @main(%x: f32[2]) -> (f32[2]) {\n  %a = Relu(%x) f32[2]\n  return %a\n}\n")
    p = nnc("opt", f, check=False)
    assert p.returncode == 1 and f"{f}:2:" in p.stderr and "expected" in p.stderr


@pytest.mark.gpu
def test_run_cuda_backend_matches_reference(tmp_path):
    out = tmp_path / "out"
    nnc("compile", EXAMPLE, "-o", out, "--shapes", "input:2x3x32x32")
    x = np.random.default_rng().standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input=x)
    nnc("run", out, "--inputs", tmp_path / "in.npz", "--backend", "cuda", "--save", tmp_path / "gpu.npz")
    nnc("run", out, "--inputs", tmp_path / "in.npz", "--save", tmp_path / "ref.npz")
    with np.load(tmp_path / "gpu.npz") as g, np.load(tmp_path / "ref.npz") as r:
        np.testing.assert_allclose(g["probs"], r["probs"], rtol=1e-3, atol=1e-6)
    np.savez(tmp_path / "bad.npz", input=x[:1])
    p = nnc("run", out, "--inputs", tmp_path / "bad.npz", "--backend", "cuda", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "expected shape" in p.stderr
