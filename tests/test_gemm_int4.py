"""Weight-only int4 (issue 12): the matmul_int4_weight op (ir/ops/gemm_int4.py), fold-qdq's
MatMul/Gemm(DQ(int4)) fold, `--weights int4` (compiler/passes/quantize_weights_int4.py) and the
kernel family (codegen/kernels/gemm_int4.py, templates/gemm_int4.cu.j2).
CPU: golden IR of the folds; the interpreter against onnxruntime (graph optimisations off: its
MatMulNBits fusion rounds differently) for f32 / f16 models at M = 1, 7, 16 and a ragged K; the
compile-time layouts decoded as the kernel does (the PTX m16n8k16 fragment map, the nibble-pair
trick) give the interpreter's dequantized weight bit for bit; NVRTC sm_90a compile of every space
point (f16 / bf16, zero points, ragged shapes); M > 16 falls back to dequantize + the GEMM family.
GPU: the kernel against the interpreter on fresh inputs, outputs poisoned first (fp16 rel 1e-2)."""
from __future__ import annotations

import numpy as np
import pytest

from nnc.ir import print_module
from nnc.ir.interp import Interpreter
from tools.bench_int4 import int4_module, onnx_model, random_x

ort = pytest.importorskip("onnxruntime")


def _ort(model, feed):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _ops(m):
    return [o.name for o in m.main.ops if o.name != "const"]


# ---------------------------------------------------------------- folds (golden IR)

def test_fold_matmul_dq_int4_golden():
    m = int4_module(1, 256, 384, 64, zero_points=True)
    text = print_module(m)
    assert "%y = matmul_int4_weight(%x, %w_q, %w_scale, %w_zp) {block_size = 64} : f16[1,384]" in text, text
    assert _ops(m) == ["matmul_int4_weight"]
    assert "%w_q = const() {weight = \"w_q\"} : i4[256,384]" in text
    assert "%w_scale = const() {weight = \"w_scale\"} : f16[4,384]" in text


def test_fold_gemm_trans_b_golden():
    m = int4_module(4, 256, 384, 32, act="f32", gemm_trans_b=True)
    text = print_module(m)
    assert "matmul_int4_weight(%x, %y_w_int4, %y_w_scale) {block_size = 32} : f32[4,384]" in text, text
    assert "i4[256,384]" in text and "f32[8,384]" in text  # transB folded: w_q [K, N]


def test_fold_bias_into_the_op_golden():
    m = int4_module(2, 256, 384, 32, bias=True)  # MatMul -> Add(b [N])
    text = print_module(m)
    assert _ops(m) == ["matmul_int4_weight"], text
    assert "%y = matmul_int4_weight(%x, %w_q, %w_scale, none, %xw_bias) {block_size = 32} : f16[2,384]" in text, text
    g = int4_module(2, 256, 384, 32, zero_points=True, act="f32", gemm_trans_b=True, bias=True)  # Gemm's C
    assert _ops(g) == ["matmul_int4_weight"] and "%y_w_zero_point, %y_bias)" in print_module(g), print_module(g)


@pytest.mark.parametrize("zp", [False, True])
def test_uint4_matches_onnxruntime_and_its_layout_decodes(zp):
    """uint4 weights (onnxruntime's QDQ int4 quantizer writes uint4 with zero points): interpreter
    vs onnxruntime, and the kernel layout (u = q, zero 0 or the zero points) bit for bit."""
    from nnc.codegen.kernels import gemm_int4 as G
    from nnc.ir.ops.gemm_int4 import dequantized_weight
    model = onnx_model(3, 256, 304, 32, zp, "f16", seed=4, u4=True)
    m = int4_module(3, 256, 304, 32, zp, "f16", seed=4, u4=True)
    assert _ops(m) == ["matmul_int4_weight"] and "u4[256,304]" in print_module(m)
    feed = random_x(m, seed=5)
    got = Interpreter(m).run(feed)["y"].astype(np.float32)
    want = _ort(model, feed).astype(np.float32)
    assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()
    pr = _problem(m)
    assert G.SMALL_M.check(pr)
    p = pr.memo["gemm_int4.problem"]
    assert p.zero == 0
    wq, s, z = pr.value(1), pr.value(2), pr.value(3) if zp else None
    zs = G.pack_groups(G.nibbles(z, p.zero).astype(np.float32) + G.ACT["f16"][1], p, s.dtype) if zp else None
    dec = _decode(G.pack_weight(G.nibbles(wq, p.zero), p), p, G.pack_groups(s, p, s.dtype), zs, s.dtype)
    np.testing.assert_array_equal(dec[:256, :304], dequantized_weight(pr.op.attrs, wq, s, z).astype(np.float32))


