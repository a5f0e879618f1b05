"""The fallback lowering of `fused` (codegen/kernels/fused.py): random groups of ops outlined into
fused ops (ir/outline.py) lower to the same launches as the ops unfused (same templates and
parameters, same grids, buffers of the same shapes; outputs keep their names and io_index), the
CPU plan simulator still matches the interpreter, NVRTC compiles the plans, and on a GPU a fused
build matches the interpreter."""
from pathlib import Path

import numpy as np
import onnx
import pytest

from nnc.codegen.lower import lower
from nnc.codegen.plan import Buffer
from nnc.ir.interp import Interpreter
from nnc.ir.outline import Outliner
from nnc.ir.verify import verify
from nnc.onnx_import import import_model
from nnc.pipeline import DEFAULT_PIPELINE, FUSION_PASSES, run_passes

# the cleanups without the fusion passes: the random groups here are the only fused ops
NO_FUSION = [p for p in DEFAULT_PIPELINE if p not in FUSION_PASSES]

from .cuda_models import models, random_feed
from .test_plan_sim import simulate

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = {"tiny_cnn": {"input": [2, 3, 32, 32]}, "tiny_transformer": None, "tiny_lstm": None}


def outline_random(mod, rng, max_len: int = 4, kind: str = "test") -> int:
    """Outlines random windows of consecutive ops (consecutive ops are always convex); consts stay
    outside so they become operands (their values must stay visible to the lowering). Returns
    the number of fused ops made."""
    ops = [op for op in mod.main.ops if op.name != "const" and not op.regions()]
    out = Outliner(mod.main, module=mod)
    made, i = 0, 0
    pos = {id(op): k for k, op in enumerate(mod.main.ops)}
    while i < len(ops):
        n = int(rng.integers(1, max_len + 1))
        group = ops[i:i + n]
        i += n + int(rng.integers(0, 2))
        # a window of the non-const ops: consecutive in program order apart from consts
        span = range(pos[id(group[0])], pos[id(group[-1])] + 1)
        if any(mod.main.ops[k].name != "const" and mod.main.ops[k] not in group for k in span):
            continue
        if out.can_outline(group) and out.outline(group, kind=kind) is not None:
            made += 1
    out.finish()
    verify(mod)
    return made


def _buf_sig(b: Buffer):
    io = (b.name, b.io_index) if b.kind in ("input", "output") and b.alias_of is None else ()
    return (b.kind, str(b.dtype), tuple(b.shape), b.alias_offset, io)


def plan_signature(plan):
    """What the GPU does, independent of the names of intermediate values."""
    def launches(ls):
        out = []
        for l in ls:
            k = plan.kernels.get(l.kernel) if l.kernel else None
            out.append((l.kind, k.template if k else None, k.body if k else None, l.grid, l.block, l.smem,
                        tuple(_buf_sig(a) if isinstance(a, Buffer) else (a.type, a.value) for a in l.args)))
        return out
    return (launches(plan.init_launches), launches(plan.launches),
            [_buf_sig(b) for b in plan.outputs], plan.memory["arena_bytes"])


def _load(name):
    if name in EXAMPLES:
        from nnc.onnx_import import parse_shapes  # noqa: F401 (shapes given as a dict)
        return import_model(str(ROOT / "examples" / f"{name}.onnx"), shapes=EXAMPLES[name]), None
    m, spec = models()[name]
    return import_model(m), spec


CASES = sorted(models()) + sorted(EXAMPLES)


@pytest.mark.parametrize("name", CASES)
def test_fused_fallback_lowers_like_unfused(name):
    base, _ = _load(name)
    run_passes(base, NO_FUSION)
    want = plan_signature(lower(base, {"arch": "sm_90"}))
    checked = 0
    for seed in range(8):  # two seeds that outline something (tiny_lstm: windows across a
        mod, _ = _load(name)  # `recurrence`, an op with regions, are never outlined)
        run_passes(mod, NO_FUSION)
        made = outline_random(mod, np.random.default_rng(seed))
        if made == 0:
            continue
        assert any(op.name == "fused" for op in mod.main.ops)
        got = plan_signature(lower(mod, {"arch": "sm_90"}))
        assert got == want, f"{name} seed {seed}: fused plan differs from the unfused one"
        checked += 1
        if checked == 2:
            break
    assert checked == 2, f"{name}: fewer than two of eight seeds outlined anything"


