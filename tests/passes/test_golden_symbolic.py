"""Pass tests over a range profile's symbolic dims (issue 10): IR text in -> IR text out, as
tests/passes/test_golden.py (`// RUN: passes`, input, `// CHECK:`, expected, cases split by
`// -----`), with a `// BIND: S=5,...` line giving the symbols values for the reference
interpreter, whose outputs must be the same before and after (golden_symbolic/*.nnir).

What they pin: fuse-attention forms the group when S / T are symbolic (the head split and merge,
a last-axis Slice / Split of a packed projection read as strided views); fuse-epilogue takes a
MatMul's bias / residual / activation over symbolic rows."""
from pathlib import Path

import numpy as np
import pytest

from nnc.ir import parse, print_module, verify
from nnc.ir.interp import Interpreter
from nnc.ir.symbolic import evaluate
from nnc.ir.weights import WeightStore
from nnc.pipeline import Pipeline

GOLDEN = Path(__file__).parent / "golden_symbolic"


def _cases():
    for f in sorted(GOLDEN.glob("*.nnir")):
        for i, chunk in enumerate(f.read_text().split("// -----\n")):
            yield pytest.param(chunk, id=f"{f.stem}-{i}")


@pytest.mark.parametrize("chunk", list(_cases()))
def test_golden_symbolic(chunk):
    head, expected = chunk.split("// CHECK:\n")
    run_line, bind_line, text = head.split("\n", 2)
    assert run_line.startswith("// RUN: ") and bind_line.startswith("// BIND: ")
    passes = run_line[len("// RUN: "):].strip().split(",")
    env = {k: int(v) for k, v in (kv.split("=") for kv in bind_line[len("// BIND: "):].strip().split(","))}
    m = parse(text)
    m.weights = WeightStore()
    verify(m)
    assert any(not a.type.is_static for a in m.main.args)
    rng = np.random.default_rng(0)
    feed = {a.name: rng.standard_normal([evaluate(d, env) for d in a.type.shape]).astype(a.type.dtype.np)
            for a in m.main.args}
    before = Interpreter(m).run(feed)
    Pipeline(passes, verify_each=True).run(m)
    assert print_module(m) == expected
    assert any(op.name == "fused" for op in m.main.ops)
    after = Interpreter(m).run(feed)
    assert list(before) == list(after)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
