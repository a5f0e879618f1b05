"""TMA im2col loads for the Hopper wgmma conv (conv.igemm_wgmma_nhwc with LOAD = tma: codegen/tma.py
mode "im2col", gemm_wgmma.im2col_map_spec / im2col_tma_fits, templates/gemm_wgmma.cu.j2 a_im2col + tma).

CPU: the im2col map of ResNet-50 shapes (dims, strides, box, traversal, corners W first), its encode
rules (tma.check), the fit's refusals (C % 64, dilation) with reasons, the TMA points in the
declared space (no row table) and the heuristic's measured picks, render's tensor-map args and
instruction, the TMA im2col points of ResNet-50 shapes (and asymmetric / bf16 / 7x7 ones)
NVRTC-compiled for sm_90a (a covering subset; NNC_FULL_SPACE=1: every one), lowering through a
model puts the im2col map into plan.json and the C API's host code (built with nvcc when present),
the tuner captures the map.
GPU (marked `gpu`): every TMA im2col point of ResNet-50 conv shapes (3x3 s1 / s2 pad 1, 7x7 s2 pad 3,
1x1 s2) and of asymmetric geometries (H != W, R != S, stride (2, 1), uneven pads: the W-first order
of corners and offsets) at batch 1 and 32, outputs poisoned with NaN, against an fp32 conv of the
rounded inputs (with the bias + residual + relu epilogue too); a model through nnc.load (CUDA graph
and eager) against the reference interpreter; the C API's runner against nnc.load."""
from __future__ import annotations

import os
import zlib
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from nnc.codegen import tma
from nnc.codegen.kernels import common, conv, conv_wgmma as CW, gemm_wgmma as W
from nnc.codegen.target import ARCHS

from . import space_cover
from .test_conv_wgmma import _conv_ref_gpu
from .test_gemm_conv import HAVE_NVRTC, _check, _dev, _host, _poison, _rounded, needs_gpu

SM90A = ARCHS["sm_90a"]

# label -> (C, H, W, K, R, S, stride, pad): ResNet-50 layer shapes the im2col map takes (C % 64 == 0;
# the 7x7/2 stem has C = 3, so its geometry on 64 channels)
SHAPES = {
    "3x3_64to64_56": (64, 56, 56, 64, 3, 3, 1, 1),
    "3x3s2_128to128_56": (128, 56, 56, 128, 3, 3, 2, 1),
    "1x1s2_256to512_56": (256, 56, 56, 512, 1, 1, 2, 0),
    "7x7s2_64to64_56_pad3": (64, 56, 56, 64, 7, 7, 2, 3),
    "3x3_256to256_14": (256, 14, 14, 256, 3, 3, 1, 1),
    "3x3_512to512_7": (512, 7, 7, 512, 3, 3, 1, 1),
}


def _problem(N, C, H, W_, K, R, S, stride, pad, pads=None, dtype="float16", epi=False, dil=1):
    st = stride if isinstance(stride, tuple) else (stride, stride)
    return conv.ConvProblem(N, C, H, W_, K, R, S, stride=st, pads=pads or (pad,) * 4, dilation=(dil, dil),
                            dtype=dtype, in_layout="NHWC", out_layout="NHWC", has_bias=epi, has_c=epi,
                            act="relu" if epi else "none")


# asymmetric geometries: H != W, R != S, stride (2, 1), uneven pads (top, left, bottom, right)
ODD = {
    "3x1s21_h20w12": (2, 64, 20, 12, 64, 3, 1, (2, 1), 0, (1, 0, 2, 0)),
    "1x3_pads0101_h9w30": (3, 128, 9, 30, 64, 1, 3, (1, 1), 0, (0, 1, 0, 1)),
    "5x3s2_h17w23": (1, 64, 17, 23, 128, 5, 3, (2, 2), 0, (2, 1, 1, 0)),
}


def _odd(label, dtype="float16", epi=False):
    N, C, H, W_, K, R, S, st, pad, pads = ODD[label]
    return _problem(N, C, H, W_, K, R, S, st, pad, pads=pads, dtype=dtype, epi=epi)


def _gemm(pr):
    return CW.igemm_problem(pr, pr.dtype if pr.has_bias else None, pr.dtype if pr.has_c else None, pr.act)


