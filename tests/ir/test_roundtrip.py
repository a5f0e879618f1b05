"""print(parse(text)) == text for printed IR, parse(print(m)) equals m, for hand-written IR and
for every imported node-suite model and the light models' graphs."""
import warnings

import numpy as np
import pytest

from nnc.ir import parse, print_module, verify
from nnc.ir.equal import first_difference

TEXT = """func @main(%x: f32[N,3,4], %"in:0": f32[4]) -> (f32[N,3,4], bf16[2,2]) {
  %c = const() {value = dense<[1.5, -2.0, inf, nan]> : f32[4]} : f32[4] loc("c0")
  %b = const() {value = dense<[0.5, 1.0, -3.0, 0.25]> : bf16[2,2]} : bf16[2,2]
  %0 = Add(%x, %"in:0") : f32[N,3,4] loc("add/1:0")
  %1 = Add(%0, %c) : f32[N,3,4]
  %2 = Relu(%1) : f32[N,3,4]
  return %2, %b
}
"""


def test_print_parse_byte_identical():
    text = TEXT
    m = parse(text)
    assert print_module(m) == text
    verify(m)
    m2 = parse(print_module(m))
    assert first_difference(m, m2) is None


def test_nested_region_roundtrip():
    text = """func @main(%c: bool[], %x: f32[2]) -> (f32[2]) {
  %y = If(%c) {then_branch = region() {
    %t = Relu(%x) : f32[2]
    return %t
  }, else_branch = region() {
    %e = Identity(%x) : f32[2]
    return %e
  }} : f32[2]
  return %y
}
"""
    m = parse(text)
    assert print_module(m) == text
    assert first_difference(m, parse(print_module(m))) is None


def test_large_constant_base64_roundtrip():
    from nnc.ir.builder import Builder
    from nnc.ir.graph import Function, Module, NameGen
    from nnc.ir.weights import WeightStore
    import nnc.ir.builder as B
    f = Function([], [], [], name="main")
    ws = WeightStore()
    b = Builder(f, ws, NameGen())
    old = B.INLINE_MAX_ELEMENTS
    B.INLINE_MAX_ELEMENTS = 10_000
    try:
        v = b.constant(np.random.default_rng().standard_normal((7, 13)).astype(np.float32), "big")
    finally:
        B.INLINE_MAX_ELEMENTS = old
    f.results = [v]
    m = Module([f], ws)
    text = print_module(m)
    assert "base64" in text
    m2 = parse(text)
    assert print_module(m2) == text
    assert first_difference(m, m2) is None


def _node_cases():
    from tests.conformance.node_suite import load_cases
    return load_cases()


@pytest.mark.slow
def test_roundtrip_every_importable_node_model():
    from nnc.onnx_import import import_model
    from nnc.ir.errors import NncError
    n = 0
    for tc in _node_cases():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = import_model(tc.model)
        except NncError:
            continue
        text = print_module(m)
        m2 = parse(text, tc.name)
        m2.weights = m.weights
        assert print_module(m2) == text, tc.name
        assert first_difference(m, m2) is None, tc.name
        n += 1
    print(f"round-tripped {n} imported node-suite models")
    assert n > 1000
