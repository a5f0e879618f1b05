"""The on-chip recurrence (codegen/kernels/rnn.py ONCHIP, templates/rnn_onchip.cu.j2): one block a
direction holds its whole R in shared memory, the step's matvec on tensor cores split by hidden unit,
h never leaves the block. CPU: which specs get such points and which the heuristic takes, what it
renders (an ordinary launch of D blocks, no sync words, no global h), NVRTC sm_90a of each cell with
the options (h0 / c0, peepholes, lens, clip, reverse / bidirectional, hi + lo h, layout 1) and a
numpy emulation of its arithmetic (fp16 operands, fp32 accumulate; hi + lo) against fp32. GPU:
against the interpreter (contractive weights) and against the tagged persistent kernel at fp16
(different kernels: agreement within the fp16 tolerance) on fresh random inputs with poisoned
outputs, three runs each."""
from __future__ import annotations

import numpy as np
import pytest

from nnc.codegen.kernels import rnn
from nnc.codegen.target import for_arch

from .test_rnn_cuda import _compare, _feed
from .test_rnn_tagged import _build, _diffs, _gpu

SM90 = for_arch("sm_90a")


def _spec(kind, H, B, st="f16", D=1):
    return rnn.RecurrenceSpec(kind=kind, S=8, B=B, D=D, H=H, storage=st,
                              direction="bidirectional" if D == 2 else "forward")


def _onchip(spec):
    return [p for p in rnn.recurrence_space(spec, SM90) if p["sync"] == rnn.ONCHIP]


def test_points_only_where_one_sm_holds_r_at_16_bits():
    pts = _onchip(_spec("RNN", 256, 16))                 # R 256 x 264 fp16: 135 KB
    assert {(p["mma_warps"], p["hsplit"]) for p in pts} >= {(8, False), (8, True), (16, True)}
    assert all(rnn.point_layout(_spec("RNN", 256, 16), p)["smem"] <= SM90.smem_per_block_optin for p in pts)
    assert not _onchip(_spec("RNN", 256, 16, st="f32"))  # fp32 R: no tensor-core operand
    assert not _onchip(_spec("LSTM", 512, 16))           # 2 MB of R: no
    assert not _onchip(_spec("GRU", 800, 16))
    assert not _onchip(_spec("RNN", 72, 16))             # hidden % 16
    assert not _onchip(_spec("RNN", 256, 65))            # more m-tiles than a thread's accumulators hold
    assert _onchip(_spec("LSTM", 128, 32, D=2)) and _onchip(_spec("GRU", 128, 8, st="bf16"))


def test_heuristic_takes_it_from_min_batch_for_the_measured_cells(monkeypatch):
    """On by default for RNN from ONCHIP_MIN_BATCH, at the measured cluster 8 x k split 4, 8 warps, h
    16-bit (H200 2026-12-05: 0.803 ms against the tagged kernel's 1.207 at RNN 2x256 b16)."""
    assert rnn.DEFAULT_ONCHIP and "RNN" in rnn.DEFAULT_ONCHIP_CELLS
    for B in (1, rnn.ONCHIP_MIN_BATCH - 1):
        assert rnn.recurrence_default(_spec("RNN", 256, B), SM90)["sync"] != rnn.ONCHIP
    p = rnn.recurrence_default(_spec("RNN", 256, 16), SM90)
    assert p["sync"] == rnn.ONCHIP and not p["hsplit"] and p["mma_warps"] == rnn.DEFAULT_ONCHIP_WARPS
    assert (p["cluster"], p["ksplit"]) == (8, 4)
    p = rnn.recurrence_default(_spec("RNN", 64, 16), SM90)  # 8 units a CTA at 8: no 8 warps; the cluster and
    assert (p["sync"], p["cluster"], p["ksplit"], p["mma_warps"]) == (rnn.ONCHIP, 8, 4, 4)  # k split come first
    assert rnn.recurrence_default(_spec("LSTM", 128, 16), SM90)["sync"] != rnn.ONCHIP, "unmeasured cell"
    monkeypatch.setattr(rnn, "DEFAULT_ONCHIP_CELLS", ("RNN", "LSTM"))
    monkeypatch.setattr(rnn, "DEFAULT_ONCHIP_HSPLIT", None)
    assert rnn.recurrence_default(_spec("RNN", 256, 16), SM90)["hsplit"], "None: hi + lo for RNN"
    p = rnn.recurrence_default(_spec("LSTM", 128, 16), SM90)
    assert p["sync"] == rnn.ONCHIP and not p["hsplit"]   # c carries the state in fp32
    assert rnn.recurrence_default(_spec("LSTM", 512, 16), SM90)["sync"] != rnn.ONCHIP
    monkeypatch.setattr(rnn, "DEFAULT_ONCHIP", False)
    assert rnn.recurrence_default(_spec("RNN", 256, 16), SM90)["sync"] != rnn.ONCHIP