def _tma_points(pr):
    gp, geo = _gemm(pr), CW.im2col_geometry(pr)
    assert W.im2col_tma_fits(gp, geo)
    return [p for p in W.candidates(gp, SM90A, True, True, True, unverified=True) if W.load_kind(p) == "tma"]


def _render(pr, p):
    return W.render(_gemm(pr), p, im2col=CW.im2col_geometry(pr), target=SM90A)


def _positions(lo, hi_rel, dim, stride):
    """The filter base positions the map's traversal visits along one spatial dim."""
    return list(range(lo, dim - 1 + hi_rel + 1, stride))


# ---------------------------------------------------------------- the im2col map (CPU)
def test_map_of_resnet_shapes():
    for C, H, W_, K, R, S, st, pad in SHAPES.values():
        pr = _problem(32, C, H, W_, K, R, S, st, pad)
        s = W.im2col_map_spec(_gemm(pr), CW.im2col_geometry(pr), 128)
        assert (s.mode, s.dims, s.box, s.arg) == ("im2col", (C, W_, H, 32), (64, 128), 0)
        assert s.strides == (C * 2, W_ * C * 2, H * W_ * C * 2) and s.elem_strides == (1, st, st, 1)
        assert s.lower == (-pad, -pad) and tma.check(s) == "", tma.check(s)
        # the traversal visits exactly the output pixels' filter bases, per spatial dim
        assert _positions(s.lower[0], s.upper[0], W_, st) == [q * st - pad for q in range(pr.Q)]
        assert _positions(s.lower[1], s.upper[1], H, st) == [p * st - pad for p in range(pr.P)]


def test_map_of_asymmetric_geometry_is_w_first():
    pr = _odd("3x1s21_h20w12")
    s = W.im2col_map_spec(_gemm(pr), CW.im2col_geometry(pr), 64)
    assert s.dims == (64, 12, 20, 2) and s.elem_strides == (1, 1, 2, 1)  # traversal W stride 1, H stride 2
    assert s.lower == (0, -1)  # (W, H): pad left 0, top 1
    assert _positions(s.lower[0], s.upper[0], 12, 1) == [q - 0 for q in range(pr.Q)]
    assert _positions(s.lower[1], s.upper[1], 20, 2) == [2 * p - 1 for p in range(pr.P)]
    for label in ODD:
        pr = _odd(label)
        s = W.im2col_map_spec(_gemm(pr), CW.im2col_geometry(pr), 128)
        assert tma.check(s) == ""
        assert len(_positions(s.lower[0], s.upper[0], pr.W, pr.stride[1])) == pr.Q
        assert len(_positions(s.lower[1], s.upper[1], pr.H, pr.stride[0])) == pr.P


@pytest.mark.parametrize("kw,why", [
    (dict(lower=(-129, 0)), "[-128, 128)"),
    (dict(upper=(0, 128)), "[-128, 128)"),
    (dict(lower=(0,)), "2 lower and upper"),
    (dict(box=(64, 1025)), "pixels per column"),
    (dict(box=(512, 64), swizzle=0), "channels per pixel"),
    (dict(box=(128, 64)), "exceeds the swizzle span"),
    (dict(elem_strides=(1, 9, 1, 1)), "1..8"),
    (dict(upper=(-20, 0)), "empty"),
    (dict(dims=(64, 8), strides=(128,), elem_strides=(), lower=(), upper=()), "rank 3..5"),
    (dict(mode="gather"), "mode"),
    (dict(box=(64, 128, 1, 1)), "box dims"),
])
def test_check_states_the_im2col_rules(kw, why):
    base = dict(dtype="float16", dims=(64, 16, 16, 2), strides=(128, 2048, 32768), box=(64, 128), swizzle=128,
                arg=0, mode="im2col", elem_strides=(1, 1, 1, 1), lower=(-1, -1), upper=(-1, -1))
    assert tma.check(tma.TensorMapSpec(**base)) == ""
    got = tma.check(tma.TensorMapSpec(**{**base, **kw}))
    assert why in got, got


def test_spec_dict_round_trip_and_tiled_dicts_unchanged():
    pr = _problem(2, 64, 20, 20, 64, 3, 3, 2, 1)
    s = W.im2col_map_spec(_gemm(pr), CW.im2col_geometry(pr), 128)
    d = tma.spec_dict(s)
    assert d["mode"] == "im2col" and d["lower"] == [-1, -1] and tma.spec_of(d) == s
    t = tma.TensorMapSpec("float16", (64, 64), (128,), (64, 64))
    assert set(tma.spec_dict(t)) == {"dtype", "dims", "strides", "box", "swizzle", "arg"}  # plan.json as before
    assert tma.spec_of(tma.spec_dict(t)) == t and t.traversal == (1, 1)
    with pytest.raises(ValueError, match="corners"):
        tma.spec_of(dict(d, lower=[-1000, 0]))


