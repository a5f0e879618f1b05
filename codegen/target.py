"""Target: the device limits lowering plans for (SM count, shared memory, registers, L2, ...).

    t = resolve_target("sm_90")      # --arch given: the table below (cross-compiling, reproducible)
    t = resolve_target(None)         # no --arch: the GPU present, read off the device; else sm_90
    ctx.target.smem_per_block_optin  # what kernels read, instead of H100 literals

An explicit arch always gives the table's numbers, whatever GPU is present, so `--arch sm_90`
compiles the same everywhere (generated/ is built that way); plan.json's "target" says what was
assumed. Without --arch, a present GPU is described by its own attributes (cupy, imported lazily;
never required): its SM count, L2 and shared-memory limits.

GPU detection lives here (not in the runtime) so the compile side never imports the runtime.
"""
from __future__ import annotations

import warnings

from dataclasses import asdict, dataclass, replace
from typing import Callable, Mapping, Optional

from ..ir.errors import NncError

DEFAULT_ARCH = "sm_90"


class TargetError(NncError):
    """An arch nnc knows nothing about (and no GPU of that arch to read the limits from)."""


@dataclass(frozen=True)
class Target:
    arch: str                       # sm_XY[a]: what NVRTC/nvcc compile for
    name: str                       # the part the numbers describe
    source: str                     # "table" (from --arch) | "device" (read off the GPU present)
    sm_count: int
    smem_per_block: int             # bytes of shared memory a block gets without opting in
    smem_per_block_optin: int       # ... after cudaFuncSetAttribute raises its dynamic limit
    smem_per_sm: int
    regs_per_sm: int
    regs_per_thread: int
    max_threads_per_block: int
    max_threads_per_sm: int
    l2_bytes: int
    warp_size: int = 32
    tensor_cores: str = "mma.sync"  # the tensor-core instructions the kernels may use
    has_wgmma: bool = False         # sm_90a: warpgroup MMA, setmaxnreg

    @property
    def cc(self) -> int:
        """Compute capability as a number: sm_90a -> 90."""
        return int("".join(ch for ch in self.arch[3:] if ch.isdigit()))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping) -> "Target":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


_KB, _MB = 1024, 1024 * 1024
# One representative part per arch (the numbers of its CUDA device attributes).
ARCHS: dict[str, Target] = {t.arch: t for t in (
    Target("sm_80", "A100", "table", sm_count=108, smem_per_block=48 * _KB, smem_per_block_optin=163 * _KB,
           smem_per_sm=164 * _KB, regs_per_sm=65536, regs_per_thread=255, max_threads_per_block=1024,
           max_threads_per_sm=2048, l2_bytes=40 * _MB),
    Target("sm_86", "A40 / RTX A6000", "table", sm_count=84, smem_per_block=48 * _KB,
           smem_per_block_optin=99 * _KB, smem_per_sm=100 * _KB, regs_per_sm=65536, regs_per_thread=255,
           max_threads_per_block=1024, max_threads_per_sm=1536, l2_bytes=6 * _MB),
    Target("sm_89", "L40S", "table", sm_count=142, smem_per_block=48 * _KB, smem_per_block_optin=99 * _KB,
           smem_per_sm=100 * _KB, regs_per_sm=65536, regs_per_thread=255, max_threads_per_block=1024,
           max_threads_per_sm=1536, l2_bytes=96 * _MB),
    # H100 SXM and H200 (the same chip): 227 KB opt-in a block; L2 50 MB (the H200 reports 60 MB)
    Target("sm_90", "H100 / H200", "table", sm_count=132, smem_per_block=48 * _KB,
           smem_per_block_optin=227 * _KB, smem_per_sm=228 * _KB, regs_per_sm=65536, regs_per_thread=255,
           max_threads_per_block=1024, max_threads_per_sm=2048, l2_bytes=50 * _MB),
)}
ARCHS["sm_90a"] = replace(ARCHS["sm_90"], arch="sm_90a", tensor_cores="wgmma", has_wgmma=True)


def normalize_arch(arch) -> str:
    """'sm_90', '90', 'compute_90', 'sm90a' -> 'sm_90' / 'sm_90a'; None: the GPU present, else sm_90."""
    if arch is None:
        return default_arch()
    a = str(arch).strip().lower()
    for p in ("compute_", "sm_", "sm"):
        if a.startswith(p):
            a = a[len(p):]
    a = a.replace(".", "")
    if not a[:2].isdigit() or not a.isalnum():
        raise TargetError(f"bad arch {arch!r}: expected e.g. sm_90 or 90")
    return f"sm_{a}"


def for_arch(arch) -> Target:
    """The table's Target for an arch; TargetError naming the known ones otherwise."""
    a = normalize_arch(arch)
    if a not in ARCHS:
        raise TargetError(f"unknown arch {a}: nnc knows {', '.join(ARCHS)} (compile without --arch on a GPU "
                          f"of that arch to read its limits off the device)")
    return ARCHS[a]


