"""fuse-cross-layer (compiler/passes/fuse_cross_layer.py): a depthwise 3x3 conv group and the 1x1 conv
group reading it become one `fused {kind = "dw_pw"}` op whose params record the tile.

- golden IR (text in -> text out): the two conv_epilogue groups of an NHWC dw -> pw pair become
  one group whose body is their ops in order, with the tile in params;
- the interpreter gives bit-identical outputs with and without the pass (the body is the same ops),
  on MobileNetV2-style inverted residual blocks built as ONNX (stride 1 and 2, with and without
  the residual add), at fp16 and bf16;
- what must not group: fp32 (convs stay NCHW), a depthwise result read twice, shapes outside the
  measured `pays` bound (the other tests lift the bound to exercise the mechanism on small shapes);
- lowering (CPU): one `conv_dw_pw` kernel per pair ("dw_pw.tiled"), the tile in the kernel's
  params and header; channels that are not a multiple of 8 fall back to two kernels
  ("dw_pw.split"); the plan runs in its arena (codegen/plan_exec.py) exactly as the interpreter.
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnc.codegen.lower import lower
from nnc.codegen.plan_exec import PlanExecutor
from nnc.driver import pipeline_passes
from nnc.ir import parse, print_module, verify
from nnc.ir.interp import Interpreter
from nnc.ir.weights import WeightStore
from nnc.onnx_import import import_model
from nnc.passes import fuse_cross_layer as xl
from nnc.pipeline import Pipeline

N = helper.make_node
F = TensorProto.FLOAT


@pytest.fixture(autouse=True)
def every_pair_pays(request, monkeypatch):
    """The mechanism tests group every eligible pair (small shapes the measured `pays` bound leaves
    out); test_pays_bound checks the bound itself."""
    if request.node.name != "test_pays_bound":
        monkeypatch.setattr(xl, "pays", lambda s: True)


def inverted_residual(n=1, cin=8, hw=9, expand=2, k=None, stride=1, residual=None, seed=0, dw_users=1):
    """A stem 3x3 conv (3 -> cin channels; as in MobileNetV2 it makes assign-layout's NHWC pay),
    then expand 1x1 + bias + Clip(0,6) -> dw 3x3/stride + bias + Clip -> project 1x1 + bias (+ x),
    GlobalAveragePool, Flatten."""
    rng = np.random.default_rng(seed)
    c = cin * expand
    k = cin if k is None else k
    residual = (stride == 1 and k == cin) if residual is None else residual
    w = lambda *s: rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))  # noqa: E731
    inits = {"ws": w(cin, 3, 3, 3), "we": w(c, cin, 1, 1), "be": rng.standard_normal(c) * 0.1, "wd": w(c, 1, 3, 3),
             "bd": rng.standard_normal(c) * 0.1, "wp": w(k, c, 1, 1), "bp": rng.standard_normal(k) * 0.1,
             "lo": np.array(0.0), "hi": np.array(6.0)}
    nodes = [N("Conv", ["x0", "ws"], ["s"], pads=[1] * 4), N("Clip", ["s", "lo", "hi"], ["x"]),
             N("Conv", ["x", "we", "be"], ["e"]), N("Clip", ["e", "lo", "hi"], ["er"]),
             N("Conv", ["er", "wd", "bd"], ["d"], pads=[1] * 4, strides=[stride] * 2, group=c),
             N("Clip", ["d", "lo", "hi"], ["dr"]),
             N("Conv", ["dr", "wp", "bp"], ["p"])]
    out = "p"
    if residual:
        nodes.append(N("Add", ["p", "x"], ["y"]))
        out = "y"
    # the classifier edge (GAP -> Flatten: a view in either layout), so NHWC needs no transpose out
    nodes += [N("GlobalAveragePool", [out], ["g"]), N("Flatten", ["g"], ["f"])]
    outs = ["f"]
    if dw_users == 2:
        nodes.append(N("Relu", ["dr"], ["side"]))
        outs.append("side")
    ho = (hw - 1) // stride + 1
    shapes = {"f": [n, k], "side": [n, c, ho, ho]}
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x0", F, [n, 3, hw, hw])],
                          [helper.make_tensor_value_info(o, F, shapes[o]) for o in outs],
                          [numpy_helper.from_array(np.asarray(a, np.float32), nm) for nm, a in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def build(model, precision="fp16", cross=True):
    m = import_model(model)
    passes = [p for p in pipeline_passes(precision) if cross or p != "fuse-cross-layer"]
    Pipeline(passes, verify_each=True).run(m)
    return m


def dw_pw_ops(m):
    return [op for op in m.main.ops if op.name == "fused" and op.attrs.kind == xl.KIND]


def feed(m, rng):
    return {a.name: rng.standard_normal(a.type.shape).astype(np.float32) for a in m.main.args}


# ---------------------------------------------------------------- golden IR

def _dense(a) -> str:
    return "[" + ", ".join(f"{float(x):.2f}" for x in np.asarray(a).reshape(-1)) + "]"


def _golden_input(rng, c=8, k=8):
    wd, bd = rng.standard_normal((c, 3, 3, 1)) * 0.3, rng.standard_normal(c) * 0.1
    wp, bp = rng.standard_normal((k, 1, 1, c)) * 0.3, rng.standard_normal(k) * 0.1
    return f"""func @main(%x: f16[1,5,5,{c}], %r: f16[1,3,3,{k}]) -> (f16[1,3,3,{k}]) {{
  %wd = const() {{value = dense<{_dense(wd)}> : f16[{c},3,3,1]}} : f16[{c},3,3,1]
  %bd = const() {{value = dense<{_dense(bd)}> : f16[{c}]}} : f16[{c}]
  %wp = const() {{value = dense<{_dense(wp)}> : f16[{k},1,1,{c}]}} : f16[{k},1,1,{c}]
  %bp = const() {{value = dense<{_dense(bp)}> : f16[{k}]}} : f16[{k}]
  %lo = const() {{value = dense<[0.0]> : f16[]}} : f16[]
  %hi = const() {{value = dense<[6.0]> : f16[]}} : f16[]
  %d = Conv(%x, %wd, %bd) {{group = {c}, kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [2, 2], layout = "NHWC"}} : f16[1,3,3,{c}]
  %dr = Clip(%d, %lo, %hi) : f16[1,3,3,{c}]
  %p = Conv(%dr, %wp, %bp) {{kernel_shape = [1, 1], layout = "NHWC"}} : f16[1,3,3,{k}]
  %y = Add(%p, %r) : f16[1,3,3,{k}]
  return %y
}}
"""


def test_golden_dw_pw(rng):
    m = parse(_golden_input(np.random.default_rng(7)))
    m.weights = WeightStore()
    verify(m)
    f = {"x": rng.standard_normal((1, 5, 5, 8)).astype(np.float16),
         "r": rng.standard_normal((1, 3, 3, 8)).astype(np.float16)}
    before = Interpreter(m).run(f)
    Pipeline(["fuse-epilogue", "fuse-cross-layer"], verify_each=True).run(m)
    text = print_module(m)
    lines = [ln.strip() for ln in text.splitlines()]
    # CHECK-style: these lines, in this order
    want = ['%y = fused(%x, %wd, %bd, %lo, %hi, %wp, %bp, %r) {body = region(',
            'Conv(%x_', 'Clip(', 'Conv(%dr_', 'Add(', 'return %y_']
    at = 0
    for w in want:
        hits = [i for i, ln in enumerate(lines) if i >= at and w in ln]
        assert hits, f"{w!r} not found after line {at}:\n{text}"
        at = hits[0] + 1
    assert 'kind = "dw_pw", params = "tile=' in text and 'dw=[clip] pw=[residual]"' in text, text
    assert text.count("fused(") == 1 and "conv_epilogue" not in text
    after = Interpreter(m).run(f)
    np.testing.assert_array_equal(before["y"], after["y"])


# ---------------------------------------------------------------- pass on models

CASES = [dict(stride=1), dict(stride=2), dict(stride=1, residual=False, k=16), dict(hw=7, cin=16, expand=6),
         dict(hw=14, stride=2, n=2)]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_interpreter_same_with_and_without(case, precision, rng):
    model = inverted_residual(**CASES[case])
    a, b = build(model, precision, cross=True), build(model, precision, cross=False)
    assert len(dw_pw_ops(a)) == 1 and not dw_pw_ops(b)
    tile = xl.parse_tile(dw_pw_ops(a)[0].attrs.params)
    assert tile is not None and tile["TH"] * tile["TW"] % 16 == 0
    for _ in range(2):
        f = feed(a, rng)
        ra, rb = Interpreter(a).run(f), Interpreter(b).run(f)
        for k in rb:
            np.testing.assert_array_equal(ra[k], rb[k])


def test_pays_bound():
    """Measured (H200, fp16): 56x56 c144 and 56->28 c144 pairs win, 14x14 c576 and 7x7 c960 lose."""
    assert len(dw_pw_ops(build(inverted_residual(hw=56, cin=24, expand=6), "fp16"))) == 1
    assert len(dw_pw_ops(build(inverted_residual(hw=56, cin=24, expand=6, stride=2, k=32), "fp16"))) == 1
    assert not dw_pw_ops(build(inverted_residual(hw=14, cin=96, expand=6), "fp16"))
    assert not dw_pw_ops(build(inverted_residual(hw=7, cin=160, expand=6), "fp16"))


def test_fp32_not_grouped():
    assert not dw_pw_ops(build(inverted_residual(), "fp32"))


def test_dw_result_read_twice_not_grouped():
    assert not dw_pw_ops(build(inverted_residual(dw_users=2), "fp16"))


def test_space_respects_smem_and_registers():
    s = xl.DwPwShape(1, 14, 14, 576, 14, 14, 96, 1, 1, 1, 1)
    full = xl.tile_space(s, 227 * 1024)
    assert full and all(xl.smem_bytes(p) <= 227 * 1024 for p in full)
    assert all((p["TH"] * p["TW"] // p["WARPS_M"] // 16) * (p["KN"] // p["WARPS_N"] // 8) * 4 <= xl.MAX_ACC
               for p in full)
    small = xl.tile_space(s, 12 * 1024)
    assert len(small) < len(full) and all(xl.smem_bytes(p) <= 12 * 1024 for p in small)
    assert xl.tile_space(s, 1024) == []
    assert xl.parse_tile(xl.format_tile(full[0])) == full[0]


# ---------------------------------------------------------------- lowering (CPU)

def _kernels(plan):
    return [plan.kernels[l.kernel] for l in plan.launches if l.kind == "kernel"]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_lowered_as_one_kernel_exact_in_arena(case, rng):
    m = build(inverted_residual(**CASES[case]), "fp16")
    plan = lower(m, {"arch": "sm_90", "precision": "fp16"})
    ks = [k for k in _kernels(plan) if k.template == "conv_dw_pw.cu.j2"]
    assert len(ks) == 1
    op = dw_pw_ops(m)[0]
    assert f"tile={ks[0].params['TH']}x{ks[0].params['TW']}" in op.attrs.params  # the recorded tile
    assert "// template: conv_dw_pw.cu.j2" in ks[0].body or "conv_dw_pw" in ks[0].name
    ex = PlanExecutor.from_plan(plan, m)
    f = feed(m, rng)
    ref, got = Interpreter(m).run(f), ex.run(f)
    for k in ref:
        assert np.array_equal(got[k], ref[k]), k


def test_unaligned_channels_fall_back_to_two_kernels(rng):
    m = build(inverted_residual(cin=6, expand=2, k=6), "fp16")  # 12 dw channels: not a multiple of 8
    assert len(dw_pw_ops(m)) == 1
    plan = lower(m, {"arch": "sm_90", "precision": "fp16"})
    assert not [k for k in _kernels(plan) if k.template == "conv_dw_pw.cu.j2"]
    sel = [s for s in plan.selections if s.variant.startswith("dw_pw")]
    assert [s.variant for s in sel] == ["dw_pw.split"]
    ex = PlanExecutor.from_plan(plan, m)
    f = feed(m, rng)
    ref, got = Interpreter(m).run(f), ex.run(f)
    for k in ref:
        assert np.array_equal(got[k], ref[k]), k
