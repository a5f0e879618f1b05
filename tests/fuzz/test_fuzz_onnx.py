"""Mutated ONNX models (byte flips, truncations, and field mutations through the protobuf API:
dims, attributes, names, dtypes, dropped inputs and nodes, op types, opsets) built from
examples/*.onnx and small synthetic models. Fixed seeds, a bounded number per run."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T, helper as h, numpy_helper as nh

from .harness import Tally, check_module

ROOT = Path(__file__).resolve().parents[2]
N_CASES = 200
SEED = 6


def vi(name, dt=T.FLOAT, shape=None):
    return h.make_tensor_value_info(name, dt, shape)


def _m(nodes, inputs, outputs, inits=(), opset=17):
    return h.make_model(h.make_graph(nodes, "g", inputs, outputs, list(inits)),
                        opset_imports=[h.make_opsetid("", opset)])


def synthetic_models() -> list[onnx.ModelProto]:
    r = np.random.default_rng(0)
    w = nh.from_array(r.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    b = nh.from_array(r.standard_normal(4).astype(np.float32), "b")
    cnn = _m([h.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[1, 1]),
              h.make_node("Relu", ["c"], ["r"], name="relu"),
              h.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
              h.make_node("GlobalAveragePool", ["p"], ["y"], name="gap")],
             [vi("x", shape=[1, 3, 8, 8])], [vi("y")], [w, b])
    mw = nh.from_array(r.standard_normal((6, 5)).astype(np.float32), "mw")
    mlp = _m([h.make_node("MatMul", ["x", "mw"], ["m"], name="mm"),
              h.make_node("Add", ["m", "bias"], ["a"], name="add"),
              h.make_node("Softmax", ["a"], ["y"], name="sm", axis=-1)],
             [vi("x", shape=[2, 6])], [vi("y")], [mw, nh.from_array(np.ones(5, np.float32), "bias")])
    shp = _m([h.make_node("Reshape", ["x", "s"], ["r"], name="reshape"),
              h.make_node("Transpose", ["r"], ["t"], name="tr", perm=[1, 0]),
              h.make_node("Gather", ["t", "i"], ["g"], name="gather", axis=0),
              h.make_node("Slice", ["g", "st", "en"], ["sl"], name="slice"),
              h.make_node("Concat", ["sl", "sl"], ["y"], name="cat", axis=1)],
             [vi("x", shape=[2, 3, 4])], [vi("y")],
             [nh.from_array(np.array([6, 4], np.int64), "s"), nh.from_array(np.array([0, 2], np.int64), "i"),
              nh.from_array(np.array([1], np.int64), "st"), nh.from_array(np.array([5], np.int64), "en")])
    gen = _m([h.make_node("Shape", ["x"], ["sh"], name="shape"),
              h.make_node("ConstantOfShape", ["sh"], ["c"], name="cos",
                          value=nh.from_array(np.array([0.5], np.float32))),
              h.make_node("Range", ["s0", "lim", "d"], ["rg"], name="range"),
              h.make_node("Mul", ["x", "c"], ["m"], name="mul"),
              h.make_node("Add", ["m", "rg"], ["y"], name="add")],
             [vi("x", shape=[3, 5])], [vi("y")],
             [nh.from_array(np.float32(0), "s0"), nh.from_array(np.float32(5), "lim"),
              nh.from_array(np.float32(1), "d")])
    then = h.make_graph([h.make_node("Relu", ["x"], ["tr"], name="t_relu")], "then", [], [vi("tr", shape=[4])])
    els = h.make_graph([h.make_node("Neg", ["x"], ["en"], name="e_neg")], "else", [], [vi("en", shape=[4])])
    cond = _m([h.make_node("ReduceSum", ["x"], ["s"], name="rs", keepdims=0),
               h.make_node("Greater", ["s", "z"], ["c"], name="gt"),
               h.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=els)],
              [vi("x", shape=[4])], [vi("y")], [nh.from_array(np.float32(0), "z")])
    norm = _m([h.make_node("LayerNormalization", ["x", "g", "bb"], ["n"], name="ln", axis=-1),
               h.make_node("Tanh", ["n"], ["t"], name="tanh"),
               h.make_node("ReduceMean", ["t", "ax"], ["y"], name="rm", keepdims=1)],
              [vi("x", shape=[2, 3, 8])], [vi("y")],
              [nh.from_array(np.ones(8, np.float32), "g"), nh.from_array(np.zeros(8, np.float32), "bb"),
               nh.from_array(np.array([1], np.int64), "ax")], opset=18)
    return [cnn, mlp, shp, gen, cond, norm]


def seeds() -> list[onnx.ModelProto]:
    out = synthetic_models()
    for p in sorted((ROOT / "examples").glob("*.onnx")):
        out.append(onnx.load(str(p)))
    return out


_ATTR_INTS = [-(2 ** 40), -3, -1, 0, 1, 2, 3, 7, 10 ** 9]
_DIMS = [-5, -1, 0, 1, 2, 3, 10 ** 9, 2 ** 40]


def _graphs(m: onnx.ModelProto):
    stack = [m.graph]
    while stack:
        g = stack.pop()
        yield g
        for n in g.node:
            for a in n.attribute:
                if a.HasField("g"):
                    stack.append(a.g)


def mutate(m: onnx.ModelProto, rng) -> tuple[str, bytes]:
    """One mutant (description, serialized bytes): one to three mutations stacked."""
    kinds, data = [], b""
    for _ in range(int(rng.integers(1, 4))):
        kind, data = mutate_once(m, rng)
        kinds.append(kind)
        if kind in ("flip", "truncate"):
            break
        m = onnx.load_from_string(data)
    return "+".join(kinds), data


def mutate_once(m: onnx.ModelProto, rng) -> tuple[str, bytes]:
    kind = rng.choice(["flip", "truncate", "dims", "attr", "name", "dtype", "drop_input", "drop_node",
                       "op_type", "opset", "init_value"])
    if kind == "flip":
        b = bytearray(m.SerializeToString())
        for _ in range(int(rng.integers(1, 9))):
            b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
        return kind, bytes(b)
    if kind == "truncate":
        b = m.SerializeToString()
        return kind, b[:int(rng.integers(len(b)))]
    m = copy.deepcopy(m)
    graphs = list(_graphs(m))
    g = graphs[int(rng.integers(len(graphs)))]
    nodes = list(g.node)
    node = nodes[int(rng.integers(len(nodes)))] if nodes else None
    if kind == "dims":
        vis = [v for v in list(g.input) + list(g.output) if v.type.tensor_type.shape.dim]
        if vis:
            v = vis[int(rng.integers(len(vis)))]
            dims = v.type.tensor_type.shape.dim
            d = dims[int(rng.integers(len(dims)))]
            if rng.random() < 0.2:
                d.dim_param = str(rng.choice(["N", "", "a b", "x\n#y"]))
            else:
                d.dim_value = int(rng.choice(_DIMS))
    elif kind == "attr" and node is not None:
        attrs = [a for a in node.attribute if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS,
                                                         onnx.AttributeProto.FLOAT, onnx.AttributeProto.FLOATS,
                                                         onnx.AttributeProto.STRING)]
        r = rng.random()
        if attrs and r < 0.7:
            a = attrs[int(rng.integers(len(attrs)))]
            if a.type == onnx.AttributeProto.INT:
                a.i = int(rng.choice(_ATTR_INTS))
            elif a.type == onnx.AttributeProto.INTS:
                vals = [int(rng.choice(_ATTR_INTS)) for _ in range(int(rng.integers(0, 6)))]
                del a.ints[:]
                a.ints.extend(vals)
            elif a.type == onnx.AttributeProto.FLOAT:
                a.f = float(rng.choice([0.0, -1.0, 1e30, float("nan"), float("inf")]))
            elif a.type == onnx.AttributeProto.FLOATS:
                del a.floats[:]
                a.floats.extend([float("nan"), -1.0])
            else:
                a.s = bytes(rng.choice([b"", b"SAME_UPPER", b"bogus", b"\xff\xfe"]))
        elif node.attribute and r < 0.85:
            del node.attribute[int(rng.integers(len(node.attribute)))]
        else:
            node.attribute.append(h.make_attribute(str(rng.choice(["axis", "perm", "pads", "bogus"])),
                                                   int(rng.choice(_ATTR_INTS))))
    elif kind == "name" and node is not None:
        names = [n for nd in nodes for n in list(nd.input) + list(nd.output)] + [i.name for i in g.input]
        pick = str(rng.choice(names + ["", "undefined", "x\ny", "\u2028"])) if names else "z"
        if node.input and rng.random() < 0.6:
            node.input[int(rng.integers(len(node.input)))] = pick
        elif node.output:
            node.output[int(rng.integers(len(node.output)))] = pick
    elif kind == "dtype":
        r = rng.random()
        dt = int(rng.integers(0, 28))
        if r < 0.4 and g.input:
            g.input[int(rng.integers(len(g.input)))].type.tensor_type.elem_type = dt
        elif r < 0.7 and g.initializer:
            g.initializer[int(rng.integers(len(g.initializer)))].data_type = dt
        elif g.output:
            g.output[int(rng.integers(len(g.output)))].type.tensor_type.elem_type = dt
    elif kind == "drop_input" and node is not None and node.input:
        del node.input[int(rng.integers(len(node.input)))]
    elif kind == "drop_node" and nodes:
        del g.node[int(rng.integers(len(nodes)))]
    elif kind == "op_type" and node is not None:
        node.op_type = str(rng.choice(["Relu", "Add", "Conv", "Reshape", "Gather", "Concat", "Slice", "If",
                                       "Loop", "Split", "Pad", "Resize", "TopK", "Expand", "Unknown"]))
    elif kind == "opset":
        m.opset_import[0].version = int(rng.choice([0, 1, 6, 11, 13, 21, 28, 29, -1]))
    elif kind == "init_value" and g.initializer:
        t = g.initializer[int(rng.integers(len(g.initializer)))]
        try:
            a = nh.to_array(t).copy()
        except Exception:  # an earlier mutation already broke this tensor
            a = np.zeros(0)
        if a.size:
            flat = a.reshape(-1)
            if a.dtype.kind in "iu":
                flat[int(rng.integers(flat.size))] = rng.choice([-(2 ** 40), -7, 0, 10 ** 6])
            elif a.dtype.kind == "f":
                flat[int(rng.integers(flat.size))] = rng.choice([np.nan, np.inf, 1e30])
            t.CopyFrom(nh.from_array(a, t.name))
        dims = list(t.dims)
        if dims and rng.random() < 0.3:  # dims no longer matching the data
            t.dims[int(rng.integers(len(dims)))] = int(rng.choice(_DIMS[:4]))
    return kind, m.SerializeToString()


def run_onnx_case(data: bytes, path: Path, rng) -> None:
    from nnc.onnx_import import import_model
    path.write_bytes(data)
    check_module(import_model(path), rng)


def test_fuzz_onnx(tmp_path):
    rng = np.random.default_rng(SEED)
    base = seeds()
    tally = Tally()
    for k in range(N_CASES):
        m = base[k % len(base)]
        kind, data = mutate(m, rng)
        case_rng = np.random.default_rng(k)
        tally.record(f"case {k}: {kind} of seed {k % len(base)}",
                     lambda: run_onnx_case(data, tmp_path / "m.onnx", case_rng))
    print(tally.report().splitlines()[0])
    assert not tally.findings, tally.report()
    assert tally.clean_errors and tally.results  # the mutants exercise both outcomes
