"""nnc's textual IR: types, graph, registry, parser/printer, verifier, reference interpreter."""
from .errors import IRParseError, NncError, ShapeError, VerifyError
from .graph import Function, Loc, Module, Op, Region, Value
from .interp import Interpreter, run
from .parser import parse, parse_type
from .printer import print_module
from .types import DTYPES, TensorType, dtype, tensor
from .verify import verify
from .weights import WeightStore

__all__ = ["IRParseError", "NncError", "ShapeError", "VerifyError", "Function", "Loc", "Module", "Op",
           "Region", "Value", "Interpreter", "run", "parse", "parse_type", "print_module", "DTYPES",
           "TensorType", "dtype", "tensor", "verify", "WeightStore"]
