"""TMA loads for the Hopper wgmma GEMM (codegen/tma.py; gemm_wgmma.py LOAD = tma; templates/gemm_wgmma.cu.j2).

CPU: the tensor-map arguments (dims, strides, box, swizzle, element type) of every operand layout and
of batched operands; cuTensorMapEncodeTiled's rules (tma.check) and the variant's applies; the TMA
points in the declared space and the cost model; render's extra arguments; the TMA kernels of a
spread of problems NVRTC-compile for sm_90a (a covering subset; NNC_FULL_SPACE=1: every one); lowering through a model puts the tensor maps into
plan.json and the C API host code; the runtime's launch values (a stand-in encoder).
GPU (marked `gpu`): TMA points against numpy on ragged, transposed and batched problems, outputs
poisoned first; a model compiled with TMA GEMMs through nnc.load, replayed as a CUDA graph."""
from __future__ import annotations

import numpy as np
import pytest

from nnc.codegen import tma
from nnc.codegen.kernels import common, gemm, gemm_wgmma as W
from nnc.codegen.target import ARCHS

from . import space_cover
from .test_gemm_conv import HAVE_NVRTC, _check, _dev, _host, _poison, _rounded, needs_gpu

SM90A = ARCHS["sm_90a"]
SM90 = ARCHS["sm_90"]


def _tma_points(pr, target=SM90A, **kw):
    return [p for p in W.candidates(pr, target, **kw) if W.load_kind(p) == "tma"]


# ---------------------------------------------------------------- tensor-map arguments (CPU)
def test_specs_k_major_a_and_mn_major_b():
    pr = gemm.GemmProblem(4096, 768, 3072, dtype="float16")  # A [M, K], B [K, N]
    sa, sb, za, zb = W.tensor_map_specs(pr, dict(BM=128, BN=192))
    assert (sa.dims, sa.strides, sa.box, sa.swizzle, sa.arg) == ((3072, 4096), (3072 * 2,), (64, 128), 128, 0)
    assert (sb.dims, sb.strides, sb.box, sb.arg) == ((768, 3072), (768 * 2,), (64, 64), 1)  # 64-wide blocks
    assert za == zb == [] and sa.box_bytes == 128 * 128 and sb.box_bytes == 64 * 128
    assert tma.check(sa) == tma.check(sb) == ""


def test_specs_transposed_layouts_bf16_and_leading_dims():
    pr = gemm.GemmProblem(1000, 999, 520, dtype="bfloat16", trans_a=True, trans_b=True, lda=1008, ldb=528)
    sa, sb, _, _ = W.tensor_map_specs(pr, dict(BM=64, BN=256))
    assert (sa.dtype, sa.dims, sa.strides, sa.box) == ("bfloat16", (1000, 520), (2016,), (64, 64))  # A [K, M]
    assert (sb.dims, sb.strides, sb.box) == ((520, 999), (1056,), (64, 256))  # B [N, K], K-major
    d = tma.spec_dict(sb)
    assert tma.spec_of(d) == sb and d["dims"] == [520, 999]


def test_specs_batch_levels_skip_broadcast():
    pr = gemm.GemmProblem(512, 768, 64, batch=(2, 3), stride_a=(3 * 512 * 64, 512 * 64), stride_b=(0, 768 * 64),
                          stride_d=(3 * 512 * 768, 512 * 768))
    sa, sb, za, zb = W.tensor_map_specs(pr, dict(BM=128, BN=128))
    assert za == ["z1", "z0"] and sa.dims == (64, 512, 3, 2) and sa.strides == (128, 512 * 64 * 2, 3 * 512 * 64 * 2)
    assert sa.box == (64, 128, 1, 1)
    assert zb == ["z1"] and sb.dims == (768, 64, 3) and sb.box == (64, 64, 1)  # z0 broadcast: no dim
    src = W.render(pr, _tma_points(pr)[0]).source
    assert "nnc_tma_load(sa, &tmA, k0, m0, z1, z0, full)" in src
    assert "&tmB, n0 + 0, k0, z1, full)" in src


