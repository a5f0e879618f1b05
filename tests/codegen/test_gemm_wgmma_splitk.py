"""Split-K on the Hopper wgmma GEMM's TMA points (gemm_wgmma.py SPLIT_K, templates/gemm_wgmma.cu.j2):
CTA (tile, s) of a (tiles, S, batch) grid runs 1/S of the k-tiles, stores an fp32 partial, the last
CTA of the tile (per-tile counter, gemm.py's scheme and scratch) adds them in split order and runs
the epilogue.

CPU: which points split (few tiles, long K; TMA, a CTA a tile), render's grid and scratch args,
the heuristic's gain rule, NVRTC sm_90a of split GEMM and TMA-im2col conv kernels, lowering binds
the workspace and the run's shared counters (zeroed by one copy). GPU (marked `gpu`): every third
split point (and the deepest) of batch-1 BERT / ragged / bf16 GEMMs and every split point of a
batch-1 ResNet conv against numpy / an fp32 conv, outputs poisoned, each launched twice on the same
scratch (the counters must come back zero); a model with split GEMMs through nnc.load (CUDA graph
replays) against the reference interpreter."""
from __future__ import annotations

import numpy as np
import pytest

from nnc.codegen.kernels import common, conv_wgmma as CW, gemm, gemm_wgmma as W
from nnc.codegen.target import ARCHS

from . import space_cover
from .test_gemm_conv import HAVE_NVRTC, _check, _poison, needs_gpu

SM90A = ARCHS["sm_90a"]

BERT_B1 = [(128, 2304, 768), (128, 768, 3072), (128, 3072, 768), (128, 768, 768)]


def _split_points(pr, **kw):
    return [p for p in W.candidates(pr, SM90A, unverified=True, **kw) if W.split_k(p) > 1]


