"""The int8 tensor-core family (codegen/kernels/intgemm_tc.py, templates/intgemm_tc.cu.j2):
MatMulInteger / QLinearMatMul as an mma.sync m16n8k32 GEMM, ConvInteger / QLinearConv as im2col +
that GEMM. CPU: applies / space / default (and why not), the compile-time constants' arithmetic
(zero-point corrections, im2col order) emulated in numpy against the interpreter, NVRTC sm_90a
compile of the rendered kernels (issue-12 shapes; u8 / s8 activations, with and without zero
points, per-tensor and per-channel scales), the digits int8 plan picks the family on sm_90a. GPU:
those shapes against the interpreter (int32 exact, requantized within one unit), outputs poisoned
first; the digits int8 build on CUDA keeps its accuracy."""
from __future__ import annotations

import numpy as np
import pytest

from nnc.codegen.kernels import intgemm_tc as T
from nnc.ir.interp import Interpreter
from tools.bench_int8 import candidates, lower_forced, model, parse_shape, plan_source, random_feed

GEMMS = ["mm:128x768x768", "mm:4096x768x3072"]
CONVS = ["conv:1x64x56x56:k64:3x3:p1", "conv:32x256x56x56:k64:1x1"]
# (a_u8, zero_points, per_channel)
MIXES = [(True, True, True), (False, False, False), (True, False, True), (False, True, False)]
SMALL = ["mm:40x128x10", "mm:70x48x200", "conv:2x16x9x7:k24:3x3:p1", "conv:3x1x8x8:k16:3x3:p1",
         "conv:2x8x11x11:k40:3x3:s2"]


def _tc(shape: str) -> str:
    return "intgemm_tc.conv" if shape.startswith("conv") else "intgemm_tc.matmul"


def _ops(shape: str):
    return ("QLinearConv", "ConvInteger") if shape.startswith("conv") else ("QLinearMatMul", "MatMulInteger")


def _problem(m, arch="sm_90a"):
    from nnc.codegen.lower import Lowerer, Problem, _ensure_loaded
    from tools.bench_int8 import options
    _ensure_loaded()
    op = next(o for o in m.main.ops if o.name != "const")
    return Problem(Lowerer(m, options(arch)), op)


@pytest.mark.parametrize("shape", GEMMS + CONVS)
def test_applies_first_and_space(shape):
    for op in _ops(shape):
        m = model(parse_shape(shape), op)
        names = [n for n, _ in candidates(m)]
        assert names[0] == _tc(shape) and len(names) == 2, names  # the baseline stays a candidate
        pr = _problem(m)
        v = T.CONV if shape.startswith("conv") else T.MATMUL
        assert v.check(pr)
        sp = v.space(pr)
        assert sp and all(T.smem_bytes(p) <= pr.target.smem_per_block_optin for p in sp)
        assert v.default(pr, sp) in sp


def test_does_not_apply_with_reasons():
    from dataclasses import replace
    m = model(parse_shape("mm:128x768x768"), "QLinearMatMul")
    pr = _problem(m)
    pr.target = replace(pr.target, arch="sm_75")
    fit = T.MATMUL.check(pr)
    assert not fit and "sm_80" in fit.why
    m = model(parse_shape("mm:64x40x64"), "MatMulInteger")  # K % 16 != 0
    fit = T.MATMUL.check(_problem(m))
    assert not fit and "multiple of 16" in fit.why
    assert [n for n, _ in candidates(m)] == ["intgemm._mm_int"]


def test_applies_has_no_side_effects():
    m = model(parse_shape("conv:2x16x9x7:k24:3x3:p1"), "QLinearConv")
    pr = _problem(m)
    L = pr.L
    before = (len(L.buffers), len(L.launches), len(L.kernels), len(L.values), len(L.transformed))
    assert T.CONV.check(pr) and not T.MATMUL.check(_problem(model(parse_shape("mm:64x40x64"), "MatMulInteger")))
    assert (len(L.buffers), len(L.launches), len(L.kernels), len(L.values), len(L.transformed)) == before


