"""Int8 GEMM / conv kernels on the GPU: nnc's int8 tensor-core variants (codegen/kernels/intgemm_tc.py)
vs the int8 one-thread-per-output baseline (intgemm.py) vs nnc's fp16 MatMul / Conv of the same shape;
CUDA events, warm-up, median; a short table at the end; then the digits CNN end to end, int8 build
vs fp16 build (tests/models/digits).

    python tools/bench_int8.py                   # the issue-12 shapes
    python tools/bench_int8.py --shapes mm:128x768x768 --no-baseline
    python tools/bench_int8.py --dry             # render + NVRTC-compile every kernel on CPU

Each op is lowered by nnc with a forced (variant, params), compiled with NVRTC for the device's arch
and its launches run here directly (cupy) on buffers of their own, so only the kernels are timed
(the conv time includes the im2col kernel). Also the harness of tests/codegen/test_intgemm_tc.py
(one-op models, forced selection, running a plan's launches).
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

# "mm:MxKxN" / "conv:NxCxHxW:k<O>:<R>x<S>[:s<stride>][:p<pad>]"
SHAPES = ["mm:128x768x768", "mm:4096x768x3072", "conv:1x64x56x56:k64:3x3:p1", "conv:32x256x56x56:k64:1x1"]
DIGITS = Path(__file__).resolve().parents[1] / "tests" / "models" / "digits"


def parse_shape(s: str) -> dict:
    parts = s.split(":")
    if parts[0] == "mm":
        M, K, N = (int(v) for v in parts[1].split("x"))
        return dict(kind="mm", M=M, K=K, N=N)
    NB, C, H, W = (int(v) for v in parts[1].split("x"))
    d = dict(kind="conv", NB=NB, C=C, H=H, W=W, O=int(parts[2][1:]), stride=1, pad=0)
    d["R"], d["S"] = (int(v) for v in parts[3].split("x"))
    for p in parts[4:]:
        d["stride" if p[0] == "s" else "pad"] = int(p[1:])
    return d


def _np_onnx(dt):
    from onnx import TensorProto as T
    return {np.dtype(np.int8): T.INT8, np.dtype(np.uint8): T.UINT8, np.dtype(np.int32): T.INT32,
            np.dtype(np.float32): T.FLOAT, np.dtype(np.float16): T.FLOAT16}[np.dtype(dt)]


def model(shape: dict, op: str, a_u8: bool = True, zero_points: bool = True, per_channel: bool = True,
          bias: bool = True, seed: int = 0, fp16: bool = False):
    """A one-op model: op in QLinearMatMul | MatMulInteger | QLinearConv | ConvInteger (or, fp16=True,
    MatMul / Conv of the same shape in fp16). The activation is the graph input "x"; the weight
    (int8, per-channel zero points when zero_points and per_channel), scales, zero points and the
    QLinearConv bias are initializers. Scales are not powers of two (rounding ties are rare)."""
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from nnc.onnx_import import import_model
    rng = np.random.default_rng(seed)
    conv = shape["kind"] == "conv"
    if conv:
        xs = [shape["NB"], shape["C"], shape["H"], shape["W"]]
        ws = [shape["O"], shape["C"], shape["R"], shape["S"]]
        ncol = shape["O"]
        P = (shape["H"] + 2 * shape["pad"] - shape["R"]) // shape["stride"] + 1
        Q = (shape["W"] + 2 * shape["pad"] - shape["S"]) // shape["stride"] + 1
        ys = [shape["NB"], shape["O"], P, Q]
        attrs = dict(kernel_shape=[shape["R"], shape["S"]], strides=[shape["stride"]] * 2, pads=[shape["pad"]] * 4)
        K = shape["C"] * shape["R"] * shape["S"]
    else:
        xs, ws, ys = [shape["M"], shape["K"]], [shape["K"], shape["N"]], [shape["M"], shape["N"]]
        ncol, attrs, K = shape["N"], {}, shape["K"]
    inits = []

    def init(name, arr):
        inits.append(nh.from_array(np.asarray(arr), name))
        return name
    if fp16:
        w = (rng.standard_normal(ws) / np.sqrt(K)).astype(np.float16)
        ins = ["x", init("w", w)]
        node = h.make_node("Conv" if conv else "MatMul", ins, ["y"], **attrs)
        g = h.make_graph([node], "g", [h.make_tensor_value_info("x", _np_onnx(np.float16), xs)],
                         [h.make_tensor_value_info("y", _np_onnx(np.float16), ys)], inits)
        return import_model(h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10))
    adt = np.uint8 if a_u8 else np.int8
    w = rng.integers(-127, 128, ws).astype(np.int8)
    za = (np.uint8(rng.integers(100, 156)) if a_u8 else np.int8(rng.integers(-20, 20))) if zero_points \
        else adt(0)
    if zero_points and per_channel:
        zb = rng.integers(-8, 9, ncol).astype(np.int8)
    elif zero_points:
        zb = np.int8(3)
    else:
        zb = np.zeros(ncol, np.int8) if per_channel else np.int8(0)
    sa = np.float32(0.0123 + 0.001 * rng.random())
    sb = (0.002 + 0.003 * rng.random(ncol)).astype(np.float32) if per_channel else np.float32(0.00377)
    ydt = adt
    yz = (np.uint8(128) if a_u8 else np.int8(-3)) if zero_points else ydt(0)
    # an output scale that keeps the requantized values mostly inside the type's range
    sy = np.float32(float(sa) * float(np.max(sb)) * np.sqrt(K) * 127 / 48)
    ql = op.startswith("QLinear")
    if ql:
        ins = ["x", init("sa", sa), init("za", np.asarray(za)), init("w", w), init("sb", sb), init("zb", np.asarray(zb)),
               init("sy", sy), init("yz", np.asarray(yz))]
        if conv and bias:
            ins.append(init("bias", rng.integers(-2000, 2000, ncol).astype(np.int32)))
        yt = _np_onnx(ydt)
    else:
        ins = ["x", init("w", w)]
        if zero_points:
            ins += [init("za", np.asarray(za)), init("zb", np.asarray(zb))]
        yt = _np_onnx(np.int32)
    node = h.make_node(op, ins, ["y"], **attrs)
    g = h.make_graph([node], "g", [h.make_tensor_value_info("x", _np_onnx(adt), xs)],
                     [h.make_tensor_value_info("y", yt, ys)], inits)
    return import_model(h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10))


def random_feed(m, seed: int = 1) -> dict:
    """Random activations over the whole type range (never all zeros)."""
    rng = np.random.default_rng(seed)
    out = {}
    for a in m.main.args:
        dt, shp = a.type.dtype.np, [int(d) for d in a.type.shape]
        if np.dtype(dt).kind in "iu":
            info = np.iinfo(dt)
            out[a.name] = rng.integers(info.min, int(info.max) + 1, shp).astype(dt)
        else:
            out[a.name] = rng.standard_normal(shp).astype(dt)
    return out


def options(arch: str = "sm_90a", precision: str = "fp32"):
    from nnc.codegen.options import LowerOptions
    from nnc.codegen.target import for_arch
    return LowerOptions(for_arch(arch), precision, False)


def lower_forced(m, variant: str = None, params=None, arch: str = "sm_90a"):
    """The plan of m with the op's variant forced (None: the heuristic)."""
    from nnc.codegen.lower import lower
    return lower(m, options(arch), selector=None if variant is None else ForcedSelector(variant, params, strict=True))


