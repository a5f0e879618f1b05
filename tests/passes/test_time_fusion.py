"""time-fusion (compiler/passes/time_fusion.py): golden IR (text in -> text out) and the reference
interpreter giving the same outputs before and after on fresh random inputs, for LSTM / GRU / RNN
in every direction and option, the exporters' glue between stacked layers, zero initial states
built from the batch size, and the embedding Gather; plus NVRTC compiles of the whole pipeline's
output (CPU) and, on a GPU, the compiled models against the interpreter."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper as oh
from onnx import numpy_helper as nh

from nnc.driver import pipeline_passes
from nnc.ir import parse, print_module, verify
from nnc.ir.interp import Interpreter
from nnc.ir.weights import WeightStore
from nnc.onnx_import import import_model
from nnc.pipeline import DEFAULT_PIPELINE, Pipeline

from tests.codegen.test_rnn_cuda import rnn_model

RNN_OPS = ("LSTM", "GRU", "RNN")


def _ops(m):
    return [op.name for op in m.main.walk()]


def _operand(op, i):
    return op.operands[i] if i < len(op.operands) else None  # trailing omitted operands are dropped


def _feed(m, rng, batch=3):
    feed = {}
    for a in m.main.args:
        shape = [d if isinstance(d, int) else batch for d in a.type.shape]
        if a.type.dtype.is_float:
            feed[a.name] = rng.standard_normal(shape).astype(a.type.dtype.np)
        else:
            feed[a.name] = rng.integers(0, 5, shape).astype(a.type.dtype.np)
    return feed


def _close(before, after, rtol):
    assert list(before) == list(after)
    for k in before:
        b, a = before[k].astype(np.float64), after[k].astype(np.float64)
        assert a.shape == b.shape and after[k].dtype == before[k].dtype, k
        scale = max(1.0, float(np.abs(b).max())) if b.size else 1.0
        err = float(np.abs(a - b).max()) / scale if b.size else 0.0
        assert err <= rtol, f"{k}: max rel err {err:.3g} > {rtol}"


def _check(mod, rng, passes=("time-fusion",), rtol=1e-5, batch=3, fused=1):
    """Runs `passes` on mod; the interpreter's outputs before and after agree; returns the module."""
    feed = _feed(mod, rng, batch)
    before = Interpreter(mod).run(feed)
    Pipeline(list(passes), verify_each=True).run(mod)
    names = _ops(mod)
    assert names.count("recurrence") == fused, names
    if fused:
        assert not any(n in RNN_OPS for n in names), names
    text = print_module(mod)  # prints and parses losslessly
    again = parse(text)
    again.weights = mod.weights
    verify(again)
    assert print_module(again) == text
    _close(before, Interpreter(mod).run(feed), rtol)
    return mod


# ---------------------------------------------------------------- one cell, every option

CELLS = {
    "lstm_fwd": ("LSTM", {}),
    "lstm_reverse": ("LSTM", dict(direction="reverse", h0=True, c0=True)),
    "lstm_bidir": ("LSTM", dict(direction="bidirectional")),
    "lstm_fwd_peep": ("LSTM", dict(peep=True, c0=True)),
    "lstm_reverse_peep": ("LSTM", dict(direction="reverse", peep=True)),
    "lstm_bidir_peep_lens": ("LSTM", dict(direction="bidirectional", peep=True, lens=[5, 2, 0], h0=True, c0=True)),
    "lstm_clip": ("LSTM", dict(clip=0.3, direction="bidirectional")),
    "lstm_input_forget": ("LSTM", dict(input_forget=1, peep=True)),
    "lstm_lens_input": ("LSTM", dict(lens_input=True, outputs=("Y_h",))),
    "lstm_layout1": ("LSTM", dict(layout=1, direction="bidirectional", h0=True, c0=True, lens=[1, 5, 3])),
    "lstm_acts_per_direction": ("LSTM", dict(direction="bidirectional",
                                             activations=["Sigmoid", "Tanh", "Tanh", "HardSigmoid", "Elu", "Softsign"],
                                             activation_alpha=[0.3, 0.9], activation_beta=[0.4])),
    "gru_lbr0": ("GRU", dict(direction="bidirectional", lens=[5, 3, 1], h0=True)),
    "gru_lbr1": ("GRU", dict(linear_before_reset=1, direction="bidirectional", clip=1.5)),
    "gru_lbr1_layout1": ("GRU", dict(linear_before_reset=1, layout=1, h0=True)),
    "gru_lbr1_nobias": ("GRU", dict(linear_before_reset=1, bias=False, direction="reverse")),
    "gru_leaky": ("GRU", dict(activations=["Sigmoid", "LeakyRelu"], activation_alpha=[0.2])),
    "rnn_tanh": ("RNN", dict(h0=True, direction="bidirectional")),
    "rnn_relu": ("RNN", dict(activations=["Relu"], lens=[4, 5, 2], layout=1)),
    "lstm_fp16": ("LSTM", dict(direction="bidirectional", dt=np.float16, h0=True, peep=True)),
}


