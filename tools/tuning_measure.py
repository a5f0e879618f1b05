"""Measures timing-based kernel selection on the GPU (codegen/tuning.py), one model at a time:

    python tools/tuning_measure.py --out DIR [--batches 1,32] [--model resnet50]
    python tools/tuning_measure.py --out DIR --quick --batches 32 --tune-budget 25

Full: for each batch a fresh tune (empty cubin cache and timing cache), the same compile again with
the warm timing cache, a --no-tune build, and the run time of the tuned vs the heuristic build
(CUDA events, warm-up, median: tools/cuda_timing.py; inputs on the device). Prints a table and
writes DIR/tuning_measure.json (with each build's plan.json "tuning" summary).
--quick: a fresh tune under --tune-budget (empty cubin cache, no timing cache) and a --no-tune
build, both timed by nnc bench (GPU compute median, CUDA graph); one short table of what the tuner
did (problems, signatures, tuned, screened, its lowering / compile / timing seconds) and the two
medians. No torch needed."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _compile(model_path, out, batch, precision, tune, timing_cache=None, cache_dir=None, tune_budget=None):
    from nnc.api import CompileOptions
    from nnc.driver import compile_model
    if cache_dir is not None:
        os.environ["NNC_CACHE_DIR"] = str(cache_dir)
    opts = CompileOptions(precision=precision, tune=tune, tune_budget=tune_budget if tune else None,
                          timing_cache=None if timing_cache is None else str(timing_cache))
    t0 = time.perf_counter()
    pj = compile_model(str(model_path), out, options=opts)
    return pj, time.perf_counter() - t0


def _run_ms(out, batch):
    import cupy as cp
    import nnc
    from tools.cuda_timing import time_cuda
    m = nnc.load(out)
    x = cp.asarray(__import__("numpy").random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype("float32"))
    name = m.input_names[0]
    m.run({name: x})
    cp.cuda.Device().synchronize()
    return time_cuda(lambda: m.run({name: x}), warmup=10, iters=50), m


def model_at_batch(name: str, batch: int, work: Path) -> Path:
    """The graph model refilled (tools/graph_models.py) with its batch dim set (the graphs are
    exported at batch 1, a fixed dim --shapes cannot change)."""
    import onnx
    from tools.graph_models import GRAPHS, load_graph_model
    m = load_graph_model(GRAPHS / f"{name}.graph.onnx")
    inits = {i.name for i in m.graph.initializer}
    for x in list(m.graph.input) + list(m.graph.output):
        if x.name not in inits and x.type.tensor_type.shape.dim:
            d = x.type.tensor_type.shape.dim[0]
            d.Clear()
            d.dim_value = batch
    p = work / f"{name}_b{batch}.onnx"
    onnx.save(m, str(p))
    return p


def _bench_ms(out) -> float:
    from nnc.bench import BenchOptions, bench
    r = bench(out, BenchOptions(iterations=200, warmup=20))
    return float(r.gpu_compute_ms["median"])


def _rel_diff(tuned, heur, batch) -> float:
    """max |tuned - no-tune| / max |no-tune| of the first output on one random input (both builds
    are the same model: a large value means a wrong kernel got through)."""
    import numpy as np
    import nnc
    x = np.random.default_rng(1).standard_normal((batch, 3, 224, 224)).astype("float32")
    mt, mh = nnc.load(tuned), nnc.load(heur)
    n = mt.input_names[0]
    yt = np.asarray(list(mt.run({n: x}, output="numpy").values())[0], np.float64)
    yh = np.asarray(list(mh.run({n: x}, output="numpy").values())[0], np.float64)
    return float(np.abs(yt - yh).max() / max(float(np.abs(yh).max()), 1e-30))


def quick(a, out: Path, work: Path) -> int:
    """--quick: see the module docstring."""
    rows, results = [], {"model": a.model, "precision": a.precision, "tune_budget": a.tune_budget,
                         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for b in [int(x) for x in a.batches.split(",")]:
        r = results[f"batch{b}"] = {}
        try:
            model = model_at_batch(a.model, b, work)
            cubins = work / f"cubins_b{b}"  # empty: the candidates' compile is what a first build pays
            pj, t = _compile(model, work / f"tuned_b{b}", b, a.precision, True, None, cubins, a.tune_budget)
            tu = r["tuning"] = pj["tuning"]
            r["tuned_build_s"] = round(t, 2)
            _, th = _compile(model, work / f"heur_b{b}", b, a.precision, False, None, cubins)
            r["no_tune_build_s"] = round(th, 2)
            r["tuned_ms"], r["no_tune_ms"] = _bench_ms(work / f"tuned_b{b}"), _bench_ms(work / f"heur_b{b}")
            r["rel_diff_vs_no_tune"] = _rel_diff(work / f"tuned_b{b}", work / f"heur_b{b}", b)
            rows.append([b, a.tune_budget, tu["problems"], tu.get("signatures"), tu.get("tunable_ops"), tu["tuned"],
                         tu.get("tuned_ops"), tu["heuristic"], tu.get("candidates"), tu.get("kernels_compiled"),
                         tu.get("screened"), tu["wrong_candidates"], tu["changed_from_heuristic"],
                         tu.get("lowering_seconds"), tu.get("compile_seconds"), tu.get("timing_seconds"),
                         tu["seconds"], r["tuned_build_s"], round(r["tuned_ms"], 4), round(r["no_tune_ms"], 4),
                         f"{r['rel_diff_vs_no_tune']:.2e}"])
            why = {}
            for l in pj["launches"]:
                rec = l.get("tuning") or {}
                if rec.get("source") == "heuristic":
                    why[rec.get("why", "?")[:80]] = why.get(rec.get("why", "?")[:80], 0) + 1
            r["heuristic_why_launches"] = why
        except Exception:
            r["error"] = traceback.format_exc()
            print(r["error"], file=sys.stderr)
        (out / "tuning_measure.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"{a.model} {a.precision} --tune-budget {a.tune_budget}: batch | budget s | problems | signatures | "
          f"tunable ops | tuned | tuned ops | heuristic | candidates | kernels compiled | screened | wrong | "
          f"changed | lowering s | compile s | timing s | tuning s | tuned build s | tuned ms | --no-tune ms | "
          f"max |tuned - no-tune| / max |no-tune|")
    for row in rows:
        print(" | ".join(str(v) for v in row))
    for k, v in results.items():
        if isinstance(v, dict) and v.get("heuristic_why_launches"):
            print(f"{k}: launches left on the heuristic, by why: {v['heuristic_why_launches']}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--quick", action="store_true", help="one budgeted fresh tune and --no-tune, nnc bench medians")
    ap.add_argument("--tune-budget", type=float, default=25.0, help="--quick: seconds of tuning (plan.json says "
                                                                     "what it bounds)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="nnc_tm_"))
    if a.quick:
        return quick(a, out, work)
    rows, results = [], {"model": a.model, "precision": a.precision, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for b in [int(x) for x in a.batches.split(",")]:
        r = results[f"batch{b}"] = {}
        try:
            model = model_at_batch(a.model, b, work)
            tc = work / f"timing_b{b}.json"
            cubins = work / f"cubins_b{b}"
            pj, t = _compile(model, work / f"tuned_b{b}", b, a.precision, True, tc, cubins)
            r["fresh_s"], r["fresh_tuning"] = round(t, 2), pj["tuning"]
            pj2, t2 = _compile(model, work / f"tuned2_b{b}", b, a.precision, True, tc, cubins)
            r["warm_s"], r["warm_tuning"] = round(t2, 2), pj2["tuning"]
            pjh, th = _compile(model, work / f"heur_b{b}", b, a.precision, False, None, cubins)
            r["no_tune_s"] = round(th, 2)
            r["launches_tuned"], r["launches_heuristic"] = len(pj["launches"]), len(pjh["launches"])
            seen = set()
            r["wrong_candidates"] = []  # what the correctness gate rejected (kernel bugs to look at)
            for l in pj["launches"]:
                for x in (l.get("tuning") or {}).get("rejected", ()):
                    k = json.dumps([l["op"][:160], x], sort_keys=True)
                    if x["why"].startswith("wrong") and k not in seen:
                        seen.add(k)
                        r["wrong_candidates"].append({"op": l["op"][:160], **x})
                        print(f"wrong: {x['variant']} {json.dumps(x['params'], sort_keys=True)} on {l['op'][:120]}: "
                              f"{x['why'][:200]}", file=sys.stderr)
            rows.append([b, r["fresh_s"], r["warm_s"], r["no_tune_s"], pj["tuning"]["tuned"],
                         pj["tuning"]["changed_from_heuristic"], pj["tuning"]["wrong_candidates"], "-", "-"])
            (out / "tuning_measure.json").write_text(json.dumps(results, indent=1, default=str))
            ms_t, mt = _run_ms(work / f"tuned_b{b}", b)
            ms_h, mh = _run_ms(work / f"heur_b{b}", b)
            r["run_ms_tuned"], r["run_ms_heuristic"] = round(ms_t, 4), round(ms_h, 4)
            # the tuned build's output against the heuristic's (both checked builds of one model)
            import cupy as cp
            import numpy as np
            x = cp.asarray(np.random.default_rng(1).standard_normal((b, 3, 224, 224)).astype("float32"))
            n = mt.input_names[0]
            yt = np.asarray(list(mt.run({n: x}, output="numpy").values())[0], np.float64)
            yh = np.asarray(list(mh.run({n: x}, output="numpy").values())[0], np.float64)
            r["max_diff_vs_heuristic"] = float(np.abs(yt - yh).max())
            r["max_abs_heuristic"] = float(np.abs(yh).max())
            rows[-1][7:] = [r["run_ms_heuristic"], r["run_ms_tuned"]]
        except Exception:
            r["error"] = traceback.format_exc()
            print(r["error"], file=sys.stderr)
        (out / "tuning_measure.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"{a.model} {a.precision}: batch | fresh tune s | warm-cache s | --no-tune s | problems timed | "
          f"changed | wrong rejected | heuristic ms | tuned ms")
    for row in rows:
        print(" | ".join(str(v) for v in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
