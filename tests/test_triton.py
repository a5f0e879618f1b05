"""nnc on a real NVIDIA Triton Inference Server (the nvidia-pytriton wheel's tritonserver, CPU,
reference backend): export, correct outputs over HTTP and gRPC, bad requests, a corrupt model beside
good ones, a bounded load test and dynamic batching in Triton's statistics, and `nnc serve`.

The server and tritonclient live in the Triton venv (nnc/serve.py), created once (cached under
$XDG_CACHE_HOME/nnc or $NNC_TRITON_VENV); the tests skip, saying why, when it cannot be created.
tritonclient runs in that venv (tests/triton_client_driver.py); nnc's side talks raw KServe v2 HTTP.
"""
from __future__ import annotations

import codecs
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import nnc
from nnc.triton_export import TritonExportError, TritonExportOptions, check_model_name, export_triton, \
    pbtxt_string, render_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tiny_cnn.onnx"
DRIVER = Path(__file__).resolve().parent / "triton_client_driver.py"
COMPILED_BATCH = 2
RTOL, ATOL = 1e-3, 1e-5
N_LOAD = 2000  # requests of the load test (about 15 s on 2 shared CPU cores)


# ---------------------------------------------------------------------------- export (no server)

def _plan(names=("input", "probs"), lead=(2, 2)):
    return {"inputs": [{"name": names[0], "dtype": "float32", "shape": [lead[0], 3, 32, 32]}],
            "outputs": [{"name": names[1], "dtype": "float32", "shape": [lead[1], 10]}]}


def test_pbtxt_strings_are_escaped():
    hostile = 'in"}\ninput [ { name: "x'
    q = pbtxt_string(hostile)
    assert "\n" not in q and q.count('"') == 2 and q.startswith('"') and q.endswith('"')
    assert codecs.escape_decode(q[1:-1].encode())[0].decode() == hostile  # C-style escapes round trip
    assert pbtxt_string("a\\b'c") == '"a\\134b\\047c"'


def test_export_refuses_unsafe_names():
    with pytest.raises(TritonExportError, match="printable ASCII"):
        render_config("m", _plan(names=("in\nput", "probs")), TritonExportOptions(backend="reference"))
    cfg = render_config("m", _plan(names=('we"ird', "probs")), TritonExportOptions(backend="reference"))
    assert 'name: "we\\042ird"' in cfg
    for bad in ("../x", ".hidden", "a/b", "", "a b", "x" * 129):
        with pytest.raises(TritonExportError, match="Triton model name"):
            check_model_name(bad)


def test_export_config_batching():
    cfg = render_config("m", _plan(), TritonExportOptions(max_batch=8, dynamic_batching_us=500, instances=2,
                                                         backend="reference"))
    assert "max_batch_size: 8" in cfg and "dims: [ 3, 32, 32 ]" in cfg and "dims: [ 10 ]" in cfg
    assert "max_queue_delay_microseconds: 500" in cfg and "count: 2 kind: KIND_CPU" in cfg
    assert "pad-to-compiled-batch 2" in cfg
    cfg0 = render_config("m", _plan(), TritonExportOptions(backend="cuda"))
    assert "max_batch_size: 0" in cfg0 and "dims: [ 2, 3, 32, 32 ]" in cfg0 and "KIND_GPU" in cfg0
    assert "dynamic_batching" not in cfg0 and "batching: none" in cfg0
    assert 'key: "FORCE_CPU_ONLY_INPUT_TENSORS" value: { string_value: "no" }' in cfg0  # device tensors via DLPack
    with pytest.raises(TritonExportError, match="same compiled batch"):
        render_config("m", _plan(lead=(2, 1)), TritonExportOptions(max_batch=4))
    with pytest.raises(TritonExportError, match="needs --max-batch"):
        render_config("m", _plan(), TritonExportOptions(dynamic_batching_us=100))


