"""Checks on a ModelProto before import: the file is untrusted, so what ONNX requires of a model
(a graph, an opset, outputs, one producer per name) is checked here with errors that name the
offending value or node, instead of failing later with a traceback or importing something else.

Strings: protobuf hands back `bytes` for a string field that is not valid UTF-8. Every such field
is decoded here with errors="backslashreplace" (byte 0xff becomes the four characters `\\xff`),
so names stay distinct and printable, and everything downstream sees `str` only. Escaping names
into generated source is the code generator's job; this only makes them text.
"""
from __future__ import annotations

import onnx
from google.protobuf.descriptor import FieldDescriptor

from ..ir.errors import ImportError_

_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


def _is_repeated(fd) -> bool:
    rep = getattr(fd, "is_repeated", None)  # protobuf >= 6 spells it so; label is deprecated
    return rep if rep is not None else fd.label == FieldDescriptor.LABEL_REPEATED


def decode_strings(msg) -> int:
    """Replaces undecodable string fields of `msg` and every nested message in place; returns
    how many were fixed. Iterative, so a deeply nested model cannot exhaust the Python stack."""
    fixed = 0
    stack = [msg]
    while stack:
        m = stack.pop()
        for fd, val in m.ListFields():
            if fd.type == _MESSAGE:
                if fd.message_type.GetOptions().map_entry:
                    continue  # no map fields in onnx.proto; skip rather than guess
                stack.extend(val if _is_repeated(fd) else [val])
            elif fd.type == _STRING:
                if _is_repeated(fd):
                    if any(isinstance(x, bytes) for x in val):
                        new = [_text(x) for x in val]
                        del val[:]
                        val.extend(new)
                        fixed += 1
                elif isinstance(val, bytes):
                    setattr(m, fd.name, _text(val))
                    fixed += 1
    return fixed


def _text(x) -> str:
    return x.decode("utf-8", errors="backslashreplace") if isinstance(x, bytes) else x


def check_model(model: onnx.ModelProto, what: str = "model") -> None:
    """What must hold of any ModelProto nnc imports (called before anything reads the graph)."""
    if not isinstance(model, onnx.ModelProto):
        raise ImportError_(f"{what}: expected an onnx.ModelProto, got {type(model).__name__}")
    decode_strings(model)
    if not model.HasField("graph"):
        raise ImportError_(f"{what}: not an ONNX model: it has no graph (an empty file, or bytes "
                           f"of another kind, such as a bare GraphProto)")
    default = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not model.opset_import or not default:
        uses_default = _uses_default_domain(model.graph)
        if uses_default or not model.opset_import:
            raise ImportError_(f"{what}: declares no opset for the default ONNX domain (opset_import "
                               f"lists {[o.domain or 'ai.onnx' for o in model.opset_import]})")
    if len(default) > 1:
        raise ImportError_(f"{what}: opset_import lists the default domain {len(default)} times")
    if not model.graph.output:
        raise ImportError_(f"{what}: graph {model.graph.name!r} has no outputs")


def _uses_default_domain(g: onnx.GraphProto) -> bool:
    stack = [g]
    while stack:
        g = stack.pop()
        for n in g.node:
            if n.domain in ("", "ai.onnx"):
                return True
            for a in n.attribute:
                if a.HasField("g"):
                    stack.append(a.g)
                stack.extend(a.graphs)
    return False


def check_unique(names, what: str, where: str, problem: str = "is defined more than once") -> None:
    """ONNX names are SSA: each may be defined once (graph inputs, initializers, node outputs)."""
    seen = set()
    for n in names:
        if n in seen:
            raise ImportError_(f"{where}: {what} {n!r} {problem}")
        seen.add(n)
