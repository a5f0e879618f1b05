"""Importers for elementwise ops whose ONNX form changed across opsets."""
from __future__ import annotations

import numpy as np

from . import NodeCtx, importer


@importer("Clip")
def _clip(ctx: NodeCtx):
    """Clip < 11: `min` / `max` attributes -> optional scalar inputs of the input's dtype."""
    ctx.need(0)  # read directly below
    attrs = dict(ctx.attrs)
    inputs = list(ctx.inputs)
    if "min" in attrs or "max" in attrs:
        if len(inputs) > 1:
            ctx.fail("has both min/max attributes and inputs")
        dt = inputs[0].type.dtype.np
        lo, hi = attrs.pop("min", None), attrs.pop("max", None)
        inputs = [inputs[0],
                  None if lo is None else ctx.const(np.array(lo).astype(dt)),
                  None if hi is None else ctx.const(np.array(hi).astype(dt))]
        while inputs[-1] is None:
            inputs.pop()
    return ctx.emit(operands=inputs, attrs=attrs)


@importer("QuantizeLinear", "DequantizeLinear")
def _quant(ctx: NodeCtx):
    """`output_dtype` / `precision` = 0 mean "not given"."""
    attrs = {k: v for k, v in ctx.attrs.items() if not (k in ("output_dtype", "precision") and v == 0)}
    return ctx.emit(attrs=attrs)
