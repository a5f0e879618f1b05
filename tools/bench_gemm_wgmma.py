#!/usr/bin/env python3
"""The Hopper wgmma GEMM (codegen/kernels/gemm_wgmma.py) against torch.matmul (cuBLAS) and nnc's
mma.sync GEMM (codegen/kernels/gemm.py), same run, same GPU.

    python3 tools/bench_gemm_wgmma.py [--quick] [--json FILE]

Per shape: every point of the wgmma space (B by cp.async, and B pre-swizzled on the host for bulk
copies: what a weight GEMM gets, b_bulk) and every mma.sync tile (default block order) compiled in
parallel (NVRTC; sm_90a / sm_90), each checked against torch's fp32 result of the same fp16/bf16
inputs (random, outputs poisoned with NaN first; a wrong candidate is reported and never timed as
best), then timed with tools/cuda_timing.time_cuda (warm-up, median of CUDA-event timings; inputs
are not rotated: the BERT shapes fit in L2 for every contender alike). Shapes under 20 GFLOP are
timed as CUDA-graph replays of 20 launches (torch too), so host launch overhead is not the measure.
`--explore`: also every publish mode (LAG) on some shapes, and load probes (the producer skips A
or B: wrong results, timing only, to see which load limits). Prints a table last: TFLOP/s of torch,
the best mma.sync tile, the wgmma heuristic's pick (for a weight B) and the best wgmma point.
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
    t = "x".join(str(p[k]) for k in ("BM", "BN", "BK", "STAGES") if k in p) + (f"/cw{p['CW']}" if "CW" in p else "")
    t += "/2cta" if p.get("CTAS") == 2 else ""
    t += "/pingpong" if p.get("SCHED") == "pingpong" else ("/persist" if p.get("PERSIST") else "")
    return t + ("/bulkB" if p.get("b_bulk") else "") + (f"/lag{p['LAG']}" if "LAG" in p else "") + \
        (f"/{p['probe']}" if p.get("probe") else "")


def tflops_cell(r: dict, key: str) -> str:
    """'TFLOP/s (tile)' of result r's entry key ((kind, params, ms) or None)."""
    x = r[key]
    return "-" if not x or x[2] is None else f"{r['flops'] / x[2] / 1e9:.0f} ({_tag(x[1])})"


def dump_results(res: list, path: str) -> None:
    """The rows as JSON, each (kind, params, ms) entry as {params, ms}."""
    with open(path, "w") as f:
        json.dump([{k: (v if k not in ("tc", "wg", "wg_default") else (None if not v else
                    {"params": v[1], "ms": v[2]})) for k, v in r.items()} for r in res], f, indent=1, default=str)


def _timed(fn, reps):
    def many():
        for _ in range(reps):
            fn()
    return time_cuda(many, warmup=3, iters=20) / reps


GRAPH_REPS = 20


def _graph_timed_cupy(launch):
    """GPU time of one launch(stream): GRAPH_REPS launches captured in a CUDA graph on a torch
    stream (through cupy), the graph replayed between the events: no host launch overhead."""
    import cupy
    import torch
    ts = torch.cuda.Stream()
    cs = cupy.cuda.ExternalStream(ts.cuda_stream)
    launch(cs)
    ts.synchronize()
    cs.begin_capture()
    for _ in range(GRAPH_REPS):
        launch(cs)
    g = cs.end_capture()
    with torch.cuda.stream(ts):
        return time_cuda(lambda: g.launch(cs), warmup=3, iters=20) / GRAPH_REPS


def _graph_timed_torch(fn):
    import torch
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(GRAPH_REPS):
            fn()
    return time_cuda(g.replay, warmup=3, iters=20) / GRAPH_REPS


