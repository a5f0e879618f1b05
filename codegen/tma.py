"""Tensor maps (CUtensorMap) for the TMA loads of the Hopper GEMM (templates/gemm_wgmma.cu.j2, LOAD = tma).

A tensor map describes a tiled view of a global tensor for cp.async.bulk.tensor: the base address,
the dims (innermost first), the byte strides of the outer dims, the box (the tile one copy moves)
and the shared-memory swizzle. It holds the global address, so it cannot be built at compile time:

- At compile time the kernel's launch carries, per tensor map, a Scalar of type TMAP_CTYPE whose
  value is a `TensorMapSpec` as a dict (`spec_dict`): everything but the address, plus the index of
  the launch's pointer argument whose address it maps ("arg"). The pointer argument stays in the
  launch, so memory planning sees the operand as read, as for any kernel.
- At load / launch time the runtime (compiler/runtime.py, codegen/tuning_runners.py) encodes it with
  the driver's cuTensorMapEncodeTiled (`encode`: ctypes on libcuda.so.1, loaded lazily; cupy does
  not wrap it) from that argument's device address, and passes the 128 bytes by value: a size-one
  numpy array (`as_kernel_arg`), which cupy's launch passes by value through its data pointer.
  The kernel declares it `const __grid_constant__ nnc_tmap` (a 64-byte-aligned 128-byte struct).
  A CUDA graph captures the parameter bytes, so a captured run keeps the maps of its buffers.
- The C API (templates/host.cu.j2) encodes the same spec on every launch with the same driver call,
  found through the runtime's cudaGetDriverEntryPoint(ByVersion): the library links no libcuda.

`check(spec)` states cuTensorMapEncodeTiled's rules (CUDA driver API, "Tensor Map Object
Management"), so `applies` refuses a problem the driver would refuse and the rules are testable on
a CPU: rank 1..5; dims in 1..2^32; outer strides multiples of 16 bytes, below 2^40; box dims in
1..256, the inner one a multiple of 16 bytes and, with a swizzle, at most the swizzle span; the
global address 16-byte aligned (checked when encoding).

Im2col maps (mode "im2col", cuTensorMapEncodeIm2col; a conv's implicit im2col A on the TMA path,
codegen/kernels/conv_wgmma.py): an NHWC tensor (dims {C, W, H, N}, innermost first), a copy of which
moves `box[1]` pixels (pixelsPerColumn) of `box[0]` channels (channelsPerPixel) each. The pixels are
the filter base positions of consecutive output pixels: the instruction's {w, h} coordinates name
the first one's, which then steps by the traversal stride (`elem_strides`: the conv stride) inside the
bounding box (`lower` .. dim - 1 + `upper` per spatial dim, W first), wrapping to the next row and
image as the output pixels do; the instruction's im2col offsets {s, r} (the filter tap) shift every
pixel read, and pixels outside the tensor read as zero (the conv padding). The same data as a tiled
map otherwise (an im2col map is a spec with more fields, not another code path): check() states
cuTensorMapEncodeIm2col's further rules (rank 3..5; corners in [-2^15, 2^15) / [-128, 128) /
[-16, 16) at rank 3 / 4 / 5; channels <= 256 and within the swizzle span; pixels <= 1024; traversal
strides in 1..8).
"""
from __future__ import annotations

import ctypes
import json
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

TMAP_CTYPE = "nnc_tmap"  # the kernels' parameter type (a 128-byte, 64-aligned struct) and the Scalar's type
TMAP_BYTES = 128
TMAP_ALIGN = 64
GLOBAL_ALIGN = 16  # bytes, the global address (no interleave)

# CUtensorMapDataType / CUtensorMapSwizzle / CUtensorMapL2promotion (cuda.h enums)
# uint8: the fp8 GEMM's e4m3 / e5m2 operands (codegen/kernels/gemm_fp8_wgmma.py): TMA only moves bytes
DATA_TYPE = {"float16": 6, "bfloat16": 9, "uint8": 0}
ELEM_BYTES = {"float16": 2, "bfloat16": 2, "uint8": 1}
SWIZZLE = {0: 0, 32: 1, 64: 2, 128: 3}  # span in bytes -> enum
L2_PROMOTION_128B = 2
INTERLEAVE_NONE = 0
OOB_FILL_ZEROS = 0  # out-of-bounds elements read as zero (ragged M / N / K edges)