@pytest.mark.parametrize("name", list(CELLS))
def test_cell_same_outputs(name, rng):
    kind, kw = CELLS[name]
    m, _ = rnn_model(kind, **kw)
    fp16 = kw.get("dt") is np.float16
    mod = _check(import_model(m), rng, rtol=2e-3 if fp16 else 1e-5)
    rec = next(op for op in mod.main.ops if op.name == "recurrence")
    assert rec.attrs.kind == kind
    assert (rec.attrs.body_backward is not None) == (name == "lstm_acts_per_direction")
    # the projection is one Gemm over all steps and directions, biases folded into its C operand
    g = rec.operands[0].producer.operands[0].producer
    assert g.name == "Gemm" and len(g.operands) == (3 if kw.get("bias", True) else 2)
    assert (_operand(rec, 2) is not None) == (kind == "GRU" and bool(kw.get("linear_before_reset"))
                                             and kw.get("bias", True))


def test_unsupported_activation_is_left_alone(rng):
    m, _ = rnn_model("RNN", activations=["Affine"], activation_alpha=[0.5], activation_beta=[0.1])
    mod = _check(import_model(m), rng, fused=0)
    assert "RNN" in _ops(mod)


def test_runtime_weights_are_left_alone(rng):
    x = oh.make_tensor_value_info("x", T.FLOAT, [4, 2, 3])
    w = oh.make_tensor_value_info("W", T.FLOAT, [1, 6, 3])
    r = oh.make_tensor_value_info("R", T.FLOAT, [1, 6, 2])
    node = oh.make_node("GRU", ["x", "W", "R"], ["Y"], hidden_size=2, linear_before_reset=1)
    g = oh.make_graph([node], "g", [x, w, r], [oh.make_tensor_value_info("Y", T.FLOAT, None)])
    mod = _check(import_model(oh.make_model(g, opset_imports=[oh.make_opsetid("", 14)])), rng, fused=0)
    assert "GRU" in _ops(mod)


# ---------------------------------------------------------------- what surrounds the RNN

