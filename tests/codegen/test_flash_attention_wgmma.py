"""The Hopper wgmma kernel of the fused attention groups (codegen/kernels/flash_attention_wgmma.py,
templates/flash_attention_wgmma.cu.j2):
- applies() declines where it should (no wgmma target, f32, head dims, a K read with a non-unit dim
  stride, "wgmma=off", and while opt-in, no "wgmma=" word); the mma.sync kernel then runs;
- the launch passes what the mma.sync kernel's does (same operands, strides, masks, steps): read
  by test_flash_attention's numpy emulation, it gives the interpreter's result;
- NVRTC compiles the declared points for sm_90a (fp16 / bf16, head dims 64 / 128, padding and
  row masks, causal, tails, packed strided operands); with nvcc, ptxas -v shows no spills and no
  serialized wgmma (C7514); by default a covering subset of the (case, point) kernels
  (tests/codegen/space_cover.py), every one with NNC_FULL_SPACE=1;
- on a GPU (`-m gpu`): matches the interpreter on fresh random inputs with poisoned outputs.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import shutil
import subprocess

import numpy as np
import pytest

from nnc.codegen.kernels import flash_attention_wgmma as W
from nnc.codegen.lower import lower
from nnc.ir.interp import Interpreter
from tests.codegen import space_cover
from tests.codegen.test_flash_attention import _build, _emulate
from tests.passes.test_fuse_attention import assert_runs_like_interpreter, attention_feed

TEMPLATE = "flash_attention_wgmma.cu.j2"


def _with_words(mod, *words):
    """The fused attention group's params with `words` (replacing words of the same keys)."""
    keys = tuple(w.split("=")[0] + "=" for w in words)
    for op in mod.main.ops:
        if op.name == "fused" and op.attrs.kind == "attention":
            kept = [w for w in op.attrs.params.split() if not w.startswith(keys)]
            op.attrs = dataclasses.replace(op.attrs, params=" ".join(list(words) + kept))
    return mod


def _point_word(p) -> str:
    return f"wgmma={p['cw']}x{p['bc']}x{p['stages']}x{p['persist']}x{p.get('pingpong', 0)}"


def _plan(mod, prec, arch="sm_90a"):
    return lower(mod, {"arch": arch, "precision": prec})


def _attn(plan):
    return [l for l in plan.launches if l.kernel and plan.kernels[l.kernel].template.startswith("flash_attention")]


def _templates(plan):
    return [plan.kernels[l.kernel].template for l in _attn(plan)]


def test_declared_space_and_budget():
    space = W.wgmma_space(64, 64, 227 * 1024)
    assert W.DEFAULT_POINT in space
    assert not any(p["cw"] == 3 and p["bc"] == 128 for p in space)  # 160 registers a thread: S, P and O do not fit
    assert all(W.regs_model(p["bc"], 64, 64) <= W.regs_budget(p["cw"]) for p in space)
    assert all(W.smem_bytes(p["cw"], p["bc"], p["stages"], 64, 64) <= 227 * 1024 for p in space)
    big = W.wgmma_space(128, 128, 227 * 1024)  # head dim 128: bc 64 at two warp groups, not at three
    assert {"cw": 2, "bc": 64, "stages": 2, "persist": 1, "pingpong": 0} in big and not any(p["cw"] == 3 for p in big)
    assert W.requested("tile=128x64 wgmma=2x128") == {"cw": 2, "bc": 128, "stages": 2, "persist": 1, "pingpong": 0}
    assert W.requested("wgmma=3x64x3x0") == {"cw": 3, "bc": 64, "stages": 3, "persist": 0, "pingpong": 0}
    assert W.requested("wgmma=2x64x2x1x1")["pingpong"] == 1
    assert W.requested("wgmma=off") == "off" and W.requested("tile=128x64") is None


def test_opt_in_and_declines():
    """Where wgmma does not apply, the mma.sync kernel (flash_attention.cu.j2) runs."""
    word = _point_word(W.DEFAULT_POINT)
    mod = _build("fp16", B=2, S=128, H=2, D=64)
    if not W.ON_BY_DEFAULT:
        assert _templates(_plan(mod, "fp16")) == ["flash_attention.cu.j2"]
    _with_words(mod, word)
    assert _templates(_plan(mod, "fp16")) == [TEMPLATE]
    assert _templates(_plan(mod, "fp16", arch="sm_90")) == ["flash_attention.cu.j2"]  # no wgmma
    _with_words(mod, "wgmma=off")
    assert _templates(_plan(mod, "fp16")) == ["flash_attention.cu.j2"]
    for prec, kw in (("fp32", dict(S=33, H=2, D=64)),  # f32: simt
                     ("fp16", dict(S=40, H=2, D=32)),  # head dim 32
                     ("fp16", dict(S=40, H=2, D=64, kt_input=True))):  # K's dim stride is T
        mod = _with_words(_build(prec, **kw), word)
        assert _templates(_plan(mod, prec)) == ["flash_attention.cu.j2"], kw


