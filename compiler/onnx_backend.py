"""`onnx.backend.base.Backend` over nnc: device "CPU" runs the reference interpreter on the
imported IR; device "CUDA" compiles and runs generated kernels (see nnc.runtime).
"""
from __future__ import annotations

import shutil
import tempfile
import weakref

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep

from .ir.interp import Interpreter
from .ir.verify import verify
from .onnx_import import import_model


def compile_module_for_backend(ir_module, arch=None):
    """Compiles an IR module into a temporary directory and loads it (device CUDA). Here, not in
    the runtime: the runtime loads and runs, it never compiles."""
    from .codegen.emit import compile_to_dir
    from .pipeline import run_passes
    from .runtime import Module
    run_passes(ir_module)  # flattens If/Loop/Scan where static: the CUDA plan has no control flow
    d = tempfile.mkdtemp(prefix="nnc_backend_")
    try:
        compile_to_dir(ir_module, d, arch=arch)
        m = Module(d)
    except Exception:
        shutil.rmtree(d, ignore_errors=True)
        raise
    m._tmpdir = d
    weakref.finalize(m, shutil.rmtree, d, True)  # the backend's scratch directory goes with the module
    return m


SPECIALIZE_MAX_ELEMENTS = 64  # inputs at most this big may be baked in as constants (CUDA)


# ops that are pure functions of scalar operands, which their CUDA lowering evaluates at compile time
GENERATORS = ("MelWeightMatrix", "HannWindow", "HammingWindow", "BlackmanWindow")


def shape_inputs(module) -> set[str]:
    """Names of the model inputs whose *values* decide shapes or control flow: those that shape
    inference reads as constants (Reshape targets, Resize sizes, Range bounds...), Loop trip counts
    and conditions, If conditions, and every input those values are computed from."""
    from .ir import registry
    from .ir.builder import const_value
    from .ir.errors import NncError
    args = {id(a): a.name for a in module.main.args}
    wanted: dict[int, object] = {}

    def record(v):
        if v is not None:
            wanted[id(v)] = v
        return None if v is None else const_value(v, module.weights)

    for op in module.main.walk():
        if op.name in GENERATORS:  # lowered by evaluation at compile time: every operand decides
            for v in op.operands:
                record(v)
        if op.name in ("Loop", "If"):
            for v in op.operands[:2 if op.name == "Loop" else 1]:
                record(v)
        try:
            registry.run_infer(registry.get(op.name), op.attrs, op.operands, len(op.results), op.loc, record,
                               [r.type for r in op.results])
        except NncError:
            pass
    todo = list(wanted.values())
    while todo:  # backwards: whatever a shape value is computed from decides it too
        v = todo.pop()
        if v.producer is not None:
            for u in v.producer.operands:
                if u is not None and id(u) not in wanted:
                    wanted[id(u)] = u
                    todo.append(u)
    return {args[i] for i in wanted if i in args}


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
        # the load-time init phase counts too: its kernels ran for this model (codegen/init_phase.py)
        self.last_kernel_launches = sum(l["kind"] == "kernel" for l in m.plan.get("init_launches", []) + m.plan["launches"])
        return m.run(feed, output="numpy")

    @property
    def specialized(self) -> bool:
        """True once a run needed a value-specialised compile (see _cuda_run)."""
        return bool(self._specialized)

    def _cuda_run(self, feed):
        """Compiles the model once. When its shapes or control flow depend on input values (a
        shape tensor or a loop trip count fed as an input, so codegen cannot plan static buffers or
        flatten the loop), specialise instead: exactly those inputs (`shape_inputs`) are bound as
        constants, folded, and the model is compiled for their values (cached by value). Data
        inputs stay inputs, so their computation still runs as kernels."""
        from .ir.errors import NncError
        if self._cuda is None and self._static_error is None:
            try:
                self._cuda = compile_module_for_backend(self.module)
            except NncError as e:
                # only value-dependent shapes and control flow (loop trip counts, If conditions fed
                # as inputs) are worth specialising; any other missing lowering stays an error
                if self.model is None or not _value_dependent(str(e)):
                    raise
                self._static_error = e
                self._shape_inputs = shape_inputs(import_model(self.model))
        if self._cuda is not None:
            return self._run_compiled(self._cuda, feed)
        bound = {k: v for k, v in feed.items() if k in self._shape_inputs and v.size <= SPECIALIZE_MAX_ELEMENTS}
        if not bound:
            raise self._static_error
        key = tuple(sorted((k, v.dtype.str, v.shape, v.tobytes()) for k, v in bound.items()))
        if key not in self._specialized:
            m = import_model(self.model, constants=bound)
            verify(m)
            self._specialized[key] = compile_module_for_backend(m)
        rest = {k: v for k, v in feed.items() if k not in bound}
        return self._run_compiled(self._specialized[key], rest)



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
