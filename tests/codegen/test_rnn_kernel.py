"""The persistent on-chip recurrence (codegen/kernels/rnn.py "rnn.persistent", templates/rnn.cu.j2
variant "rec"): the declared space, NVRTC compile (sm_90, CPU) of every point of it for LSTM / GRU
/ RNN at fp32 and fp16, and on a GPU each kind forward / bidirectional, fp32 / fp16, batch 1 and
17, both sync schemes, against the reference interpreter on fresh random inputs with poisoned
outputs and arena (twice: the sync words must be reset per run)."""
from __future__ import annotations

import numpy as np
import pytest

from nnc.codegen.emit import compile_to_dir
from nnc.codegen.kernels import rnn
from nnc.codegen.target import for_arch
from nnc.onnx_import import import_model

from .test_rnn_cuda import _compare, _feed, rnn_model

SM90 = for_arch("sm_90")


def _compile(model, d, params=None, monkeypatch=None):
    """Compile with the persistent variant at `params` (None: the heuristic)."""
    if params is not None:
        monkeypatch.setattr(rnn, "recurrence_default", lambda spec, target, space=None: dict(params))
    mod = import_model(model)
    plan = compile_to_dir(mod, d, arch="sm_90")
    return mod, plan


def _rec_launch(plan):
    recs = [l for l in plan["launches"] if (l["kernel"] or "").startswith("nnc_coop_")]
    assert len(recs) == 1
    k = next(k for k in plan["kernels"] if k["name"] == recs[0]["kernel"])
    assert k["params"].get("variant") == "rec", k["params"]
    return recs[0], k


# ---------------------------------------------------------------- the space (CPU, no compile)

def test_space_declares_every_sync_and_fits_smem():
    for kind, H, B, D, st in (("LSTM", 512, 1, 1, "f32"), ("LSTM", 512, 32, 1, "f16"), ("GRU", 800, 16, 2, "f32"),
                              ("LSTM", 1024, 1, 1, "f32"), ("RNN", 256, 16, 1, "f16")):
        spec = rnn.RecurrenceSpec(kind=kind, S=8, B=B, D=D, H=H, storage=st,
                                  direction="bidirectional" if D == 2 else "forward")
        space = rnn.recurrence_space(spec, SM90)
        assert {p["sync"] for p in space} - {rnn.ONCHIP} == set(rnn.SYNCS) == {"flags", "barrier", "tagged"}
        assert any(p["sync"] == rnn.ONCHIP for p in space) == (kind == "RNN"), "R on one SM: only RNN 256 fp16"
        for p in space:
            lay = rnn.point_layout(spec, p)
            assert lay["smem"] <= SM90.smem_per_block_optin and D * lay["NSB"] <= SM90.sm_count
            assert p["threads"] % 32 == 0 and p["threads"] <= 1024
            if p["sync"] != rnn.ONCHIP:  # (on-chip: a thread owns several positions of the mma fragments)
                assert p["threads"] >= B * lay["HS"]
        assert any(p["step_mma"] for p in space) == (st == "f16"), "the tensor-core step: fp16/bf16 only"
        assert space[0]["r_smem"], (kind, H, B, "R fits on chip for the issue's models")
        d = rnn.recurrence_default(spec, SM90)
        if d["sync"] == rnn.ONCHIP:
            assert d in space and B >= rnn.ONCHIP_MIN_BATCH
            continue
        assert d in space and d["sync"] == rnn.default_sync(spec, d["step_mma"], space)
        assert d["step_mma"] == (st == "f16" and rnn.mma_by_default(spec))


def test_fits_says_why_not():
    two_phase = rnn.RecurrenceSpec(kind="GRU", S=4, B=2, D=1, H=64, linear_before_reset=False)
    assert not rnn.recurrence_fits(two_phase, SM90) and "two phases" in rnn.recurrence_fits(two_phase, SM90).why
    odd = rnn.RecurrenceSpec(kind="LSTM", S=4, B=2, D=1, H=70)
    assert "multiple of 4" in rnn.recurrence_fits(odd, SM90).why
    huge = rnn.RecurrenceSpec(kind="RNN", S=4, B=512, D=1, H=1024)
    assert "shared memory" in rnn.recurrence_fits(huge, SM90).why


# ---------------------------------------------------------------- NVRTC compile of every point (CPU)