@pytest.mark.parametrize("persist", [0, 1])
def test_selected_point_is_launched(persist):
    """One CTA per (query tile, head) item, or (persist) one per SM looping over the items."""
    mod = _with_words(_build("fp16", B=32, S=512, H=12, D=64), f"wgmma=2x128x2x{persist}")
    plan = _plan(mod, "fp16")
    (l,) = _attn(plan)
    k = plan.kernels[l.kernel]
    assert k.template == TEMPLATE and k.params["selected"]["variant"] == "flash_attention.wgmma"
    assert (k.params["CW"], k.params["BC"], k.params["STAGES"], k.params["PERSIST"]) == (2, 128, 2, bool(persist))
    assert not k.params["PINGPONG"]
    assert k.params["ITEMS"] == 4 * 12 * 32 and (k.params["QT"], k.params["NB1"]) == (4, 12)
    assert l.grid == ((132 if persist else 4 * 12 * 32), 1, 1)
    assert l.block == (384, 1, 1) and l.smem == W.smem_bytes(2, 128, 2, 64, 64)


EMULATED = {
    "bert_f16": ("fp16", dict(B=2, S=128, H=2, D=64)),
    "tail_d128_rows_mask": ("fp16", dict(B=1, S=77, H=2, D=128, mask="b1st")),
    "gpt2_bf16_causal_pad": ("bf16", dict(B=2, S=77, H=2, D=64, causal=True, mask="b11t", gpt2_kt=True)),
    "gpt2_split_last": ("fp16", dict(B=2, S=40, H=2, D=64, packed="split_last", causal=True)),
    "vit_gather": ("fp16", dict(B=2, S=48, H=2, D=64, packed="gather", mask=None)),
}


