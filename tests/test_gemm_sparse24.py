"""2:4 structured sparsity (issue 12): the matmul_sparse24 op (ir/ops/gemm_sparse24.py), the
sparsify-weights-24 pass (`--sparsity enable|force`, compiler/passes/sparsify_weights_24.py) and the
kernel family (codegen/kernels/gemm_sparse24.py, templates/gemm_sparse24.cu.j2).
CPU: golden IR of the pass (MatMul + Add + Relu, Gemm transB + C, a dense weight left alone under
"enable", pruned with a warning under "force"); the interpreter's outputs equal before and after the
pass (enable), and equal the pruned model's (force, a two-layer MLP); compress / prune / decompress;
the compile-time layouts decoded as the PTX ISA's sparse m16n8k32 fragments and metadata give W^T bit
for bit; applies / space / default and the reasons; NVRTC sm_90a compile of the space points (a covering subset; NNC_FULL_SPACE=1: every one); the
dense alternative; bad input errors (op verification, options, CLI).
GPU (@pytest.mark.gpu): the kernel against the interpreter and torch on random 2:4 weights, outputs
poisoned first (fp16 / bf16 rel 1e-2), every space point, and a whole model built with --sparsity force."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from bench_sparse24 import (matmul_model, problem_of, random_sparse24, random_x,  # noqa: E402
                            reference, sparse_module)
from nnc.ir import print_module  # noqa: E402
from nnc.ir.interp import Interpreter  # noqa: E402


def _ops(m):
    return [o.name for o in m.main.ops if o.name != "const"]


def _imported(model):
    """The model after the default passes up to the fusion passes (where sparsify-weights-24 runs)."""
    from nnc.driver import pipeline_passes
    from nnc.onnx_import import import_model
    from nnc.pipeline import Pipeline
    m = import_model(model)
    Pipeline(pipeline_passes("fp32", fuse=False), verify_each=True).run(m)
    return m


def _sparsified(m, mode="enable"):
    from nnc.passes import sparsify_weights_24 as S
    from nnc.ir.verify import verify
    counts = S.rewrite(m, mode)
    verify(m)
    return counts


# ---------------------------------------------------------------- the pass (golden IR)

def test_matmul_add_relu_fold_into_one_op_golden():
    m = sparse_module(8, 128, 96, bias=True, relu=True)
    text = print_module(m)
    assert _ops(m) == ["matmul_sparse24"], text
    assert ('%y = matmul_sparse24(%x, %xw_w_sp24, %xw_w_meta, %xw_bias) {activation = "relu"} : f16[8,96]'
            in text), text
    assert '%xw_w_sp24 = const() {weight = "xw_w_sp24"} : f16[96,64]' in text
    assert '%xw_w_meta = const() {weight = "xw_w_meta"} : u8[96,32]' in text


@pytest.mark.parametrize("approx,act", [("none", "gelu"), ("tanh", "gelu_tanh")])
def test_gelu_folds_and_matches_the_interpreter(approx, act):
    model = matmul_model(6, 128, 48, random_sparse24(128, 48, seed=9, dtype=np.float32),
                         np.linspace(-1, 1, 48).astype(np.float32), dt="f32", gelu=approx)
    m = _imported(model)
    feed = {"x": np.random.default_rng(4).standard_normal((6, 128)).astype(np.float32)}
    before = Interpreter(m).run(feed)["y"]
    assert _sparsified(m) == {"MatMul+Add+Gelu->matmul_sparse24": 1}
    assert f'{{activation = "{act}"}}' in print_module(m)
    np.testing.assert_allclose(Interpreter(m).run(feed)["y"], before, rtol=1e-5, atol=1e-5)


def test_written_out_gelu_folds():
    """BERT's exported GELU (Div sqrt2 -> Erf -> Add 1 -> Mul x -> Mul 0.5) after MatMul + Add folds into
    activation "gelu" (fuse_epilogue.match_gelu); the interpreter's outputs stay."""
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh
    w = random_sparse24(128, 64, seed=13, dtype=np.float32)
    c = lambda v, n: nh.from_array(np.array(v, np.float32), n)  # noqa: E731
    nodes = [h.make_node("MatMul", ["x", "w"], ["xw"]), h.make_node("Add", ["xw", "b"], ["t"]),
             h.make_node("Div", ["t", "sqrt2"], ["d"]), h.make_node("Erf", ["d"], ["e"]),
             h.make_node("Add", ["e", "one"], ["e1"]), h.make_node("Mul", ["t", "e1"], ["te"]),
             h.make_node("Mul", ["te", "half"], ["y"])]
    g = h.make_graph(nodes, "bert_gelu", [h.make_tensor_value_info("x", TP.FLOAT, [8, 128])],
                     [h.make_tensor_value_info("y", TP.FLOAT, [8, 64])],
                     [nh.from_array(w, "w"), nh.from_array(np.linspace(-1, 1, 64).astype(np.float32), "b"),
                      c(np.sqrt(2.0), "sqrt2"), c(1.0, "one"), c(0.5, "half")])
    m = _imported(h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10))
    feed = {"x": np.random.default_rng(5).standard_normal((8, 128)).astype(np.float32)}
    before = Interpreter(m).run(feed)["y"]
    assert _sparsified(m) == {"MatMul+Add+GELU ops->matmul_sparse24": 1}
    assert _ops(m) == ["matmul_sparse24"] and '{activation = "gelu"}' in print_module(m), print_module(m)
    np.testing.assert_allclose(Interpreter(m).run(feed)["y"], before, rtol=1e-5, atol=1e-5)


