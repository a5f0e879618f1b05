"""One-GPU check of a `nnc compile --devices K` pipeline build (issue 13): K module instances on
the GPU present, device-to-device copies standing in for NCCL. Compiles MODEL for K devices,
runs the CUDA stages and the reference multi-device run on the same random inputs, and prints
the max difference and a per-stage time table with the GPipe estimate for K real GPUs (stage
times measured one after another on one GPU; communication not counted).

    python tools/check_multi_device.py examples/tiny_cnn.onnx --shapes input:8x3x32x32 --devices 2 --micro-batches 4
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--shapes", required=True)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tune", action="store_true", help="tune kernels per device (default --no-tune: faster)")
    ap.add_argument("--out", default=None, help="keep the build here (default: a temporary directory)")
    a = ap.parse_args()
    from nnc.multi_device import MultiDeviceProgram, pipeline_estimate
    out = Path(a.out or tempfile.mkdtemp(prefix="nnc_md_")) / "build"
    cmd = [sys.executable, "-m", "nnc.cli", "compile", a.model, "-o", str(out), "--shapes", a.shapes,
           "--devices", str(a.devices), "--micro-batches", str(a.micro_batches), "--precision", a.precision]
    cmd += [] if a.tune else ["--no-tune"]
    subprocess.run(cmd, check=True)
    cuda = MultiDeviceProgram(out, "cuda")
    ref = MultiDeviceProgram(out, "reference")
    rng = np.random.default_rng(0)
    feed = {e["name"]: rng.standard_normal(e["shape"]).astype(e["dtype"]) for e in cuda.plan["inputs"]}
    got, want = cuda.run(feed), ref.run(feed)
    for n in want:
        d = np.abs(got[n].astype(np.float64) - want[n].astype(np.float64))
        scale = max(float(np.abs(want[n]).max()), 1e-30)
        print(f"output {n}: max |cuda - reference| {d.max():.3g} (rel {d.max() / scale:.3g})")
    stage_ms = [[] for _ in range(a.devices)]
    for _ in range(a.repeats):
        cuda.run(feed)
        for k, t in enumerate(cuda.stage_ms):
            stage_ms[k] += t
    est = pipeline_estimate(stage_ms, a.micro_batches)
    print(f"\n{'device':>6} {'stage ms (median, per micro-batch)':>36}  first op -> last op")
    for k, (t, st) in enumerate(zip(est["stage_ms"], cuda.plan["stages"])):
        print(f"{k:>6} {t:>36.3f}  {st['first_op']} -> {st['last_op']}")
    print(f"\nM = {a.micro_batches}: one GPU sequential {est['sequential_ms']:.3f} ms; GPipe estimate on "
          f"{a.devices} GPUs {est['pipelined_ms']:.3f} ms (x{est['speedup']:.2f}), bubble {est['bubble_fraction']:.1%} "
          f"(estimate from one-GPU stage times, no communication)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
