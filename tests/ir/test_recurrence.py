"""The `recurrence` op (ir/ops/recurrence.py): lossless print/parse, verifier errors, and the cell
recognition the CUDA lowering relies on (cell_of inverts cell_body; a changed body is refused)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from nnc.ir import parse, print_module, verify
from nnc.ir.equal import first_difference
from nnc.ir.errors import NncError
from nnc.ir.graph import NameGen
from nnc.ir.ops.recurrence import Cell, cell_body, cell_of
from nnc.ir.weights import WeightStore
from nnc.onnx_import import import_model
from nnc.pipeline import Pipeline

from tests.codegen.test_rnn_cuda import rnn_model

CELLS = [
    Cell("LSTM", (("sigmoid", 0.0, 0.0), ("tanh", 0.0, 0.0), ("tanh", 0.0, 0.0))),
    Cell("LSTM", (("hardsigmoid", 0.3, 0.4), ("elu", 0.9, 0.0), ("softsign", 0.0, 0.0)), clip=0.5,
         input_forget=True, has_peep=True),
    Cell("GRU", (("sigmoid", 0.0, 0.0), ("leakyrelu", 0.2, 0.0)), linear_before_reset=False),
    Cell("GRU", (("sigmoid", 0.0, 0.0), ("tanh", 0.0, 0.0)), clip=2.0, linear_before_reset=True, has_rbh=True),
    Cell("GRU", (("sigmoid", 0.0, 0.0), ("tanh", 0.0, 0.0)), linear_before_reset=True),
    Cell("RNN", (("relu", 0.0, 0.0),)),
    Cell("RNN", (("thresholdedrelu", 0.2, 0.0),), clip=1.0),
]


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: f"{c.kind}-{c.acts[0][0]}-{c.linear_before_reset}")
@pytest.mark.parametrize("storage", ["f32", "f16"])
def test_cell_of_inverts_cell_body(cell, storage):
    from nnc.ir.types import dtype
    body = cell_body(cell, 3, 4, dtype(storage), NameGen())
    assert cell_of(cell.kind, body) == cell


def test_changed_body_is_refused():
    from nnc.ir.types import dtype
    body = cell_body(CELLS[0], 2, 4, dtype("f32"), NameGen())
    add = next(o for o in body.ops if o.name == "Add")
    add.name = "Sub"  # same types, other math: no cell the kernels know
    with pytest.raises(NncError, match="not a cell"):
        cell_of("LSTM", body)


def _fused(kind, **kw):
    m, _ = rnn_model(kind, **kw)
    mod = import_model(m)
    Pipeline(["time-fusion"], verify_each=True).run(mod)
    return mod


CASES = {
    "lstm_bidir_two_bodies": ("LSTM", dict(direction="bidirectional", peep=True, lens=[5, 2, 0], h0=True, c0=True,
                                           activations=["Sigmoid", "Tanh", "Tanh", "HardSigmoid", "Elu", "Relu"],
                                           activation_alpha=[0.3, 0.9], activation_beta=[0.4])),
    "gru_lbr_layout1": ("GRU", dict(linear_before_reset=1, layout=1, h0=True, clip=1.5)),
    "rnn_reverse": ("RNN", dict(direction="reverse", activations=["Relu"])),
}


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip(name):
    kind, kw = CASES[name]
    mod = _fused(kind, **kw)
    text = print_module(mod)
    assert "recurrence(" in text
    if name == "lstm_bidir_two_bodies":
        assert "body_backward = region(" in text
    again = parse(text)
    again.weights = mod.weights
    verify(again)
    assert first_difference(mod, again) is None
    assert print_module(again) == text


def _lstm_text(body_extra_arg=False, y_layout=""):
    # the smallest LSTM recurrence: S=2, B=1, H=1, one direction
    arg = ", %q: f32[1,1]" if body_extra_arg else ""
    yl = f', y_layout = "{y_layout}"' if y_layout else ""
    return f"""func @main(%g: f32[2,1,4]) -> (f32[2,1,1,1]) {{
  %r = const() {{value = dense<[0.5, -0.5, 0.25, 1.0]> : f32[1,4,1]}} : f32[1,4,1]
  %y = recurrence(%g, %r) {{body = region(%bg: f32[1,4], %bh: f32[1,1], %bc: f32[1,1], %br: f32[4,1]{arg}) {{
    %hr = Gemm(%bh, %br) {{transB = 1}} : f32[1,4]
    %s = Add(%bg, %hr) : f32[1,4]
    %i, %o, %f, %c = Split(%s) {{axis = 1, num_outputs = 4}} : f32[1,1], f32[1,1], f32[1,1], f32[1,1]
    %ia = Sigmoid(%i) : f32[1,1]
    %fa = Sigmoid(%f) : f32[1,1]
    %ca = Tanh(%c) : f32[1,1]
    %fc = Mul(%fa, %bc) : f32[1,1]
    %ic = Mul(%ia, %ca) : f32[1,1]
    %cn = Add(%fc, %ic) : f32[1,1]
    %oa = Sigmoid(%o) : f32[1,1]
    %ct = Tanh(%cn) : f32[1,1]
    %hn = Mul(%oa, %ct) : f32[1,1]
    return %hn, %cn
  }}, kind = "LSTM", hidden_size = 1{yl}}} : f32[2,1,1,1]
  return %y
}}
"""


def test_text_form_runs_like_the_lstm(rng):
    """A hand-written recurrence (IR text) gives what ONNX's LSTM gives for the same weights."""
    from nnc.ir.interp import Interpreter
    from nnc.ir.ops.rnn import _run, LSTMAttrs
    m = parse(_lstm_text())
    m.weights = WeightStore()
    verify(m)
    assert cell_of("LSTM", m.main.ops[1].attrs.body) == CELLS[0]
    g = rng.standard_normal((2, 1, 4)).astype(np.float32)
    got = Interpreter(m).run({"g": g})["y"]
    # the same LSTM with W = identity on a 4-wide input equal to g, no bias
    r = np.array([0.5, -0.5, 0.25, 1.0], np.float32).reshape(1, 4, 1)
    w = np.eye(4, dtype=np.float32)[None]
    want = _run("LSTM", LSTMAttrs(hidden_size=1), g.astype(np.float64), w, r, None, None, None, None, None,
                np.float32, 1)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("text, msg", [
    (_lstm_text(body_extra_arg=True), "body takes 5 arguments, expected 4"),
    (_lstm_text(y_layout="weird"), "y_layout must be one of"),
    (_lstm_text().replace('kind = "LSTM"', 'kind = "LSTM", direction = "bidirectional"'),
     "G has 4 columns, expected directions"),
    (_lstm_text().replace("f32[1,4,1]}} : f32[1,4,1]", "f32[1,4,1]} : f32[1,4,1]")
     .replace("hidden_size = 1", "hidden_size = 2"), "G has 4 columns"),
])
def test_verifier_errors(text, msg):
    with pytest.raises(NncError, match=msg):
        m = parse(text)
        m.weights = WeightStore()
        verify(m)