def test_small_dq_is_folded_to_a_float_constant_first():
    """<= 65536 weights: fold-constants evaluates the DQ; the MatMul stays a float MatMul."""
    m = int4_module(1, 64, 64, 32)
    assert _ops(m) == ["MatMul"]


# ---------------------------------------------------------------- interpreter vs onnxruntime

@pytest.mark.parametrize("M", [1, 7, 16])
@pytest.mark.parametrize("act,zp,trans,bias", [("f32", False, False, False), ("f32", True, True, True),
                                               ("f16", True, False, False), ("f32", False, False, True)])
def test_interpreter_matches_onnxruntime(M, act, zp, trans, bias):
    K, N, bs = (200, 384, 32) if M == 7 else (256, 320, 64)  # M = 7: ragged K (not a multiple of 64)
    model = onnx_model(M, K, N, bs, zp, act, seed=M, gemm_trans_b=trans, bias=bias)
    m = int4_module(M, K, N, bs, zp, act, seed=M, gemm_trans_b=trans, bias=bias)
    assert _ops(m) == ["matmul_int4_weight"]
    feed = random_x(m, seed=3)
    got = Interpreter(m).run(feed)["y"].astype(np.float32)
    want = _ort(model, feed).astype(np.float32)
    tol = 1e-5 if act == "f32" else 2e-3
    assert np.abs(got - want).max() <= tol * np.abs(want).max(), np.abs(got - want).max()


# ---------------------------------------------------------------- --weights int4

def _float_mm(K=256, N=384, M=4, seed=0, gemm=False):
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N, K) if gemm else (K, N)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    node = h.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, beta=0.5) if gemm else h.make_node("MatMul", ["x", "w"], ["y"])
    g = h.make_graph([node], "g", [h.make_tensor_value_info("x", TP.FLOAT, [M, K])],
                     [h.make_tensor_value_info("y", TP.FLOAT, [M, N])],
                     [nh.from_array(w, "w")] + ([nh.from_array(b, "b")] if gemm else []))
    return h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("block,bound", [(32, 0.095), (64, 0.104), (128, 0.112)])
def test_weights_int4_quantizes_and_documents_its_error(tmp_path, block, bound):
    import nnc
    model = _float_mm(K=512, N=256)
    ref = nnc.compile(model, backend="reference")
    q = nnc.compile(model, options=nnc.CompileOptions(backend="reference", weights="int4", int4_block=block))
    x = np.random.default_rng(5).standard_normal((4, 512)).astype(np.float32)
    a, b = ref(x), q(x)
    rel = float(np.linalg.norm(b - a) / np.linalg.norm(a))
    print(f"--weights int4 --int4-block {block}: output rel L2 error {rel:.4f}")
    assert 0.05 < rel < bound, rel  # the pass docstring's figures: ~8.7% / 9.5% / 10.2%


def test_weights_int4_pass_golden_gemm_bias():
    from nnc.driver import pipeline_passes
    from nnc.onnx_import import import_model
    from nnc.pipeline import Pipeline
    m = import_model(_float_mm(K=128, N=96, gemm=True))
    ref = Interpreter(import_model(_float_mm(K=128, N=96, gemm=True)))
    Pipeline(pipeline_passes("fp16", int4_block=32), verify_each=True).run(m)
    text = print_module(m)
    assert _ops(m) == ["Cast", "matmul_int4_weight", "Cast"], text  # beta * C folded into the bias operand
    assert "%y_3 = matmul_int4_weight(%0, %y_w_int4, %y_w_scale_1, none, %y_bias_2) {block_size = 32} : f16[4,96]" \
        in text, text
    assert "i4[128,96]" in text and "f16[4,96]" in text  # scales converted exactly to f16
    x = {"x": np.random.default_rng(2).standard_normal((4, 128)).astype(np.float32)}
    a, b = ref.run(x)["y"], Interpreter(m).run(x)["y"]
    assert np.linalg.norm(b - a) / np.linalg.norm(a) < 0.12