def torch_stacked_lstm(S=6, B=3, I=5, H=4, batch_dim=None, seed=0, gather_vocab=0, batch_first=False):
    """torch.onnx-style nn.LSTM(I, H, num_layers=2) with layer 0 bidirectional: the initial states
    zeros(3, B, H) from Shape(x) -> Gather(1) -> Concat -> ConstantOfShape(0), each layer's
    sliced out of it (as torch exports hx = None), Y [S,2,B,H] -> Transpose(0,2,1,3) ->
    Reshape [S,B,2H] into layer 1, whose Y [S,1,B,H] -> Squeeze(1). batch_dim: a symbol for B.
    gather_vocab: x comes from an embedding Gather(table [V, I], ids [S, B]). batch_first: the model
    takes [B, S, I] and returns [B, S, H] through Transpose(1, 0, 2) on both sides, as torch exports
    nn.LSTM(batch_first=True)."""
    r = np.random.default_rng(seed)
    w = lambda *s: (r.standard_normal(s) * 0.4).astype(np.float32)  # noqa: E731
    b = batch_dim or B
    i64 = lambda n, v: nh.from_array(np.asarray(v, np.int64), n)  # noqa: E731
    inits = [nh.from_array(w(2, 4 * H, I), "W0"), nh.from_array(w(2, 4 * H, H), "R0"),
             nh.from_array(w(2, 8 * H), "B0"), nh.from_array(w(1, 4 * H, 2 * H), "W1"),
             nh.from_array(w(1, 4 * H, H), "R1"), nh.from_array(w(1, 8 * H), "B1"),
             i64("one", [1]), i64("two", [2]), i64("hid", [H]), i64("perm_shape", [0, 0, -1]),
             i64("ax1", [1]), i64("ax0", [0]), i64("three", [3])]
    nodes = []
    if gather_vocab:
        inits.append(nh.from_array(w(gather_vocab, I), "table"))
        nodes.append(oh.make_node("Gather", ["table", "ids"], ["x"], axis=0))
        ins = [oh.make_tensor_value_info("ids", T.INT64, [S, b])]
    elif batch_first:
        ins = [oh.make_tensor_value_info("xb", T.FLOAT, [b, S, I])]
        nodes.append(oh.make_node("Transpose", ["xb"], ["x"], perm=[1, 0, 2]))
    else:
        ins = [oh.make_tensor_value_info("x", T.FLOAT, [S, b, I])]
    zero = oh.make_tensor("zero", T.FLOAT, [1], [0.0])
    nodes += [
        oh.make_node("Shape", ["x"], ["xs"]),
        oh.make_node("Gather", ["xs", "ax1"], ["nb"], axis=0),
        oh.make_node("Concat", ["three", "nb", "hid"], ["s0"], axis=0),
        oh.make_node("ConstantOfShape", ["s0"], ["hx"], value=zero),
        oh.make_node("Slice", ["hx", "ax0", "two", "ax0"], ["h0"]),
        oh.make_node("Slice", ["hx", "ax0", "two", "ax0"], ["c0"]),
        oh.make_node("LSTM", ["x", "W0", "R0", "B0", "", "h0", "c0"], ["Y0", "Yh0", "Yc0"], hidden_size=H,
                     direction="bidirectional"),
        oh.make_node("Transpose", ["Y0"], ["Y0t"], perm=[0, 2, 1, 3]),
        oh.make_node("Reshape", ["Y0t", "perm_shape"], ["x1"]),
        oh.make_node("Slice", ["hx", "two", "three", "ax0"], ["h1"]),
        oh.make_node("LSTM", ["x1", "W1", "R1", "B1", "", "h1", "h1"], ["Y1", "Yh1", "Yc1"], hidden_size=H),
        oh.make_node("Squeeze", ["Y1", "ax1"], ["out_sb" if batch_first else "out"]),
    ]
    if batch_first:
        nodes.append(oh.make_node("Transpose", ["out_sb"], ["out"], perm=[1, 0, 2]))
    outs = [oh.make_tensor_value_info("out", T.FLOAT, None), oh.make_tensor_value_info("Yh0", T.FLOAT, None)]
    g = oh.make_graph(nodes, "stacked", ins, outs, inits)
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 14)])


@pytest.mark.parametrize("batch", ["static", "symbolic"])
def test_torch_stacked_lstm_glue_and_zero_states(batch, rng):
    m = torch_stacked_lstm(batch_dim=None if batch == "static" else "N")
    ref = import_model(m)
    feed = _feed(ref, rng)
    want = Interpreter(ref).run(feed)
    mod = import_model(m)
    Pipeline(pipeline_passes("fp32"), verify_each=True).run(mod)
    names = _ops(mod)
    recs = [op for op in mod.main.ops if op.name == "recurrence"]
    assert len(recs) == 2
    # the glue became layouts, the zero states zero-initialisation
    assert [r.attrs.y_layout for r in recs] == ["sbdh", "sbdh"]
    assert not {"Transpose", "Squeeze", "ConstantOfShape", "Shape", "Slice", "LSTM"} & set(names), names
    assert all(_operand(r, 4) is None and _operand(r, 5) is None for r in recs)
    # layer 1 reads layer 0's Y directly (through its projection: a MatMul, or since fuse-epilogue
    # takes symbolic GEMMs too, a fused GEMM + bias group)
    assert recs[0].results[0] is recs[1].operands[0].producer.operands[0].producer.operands[0] \
        or any(recs[0].results[0] in op.operands for op in mod.main.ops if op.name in ("MatMul", "Reshape", "fused"))
    _close(want, Interpreter(mod).run(feed), 1e-5)


def test_torch_batch_first_transposes_fold(rng):
    m = torch_stacked_lstm(batch_first=True)
    ref = import_model(m)
    feed = _feed(ref, rng)
    want = Interpreter(ref).run(feed)
    mod = import_model(m)
    Pipeline(pipeline_passes("fp32"), verify_each=True).run(mod)
    recs = [op for op in mod.main.ops if op.name == "recurrence"]
    assert [(r.attrs.g_layout, r.attrs.y_layout) for r in recs] == [("bs", "sbdh"), ("", "bsdh")]
    assert "Transpose" not in _ops(mod)
    _close(want, Interpreter(mod).run(feed), 1e-5)


