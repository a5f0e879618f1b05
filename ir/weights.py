"""Weights outside the IR text: one raw little-endian file plus a JSON index of offsets.

`const` ops name a weight (`{weight = "conv1.weight"}`); the store maps names to arrays. On disk:
`<stem>.weights.bin` (each tensor 256-byte aligned) and `<stem>.weights.json`
(`[{"name", "dtype", "shape", "offset", "nbytes", "sha256"}]`). No pickle anywhere.

`load` treats both files as untrusted: the index is checked field by field (sizes agree with
dtype and shape, ranges inside the file) and each tensor's bytes against its sha256, so a
flipped byte or a truncated file is an error naming the weight, never a wrong answer.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .errors import NncError
from .types import dtype

ALIGN = 256


class WeightStore:
    def __init__(self, arrays: dict | None = None):
        self.arrays: dict[str, np.ndarray] = dict(arrays or {})

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.arrays[name]
        except KeyError:
            raise NncError(f"weight {name!r} is not in the weights file") from None

    def __setitem__(self, name: str, a: np.ndarray):
        self.arrays[name] = a

    def __len__(self) -> int:
        return len(self.arrays)

    def names(self):
        return list(self.arrays)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def fresh_name(self, hint: str) -> str:
        name, n = hint, 0
        while name in self.arrays:
            n += 1
            name = f"{hint}.{n}"
        return name

    def save(self, stem: Path) -> tuple[Path, Path]:
        stem = Path(stem)
        binp, idxp = paths(stem)
        index, off = [], 0
        with open(binp, "wb") as f:
            for name, a in self.arrays.items():
                pad = (-off) % ALIGN
                f.write(b"\0" * pad)
                off += pad
                data = np.ascontiguousarray(a).tobytes()
                f.write(data)
                index.append({"name": name, "dtype": dtype(a.dtype).np_name, "shape": list(a.shape),
                              "offset": off, "nbytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
                off += len(data)
        idxp.write_text(json.dumps(index, indent=1) + "\n")
        return binp, idxp

    @classmethod
    def load(cls, stem: Path) -> "WeightStore":
        binp, idxp = paths(Path(stem))
        if not idxp.exists():
            return cls()
        try:
            index = json.loads(idxp.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise NncError(f"{idxp}: not a weights index ({e})") from None
        if not isinstance(index, list):
            raise NncError(f"{idxp}: not a weights index (expected a JSON list)")
        if not binp.exists():
            raise NncError(f"{binp}: missing (the index {idxp.name} names {len(index)} weights)")
        raw = np.memmap(binp, dtype=np.uint8, mode="r") if binp.stat().st_size else np.zeros(0, np.uint8)
        out = {}
        for k, e in enumerate(index):
            name, dt, shape, off, nbytes, digest = _entry(e, f"{idxp}: entry {k}")
            where = f"{binp}: weight {name!r}"
            if name in out:
                raise NncError(f"{where} is listed twice in {idxp.name}")
            if off + nbytes > raw.size:
                raise NncError(f"{where} runs past the end of the file ({off}+{nbytes} > {raw.size} bytes)")
            data = raw[off:off + nbytes]
            if hashlib.sha256(data).hexdigest() != digest:
                raise NncError(f"{where}: bytes do not match the sha256 in {idxp.name} (the file is "
                               f"corrupt or was modified; recompile)")
            out[name] = data.view(dt).reshape(shape)
        return cls(out)


def _entry(e, where: str):
    """(name, numpy dtype, shape, offset, nbytes, sha256) of one index entry, checked."""
    def bad(msg):
        raise NncError(f"{where}: {msg}")
    if not isinstance(e, dict):
        bad("not an object")
    missing = [k for k in ("name", "dtype", "shape", "offset", "nbytes", "sha256") if k not in e]
    if missing:
        bad(f"lacks {missing}" + ("; written by an older nnc, recompile" if missing == ["sha256"] else ""))
    name, shape, off, nbytes, digest = e["name"], e["shape"], e["offset"], e["nbytes"], e["sha256"]
    if not isinstance(name, str):
        bad("name is not a string")
    try:
        dt = dtype(e["dtype"]).np if isinstance(e["dtype"], str) else None
    except ValueError:
        dt = None
    if dt is None:
        bad(f"weight {name!r}: unknown dtype {e['dtype']!r}")
    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0
    if not isinstance(shape, list) or not all(is_int(d) for d in shape):
        bad(f"weight {name!r}: shape {shape!r} is not a list of ints >= 0")
    if not is_int(off) or not is_int(nbytes):
        bad(f"weight {name!r}: offset {off!r} / nbytes {nbytes!r} are not ints >= 0")
    want = int(np.prod(shape, dtype=object)) * dt.itemsize
    if nbytes != want:
        bad(f"weight {name!r}: nbytes {nbytes} but {dt.name}{shape} needs {want}")
    if not isinstance(digest, str):
        bad(f"weight {name!r}: sha256 is not a string")
    return name, dt, tuple(shape), off, nbytes, digest


def paths(stem: Path) -> tuple[Path, Path]:
    stem = Path(stem)
    base = stem.with_suffix("") if stem.suffix == ".nnir" else stem
    return base.parent / (base.name + ".weights.bin"), base.parent / (base.name + ".weights.json")
