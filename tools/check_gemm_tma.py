#!/usr/bin/env python3
"""The Hopper wgmma GEMM with TMA loads (codegen/kernels/gemm_wgmma.py, LOAD = tma) against the
same kernel with cp.async loads (and a pre-swizzled bulk B, what a weight gets) and torch.matmul
(cuBLAS), same run, same GPU: one command, a short table last.

    python3 tools/check_gemm_tma.py [--quick] [--unverified] [--verbose] [--json FILE] [--compile-only]

Per problem (fp16 and bf16; 4096^3, 8192^3, the BERT-base batch-32 GEMMs M = 4096 with (N, K) in
(2304, 768), (768, 768), (3072, 768), (768, 3072), B [K, N] row-major as an ONNX weight; two batch-1
ones (M = 128); 4096^3 with B [N, K] too; a batched and a broadcast-batched case; a ragged one, M, N, K no multiples of a tile):
every point of the declared space (TMA, cp.async, bulk B; --unverified: also the kinds not in it,
gemm_wgmma.UNVERIFIED_KINDS: TMA split-K where the grid has fewer tiles than SMs, the staged and the
shuffle-store epilogues) compiled in parallel (NVRTC sm_90a), each
run on fresh random inputs with the output poisoned (NaN) first and checked against torch's fp32
product (max abs error / max |ref| < 1e-2), then timed (tools/cuda_timing.time_cuda: warm-up, median
of CUDA events; problems under 20 GFLOP as CUDA-graph replays of 20 launches, torch too, which also
checks that a graph captures the tensor-map parameters). A wrong point is reported, never timed as
best (the loop: tools/wgmma_point_check.py). Per problem it prints the fastest three points of each kind, the picks and every point not
ok (--verbose: every point). --quick: fp16 only, no 8192^3. --compile-only: render and compile
every point on a CPU machine (no timing).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))

from bench_gemm_wgmma import _graph_timed_torch, _timed  # noqa: E402
from nnc.codegen.kernels import gemm, gemm_wgmma as W  # noqa: E402
from wgmma_point_check import best, check_and_time, compile_specs, kind_of, print_rows, run_jobs, tag, wrong  # noqa: E402
from nnc.codegen.target import ARCHS  # noqa: E402

SM90A = ARCHS["sm_90a"]
# label, M, N, K, trans_b, batch (B0, B1), B shared by the batches
PROBLEMS = [
    ("4096^3", 4096, 4096, 4096, False, (1, 1), False),
    ("4096^3 B[N,K]", 4096, 4096, 4096, True, (1, 1), False),
    ("8192^3", 8192, 8192, 8192, False, (1, 1), False),
    ("BERT b32 QKV", 4096, 2304, 768, False, (1, 1), False),
    ("BERT b32 out", 4096, 768, 768, False, (1, 1), False),
    ("BERT b32 FFN-up", 4096, 3072, 768, False, (1, 1), False),
    ("BERT b32 FFN-down", 4096, 768, 3072, False, (1, 1), False),
    ("BERT b1 QKV", 128, 2304, 768, False, (1, 1), False),
    ("BERT b1 FFN-down", 128, 768, 3072, False, (1, 1), False),
    ("batched 2x4", 1024, 1024, 1024, False, (2, 4), False),
    ("batched, B shared", 512, 768, 768, True, (1, 12), True),
    ("ragged", 1000, 999, 520, True, (1, 1), False),
]
tma_tag = tag  # (the old name)


def problem_of(M, N, K, dt, trans_b, batch, b_shared):
    nb = batch[0] * batch[1]
    if nb == 1:
        return gemm.GemmProblem(M, N, K, dtype=dt, trans_b=trans_b)
    sa = (batch[1] * M * K, M * K)
    sb = (0, 0) if b_shared else (batch[1] * N * K, N * K)
    sd = (batch[1] * M * N, M * N)
    return gemm.GemmProblem(M, N, K, dtype=dt, trans_b=trans_b, batch=batch, stride_a=sa, stride_b=sb, stride_d=sd)


COMPILE_ONLY = "--compile-only" in sys.argv
VERBOSE = "--verbose" in sys.argv  # every point's line (else the best three of each kind and the odd ones)
UNVERIFIED = "all" if "--unverified" in sys.argv else None  # None: the declared space; "all": every kind
RESULTS: list = []  # the problems done, for the table (also printed when a launch hangs)


def gemm_inputs(M, N, K, dt, trans_b, nb, b_shared):
    """Random torch inputs (fresh seed), the poisoned-later output, the fp32 reference, B as seen
    by torch.matmul."""
    import torch
    tdt = getattr(torch, dt)
    g = torch.Generator(device="cuda")
    g.manual_seed(int(time.time() * 1e3) & 0xFFFFFFFF)  # fresh inputs every run
    a = torch.empty(nb, M, K, device="cuda", dtype=tdt).uniform_(-1, 1, generator=g)
    b_shape = (1 if b_shared else nb,) + ((N, K) if trans_b else (K, N))
    b = torch.empty(*b_shape, device="cuda", dtype=tdt).uniform_(-1, 1, generator=g)
    d = torch.empty(nb, M, N, device="cuda", dtype=tdt)
    bt = b.transpose(-1, -2) if trans_b else b
    return a, b, bt, d, torch.matmul(a.float(), bt.float())


def gemm_rows(pool, pr, specs, M, N, K, dt, trans_b, nb, b_shared, what, on_hang=None):
    """(rows of check_and_time, torch ms, flops) of GemmProblem pr's specs on fresh inputs."""
    import cupy
    import torch
    a, b, bt, d, ref = gemm_inputs(M, N, K, dt, trans_b, nb, b_shared)
    flops = 2.0 * M * N * K * nb
    graphs = flops < 2e10
    swizzled = {}

    def bulk_b(BN):
        if BN not in swizzled:
            raw = b[0].view(torch.int16).cpu().numpy()
            swizzled[BN] = cupy.from_dlpack(torch.from_numpy(W.preswizzle_b(raw, trans_b, BN)).cuda().view(d.dtype))
        return swizzled[BN]
    ref_max = ref.abs().max()
    rows = check_and_time(specs, dict(A=cupy.from_dlpack(a), B=cupy.from_dlpack(b), D=cupy.from_dlpack(d)), d,
                          lambda: ((d.float() - ref).abs().max() / ref_max).item(), graphs, what, bulk_b, on_hang)
    tfn = (lambda: torch.matmul(a, bt, out=d)) if nb > 1 else (lambda: torch.matmul(a[0], bt[0], out=d[0]))
    tms = _graph_timed_torch(tfn) if graphs else _timed(tfn, 1)
    return rows, tms, flops


