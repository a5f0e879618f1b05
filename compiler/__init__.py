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


__all__ = ["NncError", "import_onnx"]
