"""inline-if / unroll-loops on ONNX node-suite models: the default pipeline (verified after every
pass) leaves no If/Loop/Scan where the control flow is static, keeps the model's output names, and
the reference interpreter still gives the stored expected outputs."""
import warnings

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from nnc.ir.interp import Interpreter
from nnc.onnx_import import import_model
from nnc.pipeline import DEFAULT_PIPELINE, run_passes
from tests.conformance.node_suite import _arrays, compare, load_cases

CONTROL_FLOW = {"If", "Loop", "Scan"}

# case -> whether control flow must be gone after the default pipeline
CASES = {
    "test_if": True,  # runtime cond, constant branches -> Where
    "test_scan9_sum": True,
    "test_scan9_scalar": True,
    "test_scan9_multi_state": True,
    "test_scan_sum": True,  # opset-8 Scan: batch Scan around the per-sequence Scan (nested)
    "test_linear_attention_gated_expanded": True,
    "test_linear_attention_gated_delta_expanded": True,
    "test_affine_grid_2d_expanded": True,  # constant conds, one computed from an inlined branch
    "test_affine_grid_3d_expanded": True,
    "test_loop11": False,  # trip count and cond are model inputs: stays a Loop
    "test_range_float_type_positive_delta_expanded": False,  # trip count computed from inputs
}


def _case(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = [c for c in load_cases((name,)) if c.name == name]
    assert cases, f"no node-suite case {name}"
    return cases[0]


def _control_flow(module) -> set:
    return {op.name for f in module.functions for op in f.walk() if op.name in CONTROL_FLOW}


def _check(model, data_sets, rtol, atol, flat: bool):
    m = import_model(model)
    assert _control_flow(m), "the case should start with control flow"
    run_passes(m, verify_each=True)
    assert (not _control_flow(m)) == flat, _control_flow(m)
    assert [v.name for v in m.main.results] == [o.name for o in model.graph.output]
    names = [a.name for a in m.main.args]
    for inputs, expected in data_sets:
        inputs, expected = _arrays(inputs), _arrays(expected)
        with np.errstate(all="ignore"):
            out = Interpreter(m).run(dict(zip(names, inputs)))
        got = [out[v.name] for v in m.main.results]
        assert len(got) == len(expected)
        for i, (g, e) in enumerate(zip(got, expected)):
            msg = compare(g, e, rtol, atol)
            assert not msg, f"output {i}: {msg}"


def test_pipeline_order():
    i = DEFAULT_PIPELINE.index("inline-if")
    assert DEFAULT_PIPELINE[i - 1] == "fold-constants"
    assert DEFAULT_PIPELINE[i + 1] == "unroll-loops"
    assert DEFAULT_PIPELINE[i + 2] == "fold-constants"


@pytest.mark.parametrize("name", list(CASES))
def test_node_case(name):
    tc = _case(name)
    _check(tc.model, tc.data_sets, tc.rtol, tc.atol, CASES[name])


def _freeze_inputs(tc, names):
    """The model with the given graph inputs turned into initializers (their first data set's
    values), and the data sets without them."""
    model = onnx.ModelProto()
    model.CopyFrom(tc.model)
    g = model.graph
    order = [i.name for i in g.input]
    first = dict(zip(order, _arrays(tc.data_sets[0][0])))
    keep = [i for i in g.input if i.name not in names]
    del g.input[:]
    g.input.extend(keep)
    for n in names:
        g.initializer.append(numpy_helper.from_array(np.asarray(first[n]), n))
    data = []
    for inputs, expected in tc.data_sets:
        feed = dict(zip(order, _arrays(inputs)))
        data.append(([feed[i.name] for i in keep], expected))
    return model, data


def test_loop11_constant_trip_count_unrolls():
    tc = _case("test_loop11")
    model, data = _freeze_inputs(tc, {"trip_count", "cond"})
    _check(model, data, tc.rtol, tc.atol, flat=True)


def test_range_expanded_constant_bounds_unrolls():
    tc = _case("test_range_float_type_positive_delta_expanded")
    model, data = _freeze_inputs(tc, {"start", "limit", "delta"})
    _check(model, data, tc.rtol, tc.atol, flat=True)


def test_loop_stops_when_cond_folds_false():
    body = helper.make_graph(
        [helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2, np.int64))),
         helper.make_node("Less", ["i", "two"], ["go"]),
         helper.make_node("Add", ["acc", "acc"], ["acc2"]),
         helper.make_node("Identity", ["acc2"], ["scan"])],
        "body",
        [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
         helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("go", onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc2", onnx.TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("scan", onnx.TensorProto.FLOAT, [2])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["m", "", "x"], ["y", "ys"], body=body)], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("ys", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(10, np.int64), "m")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([1.0, -2.0], np.float32)
    expected = [x * 8, np.stack([x * 2, x * 4, x * 8])]
    _check(model, [([x], expected)], 1e-6, 1e-6, flat=True)
