"""`onnx.backend.base.Backend` over nnc: device "CPU" runs the reference interpreter on the
imported IR; device "CUDA" compiles and runs generated kernels (see nnc.runtime).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep

from .ir.interp import Interpreter
from .ir.verify import verify
from .onnx_import import import_model


SPECIALIZE_MAX_ELEMENTS = 64  # inputs at most this big may be baked in as constants (CUDA)


def _value_dependent(msg: str) -> bool:
    """The static compile failed because shapes or control flow depend on input values."""
    return "needs static shapes" in msg or any(f"no CUDA lowering for op '{c}'" in msg for c in ("If", "Loop", "Scan"))


class NncRep(BackendRep):
    def __init__(self, module, device: str, model: onnx.ModelProto | None = None):
        self.module = module
        self.model = model
        self.device = device
        self.input_names = [a.name for a in module.main.args]
        self._cuda = None
        self._static_error = None
        self._specialized: dict = {}  # (bound input values) -> compiled module
        self.last_kernel_launches = None  # kernels the last CUDA run launched (0: it all folded)

    def run(self, inputs, **kwargs):
        if isinstance(inputs, dict):
            feed = dict(inputs)
        else:
            if not isinstance(inputs, (list, tuple)):
                inputs = [inputs]
            feed = dict(zip(self.input_names, inputs))
        feed = {k: np.asarray(v) for k, v in feed.items()}
        if self.device == "CPU":
            out = Interpreter(self.module).run(feed)
        else:
            out = self._cuda_run(feed)
        return [out[v.name] for v in self.module.main.results]

    def _run_compiled(self, m, feed):
        self.last_kernel_launches = sum(l["kind"] == "kernel" for l in m.plan["launches"])
        return m.run(feed, output="numpy")

    @property
    def specialized(self) -> bool:
        """True once a run needed a value-specialised compile (see _cuda_run)."""
        return bool(self._specialized)

    def _cuda_run(self, feed):
        """Compiles the model once. When its shapes or control flow depend on input values (a
        shape tensor or a loop trip count fed as an input, so codegen cannot plan static buffers or
        flatten the loop), specialise instead: small inputs are bound as constants, folded, and the
        model is compiled for those values (cached by value), first integer inputs only, then all
        small inputs."""
        from .ir.errors import NncError
        from .runtime import compile_module_for_backend
        if self._cuda is None and self._static_error is None:
            try:
                self._cuda = compile_module_for_backend(self.module)
            except NncError as e:
                # only value-dependent shapes and control flow (loop trip counts, If conditions fed
                # as inputs) are worth specialising; any other missing lowering stays an error
                if self.model is None or not _value_dependent(str(e)):
                    raise
                self._static_error = e
        if self._cuda is not None:
            return self._run_compiled(self._cuda, feed)
        last = self._static_error
        for ints_only in (True, False):
            bound = {k: v for k, v in feed.items() if v.size <= SPECIALIZE_MAX_ELEMENTS
                     and (v.dtype.kind in "iub" or not ints_only)}
            if not bound:
                continue
            key = tuple(sorted((k, v.dtype.str, v.shape, v.tobytes()) for k, v in bound.items()))
            if key not in self._specialized:
                try:
                    m = import_model(self.model, constants=bound)
                    verify(m)
                    self._specialized[key] = compile_module_for_backend(m)
                except NncError as e:
                    last = e
                    continue
            rest = {k: v for k, v in feed.items() if k not in bound}
            return self._run_compiled(self._specialized[key], rest)
        raise last


class NncBackend(Backend):
    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs) -> NncRep:
        # onnx's base prepare only runs onnx.checker, which rejects valid models with shapeless
        # outputs; nnc's importer validates what it needs and names the node when it cannot.
        module = import_model(model)
        verify(module)
        return NncRep(module, device.split(":")[0].upper(), model)

    @classmethod
    def run_model(cls, model, inputs, device="CPU", **kwargs):
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node, inputs, device="CPU", outputs_info=None, **kwargs):
        raise NotImplementedError("run_node: use run_model with a one-node model")

    @classmethod
    def supports_device(cls, device: str) -> bool:
        d = device.split(":")[0].upper()
        if d == "CPU":
            return True
        if d == "CUDA":
            from .runtime import gpu_available
            return gpu_available()
        return False


prepare = NncBackend.prepare
run_model = NncBackend.run_model
supports_device = NncBackend.supports_device
