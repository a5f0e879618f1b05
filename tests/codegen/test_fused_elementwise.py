"""fuse-elementwise (compiler/passes/fuse_elementwise.py) and its lowering
(codegen/kernels/fused_elementwise.py): the interpreter gives the same outputs before and after
the pass; each group is ONE elementwise.cu.j2 launch whose header names every op of the group;
the kernels compile with NVRTC; on a GPU the fused build matches the interpreter (poisoned
outputs, fresh random inputs, fp32 rel 1e-5, f16 1e-2)."""
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from nnc.codegen.kernels.fused_elementwise import broadcasts, can_render
from nnc.codegen.lower import lower
from nnc.ir.interp import Interpreter
from nnc.ir.verify import verify
from nnc.onnx_import import import_model
from nnc.passes import fuse_elementwise
from nnc.pipeline import run_passes

from .cuda_models import models, random_feed

ROOT = Path(__file__).resolve().parents[2]
CLEANUP = ["fold-constants", "canonicalize", "dce"]


def _mk(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                          [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs], list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def bias_gelu_model(dt=TensorProto.FLOAT):
    """A broadcast DAG with two outputs: y = gelu(x*s + b) * sigmoid(x), r = x*s + b; the scale s
    is [C,1,1], the bias b is [W], so both broadcast into [N,C,H,W]."""
    N = helper.make_node
    nodes = [N("Mul", ["x", "s"], ["xs"]), N("Add", ["xs", "b"], ["r"]),
             N("Mul", ["r", "k"], ["rk"]), N("Erf", ["rk"], ["e"]), N("Add", ["e", "one"], ["e1"]),
             N("Mul", ["r", "e1"], ["g2"]), N("Mul", ["g2", "half"], ["g"]),
             N("Sigmoid", ["x"], ["sg"]), N("Mul", ["g", "sg"], ["y"])]
    shape = [2, 4, 3, 5]
    inputs = [("x", dt, shape), ("s", dt, [4, 1, 1]), ("b", dt, [5])]
    npdt = np.float16 if dt == TensorProto.FLOAT16 else np.float32
    # make_tensor converts float values to the tensor's type itself (fp16 bit patterns given
    # here would be read as the numbers 14760, 15360, 14336 and overflow every output)
    inits = [helper.make_tensor(n, dt, [], [v]) for n, v in (("k", 0.7071067811865476), ("one", 1.0), ("half", 0.5))]
    spec = {"x": (shape, npdt, "normal"), "s": ([4, 1, 1], npdt, "normal"), "b": ([5], npdt, "normal")}
    return _mk(nodes, inputs, [("y", dt, shape), ("r", dt, shape)], inits), spec


def _cases():
    M = {k: v for k, v in models().items()}
    M["bias_gelu"] = bias_gelu_model()
    M["bias_gelu_f16"] = bias_gelu_model(TensorProto.FLOAT16)
    return M


def _fused(name):
    m, spec = _cases()[name]
    mod = import_model(m)
    run_passes(mod, CLEANUP)
    return mod, spec


def test_broadcasts_and_can_render():
    assert broadcasts((4, 1, 1), (2, 4, 3, 5)) and broadcasts((), (3,)) and broadcasts((5,), (2, 5))
    assert not broadcasts((2, 5), (5,)) and not broadcasts((3,), (2, 5))
    mod, _ = _fused("bias_gelu")
    assert all(can_render(op) for op in mod.main.ops if op.name != "const")


@pytest.mark.parametrize("name", sorted(_cases()))
def test_pass_keeps_interpreter_outputs(name, rng):
    mod, spec = _fused(name)
    feed = random_feed(spec, rng)
    before = Interpreter(mod).run(feed)
    fuse_elementwise.run(mod)
    verify(mod)
    after = Interpreter(mod).run(feed)
    assert list(before) == list(after)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_bias_gelu_is_one_kernel_with_every_op_in_its_header():
    mod, _ = _fused("bias_gelu")
    n_ops = sum(op.name != "const" for op in mod.main.ops)
    assert fuse_elementwise.run(mod)
    fused = [op for op in mod.main.ops if op.name == "fused"]
    assert len(fused) == 1 and fused[0].attrs.kind == "elementwise"
    assert [r.name for r in fused[0].results] == ["r", "y"]
    plan = lower(mod, {"arch": "sm_90"})
    assert len(plan.launches) == 1, [l.op for l in plan.launches]
    k = plan.kernels[plan.launches[0].kernel]
    assert k.template == "elementwise.cu.j2"
    src = k.source
    body_ops = [op for op in fused[0].attrs.body.ops if op.name != "const"]
    assert len(body_ops) == n_ops
    outer = {id(r): o for r, o in zip(fused[0].attrs.body.results, fused[0].results)}
    for op in body_ops:  # each op once, its result under the function's name where it has one
        shown = outer.get(id(op.results[0]), op.results[0]).name
        assert f"//   %{shown}: f32[2,4,3,5] = {op.name}(%" in src, op
    assert "%x: f32[2,4,3,5]" in src and "%x_" not in src  # operands under their own names
    assert "out1[idx]" in src or "(out1 + vi * " in src  # two outputs, one kernel (vectors: VEC)
    assert [(b.name, b.io_index) for b in plan.outputs] == [("y", 0), ("r", 1)]


def test_f16_group_computes_in_fp32():
    mod, _ = _fused("bias_gelu_f16")
    fuse_elementwise.run(mod)
    plan = lower(mod, {"arch": "sm_90"})
    k = plan.kernels[plan.launches[0].kernel]
    assert "const float t" in k.body and "const __half t" not in k.body
    assert "static_cast<__half>" in k.body  # the stores round to f16


def test_cast_inside_a_group_still_rounds():
    N = helper.make_node
    m = _mk([N("Relu", ["x"], ["a"]), N("Cast", ["a"], ["h"], to=TensorProto.FLOAT16),
             N("Cast", ["h"], ["y"], to=TensorProto.FLOAT)],
            [("x", TensorProto.FLOAT, [8])], [("y", TensorProto.FLOAT, [8])])
    mod = import_model(m)
    run_passes(mod, CLEANUP)
    fuse_elementwise.run(mod)
    plan = lower(mod, {"arch": "sm_90"})
    assert len(plan.launches) == 1
    assert "static_cast<float>(static_cast<__half>(" in plan.kernels[plan.launches[0].kernel].body


def test_non_renderable_body_falls_back_op_by_op():
    """A fused op of kind "elementwise" whose body the family cannot render (hand-written IR)
    still lowers, through codegen/kernels/fused.py."""
    from nnc.ir.parser import parse
    mod = parse("""func @main(%x: f32[4,8]) -> (f32[4,8]) {
  %y = fused(%x) {body = region(%x_: f32[4,8]) {
    %r = Relu(%x_) : f32[4,8]
    %s = Softmax(%r) {axis = 1} : f32[4,8]
    return %s
  }, kind = "elementwise"} : f32[4,8]
  return %y
}
""")
    verify(mod)
    plan = lower(mod, {"arch": "sm_90"})
    assert [plan.kernels[l.kernel].template for l in plan.launches] == ["elementwise.cu.j2", "rownorm_regs.cu.j2"]


def _launches(mod):
    return sum(1 for l in lower(mod, {"arch": "sm_90"}).launches if l.kind == "kernel")


@pytest.mark.parametrize("name", ["elementwise", "fp16", "bias_gelu"])
def test_pass_cuts_launches(name):
    mod, _ = _fused(name)
    before = _launches(mod)
    fuse_elementwise.run(mod)
    assert _launches(mod) < before


def test_fused_elementwise_compiles_with_nvrtc(tmp_path):
    from nnc.codegen.emit import compile_to_dir
    for name in ["elementwise", "fp16", "bias_gelu", "bias_gelu_f16", "select"]:
        mod, _ = _fused(name)
        fuse_elementwise.run(mod)
        plan = compile_to_dir(mod, tmp_path / name, arch="sm_90")
        assert plan["cubins"]


def test_default_pipeline_fuses_examples(tmp_path):
    from nnc.driver import compile_model
    plan = compile_model(str(ROOT / "examples" / "tiny_transformer.onnx"), tmp_path, arch="sm_90")
    assert "fuse-elementwise" in plan["passes"]
    assert any(k["template"] == "elementwise.cu.j2" and len(k["ops"]) > 2 for k in plan["kernels"])


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(_cases()))
def test_gpu_fused_elementwise_matches_interpreter(name, tmp_path, rng):
    import nnc
    from nnc.codegen.emit import compile_to_dir
    mod, spec = _fused(name)
    fuse_elementwise.run(mod)
    # f16/bf16 anywhere: the kernel keeps a group's intermediates in fp32 while the interpreter
    # rounds every op's result, so the fp16 tolerance applies even to an f32 output
    low_precision = any(r.type.dtype.short in ("f16", "bf16") for op in mod.main.walk() for r in op.results)
    compile_to_dir(mod, tmp_path, arch=None)
    g = nnc.load(tmp_path)
    for _ in range(2):  # fresh inputs each time; arena and outputs poisoned
        feed = random_feed(spec, rng)
        ref = Interpreter(mod).run(feed)
        got = g.run(feed, output="numpy", poison=True)
        for k, v in ref.items():
            tol = 1e-2 if low_precision else 1e-5
            a = np.asarray(got[k]).astype(np.float64)
            b = v.astype(np.float64)
            # where the interpreter's per-op f16 rounding overflows, the kernel's fp32
            # intermediates may not (bias_gelu_f16 on some draws): compare the finite elements
            fin = np.isfinite(b) if low_precision else np.ones(b.shape, bool)
            assert fin.mean() > 0.5, f"{name}/{k}: the reference is mostly non-finite"
            scale = max(1.0, float(np.max(np.abs(b[fin]), initial=0)))
            np.testing.assert_allclose(a[fin], b[fin], rtol=tol, atol=tol * scale, err_msg=f"{name}/{k}")


