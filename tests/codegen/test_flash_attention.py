"""The lowering of `fused {kind = "attention"}` (codegen/kernels/flash_attention.py) to one
flash-attention kernel (templates/flash_attention.cu.j2):
- each attention group is exactly ONE kernel launch, with no copy_transpose (the head split /
  merge is in the kernel's strides) and no Softmax / GEMM kernel left;
- the strides it passes are those of the absorbed transposes;
- the plan runs in its arena on the CPU (codegen/plan_exec.py) with the interpreter's outputs;
- NVRTC compiles every variant for sm_90 on the CPU (tc f16/bf16 at head dims 64 and 128, with
  additive / boolean masks, the element-load path, and the f32 SIMT variant);
- the kernel's arithmetic, emulated tile by tile in numpy (its steps, 16-bit roundings, online
  softmax), matches the interpreter where the 16-bit mask Add swamps whole rows (the bf16 causal
  GPU failure), on fully masked rows (NaN for -inf, uniform for a finite fill), with GPT-2's
  causal condition computed from indices;
- every declared tile compiles, and (with nvcc) none spills (ptxas -v);
- on a GPU (`-m gpu`): the kernel matches the interpreter at S = 128, 512 and 77 (a tail tile),
  head dims 64 and 128, fp16, bf16 and fp32, with and without masks, outputs poisoned.
"""
from __future__ import annotations

import re
import shutil
import subprocess

import ml_dtypes
import numpy as np
import pytest

from nnc.codegen.lower import lower
from nnc.codegen.plan_exec import PlanExecutor
from nnc.driver import pipeline_passes
from nnc.ir.interp import Interpreter
from nnc.onnx_import import import_model
from nnc.pipeline import Pipeline
from tests.passes.test_fuse_attention import assert_runs_like_interpreter, attention_feed, attention_model, mha_model

TEMPLATE = "flash_attention.cu.j2"


def _build(precision="fp16", mha=False, **kw):
    mod = import_model(mha_model(**kw) if mha else attention_model(**kw))  # mha: torch MHA (ViT) export
    Pipeline(pipeline_passes(precision), verify_each=True).run(mod)
    return mod


def _plan(mod, precision):
    return lower(mod, {"arch": "sm_90", "precision": precision})


def _attention_launches(plan):
    return [l for l in plan.launches if l.kernel and plan.kernels[l.kernel].template == TEMPLATE]