def test_quantize_int4_scales_are_f16_exact():
    from nnc.passes.quantize_weights_int4 import quantize_int4
    w = np.random.default_rng(0).standard_normal((100, 24)).astype(np.float32)
    q, s = quantize_int4(w, 32)
    assert q.shape == (100, 24) and s.shape == (4, 24) and s.dtype == np.float32
    assert np.array_equal(s.astype(np.float16).astype(np.float32), s)
    qi = q.astype(np.int64)
    assert qi.min() >= -8 and qi.max() <= 7
    deq = qi * np.repeat(s, 32, axis=0)[:100]
    # the scale search never does worse than max|w| / 7 (round to nearest, no clipping), group by group
    s7 = (np.abs(np.concatenate([w, np.zeros((28, 24), np.float32)])).reshape(4, 32, 24).max(axis=1) / 7)
    s7 = s7.astype(np.float16).astype(np.float32)
    d7 = np.clip(np.rint(w / np.repeat(s7, 32, axis=0)[:100]), -8, 7) * np.repeat(s7, 32, axis=0)[:100]
    e, e7 = np.square(deq - w), np.square(d7 - w)
    for gi in range(4):
        got, d7_err = e[32 * gi:32 * gi + 32].sum(axis=0), e7[32 * gi:32 * gi + 32].sum(axis=0)
        assert np.all(got <= d7_err * (1 + 1e-5))
    assert e.sum() < 0.95 * e7.sum()


def test_cli_weights_int4(tmp_path):
    import onnx

    from nnc.cli import main
    p = tmp_path / "mm.onnx"
    onnx.save(_float_mm(), p)
    assert main(["compile", str(p), "-o", str(tmp_path / "o"), "--weights", "int4", "--int4-block", "128",
                 "--precision", "fp16", "--no-codegen"]) == 0
    text = (tmp_path / "o" / "ir" / "final.nnir").read_text()
    assert "matmul_int4_weight" in text and "{block_size = 128}" in text


# ---------------------------------------------------------------- the kernel's layouts, decoded

def _problem(m, arch="sm_90a"):
    from nnc.codegen.lower import Lowerer, Problem, _ensure_loaded
    from tools.bench_int4 import options
    _ensure_loaded()
    op = next(o for o in m.main.ops if o.name == "matmul_int4_weight")
    return Problem(Lowerer(m, options(arch)), op)


def _decode(words, pr, scales, zsub, T):
    """W [KP, NP] as the kernel forms it: per lane l (g = l // 4, t = l % 4), word w (k16 step),
    register j = the nibble pair (word >> 4j) & 0x000f000f, i.e. B fragment register j % 2 of n8
    half j // 2; its elements e (low / high half) are rows 2t + e + 8 (j % 2), column g (PTX
    m16n8k16 .f16 B layout); value (u - z) * s rounded once to T."""
    from nnc.codegen.kernels.gemm_int4 import ACT
    Tn, C = pr.tiles, pr.chunks
    off = ACT[pr.act][1]
    W = np.zeros((C * 64, Tn * 16), np.float32)
    for tile in range(Tn):
        for c in range(C):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for s in range(4):
                    word = int(words[tile, c, lane, s])
                    k0 = c * 64 + 16 * s
                    grp = k0 // pr.block
                    for j in range(4):
                        pair = (word >> (4 * j)) & 0x000F000F
                        h, b = j // 2, j % 2
                        n = tile * 16 + 8 * h + g
                        sc = np.float32(scales[tile, grp, g, h])
                        z = float(zsub[tile, grp, g, h]) - off if zsub is not None else pr.zero
                        for e, u in enumerate((pair & 0xF, (pair >> 16) & 0xF)):
                            W[k0 + 2 * t + e + 8 * b, n] = np.float32((np.float32(u - z) * sc).astype(T))
    return W


@pytest.mark.parametrize("act,zp,K,N,bs", [("f16", False, 256, 320, 32), ("f16", True, 232, 301, 64),
                                           ("bf16", True, 320, 272, 128), ("bf16", False, 192, 352, 16)])
def test_layout_decodes_to_the_dequantized_weight(act, zp, K, N, bs):
    from nnc.codegen.kernels import gemm_int4 as G
    from nnc.ir.ops.gemm_int4 import dequantized_weight
    m = _module(3, K, N, bs, zp, act)
    pr = _problem(m)
    assert G.SMALL_M.check(pr), G.SMALL_M.check(pr).why
    p = pr.memo["gemm_int4.problem"]
    wq, s = pr.value(1), pr.value(2)
    z = pr.value(3) if zp else None
    words = G.pack_weight(G.nibbles(wq, p.zero), p)
    sp = G.pack_groups(s, p, s.dtype)
    zs = G.pack_groups(G.nibbles(z, p.zero).astype(np.float32) + G.ACT[act][1], p, s.dtype) if zp else None
    got = _decode(words, p, sp, zs, s.dtype)
    want = dequantized_weight(pr.op.attrs, wq, s, z).astype(np.float32)
    np.testing.assert_array_equal(got[:K, :N], want)


