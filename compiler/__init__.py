"""nnc: an ahead-of-time compiler from ONNX models to CUDA C++.

    import nnc
    m = nnc.compile("model.onnx", shapes={"input": [1, 3, 224, 224]})   # -> nnc.Module (CUDA)
    m = nnc.compile("model.onnx", backend="reference")                  # numpy, no GPU needed
    m = nnc.load("out/")                                                 # a `nnc compile` directory
    m = nnc.compile("model.onnx", profiles=["input:1x3x224x224/8x3x224x224/32x3x224x224"],
                    backend="reference")                                 # one build for a range (nnc.Profile)
    m.inputs, m.outputs                 # TensorInfo(name, dtype, shape) tuples
    y = m(x)                            # or m.run({"input": x}, outputs=["probs"], output="numpy")

    module = nnc.import_onnx("model.onnx")       # the IR (nnc.ir.Module)
    print(nnc.ir.print_module(module))

See nnc.api for the Module interface. Importing nnc never needs a GPU (cupy is imported lazily).
"""
from . import api, ir  # noqa: F401  (nnc.api, nnc.ir)
from .api import CompileOptions, Module, TensorInfo, compile, load  # noqa: A004  (nnc.compile, like torch.compile)
from .ir.errors import NncError
from .profiles import Profile  # nnc.Profile: min/opt/max input shapes (--profile)


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
