"""IR text and `nnc opt`: deep nesting, huge dim expressions, ill-typed IR, binary input."""
import time

import pytest

from nnc.ir.errors import IRParseError, NncError, VerifyError
from nnc.ir.parser import parse
from nnc.ir.printer import print_module
from nnc.ir.verify import MAX_REGION_DEPTH, verify

from .util import cli, one_line_error


def nested_ifs(n: int) -> str:
    """n Ifs, each inside the previous one's then-branch (built without recursion)."""
    head, tail = [], []
    for k in range(n, 0, -1):
        p = "  " * (n - k + 1)
        head.append(p + f"%r{k} = If(%c) {{then_branch = region() {{")
        tail.append([p + "}, else_branch = region() {", p + "  return %x", p + "}} : f32[2]", p + f"return %r{k}"])
    p = "  " * (n + 1)
    lines = ["func @main(%c: bool[], %x: f32[2]) -> (f32[2]) {"] + head + [p + "%r0 = Relu(%x) : f32[2]", p + "return %r0"]
    for t in reversed(tail):
        lines += t
    return "\n".join(lines + ["}"]) + "\n"


def test_nesting_within_the_limit_round_trips():
    text = nested_ifs(MAX_REGION_DEPTH)
    m = parse(text)
    verify(m)
    assert print_module(parse(print_module(m))) == print_module(m)


@pytest.mark.parametrize("n", [MAX_REGION_DEPTH + 1, 250, 2000])
def test_too_deep_nesting_is_a_clean_error_with_position(n):
    with pytest.raises(IRParseError, match=r"<string>:\d+:\d+: regions nested too deep"):
        parse(nested_ifs(n))


def test_20000_term_dim_expression_works_in_linear_time():
    terms = "+".join(["N"] * 10000 + ["M"] * 10000)
    text = f"func @main(%x: f32[{terms}]) -> (f32[{terms}]) {{\n  %y = Relu(%x) : f32[{terms}]\n  return %y\n}}\n"
    t0 = time.perf_counter()
    m = parse(text)
    verify(m)
    out = print_module(m)
    assert print_module(parse(out)) == out
    from nnc.ir import symbolic
    d = m.main.args[0].type.shape[0]
    assert symbolic.evaluate(d, {"N": 2, "M": 3}) == 50000
    assert symbolic.substitute(d, {"N": 1, "M": 1}) == 20000
    assert time.perf_counter() - t0 < 20  # quadratic would be minutes


def test_deeply_nested_dim_expression_is_refused():
    e = "N"
    for _ in range(300):
        e = f"({e})/2"
    with pytest.raises(IRParseError, match="dim expression nested too deep"):
        parse(f"func @main(%x: f32[{e}]) -> (f32[{e}]) {{\n  return %x\n}}\n")


def test_verifier_refuses_too_deep_modules_built_by_api():
    m = parse(nested_ifs(3))
    import importlib
    vmod = importlib.import_module("nnc.ir.verify")
    old = vmod.MAX_REGION_DEPTH
    vmod.MAX_REGION_DEPTH = 2
    try:
        with pytest.raises(VerifyError, match="nested too deep"):
            verify(m)
    finally:
        vmod.MAX_REGION_DEPTH = old


def test_negative_and_huge_dims_in_ir_are_rejected_by_the_verifier():
    with pytest.raises(VerifyError, match="negative extent -2"):
        verify(parse("func @main(%x: f32[-2]) -> (f32[-2]) {\n  return %x\n}\n"))
    with pytest.raises(VerifyError, match="elements, more than"):
        verify(parse("func @main(%x: f32[99999999,99999999]) -> (f32[99999999,99999999]) {\n  return %x\n}\n"))


def test_function_returning_a_value_twice_is_rejected():
    with pytest.raises(VerifyError, match="returns %x twice"):
        verify(parse("func @main(%x: f32[2]) -> (f32[2], f32[2]) {\n  return %x, %x\n}\n"))


ILL_TYPED = "func @main(%x: f32[2]) -> (i64[3]) {\n  %y = Relu(%x) : i64[3]\n  return %y\n}\n"


def test_nnc_opt_verifies_its_input(tmp_path, capsys):
    p = tmp_path / "bad.nnir"
    p.write_text(ILL_TYPED)
    for extra in ([], ["--verify-each"], ["--passes", "dce"]):
        err = one_line_error(capsys, "opt", p, *extra)
        assert "bad.nnir" in err and "declared i64[3] but inference gives f32[2]" in err


def test_nnc_opt_on_an_onnx_model(capsys):
    from pathlib import Path
    onnx_path = Path(__file__).resolve().parents[2] / "examples" / "tiny_cnn.onnx"
    err = one_line_error(capsys, "opt", onnx_path)
    assert "looks like an ONNX model" in err and "nnc ir" in err and "UnicodeDecodeError" not in err


def test_nnc_opt_on_binary_and_non_utf8(tmp_path, capsys):
    p = tmp_path / "x.nnir"
    p.write_bytes(b"func @main() -> () {\n  return // \xff\n}\n")
    err = one_line_error(capsys, "opt", p)
    assert "x.nnir:2:" in err and "not UTF-8" in err
    p.write_bytes(b"\x00\x01\x02")
    assert "NUL" in one_line_error(capsys, "opt", p)
