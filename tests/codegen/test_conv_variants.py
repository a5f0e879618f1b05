"""The conv family as declared Variants (codegen/kernels/conv_lowering.py): applies() decides
without touching the lowering state, each path's variant is chosen where the old if-chain chose
it, space/default are conv.candidates/default_params (GEMM paths: gemm.candidates/default_params),
the timed selector chooses within the declared spaces (and its choices still lower), a fused conv
group records the conv variant, and an NHWC conv no kernel takes stays a clear error."""
from __future__ import annotations

import numpy as np
import pytest

from nnc.codegen import variants
from nnc.codegen.errors import LoweringError
from nnc.codegen.kernels import conv, conv_lowering, gemm
from nnc.codegen.lower import lower
from nnc.codegen.options import LowerOptions
from nnc.codegen.target import for_arch
from nnc.codegen.variants import TimedSelector, Variant, stand_in_time
from nnc.driver import pipeline_passes
from nnc.ir.interp import Interpreter
from nnc.onnx_import import import_model
from nnc.pipeline import Pipeline

from .cuda_models import F, N, mk
from .test_conv_nhwc import MODELS as NHWC_MODELS

TARGET = for_arch("sm_90")


def _conv_model(x, w, op="Conv", relu=False, **attrs):
    rng = np.random.default_rng(0)
    k = w[1] * attrs.get("group", 1) if op == "ConvTranspose" else w[0]
    nodes = [N(op, ["x", "w", "b"], ["c" if relu else "y"], **attrs)] + ([N("Relu", ["c"], ["y"])] if relu else [])
    return mk(nodes, [("x", F, list(x))], [("y", F)],
              [("w", (0.1 * rng.standard_normal(w)).astype(np.float32)),
               ("b", (0.1 * rng.standard_normal(k)).astype(np.float32))])


def _module(model, precision, layout=False, fuse=False):
    m = import_model(model)
    Pipeline([p for p in pipeline_passes(precision, fuse) if layout or p != "assign-layout"]).run(m)
    return m


def _opts(precision, tf32=False, **kw):
    return LowerOptions(TARGET, precision=precision, tf32=tf32, **kw)


def _conv_selections(plan):
    return [s for s in plan.selections if " = Conv(" in s.op or " = ConvTranspose(" in s.op]


