#!/usr/bin/env python3
"""NHWC convs of ResNet-50: nnc's wgmma conv variants (codegen/kernels/conv_wgmma.py: the wgmma GEMM
for 1x1/1, the a_im2col implicit GEMM otherwise) against nnc's mma.sync conv kernels (the
pointwise GEMM gemm.render / the NHWC implicit GEMM conv_igemm.cu.j2) and torch's channels_last
cuDNN conv (cudnn.benchmark), same run, same GPU, fp16.

    python3 tools/bench_conv_wgmma.py [--quick] [--json FILE] [--dry]

Per shape: every point of each nnc space compiled in parallel (NVRTC; sm_90a / sm_90), each run
once against torch's fp32 conv of the same inputs (random, output poisoned with NaN first; a wrong
candidate is reported and never timed as best), then timed with tools/cuda_timing.time_cuda
(warm-up, median of CUDA-event timings; short kernels as CUDA-graph replays of 20 launches, torch
too). The wgmma points take the weight pre-swizzled (b_bulk, what a compiled model's constant
weight gets) and by cp.async. Plain conv (no bias / activation): what torch's conv2d computes.
`--quick`: batch 32 only; `--dry`: only compile every kernel (CPU, no torch). Prints a table last: TFLOP/s of torch, the best mma.sync point, the wgmma
heuristic's pick and the best wgmma point, and wgmma best / torch.
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))

from bench_gemm_wgmma import (_compile, _graph_timed_cupy, _graph_timed_torch, _tag, _timed,  # noqa: E402
                              dump_results, tflops_cell)
from nnc.codegen.kernels import common, conv, conv_wgmma, gemm, gemm_wgmma  # noqa: E402
from nnc.codegen.target import ARCHS  # noqa: E402

SM90A, SM90 = ARCHS["sm_90a"], ARCHS["sm_90"]
# label, C, H, W, K, R, S, stride, pad (ResNet-50 v1.5 layers; the first four are issue 9's)
SHAPES = [
    ("1x1 256->64 @56", 256, 56, 56, 64, 1, 1, 1, 0),
    ("3x3 64->64 @56", 64, 56, 56, 64, 3, 3, 1, 1),
    ("3x3/2 128->128 @56", 128, 56, 56, 128, 3, 3, 2, 1),
    ("1x1/2 256->512 @56", 256, 56, 56, 512, 1, 1, 2, 0),
    ("1x1 64->256 @56", 64, 56, 56, 256, 1, 1, 1, 0),
    ("3x3 128->128 @28", 128, 28, 28, 128, 3, 3, 1, 1),
    ("3x3 256->256 @14", 256, 14, 14, 256, 3, 3, 1, 1),
    ("1x1 1024->256 @14", 1024, 14, 14, 256, 1, 1, 1, 0),
    ("3x3 512->512 @7", 512, 7, 7, 512, 3, 3, 1, 1),
    ("1x1 512->2048 @7", 512, 7, 7, 2048, 1, 1, 1, 0),
]


def shape_specs(pr: conv.ConvProblem):
    """(wgmma space, wgmma heuristic point, [(kind, params, KernelSpec, arch)]) of one conv: no GPU."""
    pointwise = (pr.R, pr.S, pr.stride, tuple(pr.pads)) == (1, 1, (1, 1), (0, 0, 0, 0))
    gp = conv_wgmma.igemm_problem(pr)  # the pointwise GEMM is the same [N*H*W, C] x [K, C]^T
    im = None if pointwise else conv_wgmma.im2col_geometry(pr)
    wg_space = gemm_wgmma.candidates(gp, SM90A, b_bulk=True, im2col=im is not None)
    wg_default = gemm_wgmma.default_params(gp, SM90A, b_bulk=True, im2col=im is not None)
    specs = [("wgmma", p, gemm_wgmma.render(gp, p, im2col=im, target=SM90A), "sm_90a") for p in wg_space]
    if pointwise:
        specs += [("mma.sync", p, gemm.render(gp, p), "sm_90") for p in gemm.candidates(gp, SM90)
                  if p.get("swizzle", gemm.GROUP_M) == gemm.GROUP_M]
    else:
        specs += [("mma.sync", p, conv.render(pr, p, kind="igemm"), "sm_90") for p in conv.candidates(pr, "igemm", SM90)]
    return wg_space, wg_default, specs


def _problem(N, C, H, W, K, R, S, st, pad):
    return conv.ConvProblem(N, C, H, W, K, R, S, stride=(st, st), pads=(pad,) * 4, dtype="float16",
                            in_layout="NHWC", out_layout="NHWC")


def run_shape(pool, label, N, C, H, W, K, R, S, st, pad, tol=1e-2):
    import cupy
    import torch
    import torch.nn.functional as F
    tdt = torch.float16
    pr = _problem(N, C, H, W, K, R, S, st, pad)
    P, Q = pr.P, pr.Q
    x = torch.empty(N, H, W, C, device="cuda", dtype=tdt).uniform_(-1, 1)
    w = (torch.empty(K, R, S, C, device="cuda", dtype=tdt).uniform_(-1, 1) / (R * S * C) ** 0.5).to(tdt)
    y = torch.empty(N, P, Q, K, device="cuda", dtype=tdt)
    xv, wv = x.permute(0, 3, 1, 2), w.permute(0, 3, 1, 2)  # NCHW views of channels_last memory
    ref = F.conv2d(xv.float(), wv.float(), stride=st, padding=pad).permute(0, 2, 3, 1).reshape(-1, K)
    flops = 2.0 * N * P * Q * K * R * S * C
    graphs = flops < 2e10
    pointwise = (R, S, st, pad) == (1, 1, 1, 0)
    wg_space, wg_default, specs = shape_specs(pr)
    cubins = list(pool.map(_compile, [(s.source, arch) for _, _, s, arch in specs]))
    X, Wt, Y = cupy.from_dlpack(x), cupy.from_dlpack(w), cupy.from_dlpack(y)
    swizzled = {}
    for p in wg_space:
        if p.get("b_bulk") and p["BN"] not in swizzled:
            raw = w.reshape(K, -1).view(torch.int16).cpu().numpy()
            swizzled[p["BN"]] = cupy.from_dlpack(
                torch.from_numpy(gemm_wgmma.preswizzle_b(raw, True, p["BN"])).cuda().view(tdt))
    rows = []
    for (kind, p, spec, _), cb in zip(specs, cubins):
        if isinstance(cb, str):
            rows.append((kind, p, None, "COMPILE-FAIL " + cb[:300]))
            continue
        fn = common.load_cubin(cb, spec)
        if kind == "wgmma":
            bufs = dict(A=X, B=swizzled[p["BN"]] if p.get("b_bulk") else Wt, D=Y)
        elif pointwise:
            bufs = dict(A=X, B=Wt, D=Y)
        else:
            bufs = dict(X=X, W=Wt, Y=Y)
        y.fill_(float("nan"))
        common.launch(fn, spec, bufs)
        torch.cuda.synchronize()
        err = ((y.reshape(-1, K).float() - ref).abs().max() / ref.abs().max()).item()
        ok = bool(torch.isfinite(y).all().item()) and err < tol
        ms = None
        if ok:
            ms = (_graph_timed_cupy(lambda s_, fn=fn, spec=spec, bufs=bufs: common.launch(fn, spec, bufs, stream=s_))
                  if graphs else _timed(lambda fn=fn, spec=spec, bufs=bufs: common.launch(fn, spec, bufs), 1))
        rows.append((kind, p, ms, f"{'ok' if ok else 'WRONG'} err={err:.1e}"))
    torch.backends.cudnn.benchmark = True

    def tconv():
        return F.conv2d(xv, wv, stride=st, padding=pad)
    if not tconv().is_contiguous(memory_format=torch.channels_last):
        print(f"   (note: torch's conv output for {label} is not channels_last)")
    tms = _graph_timed_torch(tconv) if graphs else _timed(tconv, 1)
    print(f"\n== {label} b{N}: torch {tms * 1e3:.1f} us {flops / tms / 1e9:.1f} TFLOP/s"
          f"{' (graph-timed)' if graphs else ''}", flush=True)
    for kind, p, ms, stt in rows:
        t = "" if ms is None else f"{ms * 1e3:9.1f} us {flops / ms / 1e9:7.1f} TFLOP/s"
        print(f"   {kind:8s} {_tag(p):22s} {t:30s} {stt}{'  (heuristic)' if p == wg_default and kind == 'wgmma' else ''}",
              flush=True)

    def best(kind):
        good = [r for r in rows if r[0] == kind and r[2] is not None]
        return min(good, key=lambda r: r[2]) if good else None

    dflt = next((r for r in rows if r[0] == "wgmma" and r[1] == wg_default), None)
    return dict(label=label, N=N, flops=flops, torch_ms=tms, tc=best("mma.sync"), wg=best("wgmma"), wg_default=dflt,
                wrong=[(k, _tag(p), s) for k, p, _, s in rows if not s.startswith("ok")])


def dry():
    """--dry (no GPU, no torch): build and NVRTC-compile every kernel of every shape."""
    n = 0
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 2)) as pool:
        for N in (1, 32):
            for label, *geo in SHAPES:
                _, _, specs = shape_specs(_problem(N, *geo))
                bad = [s.name + ": " + c[:200] for (_, _, s, _), c in
                       zip(specs, pool.map(_compile, [(s.source, a) for _, _, s, a in specs])) if isinstance(c, str)]
                n += len(specs)
                print(f"{label} b{N}: {len(specs)} kernels, {len(bad)} failed", *bad, sep="\n  ", flush=True)
    print(f"{n} kernels compiled")


def main():
    if "--dry" in sys.argv:
        return dry()
    import torch
    quick = "--quick" in sys.argv
    out_json = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "cudnn", torch.backends.cudnn.version(),
          time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), flush=True)
    res = []
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as pool:
        for N in ((32,) if quick else (1, 32)):
            for label, *geo in SHAPES:
                res.append(run_shape(pool, label, N, *geo))
    print(f"\n(total {time.time() - t0:.0f} s)")

    tf = tflops_cell
    print("\n| conv | batch | cuDNN TFLOP/s | mma.sync best | wgmma heuristic | wgmma best | wgmma best / cuDNN | wrong |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res:
        pct = "-" if not r["wg"] else f"{100 * r['torch_ms'] / r['wg'][2]:.0f}%"
        print(f"| {r['label']} | {r['N']} | {r['flops'] / r['torch_ms'] / 1e9:.0f} | {tf(r, 'tc')} | "
              f"{tf(r, 'wg_default')} | {tf(r, 'wg')} | {pct} | {len(r['wrong'])} |")
    if out_json:
        dump_results(res, out_json)


if __name__ == "__main__":
    main()
