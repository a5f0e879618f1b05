"""A Conv whose weight is an init value (computed from constants at load, e.g. light_resnet50's
ConstantOfShape weights scaled by fold-batchnorm) takes the implicit-GEMM fast path: its OHWI
weight is made by the layout kernel in the init phase (codegen/kernels/conv_weight.py), not by the
direct fallback conv every run. CPU: plan structure; GPU (marked): results match the interpreter."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import numpy_helper

from nnc.codegen import init_phase
from nnc.codegen.lower import lower
from nnc.driver import pipeline_passes
from nnc.ir.builder import FOLD_MAX_ELEMENTS
from nnc.ir.interp import Interpreter
from nnc.onnx_import import import_model
from nnc.pipeline import run_passes
from tests.conformance.test_light_models import LIGHT

from .cuda_models import N, mk

K, C, R = 128, 72, 3  # 128*72*9 = 82944 weight elements > FOLD_MAX_ELEMENTS: not folded


def init_weight_model(groups: int = 1, c: int = C):
    """y = relu(Conv(x, W * s) + b): W a random constant, s = ConstantOfShape(1.5): their product is
    too big to fold, so it is an init value; x has `c` channels (a multiple of 8 or not)."""
    rng = np.random.default_rng(7)
    cg = c // groups
    w = (rng.standard_normal((K, cg, R, R)) * 0.1).astype(np.float32)
    assert w.size > FOLD_MAX_ELEMENTS
    nodes = [N("ConstantOfShape", ["s_shape"], ["s"], value=numpy_helper.from_array(np.array([1.5], np.float32))),
             N("Mul", ["w", "s"], ["ws"]),
             N("Conv", ["x", "ws", "b"], ["c"], pads=[1, 1, 1, 1], group=groups),
             N("Relu", ["c"], ["y"])]
    inits = [("w", w), ("s_shape", np.array(w.shape, np.int64)),
             ("b", (rng.standard_normal(K) * 0.1).astype(np.float32))]
    return mk(nodes, [("x", T.FLOAT, [1, c, 14, 14])], [("y", T.FLOAT)], inits)


def _family(plan, l):
    return plan.kernels[l.kernel].template.split(".")[0] if l.kind == "kernel" else l.kind


def _lowered(model, precision="fp16", nchw=True):
    """nchw: without assign-layout, which may move the conv to NHWC (its weight then gets an IR
    Transpose, also run at load), so that the NCHW lowering's own init-phase transform is tested."""
    m = import_model(model)
    run_passes(m, [p for p in pipeline_passes(precision) if not (nchw and p == "assign-layout")])
    return m, lower(m, {"arch": "sm_90", "precision": precision})


@pytest.mark.parametrize("c", [72, 61])  # 61: channels zero-padded in the transformed weight
def test_init_weight_conv_takes_the_igemm_path(c):
    _, plan = _lowered(init_weight_model(c=c))
    run = Counter(_family(plan, l) for l in plan.launches)
    init = Counter(_family(plan, l) for l in plan.init_launches)
    assert run["conv_igemm"] == 1 and run["direct_conv"] == 0, run
    assert init["conv_layout"] == 1, init  # the OIHW -> OHWI weight transform, once at load
    lay = next(l for l in plan.init_launches if _family(plan, l) == "conv_layout")
    src, dst = (plan.root(a) for a in lay.args[:2])
    assert src.kind == dst.kind == init_phase.INIT_KIND
    cp = dst.shape[-1]
    assert dst.shape == (K, R, R, cp) and cp >= c and cp % 8 == 0
    conv = next(l for l in plan.launches if _family(plan, l) == "conv_igemm")
    assert any(a is dst for a in conv.args)  # the run reads the transformed persistent buffer
    assert dst.offset is not None and plan.persistent_bytes >= dst.offset + dst.nbytes
    init_phase.check(plan)


def test_init_weight_fp32_strict_keeps_its_path():
    """Strict fp32 has no weight transform (im2col + FFMA reads OIHW): nothing is added."""
    _, p16 = _lowered(init_weight_model(), "fp32")
    assert not any(_family(p16, l) == "conv_layout" for l in p16.init_launches)


@pytest.mark.parametrize("nchw", [True, False])
def test_light_resnet50_fp16_has_no_direct_fallback_convs(nchw):
    """Its 16 convs with init-value weights (the 3x3 and strided 1x1 ones over FOLD_MAX_ELEMENTS)
    ran the direct fallback conv every run; now all its non-pointwise convs are implicit GEMMs."""
    model = onnx.load(str(LIGHT / "light_resnet50.onnx"))
    _, plan = _lowered(model, nchw=nchw)
    run = Counter(_family(plan, l) for l in plan.launches)
    init = Counter(_family(plan, l) for l in plan.init_launches)
    assert run["direct_conv"] == 0 and run["conv_igemm"] >= 19, run
    if nchw:
        assert init["conv_layout"] == 16, init  # the NCHW lowering's weight transforms, at load


@pytest.mark.gpu
@pytest.mark.parametrize("c", [72, 61])
def test_gpu_init_weight_conv_matches_interpreter(tmp_path, c):
    import nnc
    from nnc.codegen.emit import compile_to_dir
    model = init_weight_model(c=c)
    m, _ = _lowered(model)
    ref_mod = import_model(model)
    compile_to_dir(m, tmp_path, arch=None, precision="fp16")
    mod = nnc.load(tmp_path)
    x = np.random.default_rng(1).standard_normal((1, c, 14, 14)).astype(np.float32)
    ref = Interpreter(ref_mod).run({"x": x})["y"]
    for _ in range(2):
        got = mod.run({"x": x}, output="numpy", poison=True)["y"].astype(np.float32)
        err = float(np.max(np.abs(got - ref))) / max(1.0, float(np.max(np.abs(ref))))
        assert err <= 1e-2, err
    assert mod.init_runs == 1