def test_gemm_trans_b_with_c_golden():
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh
    w = random_sparse24(64, 48, seed=3, dtype=np.float32)
    c = np.arange(48, dtype=np.float32)
    g = h.make_graph([h.make_node("Gemm", ["x", "wt", "c"], ["y"], transB=1, beta=0.5)], "g",
                     [h.make_tensor_value_info("x", TP.FLOAT, [5, 64])], [h.make_tensor_value_info("y", TP.FLOAT, [5, 48])],
                     [nh.from_array(np.ascontiguousarray(w.T), "wt"), nh.from_array(c, "c")])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    m = _imported(model)
    feed = {"x": np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)}
    before = Interpreter(m).run(feed)["y"]
    assert _sparsified(m) == {"Gemm->matmul_sparse24": 1}
    text = print_module(m)
    assert _ops(m) == ["matmul_sparse24"] and "f32[48,32]" in text and "u8[48,16]" in text, text
    np.testing.assert_allclose(Interpreter(m).run(feed)["y"], before, rtol=1e-5, atol=1e-5)


def test_enable_leaves_a_dense_weight_alone_and_force_prunes_it_with_a_warning():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    m = _imported(matmul_model(4, 64, 32, w, dt="f32"))
    assert not _sparsified(m, "enable") and _ops(m) == ["MatMul"]
    with pytest.warns(UserWarning, match=r"pruned 1 MatMul/Gemm weight.*changes the model's outputs"):
        counts = _sparsified(m, "force")
    assert counts["pruned"] == 1 and _ops(m) == ["matmul_sparse24"]


def test_k_not_a_multiple_of_4_is_left_alone():
    w = random_sparse24(64, 32, seed=2, dtype=np.float32)[:62]
    m = _imported(matmul_model(4, 62, 32, w, dt="f32"))
    assert not _sparsified(m, "force") and _ops(m) == ["MatMul"]


