"""The TMA points of the Hopper wgmma attention kernel (codegen/kernels/flash_attention_wgmma.py,
"tma": 1; templates/flash_attention_wgmma.cu.j2, TMA): one producer thread loads Q and the K/V
tiles with cp.async.bulk.tensor from three tensor maps, Q double-buffered.
- the space holds TMA points only where the operands have tensor maps (and the 192 x 128 tile only
  for groups without masks: the registers ptxas fits); a point word with a sixth
  field 1 selects one; its launch carries the three map specs (dims (dim, seq, batch1, batch0),
  byte strides, boxes 64 x 64 / bc rows, 128B swizzle, args 0 / 1 / 2 = the Q / K / V buffers) and
  the smem of two Q buffers; the FMA-pipe exponential (EMU points) is within 1e-4 of 2^x;
- the heuristic takes TMA_DEFAULT_POINTS[0] for the kind of group it was measured to win on
  (f16, head dim 64, no mask, >= 512 keys, enough items) and the mma.sync kernel elsewhere;
- NVRTC compiles a covering subset of the TMA points (every value of each parameter once, over a
  mask-free head-dim-64 case and a masked head-dim-128 bf16 tail case); NNC_FULL_SPACE=1: all;
- on a GPU (`-m gpu`): matches the interpreter on fresh random inputs with poisoned outputs (no
  mask, padding mask, causal, row mask, tails, head dim 128, a packed GPT-2 projection, persistent
  grids with more items than CTAs, and the turn-taking points last: a barrier miscount would hang).
"""
from __future__ import annotations

import functools
import re
import shutil
import subprocess

import numpy as np
import pytest

from nnc.codegen import tma
from nnc.codegen.kernels import flash_attention_wgmma as W
from tests.codegen import space_cover
from tests.codegen.test_flash_attention import _build
from tests.codegen.test_flash_attention_wgmma import TEMPLATE, _attn, _plan, _with_words
from tests.passes.test_fuse_attention import assert_runs_like_interpreter


def _word(p) -> str:
    return f"wgmma={p['cw']}x{p['bc']}x{p['stages']}x{p['persist']}x{p.get('pingpong', 0)}x{p.get('tma', 0)}x{p.get('emu', 0)}"


def _maskless(kw) -> bool:
    return kw.get("mask", "default") is None and not kw.get("causal")


def _tma_points(D=64, maskless=False):
    return [p for p in W.wgmma_space(D, D, 227 * 1024, tma=True, maskless=maskless) if p.get("tma")]


def test_tma_points_declared():
    assert not any(p.get("tma") for p in W.wgmma_space(64, 64, 227 * 1024))  # only where maps exist
    pts = _tma_points()
    assert {"cw": 2, "bc": 128, "stages": 6, "persist": 1, "pingpong": 1, "tma": 1} in pts
    # one CTA an SM where two would not fit its shared memory (cw 1, bc 64, 6 stages: 113 KB)
    assert W.ctas_per_sm(1, 64, W.point_smem({"cw": 1, "bc": 64, "stages": 6, "tma": 1}, 64, 64)) == 1
    assert W.ctas_per_sm(1, 64, W.point_smem({"cw": 1, "bc": 64, "stages": 3, "tma": 1}, 64, 64)) == 2
    assert all(p["persist"] == 1 and W.point_smem(p, 64, 64) <= 227 * 1024 for p in pts)
    assert not any(p["cw"] == 3 and p["bc"] == 128 for p in pts)  # registers, as the cp.async points
    # ... but with no mask / causal step ptxas fits FlashAttention-3's 192 x 128 tile (152 registers)
    wide = [p for p in _tma_points(maskless=True) if p not in pts]
    assert wide and all((p["cw"], p["bc"]) == (3, 128) for p in wide) and not _tma_points(128, maskless=True)[len(
        _tma_points(128)):]
    assert W.requested("wgmma=2x128x3x1x1x1") == {"cw": 2, "bc": 128, "stages": 3, "persist": 1, "pingpong": 1,
                                                  "tma": 1}
    assert "tma" not in W.requested("wgmma=2x128x3x1x1x0")  # the cp.async point, as before
    assert W.requested("wgmma=2x128x4x1x1x1x4")["emu"] == 4
    emu = [p for p in pts if p.get("emu")]
    assert emu and all(p["pingpong"] and p["bc"] == 128 and p["emu"] in W.EMUS for p in emu)
    assert W.point_smem(pts[0], 64, 64) == W.smem_bytes(pts[0]["cw"], pts[0]["bc"], pts[0]["stages"], 64, 64) + \
        pts[0]["cw"] * 64 * 64 * 2 + 16
    # a dim of extent 1 takes a valid stride; a broadcast dim of extent > 1 gets 0 (no map: declined)
    assert W._map_strides([64, 512, 1, 32], [1, 768, 0, 512 * 768], 2) == [1536, 1536 * 512, 512 * 768 * 2]


