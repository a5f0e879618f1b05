"""Narrow element types on the CUDA backend (templates/exotic_types.cu.j2): f8e4m3fn, f8e4m3fnuz,
f8e5m2, f8e5m2fnuz, f8e8m0fnu, f4e2m1fn, int4, uint4, int2, uint2 -- one byte an element in the
ml_dtypes layout. CPU: the conversion functions built as host C++ agree bit for bit with nnc's own
ONNX Cast rules (ir/narrow_types.py, the reference interpreter's), from float32, float64 and int64
sources, every e8m0 round mode and saturation; a Cast / QuantizeLinear / DequantizeLinear model over
every type compiles with NVRTC. GPU-marked: the compiled model's stored bytes equal the reference
interpreter's on fresh random inputs."""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto as T

from nnc.codegen.emit import compile_to_dir
from nnc.ir.interp import Interpreter
from nnc.onnx_import import import_model

from .cuda_models import N, mk

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
FLOATS = {  # onnx enum -> ml_dtype, host-harness index
    T.FLOAT8E4M3FN: (ml_dtypes.float8_e4m3fn, 0), T.FLOAT8E4M3FNUZ: (ml_dtypes.float8_e4m3fnuz, 1),
    T.FLOAT8E5M2: (ml_dtypes.float8_e5m2, 2), T.FLOAT8E5M2FNUZ: (ml_dtypes.float8_e5m2fnuz, 3),
    T.FLOAT8E8M0: (ml_dtypes.float8_e8m0fnu, 4), T.FLOAT4E2M1: (ml_dtypes.float4_e2m1fn, 5),
}
INTS = {T.INT4: (ml_dtypes.int4, 0), T.UINT4: (ml_dtypes.uint4, 1), T.INT2: (ml_dtypes.int2, 2),
        T.UINT2: (ml_dtypes.uint2, 3)}
F8 = (T.FLOAT8E4M3FN, T.FLOAT8E4M3FNUZ, T.FLOAT8E5M2, T.FLOAT8E5M2FNUZ)

