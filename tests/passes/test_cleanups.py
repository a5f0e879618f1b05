"""The cleanup passes (simplify, cse, fold-batchnorm) on imported ONNX graphs: the rewrites they
must do and must not do, the interpreter giving the same outputs before and after, and 10k-op
chains (each pass is one sweep)."""
from __future__ import annotations

import copy
import time

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from nnc.ir.interp import Interpreter
from nnc.ir.types import dtype
from nnc.ir.verify import verify
from nnc.onnx_import import import_model
from nnc.passes import cse, fold_batchnorm, simplify
from nnc.passes.simplify import exact_cast
from nnc.pipeline import run_passes


def _model(nodes, inputs, outputs, inits=(), opset=17):
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                     [h.make_tensor_value_info(n, t, s) for n, t, s in outputs], list(inits))
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)])


def _names(m):
    return [op.name for op in m.main.walk()]


def _same(before, after, rtol=0.0):
    assert list(before) == list(after)
    for k in before:
        assert before[k].dtype == after[k].dtype and before[k].shape == after[k].shape
        if rtol:
            np.testing.assert_allclose(after[k], before[k], rtol=rtol, atol=rtol * np.abs(before[k]).max())
        else:
            np.testing.assert_array_equal(after[k], before[k])


def _conv_bn(rng, group, with_bias, cout=8, cin=4):
    w = rng.standard_normal((cout, cin // group, 3, 3)).astype(np.float32)
    inits = [nh.from_array(w, "w"),
             nh.from_array(rng.uniform(0.5, 2, cout).astype(np.float32), "s"),
             nh.from_array(rng.standard_normal(cout).astype(np.float32), "bb"),
             nh.from_array(rng.standard_normal(cout).astype(np.float32), "m"),
             nh.from_array(rng.uniform(0.1, 3, cout).astype(np.float32), "v")]
    conv_in = ["x", "w"]
    if with_bias:
        inits.append(nh.from_array(rng.standard_normal(cout).astype(np.float32), "b"))
        conv_in.append("b")
    nodes = [h.make_node("Conv", conv_in, ["c"], group=group, pads=[1, 1, 1, 1]),
             h.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["y"], epsilon=1e-3),
             h.make_node("Relu", ["y"], ["out"])]
    return _model(nodes, [("x", T.FLOAT, [2, cin, 6, 6])], [("out", T.FLOAT, [2, cout, 6, 6])], inits)


@pytest.mark.parametrize("group,with_bias", [(1, False), (2, True), (4, False)])
def test_conv_bn_folds_into_weights_in_the_store(rng, group, with_bias):
    m = import_model(_conv_bn(rng, group, with_bias))
    feed = {"x": rng.standard_normal((2, 4, 6, 6)).astype(np.float32)}
    before = Interpreter(m).run(feed)
    c = fold_batchnorm.rewrite(m)
    verify(m)
    run_passes(m, ["dce"], verify_each=True)
    assert c == {"Conv+BatchNormalization": 1}
    assert _names(m).count("BatchNormalization") == 0
    conv = next(op for op in m.main.ops if op.name == "Conv")
    wop = conv.operands[1].producer
    assert wop.attrs.weight is not None and wop.attrs.weight in m.weights  # big: weights.bin, not inline
    assert m.weights[wop.attrs.weight].dtype == np.float32
    assert "w" not in m.weights  # the unfolded weight is no longer named
    _same(before, Interpreter(m).run(feed), rtol=1e-5)


def test_bn_not_folded_when_the_conv_result_has_another_reader(rng):
    model = _conv_bn(rng, 1, False)
    model.graph.node.append(h.make_node("Sigmoid", ["c"], ["side"]))
    model.graph.output.append(h.make_tensor_value_info("side", T.FLOAT, [2, 8, 6, 6]))
    m = import_model(model)
    assert not fold_batchnorm.run(m)


def test_gemm_and_matmul_bn(rng):
    w = rng.standard_normal((5, 6)).astype(np.float32)
    p = [rng.uniform(0.5, 2, 5), rng.standard_normal(5), rng.standard_normal(5), rng.uniform(0.1, 2, 5)]
    inits = [nh.from_array(w, "w"), nh.from_array(w.T.copy(), "wt"),
             nh.from_array(rng.standard_normal(5).astype(np.float32), "c")]
    inits += [nh.from_array(a.astype(np.float32), n) for a, n in zip(p, ("s", "bb", "m", "v"))]
    nodes = [h.make_node("Gemm", ["x", "w", "c"], ["g"], transB=1, alpha=0.5, beta=2.0),
             h.make_node("BatchNormalization", ["g", "s", "bb", "m", "v"], ["y1"]),
             h.make_node("MatMul", ["x", "wt"], ["mm"]),
             h.make_node("BatchNormalization", ["mm", "s", "bb", "m", "v"], ["y2"])]
    m = import_model(_model(nodes, [("x", T.FLOAT, [3, 6])], [("y1", T.FLOAT, [3, 5]), ("y2", T.FLOAT, [3, 5])], inits))
    feed = {"x": rng.standard_normal((3, 6)).astype(np.float32)}
    before = Interpreter(m).run(feed)
    assert fold_batchnorm.rewrite(m) == {"Gemm+BatchNormalization": 1, "MatMul+BatchNormalization": 1}
    run_passes(m, ["dce"], verify_each=True)
    assert [r.name for r in m.main.results] == ["y1", "y2"]
    assert sorted(op.name for op in m.main.ops if op.name != "const") == ["Add", "Gemm", "MatMul"]
    _same(before, Interpreter(m).run(feed), rtol=1e-5)


def test_light_style_dropout_goes_with_its_unread_mask():
    """opset 9: Dropout(ratio attr) with a mask output nobody reads (the light models)."""
    nodes = [h.make_node("Relu", ["x"], ["r"]), h.make_node("Dropout", ["r"], ["d", "mask"], ratio=0.5),
             h.make_node("Tanh", ["d"], ["y"]),
             h.make_node("Dropout", ["r"], ["d2", "mask2"], ratio=0.3), h.make_node("Not", ["mask2"], ["nm"])]
    m = import_model(_model(nodes, [("x", T.FLOAT, [2, 3])], [("y", T.FLOAT, [2, 3]), ("nm", T.BOOL, [2, 3])], opset=9))
    feed = {"x": np.arange(-3, 3, dtype=np.float32).reshape(2, 3)}
    before = Interpreter(m).run(feed)
    run_passes(m, verify_each=True)
    assert "Dropout" not in _names(m)
    _same(before, Interpreter(m).run(feed))


def test_training_dropout_stays():
    t = nh.from_array(np.array(True), "t")
    r = nh.from_array(np.array(0.5, np.float32), "ratio")
    nodes = [h.make_node("Dropout", ["x", "ratio", "t"], ["y", "mask"], seed=3)]
    m = import_model(_model(nodes, [("x", T.FLOAT, [2, 3])], [("y", T.FLOAT, [2, 3])], [r, t]))
    assert not simplify.run(m)
    assert "Dropout" in _names(m)


def test_exact_casts():
    d = dtype
    assert exact_cast(d("f16"), d("f32")) and exact_cast(d("bf16"), d("f32")) and exact_cast(d("f32"), d("f64"))
    assert not exact_cast(d("f32"), d("f16")) and not exact_cast(d("f16"), d("bf16"))
    assert not exact_cast(d("bf16"), d("f16"))
    assert exact_cast(d("i8"), d("i32")) and exact_cast(d("u8"), d("i16")) and not exact_cast(d("i8"), d("u8"))
    assert not exact_cast(d("i64"), d("i32")) and not exact_cast(d("i32"), d("f32"))
    assert exact_cast(d("i16"), d("f32")) and exact_cast(d("i32"), d("f64")) and exact_cast(d("u8"), d("f16"))
    assert exact_cast(d("bool"), d("f16")) and not exact_cast(d("f32"), d("i32")) and not exact_cast(d("f32"), d("bool"))


def test_lossy_cast_round_trip_stays(rng):
    nodes = [h.make_node("Cast", ["x"], ["a"], to=T.FLOAT16), h.make_node("Cast", ["a"], ["y"], to=T.FLOAT),
             h.make_node("Cast", ["h"], ["b"], to=T.FLOAT), h.make_node("Cast", ["b"], ["c"], to=T.FLOAT16),
             h.make_node("Neg", ["c"], ["z"])]
    m = import_model(_model(nodes, [("x", T.FLOAT, [4]), ("h", T.FLOAT16, [4])], [("y", T.FLOAT, [4]), ("z", T.FLOAT16, [4])]))
    feed = {"x": np.array([1e-8, 1.0001, 70000.0, -3.3], np.float32), "h": np.array([1, 2.5, -7, 0.1], np.float16)}
    before = Interpreter(m).run(feed)
    assert simplify.rewrite(m) == {"Cast round trip": 1}
    run_passes(m, ["dce"], verify_each=True)
    assert _names(m) == ["Cast", "Cast", "Neg"]
    _same(before, Interpreter(m).run(feed))


def test_cse_merges_equal_weights_by_bytes_not_different_ones(rng):
    a = rng.standard_normal((4, 4)).astype(np.float32)
    inits = [nh.from_array(a, "w1"), nh.from_array(a.copy(), "w2"), nh.from_array(a + 1, "w3")]
    nodes = [h.make_node("MatMul", ["x", "w1"], ["p"]), h.make_node("MatMul", ["x", "w2"], ["q"]),
             h.make_node("MatMul", ["x", "w3"], ["r"]), h.make_node("Add", ["p", "q"], ["s"]),
             h.make_node("Add", ["s", "r"], ["y"])]
    m = import_model(_model(nodes, [("x", T.FLOAT, [2, 4])], [("y", T.FLOAT, [2, 4])], inits))
    feed = {"x": rng.standard_normal((2, 4)).astype(np.float32)}
    before = Interpreter(m).run(feed)
    assert cse.rewrite(m) == {"const": 1, "MatMul": 1}
    run_passes(m, ["dce"], verify_each=True)
    assert sorted(m.weights.names()) == ["w1", "w3"]
    _same(before, Interpreter(m).run(feed))


def test_cse_never_merges_region_ops_or_outputs():
    tb = h.make_graph([h.make_node("Tanh", ["x"], ["t"])], "t", [], [h.make_tensor_value_info("t", T.FLOAT, [4])])
    eb = h.make_graph([h.make_node("Relu", ["x"], ["e"])], "e", [], [h.make_tensor_value_info("e", T.FLOAT, [4])])
    nodes = [h.make_node("If", ["c"], ["i1"], then_branch=tb, else_branch=eb),
             h.make_node("If", ["c"], ["i2"], then_branch=copy.deepcopy(tb), else_branch=copy.deepcopy(eb)),
             h.make_node("Neg", ["x"], ["n1"]), h.make_node("Neg", ["x"], ["n2"])]
    outs = [(n, T.FLOAT, [4]) for n in ("i1", "i2", "n1", "n2")]
    m = import_model(_model(nodes, [("x", T.FLOAT, [4]), ("c", T.BOOL, [])], outs))
    assert not cse.run(m)
    assert [r.name for r in m.main.results] == ["i1", "i2", "n1", "n2"]


# ---------------------------------------------------------------- 10k-op chains

def _timed(fn, m):
    t = time.perf_counter()
    out = fn(m)
    return out, time.perf_counter() - t


def test_simplify_on_a_10k_op_chain():
    nodes, cur = [], "x"
    for i in range(2500):  # f16 -> f32 -> f16 round trips between Negs, and Unsqueeze/Squeeze pairs
        nodes += [h.make_node("Cast", [cur], [f"a{i}"], to=T.FLOAT), h.make_node("Cast", [f"a{i}"], [f"b{i}"], to=T.FLOAT16),
                  h.make_node("Unsqueeze", [f"b{i}", "ax"], [f"u{i}"]), h.make_node("Squeeze", [f"u{i}", "ax"], [f"n{i}"])]
        cur = f"n{i}"
    nodes.append(h.make_node("Neg", [cur], ["y"]))
    ax = nh.from_array(np.array([0], np.int64), "ax")
    m = import_model(_model(nodes, [("x", T.FLOAT16, [4])], [("y", T.FLOAT16, [4])], [ax]))
    feed = {"x": np.array([1, -2, 3.5, 0.25], np.float16)}
    want = Interpreter(m).run(feed)["y"]
    c, sec = _timed(simplify.rewrite, m)
    run_passes(m, ["dce"], verify_each=True)
    assert c == {"Cast round trip": 2500, "view chain -> nothing": 2500}
    assert [op.name for op in m.main.ops if op.name != "const"] == ["Neg"]
    np.testing.assert_array_equal(Interpreter(m).run(feed)["y"], want)
    assert sec < 10, sec


def test_cse_on_a_10k_op_chain():
    nodes, cur = [], "x"
    for i in range(2500):  # two equal Tanhs, their sum, then a Neg: half the Tanhs merge
        nodes += [h.make_node("Tanh", [cur], [f"p{i}"]), h.make_node("Tanh", [cur], [f"q{i}"]),
                  h.make_node("Add", [f"p{i}", f"q{i}"], [f"s{i}"]), h.make_node("Neg", [f"s{i}"], [f"n{i}"])]
        cur = f"n{i}"
    m = import_model(_model(nodes, [("x", T.FLOAT, [4])], [(cur, T.FLOAT, [4])]))
    feed = {"x": np.array([0.1, -0.2, 0.3, 0.05], np.float32)}
    want = Interpreter(m).run(feed)[cur]
    c, sec = _timed(cse.rewrite, m)
    verify(m)
    assert c == {"Tanh": 2500}
    np.testing.assert_array_equal(Interpreter(m).run(feed)[cur], want)
    assert sec < 10, sec


def test_fold_batchnorm_on_a_10k_op_chain(rng):
    nodes, inits, cur = [], [], "x"
    for i in range(5000):  # 1x1 conv + BN pairs
        inits += [nh.from_array(rng.uniform(0.5, 1.5, (2, 2, 1, 1)).astype(np.float32), f"w{i}")]
        nodes += [h.make_node("Conv", [cur, f"w{i}"], [f"c{i}"]),
                  h.make_node("BatchNormalization", [f"c{i}", "s", "bb", "m", "v"], [f"y{i}"])]
        cur = f"y{i}"
    inits += [nh.from_array(np.array(a, np.float32), n) for a, n in
              (([1.0, 0.5], "s"), ([0.0, 0.1], "bb"), ([0.1, 0.0], "m"), ([1.0, 0.25], "v"))]
    m = import_model(_model(nodes, [("x", T.FLOAT, [1, 2, 1, 1])], [(cur, T.FLOAT, [1, 2, 1, 1])], inits))
    c, sec = _timed(fold_batchnorm.rewrite, m)
    run_passes(m, ["dce"], verify_each=True)
    assert c == {"Conv+BatchNormalization": 5000}
    assert [op.name for op in m.main.ops if op.name != "const"] == ["Conv"] * 5000
    assert m.main.results[0].name == cur
    assert sec < 20, sec
