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

    if packed in ("split_last", "slice_last"):  # GPT-2: c_attn's [B,S,3*H*D] split on the last axis
        assert T == S and Dv == D
        E = H * D
        inputs = [helper.make_tensor_value_info("qkv", F, [B, S, 3 * E])]
        parts = ["qp", "kp", "vp"]
        if packed == "split_last":
            nodes.append(N("Split", ["qkv", const("parts", np.array([E, E, E], np.int64))], parts, axis=2))
        else:
            for i, n in enumerate(parts):
                nodes.append(N("Slice", ["qkv", const(f"st{i}", np.array([i * E], np.int64)),
                                         const(f"en{i}", np.array([(i + 1) * E], np.int64)),
                                         const(f"ax{i}", np.array([-1], np.int64))], [n]))
        const("shh", np.array([B, S, H, D], np.int64))
        for n, h in zip(parts, ("qh", "kt", "vh")):  # K straight to [B,H,D,T], as GPT-2 exports it
            nodes += [N("Reshape", [n, "shh"], [n + "4"]),
                      N("Transpose", [n + "4"], [h], perm=[0, 2, 3, 1] if h == "kt" else [0, 2, 1, 3])]
    elif packed:  # ViT-style: one qkv input [B,S,3*H*D] -> [B,S,3,H,D] -> (2,0,3,1,4) -> q/k/v
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


