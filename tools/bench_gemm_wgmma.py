#!/usr/bin/env python3
"""The Hopper wgmma GEMM (codegen/kernels/gemm_wgmma.py) against torch.matmul (cuBLAS) and nnc's
mma.sync GEMM (codegen/kernels/gemm.py), same run, same GPU.

    python3 tools/bench_gemm_wgmma.py [--quick] [--json FILE]

Per shape: every point of the wgmma space and every mma.sync tile (default block order) compiled in
parallel (NVRTC; sm_90a / sm_90), each checked against torch's fp32 result of the same fp16/bf16
inputs (random, outputs poisoned with NaN first; a wrong candidate is reported and never timed as
best), then timed with tools/cuda_timing.time_cuda (warm-up, median of CUDA-event timings; inputs
are not rotated: the BERT shapes fit in L2 for every contender alike). Prints a table last:
TFLOP/s of torch, the best mma.sync tile, the wgmma heuristic's pick and the best wgmma point.
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))

from cuda_timing import time_cuda  # noqa: E402
from nnc.codegen.kernels import common, gemm, gemm_wgmma  # noqa: E402
from nnc.codegen.target import ARCHS  # noqa: E402

SM90A = ARCHS["sm_90a"]
# label, M, N, K (B is [K, N] row-major as an ONNX MatMul weight: the MN-major B path)
SHAPES = [
    ("4096^3", 4096, 4096, 4096),
    ("8192^3", 8192, 8192, 8192),
    ("BERT b1 QKV", 128, 2304, 768),
    ("BERT b1 out", 128, 768, 768),
    ("BERT b1 FFN-up", 128, 3072, 768),
    ("BERT b1 FFN-down", 128, 768, 3072),
    ("BERT b32 QKV", 4096, 2304, 768),
    ("BERT b32 out", 4096, 768, 768),
    ("BERT b32 FFN-up", 4096, 3072, 768),
    ("BERT b32 FFN-down", 4096, 768, 3072),
]


def _compile(job):
    src, arch = job
    try:
        return common.nvrtc_compile(src, arch)
    except Exception as e:  # noqa: BLE001
        return str(e)


def _tag(p):
    return "x".join(str(p[k]) for k in ("BM", "BN", "BK", "STAGES") if k in p) + (f"/cw{p['CW']}" if "CW" in p else "")


def run_shape(pool, label, M, N, K, dt, tol):
    import cupy
    import torch
    tdt = getattr(torch, dt)
    a = torch.empty(M, K, device="cuda", dtype=tdt).uniform_(-1, 1)
    b = torch.empty(K, N, device="cuda", dtype=tdt).uniform_(-1, 1)
    d = torch.empty(M, N, device="cuda", dtype=tdt)
    ref = torch.matmul(a.float(), b.float())
    flops = 2.0 * M * N * K
    pr = gemm.GemmProblem(M, N, K, dtype=dt)
    wg_space = gemm_wgmma.candidates(pr, SM90A)
    wg_default = gemm_wgmma.default_params(pr, SM90A)
    tc_space = [p for p in gemm.candidates(pr) if p.get("swizzle", gemm.GROUP_M) == gemm.GROUP_M]
    specs = [("wgmma", p, gemm_wgmma.render(pr, p), "sm_90a") for p in wg_space]
    specs += [("mma.sync", p, gemm.render(pr, p), "sm_90") for p in tc_space]
    cubins = list(pool.map(_compile, [(s.source, arch) for _, _, s, arch in specs]))
    bufs = dict(A=cupy.from_dlpack(a), B=cupy.from_dlpack(b), D=cupy.from_dlpack(d))
    rows = []
    for (kind, p, spec, _), cb in zip(specs, cubins):
        if isinstance(cb, str):
            rows.append((kind, p, None, "COMPILE-FAIL " + cb[:300]))
            continue
        fn = common.load_cubin(cb, spec)
        d.fill_(float("nan"))
        common.launch(fn, spec, bufs)
        torch.cuda.synchronize()
        err = ((d.float() - ref).abs().max() / ref.abs().max()).item()
        ok = bool(torch.isfinite(d).all().item()) and err < tol
        ms = time_cuda(lambda: common.launch(fn, spec, bufs), warmup=5, iters=30) if ok else None
        rows.append((kind, p, ms, f"{'ok' if ok else 'WRONG'} err={err:.1e}"))
    tms = time_cuda(lambda: torch.matmul(a, b), warmup=5, iters=30)
    print(f"\n== {label} {dt} {M}x{N}x{K}: torch {tms * 1e3:.1f} us {flops / tms / 1e9:.1f} TFLOP/s", flush=True)
    for kind, p, ms, st in rows:
        t = "" if ms is None else f"{ms * 1e3:9.1f} us {flops / ms / 1e9:7.1f} TFLOP/s"
        print(f"   {kind:8s} {_tag(p):18s} {t:30s} {st}{'  (heuristic)' if p == wg_default and kind == 'wgmma' else ''}",
              flush=True)

    def best(kind):
        good = [r for r in rows if r[0] == kind and r[2] is not None]
        return min(good, key=lambda r: r[2]) if good else None

    dflt = next((r for r in rows if r[0] == "wgmma" and r[1] == wg_default), None)
    return dict(label=label, dtype=dt, M=M, N=N, K=K, flops=flops, torch_ms=tms,
                tc=best("mma.sync"), wg=best("wgmma"), wg_default=dflt,
                wrong=[(k, _tag(p), st) for k, p, _, st in rows if not st.startswith("ok")])


def main():
    import torch
    quick = "--quick" in sys.argv
    out_json = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
    print(torch.cuda.get_device_name(), "torch", torch.__version__, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
          flush=True)
    res = []
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as pool:
        for dt in ("float16", "bfloat16"):
            for label, M, N, K in SHAPES:
                if dt == "bfloat16" and not label.endswith("^3"):
                    continue  # bf16: the square shapes only (same kernels otherwise)
                if quick and label == "8192^3":
                    continue
                res.append(run_shape(pool, label, M, N, K, dt, 1e-2 if dt == "float16" else 3e-2))
    print(f"\n(total {time.time() - t0:.0f} s)")

    def tf(r, key):
        x = r[key]
        return "-" if not x or x[2] is None else f"{r['flops'] / x[2] / 1e9:.0f} ({_tag(x[1])})"

    print("\n| shape | dtype | cuBLAS TFLOP/s | mma.sync best | wgmma heuristic | wgmma best | wgmma best / cuBLAS | wrong |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res:
        pct = "-" if not r["wg"] else f"{100 * r['torch_ms'] / r['wg'][2]:.0f}%"
        print(f"| {r['label']} {r['M']}x{r['N']}x{r['K']} | {r['dtype']} | {r['flops'] / r['torch_ms'] / 1e9:.0f} | "
              f"{tf(r, 'tc')} | {tf(r, 'wg_default')} | {tf(r, 'wg')} | {pct} | {len(r['wrong'])} |")
    if out_json:
        with open(out_json, "w") as f:
            json.dump([{k: (v if k not in ("tc", "wg", "wg_default") else (None if not v else
                        {"params": v[1], "ms": v[2]})) for k, v in r.items()} for r in res], f, indent=1, default=str)


if __name__ == "__main__":
    main()
