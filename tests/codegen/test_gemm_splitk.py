"""Split-K on the mma.sync GEMM (codegen/kernels/gemm.py SPLIT_K, templates/gemm_tc_core.cu.j2,
the scratch of codegen/kernels/gemm_lowering.py), on the CPU: the split arithmetic (Python and the
template's own index code compiled for the host), the space's pruning by the Target and K, the
workspace sizing, the heuristic's pick, NVRTC compile of split kernels for sm_90a, the lowering
(workspace and counters as step temps, the counters zeroed by a copy right before the launch),
the plan executor against the interpreter, and the tuner's sandbox capture of split points.
GPU checks: test_gemm_splitk_gpu.py."""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import replace

import numpy as np
import pytest

from nnc.codegen import tuning
from nnc.codegen.kernels import common, gemm
from nnc.codegen.lower import Lowerer, lower
from nnc.codegen.options import LowerOptions
from nnc.codegen.plan_exec import PlanExecutor
from nnc.codegen.target import for_arch
from nnc.codegen.variants import _params_key
from nnc.driver import pipeline_passes
from nnc.ir.interp import Interpreter
from nnc.onnx_import import import_model
from nnc.pipeline import Pipeline

from .cuda_models import F, N, mk
from .test_gemm_conv import HAVE_NVRTC
from .test_variants import _module

SM90 = for_arch("sm_90")
BERT_B1 = [(128, 2304, 768), (128, 768, 768), (128, 3072, 768), (128, 768, 3072)]
SMALL_M = BERT_B1 + [(49, 512, 2048), (49, 160, 960), (49, 1280, 320), (196, 256, 1024)]


def _split(p) -> int:
    return p.get("SPLIT_K", 1)


def _tiles(pr, p) -> int:
    return gemm.cdiv(pr.M, p["BM"]) * gemm.cdiv(pr.N, p["BN"]) * pr.nbatch


# ---------------------------------------------------------------- the split arithmetic

@pytest.mark.parametrize("k_tiles,split", [(kt, s) for kt in (1, 2, 3, 7, 24, 96, 97, 1000)
                                           for s in (1,) + gemm.SPLIT_K_SPACE if s <= kt])
def test_split_ranges_partition_the_k_tiles(k_tiles, split):
    r = gemm.split_ranges(k_tiles, split)
    assert r[0][0] == 0 and r[-1][1] == k_tiles
    assert all(a[1] == b[0] for a, b in zip(r, r[1:]))  # contiguous, in split order
    sizes = [e - f for f, e in r]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1  # whole tiles, balanced to one