@pytest.mark.parametrize("kw,why", [
    (dict(C=96), "multiple of 64"),
    (dict(dil=2), "dilated"),
])
def test_fit_refuses_with_reason(kw, why):
    a = dict(N=1, C=64, H=20, W_=20, K=64, R=3, S=3, stride=1, pad=2)
    a.update(kw)
    pr = _problem(**a)
    gp, geo = _gemm(pr), CW.im2col_geometry(pr)
    f = W.im2col_tma_fits(gp, geo)
    assert not f and why in f.why, f.why
    assert not [p for p in W.candidates(gp, SM90A, True, True, bool(f)) if W.load_kind(p) == "tma"]


def test_space_has_tma_points_without_row_table_and_the_tma_default():
    for N in (1, 32):
        for C, H, W_, K, R, S, st, pad in SHAPES.values():
            gp = _gemm(_problem(N, C, H, W_, K, R, S, st, pad))
            space = W.candidates(gp, SM90A, True, True, True)
            tma_pts = [p for p in space if W.load_kind(p) == "tma"]
            assert tma_pts and len(tma_pts) < len(space)
            assert not any(p.get("b_bulk") or "LAG" in p for p in tma_pts)
            for p in tma_pts:
                assert W.smem_bytes(p, True) == W.smem_bytes(p) <= SM90A.smem_per_block_optin
            d = W.default_params(gp, SM90A, True, True, True)
            assert d in tma_pts  # measured faster than the gather on every shape: TMA only
            t = lambda p: W.modelled_time(gp, p, SM90A, True)  # noqa: E731
            unsplit = min((p for p in tma_pts if W.split_k(p) == 1), key=t)
            assert d == unsplit or (W.split_k(d) > 1 and t(d) <= 0.9 * t(unsplit))
    # without the map (C % 64 != 0) the cp.async gather stays the default
    odd = _gemm(_problem(32, 96, 28, 28, 128, 3, 3, 1, 1))
    assert W.load_kind(W.default_params(odd, SM90A, True, True, False)) != "tma"


# ResNet-50 b32 3x3 convs: the heuristic's pick, measured (H200 2026-12-03, tools/check_conv_tma.py,
# TFLOP/s of the pick / of the fastest TMA point): 333 / 334, 439 / 439, 420 / 420, 408 / 413, 423 / 423
MEASURED_PICKS = {
    (64, 56, 56, 64, 3, 3, 1, 1): "128x64x8/cw2/pingpong",
    (128, 56, 56, 128, 3, 3, 2, 1): "64x128x8/cw2/pingpong",
    (128, 28, 28, 128, 3, 3, 1, 1): "64x128x8/cw2/pingpong",
    (256, 14, 14, 256, 3, 3, 1, 1): "128x128x6/cw2/pingpong",
    (512, 7, 7, 512, 3, 3, 1, 1): "64x128x8/cw2/pingpong",
}


def test_heuristic_picks_the_measured_tma_im2col_points():
    for geo, tag in MEASURED_PICKS.items():
        d = W.default_params(_gemm(_problem(32, *geo)), SM90A, True, True, True)
        got = f"{d['BM']}x{d['BN']}x{d['STAGES']}/cw{d['CW']}" + ("/pingpong" if W.pingpong(d) else "")
        assert W.load_kind(d) == "tma" and W.split_k(d) == 1 and got == tag, (geo, got)