_HARNESS = r"""
#include <cmath>
#include <cstdint>
#include <cstring>
#define NNC_HD static inline
#define NNC_HDM inline
static inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
#include "exotic_types.cu.j2"
typedef uint8_t (*encf)(float);
typedef float (*decf)(uint8_t);
static encf ENC[] = {nnc_enc_f8e4m3, nnc_enc_f8e4m3fnuz, nnc_enc_f8e5m2, nnc_enc_f8e5m2fnuz, nnc_enc_f8e8m0, nnc_enc_f4e2m1};
static decf DEC[] = {nnc_dec_f8e4m3, nnc_dec_f8e4m3fnuz, nnc_dec_f8e5m2, nnc_dec_f8e5m2fnuz, nnc_dec_f8e8m0, nnc_dec_f4e2m1};
extern "C" void enc(int t, const uint32_t* in, uint8_t* out, long n) { for (long i = 0; i < n; ++i) out[i] = ENC[t](__uint_as_float(in[i])); }
extern "C" void dec(int t, const uint8_t* in, float* out, long n) { for (long i = 0; i < n; ++i) out[i] = DEC[t](in[i]); }
// Cast with saturate=1 to an f8 type: what codegen/kernels/elementwise.py emits (clamp, then store)
extern "C" void enc_sat(int t, const uint32_t* in, uint8_t* out, long n, float m) {
  for (long i = 0; i < n; ++i) out[i] = ENC[t](nnc_satf(__uint_as_float(in[i]), m));
}
extern "C" void e8m0(const uint32_t* in, uint8_t* out, long n, int mode, int sat) {
  for (long i = 0; i < n; ++i) out[i] = nnc_onnx_f8e8m0(__uint_as_float(in[i]), mode, sat != 0);
}
// the struct constructors from wider sources (rounded once through nnc_odd_f32)
template <typename X, typename S> static void store(const S* in, uint8_t* out, long n) { for (long i = 0; i < n; ++i) out[i] = X(in[i]).v; }
template <typename S> static void enc_from(int t, const S* in, uint8_t* out, long n) {
  if (t == 0) store<nnc_f8e4m3>(in, out, n);
  if (t == 1) store<nnc_f8e4m3fnuz>(in, out, n);
  if (t == 2) store<nnc_f8e5m2>(in, out, n);
  if (t == 3) store<nnc_f8e5m2fnuz>(in, out, n);
  if (t == 4) store<nnc_f8e8m0>(in, out, n);
  if (t == 5) store<nnc_f4e2m1>(in, out, n);
}
extern "C" void enc_f64(int t, const double* in, uint8_t* out, long n) { enc_from(t, in, out, n); }
extern "C" void enc_i64(int t, const int64_t* in, uint8_t* out, long n) { enc_from(t, in, out, n); }
extern "C" void enc_u64(int t, const uint64_t* in, uint8_t* out, long n) { enc_from(t, in, out, n); }
extern "C" void enc_i32(int t, const int32_t* in, uint8_t* out, long n) { enc_from(t, in, out, n); }
template <typename X, typename S> static void conv(const S* in, uint8_t* out, int32_t* back, long n) {
  for (long i = 0; i < n; ++i) { X x(in[i]); out[i] = x.v; back[i] = x; }
}
template <typename S> static void ints_from(int t, const S* in, uint8_t* out, int32_t* back, long n) {
  if (t == 0) conv<nnc_i4>(in, out, back, n);
  if (t == 1) conv<nnc_u4>(in, out, back, n);
  if (t == 2) conv<nnc_i2>(in, out, back, n);
  if (t == 3) conv<nnc_u2>(in, out, back, n);
}
extern "C" void ints(int t, const float* in, uint8_t* out, int32_t* back, long n) { ints_from(t, in, out, back, n); }
extern "C" void ints_f64(int t, const double* in, uint8_t* out, int32_t* back, long n) { ints_from(t, in, out, back, n); }
extern "C" void ints_i64(int t, const int64_t* in, uint8_t* out, int32_t* back, long n) { ints_from(t, in, out, back, n); }
"""


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    d = tmp_path_factory.mktemp("exotic_host")
    (d / "h.cpp").write_text(_HARNESS)
    subprocess.run([cxx, "-O2", "-shared", "-fPIC", f"-I{TEMPLATES}", "-o", str(d / "h.so"), str(d / "h.cpp")],
                   check=True, capture_output=True)
    lib = ctypes.CDLL(str(d / "h.so"))
    V, L = ctypes.c_void_p, ctypes.c_long
    lib.enc.argtypes = [ctypes.c_int, V, V, L]
    lib.dec.argtypes = [ctypes.c_int, V, V, L]
    for f in ("ints", "ints_f64", "ints_i64"):
        getattr(lib, f).argtypes = [ctypes.c_int, V, V, V, L]
    for f in ("enc_f64", "enc_i64", "enc_u64", "enc_i32"):
        getattr(lib, f).argtypes = [ctypes.c_int, V, V, L]
    lib.enc_sat.argtypes = [ctypes.c_int, V, V, L, ctypes.c_float]
    lib.e8m0.argtypes = [V, V, L, ctypes.c_int, ctypes.c_int]
    return lib


def _f32_patterns(rng, n=1 << 21) -> np.ndarray:
    """Random float32 bit patterns plus every pattern near the narrow types' rounding boundaries."""
    u = [rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)]
    for e in range(100, 160):  # exponents around the f8 / f4 ranges: mantissa tails around ties
        base = np.uint32(e << 23)
        for m in range(0, 1 << 8):
            hi = np.uint32(m << 15)
            u.append(np.array([base | hi, base | hi | 1, base | hi | 0x4000, base | hi | 0x3fff, base | hi | 0x7fff],
                              np.uint32))
    u = np.concatenate(u)
    specials = np.array([0, 0x80000000, 0x7f800000, 0xff800000, 0x7fc00000, 0xffc00000, 0x7f800001, 1, 0x00400000,
                         0x00400001, 0x007fffff, 0x00800000, 0x7f7fffff], np.uint32)
    u = np.concatenate([u, specials, u | np.uint32(0x80000000)])
    return u