def _module(M, K, N, bs, zp, act, lead=None, seed=0, bias=False):
    """f16: the DQ model as it is; bf16: the f32 model through the bf16 precision passes."""
    if act == "f16":
        return int4_module(M, K, N, bs, zp, "f16", seed=seed, lead=lead, bias=bias)
    from nnc.driver import pipeline_passes
    from nnc.onnx_import import import_model
    from nnc.pipeline import Pipeline
    m = import_model(onnx_model(M, K, N, bs, zp, "f32", seed=seed, lead=lead, bias=bias))
    Pipeline(pipeline_passes("bf16"), verify_each=True).run(m)
    return m


# ---------------------------------------------------------------- variants, NVRTC

CASES = [(1, 8192, 8192, 32, False, "f16"), (16, 4096, 4096, 128, False, "f16"), (7, 232, 301, 64, True, "f16"),
         (4, 320, 272, 32, True, "bf16"), (16, 520, 136, 48, False, "bf16"), (3, 512, 200, 32, False, "f16", True),
         (1, 8192, 1024, 128, True, "bf16", True)]


def test_applies_space_default_and_reasons():
    from nnc.codegen.kernels import gemm_int4 as G
    m = int4_module(1, 8192, 8192, 32)
    pr = _problem(m)
    assert G.SMALL_M.check(pr)
    sp = G.SMALL_M.space(pr)
    d = G.SMALL_M.default(pr, sp)
    assert d in sp and d["KSPLIT"] * 32 <= pr.target.max_threads_per_block
    assert {p["R"] for p in sp} == {1, 2, 4} and {p["U"] for p in sp if p["PIPE"] == "regs"} == {1, 2, 4}
    assert {p["STAGES"] for p in sp if p["PIPE"] == "smem"} == ({3, 4, 6} if G.UNVERIFIED_POINTS else set())
    assert d == dict(R=2, KSPLIT=8, U=2, SPLIT=1, PIPE="regs", APRE=0)  # the H200's fastest (round 1) here
    assert {p["APRE"] for p in sp if p["PIPE"] == "regs"} == ({0, 1} if G.UNVERIFIED_POINTS else {0})
    m32 = int4_module(32, 256, 384, 32)
    assert "M = 32 > 16" in G.SMALL_M.check(_problem(m32)).why
    m32f = int4_module(4, 256, 384, 32, act="f32")
    assert "not f16 / bf16" in G.SMALL_M.check(_problem(m32f)).why
    from dataclasses import replace
    old = _problem(m)
    old.target = replace(old.target, arch="sm_75")
    assert "sm_80" in G.SMALL_M.check(old).why


def _sources(cases, all_points: bool):
    from nnc.codegen.kernels import gemm_int4 as G
    from tools.bench_int8 import lower_forced
    out = []
    for M, K, N, bs, zp, act, *bias in cases:
        m = _module(M, K, N, bs, zp, act, bias=bool(bias and bias[0]))
        pr = _problem(m)
        assert G.SMALL_M.check(pr), (M, K, N, bs, zp, act)
        sp = G.SMALL_M.space(pr)
        for params in (sp if all_points else [G.SMALL_M.default(pr, sp)]):
            plan = lower_forced(m, "gemm_int4.small_m", params)
            for k in plan.kernels.values():
                name = f"{k.name}_v{len(out)}"
                out.append((name, k.source.replace(k.name, name)))
    return out


def _nvrtc(srcs, tag):
    from nnc.codegen.cuda import compile_nvrtc
    from nnc.codegen.units import pieces_for, prelude
    text = "\n".join(s for _, s in srcs)
    cubin = compile_nvrtc(prelude(pieces_for([text])) + "\n" + text, "sm_90a", name=f"gemm_int4_{tag}.cu")
    assert cubin and all(n.encode() in cubin for n, _ in srcs)
    return text