def test_fma_pipe_exp2_matches_exp2():
    """nnc_exp2_poly (the EMU points' exponentials) in float32 steps, constants read from the
    template: relative error below 1e-4 (a 16-bit P rounds at 4.9e-4), -inf -> ~1e-38, 0 -> ~1."""
    from pathlib import Path
    src = (Path(__file__).resolve().parents[2] / "templates" / TEMPLATE).read_text()
    body = src[src.index("float nnc_exp2_poly"):]
    body = body[:body.index("}")]
    c = [np.float32(v) for v in re.findall(r"(-?\d+\.\d*)f\b", body)]
    lo, shift, (c3, c2, c1, c0) = c[0], c[1], c[-4:]  # clamp, shifter (twice), the cubic from the top
    f32 = np.float32
    x = np.concatenate([np.linspace(-140, 0, 400001), [-np.inf, 0.0]]).astype(f32)
    xc = np.maximum(x, lo)
    t = (xc + shift).astype(f32)
    f = (xc - (t - shift)).astype(f32)
    p = ((((c3 * f + c2).astype(f32) * f + c1).astype(f32)) * f + c0).astype(f32)
    bits = (p.view(np.uint32).astype(np.uint64) + ((t.view(np.uint32).astype(np.uint64) << 23) & 0xFFFFFFFF))
    y = (bits & 0xFFFFFFFF).astype(np.uint32).view(f32).astype(np.float64)
    ref = np.exp2(x.astype(np.float64))
    m = x >= -120
    assert np.max(np.abs(y[m] - ref[m]) / ref[m]) < 1e-4
    assert 0 <= y[-2] < 1e-36 and abs(y[-1] - 1) < 1e-4 and np.all(y[~m][:-1] < 1e-35)


def test_wide_tma_point_only_without_masks():
    p = {"cw": 3, "bc": 128, "stages": 3, "persist": 1, "pingpong": 1, "tma": 1}
    for kw, wide in ((dict(B=2, S=500, H=12, D=64, mask=None), True), (dict(B=2, S=128, H=12, D=64), False),
                     (dict(B=2, S=128, H=2, D=64, mask=None, causal=True), False)):
        plan = _plan(_with_words(_build("fp16", **kw), _word(p)), "fp16")
        (l,) = _attn(plan)
        k = plan.kernels[l.kernel]
        assert ((k.params["CW"], k.params["BC"]) == (3, 128)) == wide, kw  # else the default point


