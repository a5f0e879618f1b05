"""Row normalisation variants (codegen/kernels/rownorm_variants.py) on the GPU: each variant's
time and achieved GB/s (x read + y written) against a device-to-device copy of the same bytes
(cupy), CUDA events, warm-up, median; a short table at the end.

    python tools/bench_rownorm.py                      # LayerNormalization, the issue-9 shapes
    python tools/bench_rownorm.py --op Softmax --shapes 4096x768,4096x128 --dtypes f16
    python tools/bench_rownorm.py --op AddLayerNormalization --shapes 4096x768   # the fused group (T, RPB)
    python tools/bench_rownorm.py --op Add --shapes 4096x768,32768x3072           # elementwise (VEC) vs copy

Each kernel is lowered by nnc for one op with a forced (variant, params), compiled with NVRTC for
the device's arch and launched here directly (cupy), so only the kernel is timed. Also the
harness of tests/codegen/test_rownorm_variants.py (models, forced selection, direct launch).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # cuda_timing, also when imported as tools.<name>

import numpy as np  # noqa: E402

from cuda_timing import time_cuda  # noqa: E402
from nnc.codegen.variants import ForcedSelector  # noqa: E402

SHAPES = [(4096, 768), (4096, 3072), (32768, 1024), (1024, 65536)]
BINARY = ("Add", "Mul", "Sub", "Div")
ELEMENTWISE = BINARY + ("Relu", "Gelu", "Sigmoid", "Tanh", "Exp", "Neg")
DTYPES = ("f16", "f32")


def model(op: str, rows: int, R: int, dt: str, outs: int = 1):
    """One `op` over [rows, R] (axis -1) of dtype dt; LayerNormalization: scale and bias [R] of dt
    (inputs); outs = 3: Mean and InvStdDev too (f32 [rows, 1]). op "AddLayerNormalization": x + res
    then LayerNormalization, fused into one rowreduce group (fuse-reduction)."""
    from onnx import TensorProto as T
    from onnx import helper as h

    from nnc.onnx_import import import_model
    dts = {"f32": T.FLOAT, "f16": T.FLOAT16, "bf16": T.BFLOAT16}
    if op in ELEMENTWISE:  # x [rows, R] (and b [R] broadcast for a binary op): the elementwise kernel
        ins = [("x", [rows, R])] + ([("b", [R])] if op in BINARY else [])
        g = h.make_graph([h.make_node(op, [n for n, _ in ins], ["y"])], "g",
                         [h.make_tensor_value_info(n, dts[dt], s) for n, s in ins],
                         [h.make_tensor_value_info("y", dts[dt], [rows, R])])
        return import_model(h.make_model(g, opset_imports=[h.make_opsetid("", 23)], ir_version=10))
    if op == "AddLayerNormalization":
        from nnc.passes import fuse_reduction
        nodes = [h.make_node("Add", ["x", "res"], ["a"]),
                 h.make_node("LayerNormalization", ["a", "g", "b"], ["y"], axis=-1)]
        ins = [("x", [rows, R]), ("res", [rows, R]), ("g", [R]), ("b", [R])]
        g = h.make_graph(nodes, "g", [h.make_tensor_value_info(n, dts[dt], s) for n, s in ins],
                         [h.make_tensor_value_info("y", dts[dt], [rows, R])])
        m = import_model(h.make_model(g, opset_imports=[h.make_opsetid("", 23)], ir_version=10))
        assert fuse_reduction.run(m)
        return m
    ins = [("x", [rows, R])]
    if op in ("LayerNormalization", "RMSNormalization"):
        ins.append(("g", [R]))
    if op == "LayerNormalization":
        ins.append(("b", [R]))
    names = ["y", "mean", "rstd"][:outs]
    node = h.make_node(op, [n for n, _ in ins], names, axis=-1)
    outputs = [h.make_tensor_value_info("y", dts[dt], [rows, R])] + \
        [h.make_tensor_value_info(n, T.FLOAT, [rows, 1]) for n in names[1:]]
    g = h.make_graph([node], "g", [h.make_tensor_value_info(n, dts[dt], s) for n, s in ins], outputs)
    return import_model(h.make_model(g, opset_imports=[h.make_opsetid("", 23)], ir_version=10))


Forced = ForcedSelector  # the variant where it is a candidate, the heuristic elsewhere


def options(arch: str = "sm_90a"):
    from nnc.codegen.options import LowerOptions
    from nnc.codegen.target import for_arch
    return LowerOptions(for_arch(arch), "fp32", False)


def lower_forced(m, variant: str, params=None, arch: str = "sm_90a"):
    from nnc.codegen.lower import lower
    return lower(m, options(arch), selector=Forced(variant, params))


def candidates(m, arch: str = "sm_90a") -> list:
    """[(variant name, params)] to race for the one op of m: the regs variant's default and a few
    other points of its space (a warp per row, a block per row, other rows per block), the generic."""
    from nnc.codegen.lower import Lowerer, Problem, _ensure_loaded
    from nnc.codegen.variants import REGISTRY
    _ensure_loaded()
    op = next(o for o in m.main.ops if o.name != "const")
    L = Lowerer(m, options(arch))  # no buffers: applies sees the operands' types (offset 0)
    out = []
    if op.name in ELEMENTWISE:  # one kernel, no space: its time against the copy
        return [(REGISTRY[op.name][0].name, {})]
    for v in REGISTRY[op.name]:
        pr = Problem(L, op)
        if (op.name == "fused" and v.name != "fused.rowreduce") or not v.check(pr):
            continue
        space = [dict(p) for p in v.space(pr)] or [{}]
        d = dict(v.default(pr, space))
        picks = [d]
        if op.name == "fused":  # (T, RPB): the one CTA per row of before, warp rows, two-warp rows
            vec = max(p.get("VEC", 1) for p in space)
            C = int(op.results[0].type.shape[-1])
            cover = max(32, -(-(-(-C // vec)) // 32) * 32)  # one vector a thread
            for p in (space[0], {"T": 32, "RPB": 8, "VEC": 1}, {"T": 64, "RPB": 4, "VEC": 1},
                      {"T": 32, "RPB": 8, "VEC": vec}, {"T": 64, "RPB": 4, "VEC": vec}, {"T": 128, "RPB": 2, "VEC": vec},
                      {"T": cover, "RPB": 1, "VEC": vec}, {"T": cover, "RPB": 2, "VEC": vec}):
                if p in space and p not in picks:
                    picks.append(p)
        elif len(space) > 1:
            vec = d.get("VEC")
            same = [p for p in space if p.get("VEC") == vec] or space
            for p in (min(same, key=lambda p: (p["W"], -p["RPB"])), max(same, key=lambda p: (p["W"], -p["RPB"])),
                      next((p for p in same if p["W"] == d["W"] and p["RPB"] != d["RPB"]), None),
                      next((p for p in space if p.get("VEC") != vec and p["W"] == d["W"]), None)):
                if p is not None and p not in picks:
                    picks.append(p)
        out += [(v.name, p) for p in picks]
    return out


def the_launch(plan):
    """(kernel, launch) of a one-kernel plan."""
    (launch,) = [l for l in plan.launches if l.kind == "kernel"]
    return plan.kernels[launch.kernel], launch


def build(plan, arch: str = "sm_90a"):
    """A cupy function of the plan's one kernel (NVRTC cubin)."""
    import cupy as cp

    from nnc.codegen.cuda import compile_nvrtc
    from nnc.codegen.units import pieces_for, prelude
    k, launch = the_launch(plan)
    src = prelude(pieces_for([k.source])) + "\n" + k.source
    cubin = compile_nvrtc(src, arch, name=k.name + ".cu")
    d = Path(tempfile.mkdtemp(prefix="nnc_rownorm_"))
    (d / "k.cubin").write_bytes(cubin)
    return cp.RawModule(path=str(d / "k.cubin")).get_function(k.name), launch


