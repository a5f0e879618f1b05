"""fuse-reduction (compiler/passes/fuse_reduction.py) and the GELU forms of fuse-epilogue: which
groups form on ONNX-level models of the real patterns (BERT's attention mask + Softmax, embedding
sum + LayerNorm, hand-written LayerNorm / Softmax / RMSNorm), where groups must stop, the
interpreter's outputs before and after on random inputs, linear time. Golden IR:
tests/passes/golden/fuse_reduction.nnir."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from nnc.ir.interp import Interpreter
from nnc.ir.verify import verify
from nnc.onnx_import import import_model
from nnc.passes import fuse_epilogue, fuse_reduction
from nnc.pipeline import run_passes

CLEANUP = ["fold-constants", "canonicalize", "dce"]
N = h.make_node


def _c(name, v, dt=np.float32):
    return numpy_helper.from_array(np.asarray(v, dt), name)


def _model(nodes, inputs, outputs, inits=(), dt=T.FLOAT):
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info(n, dt, s) for n, s in inputs],
                     [h.make_tensor_value_info(n, dt, s) for n, s in outputs], list(inits))
    m = import_model(h.make_model(g, opset_imports=[h.make_opsetid("", 18)], ir_version=10))
    run_passes(m, CLEANUP)
    return m


def attention_softmax():
    """BERT: scores = Q K^T / sqrt(d) + mask [B,1,1,S]; Softmax; then P V."""
    nodes = [N("MatMul", ["q", "kt"], ["qk"]), N("Div", ["qk", "sd"], ["s"]),
             N("Add", ["s", "mask"], ["m"]), N("Softmax", ["m"], ["p"], axis=-1),
             N("MatMul", ["p", "v"], ["y"])]
    return _model(nodes, [("q", [1, 2, 8, 4]), ("kt", [1, 2, 4, 8]), ("mask", [1, 1, 1, 8]), ("v", [1, 2, 8, 4])],
                  [("y", [1, 2, 8, 4])], [_c("sd", 2.0)])


def embedding_layernorm():
    """BERT's embeddings: three summed lookups, LayerNorm."""
    nodes = [N("Add", ["a", "b"], ["ab"]), N("Add", ["ab", "c"], ["abc"]),
             N("LayerNormalization", ["abc", "g", "be"], ["y"], axis=-1, epsilon=1e-12)]
    return _model(nodes, [("a", [1, 6, 16]), ("b", [1, 6, 16]), ("c", [1, 1, 16])], [("y", [1, 6, 16])],
                  [_c("g", np.linspace(0.5, 1.5, 16)), _c("be", np.linspace(-1, 1, 16))])


def handwritten_layernorm():
    """torch's LayerNorm written out (older exporters): mean, centre, Pow 2, mean, eps, Sqrt, Div, affine."""
    nodes = [N("ReduceMean", ["x", "ax"], ["mu"]), N("Sub", ["x", "mu"], ["d"]), N("Pow", ["d", "two"], ["q"]),
             N("ReduceMean", ["q", "ax"], ["v"]), N("Add", ["v", "eps"], ["ve"]), N("Sqrt", ["ve"], ["sd"]),
             N("Div", ["d", "sd"], ["n"]), N("Mul", ["n", "g"], ["ng"]), N("Add", ["ng", "be"], ["y"])]
    return _model(nodes, [("x", [2, 5, 32])], [("y", [2, 5, 32])],
                  [_c("ax", [-1], np.int64), _c("two", 2.0), _c("eps", 1e-5),
                   _c("g", np.linspace(0.5, 1.5, 32)), _c("be", np.linspace(-1, 1, 32))])


def handwritten_softmax_and_rmsnorm():
    nodes = [N("Exp", ["x"], ["e"]), N("ReduceSum", ["e", "ax"], ["s"]), N("Div", ["e", "s"], ["p"]),
             N("Mul", ["z", "z"], ["zz"]), N("ReduceMean", ["zz", "ax"], ["ms"]), N("Add", ["ms", "eps"], ["a"]),
             N("Sqrt", ["a"], ["rs"]), N("Div", ["z", "rs"], ["n"]), N("Mul", ["n", "g"], ["y"])]
    return _model(nodes, [("x", [3, 40]), ("z", [3, 40])], [("p", [3, 40]), ("y", [3, 40])],
                  [_c("ax", [1], np.int64), _c("eps", 1e-6), _c("g", np.linspace(0.5, 1.5, 40))])


