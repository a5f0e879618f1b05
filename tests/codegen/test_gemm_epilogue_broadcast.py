"""A constant that broadcasts onto a GEMM's result another way than a per-column bias (fuse-horizontal's
per-member bias [G, 1, 1, N] of the batched Q/K/V GEMM, a per-row [M, 1]) is fuse-epilogue's
`residual`, read by the GEMM kernel as C with zero strides along its broadcast axes
(gemm_lowering.c_strides): one launch, no elementwise Add after it. And the epilogue chain goes
through views of the GEMM's output that keep its last axis (GPT-2: Gemm -> Reshape -> GELU, and
Gemm -> Reshape -> residual Add).

Checked here: c_strides against numpy broadcasting (every element's address); the plan (one GEMM
launch for the group, C bound, no elementwise kernel) and the launch's own buffers and stride
arguments read in numpy as the kernel reads them give the interpreter's result of the group; a
broadcast the kernel's two batch levels cannot express splits (GEMM + one elementwise kernel)
and still computes the same; the interpreter gives the same outputs before and after fusion;
NVRTC compiles the kernels; on a GPU (`needs GPU run`) the build matches the interpreter with
poisoned outputs."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnc.codegen.kernels import gemm_lowering
from nnc.codegen.kernels.gemm_lowering import c_strides
from nnc.codegen.lower import lower
from nnc.driver import pipeline_passes
from nnc.ir.builder import const_value
from nnc.ir.interp import Interpreter
from nnc.onnx_import import import_model
from nnc.pipeline import FUSION_PASSES, Pipeline

N = helper.make_node
F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
                          [helper.make_tensor_value_info(n, F, s) for n, s in outputs],
                          [numpy_helper.from_array(a.astype(np.float32), n) for n, a in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def qkv_model(B=2, S=32, K=64, Nc=64):
    """Three MatMuls of x with distinct weights and distinct per-column biases (BERT's Q/K/V):
    fuse-horizontal makes one batched MatMul [3, B, S, N] + Add(bias [3, 1, 1, N])."""
    rng = np.random.default_rng(7)
    inits, nodes = {}, []
    for i, n in enumerate("qkv"):
        inits[f"w{n}"] = rng.standard_normal((K, Nc)) / np.sqrt(K)
        inits[f"b{n}"] = rng.standard_normal(Nc) + i
        nodes += [N("MatMul", ["x", f"w{n}"], [f"{n}0"]), N("Add", [f"{n}0", f"b{n}"], [n])]
    return _model(nodes, [("x", [B, S, K])], [(n, [B, S, Nc]) for n in "qkv"], inits)


def row_bias_model(M=64, K=64, Nc=64):
    """MatMul -> Add(per-row constant [M, 1]) -> Relu."""
    rng = np.random.default_rng(8)
    inits = {"w": rng.standard_normal((K, Nc)) / np.sqrt(K), "r": rng.standard_normal((M, 1))}
    nodes = [N("MatMul", ["x", "w"], ["mm"]), N("Add", ["r", "mm"], ["a"]), N("Relu", ["a"], ["y"])]
    return _model(nodes, [("x", [M, K])], [("y", [M, Nc])], inits)


def unexpressible_model(M=32, K=64, Nc=64):
    """x [2, 3, M, K] @ W: the batch is one level of 6; a constant [2, 1, 1, N] varies along the
    outer axis only, which that level cannot step (the group splits)."""
    rng = np.random.default_rng(9)
    inits = {"w": rng.standard_normal((K, Nc)) / np.sqrt(K), "c": rng.standard_normal((2, 1, 1, Nc))}
    nodes = [N("MatMul", ["x", "w"], ["mm"]), N("Add", ["mm", "c"], ["y"])]
    return _model(nodes, [("x", [2, 3, M, K])], [("y", [2, 3, M, Nc])], inits)


def gpt2_mlp_model(S=64, K=64, Nh=128):
    """GPT-2's MLP as exported: Reshape [S, K] -> Gemm (addmm: C = bias) -> Reshape [1, S, N] ->
    GELU (tanh form written out) -> Reshape -> Gemm -> Reshape -> Add(residual x)."""
    rng = np.random.default_rng(10)
    inits = {"w1": rng.standard_normal((K, Nh)) / np.sqrt(K), "b1": rng.standard_normal(Nh),
             "w2": rng.standard_normal((Nh, K)) / np.sqrt(Nh), "b2": rng.standard_normal(K),
             "s2": np.array([S, K]), "s3a": np.array([1, S, Nh]), "s2b": np.array([S, Nh]), "s3": np.array([1, S, K]),
             "half": np.array(0.5), "three": np.array(3.0), "c": np.array(0.044715),
             "k": np.array(np.sqrt(2 / np.pi)), "one": np.array(1.0)}
    nodes = [N("Reshape", ["x", "s2"], ["h"]), N("Gemm", ["h", "w1", "b1"], ["g"]), N("Reshape", ["g", "s3a"], ["g3"]),
             N("Mul", ["g3", "half"], ["gh"]), N("Pow", ["g3", "three"], ["gp"]), N("Mul", ["gp", "c"], ["gc"]),
             N("Add", ["g3", "gc"], ["ga"]), N("Mul", ["ga", "k"], ["gk"]), N("Tanh", ["gk"], ["gt"]),
             N("Add", ["gt", "one"], ["g1"]), N("Mul", ["gh", "g1"], ["act"]),
             N("Reshape", ["act", "s2b"], ["a2"]), N("Gemm", ["a2", "w2", "b2"], ["p"]), N("Reshape", ["p", "s3"], ["p3"]),
             N("Add", ["p3", "x"], ["y"])]
    model = _model(nodes, [("x", [1, S, K])], [("y", [1, S, K])], inits)
    for t in model.graph.initializer:  # the shapes are int64
        if t.name.startswith("s"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.int64), t.name))
    return model


# name -> (model, precision, options, GEMM template)
CASES = {
    "qkv_f16": (qkv_model, "fp16", {}, "gemm_tc.cu.j2"),
    "qkv_f32_tf32": (qkv_model, "fp32", {"tf32": True}, "gemm_tc.cu.j2"),
    "qkv_f32_ffma": (qkv_model, "fp32", {"f32_min_ctas": 1}, "gemm_f32.cu.j2"),
    "row_bias_f16": (row_bias_model, "fp16", {}, "gemm_tc.cu.j2"),
}
MODELS = dict(CASES, gpt2_mlp_f16=(gpt2_mlp_model, "fp16", {}, "gemm_tc.cu.j2"),
              gpt2_mlp_f32_tf32=(gpt2_mlp_model, "fp32", {"tf32": True}, "gemm_tc.cu.j2"))


def _build(make, prec, passes=None):
    mod = import_model(make())
    Pipeline(pipeline_passes(prec) if passes is None else passes, verify_each=True).run(mod)
    return mod


def _lower(mod, prec, opts, monkeypatch):
    if "f32_min_ctas" in opts:
        monkeypatch.setattr(gemm_lowering, "F32_MIN_CTAS", opts["f32_min_ctas"])
    return lower(mod, {"arch": "sm_90", "precision": prec, "tf32": bool(opts.get("tf32"))})


def _gemm_launches(plan):
    return [l for l in plan.launches if l.kernel and plan.kernels[l.kernel].template.startswith("gemm_")]


# ---------------------------------------------------------------- c_strides against numpy
STRIDE_CASES = [
    # (C shape, y shape, M, N, batch)
    ((3, 1, 1, 8), (3, 2, 4, 8), 4, 8, (3, 2)),     # per-batch bias, two levels
    ((3, 1, 1, 8), (3, 1, 4, 8), 4, 8, (1, 3)),     # BERT's [3, 1, S, N]: one level
    ((8,), (3, 2, 4, 8), 4, 8, (3, 2)),
    ((4, 1), (4, 8), 4, 8, (1, 1)),                 # per row
    ((1, 2, 4, 1), (3, 2, 4, 8), 4, 8, (3, 2)),
    ((3, 2, 1, 8), (3, 2, 4, 8), 4, 8, (1, 6)),     # both batch axes real: one merged level
    ((3, 2, 4, 8), (3, 2, 4, 8), 4, 8, (1, 6)),     # y's own shape
    ((2, 3, 1, 1, 8), (2, 3, 5, 4, 8), 4, 8, (6, 5)),  # three batch axes, two levels
]


@pytest.mark.parametrize("cs,ys,M,Nc,batch", STRIDE_CASES)
def test_c_strides_address_every_element_like_numpy(cs, ys, M, Nc, batch):
    got = c_strides(cs, ys, M, Nc, batch)
    assert got is not None
    ldc_m, ldc_n, (s0, s1) = got
    want = np.broadcast_to(np.arange(int(np.prod(cs))).reshape(cs), ys).reshape(batch + (M, Nc))
    z0, z1, r, c = np.indices(want.shape)
    np.testing.assert_array_equal(z0 * s0 + z1 * s1 + r * ldc_m + c * ldc_n, want)


@pytest.mark.parametrize("cs,ys,M,Nc,batch", [
    ((2, 1, 1, 8), (2, 3, 4, 8), 4, 8, (1, 6)),     # broadcast and real axis in one level
    ((3, 8), (4, 8), 4, 8, (1, 1)),                 # does not broadcast
    ((2, 1, 4, 8), (4, 8), 4, 8, (1, 1)),           # higher rank than y
    ((8,), (8,), 1, 8, (1, 1)),                     # y not [.., M, N] (squeezed MatMul)
])
def test_c_strides_refuses_what_one_level_cannot_step(cs, ys, M, Nc, batch):
    assert c_strides(cs, ys, M, Nc, batch) is None


# ---------------------------------------------------------------- the pass and the plan
def _group_ops(mod):
    return [op for op in mod.main.ops if op.name == "fused" and op.attrs.kind == "gemm_epilogue"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_interpreter_same_before_and_after(name, rng):
    make, prec, _, _ = CASES[name]
    before = _build(make, prec, [p for p in pipeline_passes(prec) if p not in FUSION_PASSES])
    after = _build(make, prec)
    (g,) = _group_ops(after)
    assert "residual" in g.attrs.params.split()
    feed = {a.name: rng.standard_normal(a.type.shape).astype(np.float32) for a in before.main.args}
    want, got = Interpreter(before).run(feed), Interpreter(after).run(feed)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k])


def _root_value(plan, buf, values, weights):
    root = plan.root(buf)
    off = buf.alias_offset // buf.dtype.np.itemsize if buf.alias_of is not None else 0
    if root.data is not None:  # a weight the lowering made (the summed epilogue bias)
        arr = root.data
    elif id(root.value) in values:
        arr = values[id(root.value)]
    else:
        arr = const_value(root.value, weights)
    assert arr is not None, f"no value for buffer {root.name}"
    return np.asarray(arr, np.float64).reshape(-1), off, root


def _act(x, params: str):
    if "relu" in params.split():
        return np.maximum(x, 0.0)
    if "gelu_tanh" in params.split():
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    return x


def _emulate(plan, launch, values, weights, params=""):
    """gemm_tc / gemm_f32 arithmetic in numpy (float64), addressing A, B, C and D exactly as the
    launch's arguments say (batch z = z0 * bdiv + z1; C[row * ldc_m + col * ldc_n] after the batch
    offsets; the per-column bias; the group's activation); returns D's root as the kernel leaves
    it (NaN where it writes nothing)."""
    bufs = [a for a in launch.args if hasattr(a, "shape")]
    s = [a.value for a in launch.args if not hasattr(a, "shape")]
    M, Nc, K, lda, ldb, ldd, ldc_m, ldc_n, alpha, beta, bdiv, sA0, sA1, sB0, sB1, sC0, sC1, sD0, sD1 = s
    bias = [x for x in bufs[3:] if x.name.endswith(".epilogue_bias")]
    cbuf = [x for x in bufs[3:] if x not in bias]
    assert len(bufs) == 3 + len(bias) + len(cbuf) and len(bias) <= 1 and len(cbuf) <= 1
    (a, ao, _), (b, bo, _) = (_root_value(plan, x, values, weights) for x in bufs[:2])
    c, co, _ = _root_value(plan, cbuf[0], values, weights) if cbuf else (np.zeros(1), 0, None)
    bv = _root_value(plan, bias[0], values, weights)[0] if bias else np.zeros(Nc)
    if not cbuf:
        ldc_m = ldc_n = sC0 = sC1 = 0
    droot = plan.root(bufs[2])
    do = bufs[2].alias_offset // bufs[2].dtype.np.itemsize if bufs[2].alias_of is not None else 0
    out = np.full(droot.numel, np.nan)
    B0 = launch.grid[2] // bdiv
    r, k, n = np.arange(M)[:, None], np.arange(K), np.arange(Nc)[None, :]
    for z0 in range(B0):
        for z1 in range(bdiv):
            A = a[ao + z0 * sA0 + z1 * sA1 + np.arange(M)[:, None] * lda + k[None, :]]
            Bm = b[bo + z0 * sB0 + z1 * sB1 + k[:, None] * ldb + n]
            C = c[co + z0 * sC0 + z1 * sC1 + r * ldc_m + n * ldc_n]
            out[do + z0 * sD0 + z1 * sD1 + r * ldd + n] = _act(alpha * (A @ Bm) + beta * C + bv[n], params)
    return droot, out


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_launch_and_its_c_reads_give_the_group(name, rng, monkeypatch):
    make, prec, opts, template = CASES[name]
    mod = _build(make, prec)
    (group,) = _group_ops(mod)
    plan = _lower(mod, prec, opts, monkeypatch)
    gemms = _gemm_launches(plan)
    assert len(gemms) == 1, [l.kernel for l in plan.launches]
    (launch,) = gemms
    assert plan.kernels[launch.kernel].template == template
    # nothing else runs but the casts at the fp16 model's edges (fp32: the copies of the member
    # views into the model's own output buffers)
    rest = [l for l in plan.launches if l is not launch]
    assert all("= Cast(" in l.op or l.kind == "memcpy" for l in rest), [(l.kind, l.op) for l in rest]
    # the constant is C, read broadcast: a zero stride somewhere
    c = [a for a in launch.args if hasattr(a, "shape")][3]
    assert plan.root(c).kind in ("weight", "const") and c.numel < group.results[0].type.numel
    # the launch's own addressing reproduces the group's result
    values = {}
    feed = {a.name: rng.standard_normal(a.type.shape).astype(np.float32) for a in mod.main.args}
    Interpreter(mod, observe=lambda op, outs: values.update({id(r): o for r, o in zip(op.results, outs)})).run(feed)
    values.update({id(a): np.asarray(feed[a.name]) for a in mod.main.args})
    droot, out = _emulate(plan, launch, values, mod.weights, group.attrs.params)
    assert droot.value is group.results[0]
    want = np.asarray(values[id(group.results[0])], np.float64).reshape(-1)
    assert not np.isnan(out).any(), "the launch leaves part of the result unwritten"
    tol = 1e-2 if prec == "fp16" else 1e-5
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


def test_qkv_bias_strides_are_per_batch():
    """The Q/K/V group: C is the stacked bias [3, 1, 1, N], rows broadcast (ldc_m 0), one step of
    N per member, nothing per batch of x."""
    B, S, K, Nc = 2, 32, 64, 64
    mod = _build(lambda: qkv_model(B, S, K, Nc), "fp16")
    (launch,) = _gemm_launches(lower(mod, {"arch": "sm_90", "precision": "fp16"}))
    s = [a.value for a in launch.args if not hasattr(a, "shape")]
    c = [a for a in launch.args if hasattr(a, "shape")][3]
    assert tuple(c.shape) == (3, 1, 1, Nc)
    ldc_m, ldc_n, bdiv, (sC0, sC1) = s[6], s[7], s[10], s[15:17]
    assert (ldc_m, ldc_n, bdiv, sC0, sC1) == (0, 1, B, Nc, 0)
    assert launch.grid[2] == 3 * B


@pytest.mark.parametrize("prec,opts", [("fp16", {}), ("fp32", {"tf32": True})])
def test_gpt2_mlp_epilogues_go_through_the_reshapes(prec, opts, rng, monkeypatch):
    """Gemm -> Reshape -> GELU and (fp16) Gemm -> Reshape -> residual Add: two GEMM launches and
    nothing else (the casts at the fp16 model's edges); each launch, read in numpy, gives its
    group. At f32 the residual Add after a view stays outside (fuse-epilogue's VIEW_RESIDUAL):
    one elementwise Add."""
    mod = _build(gpt2_mlp_model, prec)
    groups = _group_ops(mod)
    want = [["Gemm", "Reshape", "Gelu"]]
    if prec == "fp16":  # the fp16 model's output cast is the GEMM's out dtype
        want.append(["Gemm", "Reshape", "Add", "Cast"])
    assert [[o.name for o in g.attrs.body.ops] for g in groups] == want
    # (the Gemms' own C, a per-column constant, is the kernel's bias without a chain step)
    assert [g.attrs.params for g in groups] == ["gelu_tanh", "residual cast=f32"][:len(want)]
    plan = _lower(mod, prec, opts, monkeypatch)
    gemms = _gemm_launches(plan)
    assert len(gemms) == 2
    rest = [l.op for l in plan.launches if l not in gemms]
    if prec == "fp16":
        assert all("= Cast(" in op for op in rest), rest
    else:
        assert len(rest) == 1 and "= Add(" in rest[0], rest
    values = {}
    feed = {"x": rng.standard_normal((1, 64, 64)).astype(np.float32)}
    Interpreter(mod, observe=lambda op, outs: values.update({id(r): o for r, o in zip(op.results, outs)})).run(feed)
    values.update({id(a): np.asarray(feed[a.name]) for a in mod.main.args})
    tol = 1e-2 if prec == "fp16" else 3e-3
    for g, launch in zip(groups, gemms):  # (fp32: the second GEMM is not a group, zip stops)
        droot, out = _emulate(plan, launch, values, mod.weights, g.attrs.params)
        assert droot.value is g.results[0]
        want = np.asarray(values[id(g.results[0])], np.float64).reshape(-1)
        np.testing.assert_allclose(out, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))
    # and the interpreter agrees with the unfused pipeline
    before = _build(gpt2_mlp_model, prec, [p for p in pipeline_passes(prec) if p not in FUSION_PASSES])
    got, want = Interpreter(mod).run(feed)["y"], Interpreter(before).run(feed)["y"]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max())))


def test_residual_added_before_a_view_is_read_as_that_shape(rng, monkeypatch):
    """MatMul [2, 32, 64] -> Add(r [2, 32, 64]) -> Reshape [64, 64] -> Relu: the residual is of the
    shape it was added onto, not the output's (Epilogue.residual_onto); one GEMM launch."""
    from nnc.ir.parser import parse
    w = ", ".join(repr(float(v)) for v in (np.round(rng.uniform(-1, 1, 64 * 64) * 8) / 8))
    mod = parse(f"""func @main(%x: f32[2,32,64], %r: f32[2,32,64]) -> (f32[64,64]) {{
  %w = const() {{value = dense<[{w}]> : f32[64,64]}} : f32[64,64]
  %s = const() {{value = dense<[64, 64]> : i64[2]}} : i64[2]
  %m = MatMul(%x, %w) : f32[2,32,64]
  %a = Add(%m, %r) : f32[2,32,64]
  %v = Reshape(%a, %s) : f32[64,64]
  %y = Relu(%v) : f32[64,64]
  return %y
}}
""")
    Pipeline(["fuse-epilogue"], verify_each=True).run(mod)
    (group,) = _group_ops(mod)
    assert group.attrs.params == "residual relu"
    plan = _lower(mod, "fp32", {"tf32": True}, monkeypatch)
    assert [plan.kernels[l.kernel].template for l in plan.launches if l.kernel] == ["gemm_tc.cu.j2"]
    values = {}
    feed = {a.name: rng.standard_normal(a.type.shape).astype(np.float32) for a in mod.main.args}
    ref = Interpreter(mod, observe=lambda op, outs: values.update({id(r): o for r, o in zip(op.results, outs)})).run(feed)
    values.update({id(a): np.asarray(feed[a.name]) for a in mod.main.args})
    _, out = _emulate(plan, _gemm_launches(plan)[0], values, mod.weights, group.attrs.params)
    np.testing.assert_allclose(out, ref["y"].reshape(-1), rtol=1e-5, atol=1e-5)


def test_views_that_move_the_last_axis_or_trail_stay_out():
    """A Reshape that changes the last axis ends the chain (its bias / activation would not be per
    column of the GEMM); a view with nothing fusible after it is not taken."""
    rng = np.random.default_rng(4)
    model = _model([N("MatMul", ["x", "w"], ["mm"]), N("Reshape", ["mm", "s"], ["r"]), N("Relu", ["r"], ["y"]),
                    N("MatMul", ["x", "w"], ["m2"]), N("Reshape", ["m2", "s2"], ["z"])],
                   [("x", [32, 64])], [("y", [32, 32, 2]), ("z", [1, 32, 64])],
                   {"w": rng.standard_normal((64, 64)), "s": np.array([32, 32, 2]), "s2": np.array([1, 32, 64])})
    for t in model.graph.initializer:
        if t.name.startswith("s"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.int64), t.name))
    mod = _build(lambda: model, "fp32")
    assert not _group_ops(mod)


def test_unexpressible_broadcast_splits_and_computes_the_same(rng, monkeypatch):
    """[2, 1, 1, N] over a batch run as one level of 6: the group splits (GEMM, then one
    elementwise kernel), as it lowered before the pass took such constants."""
    mod = _build(unexpressible_model, "fp32")
    (group,) = _group_ops(mod)
    assert group.attrs.params == "residual"
    plan = _lower(mod, "fp32", {"tf32": True}, monkeypatch)
    templates = [plan.kernels[l.kernel].template for l in plan.launches if l.kernel]
    assert templates == ["gemm_tc.cu.j2", "elementwise.cu.j2"], templates
    before = _build(unexpressible_model, "fp32", [p for p in pipeline_passes("fp32") if p not in FUSION_PASSES])
    feed = {"x": rng.standard_normal((2, 3, 32, 64)).astype(np.float32)}
    np.testing.assert_array_equal(Interpreter(before).run(feed)["y"], Interpreter(mod).run(feed)["y"])


def test_broadcast_tensor_that_is_not_constant_stays_out():
    """Only constants: a broadcast activation (a mask, say) keeps going to the later fusions."""
    rng = np.random.default_rng(3)
    model = _model([N("MatMul", ["x", "w"], ["mm"]), N("Add", ["mm", "m"], ["y"])],
                   [("x", [32, 64]), ("m", [1, 64])], [("y", [32, 64])], {"w": rng.standard_normal((64, 64))})
    mod = _build(lambda: model, "fp16")
    assert not _group_ops(mod)


def test_kernels_compile_with_nvrtc(tmp_path, monkeypatch):
    from nnc.codegen.emit import compile_to_dir
    monkeypatch.setattr(gemm_lowering, "F32_MIN_CTAS", 1)
    for name, (make, prec, opts, _) in sorted(MODELS.items()):
        plan = compile_to_dir(_build(make, prec), tmp_path / name, arch="sm_90", precision=prec,
                              tf32=bool(opts.get("tf32")))
        assert plan["cubins"]


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(MODELS) + ["unexpressible"])
def test_gpu_build_matches_interpreter(name, tmp_path, rng, monkeypatch):
    import nnc
    from nnc.codegen.emit import compile_to_dir
    make, prec, opts, _ = MODELS.get(name, (unexpressible_model, "fp32", {"tf32": True}, None))
    mod = _build(make, prec)
    if "f32_min_ctas" in opts:
        monkeypatch.setattr(gemm_lowering, "F32_MIN_CTAS", opts["f32_min_ctas"])
    compile_to_dir(mod, tmp_path, arch=None, precision=prec, tf32=bool(opts.get("tf32")))
    g = nnc.load(tmp_path)
    tol = 1e-2 if prec == "fp16" else (3e-3 if opts.get("tf32") else 1e-4)
    for _ in range(2):  # fresh inputs each time; arena and outputs poisoned
        feed = {a.name: rng.standard_normal(a.type.shape).astype(np.float32) for a in mod.main.args}
        ref = Interpreter(mod).run(feed)
        got = g.run(feed, output="numpy", poison=True)
        for k, v in ref.items():
            a, b = np.asarray(got[k]).astype(np.float64), v.astype(np.float64)
            assert np.isfinite(a).all(), f"{name}/{k}: non-finite output"
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())), err_msg=f"{name}/{k}")
