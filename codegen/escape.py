"""How text from a model reaches generated source: escaped, never verbatim code.

A model file is untrusted. Its strings (tensor and node names, attribute strings) may only appear in
generated files as comment text (`comment_text`) or inside C string literals (`c_string`); every
identifier in generated code is made by nnc (`c_identifier` builds them from a fixed alphabet).

The jinja2 environment (codegen/render.py) makes this hold by construction: `guard` is its finalize
hook and sees every `{{ ... }}` value. Text that templates produced (`Code`) and the output of the
`comment` / `cstr` filters pass; any other string must be one printable ASCII line without a
backslash or `??`, so a name that could end a comment, splice a line or open a preprocessor line
stops the compile instead of becoming source. Ordinary names stay verbatim, so model.cu still reads
like a listing.
"""
from __future__ import annotations

import re

from ..ir.errors import NncError


class Code(str):
    """Text nnc generated itself (a rendered template, an escaped fragment): interpolated as is."""
    __slots__ = ()


class UnescapedText(NncError):
    """A template interpolated a string that was neither generated nor escaped (an nnc bug)."""


# one printable ASCII line, no backslash (line splice, escapes) and no "??" (trigraphs)
_UNSAFE = re.compile(r"[^\x20-\x5b\x5d-\x7e]|\?\?")
# in comment text additionally "*/" (ends a block comment)
_COMMENT_UNSAFE = re.compile(r"[^\x20-\x5b\x5d-\x7e]|\?(?=\?)|\*(?=/)")


def _as_str(s) -> str:
    """Names from protobuf may arrive as bytes (invalid UTF-8): show their bytes, escaped."""
    if isinstance(s, (bytes, bytearray)):
        return bytes(s).decode("utf-8", "surrogateescape")
    return s if isinstance(s, str) else str(s)


def _char_escape(c: str) -> str:
    o = ord(c)
    if 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{o - 0xDC00:02x}"
    if o < 0x100:
        return f"\\x{o:02x}"
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def comment_text(s) -> Code:
    """`s` as a fragment of a one-line comment (C++ `//` or `/* */`, CMake `#`): printable ASCII
    stays, everything else (line breaks, NUL, U+2028, non-ASCII, backslash, the first `?` of `??`,
    the `*` of `*/`) becomes a \\xNN / \\uNNNN / \\UNNNNNNNN escape."""
    return Code(_COMMENT_UNSAFE.sub(lambda m: _char_escape(m.group()), _as_str(s)))


def c_string(s) -> Code:
    """`s` as a C/C++ string literal holding its UTF-8 bytes (invalid UTF-8 kept byte for byte).
    Octal escapes: they end after three digits, where \\x would swallow a following hex digit.
    A NUL byte ends the string for C readers, as it must."""
    raw = _as_str(s).encode("utf-8", "surrogateescape")
    out = []
    for b in raw:
        if 0x20 <= b <= 0x7E and b not in (0x22, 0x5C, 0x3F):  # not " \ ?
            out.append(chr(b))
        else:
            out.append(f"\\{b:03o}")
    return Code('"' + "".join(out) + '"')


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def c_identifier(hint: str) -> str:
    """A fragment of a generated identifier: each character outside ASCII [A-Za-z0-9_] becomes
    "_", so a hint never carries model text into code. Empty hints give "k"."""
    return re.sub(r"[^A-Za-z0-9_]", "_", _as_str(hint)) or "k"


def is_c_identifier(s: str) -> bool:
    return isinstance(s, str) and bool(_IDENT.match(s))


def guard(value):
    """jinja2 finalize hook: see the module docstring."""
    if isinstance(value, Code) or value is None or isinstance(value, (bool, int, float)):
        return value
    s = value if isinstance(value, str) else str(value)
    m = _UNSAFE.search(s)
    if m:
        raise UnescapedText(
            f"internal error: a template interpolated text with {m.group()!r} at offset {m.start()} "
            f"({comment_text(s[:80])}...) without the `comment` or `cstr` filter")
    return s


def terminal_text(s) -> str:
    """A model string for a terminal (`nnc run`, `nnc verify`): printable characters as they are,
    anything else (control characters, escape sequences, line breaks) as a Python escape."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in _as_str(s))
