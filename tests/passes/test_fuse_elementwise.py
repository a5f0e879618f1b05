"""fuse-elementwise on long graphs: one sweep (union-find), groups broken exactly where a
non-elementwise op reads a group's value, results unchanged (golden cases:
tests/passes/golden/fuse_elementwise.nnir)."""
from __future__ import annotations

import time

import numpy as np
from onnx import TensorProto as T
from onnx import helper as h

from nnc.ir.interp import Interpreter
from nnc.ir.verify import verify
from nnc.onnx_import import import_model
from nnc.passes.fuse_elementwise import find_groups, run


def _chain(n: int, every: int):
    """x -> Tanh/Relu/Sigmoid chain of n ops, a Softmax after every `every` ops (it reads the
    chain's value, so the group closes there and a new one starts after it)."""
    nodes, cur = [], "x"
    for i in range(n):
        op = ("Tanh", "Relu", "Sigmoid")[i % 3]
        nodes.append(h.make_node(op, [cur], [f"v{i}"]))
        cur = f"v{i}"
        if (i + 1) % every == 0:
            nodes.append(h.make_node("Softmax", [cur], [f"s{i}"], axis=-1))
            cur = f"s{i}"
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [2, 4])],
                     [h.make_tensor_value_info(cur, T.FLOAT, [2, 4])])
    return import_model(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=10))


def test_long_chain_groups_between_softmaxes():
    m = _chain(6000, 100)
    x = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}
    want = Interpreter(m).run(x)
    t0 = time.perf_counter()
    groups = find_groups(m.main)
    assert len(groups) == 60 and all(len(g) == 100 for g in groups)
    assert run(m)
    dt = time.perf_counter() - t0
    verify(m)
    names = [op.name for op in m.main.ops]
    assert names.count("fused") == 60 and names.count("Softmax") == 60 and len(names) == 120
    got = Interpreter(m).run(x)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k])
    assert dt < 10, f"fuse-elementwise took {dt:.1f} s on 6000 ops"


def test_side_reader_closes_the_group():
    """a = Tanh(x); p = Softmax(a); b = Add(a, p): a's group is closed by Softmax (outlining
    {Tanh, Add} would put the fused op after Softmax, which reads a), so nothing fuses."""
    nodes = [h.make_node("Tanh", ["x"], ["a"]), h.make_node("Softmax", ["a"], ["p"]),
             h.make_node("Add", ["a", "p"], ["b"]), h.make_node("Relu", ["b"], ["y"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [2, 4])],
                     [h.make_tensor_value_info("y", T.FLOAT, [2, 4])])
    m = import_model(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=10))
    groups = find_groups(m.main)
    assert [[op.name for op in gr] for gr in groups] == [["Add", "Relu"]]