@pytest.mark.parametrize("kw,why", [
    (dict(strides=(24,)), "multiples of 16"),
    (dict(box=(64, 257)), "1..256"),
    (dict(box=(128, 64)), "exceeds the swizzle span"),
    (dict(box=(4, 64), swizzle=0), "multiple of 16 bytes"),
    (dict(dims=(0, 5)), "1..2^32"),
    (dict(swizzle=48), "swizzle 48"),
    (dict(dtype="float32"), "float32"),
    (dict(dims=(64,) * 6, strides=(128,) * 5, box=(64,) + (1,) * 5), "rank 6"),
])
def test_check_states_the_encode_rules(kw, why):
    base = dict(dtype="float16", dims=(64, 64), strides=(128,), box=(64, 64), swizzle=128, arg=0)
    got = tma.check(tma.TensorMapSpec(**{**base, **kw}))
    assert why in got, got


def test_encode_refuses_unaligned_address_without_a_driver():
    s = tma.TensorMapSpec("float16", (64, 64), (128,), (64, 64))
    with pytest.raises(ValueError, match="16-byte aligned"):
        tma.encode(s, 0x1008)
    with pytest.raises(ValueError, match="malformed"):
        tma.spec_of({"dtype": "float16"})


def test_tma_fits_and_the_space():
    pr = gemm.GemmProblem(4096, 2304, 768)
    assert W.tma_fits(pr, SM90A)
    assert not W.tma_fits(pr, SM90) and not _tma_points(pr, SM90)
    pts = _tma_points(pr)
    assert pts and all(W._valid(p, SM90A) for p in pts)
    # every schedule of the cp.async space has its TMA twin, BN = 192 too (boxes load any width)
    sched = {(p["BM"], p["BN"], p["STAGES"], p["CW"], p.get("SCHED"), p.get("PERSIST"), p.get("CTAS"), p.get("EPI"))
             for p in pts}
    assert any(p["BN"] == 192 for p in pts) and any(W.pingpong(p) for p in pts) and any(p.get("CTAS") == 2 for p in pts)
    assert len(sched) == len(pts)
    # a weight B: the bulk points, the cp.async points and the TMA points
    bulk_space = W.candidates(pr, SM90A, b_bulk=True)
    assert {W.load_kind(p) for p in bulk_space} == {"cp_async", "tma"} and any(p.get("b_bulk") for p in bulk_space)
    assert not any(p.get("b_bulk") and W.load_kind(p) == "tma" for p in bulk_space)
    # a conv's implicit im2col A: no TMA (the rows are gathered)
    assert not [p for p in W.candidates(pr, SM90A, im2col=True) if W.load_kind(p) == "tma"]
    with pytest.raises(ValueError, match="declared space"):
        W.render(pr, dict(pts[0], LOAD="tma", LAG=1))
    with pytest.raises(ValueError, match="declared space"):
        W.render(pr, dict(pts[0], LOAD="dma"))


# (M, N, K, batch) -> the fastest TMA point measured (H200, fp16; 2026-12-02 tools/check_gemm_tma.py,
# batched; 2026-12-03 tools/check_wgmma_vs_vendor.py: EPI = tma points, what the heuristic now picks)
MEASURED_BEST = {
    (4096, 4096, 4096, 1): "128x256x3/cw2/persist",
    (4096, 3072, 768, 1): "128x128x5/cw2/pingpong",
    (4096, 768, 3072, 1): "128x192x4/cw2",
    (512, 768, 768, 12): "64x128x8/cw2/pingpong",
}


def _tag(p):
    return (f"{p['BM']}x{p['BN']}x{p['STAGES']}/cw{p['CW']}" + ("/2cta" if p.get("CTAS") == 2 else "")
            + ("/pingpong" if W.pingpong(p) else "/persist" if p.get("PERSIST") else ""))