def test_fused_fallback_light_model():
    from tests.conformance.test_light_models import LIGHT
    path = str(LIGHT / "light_squeezenet.onnx")
    base = import_model(onnx.load(path))
    run_passes(base, NO_FUSION)
    want = plan_signature(lower(base, {"arch": "sm_90"}))
    mod = import_model(onnx.load(path))
    run_passes(mod, NO_FUSION)
    assert outline_random(mod, np.random.default_rng(3), max_len=6) > 5
    assert plan_signature(lower(mod, {"arch": "sm_90"})) == want


@pytest.mark.parametrize("name", ["movement", "reduce"])
def test_fused_plan_simulation_matches_interpreter(name):
    m, spec = models()[name]
    mod = import_model(m)
    outline_random(mod, np.random.default_rng(1))
    plan = lower(mod, {"arch": "sm_90"})
    feed = random_feed(spec, np.random.default_rng(0))
    ref = Interpreter(mod).run(feed)
    mem, ok = simulate(plan, feed, regions=True)
    checked = 0
    for b in plan.outputs:
        r = plan.root(b)
        if ok[r.id]:
            got = mem[r.id][:b.numel].reshape(b.shape)
            np.testing.assert_allclose(got.astype(np.float64), ref[b.name].astype(np.float64), rtol=1e-5,
                                       atol=1e-5, err_msg=f"{name}/{b.name}")
            checked += 1
    assert checked >= 10, checked


def test_fused_body_result_returned_twice_and_outputs_keep_names():
    """A body value returned by two results (hand-written IR) gets a copy; graph outputs keep
    their names and io_index."""
    from nnc.ir.parser import parse
    text = """func @main(%x: f32[4,8]) -> (f32[4,8], f32[4,8], f32[4,8]) {
  %a, %b = fused(%x) {body = region(%x_: f32[4,8]) {
    %r = Relu(%x_) : f32[4,8]
    return %r, %r
  }, kind = "nobody"} : f32[4,8], f32[4,8]
  %c = Neg(%a) : f32[4,8]
  return %c, %a, %b
}
"""
    mod = parse(text)
    verify(mod)
    plan = lower(mod, {"arch": "sm_90"})
    assert [(b.name, b.io_index) for b in plan.outputs] == [("c", 0), ("a", 1), ("b", 2)]
    assert [l.kind for l in plan.launches] == ["kernel", "memcpy", "kernel"]


def test_fused_plans_compile_with_nvrtc(tmp_path):
    from nnc.codegen.emit import compile_to_dir
    for name in ["elementwise", "cnn", "tiny_transformer"]:
        mod, _ = _load(name)
        run_passes(mod)
        outline_random(mod, np.random.default_rng(0))
        plan = compile_to_dir(mod, tmp_path / name, arch="sm_90")
        assert plan["cubins"]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["elementwise", "movement", "reduce", "cnn", "fp16", "select"])
def test_gpu_fused_build_matches_interpreter(name, tmp_path, rng):
    import nnc
    from nnc.codegen.emit import compile_to_dir
    m, spec = models()[name]
    mod = import_model(m)
    run_passes(mod)
    outline_random(mod, np.random.default_rng(2))
    low_precision = any(r.type.dtype.short in ("f16", "bf16") for op in mod.main.walk() for r in op.results)
    compile_to_dir(mod, tmp_path, arch=None)
    g = nnc.load(tmp_path)
    for _ in range(2):  # fresh inputs each time, poisoned arena
        feed = random_feed(spec, rng)
        ref = Interpreter(mod).run(feed)
        got = g.run(feed, output="numpy", poison=True)
        for k, v in ref.items():
            tol = 1e-2 if low_precision else 1e-4  # f16 ops inside: fp16's tolerance, whatever the output dtype
            np.testing.assert_allclose(np.asarray(got[k]).astype(np.float64), v.astype(np.float64),
                                       rtol=tol, atol=tol, err_msg=f"{name}/{k}")
