"""The one CUDA compile service: compiles units of CUDA source to cubins, in parallel, cached.

    cubins = compile_many(units, arch, jobs=None, cache=CubinCache.default(), progress=None)

A `Unit` is one self-contained program: the prelude pieces its kernels need plus one kernel or a
small group of kernels (codegen/units.py cuts a model's kernels into units). Every caller that
compiles kernels goes through here: `nnc compile`, and kernel candidates later.

Backends: "nvrtc" (NVRTC via cupy_backends' binding: works on CPU-only machines) and "nvcc"
(`nvcc -cubin` subprocesses). NVRTC takes a process-wide lock, so parallel NVRTC compiles run in
worker processes (codegen/nvrtc_worker.py, started by path: they import neither nnc nor the
user's __main__); nvcc is a subprocess already, so threads drive it. A single unit to compile, or
jobs=1, compiles in this process.

Cache: `<cache dir>/cubin/<sha256>.cubin`, one file per unit, keyed by the unit's source, the
backend, the compiler's version (NVRTC's getVersion() and its package version; nvcc --version),
the options (include directories too) and the arch. The directory is $NNC_CACHE_DIR, else
$XDG_CACHE_HOME/nnc, else ~/.cache/nnc. Entries are written atomically (temporary file +
os.replace) and never trusted blindly: an entry that is empty, not an ELF file or lacks one of the
unit's kernel names is compiled again and replaced. The cache only saves time: a directory that
cannot be written is skipped silently.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import queue
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..ir.errors import NncError
from . import nvrtc_worker
from .options import env_cache_dir, env_cuda_include, env_nvcc
from .target import normalize_arch  # arch spelling (GPU detection lives in target.py too)

CUDA_INCLUDE = env_cuda_include()
BACKENDS = ("nvrtc", "nvcc")
CACHE_FORMAT = 1  # bump when the meaning of a cache entry changes
ELF_MAGIC = b"\x7fELF"


class CompileError(NncError):
    pass


@dataclass(frozen=True)
class Unit:
    """One program to compile. name: how messages call it ("unit 3 of 20 (nnc_ew_add_1, ...)").
    kernels: the extern "C" kernel names it defines (a cache entry must contain them all).
    fallback: a second source tried when `source` fails (codegen/units.py: the same kernels
    with the whole prelude, in case a trimmed prelude misses a piece); its error is the one
    reported."""
    name: str
    source: str
    kernels: tuple[str, ...] = ()
    fallback: Optional[str] = None


# ---------------------------------------------------------------------------- arch and options


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


def nvrtc_options(arch: str, extra=()) -> list[str]:
    """NVRTC options for `arch` (the include directories are part of a cache key too)."""
    opts = [f"--gpu-architecture={normalize_arch(arch)}", "-std=c++17"]
    opts += [f"-I{d}" for d in _include_dirs()]
    return opts + list(extra)


def nvcc_path() -> str:
    return env_nvcc() or shutil.which("nvcc") or "/usr/local/bin/nvcc"


def nvcc_command(arch: str, src: str, out: str, extra=()) -> list[str]:
    # the cubin holds the kernels only: the host part (C API) is built by CMakeLists.txt
    return [nvcc_path(), "-cubin", f"-arch={normalize_arch(arch)}", "-std=c++17", "-DNNC_KERNELS_ONLY",
            "-o", out, src, *extra]


def _nvrtc_identity(use_worker: bool = False) -> str:
    """nvrtc_worker.nvrtc_identity(), here or (use_worker) in a worker process, which is about
    to load NVRTC anyway to compile: this process then never loads it."""
    try:
        if use_worker:
            return _POOL.identity()
        return nvrtc_worker.nvrtc_identity()
    except CompileError:
        raise
    except Exception as e:
        raise CompileError(f"NVRTC is not available: {type(e).__name__}: {e}") from None


def _nvrtc_context() -> dict:
    """What decides which NVRTC library cupy_backends loads (a memo of its identity is valid
    while this stays the same and the library file is unchanged)."""
    try:
        from importlib.metadata import version
        pkg = version("nvidia-cuda-nvrtc")
    except Exception:
        pkg = None
    return {"prefix": sys.prefix, "nvidia-cuda-nvrtc": pkg,
            "env": {k: os.environ.get(k) for k in ("CUDA_HOME", "CUDA_PATH", "LD_LIBRARY_PATH")}}


def _memo_valid(ident: str) -> bool:
    parts = ident.split(" ")
    if len(parts) < 5:
        return False
    try:
        st = os.stat(" ".join(parts[2:-2]))
    except OSError:
        return False
    return [str(st.st_size), str(st.st_mtime_ns)] == parts[-2:]


def compiler_id(backend: str, memo_dir: Optional[str] = None, use_worker: bool = False) -> str:
    """The compiler's identity for cache keys: a new NVRTC or nvcc never reuses old cubins.
    NVRTC: getVersion() plus its library file (path, size, mtime) and the pip package's version.
    Loading NVRTC costs half a second, more than a warm compile's cache lookups, so with a
    memo_dir (the cache directory) the identity is memoized there, keyed by what decides which
    library is loaded, and trusted only while that library file is unchanged. use_worker: find
    it in a worker process (a parallel compile follows)."""
    key = (backend, memo_dir)
    if key not in _IDS:
        _IDS[key] = _compiler_id(backend, memo_dir, use_worker)
    return _IDS[key]


_IDS: dict = {}  # per process: (backend, memo dir) -> identity


def _compiler_id(backend: str, memo_dir: Optional[str], use_worker: bool) -> str:
    if backend == "nvrtc":
        ctx = _nvrtc_context()
        memo = Path(memo_dir) / "nvrtc-identity.json" if memo_dir else None
        if memo is not None:
            try:
                m = json.loads(memo.read_text())
                if m.get("context") == ctx and isinstance(m.get("identity"), str) and _memo_valid(m["identity"]):
                    return m["identity"] + f" nvidia-cuda-nvrtc {ctx['nvidia-cuda-nvrtc']}"
            except (OSError, ValueError, AttributeError):
                pass
        ident = _nvrtc_identity(use_worker)
        if memo is not None:
            _atomic_write(memo, json.dumps({"context": ctx, "identity": ident}).encode())
        return ident + f" nvidia-cuda-nvrtc {ctx['nvidia-cuda-nvrtc']}"
    if backend == "nvcc":
        try:
            r = subprocess.run([nvcc_path(), "--version"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            raise CompileError(f"nvcc is not available ({nvcc_path()}): {e}") from None
        return "nvcc " + r.stdout.strip()
    raise CompileError(f"unknown compile backend {backend!r} ({', '.join(BACKENDS)})")


def _atomic_write(p: Path, data: bytes) -> None:
    """Writes p through a temporary file renamed into place; a failure leaves p as it was."""
    tmp = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
        tmp = None
    except OSError:
        pass  # a read-only or full cache directory: compiling still works
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# ---------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """$NNC_CACHE_DIR, else $XDG_CACHE_HOME/nnc, else ~/.cache/nnc (codegen/options.py reads them)."""
    return env_cache_dir()


def cache_key(source: str, backend: str, arch: str, opts: Sequence[str], memo_dir=None,
              use_worker: bool = False) -> str:
    text = json.dumps({"format": CACHE_FORMAT, "backend": backend,
                       "compiler": compiler_id(backend, None if memo_dir is None else str(memo_dir), use_worker),
                       "arch": normalize_arch(arch), "options": list(opts), "source": source},
                      sort_keys=True)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def valid_cubin(data: Optional[bytes], kernels: Sequence[str] = ()) -> bool:
    """A non-empty ELF file that names every kernel (its string table holds "\\0name\\0")."""
    if not data or not data.startswith(ELF_MAGIC):
        return False
    return all(b"\0" + k.encode() + b"\0" in data for k in kernels)


class CubinCache:
    """Cubins by cache key in `dir`/cubin/. hits/misses/rejected count this object's lookups."""

    def __init__(self, dir):
        self.dir = Path(dir)
        self.hits = self.misses = self.rejected = 0

    @classmethod
    def default(cls) -> "CubinCache":
        return cls(default_cache_dir())

    def path(self, key: str) -> Path:
        return self.dir / "cubin" / f"{key}.cubin"

    def get(self, key: str, kernels: Sequence[str] = ()) -> Optional[bytes]:
        p = self.path(key)
        try:
            data = p.read_bytes()
        except OSError:
            self.misses += 1
            return None
        if not valid_cubin(data, kernels):
            self.rejected += 1  # truncated, overwritten or foreign: compiled again, then replaced
            return None
        self.hits += 1
        return data

    def put(self, key: str, data: bytes) -> None:
        _atomic_write(self.path(key), data)