MODES = ("tile", "im2col")
IM2COL_CORNER = {3: 1 << 15, 4: 1 << 7, 5: 1 << 4}  # rank -> corners lie in [-x, x)


@dataclass(frozen=True)
class TensorMapSpec:
    """cuTensorMapEncodeTiled's (mode "tile") or cuTensorMapEncodeIm2col's (mode "im2col") arguments
    but the address. dims: innermost first; strides: bytes of dims 1.. (rank - 1 values); box:
    elements per dim of one copy (im2col: (channels per pixel, pixels per column)); swizzle: span in
    bytes (0: none); arg: the launch argument (index) whose address is the tensor's base;
    elem_strides: per dim (empty: all 1; im2col: the traversal strides); lower / upper: im2col's
    bounding-box corners per spatial dim, innermost (W) first."""
    dtype: str
    dims: tuple
    strides: tuple
    box: tuple
    swizzle: int = 128
    arg: int = 0
    mode: str = "tile"
    elem_strides: tuple = ()
    lower: tuple = ()
    upper: tuple = ()

    @property
    def rank(self) -> int:
        return len(self.dims)

    @property
    def box_bytes(self) -> int:
        return int(np.prod(self.box)) * ELEM_BYTES[self.dtype]

    @property
    def traversal(self) -> tuple:
        """elementStrides as the driver takes them (rank values)."""
        return tuple(self.elem_strides) or (1,) * self.rank


# the fields an im2col map adds: left out of a tiled map's dict (plan.json stays as it was)
_IM2COL_FIELDS = {"mode": "tile", "elem_strides": (), "lower": (), "upper": ()}


def spec_dict(s: TensorMapSpec) -> dict:
    d = asdict(s)
    d = {k: v for k, v in d.items() if k not in _IM2COL_FIELDS or v != _IM2COL_FIELDS[k]}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def spec_of(d: dict) -> TensorMapSpec:
    """A spec from its plan.json dict (checked)."""
    try:
        ints = lambda key: tuple(int(x) for x in d.get(key, ()))  # noqa: E731
        s = TensorMapSpec(str(d["dtype"]), tuple(int(x) for x in d["dims"]), tuple(int(x) for x in d["strides"]),
                          tuple(int(x) for x in d["box"]), int(d.get("swizzle", 128)), int(d["arg"]),
                          str(d.get("mode", "tile")), ints("elem_strides"), ints("lower"), ints("upper"))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed tensor map spec {d!r} ({type(e).__name__}: {e})") from None
    why = check(s)
    if why:
        raise ValueError(f"tensor map spec {d!r}: {why}")
    return s


def check(s: TensorMapSpec) -> str:
    """'' when the driver's encode takes s (the address aside), else why not."""
    if s.dtype not in DATA_TYPE:
        return f"element type {s.dtype} has no tensor map type here"
    if s.mode not in MODES:
        return f"tensor map mode {s.mode!r} is not one of {MODES}"
    eb = ELEM_BYTES[s.dtype]
    im2col = s.mode == "im2col"
    nbox = 2 if im2col else s.rank
    if not 1 <= s.rank <= 5 or len(s.box) != nbox or len(s.strides) != s.rank - 1:
        return f"rank {s.rank} with {len(s.strides)} strides and {len(s.box)} box dims"
    if any(not 1 <= d <= 2 ** 32 for d in s.dims):
        return f"dims {s.dims} must be in 1..2^32"
    if any(st % 16 or not 0 < st < 2 ** 40 for st in s.strides):
        return f"strides {s.strides} (bytes) must be positive multiples of 16 below 2^40"
    if s.elem_strides and (len(s.elem_strides) != s.rank or any(not 1 <= e <= 8 for e in s.elem_strides)):
        return f"element strides {s.elem_strides} must be {s.rank} values in 1..8"
    if im2col:
        why = _check_im2col(s)
        if why:
            return why
    elif any(not 1 <= b <= 256 for b in s.box):
        return f"box {s.box} dims must be in 1..256"
    elif s.lower or s.upper:
        return "a tiled map has no bounding-box corners"
    if (s.box[0] * eb) % 16:
        return f"the inner box dim ({s.box[0] * eb} bytes) must be a multiple of 16 bytes"
    if s.swizzle not in SWIZZLE:
        return f"swizzle {s.swizzle} is not 0, 32, 64 or 128 bytes"
    if s.swizzle and s.box[0] * eb > s.swizzle:
        return f"the inner box dim ({s.box[0] * eb} bytes) exceeds the swizzle span ({s.swizzle})"
    if s.arg < 0:
        return "no pointer argument"
    return ""


