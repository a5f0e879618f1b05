"""MatMul / Gemm on the fast GEMM family (codegen/kernels/gemm.py): the Variants "gemm.matmul" and
"gemm.gemm" (codegen/variants.py), priority 10.

fp16/bf16: mma.sync tensor cores (fp32 accumulate). fp32: FFMA (gemm_f32.cu.j2) unless the compile
option `tf32` is set, then TF32 tensor cores. `applies` is false (nothing emitted; the reason is
the Fit's `why`) for other dtypes, empty outputs, batches the kernel's two batch levels cannot
express, grid.z > 65535 and operands that are not 16-byte aligned views, and strict-fp32 problems
too small to fill the GPU (F32_MIN_CTAS); the priority-0 fallback (fallback_linalg.py) then runs.

One function per op builds the GemmProblem (`matmul_case`, `gemm_case`) from Buffer-like operands:
applies() calls it on the problem's TensorInfos, render() on the real buffers (made in the order
the lowering always made them), so both decide alike. Space: `gemm.candidates(problem, target)`;
default: `gemm.default_params` (the heuristic). problem.extra: the Epilogue of a fused group
(epilogue_fusion.py), NONE for the op alone.

Split-K points (params SPLIT_K > 1) need scratch: `emit_spec` makes the fp32 partials workspace
(a temp of the step) and binds the per-tile counters the phase's split GEMMs share, zeroed once
per run by a copy before the first (`splitk_scratch`), for every GEMM-family caller (conv's GEMM
paths and rnn.py's input projection too).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..lower import LowerCtx
from .. import tma
from ..plan import Buffer, Scalar
from ..variants import YES, Variant, no, order_key, register
from . import gemm
from ..dtypes import KERNEL_FAMILY_TYPES, TABLE
from ..target import Target
from .common import DEFAULT_TARGET, KernelSpec
from .epilogue import NONE, Epilogue

FAST_PRIORITY = 10
# IR dtype -> the kernel family's dtype name: the GEMM/conv dtypes of codegen/dtypes.py (f32, f16, bf16)
DTYPES = {short: row.dtype.np_name for short, row in TABLE.items() if row.dtype.np_name in KERNEL_FAMILY_TYPES}
MAX_GRID_YZ = 65535
# The fp32 FFMA kernel has no split-K: with fewer CTAs (64x64 tiles) than this it loses to the
# fallback's 16x16 tiles on H100 (BERT b1 128x768x768: 0.18 ms vs 0.05 ms), so MatMul/Gemm decline.
# None: the Target's SM count (one wave); tests set an int to force the FFMA kernel.
F32_MIN_CTAS: Optional[int] = None


def kernel_dtype(*bufs: Optional[Buffer]) -> Optional[str]:
    """The kernel-family dtype name when every given buffer has the same supported dtype."""
    dts = {b.dtype.short for b in bufs if b is not None}
    if len(dts) != 1:
        return None
    return DTYPES.get(dts.pop())


def aligned(b: Optional[Buffer], nbytes: int = 16) -> bool:
    """Root buffers are 256-byte aligned; views may start anywhere."""
    return b is None or (b.alias_offset if b.alias_of is not None else 0) % nbytes == 0


def use_tf32(ctx: LowerCtx) -> bool:
    return ctx.options.tf32


def params_for(ctx: LowerCtx, problem) -> dict:
    """The heuristic tile parameters of a GEMM another family emits (conv's GEMM paths, which are
    not variants yet); the GEMM family's own variants declare gemm.candidates as their space and
    the selector picks (codegen/variants.py)."""
    return gemm.default_params(problem, ctx.target)


def emit_spec(ctx: LowerCtx, spec: KernelSpec, bufs: dict) -> None:
    """Adds a rendered KernelSpec to the plan and launches it: pointer args bound by role from `bufs`,
    tensor maps (wgmma's TMA points) as Scalars of type tma.TMAP_CTYPE;
    a split-K kernel's scratch (roles in SPLITK_SCRATCH, not in `bufs`) is made here (splitk_scratch)."""
    template = spec.params.get("template", "")
    k = ctx.add_kernel(spec.name, spec.source, template, spec.params)
    if any(role in SPLITK_SCRATCH and role not in bufs for role, ct, _ in spec.args if ct.endswith("*")):
        bufs = {**bufs, **splitk_scratch(ctx, spec)}
    args = []
    for role, ct, val in spec.args:
        if ct.endswith("*"):
            if bufs.get(role) is None:
                ctx.fail(f"kernel {spec.name}: no buffer bound to {role}")
            args.append(bufs[role])
        elif ct == "int":
            args.append(ctx.i32(val))
        elif ct == "long long":
            args.append(ctx.i64(val))
        elif ct == "float":
            args.append(ctx.f32(val))
        elif tma.is_tmap(ct):  # a tensor map: the spec dict; the runtime encodes it from the named
            args.append(Scalar(tma.TMAP_CTYPE, dict(val)))  # pointer argument's address (codegen/tma.py)
        else:
            ctx.fail(f"kernel {spec.name}: unsupported scalar type {ct}")
    ctx.launch(k, spec.grid, spec.block, args, smem=spec.smem)


# the scratch pointer args of a split-K GEMM (gemm.render): role -> the temp's IR dtype
SPLITK_SCRATCH = {"ws": "f32", "tile_counters": "i32"}


def splitk_scratch(ctx: LowerCtx, spec: KernelSpec) -> dict:
    """The split-K workspace and tile counters of `spec` (their arg values: element counts).

    Workspace: a temp of this step, arena bytes planned like any scratch (codegen/memory.py: live
    at this launch only); it needs no init, every partial is written before it is read.

    Counters must be zero when a launch starts. The last CTA of a tile resets its counter, so a
    zeroed buffer stays zeroed launch after launch; but an arena temp holds whatever another tensor
    (or the runtime's poison) left there. So the split GEMMs of one phase (every run / the load-time
    init phase) share ONE counters buffer (`plan_counters`): zeroed by a copy from a zero constant
    right before the first split launch of the phase, then live until the last one, so no other
    tensor shares its bytes in between: one copy node per run (CUDA-graph replays included), not
    one per GEMM. Each context has its own arena, so its own counters. This relies on the launches
    of a run executing one after the other (one compute stream, no overlap of consecutive kernels).
    A grid with more tiles than the shared buffer has slots (only forced params: split points have
    fewer tiles than SMs) gets its own counters and its own zeroing copy."""
    out = {}
    for role, ct, count in spec.args:
        if role not in SPLITK_SCRATCH or not ct.endswith("*"):
            continue
        if not isinstance(count, int) or count <= 0:
            ctx.fail(f"internal error: kernel {spec.name}: scratch {role} without an element count")
        if role == "tile_counters":
            slots = max(ctx.target.sm_count, 1)
            out[role] = plan_counters(ctx, slots) if count <= slots else _zeroed_counters(ctx, count)
        else:
            out[role] = ctx.temp(SPLITK_SCRATCH[role], (count,), f"splitk_{role}")
    return out


def plan_counters(ctx: LowerCtx, slots: int) -> Buffer:
    """The tile counters the split GEMMs of this phase share (splitk_scratch); made, and zeroed,
    at the first. Kept in Lowerer.transformed (keyed by phase), which the tuner's sandbox rolls back
    with the buffers. Its `data` (zeros) is the bytes a launch expects there: a sandboxed capture of
    a later split GEMM (codegen/tuning_capture.py) allocates it so, as it does a constant."""
    phase = "init" if ctx.L.launches is ctx.L.init_launches else "run"
    key = ("splitk_counters", phase, slots)
    buf = ctx.L.transformed.get(key)
    if buf is None:
        buf = ctx.L.transformed[key] = _zeroed_counters(ctx, slots)
        buf.data = np.zeros(slots, np.int32)
    return buf


def _zeroed_counters(ctx: LowerCtx, count: int) -> Buffer:
    """A counters temp of `count` int32, zeroed by a copy from a zero constant emitted now."""
    buf = ctx.temp("i32", (count,), "splitk_tile_counters")
    key = ("splitk_zeros", count)  # one zero constant per size
    zeros = ctx.L.transformed.get(key)
    if zeros is None:
        zeros = ctx.L.transformed[key] = ctx.new_weight(np.zeros(count, np.int32), "splitk_zeros")
    ctx.copy(buf, zeros)
    return buf


def emit_gemm(ctx: LowerCtx, problem: gemm.GemmProblem, bufs: dict) -> None:
    spec = gemm.render(problem, params_for(ctx, problem))
    emit_spec(ctx, spec, bufs)


def f32_worth_it(problem: gemm.GemmProblem, target: Target = DEFAULT_TARGET) -> bool:
    if problem.family != "f32":
        return True
    min_ctas = target.sm_count if F32_MIN_CTAS is None else F32_MIN_CTAS
    return -(-problem.M // 64) * -(-problem.N // 64) * problem.nbatch >= min_ctas


def gemm_ok(problem: Optional[gemm.GemmProblem]) -> bool:
    return (problem is not None and problem.M > 0 and problem.N > 0 and problem.nbatch <= MAX_GRID_YZ
            and problem.M < 2 ** 31 and problem.N < 2 ** 31 and problem.K < 2 ** 31)


def c_strides(c_shape, y_shape, M: int, N: int, batch=(1, 1)) -> Optional[tuple]:
    """(ldc_m, ldc_n, (sC0, sC1)) that read a contiguous C of c_shape broadcast (numpy rules) onto
    the GEMM result y_shape [*batch dims, M, N], whose nonunit batch dims the kernel runs as
    z = z0 * B1 + z1 (batch = (B0, B1): B1 the product of the last ones, as matmul_problem merges
    them); None when C does not broadcast onto y or a batch level would need two strides (a
    broadcast and a real axis merged into one level).

    An axis where C has extent 1 and y does not gets stride 0; the others keep C's contiguous
    strides, so a C of y's own shape reads exactly like y."""
    c_shape, y_shape = tuple(c_shape), tuple(y_shape)
    r = len(y_shape)
    if len(c_shape) > r or r < 2 or y_shape[-2:] != (M, N):
        return None
    cs = (1,) * (r - len(c_shape)) + c_shape
    if any(c not in (1, d) for c, d in zip(cs, y_shape)):
        return None
    eff, acc = [0] * r, 1
    for i in reversed(range(r)):
        eff[i] = 0 if cs[i] == 1 and y_shape[i] != 1 else acc
        acc *= cs[i]
    dims = [i for i in range(r - 2) if y_shape[i] != 1]  # the batch axes the grid runs over
    B0, B1 = batch
    split, inner = len(dims), 1
    while split > 0 and inner < B1:
        split -= 1
        inner *= y_shape[dims[split]]
    if inner != B1 or math.prod(y_shape[i] for i in dims[:split]) != B0:
        return None
    level = []
    for group in (dims[:split], dims[split:]):
        # one level walks its axes as one flattened index: each axis' stride is the next one's
        # times that one's extent (all zero: a broadcast level)
        if any(eff[i] != eff[j] * y_shape[j] for i, j in zip(group, group[1:])):
            return None
        level.append(eff[group[-1]] if group else 0)
    return eff[-2], eff[-1], tuple(level)


def epilogue_fields(epi: Epilogue, dt: str, y: Buffer, M: int, N: int, stride_d=(0, 0), batch=(1, 1)):
    """(GemmProblem fields, buffer bindings) of a fused epilogue on a GEMM writing y contiguously
    (ldd = N): y's dtype as the output dtype, the residual as C (y's shape, or one that broadcasts
    onto it: c_strides), a per-column fp32 bias, the activation; None when the variant cannot take
    it (the f32 template stores fp32 only). Empty for NONE, so an unfused op renders exactly the
    kernel it did before."""
    odt = kernel_dtype(y)
    if odt is None or (odt != dt and dt == "float32"):  # gemm_f32.cu.j2 stores fp32 only
        return None
    kw, bufs = {}, {}
    if odt != dt:
        kw["out_dtype"] = odt
    if epi.residual is not None:
        if kernel_dtype(epi.residual) != dt:
            return None
        # the shape it is added onto: y's, or (a fuse-epilogue view between) a view of the same
        # elements in the same order
        onto = tuple(epi.residual_onto) if epi.residual_onto is not None else tuple(y.shape)
        if math.prod(onto) != y.numel:
            return None
        if tuple(epi.residual.shape) == onto:  # y's own layout (also a squeezed 1-D MatMul's)
            ldc_m, ldc_n, stride_c = N, 1, tuple(stride_d)
        else:
            got = c_strides(epi.residual.shape, onto, M, N, batch)
            if got is None:
                return None
            ldc_m, ldc_n, stride_c = got
        kw.update(has_c=True, c_dtype=dt, ldc_m=ldc_m, ldc_n=ldc_n, stride_c=stride_c, beta=float(epi.beta))
        bufs["C"] = epi.residual
    if epi.bias is not None:
        if epi.bias.dtype.short != "f32" or epi.bias.numel != N:
            return None
        kw.update(has_bias=True, bias_dtype="float32")
        bufs["bias"] = epi.bias
    if epi.act != "none":
        kw.update(act=epi.act, act_params=tuple(epi.act_params))
    return kw, bufs


def matmul_case(a, b, y, epi: Epilogue, tf32: bool, target: Target):
    """(GemmProblem, buffer bindings) of a MatMul on a, b -> y with `epi`, or why not (a str).
    a, b, y: Buffers or TensorInfos (codegen/lower.py); the bindings hold what was given."""
    dt = kernel_dtype(a, b)
    if dt is None:
        return "operand dtypes not a GEMM dtype (or different)"
    if not a.shape or not b.shape or y.numel == 0:
        return "a scalar operand or an empty result"
    if not (aligned(a) and aligned(b)):
        return "an operand view not 16-byte aligned"
    try:
        pr = gemm.matmul_problem(a.shape, b.shape, dt, tf32=tf32 and dt == "float32")
    except ValueError as e:
        return str(e)
    if pr is None:
        return "the batch needs more than two batch levels"
    got = None
    flat = gemm.fold_batch_into_rows(pr)
    if flat is not None:  # one GEMM of batch * M rows, unless the epilogue needs the batch (a broadcast C)
        got = epilogue_fields(epi, dt, y, flat.M, flat.N, flat.stride_d, flat.batch)
        pr = flat if got is not None else pr
    if got is None:
        got = epilogue_fields(epi, dt, y, pr.M, pr.N, pr.stride_d, pr.batch)
    if got is None:
        return "the epilogue does not fit the kernel"
    kw, bufs = got
    if epi.alpha != 1.0:
        kw["alpha"] = float(epi.alpha)
    pr = gemm.with_(pr, **kw) if kw else pr
    return _checked(pr, target) or (pr, {"A": a, "B": b, "D": y, **bufs})


def gemm_case(a, b, c, y, attrs, epi: Epilogue, tf32: bool, target: Target):
    """(GemmProblem, buffer bindings) of an ONNX Gemm (c: its C operand or None), or why not.
    The epilogue's alpha scales the whole result (alpha * A @ B + beta * C); its residual needs C free."""
    alpha, beta = float(getattr(attrs, "alpha", 1.0)), float(getattr(attrs, "beta", 1.0))
    if c is not None and beta == 0.0:
        c = None
    if c is not None and epi.residual is not None:
        return "C and a residual: one C operand"
    alpha, beta = alpha * epi.alpha, beta * epi.alpha
    dt = kernel_dtype(a, b, c)
    if dt is None:
        return "operand dtypes not a GEMM dtype (or different)"
    if len(a.shape) != 2 or len(b.shape) != 2 or y.numel == 0 or (c is not None and len(c.shape) > 2):
        return "operand ranks, or an empty result"
    if not (aligned(a) and aligned(b)):
        return "an operand view not 16-byte aligned"
    ta, tb = bool(getattr(attrs, "transA", 0)), bool(getattr(attrs, "transB", 0))
    M, K = (a.shape[1], a.shape[0]) if ta else a.shape
    N = b.shape[0] if tb else b.shape[1]
    got = epilogue_fields(epi, dt, y, M, N)
    if got is None:
        return "the epilogue does not fit the kernel"
    kw, bufs = got
    if c is not None:
        cs = [1] * (2 - len(c.shape)) + list(c.shape)
        kw.update(has_c=True, c_dtype=dt, ldc_m=cs[1] if cs[0] != 1 else 0, ldc_n=1 if cs[1] != 1 else 0, beta=beta)
        bufs["C"] = c
    pr = gemm.GemmProblem(M, N, K, dtype=dt, trans_a=ta, trans_b=tb, alpha=alpha,
                          tf32=tf32 and dt == "float32", **kw)
    return _checked(pr, target) or (pr, {"A": a, "B": b, "D": y, **bufs})


def _checked(pr: gemm.GemmProblem, target: Target) -> Optional[str]:
    if not gemm_ok(pr):
        return "grid or index limits"
    if not f32_worth_it(pr, target):
        return "strict fp32 problem too small for the FFMA kernel (F32_MIN_CTAS)"
    return None


def _case(problem, a, b, c, y):
    epi = problem.extra if problem.extra is not None else NONE
    tf32 = problem.options.tf32
    if problem.op.name == "MatMul":
        return matmul_case(a, b, y, epi, tf32, problem.target)
    return gemm_case(a, b, c, y, problem.op.attrs, epi, tf32, problem.target)


def runtime_rows(problem):
    """A range profile's GEMM (codegen/runtime_sizes.py): the Expr of its rows M, or why the
    kernel cannot take it. The kernels read M as an argument and guard every row (the tail tile's
    loads and stores), so a runtime M is correct where nothing else depends on a symbol: the
    common case, activations [*batch, S, K] times a static weight [K, N] (the batch folded into
    the rows), or a Gemm without transA; N and K static, a Gemm's own C a static per-column bias
    or of the result's own shape (ldc_m = N at every size). The problem is then built at the
    profile's max (buffers are sized there; a smaller run is the prefix of each)."""
    a, b, y = problem.sym_shape(0), problem.sym_shape(1), problem.sym_result_shape(0)
    if not all(isinstance(d, int) for d in b) or len(b) != 2 or len(a) < 2 or not isinstance(a[-1], int) \
            or not isinstance(y[-1], int) or tuple(y) != tuple(a[:-1]) + (y[-1],):
        return "symbolic dims other than the rows of A (a static 2-D B)"
    if problem.op.name == "Gemm":
        if int(problem.attr("transA", 0) or 0):
            return "symbolic rows with transA"
        if problem.has(2) and problem.op.operands[2] is not None:
            cs = problem.sym_shape(2)
            if not all(isinstance(d, int) for d in cs) and tuple(cs) != tuple(y):
                return "a symbolic C that is not of the result's shape"
    return math.prod(a[:-1])


def _rt_fit(problem, pr: gemm.GemmProblem, rows) -> Optional[str]:
    """Why the GemmProblem built at max cannot run at the runtime rows `rows` (None: it can)."""
    from ..runtime_sizes import at_max
    if pr.nbatch != 1 or pr.trans_a or pr.bias_rows or pr.M != at_max(rows, problem.L.sym_max):
        return "symbolic rows that do not fold into one GEMM's M"
    return None


def _opt_rows(problem, pr: gemm.GemmProblem) -> gemm.GemmProblem:
    """The problem at the range profile's opt rows: the tile heuristics and the f32 cut-off decide
    there, as a static build of the opt shape would."""
    from ..runtime_sizes import at_max, at_opt
    rows = problem.memo["gemm_rows"]
    return gemm.with_(pr, M=max(1, at_max(rows, at_opt(problem.options.symbol_ranges))))


def _applies(problem):
    got = _case(problem, problem.tensor(0), problem.tensor(1), problem.tensor(2) if problem.op.name == "Gemm" else None,
                problem.result(0))
    if isinstance(got, str):
        return no(got)
    pr = got[0]
    problem.memo.pop("gemm_rows", None)
    if getattr(problem, "symbolic", False):
        rows = runtime_rows(problem)
        why = rows if isinstance(rows, str) else _rt_fit(problem, pr, rows)
        if why is not None:
            return no(why)
        problem.memo["gemm_rows"] = rows
        pr = _opt_rows(problem, pr)
        if not f32_worth_it(pr, problem.target):
            return no("strict fp32 problem too small for the FFMA kernel at the profile's opt (F32_MIN_CTAS)")
    problem.memo["gemm"] = pr
    return YES


def _space(problem) -> list:
    space = gemm.candidates(problem.memo["gemm"], problem.target)
    if "gemm_rows" in problem.memo:  # split-K's workspace and tile counters are sized by M: unsplit only
        space = [p for p in space if p.get("SPLIT_K", 1) == 1]
    return space


def _default(problem, space) -> dict:
    got = gemm.default_params(problem.memo["gemm"], problem.target)
    if "gemm_rows" in problem.memo and got.get("SPLIT_K", 1) != 1:
        same = [p for p in space if all(p.get(k) == got.get(k) for k in ("BM", "BN", "BK"))]
        got = dict((same or space)[0])
    return got


def _render(ctx: LowerCtx, problem, params: dict):
    a, b, y = ctx.inp(0), ctx.inp(1), ctx.out(0)  # the order buffers were always made in
    c = ctx.inp(2) if ctx.op.name == "Gemm" else None
    got = _case(problem, a, b, c, y)
    if isinstance(got, str):
        ctx.fail(f"internal error: the GEMM variant applied but its buffers do not fit ({got})")
    pr, bufs = got
    spec = gemm.render(pr, params)
    rows = problem.memo.get("gemm_rows")
    if rows is not None:
        spec = runtime_rows_spec(spec, rows, pr.N, params)
    emit_spec(ctx, spec, bufs)
    return True


def runtime_rows_spec(spec: KernelSpec, rows, N: int, params: dict) -> KernelSpec:
    """A GEMM rendered at the profile's max rows, made to run `rows` (an Expr) per run: the M
    argument and the grid's tiles (ceil(M / BM) * ceil(N / BN), the kernel's own tiles_m from the
    same M) evaluated per run. The source is the same at every M."""
    import dataclasses
    from ..runtime_sizes import ceil_div
    if spec.grid[1] != 1 or spec.grid[2] != 1:
        raise ValueError("internal error: a runtime-rows GEMM with split-K or a batch")
    args = [(role, ct, rows if role == "M" else val) for role, ct, val in spec.args]
    grid = (ceil_div(rows, params["BM"]) * -(-N // params["BN"]), 1, 1)
    return dataclasses.replace(spec, args=args, grid=grid)


def _time_model(problem, params) -> float:
    """A rough cost (seconds) for a stand-in timer and the tuner's pruning: gemm.modelled_time
    (waves of CTAs times one CTA's tile of work, split-K points their share of K plus the
    reduction; constants fitted to H200 timings of small-M shapes: a model, not a measurement)."""
    return gemm.modelled_time(problem.memo["gemm"], params, problem.target)


MATMUL = register(Variant("gemm.matmul", "gemm", ("MatMul",), _render, _applies, _space, _default,
                          priority=FAST_PRIORITY, cost=_time_model, runtime_sizes=True))  # runtime rows only
GEMM = register(Variant("gemm.gemm", "gemm", ("Gemm",), _render, _applies, _space, _default,
                        priority=FAST_PRIORITY, cost=_time_model, runtime_sizes=True))
FAST = {"MatMul": MATMUL, "Gemm": GEMM}  # the mma.sync variants a fused GEMM epilogue group renders its anchor with
# every GEMM-family variant a fused epilogue group may render its anchor with, in the heuristic order
# (other GEMM families, e.g. gemm_wgmma.py, add theirs with add_epilogue_variant)
EPILOGUE_VARIANTS: dict = {"MatMul": [MATMUL], "Gemm": [GEMM]}


def add_epilogue_variant(op: str, v: Variant) -> None:
    EPILOGUE_VARIANTS[op] = sorted(EPILOGUE_VARIANTS[op] + [v], key=order_key)
