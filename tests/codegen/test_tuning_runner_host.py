"""CudaRunner's host-side logic (codegen/tuning_runners.py) on the CPU: the real runner over a numpy
stand-in of the few cupy calls it makes. The captured kernels are NVRTC-compiled for real; their
launches do nothing, so the outputs stay poisoned (NaN in every candidate: the gate passes), and the
times are fixed. What this shows: the compile-once-per-distinct-kernel prepare, the operand fill,
the device-side gate's inputs (_as_float), the screen's repeat counts and the whole tuning flow run
through the GPU runner's code without a GPU. What it cannot: any kernel's result or time."""
from types import SimpleNamespace

import numpy as np

from nnc.codegen import tuning
from nnc.codegen import tuning_runners as TR

from .test_tuning import _matmul, _module, _opts


class _Dev(np.ndarray):
    """A host array that answers .data.ptr as a device array does."""

    @property
    def data(self):
        return SimpleNamespace(ptr=self.ctypes.data)


def _dev(a):
    return np.asarray(a).view(_Dev)


class _Stream:
    ptr = 0

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def synchronize(self):
        pass


def _fake_cupy(log: dict):
    """The cupy surface CudaRunner uses, over numpy; log counts launches, timed runs and loads."""
    def fill_kernel(in_params, out_params, body, name):
        assert "seed" in in_params and "y" in out_params and name

        def fill(seed, y):  # tuning_runners._HASH_FILL in numpy
            i = np.arange(y.size, dtype=np.uint64)
            x = (i * 2654435761 + int(seed)) & 0xFFFFFFFF
            x ^= x >> 16
            x = (x * 0x7FEB352D) & 0xFFFFFFFF
            x ^= x >> 15
            x = (x * 0x846CA68B) & 0xFFFFFFFF
            x ^= x >> 16
            y[...] = (x >> 8).astype(np.float32) * (2.0 / 16777216.0) - 1.0
        return fill

    class Fn:
        def __init__(self, name):
            self.name, self.max_dynamic_shared_size_bytes = name, 0

        def __call__(self, grid, block, vals, shared_mem=0):
            assert len(grid) == 3 and len(block) == 3 and all(isinstance(v, np.generic) for v in vals)
            log["launches"] += 1

    class RawModule:
        def __init__(self, path):
            assert open(path, "rb").read(4) == b"\x7fELF"
            log["modules"] += 1

        def get_function(self, name):
            return Fn(name)

    def elapsed(a, b):
        log["timed"] += 1
        return 0.05
    runtime = SimpleNamespace(CUDARuntimeError=type("CUDARuntimeError", (Exception,), {}),
                              memcpyAsync=lambda *a: None, runtimeGetVersion=lambda: 0, driverGetVersion=lambda: 0,
                              getDeviceProperties=lambda i: {"name": b"fake", "major": 9, "minor": 0})
    cuda = SimpleNamespace(Stream=lambda non_blocking=True: _Stream(), Event=lambda: SimpleNamespace(record=lambda s: 0),
                           Device=lambda *a: SimpleNamespace(synchronize=lambda: None, id=0),
                           get_elapsed_time=elapsed, runtime=runtime,
                           driver=SimpleNamespace(CUDADriverError=type("CUDADriverError", (Exception,), {})))
    return SimpleNamespace(uint8=np.uint8, uint32=np.uint32, float16=np.float16, float32=np.float32,
                           float64=np.float64, empty=lambda n, dtype: _dev(np.empty(n, dtype)),
                           zeros=lambda n, dtype=np.float64: _dev(np.zeros(n, dtype)),
                           asarray=lambda a: _dev(np.array(a)), ElementwiseKernel=fill_kernel, RawModule=RawModule,
                           cuda=cuda)


def test_the_gpu_runner_s_host_logic_tunes_a_matmul_on_a_numpy_stand_in():
    from nnc import progress

    class Rec(progress.Reporter):  # the compile bar: a total, advanced to it
        def __init__(self):
            super().__init__()
            self.compile = {"total": None, "done": 0}

        def _start(self, name, total):
            rec = self.compile if name == "tune-compile" else {"done": 0}
            rec["total"] = total

            class T(progress.Task):
                def advance(self, n=1):
                    rec["done"] += n
            return T()
    log = {"launches": 0, "timed": 0, "modules": 0}
    r = TR.CudaRunner("sm_90", 1 << 20, cp=_fake_cupy(log))
    rep = Rec()
    with progress.use(rep):
        plan = tuning.lower_tuned(_module(_matmul(64, 128, 64), "fp16"), _opts(), r)
    t = plan.tuning
    assert rep.compile["done"] == rep.compile["total"] == t["kernels_compiled"]
    assert t["runner"] == "cuda" and t["tuned"] == t["problems"] >= 1 and t["wrong_candidates"] == 0, t
    assert log["modules"] == t["kernels_compiled"] > 0  # each distinct kernel loaded once
    # equal times: nothing is screened out (cutoff 1.5x), every timed candidate gets REPEATS runs
    assert t["screened"] == 0 and log["timed"] == t["candidates"] * TR.REPEATS
    assert log["launches"] >= t["candidates"] * (1 + TR.WARMUP + TR.REPEATS)


def test_operands_are_varied_and_the_gate_sees_float_values():
    r = TR.CudaRunner("sm_90", 1 << 20, cp=_fake_cupy({"launches": 0, "timed": 0, "modules": 0}))
    spec = TR.RootSpec(3, "float16", 2 * 4096, None, True, False)
    a = r._alloc(spec, seed=7).view(np.float16).astype(np.float32)
    assert np.array_equal(a, r._alloc(spec, seed=7).view(np.float16).astype(np.float32))  # deterministic
    assert not np.array_equal(a, r._alloc(spec, seed=8).view(np.float16).astype(np.float32))
    assert -1 <= a.min() < -0.9 and 0.9 < a.max() <= 1 and abs(a.mean()) < 0.05 and len(np.unique(a)) > 1000
    poison = r._alloc(TR.RootSpec(4, "float16", 8, None, False, True), seed=7).view(np.float16)
    assert np.isnan(poison).all()
    bf = TR._as_float(_dev(np.array([0x3F80, 0xC000], np.uint16)), "bfloat16")
    assert bf.dtype == np.float32 and bf.tolist() == [1.0, -2.0]
    cap = tuning.Capture("v", {}, outputs=[(0, 0, "float16", (3,))])
    h = TR._as_float(_dev(np.array([1, 2, 3], np.float16)), "float16")
    assert h.dtype == np.float32 and tuning.mismatch([h * 1.5], [h], cap).startswith("result 0: 3 of 3")
