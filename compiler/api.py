"""The Python API: `nnc.compile(model, ...) -> Module` in one call, and `nnc.load(out, backend=...)`.

    m = nnc.compile("model.onnx", shapes={"input": [1, 3, 224, 224]})     # CUDA, in a temp dir
    m.inputs                      # (TensorInfo(name='input', dtype='float32', shape=(1, 3, 224, 224)),)
    y = m(x)                      # one output -> that array; several -> a tuple in model order
    d = m.run({"input": x}, outputs=["probs"], output="numpy")

Both backends share the interface of `Module`:
- "cuda": the generated kernels on the GPU (nnc.runtime.Module); run() returns cupy arrays
  unless output="numpy".
- "reference": the numpy interpreter on OUT/ir/final.nnir (no GPU needed); run() returns numpy
  arrays unless output="cupy". `nnc.compile(..., backend="reference")` skips the CUDA code
  generation by default (it is most of a compile's time and the reference never runs it); pass
  codegen=True to also write the CUDA files (a directory to ship to a GPU machine).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from .ir.errors import ImportError_, InputError, NncError

BACKENDS = ("cuda", "reference")
SPARSITY_MODES = ("off", "enable", "force")  # --sparsity (TensorRT's meanings; compiler/passes/sparsify_weights_24.py)
PRECISIONS = ("fp32", "fp16", "bf16", "best", "int8", "fp8")  # best: per layer (compiler/precision_search.py);
# int8: Q/DQ from calibration around Conv/Gemm/MatMul, the rest fp32 (compiler/passes/quantize_int8.py);
# fp8: MatMul/Gemm in e4m3 from calibration amax, the rest fp16 (compiler/passes/quantize_fp8.py)
CUDA_COMPILERS = ("nvrtc", "nvcc")

Dim = Union[int, str]  # a size, or the name of a symbol bound at run time


@dataclass(frozen=True)
class TensorInfo:
    """One model input or output, like onnxruntime's NodeArg.

    dtype: numpy name ("float32", "bfloat16", "int64", ...). shape: ints, symbol names for dims
    left symbolic (a reference-backend module compiled without --shapes), or "?" for an extent
    only a run decides (NonZero's count; CUDA allocates plan.json's max_shape for it); None if the
    rank is unknown."""
    name: str
    dtype: str
    shape: Optional[tuple[Dim, ...]]

    @classmethod
    def from_plan(cls, entry: Mapping) -> "TensorInfo":
        shape = entry.get("shape")
        if shape is not None:
            shape = list(shape)
            ax = entry.get("dynamic_axis", -1)
            if entry.get("shape_known_after_run") and isinstance(ax, int) and 0 <= ax < len(shape):
                shape[ax] = "?"
        return cls(str(entry["name"]), str(entry["dtype"]), None if shape is None else tuple(shape))

    @property
    def np_dtype(self) -> np.dtype:
        from .ir.types import dtype
        return dtype(self.dtype).np


def _shape_dims(name: str, dims) -> tuple[int, ...]:
    if isinstance(dims, (str, bytes)) or not hasattr(dims, "__iter__"):
        raise NncError(f"shapes[{name!r}]: expected a sequence of ints, given {dims!r}")
    out = []
    for d in dims:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)) or d < 0:
            raise NncError(f"shapes[{name!r}]: dims must be non-negative ints, given {list(dims)!r}")
        out.append(int(d))
    return tuple(out)


def normalize_shapes(shapes) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """None | "in:1x3x8x8,mask:1x8" (the CLI syntax) | {name: [dims]} -> ((name, dims), ...)."""
    if shapes is None or shapes == "":
        return ()
    if isinstance(shapes, str):
        from .onnx_import import parse_shapes
        shapes = parse_shapes(shapes)
    if not isinstance(shapes, Mapping):
        raise NncError(f"shapes: expected a dict {{input name: dims}} or 'name:DxD,...', given {type(shapes).__name__}")
    return tuple((str(k), _shape_dims(str(k), v)) for k, v in shapes.items())


@dataclass(frozen=True)
class CompileOptions:
    """Everything `nnc.compile` decides, validated on construction.

    codegen None means: generate CUDA for backend "cuda" (it must), skip it for "reference"."""
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    precision: str = "fp32"
    backend: str = "cuda"
    arch: Optional[str] = None
    tf32: bool = False
    name: Optional[str] = None
    codegen: Optional[bool] = None
    cuda_compiler: str = "nvrtc"
    verify_each: bool = False
    cache: bool = True            # the per-kernel cubin cache (codegen/cuda.py); False: --no-cache
    jobs: Optional[int] = None    # parallel CUDA compile processes (None: the CPUs)
    fuse: bool = True             # the fusion passes (pipeline.FUSION_PASSES, FOLDING_FUSIONS); False: --no-fuse
    # kernel selection by timing on the GPU (codegen/tuning.py). None: tune when a GPU is present
    # and backend is "cuda", else the heuristic (--no-tune: False; what it assumes: plan.json "target")
    tune: Optional[bool] = None
    tune_budget: Optional[float] = None  # seconds of GPU timing, compile not counted (--tune-budget); then the heuristic
    timing_cache: Optional[str] = None   # timing cache file read and written (--timing-cache)
    # per-layer precision (compiler/passes/mixed_precision.py, compiler/precision_search.py)
    keep_fp32: tuple[str, ...] = ()      # layers pinned at fp32: node-name globs or op types (--keep-fp32)
    allow: tuple[str, ...] = ()          # precision "best": the float types to choose from (--allow)
    max_rel_err: Optional[float] = None  # precision "best": the outputs' rel-L2 budget vs fp32 (--max-rel-err)
    calib_data: Optional[str] = None     # precision "best": an .npz or a directory of them (--calib-data)
    # optimization profiles (compiler/profiles.py: Profile, or "x:1x3/8x3/32x3" per profile; --profile)
    profiles: tuple = ()
    calib: Optional[str] = None          # precision "int8": calib.json or a TensorRT cache (--calib; compiler/calibrate.py)
    weights: str = "float"               # "int4": MatMul/Gemm constant weights quantized at compile time (--weights)
    int4_block: int = 32                 # weights "int4": the group size along K (--int4-block 32|64|128)
    # 2:4 structured sparsity (TensorRT's --sparsity): "enable": MatMul/Gemm constant weights already
    # 2:4-sparse along K run on the sparse tensor cores; "force": others are pruned first (changes the
    # model's numbers: for benchmarking); compiler/passes/sparsify_weights_24.py
    sparsity: str = "off"

    def __post_init__(self):
        object.__setattr__(self, "shapes", normalize_shapes(dict(self.shapes) if isinstance(self.shapes, tuple)
                                                            else self.shapes))
        from .profiles import normalize_profiles
        object.__setattr__(self, "profiles", normalize_profiles(self.profiles))
        if self.profiles and self.shapes:
            raise NncError("give shapes or profiles, not both (a static profile min=opt=max is what shapes gives)")
        for what, val, allowed in (("precision", self.precision, PRECISIONS), ("backend", self.backend, BACKENDS),
                                   ("cuda_compiler", self.cuda_compiler, CUDA_COMPILERS)):
            if val not in allowed:
                raise NncError(f"{what} must be one of {', '.join(map(repr, allowed))}, not {val!r}")
        if self.backend == "cuda" and self.codegen is False:
            raise NncError("backend='cuda' needs the generated CUDA: codegen=False only goes with backend='reference'")
        if self.name is not None and not isinstance(self.name, str):
            raise NncError(f"name must be a string, not {type(self.name).__name__}")
        if self.jobs is not None and (isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1):
            raise NncError(f"jobs must be a positive int or None, not {self.jobs!r}")
        if self.tune is not None and not isinstance(self.tune, bool):
            raise NncError(f"tune must be True, False or None (auto), not {self.tune!r}")
        if self.tune_budget is not None and (isinstance(self.tune_budget, bool) or
                                             not isinstance(self.tune_budget, (int, float)) or not self.tune_budget > 0):
            raise NncError(f"tune_budget must be a positive number of seconds or None, not {self.tune_budget!r}")
        if self.timing_cache is not None:
            object.__setattr__(self, "timing_cache", os.fspath(self.timing_cache))
        if (self.precision in ("int8", "fp8")) != (self.calib is not None) and self.precision != "best":
            raise NncError(f"precision {self.precision!r} needs calib (--calib calib.json or a TensorRT cache, from "
                           "`nnc calibrate`)" if self.precision in ("int8", "fp8") else
                           f"calib (--calib) only goes with precision 'int8', 'fp8' or 'best', not {self.precision!r}")
        if self.weights not in ("float", "int4"):
            raise NncError(f"weights must be 'float' or 'int4', not {self.weights!r}")
        if self.int4_block not in (32, 64, 128):
            raise NncError(f"int4_block must be 32, 64 or 128, not {self.int4_block!r}")
        if self.sparsity not in SPARSITY_MODES:
            raise NncError(f"sparsity must be one of {', '.join(map(repr, SPARSITY_MODES))}, not {self.sparsity!r}")
        if self.sparsity != "off" and self.weights == "int4":
            raise NncError("sparsity (--sparsity) and weights 'int4' (--weights int4) do not combine")
        if self.calib is not None:
            object.__setattr__(self, "calib", os.fspath(self.calib))
            if self.keep_fp32 and self.precision == "int8":
                raise NncError("keep_fp32 (--keep-fp32) with precision 'int8' is not supported yet")
        from .passes.mixed_precision import check_options
        check_options(self)  # keep_fp32 / allow / max_rel_err / calib_data, normalised

    @property
    def generates_cuda(self) -> bool:
        return self.backend == "cuda" if self.codegen is None else bool(self.codegen)

    def codegen_options(self, target=None):
        """The typed options code generation runs with (nnc.codegen.options.CodegenOptions).
        target: the codegen.target.Target already resolved from `arch` (None: resolve it now)."""
        from .codegen.options import CodegenOptions, LowerOptions
        from .codegen.target import resolve_target
        t = resolve_target(self.arch) if target is None else target
        tune, why = self.tuning()
        from .passes.mixed_precision import storage_precision
        storage = {"int8": "fp32", "fp8": "fp16"}.get(self.precision) or storage_precision(self)  # int8: float ops
        # at fp32; fp8: at fp16
        return CodegenOptions(LowerOptions(t, storage, self.tf32, tune=tune, tune_budget=self.tune_budget,
                                           timing_cache=self.timing_cache, tune_reason=why),
                              self.cuda_compiler, cache=self.cache, jobs=self.jobs)

    def tuning(self) -> tuple[bool, str]:
        """(tune?, why): tune=None means tune when the backend is "cuda" and a GPU is present."""
        from .codegen.options import env_tune
        tune = self.tune if self.tune is not None else env_tune()
        if tune is False:
            return False, "--no-tune" if self.tune is False else "NNC_TUNE=0"
        if self.backend != "cuda":
            return False, f"backend {self.backend!r} (tuning needs the cuda backend)"
        from .codegen.target import gpu_present
        if not gpu_present():
            if tune:
                raise NncError("tune=True needs a CUDA GPU (none is available); use tune=False (--no-tune)")
            return False, "no GPU present (heuristic: what it assumes is plan.json's target)"
        return True, "--tune" if tune else "default: a GPU is present"

    def compile_kwargs(self) -> dict:
        """The keyword arguments of nnc.compile.compile_model for these options."""
        kw = dict(shapes={k: list(v) for k, v in self.shapes}, arch=self.arch, precision=self.precision,
                  tf32=self.tf32, backend=self.cuda_compiler, codegen=self.generates_cuda,
                  verify_each=self.verify_each, no_cache=not self.cache, jobs=self.jobs)
        if self.name is not None:
            kw["name"] = self.name
        return kw


# ---------------------------------------------------------------------------- modules


class Module:
    """A compiled model, ready to run. Made by nnc.compile / nnc.load; subclasses per backend.

    inputs / outputs: TensorInfo tuples in model order. m(*args, **kwargs) binds positional
    arguments to inputs in order and keywords by name (or takes one dict) and returns the one
    output, or a tuple of all outputs in model order. run() returns {name: array}."""

    backend = ""
    dir: Path
    plan: dict

    def _io_entries(self, kind: str) -> list:
        return self.plan[kind]

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return tuple(TensorInfo.from_plan(t) for t in self._io_entries("inputs"))

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return tuple(TensorInfo.from_plan(t) for t in self._io_entries("outputs"))

    @property
    def input_names(self) -> list[str]:
        return [t["name"] for t in self._io_entries("inputs")]

    @property
    def output_names(self) -> list[str]:
        return [t["name"] for t in self._io_entries("outputs")]

    def run(self, inputs: Mapping[str, Any], outputs: Optional[Sequence[str]] = None, *,
            output: Optional[str] = None, stream=None) -> dict:
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        res = self.run(self._feed_dict(args, kwargs))
        vals = [res[n] for n in self.output_names]
        return vals[0] if len(vals) == 1 else tuple(vals)

    def _feed_dict(self, args, kwargs) -> dict:
        if len(args) == 1 and isinstance(args[0], Mapping) and not kwargs:
            return dict(args[0])
        names = self.input_names
        if len(args) > len(names):
            raise InputError(f"the model takes {len(names)} inputs {names}, given {len(args)}")
        d = dict(zip(names, args))
        for k, v in kwargs.items():
            if k in d:
                raise InputError(f"input {k!r} given both by position and by name")
            d[k] = v
        return d

    def _selected(self, outputs) -> list[str]:
        """The output names to return, in the order asked (None: all, in model order)."""
        names = self.output_names
        if outputs is None:
            return list(names)
        if isinstance(outputs, str):
            outputs = [outputs]
        sel = list(outputs)
        unknown = [n for n in sel if n not in names]
        if unknown:
            raise InputError(f"unknown outputs {unknown}; the model's outputs are {names}")
        if len(set(sel)) != len(sel):
            raise InputError(f"outputs: {sel} names an output twice")
        return sel

    def context(self) -> "ExecutionContext":
        """A new execution context (TensorRT's IExecutionContext): it shares this module's weights
        and compiled code and owns its activation arena (and, on cuda, its stream, its I/O buffers
        and its CUDA graph). Contexts run concurrently, one per thread; run() of the module itself
        uses its own default context."""
        raise NotImplementedError

    def run_async(self, inputs: Mapping[str, Any], outputs: Optional[Sequence[str]] = None, *,
                  output: Optional[str] = None):
        """Queues one run and returns a concurrent.futures.Future of run()'s dict. Runs queued
        from one thread complete in order, on one context this module makes for them."""
        ctx = self.__dict__.get("_async_context")
        if ctx is None:
            import threading
            with self.__dict__.setdefault("_async_lock", threading.Lock()):
                ctx = self.__dict__.get("_async_context") or self.context()
                self._async_context = ctx
        return ctx.run_async(inputs, outputs, output=output)

    def close(self) -> None:
        """Removes the temporary output directory nnc.compile(out=None) made (no-op otherwise).
        Also done when the module is garbage-collected."""
        fin = getattr(self, "_finalizer", None)
        if fin is not None:
            fin()

    def _own_dir(self, d) -> None:
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(d), True)

    def __repr__(self):
        fmt = lambda ts: ", ".join(f"{t.name}: {t.dtype}{list(t.shape) if t.shape is not None else '[?]'}" for t in ts)
        return f"<nnc.Module {self.backend} {self.dir} ({fmt(self.inputs)}) -> ({fmt(self.outputs)})>"


class ContextBusyError(NncError):
    """An execution context was used by a second thread while a run of it was in progress."""


class ExecutionContext:
    """One execution context of a Module (Module.context()): the weights and compiled code are
    the module's, the activation memory is this context's. One thread at a time: a second
    thread's run() while one is in progress is a ContextBusyError (make a context per thread),
    never two runs over the same arena. run / __call__ / inputs / outputs as on the Module."""

    def __init__(self, module: Module):
        import threading
        self.module = module
        self._busy = threading.Lock()
        self._pool = None  # the one worker of run_async (reference backend)

    @property
    def inputs(self):
        return self.module.inputs

    @property
    def outputs(self):
        return self.module.outputs

    def run(self, inputs: Mapping[str, Any], outputs: Optional[Sequence[str]] = None, *,
            output: Optional[str] = None) -> dict:
        if not self._busy.acquire(blocking=False):
            raise ContextBusyError("this execution context is running on another thread; "
                                   "use one context per thread (Module.context())")
        try:
            return self._run(inputs, outputs, output)
        finally:
            self._busy.release()

    def _run(self, inputs, outputs, output) -> dict:
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        res = self.run(self.module._feed_dict(args, kwargs))
        vals = [res[n] for n in self.module.output_names]
        return vals[0] if len(vals) == 1 else tuple(vals)

    def run_async(self, inputs: Mapping[str, Any], outputs: Optional[Sequence[str]] = None, *,
                  output: Optional[str] = None):
        """A concurrent.futures.Future of run(inputs, outputs, output=output), run on this
        context's one worker thread (in submission order). The inputs are read when the run
        starts: do not change them before the future is done. (cuda overrides this with
        pipelined copies.)"""
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nnc-context")
        return self._pool.submit(self.run, inputs, outputs, output=output)

    def close(self) -> None:
        """Waits for queued run_async work and stops the worker (the context stays usable)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _to_numpy(name: str, x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch"):
        x = x.detach()
        if x.is_cuda:
            x = x.cpu()
        return x.numpy()
    if hasattr(x, "__cuda_array_interface__"):  # cupy, numba, ...: copy to the host
        import cupy
        return cupy.asnumpy(cupy.asarray(x))
    try:
        return np.asarray(x)
    except Exception as e:
        raise InputError(f"input {name!r}: cannot convert {type(x).__name__} to an array ({e})") from None


class ReferenceModule(Module):
    """Runs OUT/ir/final.nnir with the numpy reference semantics: no GPU needed.
    in_arena (None: when plan.json has steps, i.e. code was generated): execute the plan itself on
    the CPU (nnc.codegen.plan_exec: every value at its plan offset in one byte arena, temporaries
    poisoned, so a wrong plan gives wrong answers); False: the plain interpreter (nnc.ir.interp),
    whose inputs/outputs come from the IR, so symbolic dims stay symbolic (bound per run)."""

    backend = "reference"

    def __init__(self, out_dir, in_arena: Optional[bool] = None):
        from .cli import load_ir
        from .driver import io_entry
        self.dir = Path(out_dir)
        ir_path = self.dir / "ir" / "final.nnir"
        if not ir_path.is_file():
            raise NncError(f"{self.dir}: no ir/final.nnir (is this a directory written by `nnc compile`?)")
        from .plan_file import read_plan
        plan = read_plan(self.dir) if os.path.lexists(self.dir / "plan.json") else None
        if plan is not None:
            from .integrity import check_ir
            check_ir(self.dir, plan)  # ir/final.* as plan.json recorded them
        self.ir = load_ir(ir_path)
        main = self.ir.main
        self._io = {"inputs": [io_entry(a) for a in main.args], "outputs": [io_entry(r) for r in main.results]}
        self.plan = plan if plan is not None else dict(self._io)
        self.executor = None  # the plan executor, when running in the arena
        from .profiles import profiles_from_plan
        self.profiles = profiles_from_plan(self.plan, str(self.dir / "plan.json"))  # checked per run
        if in_arena or (in_arena is None and plan is not None and "steps" in plan):
            from .codegen.plan_exec import PlanExecutor
            self.executor = PlanExecutor.from_dir(self.dir, plan, self.ir)
            self._io = {k: plan[k] for k in ("inputs", "outputs")}  # the plan's static shapes

    @property
    def in_arena(self) -> bool:
        return self.executor is not None

    def _io_entries(self, kind):
        return self._io[kind]

    def context(self) -> "ReferenceContext":
        return ReferenceContext(self)

    def run(self, inputs, outputs=None, *, output="numpy", stream=None, poison: bool = False,
            executor=None) -> dict:
        """inputs: {name: array} (numpy, or anything numpy/cupy/torch converts). outputs: names to
        return (default all). output: "numpy" or "cupy" (copies results to the GPU). stream and
        poison are accepted for interface parity and have no effect (the interpreter runs on the
        host and every result is a fresh array). executor: a context's PlanExecutor fork (None:
        the module's own, its default context)."""
        from .ir.interp import Interpreter
        if output not in ("cupy", "numpy"):
            raise NncError(f"output must be 'cupy' or 'numpy', not {output!r}")
        if not isinstance(inputs, Mapping):
            raise InputError(f"run(inputs): expected a dict {{input name: array}}, given {type(inputs).__name__}")
        sel = self._selected(outputs)
        feed = {k: _to_numpy(k, v) for k, v in inputs.items()}
        ins = self._io_entries("inputs")
        if self.profiles or any(isinstance(d, str) for e in ins for d in e["shape"] or ()):
            from .profiles import check_run, signature_from_plan  # before anything runs: rank, fixed
            check_run(feed, signature_from_plan(ins), self.profiles)  # dims, shared symbols, the profiles
        executor = self.executor if executor is None else executor
        res = executor.run(feed) if executor is not None else Interpreter(self.ir).run(feed)
        got = {n: np.asarray(res[n]) for n in sel}
        if output == "cupy":
            from .runtime import require_gpu
            cp = require_gpu()
            got = {n: cp.asarray(a) for n, a in got.items()}
        return got


class ReferenceContext(ExecutionContext):
    """A reference-backend context: in the arena, a PlanExecutor fork (the plan, weights.bin and
    the init phase's persistent values shared; its own arena and I/O regions); on the plain
    interpreter, nothing to own (every run makes fresh arrays)."""

    def __init__(self, module: ReferenceModule):
        super().__init__(module)
        self.executor = module.executor.fork() if module.executor is not None else None

    def _run(self, inputs, outputs, output) -> dict:
        return self.module.run(inputs, outputs, output=output or "numpy", executor=self.executor)


# ---------------------------------------------------------------------------- entry points


def load(out, backend: str = "cuda", *, in_arena: Optional[bool] = None, cuda_graph: bool = True,
         transport: str = "auto"):
    """Loads a directory written by `nnc compile` / nnc.compile. backend "cuda" needs a CUDA GPU
    (an NncError says so when there is none); "reference" runs ir/final.nnir with numpy, by default
    inside the plan's arena when plan.json has steps (in_arena: see ReferenceModule). cuda_graph:
    "cuda" replays each run as one CUDA graph captured at load (False: eager launches; see
    nnc.runtime); the reference backend has no launches and ignores it.

    A directory of `nnc compile --devices K` gives a nnc.multi_device.MultiDeviceProgram (same
    inputs / outputs / run / __call__; run returns numpy unless output="cupy"), the whole group
    brought up: transport "nccl" (device k on GPU k, NCCL), "copy" (every device on the one
    current GPU, copies standing in for NCCL) or "auto" (nccl when K GPUs are present, else copy,
    with a warning). transport is for multi-device directories only."""
    if backend not in BACKENDS:
        raise NncError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, not {backend!r}")
    out = Path(out)
    if not out.is_dir():
        raise NncError(f"{out}: no such directory")
    from .multi_device import MultiDeviceProgram, is_multi_device_dir
    if is_multi_device_dir(out):  # nnc compile --devices K (compiler/multi_device.py)
        if in_arena is not None:
            raise NncError("in_arena: a multi-device directory runs its IR on simulated devices (reference) "
                           "or its builds (cuda); no arena choice")
        return MultiDeviceProgram(out, backend, transport, cuda_graph=cuda_graph)
    if transport != "auto":
        raise NncError(f"transport={transport!r}: only for a directory compiled with --devices K ({out} is one device)")
    from .profiles import ProfileSetModule
    if ProfileSetModule.is_profile_set(out):  # several builds, one per profile (compiler/profiles.py)
        return ProfileSetModule(out, backend, in_arena=in_arena, cuda_graph=cuda_graph)
    if backend == "reference":
        return ReferenceModule(out, in_arena=in_arena)
    if in_arena is not None:
        raise NncError("in_arena chooses how the reference backend runs; not with backend='cuda'")
    from .runtime import Module as CudaModule
    return CudaModule(out, cuda_graph=cuda_graph)


def _model_arg(model):
    """A path, bytes or onnx.ModelProto -> what import_model takes (a path or a ModelProto)."""
    if isinstance(model, (str, os.PathLike)):
        return Path(model)
    if isinstance(model, (bytes, bytearray, memoryview)):
        import onnx
        data = bytes(model)
        if not data:
            raise ImportError_("model bytes are empty")
        m = onnx.ModelProto()
        try:
            m.ParseFromString(data)
        except Exception as e:
            raise ImportError_(f"model bytes are not an ONNX ModelProto ({e})") from None
        return m
    import onnx
    if isinstance(model, onnx.ModelProto):
        return model
    raise NncError(f"model must be a path, bytes or an onnx.ModelProto, not {type(model).__name__}")


def compile(model, shapes=None, precision: str = "fp32", out=None, backend: str = "cuda", arch=None,
            tf32: bool = False, name: Optional[str] = None, *, codegen: Optional[bool] = None,
            cuda_compiler: str = "nvrtc", verify_each: bool = False, cache: bool = True,
            jobs: Optional[int] = None, fuse: bool = True, tune: Optional[bool] = None,
            tune_budget: Optional[float] = None, timing_cache=None, keep_fp32=(), allow=(),
            max_rel_err: Optional[float] = None, calib_data=None, profiles=None, calib=None,
            options: Optional[CompileOptions] = None) -> Module:
    """Compiles an ONNX model and loads it: nnc.compile("m.onnx", shapes={"x": [1, 3, 8, 8]}).

    model: a path, bytes or an onnx.ModelProto. shapes: {input: dims} or "x:1x3x8x8,..." (the
    CLI's --shapes). out: the output directory; None compiles into a temporary directory that the
    returned Module owns (removed with it, or by Module.close()). backend: "cuda" (needs a GPU; the
    check comes before the compile) or "reference" (numpy; CUDA codegen skipped unless
    codegen=True). name: the C API name (default: the file's stem). cache=False: bypass the cubin
    cache; jobs: CUDA compile processes. fuse=False: no fusion passes (about one kernel per op).
    tune: time the kernel candidates on the GPU (None: when a GPU is present), tune_budget: seconds
    for it, timing_cache: a file of past timings (codegen/timing_cache.py). keep_fp32: layers
    pinned at fp32 (node-name globs or op types); precision="best" with allow (float types),
    max_rel_err and calib_data chooses each layer's precision (README "Mixed precision").
    precision="int8" with calib (calib.json from `nnc calibrate`, or a TensorRT calibration cache).
    profiles: optimization profiles (nnc.Profile, "x:MIN/OPT/MAX,..." or {input: (min, opt, max)},
    one or a list; compiler/profiles.py says what each compiles to).
    options: a CompileOptions instead of the keyword arguments."""
    from .driver import compile_model
    opts = options or CompileOptions(shapes=normalize_shapes(shapes), precision=precision, backend=backend,
                                     arch=arch, tf32=tf32, name=name, codegen=codegen,
                                     cuda_compiler=cuda_compiler, verify_each=verify_each, cache=cache,
                                     jobs=jobs, fuse=fuse, tune=tune, tune_budget=tune_budget,
                                     timing_cache=timing_cache, keep_fp32=keep_fp32, allow=allow,
                                     max_rel_err=max_rel_err, calib_data=calib_data,
                                     profiles=profiles, calib=calib)
    if opts.backend == "cuda":
        from .runtime import require_gpu
        require_gpu()  # before a compile that could take a while
    src = _model_arg(model)
    tmp = tempfile.mkdtemp(prefix="nnc_compile_") if out is None else None
    try:
        compile_model(src, tmp or out, options=opts)
        m = load(tmp or out, backend=opts.backend)
    except BaseException:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if tmp:
        m._own_dir(tmp)
    return m
