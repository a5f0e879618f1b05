"""ONNX Cast to and from the narrow types against the specification, with expected codes computed
by hand (not by ml_dtypes or onnx's reference, whose answers changed between versions): the Cast
operator's float8 / float8e8m0 tables and the float4 / int4 / int2 technical notes. Covers ties
(round to nearest even; e8m0's round modes), saturation and overflow, NaN / inf, negative zero,
and single rounding from float64 and large int64 sources."""
from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper

from nnc.ir.errors import NncError
from nnc.ir.narrow_types import decode
from nnc.ir.ops.quant import cast_array
from nnc.ir.types import dtype
from tests.ops.util import run_nnc

NAN, INF = float("nan"), float("inf")


def codes(xs, to, src=np.float32, **kw):
    y = cast_array(np.array(xs, src), dtype(to), **kw)
    assert y.dtype == dtype(to).np
    return y.view(np.uint16 if y.dtype.itemsize == 2 else np.uint8).tolist()


def values(y):
    return decode(y).tolist()


# ---------------------------------------------------------------- int4 / uint4 / int2 / uint2
# round to the nearest integer (ties to even), then keep the low bits; NaN / inf -> 0 (nnc's choice)

INT_CASES = {
    "i4": [(-9, 7), (-8.5, -8), (-8, -8), (-7.5, -8), (-2.5, -2), (-1.5, -2), (-0.5, 0), (-0.0, 0), (0.5, 0),
           (1.5, 2), (2.5, 2), (7, 7), (7.5, -8), (8, -8), (9, -7), (15, -1), (16, 0), (17, 1), (123, -5),
           (1e10, 0), (-1e10, 0), (3e9 + 1024, 0), (NAN, 0), (INF, 0), (-INF, 0)],
    "u4": [(-1, 15), (-0.5, 0), (0.5, 0), (1.5, 2), (14.5, 14), (15.5, 0), (15, 15), (16, 0), (17, 1), (123, 11),
           (-9, 7), (NAN, 0), (INF, 0)],
    "i2": [(-3, 1), (-2.5, -2), (-2, -2), (-1.5, -2), (1, 1), (1.5, -2), (2, -2), (3, -1), (0.5, 0), (NAN, 0)],
    "u2": [(-1, 3), (2.5, 2), (3.5, 0), (4, 0), (5, 1), (-0.0, 0), (-INF, 0)],
}


@pytest.mark.parametrize("to", sorted(INT_CASES))
@pytest.mark.parametrize("src", [np.float32, np.float64])
def test_float_to_narrow_int(to, src):
    xs, want = zip(*INT_CASES[to])
    y = cast_array(np.array(xs, src), dtype(to))
    assert y.dtype == dtype(to).np
    assert values(y) == list(want), list(zip(xs, values(y), want))


def test_f16_and_bf16_to_int4():
    assert values(cast_array(np.array([-8.5, 7.5, 2.5, 100.0], np.float16), dtype("i4"))) == [-8, -8, 2, 4]
    b = cast_array(np.array([-8.5, 7.5, 2.5, 100.0], np.float32), dtype("bf16"))
    assert values(cast_array(b, dtype("i4"))) == [-8, -8, 2, 4]


def test_int_to_narrow_int_wraps():
    assert values(cast_array(np.array([200, -9, 16, 7, -1], np.int32), dtype("i4"))) == [-8, 7, 0, 7, -1]
    assert values(cast_array(np.array([200, -9, 16, 7, -1], np.int32), dtype("u4"))) == [8, 7, 0, 7, 15]
    assert values(cast_array(np.array([2**62 + 5, -(2**63)], np.int64), dtype("i4"))) == [5, 0]
    assert values(cast_array(np.array([2**64 - 1], np.uint64), dtype("u2"))) == [3]
    assert values(cast_array(np.array([2**52 + 1.0], np.float64), dtype("u4"))) == [1]  # exact, no rounding
    assert values(cast_array(np.array([True, False]), dtype("i2"))) == [1, 0]


