"""The one jinja2 environment over templates/ (package nnc.templates).

CUDA/C++ text lives only in templates/*.j2; Python decides *what* to emit (parameters), the
templates say *how*. StrictUndefined makes a missing parameter an error instead of empty text.
Model strings reach templates only through the `comment` and `cstr` filters: the finalize hook
(escape.guard) stops any other line break, backslash or non-ASCII text (see codegen/escape.py).
"""
from __future__ import annotations

import functools
import json

import jinja2
import jinja2.runtime

from .escape import Code, c_string, comment_text, guard


class _Context(jinja2.runtime.Context):
    def call(self, obj, /, *args, **kwargs):
        rv = super().call(obj, *args, **kwargs)
        # a macro's text is template output (its own {{ }} went through the guard): code, not data
        return Code(rv) if isinstance(obj, jinja2.runtime.Macro) and isinstance(rv, str) else rv


class _Environment(jinja2.Environment):
    context_class = _Context


@functools.lru_cache(maxsize=1)
def env() -> jinja2.Environment:
    e = _Environment(
        loader=jinja2.PackageLoader("nnc.templates", "."),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
        finalize=guard,
    )
    e.filters["cfloat"] = cfloat
    e.filters["tojson"] = lambda v: json.dumps(v)
    e.filters["cstr"] = c_string
    e.filters["comment"] = comment_text
    e.filters["ll"] = lambda v: v if isinstance(v, str) else f"{int(v)}LL"  # a size: int, or runtime C text
    return e


def cfloat(x) -> str:
    """A float as a C float literal (inf/nan spelled portably)."""
    x = float(x)
    if x != x:
        return "__int_as_float(0x7fc00000)"
    if x == float("inf"):
        return "__int_as_float(0x7f800000)"
    if x == float("-inf"):
        return "__int_as_float(0xff800000)"
    return repr(x) + "f"


def render(template_name: str, /, **params) -> Code:
    """Rendered text is generated code: it interpolates into other templates unchecked."""
    return Code(env().get_template(template_name).render(**params))