CASES = {
    "bert_f16": ("fp16", dict(B=2, S=128, H=2, D=64)),
    "bert_f16_d128": ("fp16", dict(B=1, S=64, H=2, D=128)),
    "gpt2_bf16_tail": ("bf16", dict(S=77, H=2, D=64, causal=True, gpt2_kt=True)),
    "kt_input_f16": ("fp16", dict(S=40, H=2, D=32, kt_input=True, mask="b1st")),
    "f32_simt": ("fp32", dict(S=33, H=2, D=16, mask="11st")),
    "f16_odd_head_dim": ("fp16", dict(S=20, H=2, D=24, mask=None)),  # D % 16 != 0: the SIMT variant
    "packed_qkv_f16": ("fp16", dict(B=2, S=48, H=2, D=64, packed="gather")),  # ViT-style [B,S,3,H,D]
    "packed_split_f32": ("fp32", dict(S=24, H=2, D=16, packed="split", mask=None)),
    # GPT-2: c_attn's [B,S,3E] Split / Sliced on the last axis, read at offsets i*E, seq stride 3E
    "gpt2_split_last_f16": ("fp16", dict(B=2, S=40, H=2, D=16, packed="split_last", causal=True)),
    "gpt2_slice_last_f32": ("fp32", dict(S=24, H=2, D=8, packed="slice_last", mask=None)),
    # ViT's torch MHA export: packed in_proj [S,B,3E], Gather(i) after the transposes, q/K scaled
    "vit_mha_f16": ("fp16", dict(mha=True, B=2, S=40, H=2, D=16)),
    "mha_bmm3d_f32": ("fp32", dict(mha=True, B=1, S=24, H=2, D=8, bmm3d=True)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_one_kernel_no_transpose_copies(name):
    prec, kw = CASES[name]
    mod = _build(prec, **kw)
    plan = _plan(mod, prec)
    att = _attention_launches(plan)
    assert len(att) == 1
    k = plan.kernels[att[0].kernel]
    want = "tc" if prec != "fp32" and kw["D"] % 16 == 0 else "simt"
    assert k.params["variant"] == want
    others = {plan.kernels[l.kernel].template for l in plan.launches if l.kernel and l not in att}
    # what is left: the dtype casts at the fp32 interface of the test model, nothing else
    assert others <= {"elementwise.cu.j2"}, others
    assert not any("transpose" in (l.kernel or "") or "softmax" in (l.kernel or "") for l in plan.launches)
    # the kernel names every op of the group in its header
    body = next(op for op in mod.main.ops if op.name == "fused").attrs.body
    assert sum(1 for op in body.ops if op.name != "const") <= len(k.ops) - 1


def test_strides_are_the_absorbed_transposes():
    """q [B,S,H*D] split into heads: (batch, head, seq, dim) strides (S*H*D, D, H*D, 1); K^T from
    Transpose(0,2,3,1) likewise; the merged output [B,S,H,D] the same; the mask [B,1,1,T]
    (T, 0, 0, 1)."""
    B, S, H, D = 2, 64, 3, 32
    mod = _build("fp16", B=B, S=S, H=H, D=D)
    (l,) = _attention_launches(_plan(mod, "fp16"))
    ints = [a.value for a in l.args if hasattr(a, "value") and not hasattr(a, "shape")]
    assert ints[:2] == [S, S]
    split = [S * H * D, D, H * D, 1]
    assert ints[2:18] == split * 4
    assert ints[18:22] == [S, 0, 0, 1]
    assert l.grid == (S // 32, H, B) or l.grid[1:] == (H, B)


STORE = {"__half": np.float16, "__nv_bfloat16": ml_dtypes.bfloat16, "float": np.float32}


def _emulate(plan, launch, values):
    """The kernel's arithmetic in numpy, addressing every operand exactly as the launch does: its
    buffers (views at their element offsets into the root's value) and its stride arguments, the
    steps in fp32 in order (a `round` to the kernel's 16-bit type where the template rounds), then
    the online softmax tile by tile (the kernel's BC key rows per tile: a running max of -inf,
    rescales by exp2((m - max) * post), P rounded to 16 bits for the P V product, 1 / l at the end),
    with the kernel's skips per warp of rows (Q K^T of a causally filled tile, dead tiles);
    returns the output root's values as the kernel would leave them (NaN elsewhere)."""
    k = plan.kernels[launch.kernel]
    p = k.params
    bufs = [a for a in launch.args if hasattr(a, "shape")]
    ints = [a.value for a in launch.args if not hasattr(a, "shape")]
    S, T = ints[:2]
    st = ints[2:]
    B1, B0 = launch.grid[1], launch.grid[2]
    store = STORE[p["T"]]

    def view(buf, strides, shape):
        root = plan.buffers[buf.alias_of] if buf.alias_of is not None else buf
        off = buf.alias_offset // buf.dtype.np.itemsize if buf.alias_of is not None else 0
        flat = np.asarray(values[id(root.value)], np.float64).reshape(-1)
        return np.lib.stride_tricks.as_strided(flat[off:], shape, [x * 8 for x in strides]), root, off

    q, _, _ = view(bufs[0], st[0:4], (B0, B1, S, p["D"]))
    kk, _, _ = view(bufs[1], st[4:8], (B0, B1, T, p["D"]))
    v, _, _ = view(bufs[2], st[8:12], (B0, B1, T, p["DV"]))
    x = np.einsum("absd,abtd->abst", q, kk).astype(np.float32)
    tc = p["variant"] == "tc"
    bc = p["BC"] if tc else T  # simt: one column at a time, the same sums
    rw = 16 * p["MI"] if tc else 1  # the rows of a warp (tc: its skips and votes are per warp)
    causal = [s for s in p["steps"] if s["role"] == "causal"]
    if tc and causal:  # the kernel skips Q K^T of a tile the causal step fills for all the warp's rows
        c = causal[0]
        for r0 in range(0, S, rw):
            for c0 in range(0, T, bc):
                if (c0 - (r0 + rw - 1) > c["k"]) if c["keep"] else (c0 + bc - 1 - r0 <= c["k"]):
                    x[:, :, r0:r0 + rw, c0:c0 + bc] = 0
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for s in p["steps"]:
            if s["role"] == "scale":
                x = x * np.float32(s["c"])
            elif s["role"] == "round":
                x = x.astype(store).astype(np.float32)
            elif s["role"] == "causal":
                band = (np.arange(T)[None, :] - np.arange(S)[:, None]) <= s["k"]
                x = np.where(band == s["keep"], x, np.float32(s["fill"]))
            else:
                i = s["i"]
                m, _, _ = view(bufs[4 + i], st[16 + 4 * i:20 + 4 * i], (B0, B1, S, T))
                m = m.astype(np.float32)
                if s["role"] == "add":
                    x = np.float32(s.get("pre", 1.0)) * x + np.float32(s["c"]) * m
                else:
                    x = np.where((m != 0) == s["keep"], x, np.float32(s["fill"]))
        post = np.float32(p["post"])
        mrow = np.full(x.shape[:-1] + (1,), -np.inf, np.float32)
        l = np.zeros_like(mrow)
        o = np.zeros((B0, B1, S, p["DV"]))
        for j in range(0, T, bc):
            xs = x[..., j:j + bc]
            mt = xs.max(-1, keepdims=True)
            # the kernel's dead-tile vote: a warp whose rows' scores all lie 2^150 below their max
            # skips the update (probabilities of 0 in fp32)
            live = ~((mt - mrow) * post < -150)
            if tc:
                pad = np.zeros((B0, B1, -(-S // rw) * rw, 1), bool)
                pad[:, :, :S] = live
                live = np.repeat(pad.reshape(B0, B1, -1, rw).any(-1), rw, axis=2)[:, :, :S, None]
            mx = np.maximum(mrow, mt)
            msafe = np.where(mx == -np.inf, np.float32(0), mx)
            corr = np.exp2((mrow - msafe) * post)
            pr = np.exp2((xs - msafe) * post)
            p16 = pr.astype(store).astype(np.float64) if tc else pr
            l = np.where(live, l * corr + pr.sum(-1, keepdims=True), l)
            o = np.where(live, o * corr + np.einsum("abst,abtd->absd", p16, v[:, :, j:j + bc]), o)
            mrow = np.where(live, mx, mrow)
        o = o * (1.0 / l)
    root = plan.buffers[bufs[3].alias_of] if bufs[3].alias_of is not None else bufs[3]
    out = np.full(root.numel, np.nan)
    np.lib.stride_tricks.as_strided(out, o.shape, [x * 8 for x in st[12:16]])[...] = o
    return root, out


def _run_emulated(mod, prec, feed):
    """(interpreter's result, emulated kernel's) of the one attention launch, flat float64."""
    plan = _plan(mod, prec)
    (launch,) = _attention_launches(plan)
    values = {}
    Interpreter(mod, observe=lambda op, outs: values.update({id(r): o for r, o in zip(op.results, outs)})).run(feed)
    values.update({id(a): np.asarray(feed[a.name]) for a in mod.main.args})
    root, out = _emulate(plan, launch, values)
    return np.asarray(values[id(root.value)], np.float64).reshape(-1), out, plan.kernels[launch.kernel]


@pytest.mark.parametrize("name", list(CASES))
def test_launch_addresses_what_the_interpreter_computes(name, rng):
    """The launch's buffers, offsets and strides, read as the kernel reads them (numpy), give the
    group's result: the absorbed transposes, packed picks and masks are addressed right."""
    prec, kw = CASES[name]
    mod = _build(prec, **kw)
    plan = _plan(mod, prec)
    (launch,) = _attention_launches(plan)
    values = {}
    feed = attention_feed(mod, rng)
    ref = Interpreter(mod, observe=lambda op, outs: values.update({id(r): o for r, o in zip(op.results, outs)})).run(feed)
    values.update({id(a): np.asarray(feed[a.name]) for a in mod.main.args})
    root, out = _emulate(plan, launch, values)
    want = np.asarray(values[id(root.value)], np.float64).reshape(-1)
    assert not np.isnan(out).any(), "the kernel leaves part of its output unwritten"
    tol = {"fp16": 2e-2, "bf16": 5e-2, "fp32": 1e-6}[prec]
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol)
    assert ref


@pytest.mark.parametrize("name", list(CASES))
def test_plan_runs_in_its_arena(name, rng):
    prec, kw = CASES[name]
    mod = _build(prec, **kw)
    plan = _plan(mod, prec)
    ex = PlanExecutor.from_plan(plan, mod)
    for _ in range(2):
        feed = attention_feed(mod, rng)
        ref = Interpreter(mod).run(feed)
        got = ex.run(feed)
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k])


def _padded_feed(mod, rng, pad_rows_of):
    """attention_feed, with every key column a causal row r of batch b sees padded (-1e4) for the
    (b, r) in pad_rows_of: that row's visible scores are all swamped by the mask."""
    feed = attention_feed(mod, rng)
    m = feed["mask"]
    for b, r in pad_rows_of:
        m[b, ..., : r + 1] = -1e4
    return feed


@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_padding_swamped_rows_match_the_reference(prec):
    """The H200 failure of bf16 B=32 S=128 causal (151 elements of query row 1 wrong): a causal row
    whose visible key columns are all padded. The body's Add gives -1e4 + s in 16 bits, which
    rounds every such score to the same value (the reference averages those V rows uniformly);
    the kernel kept fp32 sums and weighted them by s. Emulated tile by tile on the CPU with the
    kernel's steps: with its `round` steps it matches at the GPU test's tolerance, without them it
    does not (the test sees the bug)."""
    rng = np.random.default_rng(7)
    mod = _build(prec, B=4, S=128, H=2, D=64, causal=True)
    feed = _padded_feed(mod, rng, [(0, 1), (1, 2), (2, 5), (3, 70)])
    want, got, k = _run_emulated(mod, prec, feed)
    assert any(s["role"] == "round" for s in k.params["steps"])
    tol = {"fp16": 2e-2, "bf16": 6e-2}[prec]
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)
    # the same emulation without the rounding: the pre-fix kernel, wrong on those rows
    k.params["steps"] = [s for s in k.params["steps"] if s["role"] != "round"]
    plan = _plan(mod, prec)
    (launch,) = _attention_launches(plan)
    plan.kernels[launch.kernel].params["steps"] = k.params["steps"]
    values = {}
    Interpreter(mod, observe=lambda op, outs: values.update({id(r): o for r, o in zip(op.results, outs)})).run(feed)
    values.update({id(a): np.asarray(feed[a.name]) for a in mod.main.args})
    _, old = _emulate(plan, launch, values)
    assert (np.abs(old - want) > tol * scale + tol * np.abs(want)).sum() > 0


@pytest.mark.parametrize("prec,fill", [("fp16", -np.inf), ("bf16", -np.inf), ("fp32", -np.inf), ("fp32", -1e30),
                                       ("fp16", -1e4), ("bf16", -1e4)])
def test_fully_masked_rows_give_what_the_reference_gives(prec, fill):
    """A query row masked at every key column: -inf gives NaN (the reference's softmax of all -inf,
    the kernel's 0 * (1 / 0)); a finite big negative gives the uniform average of the V rows (the
    scores stay in natural units until the exponentials, so the fill stays finite). Emulated on
    the CPU tile by tile with the kernel's steps; NaN where and only where the reference has it."""
    rng = np.random.default_rng(3)
    kw = dict(B=2, S=80, H=2, D=64 if prec != "fp32" else 16, mask="b1st")
    mod = _build(prec, **kw)
    feed = attention_feed(mod, rng)
    feed["mask"][0, 0, 3, :] = fill
    feed["mask"][1, 0, 79, :] = fill
    want, got, k = _run_emulated(mod, prec, feed)
    if fill == -np.inf:
        assert np.isnan(want).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    tol = {"fp16": 2e-2, "bf16": 6e-2, "fp32": 1e-5}[prec]
    ok = ~np.isnan(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=tol, atol=tol * max(1.0, float(np.abs(want[ok]).max())))


@pytest.mark.parametrize("prec", ["bf16", "fp32"])
def test_causal_where_compares_indices(prec):
    """GPT-2's constant tril condition becomes a `causal` step (col - row <= T - S): no S x T
    condition buffer is passed or loaded; the emulation with that step matches the interpreter."""
    from nnc.codegen.kernels.flash_attention import causal_band
    S, T = 6, 9
    assert causal_band(np.tril(np.ones((S, T), bool), T - S)[None, None], S, T) == (T - S, True)
    assert causal_band(~np.tril(np.ones((S, T), bool), 0), S, T) == (0, False)
    odd = np.tril(np.ones((S, T), bool), 1)
    odd[3, 0] = False
    assert causal_band(odd, S, T) is None
    mod = _build(prec, B=2, S=77, H=2, D=64, causal=True, mask="b11t", gpt2_kt=True)
    plan = _plan(mod, prec)
    (launch,) = _attention_launches(plan)
    p = plan.kernels[launch.kernel].params
    assert [s["role"] for s in p["steps"]].count("causal") == 1 and len(p["masks"]) == 1
    assert sum(1 for a in launch.args if hasattr(a, "shape")) == 5  # q, k, v, out, the padding mask
    want, got, _ = _run_emulated(mod, prec, attention_feed(mod, np.random.default_rng(1)))
    tol = {"fp32": 1e-5, "bf16": 6e-2}[prec]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max())))