HOST = r"""
#include <cstdio>
struct Dim { int x, y, z; };
int main() {
  int ks[] = {KS};
  for (int K : ks) {
    for (int y = 0; y < SPLIT; ++y) {
      Dim blockIdx{0, y, 0};
      CODE
      std::printf("%d %d %d\n", K, kt_first, kt_first + KT);
    }
  }
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="no host C++ compiler")
@pytest.mark.parametrize("split,bk", [(2, 32), (3, 32), (4, 64), (16, 32)])
def test_template_split_ranges_are_the_formula(split, bk, tmp_path):
    """The template's split code itself (as rendered), compiled for the host with blockIdx.y
    emulated, gives split_ranges over ceil(K / BK) tiles, ragged K included."""
    pr = gemm.GemmProblem(128, 768, 3072)
    p = dict(BM=64, BN=64, BK=bk, WARPS_M=2, WARPS_N=2, STAGES=3, SPLIT_K=split)
    src = gemm.render(pr, p).source
    m = re.search(r"^\s*const int k_tiles = .*?^\s*const int KT = [^\n]*\n", src, re.S | re.M)
    assert m, "split-K index code not found"
    ks = [bk * split, bk * split + 1, 333, 3072, 3071, 10000]
    code = HOST.replace("KS", ",".join(map(str, ks))).replace("SPLIT", str(split)).replace("CODE", m.group(0))
    cpp, exe = tmp_path / "split.cpp", tmp_path / "split"
    cpp.write_text(code)
    r = subprocess.run(["g++", "-O1", "-std=c++17", str(cpp), "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = [tuple(map(int, line.split())) for line in subprocess.run([str(exe)], capture_output=True, text=True,
                                                                      check=True).stdout.splitlines()]
    want = [(K, f, e) for K in ks for f, e in gemm.split_ranges(gemm.cdiv(K, bk), split)]
    assert out == want


# ---------------------------------------------------------------- the space, pruned by Target and K

@pytest.mark.parametrize("M,N,K", SMALL_M)
def test_split_points_are_pruned_by_target_and_k(M, N, K):
    pr = gemm.GemmProblem(M, N, K)
    cands = gemm.candidates(pr, SM90)
    split = [p for p in cands if _split(p) > 1]
    assert split, "an underfilled long-K GEMM has split points"
    for p in split:
        s, tiles, k_tiles = _split(p), _tiles(pr, p), gemm.cdiv(K, p["BK"])
        assert s in gemm.SPLIT_K_SPACE and p["swizzle"] == gemm.GROUP_M
        assert tiles < SM90.sm_count  # only grids that leave SMs idle
        assert tiles * s <= gemm.SPLIT_K_MAX_PER_SM * SM90.sm_count
        assert k_tiles // s >= max(2, p["STAGES"] - 1)  # every split fills the pipeline
        assert gemm.splitk_workspace(pr, p)[0] * 4 <= SM90.l2_bytes // 2
        assert {k: v for k, v in p.items() if k != "SPLIT_K"} in cands  # the unsplit tile is there too


def test_no_split_points_where_the_grid_fills_the_gpu_or_k_is_short():
    assert not [p for p in gemm.candidates(gemm.GemmProblem(4096, 4096, 4096), SM90) if _split(p) > 1]
    assert not [p for p in gemm.candidates(gemm.GemmProblem(128, 768, 64), SM90) if _split(p) > 1]
    f32 = gemm.GemmProblem(128, 768, 3072, dtype="float32")  # the FFMA template has no split-K
    assert not [p for p in gemm.candidates(f32, SM90) if _split(p) > 1]
    tf32 = replace(f32, tf32=True)
    assert [p for p in gemm.candidates(tf32, SM90) if _split(p) > 1]


def test_the_sm_count_prunes():
    """Fewer SMs: fewer grids leave SMs idle, and the split grid cap (2 CTAs per SM) is lower."""
    pr = gemm.GemmProblem(128, 768, 3072)
    small = replace(SM90, sm_count=16)
    for p in gemm.candidates(pr, small):
        if _split(p) > 1:
            assert _tiles(pr, p) < 16 and _tiles(pr, p) * _split(p) <= 32
    big = {_params_key(p) for p in gemm.candidates(pr, SM90) if _split(p) > 1}
    few = {_params_key(p) for p in gemm.candidates(pr, small) if _split(p) > 1}
    assert few < big


# ---------------------------------------------------------------- workspace sizing, render

def test_workspace_sizing_and_launch_shape():
    pr = gemm.GemmProblem(100, 200, 1000, batch=(2, 3), stride_a=(3 * 100 * 1000, 100 * 1000),
                          stride_b=(0, 0), stride_d=(3 * 100 * 200, 100 * 200))
    p = dict(BM=64, BN=64, BK=32, WARPS_M=2, WARPS_N=2, STAGES=4, SPLIT_K=3)
    tiles = 2 * 4  # ceil(100/64) x ceil(200/64)
    ws, counters = gemm.splitk_workspace(pr, p)
    assert counters == tiles * 6 and ws == 3 * tiles * 6 * 64 * 64
    assert gemm.splitk_workspace(pr, dict(p, SPLIT_K=1)) == (0, 0)
    spec = gemm.render(pr, p)
    assert spec.grid == (tiles, 3, 6)
    assert spec.args[-2:] == [("ws", "float*", ws), ("tile_counters", "int*", counters)]
    assert spec.params["SPLIT_K"] == 3
    assert "float* __restrict__ ws, int* __restrict__ tile_counters" in spec.source


def test_unsplit_kernels_are_unchanged_and_the_header_names_split_k():
    pr = gemm.GemmProblem(128, 768, 3072, has_bias=True, bias_dtype="float32", act="gelu")
    p = dict(BM=64, BN=64, BK=32, WARPS_M=2, WARPS_N=2, STAGES=4)
    a, b = gemm.render(pr, p), gemm.render(pr, dict(p, SPLIT_K=1))
    assert (a.source, a.name, a.grid, a.args, a.params) == (b.source, b.name, b.grid, b.args, b.params)
    assert "SPLIT_K" not in a.source and "tile_counters" not in a.source and "SPLIT_K" not in a.params
    s = gemm.render(pr, dict(p, SPLIT_K=4))
    assert s.name != a.name
    assert re.search(r"^// tile 64x64x32, .*SPLIT_K 4", s.source, re.M)


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "4", 70000])
def test_bad_split_k_is_refused(bad):
    pr = gemm.GemmProblem(128, 768, 3072)
    with pytest.raises(ValueError, match="SPLIT_K"):
        gemm.render(pr, dict(BM=64, BN=64, BK=32, WARPS_M=2, WARPS_N=2, STAGES=4, SPLIT_K=bad))
    with pytest.raises(ValueError, match="tensor-core"):
        gemm.render(gemm.GemmProblem(128, 768, 3072, dtype="float32"), dict(BM=64, BN=64, BK=8, SPLIT_K=2))


# ---------------------------------------------------------------- the heuristic

@pytest.mark.parametrize("M,N,K", SMALL_M + [(4096, 4096, 4096), (4096, 768, 3072), (128, 64, 64)])
def test_default_is_in_the_space_and_splits_only_underfilled_grids(M, N, K):
    pr = gemm.GemmProblem(M, N, K)
    d = gemm.default_params(pr, SM90)
    assert d in gemm.candidates(pr, SM90)
    if _split(d) > 1:
        assert _tiles(pr, d) < SM90.sm_count
        whole = gemm._default_whole(pr, [p for p in gemm.candidates(pr, SM90) if _split(p) == 1], SM90)
        assert gemm.modelled_time(pr, d, SM90) <= gemm.SPLIT_K_MIN_GAIN * gemm.modelled_time(pr, whole, SM90)


def test_default_splits_the_long_k_small_m_shapes():
    """BERT b1 FFN-down (K 3072 on 24 tiles) and ResNet-50's last 1x1 conv (K 2048 on 8 tiles)."""
    for M, N, K in [(128, 768, 3072), (49, 512, 2048)]:
        assert _split(gemm.default_params(gemm.GemmProblem(M, N, K), SM90)) > 1, (M, N, K)


