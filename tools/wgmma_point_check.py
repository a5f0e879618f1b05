"""The point check-and-time loop of the wgmma GPU tools (check_gemm_tma.py, check_conv_tma.py,
check_wgmma_vs_vendor.py): every point of a problem's space rendered, compiled once per distinct
kernel (NVRTC sm_90a, in parallel, shared across problems), then per point on the GPU: the output
poisoned (NaN), one launch on the inputs the caller made, checked against the caller's fp32
reference (max abs error / max |ref| < TOL), timed (tools/cuda_timing through bench_gemm_wgmma's
helpers: CUDA-graph replays of 20 launches for short problems, which also checks that a graph
captures the tensor-map parameters), and checked again after the timed runs. A wrong point is
reported with its error and never counted as a best; a launch still running after HANG_S seconds
is a hung pipeline: the caller's on_hang prints what it has, then the process exits (a hung kernel
cannot be stopped from here).

    kind_of(p), tag(p)                     the point's kind ("tma", "split", "epismem", "epishfl", "epitma",
                                           "bulk", "cp.async"; W.in_space tells an unverified cw3 or
                                           swizzle point from the space's) and its printed name
    compile_specs(pool, specs)             cubins of the specs' kernels not compiled yet (CUBINS)
    check_and_time(specs, bufs, out, err_of, graphs, what, bulk_b=None, on_hang=None) -> rows
    best(rows, pred)                       (params, ms) of the fastest ok row that pred takes
    print_rows(rows, flops, marks, kinds)  the fastest three of each kind, marked points, the odd ones
    run_jobs(jobs, rows, compile_only, print_table, out_json, cudnn)
                                           the tools' main loop (header, one compile pool, FAILED rows,
                                           total time, table, JSON)

No GPU is needed to import this or to compile (compile_specs).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))

from bench_gemm_wgmma import _compile, _graph_timed_cupy, _tag, _timed  # noqa: E402
from nnc.codegen import tma  # noqa: E402
from nnc.codegen.kernels import common, gemm_wgmma as W  # noqa: E402

TOL = 1e-2
HANG_S = 10.0
TMA_KINDS = ("tma", "split", "epismem", "epishfl", "epitma")
KINDS = TMA_KINDS + ("bulk", "cp.async")
CUBINS: dict = {}  # kernel name -> cubin (or the compile error's text), across problems


def kind_of(p: dict) -> str:
    if W.load_kind(p) == "tma":
        if W.split_k(p) > 1:
            return "split"
        return "epismem" if W.epi_smem(p) else ("epishfl" if W.epi_shfl(p) else ("epitma" if W.epi_tma(p) else "tma"))
    return "bulk" if p.get("b_bulk") else "cp.async"


def tag(p: dict) -> str:
    return (_tag(p) + (f"/split{W.split_k(p)}{'w' if p.get('WAVES') else ''}" if W.split_k(p) > 1 else "") + ("/epismem" if W.epi_smem(p) else "")
            + ("/epishfl" if W.epi_shfl(p) else "") + ("/epitma" if W.epi_tma(p) else "") + (f"/swz{p['swizzle']}" if p.get("swizzle", 8) != 8 else "")
            + ("/tma" if W.load_kind(p) == "tma" else ""))


def compile_specs(pool, specs) -> list:
    """Compiles the specs' kernels not in CUBINS (one job per distinct name); -> the names that failed."""
    uniq = {s.name: s.source for s in specs if s.name not in CUBINS}
    CUBINS.update(zip(uniq, pool.map(_compile, [(src, "sm_90a") for src in uniq.values()])))
    return sorted({s.name for s in specs if isinstance(CUBINS[s.name], str)})


def sync_or_exit(what: str, on_hang=None) -> None:
    """Waits for torch's current stream; a launch still running after HANG_S seconds is reported
    (on_hang() first: the caller's table so far) and the process exits."""
    import torch
    ev = torch.cuda.Event()
    ev.record()
    t0 = time.time()
    while not ev.query():
        if time.time() - t0 > HANG_S:
            print(f"\nHANG: {what} still running after {HANG_S:.0f} s; exiting", flush=True)
            if on_hang:
                on_hang()
            os._exit(3)
        time.sleep(1e-4)