def test_cost_model_picks_the_measured_best_tma_point_and_tma_over_bulk():
    pr = gemm.GemmProblem(4096, 3072, 768)
    tile = dict(BM=128, BN=192, STAGES=4, CW=2, swizzle=gemm.GROUP_M)
    t_cp = W.modelled_time(pr, tile, SM90A)
    t_tma = W.modelled_time(pr, dict(tile, LOAD="tma"), SM90A)
    t_bulk = W.modelled_time(pr, dict(tile, b_bulk=True), SM90A)
    assert t_tma < t_bulk < t_cp  # as measured: TMA 1.3-1.9x the bulk-B and cp.async points
    flops = 2.0 * pr.M * pr.N * pr.K
    assert 200e12 < flops / t_tma < 800e12  # a plausible H200 rate (K = 768: the epilogue weighs)
    for (M, N, K, nb), best in MEASURED_BEST.items():
        p = gemm.GemmProblem(M, N, K, trans_b=nb > 1, batch=(1, nb), stride_a=(0, M * K) if nb > 1 else (0, 0),
                             stride_d=(0, M * N) if nb > 1 else (0, 0))
        d = W.default_params(p, SM90A, b_bulk=nb == 1)  # a weight B gets TMA too
        assert W.load_kind(d) == "tma" and _tag(d) == best, (M, N, K, nb, _tag(d))


def test_render_appends_the_two_tensor_maps():
    pr = gemm.GemmProblem(4096, 768, 3072, has_bias=True, bias_dtype="float32", act="gelu")
    p = _tma_points(pr)[0]
    spec = W.render(pr, p)
    names = [a[0] for a in spec.args]
    assert names[:2] == ["A", "B"] and names[-2:] == ["tmA", "tmB"]
    assert [a[1] for a in spec.args[-2:]] == [tma.TMAP_CTYPE] * 2
    assert spec.args[-2][2]["arg"] == 0 and spec.args[-1][2]["arg"] == 1
    src = spec.source
    assert "const __grid_constant__ nnc_tmap tmA" in src and "cp.async.bulk.tensor.2d" in src
    assert "A and B by TMA" in src and "cp.async.cg" not in src.split("namespace")[-1]
    # a cp.async point keeps its name and arguments (LOAD enters the kernel only when tma)
    cp = dict(p)
    del cp["LOAD"]
    assert "tmA" not in [a[0] for a in W.render(pr, cp).args] and W.render(pr, cp).name != spec.name


# ---------------------------------------------------------------- NVRTC compile (CPU)
def tma_specs():
    """[(case, spec)]: every TMA point (but the staged epilogue's) of a bias + gelu problem, the
    first and last of every operand layout, three of a batched problem; fp16 and bf16."""
    specs = []
    for dt in ("float16", "bfloat16"):
        base = gemm.GemmProblem(4096, 4096, 4096, dtype=dt, has_bias=True, bias_dtype="float32", act="gelu")
        specs += [(f"{dt} bias gelu", W.render(base, p)) for p in _tma_points(base) if not W.epi_smem(p)]
        for ta in (False, True):
            for tb in (False, True):
                pr = gemm.GemmProblem(1000, 1000 if not tb else 999, 328, dtype=dt, trans_a=ta, trans_b=tb,
                                      has_c=True, ldc_m=0, act="relu", alpha=0.5, beta=2.0,
                                      out_dtype="float32" if ta else None)
                pts = _tma_points(pr)
                specs += [(f"{dt} ta={ta} tb={tb}", W.render(pr, p)) for p in (pts[0], pts[-1])]
    batched = gemm.GemmProblem(512, 768, 64, batch=(2, 3), stride_a=(3 * 512 * 64, 512 * 64), stride_b=(0, 768 * 64),
                               stride_d=(3 * 512 * 768, 512 * 768), has_bias=True, act="silu")
    specs += [("batched", W.render(batched, p)) for p in _tma_points(batched)[:3]]
    return specs


def _tensor_rank(s) -> list:
    return [f"bulk.tensor.{d}d" for d in (2, 3, 4, 5) if f"bulk.tensor.{d}d" in s.source]