POINT_MODELS = {
    "lstm_f32": ("LSTM", dict(Bn=3, H=64, I=24, S=4), np.float32),
    "lstm_f16_bidir": ("LSTM", dict(Bn=2, H=64, I=16, S=4, direction="bidirectional", peep=True, h0=True, c0=True),
                       np.float16),
    "gru_f32_bidir": ("GRU", dict(Bn=5, H=48, I=8, S=4, direction="bidirectional", linear_before_reset=1, h0=True),
                      np.float32),
    "gru_f16": ("GRU", dict(Bn=1, H=64, I=8, S=4, linear_before_reset=1, lens=[3]), np.float16),
    "rnn_f32": ("RNN", dict(Bn=17, H=32, I=8, S=4), np.float32),
    "rnn_f16_rev": ("RNN", dict(Bn=4, H=40, I=8, S=4, direction="reverse", layout=1), np.float16),
}


def _point_model(name):
    kind, kw, dt = POINT_MODELS[name]
    return kind, rnn_model(kind, dt=dt, **kw)


@pytest.mark.parametrize("name", list(POINT_MODELS))
def test_every_point_compiles(name, tmp_path, monkeypatch):
    kind, (model, _) = _point_model(name)
    mod = import_model(model)
    base = compile_to_dir(mod, tmp_path / "base", arch="sm_90")
    _, k = _rec_launch(base)
    kp = k["params"]
    # every point of the declared space, through the normal compile path
    got = _space_of(mod)
    assert kp["sync"] == rnn.default_sync(rnn.RecurrenceSpec(kind=kind, S=kp["S"], B=kp["B"], D=kp["D"], H=kp["H"]),
                                          kp["STEP_MMA"], got)
    assert len(got) >= 2
    # a covering subset (the CPU is small): every (sync, kperm, stage_batch) and every geometry once
    seen, todo = set(), []
    for params in got:
        if params["sync"] == rnn.ONCHIP:
            continue  # another template (rnn_onchip.cu.j2): tests/codegen/test_rnn_onchip.py compiles its points
        keys = {("flags", params["sync"], params.get("kperm"), params.get("stage_batch"), params["step_mma"]),
                ("geometry", params["nsb"], params["tr"], params["tb"], params["ks"], params["r_smem"],
                 params["threads"] if params["step_mma"] else None)}
        if keys - seen:
            seen |= keys
            todo.append(params)
    for i, params in enumerate(todo):
        _, plan = _compile(model, tmp_path / f"p{i}", params, monkeypatch)
        launch, k = _rec_launch(plan)
        assert k["params"]["sync"] == params["sync"] and k["params"]["NSB"] == params["nsb"]
        assert k["params"]["STEP_MMA"] == params["step_mma"]
        assert launch["block"][0] == params["threads"] and launch["grid"][0] % params["nsb"] == 0


def _space_of(mod):
    """The declared space of the (single) recurrent op of mod, as the variant's applies sees it."""
    from nnc.codegen.lower import Lowerer, Problem
    from nnc.codegen.options import LowerOptions
    L = Lowerer(mod, LowerOptions(SM90))
    op = next(o for o in mod.main.ops if o.name in ("LSTM", "GRU", "RNN"))
    p = Problem(L, op)
    assert rnn.PERSISTENT.check(p)
    return rnn.PERSISTENT.space(p)


# ---------------------------------------------------------------- GPU: vs the reference interpreter

GPU_CASES = []
for _kind in ("LSTM", "GRU", "RNN"):
    for _dirn in ("forward", "bidirectional"):
        for _dt in (np.float32, np.float16):
            for _b in (1, 17):
                GPU_CASES.append((_kind, _dirn, _dt, _b))


