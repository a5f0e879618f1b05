"""Weights outside the IR text: one raw little-endian file plus a JSON index of offsets.

`const` ops name a weight (`{weight = "conv1.weight"}`); the store maps names to arrays. On disk:
`<stem>.weights.bin` (each tensor 256-byte aligned) and `<stem>.weights.json`
(`[{"name", "dtype", "shape", "offset", "nbytes"}]`). No pickle anywhere.
"""
from __future__ import annotations

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
                              "offset": off, "nbytes": len(data)})
                off += len(data)
        idxp.write_text(json.dumps(index, indent=1) + "\n")
        return binp, idxp

    @classmethod
    def load(cls, stem: Path) -> "WeightStore":
        binp, idxp = paths(Path(stem))
        if not idxp.exists():
            return cls()
        index = json.loads(idxp.read_text())
        raw = np.memmap(binp, dtype=np.uint8, mode="r") if binp.stat().st_size else np.zeros(0, np.uint8)
        out = {}
        for e in index:
            dt = dtype(e["dtype"]).np
            end = e["offset"] + e["nbytes"]
            if end > raw.size:
                raise NncError(f"{binp}: weight {e['name']!r} runs past the end of the file")
            out[e["name"]] = raw[e["offset"]:end].view(dt).reshape(e["shape"])
        return cls(out)


def paths(stem: Path) -> tuple[Path, Path]:
    stem = Path(stem)
    base = stem.with_suffix("") if stem.suffix == ".nnir" else stem
    return base.parent / (base.name + ".weights.bin"), base.parent / (base.name + ".weights.json")
