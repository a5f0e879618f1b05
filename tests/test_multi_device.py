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
    (PIPE, "peer = 1} : bool", "peer = 1, tag = 5} : bool",
     r"deadlock(.|\n)*waits for a message from device 0(.|\n)*undelivered"),
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
                                                 "  return %y.sent, %w.sent\n")
    extra = extra.replace("-> (bool[0])", "-> (bool[0], bool[0])")
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


# ---------------------------------------------------------------- models, nnc compile --devices

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _nnc(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "nnc.cli", *map(str, args)], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"nnc {' '.join(map(str, args))} failed:\n{p.stderr}")
    return p


def _single_device(model, shapes):
    from nnc.onnx_import import import_model
    from nnc.pipeline import run_passes
    m = import_model(str(model), shapes=shapes)
    run_passes(m)
    return m


@pytest.mark.parametrize("model,k", [("tiny_cnn", 2), ("tiny_cnn", 4), ("tiny_transformer", 3), ("tiny_lstm", 2)])
def test_model_pipeline_equals_single_device(model, k, rng):
    from nnc.ir.interp import Interpreter
    from nnc.passes.partition_pipeline import partition
    shapes = {"input": [2, 3, 32, 32]} if model == "tiny_cnn" else {}
    m = _single_device(EXAMPLES / f"{model}.onnx", shapes)
    feed = {a.name: rng.standard_normal([int(d) for d in a.type.shape]).astype(a.type.dtype.np) for a in m.main.args}
    ref = Interpreter(m).run(feed)
    mdm = partition(m, k)
    verify_multi(mdm)
    assert print_multi(parse_multi(print_multi(mdm))) == print_multi(mdm)
    out = run_multi(mdm, feed)
    for n in ref:
        np.testing.assert_array_equal(out[n], ref[n])


def test_cli_compile_devices_reference(tmp_path, rng):
    out = tmp_path / "out"
    _nnc("compile", EXAMPLES / "tiny_cnn.onnx", "-o", out, "--shapes", "input:8x3x32x32", "--devices", "2",
         "--micro-batches", "4", "--no-codegen")
    plan = json.loads((out / "plan.json").read_text())
    assert plan["kind"] == "multi_device" and plan["devices"] == 2 and plan["micro_batches"] == 4
    assert plan["inputs"] == [{"name": "input", "dtype": "float32", "shape": [8, 3, 32, 32]}]
    assert {e["op"] for e in plan["communication"]} == {"Send", "Recv"}
    assert plan["schedule"]["bubble_fraction"] == pytest.approx(1 / 5)
    assert [s["device"] for s in plan["stages"]] == [0, 1]
    text = (out / "ir" / "multi.nnmd").read_text()
    assert "Send(" in text and "Recv()" in text
    for k in range(2):
        dev = json.loads((out / f"device{k}" / "plan.json").read_text())
        assert dev["device"] == k
        assert "Send" not in (out / f"device{k}" / "ir" / "final.nnir").read_text()  # the compute module
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input=x)
    p = _nnc("run", out, "--inputs", tmp_path / "in.npz", "--save", tmp_path / "res.npz")
    assert "2 devices (pipeline)" in p.stdout
    from nnc.ir.interp import Interpreter
    ref = Interpreter(_single_device(EXAMPLES / "tiny_cnn.onnx", {"input": [8, 3, 32, 32]})).run({"input": x})
    with np.load(tmp_path / "res.npz") as z:
        np.testing.assert_allclose(z["probs"], ref["probs"], rtol=1e-6, atol=1e-7)  # micro-batch GEMM order