def _check_im2col(s: TensorMapSpec) -> str:
    """cuTensorMapEncodeIm2col's rules beyond the tiled ones (CUDA driver API)."""
    if not 3 <= s.rank <= 5:
        return f"an im2col map has rank 3..5, not {s.rank}"
    lim = IM2COL_CORNER[s.rank]
    if len(s.lower) != s.rank - 2 or len(s.upper) != s.rank - 2:
        return f"an im2col map of rank {s.rank} has {s.rank - 2} lower and upper corner values"
    if any(not -lim <= v < lim for v in s.lower + s.upper):
        return f"bounding-box corners {s.lower}, {s.upper} must lie in [-{lim}, {lim}) at rank {s.rank}"
    for i, (lo, hi) in enumerate(zip(s.lower, s.upper)):
        if s.dims[1 + i] - 1 + hi < lo:
            return f"the bounding box is empty along spatial dim {i} ({lo} .. {s.dims[1 + i] - 1 + hi})"
    if not 1 <= s.box[0] <= 256:
        return f"channels per pixel {s.box[0]} must be in 1..256"
    if not 1 <= s.box[1] <= 1024:
        return f"pixels per column {s.box[1]} must be in 1..1024"
    return ""


def matrix_spec(dtype: str, inner: int, outer: int, ld: int, box_inner: int, box_outer: int,
                batch: tuple = (), arg: int = 0, swizzle: int = 128) -> TensorMapSpec:
    """A row-major [*batch][outer][inner] operand (leading dim ld elements; batch: (count, stride in
    elements) outermost last, count 1 for a level the operand does not vary over) as tiles of
    box_outer rows x box_inner elements."""
    eb = ELEM_BYTES[dtype]
    dims = [int(inner), int(outer)] + [int(n) for n, _ in batch]
    strides = [int(ld) * eb] + [int(st) * eb for _, st in batch]
    box = [int(box_inner), int(box_outer)] + [1 for _ in batch]
    return TensorMapSpec(dtype, tuple(dims), tuple(strides), tuple(box), swizzle, arg)


def nhwc_im2col_spec(dtype: str, n: int, h: int, w: int, c: int, channels: int, pixels: int, stride: tuple,
                     lower: tuple, upper: tuple, arg: int = 0, swizzle: int = 128) -> TensorMapSpec:
    """An im2col map of a dense NHWC tensor [n, h, w, c]: copies of `pixels` filter base positions x
    `channels` channels; stride (sh, sw): the traversal; lower / upper: (h, w) bounding-box corners
    (stored W first, as the driver takes them)."""
    eb = ELEM_BYTES[dtype]
    return TensorMapSpec(dtype, (int(c), int(w), int(h), int(n)), (c * eb, w * c * eb, h * w * c * eb),
                         (int(channels), int(pixels)), swizzle, arg, "im2col",
                         (1, int(stride[1]), int(stride[0]), 1), (int(lower[1]), int(lower[0])),
                         (int(upper[1]), int(upper[0])))


# ---------------------------------------------------------------- encoding (GPU machines)

_LIB = None


def _driver():
    """libcuda.so.1, loaded on first use (the CPU machine has none)."""
    global _LIB
    if _LIB is None:
        lib = ctypes.CDLL("libcuda.so.1")
        f = lib.cuTensorMapEncodeTiled
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                      ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64),
                      ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
                      ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        g = lib.cuTensorMapEncodeIm2col
        g.restype = ctypes.c_int
        g.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                      ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64),
                      ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int), ctypes.c_uint32, ctypes.c_uint32,
                      ctypes.POINTER(ctypes.c_uint32), ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        _LIB = lib
    return _LIB


def _aligned_slot() -> np.ndarray:
    """A size-one array of TMAP_BYTES raw bytes at a TMAP_ALIGN-aligned host address."""
    raw = np.zeros(TMAP_BYTES + TMAP_ALIGN, np.uint8)
    off = (-raw.ctypes.data) % TMAP_ALIGN
    return raw[off:off + TMAP_BYTES].view(np.dtype((np.void, TMAP_BYTES)))