def test_export_dtypes():
    plan = {"inputs": [{"name": "ids", "dtype": "int64", "shape": [4, 128]},
                       {"name": "mask", "dtype": "bool", "shape": [4, 128]}],
            "outputs": [{"name": "h", "dtype": "float16", "shape": [4, 128, 768]}]}
    cfg = render_config("m", plan, TritonExportOptions(max_batch=16))
    assert "data_type: TYPE_INT64\n    dims: [ 128 ]" in cfg and "data_type: TYPE_BOOL" in cfg
    assert "data_type: TYPE_FP16\n    dims: [ 128, 768 ]" in cfg
    plan["outputs"][0]["dtype"] = "complex64"
    with pytest.raises(TritonExportError, match="complex64 has no Triton data type"):
        render_config("m", plan, TritonExportOptions())
    plan["outputs"][0].update(dtype="float32", shape=["N", 10])
    with pytest.raises(TritonExportError, match="not static"):
        render_config("m", plan, TritonExportOptions())


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """tiny_cnn compiled at batch 2 with its CUDA code and plan (the reference backend runs the plan)."""
    out = tmp_path_factory.mktemp("triton_out") / "tiny_cnn"
    nnc.compile(EXAMPLE, shapes={"input": [COMPILED_BATCH, 3, 32, 32]}, backend="reference", out=out, codegen=True)
    return out


def test_export_layout_and_refusals(compiled, tmp_path):
    repo = tmp_path / "repo"
    d = export_triton(compiled, repo, TritonExportOptions(backend="reference"))
    assert d == repo / "tiny_cnn"
    assert (d / "config.pbtxt").is_file() and (d / "1" / "model.py").is_file()
    assert (d / "1" / "nnc_out" / "plan.json").is_file() and (d / "1" / "nnc_out" / "weights.bin").is_file()
    export_triton(compiled, repo, TritonExportOptions(backend="reference"))  # an nnc export: replaced
    (repo / "theirs").mkdir()
    with pytest.raises(TritonExportError, match="not written by nnc export-triton"):
        export_triton(compiled, repo, TritonExportOptions(name="theirs", backend="reference"))
    os.symlink("/etc", compiled.parent / "linked")
    try:
        link_out = compiled.parent / "with_link"
        link_out.mkdir()
        for f in ("plan.json",):
            (link_out / f).write_bytes((compiled / f).read_bytes())
        os.symlink("/etc/passwd", link_out / "weights.bin")
        with pytest.raises(TritonExportError, match="symbolic link"):
            export_triton(link_out, repo, TritonExportOptions(name="linked", backend="reference"))
    finally:
        os.unlink(compiled.parent / "linked")
    assert not (repo / "linked").exists() and not any(p.name.startswith(".") for p in repo.iterdir())
    with pytest.raises(TritonExportError, match="inside"):
        export_triton(compiled, compiled / "repo", TritonExportOptions(backend="reference"))
    assert not (compiled / "repo").exists()


def test_cli_export_triton(compiled, tmp_path):
    from nnc.cli import main
    assert main(["export-triton", str(compiled), "--repo", str(tmp_path / "r"), "--name", "m", "--max-batch", "4",
                 "--dynamic-batching-us", "100", "--backend", "reference"]) == 0
    assert "max_queue_delay_microseconds: 100" in (tmp_path / "r" / "m" / "config.pbtxt").read_text()
    assert main(["export-triton", str(compiled), "--repo", str(tmp_path / "r"), "--name", "../m"]) == 1


def test_venv_never_replaces_a_directory_nnc_did_not_make(tmp_path):
    from nnc.serve import ServeError, ensure_venv
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    with pytest.raises(ServeError, match="not a Triton venv made by nnc"):
        ensure_venv(tmp_path / "mine")
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep"


# ---------------------------------------------------------------------------- model.py without Triton

class _FakeTensor:
    def __init__(self, name, array):
        self.name, self.array = name, np.asarray(array)

    def __dlpack__(self, **kw):
        return self.array.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()

    @classmethod
    def from_dlpack(cls, name, array):
        return cls(name, np.from_dlpack(array))


class _FakeResponse:
    def __init__(self, output_tensors, error=None):
        self.outputs, self.error = {t.name: t.array for t in output_tensors}, error


class _FakeRequest:
    def __init__(self, **arrays):
        self.tensors = {k: _FakeTensor(k, v) for k, v in arrays.items()}


