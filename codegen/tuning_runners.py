"""Runners of the tuner (codegen/tuning.py): how captured candidates (codegen/tuning_capture.py)
are compiled, run and timed. `CudaRunner`: the GPU (cupy, imported lazily), NVRTC batch compile
through the cubin cache, device buffers per root, CUDA events with warm-up, the median of repeats,
the L2 flushed (memset of twice its size) before each. `StandInRunner`: no GPU, deterministic
times (variants.stand_in_time or a test's timer) and outputs (tests make candidates wrong or fail).
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import numpy as np

from ..ir.errors import NncError
from . import tma
from .dtypes import info as dtype_info
from .tuning_capture import Capture, RootSpec

WARMUP = 2
REPEATS = 9


class Unrecoverable(NncError):
    """The device cannot go on (a sticky CUDA error): tuning stops."""


class Runner:
    """Compiles captures and runs them. run(capture, seed, gate) -> (median seconds, outputs as
    numpy arrays, one per op result): inputs from `seed` (the same for every candidate of a
    problem), outputs poisoned, one run, then gate(outputs) -> why wrong ("" ok): a wrong one is
    not timed (nan). Raises NncError (why) for a candidate that fails."""
    name = "runner"

    def device(self) -> dict:
        """The identity a timing cache is valid for (GPU name, SM, CUDA versions)."""
        raise NotImplementedError

    def prepare(self, captures: Sequence[Capture]) -> dict:
        """Compiles the captures' kernels in one batch; returns {id(capture): why} for failures."""
        return {}

    def run(self, cap: Capture, seed: int, gate: Optional[Callable] = None) -> tuple[float, list]:
        raise NotImplementedError

    def close(self):
        pass


class StandInRunner(Runner):
    """No GPU: times from `timer(candidate, params)` (default variants.stand_in_time), outputs
    a deterministic function of the problem; `wrong(capture) -> bool` makes a candidate's output
    wrong, `fail(capture) -> str|None` makes it fail (tests)."""
    name = "stand-in"

    def __init__(self, timer: Optional[Callable] = None, wrong: Optional[Callable] = None,
                 fail: Optional[Callable] = None, delay: float = 0.0):
        from .variants import stand_in_time
        self.timer = timer or stand_in_time
        self.wrong = wrong or (lambda cap: False)
        self.fail = fail or (lambda cap: None)
        self.delay = delay  # seconds each run takes (budget tests)
        self.prepared = 0

    def device(self) -> dict:
        return {"gpu": "stand-in", "sm": "sm_90", "cuda_runtime": 0, "cuda_driver": 0, "nvrtc": "none"}

    def prepare(self, captures):
        self.prepared += len(captures)
        return {}

    def run(self, cap, seed, gate=None):
        if self.delay:
            time.sleep(self.delay)
        why = self.fail(cap)
        if why:
            raise NncError(why)
        rng = np.random.default_rng(seed)
        outs = []
        for _, _, np_name, shape in cap.outputs:
            a = rng.standard_normal(shape).astype(np.float32)
            if self.wrong(cap):
                a = a + 1.0
            outs.append(a)
        if gate is not None and gate(outs):
            return float("nan"), outs
        return float(self.timer(cap.candidate, cap.params)), outs


def compile_captures(captures: Sequence[Capture], arch: str, jobs: Optional[int] = None):
    """Every captured kernel compiled in one parallel batch through the cubin cache (codegen/cuda.py:
    one kernel a unit, so a failure names one candidate). Returns (units, cubins, {id(capture):
    why}) with None for a unit that failed. No GPU needed (NVRTC)."""
    from . import cuda
    from .units import make_units
    kernels = [k for c in captures for k in c.kernels.values()]
    owner = {k.name: c for c in captures for k in c.kernels.values()}
    units = [u for k in kernels for u in make_units([k])]
    failed: dict = {}
    if not units:
        return units, [], failed
    try:
        cubins = cuda.compile_many(units, arch, jobs=jobs, cache=cuda.CubinCache.default())
    except cuda.CompileError:
        cubins = []
        for u in units:  # find the failing ones (rare: a declared space must compile)
            try:
                cubins.append(cuda.compile_many([u], arch, jobs=1, cache=cuda.CubinCache.default())[0])
            except cuda.CompileError as e:
                cubins.append(None)
                failed[id(owner[u.kernels[0]])] = f"compile failed: {str(e).splitlines()[0]}"
    return units, cubins, failed


