"""The persistent recurrence's one-block-a-direction points (sync "local", codegen/kernels/rnn.py
LOCAL): when a direction's whole R, h and a gate thread per batch x unit fit one SM, h never leaves
that block's shared memory and __syncthreads is the only sync. CPU: which specs get such points,
NVRTC sm_90a of the FMA and tensor-core steps. GPU: against the interpreter (contractive weights)
and against the barrier sync at the same one-block geometry (equal outputs), fresh inputs, poisoned
outputs, three runs."""
from __future__ import annotations

import numpy as np
import pytest

from nnc.codegen.kernels import rnn
from nnc.codegen.target import for_arch

from .test_rnn_cuda import _compare, _feed
from .test_rnn_tagged import _build, _diffs, _gpu, _rec

SM90 = for_arch("sm_90a")


def test_local_points_only_where_one_sm_holds_the_direction():
    def local(kind, H, B, st, D=1):
        spec = rnn.RecurrenceSpec(kind=kind, S=8, B=B, D=D, H=H, storage=st,
                                  direction="bidirectional" if D == 2 else "forward")
        return [p for p in rnn.recurrence_space(spec, SM90) if p["sync"] == rnn.LOCAL], spec
    pts, spec = local("RNN", 256, 1, "f16")          # R 256 x 256 fp16: 128 KB
    assert pts and all(p["nsb"] == 1 and p["r_smem"] for p in pts)
    assert all(rnn.point_layout(spec, p)["smem"] <= SM90.smem_per_block_optin for p in pts)
    assert not local("RNN", 256, 1, "f32")[0]        # 256 KB of fp32 R: no
    assert not local("LSTM", 512, 1, "f16")[0]       # 2 MB: no
    assert not local("RNN", 256, 16, "f16")[0]       # 4096 gate threads: no
    assert local("GRU", 64, 3, "f32", D=2)[0]
    # the heuristic's exactly when DEFAULT_SYNC_SMALL_BATCH prefers it (these fit, batch <= SMALL_BATCH)
    for kind, H, B, st in (("RNN", 256, 1, "f16"), ("GRU", 64, 3, "f32")):
        _, spec = local(kind, H, B, st)
        prefers = rnn.LOCAL in (rnn.DEFAULT_SYNC_SMALL_BATCH or ())
        assert (rnn.recurrence_default(spec, SM90)["sync"] == rnn.LOCAL) == prefers


COMPILE = [("RNN", np.float16, False, 1, dict(H=256, I=16, S=4)),
           ("LSTM", np.float16, True, 2, dict(H=64, I=16, S=4, h0=True, direction="bidirectional")),
           ("GRU", np.float32, False, 3, dict(H=64, I=16, S=4, lens=[4, 2, 3]))]


@pytest.mark.parametrize("kind,dt,mma,B,kw", COMPILE, ids=[f"{c[0]}-{np.dtype(c[1]).name}-b{c[3]}" for c in COMPILE])
def test_local_compiles_sm90a(kind, dt, mma, B, kw, tmp_path, monkeypatch):
    if _gpu():
        pytest.skip("the GPU tests below compile for the device")
    import nnc.codegen.emit as emit
    from . import test_rnn_tagged as tt
    monkeypatch.setattr(tt, "compile_to_dir", lambda mod, d, arch=None: emit.compile_to_dir(mod, d, arch="sm_90a"))
    _, plan, _ = _build(tmp_path, kind, dt, B, mma=mma, sync=rnn.LOCAL, monkeypatch=monkeypatch, **kw)
    p = _rec(plan)
    assert p["sync"] == rnn.LOCAL and p["NSB"] == 1 and p["STEP_MMA"] == mma
    assert list(tmp_path.glob("model.*.cubin")), "NVRTC wrote no cubin"
    src = (tmp_path / "model.cu").read_text()
    loop = src[src.index("for (int step = 0; step < S; ++step)"):]
    for gone in ("_st_release(", "_add_release(", "_ld_relaxed(", "_ld4_relaxed(", "_cp_wait()", "hbuf["):
        assert gone not in loop, gone


GPU_CASES = [("RNN", np.float16, False, 1, dict(H=256, I=24, S=33)),
             ("RNN", np.float32, False, 4, dict(H=128, I=24, S=9, clip=1.5, h0=True)),
             ("LSTM", np.float16, True, 2, dict(H=64, I=24, S=9, direction="bidirectional", peep=True, h0=True, c0=True)),
             ("GRU", np.float32, False, 3, dict(H=64, I=24, S=5, lens=[5, 2, 1]))]


@pytest.mark.gpu
@pytest.mark.parametrize("kind,dt,mma,B,kw", GPU_CASES,
                         ids=[f"{c[0]}-{np.dtype(c[1]).name}-{'mma' if c[2] else 'fma'}-b{c[3]}" for c in GPU_CASES])
def test_gpu_local_matches_interpreter_and_barrier(kind, dt, mma, B, kw, tmp_path, monkeypatch, rng):
    import nnc
    mod, plan, spec = _build(tmp_path / "local", kind, dt, B, mma=mma, sync=rnn.LOCAL, monkeypatch=monkeypatch, **kw)
    p = _rec(plan)
    assert p["sync"] == rnn.LOCAL and p["NSB"] == 1 and p["STEP_MMA"] == mma
    _, plan_b, _ = _build(tmp_path / "barrier", kind, dt, B, mma=mma, sync="barrier", params=p["selected"]["params"],
                          monkeypatch=monkeypatch, **kw)
    assert _rec(plan_b)["sync"] == "barrier" and _rec(plan_b)["NSB"] == 1
    local, barrier = nnc.load(tmp_path / "local"), nnc.load(tmp_path / "barrier")
    for i in range(3):
        feed = _feed(spec, rng)
        _compare(f"{kind}/local/mma={mma}/run{i}", tmp_path / "local", mod, feed)
        for k, diff, dt in _diffs(local, barrier, feed):
            tol = 1e-6 if dt == np.float32 else 1e-3
            assert diff <= tol, f"run {i} {k}: local vs barrier max rel diff {diff:.3g}"