SHORT = {T.FLOAT8E4M3FN: "f8e4m3", T.FLOAT8E4M3FNUZ: "f8e4m3fnuz", T.FLOAT8E5M2: "f8e5m2",
         T.FLOAT8E5M2FNUZ: "f8e5m2fnuz", T.FLOAT8E8M0: "f8e8m0", T.FLOAT4E2M1: "f4e2m1",
         T.INT4: "i4", T.UINT4: "u4", T.INT2: "i2", T.UINT2: "u2"}
F8_MAX = {T.FLOAT8E4M3FN: 448.0, T.FLOAT8E4M3FNUZ: 240.0, T.FLOAT8E5M2: 57344.0, T.FLOAT8E5M2FNUZ: 57344.0}


def _ref_codes(x, onnx_t, **kw):
    """nnc's reference (ir/narrow_types.py via Cast's cast_array) as raw bytes."""
    from nnc.ir.ops.quant import cast_array
    from nnc.ir.types import dtype
    with np.errstate(all="ignore"):
        return cast_array(x, dtype(SHORT[onnx_t]), **kw).view(np.uint8)


def _bad(out, ref, src):
    bad = out != ref
    return [(repr(v), int(o), int(r)) for v, o, r in zip(src[bad][:6], out[bad][:6], ref[bad][:6])]


def test_host_conversions_match_reference(host_lib, rng):
    """enc (the store), Cast with saturate, f8e8m0 in every mode: equal to ir/narrow_types.py on random
    float32 patterns and every pattern near the narrow types' rounding boundaries."""
    u = _f32_patterns(rng)
    f = u.view(np.float32)
    for onnx_t, (dt, k) in FLOATS.items():
        codes = np.arange(16 if dt == ml_dtypes.float4_e2m1fn else 256, dtype=np.uint8)
        got = np.empty(codes.size, np.float32)
        host_lib.dec(k, codes.ctypes.data, got.ctypes.data, codes.size)
        from nnc.ir.narrow_types import decode
        ref = decode(codes.view(dt)).astype(np.float32)
        same = (got.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(got) & np.isnan(ref))
        assert same.all(), (dt.__name__, codes[~same][:8])
        out = np.empty(u.size, np.uint8)
        host_lib.enc(k, u.ctypes.data, out.ctypes.data, u.size)  # the store: saturate=0 (e8m0: Cast's defaults)
        ref = _ref_codes(f, onnx_t, saturate=False) if onnx_t != T.FLOAT8E8M0 else _ref_codes(f, onnx_t)
        assert not (out != ref).any(), (dt.__name__, _bad(out, ref, f))
        if onnx_t in F8_MAX:
            host_lib.enc_sat(k, u.ctypes.data, out.ctypes.data, u.size, F8_MAX[onnx_t])
            ref = _ref_codes(f, onnx_t, saturate=True)
            assert not (out != ref).any(), (dt.__name__, "saturate", _bad(out, ref, f))
    out = np.empty(u.size, np.uint8)
    for mode, name in enumerate(("up", "down", "nearest")):
        for sat in (1, 0):
            host_lib.e8m0(u.ctypes.data, out.ctypes.data, u.size, mode, sat)
            ref = _ref_codes(f, T.FLOAT8E8M0, saturate=bool(sat), round_mode=name)
            assert not (out != ref).any(), ("e8m0", name, sat, _bad(out, ref, f))


def _f64_near_ties(rng, n=200_000) -> np.ndarray:
    """float64 values a hair either side of the f8 / f4 / e8m0 rounding points (where rounding to
    float32 first would round twice), plus random and special values."""
    e = rng.integers(-20, 20, n)
    m = rng.integers(0, 64, n) * 2 + 1  # odd multiples of a half-step: ties of every format here
    tie = np.ldexp(m.astype(np.float64), (e - 7).astype(np.int32))
    eps = np.ldexp(1.0, (e - 40).astype(np.int32)) * rng.choice([-1.0, 1.0, 0.0], n)
    x = (tie + eps) * rng.choice([-1.0, 1.0], n)
    extra = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e300, -1e300, 1e-300, 2.0 ** -127, 1.5 * 2.0 ** 127,
                      448.0 + 2.0 ** -30, 464.0 + 2.0 ** -30, 464.0 - 2.0 ** -30, 6.0 + 1e-12, 5.0 + 1e-12])
    return np.concatenate([x, extra, rng.standard_normal(20_000) * 1e3])