def test_interpreter_same_output_before_and_after_enable():
    model = matmul_model(6, 256, 80, random_sparse24(256, 80, seed=5, dtype=np.float32),
                         np.linspace(-1, 1, 80).astype(np.float32), relu=True, dt="f16", lead=[2])
    m = _imported(model)
    feed = {"x": np.random.default_rng(2).standard_normal((2, 6, 256)).astype(np.float16)}
    before = Interpreter(m).run(feed)["y"]
    assert _sparsified(m) == {"MatMul+Add+Relu->matmul_sparse24": 1}
    after = Interpreter(m).run(feed)["y"]
    np.testing.assert_allclose(after.astype(np.float32), before.astype(np.float32), rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(after, reference(m, feed))


def _mlp(seed=0):
    """A two-layer MLP (f32, dense random weights): MatMul + Add + Relu, MatMul + Add."""
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh
    rng = np.random.default_rng(seed)
    w1, b1 = rng.standard_normal((128, 256)).astype(np.float32) / 11, rng.standard_normal(256).astype(np.float32)
    w2, b2 = rng.standard_normal((256, 64)).astype(np.float32) / 16, rng.standard_normal(64).astype(np.float32)
    nodes = [h.make_node("MatMul", ["x", "w1"], ["h1"]), h.make_node("Add", ["h1", "b1"], ["h2"]),
             h.make_node("Relu", ["h2"], ["h3"]), h.make_node("MatMul", ["h3", "w2"], ["h4"]),
             h.make_node("Add", ["h4", "b2"], ["y"])]
    g = h.make_graph(nodes, "mlp", [h.make_tensor_value_info("x", TP.FLOAT, [16, 128])],
                     [h.make_tensor_value_info("y", TP.FLOAT, [16, 64])],
                     [nh.from_array(w1, "w1"), nh.from_array(b1, "b1"), nh.from_array(w2, "w2"), nh.from_array(b2, "b2")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10), (w1, b1, w2, b2)


def test_force_on_an_mlp_equals_the_pruned_model():
    from nnc.passes.sparsify_weights_24 import prune24
    model, (w1, b1, w2, b2) = _mlp()
    import nnc
    feed = {"x": np.random.default_rng(3).standard_normal((16, 128)).astype(np.float32)}
    with pytest.warns(UserWarning, match="pruned 2 MatMul/Gemm"):
        forced = nnc.compile(model, options=nnc.CompileOptions(backend="reference", sparsity="force"))
    y = forced.run(feed, output="numpy")["y"]
    p1, p2 = prune24(w1), prune24(w2)
    want = np.maximum(feed["x"] @ p1 + b1, 0) @ p2 + b2
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)
    dense = np.maximum(feed["x"] @ w1 + b1, 0) @ w2 + b2
    assert np.linalg.norm(np.asarray(y) - dense) / np.linalg.norm(dense) > 0.05  # it did change the numbers


# ---------------------------------------------------------------- compress / prune / layouts

def test_compress_decompress_and_prune():
    from nnc.ir.ops.gemm_sparse24 import VALID_CODES, decompress
    from nnc.passes.sparsify_weights_24 import compress24, is_sparse24, prune24
    rng = np.random.default_rng(4)
    w = rng.standard_normal((32, 12)).astype(np.float32)
    w[4:8, 0] = 0  # a group with no non-zero
    w[8:12, 1] = [0, 0, 0, 2]  # one non-zero
    p = prune24(w)
    assert is_sparse24(p) and not is_sparse24(w) and np.array_equal(prune24(p), p)
    g, pg = np.abs(w.reshape(8, 4, 12)), np.abs(p.reshape(8, 4, 12))
    assert np.all(np.sort(pg, axis=1)[:, 2:] == np.sort(g, axis=1)[:, 2:])  # the 2 largest kept
    vals, meta = compress24(p)
    assert vals.shape == (12, 16) and meta.shape == (12, 8) and set(np.unique(meta)) <= set(VALID_CODES)
    np.testing.assert_array_equal(decompress(vals, meta), p)
    with pytest.raises(ValueError, match="i0 < i1"):
        decompress(vals, np.full_like(meta, 0b0101))


@pytest.mark.parametrize("K,N", [(64, 16), (200, 136), (128, 300)])
def test_layout_decodes_as_the_ptx_fragments(K, N):
    """pack_values / pack_meta read back as mma.sp m16n8k32 does: lane 4g+t's registers r = the kept
    pair of row 16T + g + 8(r & 1), chunk t + 4(r >> 1) of the k-step; the positions from the word of
    lane 4g + (chunk // 4) (selector 0), row g in bits 0..15, g + 8 in 16..31, chunk % 4 at 4 bits each."""
    from nnc.codegen.kernels import gemm_sparse24 as G
    from nnc.ir.ops.gemm_sparse24 import decompress
    from nnc.passes.sparsify_weights_24 import compress24
    w = random_sparse24(K, N, seed=K + N, dtype=np.float16)
    vals, meta = compress24(w)
    pr = G.Sparse24Gemm(M=8, K=K, N=N, act="f16", has_bias=False, activation="none")
    wv, we = G.pack_values(vals, meta, pr), G.pack_meta(vals, meta, pr)
    assert wv.shape == (pr.tiles_n, pr.steps_k, 32, 4) and we.shape == (pr.tiles_n, pr.steps_k, 16)
    halves = wv.view(np.uint16).reshape(pr.tiles_n, pr.steps_k, 32, 4, 2)
    wt = np.zeros((pr.n_pad, pr.k_pad), np.uint16)
    for T in range(pr.tiles_n):
        for S in range(pr.steps_k):
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                for r in range(4):
                    row, chunk = 16 * T + g + 8 * (r & 1), t + 4 * (r >> 1)
                    word = int(we[T, S, 2 * g + chunk // 4])
                    code = (word >> (16 * (r & 1) + 4 * (chunk % 4))) & 0xF
                    i0, i1 = code & 3, code >> 2
                    assert i0 < i1
                    k0 = 32 * S + 4 * chunk
                    wt[row, k0 + i0], wt[row, k0 + i1] = halves[T, S, lane, r]
    want = np.zeros((pr.n_pad, pr.k_pad), np.float16)
    want[:N, :K] = decompress(vals, meta).T
    np.testing.assert_array_equal(wt, want.view(np.uint16))


# ---------------------------------------------------------------- variants, NVRTC

def test_applies_space_default_and_reasons():
    from dataclasses import replace

    from nnc.codegen.kernels import gemm_sparse24 as G
    big = problem_of(sparse_module(4096, 768, 3072, seed=1))
    assert G.MMA_SP.check(big)
    sp = G.MMA_SP.space(big)
    d = G.MMA_SP.default(big, sp)
    assert d in sp and d == dict(BN=128, BM=128, WN=2, WM=2, STAGES=3, SPLIT=1)
    assert {p["SPLIT"] for p in sp} == {1}  # 768 tiles: no K split on offer
    assert {p["BN"] for p in sp} == {64, 128} and {p["BM"] for p in sp} == {32, 64, 128}
    assert all(G.smem_bytes(p) <= big.target.smem_per_block_optin for p in sp)
    small = problem_of(sparse_module(128, 768, 768, seed=2))
    assert G.MMA_SP.check(small)
    ds = G.MMA_SP.default(small, G.MMA_SP.space(small))
    assert -(-768 // ds["BN"]) * -(-128 // ds["BM"]) >= 48, ds  # small M: smaller tiles for more CTAs
    f32 = problem_of(sparse_module(8, 64, 32, dt="f32", seed=3))
    assert "not f16 / bf16" in G.MMA_SP.check(f32).why
    k12 = problem_of(sparse_module(8, 12, 32, seed=4))
    assert "multiple of 8" in G.MMA_SP.check(k12).why
    old = problem_of(sparse_module(8, 64, 32, seed=5))
    old.target = replace(old.target, arch="sm_75")
    assert "sm_80" in G.MMA_SP.check(old).why


def _points_source(m, pts, variant="gemm_sparse24.mma", per_unit=12):
    """Every point's kernels NVRTC-compiled for sm_90a, per_unit points a program, the programs in
    parallel processes (codegen/cuda.compile_many, no cache); returns the sources."""
    from bench_sparse24 import point_plans
    from nnc.codegen.cuda import Unit, compile_many
    from nnc.codegen.units import pieces_for, prelude
    plans = point_plans(m, pts, "sm_90a", variant)
    units = []
    for u in range(0, len(plans), per_unit):
        chunk = plans[u:u + per_unit]
        text = "\n".join(s for *_, srcs in chunk for s in srcs)
        units.append(Unit(f"sp24_{u}", prelude(pieces_for([text])) + "\n" + text,
                          tuple(n for _, _, names, _ in chunk for n in names.values())))
    for unit, cubin in zip(units, compile_many(units, "sm_90a")):
        assert cubin and all(n.encode() in cubin for n in unit.kernels), unit.name
    return "\n".join(s for *_, srcs in plans for s in srcs)


def _covering(m, points: list, variant="gemm_sparse24.mma") -> list:
    """The points to compile: each value of each parameter and each line of code of the kernels
    once (tests/codegen/space_cover.py); NNC_FULL_SPACE=1: all of them."""
    from bench_sparse24 import point_plans
    from tests.codegen import space_cover
    sources = ["\n".join(srcs) for *_, srcs in point_plans(m, points, "sm_90a", variant)]
    chosen = space_cover.cover_points([("", p) for p in points], source=lambda _, p: sources[points.index(p)])
    return [p for _, p in chosen]


def test_every_space_point_compiles_with_nvrtc_f16():
    """The tile points (2048 x 1152 outputs: enough tiles that no K split is on offer, so the space is
    the 48 tile / warp / stage points; the split kernels: test_few_tiles_split_k_over_ctas): a covering
    subset, NNC_FULL_SPACE=1 every one."""
    from nnc.codegen.kernels import gemm_sparse24 as G
    m = sparse_module(2048, 200, 1152, bias=True, relu=True, seed=6)
    pr = problem_of(m)
    assert G.MMA_SP.check(pr)
    assert {p["SPLIT"] for p in G.MMA_SP.space(pr)} == {1} and len(G.MMA_SP.space(pr)) == 48
    text = _points_source(m, _covering(m, G.MMA_SP.space(pr)))
    assert "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32" in text
    assert "matmul_sparse24(" in text and "fmaxf" in text  # the header names the IR op; the relu epilogue


def test_wgmma_variant_applies_on_sm_90a_only_and_every_point_compiles():
    """(every point: a covering subset; NNC_FULL_SPACE=1 every one)"""
    from dataclasses import replace

    from nnc.codegen.kernels import gemm_sparse24 as G
    m = sparse_module(4096, 64, 1152, bias=True, relu=True, seed=6)  # (enough tiles: no K split on offer)
    pr = problem_of(m)
    assert G.WGMMA_SP.check(pr)
    sp = G.WGMMA_SP.space(pr)
    assert {p["SPLIT"] for p in sp} == {1} and {p["TPW"] for p in sp} == {1, 2} and {p["KPER"] for p in sp} == {1, 2}
    assert {p["WG"] for p in sp} == {1, 2} and {p["BM"] for p in sp} == {64, 128, 256}
    assert G.WGMMA_SP.default(pr, sp) in sp
    assert all(G.wgmma_smem_bytes(p) <= pr.target.smem_per_block_optin for p in sp)
    text = _points_source(m, _covering(m, sp, "gemm_sparse24.wgmma"), "gemm_sparse24.wgmma")
    assert "wgmma.mma_async.sp.sync.aligned.m64n256k32.f32.f16.f16" in text
    plain = problem_of(sparse_module(8, 64, 32, seed=5))
    plain.target = replace(plain.target, arch="sm_90", has_wgmma=False)
    assert "sm_90a" in G.WGMMA_SP.check(plain).why
    from bench_int8 import candidates
    assert [c for c, _ in candidates(m)][:2] == ["gemm_sparse24.wgmma", "gemm_sparse24.mma"]  # wgmma first on sm_90a


@pytest.mark.parametrize("variant", ["gemm_sparse24.mma", "gemm_sparse24.wgmma"])
def test_few_tiles_split_k_over_ctas(variant):
    """BERT-base b1's FFN down (128 x 3072 x 768): too few tiles for the SMs, so the default splits K
    (fp32 partials [SPLIT, M, N], then the reduce kernel with the bias and activation)."""
    from bench_int8 import lower_forced

    from nnc.codegen.kernels import gemm_sparse24 as G
    m = sparse_module(128, 3072, 768, bias=True, gelu="none", seed=12)
    pr = problem_of(m)
    v = {"gemm_sparse24.mma": G.MMA_SP, "gemm_sparse24.wgmma": G.WGMMA_SP}[variant]
    assert v.check(pr)
    sp = v.space(pr)
    d = v.default(pr, sp)
    assert d in sp and d["SPLIT"] > 1, d
    plan = lower_forced(m, variant, d)
    assert len(plan.launches) == 2 and tuple(plan.launches[0].grid)[2] == d["SPLIT"]
    assert any(b.kind == "temp" and tuple(b.shape) == (d["SPLIT"], 128, 768) for b in plan.buffers)
    text = _points_source(m, [d], variant)
    assert "K-split fp32 partials" in text and "erff" in text  # the reduce kernel has the Gelu


def test_default_compiles_with_nvrtc_bf16():
    from nnc.codegen.kernels import gemm_sparse24 as G
    m = sparse_module(33, 256, 200, bias=True, dt="bf16", seed=7)
    pr = problem_of(m)
    assert G.MMA_SP.check(pr)
    text = _points_source(m, [G.MMA_SP.default(pr, G.MMA_SP.space(pr))])
    assert "m16n8k32.row.col.f32.bf16.bf16.f32" in text
    assert G.WGMMA_SP.check(pr)
    text = _points_source(m, [G.WGMMA_SP.default(pr, G.WGMMA_SP.space(pr))], "gemm_sparse24.wgmma")
    assert "k32.f32.bf16.bf16" in text


def test_dense_alternative_lowers_to_the_gemm_family():
    from bench_int8 import lower_forced, options, plan_source
    from nnc.codegen.cuda import compile_nvrtc
    from nnc.codegen.lower import lower
    from nnc.codegen.variants import ForcedSelector
    m = sparse_module(40, 256, 96, bias=True, relu=True, seed=8)
    plan = lower(m, options("sm_90a"), selector=ForcedSelector("gemm_sparse24.dense", None))  # (not strict: the inner ops)
    sel = [s.variant for s in plan.selections]
    assert sel[-1] == "gemm_sparse24.dense" and any(v.startswith("gemm.") for v in sel), sel
    assert any(b.kind == "weight" and tuple(b.shape) == (256, 96) for b in plan.buffers)
    assert compile_nvrtc(plan_source(plan), "sm_90a", name="sp24_dense.cu")
    f32 = sparse_module(8, 64, 32, dt="f32", seed=9)  # no sparse kernel for f32: the dense one, by default
    assert [s.variant for s in lower_forced(f32, None, None).selections][-1] == "gemm_sparse24.dense"


# ---------------------------------------------------------------- bad input

def test_op_verification_errors():
    from nnc.ir.builder import Builder
    from nnc.ir.graph import NameGen, Region, Value
    from nnc.ir.types import TensorType, dtype
    from nnc.ir.weights import WeightStore

    def build(vals, meta, act="none", x_shape=(4, 64), x_dt="f16"):
        b = Builder(Region([], [], []), WeightStore(), NameGen(set()))
        x = Value("x", TensorType(dtype(x_dt), x_shape))
        return b.create("matmul_sparse24", [x, b.constant(vals), b.constant(meta)], {"activation": act})
    ok = build(np.zeros((32, 32), np.float16), np.full((32, 16), 4, np.uint8))
    assert ok[0].type == TensorType(dtype("f16"), (4, 32))
    cases = [(np.zeros((32, 32), np.float32), np.zeros((32, 16), np.uint8), "none", (4, 64), "x's dtype"),
             (np.zeros((32, 32), np.float16), np.zeros((32, 16), np.int8), "none", (4, 64), "must be u8"),
             (np.zeros((32, 30), np.float16), np.zeros((32, 16), np.uint8), "none", (4, 64), "w_values must be"),
             (np.zeros((32, 32), np.float16), np.zeros((32, 15), np.uint8), "none", (4, 64), "w_meta must be"),
             (np.zeros((32, 31), np.float16), np.zeros((32, 15), np.uint8), "none", (4, 62), "multiple of 4"),
             (np.zeros((32, 32), np.float16), np.zeros((32, 16), np.uint8), "swish", (4, 64), "activation")]
    for vals, meta, act, xs, err in cases:
        with pytest.raises(Exception, match=err):
            build(vals, meta, act, xs)


def test_options_and_cli_errors(tmp_path):
    import nnc
    from nnc.cli import main
    with pytest.raises(nnc.NncError, match="sparsity must be one of"):
        nnc.CompileOptions(sparsity="on")
    with pytest.raises(nnc.NncError, match="do not combine"):
        nnc.CompileOptions(sparsity="enable", weights="int4")
    p = tmp_path / "m.onnx"
    p.write_bytes(matmul_model(4, 64, 32, random_sparse24(64, 32, 1, np.float32), dt="f32").SerializeToString())
    with pytest.raises(SystemExit):
        main(["compile", str(p), "-o", str(tmp_path / "bad"), "--sparsity", "maybe"])
    assert main(["compile", str(p), "-o", str(tmp_path / "o"), "--sparsity", "enable", "--no-codegen"]) == 0
    import json
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert plan["sparsity"] == "enable" and "sparsify-weights-24" in plan["passes"]
    assert "matmul_sparse24(" in (tmp_path / "o" / "ir" / "final.nnir").read_text()


def test_nnc_prune_writes_a_2_4_copy_that_enable_takes(tmp_path):
    """`nnc prune --2:4`: the MLP's two weights pruned in the initializers (onnxruntime runs the copy
    as the pruned numpy model), then --sparsity enable turns both MatMuls into matmul_sparse24."""
    import onnx

    from nnc.cli import main
    from nnc.passes.sparsify_weights_24 import is_sparse24, prune24
    model, (w1, b1, w2, b2) = _mlp(seed=7)
    src, dst = tmp_path / "mlp.onnx", tmp_path / "mlp24.onnx"
    src.write_bytes(model.SerializeToString())
    assert main(["prune", str(src), "--2:4", "-o", str(dst)]) == 0
    from onnx import numpy_helper as nh
    got = {t.name: nh.to_array(t) for t in onnx.load(str(dst)).graph.initializer}
    assert is_sparse24(got["w1"]) and is_sparse24(got["w2"]) and np.array_equal(got["w1"], prune24(w1))
    np.testing.assert_array_equal(got["b1"], b1)
    ort = pytest.importorskip("onnxruntime")
    x = np.random.default_rng(8).standard_normal((16, 128)).astype(np.float32)
    y = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, np.maximum(x @ prune24(w1) + b1, 0) @ prune24(w2) + b2, rtol=1e-4, atol=1e-4)
    m = _imported(onnx.load(str(dst)))
    assert _sparsified(m, "enable") == {"MatMul+Add+Relu->matmul_sparse24": 1, "MatMul+Add->matmul_sparse24": 1}
    with pytest.raises(SystemExit):
        main(["prune", str(src), "-o", str(dst)])  # --2:4 is required (the only pattern)


# ---------------------------------------------------------------- GPU

def _gpu_check(M, K, N, dt="f16", bias=False, relu=False, params=None, lead=None, torch_check=True,
               variant="gemm_sparse24.mma", gelu=None):
    import cupy as cp

    from bench_int8 import build, device_buffers, lower_forced, output_of, runner
    m = sparse_module(M, K, N, seed=M + K + N, bias=bias, relu=relu, dt=dt, lead=lead, gelu=gelu)
    feed = random_x(m, seed=M * 7 + 1)
    want = Interpreter(m).run(feed)["y"].astype(np.float32)
    np.testing.assert_array_equal(want, reference(m, feed).astype(np.float32))
    plan = lower_forced(m, variant, params)
    arrs = device_buffers(plan, feed, poison=True)
    runner(plan, build(plan), arrs)()
    cp.cuda.Device().synchronize()
    got = output_of(plan, arrs).astype(np.float32).reshape(want.shape)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert np.all(np.isfinite(got)) and rel < 1e-2, (variant, M, K, N, dt, params, rel, _diagnose(got, want))
    if torch_check:  # and against torch on the decompressed weight (cuBLAS)
        import torch

        from nnc.ir.builder import const_value
        from nnc.ir.ops.gemm_sparse24 import decompress
        op = next(o for o in m.main.ops if o.name == "matmul_sparse24")
        w = decompress(*(const_value(o, m.weights) for o in op.operands[1:3])).astype(np.float32)
        tdt = torch.float16 if dt == "f16" else torch.bfloat16
        x = torch.from_numpy(next(iter(feed.values())).astype(np.float32)).cuda().to(tdt)
        y = (x.reshape(-1, K) @ torch.from_numpy(w).cuda().to(tdt)).float()
        if bias:
            y = y + torch.from_numpy(const_value(op.operands[3], m.weights).astype(np.float32)).cuda()
        if relu:
            y = torch.relu(y)
        if gelu is not None:
            y = torch.nn.functional.gelu(y, approximate=gelu)
        yt = y.cpu().numpy().reshape(want.shape)
        assert np.abs(got - yt).max() / np.abs(yt).max() < 1e-2


def _diagnose(got, want) -> str:
    g2, w2 = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
    bad = ~np.isfinite(g2) | (np.abs(g2 - w2) > 1e-2 * np.abs(w2).max())
    rows, cols = np.flatnonzero(bad.any(axis=1)), np.flatnonzero(bad.any(axis=0))
    ok = np.isfinite(g2) & (np.abs(w2) > 1e-3 * np.abs(w2).max())
    ratio = float(np.median(g2[ok] / w2[ok])) if ok.any() else float("nan")
    return (f"bad {int(bad.sum())}/{bad.size}, rows {rows[:12].tolist()}, rows mod 8 {sorted(set((rows % 8).tolist()))}, "
            f"cols {cols[:12].tolist()}, cols mod 16 {sorted(set((cols % 16).tolist()))}, median got/want {ratio:.4f}")


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N,dt", [(128, 768, 3072, "f16"), (4096, 3072, 768, "f16"), (1, 64, 16, "f16"),
                                      (128, 3072, 768, "f16"),  # (the default splits K over CTAs)
                                      (37, 200, 136, "f16"), (300, 1000, 520, "bf16"), (16, 4096, 4096, "bf16")])
@pytest.mark.parametrize("variant", ["gemm_sparse24.mma", "gemm_sparse24.wgmma"])
def test_gpu_matches_interpreter_and_torch(M, K, N, dt, variant):
    _gpu_check(M, K, N, dt, variant=variant)


@pytest.mark.gpu
@pytest.mark.parametrize("dt", ["f16", "bf16"])
@pytest.mark.parametrize("variant", ["gemm_sparse24.mma", "gemm_sparse24.wgmma"])
def test_gpu_bias_relu_and_leading_dims(dt, variant):
    _gpu_check(24, 256, 200, dt, bias=True, relu=True, lead=[3], variant=variant)


@pytest.mark.gpu
@pytest.mark.parametrize("approx", ["none", "tanh"])
@pytest.mark.parametrize("variant", ["gemm_sparse24.mma", "gemm_sparse24.wgmma"])
def test_gpu_gelu_epilogue(approx, variant):
    _gpu_check(64, 256, 192, "f16", bias=True, variant=variant, gelu=approx)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["gemm_sparse24.mma", "gemm_sparse24.wgmma"])
