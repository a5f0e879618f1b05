"""assign-layout on Concat, Slice and inference BatchNormalization (DenseNet / Inception blocks stay
NHWC): the launch balance keeps or restores a function, NHWC Concats lower to one launch of
templates/concat.cu.j2 (NVRTC sm_90 on the CPU; on the GPU against the interpreter), and the plan
run in its arena on the CPU equals the interpreter. Golden IR cases: tests/passes/golden/assign_layout.nnir."""
import numpy as np
import pytest

from nnc.codegen.lower import lower
from nnc.codegen.plan_exec import PlanExecutor
from nnc.driver import pipeline_passes
from nnc.ir import parse, verify
from nnc.ir.interp import Interpreter
from nnc.ir.layout import is_nhwc
from nnc.ir.types import dtype
from nnc.ir.weights import WeightStore
from nnc.pipeline import Pipeline

# a DenseNet-style block: two convs, their channel Concat (3 inputs: x's conv twice and a third),
# BN -> ReLU -> conv; then a spatial Slice and a conv
BLOCK = """func @main(%x: {dt}[1,8,6,6]) -> ({dt}[1,8,4,6]) {{
  %w1 = const() {{weight = "w1"}} : {dt}[8,8,3,3]
  %w2 = const() {{weight = "w2"}} : {dt}[8,8,3,3]
  %w4 = const() {{weight = "w4"}} : {dt}[8,8,3,3]
  %w3 = const() {{weight = "w3"}} : {dt}[8,24,3,3]
  %s = const() {{weight = "s"}} : {dt}[24]
  %b = const() {{weight = "b"}} : {dt}[24]
  %m = const() {{weight = "m"}} : {dt}[24]
  %v = const() {{weight = "v"}} : {dt}[24]
  %st = const() {{value = dense<[1]> : i64[1]}} : i64[1]
  %en = const() {{value = dense<[5]> : i64[1]}} : i64[1]
  %ax = const() {{value = dense<[2]> : i64[1]}} : i64[1]
  %c1 = Conv(%x, %w1) {{pads = [1, 1, 1, 1]}} : {dt}[1,8,6,6]
  %c2 = Conv(%c1, %w2) {{pads = [1, 1, 1, 1]}} : {dt}[1,8,6,6]
  %c4 = Conv(%c2, %w4) {{pads = [1, 1, 1, 1]}} : {dt}[1,8,6,6]
  %cat = Concat(%c1, %c4, %c2) {{axis = 1}} : {dt}[1,24,6,6]
  %bn = BatchNormalization(%cat, %s, %b, %m, %v) {{epsilon = 0.001}} : {dt}[1,24,6,6]
  %r = Relu(%bn) : {dt}[1,24,6,6]
  %c3 = Conv(%r, %w3) {{pads = [1, 1, 1, 1]}} : {dt}[1,8,6,6]
  %sl = Slice(%c3, %st, %en, %ax) : {dt}[1,8,4,6]
  %y = Relu(%sl) : {dt}[1,8,4,6]
  return %y
}}
"""


def _block(dt="f16", seed=0):
    m = parse(BLOCK.format(dt=dt))
    m.weights = WeightStore()
    g = np.random.default_rng(seed)
    npdt = dtype(dt).np
    for k, shape in (("w1", (8, 8, 3, 3)), ("w2", (8, 8, 3, 3)), ("w4", (8, 8, 3, 3)), ("w3", (8, 24, 3, 3))):
        m.weights.arrays[k] = (g.standard_normal(shape) * 0.3).astype(npdt)
    m.weights.arrays["s"] = g.uniform(0.5, 1.5, 24).astype(npdt)
    m.weights.arrays["b"] = (g.standard_normal(24) * 0.1).astype(npdt)
    m.weights.arrays["m"] = (g.standard_normal(24) * 0.1).astype(npdt)
    m.weights.arrays["v"] = g.uniform(0.5, 2.0, 24).astype(npdt)
    verify(m)
    return m


def _feed(m, rng):
    return {a.name: rng.standard_normal(a.type.shape).astype(a.type.dtype.np) for a in m.main.args}


def _assign(m):
    Pipeline(["assign-layout"], verify_each=True).run(m)
    return m


