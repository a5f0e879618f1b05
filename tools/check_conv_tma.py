#!/usr/bin/env python3
"""ResNet-50 NHWC convs on the Hopper wgmma conv (codegen/kernels/conv_wgmma.py): the TMA points
(A by an im2col tensor map of x, codegen/tma.py mode "im2col"; 1x1/1 convs: the plain GEMM's tiled
maps) against the cp.async points (the im2col gather, or cp.async GEMM loads; B pre-swizzled or by
cp.async) and torch's channels_last cuDNN conv (cudnn.benchmark), same run, same GPU, fp16.

    python3 tools/check_conv_tma.py [--b1] [--split] [--verbose] [--json FILE] [--compile-only]

Per shape (the 10 of tools/bench_conv_wgmma.py, batch 32; --b1: batch 1 too): every point of the
variant's declared space (conv_wgmma: gemm_wgmma.candidates with the TMA im2col points where
gemm_wgmma.im2col_tma_fits, and the staged-epilogue points not yet in it; split-K points with --split)
compiled in parallel (NVRTC sm_90a), each run once on random inputs
with the output poisoned (NaN) first and checked against torch's fp32 conv (max abs error / max
|ref| < 1e-2: a wrong point is reported, never timed as best), then timed (tools/cuda_timing:
warm-up, median of CUDA events; short convs as CUDA-graph replays of 20 launches, torch too, which
also checks that a graph captures the tensor-map parameters). A launch not done after 10 s is a hung
pipeline: reported with the table so far, then the process exits. --compile-only: render and
compile every point (a CPU machine). Prints a table last: TFLOP/s of cuDNN, the best TMA point (split-K
and staged-epilogue points included), TMA best / cuDNN, the best staged-epilogue (EPI = smem) point,
the best cp.async point, the heuristic's pick, and the points not ok.
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))

from bench_conv_wgmma import SHAPES, _problem  # noqa: E402
from bench_gemm_wgmma import _compile, _graph_timed_cupy, _graph_timed_torch, _tag, _timed  # noqa: E402
from nnc.codegen import tma  # noqa: E402
from nnc.codegen.kernels import common, conv_wgmma as CW, gemm_wgmma as W  # noqa: E402
from nnc.codegen.target import ARCHS  # noqa: E402

SM90A = ARCHS["sm_90a"]
TOL = 1e-2
HANG_S = 10.0
COMPILE_ONLY = "--compile-only" in sys.argv
VERBOSE = "--verbose" in sys.argv
SPLIT = "--split" in sys.argv
RESULTS: list = []
CUBINS: dict = {}


TMA_KINDS = ("tma", "split", "epismem")


def kind_of(p):
    if W.load_kind(p) == "tma":
        return "split" if W.split_k(p) > 1 else ("epismem" if W.epi_smem(p) else "tma")
    return "bulk" if p.get("b_bulk") else "cp.async"


def tag(p):
    return (_tag(p) + (f"/split{W.split_k(p)}" if W.split_k(p) > 1 else "") + ("/epismem" if W.epi_smem(p) else "")
            + ("/tma" if W.load_kind(p) == "tma" else ""))


def conv_space(pr):
    """(GemmProblem, im2col geometry or None, declared space, heuristic point): what the variants
    conv.pointwise_wgmma_nhwc / conv.igemm_wgmma_nhwc declare for this conv (weight constant)."""
    pointwise = (pr.R, pr.S, pr.stride, tuple(pr.pads)) == (1, 1, (1, 1), (0, 0, 0, 0))
    gp = CW.igemm_problem(pr)
    geo = None if pointwise else CW.im2col_geometry(pr)
    im_tma = geo is not None and bool(W.im2col_tma_fits(gp, geo))
    space = W.candidates(gp, SM90A, True, geo is not None, im_tma, unverified=True)  # split-K, staged epilogue too
    if not SPLIT:  # split-K only with --split (its kernels are the slowest to compile; batch-1 matter)
        space = [p for p in space if W.split_k(p) == 1]
    dflt = W.default_params(gp, SM90A, True, geo is not None, im_tma)
    return gp, geo, space, dflt


def sync_or_exit(what: str) -> None:
    import torch
    ev = torch.cuda.Event()
    ev.record()
    t0 = time.time()
    while not ev.query():
        if time.time() - t0 > HANG_S:
            print(f"\nHANG: {what} still running after {HANG_S:.0f} s; exiting", flush=True)
            print_table(RESULTS)
            os._exit(3)
        time.sleep(1e-4)


def run_shape(pool, label, N, C, H, W_, K, R, S, st, pad):
    pr = _problem(N, C, H, W_, K, R, S, st, pad)
    gp, geo, space, dflt = conv_space(pr)
    specs = [(p, W.render(gp, p, im2col=geo, target=SM90A)) for p in space]
    uniq = {s.name: s.source for _, s in specs if s.name not in CUBINS}
    CUBINS.update(zip(uniq, pool.map(_compile, [(src, "sm_90a") for src in uniq.values()])))
    if COMPILE_ONLY:
        bad = [s.name for _, s in specs if isinstance(CUBINS[s.name], str)]
        n_tma = sum(1 for p in space if kind_of(p) in TMA_KINDS)
        print(f"{label} b{N}: {len(specs)} points ({n_tma} TMA), {len(bad)} failed to compile", *bad, sep="\n  ",
              flush=True)
        return None
    import cupy
    import torch
    import torch.nn.functional as F
    tdt = torch.float16
    P, Q = pr.P, pr.Q
    x = torch.empty(N, H, W_, C, device="cuda", dtype=tdt).uniform_(-1, 1)
    w = (torch.empty(K, R, S, C, device="cuda", dtype=tdt).uniform_(-1, 1) / (R * S * C) ** 0.5).to(tdt)
    y = torch.empty(N, P, Q, K, device="cuda", dtype=tdt)
    xv, wv = x.permute(0, 3, 1, 2), w.permute(0, 3, 1, 2)  # NCHW views of channels_last memory
    ref = F.conv2d(xv.float(), wv.float(), stride=st, padding=pad).permute(0, 2, 3, 1).reshape(-1, K)
    flops = 2.0 * N * P * Q * K * R * S * C
    graphs = flops < 2e10
    X, Wt, Y = cupy.from_dlpack(x), cupy.from_dlpack(w), cupy.from_dlpack(y)
    swizzled = {}
    cache = tma.TensorMapCache()
    rows = []
    for p, spec in specs:
        cb = CUBINS[spec.name]
        if isinstance(cb, str):
            rows.append((p, None, "COMPILE-FAIL " + cb[:300]))
            continue
        fn = common.load_cubin(cb, spec)
        bufs = dict(A=X, B=Wt, D=Y)
        if p.get("b_bulk"):
            if p["BN"] not in swizzled:
                raw = w.reshape(K, -1).view(torch.int16).cpu().numpy()
                swizzled[p["BN"]] = cupy.from_dlpack(
                    torch.from_numpy(W.preswizzle_b(raw, True, p["BN"])).cuda().view(tdt))
            bufs["B"] = swizzled[p["BN"]]
        try:
            vals = tma.kernel_spec_args(spec, {**W.splitk_arrays(spec), **bufs}, cache)  # split-K: its scratch
        except Exception as e:  # noqa: BLE001 (an encode refusal is a result)
            rows.append((p, None, f"ENCODE-FAIL {type(e).__name__}: {e}"[:300]))
            continue

        def launch(s_=None, fn=fn, spec=spec, vals=vals):
            fn(spec.grid, spec.block, vals, shared_mem=spec.smem, stream=s_)
        y.fill_(float("nan"))
        try:
            launch()
            sync_or_exit(f"{label} b{N} {tag(p)}")
        except Exception as e:  # noqa: BLE001
            rows.append((p, None, f"LAUNCH-FAIL {type(e).__name__}: {e}"[:300]))
            continue
        err = ((y.reshape(-1, K).float() - ref).abs().max() / ref.abs().max()).item()
        ok = bool(torch.isfinite(y).all().item()) and err < TOL
        ms = None
        if ok:
            ms = _graph_timed_cupy(launch) if graphs else _timed(lambda: launch(), 1)
            err2 = ((y.reshape(-1, K).float() - ref).abs().max() / ref.abs().max()).item()
            ok = err2 < TOL  # the replays wrote y again: still right?
        rows.append((p, ms if ok else None, f"{'ok' if ok else 'WRONG'} err={err:.1e}"))
    torch.backends.cudnn.benchmark = True

    def tconv():
        return F.conv2d(xv, wv, stride=st, padding=pad)
    tms = _graph_timed_torch(tconv) if graphs else _timed(tconv, 1)
    print(f"\n== {label} b{N}: cuDNN {tms * 1e3:.1f} us {flops / tms / 1e9:.1f} TFLOP/s"
          f"{' (graph-timed)' if graphs else ''}", flush=True)
    shown = []
    for kind in TMA_KINDS + ("bulk", "cp.async"):
        shown += sorted([r for r in rows if kind_of(r[0]) == kind and r[1] is not None], key=lambda r: r[1])[:3]
    shown += [r for r in rows if r[0] == dflt and r not in shown]
    bad = [r for r in rows if r[1] is None and r not in shown]
    shown += bad[:4]
    for p, ms, stt in (rows if VERBOSE else shown):
        t = "" if ms is None else f"{ms * 1e3:9.1f} us {flops / ms / 1e9:7.1f} TFLOP/s"
        print(f"   {kind_of(p):8s} {tag(p):28s} {t:30s} {stt}{'  (heuristic)' if p == dflt else ''}", flush=True)
    if len(bad) > 4 and not VERBOSE:
        print(f"   ... and {len(bad) - 4} more points not ok", flush=True)
    print("   all tma TFLOP/s: " + ", ".join(f"{tag(p)[:-4]}={flops / ms / 1e9:.0f}" for p, ms, _ in rows
                                              if kind_of(p) in TMA_KINDS and ms is not None), flush=True)

    def best(*kinds):
        good = [(p, ms) for p, ms, _ in rows if kind_of(p) in kinds and ms is not None]
        return min(good, key=lambda r: r[1]) if good else None
    return dict(label=label, N=N, flops=flops, torch_ms=tms, im2col=geo is not None,
                tma=best(*TMA_KINDS), epismem=best("epismem"), cp=best("bulk", "cp.async"),
                heuristic=next(((p, ms) for p, ms, _ in rows if p == dflt), None),
                n_tma=sum(1 for p in space if kind_of(p) in TMA_KINDS),
                wrong=[(tag(p), s) for p, _, s in rows if not s.startswith("ok")])


def cell(r, key):
    x = r[key]
    return "-" if not x or x[1] is None else f"{r['flops'] / x[1] / 1e9:.0f} ({tag(x[0])})"


def print_table(res: list) -> None:
    print("\n| conv | batch | A by TMA | cuDNN TFLOP/s | TMA best | TMA / cuDNN | staged-epilogue best | cp.async best "
          "| heuristic | wrong (of which TMA) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in res:
        if "failed" in r:
            print(f"| {r['label']} | {r['N']} | FAILED: {r['failed']} |")
            continue
        ratio = "-" if not r["tma"] else f"{r['torch_ms'] / r['tma'][1]:.2f}"
        n_wrong_tma = sum(1 for t, _ in r["wrong"] if t.endswith("/tma"))
        print(f"| {r['label']} | {r['N']} | {'im2col map' if r['im2col'] else 'tiled map'} | "
              f"{r['flops'] / r['torch_ms'] / 1e9:.0f} | {cell(r, 'tma')} | {ratio} | {cell(r, 'epismem')} | "
              f"{cell(r, 'cp')} | "
              f"{cell(r, 'heuristic')} | {len(r['wrong'])} ({n_wrong_tma} of {r['n_tma']}) |")


def main():
    out_json = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
    if not COMPILE_ONLY:
        import torch
        print(torch.cuda.get_device_name(), "torch", torch.__version__, "cudnn", torch.backends.cudnn.version(),
              time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), flush=True)
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as pool:
        for N in ((32, 1) if "--b1" in sys.argv else (32,)):
            for label, *geo in SHAPES:
                try:
                    r = run_shape(pool, label, N, *geo)
                    if r is not None:
                        RESULTS.append(r)
                except Exception as e:  # noqa: BLE001 (one broken shape must not hide the rest)
                    print(f"\n== {label} b{N}: FAILED {type(e).__name__}: {e}", flush=True)
                    RESULTS.append(dict(label=label, N=N, failed=f"{type(e).__name__}: {e}"[:200]))
    print(f"\n(total {time.time() - t0:.0f} s)")
    if not COMPILE_ONLY:
        print_table(RESULTS)
    if out_json:
        with open(out_json, "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)


if __name__ == "__main__":
    main()