@pytest.mark.parametrize("args,needle", [
    (["--devices", "0"], "must be at least 1"),
    (["--devices", "99"], "use at most"),
    (["--devices", "2", "--micro-batches", "3"], "does not split along axis 0 into 3"),
    (["--devices", "2", "--parallel", "tensor", "--micro-batches", "2"], "--micro-batches is for --parallel pipeline"),
])
def test_cli_bad_devices(tmp_path, args, needle):
    p = _nnc("compile", EXAMPLES / "tiny_cnn.onnx", "-o", tmp_path / "o", "--shapes", "input:8x3x32x32",
             "--no-codegen", *args, check=False)
    assert p.returncode != 0 and needle in p.stderr, p.stderr


def test_cli_compile_devices_codegen(tmp_path):
    """Each stage lowers through the ordinary single-device codegen (NVRTC: no GPU needed)."""
    out = tmp_path / "out"
    _nnc("compile", EXAMPLES / "tiny_cnn.onnx", "-o", out, "--shapes", "input:4x3x32x32", "--devices", "2",
         "--no-tune", "-j", "1")
    plan = json.loads((out / "plan.json").read_text())
    assert plan["codegen"] and {k["device"] for k in plan["kernels"]} == {0, 1}
    for k in range(2):
        dev = json.loads((out / f"device{k}" / "plan.json").read_text())
        assert dev["kernels"] and (out / f"device{k}" / "model.cu").exists()
    recv_names = [e["value"] for e in plan["communication"] if e["op"] == "Recv"]
    dev1 = json.loads((out / "device1" / "plan.json").read_text())
    assert set(recv_names) <= {e["name"] for e in dev1["inputs"]}


@pytest.mark.gpu
def test_cuda_stages_on_one_gpu(tmp_path, rng):
    """The pipeline's device builds as K module instances on the one GPU, device-to-device copies
    standing in for NCCL: results equal the reference multi-device run."""
    from nnc.multi_device import MultiDeviceProgram
    out = tmp_path / "out"
    _nnc("compile", EXAMPLES / "tiny_cnn.onnx", "-o", out, "--shapes", "input:8x3x32x32", "--devices", "2",
         "--micro-batches", "2", "--no-tune")
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    got = MultiDeviceProgram(out, "cuda").run({"input": x})
    want = MultiDeviceProgram(out, "reference").run({"input": x})
    np.testing.assert_allclose(got["probs"], want["probs"], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("parallel", ["tensor", "auto"])
def test_cli_tensor_parallel_wiring(tmp_path, rng, parallel):
    """--parallel tensor/auto hand the module to H2's shard_tensor_parallel (when present)."""
    import importlib.util
    out = tmp_path / "out"
    p = _nnc("compile", EXAMPLES / "tiny_transformer.onnx", "-o", out, "--devices", "2", "--parallel", parallel,
             "--no-codegen", check=False)
    if importlib.util.find_spec("nnc.passes.shard_tensor_parallel") is None:
        if parallel == "tensor":
            assert p.returncode != 0 and "tensor-parallel pass is not available" in p.stderr
        return
    assert p.returncode == 0, p.stderr
    from nnc.ir.interp import Interpreter
    from nnc.multi_device import MultiDeviceProgram
    prog = MultiDeviceProgram(out)
    x = rng.standard_normal((1, 16, 64)).astype(np.float32)
    ref = Interpreter(_single_device(EXAMPLES / "tiny_transformer.onnx", {})).run({"x": x})
    got = prog.run({"x": x})
    np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-4, atol=1e-5)


