"""Lowering: IR main function -> buffers, kernels and a launch plan.

The plugin API
--------------
Kernel families live in codegen/kernels/<family>.py and declare how they lower ops as Variants
(codegen/variants.py: lowering as data):

    from ..variants import Variant, register, no, YES

    def _applies(p):                                # p: Problem (below): types, no emission
        return YES if suitable(p) else no("why not")
    def _render(ctx, p, params):                    # ctx: LowerCtx (one op); params: from the space
        x, y = ctx.inp(0), ctx.out(0)               # Buffers
        k = ctx.render("elementwise.cu.j2", "ew", **params)   # -> Kernel (deduplicated by source)
        ctx.launch(k, grid=ctx.grid1d(y.numel), block=256, args=[x, y, ctx.i64(y.numel)])
        return True
    register(Variant("mine.fast", "mine", ("MatMul",), _render, _applies,
                     space=lambda p: [...], default=lambda p, space: ..., priority=10))

For each op (a `fused` group is one op) the driver collects the variants whose applies holds and
asks one Selector (LowerOptions.selector; the heuristic: highest priority, the family's default
params) to choose; the kernels emitted record params["selected"] = {"variant", "params"}.

The legacy form still works (an adapter: a Variant whose applies is `when` and whose render may
decline — the driver then asks the selector again without it):

    @lowering("MatMul", priority=10)                # a faster specialisation, tried first
    def _fast(ctx):
        if not suitable(ctx.op):
            return None                             # decline: the next candidate is tried
        ...

A legacy function *declines* by returning None (or NOT_HANDLED) without having emitted anything.
Two families at one (op, priority) is an error. A lowering that emitted launches or aliases counts
as handled whatever it returns.

What a lowering can ask of its LowerCtx: `inp(i)`/`out(i)` buffers, `value(i)` (compile-time
constant operand or None), `render(template, hint, **params)`, `launch(...)`, `temp(dtype, shape)`,
`weight(i, transform, key)` (a constant operand pre-transformed at compile time into its own weight
buffer), `new_weight(array)`, `alias(i, buf)` (result i is a view of `buf`, no kernel), `copy`,
`readback` (data-dependent output shapes), `fail(msg)`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np

from ..ir.builder import const_value
from ..ir.errors import NncError
from ..ir.graph import Module, Op, Region, Value
from ..ir.symbolic import Expr, evaluate
from ..ir.types import TensorType
from . import init_phase, runtime_sizes
from .memory import concat_slots, fused_away_bytes, plan_memory  # the arena: liveness, placement, the overlap checker
from .steps import StepRecorder
from .render import render as _render_template
from .escape import c_identifier, is_c_identifier
from .dtypes import ctype  # the one dtype table (codegen/dtypes.py)
from .errors import LoweringError
from .options import LowerOptions
from .plan import Buffer, Kernel, Launch, Plan, Scalar  # codegen/plan.py
from .variants import REGISTRY, Candidate, Selection, Selector, Variant, make_selector, register

ALIGN = 256


def describe_op(op: Op, name: Callable = lambda v: v.name) -> str:
    """One line for kernel headers and launch comments; `name(value)`: the name shown (inside a
    fused body: the function-level value a body value stands for, see Lowerer.canon)."""
    res = ", ".join(f"%{name(r)}: {r.type}" for r in op.results)
    args = ", ".join("none" if v is None else f"%{name(v)}: {v.type}" for v in op.operands)
    attrs = ""
    if op.attrs is not None and dataclasses.is_dataclass(op.attrs) and op.name != "const":
        from ..ir.registry import attrs_items
        items = [f"{k}={_fmt_attr(v)}" for k, v in attrs_items(op.attrs)]
        attrs = " {" + ", ".join(items) + "}" if items else ""
    return f"{res} = {op.name}({args}){attrs}"


def _fmt_attr(v):
    if isinstance(v, np.ndarray):
        return f"tensor<{v.dtype}{list(v.shape)}>"
    if isinstance(v, Region):  # a fused body: its ops are described one by one where lowered
        return f"region({len(v.ops)} ops)"
    return str(v)


# ---------------------------------------------------------------- registration

NOT_HANDLED = None

# op name -> Variants (codegen/variants.py), highest priority first: declared variants and the
# legacy lowerings below alike (tests may reassign an op's list; the driver reads it per op)
LOWERINGS: dict[str, list[Variant]] = REGISTRY


def lowering(*ops: str, priority: int = 0, when: Optional[Callable] = None, regions: bool = False,
             runtime_sizes: bool = False):
    """Registers a lowering function for ops (the legacy form of a Variant: codegen/variants.py).
    Higher priority is tried first; `when(op)` is an optional predicate (the variant's applies);
    the function may still decline by returning None without emitting ("render may decline": the
    driver then tries the next candidate). `regions=True`: the function handles the op's regions
    (others never see an op with regions). `runtime_sizes=True`: it also lowers symbolic problems
    of a range profile (codegen/runtime_sizes.py)."""
    def deco(fn):
        register(Variant(
            name=f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}", family=f"{fn.__module__}.{fn.__name__}",
            ops=tuple(ops), render=_legacy_render(fn), applies=_legacy_applies(when), priority=priority,
            regions=regions, may_decline=True, fn=fn, runtime_sizes=runtime_sizes))
        return fn
    return deco


def _legacy_render(fn):
    def render(ctx, problem, params):
        return fn(ctx)
    return render


def _legacy_applies(when):
    if when is None:
        return lambda problem: True
    return lambda problem: bool(when(problem.op))


_LOADED = False


def _ensure_loaded():
    global _LOADED
    if not _LOADED:
        _LOADED = True
        import importlib
        import pkgutil
        from . import kernels  # every module of codegen/kernels/ registers its family on import
        for m in sorted(m.name for m in pkgutil.iter_modules(kernels.__path__)):
            if not m.startswith("_"):
                importlib.import_module(f"{kernels.__name__}.{m}")


# ---------------------------------------------------------------- the per-op context

class LowerCtx:
    def __init__(self, lowerer: "Lowerer", op: Op):
        self.L = lowerer
        self.op = op
        self.options = lowerer.options  # LowerOptions (codegen/options.py)
        self.target = lowerer.options.target  # the device limits (codegen/target.py)
        self.emitted = 0
        self._desc: Optional[str] = None
        self.problem: Optional["Problem"] = None  # set by the driver: what the variant's applies saw

    @property
    def desc(self) -> str:
        """describe_op of this op, made once (kernels and launches all name it)."""
        if self._desc is None:
            self._desc = describe_op(self.op, lambda v: self.L.canon(v).name)
        return self._desc

    # operands / results
    @property
    def attrs(self):
        return self.op.attrs

    def attr(self, name: str, default=None):
        return getattr(self.op.attrs, name, default)

    def has(self, i: int) -> bool:
        return i < len(self.op.operands) and self.op.operands[i] is not None

    def inp(self, i: int) -> Optional[Buffer]:
        if not self.has(i):
            return None
        return self.L.buffer(self.op.operands[i])

    def out(self, i: int = 0) -> Buffer:
        return self.L.result_buffer(self.op.results[i])

    @property
    def n_in(self) -> int:
        return len(self.op.operands)

    @property
    def n_out(self) -> int:
        return len(self.op.results)

    def type(self, i: int) -> TensorType:
        return self.op.operands[i].type

    def shape(self, i: int) -> tuple:
        return tuple(int(d) for d in self.op.operands[i].type.shape)

    def out_shape(self, i: int = 0) -> tuple:
        return self.L.static_shape(self.op.results[i])

    def value(self, i: int) -> Optional[np.ndarray]:
        if not self.has(i):
            return None
        return const_value(self.L.canon(self.op.operands[i]), self.L.module.weights)

    def fail(self, msg: str):
        raise LoweringError(f"{self.op.loc}: {self.op.name}: {msg}")

    # kernels and launches
    def render(self, template: str, hint: str = "", **params) -> Kernel:
        k = self.L.kernel(template, hint or template.split(".")[0], params)
        k.add_op(self.desc)
        return k

    def add_kernel(self, name: str, source: str, template: str, params: dict) -> Kernel:
        """A kernel rendered elsewhere (e.g. a KernelSpec of codegen/kernels/gemm.py): `source`
        must define `extern "C" __global__ void <name>`. Deduplicated by source."""
        if not is_c_identifier(name):  # identifiers in generated code are nnc's own, never model text
            self.fail(f"internal error: kernel name {name!r} is not a C identifier")
        k = self.L.kernels.get(name)
        if k is not None and k.body != source:
            self.fail(f"two different kernels named {name!r}")
        if k is None:
            k = Kernel(name, template, dict(params), source)
            self.L.kernels[name] = k
        k.add_op(self.desc)
        return k

    def launch(self, kernel: Kernel, grid, block, args: list, smem: int = 0):
        """grid: ints, or (a runtime-size variant) dims that are Exprs over a range profile's
        symbols: the launch's grid is then evaluated per run (codegen/runtime_sizes.py)."""
        grid_expr = None
        if any(isinstance(g, Expr) for g in (grid if isinstance(grid, (tuple, list)) else (grid,))):
            g = tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)
            grid_expr = g + (1,) * (3 - len(g))
            grid = tuple(max(1, runtime_sizes.at_max(d, self.L.sym_max)) for d in grid_expr)
        grid = _dim3(grid)
        block = _dim3(block)
        for a in args:
            if not isinstance(a, (Buffer, Scalar)):
                self.fail(f"launch argument {a!r} is neither a Buffer nor a Scalar")
        self.L.launches.append(Launch("kernel", kernel.name, grid, block, int(smem), list(args), self.desc,
                                      grid_expr=grid_expr))
        self.emitted += 1

    def size(self, d, ctype: str = "int64_t") -> Scalar:
        """A size argument: an int, or an Expr over a range profile's symbols, passed per run
        (Scalar.expr; its value at max). For runtime_sizes variants (codegen/runtime_sizes.py)."""
        if isinstance(d, Expr):
            return Scalar(ctype, runtime_sizes.at_max(d, self.L.sym_max), d)
        return Scalar(ctype, int(d))

    def sym_shape(self, i: int) -> tuple:
        """Operand i's shape with its symbols (ints where static)."""
        return self.L.sym_shape(self.op.operands[i])

    def sym_out_shape(self, i: int = 0) -> tuple:
        return self.L.sym_shape(self.op.results[i])

    def copy(self, dst: Buffer, src: Buffer, nbytes: Optional[int] = None):
        n = dst.nbytes if nbytes is None else nbytes
        self.L.launches.append(Launch("memcpy", None, (1, 1, 1), (1, 1, 1), 0, [dst, src], self.desc, n))
        self.emitted += 1

    def readback(self, count: Buffer, output: Buffer, axis: int):
        """After the preceding launches, the host reads `count` (one int64) to learn the true extent
        of `output` along `axis` (data-dependent shapes: NonZero)."""
        output.dynamic = True
        self.L.launches.append(Launch("readback", None, (1, 1, 1), (1, 1, 1), 0, [count, output], self.desc, 8))
        self.L.dynamic[output.id] = {"count_buffer": count.id, "axis": axis}
        self.emitted += 1

    def grid1d(self, n, block: int = 256, max_blocks: int = 1 << 20):
        """Blocks for n elements (an Expr n: a grid per run, for kernels that loop or stop at n)."""
        if isinstance(n, Expr):
            return runtime_sizes.grid_dim(n, block, self.L.sym_max, max_blocks)[1]
        return max(1, min((int(n) + block - 1) // block, max_blocks))

    def rt_params(self) -> str:
        """A runtime-size kernel's trailing parameters: the build's symbols (codegen/runtime_sizes.py)."""
        return "".join(f", int64_t {c}" for c in self.L.sym_cnames.values())

    def rt_args(self) -> list:
        """The Scalars for rt_params(), evaluated per run."""
        from ..ir.symbolic import sym
        return [self.size(sym(s)) for s in self.L.sym_cnames]

    def csize(self, d):
        """A size for a template: an int, or C text over the symbol parameters (runtime_sizes.CSize)."""
        return runtime_sizes.c_expr(d, self.L.sym_cnames)

    def i64(self, v) -> Scalar:
        """An int64_t argument; an Expr (a range profile's runtime size) is passed per run."""
        return self.size(v, "int64_t")

    def i32(self, v) -> Scalar:
        return self.size(v, "int32_t")

    @staticmethod
    def f32(v) -> Scalar:
        return Scalar("float", float(v))

    # buffers
    def temp(self, dt, shape, name: str = "tmp") -> Buffer:
        from ..ir.types import dtype as _dt
        return self.L.new_buffer(f"{self.op.results[0].name}.{name}", _dt(dt), tuple(int(d) for d in shape), "temp")

    def new_weight(self, array: np.ndarray, name: str = "w") -> Buffer:
        a = np.ascontiguousarray(array)
        from ..ir.types import dtype as _dt
        return self.L.new_buffer(f"{self.op.results[0].name}.{name}", _dt(a.dtype), a.shape, "weight", data=a)

    def weight(self, i: int, transform: Optional[Callable] = None, key: str = "") -> Buffer:
        """Constant operand i, pre-transformed at compile time by `transform(array) -> array`
        into the layout/dtype the kernel reads, stored as its own weight buffer (cached per key)."""
        v = self.value(i)
        if v is None:
            self.fail(f"operand {i} must be a compile-time constant")
        if transform is None:
            return self.inp(i)
        ck = (id(self.L.canon(self.op.operands[i])), key or getattr(transform, "__name__", "t"))
        if ck not in self.L.transformed:
            out = np.ascontiguousarray(transform(np.asarray(v)))
            self.L.transformed[ck] = self.new_weight(out, f"{self.op.operands[i].name}.{ck[1]}")
        return self.L.transformed[ck]

    def out_dynamic(self, i: int, max_shape) -> Buffer:
        """Result i has a data-dependent shape: allocate its upper bound `max_shape`."""
        v = self.L.canon(self.op.results[i])
        b = self.L.values.get(id(v))
        if b is None:
            kind = "output" if self.L.is_output(v) else "temp"
            b = self.L.new_buffer(v.name, v.type.dtype, tuple(int(d) for d in max_shape), kind,
                                  io_index=self.L.outputs_by_value.get(id(v), -1), value=v)
            b.dynamic = True
            self.L.values[id(v)] = b
        return b

    def alias(self, i: int, src: Buffer, byte_offset: int = 0):
        """Result i is a view of `src` (no kernel). Graph outputs get a copy instead. In a range
        build only a view at offset 0 of a whole tensor (a reshape) is the same bytes at every size."""
        v = self.L.canon(self.op.results[i])
        if self.L.sym_max and (byte_offset or src.alias_offset) and (
                src.sym_shape is not None or self.L.plan_root_symbolic(src)):
            self.fail("a view at a byte offset into a tensor with symbolic dims: its place differs per run "
                      "size, which range-profile builds do not support yet")
        if self.L.is_output(v):
            dst = self.out(i)
            self.copy(dst, self.L.view(src, dst.dtype, dst.shape, byte_offset, v.name))
            return
        b = self.L.view(src, v.type.dtype, self.out_shape(i), byte_offset, v.name)
        if runtime_sizes.shape_is_symbolic(v.type.shape):
            b.sym_shape = tuple(v.type.shape)
        self.L.values[id(v)] = b
        self.emitted += 1


def _dim3(x) -> tuple:
    if isinstance(x, int):
        return (int(x), 1, 1)
    x = tuple(int(d) for d in x)
    return x + (1,) * (3 - len(x))


# ---------------------------------------------------------------- what a variant's applies() sees

@dataclass(frozen=True)
class TensorInfo:
    """An operand as applies() may know it without creating its buffer: the existing Buffer's
    facts, or (a constant or result not made yet: a root, so offset 0; a zero-copy Concat slot: a
    view at its offset, alias_of -1 while the root is not made) its type's. Has the attributes of
    a Buffer the families' checks read (dtype, shape, numel, alias_of, alias_offset)."""
    dtype: object
    shape: tuple
    alias_of: Optional[int] = None
    alias_offset: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n


class Problem:
    """One op (a fused group is one op) as the variants see it before anything is emitted: its
    operands' and results' types and placement (`tensor`, `result`), compile-time values, the
    options and target, and `extra` (what a fused lowering passes an anchor's variants, e.g. the
    GEMM's Epilogue). `memo`: a family's derived data, computed once by applies() for space() and
    render(). `key`: the stable text the selector caches choices by (no value names)."""

    def __init__(self, lowerer: "Lowerer", op: Op, extra=None, key_extra: str = ""):
        self.L = lowerer
        self.op = op
        self.extra = extra
        self.options = lowerer.options
        self.target = lowerer.options.target
        self.memo: dict = {}
        self._key_extra = key_extra
        self._key: Optional[str] = None

    def attr(self, name: str, default=None):
        return getattr(self.op.attrs, name, default)

    def has(self, i: int) -> bool:
        return i < len(self.op.operands) and self.op.operands[i] is not None

    def info(self, v: Value) -> TensorInfo:
        v = self.L.canon(v)
        b = self.L.values.get(id(v))
        if b is not None:
            return TensorInfo(b.dtype, tuple(b.shape), b.alias_of, b.alias_offset)
        slot = getattr(self.L, "concat_slots", {}).get(id(v))
        if slot is not None:  # will be a view into its Concat's output (result_buffer)
            root = self.info(slot[0])
            return TensorInfo(v.type.dtype, self.L.static_shape(v) or (), -1 if root.alias_of is None else root.alias_of,
                              root.alias_offset + slot[1])
        return TensorInfo(v.type.dtype, self.L.static_shape(v) or ())

    def tensor(self, i: int) -> Optional[TensorInfo]:
        return self.info(self.op.operands[i]) if self.has(i) else None

    @property
    def symbolic(self) -> bool:
        """An operand or result (a fused group's body values too) has a range profile's symbolic
        dim: only runtime_sizes variants apply (codegen/runtime_sizes.py)."""
        if not self.L.sym_max:
            return False
        vals = list(self.op.operands) + list(self.op.results)
        if self.op.regions():
            for b in self.op.attrs.body.ops:
                vals += list(b.operands) + list(b.results)
        return any(v is not None and runtime_sizes.shape_is_symbolic(v.type.shape) for v in vals)

    def sym_shape(self, i: int) -> tuple:
        return self.L.sym_shape(self.op.operands[i])

    def sym_result_shape(self, i: int = 0) -> tuple:
        return self.L.sym_shape(self.op.results[i])

    def result(self, i: int = 0) -> TensorInfo:
        return self.info(self.op.results[i])

    def value(self, i: int):
        if not self.has(i):
            return None
        return const_value(self.L.canon(self.op.operands[i]), self.L.module.weights)

    @property
    def key(self) -> str:
        if self._key is None:
            o = self.options
            ops = [_op_key(self.op, self.info)]
            if self.op.regions():
                ops += [_op_key(b, None) for b in self.op.attrs.body.ops]
            self._key = f"{o.arch}|{o.precision}|tf32={int(o.tf32)}|" + "; ".join(ops) + self._key_extra
        return self._key


def _op_key(op: Op, info) -> str:
    """op name, operand/result types (views: their byte offset mod 256) and attrs, no names."""
    def t(v):
        if v is None:
            return "none"
        if info is not None:
            i = info(v)
            return f"{v.type}@{i.alias_offset % ALIGN}" if i.alias_of is not None else str(v.type)
        return str(v.type)
    attrs = ""
    if op.attrs is not None and dataclasses.is_dataclass(op.attrs) and op.name != "const":
        from ..ir.registry import attrs_items
        attrs = "{" + ",".join(f"{k}={_fmt_attr(v)}" for k, v in attrs_items(op.attrs)) + "}"
    return f"{op.name}({','.join(t(v) for v in op.operands)})->({','.join(t(r) for r in op.results)}){attrs}"


# ---------------------------------------------------------------- the driver

DYNAMIC_OPS = {"NonZero", "Compress", "Unique", "NonMaxSuppression"}


class Lowerer:
    def __init__(self, module: Module, options: LowerOptions, selector: Optional[Selector] = None):
        self.module = module
        self.options = options
        # chooses among each op's candidate variants (codegen/variants.py); LowerOptions.selector
        self.selector = selector if selector is not None else make_selector(options.selector)
        self.selections: list[Selection] = []  # what was chosen, op by op (Plan.selections)
        self.buffers: list[Buffer] = []
        self.values: dict[int, Buffer] = {}
        self.kernels: dict[str, Kernel] = {}
        self._by_key: dict[str, Kernel] = {}
        self.launches: list[Launch] = []
        self.init_launches: list[Launch] = []
        self.init_values: set[int] = set()  # ids of input-independent values (codegen/init_phase.py)
        self.transformed: dict = {}
        self.dynamic: dict = {}
        self.outputs_by_value: dict[int, int] = {}
        # value equivalence while a fused body is lowered op by op (codegen/kernels/fused.py): a body
        # argument stands for its operand, a body result for the fused op's result (id -> outer Value)
        self.equiv: dict[int, Value] = {}
        # zero-copy Concat (memory.concat_slots): id(input) -> (Concat result, byte offset); the
        # slot views made for them (id(input) -> (view, the Concat's buffer)) and the bytes no copy moved
        self.concat_slots: dict = {}
        self.slot_views: dict[int, tuple] = {}
        self.zero_copy_bytes = 0
        # a range profile's symbols at their max (codegen/runtime_sizes.py): buffers are sized there
        self.sym_max = {n: int(mx) for n, _, _, mx in options.symbol_ranges}
        self.sym_cnames = runtime_sizes.sym_names(options.symbol_ranges)  # symbol -> kernel parameter

    def canon(self, v: Value) -> Value:
        """The function-level Value that `v` stands for (itself outside fused bodies)."""
        return self.equiv.get(id(v), v)

    def sym_shape(self, v: Value) -> tuple:
        """v's shape with a range profile's symbols kept (ints where static)."""
        v = self.canon(v)
        self.static_shape(v)  # the same checks
        return tuple(v.type.shape)

    def plan_root_symbolic(self, b: Buffer) -> bool:
        r = self.buffers[b.alias_of] if b.alias_of is not None else b
        return r.sym_shape is not None

    def static_shape(self, v: Value) -> tuple:
        t = v.type
        if self.sym_max and t.shape is not None and all(
                isinstance(d, int) or (d.kind != "unknown" and d.symbols <= self.sym_max.keys()) for d in t.shape):
            return tuple(int(evaluate(d, self.sym_max)) if isinstance(d, Expr) else int(d) for d in t.shape)
        if t.shape is None or not all(isinstance(d, int) for d in t.shape):
            if v.producer is not None and v.producer.name in DYNAMIC_OPS:
                return None
            args = self.module.main.args
            eg = ",".join(f"{a.name}:" + "x".join(str(d) if isinstance(d, int) else "1" for d in (a.type.shape or ()))
                          for a in args if a.type.shape is not None and not a.type.is_static) or "input:1x3x224x224"
            raise LoweringError(
                f"value %{v.name} has type {t}: CUDA code generation needs static shapes; bind the "
                f"symbolic dims with --shapes (e.g. --shapes {eg})")
        return tuple(int(d) for d in t.shape)

    def new_buffer(self, name, dt, shape, kind, data=None, io_index=-1, value=None) -> Buffer:
        ctype(dt)
        b = Buffer(len(self.buffers), name, dt, tuple(shape), kind, io_index=io_index, data=data, value=value)
        if value is not None and self.sym_max and runtime_sizes.shape_is_symbolic(value.type.shape):
            b.sym_shape = tuple(value.type.shape)
        self.buffers.append(b)
        return b

    def view(self, src: Buffer, dt, shape, byte_offset: int, name: str) -> Buffer:
        root = self.buffers[src.alias_of] if src.alias_of is not None else src
        off = src.alias_offset + byte_offset
        if root.kind in ("input",) or True:
            b = self.new_buffer(name, dt, shape, src.kind)
            b.alias_of, b.alias_offset, b.io_index = root.id, off, root.io_index
            return b

    def is_output(self, v: Value) -> bool:
        return id(self.canon(v)) in self.outputs_by_value

    def buffer(self, v: Value) -> Buffer:
        v = self.canon(v)
        b = self.values.get(id(v))
        if b is not None:
            return b
        op = v.producer
        if op is not None and op.name == "const":  # created lazily: consts read only at compile time cost nothing
            a = np.ascontiguousarray(const_value(v, self.module.weights))
            kind = "weight" if op.attrs.weight is not None else "const"
            name = op.attrs.weight if op.attrs.weight is not None else v.name
            b = self.new_buffer(name, v.type.dtype, self.static_shape(v), kind, data=a, value=v)
            self.values[id(v)] = b
            return b
        raise LoweringError(f"value %{v.name} is used before it is defined")

    def result_buffer(self, v: Value) -> Buffer:
        v = self.canon(v)
        b = self.values.get(id(v))
        if b is None and id(v) in self.concat_slots:  # written straight into its Concat's output
            cv, off = self.concat_slots[id(v)]
            parent = self.result_buffer(cv)
            b = self.view(parent, v.type.dtype, self.static_shape(v), off, v.name)
            self.values[id(v)] = b
            self.slot_views[id(v)] = (b, parent)
        if b is None:
            shape = self.static_shape(v)
            if id(v) in self.init_values:  # computed once at load; an output gets a copy every run
                b = self.new_buffer(v.name, v.type.dtype, shape, init_phase.INIT_KIND, value=v)
            elif self.is_output(v):
                idx = self.outputs_by_value[id(v)]
                b = self.new_buffer(v.name, v.type.dtype, shape, "output", io_index=idx, value=v)
            else:
                b = self.new_buffer(v.name, v.type.dtype, shape, "temp", value=v)
            self.values[id(v)] = b
        return b

    def kernel(self, template: str, hint: str, params: dict) -> Kernel:
        key = template + "|" + json.dumps(params, sort_keys=True, default=str)
        k = self._by_key.get(key)
        if k is not None:
            return k
        name = f"nnc_{_ident(hint)}_{len(self.kernels)}"
        body = _render_template(template, name=name, **params)
        # identical sources (different params spelling) deduplicate too
        skey = hashlib.sha256(body.replace(name, "@K@").encode()).hexdigest()
        k = self._by_key.get(skey)
        if k is None:
            k = Kernel(name, template, params, body)
            self.kernels[name] = k
            self._by_key[skey] = k
        self._by_key[key] = k
        return k

    def run(self) -> Plan:
        _ensure_loaded()
        f = self.module.main
        for i, r in enumerate(f.results):
            if id(r) not in self.outputs_by_value:
                self.outputs_by_value[id(r)] = i
        inputs = []
        for i, a in enumerate(f.args):
            shape = self.static_shape(a)
            b = self.new_buffer(a.name, a.type.dtype, shape, "input", io_index=i, value=a)
            self.values[id(a)] = b
            inputs.append(b)
        self.init_values = init_phase.input_independent(f, DYNAMIC_OPS)
        if self.options.zero_copy_concat and not self.sym_max:  # slots sit at offsets that differ per run size
            self.concat_slots = concat_slots(f, self.init_values, set(self.outputs_by_value))
        recorder = StepRecorder(self, f)  # one Step per op: what the CPU plan executor runs
        for index, op in enumerate(f.ops):
            if op.name == "const":
                continue
            init = bool(op.results) and id(op.results[0]) in self.init_values
            with recorder.step(index, op, init):
                if init:
                    self.lower_init_op(op)
                else:
                    self.lower_op(op)
        outputs = []
        for i, r in enumerate(f.results):
            b = self.values.get(id(r))
            if self.outputs_by_value[id(r)] != i or b is None or b.kind != "output" or b.alias_of is not None:
                # the output is an input, a constant, an alias, or returned twice: copy it out
                src = self.buffer(r) if b is None else b
                dst = self.new_buffer(r.name, r.type.dtype, self.static_shape(r) or src.shape, "output", io_index=i, value=r)
                dst.dynamic = src.dynamic
                self.launches.append(Launch("memcpy", None, (1, 1, 1), (1, 1, 1), 0, [dst, src], f"return %{r.name}", dst.nbytes))
                b = dst
            outputs.append(b)
        plan = Plan(self.buffers, self.kernels, self.launches, inputs, outputs, options=self.options,
                    init_launches=self.init_launches)
        plan.dynamic = self.dynamic
        plan.steps = recorder.steps  # plan.json "steps" (codegen/steps.py)
        plan.selections = self.selections
        plan.slot_views = list(self.slot_views.values())  # (slot, concat): plan_memory's check_slot_views
        plan_memory(plan)
        plan.memory["fused_away_bytes"] = fused_away_bytes(f)
        plan.memory["zero_copy_concat_bytes"] = self.zero_copy_bytes
        init_phase.place_persistent(plan, ALIGN)
        init_phase.check(plan)
        return plan

    def lower_init_op(self, op: Op):
        """Lowers an input-independent op into the load-time init phase (codegen/init_phase.py)."""
        run_launches, self.launches = self.launches, self.init_launches
        n0 = len(self.init_launches)
        try:
            self.lower_op(op)
        finally:
            self.launches = run_launches
        for l in self.init_launches[n0:]:
            l.init = True

    def lower_op(self, op: Op, extra=None, variants: Optional[list] = None, key_extra: str = "",
                 desc: Optional[str] = None):
        """Collects the candidates of `op` (the registered variants whose applies holds; `variants`:
        only those), asks the selector to choose, renders the choice and records it. A candidate
        whose render declines (legacy variants only) is removed and the selector asked again.
        `extra`: passed to the variants as problem.extra (a fused lowering's Epilogue); key_extra:
        appended to the problem key; desc: what kernels and launches name (default: describe_op)."""
        entries = LOWERINGS.get(op.name) if variants is None else variants
        if not entries:
            raise LoweringError(f"{op.loc}: no CUDA lowering for op {op.name!r} "
                                f"(%{', %'.join(r.name for r in op.results)})")
        if op.regions():
            entries = [e for e in entries if e.regions]
            if not entries:
                raise LoweringError(f"{op.loc}: {op.name} with regions is not supported by the CUDA backend")
        for r in op.results if not op.regions() else ():  # a fused body's ops are checked one by one
            self.static_shape(r)
        problem = Problem(self, op, extra, key_extra)
        cands = []
        for v in entries:
            try:
                fit = v.check(problem)
            except LoweringError:
                raise
            except NncError as err:
                raise LoweringError(f"{op.loc}: {op.name}: {err}") from None
            if fit:
                cands.append(Candidate(v, problem))
        if not cands and problem.symbolic:
            why = "; ".join(f"{v.name}: {v.check(problem).why}" for v in entries)
            raise LoweringError(
                f"{op.loc}: {op.name} ({describe_op(op, lambda x: self.canon(x).name)}): no CUDA kernel variant of this op "
                f"takes runtime sizes, which a range profile needs (its dims are symbolic); build this model with "
                f"static profiles (min = opt = max) or the reference backend. Variants: {why[:600]}")
        declined = []
        while cands:
            chosen, params = self.selector.choose(problem.key, cands) if len(cands) > 1 or \
                len(cands[0].space) > 1 else (cands[0], cands[0].default_params())
            v = chosen.variant
            ctx = LowerCtx(self, op)
            ctx.problem = problem
            if desc is not None:
                ctx._desc = desc
            n0 = len(self.launches)
            try:
                ret = v.render(ctx, problem, params)
            except LoweringError:
                raise
            except NncError as err:  # from shared helpers (attrs parsing...): add where it happened
                raise LoweringError(f"{op.loc}: {op.name}: {err}") from None
            if ret is not None or ctx.emitted:
                missing = [r.name for r in op.results if id(self.canon(r)) not in self.values]
                if missing:
                    raise LoweringError(f"{op.loc}: lowering {v.name} of {op.name} left results {missing} undefined")
                self._record(v, params, n0)
                self._record_tuning(problem.key, n0)
                self.selections.append(Selection(ctx.desc, v.name, dict(params), tuple(c.name for c in cands),
                                                 tuple(declined)))
                return
            if not v.may_decline:
                raise LoweringError(f"{op.loc}: internal error: variant {v.name} applies to {op.name} but its "
                                    f"render declined ({describe_op(op)})")
            declined.append(v.name)
            cands = [c for c in cands if c is not chosen]
        raise LoweringError(f"{op.loc}: every CUDA lowering of {op.name} declined "
                            f"({describe_op(op)})")

    def _record(self, v: Variant, params: dict, n0: int) -> None:
        """The kernels launched since n0 name the variant that emitted them and its params, as
        params["selected"] = {"variant", "params"} (plan.json, the kernel header); the innermost
        choice wins (a fused fallback's body ops record their own; a kernel shared by several ops
        keeps the first). ("variant" alone is a template parameter of some families.)"""
        for launch in self.launches[n0:]:
            k = self.kernels.get(launch.kernel) if launch.kernel is not None else None
            if k is not None and SELECTED not in k.params:
                k.params = {**k.params, SELECTED: {"variant": v.name, "params": dict(params)}}


    def _record_tuning(self, key: str, n0: int) -> None:
        """A tuning selector's record of this problem (codegen/tuning.py: tactic, time, candidates
        tried and rejected) on the launches since n0: plan.json launches[i]["tuning"]; a launch
        that has its inner problem's record (a fused group's anchor) gets the group's as "group"."""
        rec = getattr(self.selector, "record", None)
        t = rec(key) if rec is not None else None
        if t is not None:
            for launch in self.launches[n0:]:
                inner = getattr(launch, "tuning", None)
                if inner is None:
                    launch.tuning = t
                elif inner is not t and "group" not in inner:
                    launch.tuning = {**inner, "group": t}


SELECTED = "selected"  # the key of a kernel's params that records the selection


def _ident(s: str) -> str:
    """Kernel-name fragment from a lowering's hint: [a-z0-9_] only, never model text."""
    return c_identifier(s)


def lower(module: Module, options: Union[LowerOptions, dict, None] = None,
          selector: Optional[Selector] = None) -> Plan:
    """options: LowerOptions, or the dict form {"arch", "precision", "tf32"} (LowerOptions.from_dict).
    selector: a Selector instance (codegen/variants.py) instead of the one options.selector names."""
    if not isinstance(options, LowerOptions):
        options = LowerOptions.from_dict(options)
    # NonZero's count downstream: a runtime size symbol per count, bound at its read-back
    # (codegen/data_dependent.py); the IR's `?` types come back after lowering
    from .data_dependent import symbolize
    dd = symbolize(module)
    try:
        if dd.symbols:
            options = dataclasses.replace(options, symbol_ranges=tuple(options.symbol_ranges) + tuple(
                (n, 0, mx, mx) for n, mx in dd.symbols))
        if options.tune and selector is None:  # timing-based selection on the GPU (codegen/tuning.py)
            from .tuning import lower_tuned
            plan = lower_tuned(module, options)
            plan.data_dependent = tuple(n for n, _ in dd.symbols) or getattr(plan, "data_dependent", ())
            return plan
        plan = Lowerer(module, options, selector).run()
        plan.data_dependent = tuple(n for n, _ in dd.symbols)  # the symbols bound at a read-back
    except LoweringError as e:
        if dd.symbols and "takes runtime sizes" in str(e):  # say what it is (and keep onnx_backend's test)
            raise LoweringError(f"{e} -- here the symbolic size is NonZero's data-dependent count "
                                f"({', '.join(n for n, _ in dd.symbols)}): CUDA code generation needs static "
                                f"shapes for this op") from None
        raise
    finally:
        dd.restore()
    plan.tuning = {"mode": "heuristic", "why": options.tune_reason or "tuning off"}
    return plan