@pytest.mark.skipif(not HAVE_NVRTC, reason="NVRTC unavailable")
def test_every_tma_kernel_compiles_sm90a():
    """NVRTC compiles a covering subset of tma_specs() (tests/codegen/space_cover.py: each case, each
    parameter value, each tensor-map rank, each line of code); NNC_FULL_SPACE=1: all of them.
    Every point's source is checked as text."""
    labelled = tma_specs()
    specs = [s for _, s in labelled]
    assert len({s.name for s in specs}) >= 20
    chosen = space_cover.to_compile(labelled, _tensor_rank)
    assert all(sz > 0 for sz in space_cover.nvrtc_compile_all([s.source for s in chosen]))
    assert all("cp.async.bulk.tensor" in s.source and "mbarrier.arrive.expect_tx" in s.source for s in specs)
    assert any("bulk.tensor.4d" in s.source for s in specs) and any("bulk.tensor.3d" in s.source for s in specs)


# ---------------------------------------------------------------- lowering and the runtime (CPU)
def _tma_first(monkeypatch):
    from nnc.codegen import variants
    monkeypatch.setitem(variants.SELECTORS, "tma-first",
                        lambda: variants.TimedSelector(lambda c, p: 0.0 if W.load_kind(p) == "tma" else 1.0))
    return "tma-first"


def _compile_model(model, out, selector):
    from nnc.codegen.emit import compile_to_dir
    from nnc.codegen.options import CodegenOptions, LowerOptions
    from nnc.codegen.target import for_arch
    from nnc.driver import pipeline_passes
    from nnc.onnx_import import import_model
    from nnc.pipeline import Pipeline
    mod = import_model(model)
    Pipeline(pipeline_passes("fp16"), verify_each=True).run(mod)
    opts = CodegenOptions(LowerOptions(for_arch("sm_90a"), "fp16", selector=selector))
    return mod, compile_to_dir(mod, out, options=opts)


def _tma_model():
    from .cuda_models import F, N, mk
    rng = np.random.default_rng(3)
    # a weight GEMM with a ragged M (bias + gelu) and an activation x activation batched MatMul
    return mk([N("MatMul", ["x", "w"], ["mm"]), N("Add", ["mm", "b"], ["a"]), N("Gelu", ["a"], ["h"]),
               N("Reshape", ["h", "shp"], ["h3"]), N("Transpose", ["h3"], ["ht"], perm=[0, 2, 1]),
               N("MatMul", ["h3", "ht"], ["y"])],
              [("x", F, [200, 136])], [("y", F)],
              [("w", (rng.standard_normal((136, 256)) / 12).astype(np.float32)),
               ("b", rng.standard_normal(256).astype(np.float32)),
               ("shp", np.array([2, 100, 256], dtype=np.int64))])


def test_lowered_plan_carries_tensor_maps(monkeypatch, tmp_path):
    import json
    _, plan = _compile_model(_tma_model(), tmp_path / "m", _tma_first(monkeypatch))
    jplan = json.loads((tmp_path / "m" / "plan.json").read_text())
    tm_launches = [l for l in jplan["launches"] if any(a.get("type") == tma.TMAP_CTYPE for a in l["args"])]
    assert tm_launches, [l["kernel"] for l in jplan["launches"]]
    for l in tm_launches:
        for a in l["args"]:
            if a.get("type") == tma.TMAP_CTYPE:
                s = tma.spec_of(a["value"])
                assert "buf" in l["args"][s.arg]  # names a pointer argument of the same launch
    host = (tmp_path / "m" / "model.cu").read_text()
    assert "#include <cuda.h>" in host and '"cuTensorMapEncodeTiled"' in host and "tm1);" in host
    assert "cuda_driver" not in (tmp_path / "m" / "CMakeLists.txt").read_text()  # found at run time, not linked
    kernels = [k for k in plan["kernels"] if W.TEMPLATE in str(k.get("template", ""))]
    assert kernels and all("A and B by TMA" in (tmp_path / "m" / "model.cu").read_text() for _ in kernels)


