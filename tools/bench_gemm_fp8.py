"""The fp8 wgmma GEMM (codegen/kernels/gemm_fp8_wgmma.py) against cuBLAS on the GPU: one table.

    python tools/bench_gemm_fp8.py [--shapes 128x2304x768,...] [--iters 50] [--space]

Per M x N x K (default: BERT-base's four encoder GEMMs at batch 1 (M = 128) and 32 (M = 4096),
and 4096^3), each with a bias and an f16 result:
- nnc fp8: the heuristic's point (default_params), checked first against the interpreter's
  matmul_fp8 (ir/ops/gemm_fp8._ref; output poisoned with NaN before the launch): "rel err" is
  max |gpu - ref| / max |ref|; with --space every point of the declared space is checked and
  timed, and the fastest is shown too (point BMxBN s STAGES c consumer warp groups, "x2": two CTAs
  per SM, in the space but never the heuristic's pick until measured);
- torch fp16: torch.matmul of f16 [M, K] @ [K, N] (cuBLAS), plus the bias (torch.addmm);
- torch fp8: torch._scaled_mm(e4m3 [M, K], e4m3 [K, N] column-major, per-tensor scales, f16 out,
  bias), cuBLASLt's fp8 GEMM, where this torch has it.
Times: median of --iters launches by CUDA events (each launch timed alone, after 5 warm-up).
Nothing here is a claim until it has run on the H200.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_timing import time_cuda  # noqa: E402

BERT = [(m, n, k) for m in (128, 4096) for n, k in ((2304, 768), (768, 768), (3072, 768), (768, 3072))]
DEFAULT_SHAPES = BERT + [(4096, 4096, 4096)]


def _median_ms(launch, iters: int) -> float:
    import cupy
    for _ in range(5):
        launch()
    times = []
    for _ in range(iters):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        launch()
        b.record()
        b.synchronize()
        times.append(cupy.cuda.get_elapsed_time(a, b))
    return float(np.median(times))


_CUBINS: dict = {}


def _kernel(spec):
    from nnc.codegen.cuda import compile_nvrtc
    from nnc.codegen.kernels import common
    src = str(spec.source)
    if src not in _CUBINS:
        _CUBINS[src] = compile_nvrtc(src, "sm_90a", name=spec.name + ".cu")
    return common.load_cubin(_CUBINS[src], spec)


def _precompile(shapes, space):
    """Every kernel the table launches, compiled in parallel first (M, N, K are kernel arguments:
    shapes share sources)."""
    from nnc.codegen.cuda import Unit, compile_many
    from nnc.codegen.kernels import gemm_fp8_wgmma as F
    from nnc.codegen.target import ARCHS
    target = ARCHS["sm_90a"]
    specs = {}
    for M, N, K in shapes:
        pr = F.Fp8GemmProblem(M, N, K, has_bias=True)
        for p in (F.candidates(pr, target) if space else [F.default_params(pr, target)]):
            s = F.render_spec(pr, p, target)
            specs.setdefault(str(s.source), s)
    todo = [src for src in specs if src not in _CUBINS]
    for src, cubin in zip(todo, compile_many([Unit(specs[s].name, s, (specs[s].name,)) for s in todo], "sm_90a")):
        _CUBINS[src] = cubin


def nnc_fp8(M, N, K, iters, space, rng):
    """(rel err of the default point, its ms, (best ms, best params) over the space or None)."""
    import cupy
    from nnc.codegen import tma
    from nnc.codegen.kernels import gemm_fp8_wgmma as F
    from nnc.codegen.target import ARCHS
    from nnc.ir.ops.gemm_fp8 import MatMulFp8Attrs, _ref
    from nnc.ir.types import dtype
    import ml_dtypes
    target = ARCHS["sm_90a"]
    a = (rng.standard_normal((M, K)) * 60).clip(-440, 440).astype(ml_dtypes.float8_e4m3fn)
    b = (rng.standard_normal((K, N)) * 60).clip(-440, 440).astype(ml_dtypes.float8_e4m3fn)
    sa, sb = np.float32(0.01), (rng.random(N) * 0.001 + 1e-4).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float16)
    want = _ref(MatMulFp8Attrs(dtype("f16")), a, sa, b, sb, bias).astype(np.float32)
    pr = F.Fp8GemmProblem(M, N, K, has_bias=True)
    bufs = {"A": cupy.asarray(np.asarray(a).view(np.uint8)), "B": cupy.asarray(F.weight_nk(b).view(np.uint8)),
            "D": cupy.empty((M, N), np.float16), "bias": cupy.asarray(bias),
            "a_scale": cupy.asarray(np.asarray([sa], np.float32)), "b_scale": cupy.asarray(F.scale_vector(sb, N))}
    default = F.default_params(pr, target)
    points = [default] + ([p for p in F.candidates(pr, target) if p != default] if space else [])
    results = []
    for p in points:
        spec = F.render_spec(pr, p, target)
        fn = _kernel(spec)
        vals = tma.kernel_spec_args(spec, bufs)
        bufs["D"].fill(np.float16(np.nan))
        fn(spec.grid, spec.block, vals, shared_mem=spec.smem)
        cupy.cuda.runtime.deviceSynchronize()
        got = cupy.asnumpy(bufs["D"]).astype(np.float32)
        rel = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)) if np.all(np.isfinite(got)) else float("nan")
        ms = _median_ms(lambda: fn(spec.grid, spec.block, vals, shared_mem=spec.smem), iters)
        results.append((p, rel, ms))
    (p0, rel0, ms0) = results[0]
    best = min(results, key=lambda r: r[2] if r[1] < 2e-2 else float("inf")) if space else None
    return rel0, ms0, p0, best, a, b, sa, sb, bias


def torch_times(M, N, K, iters, a8, b8, sa, sb, bias):
    """(fp16 addmm ms, _scaled_mm ms or nan, note)."""
    import torch
    dev = "cuda"
    x = torch.randn(M, K, device=dev, dtype=torch.float16)
    w = torch.randn(K, N, device=dev, dtype=torch.float16)
    bb = torch.as_tensor(bias, device=dev)

    def ev(fn):
        return time_cuda(fn, warmup=5, iters=iters)
    t16 = ev(lambda: torch.addmm(bb, x, w))
    note, t8 = "", float("nan")
    try:
        a = torch.from_numpy(np.asarray(a8).view(np.uint8)).to(dev).view(torch.float8_e4m3fn)
        bt = torch.from_numpy(np.ascontiguousarray(np.asarray(b8).T).view(np.uint8)).to(dev).view(torch.float8_e4m3fn).t()
        s_a = torch.tensor(float(sa), device=dev)
        s_b = torch.tensor(float(np.asarray(sb).max()), device=dev)  # per tensor (cuBLASLt's scalar scales)
        torch._scaled_mm(a, bt, scale_a=s_a, scale_b=s_b, bias=bb, out_dtype=torch.float16)
        t8 = ev(lambda: torch._scaled_mm(a, bt, scale_a=s_a, scale_b=s_b, bias=bb, out_dtype=torch.float16))
    except Exception as err:  # noqa: BLE001  (an older torch, or no fp8 cuBLASLt)
        note = f"_scaled_mm: {type(err).__name__}: {str(err)[:60]}"
    return t16, t8, note


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="", help="MxNxK,... (default: BERT-base b1 / b32 and 4096^3)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--space", action="store_true", help="check and time every point of the space")
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s] or DEFAULT_SHAPES
    rng = np.random.default_rng(0)
    _precompile(shapes, args.space)
    rows = []
    head = (f"{'M x N x K':>18} {'nnc fp8 ms':>10} {'TFLOP/s':>7} {'rel err':>8} {'point':>14} "
            f"{'best ms':>8} {'best point':>14} {'torch f16':>9} {'torch fp8':>9} {'fp8/f16':>7} {'fp8/_sc':>7}")
    bad = 0
    for M, N, K in shapes:
        try:
            rel, ms, p, best, a8, b8, sa, sb, bias = nnc_fp8(M, N, K, args.iters, args.space, rng)
            try:
                t16, t8, note = torch_times(M, N, K, args.iters, a8, b8, sa, sb, bias)
            except Exception as err:  # noqa: BLE001  (no torch on this machine: nnc's numbers still count)
                t16, t8, note = float("nan"), float("nan"), f"torch: {type(err).__name__}: {str(err)[:60]}"
            pt = lambda q: f"{q['BM']}x{q['BN']}s{q['STAGES']}c{q['CW']}" + ("x2" if q.get("CTAS") == 2 else "")  # noqa: E731
            bms, bpt = (best[2], pt(best[0])) if best else (float("nan"), "-")
            tf = 2.0 * M * N * K / (ms * 1e-3) / 1e12
            bad += not rel < 2e-2
            rows.append(f"{M:>5}x{N:>5}x{K:>5} {ms:>10.4f} {tf:>7.0f} {rel:>8.1e} {pt(p):>14} {bms:>8.4f} {bpt:>14} "
                        f"{t16:>9.4f} {t8:>9.4f} {t16 / ms:>7.2f} {t8 / ms:>7.2f} {note}")
        except Exception as err:  # noqa: BLE001  one failing shape must not hide the others
            bad += 1
            rows.append(f"{M:>5}x{N:>5}x{K:>5} FAILED: {type(err).__name__}: {str(err)[:300]}")
        print(rows[-1], flush=True)
    print("\n" + head)
    print("\n".join(rows))
    print("(fp8/f16 and fp8/_sc: speedup of nnc fp8 over torch f16 addmm / torch._scaled_mm; rel err < 2e-2 is correct)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
