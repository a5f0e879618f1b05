"""If / Loop / Scan: nnc's reference interpreter vs onnxruntime, IR text round trip with nested
regions, verifier scoping inside regions. Bodies use only Identity, constants and outer-scope
references so they do not depend on other op families."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from onnx import TensorProto, helper

ort = pytest.importorskip("onnxruntime")

from nnc.ir import VerifyError, parse, print_module, verify  # noqa: E402
from nnc.ir.graph import Region  # noqa: E402
from nnc.onnx_backend import prepare  # noqa: E402
from nnc.onnx_import import import_model  # noqa: E402

F = TensorProto.FLOAT
vi = helper.make_tensor_value_info


def _model(nodes, ins, outs, opset=16):
    g = helper.make_graph(nodes, "g", ins, outs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _check(model, feeds):
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = prepare(model).run(feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (g.shape, w.shape)
        np.testing.assert_allclose(g, w, rtol=1e-5)


def _if_model(then_shape=(3,), else_shape=(3,)):
    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [],
                               [vi("t", F, list(then_shape))])
    else_g = helper.make_graph([helper.make_node("Identity", ["y"], ["e"])], "else", [],
                               [vi("e", F, list(else_shape))])
    node = helper.make_node("If", ["c"], ["r"], then_branch=then_g, else_branch=else_g)
    return _model([node], [vi("c", TensorProto.BOOL, []), vi("x", F, list(then_shape)),
                           vi("y", F, list(else_shape))], [vi("r", F, [None])])


@pytest.mark.parametrize("cond", [True, False])
def test_if_outer_scope(cond):
    rng = np.random.default_rng(0)
    feeds = {"c": np.array(cond), "x": rng.standard_normal(3).astype(np.float32),
             "y": rng.standard_normal(3).astype(np.float32)}
    _check(_if_model(), feeds)


def test_if_branches_with_different_dims():
    m = import_model(_if_model((3,), (4,)))
    verify(m)
    assert str(m.main.results[0].type) == "f32[?]"
    rng = np.random.default_rng(1)
    for c in (True, False):
        feeds = {"c": np.array(c), "x": rng.standard_normal(3).astype(np.float32),
                 "y": rng.standard_normal(4).astype(np.float32)}
        _check(_if_model((3,), (4,)), feeds)


def _loop_model(with_cond=True):
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Identity", ["v_in"], ["v_out"]),
         helper.make_node("Identity", ["i"], ["scan_i"]),
         helper.make_node("Identity", ["outer"], ["scan_outer"])],
        "body",
        [vi("i", TensorProto.INT64, []), vi("cond_in", TensorProto.BOOL, []), vi("v_in", F, [2])],
        [vi("cond_out", TensorProto.BOOL, []), vi("v_out", F, [2]), vi("scan_i", TensorProto.INT64, []),
         vi("scan_outer", F, [3])])
    node = helper.make_node("Loop", ["M", "cond" if with_cond else "", "v0"], ["v", "si", "so"], body=body)
    ins = [vi("M", TensorProto.INT64, []), vi("v0", F, [2]), vi("outer", F, [3])]
    if with_cond:
        ins.insert(1, vi("cond", TensorProto.BOOL, []))
    return _model([node], ins, [vi("v", F, [2]), vi("si", TensorProto.INT64, [None]), vi("so", F, [None, 3])])


@pytest.mark.parametrize("with_cond", [True, False])
def test_loop_carried_and_scan_outputs(with_cond):
    rng = np.random.default_rng(2)
    feeds = {"M": np.array(4, np.int64), "v0": rng.standard_normal(2).astype(np.float32),
             "outer": rng.standard_normal(3).astype(np.float32)}
    if with_cond:
        feeds["cond"] = np.array(True)
    _check(_loop_model(with_cond), feeds)


def test_loop_cond_false_runs_zero_times():
    feeds = {"M": np.array(4, np.int64), "cond": np.array(False), "v0": np.ones(2, np.float32),
             "outer": np.ones(3, np.float32)}
    v, si, so = prepare(_loop_model(True)).run(feeds)
    np.testing.assert_array_equal(v, feeds["v0"])
    assert si.shape == (0,) and so.shape == (0, 3)


def test_loop_constant_trip_count_gives_static_dim():
    m = _loop_model(False)
    m.graph.initializer.append(helper.make_tensor("M", TensorProto.INT64, [], [5]))
    del m.graph.input[0]
    mod = import_model(m)
    verify(mod)
    assert [str(v.type) for v in mod.main.results] == ["f32[2]", "i64[5]", "f32[5,3]"]


@pytest.mark.parametrize("dirs", [(0, 0), (1, 1)])
def test_scan_axes_and_directions(dirs):
    body = helper.make_graph(
        [helper.make_node("Identity", ["s_in"], ["s_out"]),
         helper.make_node("Identity", ["a"], ["ya"]),
         helper.make_node("Identity", ["b"], ["yb"])],
        "body", [vi("s_in", F, [2]), vi("a", F, [4]), vi("b", F, [4])],
        [vi("s_out", F, [2]), vi("ya", F, [4]), vi("yb", F, [4])])
    node = helper.make_node("Scan", ["s0", "A", "Bx"], ["s", "YA", "YB"], body=body, num_scan_inputs=2,
                            scan_input_axes=[0, 1], scan_input_directions=list(dirs),
                            scan_output_axes=[1, -2], scan_output_directions=[dirs[1], 0])
    model = _model([node], [vi("s0", F, [2]), vi("A", F, [5, 4]), vi("Bx", F, [4, 5])],
                   [vi("s", F, [2]), vi("YA", F, [None, None]), vi("YB", F, [None, None])])
    rng = np.random.default_rng(3)
    feeds = {"s0": rng.standard_normal(2).astype(np.float32), "A": rng.standard_normal((5, 4)).astype(np.float32),
             "Bx": rng.standard_normal((4, 5)).astype(np.float32)}
    _check(model, feeds)
    mod = import_model(model)
    assert [str(v.type) for v in mod.main.results] == ["f32[2]", "f32[4,5]", "f32[5,4]"]


# ---------------------------------------------------------------- IR text

NESTED = """\
func @main(%c: bool[], %m: i64[], %x: f32[N,3]) -> (f32[N,3], f32[?,N,3]) {
  %v, %s = Loop(%m, %c, %x) {body = region(%i: i64[], %ci: bool[], %vi: f32[N,3]) {
    %r = If(%ci) {then_branch = region() {
      %t = Identity(%vi) : f32[N,3]
      return %t
    }, else_branch = region() {
      return %x
    }} : f32[N,3]
    return %ci, %r, %vi
  }} : f32[N,3], f32[?,N,3]
  return %v, %s
}
"""


def _same_region(a: Region, b: Region, amap: dict):
    assert len(a.args) == len(b.args) and len(a.ops) == len(b.ops) and len(a.results) == len(b.results)
    for x, y in zip(a.args, b.args):
        assert x.name == y.name and x.type == y.type
        amap[id(x)] = y
    for oa, ob in zip(a.ops, b.ops):
        assert oa.name == ob.name and len(oa.operands) == len(ob.operands)
        for u, w in zip(oa.operands, ob.operands):
            assert (u is None and w is None) or amap[id(u)] is w
        for f in dataclasses.fields(oa.attrs):
            va, vb = getattr(oa.attrs, f.name), getattr(ob.attrs, f.name)
            if isinstance(va, Region):
                _same_region(va, vb, amap)
            elif isinstance(va, np.ndarray):
                assert np.array_equal(va, vb)
            else:
                assert va == vb
        for ra, rb in zip(oa.results, ob.results):
            assert ra.name == rb.name and ra.type == rb.type
            amap[id(ra)] = rb
    for x, y in zip(a.results, b.results):
        assert amap[id(x)] is y


def test_nested_regions_round_trip_and_run():
    m = parse(NESTED)
    verify(m)
    assert print_module(m) == NESTED
    m2 = parse(print_module(m))
    _same_region(m.main, m2.main, {})
    from nnc.ir import run
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = run(m, {"c": np.array(True), "m": np.array(3, np.int64), "x": x})
    np.testing.assert_array_equal(out["v"], x)
    assert out["s"].shape == (3, 2, 3)


def test_imported_nested_model_round_trip():
    inner_if = helper.make_node("If", ["cond_in"], ["r"],
                                then_branch=helper.make_graph([helper.make_node("Identity", ["v_in"], ["t"])],
                                                              "th", [], [vi("t", F, [2])]),
                                else_branch=helper.make_graph([helper.make_node("Identity", ["outer"], ["e"])],
                                                              "el", [], [vi("e", F, [2])]))
    body = helper.make_graph([helper.make_node("Identity", ["cond_in"], ["cond_out"]), inner_if],
                             "body", [vi("i", TensorProto.INT64, []), vi("cond_in", TensorProto.BOOL, []),
                                      vi("v_in", F, [2])],
                             [vi("cond_out", TensorProto.BOOL, []), vi("r", F, [2])])
    node = helper.make_node("Loop", ["M", "cond", "v0"], ["v"], body=body)
    model = _model([node], [vi("M", TensorProto.INT64, []), vi("cond", TensorProto.BOOL, []),
                            vi("v0", F, [2]), vi("outer", F, [2])], [vi("v", F, [2])])
    mod = import_model(model)
    verify(mod)
    text = print_module(mod)
    assert print_module(parse(text)) == text
    _same_region(mod.main, parse(text).main, {})
    feeds = {"M": np.array(3, np.int64), "cond": np.array(True), "v0": np.ones(2, np.float32),
             "outer": np.full(2, 7, np.float32)}
    _check(model, feeds)


def test_parser_rejects_undefined_value_in_region():
    bad = NESTED.replace("return %x\n", "return %nope\n")
    with pytest.raises(Exception, match="undefined value %nope"):
        parse(bad)


def test_verifier_catches_value_from_sibling_region():
    m = parse(NESTED)
    loop = m.main.ops[0]
    if_op = loop.attrs.body.ops[0]
    t_val = if_op.attrs.then_branch.ops[0].result  # defined in then_branch only
    if_op.attrs.else_branch.results[0] = t_val
    with pytest.raises(VerifyError, match="not defined"):
        verify(m)
    m = parse(NESTED)
    loop = m.main.ops[0]
    body = loop.attrs.body
    if_op = body.ops[0]
    # an op in the loop body reading a value only the inner then_branch defines
    body.ops[0].attrs.then_branch.ops[0].operands[0] = body.ops[0].result  # use before def
    with pytest.raises(VerifyError, match="used before it is defined"):
        verify(m)
