"""Runners of the tuner (codegen/tuning.py): how captured candidates (codegen/tuning_capture.py)
are compiled, run and timed. `CudaRunner`: the GPU (cupy, imported lazily), NVRTC batch compile
through the cubin cache (each distinct kernel once), device buffers per root (random operands made
on the device), the correctness gate on the device (outputs stay there: no copy to the host, no
host-side compare of tens of millions of elements a candidate), CUDA events with warm-up, a quick
screen of SCREEN_REPEATS runs (a candidate already slower than the cutoff stops there), else the
median of REPEATS runs, the L2 flushed (memset of twice its size) before each. `StandInRunner`: no
GPU, deterministic times (variants.stand_in_time or a test's timer) and outputs (tests make
candidates wrong or fail).
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
SCREEN_REPEATS = 3  # the quick screen's runs (of the REPEATS): one clearly slower stops after these


class Unrecoverable(NncError):
    """The device cannot go on (a sticky CUDA error): tuning stops."""


class Runner:
    """Compiles captures and runs them. run(capture, seed, gate, cutoff) -> (median seconds,
    outputs, one array per op result: numpy, or the device's arrays for CudaRunner): inputs from
    `seed` (the same for every candidate of a problem), outputs poisoned, one run, then
    gate(outputs) -> why wrong ("" ok): a wrong one is not timed (nan). cutoff (seconds, None: no
    screen): when the median of the first SCREEN_REPEATS timed runs is above it, the rest are not
    run and that median is returned (the tuner sees a time > cutoff: screened out). Raises NncError
    (why) for a candidate that fails."""
    name = "runner"

    def device(self) -> dict:
        """The identity a timing cache is valid for (GPU name, SM, CUDA versions)."""
        raise NotImplementedError

    def prepare(self, captures: Sequence[Capture], progress: Optional[Callable] = None) -> dict:
        """Compiles the captures' kernels in one batch; returns {id(capture): why} for failures.
        progress(done, total): per compiled (or cached) distinct kernel."""
        return {}

    def warm_up(self) -> None:
        """One-time set-up before the timing (and the budget's clock) starts."""

    def run(self, cap: Capture, seed: int, gate: Optional[Callable] = None,
            cutoff: Optional[float] = None) -> tuple[float, list]:
        raise NotImplementedError

    def close(self):
        pass


class StandInRunner(Runner):
    """No GPU: times from `timer(candidate, params)` (default variants.stand_in_time), outputs
    a deterministic function of the problem; `wrong(capture) -> bool` makes a candidate's output
    wrong, `fail(capture) -> str|None` makes it fail (tests). screen_timer: the quick screen's
    time (default: timer's; a test makes it noisy). delay: seconds a run takes, compile_delay:
    seconds a prepare takes (budget tests). repeats_run counts the timed runs a GPU would do."""
    name = "stand-in"

    def __init__(self, timer: Optional[Callable] = None, wrong: Optional[Callable] = None,
                 fail: Optional[Callable] = None, delay: float = 0.0, screen_timer: Optional[Callable] = None,
                 compile_delay: float = 0.0):
        from .variants import stand_in_time
        self.timer = timer or stand_in_time
        self.screen_timer = screen_timer or self.timer
        self.wrong = wrong or (lambda cap: False)
        self.fail = fail or (lambda cap: None)
        self.delay = delay
        self.compile_delay = compile_delay
        self.prepared = 0
        self.repeats_run = 0

    def device(self) -> dict:
        return {"gpu": "stand-in", "sm": "sm_90", "cuda_runtime": 0, "cuda_driver": 0, "nvrtc": "none"}

    def prepare(self, captures, progress=None):
        if self.compile_delay:
            time.sleep(self.compile_delay)
        self.prepared += len(captures)
        return {}

    def run(self, cap, seed, gate=None, cutoff=None):
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
        if cutoff is None:
            self.repeats_run += REPEATS
            return float(self.timer(cap.candidate, cap.params)), outs
        self.repeats_run += SCREEN_REPEATS
        quick = float(self.screen_timer(cap.candidate, cap.params))
        if quick > cutoff:
            return quick, outs
        self.repeats_run += REPEATS - SCREEN_REPEATS
        return quick if self.screen_timer is self.timer else float(self.timer(cap.candidate, cap.params)), outs


def compile_captures(captures: Sequence[Capture], arch: str, jobs: Optional[int] = None,
                     progress: Optional[Callable] = None):
    """Every distinct captured kernel (by name: tuning_capture.batch_name names a kernel by its
    code) compiled once, in one parallel batch through the cubin cache (codegen/cuda.py: one kernel
    a unit, so a failure names its candidates). Returns (units, cubins, {id(capture): why}) with
    None for a unit that failed. No GPU needed (NVRTC)."""
    from . import cuda
    from .units import make_units
    kernels: dict = {}
    owners: dict = {}  # kernel name -> every capture launching it
    for c in captures:
        for k in c.kernels.values():
            kernels.setdefault(k.name, k)
            owners.setdefault(k.name, []).append(c)
    units = [u for k in kernels.values() for u in make_units([k])]
    failed: dict = {}
    if not units:
        return units, [], failed
    try:
        cubins = cuda.compile_many(units, arch, jobs=jobs, cache=cuda.CubinCache.default(), progress=progress)
    except cuda.CompileError:
        cubins = []
        for u in units:  # find the failing ones (rare: a declared space must compile)
            try:
                cubins.append(cuda.compile_many([u], arch, jobs=1, cache=cuda.CubinCache.default())[0])
            except cuda.CompileError as e:
                cubins.append(None)
                for c in owners[u.kernels[0]]:
                    failed[id(c)] = f"compile failed: {str(e).splitlines()[0]}"
    return units, cubins, failed


class CudaRunner(Runner):
    """The GPU (cupy, imported lazily): NVRTC batch compile through the cubin cache, device buffers
    per root, outputs compared on the device, CUDA-event timing with the L2 flushed before each
    repeat and a quick screen (see the module docstring)."""
    name = "cuda"

    def __init__(self, arch: str, l2_bytes: int, jobs: Optional[int] = None, warmup: int = WARMUP,
                 repeats: int = REPEATS, screen: int = SCREEN_REPEATS, cp=None):
        if cp is None:  # (a test passes a numpy stand-in of cupy: the host-side logic on the CPU)
            import cupy as cp
        self.cp = cp
        self.arch, self.jobs, self.warmup, self.repeats = arch, jobs, warmup, repeats
        self.screen = max(1, min(screen, repeats))
        self.funcs: dict = {}
        self._modules = []
        self._flush = cp.empty(max(2 * int(l2_bytes), 1 << 20), dtype=cp.uint8)
        self._shared: dict = {}  # root id -> device array (the operands of the problem being tuned)
        self._shared_seed = None
        self.stream = cp.cuda.Stream(non_blocking=True)
        self._tensor_maps = tma.TensorMapCache()
        self._fill = cp.ElementwiseKernel("uint32 seed", "float32 y", _HASH_FILL, "nnc_tune_uniform_fill")

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

    def prepare(self, captures, progress=None):
        import os
        import tempfile
        units, cubins, failed = compile_captures(captures, self.arch, self.jobs, progress)
        owners: dict = {}
        for c in captures:
            for k in c.kernels.values():
                owners.setdefault(k.name, []).append(c)
        with tempfile.TemporaryDirectory(prefix="nnc_tune_") as d:
            for i, (u, data) in enumerate(zip(units, cubins)):
                if data is None or all(k in self.funcs for k in u.kernels):
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
                    for c in owners.get(u.kernels[0], ()):
                        failed[id(c)] = f"load failed: {type(e).__name__}: {e}"
        return failed

    def warm_up(self):
        """cupy compiles its elementwise kernels (the gate's compare, the RNG's cast) at first use:
        seconds on a fresh machine, done here rather than inside the first problem's timing."""
        if getattr(self, "_warm", False):
            return
        self._warm = True
        from .tuning import mismatch
        cp = self.cp
        for np_name in ("float16", "float32", "float64"):
            a = self._uniform(8, 0).astype(np.dtype(np_name))
            v = _as_float(a, np_name, cp)
            mismatch([v], [v.copy()], Capture("warm-up", {}, outputs=[(0, 0, np_name, (8,))]))
        u = cp.zeros(8, cp.uint8)
        mismatch([u], [u.copy()], Capture("warm-up", {}, outputs=[(0, 0, "uint8", (8,))]))
        self.stream.synchronize()

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
        count = spec.nbytes // max(dt.itemsize, 1)
        state = int(np.random.SeedSequence((seed, spec.id)).generate_state(1)[0])
        raw = cp.zeros(n, cp.uint8)
        if spec.np_name in ("float16", "float32", "float64") and count:
            # made on the device: ResNet-50 b32's operands are ~1 GB, seconds of host RNG and copies
            vals = self._uniform(count, state).astype(dt.dtype.np)
            raw[:vals.nbytes] = vals.view(cp.uint8)
            return raw
        rng = np.random.default_rng(state)
        if dt.dtype.np.kind == "f" or spec.np_name == "bfloat16":
            host = rng.uniform(-1.0, 1.0, count).astype(dt.dtype.np)
        elif dt.dtype.np.kind == "b":
            host = rng.integers(0, 2, count).astype(np.bool_)
        else:  # a scratch or write-only integer buffer: any bits
            host = rng.integers(0, 127, count).astype(dt.dtype.np)
        if host.nbytes:
            raw[:host.nbytes] = cp.asarray(np.frombuffer(host.tobytes(), np.uint8))
        return raw

    def _uniform(self, count: int, state: int):
        """count float32 values in [-1, 1) on the device, a hash of (index, state): one kernel, no
        generator to set up per buffer."""
        y = self.cp.empty(count, self.cp.float32)
        self._fill(np.uint32(state & 0xFFFFFFFF), y)
        return y

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

    def _timed(self, cap: Capture, ptrs: dict, n: int) -> list:
        """n timed runs (ms), each after an L2 flush."""
        cp = self.cp
        evs = []
        for _ in range(n):
            self._flush.fill(0)  # memset 2x L2: the launches read from DRAM as in a model run
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record(self.stream)
            self._launch_all(cap, ptrs)
            b.record(self.stream)
            evs.append((a, b))
        self.stream.synchronize()
        return [cp.cuda.get_elapsed_time(a, b) for a, b in evs]

    def run(self, cap, seed, gate=None, cutoff=None):
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
                cp.cuda.Device().synchronize()  # the buffers above were filled on the null stream
                self._launch_all(cap, ptrs)
                self.stream.synchronize()
                outs = []
                for rid, off, np_name, shape in cap.outputs:
                    dt = dtype_info(np_name)
                    n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
                    raw = arrays[rid][off:off + n]
                    v = raw.view(dt.device_np).reshape(shape)
                    o = _as_float(v, np_name, cp)
                    # a copy on the device: the timed runs below write the result buffers again
                    outs.append(o if o.dtype != v.dtype else o.copy())
                if gate is not None and gate(outs):
                    return float("nan"), outs  # wrong: not timed
                for _ in range(self.warmup):
                    self._launch_all(cap, ptrs)
                if cutoff is None:
                    ms = self._timed(cap, ptrs, self.repeats)
                else:
                    ms = self._timed(cap, ptrs, self.screen)
                    if float(np.median(ms)) * 1e-3 <= cutoff:  # close to the best: the full repeats
                        ms += self._timed(cap, ptrs, self.repeats - self.screen)
        except cp.cuda.driver.CUDADriverError as e:
            raise _classify(e) from None
        except cp.cuda.runtime.CUDARuntimeError as e:
            raise _classify(e) from None
        return float(np.median(ms)) * 1e-3, outs

    def close(self):
        self.funcs.clear()
        self._modules.clear()
        self._shared.clear()


# CudaRunner's operand fill (a cupy ElementwiseKernel body; i: the element's index): a 32-bit
# integer hash of (i, seed), its top 24 bits scaled to [-1, 1). Any value pattern will do that is
# deterministic, never all zeros and varied enough that a wrong kernel's output differs.
_HASH_FILL = """
    unsigned int x = (unsigned int)i * 2654435761u + seed;
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
    y = (float)(x >> 8) * (2.0f / 16777216.0f) - 1.0f;
"""


def _classify(e) -> NncError:
    text = f"{type(e).__name__}: {e}"
    sticky = any(s in text for s in ("ILLEGAL_ADDRESS", "illegal memory", "MISALIGNED", "misaligned",
                                      "LAUNCH_FAILED", "unspecified launch failure", "ILLEGAL_INSTRUCTION",
                                      "illegal instruction", "HARDWARE_STACK_ERROR", "assert"))
    return Unrecoverable(text) if sticky else NncError(text)


def _as_float(a, np_name: str, xp=np):
    """An output's values for comparing, on the device for cupy (xp): bf16 raw bits -> float32,
    float16 -> float32 (exact), float32/64 kept; narrow types raw (compared bit for bit)."""
    if np_name == "bfloat16":
        return (a.astype(xp.uint32) << 16).view(xp.float32)
    d = dtype_info(np_name)
    if d.raw_on_device:
        return a  # narrow types: compared bit for bit
    return a.astype(xp.float32) if a.dtype == xp.float16 else a
