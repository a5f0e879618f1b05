"""The command line end to end: ir, opt (round trip + passes), compile, run, and clear errors."""
import json
import re
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
    from nnc.driver import pipeline_passes
    assert plan["passes"] == pipeline_passes("fp32")  # the default pipeline, in its order
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


# ---------------------------------------------------------------------------- the surface (issue 6 §5)


def test_list_passes_needs_no_file():
    from nnc.pipeline import PASSES
    p = nnc("opt", "--list-passes")
    lines = p.stdout.splitlines()
    assert [l.split()[0] for l in lines] == list(PASSES)
    assert all(len(l.split(None, 1)) == 2 for l in lines)  # each with its summary
    p = nnc("opt", check=False)  # neither a file nor --list-passes: a usage error
    assert p.returncode == 2 and "file" in p.stderr and "Traceback" not in p.stderr


def test_version_flag():
    import nnc as pkg
    assert nnc("--version").stdout.strip() == f"nnc {pkg.__version__}"


def test_verbose_compile_prints_passes_kernels_and_stages(tmp_path):
    p = nnc("compile", EXAMPLE, "-o", tmp_path / "out", "--shapes", "input:1x3x32x32", "-v")
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    err = p.stderr
    for name in plan["passes"]:
        assert re.search(rf"pass {re.escape(name)}\s+[\d.]+ ms\s+\d+ ops", err), err
    assert re.search(r"import\s+[\d.]+ ms\s+\d+ ops", err)
    n_launch = sum(l["kind"] == "kernel" for l in plan["launches"])
    assert f"{len(plan['kernels'])} kernels, {n_launch} kernel launches per run" in err
    stages = re.search(r"stages: (.*)", err).group(1)
    for st in ("import", "passes", "lowering", "render", "nvrtc", "write", "total"):
        assert re.search(rf"\b{st} [\d.]+ ms", stages), stages
    assert "compiled" in p.stdout and "pass " not in p.stdout  # -v goes to stderr only
    quiet = nnc("compile", EXAMPLE, "-o", tmp_path / "q", "--shapes", "input:1x3x32x32", "--no-codegen")
    assert quiet.stderr == ""


def test_verbose_opt_keeps_stdout_the_ir(tmp_path):
    ir = tmp_path / "m.nnir"
    nnc("ir", EXAMPLE, "--shapes", "input:2x3x32x32", "-o", ir)
    p = nnc("opt", ir, "--passes", "fold-constants,dce", "-v")
    assert p.stdout.startswith("func @main(")
    assert re.search(r"pass fold-constants\s+[\d.]+ ms\s+\d+ ops", p.stderr)
    assert re.search(r"pass dce\s+[\d.]+ ms\s+\d+ ops", p.stderr)


@pytest.mark.parametrize("spec,needle", [
    ("input:1x3x", "dims must be integers >= 0 joined by 'x'"),
    ("input:1_0x3x32x32", "dims must be integers >= 0"),
    ("input:-1x3x32x32", "dims must be integers >= 0"),
    ("input", "is not NAME:DIMxDIM"),
    (":1x3x32x32", "no input name"),
    ("input:1x3x32x32,input:2x3x32x32", "given twice"),
    ("input:1x3x32x32,", "is not NAME:DIMxDIM"),
])
def test_malformed_shapes_are_clear_errors(spec, needle, tmp_path):
    p = nnc("compile", EXAMPLE, "-o", tmp_path / "out", "--shapes", spec, "--no-codegen", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "--shapes" in p.stderr
    assert needle in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()


def test_shapes_bind_symbols_across_inputs(tmp_path):
    """What --shapes' help says: a symbol bound in one input binds it in the others (and the
    outputs); an input not named keeps its other dims."""
    g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 4])])
    m = tmp_path / "add.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), m)
    nnc("compile", m, "-o", tmp_path / "out", "--shapes", "a:3x4", "--no-codegen")
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert [i["shape"] for i in plan["inputs"]] == [[3, 4], [3, 4]] and plan["outputs"][0]["shape"] == [3, 4]
    help_text = " ".join(nnc("compile", "--help").stdout.split())
    assert "bound in every input that uses it" in help_text and "stay symbolic" in help_text


def test_compile_no_fuse_leaves_out_the_fusion_passes(tmp_path):
    from nnc.pipeline import FOLDING_FUSIONS, FUSION_PASSES
    for flag, out in (((), tmp_path / "fused"), (("--no-fuse",), tmp_path / "unfused")):
        nnc("compile", EXAMPLE, "-o", out, "--shapes", "input:1x3x32x32", "--arch", "sm_90", *flag)
    fused = json.loads((tmp_path / "fused" / "plan.json").read_text())
    unfused = json.loads((tmp_path / "unfused" / "plan.json").read_text())
    assert set(FUSION_PASSES) <= set(fused["passes"]) and not set(FUSION_PASSES) & set(unfused["passes"])
    # the folding fusions too: the unfused build keeps each BatchNormalization as its own kernel
    assert set(FOLDING_FUSIONS) <= set(fused["passes"]) and not set(FOLDING_FUSIONS) & set(unfused["passes"])
    assert len(fused["launches"]) < len(unfused["launches"])
