"""The cross-layer dw 3x3 + pw 1x1 kernel (templates/conv_dw_pw.cu.j2, codegen/kernels/conv_cross_layer.py).

- NVRTC compiles it for sm_90 at fp16 and bf16 over a sample of its declared space (every spatial
  tile and warp layout, both chunk sizes), with and without bias / residual / activations;
- render rejects nothing the space declares (grid and smem follow the params);
- on a GPU (marked gpu): MobileNetV2-style blocks (stem, expand 1x1, dw 3x3, project 1x1 (+ x),
  GAP) built with the pass match the reference interpreter at fp16 (rel 1e-2) and bf16 (4e-2) on
  fresh random inputs with the arena and outputs poisoned: odd sizes 7x7, 14x14, 56x56, 112x112,
  stride 1 and 2, with and without the residual, batch 1 and 2; and one shape for several tiles
  of the space (the recorded tile set in the op's params, which the variant's default follows).
"""
from __future__ import annotations

import numpy as np
import pytest

from nnc.codegen.kernels import conv_cross_layer as cx
from nnc.codegen.kernels.common import nvrtc_compile
from nnc.ir.interp import Interpreter
from nnc.passes import fuse_cross_layer as xl
from tests.passes.test_fuse_cross_layer import build, dw_pw_ops, feed, inverted_residual

CLIP = ("clip", (("lo", 0.0), ("hi", 6.0)))


@pytest.fixture(autouse=True)
def every_pair_pays(monkeypatch):
    """Group every eligible pair: the kernel must be right on any shape the selector may give it."""
    monkeypatch.setattr(xl, "pays", lambda s: True)


def _sample(space):
    """One point per (TH, TW, WARPS_M, WARPS_N), alternating the chunk size."""
    seen, out = set(), []
    for p in space:
        k = (p["TH"], p["TW"], p["WARPS_M"], p["WARPS_N"])
        if k not in seen:
            seen.add(k)
            out.append(p)
    return out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_nvrtc_compiles_the_space(dtype):
    s = xl.DwPwShape(2, 15, 15, 96, 8, 8, 40, 2, 2, 1, 1)
    pts = _sample(xl.tile_space(s, 227 * 1024))
    assert len(pts) >= 8
    for i, p in enumerate(pts):
        spec = cx.render_spec(s, dtype, p, CLIP, ("relu", ()) if i % 2 else ("none", ()),
                              dw_bias=i % 3 != 0, pw_bias=i % 2 == 0, has_c=i % 2 == 1)
        assert spec.block[0] == 32 * p["WARPS_M"] * p["WARPS_N"] and spec.smem == xl.smem_bytes(p)
        assert spec.grid == (xl.cdiv(8, p["TH"]) * xl.cdiv(8, p["TW"]), xl.cdiv(40, p["KN"]), 2)
        assert f"tile {p['TH']}x{p['TW']}" in spec.source
        nvrtc_compile(spec.source)


def test_model_kernels_compile_with_nvrtc(tmp_path):
    from nnc.codegen.emit import compile_to_dir
    for precision in ("fp16", "bf16"):
        m = build(inverted_residual(hw=14, stride=2, cin=16, expand=6), precision)
        plan = compile_to_dir(m, tmp_path / precision, arch="sm_90", precision=precision)
        assert plan["cubins"]
        assert any(k["template"] == "conv_dw_pw.cu.j2" for k in _kernels(plan))


GPU_CASES = [dict(hw=7, cin=16, expand=6), dict(hw=14, cin=16, expand=6, stride=2),
             dict(hw=14, cin=24, expand=4, residual=False, k=32), dict(hw=56, cin=24, expand=6),
             dict(hw=56, cin=24, expand=6, stride=2, k=32), dict(hw=112, cin=16, expand=2, n=1),
             dict(hw=9, cin=8, expand=3, n=2), dict(hw=28, cin=32, expand=6, n=2, stride=2, k=64)]


def _check_gpu(m, precision, tmp_path, rng):
    import nnc
    from nnc.codegen.emit import compile_to_dir
    compile_to_dir(m, tmp_path, arch=None, precision=precision)
    g = nnc.load(tmp_path)
    assert any(k.get("template") == "conv_dw_pw.cu.j2" for k in _kernels(g.plan))
    tol = 1e-2 if precision == "fp16" else 4e-2
    for _ in range(2):
        f = feed(m, rng)
        ref = Interpreter(m).run(f)
        got = g.run(f, output="numpy", poison=True)
        for k, v in ref.items():
            a, b = np.asarray(got[k]).astype(np.float64), v.astype(np.float64)
            assert np.isfinite(a).all(), k
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())), err_msg=k)


def _kernels(plan):
    ks = plan.get("kernels", {})
    return list(ks.values()) if isinstance(ks, dict) else list(ks)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
def test_gpu_block_matches_interpreter(case, precision, tmp_path, rng):
    m = build(inverted_residual(seed=case, **GPU_CASES[case]), precision)
    assert len(dw_pw_ops(m)) == 1
    _check_gpu(m, precision, tmp_path, rng)


@pytest.mark.gpu
@pytest.mark.parametrize("pick", range(6))
def test_gpu_tiles_of_the_space(pick, tmp_path, rng):
    m = build(inverted_residual(hw=14, cin=16, expand=6, n=2, seed=3), "fp16")
    op = dw_pw_ops(m)[0]
    s = xl.pair_shape(*[b for b in op.attrs.body.ops if b.name == "Conv"])
    pts = _sample(xl.tile_space(s, 227 * 1024))
    p = pts[pick * len(pts) // 6]
    object.__setattr__(op.attrs, "params", xl.format_tile(p))
    _check_gpu(m, "fp16", tmp_path, rng)
