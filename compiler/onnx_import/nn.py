"""Importers for the NN family: normalise older opsets onto the newest form of each op."""
from __future__ import annotations

import numpy as np

from ..ir.symbolic import UNKNOWN
from . import NodeCtx, importer


def _drop(attrs: dict, *names) -> dict:
    return {k: v for k, v in attrs.items() if k not in names}


@importer("BatchNormalization")
def _bn(ctx: NodeCtx):
    attrs = _drop(ctx.attrs, "spatial", "is_test", "consumed_inputs")
    if ctx.opset < 14 and len(ctx.node.output) > 1 and ctx.opset >= 9 and "training_mode" not in attrs:
        attrs["training_mode"] = 1  # opset 9..13: extra outputs mean training
    n = len(ctx.node.output)
    if n > 3:  # opset < 14 saved_mean / saved_var outputs: not produced
        outs = ctx.create("BatchNormalization", ctx.inputs, attrs, num_results=3,
                          names=list(ctx.node.output)[:3])
        return outs
    return ctx.emit(attrs=attrs)


@importer("InstanceNormalization", "LRN", "LpNormalization", "MeanVarianceNormalization")
def _plain_drop_consumed(ctx: NodeCtx):
    return ctx.emit(attrs=_drop(ctx.attrs, "consumed_inputs"))


@importer("Softmax", "LogSoftmax", "Hardmax")
def _softmax(ctx: NodeCtx):
    ctx.need(0)  # read directly below
    attrs = dict(ctx.attrs)
    if ctx.opset >= 13:
        return ctx.emit(attrs=attrs)
    axis = int(attrs.pop("axis", 1))
    x = ctx.inputs[0]
    shape = x.type.shape
    if shape is None:
        ctx.fail("opset < 13 softmax needs a known input rank")
    rank = len(shape)
    if axis < 0:
        axis += rank
    if axis == rank - 1:
        return ctx.emit(attrs={"axis": -1})
    if axis == 0 and rank == 0:
        return ctx.emit(attrs={"axis": -1})
    flat = ctx.create("Flatten", [x], {"axis": axis}, num_results=1, names=[""])[0]
    y = ctx.create(ctx.op_type, [flat], {"axis": 1}, num_results=1, names=[""])[0]
    if all(isinstance(d, int) for d in shape):
        shp = ctx.const(np.array(shape, np.int64))
    else:
        shp = ctx.create("Shape", [x], {}, num_results=1, names=[""])[0]
    return ctx.create("Reshape", [y, shp], {}, num_results=1)


@importer("GroupNormalization")
def _gn(ctx: NodeCtx):
    ctx.need(0)  # read directly below
    if ctx.opset >= 21:
        return ctx.emit()
    # opset 18: scale/bias per group -> per channel
    x = ctx.inputs[0]
    C = x.type.shape[1] if x.type.shape else UNKNOWN
    if "num_groups" not in ctx.attrs:
        ctx.fail("attribute 'num_groups' is required")
    G = int(ctx.attrs["num_groups"])
    if not isinstance(C, int):
        ctx.fail("opset-18 GroupNormalization needs a static channel count")
    ins = list(ctx.inputs)
    for i in (1, 2):
        v = ctx.value(i)
        if v is None:
            ctx.fail("opset-18 GroupNormalization needs constant scale and bias")
        ins[i] = ctx.const(np.repeat(v, C // G))
    return ctx.emit(operands=ins)


@importer("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp")
def _reduce(ctx: NodeCtx):
    ctx.need(0)  # read directly below
    attrs = dict(ctx.attrs)
    inputs = list(ctx.inputs)
    if "axes" in attrs:  # older opsets: attribute
        axes = attrs.pop("axes")
        inputs = [inputs[0], ctx.const(np.array(axes, np.int64).reshape(-1))]
    return ctx.emit(operands=inputs, attrs=attrs)


@importer("Resize")
def _resize(ctx: NodeCtx):
    ctx.need(0)  # read directly below
    attrs = dict(ctx.attrs)
    inputs = list(ctx.inputs)
    if ctx.opset < 11:  # Resize-10: (X, scales), asymmetric coordinates, floor for nearest
        attrs.setdefault("coordinate_transformation_mode", "asymmetric")
        if attrs.get("mode", "nearest") == "nearest":
            attrs.setdefault("nearest_mode", "floor")
        inputs = [inputs[0], None, inputs[1]]
    return ctx.emit(operands=inputs, attrs=attrs)


@importer("Upsample")
def _upsample(ctx: NodeCtx):
    ctx.need(0)  # read directly below
    attrs = dict(ctx.attrs)
    mode = attrs.pop("mode", "nearest")
    mode = {"bilinear": "linear", "trilinear": "linear"}.get(mode, mode)
    inputs = list(ctx.inputs)
    if "scales" in attrs:  # opset 7-8
        scales = ctx.const(np.array(attrs.pop("scales"), np.float32))
    else:
        scales = inputs[1]
    new = {"mode": mode, "coordinate_transformation_mode": "asymmetric"}
    if mode == "nearest":
        new["nearest_mode"] = "floor"
    return ctx.create("Resize", [inputs[0], None, scales], new)


@importer("Dropout")
def _dropout(ctx: NodeCtx):
    ctx.need(0)  # read directly below
    attrs = dict(ctx.attrs)
    inputs = list(ctx.inputs)
    if ctx.opset < 12:
        attrs.pop("is_test", None)
        attrs.pop("consumed_inputs", None)
        ratio = attrs.pop("ratio", None)
        if ratio is not None:
            inputs = [inputs[0], ctx.const(np.array(ratio, np.float32))]
    return ctx.emit(operands=inputs, attrs=attrs)