def _fake_pb_utils():
    import types
    m = types.ModuleType("triton_python_backend_utils")
    m.Tensor, m.InferenceResponse = _FakeTensor, _FakeResponse
    m.TritonError = type("TritonError", (Exception,), {})
    m.TritonModelException = type("TritonModelException", (Exception,), {})
    m.get_input_tensor_by_name = lambda r, n: r.tensors.get(n)
    return m


@pytest.fixture
def model_py(monkeypatch):
    """templates/triton_model.py imported with a stand-in for Triton's triton_python_backend_utils."""
    import importlib.util
    fake = _fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    spec = importlib.util.spec_from_file_location("nnc_triton_model_under_test", ROOT / "templates" / "triton_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, fake


def _initialize(mod, repo, name):
    model = mod.TritonPythonModel()
    cfg = json.dumps({"max_batch_size": 8 if "pad" in name else 0,
                      "input": [{"name": "input"}], "output": [{"name": "probs"}],
                      "parameters": {k: {"string_value": v} for k, v in
                                     {"nnc_backend": "reference", "nnc_out": "nnc_out",
                                      "nnc_compiled_batch": str(COMPILED_BATCH if "pad" in name else 0)}.items()}})
    model.initialize({"model_config": cfg, "model_repository": str(repo / name), "model_version": "1"})
    return model


def test_model_py_pads_batches_and_isolates_errors(model_py, compiled, tmp_path, rng):
    mod, fake = model_py
    export_triton(compiled, tmp_path, TritonExportOptions(name="pad", max_batch=8, backend="reference"))
    model = _initialize(mod, tmp_path, "pad")
    xs = [rng.standard_normal((k, 3, 32, 32)).astype(np.float32) for k in (1, 3, 2)]
    bad = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)  # Triton would refuse it; model.py must too
    res = model.execute([_FakeRequest(input=xs[0]), _FakeRequest(input=bad), _FakeRequest(input=xs[1]),
                         _FakeRequest(input=xs[2])])
    assert res[1].error is not None and "expected [batch, 3, 32, 32]" in str(res[1].error)
    want = _onnxruntime(np.concatenate(xs))
    got = np.concatenate([res[i].outputs["probs"] for i in (0, 2, 3)])
    assert [res[i].outputs["probs"].shape[0] for i in (0, 2, 3)] == [1, 3, 2]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)

    class Failing:  # a run that raises: those requests get a TritonError, the next execute() works
        def run(self, *a, **k):
            raise nnc.NncError("injected failure")
    real, model.model = model.model, Failing()
    res = model.execute([_FakeRequest(input=xs[0]), _FakeRequest(input=xs[1])])
    assert all(isinstance(r.error, fake.TritonError) and "injected failure" in str(r.error) for r in res)
    model.model = real
    res = model.execute([_FakeRequest(input=xs[0])])
    assert res[0].error is None and res[0].outputs["probs"].shape == (1, 10)


