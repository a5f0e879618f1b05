"""`nnc bench --scenario` (compiler/loadgen_sut.py): every MLPerf scenario run through MLCommons
LoadGen on the reference backend (CPU), LoadGen's own summary written and its VALID/INVALID line
in the table, the server search's 5-point bound, and clear errors for bad options. Each LoadGen
run is kept to about a second (short durations, few queries)."""
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nnc.cli import main
from nnc.driver import compile_model
from nnc.ir.errors import NncError
from nnc.loadgen_sut import (MAX_SERVER_POINTS, ScenarioOptions, ScenarioPoint, parse_summary, run_scenario,
                             server_search)

pytest.importorskip("mlperf_loadgen")  # the [bench] extra, part of [test]
ROOT = Path(__file__).resolve().parents[1]
FAST = ["--backend", "reference", "--duration-s", "0.4", "--min-queries", "4"]


@pytest.fixture(scope="module")
def tiny1(tmp_path_factory):
    d = tmp_path_factory.mktemp("lg") / "tiny_cnn_b1"
    compile_model(str(ROOT / "examples" / "tiny_cnn.onnx"), d, shapes={"input": [1, 3, 32, 32]}, arch="sm_90")
    return d


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory):
    d = tmp_path_factory.mktemp("lg") / "tiny_cnn_b2"
    compile_model(str(ROOT / "examples" / "tiny_cnn.onnx"), d, shapes={"input": [2, 3, 32, 32]}, arch="sm_90")
    return d


METRIC_LINE = {"single-stream": "90.0th percentile latency (ns)", "multi-stream": "99.0th percentile latency (ns)",
               "offline": "Samples per second"}