def test_block_goes_nhwc_and_matches(rng):
    before, after = _block(), _assign(_block())
    ops = {op.name: op for op in after.main.ops}
    assert ops["Concat"].attrs.axis == 3 and is_nhwc(ops["Concat"].results[0])
    assert "BatchNormalization" not in ops and is_nhwc(ops["Mul"].results[0])
    assert is_nhwc(ops["Slice"].results[0]) and tuple(ops["Slice"].results[0].type.shape) == (1, 4, 6, 8)
    assert sum(op.name == "Transpose" for op in after.main.ops) == 2  # the edges only
    for _ in range(2):
        feed = _feed(before, rng)
        a, b = Interpreter(before).run(feed)["y"], Interpreter(after).run(feed)["y"]
        np.testing.assert_allclose(b.astype(np.float64), a.astype(np.float64), rtol=1e-2,
                                   atol=1e-2 * float(np.abs(a).max()))


def test_batch1_channel_slice_stays_nchw():
    """On NCHW at batch 1 a channel Slice is a view; on NHWC a copy: with nothing else to gain the
    function keeps NCHW (the balance counts the copy)."""
    text = """func @main(%x: f16[1,8,6,6]) -> (f16[1,4,6,6]) {
  %w1 = const() {weight = "w1"} : f16[8,8,1,1]
  %st = const() {value = dense<[0]> : i64[1]} : i64[1]
  %en = const() {value = dense<[4]> : i64[1]} : i64[1]
  %ax = const() {value = dense<[1]> : i64[1]} : i64[1]
  %w2 = const() {weight = "w2"} : f16[4,4,3,3]
  %c1 = Conv(%x, %w1) : f16[1,8,6,6]
  %e = Relu(%c1) : f16[1,8,6,6]
  %g = MaxPool(%e) {kernel_shape = [1, 1]} : f16[1,8,6,6]
  %sl = Slice(%g, %st, %en, %ax) : f16[1,4,6,6]
  %y = Conv(%sl, %w2) {pads = [1, 1, 1, 1]} : f16[1,4,6,6]
  return %y
}
"""
    m = parse(text)
    m.weights = WeightStore()
    m.weights.arrays["w1"] = np.ones((8, 8, 1, 1), np.float16)
    m.weights.arrays["w2"] = np.ones((4, 4, 3, 3), np.float16)
    _assign(m)
    assert not any(is_nhwc(r) for op in m.main.ops for r in op.results)


def _compiled(dt):
    """The block through `nnc compile`'s passes (already at its precision: no to-fp16/to-bf16)."""
    m = _block(dt)
    prec = {"f16": "fp16", "bf16": "bf16"}[dt]
    passes = [p for p in pipeline_passes(prec) if p not in ("to-fp16", "to-bf16")]
    Pipeline(passes, verify_each=True).run(m)
    return m, prec


def _lowered(dt):
    m, prec = _compiled(dt)
    return m, lower(m, {"arch": "sm_90", "precision": prec})


@pytest.mark.parametrize("dt", ["f16", "bf16"])
def test_nhwc_concat_is_one_launch_and_exact_in_the_arena(dt, rng):
    m, plan = _lowered(dt)
    names = [plan.kernels[l.kernel].name for l in plan.launches if l.kernel]
    assert sum(n.startswith("nnc_concat") for n in names) == 1, names
    assert not any(n.startswith("nnc_layout") or n.startswith("nnc_batchnorm") for n in names), names
    ex = PlanExecutor.from_plan(plan, m)
    for _ in range(2):
        feed = _feed(m, rng)
        ref, got = Interpreter(m).run(feed), ex.run(feed)
        assert all(np.array_equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("dt", ["f16", "bf16"])
def test_nhwc_block_kernels_compile_with_nvrtc(dt, tmp_path):
    from nnc.codegen.emit import compile_to_dir
    m, prec = _compiled(dt)
    plan = compile_to_dir(m, tmp_path, arch="sm_90", precision=prec)
    assert any(k["name"].startswith("nnc_concat") for k in plan["kernels"])
    assert all(f.stat().st_size > 0 for f in tmp_path.glob("*.cubin"))


@pytest.mark.gpu
@pytest.mark.parametrize("dt", ["f16", "bf16"])
def test_gpu_nhwc_block_matches_interpreter(dt, tmp_path, rng):
    import nnc
    from nnc.codegen.emit import compile_to_dir
    m, prec = _compiled(dt)
    compile_to_dir(m, tmp_path, arch=None, precision=prec)
    g = nnc.load(tmp_path)
    tol = 1e-2 if dt == "f16" else 4e-2
    for _ in range(2):
        feed = _feed(m, rng)
        ref = Interpreter(m).run(feed)["y"].astype(np.float64)
        got = np.asarray(g.run(feed, output="numpy", poison=True)["y"]).astype(np.float64)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * max(1.0, float(np.abs(ref).max())))