def reduce_max_with_epilogue():
    nodes = [N("Relu", ["x"], ["r"]), N("ReduceMax", ["r", "ax"], ["m"], keepdims=1),
             N("Mul", ["m", "k"], ["y"])]
    return _model(nodes, [("x", [4, 2, 24])], [("y", [4, 2, 1])], [_c("ax", [2], np.int64), _c("k", 0.5)])


CASES = {"attention_softmax": (attention_softmax, [["Div", "Add", "Softmax"]]),
         "embedding_layernorm": (embedding_layernorm, [["Add", "Add", "LayerNormalization"]]),
         "handwritten_layernorm": (handwritten_layernorm, [["ReduceMean", "Sub", "Pow", "ReduceMean", "Add",
                                                            "Sqrt", "Div", "Mul", "Add"]]),
         "handwritten_softmax_and_rmsnorm": (handwritten_softmax_and_rmsnorm,
                                             [["Exp", "ReduceSum", "Div"],
                                              ["Mul", "ReduceMean", "Add", "Sqrt", "Div", "Mul"]]),
         "reduce_max_with_epilogue": (reduce_max_with_epilogue, [["Relu", "ReduceMax", "Mul"]])}


def _feed(m, rng):
    return {a.name: rng.standard_normal([int(d) for d in a.type.shape]).astype(a.type.dtype.np)
            for a in m.main.args}


@pytest.mark.parametrize("name", sorted(CASES))
def test_groups_and_interpreter_equality(name, rng):
    make, want = CASES[name]
    m = make()
    feed = _feed(m, rng)
    before = Interpreter(m).run(feed)
    assert fuse_reduction.run(m)
    verify(m)
    fused = [op for op in m.main.ops if op.name == "fused"]
    assert [[b.name for b in op.attrs.body.ops if b.name != "const"] for op in fused] == want
    assert all(op.attrs.kind == "rowreduce" for op in fused)
    after = Interpreter(m).run(feed)  # the body is the reference semantics: bit-equal
    assert list(before) == list(after)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_mask_is_an_operand_not_materialised():
    m = attention_softmax()
    fuse_reduction.run(m)
    (f,) = [op for op in m.main.ops if op.name == "fused"]
    assert [tuple(v.type.shape) for v in f.operands if v.name == "mask"] == [(1, 1, 1, 8)]
    assert not any(op.name == "Expand" for op in m.main.walk())


def test_groups_stop_at_other_readers_and_other_axes():
    """a = Tanh(x) read by a MatMul outside: closed before the Softmax could take it; a Softmax
    over axis 0 is no row reduction; a lone Softmax stays as it is."""
    nodes = [N("Tanh", ["x"], ["a"]), N("MatMul", ["a", "w"], ["mm"]), N("Softmax", ["a"], ["p"], axis=-1),
             N("Add", ["p", "mm"], ["y"]), N("Relu", ["x"], ["r"]), N("Softmax", ["r"], ["q"], axis=0)]
    m = _model(nodes, [("x", [4, 4]), ("w", [4, 4])], [("y", [4, 4]), ("q", [4, 4])])
    groups = fuse_reduction.find_groups(m.main, m.weights)
    assert [[op.name for op in g] for g in groups] == [["Softmax", "Add"]]


def test_pass_is_linear_on_long_graphs():
    """3000 residual + LayerNorm blocks: one sweep."""
    nodes, cur = [], "x"
    for i in range(3000):
        nodes += [N("Add", [cur, "x"], [f"a{i}"]),
                  N("LayerNormalization", [f"a{i}", "g", "be"], [f"l{i}"], axis=-1),
                  N("MatMul", [f"l{i}", "w"], [f"m{i}"])]
        cur = f"m{i}"
    m = _model(nodes, [("x", [2, 8])], [(cur, [2, 8])],
               [_c("g", np.ones(8)), _c("be", np.zeros(8)), _c("w", np.eye(8))])
    t0 = time.perf_counter()
    assert fuse_reduction.run(m)
    dt = time.perf_counter() - t0
    assert sum(op.name == "fused" for op in m.main.ops) == 3000
    assert dt < 10, f"fuse-reduction took {dt:.1f} s"


