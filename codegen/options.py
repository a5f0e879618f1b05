"""Code generation options: typed, frozen, and the one place environment variables are read.

    opts = LowerOptions(resolve_target("sm_90"), precision="fp16")
    plan = lower(module, opts)            # ctx.options.tf32, ctx.target.sm_count in lowerings

Environment variables are defaults only, each read here, when an option object is made (not at
import, so a test can set one): NNC_RNN_STEPWISE (RNN lowering mode), NNC_CACHE_DIR /
XDG_CACHE_HOME (the cubin cache), NNC_TUNE (the tuning default), NNC_STRICT_PRELUDE (no full-prelude fallback: tests),
NNC_CUDA_INCLUDE and NNC_NVCC (where the CUDA headers and nvcc are).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping, Optional

from ..ir.errors import NncError
from .target import Target, for_arch, resolve_target

PRECISIONS = ("fp32", "fp16", "bf16")


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def env_rnn_stepwise() -> bool:
    return _flag("NNC_RNN_STEPWISE")


def env_strict_prelude() -> bool:
    return bool(os.environ.get("NNC_STRICT_PRELUDE"))


def env_cache_dir() -> Path:
    """$NNC_CACHE_DIR, else $XDG_CACHE_HOME/nnc, else ~/.cache/nnc."""
    if os.environ.get("NNC_CACHE_DIR"):
        return Path(os.environ["NNC_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache") / "nnc"


def env_tune():
    """$NNC_TUNE: "0" never tune by default, "1" always (needs a GPU), unset/"": tune when a GPU is
    present (nnc.CompileOptions.tuning; an explicit tune= / --no-tune wins)."""
    v = os.environ.get("NNC_TUNE", "")
    return None if v == "" else v not in ("0", "false", "no", "off")


def env_cuda_include() -> str:
    return os.environ.get("NNC_CUDA_INCLUDE", "/usr/local/cuda/include")


def env_nvcc() -> Optional[str]:
    return os.environ.get("NNC_NVCC") or None


@dataclass(frozen=True)
class LowerOptions:
    """What lowering decides with: the device, the precision the passes chose, and the knobs."""
    target: Target = field(default_factory=resolve_target)
    precision: str = "fp32"
    tf32: bool = False  # fp32 GEMM/conv on TF32 tensor cores
    rnn_stepwise: bool = field(default_factory=env_rnn_stepwise)  # one launch a time step (debugging)
    selector: str = "heuristic"  # who chooses among each op's kernel variants: a name of codegen/variants.SELECTORS
    zero_copy_concat: bool = True  # Concat inputs written straight into its output (codegen/memory.concat_slots)
    # timing-based selection (codegen/tuning.py): needs a GPU; nnc.CompileOptions decides the default
    tune: bool = False  # time every candidate on the GPU and keep the fastest correct one
    tune_budget: Optional[float] = None  # seconds of GPU timing (None: no bound; compile not counted); then the heuristic
    timing_cache: Optional[str] = None  # the timing cache file read and written (codegen/timing_cache.py)
    tune_reason: str = ""  # why tuning is on or off (plan.json "tuning" and -v say it)
    # a range profile's symbolic dims ((name, min, opt, max), ...): buffers sized at max, kernels take
    # the sizes at run time (codegen/runtime_sizes.py; compiler/profiles.py); () = static shapes
    symbol_ranges: tuple = ()

    def __post_init__(self):
        if not isinstance(self.target, Target):
            raise NncError(f"LowerOptions.target must be a Target, not {type(self.target).__name__}")
        if self.precision not in PRECISIONS:
            raise NncError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, not {self.precision!r}")
        object.__setattr__(self, "tf32", bool(self.tf32))
        object.__setattr__(self, "rnn_stepwise", bool(self.rnn_stepwise))
        object.__setattr__(self, "zero_copy_concat", bool(self.zero_copy_concat))
        object.__setattr__(self, "tune", bool(self.tune))
        if self.tune_budget is not None:
            if isinstance(self.tune_budget, bool) or not isinstance(self.tune_budget, (int, float)) \
                    or not self.tune_budget > 0:
                raise NncError(f"tune_budget must be a positive number of seconds or None, not {self.tune_budget!r}")
            object.__setattr__(self, "tune_budget", float(self.tune_budget))
        if self.timing_cache is not None:
            object.__setattr__(self, "timing_cache", str(self.timing_cache))
        from .variants import SELECTORS
        if self.selector not in SELECTORS:
            raise NncError(f"selector must be one of {', '.join(map(repr, sorted(SELECTORS)))}, not {self.selector!r}")

    @property
    def arch(self) -> str:
        return self.target.arch

    @classmethod
    def from_dict(cls, d: Optional[Mapping]) -> "LowerOptions":
        """The old dict form {"arch", "precision", "tf32", "rnn_stepwise"}; other keys are errors."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)} | {"arch"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise NncError(f"unknown lowering options {unknown} (known: {sorted(known)})")
        if "arch" in d and "target" not in d:
            arch = d.pop("arch")
            d["target"] = resolve_target(None) if arch is None else for_arch(arch)
        else:
            d.pop("arch", None)
        return cls(**d)

    def to_json(self) -> dict:
        return {"arch": self.arch, "precision": self.precision, "tf32": self.tf32,
                "rnn_stepwise": self.rnn_stepwise}


CUDA_COMPILERS = ("nvrtc", "nvcc")


@dataclass(frozen=True)
class CodegenOptions:
    """What compile_to_dir (codegen/emit.py) decides with: lowering's options, then how the CUDA
    is compiled. cache: read and write the cubin cache ($NNC_CACHE_DIR, ...); jobs: compile
    processes (None: the CPUs)."""
    lower: LowerOptions = field(default_factory=LowerOptions)
    backend: str = "nvrtc"  # the CUDA compiler
    cache: bool = True
    jobs: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.lower, LowerOptions):
            raise NncError(f"CodegenOptions.lower must be a LowerOptions, not {type(self.lower).__name__}")
        if self.backend not in CUDA_COMPILERS:
            raise NncError(f"CUDA compiler must be one of {', '.join(map(repr, CUDA_COMPILERS))}, "
                           f"not {self.backend!r}")

    @property
    def target(self) -> Target:
        return self.lower.target
