"""The plan: what lowering produces and emit writes out (plan.json, model.cu, weights.bin).

Buffers (every tensor: inputs, outputs, weights, temporaries, views into them), the kernels
(rendered sources, deduplicated) and the launches in run order; codegen/memory.py places the
buffers in the arena, codegen/init_phase.py the input-independent ones in the persistent region.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..ir.graph import Value
from ..ir.types import DType
from .dtypes import compute_type, ctype
from .escape import Code
from .render import render as _render_template


@dataclass(eq=False)
class Buffer:
    id: int
    name: str
    dtype: DType
    shape: tuple
    kind: str  # input | output | weight | const | temp | init (computed at load: codegen/init_phase.py)
    io_index: int = -1  # position among inputs/outputs
    alias_of: Optional[int] = None  # root buffer id if this is a view
    alias_offset: int = 0  # bytes into the root
    offset: int = 0  # arena offset (temp), weights.bin offset (weight/const) or persistent offset (init)
    data: Optional[np.ndarray] = None  # weight/const payload (already transformed)
    dynamic: bool = False  # true extent known only after the run (NonZero)
    inplace_of: Optional[int] = None  # temp written in place over this dying operand's slot (codegen/memory.py)
    sym_shape: Optional[tuple] = None  # a range build's shape with its symbols (shape: at max; codegen/runtime_sizes.py)
    value: Optional[Value] = field(default=None, repr=False)

    @property
    def numel(self) -> int:
        return math.prod(int(d) for d in self.shape)  # exact, and ~10x cheaper than np.prod

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.np.itemsize  # narrow types: one byte an element

    @property
    def sym_numel(self):
        """The element count of a run: an Expr over a range profile's symbols, else numel."""
        if self.sym_shape is None:
            return self.numel
        n = 1
        for d in self.sym_shape:
            n = n * d
        return n

    @property
    def ctype(self) -> str:
        return ctype(self.dtype)

    @property
    def compute(self) -> str:
        return compute_type(self.dtype)

    def strides(self) -> list[int]:
        return contiguous_strides(self.shape)


@dataclass(eq=False)
class Kernel:
    name: str
    template: str
    params: dict
    body: str
    ops: list = field(default_factory=list)  # IR op descriptions this kernel implements
    _op_set: set = field(default_factory=set, repr=False)  # the same, for O(1) membership

    def __post_init__(self):
        self._op_set = set(self.ops)

    def add_op(self, desc: str) -> None:
        """Records an op this kernel implements, once (a list scan per op was quadratic when
        one kernel serves thousands of ops)."""
        if desc not in self._op_set:
            self._op_set.add(desc)
            self.ops.append(desc)

    @property
    def source(self) -> str:
        head = _render_template("kernel_header.cu.j2", name=self.name, template=self.template,
                                params=_short_json(self.params), ops=self.ops)
        return Code(head + self.body)  # both rendered by templates


@dataclass
class Scalar:
    type: str  # C type: int64_t | int32_t | float
    value: Any
    expr: Any = None  # a runtime size (ir.symbolic.Expr; value: at the profile's max): codegen/runtime_sizes.py


@dataclass(eq=False)
class Launch:
    kind: str  # kernel | memcpy | readback
    kernel: Optional[str]
    grid: tuple
    block: tuple
    smem: int
    args: list  # Buffer | Scalar
    op: str  # description of the IR op
    nbytes: int = 0  # memcpy/readback size
    init: bool = False  # in the load-time init phase (Plan.init_launches), not run every time
    grid_expr: Optional[tuple] = None  # a range build's grid per run (int | Expr a dim; grid: at max)


@dataclass
class Plan:
    buffers: list
    kernels: dict  # name -> Kernel, first-use order
    launches: list
    inputs: list  # Buffer
    outputs: list  # Buffer
    memory: dict = field(default_factory=dict)
    weights_bytes: int = 0
    options: Any = None  # the LowerOptions (codegen/options.py) it was lowered with
    init_launches: list = field(default_factory=list)  # run once at load, before any run
    persistent_bytes: int = 0  # the region of the init buffers (kind "init")

    def buffer(self, bid: int) -> Buffer:
        return self.buffers[bid]

    def root(self, b: Buffer) -> Buffer:
        return self.buffers[b.alias_of] if b.alias_of is not None else b


def contiguous_strides(shape) -> list[int]:
    st, acc = [], 1
    for d in reversed(list(shape)):
        st.append(acc)
        acc *= int(d)
    return st[::-1]


def _short_json(p) -> str:
    s = json.dumps(p, sort_keys=True, default=str, separators=(",", ":"))
    return s if len(s) <= 600 else s[:600] + "..."
