"""Tensors stored outside the .onnx file (TensorProto.data_location == EXTERNAL), read by nnc itself.

The model is untrusted and so is every `location` it names. Whatever onnx version is installed
(its own checks changed across releases), a location is accepted only when it is a relative path
without "..", every component below the model's directory is a real directory or, last, a regular
file (no symbolic links), the resolved path stays inside the model's directory, and `offset` /
`length` lie within the file. The bytes are then handed to onnx as raw_data.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import onnx

from ..ir.errors import ImportError_

_KEYS = {"location", "offset", "length", "checksum", "basepath"}


def is_external(t: onnx.TensorProto) -> bool:
    return t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL


def _int_entry(what: str, key: str, value: str) -> int:
    if not value.isdigit() or not value.isascii():
        raise ImportError_(f"{what}: external data {key} {value!r} is not a non-negative integer")
    return int(value)


def _checked_path(what: str, base_dir: str, location: str) -> Path:
    if not base_dir:
        raise ImportError_(f"{what}: its data is in an external file ({location!r}); load the model "
                           f"from its file so nnc knows the directory to read it from")
    if not location or "\0" in location:
        raise ImportError_(f"{what}: external data location {location!r} is empty or holds a NUL")
    parts = location.replace("\\", "/").split("/")
    if location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":") or os.path.isabs(location):
        raise ImportError_(f"{what}: external data location {location!r} is absolute; it must be "
                           f"relative to the model's directory")
    if ".." in parts:
        raise ImportError_(f"{what}: external data location {location!r} leaves the model's directory ('..')")
    base = Path(os.path.realpath(base_dir))
    p = base
    comps = [c for c in parts if c not in ("", ".")]
    if not comps:
        raise ImportError_(f"{what}: external data location {location!r} names no file")
    for i, c in enumerate(comps):
        p = p / c
        try:
            st = os.lstat(p)
        except OSError:
            raise ImportError_(f"{what}: external data file {location!r} does not exist beside the model "
                               f"(in {base})") from None
        if stat.S_ISLNK(st.st_mode):
            raise ImportError_(f"{what}: external data location {location!r} goes through a symbolic "
                               f"link ({p}); nnc does not follow links out of a model's directory")
        last = i == len(comps) - 1
        if last and not stat.S_ISREG(st.st_mode):
            raise ImportError_(f"{what}: external data location {location!r} is not a regular file")
        if not last and not stat.S_ISDIR(st.st_mode):
            raise ImportError_(f"{what}: external data location {location!r}: {c!r} is not a directory")
    if os.path.commonpath([base, os.path.realpath(p)]) != str(base):  # belt and braces
        raise ImportError_(f"{what}: external data location {location!r} resolves outside the model's directory")
    return p


def read_external(t: onnx.TensorProto, base_dir: str, what: str) -> onnx.TensorProto:
    """A copy of `t` with its external bytes read into raw_data (checked as the docstring says)."""
    entries = {}
    for e in t.external_data:
        if e.key not in _KEYS:
            raise ImportError_(f"{what}: unknown external data key {e.key!r}")
        entries[e.key] = e.value
    if "location" not in entries:
        raise ImportError_(f"{what}: stored externally but names no location")
    path = _checked_path(what, base_dir, entries["location"])
    offset = _int_entry(what, "offset", entries["offset"]) if "offset" in entries else 0
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ImportError_(f"{what}: cannot open external data {entries['location']!r} ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        length = _int_entry(what, "length", entries["length"]) if "length" in entries else size - offset
        if offset > size or length < 0 or offset + length > size:
            raise ImportError_(f"{what}: external data {entries['location']!r} offset {offset} length "
                               f"{length} lies beyond the file's {size} bytes")
        f.seek(offset)
        data = f.read(length)
    out = onnx.TensorProto()
    out.CopyFrom(t)
    del out.external_data[:]
    out.data_location = onnx.TensorProto.DEFAULT
    out.raw_data = data
    return out


def inline_external(model: onnx.ModelProto, base_dir: str) -> onnx.ModelProto:
    """`model` with every externally stored tensor (initializers and tensor attributes, subgraphs
    included) read in through read_external, for code that hands the proto to another library
    (nnc verify's onnxruntime run) instead of letting onnx.load follow the locations itself."""
    stack = [model.graph]
    while stack:
        g = stack.pop()
        for i, t in enumerate(g.initializer):
            if is_external(t):
                g.initializer[i].CopyFrom(read_external(t, base_dir, f"initializer {t.name!r}"))
        for node in g.node:
            for a in node.attribute:
                if a.HasField("t") and is_external(a.t):
                    a.t.CopyFrom(read_external(a.t, base_dir, f"node {node.name!r} attribute {a.name!r}"))
                stack.extend(a.graphs)
                if a.HasField("g"):
                    stack.append(a.g)
    return model