def test_attrs_are_typed():
    m = parse(_lstm_text())
    a = m.main.ops[1].attrs
    assert a.kind == "LSTM" and a.hidden_size == 1 and a.y_layout == "" and a.body_backward is None
    assert dataclasses.replace(a, y_layout="sbdh").y_layout == "sbdh"


def test_cuda_lowering_refuses_a_body_that_is_no_cell():
    """A body some pass changed (here Add -> Sub) must not be run as the cell it no longer is."""
    from nnc.codegen.errors import LoweringError
    from nnc.codegen.lower import lower
    from nnc.codegen.options import LowerOptions
    from nnc.codegen.target import resolve_target
    text = _lstm_text().replace("%s = Add(%bg, %hr)", "%s = Sub(%bg, %hr)")
    m = parse(text)
    m.weights = WeightStore()
    verify(m)
    with pytest.raises(LoweringError, match="recurrence.*not a cell the recurrence kernels know"):
        lower(m, LowerOptions(resolve_target("sm_90"), "fp32", False))


def test_cuda_lowering_of_the_text_form():
    from nnc.codegen.lower import lower
    from nnc.codegen.options import LowerOptions
    from nnc.codegen.target import resolve_target
    m = parse(_lstm_text(y_layout="sbdh").replace(": f32[2,1,1,1]\n  return", ": f32[2,1,1]\n  return")
              .replace("-> (f32[2,1,1,1])", "-> (f32[2,1,1])"))
    m.weights = WeightStore()
    verify(m)
    plan = lower(m, LowerOptions(resolve_target("sm_90"), "fp32", False))
    assert any("= recurrence(" in l.op for l in plan.launches)
