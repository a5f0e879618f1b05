"""Measures timing-based kernel selection on the GPU (codegen/tuning.py), one model at a time:

    python tools/tuning_measure.py --out DIR [--batches 1,32] [--model resnet50]

for each batch: a fresh tune (empty cubin cache and timing cache), the same compile again with
the warm timing cache, a --no-tune build, and the run time of the tuned vs the heuristic build
(CUDA events, warm-up, median: tools/cuda_timing.py; inputs on the device). Prints a table and
writes DIR/tuning_measure.json (with each build's plan.json "tuning" summary)."""
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


def _compile(model_path, out, batch, precision, tune, timing_cache=None, cache_dir=None):
    from nnc.api import CompileOptions, normalize_shapes
    from nnc.driver import compile_model
    if cache_dir is not None:
        os.environ["NNC_CACHE_DIR"] = str(cache_dir)
    opts = CompileOptions(shapes=normalize_shapes(f"input:{batch}x3x224x224"), precision=precision, tune=tune,
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--precision", default="fp16")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="nnc_tm_"))
    from tools.graph_models import GRAPHS, load_graph_model
    import onnx
    model = work / f"{a.model}.onnx"
    onnx.save(load_graph_model(GRAPHS / f"{a.model}.graph.onnx"), str(model))
    rows, results = [], {"model": a.model, "precision": a.precision, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for b in [int(x) for x in a.batches.split(",")]:
        r = results[f"batch{b}"] = {}
        try:
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