def _emulate(R, G, h0, hsplit, act=np.tanh):
    """The kernel's arithmetic for a plain RNN in numpy: h operands rounded to fp16 (hi, and lo =
    h - hi rounded), R fp16, products summed in fp32, the state kept in fp32."""
    h = h0.astype(np.float32)
    Rf = R.astype(np.float16).astype(np.float32)
    for t in range(G.shape[0]):
        hi = h.astype(np.float16).astype(np.float32)
        acc = hi @ Rf.T
        if hsplit:
            acc += (h - hi).astype(np.float16).astype(np.float32) @ Rf.T
        h = act(G[t] + acc).astype(np.float32)
    return h


def test_hsplit_keeps_plain_rnn_near_fp32():
    """Why HSPLIT exists: with a near-critical R (spectral radius ~1, as RNN weights trained on long
    sequences are), rounding h to fp16 at every step drifts; hi + lo tracks fp32 ~100x closer."""
    rng = np.random.default_rng(3)
    H, B, S = 256, 16, 256
    R = (rng.standard_normal((H, H)) * (1.0 / np.sqrt(H))).astype(np.float16)
    G = (rng.standard_normal((S, B, H)) * 0.5).astype(np.float32)
    h0 = np.zeros((B, H), np.float32)
    ref = h0.astype(np.float64)
    Rd = R.astype(np.float64)
    for t in range(S):
        ref = np.tanh(G[t] + ref @ Rd.T)
    one = float(np.max(np.abs(_emulate(R, G, h0, False) - ref)))
    two = float(np.max(np.abs(_emulate(R, G, h0, True) - ref)))
    assert two < 1e-4 and two * 20 < one, (one, two)


COMPILE = [("RNN", np.float16, 16, dict(H=256, I=16, S=4)),
           ("RNN", np.float16, 8, dict(H=64, I=16, S=4, clip=1.5, h0=True, direction="reverse", layout=1)),
           ("LSTM", np.float16, 16, dict(H=64, I=16, S=4, h0=True, c0=True, peep=True, direction="bidirectional")),
           ("LSTM", "bf16", 24, dict(H=128, I=16, S=4, lens=[4, 2, 3] * 8, input_forget=1)),
           ("GRU", np.float16, 12, dict(H=64, I=16, S=4, h0=True, direction="bidirectional"))]
CIDS = [f"{c[0]}-{c[1] if isinstance(c[1], str) else np.dtype(c[1]).name}-b{c[2]}" for c in COMPILE]


def _force_layout(monkeypatch, spec, cl_ksp, hsplit):
    """Makes the heuristic take the on-chip point with (cluster, k split) = cl_ksp; skips where the
    space has none such."""
    cl, ksp = cl_ksp
    if not any((p["cluster"], p["ksplit"], p["hsplit"]) == (cl, ksp, hsplit) for p in _onchip(spec)):
        pytest.skip(f"no on-chip point with cluster {cl}, k split {ksp}, hsplit {hsplit} at {spec.kind} "
                    f"hidden {spec.H} b{spec.B}")
    monkeypatch.setattr(rnn, "DEFAULT_ONCHIP_CLUSTER", cl)
    monkeypatch.setattr(rnn, "DEFAULT_ONCHIP_KSPLIT", ksp)


