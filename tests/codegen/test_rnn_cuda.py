"""CUDA lowering of LSTM / GRU / RNN (codegen/kernels/rnn.py, templates/rnn.cu.j2): NVRTC compile
for sm_90 of many variants (CPU), and on a GPU each variant vs the reference interpreter on fresh
random inputs with poisoned outputs / arena, in both the persistent (cooperative) and the
one-launch-per-step forms."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto as T

from nnc.codegen.emit import compile_to_dir
from nnc.ir.interp import Interpreter
from nnc.onnx_import import import_model

from .cuda_models import N, mk

F, F16, I32 = T.FLOAT, T.FLOAT16, T.INT32
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def rnn_model(kind, S=5, Bn=3, I=6, H=16, *, direction="forward", layout=0, bias=True, lens=None,
              lens_input=False, h0=False, c0=False, peep=False, outputs=("Y", "Y_h", "Y_c"), dt=np.float32,
              seed=0, **attrs):
    """One recurrent node. lens: a constant sequence_lens list (or, lens_input, a runtime input)."""
    r = np.random.default_rng(seed)
    nd = 2 if direction == "bidirectional" else 1
    G = GATES[kind]
    tdt = F16 if dt == np.float16 else F
    w = lambda *s: (r.standard_normal(s) * 0.4).astype(dt)
    xs = [S, Bn, I] if layout == 0 else [Bn, S, I]
    hs = [nd, Bn, H] if layout == 0 else [Bn, nd, H]
    inits = [("W", w(nd, G * H, I)), ("R", w(nd, G * H, H))]
    ins = ["x", "W", "R"]
    graph_in = [("x", tdt, xs)]
    spec = {"x": (xs, dt, "normal")}
    if bias:
        inits.append(("B", w(nd, 2 * G * H)))
    ins.append("B" if bias else "")
    if lens is not None and not lens_input:
        inits.append(("L", np.asarray(lens, np.int32)))
        ins.append("L")
    elif lens_input:
        graph_in.append(("L", I32, [Bn]))
        spec["L"] = ([Bn], np.int32, f"int:{S + 1}")
        ins.append("L")
    else:
        ins.append("")
    for flag, nm in ((h0, "h0"), (c0, "c0")):
        if nm == "c0" and kind != "LSTM":
            continue
        if flag:
            graph_in.append((nm, tdt, hs))
            spec[nm] = (hs, dt, "normal")
        ins.append(nm if flag else "")
    if kind == "LSTM":
        if peep:
            inits.append(("P", w(nd, 3 * H)))
        ins.append("P" if peep else "")
    while ins and ins[-1] == "":
        ins.pop()
    outs = [o for o in outputs if kind == "LSTM" or o != "Y_c"]
    node = N(kind, ins, outs, hidden_size=H, direction=direction, layout=layout, **attrs)
    m = mk([node], graph_in, [(o, tdt) for o in outs], inits, opset=14)
    return m, spec


VARIANTS = {
    "lstm_fwd": ("LSTM", dict(Bn=6, H=40)),
    "lstm_bidir_lens_peep": ("LSTM", dict(direction="bidirectional", lens=[5, 2, 0], h0=True, c0=True, peep=True)),
    "lstm_reverse_layout1_clip": ("LSTM", dict(direction="reverse", layout=1, clip=0.7, h0=True, peep=True)),
    "lstm_input_forget_lensin": ("LSTM", dict(input_forget=1, lens_input=True, Bn=5, outputs=("Y", "Y_h"))),
    "lstm_acts": ("LSTM", dict(direction="bidirectional", bias=False,
                               activations=["HardSigmoid", "Elu", "Softsign", "Sigmoid", "ScaledTanh", "Softplus"],
                               activation_alpha=[0.3, 0.9, 1.2], activation_beta=[0.4, 0.8])),
    "gru_bidir_lens": ("GRU", dict(direction="bidirectional", lens=[5, 3, 1], h0=True)),
    "gru_lbr_layout1": ("GRU", dict(linear_before_reset=1, layout=1, h0=True, Bn=9, clip=1.5)),
    "gru_lbr_nobias_rev": ("GRU", dict(linear_before_reset=1, direction="reverse", bias=False, outputs=("Y",))),
    "gru_acts": ("GRU", dict(activations=["Sigmoid", "LeakyRelu"], activation_alpha=[0.2], H=33)),
    "rnn_fwd": ("RNN", dict(Bn=11, H=70, h0=True)),
    "rnn_bidir_acts": ("RNN", dict(direction="bidirectional", activations=["Relu", "Affine"],
                                   activation_alpha=[0.5], activation_beta=[0.1], lens=[4, 5, 2])),
    "rnn_layout1_thr": ("RNN", dict(layout=1, activations=["ThresholdedRelu"], activation_alpha=[0.2], clip=2.0)),
    "lstm_fp16_bidir": ("LSTM", dict(direction="bidirectional", dt=np.float16, h0=True, c0=True, peep=True,
                                     lens=[5, 4, 3])),
    "gru_fp16_layout1": ("GRU", dict(layout=1, dt=np.float16, lens_input=True)),
    "rnn_fp16": ("RNN", dict(dt=np.float16, direction="reverse")),
}


def _variant(name):
    kind, kw = VARIANTS[name]
    return rnn_model(kind, **kw)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """name -> {mode: out dir}, module, spec: each variant compiled (NVRTC, sm_90) persistent and stepwise."""
    out = {}
    for name in VARIANTS:
        m, spec = _variant(name)
        mod = import_model(m)
        dirs = {}
        for mode in ("coop", "stepwise"):
            d = tmp_path_factory.mktemp(f"{name}_{mode}")
            old = os.environ.get("NNC_RNN_STEPWISE")
            os.environ["NNC_RNN_STEPWISE"] = "1" if mode == "stepwise" else "0"
            try:
                compile_to_dir(mod, d, arch="sm_90")
            finally:
                if old is None:
                    del os.environ["NNC_RNN_STEPWISE"]
                else:
                    os.environ["NNC_RNN_STEPWISE"] = old
            dirs[mode] = d
        out[name] = (dirs, mod, spec)
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_compiles_nvrtc(compiled, name):
    dirs, mod, _ = compiled[name]
    kind = VARIANTS[name][0]
    for mode, d in dirs.items():
        plan = json.loads((d / "plan.json").read_text())
        assert sum((d / c["file"]).stat().st_size for c in plan["cubins"]) > 1000
        assert all(k["template"] == "rnn.cu.j2" for k in plan["kernels"])
        src = (d / "model.cu").read_text()
        for k in plan["kernels"]:
            head = src[src.index(f"// kernel {k['name']}\n"):]
            assert f"{kind}(" in head[:head.index("__global__")]
        steps = [l for l in plan["launches"] if "_step_" in (l["kernel"] or "")]
        S = 5
        if mode == "coop":
            assert len(steps) == 1 and steps[0]["kernel"].startswith("nnc_coop_")
            assert "cudaLaunchCooperativeKernel" in src
        else:
            phases = 2 if kind == "GRU" and not VARIANTS[name][1].get("linear_before_reset") else 1
            assert len(steps) == S * phases and not any(l["kernel"].startswith("nnc_coop_") for l in steps)


def test_tiny_lstm_compiles(tmp_path):
    from nnc.codegen.emit import compile_to_dir as c
    mod = import_model(str(EXAMPLES / "tiny_lstm.onnx"))
    plan = c(mod, tmp_path, arch="sm_90")
    assert any(k["template"] == "rnn.cu.j2" for k in plan["kernels"])
    assert re.search(r"nnc_coop_lstm_step_\d+", (tmp_path / "model.cu").read_text())


# ---------------------------------------------------------------- GPU

def _feed(spec, rng):
    feed = {}
    for name, (shape, dt, kind) in spec.items():
        if kind.startswith("int:"):
            feed[name] = rng.integers(0, int(kind[4:]), shape).astype(dt)
        else:
            feed[name] = rng.standard_normal(shape).astype(dt)
    return feed


def _compare(name, d, mod, feed):
    import nnc
    m = nnc.load(d)
    ref = Interpreter(mod).run(feed)
    got = m.run(feed, output="numpy", poison=True)
    for k, r in ref.items():
        g = got[k]
        assert g.shape == r.shape, (name, k, g.shape, r.shape)
        tol = 1e-2 if r.dtype == np.float16 else 1e-3
        rr, gg = r.astype(np.float64), g.astype(np.float64)
        scale = max(1.0, float(np.max(np.abs(rr)))) if rr.size else 1.0
        err = float(np.max(np.abs(gg - rr))) / scale if rr.size else 0.0
        assert np.isfinite(gg).all() and err <= tol, f"{name}/{k}: max rel err {err:.3g} > {tol}"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["coop", "stepwise"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_gpu_matches_interpreter(compiled, name, mode, rng):
    dirs, mod, spec = compiled[name]
    for _ in range(2):  # twice: the persistent kernel's barrier words must be reset per run
        _compare(name, dirs[mode], mod, _feed(spec, rng))


@pytest.mark.gpu
def test_gpu_tiny_lstm(tmp_path, rng):
    mod = import_model(str(EXAMPLES / "tiny_lstm.onnx"))
    compile_to_dir(mod, tmp_path, arch=None)
    _compare("tiny_lstm", tmp_path, mod, {"x": rng.standard_normal((8, 1, 16)).astype(np.float32)})
