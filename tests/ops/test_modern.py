"""Newest default-domain ops (LinearAttention, CausalConvWithState, DeformConv, SwiGLU) and the
ai.onnx.ml ops (Binarizer, ArrayFeatureExtractor, TreeEnsemble): nnc's reference vs onnxruntime
where it implements the op, else hand-computed cases and onnx's reference evaluator; IR round trip."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import nnc
from nnc.ir import Interpreter, parse, print_module, verify
from nnc.ir.equal import first_difference

ort = pytest.importorskip("onnxruntime")

NP2ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE,
           np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
           np.dtype(np.float16): TensorProto.FLOAT16}
N = helper.make_node
rng = np.random.default_rng(0)


def rnd(*shape, dt=np.float32):
    return rng.standard_normal(shape).astype(dt)


def make_model(nodes, inputs: dict, outputs: list, opset=27, ml=False):
    ins = [helper.make_tensor_value_info(k, NP2ONNX[v.dtype], list(v.shape)) for k, v in inputs.items()]
    outs = [helper.make_empty_tensor_value_info(o) for o in outputs]
    g = helper.make_graph(nodes, "g", ins, outs)
    ops = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("ai.onnx.ml", 5)] if ml else [])
    m = helper.make_model(g, opset_imports=ops, ir_version=10)
    m = onnx.shape_inference.infer_shapes(m)
    del m.graph.value_info[:]
    return m


def run_nnc(m, inputs):
    mod = nnc.import_onnx(m)
    verify(mod)
    out = Interpreter(mod).run(dict(inputs))
    return [out[v.name] for v in mod.main.results]


def compare(got, exp, rtol=1e-5, atol=1e-6):
    assert len(got) == len(exp)
    for g, e in zip(got, exp):
        assert g.dtype == e.dtype, (g.dtype, e.dtype)
        assert g.shape == e.shape, (g.shape, e.shape)
        np.testing.assert_allclose(g.astype(np.float64), e.astype(np.float64), rtol=rtol, atol=atol)


def check_ort(nodes, inputs, outputs, opset=27, ml=False, rtol=1e-5, atol=1e-6):
    m = make_model(nodes, inputs, outputs, opset, ml)
    got = run_nnc(m, inputs)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    compare(got, sess.run(None, dict(inputs)), rtol, atol)
    return m


def check_onnx_ref(nodes, inputs, outputs, opset=27, rtol=1e-5, atol=1e-6):
    from onnx.reference import ReferenceEvaluator
    m = make_model(nodes, inputs, outputs, opset)
    compare(run_nnc(m, inputs), ReferenceEvaluator(m).run(None, dict(inputs)), rtol, atol)
    return m


def round_trip(m):
    mod = nnc.import_onnx(m)
    verify(mod)
    text = print_module(mod)
    again = parse(text)
    verify(again)
    assert first_difference(mod, again) is None, first_difference(mod, again)
    assert print_module(again) == text


def l2n(x, h):
    b, t, hd = x.shape
    x4 = x.reshape(b, t, h, -1)
    return (x4 / np.linalg.norm(x4, axis=-1, keepdims=True)).reshape(b, t, hd).astype(x.dtype)


# ---------------------------------------------------------------- LinearAttention (vs onnxruntime)

@pytest.mark.parametrize("rule,hq,hkv,per_head,past", [
    ("linear", 2, 2, False, False), ("gated", 4, 2, False, True), ("gated", 2, 2, True, False),
    ("delta", 2, 1, False, True), ("gated_delta", 4, 2, False, True), ("gated_delta", 4, 4, True, False)])
def test_linear_attention(rule, hq, hkv, per_head, past):
    b, t, dk, dv = 2, 5, 4, 3
    ins = {"q": rnd(b, t, hq * dk), "k": l2n(rnd(b, t, hkv * dk), hkv), "v": rnd(b, t, hkv * dv)}
    names = ["q", "k", "v", "past" if past else "", "", ""]
    if past:
        ins["past"] = rnd(b, hkv, dk, dv) * np.float32(0.1)
    if rule in ("gated", "gated_delta"):
        ins["g"] = -np.abs(rnd(b, t, hkv if per_head else hkv * dk)) * np.float32(0.1)
        names[4] = "g"
    if rule in ("delta", "gated_delta"):
        ins["beta"] = rng.random((b, t, hkv)).astype(np.float32)
        names[5] = "beta"
    while names[-1] == "":
        names.pop()
    node = N("LinearAttention", names, ["y", "s"], q_num_heads=hq, kv_num_heads=hkv, update_rule=rule)
    check_ort([node], ins, ["y", "s"], rtol=1e-4, atol=1e-5)


def test_symbolic_shapes():
    f = TensorProto.FLOAT
    vi = helper.make_tensor_value_info
    g = helper.make_graph(
        [N("LinearAttention", ["q", "k", "v"], ["y", "s"], q_num_heads=2, kv_num_heads=1, update_rule="linear"),
         N("CausalConvWithState", ["x", "w"], ["cy", "cs"]),
         N("DeformConv", ["img", "dw", "off"], ["dy"], pads=[1, 1, 1, 1], strides=[2, 2])], "g",
        [vi("q", f, ["B", "T", 8]), vi("k", f, ["B", "T", 4]), vi("v", f, ["B", "T", 6]),
         vi("x", f, ["B", 3, "L"]), vi("w", f, [3, 1, 4]),
         vi("img", f, ["B", 2, "H", "W"]), vi("dw", f, [5, 2, 3, 3]), vi("off", f, ["B", 18, "OH", "OW"])],
        [helper.make_empty_tensor_value_info(o) for o in ("y", "s", "cy", "cs", "dy")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 27)], ir_version=10)
    mod = nnc.import_onnx(m)
    verify(mod)
    shapes = [tuple(str(d) for d in r.type.shape) for r in mod.main.results]
    assert shapes[0] == ("B", "T", "12") and shapes[1] == ("B", "1", "4", "6")
    assert shapes[2] == ("B", "3", "L") and shapes[3] == ("B", "3", "3")
    assert shapes[4][:2] == ("B", "5") and all("H" in d or "W" in d for d in shapes[4][2:]), shapes[4]
    round_trip(m)


# ---------------------------------------------------------------- DeformConv (vs onnxruntime)

@pytest.mark.parametrize("group,ogroup,mask,bias,pads,strides,dil", [
    (1, 1, False, False, (0, 0, 0, 0), (1, 1), (1, 1)),
    (2, 2, True, True, (1, 0, 1, 2), (2, 1), (1, 2)),
    (1, 2, True, False, (1, 1, 1, 1), (1, 1), (1, 1))])
def test_deform_conv(group, ogroup, mask, bias, pads, strides, dil):
    n, c, h, w, oc, kh, kw = 2, 4, 6, 7, 6, 3, 2
    oh = (h + pads[0] + pads[2] - ((kh - 1) * dil[0] + 1)) // strides[0] + 1
    ow = (w + pads[1] + pads[3] - ((kw - 1) * dil[1] + 1)) // strides[1] + 1
    ins = {"x": rnd(n, c, h, w), "w": rnd(oc, c // group, kh, kw),
           "off": rnd(n, ogroup * kh * kw * 2, oh, ow) * np.float32(1.5)}
    names = ["x", "w", "off"]
    if bias or mask:
        names.append("b" if bias else "")
        if bias:
            ins["b"] = rnd(oc)
    if mask:
        ins["m"] = rng.random((n, ogroup * kh * kw, oh, ow)).astype(np.float32)
        names.append("m")
    node = N("DeformConv", names, ["y"], kernel_shape=[kh, kw], pads=list(pads), strides=list(strides),
             dilations=list(dil), group=group, offset_group=ogroup)
    check_ort([node], ins, ["y"], opset=22, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- SwiGLU (onnxruntime lacks Swish-24)

def test_swiglu_hand():
    a = np.array([[0.0, 1.0, -2.0]], np.float32)
    b = np.array([[3.0, 2.0, 1.0]], np.float32)
    m = make_model([N("SwiGLU", ["a", "b"], ["y"], alpha=2.0)], {"a": a, "b": b}, ["y"], opset=28)
    y, = run_nnc(m, {"a": a, "b": b})
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    exp = np.array([[0.0, 1.0 * sig(2.0) * 2.0, -2.0 * sig(-4.0) * 1.0]], np.float32)
    compare([y], [exp])


@pytest.mark.parametrize("dt", [np.float32, np.float16])
def test_swiglu_vs_onnx_reference(dt):
    ins = {"a": rnd(3, 4, 5, dt=dt), "b": rnd(3, 4, 5, dt=dt)}
    tol = 1e-5 if dt == np.float32 else 2e-3
    check_onnx_ref([N("SwiGLU", ["a", "b"], ["y"], alpha=1.5)], ins, ["y"], opset=28, rtol=tol, atol=tol)


# ---------------------------------------------------------------- CausalConvWithState (no ORT kernel)

def test_causal_conv_hand():
    x = np.array([[[1.0, 2.0, 3.0]]], np.float32)  # B=1, C=1, L=3
    w = np.array([[[1.0, 10.0, 100.0]]], np.float32)  # k=3
    past = np.array([[[4.0, 5.0]]], np.float32)
    bias = np.array([0.5], np.float32)
    ins = {"x": x, "w": w, "bias": bias, "past": past}
    m = make_model([N("CausalConvWithState", ["x", "w", "bias", "past"], ["y", "s"])], ins, ["y", "s"])
    y, s = run_nnc(m, ins)
    # padded = [4, 5, 1, 2, 3]; y[l] = p[l] + 10 p[l+1] + 100 p[l+2] + 0.5
    compare([y, s], [np.array([[[4 + 50 + 100.5, 5 + 10 + 200.5, 1 + 20 + 300.5]]], np.float32),
                     np.array([[[2.0, 3.0]]], np.float32)])


@pytest.mark.parametrize("act,k,with_past,dt", [("none", 4, True, np.float32), ("silu", 3, False, np.float32),
                                                ("swish", 1, False, np.float32), ("silu", 4, True, np.float16)])
def test_causal_conv_vs_onnx_reference(act, k, with_past, dt):
    b, c, length = 2, 3, 6
    ins = {"x": rnd(b, c, length, dt=dt), "w": rnd(c, 1, k, dt=dt), "bias": rnd(c, dt=dt)}
    names = ["x", "w", "bias"]
    if with_past:
        ins["past"] = rnd(b, c, k - 1, dt=dt)
        names.append("past")
    tol = 1e-5 if dt == np.float32 else 5e-3
    check_onnx_ref([N("CausalConvWithState", names, ["y", "s"], activation=act)], ins, ["y", "s"],
                   rtol=tol, atol=tol)


# ---------------------------------------------------------------- ai.onnx.ml (vs onnxruntime)

def test_binarizer_and_array_feature_extractor():
    x = rnd(3, 5)
    idx = np.array([4, 0, 2, 2], np.int64)
    check_ort([N("Binarizer", ["x"], ["y"], domain="ai.onnx.ml", threshold=0.25),
               N("ArrayFeatureExtractor", ["x", "i"], ["z"], domain="ai.onnx.ml")],
              {"x": x, "i": idx}, ["y", "z"], opset=21, ml=True)
    check_ort([N("ArrayFeatureExtractor", ["x", "i"], ["z"], domain="ai.onnx.ml")],
              {"x": rnd(2, 3, 4), "i": np.array([[3, 1]], np.int64)}, ["z"], opset=21, ml=True)


def _tree_node(post=0, agg=1):
    # two trees over 3 features, 2 targets; tree 0: root 0 (LEQ f0) -> node 1 (GT f1) / leaf; tree 1: root 3
    return N("TreeEnsemble", ["x"], ["y"], domain="ai.onnx.ml", n_targets=2, aggregate_function=agg,
             post_transform=post, tree_roots=[0, 3],
             nodes_modes=helper.make_tensor("m", TensorProto.UINT8, (5,), [0, 3, 1, 2, 4]),
             nodes_featureids=[0, 1, 2, 2, 1],
             nodes_splits=helper.make_tensor("s", TensorProto.FLOAT, (5,), [0.1, -0.3, 0.5, 0.0, 7.0]),
             nodes_truenodeids=[1, 0, 2, 4, 3], nodes_trueleafs=[0, 1, 1, 0, 1],
             nodes_falsenodeids=[2, 1, 3, 4, 5], nodes_falseleafs=[0, 1, 1, 1, 1],
             leaf_targetids=[0, 1, 0, 1, 0, 1],
             leaf_weights=helper.make_tensor("w", TensorProto.FLOAT, (6,), [1.5, -2.0, 0.25, 3.0, 0.75, -1.0]))


@pytest.mark.parametrize("post,agg", [(0, 1), (0, 0), (0, 2), (0, 3), (3, 1)])
def test_tree_ensemble(post, agg):
    x = rnd(16, 3)
    check_ort([_tree_node(post, agg)], {"x": x}, ["y"], opset=21, ml=True, rtol=1e-5, atol=1e-6)


def test_tree_ensemble_post_transform():
    # onnxruntime 1.32 swaps SOFTMAX (1) and LOGISTIC (2) against the spec: check against the spec
    x = rnd(16, 3)
    raw, = run_nnc(make_model([_tree_node(0, 1)], {"x": x}, ["y"], opset=21, ml=True), {"x": x})
    r = raw.astype(np.float64)
    sm, = run_nnc(make_model([_tree_node(1, 1)], {"x": x}, ["y"], opset=21, ml=True), {"x": x})
    e = np.exp(r - r.max(1, keepdims=True))
    compare([sm], [(e / e.sum(1, keepdims=True)).astype(np.float32)])
    lg, = run_nnc(make_model([_tree_node(2, 1)], {"x": x}, ["y"], opset=21, ml=True), {"x": x})
    compare([lg], [(1 / (1 + np.exp(-r))).astype(np.float32)])


def test_tree_ensemble_membership_and_nan():
    node = N("TreeEnsemble", ["x"], ["y"], domain="ai.onnx.ml", n_targets=2, tree_roots=[0],
             nodes_modes=helper.make_tensor("m", TensorProto.UINT8, (2,), [6, 0]),
             nodes_featureids=[0, 0], nodes_splits=helper.make_tensor("s", TensorProto.FLOAT, (2,), [0, 1.0]),
             nodes_truenodeids=[0, 1], nodes_trueleafs=[1, 1], nodes_falsenodeids=[1, 2],
             nodes_falseleafs=[0, 1], nodes_missing_value_tracks_true=[0, 1],
             membership_values=helper.make_tensor("mv", TensorProto.FLOAT, (3,), [2.0, 5.0, np.nan]),
             leaf_targetids=[0, 1, 0], leaf_weights=helper.make_tensor("w", TensorProto.FLOAT, (3,), [1, 2, 4]))
    x = np.array([[2.0], [5.0], [0.5], [3.0], [np.nan]], np.float32)
    m = make_model([node], {"x": x}, ["y"], opset=21, ml=True)
    y, = run_nnc(m, {"x": x})
    # member {2, 5} -> leaf0 (t0 += 1); else LEQ 1 (NaN tracks true) -> leaf1 (t1 += 2) / leaf2 (t0 += 4)
    compare([y], [np.array([[1, 0], [1, 0], [0, 2], [4, 0], [0, 2]], np.float32)])
    round_trip(m)


# ---------------------------------------------------------------- IR text round trip

def test_round_trip():
    b, t, hq, hkv, dk, dv = 1, 3, 2, 1, 4, 2
    ins = {"q": rnd(b, t, hq * dk), "k": rnd(b, t, hkv * dk), "v": rnd(b, t, hkv * dv),
           "g": rnd(b, t, hkv), "beta": rnd(b, t, 1), "cx": rnd(1, 2, 5), "cw": rnd(2, 1, 3),
           "x": rnd(1, 2, 4, 4), "w": rnd(2, 2, 2, 2), "off": rnd(1, 8, 3, 3), "i": np.array([1], np.int64)}
    nodes = [N("LinearAttention", ["q", "k", "v", "", "g", "beta"], ["y", "s"], q_num_heads=hq,
               kv_num_heads=hkv, scale=0.5, chunk_size=16),
             N("CausalConvWithState", ["cx", "cw"], ["cy", "cs"], activation="silu"),
             N("DeformConv", ["x", "w", "off"], ["dy"], pads=[0, 0, 0, 0]),
             N("SwiGLU", ["cy", "cy"], ["sy"], alpha=1.702),
             N("Binarizer", ["cx"], ["by"], domain="ai.onnx.ml", threshold=0.5),
             N("ArrayFeatureExtractor", ["cx", "i"], ["az"], domain="ai.onnx.ml"),
             _tree_node(1, 0)]
    ins["x3"] = rnd(2, 3)
    nodes[-1].input[0] = "x3"
    m = make_model(nodes, ins, ["y", "s", "cy", "cs", "dy", "sy", "by", "az", "y_t"], opset=28, ml=True)
    m.graph.node[-1].output[0] = "y_t"
    round_trip(m)
    mod = nnc.import_onnx(m)
    out = Interpreter(mod).run(ins)
    assert out[mod.main.results[0].name].shape == (b, t, hq * dv)
