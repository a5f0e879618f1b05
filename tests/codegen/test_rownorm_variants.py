"""The "rownorm" variant family (codegen/kernels/rownorm_variants.py): LayerNormalization,
Softmax / LogSoftmax, RMSNormalization with the row in registers (W warps per row, RPB rows per
block, VEC-element vectors) or today's generic kernels. CPU: applies / space / default, the
kernel header names the op and params, the plan runs in its arena on the reference backend as
the interpreter does, every variant compiles with NVRTC for sm_90a (R in 64 .. 8192, 1000, 999;
f16 / bf16 / f32). GPU: each variant against the interpreter, outputs NaN-poisoned first."""
from __future__ import annotations

import numpy as np
import pytest

from nnc.codegen.kernels import rownorm_variants as rv
from nnc.codegen.plan_exec import PlanExecutor
from nnc.ir.interp import Interpreter
from tools.bench_rownorm import candidates, lower_forced, model, random_feed

OPS = ("LayerNormalization", "Softmax", "LogSoftmax", "RMSNormalization")
RS = (64, 768, 1024, 3072, 4096, 8192, 1000, 999)


def _p(R, dt="f16", outer=4096, **kw):
    size = 4 if dt == "f32" else 2
    return rv.RowProblem(kind="layernorm", dtype=dt, itemsize=size, outer=outer, R=R, x_off=0, y_off=0,
                         scale_n=R, scale_size=size, bias_n=R, bias_size=size, **kw)


def test_space_and_default():
    p = _p(768)
    space = rv.regs_space(p)
    assert {s["VEC"] for s in space} == {8, 4}  # the two widest
    assert all(rv.share_bytes(p, s["VEC"], s["W"]) <= rv.MAX_ROW_BYTES for s in space)
    assert all(32 * s["W"] * s["RPB"] <= 1024 for s in space)
    assert rv.regs_default(p, space) == {"VEC": 8, "W": 1, "RPB": 8}  # a warp per row, 16-byte vectors
    assert rv.regs_default(_p(4096), rv.regs_space(_p(4096)))["W"] == 4
    assert rv.regs_default(_p(65536, outer=1024), rv.regs_space(_p(65536, outer=1024))) == \
        {"VEC": 8, "W": 32, "RPB": 1}  # a block per row
    assert rv.regs_space(_p(65536, "f32")) == []  # 256 bytes a thread: the generic kernel
    assert {s["VEC"] for s in rv.regs_space(_p(999))} == {1}
    view = rv.RowProblem(kind="softmax", dtype="f16", itemsize=2, outer=8, R=768, x_off=4, y_off=0)
    assert {s["VEC"] for s in rv.regs_space(view)} == {2, 1}  # a view 4 bytes into its root
    few = _p(768, outer=64)
    assert rv.regs_default(few, rv.regs_space(few))["RPB"] == 1  # keep the SMs busy
    with pytest.raises(ValueError):
        rv.regs_params(_p(999), {"VEC": 8, "W": 1, "RPB": 1})


def test_applies_and_fallback():
    names = [n for n, _ in candidates(model("LayerNormalization", 4, 768, "f16"))]
    assert names[0] == "rownorm.layernorm_regs" and names[-1] == "rownorm.layernorm_generic"
    assert [n for n, _ in candidates(model("LayerNormalization", 4, 65536, "f32"))] == ["rownorm.layernorm_generic"]
    assert {n for n, _ in candidates(model("Softmax", 4, 65536, "f16"))} == {"rownorm.softmax_regs",
                                                                             "rownorm.softmax_generic"}


@pytest.mark.parametrize("op", OPS)
def test_header_names_op_and_params(op):
    m = model(op, 64, 768, "f16", outs=3 if op == "LayerNormalization" else 1)
    plan = lower_forced(m, f"rownorm.{rv.SHORT[op]}_regs", {"VEC": 8, "W": 2, "RPB": 2})
    (k,) = plan.kernels.values()
    assert k.template == "rownorm_regs.cu.j2" and f"= {op}(" in k.source
    assert '"W":2' in k.source and '"RPB":2' in k.source and '"VEC":8' in k.source
    (launch,) = plan.launches
    assert launch.block[0] == 128 and launch.grid[0] == 32
    if op == "LayerNormalization":
        assert "mean_out[o]" in k.source and "rstd_out[o]" in k.source


