"""Weight-only int4 GEMM on the GPU (codegen/kernels/gemm_int4.py) at decoding shapes: nnc's int4
kernel (every point of a parameter subset, best reported) vs nnc's fp16 GEMM of the same MatMul
(nnc's normal lowering, heuristic choice) vs torch.matmul fp16 (cuBLAS); CUDA-event medians over
CUDA graphs of many launches, weights rotated over enough copies that the L2 cannot hold them,
GB/s against the bytes-moved bound (weights + scales + activations + output) at the device-copy
bandwidth measured in the same run. Prints a short table last.

    python tools/bench_int4.py                       # M = 1, 4, 16; K = N = 8192; groups of 32 and 128
    python tools/bench_int4.py --ms 1 --kn 4096 --blocks 128 --full
    python tools/bench_int4.py --dry                 # build + NVRTC-compile on the CPU only

Also the harness of tests/test_gemm_int4.py (one-op models, forced variants, running a plan's launches).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_int8, cuda_timing (also as tools.<name>)

import numpy as np  # noqa: E402

from bench_int8 import build, device_buffers, lower_forced, output_of, plan_source, runner  # noqa: E402,F401

L2_BYTES = 60 << 20  # H200 (the brief's figure); rotation keeps >= 2x this in the copies


def onnx_model(M, K, N, block=32, zero_points=False, act="f16", seed=0, gemm_trans_b=False, lead=None,
               bias=False, u4=False):
    """The DQ(int4) -> MatMul (Gemm transB with gemm_trans_b) model, opset 21; bias: + a constant [N]
    (MatMul -> Add, or the Gemm's C); u4: uint4 weights (and zero points around 8)."""
    import ml_dtypes
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh
    rng = np.random.default_rng(seed)
    KB = -(-K // block)
    dt, et = (np.float16, TP.FLOAT16) if act == "f16" else (np.float32, TP.FLOAT)
    q = rng.integers(0, 16, (K, N), dtype=np.int8).astype(ml_dtypes.uint4) if u4 else \
        rng.integers(-8, 8, (K, N), dtype=np.int8).astype(ml_dtypes.int4)
    s = (0.5 + rng.random((KB, N), dtype=np.float32)).astype(dt) / np.sqrt(K).astype(dt) / 4
    s = s.astype(dt)
    tr = (lambda a: np.ascontiguousarray(a.T)) if gemm_trans_b else (lambda a: a)
    inits = [nh.from_array(tr(q), "w_q"), nh.from_array(tr(s), "w_scale")]
    ins = ["w_q", "w_scale"]
    if zero_points:
        zp = rng.integers(5, 12, (KB, N), dtype=np.int8).astype(ml_dtypes.uint4) if u4 else \
            rng.integers(-3, 4, (KB, N), dtype=np.int8).astype(ml_dtypes.int4)
        inits.append(nh.from_array(tr(zp), "w_zp"))
        ins.append("w_zp")
    lead = [M] if lead is None else list(lead)
    nodes = [h.make_node("DequantizeLinear", ins, ["w"], axis=1 if gemm_trans_b else 0, block_size=block)]
    if bias:
        inits.append(nh.from_array(rng.standard_normal(N).astype(dt), "b"))
    if gemm_trans_b:
        nodes.append(h.make_node("Gemm", ["x", "w"] + (["b"] if bias else []), ["y"], transB=1))
    elif bias:
        nodes += [h.make_node("MatMul", ["x", "w"], ["xw"]), h.make_node("Add", ["xw", "b"], ["y"])]
    else:
        nodes.append(h.make_node("MatMul", ["x", "w"], ["y"]))
    g = h.make_graph(nodes, "int4", [h.make_tensor_value_info("x", et, lead + [K])],
                     [h.make_tensor_value_info("y", et, lead + [N])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)


def int4_module(M, K, N, block=32, zero_points=False, act="f16", seed=0, gemm_trans_b=False, lead=None,
                bias=False, u4=False):
    """The nnc module of onnx_model after the default passes (one matmul_int4_weight)."""
    from nnc.onnx_import import import_model
    from nnc.pipeline import run_passes
    m = import_model(onnx_model(M, K, N, block, zero_points, act, seed, gemm_trans_b, lead, bias, u4))
    run_passes(m, verify_each=True)
    return m


def fp16_module(M, K, N, seed=0):
    """MatMul(x f16 [M, K], w f16 [K, N] constant): nnc's normal fp16 lowering of the same shape."""
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from nnc.onnx_import import import_model
    from nnc.pipeline import run_passes
    w = (np.random.default_rng(seed).standard_normal((K, N), dtype=np.float32) / np.sqrt(K)).astype(np.float16)
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"])], "fp16",
                     [h.make_tensor_value_info("x", TP.FLOAT16, [M, K])],
                     [h.make_tensor_value_info("y", TP.FLOAT16, [M, N])], [nh.from_array(w, "w")])
    m = import_model(h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10))
    run_passes(m)
    return m


def options(arch="sm_90a"):
    from bench_int8 import options as o
    return o(arch)


def space_of(m, arch="sm_90a") -> list:
    """(declared space, default point, Int4Gemm) of the small_m variant for the module's op."""
    from nnc.codegen.kernels import gemm_int4 as G
    from nnc.codegen.lower import Lowerer, Problem, _ensure_loaded
    _ensure_loaded()
    op = next(o for o in m.main.ops if o.name == "matmul_int4_weight")
    pr = Problem(Lowerer(m, options(arch)), op)
    fit = G.SMALL_M.check(pr)
    if not fit:
        raise ValueError(fit.why)
    sp = G.SMALL_M.space(pr)
    return sp, G.SMALL_M.default(pr, sp), pr.memo["gemm_int4.problem"]


def random_x(m, seed=1) -> dict:
    a = m.main.args[0]
    return {a.name: np.random.default_rng(seed).standard_normal([int(d) for d in a.type.shape]).astype(a.type.dtype.np)}


def reference(m, feed):
    """y of the module's one matmul_int4_weight (no bias), as the interpreter defines it (W rounded
    once to the scale's dtype, fp32 products and sums), computed from the storage bytes: the
    interpreter's own int4 decode takes seconds at K = N = 8192."""
    from nnc.codegen.kernels.gemm_int4 import nibbles
    from nnc.ir.builder import const_value
    op = next(o for o in m.main.ops if o.name == "matmul_int4_weight")
    wq, s = (const_value(v, m.weights) for v in op.operands[1:3])
    z = const_value(op.operands[3], m.weights) if len(op.operands) > 3 and op.operands[3] is not None else None
    zero = 8 if wq.dtype.name == "int4" else 0
    u = nibbles(wq, zero).astype(np.float32)
    zz = np.float32(zero) if z is None else np.repeat(nibbles(z, zero).astype(np.float32), op.attrs.block_size, axis=0)[:u.shape[0]]
    w = ((u - zz) * np.repeat(s.astype(np.float32), op.attrs.block_size, axis=0)[:u.shape[0]]).astype(s.dtype)
    x = next(iter(feed.values()))
    return (x.astype(np.float32).reshape(-1, u.shape[0]) @ w.astype(np.float32)).astype(x.dtype)


def _arch():
    import cupy as cp
    cc = cp.cuda.Device().compute_capability
    return f"sm_{cc}" + ("a" if cc == "90" else "")


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write counted)."""
    import torch

    from cuda_timing import time_cuda
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = time_cuda(lambda: b.copy_(a), warmup=3, iters=20)
    return 2 * a.numel() / (ms * 1e-3)


def _graph_timer(launch_once, n_launch: int):
    """Median ms per launch: n_launch launches captured in one CUDA graph (cupy), timed with events;
    falls back to a plain launch loop if capture fails."""
    import cupy as cp

    from cuda_timing import time_cuda
    s = cp.cuda.Stream()
    try:
        with s:
            s.begin_capture()
            for i in range(n_launch):
                launch_once(i)
            g = s.end_capture()
        if hasattr(g, "upload"):
            g.upload(s)
        s.synchronize()
        return time_cuda(lambda: g.launch(s), warmup=3, iters=20) / n_launch, "graph"
    except Exception:  # (graph capture unsupported here: a plain loop, GPU-bound for these sizes)
        try:
            s.end_capture()
        except Exception:
            pass
        return time_cuda(lambda: [launch_once(i) for i in range(n_launch)], warmup=2, iters=10) / n_launch, "loop"


def rotated_runner(plan, fns, arrs, copies: int):
    """launch_once(i): the plan's launches on weight copy i % copies (weights duplicated on device)."""
    import cupy as cp

    from bench_int8 import _arg
    wbufs = [b for l in plan.launches for b in l.args if hasattr(b, "kind") and b.kind in ("weight", "const")]
    ids = sorted({b.id for b in wbufs})
    sets = [arrs] + [{**arrs, **{i: cp.array(arrs[i], copy=True) for i in ids}} for _ in range(copies - 1)]
    calls = []
    for a in sets:
        cl = []
        for l in plan.launches:
            f = fns[l.kernel]
            if l.smem > 48 * 1024:
                f.max_dynamic_shared_size_bytes = int(l.smem)
            cl.append((f, tuple(l.grid), tuple(l.block), tuple(_arg(x, a) for x in l.args), int(l.smem)))
        calls.append(cl)
    wbytes = sum(arrs[i].nbytes for i in ids)

    def launch_once(i):
        for f, g, b, args, sm in calls[i % copies]:
            f(g, b, args, shared_mem=sm)  # (on the current stream: the capturing one)
    return launch_once, wbytes


