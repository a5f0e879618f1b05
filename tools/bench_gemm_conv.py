#!/usr/bin/env python3
"""Check + time every tuning candidate of the nnc GEMM / conv kernels against torch (cuBLAS / cuDNN) on the GPU.

    python3 tools/bench_gemm_conv.py [--quick]

Per shape: compile all candidates in parallel (NVRTC, sm_90), check each against torch's result, time each
with CUDA events (warm-up, median of >= 20 launches), time torch the same way; print a table last.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
import numpy as np  # noqa: E402

from nnc.codegen.kernels import common, conv, gemm  # noqa: E402  (the package: its modules import nnc.ir)

REPS, WARM = 25, 5


def _compile(src):
    try:
        return common.nvrtc_compile(src, "sm_90")
    except Exception as e:  # noqa: BLE001
        return str(e)


def time_fn(f):
    import torch
    for _ in range(WARM):
        f()
    ts = []
    for _ in range(REPS):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); f(); e.record(); e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def cp(t):
    import cupy
    return cupy.from_dlpack(t.detach())


TD = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def bench_case(label, specs, bufs, out_t, ref_t, flops, torch_fn, tol, pool):
    import torch
    cubins = list(pool.map(_compile, [s.source for s in specs]))
    rows = []
    for spec, cb in zip(specs, cubins):
        tag = "x".join(str(spec.params[k]) for k in ("BM", "BN", "BK", "STAGES") if k in spec.params) or str(spec.params)
        if isinstance(cb, str):
            rows.append((tag, None, "COMPILE-FAIL " + cb[:200]))
            continue
        fn = common.load_cubin(cb, spec)
        out_t.fill_(float("nan"))
        common.launch(fn, spec, bufs)
        torch.cuda.synchronize()
        err = ((out_t.float() - ref_t.float()).abs().max() / (ref_t.float().abs().max() + 1e-12)).item()
        ok = bool(torch.isfinite(out_t.float()).all().item()) and err < tol
        ms = time_fn(lambda: common.launch(fn, spec, bufs))
        rows.append((tag, ms, f"{'ok' if ok else 'WRONG'} err={err:.1e}"))
    tms = time_fn(torch_fn)
    good = [r for r in rows if r[1] is not None and r[2].startswith("ok")]
    best = min(good, key=lambda r: r[1]) if good else None
    print(f"\n== {label}  torch {tms*1e3:.1f} us = {flops/tms/1e9:.1f} TFLOP/s", flush=True)
    for tag, ms, st in rows:
        print(f"   {tag:22s} {'' if ms is None else f'{ms*1e3:9.1f} us {flops/ms/1e9:7.1f} TFLOP/s'}  {st}", flush=True)
    return dict(label=label, torch_ms=tms, best=best, flops=flops, nbad=sum(1 for r in rows if not r[2].startswith("ok")))


def gemm_case(pool, M, N, K, dt, batch=1, tf32=False, label=None, act="none"):
    import torch
    tdt = getattr(torch, TD[dt])
    a = torch.empty(batch, M, K, device="cuda", dtype=tdt).uniform_(-1, 1)
    b = torch.empty(K, N, device="cuda", dtype=tdt).uniform_(-1, 1)
    d = torch.empty(batch, M, N, device="cuda", dtype=tdt)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    ref = torch.matmul(a.double() if dt == "float32" else a.float(), b.double() if dt == "float32" else b.float())
    pr = gemm.matmul_problem((batch, M, K), (K, N), dt, tf32=tf32)
    specs = [gemm.render(pr, p) for p in gemm.candidates(pr)]
    bufs = dict(A=cp(a), B=cp(b), D=cp(d))
    tol = {"float16": 1e-2, "bfloat16": 3e-2, "float32": 3e-3 if tf32 else 1e-4}[dt]
    return bench_case(label or f"gemm {dt}{'(tf32)' if tf32 else ''} b{batch} {M}x{N}x{K}", specs, bufs, d, ref,
                      2.0 * batch * M * N * K, lambda: torch.matmul(a, b), tol, pool)


def conv_case(pool, N, C, H, W, K, R, S, stride, pad, dt="float16", label=None):
    import torch
    import torch.nn.functional as F
    tdt = getattr(torch, TD[dt])
    x = torch.empty(N, C, H, W, device="cuda", dtype=tdt).uniform_(-1, 1)
    w = torch.empty(K, C, R, S, device="cuda", dtype=tdt).uniform_(-1, 1)
    xcl = x.to(memory_format=torch.channels_last)
    wcl = w.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = True
    ref = F.conv2d(x.float(), w.float(), stride=stride, padding=pad)
    pr = conv.ConvProblem(N, C, H, W, K, R, S, stride=(stride, stride), pads=(pad,) * 4, dtype=dt)
    cpad = conv.padded_channels(pr)
    prn = conv.ConvProblem(**{**pr.__dict__, "C": cpad, "in_layout": "NHWC", "out_layout": "NHWC"})
    xh = torch.zeros(N, H, W, cpad, device="cuda", dtype=tdt)
    xh[..., :C] = x.permute(0, 2, 3, 1)
    wp = torch.from_numpy(conv.prepare_weight(w.float().cpu().numpy(), 1, cpad if cpad != C else None)).to("cuda", tdt)
    y = torch.empty(N, pr.P, pr.Q, K, device="cuda", dtype=tdt)
    specs = [conv.render(prn, p, kind="igemm") for p in conv.candidates(prn)]
    bufs = dict(X=cp(xh), W=cp(wp.contiguous()), Y=cp(y))
    r = bench_case(label or f"conv NHWC {dt} {N}x{C}x{H}x{W} k{K} {R}x{S}/s{stride}", specs, bufs, y,
                   ref.permute(0, 2, 3, 1), pr.flops, lambda: F.conv2d(xcl, wcl, stride=stride, padding=pad), 1e-2, pool)
    # full NCHW plan (layout transform + igemm with NCHW epilogue) with the best tile, vs torch NCHW
    if r["best"]:
        best_p = next(s.params for s in specs if "x".join(str(s.params[k]) for k in ("BM", "BN", "BK", "STAGES")) == r["best"][0])
        steps = conv.plan(pr, {k: best_p[k] for k in ("BM", "BN", "BK", "WARPS_M", "WARPS_N", "STAGES")})
        yn = torch.empty(N, K, pr.P, pr.Q, device="cuda", dtype=tdt)
        tmp = torch.empty(N, H, W, cpad, device="cuda", dtype=tdt)
        fns = [(common.load_cubin(common.nvrtc_compile(s.source), s), s, roles) for s, roles in steps]
        pool_b = dict(x=cp(x), w=cp(wp.contiguous()), y=cp(yn), tmp_x=cp(tmp))

        def run_plan():
            for fn, s, roles in fns:
                common.launch(fn, s, {k: pool_b[v] for k, v in roles.items() if v in pool_b})
        yn.fill_(float("nan")); run_plan(); torch.cuda.synchronize()
        err = ((yn.float() - ref).abs().max() / ref.abs().max()).item()
        ms = time_fn(run_plan)
        tms = time_fn(lambda: F.conv2d(x, w, stride=stride, padding=pad))
        print(f"   NCHW plan (transpose+igemm): {ms*1e3:.1f} us {pr.flops/ms/1e9:.1f} TFLOP/s err={err:.1e}; "
              f"torch NCHW {tms*1e3:.1f} us", flush=True)
        r["plan_ms"], r["plan_err"], r["torch_nchw_ms"] = ms, err, tms
    return r


def main():
    import torch
    quick = "--quick" in sys.argv
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    t0 = time.time()
    res = []
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as pool:
        res.append(gemm_case(pool, 4096, 4096, 4096, "float16"))
        if not quick:
            res.append(gemm_case(pool, 4096, 4096, 4096, "bfloat16"))
        res.append(gemm_case(pool, 128, 768, 768, "float16", label="BERT b1 128x768x768 fp16"))
        res.append(gemm_case(pool, 128, 3072, 768, "float16", label="BERT b1 128x3072x768 fp16"))
        res.append(gemm_case(pool, 4096, 768, 768, "float16", label="BERT b32 4096x768x768 fp16"))
        res.append(gemm_case(pool, 4096, 3072, 768, "float16", label="BERT b32 4096x3072x768 fp16"))
        res.append(gemm_case(pool, 2048, 2048, 2048, "float32", label="fp32 2048^3 FFMA"))
        res.append(gemm_case(pool, 4096, 4096, 4096, "float32", tf32=True, label="tf32 4096^3"))
        res.append(conv_case(pool, 1, 64, 56, 56, 64, 3, 3, 1, 1, label="R50 1x64x56x56 3x3 k64"))
        res.append(conv_case(pool, 32, 256, 56, 56, 64, 1, 1, 1, 0, label="R50 32x256x56x56 1x1 k64"))
        res.append(conv_case(pool, 32, 3, 224, 224, 64, 7, 7, 2, 3, label="R50 32x3x224x224 7x7/2 k64"))
    print(f"\n(total {time.time() - t0:.0f} s)")
    print("\n| case | nnc best tile | nnc TFLOP/s | torch TFLOP/s | % of torch | wrong cands | NCHW plan TFLOP/s (torch NCHW) |")
    print("|---|---|---|---|---|---|---|")
    for r in res:
        b = r["best"]
        plan = ""
        if "plan_ms" in r:
            plan = f"{r['flops']/r['plan_ms']/1e9:.1f} ({r['flops']/r['torch_nchw_ms']/1e9:.1f})"
        if b:
            print(f"| {r['label']} | {b[0]} | {r['flops']/b[1]/1e9:.1f} | {r['flops']/r['torch_ms']/1e9:.1f} | "
                  f"{100*r['torch_ms']/b[1]:.0f}% | {r['nbad']} | {plan} |")
        else:
            print(f"| {r['label']} | none correct | - | {r['flops']/r['torch_ms']/1e9:.1f} | - | {r['nbad']} | |")


if __name__ == "__main__":
    main()
