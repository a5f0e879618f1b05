"""fuse-horizontal (compiler/passes/fuse_horizontal.py): parallel GEMMs / convs on one activation
become one batched GEMM / one wider conv whose members are views. Golden IR: golden/fuse_horizontal.nnir
(tests/passes/test_golden.py). Here: a BERT-like Q/K/V block and an Inception-like block through the
whole pipeline (interpreter before/after), the plan (ONE batched gemm launch with A broadcast, no copy
for the slices), and the GPU against the interpreter with poisoned buffers."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from nnc.codegen.lower import lower
from nnc.driver import pipeline_passes
from nnc.ir.interp import Interpreter
from nnc.onnx_import import import_model
from nnc.passes import fuse_horizontal
from nnc.pipeline import Pipeline


def _mk(nodes, inputs, outputs, inits):
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info(n, T.FLOAT, s) for n, s in inputs],
                     [h.make_tensor_value_info(n, T.FLOAT, None) for n in outputs],
                     [nh.from_array(np.asarray(a, np.float32), n) for n, a in inits])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def qkv_model(S=32, D=64, heads=4, equal_bias=False):
    """BERT's self-attention as transformers exports it: Add(bias, MatMul(x, W)) for Q, K, V, then
    Reshape/Transpose into heads, softmax(Q K^T / sqrt(d)) V, and the output projection.
    equal_bias: the three biases equal (e.g. all zero)."""
    r = np.random.default_rng(7)
    w = lambda *s: (r.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)
    dh = D // heads
    N = h.make_node
    nodes, inits = [], [("hs", np.array([1, S, heads, dh], np.int64)), ("os", np.array([1, S, D], np.int64)),
                        ("sc", np.array(1 / np.sqrt(dh), np.float32)), ("wo", w(D, D))]
    for p in "qkv":
        inits += [(f"w{p}", w(D, D)), (f"b{p}", np.full(D, 0.5, np.float32) if equal_bias else
                                        r.standard_normal(D).astype(np.float32))]
        nodes += [N("MatMul", ["x", f"w{p}"], [f"{p}m"]), N("Add", [f"b{p}", f"{p}m"], [f"{p}a"]),
                  N("Reshape", [f"{p}a", "hs"], [f"{p}r"])]
    nodes += [N("Transpose", ["qr"], ["qt"], perm=[0, 2, 1, 3]), N("Transpose", ["kr"], ["kt"], perm=[0, 2, 3, 1]),
              N("Transpose", ["vr"], ["vt"], perm=[0, 2, 1, 3]), N("MatMul", ["qt", "kt"], ["s0"]),
              N("Mul", ["s0", "sc"], ["s1"]), N("Softmax", ["s1"], ["p"], axis=-1), N("MatMul", ["p", "vt"], ["c"]),
              N("Transpose", ["c"], ["ct"], perm=[0, 2, 1, 3]), N("Reshape", ["ct", "os"], ["cr"]),
              N("MatMul", ["cr", "wo"], ["out"])]
    return _mk(nodes, [("x", [1, S, D])], ["out"], [(n, np.asarray(a)) for n, a in inits])


def inception_model(C=16, H=8):
    """Three 1x1 branches (conv+bias, relu) on one input, two of them followed by a 3x3 conv, and
    the channel Concat of the branch ends."""
    r = np.random.default_rng(3)
    w = lambda *s: (r.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)
    N = h.make_node
    inits = [("w1", w(8, C, 1, 1)), ("b1", w(8)), ("w2", w(16, C, 1, 1)), ("b2", w(16)), ("w3", w(8, C, 1, 1)),
             ("b3", w(8)), ("w4", w(8, 16, 3, 3)), ("w5", w(8, 8, 3, 3))]
    nodes = [N("Conv", ["x", "w1", "b1"], ["c1"]), N("Relu", ["c1"], ["r1"]),
             N("Conv", ["x", "w2", "b2"], ["c2"]), N("Relu", ["c2"], ["r2"]),
             N("Conv", ["x", "w3", "b3"], ["c3"]), N("Relu", ["c3"], ["r3"]),
             N("Conv", ["r2", "w4"], ["d2"], pads=[1, 1, 1, 1]), N("Conv", ["r3", "w5"], ["d3"], pads=[1, 1, 1, 1]),
             N("Concat", ["r1", "d2", "d3"], ["out"], axis=1)]
    return _mk(nodes, [("x", [1, C, H, H])], ["out"], inits)


def _feed(m, seed=0):
    rng = np.random.default_rng(seed)
    return {a.name: rng.standard_normal([int(d) for d in a.type.shape]).astype(a.type.dtype.np) for a in m.main.args}


def _ops(m, name):
    return [op for op in m.main.walk() if op.name == name]


@pytest.mark.parametrize("make,anchor,fused_shape", [(qkv_model, "MatMul", (3, 1, 64, 64)),
                                                      (inception_model, "Conv", (32, 16, 1, 1))])
def test_pipeline_fuses_and_matches_interpreter(make, anchor, fused_shape):
    m = import_model(make())
    feed = _feed(m)
    ref = Interpreter(m).run(feed)
    Pipeline(pipeline_passes("fp32", True), verify_each=True).run(m)
    got = Interpreter(m).run(feed)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-5)
    shapes = [tuple(op.operands[1].type.shape) for op in _ops(m, anchor)]
    assert fused_shape in shapes
    before = import_model(make())
    Pipeline([p for p in pipeline_passes("fp32", True) if p != "fuse-horizontal"]).run(before)
    assert len(_ops(m, anchor)) + 2 == len(_ops(before, anchor))  # three members became one


def test_rewrite_counts_and_leaves_unfusable_alone():
    m = import_model(qkv_model())
    assert fuse_horizontal.rewrite(m) == {"MatMulx3": 1}
    assert fuse_horizontal.rewrite(m) == {}  # idempotent: the fused MatMul has no partner
    m = import_model(inception_model())
    assert fuse_horizontal.rewrite(m) == {"Convx3": 1}  # the two 3x3 convs read different inputs


def _plan(make, drop=()):
    m = import_model(make())
    Pipeline([p for p in pipeline_passes("fp16", True) if p not in drop]).run(m)
    return m, lower(m, {"arch": "sm_90", "precision": "fp16"})


def test_qkv_plan_is_one_batched_gemm_and_views():
    m, plan = _plan(qkv_model)
    _, base = _plan(qkv_model, drop=("fuse-horizontal",))
    gemms = [l for l in plan.launches if l.kernel and "gemm" in l.kernel]
    qkv = [l for l in gemms if l.grid[2] == 3]
    assert len(qkv) == 1, [(l.kernel, l.grid) for l in gemms]  # the 3 projections: one launch, batch 3
    a = qkv[0].args[0]
    assert tuple(a.shape) == (1, 1, 32, 64)  # A is x itself (a view: Unsqueeze), broadcast over the batch
    assert not any(l.kernel and ("copy_slice" in l.kernel or "copy_squeeze" in l.kernel) for l in plan.launches)
    assert len(plan.launches) < len(base.launches)
    # the members are read at the slices' byte offsets of the batched result (Q, K, V: 32x64 each),
    # as views (the attention kernel reads them through its strides, from offset 0, 4096, 8192)
    def root(b):
        return (b.alias_of, b.alias_offset) if b.alias_of is not None else (b.id, 0)

    stacked = {root(b)[0] for b in qkv[0].args if getattr(b, "numel", 0) == 3 * 32 * 64}
    offs = {root(b)[1] for l in plan.launches if l is not qkv[0] for b in l.args
            if hasattr(b, "shape") and root(b)[0] in stacked}
    assert offs == {0, 32 * 64 * 2, 2 * 32 * 64 * 2}, offs


def test_qkv_plan_differing_biases_one_add_equal_biases_epilogue():
    """Distinct per-member biases ([3,1,1,N]) are the batched GEMM's C operand, read per batch
    (fuse-epilogue's broadcast residual: ldc_m 0, batch stride N); equal ones are the GEMM's
    epilogue bias. Either way no elementwise Add is left."""
    _, plan = _plan(qkv_model)
    assert not any(l.kernel and "_ew_add" in l.kernel for l in plan.launches)
    qkv = [l for l in plan.launches if l.kernel and "gemm" in l.kernel and l.grid[2] == 3]
    assert len(qkv) == 1 and any(tuple(getattr(a, "shape", ())) == (3, 1, 1, 64) for a in qkv[0].args)
    _, plan = _plan(lambda: qkv_model(equal_bias=True))
    _, base = _plan(lambda: qkv_model(equal_bias=True), drop=("fuse-horizontal",))
    assert not any(l.kernel and "_ew_" in l.kernel and "cast" not in l.kernel for l in plan.launches)
    qkv = [l for l in plan.launches if l.kernel and "gemm" in l.kernel and l.grid[2] == 3]
    assert len(qkv) == 1 and any(getattr(a, "numel", 0) == 64 and a.dtype.short == "f32" for a in qkv[0].args)
    assert len(plan.launches) == len(base.launches) - 2


def test_inception_plan_is_one_conv_and_channel_views():
    m, plan = _plan(inception_model)
    _, base = _plan(inception_model, drop=("fuse-horizontal",))
    convs = lambda p: [l for l in p.launches if l.kernel and ("conv" in l.kernel or "gemm" in l.kernel)]
    assert len(convs(plan)) == len(convs(base)) - 2
    assert not any(l.kernel and "copy_slice" in l.kernel for l in plan.launches)


@pytest.mark.gpu
@pytest.mark.parametrize("make", [qkv_model, inception_model])
def test_gpu_fused_matches_interpreter(make, tmp_path):
    """On the GPU (fp32 and fp16, arena poisoned): the batched GEMM / wide conv and its views give
    the interpreter's outputs of the original model."""
    import nnc
    from nnc.codegen.emit import compile_to_dir
    for prec, tol in (("fp32", 2e-3), ("fp16", 3e-2)):
        ref_m = import_model(make())
        m = import_model(make())
        Pipeline(pipeline_passes(prec, True)).run(m)
        assert fuse_horizontal.rewrite(import_model(make()))
        out = tmp_path / prec
        compile_to_dir(m, out, arch=None, precision=prec)
        g = nnc.load(out)
        for seed in range(2):
            feed = _feed(ref_m, seed)
            ref = Interpreter(ref_m).run(feed)
            got = g.run(feed, output="numpy", poison=True)
            for k, v in ref.items():
                np.testing.assert_allclose(np.asarray(got[k], np.float32), v, rtol=tol, atol=tol, err_msg=f"{prec}/{k}")