def _batched_transformer(tmp_path):
    """examples/tiny_transformer.onnx with a symbolic batch (its Reshape targets copy dim 0)."""
    import onnx
    from onnx import numpy_helper
    m = onnx.load(EXAMPLES / "tiny_transformer.onnx")
    for i, init in enumerate(m.graph.initializer):
        if init.name in ("heads_shape", "flat_shape"):
            a = numpy_helper.to_array(init).copy()
            a[0] = 0
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(a, init.name))
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_param = "B"
    p = tmp_path / "tt_batched.onnx"
    onnx.save(m, p)
    return p


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("model", ["tiny_cnn", "transformer"])
def test_micro_batched_equals_full_batch(model, precision, tmp_path, rng):
    """Each device compiled for batch 2, run on 2 micro-batches of a batch-4 input, equals the
    single-device graph compiled for batch 4 (NHWC fp16 convs, stacked QKV, attention groups)."""
    from nnc.driver import pipeline_passes
    from nnc.ir.interp import Interpreter
    from nnc.onnx_import import import_model
    from nnc.passes.partition_pipeline import partition
    from nnc.pipeline import Pipeline
    path, name, rest = ((EXAMPLES / "tiny_cnn.onnx", "input", [3, 32, 32]) if model == "tiny_cnn"
                        else (_batched_transformer(tmp_path), "x", [16, 64]))

    def build(b):
        m = import_model(str(path), shapes={name: [b] + rest})
        Pipeline(pipeline_passes(precision)).run(m)
        return m
    full = build(4)
    feed = {name: rng.standard_normal([4] + rest).astype(full.main.args[0].type.dtype.np)}
    ref = Interpreter(full).run(feed)
    mdm = partition(build(2), 3, micro_batches=2)
    verify_multi(mdm)
    out = run_multi(mdm, feed)
    for n in ref:
        np.testing.assert_array_equal(out[n], ref[n])


@pytest.mark.parametrize("body,msg", [
    ("%y = ReduceSum(%x, %ax) {keepdims = 0} : f32[3]", "include the batch axis 0"),
    ("%t = Transpose(%x) {perm = [1, 0]} : f32[3,4]\n  %y = Relu(%t) : f32[3,4]", "batch on axis 1, not 0"),
    ("%t = Transpose(%x) {perm = [1, 0]} : f32[3,4]\n  %y = MatMul(%t, %x) : f32[3,3]", "contracted"),
    ("%y = Reshape(%x, %swap) : f32[3,4]", "mixes samples"),
    ("%y = Concat(%x, %x) {axis = 0} : f32[8,3]", "works along axis 0"),
    ("%s = Shape(%x) : i64[2]\n  %y = Reshape(%x, %s) : f32[4,3]", "reads the batch size"),
])
def test_batch_split_refusals(body, msg):
    from nnc.passes.partition_pipeline import partition
    from nnc.ir import parse
    out_t = body.rsplit(": ", 1)[1]
    text = (f"func @main(%x: f32[4,3]) -> ({out_t}) {{\n"
            f"  %ax = const() {{value = dense<[0]> : i64[1]}} : i64[1]\n"
            f"  %swap = const() {{value = dense<[3, 4]> : i64[2]}} : i64[2]\n"
            f"  {body}\n  return %y\n}}\n")
    m = parse(text)
    m.weights = WeightStore()
    from nnc.multi_device import check_batch_split
    with pytest.raises(MultiDeviceError, match=msg):
        check_batch_split(partition(m, 1))


CROSSED = """// nnc-multi-device {"devices": 2, "parallel": "pipeline", "micro_batches": 1, "output_device": {}}
// ===== device 0
func @main(%x: f32[2,3]) -> (bool[0], bool[0]) {
  %a = Relu(%x) : f32[2,3]
  %a.sent = Send(%a) {device = 0, peer = 1} : bool[0]
  %b = Neg(%a) : f32[2,3]
  %b.sent = Send(%b) {device = 0, peer = 1, tag = 1} : bool[0]
  return %a.sent, %b.sent
}
// ===== device 1
func @main() -> (f32[2,3]) {
  %b = Recv() {device = 1, peer = 0, shape = [2, 3], dtype = f32, tag = 1} : f32[2,3]
  %a = Recv() {device = 1, peer = 0, shape = [2, 3], dtype = f32} : f32[2,3]
  %z = Sub(%a, %b) : f32[2,3]
  return %z
}
"""


