"""nnc's own structural ops: `const` (inline tensor or named weight) and `Identity`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import NncError
from ..registry import NoAttrs, register
from ..types import type_of_array
from ._util import same_as


@dataclass(frozen=True)
class ConstAttrs:
    value: Optional[np.ndarray] = None  # small tensors, inline in the text
    weight: Optional[str] = None  # name in the module's weight store

    def __eq__(self, o):  # arrays compare by content (and dtype), for graph equality
        if not isinstance(o, ConstAttrs) or self.weight != o.weight:
            return False
        if (self.value is None) != (o.value is None):
            return False
        return self.value is None or (self.value.dtype == o.value.dtype and self.value.shape == o.value.shape
                                      and self.value.tobytes() == o.value.tobytes())

    def __hash__(self):
        return hash(self.weight)


def _const_infer(ctx):
    a = ctx.attrs
    if (a.value is None) == (a.weight is None):
        ctx.fail("needs exactly one of `value` and `weight`")
    if a.value is not None:
        return [type_of_array(a.value)]
    if ctx.declared:
        return [ctx.declared[0]]
    ctx.fail(f"weight {a.weight!r} has no declared type")


def _const_ref(a: ConstAttrs, *, ctx):
    if a.value is not None:
        return a.value
    if ctx.weights is None:
        raise NncError(f"weight {a.weight!r}: the module has no weights loaded")
    return np.asarray(ctx.weights[a.weight])


register("const", ConstAttrs, infer=_const_infer, ref=_const_ref, inputs=0, ref_ctx=True,
         doc="A compile-time constant: small ones inline, large ones by name in the weight store.")
register("Identity", NoAttrs, infer=same_as(0), ref=lambda a, x: x)