def test_host_wide_sources_round_once(host_lib, rng):
    """The struct constructors from double / int64 / uint64 / int32 equal the reference, which rounds
    the exact value once (a double just above a tie must not round onto the tie through float)."""
    x = _f64_near_ties(rng)
    big = np.concatenate([rng.integers(-(2**63), 2**63 - 1, 50_000, dtype=np.int64),
                          (np.int64(1) << rng.integers(24, 62, 50_000)) + rng.integers(-3, 4, 50_000),
                          np.array([2**60 + 1, 2**60, -(2**63), 2**63 - 1, 0, 1, -1], np.int64)])
    ubig = big.view(np.uint64)
    i32 = (np.int32(1) << rng.integers(0, 31, 50_000).astype(np.int32)) + rng.integers(-3, 4, 50_000).astype(np.int32)
    for onnx_t, (dt, k) in FLOATS.items():
        kw = {} if onnx_t == T.FLOAT8E8M0 else {"saturate": False}
        for fn, src in ((host_lib.enc_f64, x), (host_lib.enc_i64, big), (host_lib.enc_u64, ubig), (host_lib.enc_i32, i32)):
            out = np.empty(src.size, np.uint8)
            fn(k, src.ctypes.data, out.ctypes.data, src.size)
            ref = _ref_codes(src, onnx_t, **kw)
            assert not (out != ref).any(), (dt.__name__, fn.__name__, _bad(out, ref, src))


def test_host_narrow_ints_match_reference(host_lib):
    x = np.concatenate([np.arange(-40, 40, dtype=np.float32) * 0.25,
                        [np.nan, np.inf, -np.inf, 1e10, -3e9, 1e30, -2.5e19, 3e18, 4.6e18, -4.7e18, 8.5, -8.5]]).astype(np.float32)
    xd = np.concatenate([x.astype(np.float64), [2.0 ** 52 + 1, -(2.0 ** 52) - 3, 2.0 ** 62, 1e300, 7.5 + 2 ** -40]])
    xi = np.array([200, -9, 2**62 + 5, -(2**63), 2**63 - 1, 17], np.int64)
    for onnx_t, (dt, k) in INTS.items():
        for fn, src in ((host_lib.ints, x), (host_lib.ints_f64, xd), (host_lib.ints_i64, xi)):
            out, back = np.empty(src.size, np.uint8), np.empty(src.size, np.int32)
            fn(k, src.ctypes.data, out.ctypes.data, back.ctypes.data, src.size)
            ref = _ref_codes(src, onnx_t)
            np.testing.assert_array_equal(out, ref, err_msg=f"{dt.__name__} {fn.__name__}")
            from nnc.ir.narrow_types import decode
            np.testing.assert_array_equal(back, decode(ref.view(dt)), err_msg=dt.__name__)


