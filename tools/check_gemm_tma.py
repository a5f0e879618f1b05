#!/usr/bin/env python3
"""The Hopper wgmma GEMM with TMA loads (codegen/kernels/gemm_wgmma.py, LOAD = tma) against the
same kernel with cp.async loads (and a pre-swizzled bulk B, what a weight gets) and torch.matmul
(cuBLAS), same run, same GPU: one command, a short table last.

    python3 tools/check_gemm_tma.py [--quick] [--json FILE]

Per problem (fp16 and bf16; 4096^3, 8192^3, the BERT-base batch-32 GEMMs M = 4096 with (N, K) in
(2304, 768), (768, 768), (3072, 768), (768, 3072), B [K, N] row-major as an ONNX weight; two batch-1
ones (M = 128); 4096^3 with B [N, K] too; a batched and a broadcast-batched case; a ragged one, M, N, K no multiples of a tile):
every point of the declared space (TMA, TMA split-K where the grid has fewer tiles than SMs: the
batch-1 problems, cp.async, bulk B) compiled in parallel (NVRTC sm_90a), each
run on fresh random inputs with the output poisoned (NaN) first and checked against torch's fp32
product (max abs error / max |ref| < 1e-2), then timed (tools/cuda_timing.time_cuda: warm-up, median
of CUDA events; problems under 20 GFLOP as CUDA-graph replays of 20 launches, torch too, which also
checks that a graph captures the tensor-map parameters). A wrong point is reported, never timed as
best. Per problem it prints the fastest three points of each kind, the picks and every point not
ok (--verbose: every point). --quick: fp16 only, no 8192^3. --compile-only: render and compile
every point on a CPU machine (no timing).
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))

from bench_gemm_wgmma import _compile, _graph_timed_cupy, _graph_timed_torch, _tag, _timed  # noqa: E402
from nnc.codegen import tma  # noqa: E402
from nnc.codegen.kernels import common, gemm, gemm_wgmma as W  # noqa: E402
from nnc.codegen.target import ARCHS  # noqa: E402

SM90A = ARCHS["sm_90a"]
TOL = 1e-2
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


def tma_tag(p):
    return (_tag(p) + (f"/split{W.split_k(p)}" if W.split_k(p) > 1 else "") + ("/epismem" if W.epi_smem(p) else "")
            + ("/tma" if W.load_kind(p) == "tma" else ""))


def kind_of(p):
    if W.load_kind(p) == "tma":
        return "split" if W.split_k(p) > 1 else "tma"
    return "bulk" if p.get("b_bulk") else "cp.async"


def problem_of(M, N, K, dt, trans_b, batch, b_shared):
    nb = batch[0] * batch[1]
    if nb == 1:
        return gemm.GemmProblem(M, N, K, dtype=dt, trans_b=trans_b)
    sa = (batch[1] * M * K, M * K)
    sb = (0, 0) if b_shared else (batch[1] * N * K, N * K)
    sd = (batch[1] * M * N, M * N)
    return gemm.GemmProblem(M, N, K, dtype=dt, trans_b=trans_b, batch=batch, stride_a=sa, stride_b=sb, stride_d=sd)


CUBINS: dict = {}  # kernel name -> cubin (or the compile error), across problems
COMPILE_ONLY = "--compile-only" in sys.argv
VERBOSE = "--verbose" in sys.argv  # every point's line (else the best three of each kind and the odd ones)
HANG_S = 10.0  # a launch not done after this long is a hung pipeline (an mbarrier never completing)
RESULTS: list = []  # the problems done, for the table (also printed when a launch hangs)


def sync_or_exit(what: str) -> None:
    """Waits for the current stream; a launch still running after HANG_S seconds is reported with
    the table so far, and the process exits (a hung kernel cannot be stopped from here)."""
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


def run_problem(pool, label, M, N, K, trans_b, batch, b_shared, dt):
    nb = batch[0] * batch[1]
    pr = problem_of(M, N, K, dt, trans_b, batch, b_shared)
    bulk_ok = nb == 1  # a pre-swizzled B is one matrix
    space = W.candidates(pr, SM90A, b_bulk=bulk_ok, unverified=True)  # split-K and staged-epilogue points too
    tma_default = W.default_params(pr, SM90A, b_bulk=bulk_ok)
    specs = [(p, W.render(pr, p, target=SM90A)) for p in space]
    # one compile per distinct kernel (M, N, K and strides are arguments)
    uniq = {s.name: s.source for _, s in specs if s.name not in CUBINS}
    CUBINS.update(zip(uniq, pool.map(_compile, [(src, "sm_90a") for src in uniq.values()])))
    cubins = CUBINS
    if COMPILE_ONLY:
        bad = [n for n, cb in cubins.items() if isinstance(cb, str)]
        print(f"{label} {dt}: {len(specs)} points, {len(uniq)} new kernels, {len(bad)} failed to compile", flush=True)
        return None
    import cupy
    import torch
    tdt = getattr(torch, dt)
    g = torch.Generator(device="cuda")
    g.manual_seed(int(time.time() * 1e3) & 0xFFFFFFFF)  # fresh inputs every run
    a = torch.empty(nb, M, K, device="cuda", dtype=tdt).uniform_(-1, 1, generator=g)
    b_shape = (1 if b_shared else nb,) + ((N, K) if trans_b else (K, N))
    b = torch.empty(*b_shape, device="cuda", dtype=tdt).uniform_(-1, 1, generator=g)
    d = torch.empty(nb, M, N, device="cuda", dtype=tdt)
    bt = b.transpose(-1, -2) if trans_b else b
    ref = torch.matmul(a.float(), bt.float())
    flops = 2.0 * M * N * K * nb
    graphs = flops < 2e10
    bufs = dict(A=cupy.from_dlpack(a), B=cupy.from_dlpack(b), D=cupy.from_dlpack(d))
    swizzled = {}
    cache = tma.TensorMapCache()
    rows = []
    for p, spec in specs:
        cb = cubins[spec.name]
        if isinstance(cb, str):
            rows.append((p, None, "COMPILE-FAIL " + cb[:300]))
            continue
        fn = common.load_cubin(cb, spec)
        bb = bufs
        if p.get("b_bulk"):
            if p["BN"] not in swizzled:
                raw = b[0].view(torch.int16).cpu().numpy()
                swizzled[p["BN"]] = torch.from_numpy(W.preswizzle_b(raw, trans_b, p["BN"])).cuda().view(tdt)
            bb = dict(bufs, B=cupy.from_dlpack(swizzled[p["BN"]]))
        try:
            vals = tma.kernel_spec_args(spec, {**W.splitk_arrays(spec), **bb}, cache)  # split-K: its scratch
        except Exception as e:  # noqa: BLE001 (an encode refusal is a result)
            rows.append((p, None, f"ENCODE-FAIL {type(e).__name__}: {e}"[:300]))
            continue

        def launch(st=None, fn=fn, spec=spec, vals=vals):
            fn(spec.grid, spec.block, vals, shared_mem=spec.smem, stream=st)
        d.fill_(float("nan"))
        try:
            launch()
            sync_or_exit(f"{label} {dt} {tma_tag(p)}")
        except Exception as e:  # noqa: BLE001
            rows.append((p, None, f"LAUNCH-FAIL {type(e).__name__}: {e}"[:300]))
            continue
        err = ((d.float() - ref).abs().max() / ref.abs().max()).item()
        ok = bool(torch.isfinite(d).all().item()) and err < TOL
        ms = None
        if ok:
            ms = _graph_timed_cupy(launch) if graphs else _timed(lambda: launch(), 1)
            # the graph replays (or the timed runs) wrote d again: still right?
            err2 = ((d.float() - ref).abs().max() / ref.abs().max()).item()
            ok = err2 < TOL
        rows.append((p, ms if ok else None, f"{'ok' if ok else 'WRONG'} err={err:.1e}"))
    tfn = (lambda: torch.matmul(a, bt, out=d)) if nb > 1 else (lambda: torch.matmul(a[0], bt[0], out=d[0]))
    tms = _graph_timed_torch(tfn) if graphs else _timed(tfn, 1)
    print(f"\n== {label} {dt} {nb}x{M}x{N}x{K}{' B[N,K]' if trans_b else ''}: torch {tms * 1e3:.1f} us "
          f"{flops / tms / 1e9:.1f} TFLOP/s{' (graph-timed)' if graphs else ''}", flush=True)
    tma_model = min((p for p, _, _ in rows if kind_of(p) in ("tma", "split")), default=None,
                    key=lambda p: W.modelled_time(pr, p, SM90A))
    # the fastest three of each kind, the heuristic's picks, and every point that is not ok
    shown = []
    for kind in ("tma", "split", "cp.async", "bulk"):
        shown += sorted([r for r in rows if kind_of(r[0]) == kind and r[1] is not None], key=lambda r: r[1])[:3]
    shown += [r for r in rows if (r[0] == tma_default or r[0] == tma_model) and r not in shown]
    bad = [r for r in rows if r[1] is None and r not in shown]
    shown += bad[:4]  # the first few points that are not ok (all with --verbose)
    for p, ms, st in (rows if VERBOSE else shown):
        t = "" if ms is None else f"{ms * 1e3:9.1f} us {flops / ms / 1e9:7.1f} TFLOP/s"
        mark = ("  (heuristic)" if p == tma_default else "") + ("  (model's TMA pick)" if p == tma_model else "")
        print(f"   {kind_of(p):8s} {tma_tag(p):26s} {t:30s} {st}{mark}", flush=True)
    if len(bad) > 4 and not VERBOSE:
        print(f"   ... and {len(bad) - 4} more points not ok", flush=True)
    # every TMA point's rate on one line (what the cost model is fitted to)
    print("   all tma TFLOP/s: " + ", ".join(f"{tma_tag(p)[:-4]}={flops / ms / 1e9:.0f}" for p, ms, _ in rows
                                              if kind_of(p) == "tma" and ms is not None), flush=True)

    def best(kind):
        good = [(p, ms) for p, ms, st in rows if kind_of(p) == kind and ms is not None]
        return min(good, key=lambda r: r[1]) if good else None
    dflt = next(((p, ms) for p, ms, _ in rows if p == tma_default), None)
    tma_pick = next(((p, ms) for p, ms, _ in rows if p == tma_model), None)
    return dict(label=label, dtype=dt, M=M, N=N, K=K, nb=nb, flops=flops, torch_ms=tms,
                tma=best("tma"), split=best("split"), cp=best("cp.async"), bulk=best("bulk"), heuristic=dflt,
                tma_pick=tma_pick, n_tma=sum(1 for p, _, _ in rows if kind_of(p) in ("tma", "split")),
                wrong=[(tma_tag(p), st) for p, _, st in rows if not st.startswith("ok")])


def cell(r, key):
    x = r[key]
    return "-" if not x or x[1] is None else f"{r['flops'] / x[1] / 1e9:.0f} ({tma_tag(x[0])})"


def ratio(r, key):
    x = r[key]
    return "-" if not x or x[1] is None else f"{r['torch_ms'] / x[1]:.2f}"


def main():
    quick = "--quick" in sys.argv
    out_json = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
    if not COMPILE_ONLY:
        import torch
        print(torch.cuda.get_device_name(), "torch", torch.__version__,
              time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), flush=True)
    t0 = time.time()
    res = RESULTS
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as pool:
        for dt in ("float16",) if quick else ("float16", "bfloat16"):
            for label, M, N, K, tb, batch, shared in PROBLEMS:
                if quick and label == "8192^3":
                    continue
                try:
                    r = run_problem(pool, label, M, N, K, tb, batch, shared, dt)
                    if r is not None:
                        res.append(r)
                except Exception as e:  # noqa: BLE001 (one broken problem must not hide the rest)
                    print(f"\n== {label} {dt}: FAILED {type(e).__name__}: {e}", flush=True)
                    res.append(dict(label=label, dtype=dt, failed=f"{type(e).__name__}: {e}"[:200]))
    print(f"\n(total {time.time() - t0:.0f} s)")
    print_table(res)
    if out_json:
        with open(out_json, "w") as f:
            json.dump(res, f, indent=1, default=str)


def print_table(res: list) -> None:
    print("\n| problem | dtype | torch TFLOP/s | TMA best | TMA / torch | TMA split-K best | split / torch | cp.async best "
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