def _emulate(m, shape: str, feed):
    """The family's arithmetic in numpy: the im2col of the template (k = (c, r, s), the zero point
    outside the image, zeros up to KP), the [N, KP] weight, corr and the row-sum term; int32 wrap."""
    pr = _problem(m)
    ig = T.analyse(pr)
    assert not isinstance(ig, str), ig
    memo = pr.memo["intgemm_tc"]
    c = T.constants(ig, memo)
    x = feed["x"]
    if ig.kind == "conv":
        NB, C, H, W, R, S, P, Q, SH, SW, PH, PW, DH, DW = ig.conv
        col = np.zeros((ig.M, ig.KP), np.int64)
        xp = np.full((NB, C, H + 2 * PH + R * DH, W + 2 * PW + S * DW), int(np.asarray(memo["za"]).astype(x.dtype)),
                     np.int64)
        xp[:, :, PH:PH + H, PW:PW + W] = x
        for r in range(R):
            for s in range(S):
                patch = xp[:, :, r * DH:r * DH + (P - 1) * SH + 1:SH, s * DW:s * DW + (Q - 1) * SW + 1:SW]
                col[:, np.arange(C) * R * S + r * S + s] = patch.transpose(0, 2, 3, 1).reshape(ig.M, C)
        A = col
    else:
        A = np.zeros((ig.M, ig.KP), np.int64)
        A[:, :ig.K] = x.reshape(ig.M, ig.K)
    acc = A @ c["weight"].astype(np.int64).T + c["corr"].astype(np.int64)
    acc = acc - c["zb"].astype(np.int64) * A.sum(axis=1, keepdims=True)
    acc = ((acc + 2 ** 31) % 2 ** 32 - 2 ** 31).astype(np.int64)
    if ig.quant:
        if ig.has_bias:
            acc = acc + pr.value(8).astype(np.int64)
        lo, hi = T._QR[ig.out]
        acc = np.clip(np.rint(acc * c["scale"]) + ig.yz, lo, hi)
    if ig.kind == "conv":
        NB, P, Q = ig.conv[0], ig.conv[6], ig.conv[7]
        return acc.reshape(NB, P, Q, ig.N).transpose(0, 3, 1, 2)
    return acc.reshape(x.shape[:-1] + (ig.N,))


@pytest.mark.parametrize("shape", SMALL)
@pytest.mark.parametrize("mix", MIXES)
def test_constants_emulated_match_interpreter(shape, mix):
    a_u8, zps, per = mix
    for op in _ops(shape):
        m = model(parse_shape(shape), op, a_u8=a_u8, zero_points=zps, per_channel=per)
        feed = random_feed(m)
        want = Interpreter(m).run(feed)["y"].astype(np.int64)
        np.testing.assert_array_equal(_emulate(m, shape, feed), want, err_msg=f"{shape} {op} {mix}")


def _sources(shapes, mixes, tag):
    out = []
    for shape in shapes:
        for op in _ops(shape):
            for a_u8, zps, per in mixes:
                m = model(parse_shape(shape), op, a_u8=a_u8, zero_points=zps, per_channel=per)
                pr = _problem(m)
                v = T.CONV if shape.startswith("conv") else T.MATMUL
                assert v.check(pr), (shape, op)
                sp = v.space(pr)
                for params in [v.default(pr, sp)] + [p for p in sp if p["BM"] == 128 and p["BN"] == 128][:1]:
                    plan = lower_forced(m, _tc(shape), params)
                    for k in plan.kernels.values():
                        name = f"{k.name}_{tag}{len(out)}"
                        out.append((name, k.source.replace(k.name, name)))
    return out


@pytest.mark.parametrize("shapes", [GEMMS, CONVS, SMALL], ids=["gemm", "conv", "small"])
def test_kernels_compile_with_nvrtc(shapes):
    from nnc.codegen.cuda import compile_nvrtc
    from nnc.codegen.units import pieces_for, prelude
    srcs = _sources(shapes, MIXES, "k")
    text = "\n".join(s for _, s in srcs)
    cubin = compile_nvrtc(prelude(pieces_for([text])) + "\n" + text, "sm_90a", name="intgemm_tc.cu")
    assert cubin and all(n.encode() in cubin for n, _ in srcs)
    assert "mma.sync.aligned.m16n8k32.row.col.s32" in text and "ldmatrix" in text and "cp.async" in text


def test_header_names_op_and_params():
    m = model(parse_shape("conv:2x16x9x7:k24:3x3:p1"), "QLinearConv")
    plan = lower_forced(m, "intgemm_tc.conv", None)
    ks = list(plan.kernels.values())
    assert [k.template for k in ks] == ["intgemm_tc.cu.j2"] * 2
    assert all("QLinearConv(" in k.source for k in ks)
    assert '"BM":' in ks[1].source and "m16n8k32" in ks[1].source
    assert [l.kernel for l in plan.launches] == [k.name for k in ks]


