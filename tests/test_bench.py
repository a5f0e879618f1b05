"""`nnc bench` (compiler/bench.py): the statistics, the table and --json on the CPU through the
reference backend, the clear error without a GPU, and on a GPU the trtexec-style numbers with and
without the CUDA graph."""
import json
from pathlib import Path

import numpy as np
import pytest

from nnc.bench import BenchOptions, bench, format_text, summarize
from nnc.cli import main
from nnc.driver import compile_model
from nnc.ir.errors import NncError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench") / "tiny_cnn"
    compile_model(str(ROOT / "examples" / "tiny_cnn.onnx"), d, shapes={"input": [2, 3, 32, 32]}, arch="sm_90")
    return d


def test_summarize_is_trtexec_statistics():
    s = summarize(float(v) for v in range(1, 101))
    assert s == {"min": 1.0, "mean": 50.5, "median": 50.5, "p90": pytest.approx(90.1), "p99": pytest.approx(99.01),
                 "max": 100.0}
    assert summarize([]) is None
    assert summarize([3.0])["p99"] == 3.0


def test_options_are_checked():
    with pytest.raises(NncError, match="--iterations must be an integer >= 1"):
        BenchOptions(iterations=0)
    with pytest.raises(NncError, match="--warmup must be an integer >= 0"):
        BenchOptions(warmup=-1)
    with pytest.raises(NncError, match="backend"):
        BenchOptions(backend="tensorrt")


def _ordered(s):
    return s["min"] <= s["median"] <= s["p90"] <= s["p99"] <= s["max"] and s["min"] <= s["mean"] <= s["max"]


def test_reference_bench_table_and_json(tiny, tmp_path, capsys):
    js = tmp_path / "b.json"
    assert main(["bench", str(tiny), "--backend", "reference", "--iterations", "6", "--warmup", "1",
                 "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "latency (host, end to end)" in out and "throughput:" in out and "batch 2" in out
    assert "GPU compute" not in out  # no device on the reference backend: no rows made up
    d = json.loads(js.read_text())
    assert d["backend"] == "reference" and d["iterations"] == 6 and d["warmup"] == 1 and d["batch"] == 2
    lat = d["latency_ms"]
    assert _ordered(lat) and lat["min"] > 0
    # sequential requests: throughput is batch / mean latency, up to the loop's own host time
    assert 0.5 < d["throughput_per_s"] / (2 * 1e3 / lat["mean"]) <= 1.01
    assert d["gpu_compute_ms"] is None and d["environment"]["date"] and d["environment"]["nnc"]


def test_without_a_gpu_bench_says_so(tiny, capsys):
    from nnc.runtime import gpu_available
    if gpu_available():
        pytest.skip("a GPU is present")
    assert main(["bench", str(tiny)]) == 1
    err = capsys.readouterr().err
    assert "nnc bench: error: no CUDA GPU is available" in err and "--backend reference" in err


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [True, False])
def test_gpu_bench_numbers(tiny, graph):
    r = bench(tiny, BenchOptions(iterations=50, warmup=5, cuda_graph=graph))
    assert r.backend == "cuda" and r.cuda_graph is graph and r.batch == 2
    for s in (r.latency_ms, r.gpu_compute_ms, r.h2d_ms, r.d2h_ms, r.enqueue_ms):
        assert _ordered(s) and s["min"] > 0
    # the end-to-end request holds the copies and the compute
    assert r.latency_ms["median"] >= r.gpu_compute_ms["median"]
    assert r.latency_ms["median"] >= r.h2d_ms["median"] + r.d2h_ms["median"]
    assert r.h2d_bytes == 2 * 3 * 32 * 32 * 4 and r.d2h_bytes == 2 * 10 * 4
    assert r.environment["gpu"] and r.environment["cuda_driver"] > 0
    assert "GPU compute" in format_text(r) and np.isfinite(r.throughput_per_s)
