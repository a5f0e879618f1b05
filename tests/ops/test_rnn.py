"""RNN / GRU / LSTM: nnc's reference interpreter vs onnxruntime on fresh random inputs."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

ort = pytest.importorskip("onnxruntime")

from nnc.ir import parse, print_module, verify  # noqa: E402
from nnc.onnx_backend import prepare  # noqa: E402
from nnc.onnx_import import import_model  # noqa: E402

GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
S, B, I, H = 5, 3, 4, 6


def _model(kind, direction="forward", *, bias=True, seq_lens=False, init_h=False, init_c=False,
           peep=False, layout=0, outputs=("Y", "Y_h", "Y_c"), dims=(S, B), **attrs):
    nd = 2 if direction == "bidirectional" else 1
    g = GATES[kind]
    s, b = dims
    xshape = [s, b, I] if layout == 0 else [b, s, I]
    hshape = [nd, b, H] if layout == 0 else [b, nd, H]
    ins = [helper.make_tensor_value_info("X", TensorProto.FLOAT, xshape),
           helper.make_tensor_value_info("W", TensorProto.FLOAT, [nd, g * H, I]),
           helper.make_tensor_value_info("R", TensorProto.FLOAT, [nd, g * H, H])]
    names = ["X", "W", "R"]
    opt = [("B", bias, TensorProto.FLOAT, [nd, 2 * g * H]),
           ("sequence_lens", seq_lens, TensorProto.INT32, [b]),
           ("initial_h", init_h, TensorProto.FLOAT, hshape)]
    if kind == "LSTM":
        opt += [("initial_c", init_c, TensorProto.FLOAT, hshape), ("P", peep, TensorProto.FLOAT, [nd, 3 * H])]
    for name, use, dt, shp in opt:
        names.append(name if use else "")
        if use:
            ins.append(helper.make_tensor_value_info(name, dt, shp))
    while names[-1] == "":
        names.pop()
    outs_all = ["Y", "Y_h"] + (["Y_c"] if kind == "LSTM" else [])
    node_outs = [o if o in outputs else "" for o in outs_all]
    while node_outs[-1] == "":
        node_outs.pop()
    node = helper.make_node(kind, names, node_outs, hidden_size=H, direction=direction,
                            layout=layout, **attrs)
    yshape = [s, nd, b, H] if layout == 0 else [b, s, nd, H]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, yshape if o == "Y" else hshape)
            for o in node_outs if o]
    graph = helper.make_graph([node], "g", ins, outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)])


def _feeds(model, rng):
    feeds = {}
    for i in model.graph.input:
        shp = [d.dim_value for d in i.type.tensor_type.shape.dim]
        if i.type.tensor_type.elem_type == TensorProto.INT32:
            feeds[i.name] = rng.integers(1, S + 1, size=shp).astype(np.int32)
        else:
            feeds[i.name] = rng.standard_normal(shp).astype(np.float32) * 0.7
    return feeds


def _check(model, seed=0):
    rng = np.random.default_rng(seed)
    feeds = _feeds(model, rng)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, feeds)
    got = prepare(model).run(feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_directions_with_states_and_seq_lens(kind, direction):
    _check(_model(kind, direction, seq_lens=True, init_h=True, init_c=True, peep=True))


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_defaults_no_bias(kind):
    _check(_model(kind, bias=False))


def test_gru_linear_before_reset_bidirectional():
    _check(_model("GRU", "bidirectional", seq_lens=True, init_h=True, linear_before_reset=1))


def test_lstm_clip_input_forget_activations():
    _check(_model("LSTM", "bidirectional", init_h=True, clip=0.8, input_forget=1,
                  activations=["HardSigmoid", "Tanh", "Softsign", "Sigmoid", "LeakyRelu", "Tanh"],
                  activation_alpha=[0.3, 0.05], activation_beta=[0.4]))


def test_rnn_activation_relu_only_y_h():
    _check(_model("RNN", "bidirectional", activations=["Relu", "Tanh"], outputs=("Y_h",)))


def test_lstm_layout1_only_y_c():
    # onnxruntime rejects layout=1, so compare against layout 0 run on transposed data
    rng = np.random.default_rng(3)
    m1 = _model("LSTM", "bidirectional", layout=1, init_h=True, init_c=True)
    m0 = _model("LSTM", "bidirectional", layout=0, init_h=True, init_c=True)
    f1 = _feeds(m1, rng)
    f0 = dict(f1, X=f1["X"].transpose(1, 0, 2), initial_h=f1["initial_h"].transpose(1, 0, 2),
              initial_c=f1["initial_c"].transpose(1, 0, 2))
    y1, yh1, yc1 = prepare(m1).run(f1)
    y0, yh0, yc0 = ort.InferenceSession(m0.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, f0)
    np.testing.assert_allclose(y1, y0.transpose(2, 0, 1, 3), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(yh1, yh0.transpose(1, 0, 2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(yc1, yc0.transpose(1, 0, 2), rtol=1e-5, atol=1e-6)


def test_symbolic_shapes_and_round_trip():
    m = _model("LSTM", "bidirectional", init_h=True, dims=("seq", "batch"))
    mod = import_model(m)
    verify(mod)
    text = print_module(mod)
    assert "f32[seq,2,batch,6]" in text and "f32[2,batch,6]" in text
    assert print_module(parse(text)) == text
    verify(parse(text))
