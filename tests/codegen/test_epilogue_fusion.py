"""fuse-epilogue (compiler/passes/fuse_epilogue.py) and its lowering (codegen/kernels/
epilogue_fusion.py): each conv/GEMM + epilogue chain is the anchor's usual kernel sequence with
nothing after it (one conv/GEMM kernel, plus the NCHW->NHWC transpose the igemm path always has or
the im2col of strict fp32), every kernel header names all ops of the group, the interpreter gives
the same outputs before and after, NVRTC compiles the kernels, and on a GPU the fused build matches
the interpreter (poisoned outputs, fresh random inputs; fp32 rel 1e-3, tf32 3e-3, f16 1e-2)."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnc.codegen.kernels import gemm_lowering
from nnc.codegen.lower import describe_op, lower
from nnc.driver import pipeline_passes
from nnc.ir.interp import Interpreter
from nnc.ir.parser import parse
from nnc.onnx_import import import_model
from nnc.passes import fuse_epilogue
from nnc.pipeline import FUSION_PASSES, Pipeline

N = helper.make_node
F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
                          [helper.make_tensor_value_info(n, F, s) for n, s in outputs],
                          [numpy_helper.from_array(a.astype(np.float32), n) for n, a in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def _w(rng, *shape):
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return rng.standard_normal(shape) / np.sqrt(fan_in)


def conv_block(k=3, c=16, kout=32, hw=8, groups=1, residual=True, act="Relu", stride=1):
    """Conv(+B) -> Add(per-channel constant) [-> Add(residual input)] -> activation."""
    rng = np.random.default_rng(0)
    p = k // 2
    q = (hw + 2 * p - k) // stride + 1
    inits = {"w": _w(rng, kout, c // groups, k, k), "b": rng.standard_normal(kout), "b2": rng.standard_normal((kout, 1, 1))}
    nodes = [N("Conv", ["x", "w", "b"], ["c"], pads=[p] * 4, strides=[stride] * 2, group=groups),
             N("Add", ["c", "b2"], ["a"])]
    cur, inputs = "a", [("x", [2, c, hw, hw])]
    if residual:
        nodes.append(N("Add", ["r", cur], ["s"]))
        cur = "s"
        inputs.append(("r", [2, kout, q, q]))
    if act == "Relu6":
        inits.update(lo=np.array(0.0), hi=np.array(6.0))
        nodes.append(N("Clip", [cur, "lo", "hi"], ["y"]))
    else:
        nodes.append(N(act, [cur], ["y"]))
    return _model(nodes, inputs, [("y", [2, kout, q, q])], inits)


def gemm_block(act="Gelu", m=64, k=96, n=128):
    """Gemm(transB, C = per-column constant) -> Mul(scalar) -> Add(bias) -> activation."""
    rng = np.random.default_rng(1)
    inits = {"w": _w(rng, n, k), "c": rng.standard_normal(n), "s": np.array(0.5), "b": rng.standard_normal(n)}
    nodes = [N("Gemm", ["x", "w", "c"], ["g"], transB=1, beta=2.0), N("Mul", ["g", "s"], ["gs"]),
             N("Add", ["gs", "b"], ["a"]), N(act, ["a"], ["y"])]
    return _model(nodes, [("x", [m, k])], [("y", [m, n])], inits)


def matmul_block(batch=(2, 3), m=32, k=64, n=64):
    """Batched MatMul -> Add(same-shape residual input) -> Add(bias) -> Relu."""
    rng = np.random.default_rng(2)
    inits = {"w": _w(rng, k, n), "b": rng.standard_normal(n)}
    nodes = [N("MatMul", ["x", "w"], ["mm"]), N("Add", ["mm", "r"], ["s"]), N("Add", ["s", "b"], ["a"]),
             N("Relu", ["a"], ["y"])]
    shp = list(batch)
    return _model(nodes, [("x", shp + [m, k]), ("r", shp + [m, n])], [("y", shp + [m, n])], inits)


# name -> (model, precision, options, the launches of the one group, kernel templates that must appear)
def _cases():
    return {
        "conv3x3_f16_igemm": (conv_block(), "fp16", {}, 2, {"conv_layout.cu.j2", "conv_igemm.cu.j2"}),
        "conv3x3_f32_tf32_igemm": (conv_block(), "fp32", {"tf32": True}, 2, {"conv_igemm.cu.j2"}),
        "conv3x3_f32_im2col": (conv_block(stride=2), "fp32", {"f32_min_ctas": 1}, 2, {"conv_im2col.cu.j2", "gemm_f32.cu.j2"}),
        "conv1x1_f16_pointwise": (conv_block(k=1), "fp16", {}, 1, {"gemm_tc.cu.j2"}),
        "conv1x1_f32_pointwise_grouped": (conv_block(k=1, groups=2), "fp32", {"f32_min_ctas": 1}, 1, {"gemm_f32.cu.j2"}),
        "dwconv_f32_direct_relu6": (conv_block(c=32, groups=32, residual=False, act="Relu6"), "fp32", {}, 1,
                                    {"conv_direct.cu.j2"}),
        "dwconv_f16_direct": (conv_block(c=32, groups=32, act="Sigmoid"), "fp16", {}, 1, {"conv_direct.cu.j2"}),
        "gemm_f16_gelu": (gemm_block(), "fp16", {}, 1, {"gemm_tc.cu.j2"}),
        "gemm_f32_tanh": (gemm_block("Tanh"), "fp32", {"f32_min_ctas": 1}, 1, {"gemm_f32.cu.j2"}),
        "matmul_f16_residual": (matmul_block(), "fp16", {}, 1, {"gemm_tc.cu.j2"}),
        "matmul_f32_tf32_residual": (matmul_block(), "fp32", {"tf32": True}, 1, {"gemm_tc.cu.j2"}),
    }


CASES = sorted(_cases())


def _build(name, passes=None):
    model, prec, opts, _, _ = _cases()[name]
    mod = import_model(model)
    Pipeline(pipeline_passes(prec) if passes is None else passes, verify_each=True).run(mod)
    return mod, prec, opts


def _lower(mod, prec, opts, monkeypatch):
    if "f32_min_ctas" in opts:
        monkeypatch.setattr(gemm_lowering, "F32_MIN_CTAS", opts["f32_min_ctas"])
    return lower(mod, {"precision": prec, "tf32": bool(opts.get("tf32"))})


@pytest.mark.parametrize("name", CASES)
def test_group_is_the_anchor_kernels_alone(name, monkeypatch):
    mod, prec, opts = _build(name)
    fused = [op for op in mod.main.ops if op.name == "fused"]
    assert [op.attrs.kind for op in fused] == ["conv_epilogue" if name.startswith(("conv", "dw")) else "gemm_epilogue"]
    plan = _lower(mod, prec, opts, monkeypatch)
    want = _cases()[name][3]
    body_descs = [describe_op(b) for b in fused[0].attrs.body.ops]
    group = [l for l in plan.launches if l.kernel and body_descs[0] in plan.kernels[l.kernel].ops]
    assert len(group) == want, [l.kernel for l in plan.launches]
    templates = {plan.kernels[l.kernel].template for l in group}
    assert _cases()[name][4] <= templates
    for l in group:  # every kernel of the group names every op of it
        assert all(d in plan.kernels[l.kernel].ops for d in body_descs)
    # nothing else runs but the casts at the model's edges (fp16)
    rest = [l for l in plan.launches if l not in group]
    assert all("= Cast(" in l.op for l in rest), [l.op for l in rest]
    # and the unfused build needs more launches
    unfused, _, _ = _build(name, [p for p in pipeline_passes(prec) if p not in FUSION_PASSES])
    assert len(_lower(unfused, prec, opts, monkeypatch).launches) > len(plan.launches)


@pytest.mark.parametrize("name", CASES)
def test_interpreter_same_before_and_after(name, rng):
    before, _, _ = _build(name, [p for p in pipeline_passes(_cases()[name][1]) if p not in FUSION_PASSES])
    after, _, _ = _build(name)
    feed = {a.name: rng.standard_normal(a.type.shape).astype(np.float32) for a in before.main.args}
    want, got = Interpreter(before).run(feed), Interpreter(after).run(feed)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k])


def test_declined_group_splits_like_unfused(monkeypatch):
    """A strict-fp32 GEMM too small for the FFMA kernel: the fast lowering declines, the group
    lowers as anchor (the fallback GEMM) + one elementwise kernel for the chain."""
    mod, prec, opts = _build("gemm_f32_tanh")
    plan = lower(mod, {"precision": prec})
    assert [plan.kernels[l.kernel].template for l in plan.launches] == ["matmul_fallback.cu.j2", "elementwise.cu.j2"]


def test_chains_that_must_not_fuse():
    text = """func @main(%x: f32[1,2,4,4], %q: f32[N,8], %n: f32[3,4]) -> (f32[1,3,4,4], f32[1,3,4,4], f32[N,6], f32[3,4]) {
  %w = const() {value = dense<[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]> : f32[3,2,1,1]} : f32[3,2,1,1]
  %wq = const() {value = dense<[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]> : f32[8,6]} : f32[8,6]
  %wn = const() {value = dense<[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 2.0, 3.0, 4.0]> : f32[4,4]} : f32[4,4]
  %s = const() {value = dense<[2.0]> : f32[]} : f32[]
  %c = Conv(%x, %w) : f32[1,3,4,4]
  %y = Relu(%c) : f32[1,3,4,4]
  %mq = MatMul(%q, %wq) : f32[N,6]
  %mr = Relu(%mq) : f32[N,6]
  %mn = MatMul(%n, %wn) : f32[3,4]
  %r = Relu(%mn) : f32[3,4]
  %m = Mul(%r, %s) : f32[3,4]
  return %y, %c, %mr, %m
}
"""
    m = parse(text)
    assert fuse_epilogue.run(m)
    ops = [op for op in m.main.ops if op.name != "const"]
    # the conv's result is also returned (used twice); a MatMul over symbolic rows fuses too (a
    # range profile runs M per run: gemm_lowering.runtime_rows); the scale after the activation
    # stays outside
    assert [op.name for op in ops] == ["Conv", "Relu", "fused", "fused", "Mul"]
    assert ops[2].attrs.params == "relu" and ops[3].attrs.params == "relu"


def test_fused_kernels_compile_with_nvrtc(tmp_path, monkeypatch):
    from nnc.codegen.emit import compile_to_dir
    monkeypatch.setattr(gemm_lowering, "F32_MIN_CTAS", 1)
    for name in CASES:
        mod, prec, opts = _build(name)
        plan = compile_to_dir(mod, tmp_path / name, arch="sm_90", precision=prec, tf32=bool(opts.get("tf32")))
        assert plan["cubins"]


@pytest.mark.gpu
@pytest.mark.parametrize("name", CASES)
def test_gpu_fused_build_matches_interpreter(name, tmp_path, rng, monkeypatch):
    import nnc
    from nnc.codegen.emit import compile_to_dir
    mod, prec, opts = _build(name)
    if "f32_min_ctas" in opts:
        monkeypatch.setattr(gemm_lowering, "F32_MIN_CTAS", opts["f32_min_ctas"])
    compile_to_dir(mod, tmp_path, arch=None, precision=prec, tf32=bool(opts.get("tf32")))
    g = nnc.load(tmp_path)
    tol = 1e-2 if prec == "fp16" else (3e-3 if opts.get("tf32") else 1e-3)
    for _ in range(2):  # fresh inputs each time; arena and outputs poisoned
        feed = {a.name: rng.standard_normal(a.type.shape).astype(np.float32) for a in mod.main.args}
        ref = Interpreter(mod).run(feed)
        got = g.run(feed, output="numpy", poison=True)
        for k, v in ref.items():
            a, b = np.asarray(got[k]).astype(np.float64), v.astype(np.float64)
            scale = max(1.0, float(np.abs(b).max()))
            assert np.isfinite(a).all(), f"{name}/{k}: non-finite output"
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=f"{name}/{k}")
