"""Multi-device numbers of issue 13 on the GPUs present, in one run (a short table last).

1. Link topology: `nvidia-smi topo -m`.
2. With >= 2 GPUs: NCCL all-reduce (all GPUs, fp16) and send/recv (GPU 0 -> 1) at 1, 8 and 64 MB
   through cupy.cuda.nccl, one host thread per GPU, CUDA events (algbw = bytes / time; all-reduce
   busbw = algbw x 2 (K - 1) / K, as nccl-tests). NVLink multicast stays off (NCCL_NVLS_ENABLE=0
   and friends, set before NCCL initialises: nnc.multi_device_nccl.set_safe_env).
3. ResNet-50 fp16, batch 256: the one-GPU build vs `--devices 2 --parallel pipeline
   --micro-batches 8` (nnc bench of each: throughput end to end and from GPU time; the pipeline's
   per-stage compute, measured bubble fraction), outputs compared.
4. A GPT-2-medium-sized decoder stack (24 layers, hidden 1024, 16 heads, fp16; batch 1, seq 512 by
   default; tests/passes/test_shard_tensor_parallel.py's gpt_decoder, random weights): one GPU vs
   `--devices 2 --parallel tensor` latency, communication share, and the link-bound all-reduce
   time of tools/tp_comm_bytes.py at the all-reduce busbw measured in 2.
With one GPU, 3 and 4 run the one-GPU path (every device on GPU 0, copies standing in for NCCL,
nothing overlaps) and the table says what was not measured. Builds use --no-tune (the heuristic
kernels) to stay within about 5 minutes; --work keeps them.

    python tools/bench_multi_device.py                    # everything
    python tools/bench_multi_device.py --skip-resnet --gpt-layers 4
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES_MB = (1, 8, 64)


def topology() -> str:
    try:
        p = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30)
        return (p.stdout or p.stderr).rstrip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"(nvidia-smi topo -m: {e})"


def _on_all(K, fn):
    errs = []

    def run(k):
        try:
            fn(k)
        except BaseException as e:  # reported below
            errs.append((k, e))
    ts = [threading.Thread(target=run, args=(k,)) for k in range(K)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errs:
        raise RuntimeError(f"GPU {errs[0][0]}: {errs[0][1]}")


def nccl_bandwidth(K: int, sizes_mb=SIZES_MB, iters: int = 20, warmup: int = 5) -> list:
    """[(what, MB, ms per op, algbw GB/s, busbw GB/s)] for all-reduce over K GPUs and send/recv 0 -> 1."""
    from nnc.multi_device_nccl import set_safe_env
    set_safe_env()
    import cupy as cp
    from cupy.cuda import nccl
    comms = nccl.NcclCommunicator.initAll(list(range(K)))
    streams, bufs = [], []
    for k in range(K):
        with cp.cuda.Device(k):
            streams.append(cp.cuda.Stream(non_blocking=True))
            n = max(sizes_mb) * 2**20 // 2
            bufs.append((cp.ones(n, cp.float16), cp.empty(n, cp.float16)))
    rows = []
    for mb in sizes_mb:
        count = mb * 2**20 // 2  # fp16 elements
        for what in ("all_reduce", "send_recv 0->1"):
            ev = {}
            members = range(K) if what == "all_reduce" else range(2)

            def fn(k):
                with cp.cuda.Device(k):
                    st, (a, b) = streams[k], bufs[k]
                    for i in range(warmup + iters):
                        if i == warmup:
                            e0 = cp.cuda.Event()
                            e0.record(st)
                        if what == "all_reduce":
                            comms[k].allReduce(a.data.ptr, b.data.ptr, count, nccl.NCCL_FLOAT16, nccl.NCCL_SUM, st.ptr)
                        elif k == 0:
                            comms[k].send(a.data.ptr, count, nccl.NCCL_FLOAT16, 1, st.ptr)
                        else:
                            comms[k].recv(b.data.ptr, count, nccl.NCCL_FLOAT16, 0, st.ptr)
                    e1 = cp.cuda.Event()
                    e1.record(st)
                    st.synchronize()
                    ev[k] = cp.cuda.get_elapsed_time(e0, e1) / iters
            _on_all(len(members), fn)
            ms = max(ev.values())
            alg = mb * 2**20 / (ms * 1e-3) / 1e9
            bus = alg * 2 * (K - 1) / K if what == "all_reduce" else alg
            rows.append((what if what != "all_reduce" else f"all_reduce x{K}", mb, ms, alg, bus))
    for c in comms:
        c.destroy()
    return rows


def _opts(**kw):
    from nnc.api import CompileOptions
    return CompileOptions(precision="fp16", tune=False, jobs=os.cpu_count(), **kw)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def resnet(work: Path, a, log) -> dict:
    from tools.check_multi_device import prepare
    from nnc.bench import BenchOptions, bench, bench_multi
    from nnc.driver import compile_model
    from nnc.multi_device import compile_multi_device
    import nnc
    model = prepare(str(ROOT / "tests/models/graphs/resnet50.graph.onnx"), True, work)
    shapes = {"input": [a.batch, 3, 224, 224]}
    t = time.time()
    compile_model(model, work / "r50_one", options=_opts(shapes=shapes))
    compile_multi_device(model, work / "r50_pipe", _opts(shapes=shapes), 2, "pipeline", a.micro_batches)
    log(f"resnet50: both builds in {time.time() - t:.0f} s")
    x = np.random.default_rng(0).standard_normal(shapes["input"]).astype(np.float32)
    one = nnc.load(work / "r50_one")
    want = one.run({"input": x}, output="numpy")
    del one
    pipe = nnc.load(work / "r50_pipe", transport=a.transport)
    got = pipe.run({"input": x})
    err = max(_rel(got[n], want[n]) for n in want)
    pipe.close()
    del pipe
    bo = BenchOptions(iterations=a.iterations, warmup=3)
    r1 = bench(work / "r50_one", bo)
    r2 = bench_multi(work / "r50_pipe", BenchOptions(iterations=a.iterations, warmup=3, transport=a.transport))
    return {"one": r1, "pipe": r2, "rel_err": err}


def gpt(work: Path, a, log) -> dict:
    import onnx
    from tests.passes.test_shard_tensor_parallel import gpt_decoder
    from nnc.bench import BenchOptions, bench, bench_multi
    from nnc.driver import compile_model
    from nnc.multi_device import compile_multi_device
    import nnc
    m = gpt_decoder(L=a.gpt_layers, B=a.gpt_batch, S=a.gpt_seq, E=1024, H=16, gemm=True)
    path = work / "gpt.onnx"
    onnx.save(m, str(path))
    del m
    t = time.time()
    compile_model(path, work / "gpt_one", options=_opts())
    compile_multi_device(str(path), work / "gpt_tp", _opts(), 2, "tensor")
    log(f"gpt: both builds in {time.time() - t:.0f} s")
    x = np.random.default_rng(0).standard_normal((a.gpt_batch, a.gpt_seq, 1024)).astype(np.float32)
    one = nnc.load(work / "gpt_one")
    name = one.input_names[0]
    want = one.run({name: x}, output="numpy")
    del one
    tp = nnc.load(work / "gpt_tp", transport=a.transport)
    got = tp.run({name: x})
    err = max(_rel(got[n], want[n]) for n in want)
    tp.close()
    del tp
    r1 = bench(work / "gpt_one", BenchOptions(iterations=a.iterations, warmup=3))
    r2 = bench_multi(work / "gpt_tp", BenchOptions(iterations=a.iterations, warmup=3, transport=a.transport))
    r3 = None
    if r2.transport == "nccl":  # opt-in: each device's whole run as one CUDA graph (host enqueue off the path)
        try:
            r3 = bench_multi(work / "gpt_tp", BenchOptions(iterations=a.iterations, warmup=3, transport="nccl",
                                                           device_graphs=True))
        except Exception as e:  # reported in the table
            r3 = f"{type(e).__name__}: {e}"
    return {"one": r1, "tp": r2, "tp_graphs": r3, "rel_err": err}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256, help="ResNet-50 batch (default 256)")
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--gpt-layers", type=int, default=24)
    ap.add_argument("--gpt-batch", type=int, default=1)
    ap.add_argument("--gpt-seq", type=int, default=512)
    ap.add_argument("--iterations", type=int, default=10, help="timed runs per bench (default 10)")
    ap.add_argument("--transport", choices=["auto", "nccl", "copy"], default="auto")
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--skip-gpt", action="store_true")
    ap.add_argument("--work", default=None, help="keep the builds here (default: a temporary directory)")
    a = ap.parse_args(argv)
    from nnc.multi_device_nccl import gpu_count, set_safe_env
    set_safe_env()
    t0 = time.time()
    log = lambda s: print(f"[{time.time() - t0:6.1f} s] {s}", flush=True)
    work = Path(a.work or tempfile.mkdtemp(prefix="nnc_bench_md_"))
    work.mkdir(parents=True, exist_ok=True)
    K = gpu_count()
    print("== link topology (nvidia-smi topo -m)\n" + topology(), flush=True)
    table, missing = [], []
    busbw = None
    if K >= 2:
        rows = nccl_bandwidth(K)
        print("== NCCL (cupy.cuda.nccl, fp16, one thread per GPU)")
        print(f"{'what':<18} {'MB':>4} {'ms':>9} {'algbw GB/s':>11} {'busbw GB/s':>11}")
        for w, mb, ms, alg, bus in rows:
            print(f"{w:<18} {mb:>4} {ms:>9.4f} {alg:>11.1f} {bus:>11.1f}")
            table.append((f"NCCL {w} {mb} MB", f"{bus:.1f} GB/s busbw" if w.startswith("all") else f"{alg:.1f} GB/s"))
        busbw = {mb: bus for w, mb, ms, alg, bus in rows if w.startswith("all_reduce")}
    else:
        missing.append(f"NCCL bandwidth: {K} GPU present (needs 2)")
    if not a.skip_resnet:
        try:
            r = resnet(work, a, log)
            one, pipe = r["one"], r["pipe"]
            gpu_one = one.batch / (one.gpu_compute_ms["median"] * 1e-3)
            table.append((f"ResNet-50 fp16 b{a.batch} one GPU", f"{one.throughput_per_s:.0f} img/s end to end, "
                                                              f"{gpu_one:.0f} img/s GPU"))
            line = f"{pipe.throughput_per_s:.0f} img/s end to end"
            if pipe.span_ms:
                line += f", {pipe.batch / (pipe.span_ms['median'] * 1e-3):.0f} img/s GPU span"
            if pipe.bubble_fraction is not None:
                line += f", bubble {pipe.bubble_fraction:.3f} (measured)"
            if pipe.estimate:
                line += (f", estimate {pipe.estimate['speedup']:.2f}x of sequential stages, bubble "
                         f"{pipe.estimate['bubble_fraction']:.3f} (one GPU: not measured)")
            table.append((f"ResNet-50 2-stage pipeline M={a.micro_batches} ({pipe.transport})", line))
            table.append(("  stage compute ms / micro-batch", ", ".join(f"{s['median']:.3f}" for s in pipe.stage_ms)))
            table.append(("  pipeline vs one GPU (end to end)", f"{pipe.throughput_per_s / one.throughput_per_s:.2f}x, "
                                                              f"outputs rel err {r['rel_err']:.2e}"))
            print("== ResNet-50\n" + __import__("nnc.bench", fromlist=["format_text"]).format_text(pipe), flush=True)
            if pipe.transport != "nccl":
                missing.append("ResNet-50 pipeline on 2 GPUs (ran the one-GPU path: stage overlap not measured)")
        except Exception as e:  # the rest of the table still prints
            missing.append(f"ResNet-50: {type(e).__name__}: {e}")
        log("resnet50 done")
    if not a.skip_gpt:
        try:
            from tools.tp_comm_bytes import ring_allreduce_seconds
            r = gpt(work, a, log)
            one, tp = r["one"], r["tp"]
            one_ms = one.gpu_compute_ms["median"]
            tp_ms = tp.span_ms["median"] if tp.span_ms else None
            table.append((f"GPT-2-medium-sized L{a.gpt_layers} b{a.gpt_batch} s{a.gpt_seq} one GPU",
                          f"{one_ms:.3f} ms GPU, {one.latency_ms['median']:.3f} ms end to end"))
            line = f"{tp.latency_ms['median']:.3f} ms end to end"
            if tp_ms is not None:
                line += f", {tp_ms:.3f} ms GPU span = {tp_ms / one_ms:.2f}x one GPU"
            if tp.comm_share:
                line += ", comm share " + "/".join(f"{100 * c:.0f}%" for c in tp.comm_share)
            table.append((f"  2-way tensor parallel ({tp.transport})", line + f", rel err {r['rel_err']:.2e}"))
            g = r["tp_graphs"]
            if isinstance(g, str):
                table.append(("  2-way TP, one CUDA graph per device", f"failed: {g[:200]}"))
            elif g is not None:
                table.append(("  2-way TP, one CUDA graph per device", f"{g.latency_ms['median']:.3f} ms end to end "
                              f"= {g.latency_ms['median'] / one.latency_ms['median']:.2f}x one GPU end to end"))
            msg = a.gpt_batch * a.gpt_seq * 1024 * 2
            if busbw:
                mb = min(busbw, key=lambda s: abs(s * 2**20 - msg))
                bound = ring_allreduce_seconds(msg, 2, busbw[mb] * 1e9) * 1e3 * 2 * a.gpt_layers
                table.append(("  link-bound all-reduce time / forward", f"{bound:.3f} ms ({2 * a.gpt_layers} x "
                              f"{msg / 2**20:.1f} MiB at the {mb} MB busbw {busbw[mb]:.0f} GB/s)"))
            else:
                missing.append("GPT link bound: no measured busbw (tools/tp_comm_bytes.py --busbw B gives it)")
            print("== GPT tensor parallel\n" + __import__("nnc.bench", fromlist=["format_text"]).format_text(tp),
                  flush=True)
            if tp.transport != "nccl":
                missing.append("GPT tensor parallel on 2 GPUs (ran the one-GPU path: cupy sums, not NCCL)")
        except Exception as e:
            missing.append(f"GPT: {type(e).__name__}: {e}")
        log("gpt done")
    print(f"\n== summary ({K} GPU{'s' if K != 1 else ''}, {time.time() - t0:.0f} s)")
    w = max([len(x) for x, _ in table] + [10])
    for what, val in table:
        print(f"{what:<{w}}  {val}")
    for m in missing:
        print(f"not measured: {m}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