@pytest.mark.parametrize("op", ("LayerNormalization", "Softmax", "RMSNormalization"))
def test_plan_runs_in_the_arena(op):
    for R, dt in ((768, "f16"), (999, "f32")):
        m = model(op, 6, R, dt, outs=3 if op == "LayerNormalization" else 1)
        for vname, params in candidates(m):
            plan = lower_forced(m, vname, params)
            feed = random_feed(m)
            ref, got = Interpreter(m).run(feed), PlanExecutor.from_plan(plan, m).run(feed)
            assert set(got) == set(ref)
            for k in ref:
                np.testing.assert_array_equal(got[k], ref[k])


def _sources(ops, rs, dts, tag="a"):
    """(unique kernel name, source) of every candidate, renamed apart."""
    out = []
    for op in ops:
        for R in rs:
            for dt in dts:
                m = model(op, 512, R, dt, outs=3 if op == "LayerNormalization" else 1)
                for vname, params in candidates(m):
                    plan = lower_forced(m, vname, params)
                    for k in plan.kernels.values():
                        name = f"{k.name}_{tag}{len(out)}"
                        out.append((name, k.source.replace(k.name, name)))
    return out


@pytest.mark.parametrize("dt", ["f16", "bf16", "f32"])
def test_variants_compile_with_nvrtc(dt):
    from nnc.codegen.cuda import compile_nvrtc
    from nnc.codegen.units import pieces_for, prelude
    srcs = _sources(OPS, RS, (dt,)) + _sources(("LayerNormalization",), (65536,), (dt,), "b")
    text = "\n".join(s for _, s in srcs)
    cubin = compile_nvrtc(prelude(pieces_for([text])) + "\n" + text, "sm_90a", name=f"rownorm_{dt}.cu")
    assert cubin and all(n.encode() in cubin for n, _ in srcs)


def _run_on_gpu(m, vname, params, feed) -> dict:
    """The one kernel of m forced to (vname, params), run on NaN-poisoned buffers: name -> host array."""
    import cupy as cp

    from tools.bench_rownorm import build, device_arrays, run, to_host
    plan = lower_forced(m, vname, params)
    fn, launch = build(plan)
    arrs = device_arrays(plan, feed, poison=True)
    run(fn, launch, arrs)
    cp.cuda.Device().synchronize()
    return {b.name: to_host(b, a) for b, a in zip(launch.args, arrs)}


@pytest.mark.gpu
@pytest.mark.parametrize("dt", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("op", OPS)
def test_gpu_variants_match_interpreter(op, dt):
    """Each candidate (regs default and other space points, generic) against the interpreter,
    outputs NaN-poisoned first (needs GPU run)."""
    tol = {"f32": 1e-3, "f16": 1e-2, "bf16": 4e-2}[dt]
    for rows, R in ((37, 64), (130, 768), (64, 1000), (33, 999), (16, 4096), (8, 8192), (4, 65536)):
        m = model(op, rows, R, dt, outs=3 if op == "LayerNormalization" else 1)
        feed = random_feed(m, seed=R)
        ref = Interpreter(m).run(feed)
        for vname, params in candidates(m):
            by_name = _run_on_gpu(m, vname, params, feed)
            for k, v in ref.items():
                got = by_name[k].astype(np.float64).reshape(v.shape)
                b = v.astype(np.float64)
                np.testing.assert_allclose(got, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())),
                                           err_msg=f"{op} {rows}x{R} {dt} {vname} {params} {k}")


# ---------------------------------------------------------------- elementwise vectors

