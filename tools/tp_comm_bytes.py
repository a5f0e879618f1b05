"""Bytes all-reduced per forward by tensor parallelism, and the link-bound time they imply.

Megatron tensor parallelism all-reduces two [batch, seq, hidden] activations per transformer layer
(after the attention output projection and after the FFN down GEMM), whatever the device count;
compiler/passes/shard_tensor_parallel.py places exactly these (`tp_allreduce_bytes` there). A ring
all-reduce of S bytes over K devices moves 2 (K - 1) / K * S bytes in and out of every device, so
with nccl-tests' bus bandwidth (busbw = algbw * 2 (K - 1) / K) one all-reduce takes
S * 2 (K - 1) / K / busbw: the lower bound on the communication time of a forward when nothing
overlaps it, and the floor of the whole forward's latency when everything else does.

    python tools/tp_comm_bytes.py                               # GPT-2 medium of issue 13, fp16
    python tools/tp_comm_bytes.py --busbw 350                   # a measured busbw in GB/s (nccl-tests)
    python tools/tp_comm_bytes.py --layers 24 --batch 8 --seq 512 --hidden 1024 --dtype-bytes 2 --devices 2 4 8

With --bench (one GPU): the same decoder stack (tests/passes/test_shard_tensor_parallel.py's
gpt_decoder, random weights, fp16) built whole and as device 0's shard of --devices K (its
AllReduces as Identity: the shard's compute alone), both through the default pipeline and the CUDA
backend (heuristic kernel choice; --tune: by timing, --tune-budget seconds a build), timed with
CUDA events; it prints the single-GPU latency, the shard's compute, and the tensor-parallel
estimates without overlap (shard + link-bound communication) and with full overlap (the larger of
the two), as fractions of one GPU:

    python tools/tp_comm_bytes.py --bench --devices 2 --busbw 360
    python tools/tp_comm_bytes.py --bench --no-run --layers 2 --seq 64 --batch 1   # CPU: compile only
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from nnc.passes.shard_tensor_parallel import ring_allreduce_seconds, tp_allreduce_bytes
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from compiler.passes.shard_tensor_parallel import ring_allreduce_seconds, tp_allreduce_bytes

# Assumed bus bandwidths (GB/s) when none is measured: H200 NVLink 4 (900 GB/s bidirectional,
# 450 GB/s each way; nccl-tests all-reduce busbw on 8x H100/H200 NVSwitch systems is typically
# 350-480 GB/s at >= 8 MiB) and PCIe Gen5 x16 (64 GB/s each way, ~50 GB/s achieved). Only for the
# table's shape: the closing note must use the busbw measured on the machine (nccl-tests
# all_reduce_perf at the message size printed here).
ASSUMED_BUSBW_GBS = {"nvlink4 (assumed 360)": 360.0, "pcie5 (assumed 50)": 50.0}


def table(layers: int, batch: int, seq: int, hidden: int, dtype_bytes: int, devices, busbw: dict) -> str:
    per_layer = 2
    msg = batch * seq * hidden * dtype_bytes
    total = tp_allreduce_bytes(layers, batch, seq, hidden, dtype_bytes, per_layer)
    lines = [f"{layers} layers x {per_layer} all-reduces of [{batch}, {seq}, {hidden}] x {dtype_bytes} B = "
             f"{layers * per_layer} messages of {msg} B ({msg / 2**20:.1f} MiB); "
             f"{total} B ({total / 2**20:.1f} MiB) all-reduced per forward",
             f"{'devices':>7} {'link':>24} {'busbw GB/s':>10} {'per msg ms':>10} {'forward ms':>10} "
             f"{'bytes out/dev':>14}"]
    for k in devices:
        for name, bw in busbw.items():
            t = ring_allreduce_seconds(msg, k, bw * 1e9)
            moved = int(total * 2 * (k - 1) / k)
            lines.append(f"{k:>7} {name:>24} {bw:>10.0f} {t * 1e3:>10.4f} {t * layers * per_layer * 1e3:>10.3f} "
                         f"{moved:>14}")
    return "\n".join(lines)


def bench(a, busbw_gbs: float) -> str:
    """Single-GPU latency of the whole stack and of one shard's compute (see the module docstring)."""
    import tempfile
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from tests.passes.test_shard_tensor_parallel import _compute_only, gpt_decoder
    from nnc.codegen.emit import compile_to_dir
    from nnc.codegen.options import CodegenOptions, LowerOptions
    from nnc.codegen.target import resolve_target
    from nnc.driver import pipeline_passes
    from nnc.onnx_import import import_model
    from nnc.passes.shard_tensor_parallel import shard_tensor_parallel
    from nnc.pipeline import Pipeline
    k = a.devices[0]
    heads = a.hidden // 64
    model = gpt_decoder(L=a.layers, B=a.batch, S=a.seq, E=a.hidden, H=heads, gemm=True)
    module = import_model(model)
    del model
    Pipeline(pipeline_passes("fp16", True)).run(module)
    shard = _compute_only(shard_tensor_parallel(module, k).devices[0])
    work = Path(a.work or tempfile.mkdtemp(prefix="tp_bench_"))
    rows = {}
    for key, m in (("one GPU", module), (f"shard 0 of {k} (compute)", shard)):
        od = work / key.split()[0]
        lower = LowerOptions(resolve_target("sm_90" if a.no_run else None), "fp16", tune=a.tune and not a.no_run,
                             tune_budget=a.tune_budget if a.tune else None)
        plan = compile_to_dir(m, od, options=CodegenOptions(lower, "nvrtc"))
        rows[key] = {"launches": len(plan.get("launches", [])), "dir": str(od)}
        if not a.no_run:
            import cupy as cp
            import numpy as np
            import nnc
            from cuda_timing import time_cuda
            g = nnc.load(od)
            rng = np.random.default_rng(0)
            dev = {i.name: cp.asarray(rng.standard_normal(i.shape).astype(np.float32)) for i in g.inputs}
            rows[key]["ms"] = time_cuda(lambda: g.run(dev))
            del g
    msg = a.batch * a.seq * a.hidden * a.dtype_bytes
    comm_ms = ring_allreduce_seconds(msg, k, busbw_gbs * 1e9) * 1e3 * 2 * a.layers
    lines = [f"GPT stack L={a.layers} E={a.hidden} H={heads} S={a.seq} B={a.batch} fp16, K={k}, "
             f"busbw {busbw_gbs:g} GB/s -> {comm_ms:.3f} ms of all-reduce per forward (link-bound)"]
    for key, r in rows.items():
        took = f"{r['ms']:9.3f} ms" if "ms" in r else "(not run)"
        lines.append(f"  {key:<28} {r['launches']:5d} launches  {took}")
    if not a.no_run:
        one, part = rows["one GPU"]["ms"], rows[f"shard 0 of {k} (compute)"]["ms"]
        for what, t in (("no overlap:  ", part + comm_ms), ("full overlap:", max(part, comm_ms))):
            lines.append(f"  tensor parallel, {what} {t:9.3f} ms = {t / one:.3f} x one GPU")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--dtype-bytes", type=int, default=2, help="2 for fp16/bf16, 4 for fp32")
    ap.add_argument("--devices", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--busbw", type=float, nargs="*", default=None,
                    help="measured all-reduce bus bandwidth(s) in GB/s (nccl-tests busbw)")
    ap.add_argument("--bench", action="store_true", help="time the whole stack and one shard on this GPU")
    ap.add_argument("--no-run", action="store_true", help="--bench: compile for sm_90 only (no GPU needed)")
    ap.add_argument("--tune", action="store_true", help="--bench: kernel selection by timing (slower compile)")
    ap.add_argument("--tune-budget", type=float, default=120.0, help="--bench --tune: seconds of tuning per build")
    ap.add_argument("--work", default=None, help="--bench: directory for the two builds (default: a temp dir)")
    a = ap.parse_args(argv)
    bw = {f"measured {b:g}": b for b in a.busbw} if a.busbw else ASSUMED_BUSBW_GBS
    print(table(a.layers, a.batch, a.seq, a.hidden, a.dtype_bytes, a.devices, bw))
    if a.bench:
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # cuda_timing
        print(bench(a, next(iter(bw.values()))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
