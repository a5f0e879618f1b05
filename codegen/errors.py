"""The error lowering raises: an NncError naming the op (its IR location) and what it cannot do.

Its own module so the dtype table, the plan data and the lowering driver can all raise it without
importing each other."""
from __future__ import annotations

from ..ir.errors import NncError


class LoweringError(NncError):
    pass
