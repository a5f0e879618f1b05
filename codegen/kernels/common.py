"""Shared plumbing for the kernel families: Jinja environment, dtype tables, KernelSpec."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..dtypes import KERNEL_FAMILY_TYPES
from ..target import ARCHS, DEFAULT_ARCH

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "templates"

# There is ONE jinja2 environment: codegen/render.py's (trim_blocks + lstrip_blocks). The gemm*/conv*
# templates are written for it (own-line {% %} tags vanish; a `+%}` keeps the newline after an inline tag).

# numpy dtype name -> (C type, bytes, 2-vector C type): the GEMM/conv dtypes of codegen/dtypes.py
CTYPES = KERNEL_FAMILY_TYPES
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "sigmoid", "tanh", "silu", "leaky_relu", "clip")
# the Target when a caller names none (tests, tools/bench_gemm_conv.py): the sm_90 table entry
DEFAULT_TARGET = ARCHS[DEFAULT_ARCH]
MAX_SMEM = DEFAULT_TARGET.smem_per_block_optin  # old name; kernels read target.smem_per_block_optin


@dataclass
class KernelSpec:
    """A rendered kernel ready for NVRTC + launch.

    args: launch arguments in order, each (name, ctype, value). Pointer args have value None and a
    buffer role as name ('A', 'B', 'D', 'C', 'bias', 'X', 'W', 'Y'); scalar args carry their value.
    smem: dynamic shared memory bytes; > 48 KiB needs cudaFuncAttributeMaxDynamicSharedMemorySize
    (cupy: `kernel.max_dynamic_shared_size_bytes = smem`).
    """
    source: str
    name: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    smem: int
    args: list[tuple[str, str, Any]]
    params: dict = field(default_factory=dict)

    @property
    def arg_order(self) -> list[str]:
        return [a[0] for a in self.args]

    def scalar_args(self) -> dict:
        return {n: v for n, t, v in self.args if not t.endswith("*")}


def render(template: str, **ctx) -> str:
    from ..render import render as _render_project
    return _render_project(template, **ctx)


def kernel_name(prefix: str, ctx: dict) -> str:
    h = hashlib.sha1(json.dumps(ctx, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{prefix}_{h}"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def act_ctx(act: str | None, act_params: dict | None = None) -> dict:
    act = act or "none"
    if act not in ACTIVATIONS:
        raise ValueError(f"unsupported epilogue activation {act!r}")
    p = dict(act_params or {})
    return {"act": act, "act_alpha": float(p.get("alpha", 0.01)), "act_lo": float(p.get("lo", 0.0)),
            "act_hi": float(p.get("hi", 6.0))}


# ---------------------------------------------------------------- compile / launch helpers (tests, bench)
def nvrtc_compile(source: str, arch: str = "sm_90", extra: list[str] | None = None) -> bytes:
    """One kernel source to a cubin through the compile service (codegen/cuda.py: one NVRTC path,
    works on CPU-only machines). Raises CompileError with the log."""
    from ..cuda import compile_nvrtc
    return compile_nvrtc(str(source), arch, "nnc_kernel.cu", list(extra or []))


_MODULES: list = []


def load_cubin(cubin: bytes, spec: KernelSpec):
    """-> cupy kernel function with the dynamic-smem limit raised as needed (GPU only)."""
    import cupy
    mod = cupy.cuda.function.Module()
    mod.load(cubin)
    fn = mod.get_function(spec.name)
    _MODULES.append(mod)  # keep the module alive with its function
    if spec.smem > DEFAULT_TARGET.smem_per_block:  # beyond the default: opt in
        from cupy_backends.cuda.api import driver
        driver.funcSetAttribute(fn.ptr, 8, spec.smem)  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    return fn


_SCRATCH: dict = {}


def _scratch(spec: KernelSpec, name: str, count: int):
    """A zeroed 4-byte-element device buffer for scratch arg `name` of spec, made once per kernel
    and kept (a split-K GEMM's counters must start at zero; its kernel leaves them zeroed)."""
    import cupy
    key = (spec.name, name, count)
    if key not in _SCRATCH:
        _SCRATCH[key] = cupy.zeros(max(count, 1), cupy.int32)
    return _SCRATCH[key]


def launch(fn, spec: KernelSpec, buffers: dict, stream=None):
    """Launch with pointer args bound by name from `buffers` (cupy arrays) and scalar args from spec."""
    import numpy as np
    conv = {"int": np.int32, "long long": np.int64, "float": np.float32}
    args = []
    for name, ctype, value in spec.args:
        if ctype.endswith("*"):
            if name not in buffers and isinstance(value, int):  # kernel-owned scratch (split-K GEMM)
                buffers = {**buffers, name: _scratch(spec, name, value)}
            args.append(buffers[name])
        elif ctype == "nnc_tmap":  # a TMA kernel's tensor map (codegen/tma.py) of the pointer arg it names
            from .. import tma
            s = tma.spec_of(value)
            args.append(tma.encode(s, buffers[spec.args[s.arg][0]].data.ptr))
        else:
            args.append(conv[ctype](buffers.get(name, value)))
    fn(spec.grid, spec.block, tuple(args), shared_mem=spec.smem, stream=stream)