def test_model_py_fixed_shapes_and_load_error(model_py, compiled, tmp_path, rng):
    mod, fake = model_py
    export_triton(compiled, tmp_path, TritonExportOptions(name="fixed", backend="reference"))
    model = _initialize(mod, tmp_path, "fixed")
    x = rng.standard_normal((COMPILED_BATCH, 3, 32, 32)).astype(np.float32)
    res = model.execute([_FakeRequest(input=x), _FakeRequest(other=x)])
    np.testing.assert_allclose(res[0].outputs["probs"], _onnxruntime(x), rtol=RTOL, atol=ATOL)
    assert res[1].error is not None and "'input' is missing" in str(res[1].error)
    (tmp_path / "fixed" / "1" / "nnc_out" / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(fake.TritonModelException, match="weights.bin.*sha256"):
        _initialize(mod, tmp_path, "fixed")


# ---------------------------------------------------------------------------- the real server

@pytest.fixture(scope="session")
def triton_venv():
    from nnc.serve import ServeError, ensure_venv, triton_dist
    try:
        venv = ensure_venv(log=lambda m: None)
        triton_dist(venv)
    except ServeError as e:
        pytest.skip(f"the Triton venv could not be created (needs network to PyPI the first time): {e}")
    return venv


def _client(venv, action, **args):
    from nnc.serve import _venv_python
    r = subprocess.run([str(_venv_python(venv)), str(DRIVER), action, json.dumps(args)], capture_output=True,
                       text=True, timeout=240, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, f"client {action} failed:\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def server(triton_venv, compiled, tmp_path_factory):
    """One server on a four-model repository: 'tiny' (max batch 8, padded to the compiled batch,
    dynamic batching), 'tiny_fixed' (compiled shapes, no batching, 2 instances), 'broken' (weights.bin
    corrupt) and 'hostile' (tensor names that need escaping)."""
    from nnc.serve import ServerOptions, TritonServer
    repo = tmp_path_factory.mktemp("triton_repo")
    export_triton(compiled, repo, TritonExportOptions(name="tiny", max_batch=8, dynamic_batching_us=20000,
                                                      backend="reference"))
    export_triton(compiled, repo, TritonExportOptions(name="tiny_fixed", instances=2, backend="reference"))
    broken = export_triton(compiled, repo, TritonExportOptions(name="broken", backend="reference"))
    w = broken / "1" / "nnc_out" / "weights.bin"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    hostile_out = repo.parent / "hostile_out"
    nnc.compile(_hostile_model(), shapes={HOSTILE_IN: [2, 4]}, backend="reference", out=hostile_out, codegen=True)
    export_triton(hostile_out, repo, TritonExportOptions(name="hostile", max_batch=4, backend="reference"))
    srv = TritonServer(repo, ServerOptions(), venv=triton_venv, log_path=repo.parent / "tritonserver.log")
    try:
        srv.start(timeout_s=120)
        yield srv
    finally:
        srv.stop()


HOSTILE_IN, HOSTILE_OUT = 'in"} input [ { name: \\x', "out'#}"  # quotes, braces, a backslash, a comment char


def _hostile_model():
    """y = relu(x) * 2 with tensor names that would break an unescaped config.pbtxt."""
    from onnx import TensorProto, helper
    g = helper.make_graph(
        [helper.make_node("Relu", [HOSTILE_IN], ["r"]), helper.make_node("Add", ["r", "r"], [HOSTILE_OUT])], "g",
        [helper.make_tensor_value_info(HOSTILE_IN, TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info(HOSTILE_OUT, TensorProto.FLOAT, ["N", 4])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_hostile_tensor_names_are_served_as_given(server, rng):
    cfg = (Path(server.repo) / "hostile" / "config.pbtxt").read_text()
    assert HOSTILE_IN not in cfg and pbtxt_string(HOSTILE_IN) in cfg and pbtxt_string(HOSTILE_OUT) in cfg
    assert server.model_ready("hostile"), server.log_tail()
    x = rng.standard_normal((3, 4)).astype(np.float32)
    status, body = _infer_json(server, "hostile", x, name=HOSTILE_IN)
    assert status == 200, body
    (o,) = body["outputs"]
    assert o["name"] == HOSTILE_OUT
    np.testing.assert_allclose(np.array(o["data"], np.float32).reshape(o["shape"]), np.maximum(x, 0) * 2, rtol=RTOL)


def _post(srv, path, body: bytes, headers=None):
    req = urllib.request.Request(f"http://{srv.http_url}{path}", data=body, method="POST",
                                 headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"error": raw.decode(errors="replace")}


def _infer_json(srv, model, arr, name="input", datatype="FP32", shape=None):
    body = {"inputs": [{"name": name, "shape": list(arr.shape if shape is None else shape), "datatype": datatype,
                        "data": arr.ravel().tolist()}]}
    return _post(srv, f"/v2/models/{model}/infer", json.dumps(body).encode())


def _onnxruntime(x):
    ort = pytest.importorskip("onnxruntime")
    s = ort.InferenceSession(str(EXAMPLE), providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x})[0]


def test_outputs_match_onnxruntime_http_and_grpc(server, triton_venv, tmp_path, rng):
    x = rng.standard_normal((COMPILED_BATCH, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input=x)
    want = _onnxruntime(x)
    for model in ("tiny_fixed", "tiny"):
        _client(triton_venv, "infer", url=server.http_url, grpc_url=server.grpc_url, model=model,
                inputs=str(tmp_path / "in.npz"), save=str(tmp_path / "out.npz"))
        got = np.load(tmp_path / "out.npz")
        for proto in ("http", "grpc"):
            np.testing.assert_allclose(got[f"{proto}/probs"], want, rtol=RTOL, atol=ATOL, err_msg=f"{model} {proto}")
    # 3 rows through the padded model: two runs of the compiled batch, the last one zero-padded
    x3 = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    status, body = _infer_json(server, "tiny", x3)
    assert status == 200, body
    got = np.array(body["outputs"][0]["data"], dtype=np.float32).reshape(body["outputs"][0]["shape"])
    np.testing.assert_allclose(got, _onnxruntime(x3), rtol=RTOL, atol=ATOL)


def test_bad_requests_get_4xx_and_server_keeps_serving(server, rng):
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    cases = {
        "wrong input name": _infer_json(server, "tiny", x, name="nope"),
        "wrong shape": _infer_json(server, "tiny", rng.standard_normal((1, 3, 16, 32)).astype(np.float32)),
        "wrong shape (fixed model)": _infer_json(server, "tiny_fixed", x),
        "wrong dtype": _infer_json(server, "tiny", x.astype(np.int32), datatype="INT32"),
        "oversize batch": _infer_json(server, "tiny", np.zeros((9, 3, 32, 32), np.float32) + 0.5),
        "unknown model": _infer_json(server, "nope", x),
    }
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    cases["truncated binary body"] = _post(server, "/v2/models/tiny/infer", header + x.tobytes()[:100], headers={
        "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))})
    for what, (status, body) in cases.items():
        print(f"{what}: {status} {body.get('error')}")
    for what, (status, body) in cases.items():
        assert 400 <= status < 500, f"{what}: status {status} {body}"
        assert body.get("error"), f"{what}: no error message ({body})"
    assert "nope" in cases["wrong input name"][1]["error"]
    # JSON that does not parse, or 'data' shorter than its shape: Triton 2.51's HTTP frontend answers
    # 500 (its classification, not nnc's: the request never reaches model.py); still an error with a
    # message, and the server goes on serving
    for body_bytes, word in ((b'{"inputs": [', "parse"),
                             (json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                                      "data": [0.5] * 10}]}).encode(), "shape")):
        status, body = _post(server, "/v2/models/tiny/infer", body_bytes)
        assert status in (400, 500) and word in body.get("error", ""), (status, body)
    status, body = _infer_json(server, "tiny", x)
    assert status == 200 and body["outputs"][0]["shape"] == [1, 10]
    assert server.proc.poll() is None


def test_bad_grpc_requests_get_invalid_argument(server, triton_venv):
    res = _client(triton_venv, "grpc_bad", grpc_url=server.grpc_url, model="tiny", shape=[1, 3, 32, 32],
                  output="probs")
    for what in ("wrong input name", "wrong shape", "wrong dtype"):
        assert res[what]["status"] == "StatusCode.INVALID_ARGUMENT" and res[what]["message"], (what, res[what])
    assert res["good"]["shape"] == [1, 10]


def test_loopback_only_and_metrics(server):
    log = server.log_text()
    for service, port in (("GRPCInferenceService", server.grpc_port), ("HTTPService", server.http_port),
                          ("Metrics Service", server.metrics_port)):
        assert f"Started {service} at 127.0.0.1:{port}" in log, service
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'nv_inference_request_success{model="tiny"' in text


def test_instance_groups(server):
    log = server.log_text()
    assert "tiny_fixed_0_0" in log and "tiny_fixed_0_1" in log, server.log_tail()  # --instances 2
    assert "tiny_0_1" not in log


def test_corrupt_weights_fail_to_load_others_stay_up(server):
    assert not server.model_ready("broken")
    assert server.model_ready("tiny") and server.model_ready("tiny_fixed")
    log = server.log_text()
    lines = [ln for ln in log.splitlines() if "broken" in ln and "weights.bin" in ln]
    assert lines, f"no load error naming broken's weights.bin in Triton's log:\n{server.log_tail()}"
    assert any("sha256" in ln or "does not match" in ln for ln in lines), lines
    status, body = _post(server, "/v2/models/broken/infer", b'{"inputs": []}')
    assert 400 <= status < 600 and body.get("error")


def test_load_and_dynamic_batching(server, triton_venv, capsys):
    before = _client(triton_venv, "stats", url=server.http_url, model="tiny")["model_stats"][0]
    res = _client(triton_venv, "load", url=server.http_url, model="tiny", input="input", output="probs",
                  shape=[1, 3, 32, 32], requests=N_LOAD, clients=8)
    with capsys.disabled():  # the numbers reach CI's log, not only -s runs
        print(f"\nTriton load test (CPU, reference backend, tiny_cnn, 8 HTTP clients): {res['ok']}/{res['sent']} ok, "
              f"p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms, {res['rps']:.0f} req/s")
    assert res["answered"] == res["sent"] == N_LOAD and res["ok"] == N_LOAD, res["failures"]
    after = _client(triton_venv, "stats", url=server.http_url, model="tiny")["model_stats"][0]
    inferences = int(after["inference_count"]) - int(before["inference_count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    sizes = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in after.get("batch_stats", [])}
    with capsys.disabled():
        print(f"Triton statistics: {inferences} inferences in {executions} executions; batch sizes {sizes}")
    assert inferences == N_LOAD
    assert executions < inferences and any(b > 1 for b in sizes), "dynamic batching never grouped requests"


def test_nnc_serve_cli_starts_and_stops_on_sigterm(triton_venv, compiled, tmp_path):
    from nnc.serve import free_port
    port = free_port()
    env = dict(os.environ, NNC_TRITON_VENV=str(triton_venv))
    p = subprocess.Popen([sys.executable, "-m", "nnc.cli", "serve", str(compiled), "--backend", "reference",
                          "--http-port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env, start_new_session=True)
    try:
        deadline, ready = time.monotonic() + 90, False
        while time.monotonic() < deadline and p.poll() is None and not ready:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/tiny_cnn/ready", timeout=2) as r:
                    ready = r.status == 200
            except (OSError, ValueError):
                time.sleep(0.3)
        assert ready, f"nnc serve did not come up: {p.poll()}"
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0, out
        assert "127.0.0.1:%d" % port in out and "tiny_cnn: READY" in out
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


@pytest.mark.gpu
def test_cuda_backend_on_triton(triton_venv, tmp_path, rng):
    """The cuda path of model.py (KIND_GPU, DLPack/cupy, padding): outputs vs onnxruntime, fp32."""
    from nnc.serve import ServerOptions, TritonServer
    out = tmp_path / "tiny_cuda"
    nnc.compile(EXAMPLE, shapes={"input": [COMPILED_BATCH, 3, 32, 32]}, out=out)
    repo = tmp_path / "repo"
    export_triton(out, repo, TritonExportOptions(name="tiny", max_batch=8, dynamic_batching_us=2000))
    assert "KIND_GPU" in (repo / "tiny" / "config.pbtxt").read_text()
    with TritonServer(repo, ServerOptions(), venv=triton_venv, log_path=tmp_path / "tritonserver.log") as srv:
        assert srv.model_ready("tiny"), srv.log_tail()
        for rows in (1, 2, 3):
            x = rng.standard_normal((rows, 3, 32, 32)).astype(np.float32)
            status, body = _infer_json(srv, "tiny", x)
            assert status == 200, body
            got = np.array(body["outputs"][0]["data"], np.float32).reshape(body["outputs"][0]["shape"])
            np.testing.assert_allclose(got, _onnxruntime(x), rtol=RTOL, atol=ATOL)
        res = _client(triton_venv, "load", url=srv.http_url, model="tiny", input="input", output="probs",
                      shape=[1, 3, 32, 32], requests=500, clients=8)
        print(f"\nTriton on the GPU (tiny_cnn fp32, 8 clients): p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms")
        assert res["ok"] == 500, res["failures"]