def _model():
    nodes, outs, inits = [], [], []
    for t in list(FLOATS) + list(INTS):
        nodes += [N("Cast", ["x"], [f"c{t}"], to=t), N("Cast", [f"c{t}"], [f"b{t}"], to=T.FLOAT)]
        outs += [(f"c{t}", t), (f"b{t}", T.FLOAT)]
        if t in F8:
            nodes += [N("Cast", ["x"], [f"n{t}"], to=t, saturate=0), N("Cast", [f"n{t}"], [f"nb{t}"], to=T.FLOAT16)]
            outs += [(f"n{t}", t), (f"nb{t}", T.FLOAT16)]
    for t in (T.FLOAT8E4M3FN, T.FLOAT8E5M2, T.FLOAT4E2M1, T.INT4, T.UINT4, T.INT2, T.UINT2):
        dt = (FLOATS.get(t) or INTS.get(t))[0]
        zp = np.zeros(4, dt) if t in FLOATS else np.array([1, 0, -1, 1] if t in (T.INT4, T.INT2) else [1, 0, 2, 1]).astype(dt)
        inits += [(f"zp{t}", zp)]
        nodes += [N("QuantizeLinear", ["x4", "qs", f"zp{t}"], [f"q{t}"], axis=1),
                  N("DequantizeLinear", [f"q{t}", "qs", f"zp{t}"], [f"dq{t}"], axis=1)]
        outs += [(f"q{t}", t), (f"dq{t}", T.FLOAT)]
    for t in list(FLOATS) + list(INTS):  # wider sources: rounded once (nnc_odd_f32 / nnc_round_i64)
        nodes += [N("Cast", ["xd"], [f"d{t}"], to=t), N("Cast", ["xi"], [f"i{t}"], to=t)]
        outs += [(f"d{t}", t), (f"i{t}", t)]
    for mode in ("down", "nearest"):
        for sat in (0, 1):
            nodes += [N("Cast", ["x"], [f"e8{mode}{sat}"], to=T.FLOAT8E8M0, round_mode=mode, saturate=sat)]
            outs += [(f"e8{mode}{sat}", T.FLOAT8E8M0)]
    inits.append(("qs", np.array([0.5, 0.25, 2.0, 0.125], np.float32)))
    return mk(nodes, [("x", T.FLOAT, [512]), ("x4", T.FLOAT, [3, 4, 5]), ("xd", T.DOUBLE, [512]),
                      ("xi", T.INT64, [512])], outs, inits, opset=25)


def _feed(rng):
    special = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 448.0, 464.0, 480.0, 1e6, -1e6, 57344.0, 61440.0,
                        240.0, 248.0, 6.0, 7.0, -5.0, 0.25, 0.75, 1.5, 3.0, 2.0 ** -130, 2.0 ** -127, 1e-40,
                        7.5, -8.5, 1e10, 2.5, -2.5, 0.5, 1.25, 1.1], np.float32)
    scale = np.exp2(rng.uniform(-20, 20, 512 - special.size)).astype(np.float32)
    x = np.concatenate([special, (rng.standard_normal(512 - special.size) * scale).astype(np.float32)])
    # doubles a hair off float32 values (ties of the narrow types included) and int64s up to 2^62
    xd = x.astype(np.float64) * (1 + rng.choice([-1.0, 0.0, 1.0], x.size) * 2.0 ** -40)
    xi = np.concatenate([np.arange(-20, 20), rng.integers(-(2**62), 2**62, x.size - 40)]).astype(np.int64)
    return {"x": x, "x4": (rng.standard_normal((3, 4, 5)) * 6).astype(np.float32), "xd": xd, "xi": xi}


def test_exotic_model_compiles_nvrtc(tmp_path):
    plan = compile_to_dir(import_model(_model()), tmp_path, arch="sm_90")
    assert all((tmp_path / c["file"]).exists() for c in plan["cubins"])
    src = next(tmp_path.glob("*.cu")).read_text() if list(tmp_path.glob("*.cu")) else ""
    assert not src or "nnc_f8e4m3" in src


def _same_bits(got, ref) -> bool:
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return False
    if got.dtype.kind == "f" and got.dtype.itemsize >= 2 and got.dtype != ml_dtypes.bfloat16:
        return bool(((got.view(f"u{got.dtype.itemsize}") == ref.view(f"u{ref.dtype.itemsize}"))
                     | (np.isnan(got) & np.isnan(ref))).all())
    return bool((got.view(np.uint8) == ref.view(np.uint8)).all())


@pytest.mark.gpu
def test_gpu_exotic_casts_match_reference(tmp_path, rng):
    import nnc
    mod = import_model(_model())
    compile_to_dir(mod, tmp_path, arch=None)
    m = nnc.load(tmp_path)
    for _ in range(3):
        feed = _feed(rng)
        ref = Interpreter(mod).run(feed)
        got = m.run(feed, output="numpy", poison=True)
        bad = [k for k in ref if not _same_bits(got[k], ref[k])]
        assert not bad, {k: (got[k].ravel()[:8], ref[k].ravel()[:8]) for k in bad}