def run_problem(pool, label, M, N, K, trans_b, batch, b_shared, dt):
    nb = batch[0] * batch[1]
    pr = problem_of(M, N, K, dt, trans_b, batch, b_shared)
    bulk_ok = nb == 1  # a pre-swizzled B is one matrix
    space = W.candidates(pr, SM90A, b_bulk=bulk_ok, unverified=UNVERIFIED)
    tma_default = W.default_params(pr, SM90A, b_bulk=bulk_ok)
    specs = [(p, W.render(pr, p, target=SM90A)) for p in space]
    bad = compile_specs(pool, [s for _, s in specs])  # one compile per distinct kernel, across problems
    if COMPILE_ONLY:
        print(f"{label} {dt}: {len(specs)} points, {len(bad)} kernels failed to compile", *bad, sep="\n  ", flush=True)
        return None
    rows, tms, flops = gemm_rows(pool, pr, specs, M, N, K, dt, trans_b, nb, b_shared, f"{label} {dt}",
                                 lambda: print_table(RESULTS))
    print(f"\n== {label} {dt} {nb}x{M}x{N}x{K}{' B[N,K]' if trans_b else ''}: torch {tms * 1e3:.1f} us "
          f"{flops / tms / 1e9:.1f} TFLOP/s{' (graph-timed)' if flops < 2e10 else ''}", flush=True)
    tma_model = min((p for p, _, _ in rows if W.load_kind(p) == "tma" and W.in_space(p)), default=None,
                    key=lambda p: W.modelled_time(pr, p, SM90A))
    print_rows(rows, flops, {"heuristic": tma_default, "model's TMA pick": tma_model}, verbose=VERBOSE)
    # every TMA point's rate on one line (what the cost model is fitted to)
    print("   all tma TFLOP/s: " + ", ".join(f"{tag(p)[:-4]}={flops / ms / 1e9:.0f}" for p, ms, _ in rows
                                              if kind_of(p) == "tma" and ms is not None), flush=True)
    dflt = next(((p, ms) for p, ms, _ in rows if p == tma_default), None)
    tma_pick = next(((p, ms) for p, ms, _ in rows if p == tma_model), None)
    by_kind = {k: best(rows, lambda p, k=k: kind_of(p) == k and W.in_space(p)) for k in ("tma", "cp.async", "bulk")}
    return dict(label=label, dtype=dt, M=M, N=N, K=K, nb=nb, flops=flops, torch_ms=tms,
                tma=by_kind["tma"], split=best(rows, lambda p: W.load_kind(p) == "tma" and not W.in_space(p)),
                cp=by_kind["cp.async"], bulk=by_kind["bulk"], heuristic=dflt, tma_pick=tma_pick,
                n_tma=sum(1 for p, _, _ in rows if W.load_kind(p) == "tma"), wrong=wrong(rows))


