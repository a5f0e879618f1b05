"""ONNX ModelProto -> nnc IR.

Most ONNX ops map one-to-one onto an IR op of the same name: the generic importer converts the
node's attributes through the op's attrs schema. Ops whose form changed across opsets 11..21
(attributes that became inputs, and the like) have a small function in one of the family files
of this package, in a table keyed by op type, that normalises them to the newest form.

Constant subgraphs (Shape->Gather->Concat->Reshape and friends) fold while importing: the builder
evaluates any op whose operands are all small constants (see ir/builder.py).
"""
from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from ..ir import registry, symbolic
from ..ir.builder import Builder
from ..ir.errors import ImportError_, NncError
from ..ir.graph import Function, Loc, Module, NameGen, Region, Value
from ..ir.types import TensorType, dtype
from ..ir.weights import WeightStore
from ._external_data import is_external, read_external
from ._validate import check_model, check_unique

MIN_OPSET, MAX_OPSET = 1, 28  # the node suite reaches opset 28
IMPORTERS: dict[str, Callable] = {}


def importer(*op_types: str):
    """Registers a special importer for ONNX op types (fails on duplicates)."""
    def deco(fn):
        for t in op_types:
            if t in IMPORTERS:
                raise RuntimeError(f"importer for {t!r} registered twice")
            IMPORTERS[t] = fn
        return fn
    return deco


_LOADED = False


def _load_families():
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for m in sorted(x.name for x in pkgutil.iter_modules(__path__)):
            if not m.startswith("_"):
                importlib.import_module(f"{__name__}.{m}")


@dataclass
class NodeCtx:
    """What an importer function sees for one ONNX node."""
    node: onnx.NodeProto
    opset: int
    inputs: list  # list[Value | None]; None = omitted optional input
    attrs: dict  # raw python values (tensors as numpy, graphs as Region)
    b: Builder
    imp: "_Importer"
    loc: Loc = field(default_factory=Loc)

    @property
    def op_type(self) -> str:
        return self.node.op_type

    def fail(self, msg: str):
        raise ImportError_(f"ONNX node {self.node.name!r} ({self.node.op_type}, opset {self.opset}): {msg}")

    def need(self, *idx: int) -> None:
        """Fails cleanly unless inputs idx are given (for importers that read them directly)."""
        for i in idx:
            if i >= len(self.inputs) or self.inputs[i] is None:
                self.fail(f"input {i} is required (the node's inputs are {list(self.node.input)})")

    def value(self, i: int) -> Optional[np.ndarray]:
        """Compile-time value of input i, or None if it is not constant."""
        if i >= len(self.inputs) or self.inputs[i] is None:
            return None
        return self.b.value_of(self.inputs[i])

    def const(self, a, name: str = "") -> Value:
        return self.b.constant(np.asarray(a), name, self.loc)

    def create(self, op: str, operands: list, attrs=None, num_results: Optional[int] = None,
               names: Optional[list] = None) -> list[Value]:
        if num_results is None:
            num_results = len(self.node.output)
        if names is None:
            names = list(self.node.output)[:num_results] if num_results == len(self.node.output) else None
        return self.b.create(op, operands, attrs, num_results=num_results, names=names, loc=self.loc)

    def emit(self, op: str | None = None, operands: list | None = None, attrs=None) -> list[Value]:
        """The generic path: same op, these operands and attrs (defaults: the node's own)."""
        return self.create(op or self.op_type, self.inputs if operands is None else operands,
                           self.attrs if attrs is None else attrs)


def generic_import(ctx: NodeCtx) -> list[Value]:
    return ctx.emit()