def mha_model(B=1, S=16, H=2, D=8, bmm3d=False):
    """torch's nn.MultiheadAttention as torch.onnx exports it with the fast path off (ViT-B/16's
    self-attention), seq-first: the packed in_proj output qkv [S,B,3*E] -> Reshape [S,B,3,E] ->
    Unsqueeze(0) -> Transpose(3,1,2,0,4) -> Squeeze(3) -> [3,S,B,E] -> Gather(i) -> Reshape
    [S,B*H,D] -> Transpose(1,0,2) -> [B*H,S,D]; then either (bmm3d False) Reshape [B,H,S,D], q and
    K^T each scaled by D^-1/4, 4-D MatMuls, o Transpose(2,0,1,3) -> [S,B,H,D]; or (bmm3d) the
    batch-flattened 3-D bmm form, q scaled by D^-1/2, K^T = Transpose(0,2,1), o Transpose(1,0,2)
    -> [S,B*H,D]; finally Reshape [S*B,E] (out_proj's input)."""
    E = H * D
    nodes, inits = [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    nodes += [N("Reshape", ["qkv", const("sh4", np.array([S, B, 3, E], np.int64))], ["u4"]),
              N("Unsqueeze", ["u4", const("ax0", np.array([0], np.int64))], ["u5"]),
              N("Transpose", ["u5"], ["t5"], perm=[3, 1, 2, 0, 4]),
              N("Squeeze", ["t5", const("ax3", np.array([3], np.int64))], ["sq"])]
    const("shf", np.array([S, B * H, D], np.int64))
    const("sh4d", np.array([B, H, S, D], np.int64))
    for i, n in enumerate("qkv"):
        nodes += [N("Gather", ["sq", const(f"i{i}", np.array(i, np.int64))], [n + "g"], axis=0),
                  N("Reshape", [n + "g", "shf"], [n + "f"]), N("Transpose", [n + "f"], [n + "3"], perm=[1, 0, 2])]
        if not bmm3d:
            nodes.append(N("Reshape", [n + "3", "sh4d"], [n + "4"]))
    if bmm3d:
        nodes += [N("Mul", ["q3", const("c", np.array(D ** -0.5, np.float32))], ["qs"]),
                  N("Transpose", ["k3"], ["kt"], perm=[0, 2, 1]), N("MatMul", ["qs", "kt"], ["s"]),
                  N("Softmax", ["s"], ["p"], axis=-1), N("MatMul", ["p", "v3"], ["o"]),
                  N("Transpose", ["o"], ["ot"], perm=[1, 0, 2])]
    else:
        c = const("c", np.array(D ** -0.25, np.float32))
        nodes += [N("Mul", ["q4", c], ["qs"]), N("Transpose", ["k4"], ["kt0"], perm=[0, 1, 3, 2]),
                  N("Mul", ["kt0", c], ["kt"]), N("MatMul", ["qs", "kt"], ["s"]),
                  N("Softmax", ["s"], ["p"], axis=-1), N("MatMul", ["p", "v4"], ["o"]),
                  N("Transpose", ["o"], ["ot"], perm=[2, 0, 1, 3])]
    nodes.append(N("Reshape", ["ot", const("sho", np.array([S * B, E], np.int64))], ["y"]))
    g = helper.make_graph(nodes, "mha", [helper.make_tensor_value_info("qkv", F, [S, B, 3 * E])],
                          [helper.make_tensor_value_info("y", F, [S * B, E])], inits)
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


ATTENTION_TOL = {"fp16": 2e-2, "bf16": 6e-2, "fp32": 1e-4}


def assert_runs_like_interpreter(loaded, mod, rng, prec: str, runs: int = 2) -> None:
    """`loaded` (nnc.load of mod's build) against the interpreter on mod, output "y": fresh inputs
    each run, arena and outputs poisoned, finite, within ATTENTION_TOL[prec] relative to max(1, |ref|)."""
    tol = ATTENTION_TOL[prec]
    for _ in range(runs):
        feed = attention_feed(mod, rng)
        ref = Interpreter(mod).run(feed)["y"].astype(np.float64)
        got = np.asarray(loaded.run(feed, output="numpy", poison=True)["y"]).astype(np.float64)
        assert np.isfinite(got).all(), "non-finite output"
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * scale)


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
    "gpt2_split_last": dict(packed="split_last", causal=True, B=2),   # GPT-2: Split of c_attn's output
    "gpt2_slice_last": dict(packed="slice_last", mask="b1st"),
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
    assert f.attrs.params == "S=128 T=128 D=64 scale=0.125 mask transposes=q,k,v,o tile=64x128 warps=4"
    mod = import_model(attention_model(B=32, S=512, H=12, D=64))
    Pipeline(PRE + ["to-fp16", "fuse-attention"], verify_each=True).run(mod)
    assert _fused(mod)[0].attrs.params.endswith("tile=128x64 warps=4")  # 2 m-tiles a warp
    # the H200 sweep's winners at D=64: few heads -> 64-row CTAs over 128 K/V rows; a full GPU of
    # 128-row CTAs -> 32 K/V rows at S=128, 64 at S=512
    assert fuse_attention.choose_tile(128, 12) == (1, 4) and fuse_attention.choose_tile(512, 384) == (2, 4)
    assert [fuse_attention.choose_kv_rows(S, b) for S, b in ((128, 12), (512, 12), (128, 384), (512, 384))] == \
        [128, 128, 32, 64]
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
    """The packed q/k/v Transpose is also a graph output: it stays outside (computed once for
    the output) and the group reads q/k/v through strides into it (the Gathers absorbed)."""
    model = attention_model(packed="gather", mask=None)
    model.graph.output.append(helper.make_tensor_value_info("qkvt", F, [3, 1, 2, 16, 16]))
    mod = import_model(model)
    Pipeline(PRE, verify_each=True).run(mod)
    feed = attention_feed(mod, rng)
    before = Interpreter(mod).run(feed)
    assert fuse_attention.run(mod)
    names = [op.name for op in mod.main.ops if op.name != "const"]
    assert names.count("fused") == 1 and "Gather" not in names and "Transpose" in names
    after = Interpreter(mod).run(feed)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def _model(kw):
    kw = dict(kw)
    return mha_model(**kw["mha"]) if "mha" in kw else attention_model(**kw)


VIEWS = {"Reshape", "Unsqueeze"}
MHA_CASES = {  # kwargs, the ops left outside the group
    "vit_4d": (dict(B=1), VIEWS),
    "vit_4d_b2": (dict(B=2), VIEWS),  # B*H merged (not one stride apart), split again: still exact
    "mha_bmm3d": (dict(B=1, bmm3d=True), VIEWS),
    # 3-D bmm at B > 1: [B*H,S,D] of the packed buffer has no single B*H stride, so the packed
    # Transpose+Squeeze stay outside (one copy) and the group reads from its result
    "mha_bmm3d_b2": (dict(B=2, bmm3d=True), VIEWS | {"Transpose", "Squeeze"}),
}


