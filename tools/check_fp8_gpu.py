"""FP8 on the GPU: correctness and GPU compute time of the fp8 builds against fp16 builds of the
same model (one table). Run on a GPU machine:

    python tools/check_fp8_gpu.py [--shapes 256x4096x4096,32x768x3072] [--iterations 50]

Per shape M x K x N, three builds of a one-layer model:
- fp16: the float MatMul at --precision fp16;
- fp8 (calib): --precision fp8 --calib (minmax over random data);
- fp8 QDQ: the ONNX float8 QDQ model (tools/fp8_models.py).
Each row shows the kernels, the max |gpu - interpreter| / max |interpreter| on fresh inputs (outputs
poisoned first), and the median GPU compute time (nnc bench's CUDA events around the graph).
Today's fp8 path dequantizes into the fp16 GEMM (docs/fp8.md), so expect about the fp16 time.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _float_model(M, K, N):
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh
    from tools.fp8_models import weights
    w, _, _ = weights(K, N)
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "mm",
                     [h.make_tensor_value_info("x", TP.FLOAT, [M, K])],
                     [h.make_tensor_value_info("y", TP.FLOAT, [M, N])], [nh.from_array(w, "w")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)


def _build(model, out, **kw):
    import nnc
    from nnc.driver import compile_model
    return compile_model(str(model), out, options=nnc.CompileOptions(tune=False, backend="cuda", **kw))


def _check(out, M, K, iters):
    import nnc
    from nnc.bench import BenchOptions, bench
    from tools.fp8_models import random_x
    gpu, ref = nnc.load(out), nnc.load(out, backend="reference")
    x = random_x(M, K, seed=11)
    got = np.asarray(gpu.run({"x": x}, output="numpy", poison=True)["y"], np.float32)
    want = np.asarray(ref.run({"x": x}, output="numpy")["y"], np.float32)
    rel = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)) if np.all(np.isfinite(got)) else float("nan")
    r = bench(out, BenchOptions(iterations=iters, warmup=5))
    return rel, (r.gpu_compute_ms or {}).get("median", float("nan")), len(gpu.plan["kernels"])


def main(argv=None) -> int:
    import onnx
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="256x4096x4096,32x768x3072,8x4096x4096")
    ap.add_argument("--iterations", type=int, default=50)
    args = ap.parse_args(argv)
    from nnc.calibrate import calibrate
    from tools.fp8_models import qdq_model, random_x
    print(f"{'M x K x N':>18} {'build':>12} {'kernels':>8} {'rel err':>10} {'gpu ms':>9}")
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        for spec in args.shapes.split(","):
            M, K, N = (int(v) for v in spec.split("x"))
            fm, qm = td / f"f_{spec}.onnx", td / f"q_{spec}.onnx"
            onnx.save(_float_model(M, K, N), fm)
            onnx.save(qdq_model(M, K, N), qm)
            np.savez(td / "calib.npz", x=random_x(M, K, seed=1))
            calibrate(str(fm), td / "calib.npz", "minmax").save(td / "calib.json")
            builds = [("fp16", fm, dict(precision="fp16")),
                      ("fp8 (calib)", fm, dict(precision="fp8", calib=td / "calib.json")),
                      ("fp8 QDQ", qm, {})]
            for name, model, kw in builds:
                out = td / f"{name.split()[0]}_{len(kw)}_{spec}"
                try:
                    _build(model, out, **kw)
                    rel, ms, nk = _check(out, M, K, args.iterations)
                    print(f"{spec:>18} {name:>12} {nk:>8} {rel:>10.2e} {ms:>9.4f}")
                except Exception as err:  # one failing build must not hide the others
                    print(f"{spec:>18} {name:>12} FAILED: {type(err).__name__}: {str(err)[:200]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
