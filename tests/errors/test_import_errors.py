"""Malformed or hostile ONNX models give one clear ImportError_ naming what and where, never a
traceback and never a silently different model (issue 6, section 3)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T, helper as h

from nnc.ir.errors import ImportError_, NncError
from nnc.onnx_import import import_model

from .util import init, model, one_line_error, vi


def imp(m):
    from nnc.ir.verify import verify
    mod = import_model(m)
    verify(mod)
    return mod


def relu_model(**kw):
    return model([h.make_node("Relu", ["x"], ["y"], name="r")], [vi("x", shape=[2])], [vi("y", shape=[2])], **kw)


def test_empty_file_is_not_a_model(tmp_path, capsys):
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    err = one_line_error(capsys, "compile", p, "-o", tmp_path / "out", "--no-codegen")
    assert "no graph" in err and "empty.onnx" in err
    assert not (tmp_path / "out" / "plan.json").exists()


def test_graphproto_bytes_are_not_a_model(tmp_path):
    p = tmp_path / "g.onnx"
    p.write_bytes(relu_model().graph.SerializeToString())
    with pytest.raises(ImportError_, match="no graph"):
        import_model(p)


def test_model_without_outputs():
    m = relu_model()
    del m.graph.output[:]
    with pytest.raises(ImportError_, match="no outputs"):
        imp(m)


@pytest.mark.parametrize("opset", [0, 99])
def test_opset_out_of_range(opset):
    with pytest.raises(ImportError_, match=f"opset {opset} is outside"):
        imp(relu_model(opset=opset))


def test_missing_opset():
    m = relu_model()
    del m.opset_import[:]
    with pytest.raises(ImportError_, match="declares no opset"):
        imp(m)


def test_duplicate_producer_is_rejected():
    m = model([h.make_node("Relu", ["x"], ["y"], name="a"), h.make_node("Neg", ["x"], ["y"], name="b")],
              [vi("x", shape=[2])], [vi("y", shape=[2])])
    with pytest.raises(ImportError_, match=r"'b' \(Neg.*output 'y' is already defined"):
        imp(m)


def test_node_output_shadowing_an_input_is_rejected():
    m = model([h.make_node("Relu", ["x"], ["x"], name="a")], [vi("x", shape=[2])], [vi("x", shape=[2])])
    with pytest.raises(ImportError_, match="'x' is already defined"):
        imp(m)


def test_duplicate_graph_output_is_rejected():
    m = model([h.make_node("Relu", ["x"], ["y"], name="a")], [vi("x", shape=[2])],
              [vi("y", shape=[2]), vi("y", shape=[2])])
    with pytest.raises(ImportError_, match="'y' is listed twice in graph.output"):
        imp(m)


def test_duplicate_initializer_and_input_names():
    m = relu_model()
    m.graph.initializer.extend([init("w", np.ones(3, np.float32)), init("w", np.ones(3, np.float32))])
    with pytest.raises(ImportError_, match="initializer 'w' is defined more than once"):
        imp(m)
    m = relu_model()
    m.graph.input.append(vi("x", shape=[2]))
    with pytest.raises(ImportError_, match="graph input 'x' is defined more than once"):
        imp(m)


def test_negative_input_dim():
    m = model([h.make_node("Relu", ["x"], ["y"], name="a")], [vi("x", shape=[-3, 2])], [vi("y")])
    with pytest.raises(ImportError_, match="value 'x': dim 0 is -3"):
        imp(m)


def conv(**attrs):
    return model([h.make_node("Conv", ["x", "w"], ["y"], name="cv", **attrs)], [vi("x", shape=[1, 1, 8, 8])],
                 [vi("y")], [init("w", np.ones((2, 1, 3, 3), np.float32))])


@pytest.mark.parametrize("attrs, msg", [
    ({"pads": [-100, -100, -100, -100]}, "pad -100 must be >= 0"),
    ({"pads": [-1, 0, 0, 0]}, "pad -1 must be >= 0"),
    ({"dilations": [10**9, 10**9]}, "does not fit the padded input extent 8"),
    ({"strides": [0, 1]}, "stride 0 must be >= 1"),
    ({"kernel_shape": [9, 9]}, "kernel rank|does not fit|kernel"),
])
def test_conv_window_attributes(attrs, msg):
    with pytest.raises(ImportError_, match=msg) as e:
        imp(conv(**attrs))
    assert "'cv'" in str(e.value)


def test_pool_window_larger_than_input():
    m = model([h.make_node("MaxPool", ["x"], ["y"], name="mp", kernel_shape=[9, 9])],
              [vi("x", shape=[1, 1, 8, 8])], [vi("y")])
    with pytest.raises(ImportError_, match="'mp'.*does not fit"):
        imp(m)


def test_range_with_huge_limit_is_a_size_error_not_memoryerror():
    m = model([h.make_node("Range", ["s", "l", "d"], ["y"], name="rng")], [], [vi("y")],
              [init("s", np.float32(0)), init("l", np.float32(1e12)), init("d", np.float32(1))])
    with pytest.raises(ImportError_, match=r"'rng'.*Range.*elements, more than"):
        imp(m)


@pytest.mark.parametrize("dt", [np.int64, np.int32, np.float32, np.float64])
def test_range_length_matches_reference(dt):
    """Range's inferred length (computed, not materialised) equals np.arange's in the operand type."""
    from nnc.ir.ops.shape import range_length

    class Ctx:
        def fail(self, msg):
            raise NncError(msg)
    rng = np.random.default_rng(0)
    for _ in range(500):
        s, l, d = (rng.integers(-50, 50, 3) / rng.choice([1, 3, 7])).astype(dt)
        if d == 0:
            continue
        want = len(np.arange(s, l, d))
        assert range_length(Ctx(), np.asarray(s), np.asarray(l), np.asarray(d)) == want, (s, l, d)


def test_range_with_zero_delta():
    m = model([h.make_node("Range", ["s", "l", "d"], ["y"], name="rng")], [], [vi("y", T.INT64)],
              [init("s", np.int64(0)), init("l", np.int64(5)), init("d", np.int64(0))])
    with pytest.raises(ImportError_, match="delta is 0"):
        imp(m)


def test_constant_gather_index_out_of_range():
    m = model([h.make_node("Gather", ["x", "i"], ["y"], name="ga")], [vi("x", shape=[3, 2])], [vi("y")],
              [init("i", np.array([5], np.int64))])
    with pytest.raises(ImportError_, match=r"'ga'.*constant index 5 is out of range for extent 3"):
        imp(m)
    m = model([h.make_node("Gather", ["x", "i"], ["y"], name="ga")], [vi("x", shape=[3, 2])], [vi("y")],
              [init("i", np.array([-4], np.int64))])
    with pytest.raises(ImportError_, match="constant index -4"):
        imp(m)


def test_constant_gather_index_in_range_still_works():
    from nnc.ir.interp import Interpreter
    m = model([h.make_node("Gather", ["x", "i"], ["y"], name="ga")], [vi("x", shape=[3, 2])], [vi("y")],
              [init("i", np.array([-3, 2], np.int64))])
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    out = Interpreter(imp(m)).run({"x": x})
    np.testing.assert_array_equal(out["y"], x[[0, 2]])


def test_runtime_gather_index_out_of_range_is_an_error_in_the_reference():
    """Indices known only at run time: the reference interpreter refuses them (documented in
    ir/ops/gather.py; the CUDA kernels do not bounds-check, as ONNX leaves it undefined)."""
    from nnc.ir.interp import Interpreter
    m = model([h.make_node("Gather", ["x", "i"], ["y"], name="ga")],
              [vi("x", shape=[3, 2]), vi("i", T.INT64, [1])], [vi("y")])
    with pytest.raises(NncError, match="out of range for extent 3"):
        Interpreter(imp(m)).run({"x": np.zeros((3, 2), np.float32), "i": np.array([3])})


def test_string_element_type_names_value_and_type():
    m = model([h.make_node("Identity", ["x"], ["y"], name="idn")], [vi("x", T.STRING, [2])], [vi("y", T.STRING)])
    with pytest.raises(ImportError_, match=r"value 'x': ONNX element type STRING \(8\) is not supported"):
        imp(m)
    m = model([h.make_node("Identity", ["c"], ["y"], name="idn")], [], [vi("y", T.STRING)],
              [h.make_tensor("c", T.STRING, [1], [b"ab"])])
    with pytest.raises(ImportError_, match=r"initializer 'c': ONNX element type STRING \(8\)"):
        imp(m)
    m = model([h.make_node("Constant", [], ["y"], name="k", value=h.make_tensor("t", T.STRING, [1], [b"a"]))],
              [], [vi("y", T.STRING)])
    with pytest.raises(ImportError_, match=r"'k'.*attribute 'value': ONNX element type STRING"):
        imp(m)


def test_invalid_utf8_names_import_verify_and_print():
    """Protobuf hands undecodable string fields back as bytes; the importer decodes them with
    backslashreplace, so the verifier and the printer see text (and names stay distinct)."""
    from nnc.ir.parser import parse
    from nnc.ir.printer import print_module
    m = relu_model()
    m.graph.node[0].output[0] = "y\u00e9"
    m.graph.output[0].name = "y\u00e9"
    m.graph.node[0].name = "n\u00e9"
    raw = m.SerializeToString().replace("\u00e9".encode(), b"\xff\xfe")
    mod = imp(onnx.load_from_string(raw))
    names = [r.name for r in mod.main.results]
    assert names == ["y\\xff\\xfe"]
    assert mod.main.ops[-1].loc.node == "n\\xff\\xfe"
    text = print_module(mod)
    assert print_module(parse(text)) == text


def test_invalid_utf8_in_a_subgraph_and_attribute(tmp_path):
    then = h.make_graph([h.make_node("Relu", ["x"], ["t\u00e9"], name="tr")], "then", [], [vi("t\u00e9", shape=[2])])
    els = h.make_graph([h.make_node("Neg", ["x"], ["e"], name="en")], "else", [], [vi("e", shape=[2])])
    m = model([h.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=els)],
              [vi("c", T.BOOL, []), vi("x", shape=[2])], [vi("y", shape=[2])])
    raw = m.SerializeToString().replace("\u00e9".encode(), b"\xff\xfe")
    imp(onnx.load_from_string(raw))


def test_unicode_error_free_cli_on_invalid_utf8(tmp_path, capsys):
    from .util import cli
    m = relu_model()
    m.graph.node[0].output[0] = "y\u00e9"
    m.graph.output[0].name = "y\u00e9"
    p = tmp_path / "m.onnx"
    p.write_bytes(m.SerializeToString().replace("\u00e9".encode(), b"\xff\xfe"))  # same length
    rc, out, err = cli(capsys, "ir", p, "--verify")
    assert rc == 0 and "Traceback" not in err, err
    assert '%"y\\\\xff\\\\xfe"' in out


def test_negative_shapes_flag(tmp_path, capsys):
    m = model([h.make_node("Relu", ["x"], ["y"], name="a")], [vi("x", shape=["N", 2])], [vi("y")])
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    err = one_line_error(capsys, "ir", p, "--shapes", "x:-3x2")
    assert "--shapes" in err