@pytest.mark.parametrize("name", list(MHA_CASES))
def test_mha_export_fuses_with_no_copy_left(name, rng):
    """torch MHA (ViT): the whole chain from the packed in_proj output to out_proj's input is one
    group (Gathers, Squeeze, Transposes, the head split Reshapes absorbed as strides): outside it
    only the leading Reshape / Unsqueeze (free views) and the trailing Reshape stay."""
    kw, allowed = MHA_CASES[name]
    mod = import_model(mha_model(**kw))
    Pipeline(PRE, verify_each=True).run(mod)
    feed = attention_feed(mod, rng)
    before = Interpreter(mod).run(feed)
    Pipeline(["fuse-attention"], verify_each=True).run(mod)
    (f,) = _fused(mod)
    left = [op.name for op in mod.main.ops if op.name not in ("const", "fused")]
    assert set(left) <= allowed and left.count("Transpose") <= 1, left
    body = [op.name for op in f.attrs.body.ops]
    assert body.count("Gather") == 3 and body.count("Softmax") == 1
    assert "transposes=q,k,v,o" in f.attrs.params
    after = Interpreter(mod).run(feed)
    np.testing.assert_array_equal(before["y"], after["y"])


def test_packed_split_part_used_outside_stays_outside(rng):
    """GPT-2 form with the packed Split's V part also a graph output: the Split cannot be in the
    group (its result would leave it), so no operand reads through it; all three read their split
    part (q, k, v heads still through strides) and the interpreter agrees."""
    model = attention_model(packed="split_last", mask=None)
    model.graph.output.append(helper.make_tensor_value_info("vp", F, [1, 16, 32]))
    mod = import_model(model)
    Pipeline(PRE, verify_each=True).run(mod)
    feed = attention_feed(mod, rng)
    before = Interpreter(mod).run(feed)
    assert fuse_attention.run(mod)
    (f,) = _fused(mod)
    assert "Split" not in [op.name for op in f.attrs.body.ops]
    assert "Split" in [op.name for op in mod.main.ops]
    after = Interpreter(mod).run(feed)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_non_view_reshape_stays_outside():
    """A Reshape merging dims that are not one stride apart (after a Transpose) is no strided
    view: reshape_view declines it, and the View algebra is exact where it accepts."""
    V = fuse_attention.View
    # [2,3,4] transposed to [3,2,4] (strides 4,12,1): merging the first two dims needs a copy
    assert fuse_attention.reshape_view(V((3, 2, 4), (4, 12, 1)), (6, 4)) is None
    # splitting a dim and merging contiguous ones is fine
    got = fuse_attention.reshape_view(V((3, 2, 4), (4, 12, 1)), (3, 2, 2, 2))
    assert got == V((3, 2, 2, 2), (4, 12, 2, 1))
    assert fuse_attention.reshape_view(V((2, 3, 4), (12, 4, 1), 5), (1, 6, 1, 4)) == V((1, 6, 1, 4), (0, 4, 0, 1), 5)
    # every accepted reshape reads the same elements numpy's reshape of the strided array gives
    base = np.arange(200.0)
    for shape, strides, new in [((3, 2, 4), (4, 12, 1), (3, 8)), ((4, 6), (1, 4), (4, 2, 3)),
                                ((2, 1, 6), (30, 0, 2), (2, 3, 2)), ((6, 5), (5, 1), (30,))]:
        v = fuse_attention.reshape_view(V(shape, strides, 3), new)
        a = np.lib.stride_tricks.as_strided(base[3:], shape, [8 * s for s in strides])
        assert v is not None or a.reshape(new).base is None or not np.shares_memory(a.reshape(new), base)
        if v is None:
            continue
        b = np.lib.stride_tricks.as_strided(base[v.offset:], v.shape, [8 * s for s in v.strides])
        np.testing.assert_array_equal(a.reshape(new), b)
