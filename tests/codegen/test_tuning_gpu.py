"""The real timer (codegen/tuning.py CudaRunner) on the GPU: a tuned build is correct against the
reference interpreter, a second compile with the timing cache is served from it (nothing timed),
and a deliberately broken variant, registered only inside the test, is measured, found wrong and
rejected, never picked."""
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest

import nnc
from nnc.api import CompileOptions, normalize_shapes
from nnc.codegen import tuning, variants
from nnc.codegen.kernels import gemm_lowering
from nnc.codegen.lower import _ensure_loaded
from nnc.driver import compile_model

from .cuda_models import F, N, mk

pytestmark = pytest.mark.gpu
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _compile(model, out, precision="fp16", shapes="", **kw):
    opts = CompileOptions(shapes=normalize_shapes(shapes), precision=precision, **kw)
    t0 = time.perf_counter()
    pj = compile_model(model, out, options=opts)
    return pj, time.perf_counter() - t0


def _check_against_reference(out, feeds, rtol):
    got = nnc.load(out).run(feeds, output="numpy")
    ref = nnc.load(out, backend="reference").run(feeds)
    for k, r in ref.items():
        g = np.asarray(got[k], np.float64)
        r = np.asarray(r, np.float64)
        atol = rtol * float(np.abs(r).max())
        assert np.allclose(g, r, rtol=rtol, atol=atol), (k, float(np.abs(g - r).max()), atol)


def test_tuned_tiny_cnn_is_correct_and_the_cache_serves_the_second_compile(tmp_path):
    cache = tmp_path / "timing.json"
    pj1, t1 = _compile(str(EXAMPLES / "tiny_cnn.onnx"), tmp_path / "a", shapes="input:2x3x32x32",
                       tune=True, timing_cache=str(cache))
    t = pj1["tuning"]
    assert t["mode"] == "tuned" and t["runner"] == "cuda" and t["tuned"] > 0, t
    assert t["device"]["gpu"] and t["device"]["sm"].startswith("sm_")
    recs = [l["tuning"] for l in pj1["launches"] if "tuning" in l]
    timed = [r for r in recs if r["source"] == "tuned"]
    assert timed and all(r["time_ms"] > 0 and r["heuristic"]["time_ms"] > 0 and r["time_ms"] <= r["heuristic"]["time_ms"]
                         for r in timed)
    assert all(r["tried"] >= 1 for r in timed)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    _check_against_reference(tmp_path / "a", {"input": x}, 1e-2)

    pj2, t2 = _compile(str(EXAMPLES / "tiny_cnn.onnx"), tmp_path / "b", shapes="input:2x3x32x32",
                       tune=True, timing_cache=str(cache))
    t_ = pj2["tuning"]
    assert t_["tuned"] == 0 and t_["cache_hits"] == t["tuned"] and t_["timing_cache"]["state"] == "loaded"
    assert t_["rounds"] == 1  # one lowering
    assert t_["seconds"] < 0.5 * t["seconds"] and t_["seconds"] < 5.0, (t["seconds"], t_["seconds"])
    k1 = [(k["params"]["selected"]["variant"], json.dumps(k["params"]["selected"]["params"], sort_keys=True))
          for k in pj1["kernels"]]
    k2 = [(k["params"]["selected"]["variant"], json.dumps(k["params"]["selected"]["params"], sort_keys=True))
          for k in pj2["kernels"]]
    assert k1 == k2


def test_a_broken_variant_is_rejected_on_the_gpu(tmp_path, monkeypatch):
    # a GEMM variant that launches half the blocks (half the output never written): fast, wrong
    _ensure_loaded()
    good = gemm_lowering.MATMUL

    def broken_render(ctx, p, params):
        n0 = len(ctx.L.launches)
        good.render(ctx, p, params)
        l = ctx.L.launches[n0]
        g = list(l.grid)
        i = 0 if g[0] > 1 else 1
        g[i] = max(1, g[i] // 2)
        l.grid = tuple(g)
        return True
    broken = dataclasses.replace(good, name="test.broken_gemm", rank=97, render=broken_render,
                                 space=lambda p: [good.default(p, good.space(p))])
    monkeypatch.setitem(variants.REGISTRY, "MatMul", sorted(variants.REGISTRY["MatMul"] + [broken],
                                                            key=variants.order_key))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((512, 512)).astype(np.float32)
    m = mk([N("MatMul", ["x", "w"], ["y"])], [("x", F, [256, 512])], [("y", F)], [("w", w)])
    # fp32 + tf32: a plain MatMul (no casts, no epilogue group) whose candidates are all MatMul variants
    with pytest.warns(tuning.WrongCandidateWarning, match="test.broken_gemm"):
        pj, _ = _compile(m, tmp_path / "o", precision="fp32", tf32=True, tune=True)
    assert pj["tuning"]["wrong_candidates"] >= 1, pj["tuning"]
    recs = [l["tuning"] for l in pj["launches"] if "tuning" in l]
    rej = [r for rec in recs for r in rec.get("rejected", ()) if r["variant"] == "test.broken_gemm"]
    assert rej and rej[0]["why"].startswith("wrong output"), recs
    assert all(k["params"]["selected"]["variant"] != "test.broken_gemm" for k in pj["kernels"])
    x = rng.standard_normal((256, 512)).astype(np.float32)
    y = nnc.load(tmp_path / "o").run({"x": x}, output="numpy")["y"]
    ref = x.astype(np.float64) @ w
    assert np.allclose(y, ref, rtol=3e-3, atol=3e-3 * np.abs(ref).max())