def test_default_kernels_compile_with_nvrtc():
    text = _nvrtc(_sources(CASES, False), "default")
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16" in text and "lop3.b32" in text
    assert "L1::no_allocate" in text and "matmul_int4_weight(" in text  # the header names the IR op


def test_every_space_point_compiles_with_nvrtc():
    _nvrtc(_sources([(7, 232, 301, 64, True, "f16"), (16, 520, 136, 48, False, "bf16")], True), "space")


def test_small_n_splits_k_over_ctas():
    """N = 1024 gives 64 tiles: the default splits K over CTAs (fp32 partials + a reduce kernel)."""
    from nnc.codegen.kernels import gemm_int4 as G
    from tools.bench_int8 import lower_forced
    m = int4_module(1, 8192, 1024, 128)
    pr = _problem(m)
    assert G.SMALL_M.check(pr)
    d = G.SMALL_M.default(pr, G.SMALL_M.space(pr))
    assert d["SPLIT"] > 1 and 64 * d["SPLIT"] >= pr.target.sm_count, d
    plan = lower_forced(m, "gemm_int4.small_m", None)
    assert len(plan.launches) == 2 and tuple(plan.launches[0].grid)[:2] == (64, d["SPLIT"])
    assert any(b.kind == "temp" and tuple(b.shape) == (d["SPLIT"], 1, 1024) for b in plan.buffers)
    _nvrtc([(k.name, k.source) for k in plan.kernels.values()], "split")


def test_m_over_16_falls_back_to_dequantize_and_gemm():
    from tools.bench_int8 import lower_forced, plan_source
    from nnc.codegen.cuda import compile_nvrtc
    m = int4_module(32, 256, 384, 32)
    plan = lower_forced(m, None, None)
    sel = [(s.variant, s.op) for s in plan.selections]
    assert [v for v, _ in sel] == ["gemm.wgmma.matmul", "gemm_int4.dequant"], sel  # the inner MatMul first
    assert any(b.kind == "weight" and b.dtype.short == "f16" and tuple(b.shape) == (256, 384) for b in plan.buffers)
    assert compile_nvrtc(plan_source(plan), "sm_90a", name="int4_fallback.cu")
    mb = int4_module(40, 512, 384, 32, zero_points=True, bias=True)  # the bias: an Add after the GEMM
    plan = lower_forced(mb, None, None)
    assert [s.variant for s in plan.selections] == ["gemm.wgmma.matmul", "elementwise._elementwise", "gemm_int4.dequant"]
    assert compile_nvrtc(plan_source(plan), "sm_90a", name="int4_fallback_bias.cu")


# ---------------------------------------------------------------- GPU

def _gpu_check(M, K, N, bs, zp, act, params=None, lead=None, bias=False, variant="gemm_int4.small_m"):
    import cupy as cp

    from tools.bench_int8 import build, device_buffers, lower_forced, output_of, runner
    m = _module(M, K, N, bs, zp, act, lead=lead, seed=M + K, bias=bias)
    feed = random_x(m, seed=M * 7 + 1)
    want = Interpreter(m).run(feed)["y"].astype(np.float32)
    plan = lower_forced(m, variant, params)
    arrs = device_buffers(plan, feed, poison=True)
    runner(plan, build(plan), arrs)()
    cp.cuda.Device().synchronize()
    got = output_of(plan, arrs).astype(np.float32).reshape(want.shape)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert np.all(np.isfinite(got)) and rel < 1e-2, (M, K, N, bs, zp, act, params, rel, diagnose(got, want))


def diagnose(got, want) -> str:
    """Where a wrong result is wrong (for a bug report from one GPU run): rows, columns mod 16 (the
    tile), columns mod 8 (the n8 half), non-finite count, and the median ratio got / want."""
    g2, w2 = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
    bad = ~np.isfinite(g2) | (np.abs(g2 - w2) > 1e-2 * np.abs(w2).max())
    rows = np.flatnonzero(bad.any(axis=1))[:16].tolist()
    cols = np.flatnonzero(bad.any(axis=0))
    ok = np.isfinite(g2) & (np.abs(w2) > 1e-3 * np.abs(w2).max())
    ratio = float(np.median(g2[ok] / w2[ok])) if ok.any() else float("nan")
    return (f"bad {int(bad.sum())}/{bad.size}, non-finite {int((~np.isfinite(g2)).sum())}, rows {rows}, "
            f"cols mod 16 {sorted(set((cols % 16).tolist()))}, first cols {cols[:8].tolist()}, "
            f"median got/want {ratio:.4f}")


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 7, 16])
@pytest.mark.parametrize("K,N,bs,zp,act", [(4096, 4096, 32, False, "f16"), (8192, 1024, 128, False, "f16"),
                                           (232, 301, 64, True, "f16"),
                                           (1000, 520, 128, False, "bf16"), (520, 136, 48, True, "bf16")])
