"""Integrity of a compiled output directory: plan.json records the sha256 of every file a backend
loads, and each loader checks it before use, refusing a mismatch with an IntegrityError that names
the file.

    cubins         "cubins": [{"file", "sha256", "kernels"}]   (Python CUDA runtime, nnc.runtime)
    weights.bin    "weights_sha256"                               (Python runtime; the C API at create)
    ir/final.*     "ir_sha256": {"final.nnir", "final.weights.bin", "final.weights.json"}
                                                                  (the reference backend)

This catches files changed or corrupted after `nnc compile` (a flipped byte, a truncated copy, a
cubin from another build). It is no signature: whoever can rewrite the files can rewrite plan.json.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping

from .ir.errors import NncError

IR_FILES = ("final.nnir", "final.weights.bin", "final.weights.json")


class IntegrityError(NncError):
    """A file of an output directory does not match the sha256 plan.json records for it."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_bytes(data, expected, path, what: str) -> None:
    """Raises IntegrityError unless sha256(data) is `expected` (a recorded hex digest)."""
    _check(sha256_bytes(data), expected, path, what)


def check_file(path, expected, what: str) -> None:
    """check_bytes for a file, read in chunks."""
    _check(sha256_file(path), expected, path, what)


def _check(digest: str, expected, path, what: str) -> None:
    if not isinstance(expected, str) or digest != expected.lower():
        raise IntegrityError(f"{path}: its sha256 does not match plan.json's {what} (the file changed after "
                             f"`nnc compile`, or belongs to another build); compile again")


def ir_hashes(ir_dir) -> dict:
    """{file name: sha256} of the IR files the reference backend loads (those present)."""
    d = Path(ir_dir)
    return {n: sha256_file(d / n) for n in IR_FILES if (d / n).is_file()}


def check_ir(out_dir, plan: Mapping) -> None:
    """Checks ir/final.* against plan.json's "ir_sha256" (outputs older than the record pass)."""
    recorded = plan.get("ir_sha256")
    if recorded is None:
        return
    if not isinstance(recorded, Mapping):
        raise IntegrityError(f"{Path(out_dir) / 'plan.json'}: ir_sha256 must map file names to sha256 digests")
    d = Path(out_dir) / "ir"
    for name in IR_FILES:  # only the files nnc itself writes: plan.json names no paths here
        if name not in recorded:
            continue
        p = d / name
        if p.is_symlink() or not p.is_file():
            raise IntegrityError(f"{p}: missing (plan.json records its sha256); compile again")
        check_file(p, recorded[name], f"ir_sha256[{name!r}]")