@pytest.mark.parametrize("name", list(EMULATED))
def test_launch_addresses_what_the_interpreter_computes(name, rng):
    """The wgmma launch's buffers, strides and steps, read by the numpy emulation of the tc
    kernel's arithmetic (the same online softmax; its skips change nothing: skipped work adds 0)."""
    prec, kw = EMULATED[name]
    mod = _with_words(_build(prec, **kw), _point_word(W.DEFAULT_POINT))
    plan = _plan(mod, prec)
    (launch,) = _attn(plan)
    k = plan.kernels[launch.kernel]
    assert k.template == TEMPLATE
    k.params = dict(k.params, variant="tc", MI=1)  # the emulation's knobs: tc arithmetic, 16-row skip blocks
    launch = dataclasses.replace(launch, grid=(1, k.params["NB1"], k.params["ITEMS"] // (k.params["QT"] * k.params["NB1"])))
    values = {}
    feed = attention_feed(mod, rng)
    Interpreter(mod, observe=lambda op, outs: values.update({id(r): o for r, o in zip(op.results, outs)})).run(feed)
    values.update({id(a): np.asarray(feed[a.name]) for a in mod.main.args})
    root, out = _emulate(plan, launch, values)
    want = np.asarray(values[id(root.value)], np.float64).reshape(-1)
    assert not np.isnan(out).any()
    tol = {"fp16": 2e-2, "bf16": 5e-2}[prec]
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol)


# the declared points of these compile (one translation unit); the ptxas check uses the same
COMPILE_CASES = [
    ("fp16", dict(B=32, S=512, H=12, D=64, mask=None)),  # the benchmark: scale in the exponentials
    ("fp16", dict(B=32, S=128, H=12, D=64)),  # [B,1,1,T] padding mask: paired loads, rounding
    ("bf16", dict(B=2, S=77, H=2, D=64, causal=True, mask="b11t", gpt2_kt=True)),  # causal + padding, tail
    ("fp16", dict(B=1, S=77, H=2, D=128, mask="b1st")),  # head dim 128, a row-varying mask
    ("fp16", dict(B=2, S=40, H=2, D=64, packed="split_last", causal=True)),  # GPT-2 packed, strided seq
]


@functools.lru_cache(maxsize=None)
def _every_source() -> dict:
    """(case index as text, point word) -> the kernel source, for every declared point of every case
    (lowering them all takes seconds; compiling them all, minutes)."""
    sources = {}
    for n, (prec, kw) in enumerate(COMPILE_CASES):
        mod = _build(prec, **kw)
        for p in W.wgmma_space(kw["D"], kw["D"], 227 * 1024):
            plan = _plan(_with_words(mod, _point_word(p)), prec)
            (l,) = _attn(plan)
            k = plan.kernels[l.kernel]
            assert k.template == TEMPLATE and (k.params["CW"], k.params["BC"], k.params["STAGES"]) == (
                p["cw"], p["bc"], p["stages"]) and k.params["PERSIST"] == bool(p["persist"])
            assert k.params["PINGPONG"] == bool(p["pingpong"])
            sources[(str(n), _point_word(p))] = k.body.replace(l.kernel, f"{l.kernel}_p{len(sources)}")
    return sources


def _sources(strength: int = 1) -> list:
    """The kernel sources space_cover.cover_points keeps at this strength (each case, each point
    parameter value, each line of code; NNC_FULL_SPACE=1: every declared point of every case)."""
    every = _every_source()
    labelled = [(str(n), p) for n, (_, kw) in enumerate(COMPILE_CASES)
                for p in W.wgmma_space(kw["D"], kw["D"], 227 * 1024)]
    chosen = space_cover.cover_points(labelled, strength, lambda n, p: every[(n, _point_word(p))])
    return [every[(n, _point_word(p))] for n, p in chosen]


def test_every_declared_point_compiles_with_nvrtc():
    """Each case, each value of each point parameter and each line of code in one compiled kernel
    at least (tests/codegen/space_cover.py); NNC_FULL_SPACE=1: all 114 (case, point) kernels."""
    from nnc.codegen.kernels import common
    assert len(common.nvrtc_compile("\n".join(_sources()), "sm_90a")) > 0


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (ptxas -v)")
def test_declared_points_do_not_spill_or_serialize(tmp_path):
    """Register use hangs on combinations: every pair of (case, point parameter values) once
    (space_cover strength 2, 14 of the 114 kernels); NNC_FULL_SPACE=1: all of them."""
    src = tmp_path / "fa_wgmma.cu"
    sources = _sources(strength=2)
    src.write_text("\n".join(sources))
    r = subprocess.run(["nvcc", "-cubin", "-arch=sm_90a", "-O3", "-Xptxas", "-v", "-o", str(tmp_path / "fa.cubin"),
                        str(src)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    assert len(spills) == len(sources), r.stderr[-2000:]
    assert all(a == "0" and b == "0" for a, b in spills), r.stderr
    assert "C7514" not in r.stderr and "serialized" not in r.stderr, r.stderr


# ---------------------------------------------------------------- on the GPU

GPU_CASES = [
    ("fp16", dict(B=2, S=128, H=4, D=64), None),  # [B,1,1,T] padding mask
    ("fp16", dict(B=1, S=512, H=4, D=64, mask=None), None),
    ("fp16", dict(B=2, S=77, H=3, D=64), None),  # tail tile
    ("bf16", dict(B=2, S=128, H=2, D=64), None),
    ("bf16", dict(B=2, S=200, H=2, D=64, causal=True), None),  # odd length, causal + padding, bf16
    ("fp16", dict(B=1, S=512, H=2, D=64, causal=True, mask="b11t", gpt2_kt=True), None),
    ("fp16", dict(B=1, S=128, H=2, D=128, mask="b1st"), None),  # head dim 128, row-varying mask
    ("fp16", dict(B=1, S=77, H=2, D=128), None),
    ("fp16", dict(B=2, S=197, H=12, D=64, packed="gather", mask=None), None),  # ViT-B/16, strided
    ("fp16", dict(B=1, S=128, H=12, D=64, packed="split_last", causal=True), None),  # GPT-2 c_attn
    ("fp16", dict(B=8, S=512, H=12, D=64, mask=None), None),
] + [("fp16", dict(B=2, S=333, H=3, D=64), p) for p in W.wgmma_space(64, 64, 227 * 1024)  # every tile shape
       if p["stages"] == 2 and p["persist"] and not p["pingpong"]
       or p == {"cw": 2, "bc": 128, "stages": 2, "persist": 0, "pingpong": 0}] + [
    # persistent CTAs with more items than CTAs (the producer runs ahead into the next item), 3 stages
    ("fp16", dict(B=4, S=512, H=48, D=64, mask=None), {"cw": 2, "bc": 128, "stages": 2, "persist": 1, "pingpong": 0}),
    ("bf16", dict(B=2, S=300, H=100, D=64, causal=True), {"cw": 1, "bc": 64, "stages": 3, "persist": 1, "pingpong": 0}),
] + [  # the warp groups in turn: last (a barrier miscount would hang; the earlier cases have run)
    ("fp16", dict(B=2, S=333, H=3, D=64), {"cw": 2, "bc": 128, "stages": 2, "persist": 1, "pingpong": 1}),
    ("fp16", dict(B=4, S=512, H=48, D=64, mask=None), {"cw": 3, "bc": 64, "stages": 2, "persist": 1, "pingpong": 1}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("prec,kw,point", GPU_CASES,
                         ids=[f"{p}-" + "-".join(f"{k}{v}" for k, v in kw.items()) + (f"-{_point_word(pt)}" if pt else "")
                              for p, kw, pt in GPU_CASES])
def test_gpu_wgmma_attention_matches_interpreter(prec, kw, point, tmp_path, rng):
    import nnc
    from nnc.codegen.emit import compile_to_dir
    mod = _with_words(_build(prec, **kw), _point_word(point or W.DEFAULT_POINT))
    plan = compile_to_dir(mod, tmp_path, arch=None, precision=prec)
    if not plan["target"].get("has_wgmma"):
        pytest.skip("the GPU present has no wgmma (not sm_90a)")
    temps = [k["template"] for k in plan["kernels"] if k["template"].startswith("flash_attention")]
    assert temps == [TEMPLATE], temps
    g = nnc.load(tmp_path)
    assert_runs_like_interpreter(g, mod, rng, prec)