def candidates(m, arch: str = "sm_90a") -> list:
    """[(variant name, default params)] of the non-const op of m, in the heuristic order."""
    from nnc.codegen.lower import Lowerer, Problem, _ensure_loaded
    from nnc.codegen.variants import REGISTRY
    _ensure_loaded()
    op = next(o for o in m.main.ops if o.name != "const")
    L = Lowerer(m, options(arch))
    out = []
    for v in REGISTRY[op.name]:
        pr = Problem(L, op)
        if not v.check(pr):
            continue
        space = [dict(p) for p in v.space(pr)] or [{}]
        out.append((v.name, dict(v.default(pr, space))))
    return out


def plan_source(plan) -> str:
    from nnc.codegen.units import pieces_for, prelude
    text = "\n".join(k.source for k in plan.kernels.values())
    return prelude(pieces_for([text])) + "\n" + text


def build(plan, arch: str = "sm_90a"):
    """{kernel name: cupy function} of the plan (one NVRTC program)."""
    import cupy as cp

    from nnc.codegen.cuda import compile_nvrtc
    cubin = compile_nvrtc(plan_source(plan), arch, name="int8_bench.cu")
    d = Path(tempfile.mkdtemp(prefix="nnc_int8_"))
    (d / "k.cubin").write_bytes(cubin)
    mod = cp.RawModule(path=str(d / "k.cubin"))
    return {n: mod.get_function(n) for n in plan.kernels}