def test_model_for_unsplit_points_ranks_as_the_old_cost():
    """modelled_time at SPLIT_K 1 is the variant's old cost (waves x tile x K) scaled, plus a
    constant, so the tuner's top-K pruning of unsplit spaces ranks as before."""
    pr = gemm.GemmProblem(1000, 3000, 700)
    pts = [p for p in gemm.candidates(pr, SM90) if _split(p) == 1]
    old = np.array([gemm.cdiv(_tiles(pr, p), SM90.sm_count) * 2.0 * p["BM"] * p["BN"] * pr.K / 5e12 for p in pts])
    new = np.array([gemm.modelled_time(pr, p, SM90) for p in pts])
    assert np.allclose(new - gemm.LAUNCH_S, old * (5e12 / gemm.CTA_FLOPS))


def test_default_matches_the_h200_bests():
    """The heuristic's picks for the shapes tools/bench_splitk.py timed on an H200 (2026-12-02):
    split where the best measured split point beat every unsplit tile, with that split."""
    want = {(128, 2304, 768): 1, (128, 768, 768): 4, (128, 3072, 768): 1, (128, 768, 3072): 4,
            (49, 160, 960): 4, (49, 1280, 320): 1, (49, 512, 2048): 6}
    for (M, N, K), s in want.items():
        d = gemm.default_params(gemm.GemmProblem(M, N, K), SM90)
        assert _split(d) == s, (M, N, K, d)
        if s > 1:
            assert (d["BM"], d["BN"], d["BK"]) == (64, 64, 64)


# ---------------------------------------------------------------- NVRTC (sm_90a)

