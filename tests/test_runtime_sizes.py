"""Range profiles on CUDA (issue 10, codegen/runtime_sizes.py): one build serves every shape of the
profile. CPU: the kernels of a range build compile with NVRTC (sm_90a) and take the symbolic sizes
as arguments; the reference backend runs the compiled plan (its memory plan, in its arena) at
runtime sizes and matches onnxruntime; bad shapes are clear errors; a kernel family without
runtime sizes is refused by name; fused groups over symbolic dims (one flash-attention kernel over
runtime S / T, GEMMs with their epilogues over runtime rows) form and compile. GPU
(@pytest.mark.gpu): one build at several shapes (min, opt, max, and lengths that are not multiples
of a tile) against onnxruntime, outputs poisoned first."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import nnc
from nnc.ir.errors import InputError, NncError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import profile_models  # noqa: E402

CNN = profile_models.cnn()
CNN_PROFILE = "input:1x3x32x32/8x3x32x32/32x3x32x32"
ENC_PROFILE = "x:1x1x64/2x77x64/2x128x64"


def _ort(model: Path, feed: dict) -> list:
    ort = pytest.importorskip("onnxruntime")
    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return s.run(None, feed)


@pytest.fixture(scope="module")
def cnn_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("rs") / "cnn"
    nnc.compile(CNN, profiles=[CNN_PROFILE], out=out, backend="reference", codegen=True, tune=False)
    return out


@pytest.fixture(scope="module")
def enc_build(tmp_path_factory):
    d = tmp_path_factory.mktemp("rs")
    model = profile_models.encoder(d / "enc.onnx")
    out = d / "enc"
    nnc.compile(model, profiles=[ENC_PROFILE], out=out, backend="reference", codegen=True, tune=False)
    return model, out


def _check_plan(out: Path, symbols: set):
    plan = json.loads((out / "plan.json").read_text())
    assert set(plan["runtime_sizes"]) == symbols
    assert plan["cubins"] and all((out / c["file"]).is_file() for c in plan["cubins"])  # NVRTC compiled them
    assert any("grid_expr" in l for l in plan["launches"])
    assert any("expr" in a for l in plan["launches"] for a in l["args"])
    # the inputs keep the model's symbols; sizes at max
    assert all("sym_shape" in e and "max_shape" in e for e in plan["inputs"])
    src = (out / "model.cu").read_text()
    assert "nnc_s0" in src  # the kernels name the symbols by nnc's own parameter names
    return plan


def test_cnn_range_build_compiles_and_runs_at_every_batch(cnn_build):
    plan = _check_plan(cnn_build, {"N"})
    assert plan["runtime_sizes"] == {"N": [1, 8, 32]}
    assert plan["inputs"][0]["shape"] == ["N", 3, 32, 32] and plan["inputs"][0]["max_shape"] == [32, 3, 32, 32]
    m = nnc.load(cnn_build, backend="reference")  # runs the compiled plan in its arena (codegen/plan_exec.py)
    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 32):
        x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
        got = m.run({"input": x})["probs"]
        ref = _ort(CNN, {"input": x})[0]
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_encoder_range_build_compiles_and_runs_at_every_length(enc_build):
    model, out = enc_build
    _check_plan(out, {"B", "S"})
    m = nnc.load(out, backend="reference")
    rng = np.random.default_rng(1)
    for b, s in ((1, 1), (2, 77), (1, 100), (2, 128)):
        x = rng.standard_normal((b, s, 64)).astype(np.float32)
        got = m.run({"x": x})["y"]
        ref = _ort(model, {"x": x})[0]
        assert got.shape == (b, s, 64)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def _flash_launches(out: Path) -> list:
    plan = json.loads((out / "plan.json").read_text())
    assert plan["cubins"] and all((out / c["file"]).is_file() for c in plan["cubins"])  # NVRTC compiled them
    return [l for l in plan["launches"] if l["kind"] == "kernel" and "flash_attention" in l["kernel"]]


def test_encoder_range_build_fuses_attention_into_one_flash_kernel(enc_build):
    """fuse-attention forms the group over S (the head split / merge views' strides are Exprs);
    the flash-attention kernel takes S and T per run (nnc_s args evaluated per run as int32
    scalars), its grid is ceil(S / rows) x heads x B per run, every stride that holds S is an
    expression."""
    _, out = enc_build
    assert 'kind = "attention"' in (out / "ir" / "final.nnir").read_text()
    (fa,) = _flash_launches(out)
    assert fa["grid_expr"][0] == {"op": "div", "args": [{"op": "add", "args": [{"sym": "S"}, 63]}, 64]}
    assert fa["grid_expr"][1:] == [4, {"sym": "B"}]
    sizes = [a for a in fa["args"] if "buf" not in a]
    assert [a.get("expr") for a in sizes[:2]] == [{"sym": "S"}, {"sym": "S"}] and sizes[0]["type"] == "int32_t"
    # q's batch stride S * row, rows of H * D = 64 (or 192: fuse-horizontal's packed [B,S,3*64] Q/K/V)
    row = sizes[4]["value"]
    assert row in (64, 192) and sizes[2]["expr"] == {"op": "mul", "args": [row, {"sym": "S"}]}
    assert [a["value"] for a in sizes[3:6]] == [16, row, 1]  # head, row, dim strides: static


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_range_build_fp16_attention_takes_the_tensor_core_kernel(tmp_path, precision):
    """At 16 bits the group lowers to the mma.sync kernel (tail tile masked: T is only known per
    run); NVRTC compiles it; the plan's reference run matches onnxruntime at several lengths."""
    model = profile_models.encoder(tmp_path / "enc.onnx")
    out = tmp_path / "o"
    nnc.compile(model, profiles=[ENC_PROFILE], out=out, backend="reference", codegen=True, tune=False,
                precision=precision)
    (fa,) = _flash_launches(out)
    assert "grid_expr" in fa
    src = (out / "model.cu").read_text()
    assert "flash attention tile: 64x" in src
    m = nnc.load(out, backend="reference")
    rng = np.random.default_rng(11)
    for b, s in ((1, 1), (2, 77), (1, 100)):
        x = rng.standard_normal((b, s, 64)).astype(np.float32)
        np.testing.assert_allclose(m.run({"x": x})["y"], _ort(model, {"x": x})[0], rtol=5e-2, atol=5e-2)


def _kernels(out: Path, word: str) -> list:
    plan = json.loads((out / "plan.json").read_text())
    assert plan["cubins"] and all((out / c["file"]).is_file() for c in plan["cubins"])  # NVRTC compiled them
    return [l for l in plan["launches"] if l["kind"] == "kernel" and word in l["kernel"]]


def test_range_build_fp16_gemms_take_their_epilogues_over_runtime_rows(tmp_path):
    """fuse-epilogue forms the bias / residual / Gelu groups over B*S rows; the mma.sync GEMM takes
    M = B*S per run (its grid ceil(M / BM) * tiles_n per run): the encoder's projections are one
    launch each, as in a static build."""
    model = profile_models.encoder(tmp_path / "enc.onnx")
    out = tmp_path / "o"
    nnc.compile(model, profiles=[ENC_PROFILE], out=out, backend="reference", codegen=True, tune=False,
                precision="fp16")
    ir = (out / "ir" / "final.nnir").read_text()
    assert ir.count('kind = "gemm_epilogue"') in (4, 6)
    gemms = _kernels(out, "gemm_tc")
    # no separate bias / residual / Gelu launches (4: fuse-horizontal packed Q/K/V into one GEMM)
    assert len(gemms) == 6 - 2 * (ir.count('kind = "gemm_epilogue"') == 4) and not _kernels(out, "matmul")
    bs = {"op": "mul", "args": [{"sym": "B"}, {"sym": "S"}]}
    for l in gemms:
        assert l["grid_expr"][0]["op"] == "mul" or l["grid_expr"][0]["op"] == "div"
        m_arg = [a for a in l["args"] if "buf" not in a][0]
        assert m_arg["type"] == "int32_t" and m_arg["expr"] == bs and m_arg["value"] == 256


def _gemm_rows_model(tmp_path) -> Path:
    """x f32[M,64] -> Relu(Gemm(x, W1^T, b1)) [M,96] -> MatMul(., W2) + x -> Sigmoid: a Gemm with a
    per-column bias and an activation, a MatMul with a residual and an activation, over M rows."""
    rng = np.random.default_rng(13)
    w1 = (rng.standard_normal((96, 64)) / 8).astype(np.float32)
    w2 = (rng.standard_normal((96, 64)) / 10).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["g"], transB=1),
         helper.make_node("Relu", ["g"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["mm"]),
         helper.make_node("Add", ["mm", "x"], ["res"]),
         helper.make_node("Sigmoid", ["res"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 64])],
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2"),
         onnx.numpy_helper.from_array(rng.standard_normal(96).astype(np.float32), "b1")])
    p = tmp_path / "gemm_rows.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(p))
    return p