# ---------------------------------------------------------------------------- workers


class _Worker:
    """One nvrtc_worker.py process."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(nvrtc_worker.__file__)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)

    def compile(self, source: str, name: str, opts: list, identity: bool = False) -> tuple[bool, bytes]:
        header = json.dumps({"identity": True} if identity else {"name": name, "options": opts}).encode()
        src = source.encode("utf-8", "surrogatepass")
        self.proc.stdin.write(struct.pack("<I", len(header)) + header + struct.pack("<I", len(src)) + src)
        self.proc.stdin.flush()
        head = self.proc.stdout.read(9)
        if len(head) < 9:
            raise EOFError
        status, n = struct.unpack("<BQ", head)
        payload = self.proc.stdout.read(n)
        if len(payload) < n:
            raise EOFError
        return status == 0, payload

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except Exception:
            self.proc.kill()


class _WorkerDied(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


class _WorkerPool:
    """NVRTC worker processes kept for the life of this process (a second compile starts none)."""

    def __init__(self):
        self._idle: "queue.SimpleQueue[_Worker]" = queue.SimpleQueue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()

    def identity(self) -> str:
        ok, payload = self.compile("", "identity", [], identity=True)
        if not ok:
            raise CompileError(payload.decode("utf-8", "replace"))
        return payload.decode()

    def compile(self, source: str, name: str, opts: list, identity: bool = False) -> tuple[bool, bytes]:
        w = None
        while w is None:
            try:
                w = self._idle.get_nowait()
            except queue.Empty:
                break
            if w.proc.poll() is not None:  # died while idle (killed, out of memory): never reused
                self._drop(w)
                w = None
        if w is None:
            try:
                w = _Worker()
            except OSError as e:
                raise CompileError(f"cannot start an NVRTC worker process ({sys.executable}): {e}") from None
            with self._lock:
                self._all.append(w)
        try:
            result = w.compile(source, name, opts, identity)
        except (EOFError, OSError):
            try:
                code = w.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            self._drop(w)
            raise _WorkerDied(code) from None
        self._idle.put(w)
        return result

    def _drop(self, w: _Worker):
        with self._lock:
            if w in self._all:
                self._all.remove(w)
        w.close()

    def close(self):
        with self._lock:
            workers, self._all = self._all, []
        for w in workers:
            w.close()


_POOL = _WorkerPool()
atexit.register(_POOL.close)


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------- compiling


def _compile_text(source: str, name: str, arch: str, backend: str, opts: list, in_process: bool) -> tuple[bool, bytes]:
    if backend == "nvrtc":
        if in_process:
            return nvrtc_worker.compile_source(source, name, opts)
        return _POOL.compile(source, name, opts)
    with tempfile.TemporaryDirectory(prefix="nnc_nvcc_") as d:
        src, out = Path(d) / name, Path(d) / "out.cubin"
        src.write_text(source, encoding="utf-8", errors="surrogatepass")
        cmd = nvcc_command(arch, str(src), str(out), opts)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        except OSError as e:
            return False, f"cannot run nvcc ({cmd[0]}): {e}".encode()
        if r.returncode != 0:
            return False, (r.stderr + r.stdout).encode()
        return True, out.read_bytes()


def _compile_unit(unit: Unit, index: int, arch: str, backend: str, opts: list, in_process: bool) -> bytes:
    fname = f"unit{index}.cu"
    try:
        ok, payload = _compile_text(unit.source, fname, arch, backend, opts, in_process)
        if not ok and unit.fallback is not None:
            ok, payload = _compile_text(unit.fallback, fname, arch, backend, opts, in_process)
    except _WorkerDied as e:
        raise CompileError(f"the NVRTC worker process died compiling {unit.name} (exit status {e.code})") from None
    if not ok:
        what = "NVRTC" if backend == "nvrtc" else "nvcc"
        raise CompileError(f"{what} failed to compile {unit.name} for {arch}:\n"
                           f"{_trim(payload.decode('utf-8', 'replace'))}")
    if not valid_cubin(payload, unit.kernels):
        raise CompileError(f"{backend} produced no valid cubin for {unit.name} (missing kernels or not ELF)")
    return payload


def compile_many(units: Sequence[Unit], arch=None, options: Sequence[str] = (), jobs: Optional[int] = None,
                 cache: Optional[CubinCache] = None, backend: str = "nvrtc",
                 progress: Optional[Callable[[int, int], None]] = None) -> list[bytes]:
    """The cubin of every unit, in order. Cached units are read from `cache` (None: no cache is
    read or written); the rest compile in parallel on `jobs` processes (default: the CPUs this
    process may use). `options`: extra compiler options (part of the cache key). progress(done,
    total) is called once per finished unit, cache hits included. Raises CompileError naming the
    unit (and its kernels) that failed, with the compiler's log."""
    if backend not in BACKENDS:
        raise CompileError(f"unknown compile backend {backend!r} ({', '.join(BACKENDS)})")
    arch = normalize_arch(arch)
    opts = nvrtc_options(arch, options) if backend == "nvrtc" else list(options)
    total = len(units)
    result: list[Optional[bytes]] = [None] * total
    jobs = default_jobs() if jobs is None else max(1, int(jobs))
    parallel = jobs > 1 and len(units) > 1
    keys = [cache_key(u.source, backend, arch, opts, cache.dir, parallel) for u in units] if cache is not None else []
    todo = []
    for i, u in enumerate(units):
        data = cache.get(keys[i], u.kernels) if cache is not None else None
        if data is None:
            todo.append(i)
        else:
            result[i] = data
    done = total - len(todo)
    if progress and done:
        progress(done, total)

    def finish(i: int, data: bytes):
        nonlocal done
        result[i] = data
        if cache is not None:
            cache.put(keys[i], data)
        done += 1
        if progress:
            progress(done, total)

    if len(todo) <= 1 or jobs == 1:
        for i in todo:
            finish(i, _compile_unit(units[i], i, arch, backend, opts, in_process=True))
    else:
        todo.sort(key=lambda i: -len(units[i].source))  # the longest first: the last to finish is short
        with ThreadPoolExecutor(max_workers=min(jobs, len(todo)), thread_name_prefix="nnc-compile") as ex:
            futs = {ex.submit(_compile_unit, units[i], i, arch, backend, opts, False): i for i in todo}
            try:
                for f in as_completed(futs):
                    finish(futs[f], f.result())
            except BaseException:
                for f in futs:
                    f.cancel()
                raise
    return result  # type: ignore[return-value]


def compile_source(source: str, arch=None, backend: str = "nvrtc", name: str = "model.cu",
                   cache: Optional[CubinCache] = None) -> bytes:
    """One program (no cache unless given): compile_many of a single unit."""
    return compile_many([Unit(name, source)], arch, cache=cache, backend=backend)[0]


def compile_nvrtc(source: str, arch: str, name: str = "model.cu", extra=()) -> bytes:
    """One program through NVRTC in this process (no cache)."""
    return compile_many([Unit(name, source)], arch, extra, jobs=1)[0]


def compile_nvcc(source: str, arch: str, name: str = "model.cu", extra=()) -> bytes:
    """One program through `nvcc -cubin` (no cache)."""
    return compile_many([Unit(name, source)], arch, extra, jobs=1, backend="nvcc")[0]


def _trim(log: str, n: int = 8000) -> str:
    return log if len(log) <= n else log[:n] + f"\n... ({len(log) - n} more characters)"
