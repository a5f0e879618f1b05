"""2:4 sparse GEMM (issue 12): nnc's sparse kernel (codegen/kernels/gemm_sparse24.py) against nnc's
dense fp16 GEMM and cuBLAS (torch.matmul) on BERT-base's GEMM shapes, fp16, CUDA-graph timed.

    python tools/bench_sparse24.py                 # b32 (M = 4096) and b1 (M = 128) shapes, < 150 s
    python tools/bench_sparse24.py --dry           # CPU: lower + NVRTC-compile every kernel, no timing
    python tools/bench_sparse24.py --shapes 8192x8192x8192 --full   # the whole declared space of a shape

Every sparse point is checked first (outputs poisoned, against the decompressed weight's fp32 product,
rel 1e-2) and a wrong point is reported, never timed. The last lines are the table: ms and TFLOP/s
(dense-equivalent 2MKN flops) per row, and the sparse kernel's speed-up over nnc dense and cuBLAS.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

BERT_SHAPES = [(4096, 768, 3072), (4096, 3072, 768), (4096, 768, 2304), (128, 768, 3072), (128, 3072, 768),
               (128, 768, 2304)]  # (M, K, N): FFN up, FFN down, stacked QKV; b32 x s128 and b1 x s128


def random_sparse24(K: int, N: int, seed: int = 0, dtype=np.float16) -> np.ndarray:
    """W [K, N] with exactly 2 non-zeros (random positions, N(0, 1/K) values) in each group of 4 along K."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((K, N), dtype=np.float32) * np.float32(np.sqrt(2.0 / K)))
    g = w.reshape(K // 4, 4, N)
    order = np.argsort(rng.random(g.shape), axis=1)
    keep = np.zeros(g.shape, bool)
    np.put_along_axis(keep, order[:, :2], True, axis=1)
    return np.where(keep, g, 0).reshape(K, N).astype(dtype)


def matmul_model(M: int, K: int, N: int, w: np.ndarray, bias=None, relu=False, dt="f16", lead=None, gelu=None):
    """ONNX MatMul(x [.., M, K], W) [+ bias] [-> Relu | Gelu(approximate=gelu)] with W a constant initializer."""
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh
    et = {"f16": TP.FLOAT16, "f32": TP.FLOAT}[dt]
    npdt = {"f16": np.float16, "f32": np.float32}[dt]
    act = relu or gelu is not None
    nodes, inits, out = [h.make_node("MatMul", ["x", "w"], ["xw" if bias is not None or act else "y"])], \
        [nh.from_array(w.astype(npdt), "w")], "xw"
    if bias is not None:
        nodes.append(h.make_node("Add", ["xw", "b"], ["xb" if act else "y"]))
        inits.append(nh.from_array(bias.astype(npdt), "b"))
        out = "xb"
    if relu:
        nodes.append(h.make_node("Relu", [out], ["y"]))
    elif gelu is not None:
        nodes.append(h.make_node("Gelu", [out], ["y"], approximate=gelu))
    shape = list(lead or []) + [M, K]
    g = h.make_graph(nodes, "sparse24", [h.make_tensor_value_info("x", et, shape)],
                     [h.make_tensor_value_info("y", et, shape[:-1] + [N])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)


def sparse_module(M, K, N, seed=0, bias=False, relu=False, dt="f16", lead=None, mode="enable", precision=None,
                  gelu=None):
    """The imported model after the default passes with --sparsity MODE (and to-bf16 for dt "bf16")."""
    from nnc.driver import pipeline_passes
    from nnc.onnx_import import import_model
    from nnc.pipeline import Pipeline
    w = random_sparse24(K, N, seed, np.float32)
    b = np.random.default_rng(seed + 1).standard_normal(N).astype(np.float32) if bias else None
    m = import_model(matmul_model(M, K, N, w, b, relu, "f32" if dt == "bf16" else dt, lead, gelu))
    prec = precision or ("bf16" if dt == "bf16" else "fp32")
    Pipeline(pipeline_passes(prec, sparsity=mode), verify_each=True).run(m)
    return m


def random_x(m, seed=1) -> dict:
    a = m.main.args[0]
    return {a.name: np.random.default_rng(seed).standard_normal([int(d) for d in a.type.shape]).astype(a.type.dtype.np)}


def _op(m):
    return next(o for o in m.main.ops if o.name == "matmul_sparse24")


def problem_of(m, arch="sm_90a"):
    from bench_int8 import options
    from nnc.codegen.lower import Lowerer, Problem, _ensure_loaded
    _ensure_loaded()
    return Problem(Lowerer(m, options(arch)), _op(m))


def reference(m, feed, step=None):
    """y as the interpreter defines it (fp32 products of the decompressed weight), without the
    interpreter's per-op overhead; step: only every step-th row of x folded to [M, K] (a check of a
    large shape that costs seconds, not minutes, on the CPU)."""
    from nnc.ir.builder import const_value
    from nnc.ir.ops.gemm_sparse24 import decompress
    op = _op(m)
    v, meta = (const_value(o, m.weights) for o in op.operands[1:3])
    w = decompress(v, meta).astype(np.float32)
    x = next(iter(feed.values())).astype(op.operands[0].type.dtype.np)  # (a bf16 build casts its f32 input)
    x2 = x.reshape(-1, w.shape[0])
    y = x2[::step or 1].astype(np.float32) @ w
    if len(op.operands) > 3 and op.operands[3] is not None:
        y = y + const_value(op.operands[3], m.weights).astype(np.float32)
    if op.attrs.activation == "relu":
        y = np.maximum(y, 0)
    elif op.attrs.activation in ("gelu", "gelu_tanh"):
        from nnc.ir.ops.elementwise import GeluAttrs, _gelu
        y = _gelu(GeluAttrs("tanh" if op.attrs.activation == "gelu_tanh" else "none"), y)
    return (y.reshape(x.shape[:-1] + (w.shape[1],)) if step is None else y).astype(x.dtype)


def point_plans(m, pts, arch, variant="gemm_sparse24.mma"):
    from bench_int8 import lower_forced
    out = []
    for i, p in enumerate(pts):
        plan = lower_forced(m, variant, p, arch)
        names = {k.name: f"{k.name}_{variant[14:]}{i}" for k in plan.kernels.values()}
        srcs = [k.source.replace(k.name, names[k.name]) for k in plan.kernels.values()]
        out.append((p, plan, names, srcs))
    return out


def compile_points(plans, arch, tag="sparse24"):
    from nnc.codegen.cuda import compile_nvrtc
    from nnc.codegen.units import pieces_for, prelude
    text = "\n".join(s for *_, srcs in plans for s in srcs)
    return compile_nvrtc(prelude(pieces_for([text])) + "\n" + text, arch, name=f"{tag}.cu")


def _graph_ms(launch, n=10):
    from bench_int4 import _graph_timer
    return _graph_timer(lambda i: launch(), n)


def _bench_points(M, K, N):
    """({variant: pick(space, default) -> points}, {variant: Variant}): the heuristic default of each
    variant, a few neighbouring tiles at its K split, and the default tile at the other K splits."""
    from nnc.codegen.kernels import gemm_sparse24 as G

    def around(tile_of, tiles):
        def pick(sp, d):
            near = [p for p in sp if p != d and p["SPLIT"] == d["SPLIT"] and tile_of(p) in tiles]
            other = [p for p in sp if p != d and tile_of(p) == tile_of(d) and p["SPLIT"] != d["SPLIT"]]
            return [d] + near + other
        return pick
    mma_tile = lambda p: (p["BN"], p["BM"], p["WN"], p["WM"], p["STAGES"])  # noqa: E731
    wg_tile = lambda p: (p["WG"], p["TPW"], p["BM"], p["STAGES"], p["KPER"])  # noqa: E731
    return {
        "gemm_sparse24.mma": around(mma_tile, [(128, 64, 2, 2, 3), (64, 64, 2, 2, 3), (128, 128, 2, 4, 3), (128, 128, 2, 2, 4)]),
        "gemm_sparse24.wgmma": around(wg_tile, [(2, 1, 128, 4, 1), (2, 1, 256, 4, 1), (1, 1, 128, 4, 1),
                                                (2, 1, 128, 4, 2), (2, 1, 256, 4, 2), (1, 1, 64, 4, 2),
                                                (2, 2, 128, 4, 1), (2, 2, 128, 4, 2), (1, 2, 128, 4, 2)]),
    }, {"gemm_sparse24.mma": G.MMA_SP, "gemm_sparse24.wgmma": G.WGMMA_SP}


def bench_sparse(M, K, N, arch, full, dry):
    """Rows ("nnc sp24 <variant>", best ms, point) of each sparse variant that applies; every point
    checked (poisoned outputs against the fp32 reference on a row sample) before it is timed."""
    import bench_int8 as B
    m = sparse_module(M, K, N, seed=M + N)
    pr = problem_of(m, arch)
    picks, variants = _bench_points(M, K, N)
    rows, feed, want, step = [], None, None, None
    for vname, v in variants.items():
        fit = v.check(pr)
        if not fit:
            print(f"  {vname} {M}x{K}x{N}: does not apply ({fit.why})", flush=True)
            continue
        sp = v.space(pr)
        dflt = v.default(pr, sp)
        pts = sp if full else picks[vname](sp, dflt)
        t0 = time.perf_counter()
        plans = point_plans(m, pts, arch, vname)
        cubin = compile_points(plans, arch, tag=vname[14:])
        if dry:
            print(f"{vname} {M}x{K}x{N}: {len(pts)} points lowered + compiled in {time.perf_counter() - t0:.1f}s",
                  flush=True)
            continue
        import cupy as cp
        d = Path(tempfile.mkdtemp(prefix="nnc_sp24_"))
        (d / "k.cubin").write_bytes(cubin)
        mod = cp.RawModule(path=str(d / "k.cubin"))
        if feed is None:
            feed = random_x(m)
            step = M // 512 if M > 1024 else None  # (every row of every CTA's M tile is sampled: step < BM)
            want = reference(m, feed, step).astype(np.float32)
        best = None
        for p, plan, names, _ in plans:
            try:
                arrs = B.device_buffers(plan, feed, poison=True)
                run = B.runner(plan, {n: mod.get_function(u) for n, u in names.items()}, arrs)
                run()
                cp.cuda.Device().synchronize()
            except Exception as e:  # (a launch failure: report the point, go on)
                print(f"  {vname} {M}x{K}x{N} {p}: FAILED ({type(e).__name__}: {e})", flush=True)
                continue
            got = B.output_of(plan, arrs).astype(np.float32).reshape(-1, N)[::step or 1].reshape(want.shape)
            rel = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
            if not (np.all(np.isfinite(got)) and rel < 1e-2):
                print(f"  {vname} {M}x{K}x{N} {p}: WRONG (maxrel {rel:.2e})", flush=True)
                continue
            ms, how = _graph_ms(run)
            print(f"  {vname} {M}x{K}x{N} {p}: {ms:.4f} ms maxrel {rel:.1e} {how}{' (default)' if p == dflt else ''}",
                  flush=True)
            if best is None or ms < best[0]:
                best = (ms, p)
        if best is not None:
            rows.append((f"sp24 {vname[14:]}", best[0], str(best[1])))
    return rows


def bench_dense_build(M, K, N, arch):
    """nnc's own fp16 build of MatMul(x, W dense) (nnc.compile, the heuristic's kernels, TMA wgmma
    included), its launches captured in a torch CUDA graph: ("nnc dense fp16", ms, kernels)."""
    import shutil

    import cupy as cp
    import torch

    import nnc
    from bench_attention import time_graph
    w = (np.random.default_rng(M + K).standard_normal((K, N), dtype=np.float32) / np.sqrt(K)).astype(np.float16)
    od = Path(tempfile.mkdtemp(prefix="nnc_sp24_dense_")) / "o"
    try:
        nnc.compile(matmul_model(M, K, N, w), out=od, options=nnc.CompileOptions(arch=arch, tune=False))
        m = nnc.load(od, cuda_graph=False)
        import json
        kernels = ",".join(sorted({k["template"].split(".")[0] for k in json.loads((od / "plan.json").read_text())["kernels"]}))
        x = cp.asarray(np.random.default_rng(1).standard_normal((M, K)).astype(np.float16))
        y = cp.empty((M, N), cp.float16)
        ms = time_graph(lambda: m.run({"x": x}, out={"y": y}, stream=torch.cuda.current_stream().cuda_stream), 10, 50)
        return [] if ms is None else [("nnc dense fp16", ms, f"{kernels} (nnc.compile build, graph)")]
    finally:
        shutil.rmtree(od.parent, ignore_errors=True)


def bench_dense_nnc(M, K, N, arch, dry):
    import bench_int8 as B
    from bench_int4 import fp16_module
    m = fp16_module(M, K, N)
    plan = B.lower_forced(m, None, None, arch)
    names = ",".join(sorted({k.template.split(".")[0] for k in plan.kernels.values()}))
    if dry:
        from nnc.codegen.cuda import compile_nvrtc
        compile_nvrtc(B.plan_source(plan), arch, name="dense_dry.cu")
        return []
    try:
        return bench_dense_build(M, K, N, arch)
    except Exception as e:  # (then the plan's kernels launched directly, below)
        print(f"  dense nnc {M}x{K}x{N} build: not timed ({type(e).__name__}: {e})"[:300], flush=True)
    try:
        arrs = B.device_buffers(plan, random_x(m), poison=True)
        run = B.runner(plan, B.build(plan, arch), arrs)
        ms, how = _graph_ms(run)
    except Exception as e:  # (a kernel this direct launcher cannot run, e.g. TMA maps: say so, go on)
        print(f"  dense nnc {M}x{K}x{N} ({names}): not timed ({type(e).__name__}: {e})", flush=True)
        # the mma.sync GEMM family then (its launches take no tensor maps)
        try:
            plan = B.lower_forced(m, "gemm.matmul", None, arch)
            arrs = B.device_buffers(plan, random_x(m), poison=True)
            run = B.runner(plan, B.build(plan, arch), arrs)
            ms, how = _graph_ms(run)
            names = "gemm.matmul (mma.sync; forced)"
        except Exception as e2:
            print(f"  dense nnc {M}x{K}x{N} gemm.matmul: not timed ({type(e2).__name__}: {e2})", flush=True)
            return []
    return [("nnc dense fp16", ms, f"{names} {how}")]


def bench_cublas(M, K, N):
    import torch

    from cuda_timing import time_cuda
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    w = torch.randn(K, N, device="cuda", dtype=torch.float16)
    y = torch.empty(M, N, device="cuda", dtype=torch.float16)
    torch.matmul(x, w, out=y)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            torch.matmul(x, w, out=y)
    return [("cuBLAS fp16", time_cuda(g.replay, warmup=3, iters=20) / 10, "torch.matmul graph")]


def parse_shape(s: str):
    a = [int(v) for v in s.lower().split("x")]
    if len(a) != 3:
        raise argparse.ArgumentTypeError(f"shape {s!r} is not MxKxN")
    return tuple(a)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", type=parse_shape, nargs="*", default=BERT_SHAPES, help="MxKxN ...")
    ap.add_argument("--arch", default=None, help="default: the GPU's (sm_90a on an H100/H200), sm_90a with --dry")
    ap.add_argument("--full", action="store_true", help="every declared space point (slow)")
    ap.add_argument("--dry", action="store_true", help="lower and compile only (no GPU)")
    args = ap.parse_args(argv)
    if args.arch is None:
        if args.dry:
            args.arch = "sm_90a"
        else:
            from bench_int4 import _arch
            args.arch = _arch()
    t0 = time.perf_counter()
    table = []
    for M, K, N in args.shapes:
        rows = bench_sparse(M, K, N, args.arch, args.full, args.dry)
        rows += bench_dense_nnc(M, K, N, args.arch, args.dry)
        if not args.dry:
            rows += bench_cublas(M, K, N)
        table.append(((M, K, N), rows))
    if args.dry:
        print(f"dry run: {len(args.shapes)} shapes compiled in {time.perf_counter() - t0:.0f}s")
        return 0
    print(f"\n2:4 sparse fp16 GEMM vs dense ({args.arch}, {time.perf_counter() - t0:.0f}s)")
    print(f"{'M x K x N':>18} {'kernel':>15} {'ms':>8} {'TFLOP/s':>8} {'best sparse is':>15}  note")
    for (M, K, N), rows in table:
        sp = min((r[1] for r in rows if r[0].startswith("sp24")), default=None)
        for name, ms, note in rows:
            tf = 2 * M * K * N / (ms * 1e-3) / 1e12
            sx = f"{ms / sp:.2f}x" if sp and not name.startswith("sp24") else ""
            print(f"{f'{M}x{K}x{N}':>18} {name:>15} {ms:8.4f} {tf:8.1f} {sx:>15}  {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