def run_shape(pool, label, M, N, K, dt, tol, explore=False, probe=False):
    import cupy
    import torch
    tdt = getattr(torch, dt)
    a = torch.empty(M, K, device="cuda", dtype=tdt).uniform_(-1, 1)
    b = torch.empty(K, N, device="cuda", dtype=tdt).uniform_(-1, 1)
    d = torch.empty(M, N, device="cuda", dtype=tdt)
    ref = torch.matmul(a.float(), b.float())
    flops = 2.0 * M * N * K
    graphs = flops < 2e10  # short kernels: CUDA-graph replays, else the host's launch rate is measured
    pr = gemm.GemmProblem(M, N, K, dtype=dt)
    wg_space = gemm_wgmma.candidates(pr, SM90A, b_bulk=True)
    wg_default = gemm_wgmma.default_params(pr, SM90A, b_bulk=True)
    if explore:
        wg_space = wg_space + [dict(p, LAG=lag) for p in wg_space if gemm_wgmma.load_kind(p) != "tma"  # no LAG
                               for lag in range(1, p["STAGES"] - 1)
                               if lag in (1, p["STAGES"] - 2)]
    if probe:
        wg_space = wg_space + [dict(wg_default, probe=x) for x in ("no_a", "no_b")]
    tc_space = [p for p in gemm.candidates(pr) if p.get("swizzle", gemm.GROUP_M) == gemm.GROUP_M]
    specs = [("wgmma", p, gemm_wgmma.render(pr, p), "sm_90a") for p in wg_space]
    specs += [("mma.sync", p, gemm.render(pr, p), "sm_90") for p in tc_space]
    cubins = list(pool.map(_compile, [(s.source, arch) for _, _, s, arch in specs]))
    bufs = dict(A=cupy.from_dlpack(a), B=cupy.from_dlpack(b), D=cupy.from_dlpack(d))
    swizzled = {}  # BN -> B pre-swizzled for bulk copies (raw 16-bit elements)
    for p in wg_space:
        if p.get("b_bulk") and p["BN"] not in swizzled:
            raw = b.view(torch.int16).cpu().numpy()
            swizzled[p["BN"]] = torch.from_numpy(gemm_wgmma.preswizzle_b(raw, False, p["BN"])).cuda().view(tdt)
    rows = []
    for (kind, p, spec, _), cb in zip(specs, cubins):
        if isinstance(cb, str):
            rows.append((kind, p, None, "COMPILE-FAIL " + cb[:300]))
            continue
        fn = common.load_cubin(cb, spec)
        bb = dict(bufs, B=cupy.from_dlpack(swizzled[p["BN"]])) if p.get("b_bulk") else bufs
        d.fill_(float("nan"))
        common.launch(fn, spec, bb)
        torch.cuda.synchronize()
        err = ((d.float() - ref).abs().max() / ref.abs().max()).item()
        ok = bool(torch.isfinite(d).all().item()) and err < tol
        ms = None
        if ok or p.get("probe"):
            ms = (_graph_timed_cupy(lambda st: common.launch(fn, spec, bb, stream=st)) if graphs
                  else _timed(lambda: common.launch(fn, spec, bb), 1))
        rows.append((kind, p, ms, "PROBE (not a result)" if p.get("probe") else f"{'ok' if ok else 'WRONG'} err={err:.1e}"))
    tms = _graph_timed_torch(lambda: torch.matmul(a, b)) if graphs else _timed(lambda: torch.matmul(a, b), 1)
    print(f"\n== {label} {dt} {M}x{N}x{K}: torch {tms * 1e3:.1f} us {flops / tms / 1e9:.1f} TFLOP/s"
          f"{' (graph-timed)' if graphs else ''}", flush=True)
    for kind, p, ms, st in rows:
        t = "" if ms is None else f"{ms * 1e3:9.1f} us {flops / ms / 1e9:7.1f} TFLOP/s"
        print(f"   {kind:8s} {_tag(p):18s} {t:30s} {st}{'  (heuristic)' if p == wg_default and kind == 'wgmma' else ''}",
              flush=True)

    def best(kind):
        good = [r for r in rows if r[0] == kind and r[2] is not None and r[3].startswith("ok")]
        return min(good, key=lambda r: r[2]) if good else None

    dflt = next((r for r in rows if r[0] == "wgmma" and r[1] == wg_default), None)
    return dict(label=label, dtype=dt, M=M, N=N, K=K, flops=flops, torch_ms=tms,
                tc=best("mma.sync"), wg=best("wgmma"), wg_default=dflt,
                wrong=[(k, _tag(p), st) for k, p, _, st in rows if not st.startswith(("ok", "PROBE"))])


def main():
    import torch
    quick = "--quick" in sys.argv
    explore = "--explore" in sys.argv
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
                ex = explore and dt == "float16" and label in ("4096^3", "BERT b32 FFN-up")
                res.append(run_shape(pool, label, M, N, K, dt, 1e-2 if dt == "float16" else 3e-2, explore=ex,
                                     probe=explore and dt == "float16" and label == "8192^3"))
    print(f"\n(total {time.time() - t0:.0f} s)")

    tf = tflops_cell
    print("\n| shape | dtype | cuBLAS TFLOP/s | mma.sync best | wgmma heuristic | wgmma best | wgmma best / cuBLAS | wrong |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res:
        pct = "-" if not r["wg"] else f"{100 * r['torch_ms'] / r['wg'][2]:.0f}%"
        print(f"| {r['label']} {r['M']}x{r['N']}x{r['K']} | {r['dtype']} | {r['flops'] / r['torch_ms'] / 1e9:.0f} | "
              f"{tf(r, 'tc')} | {tf(r, 'wg_default')} | {tf(r, 'wg')} | {pct} | {len(r['wrong'])} |")
    if out_json:
        dump_results(res, out_json)


if __name__ == "__main__":
    main()