def test_digits_int8_plan_picks_the_family_on_sm_90a(tmp_path):
    import nnc
    from nnc.calibrate import calibrate
    from nnc.driver import compile_model
    from tests.test_calibrate import DIGITS
    t = calibrate(str(DIGITS / "digits_cnn.onnx"), DIGITS / "calib.npz", "entropy")
    t.save_trt_cache(tmp_path / "digits.cache")
    plan = compile_model(str(DIGITS / "digits_cnn.onnx"), tmp_path / "out", options=nnc.CompileOptions(
        shapes={"input": [40, 1, 8, 8]}, precision="int8", calib=tmp_path / "digits.cache", tune=False,
        backend="cuda", arch="sm_90a"))
    by_op = {}
    for k in plan["kernels"]:
        for op in k["ops"]:
            by_op.setdefault(op.split("= ")[1].split("(")[0], set()).add(k["template"])
    assert by_op.get("QLinearConv") == {"intgemm_tc.cu.j2"}, by_op
    assert by_op.get("MatMulInteger") == {"intgemm_tc.cu.j2"}, by_op
    assert list((tmp_path / "out").glob("model.*.cubin"))


# ---------------------------------------------------------------- GPU

def _gpu_check(shape: str, op: str, mix, params=None):
    import cupy as cp

    from tools.bench_int8 import build, device_buffers, output_of, runner
    a_u8, zps, per = mix
    m = model(parse_shape(shape), op, a_u8=a_u8, zero_points=zps, per_channel=per, seed=7)
    feed = random_feed(m, seed=11)
    want = Interpreter(m).run(feed)["y"].astype(np.int64)
    plan = lower_forced(m, _tc(shape), params)
    arrs = device_buffers(plan, feed, poison=True)
    runner(plan, build(plan), arrs)()
    cp.cuda.Device().synchronize()
    got = output_of(plan, arrs).astype(np.int64)
    msg = f"{shape} {op} {mix} {params}"
    if op.startswith("QLinear"):
        d = np.abs(got - want)
        assert d.max() <= 1, msg
        assert (d != 0).mean() < 1e-3, msg
    else:
        np.testing.assert_array_equal(got, want, err_msg=msg)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GEMMS + CONVS + SMALL)
@pytest.mark.parametrize("mix", MIXES)
def test_gpu_matches_interpreter(shape, mix):
    for op in _ops(shape):
        _gpu_check(shape, op, mix)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["mm:70x48x200", "conv:2x16x9x7:k24:3x3:p1", "mm:128x768x768"])
def test_gpu_every_space_point(shape):
    m = model(parse_shape(shape), _ops(shape)[0])
    pr = _problem(m)
    v = T.CONV if shape.startswith("conv") else T.MATMUL
    v.check(pr)
    for params in v.space(pr):
        _gpu_check(shape, _ops(shape)[0], (True, True, True), params)


@pytest.mark.gpu
def test_gpu_digits_int8_accuracy(tmp_path):
    """The digits int8 build (the family's kernels on sm_90a) on CUDA: held-out accuracy within 0.5
    points of the fp32 reference, as the reference backend's run of the same plan."""
    import nnc
    from nnc.calibrate import calibrate
    from nnc.driver import compile_model
    from tests.test_calibrate import DIGITS, _holdout_batches
    t = calibrate(str(DIGITS / "digits_cnn.onnx"), DIGITS / "calib.npz", "entropy")
    t.save_trt_cache(tmp_path / "digits.cache")
    plan = compile_model(str(DIGITS / "digits_cnn.onnx"), tmp_path / "out", options=nnc.CompileOptions(
        shapes={"input": [40, 1, 8, 8]}, precision="int8", calib=tmp_path / "digits.cache", tune=False,
        backend="cuda"))
    assert any(k["template"] == "intgemm_tc.cu.j2" for k in plan["kernels"])
    gpu = nnc.load(tmp_path / "out")
    fp32 = nnc.compile(str(DIGITS / "digits_cnn.onnx"), shapes={"input": [40, 1, 8, 8]}, backend="reference")
    a8, a32 = _holdout_batches(gpu, 40), _holdout_batches(fp32, 40)
    print(f"\ndigits int8 on CUDA (intgemm_tc): {a8:.2f}% vs fp32 {a32:.2f}%")
    assert a32 - a8 <= 0.5


def test_every_space_point_compiles_with_nvrtc():
    from nnc.codegen.cuda import compile_nvrtc
    from nnc.codegen.units import pieces_for, prelude
    srcs = []
    for shape in ("mm:70x48x200", "conv:2x16x9x7:k24:3x3:p1"):
        m = model(parse_shape(shape), _ops(shape)[0])
        pr = _problem(m)
        v = T.CONV if shape.startswith("conv") else T.MATMUL
        assert v.check(pr)
        for params in v.space(pr):
            plan = lower_forced(m, _tc(shape), params)
            for k in plan.kernels.values():
                name = f"{k.name}_s{len(srcs)}"
                srcs.append((name, k.source.replace(k.name, name)))
    text = "\n".join(s for _, s in srcs)
    cubin = compile_nvrtc(prelude(pieces_for([text])) + "\n" + text, "sm_90a", name="intgemm_tc_space.cu")
    assert cubin and all(n.encode() in cubin for n, _ in srcs)