def encode(s: TensorMapSpec, address: int) -> np.ndarray:
    """The CUtensorMap of s at device address `address` (cuTensorMapEncodeTiled, or
    cuTensorMapEncodeIm2col for an im2col spec): a size-one numpy array of 128 raw bytes (64-aligned),
    ready to pass by value as a kernel argument."""
    why = check(s)
    if why:
        raise ValueError(f"tensor map: {why}")
    if address % GLOBAL_ALIGN:
        raise ValueError(f"tensor map: global address {address:#x} is not {GLOBAL_ALIGN}-byte aligned")
    out = _aligned_slot()
    r = s.rank
    dims = (ctypes.c_uint64 * r)(*s.dims)
    strides = (ctypes.c_uint64 * max(r - 1, 1))(*(s.strides or (0,)))
    estr = (ctypes.c_uint32 * r)(*s.traversal)
    if s.mode == "im2col":
        what = "cuTensorMapEncodeIm2col"
        lower = (ctypes.c_int * len(s.lower))(*s.lower)
        upper = (ctypes.c_int * len(s.upper))(*s.upper)
        err = _driver().cuTensorMapEncodeIm2col(
            ctypes.c_void_p(out.ctypes.data), DATA_TYPE[s.dtype], r, ctypes.c_void_p(int(address)), dims, strides,
            lower, upper, s.box[0], s.box[1], estr, INTERLEAVE_NONE, SWIZZLE[s.swizzle], L2_PROMOTION_128B,
            OOB_FILL_ZEROS)
    else:
        what = "cuTensorMapEncodeTiled"
        box = (ctypes.c_uint32 * r)(*s.box)
        err = _driver().cuTensorMapEncodeTiled(
            ctypes.c_void_p(out.ctypes.data), DATA_TYPE[s.dtype], r, ctypes.c_void_p(int(address)), dims, strides,
            box, estr, INTERLEAVE_NONE, SWIZZLE[s.swizzle], L2_PROMOTION_128B, OOB_FILL_ZEROS)
    if err != 0:
        raise RuntimeError(f"{what} failed (CUresult {err}) for {spec_dict(s)} at {address:#x}")
    return out


class TensorMapCache:
    """Encoded maps by (spec, address): a run re-launches with the same buffers, so each map is
    encoded once per address (an eager run on new input arrays encodes new ones)."""

    def __init__(self, limit: int = 4096):
        self._maps: dict = {}
        self.limit = limit

    def get(self, spec_json: str, spec: TensorMapSpec, address: int) -> np.ndarray:
        key = (spec_json, int(address))
        m = self._maps.get(key)
        if m is None:
            if len(self._maps) >= self.limit:
                self._maps.clear()
            m = self._maps[key] = encode(spec, address)
        return m


def spec_key(d: dict) -> str:
    return json.dumps(d, sort_keys=True)


def launch_values(args, vals: list, cache: TensorMapCache, pointer) -> list:
    """vals with each ("tmap", spec, key) entry of args replaced by its encoded map: args are the
    launch's (kind, ...) tuples, vals the values already made for the other kinds; pointer(v) ->
    int address of a pointer value."""
    out = list(vals)
    for i, a in enumerate(args):
        if a[0] == "tmap":
            spec, key = a[1], a[2]
            out[i] = cache.get(key, spec, pointer(vals[spec.arg]))
    return out


def is_tmap(ctype: Optional[str]) -> bool:
    return ctype == TMAP_CTYPE


def kernel_spec_args(spec, buffers: dict, cache: Optional[TensorMapCache] = None) -> tuple:
    """The launch values of a rendered KernelSpec (codegen/kernels/common.py) with pointer args bound
    by name from `buffers` (device arrays with .data.ptr) and each tensor-map arg encoded from the
    address of the pointer arg it names: what common.launch does, for TMA kernels (tools, tests)."""
    conv = {"int": np.int32, "long long": np.int64, "float": np.float32}
    vals = []
    for name, ctype, value in spec.args:
        if ctype.endswith("*"):
            vals.append(buffers[name])
        elif is_tmap(ctype):
            s = spec_of(value)
            addr = buffers[spec.args[s.arg][0]].data.ptr
            vals.append(cache.get(spec_key(value), s, addr) if cache is not None else encode(s, addr))
        else:
            vals.append(conv[ctype](buffers.get(name, value)))
    return tuple(vals)
