"""The timing cache: the tuner's choices (codegen/tuning.py) kept in one JSON file, reused across
compiles (`nnc compile --timing-cache FILE`) and merged (`nnc timing-cache merge A B -o C`).

    {"header": {"schema", "nnc", "gpu", "sm", "cuda_runtime", "cuda_driver", "nvrtc"},
     "entries": {problem key: {"variant", "params", "time_ms", "heuristic", "tried", "candidates",
                               "rejected", "space"}},
     "checksum": sha256 of the canonical JSON of header + entries}

A problem key (codegen/lower.Problem.key) is the kernel signature: arch, precision, tf32, the op
or fused group (kind and body ops), operand/result shapes, dtypes and view offsets, attributes
and the epilogue. "space" is a digest of the (variant, params) the entry was tuned over: a new
variant or tile makes the entry stale (tuned again), never silently reused.

Never trusted blindly: a file that is not JSON, fails its checksum or has another schema is
*corrupt*; another nnc, CUDA runtime/driver or NVRTC version is *stale*; another GPU name or SM is
*foreign*. Each is reported by a warning (naming the file and why) and the cache starts empty
(rebuilt: the next save replaces it). Writes are atomic (temporary file + os.replace): two
compiles sharing one file never leave it torn, the last to finish wins (merge to combine both).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional

from ..ir.errors import NncError

SCHEMA = 1
DEVICE_KEYS = ("gpu", "sm")  # another value: a foreign cache
VERSION_KEYS = ("nnc", "cuda_runtime", "cuda_driver", "nvrtc")  # another value: a stale cache


class TimingCacheWarning(UserWarning):
    pass


def _nnc_version() -> str:
    try:
        from .. import __version__
        return str(__version__)
    except Exception:
        return "unknown"


def make_header(device: dict) -> dict:
    h = {"schema": SCHEMA, "nnc": _nnc_version()}
    for k in DEVICE_KEYS + VERSION_KEYS[1:]:
        h[k] = device.get(k)
    return h


def checksum(header: dict, entries: dict) -> str:
    text = json.dumps({"header": header, "entries": entries}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class TimingCache:
    """Entries by problem key for one device (header). status: how loading went ({"state":
    "new" | "loaded" | "corrupt" | "stale" | "foreign", "why", "entries", "hits", "added"})."""

    def __init__(self, device: dict, entries: Optional[dict] = None):
        self.header = make_header(device)
        self.entries: dict = dict(entries or {})
        self.status = {"state": "new", "entries": len(self.entries), "hits": 0, "added": 0}

    # lookups
    def get(self, key: str, space: str = "") -> Optional[dict]:
        e = self.entries.get(key)
        if e is None or (space and e.get("space") and e["space"] != space):
            return None
        self.status["hits"] += 1
        return e

    def put(self, key: str, entry: dict) -> None:
        self.entries[key] = {k: v for k, v in entry.items() if k != "skip"}
        self.status["added"] += 1

    # files
    @classmethod
    def load(cls, path, device: dict, log: Callable[[str], None] = lambda m: None) -> "TimingCache":
        """The cache in `path` when it is valid for `device`; else an empty one (a warning says why).
        A missing file is a new cache (no warning)."""
        c = cls(device)
        p = Path(path)
        if not p.exists():
            return c
        state, why, entries = check(p, c.header)
        if state == "loaded":
            c.entries = entries
            c.status.update(state="loaded", entries=len(entries))
        else:
            msg = f"timing cache {p}: {state} ({why}); ignoring it, it is rebuilt"
            warnings.warn(msg, TimingCacheWarning, stacklevel=2)
            log(f"  warning: {msg}")
            c.status.update(state=state, why=why)
        return c

    def to_json(self) -> dict:
        return {"header": self.header, "entries": self.entries, "checksum": checksum(self.header, self.entries)}

    def save(self, path) -> None:
        atomic_write(Path(path), json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")


def read(p: Path) -> tuple[Optional[dict], str]:
    """(document, "") or (None, why it is corrupt)."""
    try:
        doc = json.loads(Path(p).read_text())
    except (OSError, UnicodeDecodeError) as e:
        return None, f"cannot read: {e}"
    except ValueError as e:
        return None, f"not JSON: {e}"
    if not (isinstance(doc, dict) and isinstance(doc.get("header"), dict) and isinstance(doc.get("entries"), dict)):
        return None, "not a timing cache (needs header, entries, checksum)"
    if doc.get("checksum") != checksum(doc["header"], doc["entries"]):
        return None, "checksum mismatch (edited or truncated)"
    if doc["header"].get("schema") != SCHEMA:
        return None, f"schema {doc['header'].get('schema')!r}, this nnc reads {SCHEMA}"
    for k, e in doc["entries"].items():
        if not (isinstance(e, dict) and isinstance(e.get("variant"), str) and isinstance(e.get("params"), dict)):
            return None, f"entry {k[:60]!r} is malformed"
    return doc, ""


def check(p: Path, header: dict) -> tuple[str, str, dict]:
    """(state, why, entries): "loaded" | "corrupt" | "stale" | "foreign" against `header`."""
    doc, why = read(p)
    if doc is None:
        return "corrupt", why, {}
    h = doc["header"]
    for k in DEVICE_KEYS:
        if h.get(k) != header.get(k):
            return "foreign", f"{k} {h.get(k)!r}, this device {header.get(k)!r}", {}
    for k in VERSION_KEYS:
        if h.get(k) != header.get(k):
            return "stale", f"{k} {h.get(k)!r}, now {header.get(k)!r}", {}
    return "loaded", "", dict(doc["entries"])


def merge(paths, out) -> dict:
    """Merges timing caches of one device (same header) into `out`: entries of later files win
    where their measured time is lower. Raises NncError naming a corrupt file or one of another
    GPU/version. Returns the merged document."""
    header, entries = None, {}
    for p in paths:
        doc, why = read(Path(p))
        if doc is None:
            raise NncError(f"timing-cache merge: {p}: corrupt ({why})")
        if header is None:
            header = doc["header"]
        else:
            for k in DEVICE_KEYS + VERSION_KEYS:
                if doc["header"].get(k) != header.get(k):
                    raise NncError(f"timing-cache merge: {p}: {k} {doc['header'].get(k)!r} differs from "
                                   f"{paths[0]}'s {header.get(k)!r} (caches of one GPU and version only)")
        for k, e in doc["entries"].items():
            old = entries.get(k)
            if old is None or _time(e) < _time(old):
                entries[k] = e
    if header is None:
        raise NncError("timing-cache merge: no input files")
    doc = {"header": header, "entries": entries, "checksum": checksum(header, entries)}
    atomic_write(Path(out), json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return doc


def _time(e: dict) -> float:
    t = e.get("time_ms")
    return float(t) if isinstance(t, (int, float)) else float("inf")


def atomic_write(p: Path, text: str) -> None:
    """Writes through a temporary file in the same directory renamed into place."""
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