def test_glue_that_splits_an_axis_stays(rng):
    """Y [S,1,B,H] -> Reshape [S,B,H/2,2] splits H: not a layout of Y, the chain is kept."""
    m, _ = rnn_model("LSTM", H=6)
    g = m.graph
    g.initializer.append(nh.from_array(np.array([5, 3, 3, 2], np.int64), "split_shape"))
    g.node.append(oh.make_node("Reshape", ["Y", "split_shape"], ["Ys"]))
    del g.output[:]
    g.output.append(oh.make_tensor_value_info("Ys", T.FLOAT, None))
    mod = _check(import_model(m), rng)
    rec = next(op for op in mod.main.ops if op.name == "recurrence")
    assert rec.attrs.y_layout == "" and "Reshape" in _ops(mod)


def test_glue_on_a_graph_output_folds(rng):
    mod = _check(import_model(with_glue(rnn_model("GRU", direction="bidirectional", H=12)[0])), rng)
    rec = next(op for op in mod.main.ops if op.name == "recurrence")
    assert rec.attrs.y_layout == "sbdh" and rec.results[0].name == "Ysbdh"


def two_direction_ops(kind="LSTM", S=5, B=3, I=4, H=6, seed=0, state_users=True, **attrs):
    """A bidirectional layer written as two ops (forward, reverse) on one X whose Ys are
    squeezed and concatenated on the last axis, their Y_h concatenated on axis 0."""
    r = np.random.default_rng(seed)
    w = lambda *s: (r.standard_normal(s) * 0.4).astype(np.float32)  # noqa: E731
    g = {"LSTM": 4, "GRU": 3, "RNN": 1}[kind]
    inits = [nh.from_array(np.asarray([1], np.int64), "ax1")]
    nodes = []
    for d in ("forward", "reverse"):
        inits += [nh.from_array(w(1, g * H, I), f"W_{d}"), nh.from_array(w(1, g * H, H), f"R_{d}"),
                  nh.from_array(w(1, 2 * g * H), f"B_{d}")]
        nodes += [oh.make_node(kind, ["x", f"W_{d}", f"R_{d}", f"B_{d}"], [f"Y_{d}", f"Yh_{d}"], hidden_size=H,
                               direction=d, **attrs),
                  oh.make_node("Squeeze", [f"Y_{d}", "ax1"], [f"y_{d}"])]
    nodes.append(oh.make_node("Concat", ["y_forward", "y_reverse"], ["y"], axis=2))
    outs = [oh.make_tensor_value_info("y", T.FLOAT, None)]
    if state_users == "separate":
        outs += [oh.make_tensor_value_info(n, T.FLOAT, None) for n in ("Yh_forward", "Yh_reverse")]
    elif state_users:
        nodes.append(oh.make_node("Concat", ["Yh_forward", "Yh_reverse"], ["h_n"], axis=0))
        outs.append(oh.make_tensor_value_info("h_n", T.FLOAT, None))
    graph = oh.make_graph(nodes, "pair", [oh.make_tensor_value_info("x", T.FLOAT, [S, B, I])], outs, inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 14)])


@pytest.mark.parametrize("kind, attrs", [("LSTM", {}), ("GRU", dict(linear_before_reset=1)),
                                         ("RNN", dict(activations=["LeakyRelu"], activation_alpha=[0.3]))])
@pytest.mark.parametrize("state_users", [True, False, "separate"])
def test_forward_and_reverse_ops_become_one_bidirectional(kind, attrs, state_users, rng):
    m = two_direction_ops(kind, state_users=state_users, **attrs)
    ref = import_model(m)
    feed = _feed(ref, rng)
    want = Interpreter(ref).run(feed)
    mod = import_model(m)
    Pipeline(pipeline_passes("fp32"), verify_each=True).run(mod)
    recs = [op for op in mod.main.ops if op.name == "recurrence"]
    assert len(recs) == 1 and recs[0].attrs.direction == "bidirectional" and recs[0].attrs.y_layout == "sbdh"
    assert recs[0].results[0].name == "y" and "Squeeze" not in _ops(mod)
    assert [op.name for op in mod.main.ops].count("Gemm") == 1  # one projection for both
    # h_n = Concat(Y_h fwd, Y_h rev) is the merged Y_h; Y_h read one by one: slices of it
    assert "Concat" not in _ops(mod) and _ops(mod).count("Slice") == (2 if state_users == "separate" else 0)
    _close(want, Interpreter(mod).run(feed), 1e-5)