def test_launch_values_encode_from_the_named_pointer(monkeypatch):
    seen = []
    monkeypatch.setattr(tma, "encode", lambda s, addr: seen.append((s.arg, addr)) or np.zeros(1, "V128"))
    sa = tma.TensorMapSpec("float16", (64, 64), (128,), (64, 64), arg=0)
    sb = tma.TensorMapSpec("float16", (64, 64), (128,), (64, 64), arg=1)
    args = [("buf",), ("buf",), ("val",), ("tmap", sa, "a"), ("tmap", sb, "b")]
    cache = tma.TensorMapCache()
    vals = [np.uint64(0x1000), np.uint64(0x2000), np.int32(3), None, None]
    out = tma.launch_values(args, vals, cache, int)
    assert seen == [(0, 0x1000), (1, 0x2000)] and out[3].dtype.itemsize == 128 and out[2] == 3
    tma.launch_values(args, vals, cache, int)
    assert len(seen) == 2  # cached per (spec, address)
    vals[0] = np.uint64(0x3000)
    tma.launch_values(args, vals, cache, int)
    assert seen[-1] == (0, 0x3000)


def test_runtime_execute_passes_maps_of_its_buffers(monkeypatch):
    """compiler/runtime.py's _execute (no GPU: a stand-in module, function and encoder): a tmap
    argument becomes the map of the address its pointer argument has in this run (the arena of a
    context differs from the module's: another map)."""
    from types import SimpleNamespace as NS
    from nnc import runtime
    monkeypatch.setattr(tma, "encode", lambda s, addr: np.full(1, addr, np.uint64))
    spec = tma.TensorMapSpec("float16", (64, 64), (128,), (64, 64), arg=1)
    got = []
    f = lambda grid, block, vals, shared_mem=0: got.append(vals)  # noqa: E731
    m = runtime.Module.__new__(runtime.Module)
    m._cp = None
    m.arena, m.weights, m.persistent = (NS(data=NS(ptr=p)) for p in (0x10000, 0x20000, 0x30000))
    m._extent_host = np.zeros(2, np.int64)
    m._tensor_maps = tma.TensorMapCache()
    args = [("buf", "arena", -1, 64), ("buf", "weights", -1, 256), ("val", np.int32(7), 0, 0), ("tmap", spec, "k", 0)]
    m._launches = [("kernel", f, (1, 1, 1), (128, 1, 1), 0, args, 0, -1)]
    m._execute([], [], None)
    m._execute([], [], None, arena=NS(data=NS(ptr=0x40000)))
    assert [int(v[3][0]) for v in got] == [0x20000 + 256] * 2  # B lives in the weights either way
    assert int(got[0][0]) == 0x10000 + 64 and int(got[1][0]) == 0x40000 + 64 and got[0][2] == 7


def test_tuner_captures_tma_points_with_their_tensor_maps():
    """The tuner's sandbox (codegen/tuning_capture.py) captures the TMA points of a GEMM problem
    with ("tmap", spec, key) arguments that name a pointer argument of the same launch, which the
    GPU runner (codegen/tuning_runners.py) encodes from that pointer's address."""
    from nnc.codegen import tuning
    from nnc.codegen.lower import Lowerer
    from nnc.codegen.options import LowerOptions
    from nnc.codegen.target import for_arch
    from .test_tuning import _matmul, _module
    survey = tuning.SurveySelector(None)
    Lowerer(_module(_matmul(200, 136, 256), "fp16"), LowerOptions(for_arch("sm_90a"), precision="fp16", tune=True),
            survey).run()
    caps = [c for p in survey.problems.values() for c in [p.baseline] + p.others if not c.why_not]
    tma_caps = [c for c in caps if W.load_kind(c.params) == "tma"]
    assert tma_caps, [c.params for c in caps][:5]
    for c in tma_caps:
        (launch,) = [l for l in c.launches if l[0] == "kernel"]
        args = launch[5]
        maps = [a for a in args if a[0] == "tmap"]
        assert len(maps) == 2 and all(args[m[1].arg][0] == "buf" for m in maps)


# ---------------------------------------------------------------- GPU
GPU_CASES = [  # M, N, K, dtype, trans_a, trans_b, epilogue (as test_gemm_wgmma's)
    (256, 256, 256, "float16", False, False, "none"),
    (7, 136, 72, "bfloat16", False, False, "bias_gelu"),
    (129, 200, 328, "float16", False, True, "residual"),
    (200, 64, 136, "bfloat16", True, False, "scale"),
    (136, 72, 64, "float16", True, True, "cast_f32"),
    (1000, 999, 520, "float16", False, True, "bias_residual_relu"),  # M, N, K no multiples of a tile
    (1000, 1000, 520, "bfloat16", False, False, "bias"),
    (4096, 768, 3072, "float16", False, False, "bias_gelu"),
]


