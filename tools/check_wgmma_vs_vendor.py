#!/usr/bin/env python3
"""Issue 9's scoreboard: nnc's Hopper wgmma GEMM / conv (TMA points) against cuBLAS and cuDNN on
exactly the shapes the issue names, the declared space and the unverified point kinds side by
side, same run, same GPU. One command (H200, about 2-3 minutes with compiles), a short table last.

    python3 tools/check_wgmma_vs_vendor.py [--all-loads] [--verbose] [--only SUBSTR] [--json FILE] [--compile-only]

Problems (fp16 unless named): BERT-base GEMMs at batch 1 and 32, seq 128 (M = 128, 4096; (K, N) =
(768, 2304) QKV, (768, 768) out-proj, (768, 3072) FFN1, (3072, 768) FFN2; B [K, N] as an ONNX
MatMul weight); 4096^3 and 8192^3 in fp16 and bf16 (target: >= 0.9 of cuBLAS); ResNet-50 b32's
1x1 convs (NHWC, torch channels_last cuDNN with cudnn.benchmark as the peer: 64->256 @56,
256->64 @56, 1x1/2 256->512 @56, 1024->256 @14, 512->2048 @7).

Points: every TMA point of the declared space (gemm_wgmma.candidates; what the heuristic and the
tuner choose from) and of every unverified kind (gemm_wgmma.UNVERIFIED_KINDS: split-K, EPI = smem
staged epilogue, EPI = shfl 16-byte stores through quad shuffles, cw3 192x128 tiles of three consumer
warp groups, swizzle GROUP_M 16 on 4096^3 / 8192^3, split_waves split-K on 1-2 wave grids whose last
wave is mostly idle, epi_tma D by TMA stores from a swizzled shared stage); --all-loads: the cp.async and
bulk-B points too (measured 1.3-2.3x slower than TMA on these shapes, 2026-12-02/03). Each point
is checked first (tools/wgmma_point_check.py: output poisoned with NaN, random inputs, against
torch's fp32 result, max abs error / max |ref| < 1e-2, again after the timed runs): a wrong point
is listed and never counted. Times: median of CUDA events, problems under 20 GFLOP as CUDA-graph
replays of 20 launches (the vendor call too).

Table (last): per problem the vendor's ms, the best in-space point's ms and vendor / it (>= 1.00:
nnc as fast or faster), the best unverified point's ms and its ratio, the heuristic pick's ms, and
the points not ok. --compile-only: render and NVRTC-compile every point (CPU), print the counts.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))

from bench_conv_wgmma import _problem  # noqa: E402
from check_conv_tma import conv_rows, conv_space  # noqa: E402
from check_gemm_tma import gemm_rows  # noqa: E402
from nnc.codegen.kernels import gemm, gemm_wgmma as W  # noqa: E402
from nnc.codegen.target import ARCHS  # noqa: E402
from wgmma_point_check import best, compile_specs, print_rows, run_jobs, tag, wrong  # noqa: E402

SM90A = ARCHS["sm_90a"]
# ("gemm", label, dtype, M, N, K) / ("conv", label, N, C, H, W, K, R, S, stride, pad)
PROBLEMS = []
for _b, _m in ((1, 128), (32, 4096)):
    for _name, _k, _n in (("QKV", 768, 2304), ("out", 768, 768), ("FFN1", 768, 3072), ("FFN2", 3072, 768)):
        PROBLEMS.append(("gemm", f"BERT b{_b} {_name}", "float16", _m, _n, _k))
for _s in (4096, 8192):
    for _dt in ("float16", "bfloat16"):
        PROBLEMS.append(("gemm", f"{_s}^3", _dt, _s, _s, _s))
PROBLEMS += [
    ("conv", "1x1 64->256 @56", 32, 64, 56, 56, 256, 1, 1, 1, 0),
    ("conv", "1x1 256->64 @56", 32, 256, 56, 56, 64, 1, 1, 1, 0),
    ("conv", "1x1/2 256->512 @56", 32, 256, 56, 56, 512, 1, 1, 2, 0),
    ("conv", "1x1 1024->256 @14", 32, 1024, 14, 14, 256, 1, 1, 1, 0),
    ("conv", "1x1 512->2048 @7", 32, 512, 7, 7, 2048, 1, 1, 1, 0),
]
ALL_LOADS = "--all-loads" in sys.argv
COMPILE_ONLY = "--compile-only" in sys.argv
VERBOSE = "--verbose" in sys.argv
ONLY = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else ""
RESULTS: list = []


def keep(p: dict) -> bool:
    return ALL_LOADS or W.load_kind(p) == "tma"


def problem_points(prob):
    """(label, dtype, GemmProblem, im2col geometry or None, conv problem or None, points, heuristic)."""
    if prob[0] == "gemm":
        _, label, dt, M, N, K = prob
        pr = gemm.GemmProblem(M, N, K, dtype=dt)
        space = W.candidates(pr, SM90A, b_bulk=True, unverified="all")
        return label, dt, pr, None, None, [p for p in space if keep(p)], W.default_params(pr, SM90A, b_bulk=True)
    _, label, *geo = prob
    cpr = _problem(*geo)
    gp, g, space, dflt = conv_space(cpr, unverified="all")
    return label, "float16", gp, g, cpr, [p for p in space if keep(p)], dflt


def run(pool, prob):
    label, dt, pr, geo, cpr, points, dflt = problem_points(prob)
    if dflt not in points:
        points = points + [dflt]  # the heuristic's pick is timed whatever its load
    specs = [(p, W.render(pr, p, im2col=geo, target=SM90A)) for p in points]
    bad = compile_specs(pool, [s for _, s in specs])
    n_in = sum(1 for p in points if W.in_space(p))
    if COMPILE_ONLY:
        print(f"{label} {dt}: {len(points)} points ({n_in} in the space), {len(bad)} kernels failed to compile",
              *bad, sep="\n  ", flush=True)
        return None
    what = f"{label} {dt}"
    hang = lambda: print_table(RESULTS)  # noqa: E731
    if cpr is None:
        rows, vms, flops = gemm_rows(pool, pr, specs, pr.M, pr.N, pr.K, dt, False, 1, False, what, hang)
    else:
        rows, vms, flops = conv_rows(cpr, pr, geo, specs, what, hang)
    vendor = "cuBLAS" if cpr is None else "cuDNN"
    print(f"\n== {what} (M {pr.M}, N {pr.N}, K {pr.K}): {vendor} {vms * 1e3:.1f} us {flops / vms / 1e9:.0f} TFLOP/s",
          flush=True)
    print_rows(rows, flops, {"heuristic": dflt}, verbose=VERBOSE)
    kinds = {"split": lambda p: W.split_k(p) > 1 and not p.get("WAVES"), "split_waves": lambda p: bool(p.get("WAVES")),
             "epismem": W.epi_smem, "epishfl": W.epi_shfl, "epitma": W.epi_tma,
             "cw3": lambda p: p["CW"] == 3, "swz16": lambda p: p.get("swizzle") == W.SWIZZLE_WIDE}
    unv = {k: best(rows, lambda p, f=f: f(p) and not W.in_space(p)) for k, f in kinds.items()}
    print(f"   {what} kinds (us / vendor ratio): " + " ".join(
        f"{k} {'-' if v is None else f'{v[1] * 1e3:.1f}/{vms / v[1]:.2f}'}" for k, v in unv.items()), flush=True)
    ins, unvb = best(rows, W.in_space), best(rows, lambda p: not W.in_space(p))
    print(f"   {what} summary: {vendor} {vms * 1e3:.1f} us | " + " | ".join(
        f"{what_} {'-' if x is None else f'{x[1] * 1e3:.1f} us {vms / x[1]:.2f} {tag(x[0])}'}"
        for what_, x in (("in-space", ins), ("unverified", unvb))) + f" | {len(wrong(rows))} not ok", flush=True)
    return dict(label=label, dtype=dt, vendor=vendor, vendor_ms=vms, flops=flops, M=pr.M, N=pr.N, K=pr.K,
                in_space=ins, unverified=unvb,
                unverified_by_kind=unv, heuristic=next(((p, ms) for p, ms, _ in rows if p == dflt), None),
                n_points=len(rows), wrong=wrong(rows))


def _ms(x, vms=None):
    if not x:
        return "-", "-"
    return f"{x[1] * 1e3:.1f} us {tag(x[0])}", ("-" if vms is None else f"{vms / x[1]:.2f}")


def print_table(res: list) -> None:
    print("\n| problem | dtype | vendor us | best in-space (us, point) | vendor / in-space | best unverified "
          "(us, point) | vendor / unverified | heuristic us | wrong / points |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in res:
        if "failed" in r:
            print(f"| {r['label']} | {r['dtype']} | FAILED: {r['failed']} |")
            continue
        ins, ins_r = _ms(r["in_space"], r["vendor_ms"])
        unv, unv_r = _ms(r["unverified"], r["vendor_ms"])
        h = "-" if not r["heuristic"] or r["heuristic"][1] is None else f"{r['heuristic'][1] * 1e3:.1f}"
        print(f"| {r['label']} | {r['dtype']} | {r['vendor']} {r['vendor_ms'] * 1e3:.1f} | {ins} | {ins_r} | {unv} | "
              f"{unv_r} | {h} | {len(r['wrong'])} / {r['n_points']} |")
    for r in res:
        for t, st in r.get("wrong", [])[:3]:
            print(f"NOT OK {r['label']} {r['dtype']} {t}: {st[:160]}")


def main():
    out_json = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
    jobs = [(prob[1], dict(label=prob[1], dtype=prob[2] if prob[0] == "gemm" else "float16"),
             lambda pool, prob=prob: run(pool, prob))
            for prob in PROBLEMS if not ONLY or ONLY in prob[1]]
    run_jobs(jobs, RESULTS, COMPILE_ONLY, print_table, out_json, cudnn=True)


if __name__ == "__main__":
    main()
