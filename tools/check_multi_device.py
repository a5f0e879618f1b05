"""One-GPU check of a `nnc compile --devices K` pipeline build (issue 13): K module instances on
the GPU present, device-to-device copies standing in for NCCL. Compiles MODEL for K devices,
runs the CUDA stages on random inputs, checks the first micro-batch(es) against the reference
multi-device run (numpy, simulated devices), and prints a per-stage time table with the GPipe
estimate for K real GPUs (stage times measured one after another on one GPU; no communication).

    python tools/check_multi_device.py examples/tiny_cnn.onnx --shapes input:8x3x32x32 --devices 2 --micro-batches 4
    python tools/check_multi_device.py tests/models/graphs/resnet50.graph.onnx --symbolic-batch \
        --shapes input:256x3x224x224 --devices 2 --micro-batches 8 --precision fp16

--c-api also builds OUT's group C API (CMake: every build + nnc_<name>_group_*) and runs its example
runner in transport copy on GPU 0 (both streams per device, the step tables), compares its outputs
with the Python copy path and prints its median time and per-device compute / communication / span.

A `.graph.onnx` (weights stripped, tools/graph_models.py) is refilled first; --symbolic-batch
makes axis 0 of the model's inputs and outputs a symbol (exports that fix batch 1 only there).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def prepare(model: str, symbolic_batch: bool, work: Path) -> str:
    if not model.endswith(".graph.onnx") and not symbolic_batch:
        return model
    import onnx
    if model.endswith(".graph.onnx"):
        from tools.graph_models import load_graph_model
        m = load_graph_model(model)
    else:
        m = onnx.load(model)
    if symbolic_batch:
        for vi in list(m.graph.input) + list(m.graph.output):
            vi.type.tensor_type.shape.dim[0].dim_param = "B"
    p = work / (Path(model).name.replace(".graph.onnx", ".onnx"))
    onnx.save(m, str(p))
    return str(p)


def c_api(out: Path, plan: dict, feed: dict, got: dict, work: Path, repeats: int) -> None:
    """OUT's CMake project built, its example runner run (transport copy, GPU 0) on `feed`; its
    outputs against `got` (the Python copy path) and its timing lines printed."""
    import os
    build = work / "c_api_build"
    jobs = str(os.cpu_count() or 2)
    subprocess.run(["cmake", "-S", str(out), "-B", str(build)], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j", jobs], check=True, capture_output=True)
    files = []
    for i, e in enumerate(plan["inputs"]):
        f = work / f"c_in{i}.bin"
        np.ascontiguousarray(feed[e["name"]]).tofile(f)
        files.append(str(f))
    res = work / "c_out"
    res.mkdir(exist_ok=True)
    r = subprocess.run([str(build / "nnc_group_example"), str(out), *files, "--out", str(res), "--transport", "copy",
                        "--devices", "0", "--iters", str(max(repeats, 1))], check=True, capture_output=True, text=True)
    for i, e in enumerate(plan["outputs"]):
        c = np.fromfile(res / f"output{i}.bin", dtype=e["dtype"]).reshape(e["shape"]).astype(np.float64)
        p = np.asarray(got[e["name"]], np.float64)
        rel = np.linalg.norm(c - p) / max(np.linalg.norm(p), 1e-30)
        print(f"C API output {e['name']}: rel L2 vs nnc.load (copy) {rel:.3g}, finite {bool(np.isfinite(c).all())}")
    for line in r.stdout.splitlines():
        if line.startswith(("transport:", "time:", "device ")):
            print("C API " + line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--shapes", required=True)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--parallel", choices=["pipeline", "tensor", "auto"], default="pipeline")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--symbolic-batch", action="store_true", help="make axis 0 of inputs/outputs symbolic first")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--check", type=int, default=1, metavar="N",
                    help="micro-batches compared with the reference run (numpy: slow for big models; 0: none)")
    ap.add_argument("--tune", action="store_true", help="tune kernels per device (default --no-tune: faster)")
    ap.add_argument("--out", default=None, help="keep the build here (default: a temporary directory)")
    ap.add_argument("--c-api", action="store_true", help="also build and run the group C API (transport copy)")
    a = ap.parse_args()
    from nnc.multi_device import MultiDeviceProgram, pipeline_estimate
    work = Path(a.out or tempfile.mkdtemp(prefix="nnc_md_"))
    work.mkdir(parents=True, exist_ok=True)
    model = prepare(a.model, a.symbolic_batch, work)
    out = work / "build"
    cmd = [sys.executable, "-m", "nnc.cli", "compile", model, "-o", str(out), "--shapes", a.shapes,
           "--devices", str(a.devices), "--micro-batches", str(a.micro_batches), "--precision", a.precision,
           "--parallel", a.parallel]
    cmd += [] if a.tune else ["--no-tune"]
    subprocess.run(cmd, check=True)
    cuda = MultiDeviceProgram(out, "cuda", "copy")  # the one-GPU path, whatever GPUs are present (stage_ms)
    rng = np.random.default_rng(0)
    feed = {}
    for e in cuda.plan["inputs"]:
        dt = np.dtype(e["dtype"])
        feed[e["name"]] = (rng.standard_normal(e["shape"]).astype(dt) if dt.kind == "f"
                           else rng.integers(0, 100, e["shape"]).astype(dt))
    got = cuda.run(feed)
    if a.check:
        ref = MultiDeviceProgram(out, "reference")
        n = min(a.check, a.micro_batches)
        part = {k: v[: v.shape[0] // a.micro_batches * n] for k, v in feed.items()}
        want = ref.run(part, micro_batches=n)
        for name in want:
            g = got[name][: want[name].shape[0]].astype(np.float64)
            w = want[name].astype(np.float64)
            d = np.abs(g - w)
            rel = np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30)
            print(f"output {name} (first {n} micro-batch(es)): max |cuda - reference| {d.max():.3g}, rel L2 {rel:.3g}")
    if a.c_api:
        c_api(out, cuda.plan, feed, got, work, a.repeats)
    stage_ms = [[] for _ in range(a.devices)]
    for _ in range(a.repeats):
        cuda.run(feed)
        for k, t in enumerate(cuda.stage_ms):
            stage_ms[k] += t
    if cuda.plan["parallel"] != "pipeline":
        t = [float(np.median(x)) for x in stage_ms]
        print(f"\n{'device':>6} {'compute ms (median, its segments)':>34}")
        for k, v in enumerate(t):
            print(f"{k:>6} {v:>34.3f}")
        print(f"\n{cuda.plan['parallel']}: slowest device's compute {max(t):.3f} ms per run; collectives done by the "
              f"host here, not timed (communication share: see tools/tp_comm_bytes.py)")
        return 0
    est = pipeline_estimate(stage_ms, a.micro_batches)
    print(f"\n{'device':>6} {'ms per micro-batch (median)':>28} {'est. ms':>9}  first op -> last op")
    for k, (t, st) in enumerate(zip(est["stage_ms"], cuda.plan["stages"])):
        print(f"{k:>6} {t:>28.3f} {st['cost_ms']:>9.3f}  {st['first_op']} -> {st['last_op']}")
    print(f"\nM = {a.micro_batches}: one GPU sequential {est['sequential_ms']:.3f} ms; GPipe estimate on "
          f"{a.devices} GPUs {est['pipelined_ms']:.3f} ms (x{est['speedup']:.2f}), bubble {est['bubble_fraction']:.1%} "
          f"(from one-GPU stage times, communication not counted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