def _compile_cases():
    d = dict(BM=64, BN=64, BK=32, WARPS_M=2, WARPS_N=2, STAGES=4)
    return [
        (gemm.GemmProblem(128, 768, 3072), dict(d, SPLIT_K=4)),
        (gemm.GemmProblem(129, 67, 333, trans_a=True, trans_b=True, has_c=True, ldc_m=0, act="gelu"),
         dict(d, SPLIT_K=3)),
        (gemm.GemmProblem(128, 768, 3072, has_bias=True, bias_dtype="float32", act="gelu", has_c=True, ldc_m=768,
                          ldc_n=1, beta=1.0), dict(BM=128, BN=256, BK=32, WARPS_M=2, WARPS_N=4, STAGES=3, SPLIT_K=16)),
        (gemm.GemmProblem(512, 49, 2048, has_bias=True, bias_dtype="float32", bias_rows=True, act="relu"),
         dict(d, SPLIT_K=8)),
        (gemm.matmul_problem((12, 128, 64), (12, 64, 128), "float16"), dict(d, SPLIT_K=2)),
        (gemm.GemmProblem(130, 96, 1000, dtype="bfloat16", trans_b=True), dict(d, SPLIT_K=6)),
        (gemm.GemmProblem(128, 768, 3072, dtype="float32", tf32=True, has_bias=True, bias_dtype="float32",
                          act="gelu", has_c=True, ldc_m=768, ldc_n=1), dict(BM=128, BN=128, BK=16, WARPS_M=2,
                                                                           WARPS_N=2, STAGES=4, SPLIT_K=4)),
        (gemm.GemmProblem(100, 200, 999, dtype="float32", tf32=True, out_dtype="float16", trans_a=True),
         dict(BM=64, BN=64, BK=32, WARPS_M=2, WARPS_N=2, STAGES=4, SPLIT_K=12)),
    ]


@pytest.mark.skipif(not HAVE_NVRTC, reason="NVRTC unavailable")
def test_split_kernels_compile_for_sm90a():
    groups: dict = {}
    for pr, p in _compile_cases():
        spec = gemm.render(pr, p)
        key = tuple(line for line in spec.source.splitlines() if line.startswith("typedef"))
        groups.setdefault(key, []).append(spec.source)
    for srcs in groups.values():  # kernels of one element type share a translation unit
        assert len(common.nvrtc_compile("\n".join(srcs), "sm_90a")) > 0


# ---------------------------------------------------------------- the lowering, the plan

def _linear_model(rows=128, k=3072, cols=768, seed=0):
    """y = gelu(x @ w + b) + r: the epilogue (bias, activation, residual) fuses into the GEMM."""
    rng = np.random.default_rng(seed)
    return mk([N("MatMul", ["x", "w"], ["h"]), N("Add", ["h", "b"], ["hb"]), N("Gelu", ["hb"], ["g"]),
               N("Add", ["g", "r"], ["y"])],
              [("x", F, [rows, k]), ("r", F, [rows, cols])], [("y", F)],
              [("w", (rng.standard_normal((k, cols)) / np.sqrt(k)).astype(np.float32)),
               ("b", rng.standard_normal(cols).astype(np.float32))], opset=20)


def _plan(model, precision="fp16", **kw):
    mod = _module(model, precision)
    return mod, lower(mod, LowerOptions(SM90, precision=precision, **kw))


def _split_launch(plan):
    for i, l in enumerate(plan.launches):
        k = plan.kernels.get(l.kernel) if l.kind == "kernel" else None
        if k is not None and k.params.get("SPLIT_K", 1) > 1:
            return i, l, k
    raise AssertionError("no split-K kernel in the plan")


def test_lowering_binds_workspace_and_zeroed_counters_as_step_temps():
    mod, plan = _plan(_linear_model())
    i, l, k = _split_launch(plan)
    split = k.params["SPLIT_K"]
    assert l.grid[1] == split and "erff" in k.body  # bias, gelu and the residual fused: one kernel
    assert k.params["selected"]["variant"] in ("gemm.matmul", "epilogue.gemm") or "Gelu" in k.source
    ws, ctr = l.args[-2], l.args[-1]
    assert ws.kind == ctr.kind == "temp" and ws.dtype.short == "f32" and ctr.dtype.short == "i32"
    tiles = l.grid[0] * l.grid[2]
    assert ws.numel == split * tiles * k.params["BM"] * k.params["BN"]
    assert ctr.numel == SM90.sm_count >= tiles  # the run's shared counters: a slot per SM
    # the counters are zeroed right before the (first) split launch, from a zero constant
    z = plan.launches[i - 1]
    assert z.kind == "memcpy" and z.args[0] is ctr and z.nbytes == ctr.nbytes
    assert z.args[1].kind == "weight" and z.args[1].data is not None and not z.args[1].data.any()
    assert z.args[1].nbytes == ctr.nbytes and ctr.data is not None and not ctr.data.any()
    step = next(s for s in plan.steps if s.launches[0] <= i < s.launches[1])
    assert step.launches[0] <= i - 1 and {ws.id, ctr.id} <= set(step.temps)
    # the kernel's header names its IR ops and parameters, SPLIT_K included
    assert "MatMul" in k.source and '"SPLIT_K":' in k.source
    assert k.params["selected"]["params"]["SPLIT_K"] == split  # plan.json "kernels" carry the params