# ---------------------------------------------------------------- GELU into GEMM epilogues

def _gemm_gelu(form: str, half=0.5, dt=np.float32):
    """MatMul + bias, then GELU written out as the exporters do."""
    x = "a"
    if form == "erf_bert":  # Div -> Erf -> Add -> Mul x -> Mul 0.5
        nodes = [N("Div", [x, "s2"], ["d"]), N("Erf", ["d"], ["e"]), N("Add", ["e", "one"], ["e1"]),
                 N("Mul", [x, "e1"], ["g"]), N("Mul", ["g", "half"], ["y"])]
    elif form == "erf_half_first":  # (0.5 * x) * (1 + erf(x * 1/sqrt2))
        nodes = [N("Mul", ["is2", x], ["d"]), N("Erf", ["d"], ["e"]), N("Add", ["one", "e"], ["e1"]),
                 N("Mul", ["half", x], ["hx"]), N("Mul", ["hx", "e1"], ["y"])]
    else:  # GPT-2: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
        nodes = [N("Pow", [x, "three"], ["x3"]), N("Mul", ["k", "x3"], ["kx3"]), N("Add", [x, "kx3"], ["w"]),
                 N("Mul", ["c", "w"], ["cw"]), N("Tanh", ["cw"], ["t"]), N("Add", ["one", "t"], ["t1"]),
                 N("Mul", ["half", x], ["hx"]), N("Mul", ["hx", "t1"], ["y"])]
    nodes = [N("MatMul", ["x", "w_"], ["mm"]), N("Add", ["mm", "b"], ["a"])] + nodes
    rng = np.random.default_rng(3)
    inits = [_c("w_", rng.standard_normal((16, 24)) * 0.3, dt), _c("b", rng.standard_normal(24), dt),
             _c("s2", math.sqrt(2), dt), _c("is2", 1 / math.sqrt(2), dt), _c("one", 1.0, dt), _c("half", half, dt),
             _c("three", 3.0, dt), _c("k", 0.044715, dt), _c("c", math.sqrt(2 / math.pi), dt)]
    return _model(nodes, [("x", [4, 16])], [("y", [4, 24])], inits,
                  dt=T.FLOAT16 if dt == np.float16 else T.FLOAT)


@pytest.mark.parametrize("form,act", [("erf_bert", "gelu"), ("erf_half_first", "gelu"), ("tanh_gpt2", "gelu_tanh")])
@pytest.mark.parametrize("dt", [np.float32, np.float16])
def test_gelu_forms_become_the_gemm_activation(form, act, dt, rng):
    m = _gemm_gelu(form, dt=dt)
    feed = _feed(m, rng)
    before = Interpreter(m).run(feed)["y"].astype(np.float64)
    assert fuse_epilogue.run(m)
    verify(m)
    run_passes(m, ["dce"])
    (f,) = [op for op in m.main.ops if op.name == "fused"]
    assert f.attrs.kind == "gemm_epilogue" and f.attrs.params == f"bias {act}"
    assert [op.name for op in m.main.ops if op.name != "const"] == ["fused"]
    after = Interpreter(m).run(feed)["y"].astype(np.float64)
    tol = 1e-2 if dt == np.float16 else 1e-5
    np.testing.assert_allclose(after, before, rtol=tol, atol=tol * np.abs(before).max())


def test_gelu_constants_must_match():
    """0.6 instead of 0.5 is no GELU: the epilogue keeps only the bias."""
    m = _gemm_gelu("erf_bert", half=0.6)
    fuse_epilogue.run(m)
    (f,) = [op for op in m.main.ops if op.name == "fused"]
    assert f.attrs.params == "bias"
    assert not any(op.name == "Gelu" for op in m.main.walk())