def _run_tma(spec, bufs, times=1):
    """Launches spec (times launches; split-K: the same zeroed scratch, which each launch must
    leave zeroed for the next)."""
    import cupy
    from .test_conv_tma import _CUBINS, _cubins  # kernels compiled once, in parallel where batched
    _cubins([spec])
    fn = common.load_cubin(_CUBINS[spec.source], spec)
    vals = tma.kernel_spec_args(spec, {**W.splitk_arrays(spec), **bufs})
    poisoned = bufs["D"].copy()
    for _ in range(times):
        bufs["D"][...] = poisoned
        fn(spec.grid, spec.block, vals, shared_mem=spec.smem)
    cupy.cuda.runtime.deviceSynchronize()


def check_points_gpu(pr, pts, bufs, ref, tol=None, times=None) -> None:
    """Each point of pr rendered and launched on a poisoned D (times launches; by default twice for
    split-K points, whose scratch each launch must leave zeroed), then D against ref (tol: 1e-2 at
    fp16, else 3e-2)."""
    odt = pr.out_dtype or pr.dtype
    tol = tol if tol is not None else (1e-2 if pr.dtype == "float16" else 3e-2)
    for p in pts:
        d = _poison((pr.M, pr.N), odt)
        _run_tma(W.render(pr, p), dict(bufs, D=d), times=times or (2 if W.split_k(p) > 1 else 1))
        _check(_host(d, odt), ref, tol)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}-ta{int(c[4])}tb{int(c[5])}-{c[6]}")
def test_tma_gemm_gpu(case):
    from .test_gemm_wgmma import _bufs, _case_arrays
    rng = np.random.default_rng(abs(hash(case)) & 0xFFFF)
    pr, a, b, extra, ref = _case_arrays(case, rng)
    bufs = _bufs(pr, a, b, extra)
    pts = _tma_points(pr)
    assert pts
    if pr.M * pr.N > 1 << 18:  # big: the heuristic's TMA point and one of each schedule
        pts = [p for i, p in enumerate(pts) if i == 0 or W.pingpong(p) or p.get("CTAS") == 2][:4]
    check_points_gpu(pr, pts, bufs, ref)


@pytest.mark.gpu
@needs_gpu
def test_tma_batched_and_persistent_gpu():
    """Batch dims of the tensor maps (A per batch at two levels, B broadcast over one) and
    persistent / ping-pong points on a stand-in Target of 2 SMs (every CTA loops over tiles)."""
    from dataclasses import replace
    rng = np.random.default_rng(5)
    a = rng.uniform(-1, 1, (2, 3, 100, 72))
    b = rng.uniform(-1, 1, (3, 72, 136))
    pr = gemm.matmul_problem(a.shape, b.shape, "float16", act="relu")
    assert pr is not None and W.tma_fits(pr, SM90A)
    ref = np.maximum(_rounded(a, "float16") @ _rounded(b, "float16"), 0)
    few = replace(SM90A, sm_count=2)
    for p in _tma_points(pr):
        d = _poison(ref.shape, "float16")
        _run_tma(W.render(pr, p, target=few if W.persistent(p) else SM90A),
                 dict(A=_dev(a, "float16"), B=_dev(b, "float16"), D=d))
        _check(_host(d, "float16"), ref, 1e-2)