GEMM_ROWS_PROFILE = "x:1x64/77x64/256x64"


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gemm_and_matmul_epilogues_over_runtime_rows(tmp_path, precision):
    p = _gemm_rows_model(tmp_path)
    out = tmp_path / "o"
    nnc.compile(p, profiles=[GEMM_ROWS_PROFILE], out=out, backend="reference", codegen=True, tune=False,
                precision=precision)
    gemms = _kernels(out, "gemm_tc")
    assert len(gemms) == 2 and all("grid_expr" in l for l in gemms)
    src = (out / "model.cu").read_text()
    assert "Relu" in src and "Sigmoid" in src
    m = nnc.load(out, backend="reference")
    rng = np.random.default_rng(14)
    for n in (1, 77, 100, 256):
        x = rng.standard_normal((n, 64)).astype(np.float32)
        np.testing.assert_allclose(m.run({"x": x})["y"], _ort(p, {"x": x})[0], rtol=3e-2, atol=3e-2)


BERT_PROFILE = "ids:1x1/2x77/4x128,mask:1x1/2x77/4x128"


def _bert_feed(rng, b, s):
    mask = (rng.random((b, s)) > 0.3).astype(np.float32)
    mask[:, 0] = 1
    return {"ids": rng.integers(0, 100, (b, s)).astype(np.int64), "mask": mask}


