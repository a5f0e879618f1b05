"""The on-chip layer wavefront (codegen/kernels/recurrence.py form "onchip", templates/rnn_onchip.cu.j2
with L > 1): one thread-block cluster of L*CL CTAs runs a whole recurrence_stack, layer l at step s - l,
[R_l | W_l] on chip, h over distributed shared memory. CPU: its space and heuristic, what it renders
(one launch of L*CL CTAs in one cluster, no sync words, no per-layer recurrence, no projection GEMM
between the layers) and NVRTC sm_90a. GPU: against the reference interpreter, onnxruntime and the
hoisted build on fresh random inputs with poisoned outputs, three runs each."""
from __future__ import annotations

import numpy as np
import pytest

from nnc.codegen.emit import compile_to_dir
from nnc.codegen.kernels import recurrence as rec_kernels
from nnc.codegen.target import for_arch
from nnc.ir.interp import Interpreter
from nnc.onnx_import import import_model
from nnc.pipeline import Pipeline

from ..passes.test_layer_wavefront import _close, _gpu, _stacks, passes_with_stack, stack_model

SM90 = for_arch("sm_90a")
WANT = dict(cluster=4, ksplit=4, warps=16, hsplit=None)


def test_space_only_16_bit_rnn_lstm_within_one_portable_cluster():
    pts = rec_kernels.onchip_stack_space("RNN", "f16", 16, 256, 2, SM90)
    assert pts and all(2 * p["cluster"] <= 8 for p in pts)
    assert {(p["cluster"], p["ksplit"], p["mma_warps"]) for p in pts} >= {(4, 4, 16), (2, 2, 8), (2, 1, 8)}
    assert min(p["cluster"] for p in pts) == 2, "[R | W] of 256 units (266 KB at 16 bits) fits no one SM"
    assert all(p["threads"] == 32 * p["mma_warps"] for p in pts)
    assert rec_kernels.onchip_stack_space("LSTM", "bf16", 8, 128, 2, SM90)
    assert all(3 * p["cluster"] <= 8 for p in rec_kernels.onchip_stack_space("RNN", "f16", 8, 64, 3, SM90))
    assert not rec_kernels.onchip_stack_space("RNN", "f32", 16, 256, 2, SM90), "no fp32 tensor-core operand"
    assert not rec_kernels.onchip_stack_space("GRU", "f16", 16, 256, 2, SM90), "GRU's n gate: not one matvec"
    assert not rec_kernels.onchip_stack_space("RNN", "f16", 65, 256, 2, SM90), "batch <= 64"
    assert not rec_kernels.onchip_stack_space("LSTM", "f16", 16, 512, 2, SM90), "4 MB of [R | W] fits no 8 SMs"
    assert not rec_kernels.onchip_stack_space("RNN", "f16", 16, 256, 9, SM90), "9 layers: more than 8 CTAs"


def test_default_off_unless_asked_and_from_min_batch(monkeypatch):
    space = rec_kernels.onchip_stack_space("RNN", "f16", 16, 256, 2, SM90)
    monkeypatch.setattr(rec_kernels, "DEFAULT_STACK_ONCHIP", None)
    assert rec_kernels.onchip_stack_default("RNN", 16, space) is None
    monkeypatch.setattr(rec_kernels, "DEFAULT_STACK_ONCHIP", WANT)
    p = rec_kernels.onchip_stack_default("RNN", 16, space)
    assert (p["cluster"], p["ksplit"], p["mma_warps"], p["hsplit"]) == (4, 4, 16, True)
    assert rec_kernels.onchip_stack_default("RNN", 4, space) is None, "latency-bound batches keep the wavefront"
    lstm = rec_kernels.onchip_stack_default("LSTM", 16, rec_kernels.onchip_stack_space("LSTM", "f16", 16, 128, 2, SM90))
    assert not lstm["hsplit"], "c carries the LSTM state in fp32"


def _compile(tmp, kind, L, H, prec, monkeypatch, *, S=8, B=16, want=WANT, arch="sm_90a", direction="forward",
             scale=0.4):
    monkeypatch.setattr(rec_kernels, "DEFAULT_STACK_ONCHIP", want)
    model = stack_model(kind, L=L, S=S, B=B, I=H, H=H, scale=scale, direction=direction)
    m = import_model(model)
    Pipeline(passes_with_stack(prec)).run(m)
    assert _stacks(m)
    return model, compile_to_dir(m, tmp, arch=arch, precision=prec)


NVRTC = [("RNN", 2, 256, "fp16", WANT), ("LSTM", 2, 128, "fp16", dict(WANT, cluster=2, ksplit=2, warps=8)),
         ("RNN", 3, 64, "bf16", dict(WANT, cluster=2, ksplit=1, warps=4, hsplit=False))]