def test_tile_space_is_declared_and_each_point_compiles():
    """The tc variant's declared space (mi, warps, bc), the default the pass's recorded tile, and
    every declared point of the benchmark shapes compiles with NVRTC for sm_90 (with the [B,1,1,T]
    mask: the paired mask loads, the rounding)."""
    from nnc.codegen.kernels import common
    from nnc.codegen.kernels import flash_attention as fa
    mod = _build("fp16", B=32, S=128, H=12, D=64)
    plan = _plan(mod, "fp16")
    (l,) = _attention_launches(plan)
    kp = plan.kernels[l.kernel].params
    assert kp["selected"]["variant"] == "flash_attention"
    chosen = kp["selected"]["params"]
    assert (chosen["mi"], chosen["warps"], chosen["bc"]) == (kp["MI"], kp["WARPS"], kp["BC"])
    assert all(m["pair"] and m["unit"] and not m["rows"] for m in kp["masks"])
    space = fa.tile_space(64, 64, 227 * 1024)
    assert {"mi": 2, "warps": 4, "bc": 64} in space and {"mi": 1, "warps": 4, "bc": 128} in space
    assert {"mi": 2, "warps": 4, "bc": 128} not in space  # its accumulators would spill
    assert fa.tile_space(128, 128, 227 * 1024) and all(p["mi"] == 1 for p in fa.tile_space(128, 128, 227 * 1024))
    sources = []
    for p in space:
        pl = lower(mod, {"arch": "sm_90", "precision": "fp16"}, selector=Forced(p))
        (ll,) = _attention_launches(pl)
        kk = pl.kernels[ll.kernel]
        assert (kk.params["MI"], kk.params["WARPS"], kk.params["BC"]) == (p["mi"], p["warps"], p["bc"])
        assert ll.block == (32 * p["warps"], 1, 1) and ll.grid[0] == -(-128 // (16 * p["mi"] * p["warps"]))
        assert ll.smem == fa._smem(p["mi"], p["warps"], p["bc"], 64, 64)
        sources.append(kk.body.replace(ll.kernel, f"{ll.kernel}_t{len(sources)}"))
    assert len(common.nvrtc_compile("\n".join(sources), "sm_90")) > 0


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (ptxas -v)")
def test_declared_tiles_do_not_spill(tmp_path):
    """ptxas -v on every declared tile of D = 64 ([B,1,1,T] mask + GPT-2 causal, bf16; no mask with
    a tail tile, fp16) and D = 128 ([B,1,S,T] mask): no spill stores or loads (one translation
    unit, one ptxas run)."""
    from nnc.codegen.kernels import flash_attention as fa
    sources = []
    for prec, kw in (("bf16", dict(B=32, S=128, H=12, D=64, causal=True)),
                     ("fp16", dict(B=2, S=77, H=2, D=64, mask=None)),  # a tail tile, the scale in the exponentials
                     ("fp16", dict(B=2, S=128, H=2, D=128, mask="b1st"))):
        mod = _build(prec, **kw)
        for p in fa.tile_space(kw["D"], kw["D"], 227 * 1024):
            pl = lower(mod, {"arch": "sm_90", "precision": prec}, selector=Forced(p))
            (ll,) = _attention_launches(pl)
            sources.append(pl.kernels[ll.kernel].body.replace(ll.kernel, f"{ll.kernel}_t{len(sources)}"))
    src = tmp_path / "fa.cu"
    src.write_text("\n".join(sources))
    r = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-O3", "-Xptxas", "-v", "-o", str(tmp_path / "fa.cubin"),
                        str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    assert len(spills) == len(sources), r.stderr[-2000:]
    assert all(a == "0" and b == "0" for a, b in spills), r.stderr


class Forced:
    """A selector giving the flash-attention candidate the params `p`, everything else its default."""

    def __init__(self, p):
        self.p = p

    def choose(self, key, cands):
        for c in cands:
            if c.name == "flash_attention" and self.p in c.space:
                return c, dict(self.p)
        return cands[0], cands[0].default_params()


def test_too_large_head_dim_falls_back_op_by_op(rng):
    """D > 256: no variant takes it; the generic fallback lowers the body op by op (still right)."""
    mod = _build("fp32", S=8, H=1, D=272, mask=None)
    plan = _plan(mod, "fp32")
    assert not _attention_launches(plan)
    ex = PlanExecutor.from_plan(plan, mod)
    feed = attention_feed(mod, rng)
    ref = Interpreter(mod).run(feed)
    got = ex.run(feed)
    np.testing.assert_array_equal(got["y"], ref["y"])


def test_every_variant_compiles_with_nvrtc():
    from nnc.codegen.kernels import common
    sources = []

    def add(plan):  # kernel names repeat across plans: one translation unit, so renamed
        for l in _attention_launches(plan):
            sources.append(plan.kernels[l.kernel].body.replace(l.kernel, f"{l.kernel}_v{len(sources)}"))

    for prec, kw in CASES.values():
        add(_plan(_build(prec, **kw), prec))
    # the benchmark's B=32 S=512 shape (4 warps of 2 m-tiles), and 8 warps at head dim 128
    plan = _plan(_build("fp16", B=32, S=512, H=12, D=64), "fp16")
    (l,) = _attention_launches(plan)
    p = plan.kernels[l.kernel].params
    assert (p["WARPS"], p["MI"], l.block, l.grid) == (4, 2, (128, 1, 1), (4, 12, 32))
    add(plan)
    plan = _plan(_build("fp16", B=32, S=512, H=12, D=128), "fp16")
    (l,) = _attention_launches(plan)
    assert plan.kernels[l.kernel].params["WARPS"] == 8 and l.block == (256, 1, 1)
    assert l.smem <= 227 * 1024
    add(plan)
    assert len(common.nvrtc_compile("\n".join(sources), "sm_90")) > 0


# ---------------------------------------------------------------- on the GPU

GPU_CASES = [
    ("fp16", dict(B=2, S=128, H=4, D=64)),
    ("fp16", dict(B=1, S=512, H=4, D=64)),
    ("fp16", dict(B=2, S=77, H=3, D=64)),
    ("fp16", dict(B=1, S=128, H=2, D=128)),
    ("fp16", dict(B=1, S=77, H=2, D=128, mask="b1st")),
    ("fp16", dict(B=2, S=128, H=4, D=64, mask=None)),
    ("fp16", dict(B=1, S=512, H=2, D=64, causal=True, mask="b11t", gpt2_kt=True)),
    ("fp16", dict(B=1, S=77, H=2, D=64, kt_input=True)),
    ("fp16", dict(B=4, S=197, H=12, D=64, packed="gather", mask=None)),  # ViT-B/16
    ("fp32", dict(B=1, S=50, H=2, D=64, packed="split")),
    ("fp16", dict(B=1, S=128, H=12, D=64, packed="split_last", causal=True)),  # GPT-2's packed c_attn
    ("fp16", dict(mha=True, B=2, S=197, H=12, D=64)),  # ViT-B/16's torch MHA export
    ("fp32", dict(mha=True, B=1, S=77, H=2, D=64, bmm3d=True)),
    # large batches: 4 warps of 2 m-tiles (mi = 2), 8 warps at head dim 128
    ("fp16", dict(B=32, S=128, H=12, D=64)),
    ("fp16", dict(B=8, S=512, H=12, D=64, mask=None)),
    ("fp16", dict(B=32, S=77, H=12, D=64, mask="b1st")),
    ("fp16", dict(B=32, S=256, H=8, D=128)),
    ("bf16", dict(B=32, S=128, H=12, D=64, causal=True)),
    ("bf16", dict(B=2, S=128, H=2, D=64)),
    ("fp32", dict(B=2, S=128, H=2, D=64)),
    ("fp32", dict(B=1, S=77, H=2, D=128, mask=None)),
    ("fp32", dict(B=1, S=512, H=2, D=64, causal=True)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("prec,kw", GPU_CASES, ids=[f"{p}-" + "-".join(f"{k}{v}" for k, v in kw.items()) for p, kw in GPU_CASES])
def test_gpu_flash_attention_matches_interpreter(prec, kw, tmp_path, rng):
    import nnc
    from nnc.codegen.emit import compile_to_dir
    mod = _build(prec, **kw)
    plan = compile_to_dir(mod, tmp_path, arch=None, precision=prec)
    assert sum(1 for l in plan["launches"] if l.get("kernel") and "flash_attention" in l["kernel"]) == 1
    g = nnc.load(tmp_path)
    assert_runs_like_interpreter(g, mod, rng, prec)