class CudaRunner(Runner):
    """The GPU (cupy, imported lazily): NVRTC batch compile through the cubin cache, device buffers
    per root, CUDA-event timing with the L2 flushed before each repeat."""
    name = "cuda"

    def __init__(self, arch: str, l2_bytes: int, jobs: Optional[int] = None, warmup: int = WARMUP,
                 repeats: int = REPEATS):
        import cupy as cp
        self.cp = cp
        self.arch, self.jobs, self.warmup, self.repeats = arch, jobs, warmup, repeats
        self.funcs: dict = {}
        self._modules = []
        self._flush = cp.empty(max(2 * int(l2_bytes), 1 << 20), dtype=cp.uint8)
        self._shared: dict = {}  # (seed, root id) -> device array (the operands of the problem being tuned)
        self._shared_seed = None
        self.stream = cp.cuda.Stream(non_blocking=True)
        self._tensor_maps = tma.TensorMapCache()

    def device(self) -> dict:
        cp = self.cp
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = props.get("name", b"")
        try:
            from .nvrtc_worker import nvrtc_identity
            nv = " ".join(nvrtc_identity().split()[:2])  # "nvrtc 12.8"
        except Exception:
            nv = "unknown"
        return {"gpu": name.decode() if isinstance(name, bytes) else str(name),
                "sm": f"sm_{props['major']}{props['minor']}", "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
                "cuda_driver": cp.cuda.runtime.driverGetVersion(), "nvrtc": nv}

    def prepare(self, captures):
        import os
        import tempfile
        units, cubins, failed = compile_captures(captures, self.arch, self.jobs)
        owner = {k.name: c for c in captures for k in c.kernels.values()}
        with tempfile.TemporaryDirectory(prefix="nnc_tune_") as d:
            for i, (u, data) in enumerate(zip(units, cubins)):
                if data is None:
                    continue
                p = os.path.join(d, f"{i}.cubin")
                with open(p, "wb") as f:
                    f.write(data)
                try:
                    mod = self.cp.RawModule(path=p)
                    for k in u.kernels:
                        self.funcs[k] = mod.get_function(k)
                    self._modules.append(mod)
                except Exception as e:
                    failed[id(owner[u.kernels[0]])] = f"load failed: {type(e).__name__}: {e}"
        return failed

    def _alloc(self, spec: RootSpec, seed: int):
        cp = self.cp
        n = max(spec.nbytes, 1)
        if spec.data is not None:
            return cp.asarray(spec.data.reshape(-1).view(np.uint8))
        if spec.result:
            a = cp.empty(n, cp.uint8)
            a.fill(0xFF)  # poison: NaN for every float type
            return a
        dt = dtype_info(spec.np_name)
        rng = np.random.default_rng((seed, spec.id))
        count = spec.nbytes // max(dt.itemsize, 1)
        if dt.dtype.np.kind == "f" or spec.np_name == "bfloat16":
            host = rng.uniform(-1.0, 1.0, count).astype(dt.dtype.np)
        elif dt.dtype.np.kind == "b":
            host = rng.integers(0, 2, count).astype(np.bool_)
        else:  # a scratch or write-only integer buffer: any bits
            host = rng.integers(0, 127, count).astype(dt.dtype.np)
        raw = np.zeros(n, np.uint8)
        raw[:host.nbytes] = np.frombuffer(host.tobytes(), np.uint8)
        return cp.asarray(raw)

    def _launch_all(self, cap: Capture, ptrs: dict):
        cp = self.cp
        for kind, kname, grid, block, smem, args, nbytes in cap.launches:
            vals = tuple(np.uint64(ptrs[a[1]] + a[2]) if a[0] == "buf" else a[1] for a in args)
            if kind == "kernel" and any(a[0] == "tmap" for a in args):  # codegen/tma.py
                vals = tuple(tma.launch_values(args, vals, self._tensor_maps, int))
            if kind == "kernel":
                self.funcs[kname](grid, block, vals, shared_mem=smem)  # on the current stream: self.stream
            elif kind == "memcpy" and nbytes:
                cp.cuda.runtime.memcpyAsync(int(vals[0]), int(vals[1]), nbytes, 3, self.stream.ptr)

    def run(self, cap, seed, gate=None):
        cp = self.cp
        if self._shared_seed != seed:
            self._shared, self._shared_seed = {}, seed
        for k in {c for _, c, *_ in cap.launches if c is not None}:
            if k not in self.funcs:
                raise NncError("not compiled")
        arrays = {}
        for rid, spec in cap.roots.items():
            if spec.shared and not spec.result:
                if rid not in self._shared:
                    self._shared[rid] = self._alloc(spec, seed)
                arrays[rid] = self._shared[rid]
            else:
                arrays[rid] = self._alloc(spec, seed)
        ptrs = {rid: a.data.ptr for rid, a in arrays.items()}
        for kname, k in ((c, self.funcs[c]) for _, c, *_ in cap.launches if c is not None):
            smem = max(s for _, c, _, _, s, *_ in cap.launches if c == kname)
            if smem > 48 * 1024:
                k.max_dynamic_shared_size_bytes = smem
        try:
            with self.stream:
                self._launch_all(cap, ptrs)
                self.stream.synchronize()
                outs = []
                for rid, off, np_name, shape in cap.outputs:
                    dt = dtype_info(np_name)
                    n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
                    raw = cp.asnumpy(arrays[rid][off:off + n])
                    outs.append(_as_float(raw.view(dt.device_np).reshape(shape), np_name))
                if gate is not None and gate(outs):
                    return float("nan"), outs  # wrong: not timed
                for _ in range(self.warmup):
                    self._launch_all(cap, ptrs)
                evs = []
                for _ in range(self.repeats):
                    self._flush.fill(0)  # memset 2x L2: the launches read from DRAM as in a model run
                    a, b = cp.cuda.Event(), cp.cuda.Event()
                    a.record(self.stream)
                    self._launch_all(cap, ptrs)
                    b.record(self.stream)
                    evs.append((a, b))
                self.stream.synchronize()
        except cp.cuda.driver.CUDADriverError as e:
            raise _classify(e) from None
        except cp.cuda.runtime.CUDARuntimeError as e:
            raise _classify(e) from None
        ms = [cp.cuda.get_elapsed_time(a, b) for a, b in evs]
        return float(np.median(ms)) * 1e-3, outs

    def close(self):
        self.funcs.clear()
        self._modules.clear()
        self._shared.clear()


def _classify(e) -> NncError:
    text = f"{type(e).__name__}: {e}"
    sticky = any(s in text for s in ("ILLEGAL_ADDRESS", "illegal memory", "MISALIGNED", "misaligned",
                                      "LAUNCH_FAILED", "unspecified launch failure", "ILLEGAL_INSTRUCTION",
                                      "illegal instruction", "HARDWARE_STACK_ERROR", "assert"))
    return Unrecoverable(text) if sticky else NncError(text)


def _as_float(a: np.ndarray, np_name: str) -> np.ndarray:
    """A device array's values for comparing (bf16 raw bits -> float32)."""
    if np_name == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    d = dtype_info(np_name)
    if d.raw_on_device:
        return a  # narrow types: compared bit for bit
    return a.astype(np.float64) if a.dtype.kind == "f" else a