def test_rendezvous_sends(rng):
    """Receives in the other order than the sends: fine with buffered sends, a deadlock when a
    send completes only when received (NCCL), which is what verify_multi and run_multi assume."""
    m = _mdm(CROSSED)
    with pytest.raises(MultiDeviceError, match=r"deadlock(.|\n)*device 0: %a.sent = Send(.|\n)*as in NCCL"):
        verify_multi(m)
    verify_multi(m, rendezvous=False)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    out = run_multi(m, {"x": x}, rendezvous=False)
    np.testing.assert_array_equal(out["z"], 2 * np.maximum(x, 0))


def test_cuda_orchestration_with_stand_ins(tmp_path, rng, monkeypatch):
    """MultiDeviceProgram's one-GPU run (stage after stage, each Recv a copy of the sender's
    output), checked on the CPU: cupy and the device builds replaced by numpy and the reference
    interpreter on each device<K>/ compute module."""
    import types
    from nnc.ir.interp import Interpreter
    from nnc.ir.parser import parse_file
    from nnc.multi_device import MultiDeviceProgram
    out = tmp_path / "out"
    _nnc("compile", EXAMPLES / "tiny_cnn.onnx", "-o", out, "--shapes", "input:8x3x32x32", "--devices", "3",
         "--micro-batches", "2", "--no-codegen")

    class Stage:
        def __init__(self, d):
            self.m = parse_file(d / "ir" / "final.nnir")
            self.m.weights = WeightStore.load(d / "ir" / "final")

        def run(self, feed, output):
            assert {a.name for a in self.m.main.args} == set(feed)
            return Interpreter(self.m).run({k: np.asarray(v) for k, v in feed.items()})

    fake = types.SimpleNamespace(asarray=np.asarray, array=np.array, asnumpy=np.asarray,
                                 cuda=types.SimpleNamespace(Device=lambda: types.SimpleNamespace(synchronize=lambda: None)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    prog = MultiDeviceProgram(out)
    want = prog.run({"input": (x := rng.standard_normal((8, 3, 32, 32)).astype(np.float32))})
    prog.backend, prog._builds = "cuda", prog._load_builds(lambda rel: Stage(out / rel))
    got = prog.run({"input": x})
    np.testing.assert_array_equal(got["probs"], want["probs"])
    assert [len(t) for t in prog.stage_ms] == [2, 2, 2]
    assert prog.plan["device_builds"] == [["device0"], ["device1"], ["device2"]]


def _stand_in_stage(d):
    from nnc.ir.interp import Interpreter
    from nnc.ir.parser import parse_file

    class Stage:
        def __init__(self):
            self.m = parse_file(d / "ir" / "final.nnir")
            self.m.weights = WeightStore.load(d / "ir" / "final")

        def run(self, feed, output):
            assert {a.name for a in self.m.main.args} == set(feed)
            return Interpreter(self.m).run({k: np.asarray(v) for k, v in feed.items()})
    return Stage()


def test_tensor_parallel_segments_with_stand_ins(tmp_path, rng, monkeypatch):
    """A tensor-parallel program on the one-GPU path: each device cut at its AllReduces into
    segment builds, the host summing the members' partials (numpy stand-ins for cupy / builds)."""
    import importlib.util
    import types
    if importlib.util.find_spec("nnc.passes.shard_tensor_parallel") is None:
        pytest.skip("no tensor-parallel pass")
    from nnc.multi_device import MultiDeviceProgram
    out = tmp_path / "out"
    _nnc("compile", EXAMPLES / "tiny_transformer.onnx", "-o", out, "--devices", "2", "--parallel", "tensor",
         "--no-codegen")
    fake = types.SimpleNamespace(asarray=np.asarray, array=np.array, asnumpy=np.asarray, add=np.add,
                                 maximum=np.maximum, minimum=np.minimum, multiply=np.multiply,
                                 concatenate=np.concatenate,
                                 cuda=types.SimpleNamespace(Device=lambda: types.SimpleNamespace(synchronize=lambda: None)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    prog = MultiDeviceProgram(out)
    builds = prog.plan["device_builds"]
    assert len(builds) == 2 and all(len(b) > 1 for b in builds)  # cut at the collectives
    x = rng.standard_normal((1, 16, 64)).astype(np.float32)
    want = prog.run({"x": x})
    prog.backend, prog._builds = "cuda", prog._load_builds(lambda rel: _stand_in_stage(out / rel))
    got = prog.run({"x": x})
    np.testing.assert_array_equal(got["y"], want["y"])


def test_reshape_blocks():
    from nnc.multi_device import _reshape_axis
    assert _reshape_axis((4, 128, 768), 0, 1, (512, 768)) == (0, 128)  # [B, S, D] -> [B*S, D]
    assert _reshape_axis((512, 2304), 0, 128, (4, 128, 2304)) == (0, 1)  # and back
    assert _reshape_axis((4, 6), 0, 1, (4, 2, 3)) == (0, 1)
    assert _reshape_axis((2, 4, 6), 1, 1, (8, 6)) is None  # the samples interleave
    assert _reshape_axis((4, 6), 0, 1, (6, 4)) is None  # rows of samples mix
    assert _reshape_axis((4, 6), 0, 1, (24,)) == (0, 6)  # one flat run per sample
    assert _reshape_axis((512, 768), 0, 128, (4, 98304)) == (0, 1)
    assert _reshape_axis((512, 768), 0, 128, (2, 196608)) is None  # 2 rows can't hold 4 samples' blocks


@pytest.mark.gpu
def test_cuda_tensor_parallel_on_one_gpu(tmp_path, rng):
    """A tensor-parallel build: every device's segments on the one GPU, AllReduce as a cupy sum."""
    import importlib.util
    if importlib.util.find_spec("nnc.passes.shard_tensor_parallel") is None:
        pytest.skip("no tensor-parallel pass")
    from nnc.multi_device import MultiDeviceProgram
    out = tmp_path / "out"
    _nnc("compile", EXAMPLES / "tiny_transformer.onnx", "-o", out, "--devices", "2", "--parallel", "tensor",
         "--no-tune")
    x = rng.standard_normal((1, 16, 64)).astype(np.float32)
    got = MultiDeviceProgram(out, "cuda").run({"x": x})
    want = MultiDeviceProgram(out, "reference").run({"x": x})
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-3, atol=1e-4)


def test_cli_stage_times(tmp_path):
    """--stage-times: a tuned plan.json's launch times balance the stages (here: made up)."""
    ops = [l.split(" = ")[0].strip()[1:] for l in _nnc("ir", EXAMPLES / "tiny_cnn.onnx", "--shapes",
                                                       "input:2x3x32x32").stdout.splitlines() if " = " in l]
    times = tmp_path / "single.json"
    times.write_text(json.dumps({"launches": [{"op": f"%{n}: f32[1] = X()", "tuning": {"time_ms": 1.0}} for n in ops]}))
    out = tmp_path / "out"
    _nnc("compile", EXAMPLES / "tiny_cnn.onnx", "-o", out, "--shapes", "input:2x3x32x32", "--devices", "2",
         "--stage-times", times, "--no-codegen")
    plan = json.loads((out / "plan.json").read_text())
    assert plan["cost_model"].startswith("measured")
    assert sum(s["measured_ops"] for s in plan["stages"]) >= 1


def test_program_module_interface(tmp_path, rng):
    from nnc.multi_device import MultiDeviceProgram
    out = tmp_path / "out"
    _nnc("compile", EXAMPLES / "tiny_cnn.onnx", "-o", out, "--shapes", "input:2x3x32x32", "--devices", "2",
         "--no-codegen")
    prog = MultiDeviceProgram(out)
    assert [(t.name, t.shape) for t in prog.inputs] == [("input", (2, 3, 32, 32))]
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(prog(x), prog.run({"input": x})["probs"])
    np.testing.assert_array_equal(prog(input=x), prog({"input": x}))