@pytest.mark.gpu
@needs_gpu
def test_tma_model_through_nnc_load_and_cuda_graph_gpu(monkeypatch, tmp_path):
    """The whole path with the TMA points chosen: plan.json's tensor-map args encoded by the runtime
    at capture, the run replayed as a CUDA graph on fresh inputs (arena and outputs poisoned), eager
    runs too, against the reference interpreter."""
    import nnc
    from nnc.ir.interp import Interpreter
    mod, plan = _compile_model(_tma_model(), tmp_path / "m", _tma_first(monkeypatch))
    assert any(W.TEMPLATE in str(k.get("template", "")) for k in plan["kernels"])
    rng = np.random.default_rng(11)
    for cuda_graph in (True, False):
        g = nnc.load(tmp_path / "m", cuda_graph=cuda_graph)
        assert g.uses_cuda_graph == cuda_graph, g.graph_fallback
        for _ in range(2):
            feed = {x.name: rng.standard_normal(x.type.shape).astype(np.float32) for x in mod.main.args}
            ref = Interpreter(mod).run(feed)
            got = g.run(feed, output="numpy", poison=True)
            for k, v in ref.items():
                v = np.asarray(v, np.float64)
                err = np.abs(np.asarray(got[k], np.float64) - v).max() / (np.abs(v).max() + 1e-12)
                assert err < 2e-2, (k, err)


def _build_c_runner(monkeypatch, tmp_path):
    """The TMA model's output directory and its nnc_run_example built with nvcc for sm_90a (as
    CMakeLists.txt builds it: libcudart only; the C API finds cuTensorMapEncodeTiled at run time)."""
    from .test_capi_link import _nvcc
    out = tmp_path / "m"
    mod, _ = _compile_model(_tma_model(), out, _tma_first(monkeypatch))
    _nvcc("-gencode", "arch=compute_90a,code=sm_90a", "-I", out, out / "model.cu", out / "nnc_run_example.cpp",
          "-o", tmp_path / "run", cwd=tmp_path)
    return mod, out, tmp_path / "run"


def _have_nvcc() -> bool:
    from .test_capi_link import NVCC
    return NVCC is not None


@pytest.mark.skipif(not _have_nvcc(), reason="needs nvcc")
def test_c_api_with_tensor_maps_builds(monkeypatch, tmp_path):
    _, out, run = _build_c_runner(monkeypatch, tmp_path)
    assert run.exists() and "nnc_encode_tiled()" in (out / "model.cu").read_text()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.skipif(not _have_nvcc(), reason="needs nvcc")
