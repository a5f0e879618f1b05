"""Compiles a model's CUDA source (all kernels in ONE program) to a cubin, without needing a GPU.

Backends: "nvrtc" (in-process, via cupy_backends' NVRTC binding: works on CPU-only machines) and
"nvcc" (subprocess `nvcc -cubin`). The arch defaults to the GPU present, else sm_90.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..ir.errors import NncError

DEFAULT_ARCH = "sm_90"
CUDA_INCLUDE = os.environ.get("NNC_CUDA_INCLUDE", "/usr/local/cuda/include")


class CompileError(NncError):
    pass


def default_arch() -> str:
    """sm_XY of GPU 0 when one is present (never raises), else sm_90."""
    try:
        from ..runtime import gpu_available
        if gpu_available():
            import cupy
            return f"sm_{cupy.cuda.Device(0).compute_capability}"
    except Exception:
        pass
    return DEFAULT_ARCH


def normalize_arch(arch) -> str:
    if arch is None:
        return default_arch()
    a = str(arch).strip().lower()
    for p in ("compute_", "sm_", "sm"):
        if a.startswith(p):
            a = a[len(p):]
    a = a.replace(".", "")
    if not a[:2].isdigit():
        raise CompileError(f"bad arch {arch!r}: expected e.g. sm_90 or 90")
    return f"sm_{a}"


def _include_dirs() -> list[str]:
    dirs = [CUDA_INCLUDE]
    try:  # the pip NVRTC/cuda headers when the toolkit is not installed
        import nvidia.cuda_nvrtc as _n  # noqa: F401
        for base in getattr(_n, "__path__", []):
            inc = Path(base) / "include"
            if inc.is_dir():
                dirs.append(str(inc))
    except Exception:
        pass
    return [d for d in dirs if Path(d).is_dir()]


def options(arch: str, extra=()) -> list[str]:
    opts = [f"--gpu-architecture={normalize_arch(arch)}", "-std=c++17"]
    opts += [f"-I{d}" for d in _include_dirs()]
    return opts + list(extra)


def compile_nvrtc(source: str, arch: str, name: str = "model.cu", extra=()) -> bytes:
    from cupy_backends.cuda.libs import nvrtc
    prog = nvrtc.createProgram(source, name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, options(arch, extra))
        except Exception as e:
            log = ""
            try:
                log = nvrtc.getProgramLog(prog)
            except Exception:
                pass
            raise CompileError(f"NVRTC failed to compile {name} for {normalize_arch(arch)}: {e}\n{_trim(log)}") from None
        return nvrtc.getCUBIN(prog)
    finally:
        try:
            nvrtc.destroyProgram(prog)
        except Exception:
            pass


def compile_nvcc(source: str, arch: str, name: str = "model.cu", extra=(), nvcc: str | None = None) -> bytes:
    nvcc = nvcc or os.environ.get("NNC_NVCC") or shutil.which("nvcc") or "/usr/local/bin/nvcc"
    with tempfile.TemporaryDirectory(prefix="nnc_nvcc_") as d:
        src = Path(d) / name
        src.write_text(source)
        out = Path(d) / "out.cubin"
        # the cubin holds the kernels only: the host part (C API) is built by CMakeLists.txt
        cmd = [nvcc, "-cubin", f"-arch={normalize_arch(arch)}", "-std=c++17", "-DNNC_KERNELS_ONLY",
               "-o", str(out), str(src), *extra]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise CompileError(f"nvcc failed ({' '.join(cmd)}):\n{_trim(r.stderr + r.stdout)}")
        return out.read_bytes()


def compile_source(source: str, arch=None, backend: str = "nvrtc", name: str = "model.cu") -> bytes:
    arch = normalize_arch(arch)
    if backend == "nvrtc":
        return compile_nvrtc(source, arch, name)
    if backend == "nvcc":
        return compile_nvcc(source, arch, name)
    raise CompileError(f"unknown compile backend {backend!r} (nvrtc, nvcc)")


def _trim(log: str, n: int = 8000) -> str:
    return log if len(log) <= n else log[:n] + f"\n... ({len(log) - n} more characters)"