def test_render_binds_the_im2col_map_and_issues_im2col_copies():
    pr = _problem(2, 64, 20, 20, 128, 3, 3, 2, 1, epi=True)
    p = _tma_points(pr)[0]
    spec = _render(pr, p)
    names = [a[0] for a in spec.args]
    assert names[:2] == ["A", "B"] and names[-2:] == ["tmA", "tmB"]
    ma, mb = spec.args[-2][2], spec.args[-1][2]
    assert ma["mode"] == "im2col" and ma["arg"] == 0 and ma["box"] == [64, p["BM"]]
    assert "mode" not in mb and mb["arg"] == 1 and mb["dims"] == [9 * 64, 128]  # B [K_out, R*S*C], tiled
    src = spec.source
    assert "cp.async.bulk.tensor.4d.shared::cluster.global.im2col.mbarrier::complete_tx::bytes" in src
    assert "A by the TMA im2col map" in src and "im2col of NHWC" in src
    body = src.split("namespace")[1]  # the kernel (the shared helpers come before it)
    assert "bar.sync 1, 128" not in body and "rowtab" not in body and "cp.async.cg" not in body
    assert spec.smem == W.smem_bytes(p, True)
    with pytest.raises(ValueError, match="multiple of 64"):
        odd = _problem(2, 96, 20, 20, 128, 3, 3, 2, 1)
        W.render(_gemm(odd), p, im2col=CW.im2col_geometry(odd), target=SM90A)


# ---------------------------------------------------------------- NVRTC compile (CPU)
def all_specs():
    """[(case, spec)]: every TMA im2col point (but the staged epilogue's) of the ResNet-50 shapes at
    batch 32 with the epilogue, the first at batch 1 without; every fourth point of the asymmetric
    geometries in fp16 with the epilogue and bf16 without."""
    specs = []
    for label, (C, H, W_, K, R, S, st, pad) in SHAPES.items():
        for N, epi in ((32, True), (1, False)):
            pr = _problem(N, C, H, W_, K, R, S, st, pad, epi=epi)
            pts = [p for p in _tma_points(pr) if not W.epi_smem(p)]  # (the staged epilogue: test_gemm_tma)
            specs += [(f"{label} N={N}", _render(pr, p)) for p in (pts if N == 32 else pts[:1])]
    for label in ODD:
        for dt, epi in (("float16", True), ("bfloat16", False)):
            pr = _odd(label, dt, epi)
            specs += [(f"{label} {dt}", _render(pr, p)) for p in _tma_points(pr)[::4]]
    return specs


@pytest.mark.skipif(not HAVE_NVRTC, reason="NVRTC unavailable")
def test_every_tma_im2col_point_compiles_sm90a():
    """NVRTC compiles a covering subset of all_specs() (tests/codegen/space_cover.py: each shape and
    geometry case, each parameter value, each line of code); NNC_FULL_SPACE=1: all of them (143 kernels). Every
    point's source is checked as text."""
    labelled = all_specs()
    specs = [s for _, s in labelled]
    assert len({s.name for s in specs}) >= 30
    chosen = space_cover.to_compile(labelled)
    assert all(sz > 0 for sz in space_cover.nvrtc_compile_all([s.source for s in chosen]))
    assert all(".im2col.mbarrier" in s.source for s in specs)