def device_buffers(plan, feed: dict, poison: bool = True) -> dict:
    """buffer id -> cupy array (its own allocation): inputs from feed (by name), weights from their
    data, outputs and temps poisoned (0xA5 bytes) first."""
    import cupy as cp
    arrs = {}
    for l in plan.launches:
        for b in l.args:
            if not hasattr(b, "kind") or b.id in arrs:
                continue
            if b.alias_of is not None:
                raise NotImplementedError(f"view buffer {b.name}")
            if b.kind == "input":
                arrs[b.id] = cp.asarray(feed[b.name].astype(b.dtype.np))
            elif b.kind in ("weight", "const"):
                arrs[b.id] = cp.asarray(np.ascontiguousarray(b.data).reshape(b.shape).astype(b.dtype.np))
            else:
                a = cp.empty(tuple(b.shape), dtype=b.dtype.np)
                if poison:
                    a.view(cp.uint8).fill(0xA5)
                arrs[b.id] = a
    return arrs


def _arg(a, arrs):
    if hasattr(a, "kind"):
        return arrs[a.id]
    return {"int64_t": np.int64, "long long": np.int64, "int32_t": np.int32, "int": np.int32,
            "float": np.float32}[a.type](a.value)


def runner(plan, fns: dict, arrs: dict):
    """A function running every kernel launch of the plan in order."""
    import cupy as cp
    calls = []
    for l in plan.launches:
        if l.kind != "kernel":
            raise NotImplementedError(f"launch kind {l.kind}")
        f = fns[l.kernel]
        if l.smem > 48 * 1024:
            f.max_dynamic_shared_size_bytes = int(l.smem)
        calls.append((f, tuple(l.grid), tuple(l.block), tuple(_arg(a, arrs) for a in l.args), int(l.smem)))

    def run():
        for f, g, b, args, sm in calls:
            f(g, b, args, shared_mem=sm)
    cp.cuda.Device()  # (cupy initialised)
    return run


def output_of(plan, arrs: dict, name: str = "y"):
    import cupy as cp
    for l in plan.launches:
        for b in l.args:
            if hasattr(b, "kind") and b.kind == "output" and b.name == name:
                return cp.asnumpy(arrs[b.id]).reshape(b.shape)
    raise KeyError(name)


def gflop(shape: dict) -> float:
    if shape["kind"] == "mm":
        return 2e-9 * shape["M"] * shape["K"] * shape["N"]
    P = (shape["H"] + 2 * shape["pad"] - shape["R"]) // shape["stride"] + 1
    Q = (shape["W"] + 2 * shape["pad"] - shape["S"]) // shape["stride"] + 1
    return 2e-9 * shape["NB"] * P * Q * shape["O"] * shape["C"] * shape["R"] * shape["S"]


def _time_plan(plan, m, arch, iters, check_ref=None):
    fns = build(plan, arch)
    feed = random_feed(m)
    arrs = device_buffers(plan, feed)
    run = runner(plan, fns, arrs)
    run()
    err = ""
    if check_ref is not None:
        import cupy as cp
        cp.cuda.Device().synchronize()
        got = output_of(plan, arrs).astype(np.int64)
        d = np.abs(got - check_ref(feed).astype(np.int64))
        err = f"max|d|={int(d.max())}"
    return time_cuda(run, iters=iters), err


