"""Importers for the tensor / shape / indexing family: Constant, and the ops whose form changed
across opsets (attributes that became inputs), plus Shape/Size folding of static inputs."""
from __future__ import annotations

import numpy as np

from ..ir import registry
from ..ir.ops.shape import ShapeAttrs, shape_range
from . import NodeCtx, importer


@importer("Constant")
def _constant(ctx: NodeCtx):
    a = ctx.attrs
    if len(a) != 1:
        ctx.fail(f"needs exactly one value attribute, got {sorted(a)}")
    (k, v), = a.items()
    if k == "value":
        arr = np.asarray(v)
    elif k == "value_float":
        arr = np.array(v, np.float32)
    elif k == "value_floats":
        arr = np.array(list(v), np.float32).reshape(-1)
    elif k == "value_int":
        arr = np.array(v, np.int64)
    elif k == "value_ints":
        arr = np.array(list(v), np.int64).reshape(-1)
    else:
        ctx.fail(f"attribute {k!r} is not supported (string and sparse constants are not)")
    return [ctx.const(arr, ctx.node.output[0])]


def _attr_to_input(ctx: NodeCtx, attrs: dict, name: str, pos: int, inputs: list, dt=np.int64):
    if name in attrs:
        v = attrs.pop(name)
        while len(inputs) < pos:
            inputs.append(None)
        c = ctx.const(np.array(v, dt))
        if len(inputs) == pos:
            inputs.append(c)
        else:
            inputs[pos] = c


@importer("Reshape")
def _reshape(ctx: NodeCtx):
    attrs, inputs = dict(ctx.attrs), list(ctx.inputs)
    _attr_to_input(ctx, attrs, "shape", 1, inputs)  # opset < 5
    attrs.pop("consumed_inputs", None)
    return ctx.emit(operands=inputs, attrs=attrs)


@importer("Squeeze", "Unsqueeze")
def _squeeze(ctx: NodeCtx):
    attrs, inputs = dict(ctx.attrs), list(ctx.inputs)
    _attr_to_input(ctx, attrs, "axes", 1, inputs)  # opset < 13
    return ctx.emit(operands=inputs, attrs=attrs)


@importer("Slice")
def _slice(ctx: NodeCtx):
    ctx.need(0)  # read directly below
    attrs, inputs = dict(ctx.attrs), list(ctx.inputs)
    if "starts" in attrs:  # opset < 10
        inputs = [inputs[0], ctx.const(np.array(attrs.pop("starts"), np.int64)),
                  ctx.const(np.array(attrs.pop("ends"), np.int64))]
        if "axes" in attrs:
            inputs.append(ctx.const(np.array(attrs.pop("axes"), np.int64)))
    return ctx.emit(operands=inputs, attrs=attrs)


@importer("Split")
def _split(ctx: NodeCtx):
    attrs, inputs = dict(ctx.attrs), list(ctx.inputs)
    _attr_to_input(ctx, attrs, "split", 1, inputs)  # opset < 13
    if (len(inputs) < 2 or inputs[1] is None) and "num_outputs" not in attrs:
        attrs["num_outputs"] = len(ctx.node.output)
    return ctx.emit(operands=inputs, attrs=attrs)


@importer("Pad")
def _pad(ctx: NodeCtx):
    ctx.need(0)  # read directly below
    attrs, inputs = dict(ctx.attrs), list(ctx.inputs)
    if "paddings" in attrs:
        attrs["pads"] = attrs.pop("paddings")
    if "pads" in attrs:  # opset < 11
        inputs = [inputs[0], ctx.const(np.array(attrs.pop("pads"), np.int64))]
        value = attrs.pop("value", 0.0)
        dt = inputs[0].type.dtype.np
        inputs.append(ctx.const(np.array(value).astype(dt)))
    return ctx.emit(operands=inputs, attrs=attrs)


@importer("Scatter")
def _scatter(ctx: NodeCtx):  # deprecated alias of ScatterElements without reduction
    return ctx.emit(op="ScatterElements")


@importer("TopK")
def _topk(ctx: NodeCtx):
    attrs, inputs = dict(ctx.attrs), list(ctx.inputs)
    _attr_to_input(ctx, attrs, "k", 1, inputs)  # opset < 10: k attribute, as a 1-element tensor
    return ctx.emit(operands=inputs, attrs=attrs)


@importer("Shape")
def _shape(ctx: NodeCtx):
    ctx.need(0)  # read directly below
    t = ctx.inputs[0].type
    if t.shape is not None:
        a = registry.make_attrs(ShapeAttrs, ctx.attrs, "Shape")
        s, e = shape_range(len(t.shape), a)
        dims = t.shape[s:e]
        if all(isinstance(d, int) for d in dims):
            return [ctx.const(np.array(dims, np.int64).reshape(-1), ctx.node.output[0])]
    return ctx.emit()


@importer("Size")
def _size(ctx: NodeCtx):
    ctx.need(0)  # read directly below
    t = ctx.inputs[0].type
    if t.is_static:
        return [ctx.const(np.array(int(np.prod(t.shape, dtype=np.int64)), np.int64), ctx.node.output[0])]
    return ctx.emit()
