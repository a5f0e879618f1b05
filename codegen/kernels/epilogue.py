"""What a conv / GEMM kernel computes after its product: the typed description a fused lowering
(codegen/kernels/epilogue_fusion.py) passes to the conv and GEMM lowerings, which turn it into
their variants' epilogue parameters (templates/gemm_tc_core.cu.j2, gemm_f32.cu.j2,
conv_direct.cu.j2):

    D = act(alpha * product + beta * residual + bias)      (stored as D's dtype)

`NONE` is what an unfused Conv/Gemm/MatMul gets: its lowering then does exactly what it did before.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Epilogue:
    bias: Optional[Any] = None      # Buffer [channels]: per output channel (conv: replaces the op's own
                                    # bias, which the fused lowering summed into it; GEMM: per column)
    residual: Optional[Any] = None  # Buffer of the output's shape (GEMM: or one broadcasting onto it),
                                    # added before the activation
    act: str = "none"               # one of common.ACTIVATIONS
    act_params: tuple = ()          # (("alpha", a),) / (("lo", lo), ("hi", hi))
    alpha: float = 1.0              # GEMM: scale of the product
    beta: float = 1.0               # GEMM: scale of the residual
    residual_onto: Optional[tuple] = None  # GEMM: the shape the residual is added onto when not the
                                    # output buffer's (a view of the GEMM result before a later
                                    # view, fuse-epilogue's `view` steps): same elements, in order

    @property
    def empty(self) -> bool:
        return self.bias is None and self.residual is None and self.act == "none" and self.alpha == 1.0


NONE = Epilogue()