def test_direction_pair_joined_otherwise_stays_two(rng):
    m = two_direction_ops("GRU", linear_before_reset=1)
    cat = next(n for n in m.graph.node if n.output[0] == "y")
    cat.attribute[0].i = 0  # [2S, B, H]: not a bidirectional layer's Y
    mod = _check(import_model(m), rng, passes=pipeline_passes("fp32"), fused=2)
    assert all(op.attrs.direction != "bidirectional" for op in mod.main.ops if op.name == "recurrence")


def test_embedding_gather_becomes_a_gather_of_the_projected_table(rng):
    m = torch_stacked_lstm(gather_vocab=11)
    ref = import_model(m)
    feed = {"ids": rng.integers(-11, 11, (6, 3)).astype(np.int64)}  # negative ids count from the end
    want = Interpreter(ref).run(feed)
    mod = import_model(m)
    Pipeline(pipeline_passes("fp32"), verify_each=True).run(mod)
    recs = [op for op in mod.main.ops if op.name == "recurrence"]
    g0 = recs[0].operands[0].producer
    assert g0.name == "Gather" and g0.operands[0].type.shape == (11, 2 * 4 * 4)
    assert "table" not in {op.results[0].name for op in mod.main.ops}  # the raw table is gone
    _close(want, Interpreter(mod).run(feed), 1e-5)


def test_pipeline_order():
    assert "time-fusion" in DEFAULT_PIPELINE
    fp32 = pipeline_passes("fp32")
    assert fp32.index("simplify") < fp32.index("time-fusion") < fp32.index("fuse-epilogue")
    fp16 = pipeline_passes("fp16")
    assert fp16.index("to-fp16") < fp16.index("time-fusion") < fp16.index("assign-layout")


def test_fp16_pipeline_keeps_the_storage_dtype(rng):
    m = torch_stacked_lstm()
    ref = import_model(m)
    feed = _feed(ref, rng)
    want = Interpreter(ref).run(feed)
    mod = import_model(m)
    Pipeline(pipeline_passes("fp16"), verify_each=True).run(mod)
    recs = [op for op in mod.main.ops if op.name == "recurrence"]
    assert len(recs) == 2 and all(r.operands[0].type.dtype.short == "f16" for r in recs)
    _close(want, Interpreter(mod).run(feed), 1e-2)


# ---------------------------------------------------------------- golden IR

GOLDEN_IN = """func @main(%x: f32[2,1,1]) -> (f32[2,1,1]) {
  %W = const() {value = dense<[0.5, -1.0, 0.25, 2.0]> : f32[1,4,1]} : f32[1,4,1]
  %R = const() {value = dense<[1.0, 0.5, -0.5, 0.75]> : f32[1,4,1]} : f32[1,4,1]
  %B = const() {value = dense<[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]> : f32[1,8]} : f32[1,8]
  %s = const() {value = dense<[1, 1, 1]> : i64[3]} : i64[3]
  %h0 = ConstantOfShape(%s) {value = dense<[0.0]> : f32[1]} : f32[1,1,1]
  %ax = const() {value = dense<[1]> : i64[1]} : i64[1]
  %Y, %Yh = LSTM(%x, %W, %R, %B, none, %h0, %h0) {hidden_size = 1} : f32[2,1,1,1], f32[1,1,1]
  %y = Squeeze(%Y, %ax) : f32[2,1,1]
  return %y
}
"""

GOLDEN_OUT = """func @main(%x: f32[2,1,1]) -> (f32[2,1,1]) {
  %R = const() {value = dense<[1.0, 0.5, -0.5, 0.75]> : f32[1,4,1]} : f32[1,4,1]
  %Y.wcat = const() {value = dense<[0.5, -1.0, 0.25, 2.0]> : f32[1,4]} : f32[1,4]
  %Y.bcat = const() {value = dense<[0.6, 0.8, 1.0, 1.2]> : f32[4]} : f32[4]
  %0 = const() {value = dense<[2, 1]> : i64[2]} : i64[2]
  %Y.x2d = Reshape(%x, %0) : f32[2,1]
  %Y.proj2d = Gemm(%Y.x2d, %Y.wcat, %Y.bcat) : f32[2,4]
  %1 = const() {value = dense<[2, 1, 4]> : i64[3]} : i64[3]
  %Y.proj = Reshape(%Y.proj2d, %1) : f32[2,1,4]
  %y = recurrence(%Y.proj, %R) {body = region(%g: f32[1,4], %h: f32[1,1], %c: f32[1,1], %r: f32[4,1]) {
    %hr = Gemm(%h, %r) {transB = 1} : f32[1,4]
    %gates = Add(%g, %hr) : f32[1,4]
    %gi, %go, %gf, %gc = Split(%gates) {axis = 1, num_outputs = 4} : f32[1,1], f32[1,1], f32[1,1], f32[1,1]
    %i = Sigmoid(%gi) : f32[1,1]
    %f = Sigmoid(%gf) : f32[1,1]
    %cbar = Tanh(%gc) : f32[1,1]
    %2 = Mul(%f, %c) : f32[1,1]
    %3 = Mul(%i, %cbar) : f32[1,1]
    %c_next = Add(%2, %3) : f32[1,1]
    %o = Sigmoid(%go) : f32[1,1]
    %4 = Tanh(%c_next) : f32[1,1]
    %h_next = Mul(%o, %4) : f32[1,1]
    return %h_next, %c_next
  }, kind = "LSTM", hidden_size = 1, y_layout = "sbdh"} : f32[2,1,1]
  return %y
}
"""