def test_gpu_every_space_point(variant):
    """Every declared point (K splits included: 150 x 264 outputs are few tiles) on one problem, the
    points' kernels NVRTC-compiled in parallel units (codegen/cuda.compile_many)."""
    import tempfile

    import cupy as cp

    from bench_int8 import device_buffers, output_of, runner
    from bench_sparse24 import point_plans
    from nnc.codegen.cuda import Unit, compile_many
    from nnc.codegen.kernels import gemm_sparse24 as G
    from nnc.codegen.units import pieces_for, prelude
    m = sparse_module(150, 320, 264, bias=True, seed=11)
    pr = problem_of(m)
    v = {"gemm_sparse24.mma": G.MMA_SP, "gemm_sparse24.wgmma": G.WGMMA_SP}[variant]
    assert v.check(pr)
    feed = random_x(m, seed=12)
    want = reference(m, feed).astype(np.float32)
    plans = point_plans(m, v.space(pr), "sm_90a", variant)
    units = []
    for u in range(0, len(plans), 8):
        text = "\n".join(src for *_, srcs in plans[u:u + 8] for src in srcs)
        units.append(Unit(f"sp24_gpu_{u}", prelude(pieces_for([text])) + "\n" + text))
    d = Path(tempfile.mkdtemp(prefix="nnc_sp24_space_"))
    mods = []
    for i, cubin in enumerate(compile_many(units, "sm_90a")):
        (d / f"k{i}.cubin").write_bytes(cubin)
        mods.append(cp.RawModule(path=str(d / f"k{i}.cubin")))
    bad = []
    for j, (params, plan, names, _) in enumerate(plans):
        mod = mods[j // 8]
        arrs = device_buffers(plan, feed, poison=True)
        runner(plan, {n: mod.get_function(u) for n, u in names.items()}, arrs)()
        cp.cuda.Device().synchronize()
        got = output_of(plan, arrs).astype(np.float32).reshape(want.shape)
        rel = np.abs(got - want).max() / np.abs(want).max()
        if not (np.all(np.isfinite(got)) and rel < 1e-2):
            bad.append((params, float(rel), _diagnose(got, want)))
    assert not bad, f"{len(bad)} of {len(plans)} points wrong: {bad}"


@pytest.mark.gpu
def test_gpu_whole_mlp_with_sparsity_force(tmp_path):
    """nnc.compile(--precision fp16 --sparsity force) of the MLP on the GPU against the interpreter of
    the same pruned, fp16 IR (the reference backend of the same options)."""
    import nnc
    model, _ = _mlp(seed=5)
    feed = {"x": np.random.default_rng(6).standard_normal((16, 128)).astype(np.float32)}
    opts = dict(precision="fp16", sparsity="force")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref = nnc.compile(model, options=nnc.CompileOptions(backend="reference", **opts))
        gpu = nnc.compile(model, options=nnc.CompileOptions(backend="cuda", tune=False, **opts), out=tmp_path / "o")
    import json
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    templates = [k["template"] for k in plan["kernels"]]
    assert sum("gemm_sparse24" in t for t in templates) >= 2 and not {"gemm_wgmma.cu.j2", "gemm_tc.cu.j2"} & set(templates), templates
    want = ref.run(feed, output="numpy")["y"].astype(np.float32)
    got = gpu.run(feed, output="numpy")["y"].astype(np.float32)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-2
