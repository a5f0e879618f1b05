"""Reads an inputs .npz for `nnc run` without trusting it.

An .npz is a zip of .npy members; np.load would decompress whatever a member claims, so a
3 MB zip bomb or a header claiming 1e12 elements becomes a MemoryError, and a truncated file a
BadZipFile traceback. Here every member is checked against the model's inputs first (name,
then the .npy header's dtype and shape, read from its first bytes) and decompressed only when
its size is exactly what that header implies, through a reader that stops at that size.
"""
from __future__ import annotations

import ast
import lzma
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .ir.errors import InputError
from .ir.types import dtype as to_dtype

_MAGIC = b"\x93NUMPY"
_HEADER_MAX = 1 << 16  # numpy itself refuses longer .npy headers
# A member whose model input has static dims may be exactly that size; with symbolic dims the
# header alone decides, so decompression is bounded (a 3 MB zip bomb holds gigabytes).
MAX_SYMBOLIC_BYTES = 4 << 30


def load_inputs(path, inputs: list[dict]) -> dict[str, np.ndarray]:
    """{name: array} from the .npz at `path`; `inputs` are plan.json's input entries
    ({"name", "dtype", "shape"}, shape dims ints or symbol names)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--inputs {p}: no such file")
    if not zipfile.is_zipfile(p):
        with open(p, "rb") as f:
            if f.read(4) == b"PK\x03\x04":
                raise InputError(f"--inputs {p}: damaged .npz: the zip archive is truncated or corrupt")
        raise InputError(f"--inputs {p}: not an .npz file (an .npz is a zip archive of .npy arrays, "
                         f"as written by numpy.savez)")
    by_name = {i["name"]: i for i in inputs}
    out = {}
    try:
        with zipfile.ZipFile(p) as z:
            for info in z.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                where = f"--inputs {p}: member {info.filename!r}"
                if key not in by_name:
                    raise InputError(f"{where}: the model has no input {key!r} (its inputs: "
                                     f"{sorted(by_name)})")
                if key in out:
                    raise InputError(f"{where}: input {key!r} is given twice")
                out[key] = _read_member(z, info, by_name[key], where)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError, ValueError,
            zlib.error, lzma.LZMAError) as e:  # what zipfile and its decompressors raise on bad data
        raise InputError(f"--inputs {p}: damaged or unsupported .npz ({type(e).__name__}: {e})") from None
    return out


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, want: dict, where: str) -> np.ndarray:
    with z.open(info) as f:
        dt, shape, fortran, header_len = _read_header(f, where)
        exp = to_dtype(want["dtype"])
        if dt.kind == "V" and not dt.fields and dt.itemsize == exp.np.itemsize and exp.np.kind == "V":
            dt = exp.np  # ml_dtypes arrays (bfloat16, float8, ...) are saved as raw void bytes
        if dt.newbyteorder("=") != exp.np:
            raise InputError(f"{where}: input {want['name']!r}: expected dtype {exp.np_name}, given {dt}")
        ws = want.get("shape")
        if ws is not None:
            ok = len(shape) == len(ws) and all(not isinstance(w, int) or w == g for g, w in zip(shape, ws))
            if not ok:
                want_t = f"{exp.short}[{','.join(map(str, ws))}]"
                raise InputError(f"{where}: input {want['name']!r}: expected shape {want_t}, given {list(shape)}")
        from .ir.registry import MAX_ELEMENTS
        n = int(np.prod(shape, dtype=object))
        if n > MAX_ELEMENTS:
            raise InputError(f"{where}: {n} elements is more than nnc accepts")
        nbytes = n * dt.itemsize
        if ws is not None and not all(isinstance(w, int) for w in ws) and nbytes > MAX_SYMBOLIC_BYTES:
            raise InputError(f"{where}: {dt}{list(shape)} would decompress to {nbytes} bytes; an input "
                             f"with symbolic dims is limited to {MAX_SYMBOLIC_BYTES} (compile with --shapes)")
        if info.file_size != header_len + nbytes:
            raise InputError(f"{where}: holds {info.file_size - header_len} data bytes, its header "
                             f"({dt}{list(shape)}) implies {nbytes}")
        data = f.read(nbytes + 1)  # ZipExtFile stops at file_size, checked above to be exact
        if len(data) != nbytes:
            raise InputError(f"{where}: data is truncated ({len(data)} of {nbytes} bytes)")
    a = np.frombuffer(data, dtype=dt)
    a = a.reshape(shape[::-1]).T if fortran else a.reshape(shape)
    return np.ascontiguousarray(a.astype(exp.np, copy=False)).copy()


def _read_header(f, where: str):
    magic = f.read(8)
    if len(magic) < 8 or magic[:6] != _MAGIC:
        raise InputError(f"{where}: not a .npy array")
    major = magic[6]
    if major == 1:
        ln = int.from_bytes(_exact(f, 2, where), "little")
        hl = 10
    elif major in (2, 3):
        ln = int.from_bytes(_exact(f, 4, where), "little")
        hl = 12
    else:
        raise InputError(f"{where}: unsupported .npy version {major}")
    if ln > _HEADER_MAX:
        raise InputError(f"{where}: .npy header of {ln} bytes is too long")
    raw = _exact(f, ln, where)
    try:
        h = ast.literal_eval(raw.decode("latin1" if major < 3 else "utf-8"))
        descr, fortran, shape = h["descr"], h["fortran_order"], h["shape"]
        dt = np.dtype(descr) if isinstance(descr, str) else None
    except Exception:  # literal_eval raises many kinds on garbage
        raise InputError(f"{where}: unreadable .npy header") from None
    if dt is None or dt.hasobject or not isinstance(fortran, bool):
        raise InputError(f"{where}: .npy header describes {descr!r}, not a plain numeric array")
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                               for d in shape):
        raise InputError(f"{where}: .npy shape {shape!r} is not a tuple of ints >= 0")
    return dt, shape, fortran, hl + ln


def _exact(f, n: int, where: str) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise InputError(f"{where}: truncated .npy header")
    return b
