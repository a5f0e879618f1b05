"""Pipeline partitioning (compiler/passes/partition_pipeline.py): golden IR in -> multi-device IR
out (golden/partition_pipeline.nnmd: `// RUN: partition-pipeline devices=K`, input, `// CHECK:`,
expected, cases split by `// -----`), the K-device reference run equal to the single-device
interpreter, cost balancing, and the errors for bad K."""
from pathlib import Path

import numpy as np
import pytest

from nnc.ir import parse, verify
from nnc.ir.errors import NncError
from nnc.ir.interp import Interpreter
from nnc.ir.weights import WeightStore
from nnc.multi_device import parse_multi, print_multi, run_multi, verify_multi
from nnc.passes.partition_pipeline import balanced_cuts, gpipe_schedule, measured_times, partition

from .test_golden import _random_inputs

GOLDEN = Path(__file__).parent / "golden" / "partition_pipeline.nnmd"


def _cases():
    for i, chunk in enumerate(GOLDEN.read_text().split("// -----\n")):
        yield pytest.param(chunk, id=f"partition_pipeline-{i}")


def _module(text):
    m = parse(text)
    m.weights = WeightStore()
    verify(m)
    return m


@pytest.mark.parametrize("chunk", list(_cases()))
def test_golden(chunk, rng):
    head, expected = chunk.split("// CHECK:\n")
    run_line, text = head.split("\n", 1)
    assert run_line.startswith("// RUN: partition-pipeline devices=")
    k = int(run_line.rsplit("=", 1)[1])
    m = _module(text)
    feed = _random_inputs(m.main, rng)
    before = Interpreter(m).run(feed)
    mdm = partition(m, k)
    verify_multi(mdm)
    assert print_multi(mdm) == expected
    assert print_multi(parse_multi(expected)) == expected
    after = run_multi(mdm, feed)
    assert sorted(before) == sorted(after)
    for n in before:
        np.testing.assert_array_equal(before[n], after[n])


CHAIN = """func @main(%x: f32[2,64]) -> (f32[2,64]) {
  %a = Relu(%x) : f32[2,64]
  %b = Tanh(%a) : f32[2,64]
  %c = Sigmoid(%b) : f32[2,64]
  %d = Neg(%c) : f32[2,64]
  return %d
}
"""


def test_bad_device_counts():
    with pytest.raises(NncError, match="at least one device"):
        partition(_module(CHAIN), 0)
    with pytest.raises(NncError, match="only 4 ops"):
        partition(_module(CHAIN), 5)
    mdm = partition(_module(CHAIN), 4)  # one op per device is the most
    assert [len([o for o in d.main.ops if o.name not in ("Send", "Recv")]) for d in mdm.devices] == [1, 1, 1, 1]


def test_measured_times_move_the_cut(tmp_path):
    # %a measured slow: it gets a stage of its own
    plan = tmp_path / "plan.json"
    plan.write_text('{"launches": [{"op": "%a: f32[2,64] = Relu(%x: f32[2,64])", "tuning": {"time_ms": 5.0}}]}')
    measured = measured_times(plan)
    assert measured == {"a": 5e-3}
    mdm = partition(_module(CHAIN), 2, measured)
    assert [o.name for o in mdm.devices[0].main.ops] == ["Relu", "Send"]
    assert mdm.plan["cost_model"].startswith("measured")
    assert mdm.plan["stages"][0]["measured_ops"] == 1


def test_balanced_cuts_exact():
    assert balanced_cuts([1, 1, 1, 1, 4], [0] * 5, 2) == [4]
    costs = [3, 1, 1, 1, 3, 3]
    b = [0] + balanced_cuts(costs, [0] * 6, 3) + [6]
    assert max(sum(costs[b[i]:b[i + 1]]) for i in range(3)) == 5  # the minimax (brute force: 5)
    assert balanced_cuts([1, 1, 1, 1], [0, 0, 100, 0], 2) != [2]  # a costly cut is avoided


def test_gpipe_schedule():
    s = gpipe_schedule(2, 4)
    assert len(s["slots"]) == 5 and s["bubble_fraction"] == pytest.approx(1 / 5)
    assert s["slots"][1] == [{"device": 0, "micro_batch": 1}, {"device": 1, "micro_batch": 0}]


def test_micro_batched_pipeline_equals_single_device(rng):
    text = CHAIN.replace("f32[2,64]", "f32[N,64]")
    m = _module(text)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    ref = Interpreter(m).run({"x": x})
    mdm = partition(m, 3, micro_batches=4)
    verify_multi(mdm)
    trace = []
    out = run_multi(mdm, {"x": x}, trace=trace)
    np.testing.assert_array_equal(out["d"], ref["d"])
    assert {(e.device, e.micro_batch) for e in trace} == {(d, b) for d in range(3) for b in range(4)}


def test_measured_times_of_split_fused_groups():
    """A fused group lowered as two kernels: its launches name the ops of its body."""
    text = """func @main(%x: f32[2,64]) -> (f32[2,64]) {
  %f = fused(%x) {body = region(%x_: f32[2,64]) {
    %a_ = Relu(%x_) : f32[2,64]
    %b_ = Tanh(%a_) : f32[2,64]
    return %b_
  }, kind = "elementwise"} : f32[2,64]
  %c = Sigmoid(%f) : f32[2,64]
  %d = Neg(%c) : f32[2,64]
  %e = Exp(%d) : f32[2,64]
  return %e
}
"""
    mdm = partition(_module(text), 2, {"a_": 2e-3, "b_": 2e-3, "c": 1e-3, "d": 1e-3, "e": 1e-3})
    assert mdm.plan["stages"][0]["ops"] == 1 and mdm.plan["stages"][0]["cost_ms"] == pytest.approx(4.0)
