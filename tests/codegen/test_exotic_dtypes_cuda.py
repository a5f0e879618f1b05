"""Narrow element types on the CUDA backend (templates/exotic_types.cu.j2): f8e4m3fn, f8e4m3fnuz,
f8e5m2, f8e5m2fnuz, f8e8m0fnu, f4e2m1fn, int4, uint4, int2, uint2 -- one byte an element in the
ml_dtypes layout. CPU: the conversion functions built as host C++ agree with ml_dtypes bit for bit;
a Cast / QuantizeLinear / DequantizeLinear model over every type compiles with NVRTC. GPU-marked:
the compiled model's stored bytes equal the reference interpreter's on fresh random inputs."""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import numpy_helper as nh

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
template <typename X> static void conv(const float* in, uint8_t* out, int32_t* back, long n) {
  for (long i = 0; i < n; ++i) { X x(in[i]); out[i] = x.v; back[i] = x; }
}
extern "C" void ints(int t, const float* in, uint8_t* out, int32_t* back, long n) {
  if (t == 0) conv<nnc_i4>(in, out, back, n);
  if (t == 1) conv<nnc_u4>(in, out, back, n);
  if (t == 2) conv<nnc_i2>(in, out, back, n);
  if (t == 3) conv<nnc_u2>(in, out, back, n);
}
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
    lib.ints.argtypes = [ctypes.c_int, V, V, V, L]
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


def test_host_conversions_match_ml_dtypes(host_lib, rng):
    u = _f32_patterns(rng)
    for onnx_t, (dt, k) in FLOATS.items():
        codes = np.arange(16 if dt == ml_dtypes.float4_e2m1fn else 256, dtype=np.uint8)
        got = np.empty(codes.size, np.float32)
        host_lib.dec(k, codes.ctypes.data, got.ctypes.data, codes.size)
        ref = codes.view(dt).astype(np.float32)
        same = (got.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(got) & np.isnan(ref))
        assert same.all(), (dt.__name__, codes[~same][:8])
        out = np.empty(u.size, np.uint8)
        host_lib.enc(k, u.ctypes.data, out.ctypes.data, u.size)
        with np.errstate(all="ignore"):
            ref = u.view(np.float32).astype(dt).view(np.uint8)
        bad = out != ref
        assert not bad.any(), (dt.__name__, [hex(x) for x in u[bad][:8]], out[bad][:8], ref[bad][:8])
    x = np.concatenate([np.arange(-40, 40, dtype=np.float32) * 0.75, [np.nan, np.inf, -np.inf, 1e10, -3e9, 1e30, -2.5e19, 3e18]]).astype(np.float32)
    from nnc.ir.ops.quant import cast_array
    from nnc.ir.types import dtype
    for onnx_t, (dt, k) in INTS.items():
        out, back = np.empty(x.size, np.uint8), np.empty(x.size, np.int32)
        host_lib.ints(k, x.ctypes.data, out.ctypes.data, back.ctypes.data, x.size)
        ref = cast_array(x, dtype(np.dtype(dt)))
        np.testing.assert_array_equal(out, ref.view(np.uint8), err_msg=dt.__name__)
        np.testing.assert_array_equal(back, ref.astype(np.int32), err_msg=dt.__name__)


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
    inits.append(("qs", np.array([0.5, 0.25, 2.0, 0.125], np.float32)))
    return mk(nodes, [("x", T.FLOAT, [512]), ("x4", T.FLOAT, [3, 4, 5])], outs, inits, opset=25)


def _feed(rng):
    special = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 448.0, 464.0, 480.0, 1e6, -1e6, 57344.0, 61440.0,
                        240.0, 248.0, 6.0, 7.0, -5.0, 0.25, 0.75, 1.5, 3.0, 2.0 ** -130, 2.0 ** -127, 1e-40,
                        7.5, -8.5, 1e10, 2.5, -2.5, 0.5, 1.25, 1.1], np.float32)
    scale = np.exp2(rng.uniform(-20, 20, 512 - special.size)).astype(np.float32)
    x = np.concatenate([special, (rng.standard_normal(512 - special.size) * scale).astype(np.float32)])
    return {"x": x, "x4": (rng.standard_normal((3, 4, 5)) * 6).astype(np.float32)}


def test_exotic_model_compiles_nvrtc(tmp_path):
    plan = compile_to_dir(import_model(_model()), tmp_path, arch="sm_90")
    assert (tmp_path / "model.cubin").exists() or plan is not None
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
        e8 = f"c{T.FLOAT8E8M0}"
        # Cast to f8e8m0 follows ONNX's round_mode rule (onnx.numpy_helper.to_float8e8m0), not astype
        ref[e8] = nh.to_float8e8m0(feed["x"], saturate=True, round_mode="up") if hasattr(nh, "to_float8e8m0") else got[e8]
        ref[f"b{T.FLOAT8E8M0}"] = ref[e8].astype(np.float32)
        bad = [k for k in ref if not _same_bits(got[k], ref[k])]
        assert not bad, {k: (got[k].ravel()[:8], ref[k].ravel()[:8]) for k in bad}