def test_narrow_int_decodes_and_casts_between_narrow_types():
    i4 = cast_array(np.arange(-8, 8, dtype=np.int32), dtype("i4"))
    assert cast_array(i4, dtype("f32")).tolist() == list(range(-8, 8))
    assert cast_array(i4, dtype("u4")).view(np.uint8).tolist() == [v & 15 for v in range(-8, 8)]
    assert values(cast_array(i4, dtype("i2"))) == [((v + 2) & 3) - 2 for v in range(-8, 8)]
    u2 = cast_array(np.arange(4, dtype=np.int32), dtype("u2"))
    assert cast_array(u2, dtype("i8")).tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------- float8 (fn / fnuz), f4e2m1, bf16

F8_CASES = [  # (x, saturate=1 code, saturate=0 code)
    ("f8e4m3", [(0.0, 0x00, 0x00), (-0.0, 0x80, 0x80), (1.0, 0x38, 0x38), (1.0625, 0x38, 0x38), (1.1875, 0x3A, 0x3A),
                (-1.1875, 0xBA, 0xBA), (448, 0x7E, 0x7E), (464, 0x7E, 0x7E), (465, 0x7E, 0x7F), (1e6, 0x7E, 0x7F),
                (-1e6, 0xFE, 0xFF), (INF, 0x7E, 0x7F), (-INF, 0xFE, 0xFF), (NAN, 0x7F, 0x7F), (-NAN, 0xFF, 0xFF),
                (2.0 ** -9, 0x01, 0x01), (2.0 ** -10, 0x00, 0x00), (-(2.0 ** -10), 0x80, 0x80),
                (0.75 * 2.0 ** -9, 0x01, 0x01), (1.5 * 2.0 ** -9, 0x02, 0x02), (2.0 ** -6, 0x08, 0x08)]),
    ("f8e4m3fnuz", [(0.0, 0x00, 0x00), (-0.0, 0x00, 0x00), (-(2.0 ** -12), 0x00, 0x00), (1.0, 0x40, 0x40),
                    (240, 0x7F, 0x7F), (248, 0x7F, 0x80), (-300, 0xFF, 0x80), (INF, 0x7F, 0x80), (-INF, 0xFF, 0x80),
                    (NAN, 0x80, 0x80), (-NAN, 0x80, 0x80), (2.0 ** -10, 0x01, 0x01)]),
    ("f8e5m2", [(-0.0, 0x80, 0x80), (1.0, 0x3C, 0x3C), (1.125, 0x3C, 0x3C), (1.375, 0x3E, 0x3E),
                (57344, 0x7B, 0x7B), (61439, 0x7B, 0x7B), (61440, 0x7B, 0x7C), (1e6, 0x7B, 0x7C),
                (-1e6, 0xFB, 0xFC), (INF, 0x7B, 0x7C), (-INF, 0xFB, 0xFC), (NAN, 0x7E, 0x7E), (-NAN, 0xFE, 0xFE),
                (2.0 ** -16, 0x01, 0x01), (2.0 ** -17, 0x00, 0x00)]),
    ("f8e5m2fnuz", [(-0.0, 0x00, 0x00), (1.0, 0x40, 0x40), (57344, 0x7F, 0x7F), (61440, 0x7F, 0x80),
                    (-INF, 0xFF, 0x80), (NAN, 0x80, 0x80), (2.0 ** -17, 0x01, 0x01), (-(2.0 ** -19), 0x00, 0x00)]),
]


@pytest.mark.parametrize("to,cases", F8_CASES, ids=[c[0] for c in F8_CASES])
@pytest.mark.parametrize("src", [np.float32, np.float64, np.float16])
def test_float8_table(to, cases, src):
    if src == np.float16:  # f16 cannot hold every case (1e6, 2^-17, ...): only those it holds exactly
        with np.errstate(over="ignore"):
            cases = [c for c in cases if math.isnan(c[0]) or float(np.float16(c[0])) == c[0]]
    xs = [c[0] for c in cases]
    with np.errstate(all="ignore"):
        assert codes(xs, to, src, saturate=True) == [c[1] for c in cases], to
        assert codes(xs, to, src, saturate=False) == [c[2] for c in cases], to


