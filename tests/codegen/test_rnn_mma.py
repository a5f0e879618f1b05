"""The tensor-core step of the persistent recurrence (space parameter step_mma: codegen/kernels/rnn.py
_mma_points / _mma_layout / point_cost, templates/rnn.cu.j2 "rec" with STEP_MMA): the declared space
and the cost model's batch threshold (CPU), NVRTC compile for sm_90a through the whole pipeline
(time-fusion -> recurrence.persistent) and through the ONNX-op variant (rnn.persistent) at fp16 and
bf16 (CPU), and on a GPU LSTM / GRU / RNN at batch 8 / 16 / 32 with sequence_lens against
onnxruntime (the fp32 ONNX model) and against the reference interpreter of the same compiled
directory, on fresh random inputs with outputs poisoned first.

Supported: every cell the persistent kernel takes (LSTM / GRU with linear_before_reset=1 / RNN,
activations, clip, peepholes, input_forget, sequence_lens, initial states, directions, layouts);
the step needs f16/bf16 storage and hidden % 8 == 0 (16-byte rows of h for cp.async / ldmatrix).
GRU with linear_before_reset=0 is not persistent at all (recurrence.fallback)."""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from onnx import numpy_helper as nh

from nnc.codegen.emit import compile_to_dir
from nnc.codegen.kernels import rnn
from nnc.codegen.target import for_arch
from nnc.onnx_import import import_model

from .test_rnn_cuda import rnn_model

SM90A = for_arch("sm_90a")


@pytest.fixture(autouse=True)
def _persistent_kernel(monkeypatch):
    """These tests are of rnn.cu.j2's tensor-core step: the heuristic's on-chip kernel (rnn_onchip.cu.j2,
    where R fits one SM: tests/codegen/test_rnn_onchip.py) is kept out of their pipelines."""
    monkeypatch.setattr(rnn, "DEFAULT_ONCHIP", False)
ISSUE_SHAPES = (("LSTM", 512, 1), ("GRU", 800, 2), ("LSTM", 1024, 1), ("RNN", 256, 1))  # kind, hidden, directions


def _spec(kind, H, D, B, st="f16"):
    return rnn.RecurrenceSpec(kind=kind, S=8, B=B, D=D, H=H, storage=st,
                              direction="bidirectional" if D == 2 else "forward")


def _best(spec, mma):
    space = rnn.recurrence_space(spec, SM90A)
    top = space[0]["nsb"]
    costs = [rnn.point_cost(spec, p) for p in space if p["step_mma"] == mma and p["nsb"] == top]
    return min(costs) if costs else None


# ---------------------------------------------------------------- space and cost model (CPU)

def test_threshold_is_the_cost_models_crossover():
    """MMA_MIN_BATCH: from it on the mma step is modelled cheaper for every issue shape; at half
    of it the FMA step is modelled no dearer for at least one (the threshold is not loose)."""
    for kind, H, D in ISSUE_SHAPES:
        for B in (rnn.MMA_MIN_BATCH, 2 * rnn.MMA_MIN_BATCH, 4 * rnn.MMA_MIN_BATCH):
            spec = _spec(kind, H, D, B)
            if _best(spec, False) is None:
                continue  # the FMA step's fp32 h no longer fits: nothing to compare
            assert _best(spec, True) < _best(spec, False), (kind, H, B)
    half = rnn.MMA_MIN_BATCH // 2
    assert any(_best(_spec(k, H, D, half), False) <= _best(_spec(k, H, D, half), True) for k, H, D in ISSUE_SHAPES)


