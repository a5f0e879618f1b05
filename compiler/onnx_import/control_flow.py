"""Importers for control flow: Scan opset 8 (batch axis, `directions`, sequence_lens) becomes the
newest Scan form: an outer Scan over the batch axis whose body is a Scan over time."""
from __future__ import annotations

import numpy as np

from ..ir.builder import Builder
from ..ir.graph import Region, Value
from ..ir.types import TensorType
from . import NodeCtx, importer


@importer("Scan")
def _scan(ctx: NodeCtx):
    if ctx.opset >= 9:
        return ctx.emit()
    attrs = dict(ctx.attrs)
    body = attrs.pop("body")
    m = int(attrs.pop("num_scan_inputs"))
    dirs = attrs.pop("directions", None)
    if attrs:
        ctx.fail(f"unsupported attributes {sorted(attrs)}")
    seq_lens, rest = ctx.inputs[0], list(ctx.inputs[1:])
    n_state = len(rest) - m
    if seq_lens is not None:
        lv = ctx.value(0)
        full = [x.type.shape[1] for x in rest[n_state:] if x.type.shape is not None]
        if lv is None or not full or not isinstance(full[0], int) or not np.all(lv == full[0]):
            ctx.fail("Scan-8 sequence_lens shorter than the sequence are not supported")
    outer = Region([], [], [])
    b = Builder(outer, ctx.b.weights, ctx.b.names, fold=False)
    for v in rest:
        t = v.type
        outer.args.append(Value(ctx.b.names(v.name + "_b"),
                                TensorType(t.dtype, None if t.shape is None else tuple(t.shape[1:]))))
    inner_attrs = {"body": body, "num_scan_inputs": m}
    if dirs is not None:
        inner_attrs["scan_input_directions"] = list(dirs)
    outer.results = b.create("Scan", list(outer.args), inner_attrs, num_results=len(body.results),
                             loc=ctx.loc)
    return ctx.emit("Scan", rest, {"body": outer, "num_scan_inputs": len(rest)})
