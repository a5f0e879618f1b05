"""Times `nnc compile` of a model cold (empty cubin cache) and warm (the same cache again), as a
user runs it (a fresh process each time), plus the NVRTC part alone as one program (how nnc
compiled before compile units) and as the units compile_many runs.

    python tools/bench_compile_speed.py [MODEL.onnx] [--repeat 3] [--jobs N]

Default model: onnx's light DenseNet-121. Prints one line per run and the best of each; the
machine's load average is printed too (timings on a busy machine mean little).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def densenet() -> str:
    import onnx
    return str(Path(onnx.__file__).parent / "backend/test/data/light/light_densenet121.onnx")


def run_compile(model: str, out: Path, cache: Path, extra=()) -> float:
    env = dict(os.environ, NNC_CACHE_DIR=str(cache))
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nnc.cli", "compile", model, "-o", str(out), "--arch", "sm_90", *extra],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def nvrtc_only(model: str, jobs) -> tuple[float, float, int]:
    """(one program s, units s, units) for the model's kernels, no cache."""
    from nnc.codegen import cuda, units
    from nnc.codegen.lower import lower
    from nnc.driver import pipeline_passes
    from nnc.onnx_import import import_model
    from nnc.pipeline import Pipeline
    m = import_model(model)
    Pipeline(pipeline_passes("fp32"), False, None).run(m)
    ks = list(lower(m, {"arch": "sm_90", "precision": "fp32", "tf32": False}).kernels.values())
    us = units.make_units(ks)
    t = time.perf_counter()
    cuda.compile_many([cuda.Unit("model.cu", units.prelude() + "\n".join(k.source for k in ks))], "sm_90", jobs=1)
    one = time.perf_counter() - t
    t = time.perf_counter()
    cuda.compile_many(us, "sm_90", jobs=jobs)
    return one, time.perf_counter() - t, len(us)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--no-nvrtc-only", action="store_true", help="skip the NVRTC-only timings")
    args = ap.parse_args(argv)
    model = args.model or densenet()
    extra = ["-j", str(args.jobs)] if args.jobs else []
    cold, warm = [], []
    with tempfile.TemporaryDirectory(prefix="nnc_bench_") as d:
        for i in range(args.repeat):
            cache = Path(d) / f"cache{i}"
            cold.append(run_compile(model, Path(d) / "out", cache, extra))
            warm.append(run_compile(model, Path(d) / "out", cache, extra))
            print(f"run {i}: cold {cold[-1]:.2f} s, warm {warm[-1]:.2f} s (load {os.getloadavg()[0]:.1f})", flush=True)
    print(f"best: cold {min(cold):.2f} s, warm {min(warm):.2f} s  ({Path(model).name}, cpus {os.cpu_count()})")
    if not args.no_nvrtc_only:
        one, many, n = nvrtc_only(model, args.jobs)
        print(f"NVRTC only: one program {one:.2f} s; {n} units in parallel {many:.2f} s (load {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