@pytest.mark.parametrize("kind,L,H,prec,want", NVRTC, ids=[f"{c[0]}{c[1]}x{c[2]}-{c[3]}" for c in NVRTC])
def test_compiles_nvrtc_one_cluster_launch(kind, L, H, prec, want, tmp_path, monkeypatch):
    _, plan = _compile(tmp_path, kind, L, H, prec, monkeypatch, want=want)
    assert list(tmp_path.glob("model.*.cubin")), "NVRTC wrote no cubin"
    recs = [la for la in plan["launches"] if (la["kernel"] or "").startswith("nnc_rnn_onchip")]
    assert len(recs) == 1 and "_stack" in recs[0]["kernel"]
    k = next(k for k in plan["kernels"] if k["name"] == recs[0]["kernel"])
    cl = k["params"]["CL"]
    assert cl == want["cluster"] and k["params"]["L"] == L and recs[0]["grid"][0] == L * cl
    assert not [la for la in plan["launches"] if "sync_init" in (la["kernel"] or "") or "_step" in (la["kernel"] or "")
                or "wavefront" in (la["kernel"] or "")], "no sync words, no per-layer recurrence"
    src = (tmp_path / "model.cu").read_text()
    body = src[src.index(f"// kernel {recs[0]['kernel']}"):]
    assert f"__cluster_dims__({L * cl}, 1, 1)" in body
    assert "recurrence_stack" in body[:body.index("__device__")], "the header names the IR op"


GPU_CASES = [("RNN", 2, 256, "fp16", 16, 33, "forward", WANT),
             ("RNN", 2, 256, "fp16", 16, 17, "forward", dict(WANT, cluster=2, ksplit=2, warps=16, hsplit=False)),
             ("LSTM", 2, 128, "fp16", 16, 17, "forward", dict(WANT, cluster=2, ksplit=2, warps=8)),
             ("RNN", 3, 64, "bf16", 8, 9, "reverse", dict(WANT, cluster=2, ksplit=1, warps=4, hsplit=False)),
             ("LSTM", 2, 64, "fp16", 24, 9, "forward", dict(WANT, cluster=1, ksplit=2, warps=8))]


@pytest.mark.gpu
@pytest.mark.parametrize("kind,L,H,prec,B,S,direction,want", GPU_CASES,
                         ids=[f"{c[0]}{c[1]}x{c[2]}-{c[3]}-b{c[4]}-S{c[5]}-{c[6]}-c{c[7]['cluster']}k{c[7]['ksplit']}"
                              for c in GPU_CASES])
def test_gpu_matches_interpreter_onnxruntime_and_hoisted(kind, L, H, prec, B, S, direction, want, tmp_path,
                                                         monkeypatch, rng):
    """Contractive weights (std 0.8/sqrt(H)); fp16/bf16 tolerance 2e-2 (the hoisted build rounds Y_l
    and G_l to the storage dtype between layers, the wavefront does not)."""
    import nnc
    if not _gpu():
        pytest.skip("needs a CUDA GPU")
    scale = 0.8 / np.sqrt(H)
    model, plan = _compile(tmp_path / "oc", kind, L, H, prec, monkeypatch, S=S, B=B, want=want, arch=None,
                           direction=direction, scale=scale)
    assert any((la["kernel"] or "").startswith("nnc_rnn_onchip") for la in plan["launches"])
    monkeypatch.setattr(rec_kernels, "DEFAULT_STACK_ONCHIP", None)
    monkeypatch.setattr(rec_kernels, "DEFAULT_STACK_FORM", "hoisted")
    m = import_model(model)
    Pipeline(passes_with_stack(prec)).run(m)
    compile_to_dir(m, tmp_path / "hoist", precision=prec)
    ref_mod = import_model(model)
    oc, hoist = nnc.load(tmp_path / "oc"), nnc.load(tmp_path / "hoist")
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    tol = 2e-2
    for i in range(3):
        feed = {"x": rng.standard_normal((S, B, H)).astype(np.float32)}
        want_out = Interpreter(ref_mod).run(feed)
        got = oc.run({"x": feed["x"].astype(oc.inputs[0].dtype)}, output="numpy", poison=True)
        assert all(np.isfinite(np.asarray(v, np.float64)).all() for v in got.values()), f"run {i}: non-finite"
        _close(want_out, got, tol)
        _close(dict(zip(names, sess.run(None, feed))), got, tol)
        _close(hoist.run({"x": feed["x"].astype(hoist.inputs[0].dtype)}, output="numpy", poison=True), got, tol)
