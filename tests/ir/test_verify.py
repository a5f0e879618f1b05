import pytest

from nnc.ir import IRParseError, VerifyError, parse, verify


def _check(text):
    verify(parse(text))


def test_wrong_result_type_names_op_and_line():
    text = """func @main(%x: f32[2,3], %y: f32[3]) -> (f32[2,4]) {
  %z = Add(%x, %y) : f32[2,4]
  return %z
}
"""
    with pytest.raises(VerifyError, match=r"2:3.*%z = Add.*declared f32\[2,4\].*f32\[2,3\]"):
        _check(text)


def test_bad_broadcast_is_reported():
    text = """func @main(%x: f32[2,3], %y: f32[4]) -> (f32[2,3]) {
  %z = Add(%x, %y) : f32[2,3]
  return %z
}
"""
    with pytest.raises(VerifyError, match="Add"):
        _check(text)


def test_use_before_def():
    text = """func @main(%x: f32[2]) -> (f32[2]) {
  %a = Relu(%b) : f32[2]
  %b = Relu(%x) : f32[2]
  return %a
}
"""
    with pytest.raises(IRParseError, match=r"2:.*undefined value %b"):
        parse(text)


def test_undefined_in_region_is_caught():
    text = """func @main(%c: bool[], %x: f32[2]) -> (f32[2]) {
  %y = If(%c) {then_branch = region() {
    return %nope
  }, else_branch = region() {
    return %x
  }} : f32[2]
  return %y
}
"""
    with pytest.raises(IRParseError, match="undefined value %nope"):
        parse(text)


def test_unknown_attribute():
    text = """func @main(%x: f32[2]) -> (f32[2]) {
  %a = Relu(%x) {alpha = 1.0} : f32[2]
  return %a
}
"""
    with pytest.raises(IRParseError, match=r"2:3.*unknown attribute 'alpha'"):
        parse(text)


def test_wrong_operand_count():
    text = """func @main(%x: f32[2]) -> (f32[2]) {
  %a = Add(%x) : f32[2]
  return %a
}
"""
    with pytest.raises(VerifyError, match="operands"):
        _check(text)


def test_wrong_attr_type():
    text = """func @main(%x: f32[2,3]) -> (f32[3,2]) {
  %a = Transpose(%x) {perm = "1,0"} : f32[3,2]
  return %a
}
"""
    with pytest.raises(IRParseError, match="perm"):
        parse(text)


def test_parse_error_has_line_col_and_expected():
    text = "func @main(%x: f32[2]) -> (f32[2]) {\n  %a = Relu(%x) f32[2]\n  return %a\n}\n"
    with pytest.raises(IRParseError) as e:
        parse(text, "t.nnir")
    msg = str(e.value)
    assert msg.startswith("t.nnir:2:")
    assert "expected one of" in msg


def test_symbolic_inference_conv_like():
    text = """func @main(%x: f32[N,3], %y: f32[N,3]) -> (f32[N,3]) {
  %z = Add(%x, %y) : f32[N,3]
  return %z
}
"""
    _check(text)