def test_float8_decodes_exactly():
    e4 = np.array([0x00, 0x80, 0x01, 0x38, 0x7E, 0xFE, 0x7F, 0xFF], np.uint8).view(dtype("f8e4m3").np)
    got = cast_array(e4, dtype("f32")).tolist()
    assert got[:6] == [0.0, -0.0, 2.0 ** -9, 1.0, 448.0, -448.0] and math.copysign(1, got[1]) == -1
    assert all(math.isnan(v) for v in got[6:])
    e5 = np.array([0x7B, 0x7C, 0xFC, 0x7D, 0x01], np.uint8).view(dtype("f8e5m2").np)
    assert cast_array(e5, dtype("f64")).tolist()[:3] == [57344.0, INF, -INF]
    uz = np.array([0x80, 0x00, 0xFF], np.uint8).view(dtype("f8e4m3fnuz").np)
    v = cast_array(uz, dtype("f16")).astype(np.float32).tolist()
    assert math.isnan(v[0]) and v[1:] == [0.0, -240.0]


F4_CASES = [(0.0, 0x0), (-0.0, 0x8), (0.25, 0x0), (0.26, 0x1), (0.75, 0x2), (1.25, 0x2), (1.75, 0x4), (2.5, 0x4),
            (3.5, 0x6), (5.0, 0x6), (5.1, 0x7), (6.0, 0x7), (7.0, 0x7), (100.0, 0x7), (-5.0, 0xE), (-100.0, 0xF),
            (INF, 0x7), (-INF, 0xF), (NAN, 0x7), (-NAN, 0x7)]  # the float4 table: NaN -> 6


@pytest.mark.parametrize("saturate", [True, False])  # float4 always saturates
def test_float4_table(saturate):
    xs, want = zip(*F4_CASES)
    assert codes(xs, "f4e2m1", saturate=saturate) == list(want)
    f4 = np.arange(16, dtype=np.uint8).view(dtype("f4e2m1").np)
    assert cast_array(f4, dtype("f32")).tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]


def test_bfloat16_rounds_once():
    assert codes([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 3.4028235e38, -INF, NAN, -0.0], "bf16") == \
        [0x3F80, 0x3F82, 0x7F80, 0xFF80, 0x7FC0, 0x8000]
    # an int64 just above a tie: float64 would round it onto the tie first, then to even
    assert codes([2**60 + 2**52 + 1], "bf16", np.int64) == [0x5D81]


def test_float64_source_rounds_once():
    # 1 + 2^-4 + 2^-40 is just above the e4m3 tie 1.0625: float32 would round it onto the tie first
    assert codes([1 + 2.0 ** -4 + 2.0 ** -40], "f8e4m3", np.float64) == [0x39]
    assert codes([1 + 2.0 ** -4 + 2.0 ** -40], "f8e4m3", np.float32) == [0x38]


# ---------------------------------------------------------------- f8e8m0

E8M0_CASES = [  # (x, round_mode, saturate=1 code, saturate=0 code)
    (0.0, "up", 0x00, 0xFF), (2.0 ** -127, "up", 0x00, 0x00), (1.5 * 2.0 ** -128, "up", 0x00, 0x00),
    (2.0 ** -130, "up", 0x00, 0xFF), (1e-45, "up", 0x00, 0xFF),  # [x] (a power of two itself) < 2^-127 (0.124, "up", 124, 124), (0.25, "up", 125, 125), (1.1, "up", 128, 128),
    (2.0, "up", 128, 128), (3.0, "up", 129, 129), (-2.0, "up", 128, 128), (2.0 ** 127, "up", 254, 254),
    (1.5 * 2.0 ** 127, "up", 254, 0xFF), (INF, "up", 254, 0xFF), (NAN, "up", 0xFF, 0xFF),
    (3.0, "down", 128, 128), (0.9, "down", 126, 126), (1.5 * 2.0 ** 127, "down", 254, 254),
    (2.0 ** -128, "down", 0x00, 0xFF), (0.0, "down", 0x00, 0xFF),
    (1.5, "nearest", 128, 128), (1.49, "nearest", 127, 127), (3.0, "nearest", 129, 129), (2.9, "nearest", 128, 128),
    (0.75, "nearest", 127, 127), (1.5 * 2.0 ** -128, "nearest", 0x00, 0x00), (1.4 * 2.0 ** -128, "nearest", 0x00, 0xFF),
    (1.5 * 2.0 ** 127, "nearest", 254, 0xFF), (0.0, "nearest", 0x00, 0xFF), (NAN, "nearest", 0xFF, 0xFF),
]


