"""Communication ops (ir/ops/comm.py): text round trip, inference, verifier errors, and the
single-device interpreter refusing them."""
import numpy as np
import pytest

from nnc.ir import parse, print_module, verify
from nnc.ir.errors import NncError
from nnc.ir.interp import Interpreter
from nnc.ir.ops.comm import all_gather, all_reduce

OPS = """func @main(%x: f32[2,3]) -> (f32[2,3], bool[0], f32[2,6], f32[N,3]) {
  %r = AllReduce(%x) {device = 0, group = [0, 1], op = "max"} : f32[2,3]
  %s = Send(%r) {device = 0, peer = 1, tag = 2} : bool[0]
  %g = AllGather(%x) {device = 0, group = [0, 1], axis = 1} : f32[2,6]
  %v = Recv() {device = 0, peer = 1, shape = [-1, 3], dtype = f32} : f32[N,3]
  return %r, %s, %g, %v
}
"""


def test_round_trip_and_verify():
    m = parse(OPS)
    verify(m)
    assert print_module(m) == OPS


@pytest.mark.parametrize("old,new,msg", [
    ("peer = 1, tag = 2", "peer = 0, tag = 2", "own device"),
    ("group = [0, 1], op", "group = [1, 2], op", "not in its group"),
    ("group = [0, 1], op", "group = [0, 0], op", "twice"),
    ('op = "max"', 'op = "mean"', "is not one of"),
    ("shape = [-1, 3]", "shape = [-1, 4]", "does not match"),
    ("axis = 1} : f32[2,6]", "axis = 0} : f32[2,6]", "inference gives"),
])
def test_verifier_errors(old, new, msg):
    with pytest.raises(NncError, match=msg):
        verify(parse(OPS.replace(old, new, 1)))


def test_single_device_interpreter_refuses():
    m = parse(OPS)
    with pytest.raises(NncError, match="multi-device run"):
        Interpreter(m).run({"x": np.ones((2, 3), np.float32)})


def test_collective_semantics():
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(all_reduce("sum", [a, b]), a + b)
    np.testing.assert_array_equal(all_reduce("max", [a, b]), np.maximum(a, b))
    np.testing.assert_array_equal(all_gather(-1, [a, b]), np.concatenate([a, b], axis=1))