def _ew_model(rows, cols, dt):
    """x + b (b broadcast over rows), Gelu, a Cast to f32 and a Greater (bool): same-shape inputs and
    outputs vectorised, b read by index."""
    from onnx import TensorProto as T
    from onnx import helper as h

    from nnc.onnx_import import import_model
    dts = {"f32": T.FLOAT, "f16": T.FLOAT16, "bf16": T.BFLOAT16}
    nodes = [h.make_node("Add", ["x", "b"], ["a"]), h.make_node("Gelu", ["a"], ["y"]),
             h.make_node("Cast", ["y"], ["yf"], to=T.FLOAT), h.make_node("Greater", ["x", "y"], ["gt"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", dts[dt], [rows, cols]),
                                  h.make_tensor_value_info("b", dts[dt], [cols])],
                     [h.make_tensor_value_info("yf", T.FLOAT, [rows, cols]),
                      h.make_tensor_value_info("gt", T.BOOL, [rows, cols])])
    return import_model(h.make_model(g, opset_imports=[h.make_opsetid("", 20)], ir_version=10))


def _fused_ew(m):
    from nnc.pipeline import run_passes
    run_passes(m, ["fuse-elementwise"])
    return m


@pytest.mark.parametrize("dt", ["f16", "bf16", "f32"])
def test_elementwise_vectors(dt):
    from nnc.codegen.cuda import compile_nvrtc
    from nnc.codegen.lower import lower
    from nnc.codegen.units import pieces_for, prelude
    srcs = []
    for (rows, cols), fuse in (((64, 768), False), ((64, 768), True), ((3, 999), True)):
        m = _ew_model(rows, cols, dt)
        if fuse:
            _fused_ew(m)
        plan = lower(m, {"arch": "sm_90a"})
        for l in plan.launches:
            k = plan.kernels[l.kernel]
            vec = k.params.get("VEC", 1)
            n = rows * cols
            if cols == 999:
                assert vec == 1
            elif fuse:  # f16 in, f32 + bool out: 16 bytes of f32
                assert vec == 4, k.name
            assert l.grid[0] * l.block[0] >= n // vec
            srcs.append((f"{k.name}_{len(srcs)}", k.source.replace(k.name, f"{k.name}_{len(srcs)}")))
        assert any("reinterpret_cast" in s for _, s in srcs)
        ex = PlanExecutor.from_plan(plan, m)
        feed = random_feed(m)
        ref, got = Interpreter(m).run(feed), ex.run(feed)
        assert all(np.array_equal(got[k], ref[k]) for k in ref)
    text = "\n".join(s for _, s in srcs)
    assert compile_nvrtc(prelude(pieces_for([text])) + "\n" + text, "sm_90a", name=f"ew_{dt}.cu")


@pytest.mark.gpu
@pytest.mark.parametrize("dt", ["f16", "f32"])
def test_gpu_elementwise_vectors_match_interpreter(dt, tmp_path):
    import nnc
    from nnc.codegen.emit import compile_to_dir
    for (rows, cols), fuse in (((64, 768), False), ((64, 768), True), ((3, 999), True), ((5, 1024), True)):
        m = _ew_model(rows, cols, dt)
        if fuse:
            _fused_ew(m)
        d = tmp_path / f"{rows}x{cols}_{int(fuse)}"
        compile_to_dir(m, d, arch=None)
        g = nnc.load(d)
        feed = random_feed(m, seed=cols)
        ref = Interpreter(m).run(feed)
        got = g.run(feed, output="numpy", poison=True)
        tol = 1e-2 if dt == "f16" else 1e-5
        for k, v in ref.items():
            if v.dtype == np.bool_:
                # Greater on values that round differently may flip where x == y within rounding
                assert np.mean(np.asarray(got[k]) != v) < 1e-3, k
                continue
            np.testing.assert_allclose(np.asarray(got[k]).astype(np.float64), v.astype(np.float64), rtol=tol,
                                       atol=tol, err_msg=f"{rows}x{cols} {dt} {k}")


# ---------------------------------------------------------------- fused rowreduce (T, RPB)

def _add_ln(rows, C, precision="fp32"):
    """BERT's residual Add + LayerNormalization as one rowreduce group."""
    from onnx import helper as h

    from nnc.passes import fuse_reduction
    from nnc.pipeline import run_passes
    from tests.passes.test_fuse_reduction import _c, _model
    nodes = [h.make_node("Add", ["x", "res"], ["a"]),
             h.make_node("LayerNormalization", ["a", "g", "be"], ["y"], axis=-1, epsilon=1e-12)]
    m = _model(nodes, [("x", [rows, C]), ("res", [rows, C])], [("y", [rows, C])],
               [_c("g", np.linspace(0.5, 1.5, C)), _c("be", np.linspace(-1, 1, C))])
    if precision == "fp16":
        run_passes(m, ["to-fp16", "canonicalize", "dce"])
    assert fuse_reduction.run(m)
    return m


def _rowreduce_problem_space(m):
    from nnc.codegen.kernels import fused_reduction as fr
    from nnc.codegen.lower import Lowerer, Problem, _ensure_loaded
    from tools.bench_rownorm import options
    _ensure_loaded()
    op = next(o for o in m.main.ops if o.name == "fused")
    pr = Problem(Lowerer(m, options()), op)
    assert fr.FUSED_ROWREDUCE.check(pr)
    space = fr._space(pr)
    return space, fr._default(pr, space)


def test_rowreduce_space_and_default():
    space, d = _rowreduce_problem_space(model("AddLayerNormalization", 4096, 768, "f16"))
    assert space[0] == {"T": 256, "RPB": 1, "VEC": 1}  # the one-CTA-per-row kernel of before
    assert {"T": 32, "RPB": 8, "VEC": 1} in space and all(p["T"] * p["RPB"] <= 1024 for p in space)
    assert d == {"T": 96, "RPB": 2, "VEC": 8}  # one 16-byte vector a thread, two rows a CTA
    _, d = _rowreduce_problem_space(_add_ln(4096, 768))
    assert d == {"T": 192, "RPB": 1, "VEC": 4}
    space, d = _rowreduce_problem_space(_add_ln(64, 2048))
    assert d == {"T": 256, "RPB": 1, "VEC": 1}  # long rows: as before
    _, d = _rowreduce_problem_space(model("AddLayerNormalization", 4096, 1000, "f16"))
    assert d["VEC"] == 8 and d["T"] == 128
    _, d = _rowreduce_problem_space(_add_ln(4096, 768, "fp16"))  # f32 rows in and out, f16 inside
    assert d["VEC"] == 4


ROWREDUCE_POINTS = ({"T": 32, "RPB": 8}, {"T": 64, "RPB": 4}, {"T": 128, "RPB": 2}, {"T": 256, "RPB": 1},
                    {"T": 32, "RPB": 1}, {"T": 32, "RPB": 4, "VEC": 4}, {"T": 96, "RPB": 2, "VEC": 8},
                    {"T": 256, "RPB": 1, "VEC": 2}, {"T": 64, "RPB": 1, "VEC": 8})


def test_rowreduce_points_run_in_the_arena_and_compile():
    from nnc.codegen.cuda import compile_nvrtc
    from nnc.codegen.units import pieces_for, prelude
    from tests.codegen.test_fused_reduction import MODELS as FR_MODELS
    from tests.codegen.test_fused_reduction import _fused
    srcs = []
    models = [(f"{n}_{p}", _fused(n, p)) for n in sorted(FR_MODELS) for p in ("fp32", "fp16")]
    models += [("add_ln_768", _add_ln(37, 768, "fp16")), ("add_ln_1000", _add_ln(9, 1000))]
    for name, m in models:
        feed = random_feed(m)
        ref = Interpreter(m).run(feed)
        for params in ROWREDUCE_POINTS:
            plan = lower_forced(m, "fused.rowreduce", params)
            ks = [k for k in plan.kernels.values() if k.template == "fused_rowreduce.cu.j2"]
            assert ks and all(k.params["T"] == params["T"] and k.params["RPB"] == params["RPB"] and
                              k.params.get("VEC", 1) == params.get("VEC", 1) for k in ks)
            for k in ks:
                srcs.append(k.source.replace(k.name, f"{k.name}_{len(srcs)}"))
            got = PlanExecutor.from_plan(plan, m).run(feed)
            for k in ref:
                np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{name} {params}")
    text = "\n".join(srcs)
    assert compile_nvrtc(prelude(pieces_for([text])) + "\n" + text, "sm_90a", name="rowreduce.cu")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_rowreduce_points_match_interpreter(precision, tmp_path):
    """Each (T, RPB) point on the fused groups of test_fused_reduction and BERT's Add + LayerNorm,
    through the full runtime (a one-choice selector registered for the test), outputs poisoned."""
    import nnc
    from nnc.codegen import variants
    from nnc.codegen.emit import compile_to_dir
    from nnc.codegen.options import CodegenOptions, LowerOptions
    from nnc.codegen.target import resolve_target
    from tests.codegen.test_fused_reduction import MODELS as FR_MODELS
    from tests.codegen.test_fused_reduction import _fused
    from tools.bench_rownorm import Forced
    tol = 1e-2 if precision == "fp16" else 1e-3
    models = [(n, lambda n=n: _fused(n, precision)) for n in sorted(FR_MODELS)]
    models += [("add_ln", lambda: _add_ln(4096, 768, precision)), ("add_ln_odd", lambda: _add_ln(33, 1000, precision))]
    for params in ROWREDUCE_POINTS:
        variants.SELECTORS["test-forced"] = lambda: Forced("fused.rowreduce", params)
        try:
            for name, make in models:
                m = make()
                d = tmp_path / f"{name}_{params['T']}_{params['RPB']}"
                compile_to_dir(m, d, options=CodegenOptions(LowerOptions(resolve_target(None), "fp32", False,
                                                                         selector="test-forced")))
                g = nnc.load(d)
                feed = random_feed(m, seed=3)
                ref = Interpreter(m).run(feed)
                got = g.run(feed, output="numpy", poison=True)
                for k, v in ref.items():
                    b = v.astype(np.float64)
                    np.testing.assert_allclose(np.asarray(got[k]).astype(np.float64), b, rtol=tol,
                                               atol=tol * max(1.0, float(np.abs(b).max())),
                                               err_msg=f"{name} {params} {k}")
        finally:
            variants.SELECTORS.pop("test-forced", None)



# ---------------------------------------------------------------- Instance / GroupNormalization

def _group_model(op, shape, dt, groups=None):
    from onnx import TensorProto as T
    from onnx import helper as h

    from nnc.onnx_import import import_model
    dts = {"f32": T.FLOAT, "f16": T.FLOAT16, "bf16": T.BFLOAT16}
    C = shape[1]
    attrs = {"epsilon": 1e-5} if groups is None else {"epsilon": 1e-5, "num_groups": groups}
    node = h.make_node(op, ["x", "g", "b"], ["y"], **attrs)
    g = h.make_graph([node], "g", [h.make_tensor_value_info("x", dts[dt], shape),
                                   h.make_tensor_value_info("g", dts[dt], [C]),
                                   h.make_tensor_value_info("b", dts[dt], [C])],
                     [h.make_tensor_value_info("y", dts[dt], shape)])
    return import_model(h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10))


