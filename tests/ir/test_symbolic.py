import pytest

from nnc.ir import symbolic as S
from nnc.ir.parser import parse_type

N, H, k, s, p = (S.sym(x) for x in "N H k s p".split())


def test_arithmetic_folds_constants():
    assert 2 + S.sym("N") * 1 - 2 == S.sym("N")
    assert (N * 3) * 2 == S.mul(6, N)
    assert S.floordiv(10, 3) == 3
    assert S.evaluate((H + 2 * p - k) // s + 1, {"H": 224, "p": 3, "k": 7, "s": 2}) == 112


@pytest.mark.parametrize("text", [
    "f32[N,3,224,224]", "f32[(H+2*p-k)/s+1,N*S]", "f32[N-2*k]", "i64[]", "f16[1,56,56,64]#nhwc",
    "f32[*]", "f32[?,max(N, M)]", "bf16[N*S,768]", "f32[2*(N+1)]", "i4[2]", "f8e4m3[4]",
])
def test_type_text_roundtrip(text):
    t = parse_type(text)
    assert str(t) == text
    assert parse_type(str(t)) == t


def test_substitute_binds_to_ints():
    d = (H + 2 * p - k) // s + 1
    assert S.substitute(d, {"H": 224, "p": 3, "k": 7, "s": 2}) == 112
    assert S.substitute(N * H, {"N": 2}) == S.mul(2, H)


def test_unknown_is_absorbing():
    assert (S.UNKNOWN + 1) is S.UNKNOWN or (S.UNKNOWN + 1) == S.UNKNOWN
    assert str(S.UNKNOWN * N) == "?"