def test_bert_with_embedding_and_mask_over_batch_and_length(tmp_path):
    """ids -> embedding Gather, the attention mask broadcast over heads and rows: one build."""
    model = profile_models.encoder(tmp_path / "bert.onnx", embed=True)
    out = tmp_path / "bert"
    nnc.compile(model, profiles=[BERT_PROFILE], out=out, backend="reference", codegen=True, tune=False)
    _check_plan(out, {"B", "S"})
    (fa,) = _flash_launches(out)  # the mask [B,1,1,S] read through strides (S, 0, 0, 1) per run
    assert [a.get("expr", a.get("value")) for a in fa["args"] if "buf" not in a][-4:] == [{"sym": "S"}, 0, 0, 1]
    m = nnc.load(out, backend="reference")
    rng = np.random.default_rng(4)
    for b, s in ((1, 1), (2, 77), (3, 50), (4, 128)):
        feed = _bert_feed(rng, b, s)
        np.testing.assert_allclose(m.run(feed)["y"], _ort(model, feed)[0], rtol=1e-4, atol=1e-4)


def _reduce_model(tmp_path) -> Path:
    """ReduceMean over the symbolic sequence, ReduceMax over the last dim, a global average pool
    not fused into a Gemm, a Gather along the symbolic axis, over B and S."""
    g = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "ax1"], ["m"], keepdims=1),
         helper.make_node("ReduceMax", ["x", "ax2"], ["mx"], keepdims=0),
         helper.make_node("Unsqueeze", ["x", "ax3"], ["x4"]),
         helper.make_node("GlobalAveragePool", ["x4"], ["gap"]),
         helper.make_node("Gather", ["x", "i0"], ["first"], axis=1)], "g",  # a pooler's x[:, 0]
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 8])],
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, ["B", 1, 8]),
         helper.make_tensor_value_info("mx", TensorProto.FLOAT, ["B", "S"]),
         helper.make_tensor_value_info("gap", TensorProto.FLOAT, ["B", "S", 1, 1]),
         helper.make_tensor_value_info("first", TensorProto.FLOAT, ["B", 8])],
        [onnx.numpy_helper.from_array(np.array([1], np.int64), "ax1"),
         onnx.numpy_helper.from_array(np.array([-1], np.int64), "ax2"),
         onnx.numpy_helper.from_array(np.array([3], np.int64), "ax3"),
         onnx.numpy_helper.from_array(np.array(0, np.int64), "i0")])
    p = tmp_path / "red.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(p))
    return p