def test_golden(rng):
    m = parse(GOLDEN_IN)
    m.weights = WeightStore()
    verify(m)
    feed = _feed(m, rng)
    before = Interpreter(m).run(feed)
    Pipeline(["time-fusion"], verify_each=True).run(m)
    assert print_module(m) == GOLDEN_OUT
    _close(before, Interpreter(m).run(feed), 1e-6)


# ---------------------------------------------------------------- CUDA (NVRTC on the CPU; GPU)

def with_glue(m):
    """m's output Y [S,D,B,H] through torch's Transpose(0,2,1,3) -> Reshape [S,B,D*H] instead."""
    g = m.graph
    g.initializer.append(nh.from_array(np.array([0, 0, -1], np.int64), "glue_shape"))
    g.node.extend([oh.make_node("Transpose", ["Y"], ["Yt"], perm=[0, 2, 1, 3]),
                   oh.make_node("Reshape", ["Yt", "glue_shape"], ["Ysbdh"])])
    outs = [o for o in g.output if o.name != "Y"]
    del g.output[:]
    g.output.extend([oh.make_tensor_value_info("Ysbdh", T.FLOAT, None)] + outs)
    return m


def y_h_only(m):
    """m's node without its Y output (ONNX: ""), the graph returning only Y_h (an encoder)."""
    m.graph.node[0].output[0] = ""
    keep = [o for o in m.graph.output if o.name != "Y"]
    del m.graph.output[:]
    m.graph.output.extend(keep)
    return m


