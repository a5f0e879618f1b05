"""The fast MatMul/Gemm/Conv/ConvTranspose lowerings (codegen/kernels/gemm_lowering.py, conv_lowering.py):
CPU: models compile (NVRTC, sm_90) in fp32, fp32+tf32, fp16, bf16 and the plan uses the fast templates;
GPU (`gpu`): nnc.load vs the reference interpreter on fresh random inputs with poisoned outputs."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as T

from nnc.codegen.kernels import gemm_lowering
from nnc.driver import compile_model
from nnc.ir.interp import Interpreter
from nnc.onnx_import import import_model

from .cuda_models import N, mk

F = T.FLOAT
FAST = {"gemm_tc.cu.j2", "gemm_f32.cu.j2", "conv_igemm.cu.j2", "conv_direct.cu.j2", "conv_layout.cu.j2",
        "conv_im2col.cu.j2"}
SLOW = {"matmul_fallback.cu.j2", "direct_conv.cu.j2"}
# precision name -> (compile precision, tf32, tolerance)
PRECISIONS = {"fp32": ("fp32", False, 1e-3), "tf32": ("fp32", True, 3e-3), "fp16": ("fp16", False, 1e-2),
              "bf16": ("bf16", False, 1e-2)}


def _w(r, *shape, fan_in=None):
    fan_in = fan_in or (int(np.prod(shape[1:])) if len(shape) > 1 else shape[0])
    return (r.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def models():
    """name -> (onnx model, {input: shape}, expected fast templates for fp32 / for tf32+fp16+bf16)."""
    r = np.random.default_rng(7)
    M = {}
    M["matmul"] = (mk([
        N("MatMul", ["a", "wb"], ["y_const_b"]),            # [2,3,37,45] @ [45,29]
        N("MatMul", ["a4", "b3"], ["y_bcast"]),             # [3,1,33,40] @ [4,40,24] -> [3,4,33,24]
        N("MatMul", ["v", "wb"], ["y_vec"]),                # [45] @ [45,29]
        N("MatMul", ["a3", "b3b"], ["y_batched"]),          # [5,64,48] @ [5,48,72]
    ], [("a", F, [2, 3, 37, 45]), ("a4", F, [3, 1, 33, 40]), ("b3", F, [4, 40, 24]), ("v", F, [45]),
        ("a3", F, [5, 64, 48]), ("b3b", F, [5, 48, 72])],
        [("y_const_b", F), ("y_bcast", F), ("y_vec", F), ("y_batched", F)],
        [("wb", _w(r, 45, 29, fan_in=45))]), None)
    M["gemm"] = (mk([
        N("Gemm", ["x", "wt", "bias"], ["y_tb"], transB=1),                         # bias [N]
        N("Gemm", ["x", "wt", "bias"], ["y_ab"], transB=1, alpha=0.5, beta=2.0),
        N("Gemm", ["xt", "w", "cm"], ["y_ta"], transA=1, alpha=1.5, beta=-1.0),     # C [M,1]
        N("Gemm", ["x", "w"], ["y_noc"]),
        N("Gemm", ["x", "w", "cfull"], ["y_cfull"], beta=0.5),                    # C [M,N]
    ], [("x", F, [70, 96]), ("xt", F, [96, 70])],
        [("y_tb", F), ("y_ab", F), ("y_ta", F), ("y_noc", F), ("y_cfull", F)],
        [("wt", _w(r, 130, 96, fan_in=96)), ("w", _w(r, 96, 130, fan_in=96)), ("bias", _w(r, 130, fan_in=1)),
         ("cm", _w(r, 70, 1, fan_in=1)), ("cfull", _w(r, 70, 130, fan_in=1))]), None)
    convs = [  # name, cin, cout, k, attrs
        ("c3", 16, 32, 3, dict(pads=[1, 1, 1, 1])),
        ("s2", 16, 32, 3, dict(pads=[1, 1, 1, 1], strides=[2, 2])),
        ("grp", 16, 32, 3, dict(pads=[1, 1, 1, 1], group=2)),            # CG 8: igemm (fp16), tf32
        ("grp_small", 16, 16, 3, dict(pads=[1, 0, 1, 2], group=8)),      # CG 2: direct
        ("dil", 16, 24, 3, dict(pads=[2, 2, 2, 2], dilations=[2, 2])),
        ("dw", 16, 16, 3, dict(pads=[1, 1, 1, 1], group=16)),            # depthwise
        ("dw_s2", 16, 32, 5, dict(pads=[2, 2, 2, 2], group=16, strides=[2, 2])),
        ("pw", 16, 40, 1, {}),                                           # 1x1: GEMM on NCHW
        ("pw_grp", 16, 32, 1, dict(group=4)),
        ("pw_s2", 16, 24, 1, dict(strides=[2, 2])),
        ("same", 16, 8, 4, dict(auto_pad="SAME_UPPER")),
    ]
    nodes, outs, inits = [], [], []
    for name, ci, co, k, attrs in convs:
        g = attrs.get("group", 1)
        inits += [(f"w_{name}", _w(r, co, ci // g, k, k)), (f"b_{name}", _w(r, co, fan_in=1))]
        nodes.append(N("Conv", ["x", f"w_{name}", f"b_{name}"], [f"y_{name}"], **attrs))
        outs.append((f"y_{name}", F))
    inits.append(("w_stem", _w(r, 16, 3, 7, 7)))
    nodes.append(N("Conv", ["img", "w_stem"], ["y_stem"], pads=[3, 3, 3, 3], strides=[2, 2]))   # 7x7/2, C=3
    outs.append(("y_stem", F))
    inits.append(("w_1d", _w(r, 12, 8, 5)))
    nodes.append(N("Conv", ["seq", "w_1d"], ["y_1d"], pads=[2, 1]))
    outs.append(("y_1d", F))
    M["conv"] = (mk(nodes, [("x", F, [2, 16, 19, 21]), ("img", F, [2, 3, 32, 30]), ("seq", F, [2, 8, 30])], outs,
                    inits), None)
    M["convtranspose"] = (mk([
        N("ConvTranspose", ["x", "wt1", "bt1"], ["y_t1"], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
        N("ConvTranspose", ["x", "wt2"], ["y_t2"], group=2, strides=[2, 1], dilations=[1, 2]),
        N("ConvTranspose", ["x", "wt1"], ["y_t3"], strides=[2, 2], output_shape=[18, 17], auto_pad="SAME_UPPER"),
    ], [("x", F, [2, 8, 9, 9])], [("y_t1", F), ("y_t2", F), ("y_t3", F)],
        [("wt1", _w(r, 8, 6, 3, 3, fan_in=8 * 9 // 4)), ("bt1", _w(r, 6, fan_in=1)),
         ("wt2", _w(r, 8, 5, 3, 3, fan_in=4 * 9 // 2))]), None)
    return M


MODELS = models()
EXPECT = {  # templates the plan must contain, per (model, precision)
    ("matmul", "fp32"): {"gemm_f32.cu.j2"},
    ("gemm", "fp32"): {"gemm_f32.cu.j2"},
    ("conv", "fp32"): {"conv_im2col.cu.j2", "gemm_f32.cu.j2", "conv_direct.cu.j2"},
    ("convtranspose", "fp32"): {"conv_direct.cu.j2"},
}
for _p in ("tf32", "fp16", "bf16"):
    EXPECT[("matmul", _p)] = EXPECT[("gemm", _p)] = {"gemm_tc.cu.j2"}
    EXPECT[("conv", _p)] = {"conv_layout.cu.j2", "conv_igemm.cu.j2", "gemm_tc.cu.j2", "conv_direct.cu.j2"}
    EXPECT[("convtranspose", _p)] = {"conv_direct.cu.j2"}
CASES = sorted(EXPECT)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    cache = {}

    def get(name, prec):
        if (name, prec) not in cache:
            m, _ = MODELS[name]
            p, tf32, _ = PRECISIONS[prec]
            d = tmp_path_factory.mktemp(f"{name}_{prec}")
            keep, gemm_lowering.F32_MIN_CTAS = gemm_lowering.F32_MIN_CTAS, 0  # small test shapes: FFMA kernel too
            try:
                plan = compile_model(m, d, arch="sm_90", precision=p, tf32=tf32)
            finally:
                gemm_lowering.F32_MIN_CTAS = keep
            cache[(name, prec)] = (d, plan)
        return cache[(name, prec)]
    return get


@pytest.mark.parametrize("name,prec", CASES)
def test_fast_templates_compile_sm90(compiled, name, prec):
    d, plan = compiled(name, prec)
    templates = {k["template"] for k in plan["kernels"]}
    assert EXPECT[(name, prec)] <= templates, templates
    assert not templates & SLOW, templates
    assert sum((d / c["file"]).stat().st_size for c in plan["cubins"]) > 1000
    src = (d / "model.cu").read_text()
    for line in src.splitlines():  # the one jinja environment keeps preprocessor lines whole
        s = line.strip()
        assert "#pragma" not in s or s.startswith("#pragma"), line
    big = [l for l in plan["launches"] if l["kind"] == "kernel" and l["smem"] > 48 * 1024]
    for l in big:  # the host C code opts in to > 48 KiB dynamic shared memory
        assert f"smem_optin({l['kernel']}, {l['smem']})" in src


def test_decline_falls_back(tmp_path):
    """int MatMul and 3-D convs are not handled by the fast lowerings: the fallback still compiles them."""
    r = np.random.default_rng(0)
    m = mk([N("Conv", ["x", "w"], ["y"])], [("x", F, [1, 2, 5, 5, 5])], [("y", F)], [("w", _w(r, 3, 2, 3, 3, 3))])
    plan = compile_model(m, tmp_path, arch="sm_90")
    assert {k["template"] for k in plan["kernels"]} == {"direct_conv.cu.j2"}


def test_small_fp32_gemm_uses_fallback(tmp_path):
    """Strict-fp32 GEMMs too small to fill the GPU with 64x64 FFMA tiles keep the fallback; tf32 does not."""
    r = np.random.default_rng(0)
    m = mk([N("MatMul", ["x", "w"], ["y"])], [("x", F, [128, 768])], [("y", F)], [("w", _w(r, 768, 768))])
    plan = compile_model(m, tmp_path / "f32", arch="sm_90")
    assert {k["template"] for k in plan["kernels"]} == {"matmul_fallback.cu.j2"}
    plan = compile_model(m, tmp_path / "tf32", arch="sm_90", tf32=True)
    assert {k["template"] for k in plan["kernels"]} == {"gemm_tc.cu.j2"}


# ---------------------------------------------------------------- GPU

def _feed(model, rng):
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input}


@pytest.mark.gpu
@pytest.mark.parametrize("name,prec", CASES)
def test_gpu_fast_linalg_matches_interpreter(compiled, name, prec):
    import nnc
    d, plan = compiled(name, prec)
    m, _ = MODELS[name]
    tol = PRECISIONS[prec][2]
    mod = nnc.load(d)
    ref_mod = import_model(m)
    rng = np.random.default_rng()
    for _ in range(2):  # fresh inputs each run, outputs and arena poisoned
        feed = _feed(m, rng)
        ref = Interpreter(ref_mod).run(feed)
        got = mod.run(feed, output="numpy", poison=True)
        for k, rv in ref.items():
            g = np.asarray(got[k], np.float64)
            rr = np.asarray(rv, np.float64)
            assert g.shape == rr.shape, (k, g.shape, rr.shape)
            assert np.isfinite(g).all(), f"{name}/{prec}/{k}: non-finite (unwritten output?)"
            err = float(np.max(np.abs(g - rr))) / max(float(np.max(np.abs(rr))), 1e-6)
            assert err <= tol, f"{name}/{prec}/{k}: max rel err {err:.3g} > {tol}"


# ---------------------------------------------------------------- benchmark (GPU): fast lowerings vs the fallback
# python3 -m tests.codegen.test_fast_linalg   (times resnet18-like convs and BERT GEMMs through nnc.load)

def _bench_models():
    r = np.random.default_rng(1)
    convs = [("stem7x7s2", 3, 64, 7, 224, 2, 3), ("l1_3x3", 64, 64, 3, 56, 1, 1), ("l2_3x3s2", 64, 128, 3, 56, 2, 1),
             ("l2_3x3", 128, 128, 3, 28, 1, 1), ("l2_down1x1s2", 64, 128, 1, 56, 2, 0), ("l3_3x3", 256, 256, 3, 14, 1, 1),
             ("l4_3x3", 512, 512, 3, 7, 1, 1), ("pw1x1", 256, 64, 1, 56, 1, 0)]
    nb = 8
    nodes, ins, outs, inits = [], [], [], []
    for name, ci, co, k, hw, s, p in convs:
        ins.append((f"x_{name}", F, [nb, ci, hw, hw]))
        inits.append((f"w_{name}", _w(r, co, ci, k, k)))
        nodes.append(N("Conv", [f"x_{name}", f"w_{name}"], [name], pads=[p] * 4, strides=[s, s]))
        outs.append((name, F))
    conv_m = mk(nodes, ins, outs, inits)
    nodes, ins, outs, inits = [], [], [], []
    for b in (1, 8):
        for k, n in ((768, 768), (768, 3072), (3072, 768)):
            name = f"bert_b{b}_{128 * b}x{n}x{k}"
            ins.append((f"x_{name}", F, [b, 128, k]))
            inits.append((f"w_{name}", _w(r, k, n, fan_in=k)))
            nodes.append(N("MatMul", [f"x_{name}", f"w_{name}"], [name]))
            outs.append((name, F))
    gemm_m = mk(nodes, ins, outs, inits)
    return {"conv": conv_m, "gemm": gemm_m}


def _per_op_ms(mod, feed, reps=20):
    """Median device time per IR op (grouped by the op's first result name) over reps runs."""
    import re
    from collections import defaultdict
    import cupy as cp
    ins = mod._feed((feed,), {})
    outs = [cp.empty(t["shape"], np.float32) for t in mod.plan["outputs"]]
    st = cp.cuda.get_current_stream()
    labels = [re.match(r"%([\w.]+)", l["op"]).group(1) if l["op"].startswith("%") else l["op"]
              for l in mod.plan["launches"]]
    wptr, aptr = mod.weights.data.ptr, mod.arena.data.ptr
    iptr, optr = [a.data.ptr for a in ins], [a.data.ptr for a in outs]

    def ptr(region, index, off):
        return {"input": lambda: iptr[index] + off, "output": lambda: optr[index] + off,
                "weights": lambda: wptr + off}.get(region, lambda: aptr + off)()
    samples = defaultdict(list)
    for rep in range(reps + 3):
        evs = [cp.cuda.Event() for _ in range(len(mod._launches) + 1)]
        evs[0].record(st)
        for i, (kind, f, grid, block, smem, args, nbytes, _) in enumerate(mod._launches):
            vals = [np.uint64(ptr(r_, i_, o_)) if k_ == "buf" else r_ for k_, r_, i_, o_ in args]
            if kind == "kernel":
                f(grid, block, tuple(vals), shared_mem=smem)
            elif kind == "memcpy" and nbytes:
                cp.cuda.runtime.memcpyAsync(int(vals[0]), int(vals[1]), nbytes, 3, st.ptr)
            evs[i + 1].record(st)
        evs[-1].synchronize()
        if rep >= 3:
            per = defaultdict(float)
            for i, lab in enumerate(labels):
                per[lab] += cp.cuda.get_elapsed_time(evs[i], evs[i + 1])
            for k, v in per.items():
                samples[k].append(v)
    return {k: float(np.median(v)) for k, v in samples.items()}


def bench(precisions=("fp32", "tf32", "fp16"), models=("conv", "gemm")):
    import tempfile
    import nnc
    from nnc.codegen import lower as L
    L._ensure_loaded()
    fast = {op: [e for e in L.LOWERINGS[op] if e.priority > 0] for op in ("MatMul", "Gemm", "Conv")}
    rng = np.random.default_rng(0)
    for mname, m in _bench_models().items():
        if mname not in models:
            continue
        feed = _feed(m, rng)
        for prec in precisions:
            p, tf32, _ = PRECISIONS[prec]
            res = {}
            for variant in ("fast", "fallback"):
                if variant == "fallback":
                    for op in fast:
                        L.LOWERINGS[op] = [e for e in L.LOWERINGS[op] if e.priority == 0]
                try:
                    d = tempfile.mkdtemp(prefix=f"nnc_bench_{mname}_{prec}_{variant}_")
                    compile_model(m, d, precision=p, tf32=tf32)
                    res[variant] = _per_op_ms(nnc.load(d), feed)
                finally:
                    for op, es in fast.items():
                        L.LOWERINGS[op] = sorted(es + [e for e in L.LOWERINGS[op] if e.priority == 0],
                                                 key=lambda e: -e.priority)
            print(f"== {mname} {prec}: op  fast_ms  fallback_ms  speedup")
            for k in res["fast"]:
                if k.startswith("x_") or k.endswith("_cast") or "Cast" in k:
                    continue
                a, b = res["fast"][k], res["fallback"].get(k, float("nan"))
                print(f"  {k:28s} {a:8.3f} {b:9.3f} {b / a:7.1f}x")
            ta, tb = sum(res["fast"].values()), sum(res["fallback"].values())
            print(f"  {'TOTAL (incl. casts)':28s} {ta:8.3f} {tb:9.3f} {tb / ta:7.1f}x")


if __name__ == "__main__":
    import sys
    args = sys.argv[1:]
    bench(*[tuple(a.split(",")) for a in args])  # e.g. fp32,fp16 gemm