REDUCE_PROFILE = "x:1x1x8/2x9x8/3x20x8"


def test_reductions_over_symbolic_dims(tmp_path):
    p = _reduce_model(tmp_path)
    out = tmp_path / "o"
    nnc.compile(p, profiles=[REDUCE_PROFILE], out=out, backend="reference", codegen=True, tune=False)
    m = nnc.load(out, backend="reference")
    rng = np.random.default_rng(7)
    for b, s in ((1, 1), (2, 9), (3, 13), (3, 20)):
        x = rng.standard_normal((b, s, 8)).astype(np.float32)
        got, ref = m.run({"x": x}), _ort(p, {"x": x})
        for name, r in zip(("m", "mx", "gap", "first"), ref):
            np.testing.assert_allclose(got[name], r, rtol=1e-5, atol=1e-6)
    plan = json.loads((out / "plan.json").read_text())
    assert {l["kernel"].split("_")[1] for l in plan["launches"] if l["kind"] == "kernel"} == {"reduce", "gather"}


def _concat_model(tmp_path) -> Path:
    """Concat along the static last axis and along the symbolic S (x with Relu(x)); Slices of the
    result along the symbolic axis (start 1, to the end) and of x along its static last axis
    backwards."""
    g = helper.make_graph(
        [helper.make_node("Concat", ["x", "u"], ["c2"], axis=2),
         helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("Concat", ["x", "r"], ["c1"], axis=1),
         helper.make_node("Slice", ["c1", "s0", "s1", "s2"], ["sl"]),  # [:, 1:, 2:7] of the concat
         helper.make_node("Slice", ["x", "t0", "t1", "t2", "t3"], ["rev"])], "g",  # x[:, :, ::-2]
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 8]),
         helper.make_tensor_value_info("u", TensorProto.FLOAT, ["B", "S", 4])],
        [helper.make_tensor_value_info("c2", TensorProto.FLOAT, ["B", "S", 12]),
         helper.make_tensor_value_info("c1", TensorProto.FLOAT, ["B", None, 8]),
         helper.make_tensor_value_info("sl", TensorProto.FLOAT, ["B", None, 5]),
         helper.make_tensor_value_info("rev", TensorProto.FLOAT, ["B", "S", 4])],
        [onnx.numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (
            ("s0", [1, 2]), ("s1", [2 ** 62, 7]), ("s2", [1, 2]),
            ("t0", [-1]), ("t1", [-100]), ("t2", [2]), ("t3", [-2]))])
    p = tmp_path / "cat.onnx"  # (ir_version 10: the GPU machine's onnxruntime reads <= 13)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(p))
    return p


CONCAT_PROFILE = "x:1x1x8/2x5x8/3x9x8,u:1x1x4/2x5x4/3x9x4"


def test_concat_along_static_and_symbolic_axes(tmp_path, gpu=False):
    p = _concat_model(tmp_path)
    out = tmp_path / "o"
    if gpu:
        m = _gpu_build(p, CONCAT_PROFILE, out)
    else:
        nnc.compile(p, profiles=[CONCAT_PROFILE], out=out, backend="reference", codegen=True, tune=False)
        m = nnc.load(out, backend="reference")
    rng = np.random.default_rng(9)
    for b, s in ((1, 1), (2, 5), (3, 7), (3, 9)):
        feed = {"x": rng.standard_normal((b, s, 8)).astype(np.float32),
                "u": rng.standard_normal((b, s, 4)).astype(np.float32)}
        got, ref = (m.run(feed, output="numpy", poison=True) if gpu else m.run(feed)), _ort(p, feed)
        np.testing.assert_array_equal(got["c2"], ref[0])
        np.testing.assert_array_equal(got["c1"], ref[1])
        np.testing.assert_array_equal(got["sl"], ref[2])
        np.testing.assert_array_equal(got["rev"], ref[3])


