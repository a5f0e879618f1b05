"""The GEMM block order `swizzle` (codegen/kernels/gemm.py): GROUP_M tile rows walked before moving
along N. CPU: the block -> tile map is a bijection (Python formula, and the rendered templates' own
index code compiled for the host and run over every block), the default order leaves kernels
byte-identical, the heuristic re-orders only large multi-wave GEMMs, every swizzle value
NVRTC-compiles; GPU (marked): swizzled GEMMs at 4096x4096x1024 match numpy."""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from nnc.codegen.kernels import gemm

from .test_gemm_conv import HAVE_NVRTC, _check, _dev, _host, _poison, _rounded, _run, needs_gpu

# (M, N, BM, BN): grids with ragged last groups (tiles_m % G != 0) and tiny ones
GRIDS = [(4096, 4096, 128, 128), (1000, 999, 64, 64), (300, 8192, 128, 256), (8192, 100, 128, 64), (64, 64, 64, 64),
         (1300, 700, 128, 128)]


def _tiles(M, N, BM, BN):
    return gemm.cdiv(M, BM), gemm.cdiv(N, BN)


@pytest.mark.parametrize("group", gemm.SWIZZLE_SPACE + (3, 1000))
@pytest.mark.parametrize("M,N,BM,BN", GRIDS)
def test_tile_of_is_a_bijection(M, N, BM, BN, group):
    tm_n, tn_n = _tiles(M, N, BM, BN)
    bid = np.arange(tm_n * tn_n)
    tm, tn = gemm.tile_of(bid, tm_n, tn_n, group)
    assert tm.min() >= 0 and tm.max() < tm_n and tn.min() >= 0 and tn.max() < tn_n
    assert np.unique(tm * tn_n + tn).size == bid.size
    # the scalar form is the same formula
    for b in (0, bid.size // 3, bid.size - 1):
        assert gemm.tile_of(int(b), tm_n, tn_n, group) == (tm[b], tn[b])


def test_swizzle_1_is_row_major_and_groups_walk_m_first():
    tm, tn = gemm.tile_of(np.arange(12), 3, 4, 1)
    assert list(tm) == [0] * 4 + [1] * 4 + [2] * 4 and list(tn) == [0, 1, 2, 3] * 3
    tm, tn = gemm.tile_of(np.arange(8), 4, 2, 2)  # 2 rows down, then the next column
    assert list(zip(tm, tn)) == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1)]


def _index_code(src: str) -> str:
    """The rendered kernel's block -> tile code: from `const int tiles_m` to `const int m0`."""
    m = re.search(r"^\s*const int tiles_m = .*?^\s*const int m0 = [^\n]*\n", src, re.S | re.M)
    assert m, "block-order code not found in the rendered template"
    return m.group(0)


HOST = r"""
#include <cstdio>
#include <algorithm>
using std::min;
struct Dim { int x, y, z; };
int main() {
  int shapes[][2] = {SHAPES};
  for (auto& s : shapes) {
    const int M = s[0], N = s[1];
    const int total = ((M + BM - 1) / BM) * ((N + BN - 1) / BN);
    for (int b = 0; b < total; ++b) {
      Dim blockIdx{b, 0, 0};
      CODE
      std::printf("%d %d\n", m0, n0);
    }
  }
  return 0;
}
"""