@pytest.mark.parametrize("mode", ["up", "down", "nearest"])
def test_e8m0_table(mode):
    cases = [c for c in E8M0_CASES if c[1] == mode]
    xs = [c[0] for c in cases]
    for src in (np.float32, np.float64):
        got_s = codes(xs, "f8e8m0", src, saturate=True, round_mode=mode)
        got_n = codes(xs, "f8e8m0", src, saturate=False, round_mode=mode)
        for (x, _, s, n), gs, gn in zip(cases, got_s, got_n):
            if src == np.float32 and float(np.float32(x)) != x and not math.isnan(x):
                continue  # not a float32 value (2^-130 is: a subnormal)
            assert (gs, gn) == (s, n), (x, mode, src)


def test_e8m0_wide_sources():
    assert codes([1e300], "f8e8m0", np.float64) == [254]
    assert codes([1e300], "f8e8m0", np.float64, saturate=False) == [0xFF]
    # 2^60 + 1 is no power of two: up gives 2^61 (float64 alone would round it to 2^60 first)
    assert codes([2**60 + 1, 2**60], "f8e8m0", np.int64) == [127 + 61, 127 + 60]
    assert codes([5, 0], "f8e8m0", np.int32, saturate=False) == [130, 0xFF]


def test_e8m0_decodes():
    c = np.array([0, 1, 127, 254, 255], np.uint8).view(dtype("f8e8m0").np)
    got = cast_array(c, dtype("f64")).tolist()
    assert got[:4] == [2.0 ** -127, 2.0 ** -126, 1.0, 2.0 ** 127] and math.isnan(got[4])
    assert cast_array(c, dtype("f16")).astype(np.float32).tolist()[2] == 1.0


def test_e8m0_round_trip_through_f8e4m3():
    e4 = cast_array(np.array([0.3, 448.0, -2.0], np.float32), dtype("f8e4m3"))  # 0.3 -> 0.3125
    assert codes(decode(e4), "f8e8m0", np.float64) == [126, 127 + 9, 128]


# ---------------------------------------------------------------- through a model (attributes reach the reference)

def _cast_model(to, attrs, x):
    g = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=to, **attrs)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(x)])],
                          [helper.make_tensor_value_info("y", to, [len(x)])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 25)], ir_version=11)


def test_model_cast_e8m0_round_mode_and_saturate():
    x = np.array([0.0, 3.0, 2.9, 1.5 * 2.0 ** 127], np.float32)
    (y,) = run_nnc(_cast_model(TensorProto.FLOAT8E8M0, {"round_mode": "nearest", "saturate": 0}, x), {"x": x})
    assert y.view(np.uint8).tolist() == [0xFF, 129, 128, 0xFF]
    (y,) = run_nnc(_cast_model(TensorProto.FLOAT8E8M0, {"round_mode": "down"}, x), {"x": x})
    assert y.view(np.uint8).tolist() == [0x00, 128, 128, 254]


def test_model_cast_int4_rounds_half_even():
    x = np.array([-8.5, -2.5, 0.5, 1.5, 7.5, 15.0], np.float32)
    (y,) = run_nnc(_cast_model(TensorProto.INT4, {}, x), {"x": x})
    assert values(y) == [-8, -2, 0, 2, -8, -1]


def test_model_cast_bad_round_mode_is_a_clean_error():
    x = np.ones(2, np.float32)
    with pytest.raises(NncError, match="round_mode"):
        run_nnc(_cast_model(TensorProto.FLOAT8E8M0, {"round_mode": "sideways"}, x), {"x": x})


@pytest.mark.parametrize("to", ["bf16", "f8e4m3", "f8e8m0", "f4e2m1", "i4", "u2", "f32"])
def test_shapes_survive(to):
    """0-d scalars stay 0-d, non-contiguous views convert (both ways)."""
    y = cast_array(np.array(1.5, np.float32), dtype(to))
    assert y.shape == () and y.dtype == dtype(to).np
    back = cast_array(y, dtype("f32"))
    assert back.shape == () and back.dtype == np.float32
    x = np.arange(12, dtype=np.float32).reshape(3, 4).T  # not C-contiguous
    z = cast_array(cast_array(x, dtype(to)).T, dtype("f64"))
    assert z.shape == (3, 4)