@pytest.mark.parametrize("shape, msg", [
    ((33, 3, 32, 32), "input 'input' with shape [33, 3, 32, 32] is outside every profile"),
    ((2, 3, 32), "has rank 3; the model's is 4"),
    ((2, 3, 16, 16), "dim 2 must be 32"),
])
def test_bad_shapes_are_clear_errors(cnn_build, shape, msg):
    m = nnc.load(cnn_build, backend="reference")
    with pytest.raises(InputError) as e:
        m.run({"input": np.zeros(shape, np.float32)})
    assert msg in str(e.value)


def test_inconsistent_symbols_are_an_error(tmp_path):
    g = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["S", 4]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["S", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["S", 4])])
    p = tmp_path / "add.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    out = tmp_path / "o"
    nnc.compile(p, profiles=["a:1x4/4x4/16x4,b:1x4/4x4/16x4"], out=out, backend="reference", codegen=True, tune=False)
    m = nnc.load(out, backend="reference")
    a = np.ones((3, 4), np.float32)
    np.testing.assert_array_equal(m.run({"a": a, "b": a})["y"], a + a)
    with pytest.raises(InputError) as e:
        m.run({"a": a, "b": np.ones((5, 4), np.float32)})
    assert "inputs disagree on symbolic dim S" in str(e.value)


def test_a_family_without_runtime_sizes_is_refused_by_name(tmp_path):
    """Conv over a symbolic spatial size: the direct conv takes only a runtime batch, every other
    conv variant bakes sizes in: a LoweringError naming the node and op, nothing written."""
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="the_conv", pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, "H", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, "H", 8])],
        [onnx.numpy_helper.from_array(np.ones((4, 4, 3, 3), np.float32), "w")])
    p = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    with pytest.raises(NncError) as e:
        nnc.compile(p, profiles=["x:1x4x4x8/1x4x8x8/1x4x16x8"], out=tmp_path / "o", backend="reference",
                    codegen=True, tune=False)
    assert "node 'the_conv': Conv" in str(e.value) and "takes runtime sizes" in str(e.value)
    assert not (tmp_path / "o").exists()


def test_an_unnamed_dim_with_a_range_is_refused(tmp_path):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])])
    p = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    with pytest.raises(NncError) as e:
        nnc.compile(p, profiles=["x:1x4/2x4/8x4"], out=tmp_path / "o", backend="reference", codegen=True, tune=False)
    assert "no symbolic name" in str(e.value) or "dims without a name" in str(e.value)


def test_cuda_runtime_evaluates_grids_and_sizes_per_shape(enc_build):
    """nnc.runtime.Module's range path without a GPU: bind_shapes checks the profile and binds
    B and S, _range_launches evaluates every grid and size argument; at max they are plan.json's."""
    from nnc.codegen.dtypes import SCALAR_NP
    from nnc.profiles import profiles_from_plan, signature_from_plan
    from nnc.runtime import Module
    _, out = enc_build
    plan = json.loads((out / "plan.json").read_text())
    m = object.__new__(Module)  # the fields __init__ fills from plan.json, without the device
    m.plan, m.dir, m._launches, m._launch_exprs = plan, out, [], []
    for l in plan["launches"]:
        m._launch_exprs.append((l.get("grid_expr"), [a.get("expr") for a in l["args"]]))
        args = [("buf", 0, 0, 0) if "buf" in a else ("val", SCALAR_NP[a["type"]](a["value"]), 0, 0) for a in l["args"]]
        m._launches.append((l["kind"], None, tuple(l["grid"]), tuple(l["block"]), l["smem"], args, 0, -1))
    m._sig, m.profiles = signature_from_plan(plan["inputs"]), profiles_from_plan(plan, "plan.json")
    env = m.bind_shapes({"x": np.zeros((1, 77, 64), np.float32)})
    assert env == {"B": 1, "S": 77}
    small = m._range_launches(env)
    first = plan["launches"][0]  # q projection: MatMul [B,S,64] x [64,64] in 16x16 tiles (or q/k/v packed: 3 x 64)
    n_tiles = first["grid"][0]
    assert n_tiles in (4, 12) and first["grid"] == [n_tiles, 8, 2] and small[0][2] == (n_tiles, 5, 1)
    assert [a[1] for a in small[0][5] if a[0] == "val"] == [1, 77]  # nnc_s0 = B, nnc_s1 = S
    at_max = m._range_launches({"B": 2, "S": 128})
    assert [(l[2], [a[1] for a in l[5]]) for l in at_max] == [(l[2], [a[1] for a in l[5]]) for l in m._launches]
    with pytest.raises(InputError):
        m.bind_shapes({"x": np.zeros((3, 77, 64), np.float32)})
    m._range_graphs, m._shape_cache = False, {}  # eager: the entry without a graph
    for b, s in [(1, 77), (2, 5)] * 3 + [(1, s) for s in range(1, 12)]:
        launches, graph, shapes = m._shape_entry({"B": b, "S": s})
        assert graph is None and shapes == [(b, s, 64)]
    assert len(m._shape_cache) == Module.GRAPH_CACHE and ((("B", 1), ("S", 11))) in m._shape_cache


