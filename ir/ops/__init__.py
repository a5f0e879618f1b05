"""Op families. Importing this package registers every op (see ir/registry.py).

Each module holds one family: attrs dataclasses, shape inference and numpy reference semantics,
registered with `register(...)`. The names are ONNX's where the op is ONNX's (semantics of the
newest opset; the importer normalises older opsets), lowercase for nnc's own ops (const, fused).
"""
import importlib
import pkgutil

for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _m.startswith("_"):
        importlib.import_module(f"{__name__}.{_m}")