def _gpu_model(kind, dirn, dt, b):
    kw = dict(Bn=b, H=64, I=24, S=9, direction=dirn)
    if kind == "GRU":
        kw["linear_before_reset"] = 1
    if kind == "LSTM" and dirn == "bidirectional":
        kw.update(peep=True, h0=True, c0=True, lens=[9, 4] * (b // 2) + [7] * (b % 2))
    if kind == "RNN" and dirn == "forward":
        kw.update(h0=True, clip=1.5, layout=1)
    if kind == "GRU" and dirn == "bidirectional":
        kw.update(h0=True, lens_input=True)
    return rnn_model(kind, dt=dt, seed=b, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("sync", rnn.SYNCS)
@pytest.mark.parametrize("kind,dirn,dt,b", GPU_CASES,
                         ids=[f"{k}-{d[:3]}-{np.dtype(t).name}-b{b}" for k, d, t, b in GPU_CASES])
def test_gpu_persistent_matches_interpreter(kind, dirn, dt, b, sync, tmp_path, monkeypatch, rng):
    model, spec = _gpu_model(kind, dirn, dt, b)
    monkeypatch.setattr(rnn, "DEFAULT_SYNC", sync)
    monkeypatch.setattr(rnn, "DEFAULT_SYNC_SMALL_BATCH", None)
    mod = import_model(model)
    plan = compile_to_dir(mod, tmp_path, arch=None)
    _, k = _rec_launch(plan)
    assert k["params"]["sync"] == sync
    for _ in range(2):
        _compare(f"{kind}/{dirn}/{sync}", tmp_path, mod, _feed(spec, rng))


# the projection on the GEMM family (rnn.GEMM_PROJ_MIN_FLOPS and above), G read with its strides
BIG_CASES = [("LSTM", dict(), np.float32), ("LSTM", dict(direction="bidirectional", h0=True, c0=True), np.float16),
             ("GRU", dict(linear_before_reset=1, layout=1, h0=True), np.float16), ("RNN", dict(Bn=17), np.float32)]


def _big_model(kind, kw, dt):
    """rnn_model's weights (std 0.4) scaled to std 0.05: with H=256 the recurrence is then
    contractive (spectral radius ~0.8). At std 0.4 it is chaotic over 64 steps (radius ~6): fp32
    rounding differences of the GEMM's summation order grow to sign flips, a property of the
    random model, not of the kernel."""
    from onnx import numpy_helper as nh
    kw = dict(dict(S=64, Bn=4, I=256, H=256), **kw)
    model, spec = rnn_model(kind, dt=dt, **kw)
    for init in model.graph.initializer:
        if init.name in ("W", "R", "B"):
            a = nh.to_array(init)
            init.CopyFrom(nh.from_array((a * (0.05 / 0.4)).astype(a.dtype), init.name))
    return model, spec


def test_big_projection_is_one_gemm(tmp_path):
    for i, (kind, kw, dt) in enumerate(BIG_CASES):
        model, _ = _big_model(kind, kw, dt)
        plan = compile_to_dir(import_model(model), tmp_path / str(i), arch="sm_90")
        names = [l["kernel"] for l in plan["launches"]]
        assert names[0].startswith("nnc_gemm_") and len(names) == 3, names
        _rec_launch(plan)


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(BIG_CASES)))
def test_gpu_gemm_projection_matches_interpreter(case, tmp_path, rng):
    model, spec = _big_model(*BIG_CASES[case])
    mod = import_model(model)
    compile_to_dir(mod, tmp_path, arch=None)
    for _ in range(2):
        _compare(f"big{case}", tmp_path, mod, _feed(spec, rng))


# the permuted k order of fp16 R in smem (space parameter kperm; rnn.DEFAULT_KPERM)
KPERM_CASES = [c for c in GPU_CASES if c[2] == np.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("kind,dirn,dt,b", KPERM_CASES,
                         ids=[f"{k}-{d[:3]}-b{b}" for k, d, t, b in KPERM_CASES])
def test_gpu_kperm_matches_interpreter(kind, dirn, dt, b, tmp_path, monkeypatch, rng):
    model, spec = _gpu_model(kind, dirn, dt, b)
    monkeypatch.setattr(rnn, "DEFAULT_KPERM", True)
    monkeypatch.setattr(rnn, "DEFAULT_STEP_MMA", False)  # the FMA step's parameter (the mma step has none)
    mod = import_model(model)
    plan = compile_to_dir(mod, tmp_path, arch=None)
    _, k = _rec_launch(plan)
    assert k["params"]["KPERM"] is True
    for _ in range(2):
        _compare(f"{kind}/{dirn}/kperm", tmp_path, mod, _feed(spec, rng))


@pytest.mark.gpu
@pytest.mark.parametrize("kind,dirn,dt,b", GPU_CASES,
                         ids=[f"{k}-{d[:3]}-{np.dtype(t).name}-b{b}" for k, d, t, b in GPU_CASES])
def test_gpu_stage_batch_matches_interpreter(kind, dirn, dt, b, tmp_path, monkeypatch, rng):
    model, spec = _gpu_model(kind, dirn, dt, b)
    monkeypatch.setattr(rnn, "DEFAULT_STAGE_BATCH", True)
    monkeypatch.setattr(rnn, "DEFAULT_STEP_MMA", False)  # the FMA step's parameter (the mma step has none)
    mod = import_model(model)
    plan = compile_to_dir(mod, tmp_path, arch=None)
    _, k = _rec_launch(plan)
    assert k["params"]["STAGE_BATCH"] is True
    for _ in range(2):
        _compare(f"{kind}/{dirn}/stage_batch", tmp_path, mod, _feed(spec, rng))
