"""Pass tests: IR text in -> IR text out (golden/*.nnir: `// RUN: passes`, input, `// CHECK:`,
expected, cases split by `// -----`), plus the reference interpreter giving the same outputs
before and after on fresh random inputs."""
from pathlib import Path

import numpy as np
import pytest

from nnc.ir import parse, print_module, verify
from nnc.ir.interp import Interpreter
from nnc.ir.weights import WeightStore
from nnc.pipeline import Pipeline

GOLDEN = Path(__file__).parent / "golden"


def _cases():
    for f in sorted(GOLDEN.glob("*.nnir")):
        for i, chunk in enumerate(f.read_text().split("// -----\n")):
            yield pytest.param(chunk, id=f"{f.stem}-{i}")


def _random_inputs(func, rng):
    out = {}
    for a in func.args:
        t = a.type
        if t.dtype.is_float:
            out[a.name] = rng.standard_normal(t.shape).astype(t.dtype.np)
        elif t.dtype.kind == "bool":
            out[a.name] = rng.random(t.shape) < 0.5
        else:
            out[a.name] = rng.integers(-5, 5, t.shape).astype(t.dtype.np)
    return out


@pytest.mark.parametrize("chunk", list(_cases()))
def test_golden(chunk, rng):
    head, expected = chunk.split("// CHECK:\n")
    run_line, text = head.split("\n", 1)
    assert run_line.startswith("// RUN: ")
    passes = run_line[len("// RUN: "):].strip().split(",")
    rtol = 0.0  # exact unless the case says (`// RTOL: 1e-5`: a pass that reassociates)
    if text.startswith("// RTOL: "):
        tol_line, text = text.split("\n", 1)
        rtol = float(tol_line[len("// RTOL: "):])
    m = parse(text)
    m.weights = WeightStore()
    verify(m)
    feed = _random_inputs(m.main, rng)
    before = Interpreter(m).run(feed)
    Pipeline(passes, verify_each=True).run(m)
    assert print_module(m) == expected
    after = Interpreter(m).run(feed)
    assert list(before) == list(after)
    for k in before:
        if rtol:
            assert before[k].dtype == after[k].dtype and before[k].shape == after[k].shape
            np.testing.assert_allclose(after[k], before[k], rtol=rtol, atol=rtol * float(np.abs(before[k]).max()))
        else:
            np.testing.assert_array_equal(before[k], after[k])
