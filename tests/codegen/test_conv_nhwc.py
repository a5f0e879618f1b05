"""NHWC convolutions and pools (compiler/passes/assign_layout.py + codegen/kernels/conv_lowering.py,
conv.py, pool.py): ResNet- and MobileNet-style models at fp16 keep their activations NHWC between
convs (no layout kernels, transposes only at the model's edges), the interpreter gives the same
answers with and without the pass, the plan runs exactly in its arena (codegen/plan_exec.py),
NVRTC compiles every kernel for sm_90, and on a GPU the build matches the interpreter (poisoned
outputs, fresh random inputs; fp16 rel 1e-2, bf16 4e-2). fp32 convs stay NCHW (the pass picks f16/bf16)."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnc.codegen.lower import lower
from nnc.codegen.plan_exec import PlanExecutor
from nnc.driver import pipeline_passes
from nnc.ir import parse, verify
from nnc.ir.errors import NncError
from nnc.ir.interp import Interpreter
from nnc.ir.layout import perm_of
from nnc.onnx_import import import_model
from nnc.pipeline import Pipeline

N = helper.make_node
F = TensorProto.FLOAT


def _w(rng, *shape):
    fan_in = int(np.prod(shape[1:]))
    return rng.standard_normal(shape) / np.sqrt(fan_in)


def _model(nodes, x_shape, y_shape, inits):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, x_shape)],
                          [helper.make_tensor_value_info("y", F, y_shape)],
                          [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def resnet_style():
    """Stem 7x7/2 on 3 channels (unaligned: element gathers), MaxPool, one bottleneck with a strided
    1x1 downsample, residual add, GlobalAveragePool, Flatten, Gemm."""
    rng = np.random.default_rng(0)
    inits = {"ws": _w(rng, 16, 3, 7, 7), "bs": rng.standard_normal(16) * 0.1,
             "w1": _w(rng, 16, 16, 1, 1), "w2": _w(rng, 16, 16, 3, 3), "b2": rng.standard_normal(16) * 0.1,
             "w3": _w(rng, 32, 16, 1, 1), "wd": _w(rng, 32, 16, 1, 1), "wf": _w(rng, 10, 32), "bf": rng.standard_normal(10)}
    nodes = [N("Conv", ["x", "ws", "bs"], ["s"], pads=[3] * 4, strides=[2, 2]), N("Relu", ["s"], ["sr"]),
             N("MaxPool", ["sr"], ["p"], kernel_shape=[3, 3], pads=[1] * 4, strides=[2, 2]),
             N("Conv", ["p", "w1"], ["c1"]), N("Relu", ["c1"], ["r1"]),
             N("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1] * 4, strides=[2, 2]), N("Relu", ["c2"], ["r2"]),
             N("Conv", ["r2", "w3"], ["c3"]),
             N("Conv", ["p", "wd"], ["d"], strides=[2, 2]),
             N("Add", ["c3", "d"], ["a"]), N("Relu", ["a"], ["r3"]),
             N("GlobalAveragePool", ["r3"], ["g"]), N("Flatten", ["g"], ["f"]),
             N("Gemm", ["f", "wf", "bf"], ["y"], transB=1)]
    return _model(nodes, [2, 3, 32, 32], [2, 10], inits)


def mobilenet_style():
    """3x3/2 conv + Relu6, a depthwise 3x3 (multiplier 1) and a depthwise 3x3/2 with multiplier 2,
    pointwise convs, AveragePool, GlobalAveragePool, Flatten (the classifier edge: a view)."""
    rng = np.random.default_rng(1)
    inits = {"w0": _w(rng, 16, 3, 3, 3), "wd": _w(rng, 16, 1, 3, 3), "bd": rng.standard_normal(16) * 0.1,
             "wp": _w(rng, 24, 16, 1, 1), "wm": _w(rng, 48, 1, 3, 3), "wq": _w(rng, 8, 48, 1, 1),
             "lo": np.array(0.0), "hi": np.array(6.0)}
    nodes = [N("Conv", ["x", "w0"], ["c0"], pads=[1] * 4, strides=[2, 2]), N("Clip", ["c0", "lo", "hi"], ["r0"]),
             N("Conv", ["r0", "wd", "bd"], ["d1"], pads=[1] * 4, group=16), N("Clip", ["d1", "lo", "hi"], ["r1"]),
             N("Conv", ["r1", "wp"], ["p1"]),
             N("Conv", ["p1", "wm"], ["d2"], pads=[1] * 4, strides=[2, 2], group=24), N("Relu", ["d2"], ["r2"]),
             N("Conv", ["r2", "wq"], ["p2"]),
             N("AveragePool", ["p2"], ["ap"], kernel_shape=[2, 2], strides=[2, 2]),
             N("GlobalAveragePool", ["ap"], ["g"]), N("Flatten", ["g"], ["y"])]
    return _model(nodes, [1, 3, 16, 16], [1, 8], inits)


MODELS = {"resnet_style": resnet_style, "mobilenet_style": mobilenet_style}


def _build(name, layout=True, precision="fp16"):
    m = import_model(MODELS[name]())
    passes = [p for p in pipeline_passes(precision) if layout or p != "assign-layout"]
    Pipeline(passes, verify_each=True).run(m)
    return m


def _lower(m, precision="fp16"):
    return lower(m, {"arch": "sm_90", "precision": precision})


def _feed(m, rng):
    return {a.name: rng.standard_normal(a.type.shape).astype(np.float32) for a in m.main.args}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_activations_stay_nhwc(name):
    m = _build(name)
    convs = [op for op in m.main.walk() if op.name == "Conv"]
    assert convs and all(op.attrs.layout == "NHWC" for op in convs)
    # one transpose, at the edge after the input (its Cast); the classifier edge is a view
    tr = [op for op in m.main.walk() if op.name == "Transpose"]
    assert len(tr) == 1, [str(op.results[0].type) for op in tr]
    plan = _lower(m)
    names = [plan.kernels[l.kernel].name for l in plan.launches if l.kernel]
    assert not any(n.startswith("nnc_layout") for n in names), names
    assert sum(n.startswith("nnc_copy_transpose") for n in names) == len(tr)
    base = _lower(_build(name, layout=False))
    if name == "resnet_style":  # the stem's layout kernel and the 3x3's are gone
        assert len(plan.launches) < len(base.launches), (len(plan.launches), len(base.launches))
        assert any(n.startswith("nnc_maxpool_nhwc") for n in names)
    else:  # the stem's layout kernel became the entry transpose
        assert len(plan.launches) == len(base.launches), (len(plan.launches), len(base.launches))
        assert sum(n.startswith("nnc_conv_dw_nhwc") for n in names) == 2


@pytest.mark.parametrize("name", sorted(MODELS))
def test_interpreter_same_with_and_without_the_pass(name, rng):
    before, after = _build(name, layout=False), _build(name)
    for _ in range(2):
        feed = _feed(before, rng)
        want, got = Interpreter(before).run(feed), Interpreter(after).run(feed)
        for k in want:
            b = want[k].astype(np.float64)
            # the convs are bit-exact; GlobalAveragePool -> ReduceMean sums in another order
            np.testing.assert_allclose(got[k].astype(np.float64), b, rtol=2e-3, atol=2e-3 * float(np.abs(b).max()))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_relayout_marks_say_how_values_relate(name, rng):
    """Each value the pass tags #nhwc (ir.layout.perm_of, read by nnc verify --per-layer) holds the tensor
    its op's node computes without the pass, transposed by the mark: checked on the interpreter's
    values, matched by (node, op name, result index), bodies of fused groups included (the
    Outliner's copies keep the mark). Unmarked results of those nodes keep the NCHW shape."""
    before, after = _build(name, layout=False), _build(name)
    feed = _feed(before, rng)

    def values(m):
        seen = {}

        def observe(op, outs):
            for i, (r, o) in enumerate(zip(op.results, outs)):
                if op.name != "fused" and op.loc.node:
                    seen.setdefault((op.loc.node, op.name, i), []).append((r, o))
        Interpreter(m, observe=observe).run(feed)
        return seen

    want, got = values(before), values(after)
    marked = 0
    for key, rs in got.items():
        for r, o in rs:
            if not perm_of(r) or key not in want or len(want[key]) != 1:
                continue
            assert perm_of(r) == (0, 2, 3, 1)
            b = want[key][0][1].astype(np.float64)
            np.testing.assert_allclose(np.transpose(o, (0, 3, 1, 2)).astype(np.float64), b,
                                       rtol=2e-3, atol=2e-3 * float(np.abs(b).max()) + 1e-6)
            marked += 1
    assert marked >= 4
    assert all(not perm_of(r) for op in before.main.walk() for r in op.results)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_plan_runs_exactly_in_its_arena(name, precision, rng):
    m = _build(name, precision=precision)
    assert all(op.attrs.layout == "NHWC" for op in m.main.walk() if op.name == "Conv")
    ex = PlanExecutor.from_plan(_lower(m, precision), m)
    for _ in range(2):
        feed = _feed(m, rng)
        ref, got = Interpreter(m).run(feed), ex.run(feed)
        for k in ref:
            assert got[k].dtype == ref[k].dtype and np.array_equal(got[k], ref[k]), k


def test_kernels_compile_with_nvrtc(tmp_path):
    from nnc.codegen.emit import compile_to_dir
    for name in sorted(MODELS):
        for precision in ("fp16", "bf16"):
            plan = compile_to_dir(_build(name, precision=precision), tmp_path / f"{name}_{precision}", arch="sm_90",
                                  precision=precision)
            assert plan["cubins"]


def test_nhwc_ops_reference_is_the_nchw_op_transposed(rng):
    w = np.round(rng.standard_normal((3, 6, 3, 3)), 3)
    wo = np.ascontiguousarray(w.transpose(0, 2, 3, 1))

    def text(layout, x, c, p, wt, ws):
        lay = f', layout = "{layout}"' if layout else ""
        return f"""func @main(%x: f32{x}) -> (f32{c}, f32{p}, f32{p}) {{
  %w = const() {{value = dense<[{", ".join(map(str, wt.reshape(-1)))}]> : f32{ws}}} : f32{ws}
  %c = Conv(%x, %w) {{pads = [1, 0, 1, 1], strides = [2, 2]{lay}}} : f32{c}
  %p = MaxPool(%x) {{kernel_shape = [2, 3], strides = [2, 1], pads = [0, 0, 1, 0]{lay}}} : f32{p}
  %a = AveragePool(%x) {{kernel_shape = [2, 3], strides = [2, 1], pads = [0, 0, 1, 0]{lay}}} : f32{p}
  return %c, %p, %a
}}
"""
    m = parse(text("", "[2,6,7,5]", "[2,3,4,2]", "[2,6,4,3]", w, "[3,6,3,3]"))
    mn = parse(text("NHWC", "[2,7,5,6]", "[2,4,2,3]", "[2,4,3,6]", wo, "[3,3,3,6]"))
    verify(m)
    verify(mn)
    x = rng.standard_normal((2, 6, 7, 5)).astype(np.float32)
    want = list(Interpreter(m).run({"x": x}).values())
    got = list(Interpreter(mn).run({"x": np.ascontiguousarray(x.transpose(0, 2, 3, 1))}).values())
    for g, r in zip(got, want):
        np.testing.assert_array_equal(g, r.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("bad, msg", [
    ('Conv(%x, %w) {layout = "NCWH"} : f32[1,3,3,2]', "layout 'NCWH' must be one of NCHW, NHWC"),
    ('MaxPool(%x) {kernel_shape = [2, 2], layout = "nhwc"} : f32[1,3,3,2]', "must be one of"),
])
def test_bad_layout_is_a_clear_error(bad, msg):
    text = f"""func @main(%x: f32[1,4,4,2]) -> (f32[1,3,3,2]) {{
  %w = const() {{value = dense<[1.0, 2.0, 3.0, 4.0]> : f32[2,1,1,2]}} : f32[2,1,1,2]
  %y = {bad}
  return %y
}}
"""
    with pytest.raises(NncError, match=msg):
        verify(parse(text))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_gpu_nhwc_build_matches_interpreter(name, precision, tmp_path, rng):
    import nnc
    from nnc.codegen.emit import compile_to_dir
    m = _build(name, precision=precision)
    compile_to_dir(m, tmp_path, arch=None, precision=precision)
    g = nnc.load(tmp_path)
    tol = 1e-2 if precision == "fp16" else 4e-2  # bf16: 8 mantissa bits
    for _ in range(2):  # fresh inputs each time; arena and outputs poisoned
        feed = _feed(m, rng)
        ref = Interpreter(m).run(feed)
        got = g.run(feed, output="numpy", poison=True)
        for k, v in ref.items():
            a, b = np.asarray(got[k]).astype(np.float64), v.astype(np.float64)
            scale = max(1.0, float(np.abs(b).max()))
            assert np.isfinite(a).all(), f"{name}/{k}: non-finite output"
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=f"{name}/{k}")
