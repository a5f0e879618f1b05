"""Layout tags: the one API every pass, codegen and tool uses to ask how a value is laid out.

A tensor type may carry a layout tag (ir/types.py TensorType.layout, printed `f16[1,56,56,64]#nhwc`).
The shape in the type is always the PHYSICAL shape: the order of the dims in memory, which is what
shape inference, kernels, the memory planner and the reference interpreter see. The tag says which
LOGICAL tensor (the one the ONNX model names) that memory holds:

    physical = numpy.transpose(logical, perm_of(value))

`#nhwc` is the only tag: a 4-D value [N,H,W,C] that stands for the NCHW tensor [N,C,H,W]
(perm (0, 2, 3, 1)). Untagged values are their own logical tensor. The tag never changes an op's
semantics: the interpreter computes on the physical arrays exactly as it would untagged (an op that
reads channels-last, e.g. Conv {layout = "NHWC"}, says so in its own attributes); the tag is what
lets the verifier check that channels-last values only reach ops that expect them (check_op), and
what lets `nnc verify --per-layer` transpose a value back to its ONNX tensor before comparing.

Set by compiler/passes/assign_layout.py; read through the functions below (never `type.layout`
directly), so a later format (say a vectorized NC/8HW8) is one more entry in LAYOUT_PERMS.
"""
from __future__ import annotations

from typing import Optional

from .types import TensorType

NHWC = "nhwc"
TO_NHWC = (0, 2, 3, 1)  # NCHW -> NHWC
TO_NCHW = (0, 3, 1, 2)  # NHWC -> NCHW
# tag -> (rank, perm with physical = transpose(logical, perm))
LAYOUT_PERMS = {NHWC: (4, TO_NHWC)}


def layout_of(v) -> Optional[str]:
    """The layout tag of a Value (or a TensorType); None for an untagged (logical-order) value."""
    if v is None:
        return None
    t = v if isinstance(v, TensorType) else v.type
    return t.layout


def is_nhwc(v) -> bool:
    """v holds an NCHW tensor in NHWC order (its type's shape is [N,H,W,C])."""
    return layout_of(v) == NHWC


def perm_of(v) -> tuple:
    """physical = transpose(logical, perm); () for an untagged value."""
    lay = layout_of(v)
    return LAYOUT_PERMS[lay][1] if lay in LAYOUT_PERMS else ()


def inverse(perm) -> tuple:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def logical_shape(v) -> Optional[tuple]:
    """The shape of the tensor v stands for (NCHW for an #nhwc value)."""
    t = v if isinstance(v, TensorType) else v.type
    if t.shape is None:
        return None
    perm = perm_of(t)
    return tuple(t.shape[i] for i in inverse(perm)) if perm else tuple(t.shape)


def channel_axis(v) -> int:
    """The physical axis of the channels of a 4-D activation: 3 for #nhwc, else 1."""
    return 3 if is_nhwc(v) else 1


def physical_axis(v, logical_axis: int) -> int:
    """Where a logical axis (e.g. a Concat/Slice axis of the ONNX model) is in v's memory order."""
    perm = perm_of(v)
    if not perm:
        return logical_axis
    a = logical_axis % len(perm)
    return perm.index(a)


def with_layout(t: TensorType, layout: Optional[str]) -> TensorType:
    """t with the tag set (None clears it)."""
    if layout is not None and layout not in LAYOUT_PERMS:
        raise ValueError(f"unknown layout tag {layout!r}; known: {', '.join(LAYOUT_PERMS)}")
    return TensorType(t.dtype, t.shape, layout)


def tag(v, layout: Optional[str] = NHWC):
    """Sets v's layout tag in place (a Value's type is replaced; the shape is not touched). Returns v."""
    v.type = with_layout(v.type, layout)
    return v


def op_is_nhwc(op) -> bool:
    """The op computes channels-last: a Conv/pool with {layout = "NHWC"}, or an op whose first
    result is #nhwc (an elementwise op, Concat, Slice, Resize, ... on NHWC values)."""
    if getattr(op.attrs, "layout", None) == "NHWC":
        return True
    return bool(op.results) and is_nhwc(op.results[0])


# Ops that read their input as NCHW (channels at axis 1, spatial dims after it) without naming an
# axis: a #nhwc operand reaching one of these is read with the wrong dims unless the op itself says
# it reads NHWC ({layout = "NHWC"}: Conv, MaxPool, AveragePool, ir/ops/conv.py, ir/ops/pool.py).
# Ops that name their axes (Concat, Slice, Reduce*, Transpose, Resize scales, ...) or are
# elementwise compute on the physical dims and may take tagged values: the layout pass rewrote
# their axes. Not a kernel list: only what the verifier checks (check_op).
NCHW_IMPLICIT = frozenset({
    "Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "DeformConv", "MaxPool", "AveragePool",
    "LpPool", "MaxUnpool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "BatchNormalization",
    "InstanceNormalization", "LRN", "DepthToSpace", "SpaceToDepth", "Flatten", "MaxRoiPool",
    "RoiAlign", "GridSample", "Col2Im", "Upsample",
})


def check_type(t: TensorType, fail) -> None:
    """A tag is a known one on a value of its rank."""
    if t.layout is None:
        return
    if t.layout not in LAYOUT_PERMS:
        fail(f"unknown layout tag #{t.layout} (known: {', '.join('#' + k for k in LAYOUT_PERMS)})")
    rank = LAYOUT_PERMS[t.layout][0]
    if t.shape is not None and len(t.shape) != rank:
        fail(f"layout #{t.layout} needs a rank-{rank} type, got {t}")


def check_op(op, fail) -> None:
    """An op that reads NCHW implicitly gets no #nhwc operand and gives no #nhwc result unless it
    has {layout = "NHWC"} (then its data input and result may be tagged, never another layout)."""
    if op.name not in NCHW_IMPLICIT:
        return
    nhwc_op = getattr(op.attrs, "layout", "NCHW") == "NHWC"
    for i, v in enumerate(op.operands):
        if v is None or layout_of(v) is None:
            continue
        if nhwc_op and not (i == 0 and is_nhwc(v)):
            fail(f"operand {i} %{v.name} is {v.type}; {op.name} {{layout = \"NHWC\"}} takes only its data "
                 f"input (operand 0) as #nhwc")
        elif not nhwc_op:
            fail(f"operand {i} %{v.name} is {v.type}, which {op.name} does not read as laid out (it reads "
                 f"NCHW); transpose it back first (Transpose perm = [0, 3, 1, 2])")
    for r in op.results:
        if layout_of(r) is not None and not (nhwc_op and is_nhwc(r)):
            fail(f"result %{r.name} is {r.type}, but {op.name} computes "
                 f"{'NHWC' if nhwc_op else 'NCHW'}")
