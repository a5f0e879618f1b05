"""shard-tensor-parallel (compiler/passes/shard_tensor_parallel.py): Megatron-style tensor
parallelism of transformer blocks over K devices, one Module per device.

Golden checks (FileCheck-style, ordered CHECK lines over a device's printed IR) on what the default
pipeline makes of a 2-layer BERT-style encoder (fuse-horizontal's stacked Q/K/V GEMM, the fused
attention, GELU epilogues) and a GPT-style decoder (packed c_attn + Split, causal Where): the
column-split shapes, the heads per device, the AllReduce after each row-split GEMM and the bias
after it; numerical checks: the K-device reference run (nnc.multi_device.run_multi) equals the
single-device interpreter (K = 2 and 4, fp32 rel 1e-3; fp16 rel 1e-2); errors for heads or hidden
sizes that do not divide by K; what is not a block stays replicated."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from nnc.driver import pipeline_passes
from nnc.ir import parse
from nnc.ir.errors import NncError
from nnc.ir.interp import Interpreter
from nnc.ir.printer import print_module
from nnc.multi_device import run_multi, verify_multi
from nnc.onnx_import import import_model
from nnc.passes.shard_tensor_parallel import (Split, reshape_split, shard_array, shard_tensor_parallel,
                                              tp_allreduce_bytes)
from nnc.pipeline import Pipeline

N = h.make_node


def _model(nodes, inputs, inits, out, name):
    g = h.make_graph(nodes, name, inputs, [h.make_tensor_value_info(out, TP.FLOAT, None)],
                     [nh.from_array(np.asarray(a), n) for n, a in inits])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def bert_encoder(L=2, B=2, S=16, E=64, H=4, F=None, seed=0, head_mask=False):
    """A post-LN BERT encoder stack as transformers exports it: Q/K/V MatMul + bias Add, head
    split Reshape/Transpose, scores / sqrt(D) + mask [B,1,1,S] (head_mask: an input [B,H,S,S],
    one mask per head), Softmax, head merge, output projection + bias + residual, LayerNorm,
    FFN with GELU written out in erf form, LayerNorm."""
    F = F or 4 * E
    r = np.random.default_rng(seed)
    w = lambda *s: (r.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)
    b = lambda n: (0.1 * r.standard_normal(n)).astype(np.float32)
    D = E // H
    inits = [("hs", np.array([B, S, H, D], np.int64)), ("os", np.array([B, S, E], np.int64)),
             ("sc", np.array(np.sqrt(D), np.float32)), ("half", np.array(0.5, np.float32)),
             ("one", np.array(1.0, np.float32)), ("sq2", np.array(np.sqrt(2.0), np.float32))]
    nodes, x = [], "x"
    for layer in range(L):
        p = f"l{layer}."
        for q in "qkv":
            inits += [(p + "w" + q, w(E, E)), (p + "b" + q, b(E))]
            nodes += [N("MatMul", [x, p + "w" + q], [p + q + "m"]), N("Add", [p + "b" + q, p + q + "m"], [p + q + "a"]),
                      N("Reshape", [p + q + "a", "hs"], [p + q + "r"])]
        nodes += [N("Transpose", [p + "qr"], [p + "qt"], perm=[0, 2, 1, 3]),
                  N("Transpose", [p + "kr"], [p + "kt"], perm=[0, 2, 3, 1]),
                  N("Transpose", [p + "vr"], [p + "vt"], perm=[0, 2, 1, 3]),
                  N("MatMul", [p + "qt", p + "kt"], [p + "s0"]), N("Div", [p + "s0", "sc"], [p + "s1"]),
                  N("Add", [p + "s1", "mask"], [p + "s2"]),
                  N("Softmax", [p + "s2"], [p + "pr"], axis=-1), N("MatMul", [p + "pr", p + "vt"], [p + "c"]),
                  N("Transpose", [p + "c"], [p + "ct"], perm=[0, 2, 1, 3]), N("Reshape", [p + "ct", "os"], [p + "cr"])]
        inits += [(p + "wo", w(E, E)), (p + "bo", b(E)), (p + "g1", 1 + b(E)), (p + "be1", b(E)),
                  (p + "w1", w(E, F)), (p + "b1", b(F)), (p + "w2", w(F, E)), (p + "b2", b(E)),
                  (p + "g2", 1 + b(E)), (p + "be2", b(E))]
        nodes += [N("MatMul", [p + "cr", p + "wo"], [p + "om"]), N("Add", [p + "om", p + "bo"], [p + "oa"]),
                  N("Add", [p + "oa", x], [p + "res1"]),
                  N("LayerNormalization", [p + "res1", p + "g1", p + "be1"], [p + "ln1"], axis=-1, epsilon=1e-5),
                  N("MatMul", [p + "ln1", p + "w1"], [p + "f1"]), N("Add", [p + "f1", p + "b1"], [p + "f1b"]),
                  N("Div", [p + "f1b", "sq2"], [p + "g0"]), N("Erf", [p + "g0"], [p + "g1e"]),
                  N("Add", [p + "g1e", "one"], [p + "g2e"]), N("Mul", [p + "f1b", p + "g2e"], [p + "g3"]),
                  N("Mul", [p + "g3", "half"], [p + "gelu"]),
                  N("MatMul", [p + "gelu", p + "w2"], [p + "f2"]), N("Add", [p + "f2", p + "b2"], [p + "f2b"]),
                  N("Add", [p + "f2b", p + "ln1"], [p + "res2"]),
                  N("LayerNormalization", [p + "res2", p + "g2", p + "be2"], [p + "out"], axis=-1, epsilon=1e-5)]
        x = p + "out"
    nodes.append(N("Identity", [x], ["y"]))
    ins = [h.make_tensor_value_info("x", TP.FLOAT, [B, S, E]),
           h.make_tensor_value_info("mask", TP.FLOAT, [B, H, S, S] if head_mask else [B, 1, 1, S])]
    return _model(nodes, ins, inits, "y", "bert")


def gpt_decoder(L=2, B=2, S=16, E=64, H=4, F=None, seed=1, lm_head=0, gemm=False):
    """A pre-LN GPT-2 decoder stack: LayerNorm, packed c_attn [E, 3E] + bias, Split into q/k/v,
    head split, causal Where(tril, scores, min), Softmax, head merge, c_proj + bias + residual,
    LayerNorm, c_fc + GELU (tanh form written out), c_proj + bias + residual; a final LayerNorm
    (and with lm_head=V a [E, V] projection to logits: a column GEMM no row GEMM closes).
    gemm: the projections as transformers' GPT-2 export writes them (addmm): Reshape to
    [B*S, E], Gemm(x, W, bias), Reshape back; the FFN's as torch Linear (transB = 1, W [out, in])."""
    F = F or 4 * E
    r = np.random.default_rng(seed)
    w = lambda *s: (r.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)
    b = lambda n: (0.1 * r.standard_normal(n)).astype(np.float32)
    D = E // H
    inits = [("hs", np.array([B, S, H, D], np.int64)), ("os", np.array([B, S, E], np.int64)),
             ("sc", np.array(np.sqrt(D), np.float32)), ("parts", np.array([E, E, E], np.int64)),
             ("tril", np.tril(np.ones((S, S), bool))[None, None]),
             ("neg", np.array(np.finfo(np.float32).min, np.float32)),
             ("half", np.array(0.5, np.float32)), ("one", np.array(1.0, np.float32)),
             ("c0", np.array(np.sqrt(2 / np.pi), np.float32)), ("c1", np.array(0.044715, np.float32)),
             ("three", np.array(3.0, np.float32))]
    inits += [("flat", np.array([B * S, E], np.int64)), ("flatf", np.array([B * S, F], np.int64)),
              ("sh3", np.array([B, S, 3 * E], np.int64)), ("shf", np.array([B, S, F], np.int64))]
    nodes, x = [], "x"

    def linear(a, wname, bname, out, flat, back, trans=0):
        if not gemm:
            return [N("MatMul", [a, wname], [out + ".mm"]), N("Add", [out + ".mm", bname], [out])]
        if trans:
            inits[:] = [(n, np.ascontiguousarray(v.T) if n == wname else v) for n, v in inits]
        return [N("Reshape", [a, flat], [out + ".2d"]),
                N("Gemm", [out + ".2d", wname, bname], [out + ".g"], transB=trans),
                N("Reshape", [out + ".g", back], [out])]

    for layer in range(L):
        p = f"l{layer}."
        inits += [(p + "g1", 1 + b(E)), (p + "be1", b(E)), (p + "wa", w(E, 3 * E)), (p + "ba", b(3 * E)),
                  (p + "wo", w(E, E)), (p + "bo", b(E)), (p + "g2", 1 + b(E)), (p + "be2", b(E)),
                  (p + "wf", w(E, F)), (p + "bf", b(F)), (p + "wp", w(F, E)), (p + "bp", b(E))]
        nodes += [N("LayerNormalization", [x, p + "g1", p + "be1"], [p + "ln1"], axis=-1, epsilon=1e-5),
                  *linear(p + "ln1", p + "wa", p + "ba", p + "aa", "flat", "sh3"),
                  N("Split", [p + "aa", "parts"], [p + "q", p + "k", p + "v"], axis=2)]
        nodes += [N("Reshape", [p + q, "hs"], [p + q + "r"]) for q in "qkv"]
        nodes += [N("Transpose", [p + "qr"], [p + "qt"], perm=[0, 2, 1, 3]),
                  N("Transpose", [p + "kr"], [p + "kt"], perm=[0, 2, 3, 1]),
                  N("Transpose", [p + "vr"], [p + "vt"], perm=[0, 2, 1, 3]),
                  N("MatMul", [p + "qt", p + "kt"], [p + "s0"]), N("Div", [p + "s0", "sc"], [p + "s1"]),
                  N("Where", ["tril", p + "s1", "neg"], [p + "s2"]),
                  N("Softmax", [p + "s2"], [p + "pr"], axis=-1), N("MatMul", [p + "pr", p + "vt"], [p + "c"]),
                  N("Transpose", [p + "c"], [p + "ct"], perm=[0, 2, 1, 3]), N("Reshape", [p + "ct", "os"], [p + "cr"]),
                  *linear(p + "cr", p + "wo", p + "bo", p + "oa", "flat", "os"),
                  N("Add", [x, p + "oa"], [p + "res1"]),
                  N("LayerNormalization", [p + "res1", p + "g2", p + "be2"], [p + "ln2"], axis=-1, epsilon=1e-5),
                  *linear(p + "ln2", p + "wf", p + "bf", p + "h", "flat", "shf", trans=1),
                  N("Pow", [p + "h", "three"], [p + "h3"]), N("Mul", [p + "h3", "c1"], [p + "h3c"]),
                  N("Add", [p + "h", p + "h3c"], [p + "inner"]), N("Mul", [p + "inner", "c0"], [p + "inner2"]),
                  N("Tanh", [p + "inner2"], [p + "th"]), N("Add", [p + "th", "one"], [p + "th1"]),
                  N("Mul", [p + "h", "half"], [p + "hh"]), N("Mul", [p + "hh", p + "th1"], [p + "gelu"]),
                  *linear(p + "gelu", p + "wp", p + "bp", p + "f2b", "flatf", "os", trans=1),
                  N("Add", [p + "res1", p + "f2b"], [p + "out"])]
        x = p + "out"
    inits += [("gf", 1 + b(E)), ("bef", b(E))]
    nodes.append(N("LayerNormalization", [x, "gf", "bef"], ["y"], axis=-1, epsilon=1e-5))
    out = "y"
    if lm_head:
        inits.append(("wlm", w(E, lm_head)))
        nodes.append(N("MatMul", ["y", "wlm"], ["logits"]))
        out = "logits"
    return _model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [B, S, E])], inits, out, "gpt")