def _host_run(spec, shapes, BM, BN, tmp_path) -> list:
    code = _index_code(spec.source)
    src = (HOST.replace("SHAPES", ",".join(f"{{{m},{n}}}" for m, n in shapes)).replace("CODE", code)
           .replace("BM", str(BM)).replace("BN", str(BN)))
    exe, cpp = tmp_path / "emu", tmp_path / "emu.cpp"
    cpp.write_text(src)
    r = subprocess.run(["g++", "-O1", "-std=c++17", str(cpp), "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:] + src
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    return [(int(a), int(b)) for a, b in zip(out[::2], out[1::2])]


@pytest.mark.skipif(shutil.which("g++") is None, reason="no host C++ compiler")
@pytest.mark.parametrize("family", ["tc", "f32"])
@pytest.mark.parametrize("swizzle", gemm.SWIZZLE_SPACE)
def test_template_block_order_is_the_formula_and_a_bijection(family, swizzle, tmp_path):
    """The templates' index code itself (gemm_tc_core.cu.j2 / gemm_f32.cu.j2 as rendered), compiled
    for the host with blockIdx emulated, maps every block to a distinct in-range tile, as tile_of."""
    dt = "float16" if family == "tc" else "float32"
    pr = gemm.GemmProblem(1000, 999, 333, dtype=dt)
    p = dict(gemm.candidates(pr)[0], swizzle=swizzle)
    spec = gemm.render(pr, p)
    BM, BN = p["BM"], p["BN"]
    shapes = [(1000, 999), (BM * 9 + 1, BN * 3), (BM, BN * 20), (BM * 17, BN)]
    got = _host_run(spec, shapes, BM, BN, tmp_path)
    i = 0
    for M, N in shapes:
        tm_n, tn_n = _tiles(M, N, BM, BN)
        n = tm_n * tn_n
        mine = got[i:i + n]
        i += n
        tm, tn = gemm.tile_of(np.arange(n), tm_n, tn_n, swizzle)
        assert mine == [(int(a) * BM, int(b) * BN) for a, b in zip(tm, tn)]
        assert len(set(mine)) == n and all(0 <= a < M and 0 <= b < N for a, b in mine)
    assert i == len(got)


def test_default_order_renders_what_it_did_before():
    """swizzle = GROUP_M (the order before the parameter existed): same source, name and params as
    a call without it, so the kernels of small GEMMs (and generated/) do not change."""
    for dt, tf in (("float16", False), ("float32", True), ("float32", False)):
        pr = gemm.GemmProblem(512, 384, 256, dtype=dt, tf32=tf, has_bias=True)
        tile = {k: v for k, v in gemm.default_params(pr).items() if k != "swizzle"}
        a = gemm.render(pr, tile)
        b = gemm.render(pr, dict(tile, swizzle=gemm.GROUP_M))
        assert (a.source, a.name, a.params) == (b.source, b.name, b.params)
        assert "swizzle" not in a.params
        c = gemm.render(pr, dict(tile, swizzle=1))
        assert c.name != a.name and c.params["swizzle"] == 1 and c.source != a.source


def test_bad_swizzle_is_an_error():
    pr = gemm.GemmProblem(256, 256, 256)
    for bad in (0, -1, 2.0, True, "8"):
        with pytest.raises(ValueError, match="swizzle"):
            gemm.render(pr, dict(gemm.candidates(pr)[0], swizzle=bad))


def test_heuristic_keeps_small_and_l2_resident_gemms_in_the_default_order():
    for M, N, K in [(128, 3072, 768), (3136, 256, 64), (4096, 4096, 1024), (50176, 64, 576), (1, 1000, 2048)]:
        pr = gemm.GemmProblem(M, N, K)
        assert gemm.default_params(pr)["swizzle"] == gemm.GROUP_M, (M, N, K)
    # one wave or less: the order cannot matter, so the space holds only the default order
    small = gemm.GemmProblem(512, 512, 8192)
    assert {p["swizzle"] for p in gemm.candidates(small)} == {gemm.GROUP_M}


def test_heuristic_reorders_large_multiwave_gemms():
    pr = gemm.GemmProblem(8192, 8192, 4096)  # 128 MB of operands, many waves
    d = gemm.default_params(pr)
    assert d["swizzle"] in gemm.SWIZZLE_SPACE and d["swizzle"] != gemm.GROUP_M
    tile = (d["BM"], d["BN"])
    swz = [p["swizzle"] for p in gemm.candidates(pr) if (p["BM"], p["BN"]) == tile and p["BK"] == d["BK"]
           and p.get("STAGES") == d.get("STAGES")]
    assert sorted(swz) == sorted(gemm.SWIZZLE_SPACE) and swz[0] == d["swizzle"]  # the pick listed first
    wave = gemm.DEFAULT_TARGET.sm_count * gemm.ctas_per_sm(d, "tc", 2, gemm.DEFAULT_TARGET)
    tm_n, tn_n = _tiles(8192, 8192, *tile)
    t = {g: gemm.wave_traffic(tm_n, tn_n, *tile, g, wave) for g in gemm.SWIZZLE_SPACE}
    assert t[d["swizzle"]] == min(t.values()) and t[d["swizzle"]] <= 0.9 * t[gemm.GROUP_M]
    assert gemm.render(pr, d).params["swizzle"] == d["swizzle"]


@pytest.mark.skipif(not HAVE_NVRTC, reason="NVRTC unavailable")
@pytest.mark.parametrize("dt,tf", [("float16", False), ("float32", True), ("float32", False)])
def test_every_swizzle_compiles_sm90(dt, tf):
    from nnc.codegen.kernels import common
    pr = gemm.GemmProblem(8192, 8192, 4096, dtype=dt, tf32=tf, has_bias=True, act="relu")
    tile = {k: v for k, v in gemm.default_params(pr).items() if k != "swizzle"}
    specs = [gemm.render(pr, dict(tile, swizzle=g)) for g in gemm.SWIZZLE_SPACE]
    assert len({s.name for s in specs}) == len(specs)
    assert len(common.nvrtc_compile("\n".join(s.source for s in specs), "sm_90")) > 0


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("swizzle", gemm.SWIZZLE_SPACE)
def test_swizzled_gemm_matches_numpy_gpu(swizzle):
    M, N, K = 4096, 4096, 1024
    rng = np.random.default_rng(swizzle)
    a = rng.uniform(-1, 1, (M, K))
    b = rng.uniform(-1, 1, (K, N))
    pr = gemm.GemmProblem(M, N, K, dtype="float16")
    p = dict(gemm.default_params(pr), swizzle=swizzle)
    spec = gemm.render(pr, p)
    assert spec.grid[0] > 132  # more than one wave: the order is exercised
    d = _poison((M, N), "float16")
    _run(spec, dict(A=_dev(a, "float16"), B=_dev(b, "float16"), D=d))
    ref = _rounded(a, "float16") @ _rounded(b, "float16")
    _check(_host(d, "float16"), ref, 1e-2)


@pytest.mark.gpu
@needs_gpu
def test_chosen_swizzle_is_not_slower_gpu():
    """At a shape where the heuristic re-orders (operands over L2, many waves), its order runs no
    slower than the old fixed order (GROUP_M) within 3%: the median of 10 timed launches each."""
    import cupy

    from nnc.codegen.kernels import common
    M, N, K = 8192, 8192, 4096
    pr = gemm.GemmProblem(M, N, K, dtype="float16")
    d = gemm.default_params(pr)
    assert d["swizzle"] != gemm.GROUP_M
    rng = np.random.default_rng(0)
    bufs = dict(A=_dev(rng.uniform(-1, 1, (M, K)), "float16"), B=_dev(rng.uniform(-1, 1, (K, N)), "float16"),
                D=_poison((M, N), "float16"))
    times = {}
    for g in (gemm.GROUP_M, d["swizzle"], 1):
        spec = gemm.render(pr, dict(d, swizzle=g))
        fn = common.load_cubin(common.nvrtc_compile(spec.source), spec)
        common.launch(fn, spec, bufs)  # warm-up
        ts = []
        for _ in range(10):
            e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
            e0.record()
            common.launch(fn, spec, bufs)
            e1.record()
            e1.synchronize()
            ts.append(cupy.cuda.get_elapsed_time(e0, e1))
        times[g] = float(np.median(ts))
    print("swizzle ms:", times)
    assert times[d["swizzle"]] <= 1.03 * times[gemm.GROUP_M], times
