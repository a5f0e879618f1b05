"""Output directories: written whole or not at all, never through a symbolic link, and read back
only through plain file names.

A compile builds its output in a fresh directory next to OUT (created by nnc, so nothing in it can
be a symbolic link planted beforehand) and renames it into place when everything is written: a
failed or interrupted compile leaves no half-written OUT, and an OUT from an earlier compile stays
as it was. plan.json is as untrusted as the model it came from: the file names it gives
(`weights_file`, `cubin_file`) must be plain names of regular files inside OUT.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from .ir.errors import NncError


class OutputDirError(NncError):
    """An output directory (or a file name inside one) that nnc refuses to write or read."""


def _target(out) -> Path:
    """OUT as an absolute path; a symbolic link given as OUT itself is the user's own: its target."""
    p = Path(os.path.abspath(out))
    return Path(os.path.realpath(p)) if p.is_symlink() else p


def _check_replaceable(out: Path) -> None:
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise OutputDirError(f"{out}: exists and is not a directory")
    entries = os.listdir(out)
    if entries and "plan.json" not in entries:
        raise OutputDirError(f"{out}: exists and is not an nnc output directory (no plan.json); "
                             f"nnc replaces OUT as a whole, so give a new or empty directory")


@contextlib.contextmanager
def staged_dir(out) -> Iterator[Path]:
    """Yields a new empty directory beside `out` to write the whole output into. When the block
    ends normally it replaces `out` (an existing nnc output directory is replaced as a whole);
    when it raises, the new directory is removed and `out` is left as it was."""
    out = _target(out)
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.nnc-tmp-{secrets.token_hex(6)}"
    os.mkdir(tmp, 0o777)  # fails on anything already there, a symbolic link included; umask applies
    try:
        yield tmp
        _check_replaceable(out)  # again: it may have changed while compiling
        if os.path.lexists(out):
            old = out.parent / f".{out.name}.nnc-old-{secrets.token_hex(6)}"
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def member(out_dir, name, what: str = "file") -> Path:
    """out_dir/name for a file name read from plan.json: a plain name (no directory part, no "..",
    not absolute) of a regular file that is not a symbolic link."""
    d = Path(out_dir)
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0") \
            or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise OutputDirError(f"{d}: plan.json's {what} {name!r} is not a plain file name inside the directory")
    p = d / name
    if p.is_symlink():
        raise OutputDirError(f"{p}: {what} is a symbolic link; nnc reads only regular files of an output directory")
    if not p.is_file():
        raise OutputDirError(f"{p}: {what} is missing (is this a complete `nnc compile` output?)")
    return p