def test_tma_point_is_launched_with_its_maps():
    p = {"cw": 2, "bc": 128, "stages": 3, "persist": 1, "pingpong": 1, "tma": 1}
    plan = _plan(_with_words(_build("fp16", B=32, S=512, H=12, D=64, mask=None), _word(p)), "fp16")
    (l,) = _attn(plan)
    k = plan.kernels[l.kernel]
    assert k.template == TEMPLATE and k.params["TMA"] and k.params["PINGPONG"]
    assert l.grid == (132, 1, 1) and l.block == (384, 1, 1) and l.smem == W.point_smem(p, 64, 64)
    maps = [a for a in l.args if getattr(a, "type", None) == tma.TMAP_CTYPE]
    assert len(maps) == 3 and l.args[-3:] == maps
    specs = [tma.spec_of(m.value) for m in maps]
    # [B, S, H*D] inputs split into heads: seq stride H*D, head stride D, batch stride S*H*D (bytes)
    st = (12 * 64 * 2, 64 * 2, 512 * 12 * 64 * 2)
    assert [(s.dims, s.strides, s.box, s.swizzle, s.arg) for s in specs] == [
        ((64, 512, 12, 32), st, (64, 64, 1, 1), 128, 0), ((64, 512, 12, 32), st, (64, 128, 1, 1), 128, 1),
        ((64, 512, 12, 32), st, (64, 128, 1, 1), 128, 2)]
    assert all(not getattr(l.args[i], "type", None) for i in range(3))  # args 0..2: the Q/K/V buffers
    body = k.body
    assert "cp.async.bulk.tensor.4d" in body and "nnc_fa_fence_proxy_async();" not in body.split("extern \"C\"")[1]
    assert "cp.async.cg" not in body.split("extern \"C\"")[1]  # no cp.async chunk copies in the kernel


# the TMA points of these compile (one translation unit): mask-free D 64 (the benchmark), and bf16
# head dim 128 with a row-varying mask and a tail
COMPILE_CASES = [
    ("fp16", dict(B=32, S=512, H=12, D=64, mask=None)),
    ("bf16", dict(B=1, S=77, H=2, D=128, mask="b1st")),
    ("fp16", dict(B=2, S=40, H=2, D=64, packed="split_last", causal=True)),  # GPT-2 packed, strided seq
]


@functools.lru_cache(maxsize=1)
def _sources() -> tuple:
    """One source per covered (case, TMA point); rendered once for both compile tests."""
    labelled = [(str(n), p) for n, (_, kw) in enumerate(COMPILE_CASES) for p in _tma_points(kw["D"], _maskless(kw))]
    picked = space_cover.cover_points(labelled)
    wide = ("0", {"cw": 3, "bc": 128, "stages": 4, "persist": 1, "pingpong": 1, "tma": 1})  # the register-tight one
    assert wide in labelled
    out = []
    for n, p in picked + ([wide] if wide not in picked else []):
        prec, kw = COMPILE_CASES[int(n)]
        plan = _plan(_with_words(_build(prec, **kw), _word(p)), prec)
        (l,) = _attn(plan)
        k = plan.kernels[l.kernel]
        assert k.params["TMA"] and (k.params["CW"], k.params["BC"], k.params["STAGES"]) == (p["cw"], p["bc"], p["stages"])
        out.append(k.body.replace(l.kernel, f"{l.kernel}_t{len(out)}"))
    return tuple(out)


