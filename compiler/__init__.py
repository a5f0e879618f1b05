"""nnc: an ahead-of-time compiler from ONNX models to CUDA C++.

    import nnc
    m = nnc.compile("model.onnx", shapes={"input": [1, 3, 224, 224]})   # -> nnc.Module (CUDA)
    m = nnc.compile("model.onnx", backend="reference")                  # numpy, no GPU needed
    m = nnc.load("out/")                                                 # a `nnc compile` directory
    m.inputs, m.outputs                 # TensorInfo(name, dtype, shape) tuples
    y = m(x)                            # or m.run({"input": x}, outputs=["probs"], output="numpy")

    module = nnc.import_onnx("model.onnx")       # the IR (nnc.ir.Module)
    print(nnc.ir.print_module(module))

See nnc.api for the Module interface. Importing nnc never needs a GPU (cupy is imported lazily).
"""
import inspect as _inspect
import types as _types

from . import api, ir  # noqa: F401  (nnc.api, nnc.ir)
from . import compile as _driver  # the compile driver module, nnc/compile.py (compile_model)
from .api import CompileOptions, Module, TensorInfo, load
from .ir.errors import NncError


class _CallableModule(_types.ModuleType):
    """`nnc.compile` names both the driver module (nnc/compile.py: `from nnc.compile import
    compile_model`, `import nnc.compile as comp`) and the one-call API: Python binds a package's
    submodule to the package attribute of the same name whenever it is imported, so a plain
    function there would be replaced (or would shadow the module). Calling the module is
    nnc.api.compile."""

    def __call__(self, *args, **kwargs):
        return api.compile(*args, **kwargs)


_driver.__class__ = _CallableModule
_driver.__signature__ = _inspect.signature(api.compile)  # help()/IDEs show compile()'s parameters
_CallableModule.__call__.__doc__ = api.compile.__doc__
compile = _driver


def _version() -> str:
    """The installed distribution's version; from a source tree that is not installed, the one
    in pyproject.toml (the single place it is written)."""
    from importlib import metadata
    try:
        return metadata.version("nnc")
    except metadata.PackageNotFoundError:
        pass
    from pathlib import Path
    try:
        import tomllib
        with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (ImportError, OSError, KeyError, ValueError):
        return "0+unknown"


__version__ = _version()


def import_onnx(path_or_model, shapes=None):
    """Imports an ONNX model (path or ModelProto) into the IR; shapes: {input: dims}."""
    from .onnx_import import import_model
    return import_model(path_or_model, shapes=shapes)


__all__ = ["CompileOptions", "Module", "NncError", "TensorInfo", "__version__", "compile", "import_onnx", "load"]