def test_space_declares_the_mma_step_for_half_precision_only():
    for st in ("f16", "bf16", "f32"):
        for kind, H, B, D in (("LSTM", 512, 32, 1), ("GRU", 800, 16, 2), ("RNN", 40, 8, 1), ("LSTM", 68, 16, 1)):
            spec = _spec(kind, H, D, B, st)
            space = rnn.recurrence_space(spec, SM90A)
            mma = [p for p in space if p["step_mma"]]
            assert bool(mma) == (st != "f32" and H % 8 == 0), (st, kind, H)
            assert {p["sync"] for p in mma} <= set(rnn.SYNCS) | {rnn.LOCAL}
            for p in mma:
                lay = rnn.point_layout(spec, p)
                assert lay["smem"] <= SM90A.smem_per_block_optin and D * lay["NSB"] <= SM90A.sm_count
                assert lay["NP"] % 8 == 0 and lay["MP"] % 16 == 0 and lay["MP"] >= B and lay["NP"] >= lay["ROWS"]
                assert (lay["PITCH"] // 8) % 2 == 1, "16-byte rows of an ldmatrix phase on distinct banks"
                assert p["threads"] >= B * lay["HS"] and p["threads"] % 32 == 0
                tp = rnn.render_params(spec, p)
                ht = "unsigned int" if p["sync"] == "tagged" else rnn.CT[st]  # tagged: {h, step} words
                assert tp["STEP_MMA"] and tp["ht"] == ht and not tp["KPERM"] and not tp["STAGE_BATCH"]
            d = rnn.recurrence_default(spec, SM90A)
            assert d["step_mma"] == (bool(mma) and rnn.mma_by_default(spec))


def test_default_ranks_the_measured_points():
    """The default's model against the H200 measurement (tools/bench_rnn.py, 2026-12-02, fp16 us a
    step): LSTM 512 b16 / b32 ran fastest at half the blocks a direction, GRU 800 bi b16 at all."""
    for kind, H, D, B, fewer in (("LSTM", 512, 1, 16, True), ("LSTM", 512, 1, 32, True), ("GRU", 800, 2, 16, False)):
        spec = _spec(kind, H, D, B)
        space = rnn.recurrence_space(spec, SM90A)
        d = rnn.recurrence_default(spec, SM90A)
        assert d["step_mma"]
        assert (d["nsb"] == min(p["nsb"] for p in space)) == fewer, (kind, B, d)


def test_mma_point_refused_for_fp32():
    spec = _spec("LSTM", 64, 1, 16, "f32")
    p = dict(rnn.recurrence_default(spec, SM90A), step_mma=True)
    with pytest.raises(ValueError, match="step_mma"):
        rnn.render_params(spec, p)


def test_default_below_threshold_is_the_fma_step():
    spec = _spec("LSTM", 512, 1, 1)
    assert not rnn.recurrence_default(spec, SM90A)["step_mma"]
    assert any(p["step_mma"] for p in rnn.recurrence_space(spec, SM90A)), "still a candidate for a timed selector"


# ---------------------------------------------------------------- models

S = 9
CASES = {
    "lstm_bidir_peep_lens": ("LSTM", dict(H=64, direction="bidirectional", peep=True, h0=True, c0=True, lens=True)),
    "lstm_ifg_clip_layout1": ("LSTM", dict(H=40, input_forget=1, clip=0.9, layout=1, lens=True)),
    "gru_bidir_lensin": ("GRU", dict(H=64, linear_before_reset=1, direction="bidirectional", h0=True, lens_input=True)),
    "gru_rev_acts_clip": ("GRU", dict(H=40, linear_before_reset=1, direction="reverse", clip=2.0, lens=True,
                                      activations=["Sigmoid", "LeakyRelu"], activation_alpha=[0.2])),
    "rnn_relu_lens": ("RNN", dict(H=64, activations=["Relu"], lens=True, h0=True)),
}
BATCHES = (8, 16, 32)


def _model(name, B, dt=np.float32):
    """CASES[name] at batch B; weights scaled to std 0.1 (a contractive recurrence: fp16 rounding
    of the weights does not grow over the steps, so onnxruntime on the fp32 model is a fair peer)."""
    kind, kw = CASES[name]
    kw = dict(kw)
    if kw.pop("lens", False):
        kw["lens"] = [S - (4 * i) % S for i in range(B)]  # lengths S, 5, 1, 6, 2, ...: full, short, length 1
    model, spec = rnn_model(kind, S=S, Bn=B, I=24, dt=dt, seed=B, **kw)
    for init in model.graph.initializer:
        if init.name in ("W", "R", "B", "P"):
            a = nh.to_array(init)
            init.CopyFrom(nh.from_array((a * 0.25).astype(a.dtype), init.name))
    model.ir_version = min(model.ir_version, 10)  # what the GPU machine's onnxruntime (1.30) reads
    return model, spec


@functools.lru_cache(maxsize=None)
def _pipeline_dir(name, B, prec, root):
    """Compiled through nnc.compile (time-fusion -> recurrence op) for the GPU present, else sm_90a."""
    import nnc
    from pathlib import Path
    d = Path(root) / f"{name}_b{B}_{prec}"
    model, _ = _model(name, B)
    old = rnn.DEFAULT_STEP_MMA, rnn.MMA_MIN_BATCH, rnn.MMA_CELLS
    # the tensor-core step whatever the default says (a plain RNN too: these weights are contractive)
    rnn.DEFAULT_STEP_MMA, rnn.MMA_MIN_BATCH, rnn.MMA_CELLS = True, 1, ("LSTM", "GRU", "RNN")
    try:
        nnc.compile(model, out=str(d), backend="reference", codegen=True, precision=prec,
                    arch=None if _gpu() else "sm_90a").close()
    finally:
        rnn.DEFAULT_STEP_MMA, rnn.MMA_MIN_BATCH, rnn.MMA_CELLS = old
    return d


def _gpu() -> bool:
    from nnc.codegen.target import gpu_present
    return gpu_present()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("rnn_mma"))


