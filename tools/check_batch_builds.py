"""One model at several batches, heuristic (--no-tune) and tuned builds, each against onnxruntime.

A tuned build may differ from the heuristic one only in speed: both must match onnxruntime (CPU, the
fp32 export) on the same fresh random inputs, outputs poisoned first. Also prints how many
candidates the tuner rejected as wrong (plan.json "tuning"), since a large count at one batch only
says that some kernel misbehaves at that size.

    python tools/check_batch_builds.py --model resnet50 --batches 32,64 [--precision fp16] [--tune-budget 20]
        [--builds heuristic,tuned,unfused]

Needs a GPU, torch (export), onnxruntime. Prints a short table last.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batches", default="32,64")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--tune-budget", type=float, default=20.0)
    ap.add_argument("--builds", default="heuristic,tuned", help="comma list of heuristic, tuned, unfused (--no-fuse, heuristic), unfused_tuned")
    a = ap.parse_args()
    import cupy as cp
    import onnxruntime as ort
    import nnc
    from cuda_timing import time_cuda
    from gpu_models import WORK, export, fresh_inputs, rel_err, torch_fp16_error
    from nnc.api import CompileOptions
    from nnc.driver import compile_model
    tol = 1e-3 if a.precision == "fp32" else 1e-2
    rows = []
    WORK.mkdir(exist_ok=True)
    for batch in [int(b) for b in a.batches.split(",")]:
        path, feeds, mod, _ = export(a.model, batch)
        x = fresh_inputs(feeds)
        ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)[0]
        # what fp16 storage itself costs on this model and these random weights (torch eager, fp16)
        torch_fp16 = torch_fp16_error(mod, feeds, x, ref) if a.precision == "fp16" else float("nan")
        print(f"ROW batch {batch} torch-fp16-eager rel {torch_fp16:.2e}", flush=True)
        for kind in a.builds.split(","):
            tune, fuse = {"heuristic": (False, True), "tuned": (True, True), "unfused": (False, False),
                          "unfused_tuned": (True, False)}[kind]
            od = WORK / f"{a.model}_b{batch}_{a.precision}_{kind}_check"
            t0 = time.time()
            with warnings.catch_warnings(record=True) as wrong:
                warnings.simplefilter("always")
                compile_model(str(path), od, options=CompileOptions(
                    precision=a.precision, tune=tune, fuse=fuse, tune_budget=a.tune_budget if tune else None))
            n_wrong = sum(1 for w in wrong if "rejected: wrong output" in str(w.message))
            m = nnc.load(od)
            got = m.run(x, output="numpy", poison=True)[m.output_names[0]]
            e = rel_err(got, ref)
            dev = {k: cp.asarray(v) for k, v in x.items()}
            ms = time_cuda(lambda: m.run(dev))
            tuning = {k: v for k, v in (m.plan.get("tuning") or {}).items() if not isinstance(v, (list, dict))}
            rows.append((batch, kind, e, e <= tol, n_wrong, ms, time.time() - t0, len(m.plan.get("launches", []))))
            print(f"ROW batch {batch} {kind} rel {e:.2e} ok {e <= tol} "
                  f"wrong candidates {n_wrong} {ms:.3f} ms tuning {tuning}", flush=True)
            if n_wrong:
                for w in wrong[:6]:
                    print("   ", str(w.message)[:300], flush=True)
            m = None  # frees the arena before the next build
    print(f"\n{a.model} {a.precision}: batch build rel-L2 ok wrong-candidates ms build-s launches")
    for b, kind, e, ok, nw, ms, s, launches in rows:
        print(f"{b:>5} {kind:<9} {e:.2e} {'ok' if ok else 'FAIL'} {nw:>4} {ms:8.3f} {s:6.0f} {launches:>5}")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
