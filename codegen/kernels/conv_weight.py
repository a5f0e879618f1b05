"""The implicit-GEMM conv's OHWI weight, from a constant (compile time) or an init value (load time).

The implicit GEMM (conv_igemm.cu.j2) reads the weight as OHWI [K, R, S, C/g] (channels zero-padded
to `c_pad` for ungrouped convs); ONNX gives OIHW [K, C/g, R, S]. A `const` weight is transposed at
compile time (conv.prepare_weight, stored in weights.bin). An init value (computed from constants
only: light_resnet50's ConstantOfShape weights times fold-batchnorm's scale) is transposed by the
NCHW -> NHWC layout kernel (conv_layout.cu.j2, O as its batch, I as channels, HW = R*S, the same
zero padding) in the load-time init phase into a persistent buffer (codegen/init_transform.py), so
those convs take the fast path too instead of the direct fallback; no per-run launch is added.
"""
from __future__ import annotations

from typing import Optional

from ..init_transform import init_transformed
from ..plan import Buffer
from . import conv
from .gemm_lowering import MAX_GRID_YZ, emit_spec


def ohwi_weight(ctx, K: int, CG: int, R: int, S: int, groups: int, c_pad: Optional[int], key: str,
                dtype: str) -> Optional[Buffer]:
    """Operand 1 of the Conv being lowered as OHWI (padded to c_pad), or None when it is neither a
    constant nor an init value (or the layout kernel's grid would not fit: K > 65535)."""
    if ctx.value(1) is not None:
        return ctx.weight(1, lambda a: conv.prepare_weight(a.reshape(K, CG, R, S), groups, c_pad=c_pad), key=key)
    if K > MAX_GRID_YZ:
        return None
    cp = c_pad if c_pad is not None else CG
    w = ctx.inp(1)

    def emit(src: Buffer, dst: Buffer) -> None:
        lay = conv.render_layout("nchw_to_nhwc", K, CG, R * S, dtype, CP=cp)
        emit_spec(ctx, lay, {"X": src, "Y": dst})

    return init_transformed(ctx, 1, key, w.dtype, (K, R, S, cp), emit)