def test_c_api_with_tensor_maps_gpu(monkeypatch, tmp_path):
    """nnc_run_example (graph replay and eager) on the TMA model equals nnc.load's output."""
    import subprocess
    import nnc
    mod, out, run = _build_c_runner(monkeypatch, tmp_path)
    x = np.random.default_rng(2).standard_normal((200, 136)).astype(np.float32)
    x.tofile(tmp_path / "x.bin")
    ref = nnc.load(out).run({"x": x}, output="numpy")
    ref = ref["y"] if isinstance(ref, dict) else ref
    for extra in ([], ["--no-cuda-graph"]):
        res = tmp_path / f"res{len(extra)}"
        res.mkdir()
        r = subprocess.run([str(run), str(out), str(tmp_path / "x.bin"), "--out", str(res), "--iters", "3", *extra],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        y = np.fromfile(res / "y.bin", dtype=np.asarray(ref).dtype).reshape(np.shape(ref))
        np.testing.assert_allclose(y, ref, rtol=1e-3, atol=1e-3)



# ---------------------------------------------------------------- the staged epilogue (EPI = smem)
def test_staged_epilogue_points_and_render():
    pr = gemm.GemmProblem(4096, 768, 3072, has_bias=True, bias_dtype="float32", act="gelu", has_c=True,
                          ldc_m=768, ldc_n=1, beta=1.0)
    pts = [p for p in W.candidates(pr, SM90A, b_bulk=True, unverified=True) if W.epi_smem(p)]
    assert not any(W.epi_smem(p) for p in W.candidates(pr, SM90A, b_bulk=True))  # not in the space until run
    assert pts and all(W.load_kind(p) == "tma" and not W.persistent(p) and W.split_k(p) == 1 for p in pts)
    assert all(W.epi_stage_fits(p) for p in pts)
    assert not any(W.epi_smem(p) for p in [W.default_params(pr, SM90A, True)])  # never the heuristic's
    src = W.render(pr, pts[0]).source
    assert "epilogue staged in shared memory" in src and "bar.sync 3," in src and "uint4" in src
    for bad in (dict(pts[0], SCHED="pingpong"), dict(pts[0], PERSIST=True), dict(pts[0], LOAD="cp_async"),
                dict(pts[0], SPLIT_K=2), dict(pts[0], EPI="tma")):
        with pytest.raises(ValueError, match="declared space"):
            W.render(pr, bad)


def staged_specs():
    """[(case, spec)]: every third EPI = smem point of a GEMM (fp16; bf16 to f32) and of a 1x1 conv,
    the first two of a 3x3 TMA im2col conv."""
    from nnc.codegen.kernels import conv, conv_wgmma as CW
    specs = []
    for dt, out in (("float16", None), ("bfloat16", "float32")):
        pr = gemm.GemmProblem(1000, 1000, 520, dtype=dt, trans_b=True, has_bias=True, has_c=True, ldc_m=1000,
                              ldc_n=1, beta=1.0, act="relu", out_dtype=out)
        specs += [(f"gemm {dt}", W.render(pr, p)) for p in W.candidates(pr, SM90A, unverified=True)
                  if W.epi_smem(p)][::3]
    cp = conv.ConvProblem(32, 64, 56, 56, 256, 1, 1, in_layout="NHWC", out_layout="NHWC")
    gp = CW.igemm_problem(cp, "float16", "float16", "relu")
    specs += [("1x1 conv", W.render(gp, p)) for p in W.candidates(gp, SM90A, True, unverified=True)
              if W.epi_smem(p)][::3]
    cp = conv.ConvProblem(32, 64, 56, 56, 64, 3, 3, pads=(1,) * 4, in_layout="NHWC", out_layout="NHWC")
    gp, geo = CW.igemm_problem(cp), CW.im2col_geometry(cp)
    staged = [p for p in W.candidates(gp, SM90A, True, True, True, unverified=True) if W.epi_smem(p)]
    specs += [("3x3 im2col conv", W.render(gp, p, im2col=geo, target=SM90A)) for p in staged[:2]]
    return specs


@pytest.mark.skipif(not HAVE_NVRTC, reason="NVRTC unavailable")
def test_staged_epilogue_kernels_compile_sm90a():
    """A covering subset of staged_specs() (space_cover); NNC_FULL_SPACE=1: all of them."""
    labelled = staged_specs()
    assert len({s.name for _, s in labelled}) >= 6
    chosen = space_cover.to_compile(labelled)
    assert all(sz > 0 for sz in space_cover.nvrtc_compile_all([s.source for s in chosen]))


STAGED_GPU_CASES = [(129, 200, 328, "float16", False, True, "bias_residual_relu"),
                    (1000, 1000, 520, "bfloat16", False, False, "bias_gelu"),
                    (136, 72, 64, "float16", True, True, "cast_f32"),
                    (4096, 256, 64, "float16", False, True, "bias_residual_relu")]  # a 1x1 64->256 conv's K


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", STAGED_GPU_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}-{c[6]}")
def test_staged_epilogue_gpu(case):
    """Every EPI = smem point against numpy, outputs poisoned; D also at an offset of 2 elements
    (not 16-byte aligned: the scalar store path)."""
    from .test_gemm_wgmma import _bufs, _case_arrays
    rng = np.random.default_rng(abs(hash(case)) & 0xFFFF)
    pr, a, b, extra, ref = _case_arrays(case, rng)
    odt = pr.out_dtype or pr.dtype
    bufs = _bufs(pr, a, b, extra)
    pts = [p for p in W.candidates(pr, SM90A, unverified=True) if W.epi_smem(p)]
    assert pts
    from .test_conv_tma import _cubins
    _cubins([W.render(pr, p) for p in pts])
    check_points_gpu(pr, pts, bufs, ref, times=1)
    big = _poison((pr.M * pr.N + 8,), odt)
    _run_tma(W.render(pr, pts[0]), dict(bufs, D=big[2:2 + pr.M * pr.N].reshape(pr.M, pr.N)))
    _check(_host(big[2:2 + pr.M * pr.N].reshape(pr.M, pr.N), odt), ref, 1e-2 if pr.dtype == "float16" else 3e-2)
