"""Importers for the signal family: DFT before opset 20 took `axis` as an attribute (default 1);
the IR's DFT takes it as its third operand (opset 20 form)."""
from __future__ import annotations

import numpy as np

from . import NodeCtx, importer


@importer("DFT")
def _dft(ctx: NodeCtx):
    if ctx.opset >= 20:
        return ctx.emit()
    attrs = dict(ctx.attrs)
    axis = int(attrs.pop("axis", 1))
    inputs = list(ctx.inputs) + [None] * (2 - len(ctx.inputs))
    return ctx.emit(operands=inputs[:2] + [ctx.const(np.array(axis, np.int64))], attrs=attrs)