# ---------------------------------------------------------------- lowering, C API, tuner (CPU)
def _conv_model():
    """NCHW ONNX convs the fp16 pipeline lays out NHWC, C % 64 == 0: 3x3/1 pad 1 + bias + relu, a
    3x3/2 pad 1, and a 1x1/2 downsample added to it, relu."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
    inits = {"w1": w(64, 64, 3, 3), "b1": w(64), "w2": w(128, 64, 3, 3), "b2": w(128), "wd": w(128, 64, 1, 1)}
    N = helper.make_node
    nodes = [N("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4), N("Relu", ["c1"], ["r1"]),
             N("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1] * 4, strides=[2, 2]),
             N("Conv", ["r1", "wd"], ["d"], strides=[2, 2]),
             N("Add", ["c2", "d"], ["a"]), N("Relu", ["a"], ["y"])]
    F = TensorProto.FLOAT
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 64, 18, 18])],
                          [helper.make_tensor_value_info("y", F, [2, 128, 9, 9])],
                          [numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _tma_first(monkeypatch):
    from nnc.codegen import variants
    monkeypatch.setitem(variants.SELECTORS, "tma-first",
                        lambda: variants.TimedSelector(lambda c, p: 0.0 if W.load_kind(p) == "tma" else 1.0))
    return "tma-first"


def _compile_model(out, selector):
    from .test_gemm_tma import _compile_model as compile_model
    return compile_model(_conv_model(), out, selector)


def _im2col_launches(jplan):
    return [l for l in jplan["launches"]
            if any(a.get("type") == tma.TMAP_CTYPE and a["value"].get("mode") == "im2col" for a in l["args"])]


def test_lowered_plan_and_host_code_carry_the_im2col_map(monkeypatch, tmp_path):
    import json
    _, plan = _compile_model(tmp_path / "m", _tma_first(monkeypatch))
    jplan = json.loads((tmp_path / "m" / "plan.json").read_text())
    ls = _im2col_launches(jplan)
    assert len(ls) == 3, [l["kernel"] for l in jplan["launches"]]  # the 3x3/1, 3x3/2 and 1x1/2 convs
    for l in ls:
        for a in l["args"]:
            if a.get("type") == tma.TMAP_CTYPE:
                s = tma.spec_of(a["value"])
                assert "buf" in l["args"][s.arg]
    host = (tmp_path / "m" / "model.cu").read_text()
    assert '"cuTensorMapEncodeIm2col"' in host and "lower, upper, 64u," in host
    assert "A by the TMA im2col map" in host


def _have_nvcc() -> bool:
    from .test_capi_link import NVCC
    return NVCC is not None


def _build_c_runner(monkeypatch, tmp_path):
    from .test_capi_link import _nvcc
    out = tmp_path / "m"
    mod, _ = _compile_model(out, _tma_first(monkeypatch))
    _nvcc("-gencode", "arch=compute_90a,code=sm_90a", "-I", out, out / "model.cu", out / "nnc_run_example.cpp",
          "-o", tmp_path / "run", cwd=tmp_path)
    return mod, out, tmp_path / "run"


@pytest.mark.skipif(not _have_nvcc(), reason="needs nvcc")
def test_c_api_with_im2col_maps_builds(monkeypatch, tmp_path):
    _, out, run = _build_c_runner(monkeypatch, tmp_path)
    assert run.exists() and "nnc_encode_im2col()" in (out / "model.cu").read_text()


def test_tuner_captures_the_im2col_map(monkeypatch):
    from nnc.codegen import tuning
    from nnc.codegen.lower import Lowerer
    from nnc.codegen.options import LowerOptions
    from nnc.codegen.target import for_arch
    from nnc.driver import pipeline_passes
    from nnc.onnx_import import import_model
    from nnc.pipeline import Pipeline
    mod = import_model(_conv_model())
    Pipeline(pipeline_passes("fp16"), verify_each=True).run(mod)
    survey = tuning.SurveySelector(None)
    Lowerer(mod, LowerOptions(for_arch("sm_90a"), precision="fp16", tune=True), survey).run()
    caps = [c for p in survey.problems.values() for c in [p.baseline] + p.others if not c.why_not]
    im = [c for c in caps if W.load_kind(c.params) == "tma"
          and any(a[0] == "tmap" and a[1].mode == "im2col" for l in c.launches if l[0] == "kernel" for a in l[5])]
    assert im
    for c in im:
        (launch,) = [l for l in c.launches if l[0] == "kernel"]
        assert all(launch[5][a[1].arg][0] == "buf" for a in launch[5] if a[0] == "tmap")


# ---------------------------------------------------------------- GPU
_CUBINS: dict = {}  # kernel source -> cubin, across the GPU cases (batch 1 and 32 share kernels)


def _nvrtc(src):
    return common.nvrtc_compile(src, "sm_90a")


def _cubins(specs) -> None:
    """Compiles the specs' kernels not compiled yet, in parallel (the GPU machine's cores)."""
    todo = list({s.source for s in specs if s.source not in _CUBINS})
    if todo:
        with ProcessPoolExecutor(max_workers=max(2, min(16, os.cpu_count() or 2))) as ex:
            _CUBINS.update(zip(todo, ex.map(_nvrtc, todo)))


def _run_tma(spec, bufs):
    """Launches spec; a split-K one twice on the same zeroed scratch (the first must leave its
    tile counters zero for the second; the output poisoned before each)."""
    import cupy
    _cubins([spec])
    fn = common.load_cubin(_CUBINS[spec.source], spec)
    vals = tma.kernel_spec_args(spec, {**W.splitk_arrays(spec), **bufs})
    poisoned = bufs["D"].copy()
    for _ in range(2 if W.split_k(spec.params) > 1 else 1):
        bufs["D"][...] = poisoned
        fn(spec.grid, spec.block, vals, shared_mem=spec.smem)
    cupy.cuda.runtime.deviceSynchronize()


def _check_points(pr, points, seed):
    import cupy
    gp = _gemm(pr)
    rng = np.random.default_rng(seed)
    N, C, H, W_, K = pr.N, pr.C, pr.H, pr.W, pr.K
    x = _rounded(rng.uniform(-1, 1, (N, H, W_, C)), pr.dtype).astype(np.float32)
    w = _rounded(rng.uniform(-1, 1, (K, pr.R, pr.S, C)) / np.sqrt(pr.R * pr.S * C), pr.dtype).astype(np.float32)
    ref = _conv_ref_gpu(cupy.asarray(x), cupy.asarray(w), pr)
    bufs = dict(A=_dev(x, pr.dtype), B=_dev(w, pr.dtype))
    if pr.has_bias:
        bias = _rounded(rng.uniform(-1, 1, K), pr.dtype)
        res = _rounded(rng.uniform(-1, 1, (gp.M, K)), pr.dtype)
        ref = cupy.maximum(ref + cupy.asarray(bias, cupy.float32) + cupy.asarray(res, cupy.float32), 0)
        bufs.update(bias=_dev(bias, pr.dtype), C=_dev(res, pr.dtype))
    ref = ref.get().astype(np.float64)
    assert points
    specs = [_render(pr, p) for p in points]
    _cubins(specs)
    for spec in specs:
        d = _poison((gp.M, K), pr.dtype)
        _run_tma(spec, dict(bufs, D=d))
        _check(_host(d, pr.dtype), ref, 1e-2 if pr.dtype == "float16" else 3e-2)


GPU_CASES = [(lbl, n, epi) for lbl in SHAPES for n in (1, 32) for epi in (False, True)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}-b{c[1]}-{'bias_res_relu' if c[2] else 'plain'}")
def test_tma_im2col_conv_gpu(case):
    label, N, epi = case
    pr = _problem(N, *SHAPES[label], epi=epi)
    pts = _tma_points(pr)
    dflt = W.default_params(_gemm(pr), SM90A, True, True, True)
    if epi or N == 1:  # every point once (batch 32, plain); else one per schedule kind and the heuristic's pick
        first = lambda cond: next((p for p in pts if cond(p)), None)  # noqa: E731
        kinds = [pts[0], first(W.pingpong), first(lambda p: p.get("CTAS") == 2),
                 first(lambda p: W.persistent(p) and not W.pingpong(p)), dflt]
        pts = [p for i, p in enumerate(kinds) if p in pts and p not in kinds[:i]]
    _check_points(pr, pts, zlib.crc32(repr(case).encode()))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("label", list(ODD))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tma_im2col_asymmetric_geometry_gpu(label, dtype):
    """H != W, R != S, stride (2, 1), uneven pads: a swapped (H, W) order of the corners, the
    traversal strides or the im2col offsets, or a wrong upper corner, reads the wrong pixels."""
    pr = _odd(label, dtype, epi=dtype == "float16")
    pts = _tma_points(pr)
    plain = [p for p in pts if W.split_k(p) == 1 and not W.epi_smem(p)]
    extra = [next((p for p in pts if W.split_k(p) > 1), None), next((p for p in pts if W.epi_smem(p)), None)]
    _check_points(pr, plain + [p for p in extra if p], zlib.crc32(f"{label}{dtype}".encode()))


@pytest.mark.gpu
@needs_gpu
def test_tma_im2col_model_through_nnc_load_gpu(monkeypatch, tmp_path):
    """The whole path with the TMA points chosen: plan.json's im2col maps encoded by the runtime,
    CUDA graph replay and eager runs on fresh inputs (arena and outputs poisoned), against the
    reference interpreter."""
    import nnc
    from nnc.ir.interp import Interpreter
    mod, plan = _compile_model(tmp_path / "m", _tma_first(monkeypatch))
    import json
    assert _im2col_launches(json.loads((tmp_path / "m" / "plan.json").read_text()))
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
                a = np.asarray(got[k], np.float64)
                assert np.isfinite(a).all(), k
                err = np.abs(a - v).max() / (np.abs(v).max() + 1e-12)
                assert err < 2e-2, (k, err)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.skipif(not _have_nvcc(), reason="needs nvcc")
def test_c_api_with_im2col_maps_gpu(monkeypatch, tmp_path):
    """nnc_run_example (graph replay and eager) on the conv model equals nnc.load's output."""
    import subprocess
    import nnc
    mod, out, run = _build_c_runner(monkeypatch, tmp_path)
    x = np.random.default_rng(2).standard_normal((2, 64, 18, 18)).astype(np.float32)
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