def sanitize_symbol(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return s if re.match(r"[A-Za-z_]", s) else "s" + s


def onnx_dtype(elem_type: int, what: str):
    """The DType of an ONNX element type; the error names `what` and the type by its ONNX name."""
    try:
        return dtype(int(elem_type))
    except ValueError:
        try:
            tname = onnx.TensorProto.DataType.Name(elem_type)
        except ValueError:
            tname = "not a TensorProto.DataType"
        raise ImportError_(f"{what}: ONNX element type {tname} ({elem_type}) is not supported") from None


def onnx_type(tp: onnx.TypeProto, shapes: dict, name: str) -> TensorType:
    if not tp.HasField("tensor_type"):
        raise ImportError_(f"value {name!r}: only tensor types are supported, got {tp.WhichOneof('value')}")
    tt = tp.tensor_type
    dt = onnx_dtype(tt.elem_type, f"value {name!r}")
    if not tt.HasField("shape"):
        return TensorType(dt, None)
    dims = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            if d.dim_value < 0:
                raise ImportError_(f"value {name!r}: dim {len(dims)} is {d.dim_value}; dims must be >= 0 "
                                   f"(a symbolic dim is written with dim_param)")
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(symbolic.sym(sanitize_symbol(d.dim_param)))
        else:
            dims.append(symbolic.UNKNOWN)
    return TensorType(dt, tuple(dims))


class _Importer:
    def __init__(self, model: onnx.ModelProto, shapes: Optional[dict], constants: Optional[dict] = None,
                 what: str = "model"):
        check_model(model, what)
        self.model = model
        default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
        self.opset = default[0] if default else 0  # 0: only other domains (ai.onnx.ml) are used
        if default and not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ImportError_(f"{what}: opset {self.opset} is outside the supported range {MIN_OPSET}..{MAX_OPSET}")
        self.shapes = dict(shapes or {})
        self.constants = dict(constants or {})
        self.weights = WeightStore()
        self.names = NameGen()

    def run(self) -> Module:
        g = self.model.graph
        init_names = {i.name for i in g.initializer}
        fn = Function([], [], [], name="main")
        b = Builder(fn, self.weights, self.names, fold=True)
        env: dict[str, Optional[Value]] = {"": None}
        bindings: dict[str, int] = {}
        check_unique([i.name for i in g.input], "graph input", f"graph {g.name!r}")
        check_unique([i.name for i in g.initializer], "initializer", f"graph {g.name!r}")
        check_unique([o.name for o in g.output], "output", f"graph {g.name!r}",
                     "is listed twice in graph.output (a value is one output; add an Identity for a copy)")
        real_inputs = [i for i in g.input if i.name not in init_names]
        unknown = set(self.shapes) - {i.name for i in real_inputs}
        if unknown:
            raise ImportError_(f"--shapes names {sorted(unknown)}, but the model's inputs are "
                               f"{[i.name for i in real_inputs]}")
        for i in [i for i in real_inputs if i.name in self.constants]:  # inputs bound to values
            t = onnx_type(i.type, {}, i.name)
            a = np.asarray(self.constants[i.name])
            if a.dtype != t.dtype.np or (t.shape is not None and len(t.shape) != a.ndim):
                raise ImportError_(f"constant for input {i.name!r}: expected {t}, given {a.dtype}{list(a.shape)}")
            env[i.name] = b.constant(a, i.name, Loc(), i.name)
        real_inputs = [i for i in real_inputs if i.name not in self.constants]
        for i in real_inputs:
            t = onnx_type(i.type, self.shapes, i.name)
            if i.name in self.shapes:
                want = self.shapes[i.name]
                if t.shape is not None and len(t.shape) != len(want):
                    raise ImportError_(f"--shapes {i.name}: model input has rank {len(t.shape)} ({t}), "
                                       f"given {'x'.join(map(str, want))}")
                for d, w in zip(t.shape or (), want):
                    if isinstance(d, int) and d != w:
                        raise ImportError_(f"--shapes {i.name}: dim is fixed to {d} in the model, given {w}")
                    if isinstance(d, symbolic.Expr) and d.kind == "sym":
                        bindings[d.name] = int(w)
                t = t.with_shape(tuple(int(w) for w in want))
            v = Value(self.names(i.name), t)
            fn.args.append(v)
            env[i.name] = v
        for a in fn.args:  # symbols bound through one input bind them in the others too
            if a.type.shape is not None:
                a.type = a.type.with_shape(symbolic.substitute(d, bindings) for d in a.type.shape)
        for init in g.initializer:
            env[init.name] = b.constant(self.tensor(init, f"initializer {init.name!r}"), init.name, Loc(), init.name)
        self.nodes(g.node, b, [env])
        self.tensors = env  # ONNX tensor name -> IR value (main graph), for import_model(tensor_map=)
        results = []
        for o in g.output:
            if o.name not in env or env[o.name] is None:
                raise ImportError_(f"graph output {o.name!r} is not produced by any node")
            results.append(env[o.name])
        fn.results = results
        return Module([fn], self.weights)

    def tensor(self, t: onnx.TensorProto, what: str = "") -> np.ndarray:
        dt = onnx_dtype(t.data_type, what or f"tensor {t.name!r}")
        if is_external(t):  # read by nnc, every location checked (see _external_data.py)
            t = read_external(t, getattr(self, "base_dir", ""), what or f"tensor {t.name!r}")
        try:
            a = numpy_helper.to_array(t)
        except Exception as e:
            raise ImportError_(f"tensor {t.name!r}: cannot read ({e})") from None
        return np.asarray(a).astype(dt.np, copy=False)

    def lookup(self, name: str, scopes: list) -> Optional[Value]:
        for s in reversed(scopes):
            if name in s:
                return s[name]
        return None

    def nodes(self, nodes, b: Builder, scopes: list):
        _load_families()
        env = scopes[-1]
        for node in nodes:
            loc = Loc(node=node.name or f"{node.op_type}:{node.output[0] if node.output else ''}")
            where = f"ONNX node {node.name!r} ({node.op_type}, opset {self.opset})"
            if node.domain not in ("", "ai.onnx", "ai.onnx.ml"):  # ml ops register under their own names
                raise ImportError_(f"{where}: unsupported operator domain {node.domain!r}")
            fn = IMPORTERS.get(node.op_type)
            if fn is None:
                registry._ensure_loaded()
                if node.op_type not in registry.REGISTRY or node.op_type[0].islower():  # lowercase: nnc-internal
                    raise ImportError_(f"{where}: unsupported ONNX op {node.op_type!r}")
            for k, name in enumerate(node.output):
                if name and (name in env or name in node.output[:k]):
                    raise ImportError_(f"{where}: output {name!r} is already defined (by a graph input, "
                                       f"an initializer or another node); ONNX allows one producer per name")
            inputs = []
            for n in node.input:
                v = self.lookup(n, scopes) if n else None
                if n and v is None:
                    raise ImportError_(f"{where}: input {n!r} is not defined before this node")
                inputs.append(v)
            attrs = {}
            for a in node.attribute:
                attrs[a.name] = self.attr(a, b, scopes, where, _arg_hints(node, inputs, self.opset))
            ctx = NodeCtx(node, self.opset, inputs, attrs, b, self, loc)
            try:
                outs = (fn or generic_import)(ctx)
            except ImportError_:
                raise
            except NncError as e:
                raise ImportError_(f"{where}: {e}") from None
            for name, v in zip(node.output, outs):
                if name:
                    env[name] = v

    def attr(self, a: onnx.AttributeProto, b: Builder, scopes: list, where: str, hints=()):
        T = onnx.AttributeProto
        if a.type == T.GRAPH:
            return self.subgraph(a.g, b, scopes, hints)
        if a.type == T.TENSOR:
            return self.tensor(a.t, f"{where}: attribute {a.name!r}")
        if a.type in (T.SPARSE_TENSOR, T.SPARSE_TENSORS, T.TYPE_PROTO, T.TYPE_PROTOS, T.GRAPHS, T.TENSORS):
            raise ImportError_(f"{where}: attribute {a.name!r} of type {T.AttributeType.Name(a.type)} is not supported")
        v = onnx.helper.get_attribute_value(a)
        if a.type == T.FLOAT:  # ONNX floats are float32: keep their shortest float32 spelling
            return float(str(np.float32(v)))
        if a.type == T.FLOATS:
            return [float(str(np.float32(x))) for x in v]
        if isinstance(v, bytes):
            return v.decode()
        if isinstance(v, list):
            return [x.decode() if isinstance(x, bytes) else x for x in v]
        return v

    def subgraph(self, g: onnx.GraphProto, outer: Builder, scopes: list, hints=()) -> Region:
        r = Region([], [], [])
        b = Builder(r, self.weights, self.names, fold=True)
        env: dict = {"": None}
        check_unique([i.name for i in g.input] + [i.name for i in g.initializer], "input or initializer",
                     f"subgraph {g.name!r}")
        for k, i in enumerate(g.input):
            typed = i.type.HasField("tensor_type") and i.type.tensor_type.elem_type != 0
            if i.type.WhichOneof("value") is None or (i.type.HasField("tensor_type") and not typed):
                t = hints[k] if k < len(hints) else None  # untyped body input: the op's operand says
            else:
                t = onnx_type(i.type, {}, i.name) if typed else None
            if t is None:
                raise ImportError_(f"subgraph {g.name!r} input {i.name!r}: only tensor types are supported")
            v = Value(self.names(i.name), t)
            r.args.append(v)
            env[i.name] = v
        for init in g.initializer:
            env[init.name] = b.constant(self.tensor(init), init.name)
        self.nodes(g.node, b, scopes + [env])
        for o in g.output:
            v = self.lookup(o.name, scopes + [env])
            if v is None:
                raise ImportError_(f"subgraph {g.name!r}: output {o.name!r} is not defined")
            r.results.append(v)
        return r


def _arg_hints(node: onnx.NodeProto, inputs: list, opset: int) -> list:
    """Types for sub-graph inputs that the ONNX file leaves untyped, from the node's operands."""
    from ..ir.types import BOOL, I64, TensorType as TT
    if node.op_type == "Loop":
        return [TT(I64, ()), TT(BOOL, ())] + [v.type if v is not None else None for v in inputs[2:]]
    if node.op_type == "Scan" and opset >= 9 and all(v is not None for v in inputs):
        n_scan = next((a.i for a in node.attribute if a.name == "num_scan_inputs"), 0)
        axes = next((list(a.ints) for a in node.attribute if a.name == "scan_input_axes"), [])
        state, scans = inputs[:len(inputs) - n_scan], inputs[len(inputs) - n_scan:]
        out = [v.type for v in state]
        for j, v in enumerate(scans):
            t = v.type
            if t.shape is None:
                out.append(t)
                continue
            ax = axes[j] if j < len(axes) else 0
            ax = ax + len(t.shape) if ax < 0 else ax
            out.append(t.with_shape(t.shape[:ax] + t.shape[ax + 1:]))
        return out
    return []


def import_model(path_or_model, shapes: Optional[dict] = None, constants: Optional[dict] = None,
                 tensor_map: Optional[dict] = None) -> Module:
    """Imports an ONNX model (path or ModelProto). `shapes` binds input dims: {name: [1, 3, 224, 224]}.
    `constants` binds inputs to values ({name: array}): they become constants and fold, which
    specialises shape inputs (a Reshape's target fed as an input, say) into static shapes.
    `tensor_map`, if given, receives {ONNX tensor name: IR Value} for the main graph's tensors."""
    base_dir = ""
    if isinstance(path_or_model, (str, Path)):
        p = Path(path_or_model)
        if not p.exists():
            raise ImportError_(f"{p}: no such file")
        try:
            model = onnx.load(str(p), load_external_data=False)
        except Exception as e:
            raise ImportError_(f"{p}: not a readable ONNX model ({e})") from None
        base_dir = str(p.parent)
    else:
        model = path_or_model
    imp = _Importer(model, shapes, constants, str(path_or_model) if base_dir else "model")
    imp.base_dir = base_dir
    module = imp.run()
    if tensor_map is not None:  # `nnc verify --per-layer` maps IR values back to ONNX tensors
        tensor_map.update({k: v for k, v in imp.tensors.items() if k and v is not None})
    return module


def parse_shapes(spec: str) -> dict:
    """trtexec's convention: 'input:1x3x224x224,mask:1x128'. NAME:DIMS entries joined by ',';
    DIMS are decimal integers >= 0 joined by 'x' (empty: a scalar); the name is split off at the
    last ':', so names may contain ':'. Each input may be named once."""
    out = {}
    if not spec:
        return out
    for part in spec.split(","):
        if ":" not in part:
            raise NncError(f"--shapes: {part!r} is not NAME:DIMxDIM... (e.g. input:1x3x224x224)")
        name, dims = part.rsplit(":", 1)
        if not name:
            raise NncError(f"--shapes: {part!r} has no input name before ':'")
        if name in out:
            raise NncError(f"--shapes: input {name!r} is given twice")
        if dims and not re.fullmatch(r"[0-9]+(x[0-9]+)*", dims):  # not int(): it takes '1_0', ' 3', '-3'
            raise NncError(f"--shapes: {part!r}: dims must be integers >= 0 joined by 'x'")
        out[name] = [int(d) for d in dims.split("x")] if dims else []
    return out