CAPI_MAIN = r"""
// runs a range build of tiny_cnn through the C API at the batches given: x_<n>.bin -> y_<n>.bin
#include "nnc_model.h"
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cuda_runtime.h>
int main(int argc, char** argv) {
  nnc_tiny_cnn* m = nullptr;
  if (nnc_tiny_cnn_create(argv[1], &m) != NNC_OK) { std::printf("create: %s\n", nnc_tiny_cnn_last_error()); return 1; }
  void *x = nullptr, *y = nullptr;
  cudaMalloc(&x, nnc_tiny_cnn_input_nbytes(0));
  cudaMalloc(&y, nnc_tiny_cnn_output_nbytes(0));
  const int64_t bad[4] = {33, 3, 32, 32};
  if (nnc_tiny_cnn_set_input_shape(m, 0, bad) == NNC_OK) { std::printf("33 accepted\n"); return 1; }
  std::printf("refused: %s\n", nnc_tiny_cnn_last_error());
  for (int a = 3; a < argc; ++a) {
    const int n = std::atoi(argv[a]);
    const int64_t dims[4] = {n, 3, 32, 32};
    if (nnc_tiny_cnn_set_input_shape(m, 0, dims) != NNC_OK) { std::printf("shape: %s\n", nnc_tiny_cnn_last_error()); return 1; }
    std::vector<float> hx((size_t)n * 3 * 32 * 32), hy((size_t)n * 10);
    char path[4096];
    std::snprintf(path, sizeof path, "%s/x_%d.bin", argv[2], n);
    FILE* f = std::fopen(path, "rb");
    if (!f || std::fread(hx.data(), 4, hx.size(), f) != hx.size()) return 1;
    std::fclose(f);
    cudaMemcpy(x, hx.data(), hx.size() * 4, cudaMemcpyHostToDevice);
    const void* ins[1] = {x};
    void* outs[1] = {y};
    if (nnc_tiny_cnn_run(m, 0, ins, outs) != NNC_OK) { std::printf("run: %s\n", nnc_tiny_cnn_last_error()); return 1; }
    cudaDeviceSynchronize();
    int64_t od[2] = {0, 0};
    nnc_tiny_cnn_output_shape(m, 0, od);
    cudaMemcpy(hy.data(), y, hy.size() * 4, cudaMemcpyDeviceToHost);
    std::snprintf(path, sizeof path, "%s/y_%d.bin", argv[2], n);
    f = std::fopen(path, "wb");
    std::fwrite(hy.data(), 4, hy.size(), f);
    std::fclose(f);
    std::printf("n=%d out %lldx%lld graph %d\n", n, (long long)od[0], (long long)od[1], nnc_tiny_cnn_used_cuda_graph(m));
  }
  nnc_tiny_cnn_destroy(m);
  return 0;
}
"""