def _two_split_gemms():
    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((3072, 768)).astype(np.float32) for _ in range(2))
    return mk([N("MatMul", ["x", "w1"], ["a"]), N("Sigmoid", ["x"], ["x2"]), N("MatMul", ["x2", "w2"], ["b"]),
               N("Add", ["a", "b"], ["y"])],  # (two inputs: not one horizontally fused GEMM)
              [("x", F, [128, 3072])], [("y", F)], [("w1", w1), ("w2", w2)])


def _split_launches(plan):
    return [(i, l) for i, l in enumerate(plan.launches) if l.kind == "kernel"
            and plan.kernels[l.kernel].params.get("SPLIT_K", 1) > 1]


def test_split_gemms_of_a_run_share_one_counters_buffer_zeroed_once():
    from nnc.codegen import memory
    _, plan = _plan(_two_split_gemms())
    sl = _split_launches(plan)
    assert len(sl) == 2
    ctr = sl[0][1].args[-1]
    assert sl[1][1].args[-1] is ctr and sl[0][1].args[-2] is not sl[1][1].args[-2]  # own workspaces
    copies = [(i, l) for i, l in enumerate(plan.launches) if l.kind == "memcpy" and l.args[0] is ctr]
    assert [i for i, _ in copies] == [sl[0][0] - 1]  # one zeroing copy, right before the first
    # live from that copy to the last split launch: no other temp shares its bytes meanwhile
    first, last = memory.liveness(plan)
    assert (first[ctr.id], last[ctr.id]) == (sl[0][0] - 1, sl[1][0])
    for b in plan.buffers:
        if b.kind == "temp" and b.alias_of is None and b is not ctr and b.id in first \
                and first[b.id] <= last[ctr.id] and last[b.id] >= first[ctr.id]:
            assert b.offset + b.nbytes <= ctr.offset or ctr.offset + ctr.nbytes <= b.offset, b.name


def test_init_phase_split_gemm_has_its_own_counters():
    """A split GEMM of constants only runs in the load-time init phase (codegen/init_phase.py): its
    counters are zeroed there; the run's split GEMMs get their own, zeroed every run."""
    rng = np.random.default_rng(0)
    c1 = rng.standard_normal((128, 3072)).astype(np.float32)  # 128 x 768 result: too big to fold
    c2, w = (rng.standard_normal((3072, 768)).astype(np.float32) for _ in range(2))
    model = mk([N("MatMul", ["c1", "c2"], ["k"]), N("MatMul", ["x", "w"], ["a"]), N("Add", ["a", "k"], ["y"])],
               [("x", F, [128, 3072])], [("y", F)], [("c1", c1), ("c2", c2), ("w", w)])
    mod = import_model(model)
    Pipeline([p for p in pipeline_passes("fp16") if not p.startswith("fuse")]).run(mod)  # a fused group never inits
    plan = lower(mod, LowerOptions(SM90, precision="fp16"))
    init = [l for l in plan.init_launches
            if l.kind == "kernel" and plan.kernels[l.kernel].params.get("SPLIT_K", 1) > 1]
    run = _split_launches(plan)
    assert init and run
    ci, cr = init[0].args[-1], run[0][1].args[-1]
    assert ci is not cr
    assert any(l.kind == "memcpy" and l.args[0] is ci for l in plan.init_launches)
    assert any(l.kind == "memcpy" and l.args[0] is cr for l in plan.launches)