def device_arrays(plan, feed: dict, poison: bool = True):
    """cupy arrays for the launch's buffers: inputs from feed (by name), outputs NaN-poisoned
    (bf16, which cupy lacks, as its uint16 bits)."""
    import cupy as cp
    k, launch = the_launch(plan)
    arrs = []
    for b in launch.args:
        if not hasattr(b, "dtype"):  # a Scalar (the elementwise kernels' n)
            arrs.append({"int64_t": np.int64, "int32_t": np.int32, "float": np.float32}[b.type](b.value))
            continue
        bf16 = b.dtype.short == "bf16"
        if b.kind == "input":
            host = np.ascontiguousarray(feed[b.name].astype(b.dtype.np))
            arrs.append(cp.asarray(host.view(np.uint16) if bf16 else host))
        else:
            a = cp.empty(tuple(b.shape), dtype=np.uint16 if bf16 else b.dtype.np)
            if poison:
                a.fill(0xFFFF if bf16 else np.nan)
            arrs.append(a)
    return arrs


def to_host(b, arr) -> np.ndarray:
    """A launch buffer's cupy array back as numpy of its dtype (bf16 from its bits)."""
    import cupy as cp
    h = cp.asnumpy(arr)
    return h.view(b.dtype.np) if b.dtype.short == "bf16" else h