# Resize between convs (FPN / U-Net upsampling): runs on the NHWC form, scales permuted
UPSAMPLE = """func @main(%x: {dt}[1,8,4,4]) -> ({dt}[1,8,8,8]) {{
  %w1 = const() {{weight = "w1"}} : {dt}[8,8,3,3]
  %w2 = const() {{weight = "w2"}} : {dt}[8,8,3,3]
  %sc = const() {{value = dense<[1.0, 1.0, 2.0, 2.0]> : f32[4]}} : f32[4]
  %c1 = Conv(%x, %w1) {{pads = [1, 1, 1, 1]}} : {dt}[1,8,4,4]
  %u = Resize(%c1, none, %sc) {{mode = "{mode}"}} : {dt}[1,8,8,8]
  %y = Conv(%u, %w2) {{pads = [1, 1, 1, 1]}} : {dt}[1,8,8,8]
  return %y
}}
"""


def _upsample(dt, mode, seed=0, layout=True):
    m = parse(UPSAMPLE.format(dt=dt, mode=mode))
    m.weights = WeightStore()
    g = np.random.default_rng(seed)
    for k in ("w1", "w2"):
        m.weights.arrays[k] = (g.standard_normal((8, 8, 3, 3)) * 0.3).astype(dtype(dt).np)
    verify(m)
    if layout:
        prec = {"f16": "fp16", "bf16": "bf16"}[dt]
        Pipeline([p for p in pipeline_passes(prec) if p not in ("to-fp16", "to-bf16")], verify_each=True).run(m)
    return m


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_goes_nhwc_exact_in_the_arena(mode, rng):
    m = _upsample("f16", mode)
    rs = [op for op in m.main.walk() if op.name == "Resize"]
    assert rs and all(is_nhwc(op.results[0]) for op in rs)
    plan = lower(m, {"arch": "sm_90", "precision": "fp16"})
    names = [plan.kernels[l.kernel].name for l in plan.launches if l.kernel]
    assert not any(n.startswith("nnc_layout") for n in names), names
    assert sum("transpose" in n for n in names) == 2, names  # the edges only
    ex = PlanExecutor.from_plan(plan, m)
    before = _upsample("f16", mode, layout=False)
    for _ in range(2):
        feed = _feed(m, rng)
        ref, got = Interpreter(m).run(feed), ex.run(feed)
        assert all(np.array_equal(got[k], ref[k]) for k in ref)
        want = Interpreter(before).run(feed)["y"].astype(np.float64)
        np.testing.assert_allclose(ref["y"].astype(np.float64), want, rtol=1e-2, atol=1e-2 * float(np.abs(want).max()))


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_nhwc_resize_kernels_compile_with_nvrtc(mode, tmp_path):
    from nnc.codegen.emit import compile_to_dir
    compile_to_dir(_upsample("bf16", mode), tmp_path, arch="sm_90", precision="bf16")
    assert all(f.stat().st_size > 0 for f in tmp_path.glob("*.cubin"))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("dt", ["f16", "bf16"])
def test_gpu_nhwc_resize_matches_interpreter(dt, mode, tmp_path, rng):
    import nnc
    from nnc.codegen.emit import compile_to_dir
    prec = {"f16": "fp16", "bf16": "bf16"}[dt]
    m = _upsample(dt, mode)
    compile_to_dir(m, tmp_path, arch=None, precision=prec)
    g = nnc.load(tmp_path)
    tol = 1e-2 if dt == "f16" else 4e-2
    for _ in range(2):
        feed = _feed(m, rng)
        ref = Interpreter(m).run(feed)["y"].astype(np.float64)
        got = np.asarray(g.run(feed, output="numpy", poison=True)["y"]).astype(np.float64)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * max(1.0, float(np.abs(ref).max())))