# name -> (model, precision, tf32, the variant the heuristic picks): every path of the docstring
CASES = {
    "depthwise_nchw_fp32": (lambda: _conv_model((1, 32, 16, 16), (32, 1, 3, 3), group=32, pads=[1, 1, 1, 1]),
                            "fp32", False, "conv.depthwise_nchw"),
    "pointwise_nchw_fp16": (lambda: _conv_model((1, 64, 16, 16), (128, 64, 1, 1)), "fp16", False,
                            "conv.pointwise_gemm_nchw"),
    "igemm_nchw_fp16": (lambda: _conv_model((1, 64, 16, 16), (64, 64, 3, 3), pads=[1, 1, 1, 1]), "fp16", False,
                        "conv.igemm_nchw"),
    "igemm_nchw_tf32": (lambda: _conv_model((1, 64, 16, 16), (64, 64, 3, 3), pads=[1, 1, 1, 1]), "fp32", True,
                        "conv.igemm_nchw"),
    "igemm_nchw_1d_fp16": (lambda: _conv_model((2, 16, 40), (32, 16, 3), pads=[1, 1]), "fp16", False,
                           "conv.igemm_nchw"),
    "im2col_fp32": (lambda: _conv_model((4, 64, 56, 56), (128, 64, 3, 3), pads=[1, 1, 1, 1]), "fp32", False,
                    "conv.im2col_ffma"),
    # too few 64x64 CTAs for the FFMA GEMM: the fallback (no conv variant applies)
    "small_fp32": (lambda: _conv_model((1, 8, 6, 6), (8, 8, 3, 3)), "fp32", False, "fallback_linalg._conv"),
    # C/group = 4 halves: not 16-byte loads for the igemm
    "grouped_fp16": (lambda: _conv_model((1, 32, 20, 20), (64, 4, 3, 3), group=8, pads=[1, 1, 1, 1]), "fp16", False,
                     "conv.direct"),
    "conv_transpose_fp16": (lambda: _conv_model((1, 16, 8, 8), (16, 8, 4, 4), op="ConvTranspose", strides=[2, 2],
                                                pads=[1, 1, 1, 1]), "fp16", False, "conv_transpose.direct"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_path_is_chosen_where_the_chain_chose_it(name):
    build, prec, tf32, want = CASES[name]
    plan = lower(_module(build(), prec), _opts(prec, tf32))
    (sel,) = _conv_selections(plan)
    assert sel.variant == want, sel
    assert sel.candidates[0] == want and sel.candidates[-1] == "fallback_linalg._conv" if not \
        want.startswith("conv_transpose") else sel.candidates == (want,)
    assert not sel.declined
    # every kernel the op launched records it (plan.json, the kernel header)
    ks = [plan.kernels[l.kernel] for l in plan.launches if l.kernel and plan.kernels[l.kernel].params.get(
        "selected", {}).get("variant") == want]
    assert ks or want.startswith("fallback")


def test_alternatives_are_candidates_the_heuristic_order_decides():
    """A 1x1 fp16 conv has the batched GEMM, the implicit GEMM and the fallback as candidates;
    the strict-fp32 small conv only the fallback (the Fit says why the others do not apply)."""
    plan = lower(_module(CASES["pointwise_nchw_fp16"][0](), "fp16"), _opts("fp16"))
    (sel,) = _conv_selections(plan)
    assert sel.candidates == ("conv.pointwise_gemm_nchw", "conv.igemm_nchw", "fallback_linalg._conv")
    plan = lower(_module(CASES["small_fp32"][0](), "fp32"), _opts("fp32"))
    assert _conv_selections(plan)[0].candidates == ("fallback_linalg._conv",)


def test_im2col_past_its_limit_takes_the_direct_kernel(monkeypatch):
    monkeypatch.setattr(conv_lowering, "IM2COL_MAX_BYTES", 1 << 20)
    plan = lower(_module(CASES["im2col_fp32"][0](), "fp32"), _opts("fp32"))
    (sel,) = _conv_selections(plan)
    assert sel.variant == "conv.direct" and sel.params == conv.candidates(
        conv.ConvProblem(4, 64, 56, 56, 128, 3, 3, pads=(1, 1, 1, 1), dtype="float32", has_bias=True), "direct")[0]


def test_space_and_default_are_the_families():
    """igemm: conv.candidates / conv.default_params of the problem it renders (NCHW input padded
    and transposed to NHWC); the GEMM paths: gemm.candidates / gemm.default_params."""
    plan = lower(_module(CASES["igemm_nchw_fp16"][0](), "fp16"), _opts("fp16"))
    (sel,) = _conv_selections(plan)
    pr = conv.ConvProblem(1, 64, 16, 16, 64, 3, 3, pads=(1, 1, 1, 1), dtype="float16", has_bias=True,
                          in_layout="NHWC", out_layout="NCHW")
    assert sel.params == conv.default_params(pr, "igemm", TARGET) and sel.params in conv.candidates(pr, "igemm", TARGET)
    (k,) = [k for k in plan.kernels.values() if k.template == "conv_igemm.cu.j2"]
    assert {p: k.params[p] for p in sel.params} == sel.params
    assert any(k.template == "conv_layout.cu.j2" for k in plan.kernels.values())  # the NCHW -> NHWC layout kernel

    plan = lower(_module(CASES["pointwise_nchw_fp16"][0](), "fp16"), _opts("fp16"))
    (sel,) = _conv_selections(plan)
    gp = gemm.GemmProblem(128, 256, 64, dtype="float16", batch=(1, 1), stride_a=(0, 128 * 64),
                          stride_b=(64 * 256, 64 * 256), stride_d=(128 * 256, 128 * 256), has_c=True, c_dtype="float16",
                          ldc_m=1, ldc_n=0, stride_c=(0, 128), beta=1.0)
    assert sel.params == gemm.default_params(gp, TARGET) and sel.params in gemm.candidates(gp, TARGET)


def test_applies_has_no_side_effects(monkeypatch):
    """Every conv variant's applies leaves buffers, launches, kernels and values as they were, on
    NCHW and NHWC models at every precision; each variant applies somewhere."""
    real = Variant.check
    applied, checked = set(), set()

    def state(L):
        return (len(L.buffers), len(L.launches), len(L.init_launches), len(L.kernels), len(L.values),
                dict(L.equiv), len(L.transformed))

    def check(self, problem):
        before = state(problem.L)
        fit = real(self, problem)
        assert state(problem.L) == before, f"{self.name}.applies changed the lowering state"
        if self.family == conv_lowering.FAMILY:
            checked.add(self.name)
            assert isinstance(fit, variants.Fit) and (fit.ok or fit.why)
            if fit:
                applied.add(self.name)
        return fit

    monkeypatch.setattr(Variant, "check", check)
    for build, prec, tf32, _ in CASES.values():
        for fuse in (False, True):
            lower(_module(build(), prec, fuse=fuse), _opts(prec, tf32))
    for name in sorted(NHWC_MODELS):
        for prec in ("fp16", "bf16"):
            lower(_module(NHWC_MODELS[name](), prec, layout=True, fuse=True), _opts(prec))
    declared = {v.name for v in conv_lowering.CONV_VARIANTS} | {conv_lowering.CONV_TRANSPOSE.name}
    assert applied == declared == checked, (declared - applied, declared - checked)


def test_nhwc_paths_and_fused_groups_record_the_conv_variant():
    """NHWC convs (assign-layout) lower through the NHWC variants; inside a fused conv epilogue
    group the anchor goes through the selector too, so the kernel names the conv variant and the
    selection carries its tile params."""
    seen = set()
    for name in sorted(NHWC_MODELS):
        plan = lower(_module(NHWC_MODELS[name](), "fp16", layout=True, fuse=True), _opts("fp16"))
        sels = _conv_selections(plan)
        assert sels and all(s.variant.endswith("_nhwc") for s in sels), [s.variant for s in sels]
        seen |= {s.variant for s in sels}
        groups = [s for s in plan.selections if s.variant == "epilogue.conv"]
        assert groups
        for k in plan.kernels.values():
            if k.template == "conv_igemm.cu.j2":
                rec = k.params["selected"]
                assert rec["variant"] == "conv.igemm_nhwc" and rec["params"] == \
                    {p: k.params[p] for p in ("BM", "BN", "BK", "WARPS_M", "WARPS_N", "STAGES")}
    assert seen == {"conv.depthwise_nhwc", "conv.pointwise_gemm_nhwc", "conv.igemm_nhwc"}


def test_timed_selector_chooses_within_the_declared_spaces():
    """The stand-in timer times every (variant, params) of the declared spaces; the choice is the
    fastest and it lowers (non-default tiles and paths included), exactly in its arena."""
    from nnc.codegen.plan_exec import PlanExecutor
    for name in ("pointwise_nchw_fp16", "igemm_nchw_fp16", "grouped_fp16", "depthwise_nchw_fp32"):
        build, prec, tf32, _ = CASES[name]
        m = _module(build(), prec)
        sel = TimedSelector(stand_in_time)
        plan = lower(m, _opts(prec, tf32), selector=sel)
        (choice,) = _conv_selections(plan)
        (rows,) = [r for r in sel.timings.values() if any(v.startswith("conv.") for v, _, _ in r)]
        best = min(rows, key=lambda r: r[2])
        assert (choice.variant, choice.params) == (best[0], best[1])
        by_variant = {}
        for v, p, _ in rows:
            by_variant.setdefault(v, []).append(p)
        if "conv.igemm_nchw" in by_variant:
            pr = conv.ConvProblem(1, 64, 16, 16, 64 if name == "igemm_nchw_fp16" else 128,
                                  3 if name == "igemm_nchw_fp16" else 1, 3 if name == "igemm_nchw_fp16" else 1,
                                  pads=(1, 1, 1, 1) if name == "igemm_nchw_fp16" else (0, 0, 0, 0), dtype="float16",
                                  has_bias=True, in_layout="NHWC", out_layout="NCHW")
            assert by_variant["conv.igemm_nchw"] == conv.candidates(pr, "igemm", TARGET)
        ex = PlanExecutor.from_plan(plan, m)
        feed = {a.name: np.random.default_rng(1).standard_normal(a.type.shape).astype(np.float32) for a in m.main.args}
        ref, got = Interpreter(m).run(feed), ex.run(feed)
        assert all(np.array_equal(got[k], ref[k]) for k in ref)


def test_nhwc_conv_no_kernel_takes_is_a_clear_error():
    """An NHWC conv the NHWC kernels cannot take (strict fp32: no tensor cores, not depthwise, not
    pointwise) fails naming the op, as the old lowering did, instead of reaching the NCHW fallback."""
    from nnc.ir.parser import parse
    vals = ", ".join(["0.5"] * (8 * 3 * 3 * 8))
    text = f"""func @main(%x: f32[1,4,4,8]) -> (f32[1,2,2,8]) {{
  %w = const() {{value = dense<[{vals}]> : f32[8,3,3,8]}} : f32[8,3,3,8]
  %y = Conv(%x, %w) {{layout = "NHWC"}} : f32[1,2,2,8]
  return %y
}}
"""
    with pytest.raises(LoweringError, match="no NHWC kernel for this Conv"):
        lower(parse(text), _opts("fp32"))


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CASES))
def test_gpu_stand_in_choices_match_the_interpreter(name, tmp_path):
    """The timed selector's choices (stand-in timer: other paths and tiles than the heuristic's)
    compute the conv right on the GPU (needs GPU run)."""
    import nnc
    from nnc.codegen.emit import compile_to_dir
    from nnc.codegen.options import CodegenOptions
    build, prec, tf32, _ = CASES[name]
    m = _module(build(), prec)
    compile_to_dir(m, tmp_path, options=CodegenOptions(LowerOptions(for_arch("sm_90"), prec, tf32,
                                                                    selector="stand-in")))
    g = nnc.load(tmp_path)
    feed = {a.name: np.random.default_rng(2).standard_normal(a.type.shape).astype(np.float32) for a in m.main.args}
    ref = Interpreter(m).run(feed)
    got = g.run(feed, output="numpy", poison=True)
    tol = 2e-2 if prec != "fp32" or tf32 else 1e-3
    for k, v in ref.items():
        b = v.astype(np.float64)
        np.testing.assert_allclose(np.asarray(got[k]).astype(np.float64), b, rtol=tol,
                                   atol=tol * max(1.0, float(np.abs(b).max())), err_msg=f"{name}/{k}")