def digits_e2e(arch: str, iters: int, batch: int = 256):
    """(int8 ms, fp16 ms) per batch of the digits CNN through nnc.load (the whole module's run,
    device arrays in and out)."""
    import cupy as cp

    import nnc
    from nnc.calibrate import calibrate
    from nnc.driver import compile_model
    tmp = Path(tempfile.mkdtemp(prefix="nnc_digits_"))
    t = calibrate(str(DIGITS / "digits_cnn.onnx"), DIGITS / "calib.npz", "entropy")
    t.save_trt_cache(tmp / "digits.cache")
    out = {}
    for prec in ("int8", "fp16"):
        kw = dict(calib=tmp / "digits.cache") if prec == "int8" else {}
        compile_model(str(DIGITS / "digits_cnn.onnx"), tmp / prec, options=nnc.CompileOptions(
            shapes={"input": [batch, 1, 8, 8]}, precision=prec, tune=False, backend="cuda", **kw))
        m = nnc.load(tmp / prec)
        x = cp.asarray(np.random.default_rng(0).random((batch, 1, 8, 8), dtype=np.float32))
        out[prec] = time_cuda(lambda: m.run({"input": x}), iters=iters)
    return out["int8"], out["fp16"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--arch", default=None, help="default: the device's (sm_90a on an H200)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--no-baseline", action="store_true", help="skip the one-thread-per-output kernel")
    ap.add_argument("--no-e2e", action="store_true", help="skip the digits end-to-end numbers")
    ap.add_argument("--dry", action="store_true", help="render + NVRTC-compile on CPU only")
    a = ap.parse_args(argv)
    arch = a.arch
    if arch is None and not a.dry:
        import cupy as cp
        cc = cp.cuda.Device().compute_capability
        arch = f"sm_{cc}" + ("a" if cc == "90" else "")
    arch = arch or "sm_90a"
    rows = []
    from nnc.ir.interp import Interpreter
    for s in a.shapes.split(","):
        shape = parse_shape(s)
        conv = shape["kind"] == "conv"
        for op in (("QLinearConv", "ConvInteger") if conv else ("QLinearMatMul", "MatMulInteger")):
            m = model(shape, op)
            tc = "intgemm_tc.conv" if conv else "intgemm_tc.matmul"
            base = "intgemm._conv_int" if conv else "intgemm._mm_int"
            for vname in (tc,) + (() if a.no_baseline else (base,)):
                plan = lower_forced(m, vname, None, arch)
                if a.dry:
                    from nnc.codegen.cuda import compile_nvrtc
                    compile_nvrtc(plan_source(plan), arch, name="int8_dry.cu")
                    print(f"{s} {op} {vname}: compiled", flush=True)
                    continue
                ref = (lambda feed, m=m: Interpreter(m).run(feed)["y"]) if shape["M" if not conv else "NB"] <= 4096 \
                    and gflop(shape) < 200 else None
                t, err = _time_plan(plan, m, arch, a.iters, ref if vname == tc else None)
                rows.append((s, op, vname.split(".")[-1], t, gflop(shape) / t, err))
                print(f"{s} {op} {vname}: {t * 1e3:.1f} us {gflop(shape) / t:.1f} TOPS {err}", flush=True)
        m16 = model(shape, "", fp16=True)
        plan = lower_forced(m16, None, None, arch)
        names = ",".join(sorted({k.template.split(".")[0] for k in plan.kernels.values()}))
        if a.dry:
            from nnc.codegen.cuda import compile_nvrtc
            compile_nvrtc(plan_source(plan), arch, name="fp16_dry.cu")
            print(f"{s} fp16 {names}: compiled", flush=True)
        else:
            try:
                t, _ = _time_plan(plan, m16, arch, a.iters)
            except Exception as e:  # (a kernel this direct launcher cannot run: say so, go on)
                print(f"{s} fp16 {names}: not timed ({type(e).__name__}: {e})", flush=True)
                continue
            rows.append((s, "fp16", names, t, gflop(shape) / t, ""))
            print(f"{s} fp16 {names}: {t * 1e3:.1f} us", flush=True)
    if a.dry:
        return 0
    print(f"\n{'shape':<28} {'op':<14} {'kernel':<22} {'us':>9} {'TOPS':>7} check")
    for r in rows:
        print(f"{r[0]:<28} {r[1]:<14} {r[2]:<22} {r[3] * 1e3:>9.1f} {r[4]:>7.1f} {r[5]}")
    if not a.no_e2e:
        t8, t16 = digits_e2e(arch, a.iters)
        print(f"\ndigits CNN batch 256, module run: int8 {t8 * 1e3:.1f} us, fp16 {t16 * 1e3:.1f} us "
              f"(int8/fp16 {t8 / t16:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
