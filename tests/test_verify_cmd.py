"""`nnc verify` / nnc.accuracy: nnc against onnxruntime, per output and per layer."""
import dataclasses
import io
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnc.accuracy import (AccuracyError, compare, compile_with_outputs, format_text, prepare, print_rich,
                          random_inputs, verify_model)
from nnc.cli import main

ROOT = Path(__file__).resolve().parents[1]
CNN = ROOT / "examples" / "tiny_cnn.onnx"
TRANSFORMER = ROOT / "examples" / "tiny_transformer.onnx"
EXAMPLES = {"tiny_cnn": (CNN, "input:2x3x32x32"), "tiny_transformer": (TRANSFORMER, "")}


def _cli(capsys, *argv):
    rc = main(["verify", *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def _outputs(path):
    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


def _node_outputs(path):
    return {t for n in onnx.load(str(path), load_external_data=False).graph.node for t in n.output if t}


def _save(model, tmp_path, name="m.onnx"):
    p = tmp_path / name
    onnx.save(model, str(p))
    return p


def _chain_model(nodes, inits, n=16, opset=17):
    """x: f32[1, n] -> nodes -> y (nodes name their outputs; the last one writes 'y')."""
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                          [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10  # what the installed onnxruntime reads
    return m


def _overflow_model():
    """fp32-safe, fp16-overflowing: |x| + 10 >= 10, times 1e4 >= 1e5 > fp16 max (65504) at node
    'boom'; 'shrink' brings fp32 back to ~1... The Transposes end the elementwise group at 'boom'
    (a fused kernel keeps its intermediates in fp32, so an overflow inside a group never reaches
    memory; the group's result c is stored in fp16)."""
    return _chain_model([
        helper.make_node("Abs", ["x"], ["a"], name="abs"),
        helper.make_node("Add", ["a", "ten"], ["b"], name="shift"),
        helper.make_node("Mul", ["b", "big"], ["c"], name="boom"),
        helper.make_node("Transpose", ["c"], ["ct"], name="flip", perm=[1, 0]),
        helper.make_node("Mul", ["ct", "small"], ["d"], name="shrink"),
        helper.make_node("Relu", ["d"], ["dr"], name="out"),
        helper.make_node("Transpose", ["dr"], ["y"], name="flop", perm=[1, 0]),
    ], {"ten": [10.0], "big": [1e4], "small": [1e-5]})


# ----------------------------------------------------------------------------- example models

@pytest.mark.parametrize("name", list(EXAMPLES))
def test_examples_pass_at_fp32(name, capsys):
    path, shapes = EXAMPLES[name]
    rc, out, _ = _cli(capsys, path, "--shapes", shapes) if shapes else _cli(capsys, path)
    assert rc == 0, out
    outs = _outputs(path)
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    for o in outs:  # the table has a row for every output, with its verdict
        row = next(r for r in rows if r[0] == o)
        assert row[-1] == "PASS"
    assert f"PASSED: all {len(outs)} outputs within tolerance" in out


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_examples_per_layer_fp32_cover_every_node_output(name):
    path, shapes = EXAMPLES[name]
    rep = verify_model(path, shapes=shapes, per_layer=True)
    assert rep.passed and rep.first_failure is None and rep.first_nonfinite is None
    compared = {c.name for c in rep.layers}
    skipped = {s.name for s in rep.not_compared}
    assert compared | skipped == _node_outputs(path) and not compared & skipped
    # fold-batchnorm removes the pre-BN tensor of each folded conv (4 in tiny_cnn); the rest remain
    assert len(compared) >= 10
    assert all(c.max_abs < 1e-3 for c in rep.layers)


@pytest.mark.parametrize("prec", ["fp16", "bf16"])
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_examples_low_precision(name, prec):
    path, shapes = EXAMPLES[name]
    rep = verify_model(path, shapes=shapes, precision=prec, per_layer=True)
    assert rep.rtol == 1e-2
    for c in rep.outputs:
        assert c.passed, c
        assert 0 < c.rel_l2 < 1e-2  # the low-precision path really ran (not an fp32 copy)
    assert rep.layers and all(c.dtype == ("float16" if prec == "fp16" else "bfloat16")
                              for c in rep.layers if c.name not in _outputs(path))
    assert rep.unmapped_ir_values >= 2  # the entry and exit casts the precision pass adds
    # every compared layer, not only the outputs (an NHWC value compared as NCHW failed here unseen)
    assert rep.first_failure is None, format_text(rep)


# tiny_cnn's activations after the stem conv, laid out NHWC by assign-layout at fp16/bf16
NHWC_TENSORS = {"stem.r", "pool", "block.a.r", "res", "res.r", "down.r"}


@pytest.mark.parametrize("prec", ["fp16", "bf16"])
def test_per_layer_compares_nhwc_values_transposed_back(prec):
    """assign-layout's NHWC results stand for their nodes' NCHW tensors (same loc and op): per-layer
    verify compares them transposed back (TensorCheck.perm) and they pass. At 32x32 the pooled
    [2,16,16,16] is the same shape in either layout, so only the relayout mark tells them apart;
    the others ([2,16,32,32], [2,32,8,8]) used to be skipped as 'fused or removed'."""
    pre = prepare(CNN, "input:2x3x32x32", prec, per_layer=True)
    assert any(getattr(op.attrs, "layout", "") == "NHWC" for op in pre.module.main.walk()), \
        "assign-layout did not run: this test checks its NHWC values"
    rep = verify_model(CNN, shapes="input:2x3x32x32", precision=prec, per_layer=True)
    got = {c.name: c for c in rep.layers}
    assert NHWC_TENSORS <= set(got), format_text(rep)
    for t in NHWC_TENSORS:
        assert got[t].perm == (0, 2, 3, 1) and got[t].passed and got[t].rel_l2 < 1e-2, got[t]
        assert list(got[t].shape) == [int(d) for d in {"stem.r": (2, 16, 32, 32), "down.r": (2, 32, 8, 8)}
                                      .get(t, (2, 16, 16, 16))]  # reported in the ONNX (NCHW) layout
    assert rep.first_failure is None, format_text(rep)
    # at fp32 nothing is relaid: the same tensors are compared as they are
    rep32 = verify_model(CNN, shapes="input:2x3x32x32", per_layer=True)
    assert all(c.perm == () and c.passed for c in rep32.layers)


def test_relaid_value_without_its_mark_is_caught():
    """The mark is what makes the comparison right: the NHWC pooled value compared as if NCHW
    (the bug the GPU run found) fails by a wide margin, so a lost mark cannot pass unseen."""
    from nnc.accuracy import _inverse
    from nnc.ir.layout import perm_of
    pre = prepare(CNN, "input:2x3x32x32", "fp16", per_layer=True)
    v = pre.mapping["pool"][0]
    assert v is not None and perm_of(v) == (0, 2, 3, 1) and tuple(v.type.shape) == (2, 16, 16, 16)
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 16, 16, 16)).astype(np.float32)
    nhwc = np.transpose(ref, perm_of(v))
    assert compare("pool", np.transpose(nhwc, _inverse(perm_of(v))), ref, 1e-2, None).passed
    assert not compare("pool", nhwc, ref, 1e-2, None).passed


# ----------------------------------------------------------------------------- broken layers

def test_fp16_overflow_names_the_node(tmp_path, capsys):
    p = _save(_overflow_model(), tmp_path)
    assert verify_model(p).passed  # fp32 is fine
    rep = verify_model(p, precision="fp16", per_layer=True)
    assert not rep.passed
    nf = rep.first_nonfinite
    assert (nf.node, nf.op_type, nf.name) == ("boom", "Mul", "c") and nf.nonfinite == 16
    assert rep.first_failure.node == "boom"  # 'abs' and 'shift' are exact in fp16
    assert [c.node for c in rep.layers[:2]] == ["abs", "shift"] and all(c.passed for c in rep.layers[:2])
    rc, out, _ = _cli(capsys, p, "--precision", "fp16", "--per-layer")
    assert rc == 1
    assert "first layer with non-finite values: node 'boom' (Mul), tensor 'c'" in out
    assert "FAILED: 1 of 1 outputs outside tolerance (y)" in out
    rc, out, _ = _cli(capsys, p, "--precision", "fp16")
    assert rc == 1 and "16 non-finite" in out


def test_wrong_reference_semantics_found_per_layer(tmp_path, monkeypatch):
    """A test-only bug in one op's reference semantics is found at exactly that node."""
    from nnc.ir import registry
    p = _save(_chain_model([
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Sigmoid", ["r"], ["s"], name="sig"),
        helper.make_node("Mul", ["s", "two"], ["y"], name="scale"),
    ], {"two": [2.0]}), tmp_path)
    assert verify_model(p, per_layer=True).passed
    sig = registry.get("Sigmoid")
    monkeypatch.setitem(registry.REGISTRY, "Sigmoid",
                        dataclasses.replace(sig, ref=lambda attrs, x: (sig.ref(attrs, x) * 1.01).astype(x.dtype)))
    rep = verify_model(p, per_layer=True)
    assert not rep.passed and rep.first_nonfinite is None
    f = rep.first_failure
    assert (f.node, f.op_type, f.name) == ("sig", "Sigmoid", "s")
    assert 0.005 < f.rel_l2 < 0.011 and f.fail_fraction > 0.9
    assert [c.passed for c in rep.layers] == [True, False, False]


def test_folded_and_removed_tensors_are_listed_not_compared(tmp_path):
    """Identity disappears in canonicalize; the Shape -> Reshape target folds at import."""
    p = _save(_chain_model([
        helper.make_node("Identity", ["x"], ["i"], name="ident"),
        helper.make_node("Exp", ["i"], ["e"], name="exp"),
        helper.make_node("Shape", ["e"], ["shp"], name="shape"),
        helper.make_node("Reshape", ["e", "shp"], ["rs"], name="reshape"),
        helper.make_node("Tanh", ["rs"], ["y"], name="tanh"),
    ], {}), tmp_path)
    rep = verify_model(p, per_layer=True)
    assert rep.passed
    why = {s.name: s.reason for s in rep.not_compared}
    assert why["shp"] == "folded"
    assert why["i"] in ("model input", "fused or removed")
    assert {c.name for c in rep.layers} >= {"e", "y"}
    assert not {c.name for c in rep.layers} & set(why)
    out = format_text(rep)
    assert "folded" in out and "per-layer:" in out


# ----------------------------------------------------------------------------- inputs

def test_inputs_npz_gives_the_same_numbers_and_binds_symbolic_dims(tmp_path, capsys):
    from nnc.onnx_import import import_model
    m = import_model(str(CNN), shapes={"input": [3, 3, 32, 32]})
    feed = random_inputs(m.main.args, seed=5)
    np.savez(tmp_path / "in.npz", **feed)
    a = verify_model(CNN, shapes="input:3x3x32x32", seed=5)
    b = verify_model(CNN, inputs=tmp_path / "in.npz")  # no --shapes: the array's shape binds N
    assert b.seed is None and b.outputs[0].shape == (3, 10)
    assert a.outputs[0].max_abs == b.outputs[0].max_abs and a.outputs[0].rel_l2 == b.outputs[0].rel_l2
    rc, out, _ = _cli(capsys, CNN, "--inputs", tmp_path / "in.npz")
    assert rc == 0 and "given inputs" in out and "3x10" in out


def test_random_inputs_are_never_zero_and_ints_stay_small():
    from nnc.ir.graph import Value
    from nnc.ir.types import TensorType, dtype
    args = [Value("f", TensorType(dtype("f32"), (4, 8))), Value("i", TensorType(dtype("i64"), (64,))),
            Value("b", TensorType(dtype("bool"), (8,)))]
    x = random_inputs(args, seed=0)
    assert np.all(x["f"] != 0) and x["f"].std() > 0.5
    assert x["i"].dtype == np.int64 and 0 <= x["i"].min() and x["i"].max() < 4 and len(set(x["i"])) > 1
    assert x["b"].dtype == bool
    assert not np.array_equal(random_inputs(args, seed=1)["f"], x["f"])


def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    rc, _, err = _cli(capsys, CNN, "--inputs", ROOT / "README.md")
    assert rc == 1 and "--inputs" in err and "README.md" in err and "not an .npz file" in err
    np.savez(tmp_path / "wrong.npz", image=np.zeros((1, 3, 32, 32), np.float32))
    rc, _, err = _cli(capsys, CNN, "--inputs", tmp_path / "wrong.npz", "--shapes", "input:1x3x32x32")
    assert rc == 1 and "no input 'image'" in err
    np.savez(tmp_path / "none.npz")
    rc, _, err = _cli(capsys, CNN, "--inputs", tmp_path / "none.npz", "--shapes", "input:1x3x32x32")
    assert rc == 1 and "missing ['input']" in err
    np.savez(tmp_path / "f64.npz", input=np.zeros((1, 3, 32, 32)))
    rc, _, err = _cli(capsys, CNN, "--inputs", tmp_path / "f64.npz")
    assert rc == 1 and "float64" in err and "float32" in err
    np.savez(tmp_path / "cut.npz", input=np.ones((1, 3, 32, 32), np.float32))
    data = (tmp_path / "cut.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    rc, _, err = _cli(capsys, CNN, "--inputs", tmp_path / "cut.npz")
    assert rc == 1 and "--inputs" in err
    rc, _, err = _cli(capsys, CNN, "--inputs", tmp_path / "nope.npz")
    assert rc == 1 and "no such file" in err


def test_bad_shapes_are_clear_errors(capsys):
    rc, _, err = _cli(capsys, CNN)  # N is symbolic
    assert rc == 1 and "'input'" in err and "--shapes input:Dx3x32x32" in err
    rc, _, err = _cli(capsys, CNN, "--shapes", "input:1x3")
    assert rc == 1 and "rank 4" in err
    rc, _, err = _cli(capsys, CNN, "--shapes", "image:1x3x32x32")
    assert rc == 1 and "image" in err and "input" in err
    rc, _, err = _cli(capsys, CNN, "--shapes", "input:1xAx32x32")
    assert rc == 1 and "integers" in err
    assert err.count("\n") == 1  # one line


def test_missing_onnxruntime_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    rc, _, err = _cli(capsys, TRANSFORMER)
    assert rc == 1 and "pip install onnxruntime" in err
    with pytest.raises(AccuracyError, match="not installed"):
        verify_model(TRANSFORMER)


def test_bad_tolerances_and_options(capsys):
    rc, _, err = _cli(capsys, TRANSFORMER, "--rtol", "-1")
    assert rc == 1 and "non-negative" in err
    with pytest.raises(AccuracyError, match="backend"):
        verify_model(TRANSFORMER, backend="tpu")


def test_tolerance_overrides_decide_the_verdict(capsys):
    rep = verify_model(TRANSFORMER, precision="fp16")
    err = rep.outputs[0].max_abs
    assert rep.passed and err > 0
    rc, out, _ = _cli(capsys, TRANSFORMER, "--precision", "fp16", "--rtol", "0", "--atol", f"{err / 4:g}")
    assert rc == 1 and "FAIL" in out
    rc, _, _ = _cli(capsys, TRANSFORMER, "--precision", "fp16", "--rtol", "0", "--atol", f"{err * 2:g}")
    assert rc == 0


# ----------------------------------------------------------------------------- comparison rules

def test_compare_rules():
    r = np.array([1.0, 2.0, 0.0, -4.0], np.float32)
    c = compare("t", r * 1.0005, r, rtol=1e-3, atol=0.0)
    assert c.passed and c.max_abs == pytest.approx(0.002, rel=1e-3) and c.rel_l2 == pytest.approx(5e-4, rel=1e-3)
    c = compare("t", r + np.float32(0.01), r, rtol=1e-3, atol=0.0)
    assert not c.passed and c.fail_fraction == 1.0
    c = compare("t", np.array([1.0, np.inf, 0.0, np.nan], np.float32), r, rtol=1e-3, atol=None)
    assert not c.passed and c.nonfinite == 2 and c.max_abs == np.inf and c.fail_fraction == 0.5
    c = compare("t", np.array([np.inf, np.nan]), np.array([np.inf, np.nan]), rtol=1e-3, atol=None)
    assert c.passed  # onnxruntime's own inf / NaN reproduced
    c = compare("t", np.array([-np.inf]), np.array([np.inf]), rtol=1e-3, atol=None)
    assert not c.passed
    c = compare("t", np.zeros(3, np.float32), np.zeros(3, np.float32), rtol=1e-3, atol=None)
    assert c.passed and c.rel_l2 == 0.0
    c = compare("t", np.array([1, 2, 3]), np.array([1, 2, 4]), rtol=1.0, atol=10.0)
    assert not c.passed and c.fail_fraction == pytest.approx(1 / 3)  # integers: exact, tolerances ignored
    c = compare("t", np.array([True, False]), np.array([True, False]), rtol=0, atol=0)
    assert c.passed
    c = compare("t", np.zeros((2, 3)), np.zeros((3, 2)), rtol=1e-3, atol=None)
    assert not c.passed and "shape" in c.note


def test_default_atol_scales_with_the_tensor():
    r = np.array([1000.0, 0.0])
    assert compare("t", r + [0.0, 0.5], r, rtol=1e-3, atol=None).passed  # 0.5 <= 1e-3 * 1000
    assert not compare("t", r + [0.0, 2.0], r, rtol=1e-3, atol=None).passed


# ----------------------------------------------------------------------------- rendering, progress

def test_rich_table_and_hostile_names():
    rep = verify_model(TRANSFORMER, per_layer=True)
    buf = io.StringIO()
    from rich.console import Console
    print_rich(rep, Console(file=buf, width=200, force_terminal=False))
    text = buf.getvalue()
    assert "ln1" in text and "PASS" in text and "PASSED: all 1 outputs" in text
    evil = dataclasses.replace(rep.outputs[0], name="y\n\x1b[31mFAKE", node="[bold]n")
    rep2 = dataclasses.replace(rep, outputs=(evil,), per_layer=False)
    text = format_text(rep2)
    assert "\x1b" not in text and "y\\n\\x1b[31mFAKE" in text
    buf = io.StringIO()
    print_rich(rep2, Console(file=buf, width=200, force_terminal=False))
    assert "\x1b" not in buf.getvalue() and "[bold]n" in buf.getvalue()


def test_stages_report_progress():
    from nnc.progress import Reporter, use
    rep = Reporter()
    with use(rep):
        verify_model(TRANSFORMER, per_layer=True)
    assert {"import", "onnxruntime", "nnc reference", "compare"} <= set(rep.times)


# ----------------------------------------------------------------------------- cuda

@pytest.mark.parametrize("prec", ["fp32", "fp16"])
def test_cuda_per_layer_values_become_real_outputs(prec, tmp_path):
    """What --backend cuda --per-layer compiles (NVRTC, no GPU needed): every compared value is
    an output buffer of the plan, with the final IR's dtype."""
    pre = prepare(CNN, "input:1x3x32x32", prec, per_layer=True)
    watch = pre.watch
    # the values that are buffers at run time: not folded away (BN into convs), not inside a
    # fused group (compared at the group's results instead)
    assert len(watch) >= 5 and all(v in pre.module.main.results or v.producer in pre.module.main.ops
                                   for v in watch.values())
    plan = compile_with_outputs(pre.module, watch, tmp_path, precision=prec)
    outs = {o["name"]: o for o in plan["outputs"]}
    assert plan["outputs"][0]["name"] == "probs" and plan["outputs"][0]["dtype"] == "float32"
    for v in watch.values():
        assert outs[v.name]["dtype"] == v.type.dtype.np_name
        assert outs[v.name]["shape"] == list(v.type.shape)
    assert plan["kernels"] and any(f.stat().st_size > 0 for f in tmp_path.glob("*.cubin"))


@pytest.mark.gpu
@pytest.mark.parametrize("prec", ["fp32", "fp16"])
def test_cuda_backend_tiny_cnn(prec, capsys):
    rep = verify_model(CNN, shapes="input:2x3x32x32", backend="cuda", precision=prec, per_layer=True)
    assert rep.passed, format_text(rep)
    n_watched = len(prepare(CNN, "input:2x3x32x32", prec, per_layer=True).watch)
    assert len(rep.layers) == n_watched >= 5 and all(c.passed for c in rep.layers), format_text(rep)
    if prec == "fp16":  # assign-layout's NHWC buffers, read back and compared transposed
        assert NHWC_TENSORS & {c.name for c in rep.layers if c.perm == (0, 2, 3, 1)}, format_text(rep)
    assert 0 < rep.outputs[0].rel_l2 < rep.rtol
    rc, out, _ = _cli(capsys, CNN, "--shapes", "input:2x3x32x32", "--backend", "cuda")
    assert rc == 0 and "cuda backend" in out


@pytest.mark.gpu
def test_cuda_backend_finds_fp16_overflow(tmp_path):
    rep = verify_model(_save(_overflow_model(), tmp_path), backend="cuda", precision="fp16", per_layer=True)
    assert not rep.passed and rep.first_nonfinite.node == "boom"


def test_cuda_backend_without_gpu_is_a_clear_error(capsys):
    from nnc.runtime import gpu_available
    if gpu_available():
        pytest.skip("a GPU is present")
    rc, _, err = _cli(capsys, TRANSFORMER, "--backend", "cuda")
    assert rc == 1 and "GPU" in err and "--backend reference" in err


def test_integer_inputs_and_outputs(tmp_path):
    """Random int64 ids stay valid Gather indices; the int64 ArgMax output is compared exactly."""
    table = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
         helper.make_node("ReduceSum", ["emb", "axes"], ["s"], name="sum", keepdims=0),
         helper.make_node("ArgMax", ["emb"], ["best"], name="argmax", axis=2, keepdims=0)],
        "ints", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 5]),
         helper.make_tensor_value_info("best", TensorProto.INT64, [2, 5])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([2], np.int64), "axes")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    rep = verify_model(_save(m, tmp_path), per_layer=True)
    assert rep.passed and [c.name for c in rep.outputs] == ["s", "best"]
    best = rep.outputs[1]
    assert best.dtype == "int64" and best.max_abs == 0 and best.atol == 0
    assert {c.name for c in rep.layers} == {"emb", "s", "best"}


def test_surviving_if_is_compared_at_its_outputs(tmp_path):
    """An If on an input-driven condition stays in the IR (reference backend): its result is a
    layer; tensors inside the branches are not main-graph tensors."""
    def branch(name, op):
        return helper.make_graph([helper.make_node(op, ["x"], [f"{name}_out"], name=f"{name}_op")], name, [],
                                 [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1, 16])])
    p = _save(_chain_model([
        helper.make_node("ReduceSum", ["x"], ["total"], name="total", keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["cond"], name="cond"),
        helper.make_node("If", ["cond"], ["picked"], name="pick", then_branch=branch("then", "Exp"),
                         else_branch=branch("else", "Neg")),
        helper.make_node("Relu", ["picked"], ["y"], name="relu"),
    ], {"zero": 0.0}), tmp_path)
    for seed in (0, 1, 2):
        rep = verify_model(p, per_layer=True, seed=seed)
        assert rep.passed
        # inline-if made the If a Where, and fuse-elementwise put Where and Relu in one group: the
        # group is compared at its result y (the Where inside no longer has the If's op to map by)
        assert {c.name for c in rep.layers} == {"total", "cond", "y"}
        assert {s.name: s.reason for s in rep.not_compared}["picked"] == "inside a fused group"