def _dw_block():
    """NHWC after assign-layout: stem 3x3 (16 -> 24), depthwise 3x3 over 24 channels with bias,
    residual and Relu fused (16-byte vectors: 24 % 8 == 0), 3x3 (24 -> 20), depthwise over 20
    channels (20 % 8 != 0: 2 channels a thread), depthwise multiplier 2 (20 -> 40), 3x3 out."""
    rng = np.random.default_rng(3)

    def w(*s):
        return (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)
    nodes = [N("Conv", ["x", "w0"], ["c0"], pads=[1] * 4), N("Relu", ["c0"], ["r0"]),
             N("Conv", ["r0", "wd", "bd"], ["d"], pads=[1] * 4, group=24), N("Add", ["d", "r0"], ["a"]),
             N("Relu", ["a"], ["ra"]),
             N("Conv", ["ra", "w1"], ["c1"], pads=[1] * 4), N("Conv", ["c1", "we"], ["e"], pads=[1] * 4, group=20),
             N("Conv", ["e", "wm"], ["m"], pads=[1] * 4, group=20), N("Conv", ["m", "w2"], ["y"], pads=[1] * 4)]
    return mk(nodes, [("x", F, [2, 16, 12, 12])], [("y", F)],
              [("w0", w(24, 16, 3, 3)), ("wd", w(24, 1, 3, 3)), ("bd", rng.standard_normal(24).astype(np.float32)),
               ("w1", w(20, 24, 3, 3)), ("we", w(20, 1, 3, 3)), ("wm", w(40, 1, 3, 3)), ("w2", w(8, 40, 3, 3))])