def test_cluster_and_ksplit_points():
    """A cluster of CL CTAs keeps 1/CL of R each (RNN 256: 135 KB on one SM, 17 KB on eight); a k
    split adds its partial sums' smem; points exist only where the units split evenly into warps."""
    spec = _spec("RNN", 256, 16)
    pts = {(p["cluster"], p["ksplit"], p["mma_warps"]): p for p in _onchip(spec) if not p["hsplit"]}
    assert {(1, 1, 8), (2, 2, 8), (4, 4, 16), (8, 1, 4), (8, 4, 16)} <= set(pts)
    one, eight = (rnn.point_layout(spec, pts[k]) for k in ((1, 1, 8), (8, 1, 4)))
    assert one["R_BYTES"] == 8 * eight["R_BYTES"] == 256 * 264 * 2
    k4 = rnn.point_layout(spec, pts[(8, 4, 16)])
    assert k4["smem"] - eight["smem"] == 3 * 4 * 1 * 1 * 4 * 32 * 4  # (KSP-1) x NWN x MT x NT x 4 x 32 floats
    assert not any(p["cluster"] == 8 and p["mma_warps"] == 8 and p["ksplit"] == 1 for p in _onchip(spec)), \
        "8 warps x 8 units do not split a CTA's 32 units"
    assert rnn.recurrence_default(spec, SM90).get("cluster", 1) == (rnn.DEFAULT_ONCHIP_CLUSTER or 1) or \
        rnn.recurrence_default(spec, SM90)["sync"] != rnn.ONCHIP
    # bigger cells fit once split: LSTM 512 at fp16 is 2 MB of R, 266 KB a CTA at 8: still no
    assert not _onchip(_spec("LSTM", 512, 16))
    # LSTM 256: 540 KB of R; 270 KB a CTA at 2, 135 KB at 4
    assert {p["cluster"] for p in _onchip(_spec("LSTM", 256, 16))} == {4, 8}


@pytest.mark.parametrize("kind,dt,B,kw", COMPILE, ids=CIDS)
@pytest.mark.parametrize("hsplit", [False, True])
@pytest.mark.parametrize("cl_ksp", [(1, 1), (4, 2)], ids=["cta", "cluster4-k2"])
def test_renders_and_compiles_sm90a(kind, dt, B, kw, hsplit, cl_ksp, tmp_path, monkeypatch):
    if _gpu():
        pytest.skip("the GPU tests below compile for the device")
    import json
    _force_layout(monkeypatch, _spec(kind, kw["H"], B, D=2 if kw.get("direction") == "bidirectional" else 1), cl_ksp,
                  hsplit)

    import nnc
    import nnc.codegen.emit as emit
    from . import test_rnn_tagged as tt
    from .test_rnn_cuda import rnn_model
    monkeypatch.setattr(rnn, "DEFAULT_ONCHIP_HSPLIT", hsplit)
    if dt == "bf16":  # the model in fp32, compiled at bf16
        monkeypatch.setattr(rnn, "DEFAULT_SYNC", rnn.ONCHIP)
        model, _ = rnn_model(kind, dt=np.float32, Bn=B, **kw)
        nnc.compile(model, out=str(tmp_path), backend="reference", codegen=True, precision="bf16", arch="sm_90a").close()
        plan = json.loads((tmp_path / "plan.json").read_text())
    else:
        monkeypatch.setattr(tt, "compile_to_dir", lambda mod, d, arch=None: emit.compile_to_dir(mod, d, arch="sm_90a"))
        _, plan, _ = _build(tmp_path, kind, dt, B, mma=True, sync=rnn.ONCHIP, monkeypatch=monkeypatch, **kw)
    recs = [k for k in plan["kernels"] if k["params"].get("sync") == rnn.ONCHIP]
    assert len(recs) == 1, [k["name"] for k in plan["kernels"]]
    p = recs[0]["params"]
    assert p["HSPLIT"] == hsplit and p["kind"] == kind
    assert (p["CL"], p["KSP"]) == cl_ksp
    launch = [l for l in plan["launches"] if l["kernel"] == recs[0]["name"]]
    assert len(launch) == 1 and list(launch[0]["grid"])[:1] == [p["D"] * p["CL"]]
    assert not recs[0]["name"].startswith("nnc_coop_")
    assert not any("sync_init" in k["name"] for k in plan["kernels"]), "no sync words to reset"
    assert list(tmp_path.glob("model.*.cubin")), "NVRTC wrote no cubin"
    src = (tmp_path / "model.cu").read_text()
    head = src[:src.index(recs[0]["name"] + "(")]
    assert ("__cluster_dims__(" in head.splitlines()[-1]) == (p["CL"] > 1)
    body = src[src.index(recs[0]["name"] + "("):]
    loop = body[body.index("for (int step = 0; step < S; ++step)"):]
    loop = loop[:loop.index("#undef")]
    # a step: one block barrier (CTA), or the partial sums' barrier and / or the cluster's
    assert loop.count("__syncthreads()") == (p["KSP"] > 1) + (p["CL"] > 1 or p["KSP"] == 1)
    assert loop.count("_cluster_sync()") == (p["CL"] > 1) and loop.count("_st_cluster(") == (p["CL"] > 1)
    for gone in ("relaxed", "hbuf", "sync_words", "ld.global"):
        assert gone not in loop, gone
    assert ("accl[" in loop) == hsplit


