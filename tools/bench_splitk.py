#!/usr/bin/env python3
"""Split-K on the mma.sync GEMM (codegen/kernels/gemm.py, SPLIT_K) against its unsplit tiles and
torch.matmul (cuBLAS), fp16, same run, same GPU: the small-M GEMMs of batch-1 models.

    python3 tools/bench_splitk.py [--json FILE]

Per shape: every unsplit tile of gemm.candidates (default block order) and the SPLIT_TOP split-K
points the cost model ranks first (plus the heuristic's pick), compiled in parallel (NVRTC), each
checked against torch's fp32 result of the same random fp16 inputs (output poisoned with NaN
first; a wrong candidate is reported, never timed as best), then timed as CUDA-graph replays of
LAUNCHES launches over rotating copies of A and B (more than 2x L2 in all, as weights come from
DRAM in a model run): CUDA-event median of REPS replays, per launch. "+zero" is the best split
point with a counter-zeroing copy (a memcpy node) before every launch: what a run pays for its first
split GEMM only (the lowering zeroes the counters the run's split GEMMs share once, before the
first; the kernel leaves them zeroed). Prints a short table last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from nnc.codegen.kernels import common, gemm  # noqa: E402
from nnc.codegen.target import ARCHS  # noqa: E402

TARGET = ARCHS["sm_90"]
# label, M, N, K: A [M, K] activations, B [K, N] weight (an ONNX MatMul / NHWC 1x1 conv as GEMM)
SHAPES = [
    ("BERT b1 QKV", 128, 2304, 768),
    ("BERT b1 attn-out", 128, 768, 768),
    ("BERT b1 FFN-up", 128, 3072, 768),
    ("BERT b1 FFN-down", 128, 768, 3072),
    ("MNv2 b1 7x7 960->160", 49, 160, 960),
    ("MNv2 b1 7x7 320->1280", 49, 1280, 320),
    ("RN50 b1 7x7 2048->512", 49, 512, 2048),
]
SPLIT_TOP = 14
LAUNCHES = 20
REPS = 30
WARMUP = 3


def _compile(src):
    try:
        return common.nvrtc_compile(src, "sm_90")
    except Exception as e:  # noqa: BLE001
        return str(e)


def _tag(p):
    t = f"{p['BM']}x{p['BN']}x{p['BK']}s{p['STAGES']}"
    return t + (f"/K{p['SPLIT_K']}" if p.get("SPLIT_K", 1) > 1 else "")


def _points(pr):
    cands = [p for p in gemm.candidates(pr, TARGET) if p.get("swizzle", gemm.GROUP_M) == gemm.GROUP_M]
    whole = [p for p in cands if p.get("SPLIT_K", 1) == 1]
    split = sorted((p for p in cands if p.get("SPLIT_K", 1) > 1), key=lambda p: gemm.modelled_time(pr, p, TARGET))
    d = gemm.default_params(pr, TARGET)
    pts = whole + split[:SPLIT_TOP]
    if d not in pts:
        pts.append(d)
    return pts, d


def _graph_ms(cp, launch_i, n=LAUNCHES):
    """Median ms per launch of a CUDA graph of n launches (launch_i(i, stream))."""
    st = cp.cuda.Stream(non_blocking=True)
    with st:
        for i in range(n):  # warm (lazy module loads outside the capture)
            launch_i(i, st)
        st.synchronize()
        st.begin_capture()
        for i in range(n):
            launch_i(i, st)
        g = st.end_capture()
        for _ in range(WARMUP):
            g.launch(st)
        ts = []
        for _ in range(REPS):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record(st)
            g.launch(st)
            b.record(st)
            b.synchronize()
            ts.append(cp.cuda.get_elapsed_time(a, b) / n)
    return float(np.median(ts))


def _torch_ms(torch, As, Bs, n=LAUNCHES):
    s = torch.cuda.Stream()
    out = torch.empty(As[0].shape[0], Bs[0].shape[1], dtype=torch.float16, device="cuda")
    with torch.cuda.stream(s):
        for i in range(n):
            torch.matmul(As[i % len(As)], Bs[i % len(Bs)], out=out)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for i in range(n):
            torch.matmul(As[i % len(As)], Bs[i % len(Bs)], out=out)
    for _ in range(WARMUP):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(REPS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / n)
    return float(np.median(ts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import cupy as cp
    import torch
    t0 = time.time()
    plans = []
    for label, M, N, K in SHAPES:
        pr = gemm.GemmProblem(M, N, K, dtype="float16")
        pts, d = _points(pr)
        plans.append((label, pr, [(p, gemm.render(pr, p)) for p in pts], d))
    srcs = sorted({s.source for _, _, specs, _ in plans for _, s in specs})
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 2)) as ex:
        cubins = dict(zip(srcs, ex.map(_compile, srcs)))
    print(f"compiled {len(srcs)} kernels in {time.time() - t0:.1f} s", flush=True)
    l2 = cp.cuda.Device().attributes.get("L2CacheSize", 50 << 20)
    rows, raw = [], []
    for label, pr, specs, d in plans:
        M, N, K = pr.M, pr.N, pr.K
        copies = int(min(LAUNCHES, max(1, -(-2 * l2 // ((M * K + K * N) * 2)))))
        g = torch.Generator(device="cuda").manual_seed(M * 7 + N * 3 + K)
        As = [torch.rand(M, K, device="cuda", generator=g).sub_(0.5).half() for _ in range(copies)]
        Bs = [torch.rand(K, N, device="cuda", generator=g).sub_(0.5).half() for _ in range(copies)]
        ref = (As[0].float() @ Bs[0].float()).cpu().numpy().astype(np.float64)
        D = cp.empty((M, N), cp.float16)
        ca = [cp.asarray(a) for a in As]
        cb = [cp.asarray(b) for b in Bs]
        res = []
        for p, spec in specs:
            cub = cubins[spec.source]
            if isinstance(cub, str):
                print(f"  {label} {_tag(p)}: compile failed: {cub[:200]}")
                continue
            fn = common.load_cubin(cub, spec)
            D.fill(np.nan)
            bufs = {"A": ca[0], "B": cb[0], "D": D}
            for _ in range(2):  # twice: the second launch finds the counters its first one reset
                common.launch(fn, spec, bufs)
            cp.cuda.runtime.deviceSynchronize()
            got = cp.asnumpy(D).astype(np.float64)
            finite = np.isfinite(got).all()
            err = float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-12)) if finite else float("inf")
            if err > 1e-2:
                print(f"  {label} {_tag(p)}: WRONG (rel err {err:.3g}), not timed")
                continue
            split = p.get("SPLIT_K", 1) > 1

            def launch_i(i, st, fn=fn, spec=spec):
                common.launch(fn, spec, {"A": ca[i % copies], "B": cb[i % copies], "D": D}, stream=st)
            ms = _graph_ms(cp, launch_i)
            zero_ms = None
            if split:
                ctr = common._scratch(spec, "tile_counters", dict((a[0], a[2]) for a in spec.args)["tile_counters"])
                zeros = cp.zeros_like(ctr)

                def launch_z(i, st, fn=fn, spec=spec, ctr=ctr, zeros=zeros):
                    cp.cuda.runtime.memcpyAsync(ctr.data.ptr, zeros.data.ptr, ctr.nbytes, 3, st.ptr)
                    launch_i(i, st, fn, spec)
                zero_ms = _graph_ms(cp, launch_z)
            res.append((p, ms, zero_ms, err))
            raw.append({"shape": label, "params": p, "ms": ms, "ms_with_zero_copy": zero_ms, "rel_err": err,
                        "default": p == d})
        t_torch = _torch_ms(torch, As, Bs)
        whole = [r for r in res if r[2] is None]
        split = [r for r in res if r[2] is not None]
        bw = min(whole, key=lambda r: r[1]) if whole else None
        bs = min(split, key=lambda r: r[1]) if split else None
        dflt = next((r for r in res if r[0] == d), None)
        rows.append((label, M, N, K, bw, bs, dflt, t_torch))
        print(f"{label}: torch {t_torch * 1e3:.1f} us; " + ", ".join(
            f"{_tag(p)} {ms * 1e3:.1f}" + (f"(+z {z * 1e3:.1f})" if z is not None else "") for p, ms, z, _ in
            sorted(res, key=lambda r: r[1])[:8]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": raw, "device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode()}, f, indent=1)
    print(f"\ntotal {time.time() - t0:.0f} s; fp16, us per launch (CUDA-graph replays, inputs rotated)")
    print(f"{'shape':24} {'MxNxK':>15} {'no-split':>20} {'split-K':>22} {'+zero':>7} {'default':>16} "
          f"{'torch':>7} {'split/nosplit':>13} {'torch/best':>10}")
    for label, M, N, K, bw, bs, dflt, tt in rows:
        w = f"{_tag(bw[0])} {bw[1] * 1e3:.1f}" if bw else "-"
        s = f"{_tag(bs[0])} {bs[1] * 1e3:.1f}" if bs else "-"
        z = f"{bs[2] * 1e3:.1f}" if bs else "-"
        df = f"{_tag(dflt[0])} {dflt[1] * 1e3:.1f}" if dflt else "-"
        sp = f"{bw[1] / bs[1]:.2f}x" if bw and bs else "-"
        vt = f"{tt / min(bs[1], bw[1] if bw else bs[1]):.2f}" if bs else "-"
        print(f"{label:24} {f'{M}x{N}x{K}':>15} {w:>20} {s:>22} {z:>7} {df:>16} {tt * 1e3:>7.1f} {sp:>13} {vt:>10}")


if __name__ == "__main__":
    main()