@pytest.mark.parametrize("scenario", ["single-stream", "multi-stream", "offline"])
def test_scenario_through_loadgen(tiny1, tmp_path, capsys, scenario):
    logs, js = tmp_path / "logs", tmp_path / "r.json"
    assert main(["bench", str(tiny1), "--scenario", scenario, "--contexts", "2", "--log-dir", str(logs),
                 "--json", str(js), *FAST]) == 0
    out = capsys.readouterr().out
    summary = logs / "mlperf_log_summary.txt"
    assert summary.is_file() and (logs / "mlperf_log_detail.txt").is_file()
    s = parse_summary(summary)
    want_scenario = {"single-stream": "SingleStream", "multi-stream": "MultiStream", "offline": "Offline"}[scenario]
    assert s["Scenario"] == want_scenario and s["Mode"] == "PerformanceOnly"
    assert "MLPerf Results Summary" in out  # LoadGen's own summary, printed first
    r = json.loads(js.read_text())
    p = r["points"][0]
    assert p["result"] == s["Result is"] and p["result"] in out.split("MLPerf Results Summary")[-1]
    metric_ns = float(s[METRIC_LINE[scenario]])
    want = metric_ns if scenario == "offline" else metric_ns * 1e-6
    assert p["value"] == pytest.approx(want) and p["value"] > 0
    assert r["contexts"] == 2 and r["batch"] == 1 and r["backend"] == "reference"
    assert r["environment"]["mlcommons_loadgen"].startswith("6.0.") and r["environment"]["date"]
    if scenario == "multi-stream":
        assert parse_summary(summary)["samples_per_query"] == "8"
    lat = p["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]


def test_server_search_through_loadgen(tiny1, tmp_path, capsys):
    logs, js = tmp_path / "srv", tmp_path / "s.json"
    assert main(["bench", str(tiny1), "--scenario", "server", "--latency-bound-ms", "100", "--target-qps", "20",
                 "--log-dir", str(logs), "--json", str(js), *FAST]) == 0
    r = json.loads(js.read_text())
    pts = r["points"]
    assert 1 <= len(pts) <= MAX_SERVER_POINTS
    assert len(list(logs.glob("qps_*/mlperf_log_summary.txt"))) == len(pts)  # one LoadGen run per point
    assert pts[0]["target_qps"] == 20
    for p in pts:
        s = parse_summary(p["summary_path"])
        assert s["Scenario"] == "Server" and float(s["target_qps"]) == pytest.approx(p["target_qps"])
        assert s["target_latency (ns)"] == "100000000"
        assert p["constraints_ok"] == (s["Performance constraints satisfied"] == "Yes")
    passing = [p["target_qps"] for p in pts if p["constraints_ok"]]
    if passing:
        assert pts[r["best"]]["target_qps"] == max(passing)
    else:
        assert r["best"] is None
    out = capsys.readouterr().out
    assert "p99 bound 100 ms" in out


def _fake(passes):
    calls = []

    def run(q):
        calls.append(q)
        return ScenarioPoint("server", "INVALID", "completed QPS", q, q, passes(q))
    return run, calls


def test_server_search_is_bounded_to_five_points():
    run, calls = _fake(lambda q: True)
    pts = server_search(run, 10)
    assert calls == [10, 20, 40, 80, 160] and len(pts) == MAX_SERVER_POINTS
    run, calls = _fake(lambda q: False)
    server_search(run, 10)
    assert calls == [10, 5, 2.5, 1.25, 0.625]
    run, calls = _fake(lambda q: q <= 30)  # the true capacity 30 lies between points
    server_search(run, 10)
    assert calls == [10, 20, 40, 30, 35] and len(calls) <= MAX_SERVER_POINTS


def test_batched_model_stacks_samples(tiny2, tmp_path):
    r = run_scenario(tiny2, ScenarioOptions("offline", backend="reference", duration_s=0.4, contexts=2,
                                            log_dir=str(tmp_path / "off"), min_query_count=4, samples=8))
    assert r.batch == 2 and r.points[0].result in ("VALID", "INVALID") and r.points[0].value > 0
    from nnc.api import load
    from nnc.loadgen_sut import _Sut, _random_samples
    m = load(tiny2, backend="reference")
    samples = _random_samples(m.plan, 2, 3, seed=0)
    assert all(s["input"].shape == (1, 3, 32, 32) for s in samples)
    assert len({s["input"].tobytes() for s in samples}) == 3 and all(np.abs(s["input"]).max() > 0 for s in samples)
    sut = _Sut(sys.modules["mlperf_loadgen"], m, 2, 1, samples, 0.0, "numpy")
    try:
        f = sut.feed([2])  # one sample: padded with itself to the compiled batch
        np.testing.assert_array_equal(f["input"], np.concatenate([samples[2]["input"]] * 2))
        f = sut.feed([1, 0])
        np.testing.assert_array_equal(f["input"], np.concatenate([samples[1]["input"], samples[0]["input"]]))
    finally:
        sut.stop()


@pytest.mark.parametrize("kw, msg", [
    (dict(scenario="server"), "--scenario server needs --latency-bound-ms"),
    (dict(scenario="offline", latency_bound_ms=5.0), "--latency-bound-ms applies to --scenario server"),
    (dict(scenario="single-stream", target_qps=5.0), "--target-qps applies to"),
    (dict(scenario="burst"), "--scenario must be one of"),
    (dict(scenario="offline", duration_s=-1.0), "--duration-s must be a positive number"),
    (dict(scenario="offline", contexts=0), "--contexts must be an integer >= 1"),
    (dict(scenario="offline", backend="tensorrt"), "--backend must be"),
])
def test_bad_options(kw, msg):
    with pytest.raises(NncError, match=msg):
        ScenarioOptions(**kw)


def test_batch_mismatch_and_flags_without_scenario(tiny1, tmp_path, capsys):
    with pytest.raises(NncError, match="--batch 4: .* compiled for batch 1"):
        run_scenario(tiny1, ScenarioOptions("offline", backend="reference", batch=4, log_dir=str(tmp_path)))
    assert main(["bench", str(tiny1), "--backend", "reference", "--contexts", "3"]) != 0
    assert "--contexts: only with --scenario" in capsys.readouterr().err


def test_missing_loadgen_is_a_clear_error(tiny1, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlperf_loadgen", None)  # import fails as if not installed
    with pytest.raises(NncError, match=r"needs MLCommons LoadGen.*pip install 'nnc\[bench\]'"):
        run_scenario(tiny1, ScenarioOptions("offline", backend="reference"))


def test_callable_peer_under_the_same_sut(tiny1, tmp_path):
    """A peer system (here the plain interpreter, as torch.compile is on the GPU) runs under the
    same SUT and LoadGen settings; every call it gets is one stacked, checked batch."""
    from nnc.api import load
    from nnc.ir.interp import Interpreter
    from nnc.loadgen_sut import CallableSystem
    m = load(tiny1, backend="reference")
    seen = []

    def make_runner():
        interp = Interpreter(m.ir)

        def run(feed):
            seen.append(feed["input"].shape)
            return interp.run(feed)
        return run
    r = run_scenario(tmp_path / "peer", ScenarioOptions("single-stream", backend="reference", duration_s=0.3,
                                                        min_query_count=4, log_dir=str(tmp_path / "peer_logs")),
                     system=CallableSystem(m.plan, make_runner, backend="interpreter"))
    assert r.backend == "interpreter" and r.points[0].result in ("VALID", "INVALID") and r.points[0].value > 0
    assert len(seen) >= 4 + 4 and set(seen) == {(1, 3, 32, 32)}  # calibration + LoadGen's queries
    assert (tmp_path / "peer_logs" / "mlperf_log_summary.txt").is_file()


def test_batch_window_fills_a_batch(tiny2):
    """With a batching window, samples arriving within it share one run of the compiled batch;
    without one, a lone sample runs at once, padded. Every sample is answered exactly once."""
    import threading
    import types
    from nnc.api import load
    from nnc.loadgen_sut import CallableSystem, _random_samples, _Sut
    m = load(tiny2, backend="reference")
    answered, runs = [], []
    done = threading.Event()

    def complete(resp):
        answered.extend(r[0] for r in resp)
        if len(answered) >= 4:
            done.set()
    fake_lg = types.SimpleNamespace(QuerySampleResponse=lambda i, p, n: (i, p, n), QuerySamplesComplete=complete)

    def make_runner():
        def run(feed):
            runs.append(feed["input"].copy())
            return {m.output_names[0]: np.zeros((2, 10), np.float32)}
        return run
    samples = _random_samples(m.plan, 2, 4, seed=1)
    system = CallableSystem(m.plan, make_runner)
    q = lambda i: types.SimpleNamespace(id=100 + i, index=i)
    sut = _Sut(fake_lg, system, 2, 1, samples, 0.5, "numpy")  # a 0.5 s window: the pair always meets
    try:
        sut.issue([q(0)])
        sut.issue([q(1)])
        sut.issue([q(2), q(3)])
        assert done.wait(10)
    finally:
        sut.stop()
    assert sorted(answered) == [100, 101, 102, 103] and len(runs) == 2
    np.testing.assert_array_equal(runs[0], np.concatenate([samples[0]["input"], samples[1]["input"]]))
    runs.clear(), answered.clear()
    done.clear()
    sut = _Sut(fake_lg, system, 2, 1, samples, 0.0, "numpy")
    try:
        sut.issue([q(3)])
        t0 = time.perf_counter()
        while not answered and time.perf_counter() - t0 < 10:
            time.sleep(0.005)
    finally:
        sut.stop()
    assert answered == [103] and len(runs) == 1
    np.testing.assert_array_equal(runs[0], np.concatenate([samples[3]["input"]] * 2))  # padded with itself


def test_default_log_dir_is_outside_out(tiny1, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tiny1.iterdir())
    assert main(["bench", str(tiny1), "--scenario", "offline", *FAST]) == 0
    assert (tmp_path / "mlperf_logs" / f"{tiny1.name}_offline" / "mlperf_log_summary.txt").is_file()
    assert sorted(p.name for p in tiny1.iterdir()) == before  # OUT ships as compiled