GROUP_CASES = [("InstanceNormalization", [2, 8, 14, 14], None), ("InstanceNormalization", [1, 4, 64, 64], None),
               ("GroupNormalization", [2, 32, 7, 7], 8), ("GroupNormalization", [1, 64, 16, 16], 32),
               ("GroupNormalization", [1, 6, 5, 3], 3)]


@pytest.mark.parametrize("dt", ["f16", "bf16", "f32"])
def test_group_norms_arena_and_nvrtc(dt):
    from nnc.codegen.cuda import compile_nvrtc
    from nnc.codegen.units import pieces_for, prelude
    srcs = []
    for op, shape, groups in GROUP_CASES:
        m = _group_model(op, shape, dt, groups)
        cands = candidates(m)
        assert cands[0][0] == f"rownorm.{rv.SHORT[op]}_regs" and cands[-1][0] == f"rownorm.{rv.SHORT[op]}_generic"
        feed = random_feed(m)
        ref = Interpreter(m).run(feed)
        for vname, params in cands:
            plan = lower_forced(m, vname, params)
            for k in plan.kernels.values():
                srcs.append(k.source.replace(k.name, f"{k.name}_{len(srcs)}"))
            got = PlanExecutor.from_plan(plan, m).run(feed)
            assert all(np.array_equal(got[k], ref[k]) for k in ref)
    text = "\n".join(srcs)
    assert compile_nvrtc(prelude(pieces_for([text])) + "\n" + text, "sm_90a", name=f"group_{dt}.cu")


@pytest.mark.gpu
@pytest.mark.parametrize("dt", ["f32", "f16"])
def test_gpu_group_norms_match_interpreter(dt):
    tol = 1e-2 if dt == "f16" else 1e-3
    for op, shape, groups in GROUP_CASES:
        m = _group_model(op, shape, dt, groups)
        feed = random_feed(m, seed=shape[1])
        ref = Interpreter(m).run(feed)
        for vname, params in candidates(m):
            by_name = _run_on_gpu(m, vname, params, feed)
            b = ref["y"].astype(np.float64)
            np.testing.assert_allclose(by_name["y"].astype(np.float64).reshape(b.shape), b, rtol=tol,
                                       atol=tol * max(1.0, float(np.abs(b).max())),
                                       err_msg=f"{op} {shape} {dt} {vname} {params}")
