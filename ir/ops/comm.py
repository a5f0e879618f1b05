"""Communication ops of a multi-device program (nnc's own domain; compiler/multi_device.py).

    %x.sent = Send(%x) {device = 0, peer = 1, tag = 3} : bool[0]
    %x = Recv() {device = 1, peer = 0, tag = 3, shape = [8, 64], dtype = f32} : f32[8,64]
    %s = AllReduce(%p) {device = 0, group = [0, 1]} : f32[8,64]          (op = "sum" by default)
    %g = AllGather(%p) {device = 0, axis = 1, group = [0, 1]} : f32[8,128]

- Every comm op names the device it runs on (`device`): a per-device function of a
  MultiDeviceModule holds only ops of its own device, and the printed IR says so op by op.
- Send has no data result; it gives a *token*, `bool[0]` (no bytes), that the device's function
  returns, so DCE (which erases ops whose results are unread) and the verifier keep it. Executors
  drop token results from the model's outputs (compiler/multi_device.py: `is_token`).
- Recv's `shape` is the message's shape, `dtype` its element type; a dim of -1 stands for a
  symbolic dim, taken from the declared result type (printed beside it, so the text round-trips).
- Messages between two devices are matched by (sender, receiver, tag), in order: the n-th Send
  from a to b with tag t pairs with the n-th Recv on b from a with tag t. Collectives of one group
  pair by their order on each device of the group (the verifier checks both).
- AllReduce: elementwise `op` ("sum", "max", "min", "prod") over the group's operands, every
  device gets the result. AllGather: the operands concatenated along `axis` in group order.
- Reference semantics need the other devices, so these ops run only in a multi-device run
  (`compiler.multi_device.run_multi`, which evaluates them with `all_reduce` / `all_gather` below);
  the single-device interpreter refuses them with a clear error.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import NncError
from ..registry import register
from ..types import DType, TensorType, dtype
from ._util import norm_axis

COMM_OPS = ("Send", "Recv", "AllReduce", "AllGather")
REDUCE_OPS = ("sum", "max", "min", "prod")
TOKEN = TensorType(dtype("bool"), (0,))  # what Send gives: no bytes, only "sent"


@dataclass(frozen=True)
class SendAttrs:
    device: int
    peer: int
    tag: int = 0


@dataclass(frozen=True)
class RecvAttrs:
    device: int
    peer: int
    shape: tuple[int, ...]
    dtype: DType
    tag: int = 0


@dataclass(frozen=True)
class AllReduceAttrs:
    device: int
    group: tuple[int, ...]
    op: str = "sum"


@dataclass(frozen=True)
class AllGatherAttrs:
    device: int
    group: tuple[int, ...]
    axis: int = 0


def _check_device(ctx, what_peer=None):
    a = ctx.attrs
    if a.device < 0:
        ctx.fail(f"device {a.device} is negative")
    if what_peer is not None:
        if what_peer < 0:
            ctx.fail(f"peer {what_peer} is negative")
        if what_peer == a.device:
            ctx.fail(f"peer {what_peer} is the op's own device")


def _check_group(ctx):
    a = ctx.attrs
    g = a.group
    if not g:
        ctx.fail("group is empty")
    if len(set(g)) != len(g):
        ctx.fail(f"group {list(g)} names a device twice")
    if any(d < 0 for d in g):
        ctx.fail(f"group {list(g)} has a negative device")
    if a.device not in g:
        ctx.fail(f"device {a.device} is not in its group {list(g)}")


def _send_infer(ctx):
    _check_device(ctx, ctx.attrs.peer)
    ctx.type(0)
    return [TOKEN]


def _recv_infer(ctx):
    a = ctx.attrs
    _check_device(ctx, a.peer)
    if any(d < -1 for d in a.shape):
        ctx.fail(f"shape {list(a.shape)} has a negative extent (-1 alone stands for a symbolic dim)")
    if ctx.declared:
        t = ctx.declared[0]
        if t.dtype != a.dtype or t.shape is None or len(t.shape) != len(a.shape) or any(
                d != -1 and d != td for d, td in zip(a.shape, t.shape)):
            ctx.fail(f"declared {t} does not match shape {list(a.shape)} and dtype {a.dtype.short}")
        return [t]
    if -1 in a.shape:
        ctx.fail("a symbolic (-1) dim needs the declared result type")
    return [TensorType(a.dtype, tuple(a.shape))]


def _all_reduce_infer(ctx):
    _check_device(ctx)
    _check_group(ctx)
    if ctx.attrs.op not in REDUCE_OPS:
        ctx.fail(f"op {ctx.attrs.op!r} is not one of {', '.join(REDUCE_OPS)}")
    return [ctx.type(0)]


def _all_gather_infer(ctx):
    _check_device(ctx)
    _check_group(ctx)
    t = ctx.type(0)
    shape = ctx.shape(0)
    ax = norm_axis(ctx.attrs.axis, len(shape))
    out = list(shape)
    out[ax] = shape[ax] * len(ctx.attrs.group)
    return [TensorType(t.dtype, tuple(out))]


def _single_device_ref(name):
    def ref(a, *operands):
        raise NncError(f"{name} on device {a.device}: communication ops run only in a multi-device run "
                       f"(nnc.multi_device.run_multi), not in the single-device interpreter")
    return ref


def all_reduce(op: str, arrays: list) -> np.ndarray:
    """The exact reference all-reduce: the group's operands combined in group order."""
    fn = {"sum": np.add, "max": np.maximum, "min": np.minimum, "prod": np.multiply}[op]
    out = np.array(arrays[0], copy=True)
    with np.errstate(all="ignore"):
        for x in arrays[1:]:
            out = fn(out, x).astype(out.dtype, copy=False)
    return out


def all_gather(axis: int, arrays: list) -> np.ndarray:
    """The reference all-gather: the group's operands concatenated along `axis` in group order."""
    return np.concatenate([np.asarray(x) for x in arrays], axis=norm_axis(axis, np.ndim(arrays[0])))


register("Send", SendAttrs, infer=_send_infer, ref=_single_device_ref("Send"), foldable=False,
         doc="Point-to-point send to `peer` (matched by tag); gives a bool[0] token the function returns.")
register("Recv", RecvAttrs, infer=_recv_infer, ref=_single_device_ref("Recv"), inputs=0, foldable=False,
         doc="Point-to-point receive from `peer` (matched by tag) of a shape/dtype message.")
register("AllReduce", AllReduceAttrs, infer=_all_reduce_infer, ref=_single_device_ref("AllReduce"),
         foldable=False, doc="Collective elementwise reduction (sum/max/min/prod) over `group`; every member gets it.")
register("AllGather", AllGatherAttrs, infer=_all_gather_infer, ref=_single_device_ref("AllGather"),
         foldable=False, doc="Collective concatenation along `axis` of the group's operands, in group order.")