def test_tma_points_compile_with_nvrtc():
    from nnc.codegen.kernels import common
    assert len(common.nvrtc_compile("\n".join(_sources()), "sm_90a")) > 0


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (ptxas -v)")
def test_tma_points_do_not_spill_or_serialize(tmp_path):
    sources = _sources()
    src = tmp_path / "fa_tma.cu"
    src.write_text("\n".join(sources))
    r = subprocess.run(["nvcc", "-cubin", "-arch=sm_90a", "-O3", "-Xptxas", "-v", "-o", str(tmp_path / "fa.cubin"),
                        str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    assert len(spills) == len(sources) and all(a == "0" and b == "0" for a, b in spills), r.stderr
    assert "C7514" not in r.stderr and "serialized" not in r.stderr, r.stderr


# ---------------------------------------------------------------- on the GPU

P2 = {"cw": 2, "bc": 128, "stages": 3, "persist": 1, "pingpong": 0, "tma": 1}
GPU_CASES = [
    ("fp16", dict(B=2, S=512, H=4, D=64, mask=None), P2),
    ("fp16", dict(B=2, S=128, H=4, D=64), P2),  # [B,1,1,T] padding mask
    ("fp16", dict(B=2, S=77, H=3, D=64), P2),  # tail tile (Q rows and K/V rows past S / T: zero fill)
    ("bf16", dict(B=2, S=200, H=2, D=64, causal=True), P2),  # causal + padding, odd length
    ("fp16", dict(B=1, S=128, H=2, D=128, mask="b1st"), dict(P2, bc=64)),  # head dim 128 (two boxes a row), row mask
    ("fp16", dict(B=1, S=128, H=12, D=64, packed="split_last", causal=True), P2),  # GPT-2 c_attn views
    ("fp16", dict(B=4, S=512, H=48, D=64, mask=None), P2),  # more items than CTAs: Q double buffer reused
    ("fp16", dict(B=4, S=512, H=48, D=64, mask=None), dict(P2, bc=64, stages=4)),
    ("fp16", dict(B=2, S=2048, H=12, D=64, mask=None), dict(P2, stages=6)),  # the deepest ring, 16 tiles an item
    ("fp16", dict(B=2, S=333, H=3, D=64), {"cw": 1, "bc": 64, "stages": 2, "persist": 1, "pingpong": 0, "tma": 1}),
    ("fp16", dict(B=2, S=333, H=3, D=64), {"cw": 3, "bc": 64, "stages": 3, "persist": 1, "pingpong": 0, "tma": 1}),
    # the 192 x 128 tile of mask-free groups: a tail, and more items than CTAs
    ("fp16", dict(B=2, S=333, H=3, D=64, mask=None), {"cw": 3, "bc": 128, "stages": 3, "persist": 1, "pingpong": 0, "tma": 1}),
    ("fp16", dict(B=8, S=512, H=12, D=64, mask=None), {"cw": 3, "bc": 128, "stages": 3, "persist": 1, "pingpong": 0, "tma": 1}),
] + [  # the warp groups in turn: last
    ("fp16", dict(B=4, S=512, H=48, D=64, mask=None), dict(P2, pingpong=1)),
    ("fp16", dict(B=8, S=512, H=12, D=64, mask=None), dict(P2, pingpong=1, stages=4)),
    ("fp16", dict(B=2, S=333, H=3, D=64), {"cw": 3, "bc": 64, "stages": 2, "persist": 1, "pingpong": 1, "tma": 1}),
    ("fp16", dict(B=8, S=512, H=12, D=64, mask=None), {"cw": 3, "bc": 128, "stages": 3, "persist": 1, "pingpong": 1, "tma": 1}),
    # exponentials partly on the FMA pipe: causal (-inf scores), a padding mask, mask-free wide tile
    ("bf16", dict(B=2, S=200, H=2, D=64, causal=True), dict(P2, pingpong=1, stages=4, emu=4)),
    ("fp16", dict(B=2, S=128, H=4, D=64), dict(P2, pingpong=1, stages=4, emu=8)),
    ("fp16", dict(B=8, S=512, H=12, D=64, mask=None), {"cw": 3, "bc": 128, "stages": 3, "persist": 1, "pingpong": 1,
                                                       "tma": 1, "emu": 4}),
]


def test_gpu_cases_lower_to_their_points():
    """Each GPU case's point is declared for its group (the lowering would fall back otherwise)."""
    for prec, kw, point in GPU_CASES:
        plan = _plan(_with_words(_build(prec, **kw), _word(point)), prec)
        (l,) = _attn(plan)
        kp = plan.kernels[l.kernel].params
        assert kp["TMA"] and (kp["CW"], kp["BC"], kp["STAGES"], kp["PINGPONG"], kp["EMU"]) == (
            point["cw"], point["bc"], point["stages"], bool(point["pingpong"]), point.get("emu", 0)), (kw, point)


# the heuristic (no "wgmma=" word): the measured TMA win (f16, head dim 64, no mask, >= 512 keys,
# enough items) takes TMA_DEFAULT_POINTS[0]; the rest keeps the mma.sync kernel
HEURISTIC = [
    (dict(B=32, S=512, H=12, D=64, mask=None), True),  # measured: 0.0692 ms vs SDPA 0.1016, mma 0.1077
    (dict(B=8, S=2048, H=12, D=64, mask=None), True),  # longer: more K/V tiles an item (not timed)
    (dict(B=32, S=128, H=12, D=64, mask=None), False),  # 128 keys: mma measured 0.0112 vs SDPA 0.0129
    (dict(B=1, S=512, H=12, D=64, mask=None), False),  # 48 items < 132 SMs: mma 0.0087 vs SDPA 0.0118
    (dict(B=1, S=128, H=12, D=64, mask=None), False),  # mma 0.0038 vs TMA 0.0046
    (dict(B=32, S=512, H=12, D=64), False),  # a padding mask: not measured with TMA
    (dict(B=32, S=512, H=12, D=64, mask=None, causal=True), False),
    (dict(B=32, S=512, H=12, D=128, mask=None), False),  # head dim 128: not measured
]


@pytest.mark.parametrize("kw,wgmma", HEURISTIC, ids=["-".join(f"{k}{v}" for k, v in kw.items()) for kw, _ in HEURISTIC])
def test_heuristic_takes_the_measured_tma_point(kw, wgmma):
    plan = _plan(_build("fp16", **kw), "fp16")
    (l,) = _attn(plan)
    k = plan.kernels[l.kernel]
    if not wgmma:
        assert k.template == "flash_attention.cu.j2"
        return
    want = W.TMA_DEFAULT_POINTS[0]
    assert k.template == TEMPLATE and k.params["TMA"] and k.params["PINGPONG"]
    assert (k.params["CW"], k.params["BC"], k.params["STAGES"]) == (want["cw"], want["bc"], want["stages"])
    assert l.grid == (132, 1, 1) and l.smem == W.point_smem(want, 64, 64) <= 227 * 1024
    # an explicit "wgmma=off" still takes the mma.sync kernel
    plan = _plan(_with_words(_build("fp16", **kw), "wgmma=off"), "fp16")
    assert [plan.kernels[x.kernel].template for x in _attn(plan)] == ["flash_attention.cu.j2"]


@pytest.mark.gpu
@pytest.mark.parametrize("prec,kw,point", GPU_CASES,
                         ids=[f"{p}-" + "-".join(f"{k}{v}" for k, v in kw.items()) + "-" + _word(pt)
                              for p, kw, pt in GPU_CASES])
def test_gpu_tma_attention_matches_interpreter(prec, kw, point, tmp_path, rng):
    import nnc
    from nnc.codegen.emit import compile_to_dir
    mod = _with_words(_build(prec, **kw), _word(point))
    plan = compile_to_dir(mod, tmp_path, arch=None, precision=prec)
    if not plan["target"].get("has_wgmma"):
        pytest.skip("the GPU present has no wgmma (not sm_90a)")
    ks = [k for k in plan["kernels"] if k["template"].startswith("flash_attention")]
    assert [k["template"] for k in ks] == [TEMPLATE], ks
    kp = ks[0]["params"]  # the point asked for, not a fallback
    assert kp["TMA"] and (kp["CW"], kp["BC"], kp["STAGES"], kp["PINGPONG"], kp["EMU"]) == (
        point["cw"], point["bc"], point["stages"], bool(point["pingpong"]), point.get("emu", 0)), kp
    g = nnc.load(tmp_path)
    assert_runs_like_interpreter(g, mod, rng, prec)