# ShuffleNet's channel shuffle between convs (groups of 8 channels)
SHUFFLE = """func @main(%x: {dt}[1,16,4,4]) -> ({dt}[1,16,4,4]{extra_ret}) {{
  %w1 = const() {{weight = "w1"}} : {dt}[16,16,3,3]
  %w2 = const() {{weight = "w2"}} : {dt}[16,16,3,3]
  %s5 = const() {{value = dense<[1, 2, 8, 4, 4]> : i64[5]}} : i64[5]
  %s4 = const() {{value = dense<[1, 16, 4, 4]> : i64[4]}} : i64[4]
  %c1 = Conv(%x, %w1) {{pads = [1, 1, 1, 1]}} : {dt}[1,16,4,4]
  %r = Relu(%c1) : {dt}[1,16,4,4]
  %g = Reshape(%r, %s5) : {dt}[1,2,8,4,4]
  %t = Transpose(%g) {{perm = [0, 2, 1, 3, 4]}} : {dt}[1,8,2,4,4]
  %sh = Reshape(%t, %s4) : {dt}[1,16,4,4]
  %y = Conv(%sh, %w2) {{pads = [1, 1, 1, 1]}} : {dt}[1,16,4,4]
  return %y{extra}
}}
"""


def _shuffle(dt="f16", seed=0, extra=False, passes=None):
    m = parse(SHUFFLE.format(dt=dt, extra_ret=f", {dt}[1,8,2,4,4]" if extra else "", extra=", %t" if extra else ""))
    m.weights = WeightStore()
    g = np.random.default_rng(seed)
    for k in ("w1", "w2"):
        m.weights.arrays[k] = (g.standard_normal((16, 16, 3, 3)) * 0.3).astype(dtype(dt).np)
    verify(m)
    if passes is None:
        prec = {"f16": "fp16", "bf16": "bf16"}[dt]
        passes = [p for p in pipeline_passes(prec) if p not in ("to-fp16", "to-bf16")]
    Pipeline(passes, verify_each=True).run(m)
    return m


def test_channel_shuffle_runs_nhwc_exact_in_the_arena(rng):
    m = _shuffle()
    ts = [op for op in m.main.walk() if op.name == "Transpose"]
    assert [tuple(op.attrs.perm) for op in ts] == [(0, 2, 3, 1), (0, 1, 2, 4, 3), (0, 3, 1, 2)]
    plan = lower(m, {"arch": "sm_90", "precision": "fp16"})
    names = [plan.kernels[l.kernel].name for l in plan.launches if l.kernel]
    assert not any(n.startswith("nnc_layout") for n in names), names
    assert sum("transpose" in n for n in names) == 3, names  # 2 edges + the shuffle (as on NCHW)
    ex = PlanExecutor.from_plan(plan, m)
    before = _shuffle(passes=[])
    for _ in range(2):
        feed = _feed(m, rng)
        ref, got = Interpreter(m).run(feed), ex.run(feed)
        assert all(np.array_equal(got[k], ref[k]) for k in ref)
        want = Interpreter(before).run(feed)["y"].astype(np.float64)
        np.testing.assert_allclose(ref["y"].astype(np.float64), want, rtol=1e-2, atol=1e-2 * float(np.abs(want).max()))


def test_shuffle_with_a_shared_intermediate_is_left_alone():
    m = _shuffle(extra=True, passes=["assign-layout"])
    assert any(op.name == "Transpose" and tuple(op.attrs.perm) == (0, 2, 1, 3, 4) for op in m.main.ops)


@pytest.mark.gpu
@pytest.mark.parametrize("dt", ["f16", "bf16"])
def test_gpu_nhwc_channel_shuffle_matches_interpreter(dt, tmp_path, rng):
    import nnc
    from nnc.codegen.emit import compile_to_dir
    prec = {"f16": "fp16", "bf16": "bf16"}[dt]
    m = _shuffle(dt)
    compile_to_dir(m, tmp_path, arch=None, precision=prec)
    g = nnc.load(tmp_path)
    tol = 1e-2 if dt == "f16" else 4e-2
    for _ in range(2):
        feed = _feed(m, rng)
        ref = Interpreter(m).run(feed)["y"].astype(np.float64)
        got = np.asarray(g.run(feed, output="numpy", poison=True)["y"]).astype(np.float64)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * max(1.0, float(np.abs(ref).max())))