def run(fn, launch, arrs):
    fn(tuple(launch.grid), tuple(launch.block), tuple(arrs), shared_mem=int(launch.smem))


def random_feed(m, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {a.name: (rng.standard_normal([int(d) for d in a.type.shape]) * 2 + 0.5).astype(a.type.dtype.np)
            for a in m.main.args}


def main(argv=None) -> int:
    import cupy as cp
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--op", default="LayerNormalization")
    ap.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--arch", default=None, help="default: the device's (sm_90a on an H200)")
    ap.add_argument("--iters", type=int, default=50)
    a = ap.parse_args(argv)
    arch = a.arch
    if arch is None:
        major, minor = cp.cuda.Device().compute_capability[0], cp.cuda.Device().compute_capability[1:]
        arch = f"sm_{major}{minor}" + ("a" if f"{major}{minor}" == "90" else "")
    rows_out = []
    for shape in a.shapes.split(","):
        rows, R = (int(s) for s in shape.split("x"))
        for dt in a.dtypes.split(","):
            m = model(a.op, rows, R, dt)
            feed = random_feed(m)
            _, first = the_launch(lower_forced(m, "-", None, arch))
            moved = sum(b.nbytes for b in first.args if hasattr(b, "nbytes"))  # read + written by the kernel
            nbytes = moved // 2  # the copy reads and writes as many bytes
            src = cp.empty(nbytes, dtype=cp.uint8)
            dst = cp.empty(nbytes, dtype=cp.uint8)
            t_copy = time_cuda(lambda: dst.data.copy_from_device_async(src.data, nbytes), iters=a.iters)  # cudaMemcpyAsync D2D
            copy_gbs = 2 * nbytes / t_copy / 1e6
            for vname, params in candidates(m, arch):
                try:
                    plan = lower_forced(m, vname, params, arch)
                    fn, launch = build(plan, arch)
                    arrs = device_arrays(plan, feed)
                    t = time_cuda(lambda: run(fn, launch, arrs), iters=a.iters)
                except Exception as err:  # noqa: BLE001 -- a row of the table, not the end of the run
                    print(f"{rows}x{R} {dt} {vname} {params}: FAILED {type(err).__name__}: {err}"[:300], flush=True)
                    continue
                gbs = moved / t / 1e6
                p = ",".join(f"{k}={v}" for k, v in sorted(params.items())) or "-"
                rows_out.append((f"{rows}x{R}", dt, vname.split(".")[-1], p, t * 1e3, gbs, gbs / copy_gbs,
                                 t_copy * 1e3))
                print(f"{rows}x{R} {dt} {vname} {p}: {t * 1e3:.1f} us {gbs:.0f} GB/s "
                      f"({100 * gbs / copy_gbs:.0f}% of copy {copy_gbs:.0f} GB/s)", flush=True)
    print(f"\n{'shape':>12} {'dt':>4} {'variant':<20} {'params':<18} {'us':>8} {'GB/s':>7} {'%copy':>6} {'copy us':>8}")
    for r in rows_out:
        print(f"{r[0]:>12} {r[1]:>4} {r[2]:<20} {r[3]:<18} {r[4]:>8.1f} {r[5]:>7.0f} {100 * r[6]:>5.0f}% {r[7]:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