def _verify_per_layer(tmp_path, backend):
    import onnx
    from nnc.accuracy import verify_model
    m, _ = bias_gelu_model()
    p = tmp_path / "bias_gelu.onnx"
    onnx.save(m, str(p))
    return verify_model(str(p), per_layer=True, backend=backend)


INSIDE = ["xs", "rk", "e", "e1", "g2", "g", "sg"]


def test_verify_per_layer_reference_sees_inside_fused_groups(tmp_path):
    """The reference interpreter runs the body op by op: every node output is compared."""
    r = _verify_per_layer(tmp_path, "reference")
    assert r.passed and not r.not_compared
    assert sorted(c.name for c in r.layers) == sorted(["r", "y"] + INSIDE)
    assert [c.name for c in r.layers][-1] == "y"  # execution order: the body's ops, then the results


def test_verify_per_layer_cuda_maps_fused_groups_at_their_boundaries(tmp_path):
    import onnx
    from nnc.accuracy import prepare
    m, _ = bias_gelu_model()
    pre = prepare(m, per_layer=True, inside_fused=False)  # what the cuda backend compares
    assert sorted(t for t, (v, _) in pre.mapping.items() if v is not None) == ["r", "y"]
    assert {t: why for t, (v, why) in pre.mapping.items() if v is None} == {t: "inside a fused group" for t in INSIDE}
    assert all(any(v is r for r in pre.module.main.ops[-1].results) for v in pre.watch.values())
    del onnx


@pytest.mark.gpu
def test_gpu_verify_per_layer_on_a_fused_build(tmp_path):
    r = _verify_per_layer(tmp_path, "cuda")
    assert r.passed and sorted(c.name for c in r.layers) == ["r", "y"]
    assert {s.name: s.reason for s in r.not_compared} == {t: "inside a fused group" for t in INSIDE}
