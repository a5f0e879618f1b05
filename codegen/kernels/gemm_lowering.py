"""MatMul / Gemm on the fast GEMM family (codegen/kernels/gemm.py), priority 10.

fp16/bf16: mma.sync tensor cores (fp32 accumulate). fp32: FFMA (gemm_f32.cu.j2) unless the compile
option `tf32` is set, then TF32 tensor cores. Declines (returns None before emitting anything) for
other dtypes, empty outputs, batches the kernel's two batch levels cannot express, grid.z > 65535 and
operands that are not 16-byte aligned views, and strict-fp32 problems too small to fill the GPU
(F32_MIN_CTAS); the priority-0 fallback (fallback_linalg.py) then runs.

Params: `gemm.default_params` (heuristic). `gemm.candidates(problem)` stays the tuning space for a
later timing-based selection (`params_for` is the single hook where it will plug in).
"""
from __future__ import annotations

from typing import Optional

from ..lower import LowerCtx, lowering
from ..plan import Buffer
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
    """Tile parameters for a GEMM problem (heuristic for now; the autotuner will plug in here)."""
    return gemm.default_params(problem, ctx.target)


def emit_spec(ctx: LowerCtx, spec: KernelSpec, bufs: dict) -> None:
    """Adds a rendered KernelSpec to the plan and launches it: pointer args bound by role from `bufs`."""
    template = spec.params.get("template", "")
    k = ctx.add_kernel(spec.name, spec.source, template, spec.params)
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
        else:
            ctx.fail(f"kernel {spec.name}: unsupported scalar type {ct}")
    ctx.launch(k, spec.grid, spec.block, args, smem=spec.smem)


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


def epilogue_fields(epi: Epilogue, dt: str, y: Buffer, N: int, stride_d=(0, 0)):
    """(GemmProblem fields, buffer bindings) of a fused epilogue on a GEMM writing y contiguously
    (ldd = N): y's dtype as the output dtype, the residual as C (y's shape), a per-column fp32
    bias, the activation; None when the variant cannot take it (the f32 template stores fp32 only).
    Empty for NONE, so an unfused op renders exactly the kernel it did before."""
    odt = kernel_dtype(y)
    if odt is None or (odt != dt and dt == "float32"):  # gemm_f32.cu.j2 stores fp32 only
        return None
    kw, bufs = {}, {}
    if odt != dt:
        kw["out_dtype"] = odt
    if epi.residual is not None:
        if kernel_dtype(epi.residual) != dt or tuple(epi.residual.shape) != tuple(y.shape):
            return None
        kw.update(has_c=True, c_dtype=dt, ldc_m=N, ldc_n=1, stride_c=tuple(stride_d), beta=float(epi.beta))
        bufs["C"] = epi.residual
    if epi.bias is not None:
        if epi.bias.dtype.short != "f32" or epi.bias.numel != N:
            return None
        kw.update(has_bias=True, bias_dtype="float32")
        bufs["bias"] = epi.bias
    if epi.act != "none":
        kw.update(act=epi.act, act_params=tuple(epi.act_params))
    return kw, bufs


@lowering("MatMul", priority=FAST_PRIORITY)
def _matmul(ctx: LowerCtx, epi: Epilogue = NONE):
    """epi: the epilogue of a fused group (codegen/kernels/epilogue_fusion.py)."""
    a, b, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    dt = kernel_dtype(a, b)
    if dt is None or not a.shape or not b.shape or y.numel == 0 or not (aligned(a) and aligned(b)):
        return None
    try:
        pr = gemm.matmul_problem(a.shape, b.shape, dt, tf32=use_tf32(ctx) and dt == "float32")
    except ValueError:
        return None
    if pr is None:
        return None
    got = epilogue_fields(epi, dt, y, pr.N, pr.stride_d)
    if got is None:
        return None
    kw, bufs = got
    if epi.alpha != 1.0:
        kw["alpha"] = float(epi.alpha)
    pr = gemm.with_(pr, **kw) if kw else pr
    if not gemm_ok(pr) or not f32_worth_it(pr, ctx.target):
        return None
    emit_gemm(ctx, pr, {"A": a, "B": b, "D": y, **bufs})
    return True


@lowering("Gemm", priority=FAST_PRIORITY)
def _gemm(ctx: LowerCtx, epi: Epilogue = NONE):
    """epi: the epilogue of a fused group (codegen/kernels/epilogue_fusion.py); its alpha scales
    the whole Gemm result (alpha * A @ B + beta * C), its residual needs the C operand free."""
    a, b, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    c = ctx.inp(2)
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    if c is not None and beta == 0.0:
        c = None
    if c is not None and epi.residual is not None:
        return None
    alpha, beta = alpha * epi.alpha, beta * epi.alpha
    dt = kernel_dtype(a, b, c)
    if dt is None or len(a.shape) != 2 or len(b.shape) != 2 or y.numel == 0:
        return None
    if c is not None and len(c.shape) > 2:
        return None
    if not (aligned(a) and aligned(b)):
        return None
    ta, tb = bool(ctx.attr("transA", 0)), bool(ctx.attr("transB", 0))
    M, K = (a.shape[1], a.shape[0]) if ta else a.shape
    N = b.shape[0] if tb else b.shape[1]
    got = epilogue_fields(epi, dt, y, N)
    if got is None:
        return None
    kw, bufs = got
    if c is not None:
        cs = [1] * (2 - len(c.shape)) + list(c.shape)
        kw.update(has_c=True, c_dtype=dt, ldc_m=cs[1] if cs[0] != 1 else 0, ldc_n=1 if cs[1] != 1 else 0, beta=beta)
        bufs["C"] = c
    pr = gemm.GemmProblem(M, N, K, dtype=dt, trans_a=ta, trans_b=tb, alpha=alpha,
                          tf32=use_tf32(ctx) and dt == "float32", **kw)
    if not gemm_ok(pr) or not f32_worth_it(pr, ctx.target):
        return None
    emit_gemm(ctx, pr, {"A": a, "B": b, "D": y, **bufs})
    return True