@pytest.mark.gpu
def test_gpu_c_api_runs_a_range_build_at_several_batches(tmp_path):
    import shutil
    import subprocess
    nvcc = shutil.which("nvcc") or "/usr/local/bin/nvcc"
    out = tmp_path / "cnn"
    nnc.compile(CNN, profiles=[CNN_PROFILE], out=out, backend="reference", codegen=True, tune=False)
    (tmp_path / "main.cpp").write_text(CAPI_MAIN)
    r = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90a", "-I", str(out), str(out / "model.cu"),
                        str(tmp_path / "main.cpp"), "-o", str(tmp_path / "app")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rng = np.random.default_rng(6)
    xs = {n: rng.standard_normal((n, 3, 32, 32)).astype(np.float32) for n in (1, 5, 32)}
    for n, x in xs.items():
        x.tofile(tmp_path / f"x_{n}.bin")
    r = subprocess.run([str(tmp_path / "app"), str(out), str(tmp_path), "1", "5", "32", "5"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "is outside the profile's 1..32" in r.stdout and "n=5 out 5x10 graph 1" in r.stdout
    for n, x in xs.items():
        got = np.fromfile(tmp_path / f"y_{n}.bin", np.float32).reshape(n, 10)
        np.testing.assert_allclose(got, _ort(CNN, {"input": x})[0], rtol=1e-3, atol=1e-4)


def test_c_api_of_a_range_build_takes_input_shapes(cnn_build):
    """The C API: <api>_set_input_shape binds the symbols (checked against the profile), the launches
    compute grids and sizes from m->sym, <api>_output_shape reports the bound shape; the host code
    compiles with nvcc (running it needs a GPU)."""
    import shutil
    import subprocess
    src = (cnn_build / "model.cu").read_text()
    assert "nnc_tiny_cnn_set_input_shape" in (cnn_build / "nnc_model.h").read_text()
    assert "const int kInputSym[] = { 0, -1, -1, -1, 0 };" in src and "case 0: dims[0] = m->sym[0]; dims[1] = 10;" in src
    assert "(int64_t)((16384LL * m->sym[0]))" in src  # the first conv's element count per run
    nvcc = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)
    if nvcc is None:
        pytest.skip("needs nvcc")
    r = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90a", "-c", str(cnn_build / "model.cu"), "-I", str(cnn_build),
                        "-o", str(cnn_build.parent / "host.o")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


# ---------------------------------------------------------------------------- GPU


def _gpu_build(model, profile, out):
    return nnc.compile(model, profiles=[profile], out=out, tune=False)


@pytest.mark.gpu
def test_gpu_cnn_one_build_batch_1_7_32(tmp_path):
    from nnc.runtime import require_gpu
    require_gpu()
    m = _gpu_build(CNN, CNN_PROFILE, tmp_path / "cnn")
    rng = np.random.default_rng(2)
    for n in (1, 7, 8, 32, 7):  # 7 twice: its cached graph replays
        x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
        got = m.run({"input": x}, output="numpy", poison=True)["probs"]
        ref = _ort(CNN, {"input": x})[0]
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
    assert m.uses_cuda_graph and len(m._shape_cache) == 4  # one graph per distinct shape


@pytest.mark.gpu
def test_gpu_encoder_one_build_seq_1_77_128(tmp_path):
    from nnc.runtime import require_gpu
    require_gpu()
    model = profile_models.encoder(tmp_path / "enc.onnx")
    m = _gpu_build(model, ENC_PROFILE, tmp_path / "enc")
    assert len(_flash_launches(tmp_path / "enc")) == 1  # the attention is one flash kernel over runtime S
    rng = np.random.default_rng(3)
    for b, s in ((1, 1), (2, 77), (1, 100), (2, 128), (1, 1)):
        x = rng.standard_normal((b, s, 64)).astype(np.float32)
        got = m.run({"x": x}, output="numpy", poison=True)["y"]
        ref = _ort(model, {"x": x})[0]
        assert got.shape == (b, s, 64)
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_gpu_bert_one_build_seq_1_77_128(tmp_path):
    from nnc.runtime import require_gpu
    require_gpu()
    model = profile_models.encoder(tmp_path / "bert.onnx", embed=True)
    m = _gpu_build(model, BERT_PROFILE, tmp_path / "bert")
    assert len(_flash_launches(tmp_path / "bert")) == 1
    rng = np.random.default_rng(5)
    for b, s in ((1, 1), (2, 77), (3, 50), (4, 128), (2, 77)):
        feed = _bert_feed(rng, b, s)
        got = m.run(feed, output="numpy", poison=True)["y"]
        assert got.shape == (b, s, 64)
        np.testing.assert_allclose(got, _ort(model, feed)[0], rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_gpu_reductions_over_symbolic_dims(tmp_path):
    from nnc.runtime import require_gpu
    require_gpu()
    p = _reduce_model(tmp_path)
    m = _gpu_build(p, REDUCE_PROFILE, tmp_path / "o")
    rng = np.random.default_rng(8)
    for b, s in ((1, 1), (2, 9), (3, 13), (3, 20)):
        x = rng.standard_normal((b, s, 8)).astype(np.float32)
        got, ref = m.run({"x": x}, output="numpy", poison=True), _ort(p, {"x": x})
        for name, r in zip(("m", "mx", "gap", "first"), ref):
            np.testing.assert_allclose(got[name], r, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_gpu_concat_along_static_and_symbolic_axes(tmp_path):
    from nnc.runtime import require_gpu
    require_gpu()
    test_concat_along_static_and_symbolic_axes(tmp_path, gpu=True)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_encoder_16bit_one_build_tensor_core_attention(tmp_path, precision):
    """The mma.sync flash-attention kernel over a runtime S (64-row query tiles, the kv tail tile
    masked): lengths 1 (min), 77 (opt), 128 (max), 65 and 100 (not multiples of the tile), outputs
    poisoned first."""
    from nnc.runtime import require_gpu
    require_gpu()
    model = profile_models.encoder(tmp_path / "enc.onnx")
    out = tmp_path / "enc"
    m = nnc.compile(model, profiles=[ENC_PROFILE], out=out, tune=False, precision=precision)
    assert len(_flash_launches(out)) == 1 and "flash attention tile: 64x" in (out / "model.cu").read_text()
    rng = np.random.default_rng(12)
    tol = 2e-2 if precision == "fp16" else 6e-2
    for b, s in ((1, 1), (2, 77), (2, 128), (1, 65), (2, 100), (1, 1)):
        x = rng.standard_normal((b, s, 64)).astype(np.float32)
        got = m.run({"x": x}, output="numpy", poison=True)["y"]
        assert got.shape == (b, s, 64)
        np.testing.assert_allclose(got.astype(np.float32), _ort(model, {"x": x})[0], rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_gemm_epilogues_over_runtime_rows(tmp_path, precision):
    """The mma.sync GEMM with a fused bias+Relu (Gemm) and residual+Sigmoid (MatMul) epilogue over
    M = 1 (min), 77 (opt), 256 (max), 100 and 65 (not multiples of the row tile), poisoned outputs."""
    from nnc.runtime import require_gpu
    require_gpu()
    p = _gemm_rows_model(tmp_path)
    out = tmp_path / "o"
    m = nnc.compile(p, profiles=[GEMM_ROWS_PROFILE], out=out, tune=False, precision=precision)
    assert len(_kernels(out, "gemm_tc")) == 2
    rng = np.random.default_rng(15)
    tol = 2e-2 if precision == "fp16" else 5e-2
    for n in (1, 77, 256, 100, 65, 1):
        x = rng.standard_normal((n, 64)).astype(np.float32)
        got = m.run({"x": x}, output="numpy", poison=True)["y"]
        assert got.shape == (n, 64)
        np.testing.assert_allclose(got.astype(np.float32), _ort(p, {"x": x})[0], rtol=tol, atol=tol)


@pytest.mark.gpu
def test_gpu_bert_fp16_one_build_masked_tensor_core_attention(tmp_path):
    """BERT's padding mask [B,1,1,S] read per run by the mma.sync flash kernel (element loads: T is
    only known per run), GEMM epilogues over B*S rows: lengths 1, 77, 128, 50, outputs poisoned."""
    from nnc.runtime import require_gpu
    require_gpu()
    model = profile_models.encoder(tmp_path / "bert.onnx", embed=True)
    out = tmp_path / "bert"
    m = nnc.compile(model, profiles=[BERT_PROFILE], out=out, tune=False, precision="fp16")
    assert len(_flash_launches(out)) == 1 and _kernels(out, "gemm_tc")
    rng = np.random.default_rng(16)
    for b, s in ((1, 1), (2, 77), (4, 128), (3, 50), (2, 77)):
        feed = _bert_feed(rng, b, s)
        got = m.run(feed, output="numpy", poison=True)["y"]
        assert got.shape == (b, s, 64)
        np.testing.assert_allclose(got.astype(np.float32), _ort(model, feed)[0], rtol=2e-2, atol=2e-2)
