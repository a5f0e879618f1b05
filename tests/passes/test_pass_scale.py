"""Passes on long graphs keep their results (they rewrite in one sweep through a deferred
Substitution or a backward liveness sweep; tools/bench_compile_scale.py measures the time, these
tests check the rewrites): Identity chains, dead chains, many Ifs, nested uses of replaced values."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from nnc.ir.interp import Interpreter
from nnc.ir.verify import verify
from nnc.onnx_import import import_model
from nnc.pipeline import get_pass, run_passes

X = np.array([-1.5, -0.25, 0.5, 2.0], np.float32)


def _model(nodes, outputs, inits=(), inputs=(("x", T.FLOAT, [4]),)):
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                     [h.make_tensor_value_info(o, T.FLOAT, [4]) for o in outputs], list(inits))
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def _run(m, feed):
    return Interpreter(m).run(feed)


def test_identity_chain_canonicalizes_in_one_go():
    nodes, cur = [], "x"
    for i in range(1500):
        nodes += [h.make_node("Identity", [cur], [f"i{i}"]), h.make_node("Tanh", [f"i{i}"], [f"t{i}"])]
        cur = f"t{i}"
    nodes.append(h.make_node("Identity", [cur], ["y"]))  # a returned Identity keeps its name
    m = import_model(_model(nodes, ["y"]))
    want = _run(m, {"x": X})["y"]
    assert get_pass("canonicalize")(m)
    verify(m)
    names = [op.name for op in m.main.ops]
    assert names.count("Identity") == 1 and names.count("Tanh") == 1500
    assert m.main.results[0].name == "y"
    np.testing.assert_array_equal(_run(m, {"x": X})["y"], want)


def test_dead_chain_is_swept():
    nodes = [h.make_node("Tanh", ["x" if i == 0 else f"d{i - 1}"], [f"d{i}"]) for i in range(3000)]
    nodes += [h.make_node("Relu", ["x"], ["y"])]
    m = import_model(_model(nodes, ["y"]))
    assert get_pass("dce")(m)
    assert [op.name for op in m.main.ops] == ["Relu"]
    assert not get_pass("dce")(m)


def test_dce_keeps_values_read_inside_regions():
    """An outer value read only inside a kept If's branch stays; one read only by a dead If goes."""
    then_b = h.make_graph([h.make_node("Tanh", ["a"], ["ta"])], "t", [], [h.make_tensor_value_info("ta", T.FLOAT, [4])])
    else_b = h.make_graph([h.make_node("Relu", ["x"], ["rx"])], "e", [], [h.make_tensor_value_info("rx", T.FLOAT, [4])])
    dead_b = h.make_graph([h.make_node("Relu", ["dd"], ["rd"])], "d", [], [h.make_tensor_value_info("rd", T.FLOAT, [4])])
    nodes = [h.make_node("Sigmoid", ["x"], ["a"]), h.make_node("Neg", ["x"], ["dd"]),
             h.make_node("If", ["c"], ["y"], then_branch=then_b, else_branch=else_b),
             h.make_node("If", ["c"], ["z"], then_branch=dead_b, else_branch=else_b)]
    m = import_model(_model(nodes, ["y"], inputs=(("x", T.FLOAT, [4]), ("c", T.BOOL, []))))
    get_pass("dce")(m)
    verify(m)
    assert [op.name for op in m.main.ops] == ["Sigmoid", "If"]


def test_many_ifs_inline():
    nodes, cur = [], "x"
    for i in range(400):
        tb = h.make_graph([h.make_node("Tanh", [cur], [f"tt{i}"])], f"t{i}", [], [h.make_tensor_value_info(f"tt{i}", T.FLOAT, [4])])
        eb = h.make_graph([h.make_node("Relu", [cur], [f"ee{i}"])], f"e{i}", [], [h.make_tensor_value_info(f"ee{i}", T.FLOAT, [4])])
        nodes.append(h.make_node("If", ["k" if i % 2 else "c"], [f"y{i}"], then_branch=tb, else_branch=eb))
        cur = f"y{i}"
    onnx_model = _model(nodes, [cur], [nh.from_array(np.array(True), "k")], inputs=(("x", T.FLOAT, [4]), ("c", T.BOOL, [])))
    ref = import_model(onnx_model)
    m = import_model(onnx_model)
    run_passes(m)
    verify(m)
    assert not any(op.name == "If" for op in m.main.ops)
    assert m.main.results[0].name == cur
    for c in (True, False):
        feed = {"x": X, "c": np.array(c)}
        np.testing.assert_allclose(_run(m, feed)[cur], _run(ref, feed)[cur], rtol=1e-6)


def test_fold_and_canonicalize_replace_uses_inside_regions():
    """A folded/bypassed outer value read inside a branch is replaced there too."""
    then_b = h.make_graph([h.make_node("Add", ["x", "i"], ["s"])], "t", [], [h.make_tensor_value_info("s", T.FLOAT, [4])])
    else_b = h.make_graph([h.make_node("Mul", ["x", "i"], ["p"])], "e", [], [h.make_tensor_value_info("p", T.FLOAT, [4])])
    nodes = [h.make_node("Identity", ["w"], ["i"]), h.make_node("If", ["c"], ["y"], then_branch=then_b, else_branch=else_b)]
    w = nh.from_array(np.array([1, 2, 3, 4], np.float32), "w")
    m = import_model(_model(nodes, ["y"], [w], inputs=(("x", T.FLOAT, [4]), ("c", T.BOOL, []))))
    ref = import_model(_model(nodes, ["y"], [w], inputs=(("x", T.FLOAT, [4]), ("c", T.BOOL, []))))
    get_pass("canonicalize")(m)
    get_pass("dce")(m)
    verify(m)
    assert "Identity" not in [op.name for op in m.main.ops]
    for c in (True, False):
        feed = {"x": X, "c": np.array(c)}
        np.testing.assert_array_equal(_run(m, feed)["y"], _run(ref, feed)["y"])