@pytest.mark.parametrize("prec", ["fp16", "bf16"])
def test_depthwise_nhwc_loads_16_bytes_where_it_can(prec, rng):
    from nnc.codegen.plan_exec import PlanExecutor
    m = _module(_dw_block(), prec, layout=True, fuse=True)
    assert all(op.attrs.layout == "NHWC" for op in m.main.walk() if op.name == "Conv")
    plan = lower(m, _opts(prec))
    dws = [k for k in plan.kernels.values() if k.name.startswith("nnc_conv_dw_nhwc")]
    vec = sorted((k.params["VEC"], "uint4" in k.source) for k in dws)
    assert vec == [(2, False), (2, False), (8, True)], vec  # 20 channels, multiplier 2 | 24 channels
    sels = [s for s in plan.selections if s.variant == "conv.depthwise_nhwc"]
    assert sorted(s.params["VEC"] for s in sels) == [2, 2, 8]
    (fused,) = [k for k in dws if k.params["VEC"] == 8]
    assert "Cin" in fused.source and "bias" in fused.source  # residual and bias in the vector path
    ex = PlanExecutor.from_plan(plan, m)
    feed = {"x": rng.standard_normal((2, 16, 12, 12)).astype(np.float32)}
    ref, got = Interpreter(m).run(feed), ex.run(feed)
    assert all(np.array_equal(got[k], ref[k]) for k in ref)