# ---------------------------------------------------------------- the GPU present

# cudaDevAttr* names, as cupy's Device.attributes spells them ("cudaDevAttr" trimmed)
_ATTRS = ("ComputeCapabilityMajor", "ComputeCapabilityMinor", "MultiProcessorCount", "MaxSharedMemoryPerBlock",
          "MaxSharedMemoryPerBlockOptin", "MaxSharedMemoryPerMultiprocessor", "MaxRegistersPerMultiprocessor",
          "MaxThreadsPerBlock", "MaxThreadsPerMultiProcessor", "L2CacheSize", "WarpSize")


# A compile for the GPU present may use that chip's arch-specific instructions: its cubins only ever
# run there (as a TensorRT engine is built for its device). sm_90 -> sm_90a gives Hopper wgmma and
# setmaxnreg; a cubin for sm_90a loads on sm_90 devices only, which is the device it was built on.
_ARCH_SPECIFIC = {"sm_90": "sm_90a"}


def _device_arch(attrs: Mapping[str, int]) -> str:
    arch = f"sm_{int(attrs['ComputeCapabilityMajor'])}{int(attrs['ComputeCapabilityMinor'])}"
    return _ARCH_SPECIFIC.get(arch, arch)


def from_device(attrs: Mapping[str, int], name: str = "") -> Target:
    """A Target from a device's attributes (cupy.cuda.Device(i).attributes, or a fake in tests): the
    device's arch-specific target where one exists (sm_90a for compute capability 9.0)."""
    missing = [k for k in _ATTRS if k not in attrs]
    if missing:
        raise TargetError(f"device attributes lack {missing}")
    arch = _device_arch(attrs)
    base = ARCHS.get(arch)
    return Target(arch, name or (base.name if base else arch), "device",
                  sm_count=int(attrs["MultiProcessorCount"]),
                  smem_per_block=int(attrs["MaxSharedMemoryPerBlock"]),
                  smem_per_block_optin=int(attrs["MaxSharedMemoryPerBlockOptin"]),
                  smem_per_sm=int(attrs["MaxSharedMemoryPerMultiprocessor"]),
                  regs_per_sm=int(attrs["MaxRegistersPerMultiprocessor"]),
                  regs_per_thread=base.regs_per_thread if base else 255,  # no device attribute: 255 since sm_30
                  max_threads_per_block=int(attrs["MaxThreadsPerBlock"]),
                  max_threads_per_sm=int(attrs["MaxThreadsPerMultiProcessor"]),
                  l2_bytes=int(attrs["L2CacheSize"]), warp_size=int(attrs["WarpSize"]),
                  tensor_cores=base.tensor_cores if base else "mma.sync",
                  has_wgmma=base.has_wgmma if base else False)


def gpu_present() -> bool:
    """True when cupy imports and sees at least one CUDA device. Never raises."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def device_attributes(attributes: Mapping[str, int], props: Mapping) -> dict:
    """cupy's Device.attributes plus the compute capability, which cupy leaves out of that dict
    (it is Device.compute_capability / the properties' major and minor): without it the device's
    arch could not be read, and a compile for an H200 silently became a table sm_90 build (no wgmma)."""
    attrs = dict(attributes)
    for key, prop in (("ComputeCapabilityMajor", "major"), ("ComputeCapabilityMinor", "minor")):
        if key not in attrs and prop in props:
            attrs[key] = int(props[prop])
    return attrs


def _cupy_device() -> Optional[tuple[Mapping[str, int], str]]:
    """(attributes, name) of GPU 0, or None without one. Never raises."""
    if not gpu_present():
        return None
    try:
        import cupy
        dev = cupy.cuda.Device(0)
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props.get("name", b"")
        return device_attributes(dev.attributes, props), name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return None


def default_arch(device: Callable[[], Optional[tuple]] = _cupy_device) -> str:
    """GPU 0's arch (arch-specific where one exists: sm_90a) when one is present (never raises),
    else sm_90."""
    d = device()
    if d is None:
        return DEFAULT_ARCH
    attrs = d[0]
    try:
        return _device_arch(attrs)
    except (KeyError, TypeError, ValueError):
        return DEFAULT_ARCH


def resolve_target(arch=None, device: Callable[[], Optional[tuple]] = _cupy_device) -> Target:
    """--arch given: the table's Target. None: the GPU present (its own attributes), else sm_90.
    device: () -> (attributes, name) or None (tests pass a fake)."""
    if arch is not None:
        return for_arch(arch)
    d = device()
    if d is None:
        return ARCHS[DEFAULT_ARCH]
    try:
        return from_device(*d)
    except (TargetError, TypeError, ValueError) as e:  # odd attributes: fall back to the arch's table entry
        fallback = for_arch(default_arch(lambda: d))
        warnings.warn(f"could not read the GPU's limits ({e}); compiling for the table's {fallback.arch} "
                      f"instead (pass --arch to choose)", stacklevel=2)
        return fallback