def test_gpu_matches_interpreter(M, K, N, bs, zp, act):
    _gpu_check(M, K, N, bs, zp, act)


@pytest.mark.gpu
@pytest.mark.parametrize("zp", [False, True])
def test_gpu_uint4(zp):
    import cupy as cp

    from tools.bench_int8 import build, device_buffers, lower_forced, output_of, runner
    m = int4_module(9, 1024, 520, 64, zp, "f16", seed=8, u4=True)
    feed = random_x(m, seed=9)
    want = Interpreter(m).run(feed)["y"].astype(np.float32)
    plan = lower_forced(m, "gemm_int4.small_m", None)
    arrs = device_buffers(plan, feed, poison=True)
    runner(plan, build(plan), arrs)()
    cp.cuda.Device().synchronize()
    got = output_of(plan, arrs).astype(np.float32)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-2, diagnose(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 7, 16])
@pytest.mark.parametrize("K,N,bs,zp,act", [(4096, 4096, 32, False, "f16"), (232, 301, 64, True, "f16"),
                                           (1000, 520, 128, False, "bf16")])
def test_gpu_smem_pipeline(M, K, N, bs, zp, act):
    _gpu_check(M, K, N, bs, zp, act, params=dict(R=2, KSPLIT=4, SPLIT=1, PIPE="smem", STAGES=4))


@pytest.mark.gpu
def test_gpu_batched_leading_dims():
    _gpu_check(6, 512, 384, 32, False, "f16", lead=[2, 3])


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N,act", [(5, 512, 200, "f16"), (1, 8192, 1024, "bf16")])  # the second splits K
def test_gpu_bias(M, K, N, act):
    _gpu_check(M, K, N, 32, False, act, bias=True)


@pytest.mark.gpu
def test_gpu_fallback_m_over_16_with_bias():
    # M > 16 falls back to a compile-time dequantized weight and the normal GEMM (forced to the mma.sync
    # family: tools/bench_int8.runner does not encode the TMA tensor maps wgmma points now take)
    _gpu_check(40, 512, 384, 32, True, "f16", bias=True, variant="gemm.matmul")


@pytest.mark.gpu
@pytest.mark.parametrize("case", [(7, 232, 301, 64, True, "f16"), (16, 520, 136, 48, False, "bf16")])
def test_gpu_every_space_point(case):
    """Every declared point (both pipelines, K split over CTAs included), one NVRTC program for all."""
    import tempfile
    from pathlib import Path

    import cupy as cp

    from nnc.codegen.cuda import compile_nvrtc
    from nnc.codegen.kernels import gemm_int4 as G
    from nnc.codegen.units import pieces_for, prelude
    from tools.bench_int8 import device_buffers, lower_forced, output_of, runner
    m = _module(*case, seed=3)
    pr = _problem(m)
    G.SMALL_M.check(pr)
    feed = random_x(m, seed=4)
    want = Interpreter(m).run(feed)["y"].astype(np.float32)
    plans, srcs = [], []
    for i, params in enumerate(G.SMALL_M.space(pr)):
        plan = lower_forced(m, "gemm_int4.small_m", params)
        names = {k.name: f"{k.name}_pt{i}" for k in plan.kernels.values()}
        srcs += [k.source.replace(k.name, names[k.name]) for k in plan.kernels.values()]
        plans.append((params, plan, names))
    text = "\n".join(srcs)
    d = Path(tempfile.mkdtemp(prefix="nnc_int4_space_"))
    (d / "k.cubin").write_bytes(compile_nvrtc(prelude(pieces_for([text])) + "\n" + text, "sm_90a", name="sp.cu"))
    mod = cp.RawModule(path=str(d / "k.cubin"))
    for params, plan, names in plans:
        arrs = device_buffers(plan, feed, poison=True)
        runner(plan, {n: mod.get_function(u) for n, u in names.items()}, arrs)()
        cp.cuda.Device().synchronize()
        got = output_of(plan, arrs).astype(np.float32)
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert np.all(np.isfinite(got)) and rel < 1e-2, (case, params, rel, diagnose(got, want))
