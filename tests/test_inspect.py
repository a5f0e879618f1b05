"""`nnc inspect` (compiler/inspect_cmd.py): the per-kernel table from plan.json of a compiled
example on the CPU, tuned fields shown when plan.json has them, missing fields shown as "-",
--plot's optional matplotlib, and on a GPU --time's measured times and shares."""
import copy
import json
from pathlib import Path

import pytest

from nnc.cli import main
from nnc.driver import compile_model
from nnc.inspect_cmd import COPIES, add_times, format_text, inspect, kernel_rows, op_names, plot

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("inspect") / "tiny_cnn"
    compile_model(str(ROOT / "examples" / "tiny_cnn.onnx"), d, shapes={"input": [2, 3, 32, 32]}, arch="sm_90")
    return d


def _plan(d):
    return json.loads((d / "plan.json").read_text())


def test_table_rows_follow_the_plan(tiny, capsys):
    plan = _plan(tiny)
    assert main(["inspect", str(tiny)]) == 0
    out = capsys.readouterr().out
    rows = kernel_rows(plan)
    kernel_launches = [i for i, l in enumerate(plan["launches"]) if l["kind"] == "kernel"]
    assert sorted(i for r in rows if r.kernel != COPIES for i in r.launches) == kernel_launches
    assert {r.kernel for r in rows if r.kernel != COPIES} == {k["name"] for k in plan["kernels"]}
    by_ops = {r.ops: r for r in rows}
    assert "Add+Relu" in by_ops and "Conv" in by_ops and "Softmax" in by_ops  # the fused residual add
    conv = by_ops["Conv"]
    k = next(k for k in plan["kernels"] if k["name"] == conv.kernel)
    assert conv.template == k["template"] and conv.tactic.startswith(k["params"]["selected"]["variant"])
    for r in rows:
        assert r.kernel in out and r.template in out
    assert f"{len(plan['kernels'])} kernels, {len(kernel_launches)} kernel launches per run" in out


def test_tuned_fields_and_missing_fields(tiny):
    plan = copy.deepcopy(_plan(tiny))
    first = next(l for l in plan["launches"] if l["kind"] == "kernel")
    first["tuning"] = {"source": "timed", "variant": "conv_igemm", "params": {"BM": 64, "BN": 32}, "time_ms": 0.25}
    rows = kernel_rows(plan)
    r = next(r for r in rows if r.kernel == first["kernel"])
    assert r.tactic == "conv_igemm BM=64 BN=32 (tuned, timed)" and r.tuned_ms == 0.25
    assert r.runner_up == "-"  # no timings recorded: no runner-up
    first["tuning"]["timings"] = [{"variant": "conv_igemm", "params": {"BM": 64, "BN": 32}, "time_ms": 0.25},
                                  {"variant": "conv_direct", "params": {}, "time_ms": 0.9},
                                  {"variant": "conv_igemm", "params": {"BM": 128, "BN": 32}, "time_ms": 0.3}]
    r = next(r for r in kernel_rows(plan) if r.kernel == first["kernel"])
    assert r.runner_up == "conv_igemm BM=128 BN=32 (+20.0%)"
    assert "runner-up" in format_text([r]) and "(+20.0%)" in format_text([r])
    # a plan with less in it (an older or hand-edited one): '-' where a field is missing
    for k in plan["kernels"]:
        k.pop("template", None), k.pop("params", None), k.pop("ops", None)
    plan["launches"][0].pop("tuning", None)
    rows = kernel_rows(plan)
    assert all(r.ops == "-" or r.kernel == COPIES for r in rows)
    txt = format_text(rows)
    assert "tuned ms" in txt and " - " in txt


def test_op_names():
    assert op_names(["fused elementwise group of 2 ops -> %r_16", "%a: f32[2] = Add(%x: f32[2], %y: f32[2])",
                     "%r: f32[2] = Relu(%a: f32[2])"]) == "Add+Relu"
    assert op_names(["%t: f32[1] = fused(%q: f32[1]) {kind=attention}", "%s = MatMul(%a, %b)",
                     "%p = Softmax(%s)", "%o = MatMul(%p, %v)"]) == "MatMul+Softmax"
    assert op_names(None) == "-"


def test_add_times_shares():
    plan = {"kernels": [{"name": "a"}, {"name": "b"}],
            "launches": [{"kind": "kernel", "kernel": "a"}, {"kind": "memcpy"}, {"kind": "kernel", "kernel": "b"},
                         {"kind": "kernel", "kernel": "a"}]}
    rows = kernel_rows(plan)
    assert [r.kernel for r in rows] == ["a", COPIES, "b"]
    total = add_times(rows, [1.0, 0.5, 2.0, 0.5])
    assert total == 4.0
    assert {r.kernel: (r.time_ms, r.share) for r in rows} == {"a": (1.5, 0.375), COPIES: (0.5, 0.125), "b": (2.0, 0.5)}


def test_plot_needs_matplotlib_or_draws(tiny, tmp_path, capsys):
    rows, _ = inspect(tiny)
    add_times(rows, [0.01 * (i + 1) for i in range(len(_plan(tiny)["launches"]))])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert main(["inspect", str(tiny), "--plot", str(tmp_path / "k.png")]) == 1
        assert "--plot needs matplotlib" in capsys.readouterr().err
        return
    plot(rows, tmp_path / "k.png", "tiny")
    assert (tmp_path / "k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_without_a_gpu_says_so(tiny, capsys):
    from nnc.runtime import gpu_available
    if gpu_available():
        pytest.skip("a GPU is present")
    assert main(["inspect", str(tiny), "--time"]) == 1
    assert "--time measures on the GPU" in capsys.readouterr().err


@pytest.mark.gpu
def test_time_measures_each_kernel(tiny, capsys):
    assert main(["inspect", str(tiny), "--time"]) == 0
    out = capsys.readouterr().out
    assert "whole run (GPU compute, nnc bench)" in out
    rows, footer = inspect(tiny, time=True)
    assert all(r.time_ms > 0 for r in rows if r.kernel != COPIES)
    assert sum(r.share for r in rows) == pytest.approx(1.0)
