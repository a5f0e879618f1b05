"""Small models with symbolic dims for range profiles (issue 10): tests and tools/bench_profiles.py.

- cnn(): ResNet-style, input f32[N,3,32,32] (examples/tiny_cnn.onnx: conv + folded BN, relu,
  residual add, max pool, global average pool, gemm, softmax).
- encoder(path, d=64, heads=4, ffn=128, embed=False): one BERT-style encoder layer, x f32[B,S,d]
  (embed: ids i64[B,S] through an embedding table, and an attention mask f32[B,S]) -> y f32[B,S,d]:
  QKV projections, Reshape [0,0,heads,d/heads] (0: the dim as it is), Transpose, QK^T * scale,
  Softmax, PV, Transpose, Reshape [0,0,d], output projection, residual, LayerNorm, FFN with Gelu,
  residual, LayerNorm. Seeded: the same file every time.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def cnn() -> Path:
    return ROOT / "examples" / "tiny_cnn.onnx"


def encoder(path, d: int = 64, heads: int = 4, ffn: int = 128, seed: int = 0, embed: bool = False) -> Path:
    """embed=True: BERT's inputs instead of x: ids i64[B,S] into a 100 x d embedding table
    (Gather) and an attention mask f32[B,S] (1 keep, 0 pad) added to the scores as (1 - mask) *
    -10000 broadcast over heads and query rows."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def t(name, a):
        inits.append(numpy_helper.from_array(np.asarray(a), name))
        return name

    def w(name, *shape):
        return t(name, (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32))

    def n(op, ins, out, **kw):
        nodes.append(helper.make_node(op, ins, [out], name=out, **kw))
        return out

    dh = d // heads
    split = t("heads_shape", np.array([0, 0, heads, dh], np.int64))
    merge = t("merge_shape", np.array([0, 0, d], np.int64))
    x = "x"
    if embed:
        x = n("Gather", [w("emb", 100, d), "ids"], "emb.x", axis=0)
        keep = n("Sub", [t("one", np.array(1.0, np.float32)), "mask"], "mask.inv")
        neg = n("Mul", [keep, t("neg", np.array(-10000.0, np.float32))], "mask.neg")
        maskadd = n("Unsqueeze", [neg, t("mask_axes", np.array([1, 2], np.int64))], "mask.b")

    def proj(p, src):
        y = n("MatMul", [src, w(f"{p}.w", d, d)], f"{p}.mm")
        y = n("Add", [y, w(f"{p}.b", d)], f"{p}.bias")
        y = n("Reshape", [y, split], f"{p}.heads")
        return y

    q = n("Transpose", [proj("q", x)], "q.t", perm=[0, 2, 1, 3])
    k = n("Transpose", [proj("k", x)], "k.t", perm=[0, 2, 3, 1])
    v = n("Transpose", [proj("v", x)], "v.t", perm=[0, 2, 1, 3])
    s = n("MatMul", [q, k], "scores")
    s = n("Mul", [s, t("scale", np.array(1.0 / np.sqrt(dh), np.float32))], "scores.scaled")
    if embed:
        s = n("Add", [s, maskadd], "scores.masked")
    p = n("Softmax", [s], "probs", axis=-1)
    a = n("MatMul", [p, v], "attn")
    a = n("Transpose", [a], "attn.t", perm=[0, 2, 1, 3])
    a = n("Reshape", [a, merge], "attn.flat")
    o = n("Add", [n("MatMul", [a, w("o.w", d, d)], "o.mm"), w("o.b", d)], "o.bias")
    h = n("Add", [o, x], "res1")
    h = n("LayerNormalization", [h, t("ln1.g", np.ones(d, np.float32)), t("ln1.b", np.zeros(d, np.float32))],
          "ln1", axis=-1, epsilon=1e-5)
    f = n("Add", [n("MatMul", [h, w("f1.w", d, ffn)], "f1.mm"), w("f1.b", ffn)], "f1.bias")
    f = n("Gelu", [f], "gelu")
    f = n("Add", [n("MatMul", [f, w("f2.w", ffn, d)], "f2.mm"), w("f2.b", d)], "f2.bias")
    y = n("Add", [f, h], "res2")
    nodes.append(helper.make_node("LayerNormalization", [y, t("ln2.g", np.ones(d, np.float32)),
                                                         t("ln2.b", np.zeros(d, np.float32))], ["y"], name="ln2",
                                  axis=-1, epsilon=1e-5))
    ins = ([helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", "S"])] if embed else
           [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", d])])
    g = helper.make_graph(nodes, "encoder", ins,
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", d])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    m.ir_version = 10  # onnxruntime 1.30 on the GPU machine reads <= 13 (and what is older)
    path = Path(path)
    onnx.save(m, str(path))
    return path
