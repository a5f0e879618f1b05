"""to-fp16 / to-bf16: the model interface stays f32, everything inside turns low precision,
and the reference interpreter's outputs stay within the dtype's tolerance."""
from pathlib import Path

import numpy as np
import pytest

import nnc
from nnc.ir import verify
from nnc.ir.interp import Interpreter
from nnc.pipeline import run_passes

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_cnn.onnx"


@pytest.mark.parametrize("prec,low", [("fp16", "f16"), ("bf16", "bf16")])
def test_lowering_keeps_interface_and_accuracy(prec, low, rng):
    m = nnc.import_onnx(str(EXAMPLE), shapes={"input": [2, 3, 32, 32]})
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    ref = Interpreter(m).run({"input": x})["probs"]
    run_passes(m, ["fold-constants", "canonicalize", "dce", f"to-{prec}", "canonicalize", "dce"], verify_each=True)
    verify(m)
    f = m.main
    assert [str(a.type) for a in f.args] == ["f32[2,3,32,32]"]
    assert [(v.name, str(v.type)) for v in f.results] == [("probs", "f32[2,10]")]
    inner = [op for op in f.ops if op.name in ("Conv", "Gemm", "Relu", "Softmax")]
    assert inner and all(op.results[0].type.dtype.short == low for op in inner)
    got = Interpreter(m).run({"input": x})["probs"]
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err < (1e-2 if prec == "fp16" else 3e-2), err