def llama_decoder(L=2, B=1, S=16, E=64, H=4, F=96, seed=2, kv_heads=None, qk_norm=False):
    """A LLaMA-style stack: RMSNorm written out, Q/K/V without biases, rotary embedding by halves
    (Slice, Neg, Concat, Mul by constant cos/sin [S, D]), additive causal mask, SwiGLU (SiLU
    written out) with separate gate and up projections, no biases anywhere. kv_heads: grouped-query
    attention, K/V of kv_heads heads repeated as transformers' repeat_kv writes it (Unsqueeze,
    Expand, Reshape). qk_norm: an RMSNorm over each head's D of Q and K (ReduceMean per head)."""
    r = np.random.default_rng(seed)
    w = lambda *s: (r.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)
    D = E // H
    G = kv_heads or H
    ang = np.arange(S)[:, None] / (10000 ** (np.arange(D // 2) / (D // 2)))[None]
    inits = [("hs", np.array([B, S, H, D], np.int64)), ("os", np.array([B, S, E], np.int64)),
             ("sc", np.array(np.sqrt(D), np.float32)), ("two", np.array(2.0, np.float32)),
             ("eps", np.array(1e-5, np.float32)),
             ("cos", np.cos(np.concatenate([ang, ang], 1)).astype(np.float32)),
             ("sin", np.sin(np.concatenate([ang, ang], 1)).astype(np.float32)),
             ("causal", np.triu(np.full((S, S), -1e9, np.float32), 1)[None, None]),
             ("h0", np.array([0], np.int64)), ("h1", np.array([D // 2], np.int64)),
             ("h2", np.array([D], np.int64)), ("ax3", np.array([3], np.int64)),
             ("kvs", np.array([B, S, G, D], np.int64)), ("ax2", np.array([2], np.int64)),
             ("rep", np.array([B, G, H // G, S, D], np.int64)), ("hsd", np.array([B, H, S, D], np.int64))]
    nodes, x = [], "x"

    def rms(a, g, out, n=E):
        inits.append((g, (1 + 0.1 * r.standard_normal(n)).astype(np.float32)))
        return [N("Pow", [a, "two"], [out + ".sq"]), N("ReduceMean", [out + ".sq"], [out + ".ms"], axes=[-1]),
                N("Add", [out + ".ms", "eps"], [out + ".mse"]), N("Sqrt", [out + ".mse"], [out + ".rms"]),
                N("Div", [a, out + ".rms"], [out + ".n"]), N("Mul", [out + ".n", g], [out])]

    def rope(t, out):
        return [N("Slice", [t, "h0", "h1", "ax3"], [out + ".x1"]), N("Slice", [t, "h1", "h2", "ax3"], [out + ".x2"]),
                N("Neg", [out + ".x2"], [out + ".nx2"]),
                N("Concat", [out + ".nx2", out + ".x1"], [out + ".rot"], axis=3),
                N("Mul", [t, "cos"], [out + ".c"]), N("Mul", [out + ".rot", "sin"], [out + ".s"]),
                N("Add", [out + ".c", out + ".s"], [out])]

    for layer in range(L):
        p = f"l{layer}."
        nodes += rms(x, p + "g1", p + "n1")
        for q in "qkv":
            inits.append((p + "w" + q, w(E, E if q == "q" else G * D)))
            nodes += [N("MatMul", [p + "n1", p + "w" + q], [p + q]),
                      N("Reshape", [p + q, "hs" if q == "q" else "kvs"], [p + q + "r"]),
                      N("Transpose", [p + q + "r"], [p + q + "t"], perm=[0, 2, 1, 3])]
        qt, kt = p + "qt", p + "kt"
        if qk_norm:
            nodes += rms(qt, p + "qg", p + "qt.n", D) + rms(kt, p + "kg", p + "kt.n", D)
            qt, kt = p + "qt.n", p + "kt.n"
        nodes += rope(qt, p + "qe") + rope(kt, p + "ke0")
        for t in ("ke", "vt"):
            src = p + ("ke0" if t == "ke" else "vt0")
            if t == "vt":
                nodes.append(N("Identity", [p + "vt"], [src]))
            if G == H:
                nodes.append(N("Identity", [src], [p + t + ".rep"]))
            else:
                nodes += [N("Unsqueeze", [src, "ax2"], [p + t + ".u"]),
                          N("Expand", [p + t + ".u", "rep"], [p + t + ".x"]),
                          N("Reshape", [p + t + ".x", "hsd"], [p + t + ".rep"])]
        inits += [(p + "wo", w(E, E)), (p + "wg", w(E, F)), (p + "wu", w(E, F)), (p + "wd", w(F, E))]
        nodes += [N("Transpose", [p + "ke.rep"], [p + "kT"], perm=[0, 1, 3, 2]),
                  N("MatMul", [p + "qe", p + "kT"], [p + "s0"]), N("Div", [p + "s0", "sc"], [p + "s1"]),
                  N("Add", [p + "s1", "causal"], [p + "s2"]), N("Softmax", [p + "s2"], [p + "pr"], axis=-1),
                  N("MatMul", [p + "pr", p + "vt.rep"], [p + "c"]),
                  N("Transpose", [p + "c"], [p + "ct"], perm=[0, 2, 1, 3]),
                  N("Reshape", [p + "ct", "os"], [p + "cr"]), N("MatMul", [p + "cr", p + "wo"], [p + "o"]),
                  N("Add", [x, p + "o"], [p + "res1"])]
        nodes += rms(p + "res1", p + "g2", p + "n2")
        nodes += [N("MatMul", [p + "n2", p + "wg"], [p + "gate"]), N("MatMul", [p + "n2", p + "wu"], [p + "up"]),
                  N("Sigmoid", [p + "gate"], [p + "sg"]), N("Mul", [p + "gate", p + "sg"], [p + "silu"]),
                  N("Mul", [p + "silu", p + "up"], [p + "act"]), N("MatMul", [p + "act", p + "wd"], [p + "down"]),
                  N("Add", [p + "res1", p + "down"], [p + "out"])]
        x = p + "out"
    nodes += rms(x, "gf", "y")
    return _model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [B, S, E])], inits, "y", "llama")


MODELS = {"bert": bert_encoder, "gpt": gpt_decoder, "llama": llama_decoder}


def _compiled(make, precision="fp32", fuse=True, **kw):
    m = import_model(make(**kw))
    Pipeline(pipeline_passes(precision, fuse), verify_each=True).run(m)
    return m


def _feed(m, seed=0):
    rng = np.random.default_rng(seed)
    return {a.name: rng.standard_normal([int(d) for d in a.type.shape]).astype(a.type.dtype.np) for a in m.main.args}


def filecheck(text: str, checks: str) -> None:
    """FileCheck's CHECK / CHECK-NOT over `text`: each `CHECK: s` is found (as a substring) on a
    line after the previous one's; a `CHECK-NOT: s` must not occur between the neighbouring CHECKs."""
    lines = text.splitlines()
    at, nots = 0, []
    for raw in checks.strip().splitlines():
        kind, _, want = raw.strip().partition(": ")
        if kind == "CHECK-NOT":
            nots.append(want)
            continue
        assert kind == "CHECK", raw
        found = next((i for i in range(at, len(lines)) if want in lines[i]), None)
        assert found is not None, f"CHECK: {want!r} not found after line {at}:\n" + "\n".join(lines[at:at + 40])
        for n in nots:
            bad = [lines[i] for i in range(at, found) if n in lines[i]]
            assert not bad, f"CHECK-NOT: {n!r} found: {bad[0]}"
        nots, at = [], found + 1
    for n in nots:
        bad = [ln for ln in lines[at:] if n in ln]
        assert not bad, f"CHECK-NOT: {n!r} found: {bad[0]}"


# ---------------------------------------------------------------- golden IR

def test_bert_golden_column_row_split_heads_and_allreduce():
    m = _compiled(bert_encoder)
    before = print_module(m)
    prog = shard_tensor_parallel(m, 2)
    assert print_module(m) == before  # the input is not changed
    text = print_module(prog.devices[1])
    filecheck(text, """
        CHECK: %l0.qm_hw = const() {weight = "l0.qm_hw.tp1of2"} : f32[3,1,64,32]
        CHECK: fused(%l0.qm_hx, %l0.qm_hw, %l0.qm_hb.shard)
        CHECK: MatMul(%l0.qm_hx_0, %l0.qm_hw_1) : f32[3,2,16,32]
        CHECK: kind = "gemm_epilogue"
        CHECK: Reshape(%l0.qa_5, %l0.qr.shape_14) : f32[2,16,2,16]
        CHECK: Softmax(%l0.s2_25) : f32[2,2,16,16]
        CHECK: kind = "attention", params = "S=16 T=16 D=16 scale=0.25 mask transposes=q,k,v,o simt"} : f32[2,16,2,16]
        CHECK: %l0.cr = Reshape(%l0.ct, %l0.cr.shape) : f32[2,16,32]
        CHECK-NOT: %l0.bo
        CHECK: %l0.om.partial = MatMul(%l0.cr, %l0.wo.shard) : f32[2,16,64]
        CHECK: %l0.om = AllReduce(%l0.om.partial) {device = 1, group = [0, 1]} : f32[2,16,64]
        CHECK: %l0.ln1 = fused(%l0.om, %l0.bo, %x, %l0.g1, %l0.be1)
        CHECK: Add(%l0.om_0, %l0.bo_1) : f32[2,16,64]
        CHECK: LayerNormalization
        CHECK: kind = "rowreduce"
        CHECK: %l0.gelu = fused(%l0.ln1, %l0.w1, %l0.b1.shard)
        CHECK: f32[2,16,128]
        CHECK: params = "bias gelu"} : f32[2,16,128]
        CHECK-NOT: %l0.b2
        CHECK: %l0.f2.partial = MatMul(%l0.gelu, %l0.w2.shard) : f32[2,16,64]
        CHECK: %l0.f2 = AllReduce(%l0.f2.partial) {device = 1, group = [0, 1]} : f32[2,16,64]
        CHECK: %l0.out = fused(%l0.f2, %l0.b2, %l0.ln1, %l0.g2, %l0.be2)
        CHECK: %l1.om = AllReduce(
        CHECK: %l1.f2 = AllReduce(
        CHECK-NOT: AllReduce
        CHECK: return %y
    """)
    w = prog.devices[1].weights
    assert w["l0.w2.tp1of2"].shape == (128, 64) and w["l0.wo.tp1of2"].shape == (32, 64)
    assert "l0.w2" not in w and "l0.qm_hw" not in w  # the full weights are gone from the device
    np.testing.assert_array_equal(w["l0.w2.tp1of2"], m.weights["l0.w2"][128:])
    np.testing.assert_array_equal(prog.devices[0].weights["l0.qm_hw.tp0of2"],
                                  m.weights["l0.qm_hw"][..., :32])
    assert "device = 0" in print_module(prog.devices[0]) and "device = 1" not in print_module(prog.devices[0])


def test_bert_plan_json():
    prog = shard_tensor_parallel(_compiled(bert_encoder), 4)
    plan = prog.plan_json()
    assert plan["devices"] == 4 and plan["allreduces_per_forward"] == 4
    assert [b["kind"] for b in plan["blocks"]] == ["attention", "mlp", "attention", "mlp"]
    att, mlp = plan["blocks"][:2]
    assert att["heads"] == 4 and att["heads_per_device"] == 1
    assert att["columns"] == [{"op": "l0.qm_h", "shape": [3, 2, 16, 64], "per_device": [3, 2, 16, 16]}]
    assert att["rows"] == [{"op": "l0.om", "shape": [2, 16, 64],
                            "allreduce": {"operand": "l0.om.partial", "result": "l0.om"}}]
    assert mlp["columns"][0]["per_device"] == [2, 16, 64] and "heads" not in mlp
    assert plan["allreduce_bytes_per_forward"] == 4 * 2 * 16 * 64 * 4
    mdm = prog.to_multi_device()
    assert mdm.parallel == "tensor" and mdm.plan["tensor_parallel"] == plan
    verify_multi(mdm)


def test_gpt_golden_packed_qkv_groups_and_split_sizes():
    prog = shard_tensor_parallel(_compiled(gpt_decoder), 2)
    filecheck(print_module(prog.devices[0]), """
        CHECK: %l0.wa = const() {weight = "l0.wa.tp0of2"} : f32[64,96]
        CHECK: %l0.aa = fused(%l0.ln1, %l0.wa, %l0.ba.shard)
        CHECK: MatMul(%l0.ln1_0, %l0.wa_1) : f32[2,16,96]
        CHECK: params = "bias"} : f32[2,16,96]
        CHECK: Split(%l0.aa_0, %l0.q.split_1) {axis = 2} : f32[2,16,32], f32[2,16,32], f32[2,16,32]
        CHECK: Reshape(%l0.q_2, %l0.qr.shape_5) : f32[2,16,2,16]
        CHECK: Where(%tril_15, %l0.s1_14, %neg_16) : f32[2,2,16,16]
        CHECK: params = "S=16 T=16 D=16 scale=0.25 where transposes=q,k,v,o simt"
        CHECK: %l0.oa.mm.partial = MatMul(%l0.cr, %l0.wo.shard) : f32[2,16,64]
        CHECK: %l0.oa.mm = AllReduce(%l0.oa.mm.partial) {device = 0, group = [0, 1]}
        CHECK: Add(%l0.oa.mm_0, %l0.bo_1)
        CHECK: params = "bias gelu_tanh"} : f32[2,16,128]
        CHECK: %l0.f2b.mm = AllReduce(%l0.f2b.mm.partial) {device = 0, group = [0, 1]}
        CHECK: Add(%l0.f2b.mm_
        CHECK: return %y
    """)
    m = prog.devices[1]
    full = np.asarray(_compiled(gpt_decoder).weights["l0.wa"])
    # device 1 holds columns [32:64] of each of q, k and v (groups 3): [32:64], [96:128], [160:192]
    np.testing.assert_array_equal(m.weights["l0.wa.tp1of2"], full[:, np.r_[32:64, 96:128, 160:192]])
    sizes = [op for op in m.main.ops if op.results[0].name == "l0.q.split"][0]
    assert list(sizes.attrs.value) == [32, 32, 32]


def test_gpt_gemm_form_golden():
    """GPT-2's addmm export: Gemm(x, W, C) between Reshapes. The column Gemm keeps its C sliced;
    the row Gemm loses C, which is added after the AllReduce and the Reshape back (so that it
    meets the residual Add); transB = 1 (torch Linear) splits the weight's other axis."""
    m = _compiled(gpt_decoder, L=1, gemm=True)
    prog = shard_tensor_parallel(m, 2)
    filecheck(print_module(prog.devices[1]), """
        CHECK: %l0.wf = const() {weight = "l0.wf.tp1of2"} : f32[128,64]
        CHECK: %l0.aa.g = Gemm(%l0.aa.2d, %l0.wa, %l0.ba.shard) : f32[32,96]
        CHECK: %l0.aa = Reshape(%l0.aa.g, %l0.aa.shape) : f32[2,16,96]
        CHECK: kind = "attention"
        CHECK: %l0.oa.2d = Reshape(%l0.ct, %l0.oa.2d.shape) : f32[32,32]
        CHECK: %l0.oa.g.partial = Gemm(%l0.oa.2d, %l0.wo.shard) : f32[32,64]
        CHECK: %l0.oa.g.reduced = AllReduce(%l0.oa.g.partial) {device = 1, group = [0, 1]} : f32[32,64]
        CHECK: %l0.oa.reduced = Reshape(%l0.oa.g.reduced, %os) : f32[2,16,64]
        CHECK: %l0.oa = Add(%l0.oa.reduced, %l0.bo) : f32[2,16,64]
        CHECK: Gemm(%l0.h.2d_0, %l0.wf_1, %l0.bf.shard_2) {transB = 1} : f32[32,128]
        CHECK: %l0.f2b.g.partial = Gemm(%l0.f2b.2d, %l0.wp.shard) {transB = 1} : f32[32,64]
        CHECK: %l0.f2b.g.reduced = AllReduce(%l0.f2b.g.partial)
        CHECK: %l0.f2b = Add(%l0.f2b.reduced, %l0.bp) : f32[2,16,64]
    """)
    np.testing.assert_array_equal(prog.devices[1].weights["l0.wp.tp1of2"], m.weights["l0.wp"][:, 128:])
    feed = _feed(m)
    ref = Interpreter(m).run(feed)
    got = run_multi(prog.to_multi_device(), feed)
    np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-3, atol=1e-3 * np.abs(ref["y"]).max())


def test_gpt_unfused_pipeline_golden():
    """--no-fuse: the same split without fused groups (nothing is re-fused)."""
    prog = shard_tensor_parallel(_compiled(gpt_decoder, fuse=False), 2)
    text = print_module(prog.devices[0])
    filecheck(text, """
        CHECK: %l0.aa.mm = MatMul(%l0.ln1, %l0.wa) : f32[2,16,96]
        CHECK: %l0.aa = Add(%l0.aa.mm, %l0.ba.shard) : f32[2,16,96]
        CHECK: %l0.q, %l0.k, %l0.v = Split(%l0.aa, %l0.q.split) {axis = 2} : f32[2,16,32], f32[2,16,32], f32[2,16,32]
        CHECK: %l0.pr = Softmax(%l0.s2) : f32[2,2,16,16]
        CHECK: %l0.oa.mm.partial = MatMul(%l0.cr, %l0.wo.shard) : f32[2,16,64]
        CHECK: %l0.oa.mm = AllReduce(%l0.oa.mm.partial)
        CHECK: %l0.oa = Add(%l0.oa.mm, %l0.bo) : f32[2,16,64]
    """)
    assert "fused" not in text


def test_lm_head_and_non_transformer_stay_replicated():
    m = _compiled(gpt_decoder, lm_head=50)
    prog = shard_tensor_parallel(m, 2)
    text = print_module(prog.devices[0])
    assert text.count("AllReduce(") == 4
    assert prog.not_split == [{"op": "logits", "why": "split value %logits is a function result"}]
    assert prog.plan_json()["not_split"] == prog.not_split
    filecheck(text, """
        CHECK: %wlm = const() {weight = "wlm"} : f32[64,50]
        CHECK: %l1.f2b.mm = AllReduce(
        CHECK: %logits = MatMul(%y, %wlm) : f32[2,16,50]
    """)
    # a model without blocks: every device is the module itself
    cnn = import_model(onnx.load(str(Path(__file__).parents[2] / "examples" / "tiny_cnn.onnx")),
                       shapes={"input": [1, 3, 32, 32]})
    Pipeline(pipeline_passes("fp32", True)).run(cnn)
    prog = shard_tensor_parallel(cnn, 2)
    assert prog.blocks == [] and all(print_module(d) == print_module(cnn) for d in prog.devices)


def test_one_device_is_a_copy():
    m = _compiled(bert_encoder, L=1)
    prog = shard_tensor_parallel(m, 1)
    assert prog.k == 1 and prog.blocks == [] and print_module(prog.devices[0]) == print_module(m)


# ---------------------------------------------------------------- numerics

@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("name", ["bert", "gpt"])
def test_k_devices_match_single_device(name, k):
    m = _compiled(MODELS[name])
    feed = _feed(m)
    ref = Interpreter(m).run(feed)
    prog = shard_tensor_parallel(m, k)
    assert len(prog.blocks) == 4  # attention + mlp per layer
    for dev in prog.devices:  # the text round-trips (unique names after inlining and re-fusion)
        text = print_module(dev)
        assert print_module(parse(text)) == text
    mdm = prog.to_multi_device()
    verify_multi(mdm)
    got = run_multi(mdm, feed)
    assert list(got) == list(ref)
    for n in ref:
        np.testing.assert_allclose(got[n], ref[n], rtol=1e-3, atol=1e-3 * np.abs(ref[n]).max())


@pytest.mark.parametrize("name,fuse,precision", [("bert", False, "fp32"), ("gpt", True, "fp16"),
                                                  ("bert", True, "fp16")])
def test_unfused_and_fp16_match_single_device(name, fuse, precision):
    m = _compiled(MODELS[name], precision, fuse)
    feed = _feed(m, 1)
    ref = Interpreter(m).run(feed)
    got = run_multi(shard_tensor_parallel(m, 2).to_multi_device(), feed)
    rtol = 1e-2 if precision == "fp16" else 1e-3
    for n in ref:
        np.testing.assert_allclose(got[n].astype(np.float64), ref[n], rtol=rtol, atol=rtol * np.abs(ref[n]).max())


@pytest.mark.parametrize("fuse", [True, False])
def test_llama_rope_swiglu_matches(fuse):
    """Rotary embedding (a Concat along the head dim D of split values), stacked gate/up
    (fuse-horizontal) or separate, no biases: 2 blocks per layer, K = 2 and 4."""
    m = _compiled(llama_decoder, fuse=fuse)
    feed = _feed(m, 4)
    ref = Interpreter(m).run(feed)
    for k in (2, 4):
        prog = shard_tensor_parallel(m, k)
        assert [b["kind"] for b in prog.blocks] == ["attention", "mlp"] * 2
        assert prog.blocks[0]["heads_per_device"] == 4 // k
        got = run_multi(prog.to_multi_device(), feed)
        np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-3, atol=1e-3 * np.abs(ref["y"]).max())


def test_llama_grouped_query_attention():
    """GQA (8 query heads, 2 K/V heads repeated by Unsqueeze/Expand/Reshape): at K = 2 each device
    has one K/V head and its 4 query heads; at K = 4 the 2 K/V heads do not divide."""
    m = _compiled(llama_decoder, L=1, E=64, H=8, kv_heads=2)
    feed = _feed(m, 5)
    ref = Interpreter(m).run(feed)
    prog = shard_tensor_parallel(m, 2)
    assert prog.blocks[0]["heads_per_device"] == 4
    filecheck(print_module(prog.devices[0]), """
        CHECK: = const() {weight = "l0.k_hw.tp0of2"} : f32[2,1,64,8]
        CHECK: MatMul(%l0.k_hx, %l0.k_hw) : f32[2,1,16,8]
        CHECK: %l0.ke.x = Expand(%l0.ke.u, %l0.ke.x.shape) : f32[1,1,4,16,8]
        CHECK: %l0.vt.x = Expand(%l0.vt.u, %l0.ke.x.shape) : f32[1,1,4,16,8]
        CHECK-NOT: Slice(
        CHECK: %l0.o = AllReduce
    """)
    got = run_multi(prog.to_multi_device(), feed)
    np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-3, atol=1e-3 * np.abs(ref["y"]).max())
    with pytest.raises(NncError, match=r"over 4 devices: .*\[1, 16, 2, 8\].*attention heads: 2\) does not divide by 4"):
        shard_tensor_parallel(m, 4)


def test_llama_qk_norm_reduces_per_head():
    m = _compiled(llama_decoder, L=1, qk_norm=True, fuse=False)
    assert any(op.name == "ReduceMean" and op.results[0].type.rank == 4 for op in m.main.ops)
    feed = _feed(m, 6)
    ref = Interpreter(m).run(feed)
    prog = shard_tensor_parallel(m, 2)
    assert [b["kind"] for b in prog.blocks] == ["attention", "mlp"]
    got = run_multi(prog.to_multi_device(), feed)
    np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-3, atol=1e-3 * np.abs(ref["y"]).max())


def test_per_head_mask_input_is_sliced_on_each_device():
    m = _compiled(bert_encoder, L=1, head_mask=True)
    prog = shard_tensor_parallel(m, 2)
    filecheck(print_module(prog.devices[1]), """
        CHECK: func @main(%x: f32[2,16,64], %mask: f32[2,4,16,16])
        CHECK: %mask.shard = Slice(%mask, %mask.start, %mask.end, %mask.axis) : f32[2,2,16,16]
        CHECK: kind = "attention"
    """)
    feed = _feed(m, 3)
    ref = Interpreter(m).run(feed)
    got = run_multi(prog.to_multi_device(), feed)
    np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-3, atol=1e-3 * np.abs(ref["y"]).max())


def test_gpt_lm_head_matches():
    m = _compiled(gpt_decoder, L=1, lm_head=24)
    feed = _feed(m, 2)
    ref = Interpreter(m).run(feed)
    got = run_multi(shard_tensor_parallel(m, 4).to_multi_device(), feed)
    np.testing.assert_allclose(got["logits"], ref["logits"], rtol=1e-3, atol=1e-3 * np.abs(ref["logits"]).max())


# ---------------------------------------------------------------- per-shard kernels

def _compute_only(module):
    """A device's Module with each AllReduce made an Identity: the shard's own kernels (its
    partial sums go on unreduced), lowerable by the single-device CUDA backend."""
    import copy
    from nnc.ir import registry
    m = copy.deepcopy(module)
    for op in m.main.ops:
        if op.name == "AllReduce":
            op.name = "Identity"
            op.attrs = registry.make_attrs(registry.get("Identity").attrs, {}, "Identity")
    return m


def test_shard_kernels_compile_with_nvrtc(tmp_path):
    """The fused kernels of a shard (GEMM epilogues at N/K columns, attention of H/K heads,
    rowreduce after the AllReduce) render and compile for sm_90 (no GPU needed)."""
    from nnc.codegen.emit import compile_to_dir
    prog = shard_tensor_parallel(_compiled(gpt_decoder, "fp16", L=1), 2)
    plan = compile_to_dir(_compute_only(prog.devices[1]), tmp_path / "dev1", arch="sm_90", precision="fp16")
    assert plan["cubins"]
    templates = [k.get("template") for k in plan["kernels"]]
    assert "flash_attention.cu.j2" in templates and "gemm_tc.cu.j2" in templates, templates


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["bert", "gpt"])
def test_gpu_shard_kernels_match_interpreter(name, tmp_path):
    """On the GPU: each device's compute (AllReduce as Identity) at fp16 gives the interpreter's
    outputs of that same module: the per-shard kernels are right; the sum over devices is
    run_multi's (above) and NCCL's."""
    import nnc
    from nnc.codegen.emit import compile_to_dir
    m = _compiled(MODELS[name], "fp16")
    prog = shard_tensor_parallel(m, 2)
    for d, dev in enumerate(prog.devices):
        cm = _compute_only(dev)
        compile_to_dir(cm, tmp_path / f"dev{d}", arch=None, precision="fp16")
        g = nnc.load(tmp_path / f"dev{d}")
        feed = _feed(cm, d)
        ref = Interpreter(cm).run(feed)
        got = g.run(feed, output="numpy", poison=True)
        for k, v in ref.items():
            np.testing.assert_allclose(np.asarray(got[k], np.float32), v.astype(np.float32), rtol=3e-2,
                                       atol=3e-2 * float(np.abs(v).max()), err_msg=f"device {d} {k}")


# ---------------------------------------------------------------- sizes that do not divide

def test_heads_not_divisible_is_an_error_naming_the_op():
    m = _compiled(bert_encoder, L=1, E=48, H=3)  # 48 columns split in 2, but 3 heads do not
    with pytest.raises(NncError, match=r"over 2 devices: Reshape %l0\.qr .*\[2, 16, 3, 16\].*attention heads: 3\)"
                                       r" does not divide by 2"):
        shard_tensor_parallel(m, 2)
    m = _compiled(gpt_decoder, L=1, E=48, H=3)
    with pytest.raises(NncError, match=r"Reshape %l0\.qr .*attention heads: 3\) does not divide by 2"):
        shard_tensor_parallel(m, 2)


def test_hidden_or_ffn_not_divisible_is_an_error():
    with pytest.raises(NncError, match=r"over 3 devices: .*\[3, 2, 16, 64\].*columns: 64\) does not divide by 3"):
        shard_tensor_parallel(_compiled(bert_encoder, L=1), 3)
    with pytest.raises(NncError, match=r"over 5 devices: MatMul %l0\.aa\.mm .*\[2, 16, 144\].*columns: 3 groups of 48\)"
                                       r" does not divide by 5"):
        shard_tensor_parallel(_compiled(gpt_decoder, L=1, E=48, H=6, fuse=False), 5)
    with pytest.raises(NncError, match=r"over 4 devices: MatMul %l0\.f1 .*columns: 198\) does not divide by 4"):
        shard_tensor_parallel(_compiled(bert_encoder, L=1, F=198), 4)


def test_bad_device_count():
    with pytest.raises(NncError, match="device count >= 1"):
        shard_tensor_parallel(_compiled(bert_encoder, L=1), 0)


# ---------------------------------------------------------------- pieces

def test_reshape_split_lands_on_heads_and_merged_batch():
    assert reshape_split((2, 16, 64), (2, 16, 4, 16), Split(2)) == Split(2)
    assert reshape_split((2, 4, 16, 16), (8, 16, 16), Split(1)) == Split(0, 2)  # [B*H]: B groups of H
    assert reshape_split((128, 2304), (1, 128, 2304), Split(1, 3)) == Split(2, 3)
    assert reshape_split((2, 16, 4, 16), (2, 16, 64), Split(2)) == Split(2)


def test_shard_array_groups():
    a = np.arange(12).reshape(1, 12)
    np.testing.assert_array_equal(shard_array(a, Split(1, 3), 2, 1), [[2, 3, 6, 7, 10, 11]])
    np.testing.assert_array_equal(shard_array(a, Split(1), 4, 2), [[6, 7, 8]])


def test_gpt2_medium_allreduce_bytes():
    # 24 layers x 2 all-reduces of [8, 512, 1024] fp16 = 48 messages of 8 MiB
    assert tp_allreduce_bytes(24, 8, 512, 1024, 2) == 48 * 8 * 512 * 1024 * 2 == 402653184  # 384 MiB


def test_comm_bytes_tool_table():
    from tools.tp_comm_bytes import table
    text = table(24, 8, 512, 1024, 2, [2], {"measured 300": 300.0})
    assert "48 messages of 8388608 B" in text and "402653184 B (384.0 MiB)" in text
    assert "1.342" in text  # 48 x 8 MiB x 2 (2 - 1) / 2 / 300 GB/s = 1.342 ms
