"""Times `Module.run` of onnx's light models on the GPU: launches per run (plan.json) and the median
of CUDA-event timings after warm-up, on fresh random inputs (never zeros).

    python tools/bench_light_runs.py [--models resnet50,vgg19] [--precision fp16] [--iters 50]

Works against older nnc trees too (only compile_model, nnc.load and Module.run are used), so the
same script measures a before/after pair in one GPU session. Prints a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np


def light_dir() -> Path:
    import onnx
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def bench(model: Path, precision: str, iters: int) -> dict:
    import cupy
    import nnc
    try:
        from nnc.driver import compile_model
    except ImportError:  # trees before 2026-12-01 named the driver nnc/compile.py
        from nnc.compile import compile_model
    out = Path(tempfile.mkdtemp(prefix="nnc_bench_"))
    compile_model(str(model), out / "m", arch=None, precision=precision)
    plan = json.loads((out / "m" / "plan.json").read_text())
    m = nnc.load(out / "m")
    rng = np.random.default_rng(0)
    feed = {t["name"]: rng.standard_normal(t["shape"]).astype(np.float32) for t in plan["inputs"]}
    dev = {k: cupy.asarray(v) for k, v in feed.items()}
    for _ in range(5):
        m.run(dev)
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(iters):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        m.run(dev)
        b.record()
        b.synchronize()
        times.append(cupy.cuda.get_elapsed_time(a, b))
    return {"launches": len(plan["launches"]), "init": len(plan.get("init_launches", [])),
            "median_ms": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet50,densenet121,vgg19,inception_v2")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--label", default=os.environ.get("NNC_BENCH_LABEL", "nnc"))
    a = ap.parse_args()
    rows = []
    for name in a.models.split(","):
        r = bench(light_dir() / f"light_{name}.onnx", a.precision, a.iters)
        rows.append((name, r))
    print(f"{'label':10} {'model':14} {'prec':5} {'launches/run':>12} {'init':>5} {'median ms':>10}")
    for name, r in rows:
        print(f"{a.label:10} {name:14} {a.precision:5} {r['launches']:>12} {r['init']:>5} {r['median_ms']:>10.3f}")


if __name__ == "__main__":
    main()
