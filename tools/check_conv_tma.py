#!/usr/bin/env python3
"""ResNet-50 NHWC convs on the Hopper wgmma conv (codegen/kernels/conv_wgmma.py): the TMA points
(A by an im2col tensor map of x, codegen/tma.py mode "im2col"; 1x1/1 convs: the plain GEMM's tiled
maps) against the cp.async points (the im2col gather, or cp.async GEMM loads; B pre-swizzled or by
cp.async) and torch's channels_last cuDNN conv (cudnn.benchmark), same run, same GPU, fp16.

    python3 tools/check_conv_tma.py [--b1] [--unverified] [--verbose] [--json FILE] [--compile-only]

Per shape (the 10 of tools/bench_conv_wgmma.py, batch 32; --b1: batch 1 too): every point of the
variant's declared space (conv_wgmma: gemm_wgmma.candidates with the TMA im2col points where
gemm_wgmma.im2col_tma_fits; --unverified: also the kinds not in it, gemm_wgmma.UNVERIFIED_KINDS: split-K,
the staged and the shuffle-store epilogues) compiled in parallel (NVRTC sm_90a), each run once on random inputs
with the output poisoned (NaN) first and checked against torch's fp32 conv (max abs error / max
|ref| < 1e-2: a wrong point is reported, never timed as best; the loop: tools/wgmma_point_check.py), then timed (tools/cuda_timing:
warm-up, median of CUDA events; short convs as CUDA-graph replays of 20 launches, torch too, which
also checks that a graph captures the tensor-map parameters). A launch not done after 10 s is a hung
pipeline: reported with the table so far, then the process exits. --compile-only: render and
compile every point (a CPU machine). Prints a table last: TFLOP/s of cuDNN, the best TMA point (unverified
points included with --unverified), TMA best / cuDNN, the best unverified point,
the best cp.async point, the heuristic's pick, and the points not ok.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))

from bench_conv_wgmma import SHAPES, _problem  # noqa: E402
from bench_gemm_wgmma import _graph_timed_torch, _timed  # noqa: E402
from nnc.codegen.kernels import conv_wgmma as CW, gemm_wgmma as W  # noqa: E402
from wgmma_point_check import TMA_KINDS, best, check_and_time, compile_specs, kind_of, print_rows, run_jobs, tag, wrong  # noqa: E402
from nnc.codegen.target import ARCHS  # noqa: E402

SM90A = ARCHS["sm_90a"]
COMPILE_ONLY = "--compile-only" in sys.argv
VERBOSE = "--verbose" in sys.argv
UNVERIFIED = "all" if "--unverified" in sys.argv else None  # None: the declared space; "all": every kind
RESULTS: list = []


def conv_space(pr, unverified=None):
    """(GemmProblem, im2col geometry or None, space, heuristic point): what the variants
    conv.pointwise_wgmma_nhwc / conv.igemm_wgmma_nhwc declare for this conv (weight constant), plus
    the unverified kinds asked for (gemm_wgmma.unverified_kinds; default: this run's flag)."""
    pointwise = (pr.R, pr.S, pr.stride, tuple(pr.pads)) == (1, 1, (1, 1), (0, 0, 0, 0))
    gp = CW.igemm_problem(pr)
    geo = None if pointwise else CW.im2col_geometry(pr)
    im_tma = geo is not None and bool(W.im2col_tma_fits(gp, geo))
    space = W.candidates(gp, SM90A, True, geo is not None, im_tma,
                         unverified=UNVERIFIED if unverified is None else unverified)
    dflt = W.default_params(gp, SM90A, True, geo is not None, im_tma)
    return gp, geo, space, dflt


def conv_rows(pr, gp, geo, specs, what, on_hang=None):
    """(rows of check_and_time, cuDNN ms, flops) of the conv's specs on random inputs (torch's
    channels_last conv, cudnn.benchmark, the reference in fp32)."""
    import cupy
    import torch
    import torch.nn.functional as F
    N, C, H, W_, K, R, S = pr.N, pr.C, pr.H, pr.W, pr.K, pr.R, pr.S
    st, pad = pr.stride[0], pr.pads[0]
    tdt = torch.float16
    x = torch.empty(N, H, W_, C, device="cuda", dtype=tdt).uniform_(-1, 1)
    w = (torch.empty(K, R, S, C, device="cuda", dtype=tdt).uniform_(-1, 1) / (R * S * C) ** 0.5).to(tdt)
    y = torch.empty(N, pr.P, pr.Q, K, device="cuda", dtype=tdt)
    xv, wv = x.permute(0, 3, 1, 2), w.permute(0, 3, 1, 2)  # NCHW views of channels_last memory
    ref = F.conv2d(xv.float(), wv.float(), stride=st, padding=pad).permute(0, 2, 3, 1).reshape(-1, K)
    ref_max = ref.abs().max()
    flops = 2.0 * N * pr.P * pr.Q * K * R * S * C
    graphs = flops < 2e10
    swizzled = {}

    def bulk_b(BN):
        if BN not in swizzled:
            raw = w.reshape(K, -1).view(torch.int16).cpu().numpy()
            swizzled[BN] = cupy.from_dlpack(torch.from_numpy(W.preswizzle_b(raw, True, BN)).cuda().view(tdt))
        return swizzled[BN]
    rows = check_and_time(specs, dict(A=cupy.from_dlpack(x), B=cupy.from_dlpack(w), D=cupy.from_dlpack(y)), y,
                          lambda: ((y.reshape(-1, K).float() - ref).abs().max() / ref_max).item(), graphs, what,
                          bulk_b, on_hang)
    torch.backends.cudnn.benchmark = True

    def tconv():
        return F.conv2d(xv, wv, stride=st, padding=pad)
    tms = _graph_timed_torch(tconv) if graphs else _timed(tconv, 1)
    return rows, tms, flops


def run_shape(pool, label, N, C, H, W_, K, R, S, st, pad):
    pr = _problem(N, C, H, W_, K, R, S, st, pad)
    gp, geo, space, dflt = conv_space(pr)
    specs = [(p, W.render(gp, p, im2col=geo, target=SM90A)) for p in space]
    bad = compile_specs(pool, [s for _, s in specs])
    if COMPILE_ONLY:
        n_tma = sum(1 for p in space if kind_of(p) in TMA_KINDS)
        print(f"{label} b{N}: {len(specs)} points ({n_tma} TMA), {len(bad)} failed to compile", *bad, sep="\n  ",
              flush=True)
        return None
    rows, tms, flops = conv_rows(pr, gp, geo, specs, f"{label} b{N}", lambda: print_table(RESULTS))
    print(f"\n== {label} b{N}: cuDNN {tms * 1e3:.1f} us {flops / tms / 1e9:.1f} TFLOP/s"
          f"{' (graph-timed)' if flops < 2e10 else ''}", flush=True)
    print_rows(rows, flops, {"heuristic": dflt}, verbose=VERBOSE)
    print("   all tma TFLOP/s: " + ", ".join(f"{tag(p)[:-4]}={flops / ms / 1e9:.0f}" for p, ms, _ in rows
                                              if kind_of(p) in TMA_KINDS and ms is not None), flush=True)
    return dict(label=label, N=N, flops=flops, torch_ms=tms, im2col=geo is not None,
                tma=best(rows, lambda p: kind_of(p) in TMA_KINDS),
                epismem=best(rows, lambda p: kind_of(p) in TMA_KINDS and not W.in_space(p)),
                cp=best(rows, lambda p: kind_of(p) in ("bulk", "cp.async")),
                heuristic=next(((p, ms) for p, ms, _ in rows if p == dflt), None),
                n_tma=sum(1 for p in space if kind_of(p) in TMA_KINDS), wrong=wrong(rows))


def cell(r, key):
    x = r[key]
    return "-" if not x or x[1] is None else f"{r['flops'] / x[1] / 1e9:.0f} ({tag(x[0])})"


def print_table(res: list) -> None:
    print("\n| conv | batch | A by TMA | cuDNN TFLOP/s | TMA best | TMA / cuDNN | unverified best | cp.async best "
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
    jobs = [(f"{label} b{N}", dict(label=label, N=N), lambda pool, a=(label, N, *geo): run_shape(pool, *a))
            for N in ((32, 1) if "--b1" in sys.argv else (32,)) for label, *geo in SHAPES]
    run_jobs(jobs, RESULTS, COMPILE_ONLY, print_table, out_json, cudnn=True)


if __name__ == "__main__":
    main()