def _rec_kernels(d):
    plan = json.loads((d / "plan.json").read_text())
    recs = [l for l in plan["launches"] if (l.get("kernel") or "").startswith("nnc_coop_")]
    ks = {k["name"]: k for k in plan["kernels"]}
    return plan, [ks[l["kernel"]]["params"] for l in recs]


# ---------------------------------------------------------------- NVRTC sm_90a (CPU)

COMPILE_POINTS = [(n, 16, "fp16") for n in CASES] + [("lstm_bidir_peep_lens", 8, "fp16"),
                                                      ("gru_bidir_lensin", 32, "fp16"),
                                                      ("lstm_bidir_peep_lens", 16, "bf16"),
                                                      ("gru_rev_acts_clip", 8, "bf16")]


@pytest.mark.parametrize("name,B,prec", COMPILE_POINTS, ids=[f"{n}-b{b}-{p}" for n, b, p in COMPILE_POINTS])
def test_pipeline_compiles_the_mma_step_sm90a(name, B, prec, root):
    d = _pipeline_dir(name, B, prec, root)
    plan, recs = _rec_kernels(d)
    assert recs and all(p["STEP_MMA"] and p["variant"] == "rec" for p in recs), recs
    assert all(p["MP"] == -(-B // 16) * 16 for p in recs)
    assert list(d.glob("model.*.cubin")), "NVRTC wrote no cubin"
    src = (d / "model.cu").read_text()
    assert "mma.sync.aligned.m16n8k16.row.col.f32." + ("f16" if prec == "fp16" else "bf16") in src
    assert "ldmatrix.sync.aligned.m8n8.x4" in src and "cp.async.cg.shared.global" in src


def test_onnx_op_variant_compiles_the_mma_step_sm90a(tmp_path, monkeypatch):
    """rnn.persistent (an ONNX LSTM lowered without the pipeline) takes the same step."""
    monkeypatch.setattr(rnn, "DEFAULT_STEP_MMA", True)
    model, _ = rnn_model("LSTM", S=4, Bn=16, I=16, H=64, dt=np.float16, direction="bidirectional", peep=True,
                         h0=True, c0=True, lens=[4, 3] * 8)
    plan = compile_to_dir(import_model(model), tmp_path, arch="sm_90a")
    recs = [k["params"] for k in plan["kernels"] if k["params"].get("variant") == "rec"]
    assert recs and recs[0]["STEP_MMA"] and recs[0]["NW"] >= 4
    assert list(tmp_path.glob("model.*.cubin"))


@pytest.mark.parametrize("sync", rnn.SYNCS)
def test_both_syncs_compile(sync, tmp_path, monkeypatch):
    monkeypatch.setattr(rnn, "DEFAULT_SYNC", sync)
    monkeypatch.setattr(rnn, "DEFAULT_SYNC_SMALL_BATCH", None)
    monkeypatch.setattr(rnn, "DEFAULT_STEP_MMA", True)
    model, _ = _model("gru_bidir_lensin", 16, np.float16)
    plan = compile_to_dir(import_model(model), tmp_path, arch="sm_90a")
    recs = [k["params"] for k in plan["kernels"] if k["params"].get("variant") == "rec"]
    assert recs[0]["STEP_MMA"] and recs[0]["sync"] == sync


# ---------------------------------------------------------------- GPU

def _feed(mod, rng):
    feed = {}
    for a in mod.inputs:
        shape = [int(x) for x in a.shape]
        if np.dtype(a.dtype).kind in "iu":  # sequence_lens 1..S (onnxruntime and ONNX differ on Y_h of length 0)
            feed[a.name] = rng.integers(1, S + 1, shape).astype(a.dtype)
        else:
            feed[a.name] = rng.standard_normal(shape).astype(a.dtype)
    return feed


def _err(got, want):
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert g.shape == w.shape and np.isfinite(g).all(), (g.shape, w.shape)
    return float(np.max(np.abs(g - w))) / max(1.0, float(np.max(np.abs(w)))) if w.size else 0.0


GPU_POINTS = [(n, b) for n in CASES for b in BATCHES]


@pytest.mark.gpu
@pytest.mark.parametrize("name,B", GPU_POINTS, ids=[f"{n}-b{b}" for n, b in GPU_POINTS])
def test_gpu_mma_step_matches_onnxruntime_and_reference(name, B, root, rng):
    import nnc
    import onnxruntime as ort
    d = _pipeline_dir(name, B, "fp16", root)
    _, recs = _rec_kernels(d)
    assert recs and all(p["STEP_MMA"] for p in recs)
    gpu, ref = nnc.load(str(d)), nnc.load(str(d), backend="reference")
    model, _ = _model(name, B)
    # onnxruntime's CPU RNNs take layout 0 only: layout-1 cases are checked against the reference alone
    sess = (ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            if CASES[name][1].get("layout", 0) == 0 else None)
    for _ in range(2):  # twice: the sync words must be reset per run
        feed = _feed(ref, rng)
        got = gpu.run(feed, output="numpy", poison=True)
        want = ref.run(feed, output="numpy")
        ort_out = {}
        if sess is not None:
            ort_feed = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in feed.items()}
            ort_out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, ort_feed)))
        for k in want:
            assert _err(got[k], want[k]) <= 1e-2, f"{name}/b{B}/{k} vs the reference: {_err(got[k], want[k]):.3g}"
            if k in ort_out:
                assert _err(got[k], ort_out[k]) <= 1e-2, f"{name}/b{B}/{k} vs onnxruntime: {_err(got[k], ort_out[k]):.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("sync", rnn.SYNCS)
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_gpu_mma_step_equals_fma_step(kind, sync, tmp_path, monkeypatch, rng):
    """The onnx-op variant, both steps of the same fp16 model, against each other and the interpreter."""
    from .test_rnn_cuda import _compare, _feed as feed_of
    name = "lstm_bidir_peep_lens" if kind == "LSTM" else "gru_bidir_lensin"
    model, spec = _model(name, 16, np.float16)
    mod = import_model(model)
    monkeypatch.setattr(rnn, "DEFAULT_SYNC", sync)
    monkeypatch.setattr(rnn, "DEFAULT_SYNC_SMALL_BATCH", None)
    for mma in (False, True):
        monkeypatch.setattr(rnn, "DEFAULT_STEP_MMA", mma)
        d = tmp_path / str(mma)
        plan = compile_to_dir(mod, d, arch=None)
        recs = [k["params"] for k in plan["kernels"] if k["params"].get("variant") == "rec"]
        assert recs[0]["STEP_MMA"] == mma
        for _ in range(2):
            _compare(f"{kind}/{sync}/mma={mma}", d, mod, feed_of(spec, rng))


BF16_POINTS = [("lstm_bidir_peep_lens", 16), ("gru_rev_acts_clip", 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("name,B", BF16_POINTS, ids=[f"{n}-b{b}" for n, b in BF16_POINTS])
def test_gpu_mma_step_bf16_matches_reference(name, B, root, rng):
    """bf16 (mma .bf16): against the reference of the same compiled directory; 3e-2 (bf16 keeps 3
    mantissa bits fewer than fp16, whose tolerance is 1e-2)."""
    import nnc
    d = _pipeline_dir(name, B, "bf16", root)
    _, recs = _rec_kernels(d)
    assert recs and all(p["STEP_MMA"] for p in recs)
    gpu, ref = nnc.load(str(d)), nnc.load(str(d), backend="reference")
    for _ in range(2):
        feed = _feed(ref, rng)
        got, want = gpu.run(feed, output="numpy", poison=True), ref.run(feed, output="numpy")
        for k in want:
            assert _err(got[k], want[k]) <= 3e-2, f"{name}/b{B}/{k} bf16: {_err(got[k], want[k]):.3g}"