GPU_CASES = [("RNN", np.float16, 16, dict(H=256, I=24, S=40)),
             ("RNN", np.float16, 9, dict(H=128, I=24, S=17, clip=1.5, h0=True, direction="bidirectional")),
             ("LSTM", np.float16, 16, dict(H=64, I=24, S=9, direction="bidirectional", peep=True, h0=True, c0=True)),
             ("LSTM", np.float16, 33, dict(H=128, I=24, S=7, direction="reverse", layout=1)),
             ("GRU", np.float16, 20, dict(H=64, I=24, S=9, lens=[9, 4, 1, 7] * 5, h0=True))]
GIDS = [f"{c[0]}-b{c[2]}-S{c[3]['S']}" for c in GPU_CASES]


@pytest.mark.gpu
@pytest.mark.parametrize("kind,dt,B,kw", GPU_CASES, ids=GIDS)
@pytest.mark.parametrize("hsplit", [False, True])
@pytest.mark.parametrize("cl_ksp", [(1, 1), (4, 2), (8, 4)], ids=["cta", "cluster4-k2", "cluster8-k4"])
def test_gpu_onchip_matches_interpreter_and_tagged(kind, dt, B, kw, hsplit, cl_ksp, tmp_path, monkeypatch, rng):
    import nnc
    monkeypatch.setattr(rnn, "DEFAULT_ONCHIP_HSPLIT", hsplit)
    spec0 = rnn.RecurrenceSpec(kind=kind, S=kw["S"], B=B, D=2 if kw.get("direction") == "bidirectional" else 1, H=kw["H"],
                               storage="f16")
    _force_layout(monkeypatch, spec0, cl_ksp, hsplit)
    mod, plan, spec = _build(tmp_path / "onchip", kind, dt, B, mma=True, sync=rnn.ONCHIP, monkeypatch=monkeypatch, **kw)
    recs = [k["params"] for k in plan["kernels"] if k["params"].get("sync") == rnn.ONCHIP]
    assert len(recs) == 1 and recs[0]["HSPLIT"] == hsplit and (recs[0]["CL"], recs[0]["KSP"]) == cl_ksp
    _build(tmp_path / "tagged", kind, dt, B, mma=False, sync="tagged", monkeypatch=monkeypatch, **kw)
    onchip, tagged = nnc.load(tmp_path / "onchip"), nnc.load(tmp_path / "tagged")
    for i in range(3):
        feed = _feed(spec, rng)
        _compare(f"{kind}/onchip/hsplit={hsplit}/run{i}", tmp_path / "onchip", mod, feed)
        for k, diff, _ in _diffs(onchip, tagged, feed):
            assert diff <= 1e-2, f"run {i} {k}: onchip {cl_ksp} vs tagged max rel diff {diff:.3g}"
