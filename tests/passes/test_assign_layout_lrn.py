"""assign-layout's NHWC LRN (conv -> LRN -> pool stems stay NHWC): the reference of LRN {layout =
"NHWC"} is the NCHW op's on the transposed input, the kernel compiles with NVRTC for sm_90, and on
the GPU it matches the interpreter (poisoned outputs, fresh random inputs). The golden IR case is
tests/passes/golden/assign_layout.nnir (the LRN stem)."""
import numpy as np
import pytest

from nnc.ir import parse, verify
from nnc.ir.errors import NncError
from nnc.ir.interp import Interpreter
from nnc.ir.types import dtype
from nnc.ir.weights import WeightStore
from nnc.pipeline import Pipeline

STEM = """func @main(%x: {dt}[1,8,6,6]) -> ({dt}[1,8,3,3]) {{
  %w1 = const() {{weight = "w1"}} : {dt}[8,8,3,3]
  %w2 = const() {{weight = "w2"}} : {dt}[8,8,3,3]
  %c1 = Conv(%x, %w1) {{pads = [1, 1, 1, 1]}} : {dt}[1,8,6,6]
  %r1 = Relu(%c1) : {dt}[1,8,6,6]
  %n1 = LRN(%r1) {{size = {size}, alpha = 2.0, beta = 0.75, bias = 1.0}} : {dt}[1,8,6,6]
  %p = MaxPool(%n1) {{kernel_shape = [2, 2], strides = [2, 2]}} : {dt}[1,8,3,3]
  %y = Conv(%p, %w2) {{pads = [1, 1, 1, 1]}} : {dt}[1,8,3,3]
  return %y
}}
"""


def _stem(seed, dt="f16", size=3, layout=True):
    m = parse(STEM.format(dt=dt, size=size))
    m.weights = WeightStore()
    g = np.random.default_rng(seed)
    for k in ("w1", "w2"):
        m.weights.arrays[k] = (g.standard_normal((8, 8, 3, 3)) * 0.3).astype(dtype(dt).np)
    verify(m)
    if layout:
        Pipeline(["assign-layout"], verify_each=True).run(m)
    return m


def test_stem_goes_nhwc_and_matches(rng):
    before, m = _stem(3, layout=False), _stem(3)
    lrn = [op for op in m.main.walk() if op.name == "LRN"]
    assert lrn and lrn[0].attrs.layout == "NHWC" and str(lrn[0].results[0].type) == "f16[1,6,6,8]#nhwc"
    assert sum(op.name == "Transpose" for op in m.main.walk()) == 2  # the model's two edges only
    for _ in range(2):
        feed = {"x": rng.standard_normal((1, 8, 6, 6)).astype(np.float16)}
        a, b = Interpreter(before).run(feed)["y"], Interpreter(m).run(feed)["y"]
        np.testing.assert_allclose(b.astype(np.float64), a.astype(np.float64), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_nhwc_reference_is_the_nchw_op_transposed(size, rng):
    from nnc.ir.ops.norm import LRNAttrs, _lrn_ref
    x = rng.standard_normal((2, 7, 4, 5)).astype(np.float32)
    a = LRNAttrs(size=size, alpha=1.5, beta=0.75, bias=1.0)
    want = _lrn_ref(a, x)
    got = _lrn_ref(LRNAttrs(size=size, alpha=1.5, beta=0.75, bias=1.0, layout="NHWC"), x.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(got, want.transpose(0, 2, 3, 1))


def test_nhwc_lrn_needs_rank_4():
    text = """func @main(%x: f32[2,7,4]) -> (f32[2,7,4]) {
  %y = LRN(%x) {size = 3, layout = "NHWC"} : f32[2,7,4]
  return %y
}
"""
    with pytest.raises(NncError, match="layout NHWC needs a rank-4 input, got rank 3"):
        verify(parse(text))


@pytest.mark.parametrize("dt", ["f16", "bf16"])
def test_nhwc_lrn_kernel_compiles_with_nvrtc(dt, tmp_path, rng):
    from nnc.codegen.emit import compile_to_dir
    prec = {"f16": "fp16", "bf16": "bf16"}[dt]
    plan = compile_to_dir(_stem(1, dt), tmp_path, arch="sm_90", precision=prec)
    names = [k["name"] for k in plan["kernels"]]
    assert any("lrn" in n for n in names), names
    assert not any(n.startswith("nnc_layout") for n in names), names
    assert all(f.stat().st_size > 0 for f in tmp_path.glob("*.cubin"))


@pytest.mark.gpu
@pytest.mark.parametrize("size", [3, 5])
@pytest.mark.parametrize("dt", ["f16", "bf16"])
def test_gpu_nhwc_lrn_matches_interpreter(dt, size, tmp_path, rng):
    import nnc
    from nnc.codegen.emit import compile_to_dir
    prec = {"f16": "fp16", "bf16": "bf16"}[dt]
    m = _stem(2, dt, size=size)
    compile_to_dir(m, tmp_path, arch=None, precision=prec)
    g = nnc.load(tmp_path)
    tol = 1e-2 if dt == "f16" else 4e-2
    for _ in range(2):
        x = rng.standard_normal((1, 8, 6, 6)).astype(m.main.args[0].type.dtype.np)
        ref = Interpreter(m).run({"x": x})["y"].astype(np.float64)
        got = np.asarray(g.run({"x": x}, output="numpy", poison=True)["y"]).astype(np.float64)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * max(1.0, float(np.abs(ref).max())))
