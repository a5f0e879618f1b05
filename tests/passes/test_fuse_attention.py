"""fuse-attention (compiler/passes/fuse_attention.py): the attention subgraphs exporters write
become one `fused {kind = "attention"}` op holding exactly the pattern's ops (the head split /
merge Transposes included, the Reshapes left outside as views), the interpreter gives the same
outputs before and after, and near misses stay unfused. The golden IR cases are in
golden/fuse_attention.nnir (tests/passes/test_golden.py runs them). `attention_model` builds the
ONNX subgraphs the codegen tests (tests/codegen/test_flash_attention.py) and nothing else use."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnc.ir.interp import Interpreter
from nnc.onnx_import import import_model
from nnc.passes import fuse_attention
from nnc.pipeline import Pipeline

N = helper.make_node
F = TensorProto.FLOAT
PRE = ["fold-constants", "canonicalize", "simplify", "cse", "dce"]


def attention_model(B=1, S=16, H=2, D=16, T=None, Dv=None, mask="b11t", causal=False, scale_on="scores",
                    merge=True, kt_input=False, softmax_axis=-1, mask_first=False, gpt2_kt=False, packed=None):
    """An ONNX attention subgraph as transformers exports it (fp32; compile at fp16/bf16 to get
    those types): inputs q [B,S,H*D], k [B,T,H*D], v [B,T,H*Dv] (kt_input: kt [B,H,D,T] given
    already transposed; packed: one qkv [B,S,3*H*D] split ViT-style through [B,S,3,H,D] and
    Transpose(2,0,3,1,4), q/k/v picked by Gather ("gather") or Split+Squeeze ("split")), head
    split Reshape+Transpose, MatMul, scale (Div on the scores, or Mul
    of Q), optional causal Where (GPT-2) and additive mask of the given broadcast form
    ("b11t" [B,1,1,T], "b1st" [B,1,S,T], "11st" [1,1,S,T], "bhst" [B,H,S,T], None), Softmax,
    MatMul with V, and (merge) the Transpose+Reshape back to [B,S,H*Dv]."""
    T = T or S
    Dv = Dv or D
    nodes, inits = [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    if packed:  # ViT-style: one qkv input [B,S,3*H*D] -> [B,S,3,H,D] -> (2,0,3,1,4) -> q/k/v
        assert T == S and Dv == D
        inputs = [helper.make_tensor_value_info("qkv", F, [B, S, 3 * H * D])]
        const("sh5", np.array([B, S, 3, H, D], np.int64))
        nodes += [N("Reshape", ["qkv", "sh5"], ["qkv5"]), N("Transpose", ["qkv5"], ["qkvt"], perm=[2, 0, 3, 1, 4])]
        if packed == "gather":
            for i, n in enumerate(("qh", "kh", "vh")):
                nodes.append(N("Gather", ["qkvt", const(f"i{i}", np.array(i, np.int64))], [n], axis=0))
        else:  # unbind(0): Split + Squeeze
            nodes.append(N("Split", ["qkvt", const("parts", np.array([1, 1, 1], np.int64))], ["p0", "p1", "p2"], axis=0))
            const("ax0", np.array([0], np.int64))
            for i, n in enumerate(("qh", "kh", "vh")):
                nodes.append(N("Squeeze", [f"p{i}", "ax0"], [n]))
        nodes.append(N("Transpose", ["kh"], ["kt"], perm=[0, 1, 3, 2]))
    else:
        inputs = [helper.make_tensor_value_info("q", F, [B, S, H * D])]
        const("shq", np.array([B, S, H, D], np.int64))
        nodes += [N("Reshape", ["q", "shq"], ["q4"]), N("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3])]
    if packed:
        pass
    elif kt_input:
        inputs.append(helper.make_tensor_value_info("kt", F, [B, H, D, T]))
    else:
        inputs.append(helper.make_tensor_value_info("k", F, [B, T, H * D]))
        const("shk", np.array([B, T, H, D], np.int64))
        nodes.append(N("Reshape", ["k", "shk"], ["k4"]))
        if gpt2_kt:  # split heads, then swap the last two axes (GPT-2's key.transpose(-1, -2))
            nodes += [N("Transpose", ["k4"], ["kh"], perm=[0, 2, 1, 3]), N("Transpose", ["kh"], ["kt"], perm=[0, 1, 3, 2])]
        else:
            nodes.append(N("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]))
    if not packed:
        inputs.append(helper.make_tensor_value_info("v", F, [B, T, H * Dv]))
        const("shv", np.array([B, T, H, Dv], np.int64))
        nodes += [N("Reshape", ["v", "shv"], ["v4"]), N("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3])]
    qin = "qh"
    if scale_on == "q":
        const("qscale", np.array(1.0 / np.sqrt(D), np.float32))
        nodes.append(N("Mul", ["qh", "qscale"], ["qs"]))
        qin = "qs"
    nodes.append(N("MatMul", [qin, "kt"], ["s0"]))
    cur = "s0"
    if scale_on == "scores":
        const("sc", np.array(np.sqrt(D), np.float32))
        nodes.append(N("Div", [cur, "sc"], ["s1"]))
        cur = "s1"
    if causal:
        const("tril", np.tril(np.ones((S, T), bool), T - S)[None, None])
        const("neg", np.array(np.finfo(np.float32).min, np.float32))
        nodes.append(N("Where", ["tril", cur, "neg"], ["s2"]))
        cur = "s2"
    if mask is not None:
        shape = {"b11t": [B, 1, 1, T], "b1st": [B, 1, S, T], "11st": [1, 1, S, T], "bhst": [B, H, S, T]}[mask]
        inputs.append(helper.make_tensor_value_info("mask", F, shape))
        nodes.append(N("Add", ["mask", cur] if mask_first else [cur, "mask"], ["s3"]))
        cur = "s3"
    nodes.append(N("Softmax", [cur], ["p"], axis=softmax_axis))
    nodes.append(N("MatMul", ["p", "vh"], ["o"]))
    if merge:
        const("sho", np.array([B, S, H * Dv], np.int64))
        nodes += [N("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]), N("Reshape", ["ot", "sho"], ["y"])]
        out = helper.make_tensor_value_info("y", F, [B, S, H * Dv])
    else:
        nodes.append(N("Identity", ["o"], ["y"]))
        out = helper.make_tensor_value_info("y", F, [B, H, S, Dv])
    g = helper.make_graph(nodes, "attention", inputs, [out], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def attention_feed(mod, rng, masked_fraction=0.25):
    """Random inputs; a mask input gets -1e4 at some positions (padding) besides small noise."""
    feed = {}
    for a in mod.main.args:
        shape = [int(d) for d in a.type.shape]
        x = rng.standard_normal(shape).astype(np.float32)
        if a.name == "mask":
            x = np.where(rng.random(shape) < masked_fraction, -1e4, 0.5 * x).astype(np.float32)
        feed[a.name] = x
    return feed


def _fused(mod):
    return [op for op in mod.main.ops if op.name == "fused"]


CASES = {
    "bert": dict(),
    "bert_mask_first": dict(mask_first=True),
    "gpt2": dict(causal=True, mask="b11t", gpt2_kt=True),
    "causal_only": dict(causal=True, mask=None),
    "scale_on_q": dict(scale_on="q", mask="b1st"),
    "mask_11st": dict(mask="11st", T=24),
    "mask_bhst": dict(mask="bhst", B=2),
    "no_mask_no_merge": dict(mask=None, merge=False),
    "kt_input": dict(kt_input=True),
    "dv_differs": dict(Dv=32),
    "packed_gather": dict(packed="gather", mask=None),
    "packed_split": dict(packed="split", B=2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pattern_fuses_and_interpreter_agrees(name, rng):
    kw = CASES[name]
    mod = import_model(attention_model(**kw))
    Pipeline(PRE, verify_each=True).run(mod)
    feed = attention_feed(mod, rng)
    before = Interpreter(mod).run(feed)
    Pipeline(["fuse-attention"], verify_each=True).run(mod)
    fused = _fused(mod)
    assert [op.attrs.kind for op in fused] == ["attention"]
    body = [op.name for op in fused[0].attrs.body.ops]
    assert body.count("Softmax") == 1 and body.count("MatMul") == 2
    # no head split / merge Transpose left outside the group
    assert "Transpose" not in [op.name for op in mod.main.ops], [op.name for op in mod.main.ops]
    after = Interpreter(mod).run(feed)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    p = fused[0].attrs.params
    assert f"D={kw.get('D', 16)}" in p and ("mask" in p) == (kw.get("mask", "b11t") is not None)
    assert ("where" in p) == bool(kw.get("causal"))


def test_params_name_the_tile_and_transposes():
    mod = import_model(attention_model(B=1, S=128, H=12, D=64))
    Pipeline(PRE + ["to-fp16", "fuse-attention"], verify_each=True).run(mod)
    (f,) = _fused(mod)
    assert f.attrs.params == "S=128 T=128 D=64 scale=0.125 mask transposes=q,k,v,o tile=32x64 warps=2"
    mod = import_model(attention_model(B=32, S=512, H=12, D=64))
    Pipeline(PRE + ["to-fp16", "fuse-attention"], verify_each=True).run(mod)
    assert _fused(mod)[0].attrs.params.endswith("tile=128x64 warps=4")  # 2 m-tiles a warp
    assert fuse_attention.choose_tile(128, 12) == (1, 2) and fuse_attention.choose_tile(512, 384) == (2, 4)
    assert fuse_attention.choose_tile(512, 384, D=128, Dv=128) == (1, 8)
    assert fuse_attention.parse_tile("S=4 tile=128x64 warps=4") == (2, 4)
    assert fuse_attention.parse_tile("tile=48x64 warps=4") is None and fuse_attention.parse_tile("simt") is None


NEAR_MISSES = {
    "softmax_not_last_axis": dict(softmax_axis=2),
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_near_misses_stay_unfused(name):
    mod = import_model(attention_model(**NEAR_MISSES[name]))
    Pipeline(PRE, verify_each=True).run(mod)
    assert not fuse_attention.run(mod)
    assert not _fused(mod)


def test_scores_used_elsewhere_or_returned_stay_unfused():
    """The probabilities are also a graph output: the group would have to write the S x T tensor."""
    model = attention_model()
    model.graph.output.append(helper.make_tensor_value_info("p", F, [1, 2, 16, 16]))
    mod = import_model(model)
    Pipeline(PRE, verify_each=True).run(mod)
    assert not fuse_attention.run(mod)


def test_constant_over_scores_stays_unfused():
    """Div(c, scores) is no scale of the scores."""
    from nnc.ir import parse
    text = """func @main(%q: f32[2,4,8], %kt: f32[2,8,4], %v: f32[2,4,8], %m: f32[2,4,4]) -> (f32[2,4,8]) {
  %s = MatMul(%q, %kt) : f32[2,4,4]
  %c = const() {value = dense<[2.0]> : f32[]} : f32[]
  %s1 = Div(%c, %s) : f32[2,4,4]
  %p = Softmax(%s1) {axis = -1} : f32[2,4,4]
  %o = MatMul(%p, %v) : f32[2,4,8]
  return %o
}
"""
    m = parse(text)
    assert not fuse_attention.run(m)


def test_packed_transpose_used_outside_is_not_absorbed(rng):
    """The packed q/k/v Transpose is also a graph output: the group reads the picked q/k/v as
    they are (the Transpose and the Gathers stay outside), and still fuses."""
    model = attention_model(packed="gather", mask=None)
    model.graph.output.append(helper.make_tensor_value_info("qkvt", F, [3, 1, 2, 16, 16]))
    mod = import_model(model)
    Pipeline(PRE, verify_each=True).run(mod)
    feed = attention_feed(mod, rng)
    before = Interpreter(mod).run(feed)
    assert fuse_attention.run(mod)
    names = [op.name for op in mod.main.ops if op.name != "const"]
    assert names.count("fused") == 1 and names.count("Gather") == 3 and "Transpose" in names
    after = Interpreter(mod).run(feed)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