def test_forced_split_of_a_big_grid_gets_its_own_zeroed_counters():
    from nnc.codegen.variants import ForcedSelector
    rng = np.random.default_rng(0)
    model = mk([N("MatMul", ["x", "w"], ["y"])], [("x", F, [2048, 1024])], [("y", F)],
               [("w", rng.standard_normal((1024, 1024)).astype(np.float32))])
    mod = _module(model, "fp16")
    forced = ForcedSelector("gemm.matmul", dict(BM=64, BN=64, BK=32, WARPS_M=2, WARPS_N=2, STAGES=4, SPLIT_K=2))
    plan = lower(mod, LowerOptions(SM90, precision="fp16"), selector=forced)
    (i, l), = _split_launches(plan)
    ctr = l.args[-1]
    assert ctr.numel == l.grid[0] == 32 * 16 > SM90.sm_count and ctr.data is None
    z = plan.launches[i - 1]
    assert z.kind == "memcpy" and z.args[0] is ctr and z.nbytes == ctr.nbytes


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_plan_executor_matches_the_interpreter(precision):
    """The plan (workspace and counters placed in the arena like any scratch) runs on the CPU as
    the interpreter does; fp32 with tf32 on takes the split tensor-core path too."""
    mod, plan = _plan(_linear_model(), precision, tf32=(precision == "fp32"))
    _split_launch(plan)
    ex = PlanExecutor.from_plan(plan, mod)
    rng = np.random.default_rng(3)
    for _ in range(2):
        feed = {"x": rng.standard_normal((128, 3072)).astype(np.float32 if precision == "fp32" else np.float16),
                "r": rng.standard_normal((128, 768)).astype(np.float32 if precision == "fp32" else np.float16)}
        feed = {a.name: feed[a.name].astype(a.type.dtype.np) for a in mod.main.args}
        ref = Interpreter(mod).run(feed)
        got = ex.run(feed)
        for n, r in ref.items():
            assert np.array_equal(got[n], r, equal_nan=True), n


def test_conv_1x1_gemm_path_splits_at_batch_1():
    rng = np.random.default_rng(0)
    model = mk([N("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1])], [("x", F, [1, 2048, 7, 7])], [("y", F)],
               [("w", rng.standard_normal((512, 2048, 1, 1)).astype(np.float32))])
    _, plan = _plan(model)
    i, l, k = _split_launch(plan)
    assert plan.launches[i - 1].kind == "memcpy"


# ---------------------------------------------------------------- the tuner sees the split points

def test_tuner_captures_and_can_pick_split_points():
    mod = _module(_linear_model(), "fp16")
    opts = LowerOptions(SM90, precision="fp16", tune=True)
    survey = tuning.SurveySelector(None)
    Lowerer(mod, opts, survey).run()
    (p,) = [p for p in survey.problems.values() if p.baseline.variant == "gemm.matmul"]
    caps = [c for c in [p.baseline] + p.others if not c.why_not and _split(c.params) > 1]
    assert caps, "split points are captured candidates"
    for c in caps:  # the counters start zeroed: by the copy, or (made by an earlier render) by their data
        kinds = [l[0] for l in c.launches]
        assert kinds in (["memcpy", "kernel"], ["kernel"])
        ctr = c.launches[-1][5][-1]
        assert ctr[0] == "buf"
        spec = c.roots[ctr[1]]
        assert spec.np_name == "int32" and (kinds[0] == "memcpy" or (spec.data is not None and not spec.data.any()))
    want = max(caps, key=lambda c: c.params["SPLIT_K"])
    key = (want.variant, _params_key(want.params))
    timer = lambda c, q: 1e-4 if (c.name, _params_key(q)) == key else 1e-3  # noqa: E731
    plan = tuning.lower_tuned(mod, opts, tuning.StandInRunner(timer))
    sel = [(k.params["selected"]["variant"], _params_key(k.params["selected"]["params"]))
           for k in plan.kernels.values()]
    assert key in sel


def test_tuner_times_split_points_of_a_second_problem_on_the_shared_counters():
    """The second split problem's sandbox renders bind the counters an earlier (real) render made:
    captured with their zero bytes as data, so still timable candidates."""
    rng = np.random.default_rng(0)
    model = mk([N("MatMul", ["x", "w1"], ["a"]), N("MatMul", ["z", "w2"], ["b"]), N("Add", ["a", "b"], ["y"])],
               [("x", F, [128, 3072]), ("z", F, [128, 2048])], [("y", F)],
               [("w1", rng.standard_normal((3072, 768)).astype(np.float32)),
                ("w2", rng.standard_normal((2048, 768)).astype(np.float32))])
    mod = _module(model, "fp16")
    survey = tuning.SurveySelector(None)
    Lowerer(mod, LowerOptions(SM90, precision="fp16", tune=True), survey).run()
    probs = [p for p in survey.problems.values() if p.baseline.variant == "gemm.matmul"]
    assert len(probs) == 2
    later = [c for p in probs for c in [p.baseline] + p.others if _split(c.params) > 1 and c.launches
             and c.launches[0][0] == "kernel"]
    assert later, "no capture on counters made earlier"
    for c in later:
        assert not c.why_not, c.why_not
        spec = c.roots[c.launches[-1][5][-1][1]]
        assert spec.shared and spec.data is not None and not spec.data.any()
