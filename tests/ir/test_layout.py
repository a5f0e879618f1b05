"""Layout tags in IR types (ir/layout.py): printed and parsed losslessly, helper API, verifier checks."""
import re

import numpy as np
import pytest

from nnc.ir import parse, print_module, verify
from nnc.ir.errors import NncError
from nnc.ir.interp import Interpreter
from nnc.ir import layout as L
from nnc.ir.types import tensor

NHWC_CONV = """func @main(%x: f16[1,8,5,5]) -> (f16[1,8,5,5]) {
  %w = const() {value = dense<base64 "%s"> : f16[8,3,3,8]} : f16[8,3,3,8]
  %xn = Transpose(%x) {perm = [0, 2, 3, 1]} : f16[1,5,5,8]#nhwc
  %yn = Conv(%xn, %w) {pads = [1, 1, 1, 1], layout = "NHWC"} : f16[1,5,5,8]#nhwc
  %rn = Relu(%yn) : f16[1,5,5,8]#nhwc
  %y = Transpose(%rn) {perm = [0, 3, 1, 2]} : f16[1,8,5,5]
  return %y
}
"""


def _text(body_ops, arg="f16[1,8,5,5]", ret="f16[1,8,5,5]"):
    return f"func @main(%x: {arg}) -> ({ret}) {{\n" + "".join(f"  {o}\n" for o in body_ops) + "  return %y\n}\n"


def test_round_trip_keeps_tags():
    import base64
    w = np.random.default_rng(0).standard_normal((8, 3, 3, 8)).astype(np.float16)
    text = NHWC_CONV.replace("%s", base64.b64encode(w.tobytes()).decode())
    m = parse(text)
    verify(m)
    assert print_module(m) == print_module(parse(print_module(m)))
    ops = {op.results[0].name: op for op in m.main.ops}
    assert L.is_nhwc(ops["yn"].results[0]) and not L.is_nhwc(ops["y"].results[0])
    assert "f16[1,5,5,8]#nhwc" in print_module(m)
    # the interpreter computes on the physical arrays: tags do not change results
    x = np.random.default_rng(1).standard_normal((1, 8, 5, 5)).astype(np.float16)
    untagged = parse(text.replace("#nhwc", ""))
    np.testing.assert_array_equal(Interpreter(m).run({"x": x})["y"], Interpreter(untagged).run({"x": x})["y"])


def test_helpers():
    t = L.with_layout(tensor("f16", [2, 7, 5, 3]), L.NHWC)
    assert str(t) == "f16[2,7,5,3]#nhwc"
    assert L.perm_of(t) == (0, 2, 3, 1) and L.logical_shape(t) == (2, 3, 7, 5)
    assert L.physical_axis(t, 1) == 3 and L.physical_axis(t, 2) == 1 and L.physical_axis(t, -1) == 2
    assert L.channel_axis(t) == 3 and L.channel_axis(tensor("f16", [2, 3, 7, 5])) == 1
    u = tensor("f16", [2, 3])
    assert L.perm_of(u) == () and L.logical_shape(u) == (2, 3) and L.layout_of(u) is None
    assert t != tensor("f16", [2, 7, 5, 3])  # type equality sees the tag
    assert t.with_shape([1, 2, 3, 4]).layout is None  # inference gives untagged physical shapes
    assert t.with_dtype("f32").layout == L.NHWC
    with pytest.raises(ValueError, match="unknown layout tag"):
        L.with_layout(u, "nchw8")


@pytest.mark.parametrize("ops, arg, msg", [
    # an NHWC value into an op that reads NCHW implicitly
    (["%y = GlobalAveragePool(%x) : f16[1,5,1,1]"], "f16[1,5,5,8]#nhwc",
     "GlobalAveragePool does not read as laid out (it reads NCHW); transpose it back first"),
    (["%y = Flatten(%x) : f16[1,200]"], "f16[1,5,5,8]#nhwc", "Flatten"),
    # an NCHW op claiming an NHWC result
    (["%y = MaxPool(%x) {kernel_shape = [1, 1]} : f16[1,8,5,5]#nhwc"], "f16[1,8,5,5]", "MaxPool computes NCHW"),
    # tags need their rank and a known name
    (["%y = Relu(%x) : f16[8,5,5]#nhwc"], "f16[8,5,5]", "needs a rank-4 type"),
    (["%y = Relu(%x) : f16[1,8,5,5]#nc8hw"], "f16[1,8,5,5]", "unknown layout tag #nc8hw"),
])
def test_verifier_refuses_misplaced_tags(ops, arg, msg):
    ret = ops[-1].split(" : ")[-1]
    m = parse(_text(ops, arg, ret))
    with pytest.raises(NncError, match=re.escape(msg)):
        verify(m)


def test_verifier_accepts_layout_ops():
    ops = ["%p = MaxPool(%x) {kernel_shape = [1, 1], layout = \"NHWC\"} : f16[1,5,5,8]#nhwc",
           "%a = Add(%p, %x) : f16[1,5,5,8]#nhwc",
           "%y = Transpose(%a) {perm = [0, 3, 1, 2]} : f16[1,8,5,5]"]
    verify(parse(_text(ops, "f16[1,5,5,8]#nhwc")))