# ---------------------------------------------------------------- space / render (CPU)
def test_split_points_only_for_few_tiles_and_long_k():
    for M, N, K in BERT_B1:
        pr = gemm.GemmProblem(M, N, K)
        pts = _split_points(pr, b_bulk=True)
        assert pts, (M, N, K)
        for p in pts:
            assert W.load_kind(p) == "tma" and not W.persistent(p) and W._valid(p, SM90A)
            assert W.split_k(p) in gemm.SPLIT_K_SPACE
            tiles = -(-M // p["BM"]) * -(-N // p["BN"])
            assert tiles < SM90A.sm_count and tiles * W.split_k(p) <= 2 * SM90A.sm_count
            assert -(-K // W.BK) // W.split_k(p) >= W.SPLIT_MIN_K_TILES
    assert not _split_points(gemm.GemmProblem(4096, 3072, 768))  # many tiles: no split
    assert not _split_points(gemm.GemmProblem(128, 768, 128))  # 2 k-tiles: nothing to split


def test_render_split_grid_and_scratch_args():
    pr = gemm.GemmProblem(128, 768, 3072, has_bias=True, bias_dtype="float32", act="gelu")
    p = _split_points(pr)[0]
    spec = W.render(pr, p)
    tiles = -(-128 // p["BM"]) * -(-768 // p["BN"])
    assert spec.grid == (tiles, W.split_k(p), 1)
    names = [a[0] for a in spec.args]
    assert names[-4:] == ["ws", "tile_counters", "tmA", "tmB"]
    ws, counters = gemm.splitk_workspace(pr, p)
    assert spec.args[-4][1:] == ("float*", ws) and spec.args[-3][1:] == ("int*", counters)
    assert ws == W.split_k(p) * tiles * p["BM"] * p["BN"] and counters == tiles
    src = spec.source
    assert f"SPLIT_K {W.split_k(p)}" in src and "atomicAdd(tile_counters" in src and "bar.sync 2," in src
    assert "float* __restrict__ ws, int* __restrict__ tile_counters, const __grid_constant__" in src
    unsplit = dict(p)
    del unsplit["SPLIT_K"]
    assert "tile_counters" not in W.render(pr, unsplit).source  # unsplit kernels as before
    with pytest.raises(ValueError, match="declared space"):
        W.render(pr, dict(p, LOAD="cp_async"))
    with pytest.raises(ValueError, match="declared space"):
        W.render(pr, dict(p, SCHED="pingpong", CW=2))
    with pytest.raises(ValueError, match="k-tiles"):
        W.render(pr, dict(p, SPLIT_K=49))


def test_heuristic_splits_only_with_the_gain(monkeypatch):
    pr = gemm.GemmProblem(49, 512, 4608)
    assert W.split_k(W.default_params(pr, SM90A, True)) == 1  # not by default until run on a GPU
    assert not _split_points(pr) or not [p for p in W.candidates(pr, SM90A, True) if W.split_k(p) > 1]
    monkeypatch.setattr(W, "UNVERIFIED_IN_SPACE", True)  # once the split kernels have run on a GPU
    for M, N, K in BERT_B1 + [(49, 512, 4608), (4096, 768, 3072)]:
        pr = gemm.GemmProblem(M, N, K)
        d = W.default_params(pr, SM90A, True)
        cands = W.candidates(pr, SM90A, True)
        t = lambda p: W.modelled_time(pr, p, SM90A)  # noqa: E731
        unsplit = min((p for p in cands if W.split_k(p) == 1), key=t)
        if W.split_k(d) > 1:
            assert t(d) <= gemm.SPLIT_K_MIN_GAIN * t(unsplit)
        else:
            assert d == unsplit
    # a long-K, few-tile GEMM (ResNet-50 b1 7x7 3x3 conv's): the model splits it
    assert W.split_k(W.default_params(gemm.GemmProblem(49, 512, 4608), SM90A, True)) > 1


def test_conv_im2col_space_splits_at_batch_1():
    from nnc.codegen.kernels import conv
    pr = conv.ConvProblem(1, 512, 7, 7, 512, 3, 3, pads=(1,) * 4, in_layout="NHWC", out_layout="NHWC")
    gp, geo = CW.igemm_problem(pr), CW.im2col_geometry(pr)
    pts = [p for p in W.candidates(gp, SM90A, True, True, True, unverified=True) if W.split_k(p) > 1]
    assert pts and all(W.load_kind(p) == "tma" for p in pts)
    src = W.render(gp, pts[0], im2col=geo, target=SM90A).source
    assert "kt_first % 8" in src and ".im2col.mbarrier" in src  # (r, s, c0) of the split's first k-tile


# ---------------------------------------------------------------- NVRTC (CPU)
def _few(pts, default):
    """The first split point, the deepest split, a two-CTA one and the heuristic's (if split)."""
    picks = [pts[0], max(pts, key=W.split_k), next((p for p in pts if p.get("CTAS") == 2), None), default]
    return [p for i, p in enumerate(picks) if p in pts and p not in picks[:i]]


def split_specs():
    """[(case, spec)]: _few split points of a batch-1 BERT GEMM (fp16; bf16 B^T), two of a ragged
    A^T one, _few of two batch-1 ResNet TMA im2col convs."""
    from nnc.codegen.kernels import conv
    specs = []
    for dt, tb in (("float16", False), ("bfloat16", True)):
        pr = gemm.GemmProblem(128, 768, 3072, dtype=dt, trans_b=tb, has_bias=True, bias_dtype="float32",
                              act="gelu", has_c=True, ldc_m=768, ldc_n=1, beta=1.0)
        specs += [(f"bert {dt}", W.render(pr, p)) for p in _few(_split_points(pr), W.default_params(pr, SM90A))]
    pr = gemm.GemmProblem(104, 520, 1000, trans_a=True, out_dtype="float32")  # ragged N, K; A [K, M]
    specs += [("ragged A^T", W.render(pr, p)) for p in _split_points(pr)[:2]]
    for C, H, K, R, st, pad in ((512, 7, 512, 3, 1, 1), (128, 28, 128, 3, 2, 1)):
        cp = conv.ConvProblem(1, C, H, H, K, R, R, stride=(st, st), pads=(pad,) * 4, in_layout="NHWC",
                              out_layout="NHWC")
        gp, geo = CW.igemm_problem(cp), CW.im2col_geometry(cp)
        pts = [p for p in W.candidates(gp, SM90A, True, True, True, unverified=True) if W.split_k(p) > 1]
        specs += [(f"conv C{C} s{st}", W.render(gp, p, im2col=geo, target=SM90A))
                  for p in _few(pts, W.default_params(gp, SM90A, True, True, True))]
    return specs


@pytest.mark.skipif(not HAVE_NVRTC, reason="NVRTC unavailable")
def test_every_split_kernel_compiles_sm90a():
    """A covering subset of split_specs() (tests/codegen/space_cover.py: each case, each parameter
    value, SPLIT_K included, each line of code); NNC_FULL_SPACE=1: all of them."""
    labelled = split_specs()
    assert len({s.name for _, s in labelled}) >= 10
    chosen = space_cover.to_compile(labelled)
    assert all(sz > 0 for sz in space_cover.nvrtc_compile_all([s.source for s in chosen]))


# ---------------------------------------------------------------- lowering (CPU)
def _split_first(monkeypatch):
    """A selector that takes the wgmma split-K TMA points (in the space for this test: they are not
    until they have run on a GPU) over everything else (the mma.sync family has SPLIT_K points too)."""
    from nnc.codegen import variants
    monkeypatch.setattr(W, "UNVERIFIED_IN_SPACE", True)
    monkeypatch.setitem(variants.SELECTORS, "split-first", lambda: variants.TimedSelector(
        lambda c, p: 0.0 if W.split_k(p) > 1 and W.load_kind(p) == "tma" else 1.0))
    return "split-first"


def _split_model():
    """Two batch-1-like weight GEMMs (128 rows, long K) with bias / gelu, then a residual add."""
    from .cuda_models import F, N, mk
    rng = np.random.default_rng(4)
    return mk([N("MatMul", ["x", "w1"], ["m1"]), N("Add", ["m1", "b1"], ["a1"]), N("Gelu", ["a1"], ["h"]),
               N("MatMul", ["h", "w2"], ["m2"]), N("Add", ["m2", "x"], ["y"])],
              [("x", F, [128, 768])], [("y", F)],
              [("w1", (rng.standard_normal((768, 1024)) / 28).astype(np.float32)),
               ("b1", rng.standard_normal(1024).astype(np.float32)),
               ("w2", (rng.standard_normal((1024, 768)) / 32).astype(np.float32))])


def test_lowering_binds_workspace_and_shared_counters(monkeypatch, tmp_path):
    import json
    from .test_gemm_tma import _compile_model
    _, plan = _compile_model(_split_model(), tmp_path / "m", _split_first(monkeypatch))
    jplan = json.loads((tmp_path / "m" / "plan.json").read_text())
    split = [l for l in jplan["launches"] if l["kind"] == "kernel" and "SPLIT_K" in
             str(next(k for k in jplan["kernels"] if k["name"] == l["kernel"]).get("params", {}))]
    assert len(split) == 2, [l["kernel"] for l in jplan["launches"]]
    assert all(l["grid"][1] > 1 and l["kernel"].startswith("nnc_gemm_wgmma") for l in split)
    copies = [l for l in jplan["launches"] if l["kind"] == "memcpy"]
    assert len(copies) >= 1  # the run's counters zeroed once, before the first split GEMM
    first = min(jplan["launches"].index(l) for l in split)
    assert any(jplan["launches"].index(c) < first for c in copies)


# ---------------------------------------------------------------- GPU
GPU_CASES = [(128, 2304, 768, "float16", False, False, "bias"),
             (128, 768, 3072, "float16", False, False, "bias_residual_relu"),
             (128, 3072, 768, "bfloat16", False, True, "bias_gelu"),
             (104, 520, 1000, "float16", True, False, "cast_f32"),
             (37, 136, 2056, "float16", False, True, "scale")]


def _run_twice(spec, bufs):
    import cupy
    from nnc.codegen import tma
    from .test_conv_tma import _CUBINS, _cubins
    _cubins([spec])
    fn = common.load_cubin(_CUBINS[spec.source], spec)
    scratch = W.splitk_arrays(spec)
    vals = tma.kernel_spec_args(spec, {**scratch, **bufs})
    poisoned = bufs["D"].copy()
    for _ in range(2):  # the second launch finds the counters the first left (zero, or it is wrong)
        bufs["D"][...] = poisoned
        fn(spec.grid, spec.block, vals, shared_mem=spec.smem)
    cupy.cuda.runtime.deviceSynchronize()
    assert int(abs(scratch["tile_counters"]).sum()) == 0


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}-ta{int(c[4])}tb{int(c[5])}-{c[6]}")
def test_split_gemm_gpu(case):
    from .test_gemm_wgmma import _bufs, _case_arrays
    rng = np.random.default_rng(abs(hash(case)) & 0xFFFF)
    pr, a, b, extra, ref = _case_arrays(case, rng)
    odt = pr.out_dtype or pr.dtype
    bufs = _bufs(pr, a, b, extra)
    pts = _split_points(pr)
    assert pts
    pts = pts[::3] + [p for p in (max(pts, key=W.split_k),) if p not in pts[::3]]  # every 3rd and the deepest
    from .test_conv_tma import _cubins
    _cubins([W.render(pr, p) for p in pts])  # in parallel
    for p in pts:
        d = _poison((pr.M, pr.N), odt)
        _run_twice(W.render(pr, p), dict(bufs, D=d))
        from .test_gemm_conv import _host
        _check(_host(d, odt), ref, 1e-2 if pr.dtype == "float16" else 3e-2)


@pytest.mark.gpu
@needs_gpu
def test_split_tma_im2col_conv_gpu():
    """A batch-1 ResNet-50 3x3 512->512 @7 conv (49 rows, K = 4608): every split TMA-im2col point."""
    import cupy
    from nnc.codegen.kernels import conv
    from .test_conv_wgmma import _conv_ref_gpu
    from .test_gemm_conv import _dev, _host, _rounded
    pr = conv.ConvProblem(1, 512, 7, 7, 512, 3, 3, pads=(1,) * 4, in_layout="NHWC", out_layout="NHWC")
    gp, geo = CW.igemm_problem(pr), CW.im2col_geometry(pr)
    rng = np.random.default_rng(9)
    x = _rounded(rng.uniform(-1, 1, (1, 7, 7, 512)), "float16").astype(np.float32)
    w = _rounded(rng.uniform(-1, 1, (512, 3, 3, 512)) / 48, "float16").astype(np.float32)
    ref = _conv_ref_gpu(cupy.asarray(x), cupy.asarray(w), pr).get().astype(np.float64)
    pts = [p for p in W.candidates(gp, SM90A, True, True, True, unverified=True) if W.split_k(p) > 1]
    assert pts
    from .test_conv_tma import _cubins
    _cubins([W.render(gp, p, im2col=geo, target=SM90A) for p in pts])
    for p in pts:
        d = _poison((gp.M, 512), "float16")
        _run_twice(W.render(gp, p, im2col=geo, target=SM90A), dict(A=_dev(x, "float16"), B=_dev(w, "float16"), D=d))
        _check(_host(d, "float16"), ref, 1e-2)


@pytest.mark.gpu
@needs_gpu
def test_split_model_through_nnc_load_gpu(monkeypatch, tmp_path):
    """Split GEMMs chosen in a compiled model: the workspace and the run's counters (zeroed by the
    plan's copy) through nnc.load, CUDA graph replays and eager runs, against the interpreter."""
    import nnc
    from nnc.ir.interp import Interpreter
    from .test_gemm_tma import _compile_model
    mod, _ = _compile_model(_split_model(), tmp_path / "m", _split_first(monkeypatch))
    rng = np.random.default_rng(12)
    for cuda_graph in (True, False):
        g = nnc.load(tmp_path / "m", cuda_graph=cuda_graph)
        for _ in range(3):
            feed = {x.name: rng.standard_normal(x.type.shape).astype(np.float32) for x in mod.main.args}
            ref = Interpreter(mod).run(feed)
            got = g.run(feed, output="numpy", poison=True)
            for k, v in ref.items():
                v = np.asarray(v, np.float64)
                a = np.asarray(got[k], np.float64)
                assert np.isfinite(a).all(), k
                assert np.abs(a - v).max() / (np.abs(v).max() + 1e-12) < 2e-2, k
