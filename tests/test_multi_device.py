"""MultiDeviceModule (nnc.multi_device): text round trip, the verifier's pairing / ordering /
deadlock errors, and the reference multi-device run (simulated devices) against numpy."""
import numpy as np
import pytest

from nnc.ir.errors import NncError
from nnc.multi_device import (MultiDeviceError, load_multi, parse_multi, print_multi, run_multi,
                              save_multi, verify_multi)
from nnc.ir.weights import WeightStore

PIPE = """// nnc-multi-device {"devices": 2, "parallel": "pipeline", "micro_batches": 1, "output_device": {}}
// ===== device 0
func @main(%x: f32[2,3]) -> (bool[0]) {
  %y = Relu(%x) : f32[2,3]
  %y.sent = Send(%y) {device = 0, peer = 1} : bool[0]
  return %y.sent
}
// ===== device 1
func @main() -> (f32[2,3]) {
  %y = Recv() {device = 1, peer = 0, shape = [2, 3], dtype = f32} : f32[2,3]
  %z = Neg(%y) : f32[2,3]
  return %z
}
"""

TP = """// nnc-multi-device {"devices": 2, "parallel": "tensor", "micro_batches": 1, "output_device": {"s": 1}}
// ===== device 0
func @main(%x: f32[2,4]) -> (f32[2,4], f32[4,4]) {
  %h = Relu(%x) : f32[2,4]
  %s = AllReduce(%h) {device = 0, group = [0, 1]} : f32[2,4]
  %g = AllGather(%h) {device = 0, group = [0, 1]} : f32[4,4]
  return %s, %g
}
// ===== device 1
func @main(%x: f32[2,4]) -> (f32[2,4]) {
  %h = Neg(%x) : f32[2,4]
  %s = AllReduce(%h) {device = 1, group = [0, 1]} : f32[2,4]
  %g = AllGather(%h) {device = 1, group = [0, 1]} : f32[4,4]
  return %s
}
"""


def _mdm(text):
    m = parse_multi(text)
    for d in m.devices:
        d.weights = WeightStore()
    return m


@pytest.mark.parametrize("text", [PIPE, TP])
def test_round_trip(text, tmp_path):
    m = _mdm(text)
    verify_multi(m)
    assert print_multi(m) == text
    save_multi(m, tmp_path / "md")
    assert print_multi(load_multi(tmp_path / "md")) == text


def test_pipeline_run(rng):
    m = _mdm(PIPE)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    trace = []
    out = run_multi(m, {"x": x}, trace=trace)
    assert list(out) == ["z"]
    np.testing.assert_array_equal(out["z"], -np.maximum(x, 0))
    assert {e.device for e in trace} == {0, 1}


def test_micro_batches(rng):
    m = _mdm(PIPE)
    x = rng.standard_normal((8, 3)).astype(np.float32)
    trace = []
    out = run_multi(m, {"x": x}, micro_batches=4, trace=trace)
    np.testing.assert_array_equal(out["z"], -np.maximum(x, 0))
    assert sorted({(e.device, e.micro_batch) for e in trace}) == [(d, mb) for d in (0, 1) for mb in range(4)]
    with pytest.raises(NncError, match="does not split into 3"):
        run_multi(m, {"x": x}, micro_batches=3)


def test_collectives(rng):
    m = _mdm(TP)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    out = run_multi(m, {"x": x})
    h0, h1 = np.maximum(x, 0), -x
    np.testing.assert_array_equal(out["s"], h0 + h1)
    np.testing.assert_array_equal(out["g"], np.concatenate([h0, h1]))


@pytest.mark.parametrize("text,old,new,msg", [
    (PIPE, "peer = 1} : bool", "peer = 1, tag = 5} : bool", r"deadlock(.|\n)*waits for a message from device 0(.|\n)*undelivered"),
    (PIPE.replace("f32[2,3]\n  return %z", "f32[2,4]\n  return %z").replace("-> (f32[2,3])", "-> (f32[2,4])"),
     "shape = [2, 3], dtype = f32} : f32[2,3]", "shape = [2, 4], dtype = f32} : f32[2,4]", "expects f32\\[2,4\\]"),
    (PIPE, "device = 1, peer = 0", "device = 0, peer = 1", "it is in device 1's module"),
    (PIPE, "device = 0, peer = 1", "device = 0, peer = 2", "device 2 does not exist"),
    (TP, "{device = 1, group = [0, 1]} : f32[2,4]", "{device = 1, group = [0, 1], op = \"max\"} : f32[2,4]",
     "collective #0 of group \\[0, 1\\] differs"),
    (TP, "%g = AllGather(%h) {device = 1, group = [0, 1]} : f32[4,4]\n", "", "deadlock(.|\n)*collective #1"),
])
def test_verifier_errors(text, old, new, msg):
    assert old in text
    with pytest.raises(NncError, match=msg):
        verify_multi(_mdm(text.replace(old, new, 1)))


def test_unreceived_send():
    extra = PIPE.replace("  return %y.sent\n", "  %w.sent = Send(%y) {device = 0, peer = 1, tag = 9} : bool[0]\n"
                                                 "  return %y.sent, %w.sent\n").replace("-> (bool[0])", "-> (bool[0], bool[0])")
    with pytest.raises(MultiDeviceError, match="no matching Recv on device 1"):
        verify_multi(_mdm(extra))


def test_token_must_be_returned():
    text = PIPE.replace("  return %y.sent\n", "  return\n").replace("-> (bool[0])", "-> ()")
    with pytest.raises(NncError, match="not returned"):
        verify_multi(_mdm(text))


def test_batch_split_refused(rng):
    text = PIPE.replace("%y = Relu(%x) : f32[2,3]", "%y = Softmax(%x) {axis = 0} : f32[2,3]")
    m = _mdm(text)
    with pytest.raises(MultiDeviceError, match="batch axis"):
        run_multi(m, {"x": rng.standard_normal((4, 3)).astype(np.float32)}, micro_batches=2)