def test_depthwise_nhwc_kernels_compile_with_nvrtc(tmp_path):
    from nnc.codegen.emit import compile_to_dir
    for prec in ("fp16", "bf16"):
        plan = compile_to_dir(_module(_dw_block(), prec, layout=True, fuse=True), tmp_path / prec, arch="sm_90",
                              precision=prec)
        assert any(k["name"].startswith("nnc_conv_dw_nhwc") for k in plan["kernels"])
        assert all(f.stat().st_size > 0 for f in (tmp_path / prec).glob("*.cubin"))


def test_depthwise_nhwc_vector_width_is_checked():
    pr = conv.ConvProblem(1, 20, 8, 8, 20, 3, 3, groups=20, dtype="float16", in_layout="NHWC", out_layout="NHWC")
    assert not conv.dw_vec16_ok(pr) and {p["VEC"] for p in conv.dw_nhwc_candidates(pr)} == {2}
    with pytest.raises(ValueError, match="VEC=8"):
        conv.render(pr, dict(NT=256, OPT=1, VEC=8), kind="direct")
    ok = conv.ConvProblem(1, 24, 8, 8, 24, 3, 3, groups=24, dtype="bfloat16", in_layout="NHWC", out_layout="NHWC")
    assert conv.dw_vec16_ok(ok) and {p["VEC"] for p in conv.dw_nhwc_candidates(ok)} == {2, 8}


@pytest.mark.gpu
@pytest.mark.parametrize("prec", ["fp16", "bf16"])
def test_gpu_depthwise_nhwc_vectorised_matches_interpreter(prec, tmp_path, rng):
    """The 16-byte depthwise kernel (bias, residual, Relu fused) and the 2-channel ones against
    the interpreter (needs GPU run)."""
    import nnc
    from nnc.codegen.emit import compile_to_dir
    m = _module(_dw_block(), prec, layout=True, fuse=True)
    compile_to_dir(m, tmp_path, arch=None, precision=prec)
    g = nnc.load(tmp_path)
    tol = 1e-2 if prec == "fp16" else 4e-2
    for _ in range(2):
        feed = {"x": rng.standard_normal((2, 16, 12, 12)).astype(np.float32)}
        ref = Interpreter(m).run(feed)
        got = g.run(feed, output="numpy", poison=True)
        for k, v in ref.items():
            b = v.astype(np.float64)
            np.testing.assert_allclose(np.asarray(got[k]).astype(np.float64), b, rtol=tol,
                                       atol=tol * max(1.0, float(np.abs(b).max())), err_msg=k)
