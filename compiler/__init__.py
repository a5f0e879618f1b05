"""nnc: an ahead-of-time compiler from ONNX models to CUDA C++.

    import nnc
    module = nnc.import_onnx("model.onnx")       # IR (nnc.ir.Module)
    print(nnc.ir.print_module(module))
"""
from . import ir  # noqa: F401  (nnc.ir)
from .ir.errors import NncError


def import_onnx(path_or_model, shapes=None):
    from .onnx_import import import_model
    return import_model(path_or_model, shapes=shapes)


def load(out_dir):
    """Loads a compiled model directory (needs a CUDA GPU; cupy is imported only here)."""
    from .runtime import load as _load
    return _load(out_dir)


__all__ = ["NncError", "import_onnx", "load"]