def cell(r, key):
    x = r[key]
    return "-" if not x or x[1] is None else f"{r['flops'] / x[1] / 1e9:.0f} ({tma_tag(x[0])})"


def ratio(r, key):
    x = r[key]
    return "-" if not x or x[1] is None else f"{r['torch_ms'] / x[1]:.2f}"


def main():
    quick = "--quick" in sys.argv
    out_json = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
    jobs = [(f"{label} {dt}", dict(label=label, dtype=dt),
             lambda pool, a=(label, M, N, K, tb, batch, shared, dt): run_problem(pool, *a))
            for dt in (("float16",) if quick else ("float16", "bfloat16"))
            for label, M, N, K, tb, batch, shared in PROBLEMS if not (quick and label == "8192^3")]
    run_jobs(jobs, RESULTS, COMPILE_ONLY, print_table, out_json)


def print_table(res: list) -> None:
    print("\n| problem | dtype | torch TFLOP/s | TMA best | TMA / torch | TMA unverified best | unverified / torch | cp.async best "
          "| bulk-B best | best old / torch | model's TMA pick | heuristic | wrong (of which TMA) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res:
        if "failed" in r:
            print(f"| {r['label']} | {r['dtype']} | FAILED: {r['failed']} |")
            continue
        old = min((x for x in (r["cp"], r["bulk"]) if x and x[1]), key=lambda x: x[1], default=None)
        old_ratio = "-" if old is None else f"{r['torch_ms'] / old[1]:.2f}"
        n_wrong_tma = sum(1 for t, _ in r["wrong"] if t.endswith("/tma"))
        print(f"| {r['label']} {r['nb']}x{r['M']}x{r['N']}x{r['K']} | {r['dtype']} | {r['flops'] / r['torch_ms'] / 1e9:.0f} | "
              f"{cell(r, 'tma')} | {ratio(r, 'tma')} | {cell(r, 'split')} | {ratio(r, 'split')} | {cell(r, 'cp')} | "
              f"{cell(r, 'bulk')} | {old_ratio} | "
              f"{cell(r, 'tma_pick')} | {cell(r, 'heuristic')} | {len(r['wrong'])} ({n_wrong_tma} of {r['n_tma']}) |")


if __name__ == "__main__":
    main()