def check_and_time(specs, bufs: dict, out, err_of, graphs: bool, what: str, bulk_b=None, on_hang=None) -> list:
    """[(params, ms or None, status)] of specs [(params, KernelSpec)] (compiled: compile_specs):
    bufs binds the kernels' pointer args by name (cupy arrays); out is the torch tensor D aliases
    (poisoned before the check launch); err_of() -> the relative error of out now; bulk_b(BN) -> the
    pre-swizzled B of a b_bulk point. Split-K points get zeroed scratch (gemm_wgmma.splitk_arrays)."""
    import torch
    cache = tma.TensorMapCache()
    rows = []
    for p, spec in specs:
        cb = CUBINS[spec.name]
        if isinstance(cb, str):
            rows.append((p, None, "COMPILE-FAIL " + cb[:300]))
            continue
        fn = common.load_cubin(cb, spec)
        bb = dict(bufs, B=bulk_b(p["BN"])) if p.get("b_bulk") else bufs
        try:
            vals = tma.kernel_spec_args(spec, {**W.splitk_arrays(spec), **bb}, cache)
        except Exception as e:  # noqa: BLE001 (an encode refusal is a result)
            rows.append((p, None, f"ENCODE-FAIL {type(e).__name__}: {e}"[:300]))
            continue

        def launch(st=None, fn=fn, spec=spec, vals=vals):
            fn(spec.grid, spec.block, vals, shared_mem=spec.smem, stream=st)
        out.fill_(float("nan"))
        try:
            launch()
            sync_or_exit(f"{what} {tag(p)}", on_hang)
        except Exception as e:  # noqa: BLE001
            rows.append((p, None, f"LAUNCH-FAIL {type(e).__name__}: {e}"[:300]))
            continue
        err = err_of()
        ok = bool(torch.isfinite(out).all().item()) and err < TOL
        ms = None
        if ok:
            ms = _graph_timed_cupy(launch) if graphs else _timed(lambda: launch(), 1)
            err2 = err_of()  # the replays (or timed runs) wrote out again: still right?
            ok = err2 < TOL and bool(torch.isfinite(out).all().item())
            if not ok:
                err = err2
        rows.append((p, ms if ok else None, f"{'ok' if ok else 'WRONG'} err={err:.1e}"))
    return rows


def best(rows: list, pred=lambda p: True):
    """(params, ms) of the fastest row whose point pred takes and that was right, or None."""
    good = [(p, ms) for p, ms, _ in rows if ms is not None and pred(p)]
    return min(good, key=lambda r: r[1]) if good else None


def wrong(rows: list) -> list:
    """[(tag, status)] of every point that was not ok (compile, encode, launch failures, wrong)."""
    return [(tag(p), st) for p, _, st in rows if not st.startswith("ok")]


def print_rows(rows: list, flops: float, marks: dict | None = None, kinds=KINDS, verbose: bool = False) -> None:
    """The fastest three ok points of each kind, the marked points (marks: label -> params) and the
    first four not ok (verbose: every row)."""
    marks = marks or {}
    shown = []
    for kind in kinds:
        shown += sorted([r for r in rows if kind_of(r[0]) == kind and r[1] is not None], key=lambda r: r[1])[:3]
    shown += [r for r in rows if any(r[0] == m for m in marks.values()) and r not in shown]
    bad = [r for r in rows if r[1] is None and r not in shown]
    shown += bad[:4]
    for p, ms, st in (rows if verbose else shown):
        t = "" if ms is None else f"{ms * 1e3:9.1f} us {flops / ms / 1e9:7.1f} TFLOP/s"
        mark = "".join(f"  ({label})" for label, m in marks.items() if p == m)
        space = "" if W.in_space(p) else "  [unverified]"
        print(f"   {kind_of(p):8s} {tag(p):34s} {t:30s} {st}{mark}{space}", flush=True)
    if len(bad) > 4 and not verbose:
        print(f"   ... and {len(bad) - 4} more points not ok", flush=True)


def run_jobs(jobs, rows: list, compile_only: bool, print_table, out_json=None, cudnn: bool = False) -> list:
    """The tools' main loop: a header naming the GPU and torch (with cuDNN's version where asked),
    then each job (what, failed_fields, fn(pool) -> result row or None) on one compile pool, its row
    appended to `rows` as it comes (the tool's RESULTS: what a hang handler prints). A job
    that raises is printed and kept as a row {**failed_fields, failed: why}: one broken problem must
    not hide the rest. Then the total time, print_table(rows) (not with compile_only) and the rows
    as JSON to out_json."""
    import json
    from concurrent.futures import ProcessPoolExecutor
    if not compile_only:
        import torch
        print(torch.cuda.get_device_name(), "torch", torch.__version__,
              *(("cudnn", torch.backends.cudnn.version()) if cudnn else ()),
              time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), flush=True)
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as pool:
        for what, failed_fields, fn in jobs:
            try:
                r = fn(pool)
                if r is not None:
                    rows.append(r)
            except Exception as e:  # noqa: BLE001 (one broken problem must not hide the rest)
                print(f"\n== {what}: FAILED {type(e).__name__}: {e}", flush=True)
                rows.append(dict(failed_fields, failed=f"{type(e).__name__}: {e}"[:200]))
    print(f"\n(total {time.time() - t0:.0f} s)")
    if not compile_only:
        print_table(rows)
    if out_json:
        with open(out_json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return rows