COMPILE_CASES = {
    "stacked_lstm": lambda: torch_stacked_lstm(S=8, B=4, I=16, H=32),
    "gru_lbr0_bidir": lambda: rnn_model("GRU", direction="bidirectional", lens=[5, 3, 1], h0=True)[0],
    "gru_lbr1_layout1": lambda: rnn_model("GRU", linear_before_reset=1, layout=1, h0=True, H=16)[0],
    "lstm_layout1_peep": lambda: rnn_model("LSTM", layout=1, direction="bidirectional", peep=True, h0=True, c0=True,
                                           lens=[2, 5, 4], H=16)[0],
    "rnn_h70": lambda: rnn_model("RNN", Bn=11, H=70, h0=True)[0],
    # the fallback variant (warp-per-item step kernel) with y_layout and with rbh
    "gru_lbr0_bidir_glue": lambda: with_glue(rnn_model("GRU", direction="bidirectional", h0=True, H=12)[0]),
    "gru_lbr1_h70_glue": lambda: with_glue(rnn_model("GRU", linear_before_reset=1, direction="bidirectional",
                                                     layout=0, H=70, lens=[5, 1, 3])[0]),
    "embedding_lstm": lambda: torch_stacked_lstm(S=8, B=4, I=16, H=32, gather_vocab=50),
    "batch_first_lstm": lambda: torch_stacked_lstm(S=8, B=4, I=16, H=32, batch_first=True),
    "two_direction_gru": lambda: two_direction_ops("GRU", H=16, linear_before_reset=1),
    "lstm_yh_only": lambda: y_h_only(rnn_model("LSTM", outputs=("Y", "Y_h"), H=16, direction="bidirectional")[0]),
    "gru_yh_only": lambda: y_h_only(rnn_model("GRU", outputs=("Y", "Y_h"), H=16, lens=[5, 2, 4])[0]),
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    import nnc
    out = {}
    for name, make in COMPILE_CASES.items():
        for prec in ("fp32", "fp16"):
            d = tmp_path_factory.mktemp(f"{name}_{prec}")
            nnc.compile(make(), out=str(d), backend="reference", codegen=True, precision=prec).close()
            out[name, prec] = d
    return out


@pytest.mark.parametrize("prec", ["fp32", "fp16"])
@pytest.mark.parametrize("name", list(COMPILE_CASES))
def test_compiles_nvrtc_with_separate_launches(compiled, name, prec):
    import json
    d = compiled[name, prec]
    plan = json.loads((d / "plan.json").read_text())
    assert "time-fusion" in plan["passes"]
    ops = [l.get("op", "") for l in plan["launches"]]
    rec = [o for o in ops if "= recurrence(" in o]
    assert rec, ops
    # the projection is its own GEMM launch (or, embedding, a Gather), named by its IR op
    assert any(("Gemm(" in o or "MatMul(" in o or "= Gather(" in o or "fused(" in o) and ".proj" in o
               for o in ops), ops
    assert not any("= LSTM(" in o or "= GRU(" in o or "= RNN(" in o or "Transpose(" in o for o in ops), ops
    assert list(d.glob("model.*.cubin")), "NVRTC wrote no cubin"


def test_stepwise_option_lowers_one_launch_a_step():
    from nnc.codegen.lower import lower
    from nnc.codegen.options import LowerOptions
    from nnc.codegen.target import resolve_target
    mod = import_model(COMPILE_CASES["stacked_lstm"]())
    Pipeline(pipeline_passes("fp32")).run(mod)
    plan = lower(mod, LowerOptions(resolve_target("sm_90"), "fp32", False, rnn_stepwise=True))
    steps = [l for l in plan.launches if "= recurrence(" in l.op and "_step" in (l.kernel or "")]
    assert len(steps) == 2 * 8 and not any(l.kernel.startswith("nnc_coop_") for l in steps)


@pytest.mark.gpu
@pytest.mark.parametrize("prec", ["fp32", "fp16"])
@pytest.mark.parametrize("name", list(COMPILE_CASES))
def test_gpu_matches_interpreter(compiled, name, prec, rng):
    """The GPU against the reference interpreter of the same compiled directory (same IR, same
    precision: what the kernels must compute), on fresh inputs, outputs poisoned first."""
    import nnc
    d = str(compiled[name, prec])
    gpu, ref = nnc.load(d), nnc.load(d, backend="reference")
    ids = [a for a in ref.inputs if a.name == "ids"]
    for _ in range(2):  # twice: the persistent kernel's sync words must be reset per run
        feed = {}
        for a in ref.inputs:
            shape = [int(x) for x in a.shape]
            feed[a.name] = (rng.integers(0, 50, shape).astype(np.int64) if ids and a.name == "ids"
                            else rng.standard_normal(shape).astype(a.dtype))
        want = ref.run(feed, output="numpy")
        got = gpu.run(feed, output="numpy", poison=True)
        _close(want, {k: got[k] for k in want}, 1e-2 if prec == "fp16" else 1e-3)


# ---------------------------------------------------------------- ONNX's node cases, weights bound

def _node_cases():
    from tests.conformance.node_suite import load_cases
    return [c for c in load_cases(("_lstm", "_gru", "_rnn")) if c.name.startswith("test_")]


@pytest.mark.parametrize("case", _node_cases(), ids=lambda c: c.name)
def test_node_suite_cases_through_the_pass(case):
    """The ONNX node cases for LSTM / GRU / RNN with W, R, B (and P) bound as constants, so the
    pass rewrites them: the default pipeline's output matches ONNX's expected outputs."""
    from tests.conformance.node_suite import _arrays, compare
    names = [i.name for i in case.model.graph.input]
    for inputs, expected in case.data_sets:
        inputs, expected = _arrays(inputs), _arrays(expected)
        feed = dict(zip(names, inputs))
        weights = {k: feed.pop(k) for k in ("W", "R", "B", "P") if k in feed}
        mod = import_model(case.model, constants=weights)
        Pipeline(pipeline_passes("fp32"), verify_each=True).run(mod)
        assert "recurrence" in _ops(mod) and not set(RNN_OPS) & set(_ops(mod))
        got = Interpreter(mod).run(feed)
        for g, e in zip(got.values(), expected):
            assert not compare(g, e, case.rtol, case.atol), compare(g, e, case.rtol, case.atol)


# ---------------------------------------------------------------- randomised configurations

def _random_config(r):
    kind = ["LSTM", "GRU", "RNN"][r.integers(3)]
    kw = dict(direction=["forward", "reverse", "bidirectional"][r.integers(3)], layout=int(r.integers(2)),
              S=int(r.integers(1, 6)), Bn=int(r.integers(1, 5)), I=int(r.integers(1, 7)), H=int(r.integers(1, 9)),
              bias=bool(r.integers(2)), h0=bool(r.integers(2)), seed=int(r.integers(1000)))
    if r.integers(2):
        kw["clip"] = float(r.uniform(0.2, 2.0))
    if r.integers(3) == 0:
        kw["lens"] = [int(x) for x in r.integers(0, kw["S"] + 1, kw["Bn"])]
    if kind == "LSTM":
        kw.update(c0=bool(r.integers(2)), peep=bool(r.integers(2)), input_forget=int(r.integers(2)))
    if kind == "GRU":
        kw["linear_before_reset"] = int(r.integers(2))
    if kind == "RNN" and r.integers(2):
        kw["activations"] = ["Relu"]
    return kind, kw


@pytest.mark.parametrize("seed", range(40))
def test_random_configurations(seed, rng):
    kind, kw = _random_config(np.random.default_rng(seed))
    m, _ = rnn_model(kind, **kw)
    glue = kw["layout"] == 0 and np.random.default_rng(seed + 1000).integers(2)
    _check(import_model(with_glue(m) if glue else m), rng, passes=pipeline_passes("fp32"), rtol=1e-5)


def test_unread_y_is_not_written(tmp_path):
    """An encoder that passes on only Y_h: the recurrence keeps Y as result 0 but no kernel writes it."""
    import json
    import nnc
    for kind, kw in (("LSTM", {}), ("GRU", {})):  # persistent and fallback variants
        m = y_h_only(rnn_model(kind, outputs=("Y", "Y_h"), H=16, **kw)[0])
        d = tmp_path / kind
        nnc.compile(m, out=str(d), backend="reference", codegen=True).close()
        plan = json.loads((d / "plan.json").read_text())
        rec = [k for k in plan["kernels"] if k["name"].startswith("nnc_coop_")]
        assert rec and all(k["params"].get("has_y") is False for k in rec), [k["params"].get("has_y") for k in rec]
        ref = nnc.load(str(d), backend="reference")  # the plan in its arena still gives Y_h
        feed = {a.name: np.random.default_rng(0).standard_normal([int(x) for x in a.shape]).astype(a.dtype)
                for a in ref.inputs}
        want = Interpreter(import_model(m)).run(feed)
        _close(want, ref.run(feed, output="numpy"), 1e-5)


def test_layer_reading_the_batch_major_glue_of_the_layer_before(rng):
    """Layer 0's Y -> Transpose(0,2,1,3) -> Reshape -> Transpose(1,0,2) ([B,S,2H], folded into its
    y_layout bsdh) feeds a layout-1 layer: the second layer must not fold that Transpose again."""
    S, B, I, H = 5, 3, 4, 6
    r = np.random.default_rng(0)
    w = lambda *s: (r.standard_normal(s) * 0.4).astype(np.float32)  # noqa: E731
    inits = [nh.from_array(w(2, 4 * H, I), "W0"), nh.from_array(w(2, 4 * H, H), "R0"),
             nh.from_array(w(1, 4 * H, 2 * H), "W1"), nh.from_array(w(1, 4 * H, H), "R1"),
             nh.from_array(np.array([0, 0, -1], np.int64), "shp")]
    nodes = [oh.make_node("LSTM", ["x", "W0", "R0"], ["Y0"], hidden_size=H, direction="bidirectional"),
             oh.make_node("Transpose", ["Y0"], ["t0"], perm=[0, 2, 1, 3]),
             oh.make_node("Reshape", ["t0", "shp"], ["r0"]),
             oh.make_node("Transpose", ["r0"], ["x1"], perm=[1, 0, 2]),
             oh.make_node("LSTM", ["x1", "W1", "R1"], ["Y1"], hidden_size=H, layout=1)]
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", T.FLOAT, [S, B, I])],
                      [oh.make_tensor_value_info("Y1", T.FLOAT, None)], inits)
    mod = _check(import_model(oh.make_model(g, opset_imports=[oh.make_opsetid("", 14)])), rng,
                 passes=pipeline_passes("fp32"), fused=2)
    recs = [op for op in mod.main.ops if op.name == "recurrence"]
    assert [(x.attrs.y_layout, x.attrs.g_layout) for x in recs] == [("bsdh", ""), ("", "")]