def copies_for(nbytes: int) -> int:
    return max(2, -(-2 * L2_BYTES // max(nbytes, 1)))


def subset(sp: list, full: bool) -> list:
    """The points timed (SPLIT = 1 only: this direct launcher runs the one GEMM launch; K-split
    CTAs are offered only for small N anyway)."""
    sp = [p for p in sp if p.get("SPLIT", 1) == 1]
    if full:
        return sp
    regs = [p for p in sp if p["PIPE"] == "regs" and p["U"] == 2 and p["KSPLIT"] in (8, 16) and p["R"] in (1, 2)]
    smem = [p for p in sp if p["PIPE"] == "smem" and p["STAGES"] in (4, 6) and p["R"] in (1, 2)]
    return regs + smem or sp


def point_sources(m, pts: list, arch: str):
    """(plan of the default point, [(kernel name, source, grid, block)] per point of pts): the plan is
    lowered once (the weight re-layout is the same for every point), each point's kernel rendered
    from the template with that plan's problem."""
    from nnc.codegen.kernels import gemm_int4 as G
    from nnc.codegen.render import render
    plan = lower_forced(m, "gemm_int4.small_m", pts[0], arch)  # (a SPLIT = 1 point: one launch)
    pr = space_of(m, arch)[2]
    out = []
    for i, p in enumerate(pts):
        name = f"nnc_gemm_int4_point{i}"
        src = str(render("gemm_int4.cu.j2", name=name, **G.kernel_params(pr, p, "matmul_int4_weight")))
        (gx, gy), threads = G.grid(pr, p)
        out.append((name, src, (gx, gy, 1), (threads, 1, 1), G.smem_bytes(pr, p)))
    return plan, out


def bench_int4(M, K, N, block, arch, full, dry, bw, n_launch=24):
    from nnc.codegen.cuda import compile_nvrtc
    from nnc.codegen.units import pieces_for, prelude
    m = int4_module(M, K, N, block)
    sp, dflt, _ = space_of(m, arch)
    pts = subset(sp, full)
    if dflt not in pts and dflt.get("SPLIT", 1) == 1:
        pts = [dflt] + pts
    t0 = time.perf_counter()
    plan, kernels = point_sources(m, pts, arch)
    text = "\n".join(k[1] for k in kernels)
    cubin = compile_nvrtc(prelude(pieces_for([text])) + "\n" + text, arch, name="int4_points.cu")
    if dry:
        print(f"int4 M={M} K={K} N={N} block={block}: {len(pts)} points lowered + compiled in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
        return []
    import tempfile

    import cupy as cp
    d = Path(tempfile.mkdtemp(prefix="nnc_int4_"))
    (d / "k.cubin").write_bytes(cubin)
    mod = cp.RawModule(path=str(d / "k.cubin"))
    feed = random_x(m)
    want = reference(m, feed).astype(np.float32)
    arrs = device_buffers(plan, feed, poison=True)
    (launch_plan,) = plan.launches
    wb = sum(b.nbytes for b in launch_plan.args if hasattr(b, "kind") and b.kind == "weight")
    out_arr = next(arrs[b.id] for b in launch_plan.args if hasattr(b, "kind") and b.kind == "output")
    rows, best = [], None
    for p, (name, _, g, blk, smem) in zip(pts, kernels):
        f = mod.get_function(name)
        if smem > 48 * 1024:
            f.max_dynamic_shared_size_bytes = int(smem)
        out_arr.view(cp.uint8).fill(0xA5)  # poisoned before each point's check
        args = tuple(arrs[b.id] for b in launch_plan.args)
        f(g, blk, args, shared_mem=smem)
        cp.cuda.Device().synchronize()
        got = cp.asnumpy(out_arr).astype(np.float32).reshape(want.shape)
        rel = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
        err = f"maxrel={rel:.1e}"
        if not rel < 1e-2:
            bad = np.abs(got - want) > 1e-2 * np.abs(want).max()
            cols = np.flatnonzero(bad.any(axis=0))
            print(f"  int4 M={M} block={block} {p}: WRONG ({err}; bad rows {np.flatnonzero(bad.any(axis=1))[:8].tolist()}, "
                  f"cols mod 16 {sorted(set((cols % 16).tolist()))})", flush=True)
            continue
        copies = copies_for(wb)
        sets = [arrs] + [{**arrs, **{b.id: cp.array(arrs[b.id], copy=True) for b in launch_plan.args
                                     if hasattr(b, "kind") and b.kind == "weight"}} for _ in range(copies - 1)]
        argsets = [tuple(a[b.id] for b in launch_plan.args) for a in sets]

        def launch(i, f=f, g=g, blk=blk, argsets=argsets, smem=smem):
            f(g, blk, argsets[i % len(argsets)], shared_mem=smem)
        ms, how = _graph_timer(launch, n_launch)
        del sets, argsets
        moved = wb + M * K * 2 + M * N * 2
        rows.append((p, ms, moved, err, how))
        if best is None or ms < best[1]:
            best = rows[-1]
    for p, ms, moved, err, how in rows:
        print(f"  int4 M={M} block={block} {p}: {ms * 1e3:.1f} us {moved / (ms * 1e-3) / 1e9:.0f} GB/s "
              f"({100 * moved / bw / (ms * 1e-3):.0f}% of copy BW) {err} {how}", flush=True)
    return [(f"nnc int4 g{block}", M, best[1], best[2], f"{best[0]} {best[3]}")] if best else []


def bench_fp16_nnc(M, K, N, arch, dry, n_launch=12):
    m = fp16_module(M, K, N)
    plan = lower_forced(m, None, None, arch)
    names = ",".join(sorted({k.template.split(".")[0] for k in plan.kernels.values()}))
    if dry:
        from nnc.codegen.cuda import compile_nvrtc
        compile_nvrtc(plan_source(plan), arch, name="fp16_dry.cu")
        print(f"fp16 nnc M={M} ({names}): compiled", flush=True)
        return []
    try:
        fns = build(plan, arch)
        arrs = device_buffers(plan, random_x(m), poison=True)
        wb = sum(b.nbytes for l in plan.launches for b in l.args if hasattr(b, "kind") and b.kind == "weight")
        launch, _ = rotated_runner(plan, fns, arrs, copies_for(wb))
        ms, how = _graph_timer(launch, n_launch)
    except Exception as e:  # (a kernel this direct launcher cannot run: say so, go on)
        print(f"fp16 nnc M={M} ({names}): not timed ({type(e).__name__}: {e})", flush=True)
        return []
    return [("nnc fp16", M, ms, wb + M * K * 2 + M * N * 2, f"{names} {how}")]


def bench_cublas(M, K, N, n_launch=12):
    import torch

    from cuda_timing import time_cuda
    nb = K * N * 2
    copies = copies_for(nb)
    ws = [torch.randn(K, N, device="cuda", dtype=torch.float16) for _ in range(copies)]
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    y = torch.empty(M, N, device="cuda", dtype=torch.float16)
    for w in ws:
        torch.matmul(x, w, out=y)
    torch.cuda.synchronize()
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(n_launch):
                torch.matmul(x, ws[i % copies], out=y)
        ms = time_cuda(g.replay, warmup=3, iters=20) / n_launch
        how = "graph"
    except Exception:
        ms = time_cuda(lambda: [torch.matmul(x, ws[i % copies], out=y) for i in range(n_launch)]) / n_launch
        how = "loop"
    return [("cuBLAS fp16", M, ms, nb + M * K * 2 + M * N * 2, how)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--kn", type=int, default=8192, help="K = N")
    ap.add_argument("--blocks", default="32,128")
    ap.add_argument("--full", action="store_true", help="every point of the int4 space (default: a subset)")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--dry", action="store_true", help="build + NVRTC-compile on the CPU only")
    a = ap.parse_args(argv)
    arch = a.arch or ("sm_90a" if a.dry else _arch())
    K = N = a.kn
    bw = 0.0 if a.dry else copy_bandwidth()
    if not a.dry:
        print(f"device copy bandwidth: {bw / 1e9:.0f} GB/s", flush=True)
    rows = []
    for M in (int(v) for v in a.ms.split(",")):
        for b in (int(v) for v in a.blocks.split(",")):
            rows += bench_int4(M, K, N, b, arch, a.full, a.dry, bw)
        rows += bench_fp16_nnc(M, K, N, arch, a.dry)
        if not a.dry:
            rows += bench_cublas(M, K, N)
    if a.dry:
        return 0
    print(f"\nK = N = {K}, weights rotated over > {2 * L2_BYTES >> 20} MB; bound = bytes / {bw / 1e9:.0f} GB/s (copy)")
    print(f"{'kernel':<16} {'M':>3} {'us':>8} {'GB/s':>7} {'%bound':>7} {'vs nnc16':>9} {'vs cuBLAS':>9}  note")
    for M in sorted({r[1] for r in rows}):
        mine = [r for r in rows if r[1] == M]
        ref16 = next((r[2] for r in mine if r[0] == "nnc fp16"), None)
        cub = next((r[2] for r in mine if r[0] == "cuBLAS fp16"), None)
        for name, _, ms, moved, note in mine:
            gbs = moved / (ms * 1e-3) / 1e9
            v16 = f"{ref16 / ms:.2f}x" if ref16 else "-"
            vcb = f"{cub / ms:.2f}x" if cub else "-"
            print(f"{name:<16} {M:>3} {ms * 1e3:>8.1f} {gbs:>7.0f} {100 * gbs * 1e9 / bw:>6.0f}% {v16:>9} {vcb:>9}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
