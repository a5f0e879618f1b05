"""Shared helpers for op tests: run an ONNX model through nnc's importer + reference interpreter."""
import nnc
from nnc.ir import verify
from nnc.ir.interp import Interpreter


def run_nnc(m, inputs):
    """Imports ModelProto `m`, verifies it, interprets it; returns outputs in graph order."""
    mod = nnc.import_onnx(m)
    verify(mod)
    out = Interpreter(mod).run(dict(inputs))
    return [out[v.name] for v in mod.main.results]
