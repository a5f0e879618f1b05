"""Conv / ConvTranspose (NCHW 1-D and 2-D, NHWC 2-D) on the fast conv + GEMM families: declared
Variants (codegen/variants.py), family "conv", priority 10.

Each variant's `applies` decides from the problem's TensorInfos, attributes and options without
emitting anything (what it derived -- the ConvProblem or GemmProblem it will render -- goes into
problem.memo), `space` is the tile space that exists for that kernel (conv.candidates(problem,
kind) / gemm.candidates), `default` the family's heuristic (conv.default_params /
gemm.default_params), and `render` makes the buffers in the order the lowering always made them
(x, w, y, bias) and emits. problem.extra: the Epilogue of a fused conv group (epilogue_fusion.py;
NONE for the op alone): bias, residual and activation, never a scale.

Conv (ONNX NCHW), in the heuristic order (rank); each applies only where it is valid, and where
the old if-chain chose otherwise the earlier rank wins, so the choices are the chain's:
* conv.depthwise_nchw: C/group == 1 -> the direct kernel's depthwise path (conv_direct.cu.j2), any dtype;
* conv.pointwise_gemm_nchw: 1x1, stride 1, no padding -> a batched GEMM straight on NCHW, no layout pass:
  Y[n, g] (KG x HW) = W[g] (KG x CG) @ X[n, g] (CG x HW); bias enters as a per-row C operand;
* conv.igemm_nchw: fp16 / bf16 / fp32 with `tf32` -> NCHW -> NHWC (+ channel zero-padding to 16 bytes)
  layout kernel into a temp, then the tensor-core implicit GEMM (conv_igemm.cu.j2) with the weight
  OHWI (compile time, or the init phase for an init value: conv_weight.py) and the NCHW output
  written by its epilogue. Not for grouped convs whose C/group is not a multiple of 16 bytes;
* conv.im2col_ffma: strict fp32 (no tf32) -> im2col into a temp (conv_im2col.cu.j2) + FFMA batched
  GEMM (gemm_f32.cu.j2) writing NCHW, when the im2col buffer fits IM2COL_MAX_BYTES;
* conv.direct: the direct kernel for what is left: grouped fp16/bf16/tf32 convs igemm cannot load,
  strict fp32 convs whose im2col buffer is too large. A strict-fp32 conv whose GEMM has fewer 64x64
  CTAs than gemm_lowering.F32_MIN_CTAS goes to the priority-0 fallback (fallback_linalg.py) instead
  (measured faster, H100 resnet18 l3/l4 at b8), as does an igemm conv whose weight is neither a
  constant nor an init value.
Conv {layout = "NHWC"} (compiler/passes/assign_layout.py; weight already OHWI, output NHWC):
* conv.depthwise_nhwc: the NHWC direct kernel (channels innermost; 16 bytes of channels per thread
  with vector loads and stores where the channel multiplier is 1, channels are a multiple of 8
  (fp16/bf16) and the buffers 16-byte aligned, else 2 channels per thread);
* conv.pointwise_gemm_nhwc: 1x1, stride 1, no padding, groups 1 -> one plain GEMM
  [N*H*W, C] x [C, K] (weight as B^T), bias per column;
* conv.igemm_nhwc: the implicit GEMM reading and writing NHWC (no layout kernel, no channel padding:
  C/group not a multiple of 16 bytes loads by element gathers).
  An NHWC conv none of these takes is a clear error (raised by applies): the fallback only knows NCHW.
ConvTranspose: conv_transpose.direct, the direct gather kernel (no atomics), any dtype.

None applies (the fallback, fallback_linalg.py, runs for Conv; ConvTranspose has none) for 3-D
convs, mixed or unsupported dtypes, grids past the hardware limits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import LoweringError
from ..init_transform import is_init_operand
from ..lower import LowerCtx, Problem
from ..variants import YES, Variant, no, order_key, register
from . import conv, gemm
from .common import CTYPES
from .conv_weight import ohwi_weight
from .epilogue import NONE, Epilogue
from .gemm_lowering import FAST_PRIORITY, MAX_GRID_YZ, aligned, emit_spec, f32_worth_it, gemm_ok, kernel_dtype
from .pool import spatial_pads

IM2COL_MAX_BYTES = 512 << 20
FAMILY = "conv"


def _geometry_2d(x_shape, w_shape):
    """(N, C, H, W, R, S, nd) with 1-D convs mapped onto H = R = 1."""
    nd = len(x_shape) - 2
    if nd == 2:
        return x_shape[0], x_shape[1], x_shape[2], x_shape[3], w_shape[2], w_shape[3], 2
    if nd == 1:
        return x_shape[0], x_shape[1], 1, x_shape[2], 1, w_shape[2], 1
    return None


def _to2(v, nd, fill):
    v = list(v)
    return tuple(v) if nd == 2 else (fill, v[0])


def _epi(problem) -> Epilogue:
    return problem.extra if problem.extra is not None else NONE


def _nhwc_layout(problem) -> bool:
    return (problem.attr("layout", "NCHW") or "NCHW") == "NHWC"


def _pointwise(R, S, strides, pads) -> bool:
    return (R, S) == (1, 1) and tuple(strides) == (1, 1) and tuple(pads) == (0, 0, 0, 0)


# ---------------------------------------------------------------- NCHW: what every path derives

@dataclass(frozen=True)
class _Nchw:
    """An ONNX (NCHW) Conv the fast kernels may take: its 2-D problem and the pieces the paths read."""
    pr: conv.ConvProblem  # NCHW in and out, 1-D convs as H = R = 1
    dt: str
    x_aligned: bool


def _nchw_only(problem) -> "_Nchw | str":
    """For the NCHW variants: the op's NCHW problem, or why they do not take it."""
    return "an NHWC conv" if _nhwc_layout(problem) else _nchw(problem)


def _nchw(problem) -> "_Nchw | str":
    """The op's NCHW problem, or why no fast kernel takes it (memoised)."""
    got = problem.memo.get("conv.nchw")
    if got is not None:
        return got
    problem.memo["conv.nchw"] = got = _nchw_case(problem)
    return got


def _nchw_case(problem) -> "_Nchw | str":
    epi = _epi(problem)
    x, w, y, bias = problem.tensor(0), problem.tensor(1), problem.result(0), problem.tensor(2)
    dt = kernel_dtype(x, w, y, bias)
    g2 = _geometry_2d(x.shape, w.shape)
    if dt is None or y.numel == 0 or g2 is None:
        return "dtype not a conv dtype (or mixed), an empty output, or not 1-D/2-D"
    if epi.alpha != 1.0 or epi.beta != 1.0:
        return "an epilogue scale"
    if epi.bias is not None:  # the op's own bias is already summed into it
        bias = epi.bias
    res = epi.residual
    if kernel_dtype(x, bias, res) != dt or (res is not None and tuple(res.shape) != tuple(y.shape)):
        return "bias or residual of another dtype or shape"
    N, C, H, W, R, S, nd = g2
    in_sp, out_sp, kernel = list(x.shape[2:]), list(y.shape[2:]), list(w.shape[2:])
    strides = list(problem.attr("strides") or [1] * nd)
    dil = list(problem.attr("dilations") or [1] * nd)
    begin, end = spatial_pads(problem, in_sp, out_sp, kernel, strides, dil)
    groups = int(problem.attr("group", 1) or 1)
    K = y.shape[1]
    sh, sw = _to2(strides, nd, 1)
    dh, dw = _to2(dil, nd, 1)
    pt, pl = _to2(begin, nd, 0)
    pb, pr_ = _to2(end, nd, 0)
    tf32 = problem.options.tf32 and dt == "float32"
    pr = conv.ConvProblem(N, C, H, W, K, R, S, stride=(sh, sw), pads=(pt, pl, pb, pr_), dilation=(dh, dw),
                          groups=groups, dtype=dt, has_bias=bias is not None, tf32=tf32,
                          has_c=res is not None, act=epi.act, act_params=epi.act_params)
    P, Q = (out_sp[0], out_sp[1]) if nd == 2 else (1, out_sp[0])
    if pr.P != P or pr.Q != Q or C % groups or K % groups or w.shape[1] != C // groups:
        return "geometry does not match the output"
    return _Nchw(pr, dt, aligned(x))


def _nchw_gemm_fields(pr: conv.ConvProblem, epi: Epilogue, PQ: int) -> dict:
    """GemmProblem epilogue fields of a conv run as a batched GEMM writing NCHW (rows: the output
    channels of group z1, columns: pixels)."""
    dt, K, KG = pr.dtype, pr.K, pr.KG
    kw = dict(act=epi.act, act_params=epi.act_params)
    if not pr.has_c:  # the bias enters as a per-row C operand (broadcast along the columns)
        kw.update(has_c=pr.has_bias, c_dtype=dt, ldc_m=1, ldc_n=0, stride_c=(0, KG), beta=1.0)
        return kw
    kw.update(has_c=True, c_dtype=dt, ldc_m=PQ, ldc_n=1, stride_c=(K * PQ, KG * PQ), beta=1.0,
              has_bias=pr.has_bias, bias_dtype=dt, bias_rows=True, bias_stride_z1=KG)
    return kw


def _nchw_gemm_bindings(bias, res) -> dict:
    """The C/bias bindings that go with _nchw_gemm_fields."""
    return {"C": bias} if res is None else {"C": res, "bias": bias}


def _pointwise_gemm_problem(c: _Nchw, epi: Epilogue) -> gemm.GemmProblem:
    pr = c.pr
    HW = pr.H * pr.W
    kw = _nchw_gemm_fields(pr, epi, HW)
    return gemm.GemmProblem(pr.KG, HW, pr.CG, dtype=c.dt, tf32=pr.tf32, batch=(pr.N, pr.groups),
                            stride_a=(0, pr.KG * pr.CG), stride_b=(pr.C * HW, pr.CG * HW),
                            stride_d=(pr.K * HW, pr.KG * HW), **kw)


def _im2col_gemm_problem(c: _Nchw, epi: Epilogue) -> gemm.GemmProblem:
    pr = c.pr
    RS, PQ = pr.R * pr.S, pr.P * pr.Q
    kw = _nchw_gemm_fields(pr, epi, PQ)
    return gemm.GemmProblem(pr.KG, PQ, pr.CG * RS, dtype=c.dt, batch=(pr.N, pr.groups),
                            stride_a=(0, pr.KG * pr.CG * RS), stride_b=(pr.C * RS * PQ, pr.CG * RS * PQ),
                            stride_d=(pr.K * PQ, pr.KG * PQ), **kw)


def _im2col_bytes(pr: conv.ConvProblem) -> int:
    return pr.N * pr.C * pr.R * pr.S * pr.P * pr.Q * CTYPES[pr.dtype][1]


def _vec_elems(dt: str) -> int:
    return 16 // CTYPES[dt][1]


def _grouped_unloadable(pr: conv.ConvProblem) -> bool:
    """A grouped conv whose C/group is not a multiple of 16 bytes: the igemm's loads cannot take it."""
    return pr.groups > 1 and pr.CG % _vec_elems(pr.dtype) != 0


def _buffers(ctx: LowerCtx, epi: Epilogue):
    """x, w, y and the bias/residual the kernel reads, made in the order the lowering always made
    them (the plan's buffer order does not depend on the path)."""
    x, w, y, bias = ctx.inp(0), ctx.inp(1), ctx.out(0), ctx.inp(2)
    if epi.bias is not None:
        bias = epi.bias
    return x, w, y, bias, epi.residual


def _direct_space(problem) -> list:
    return conv.candidates(problem.memo["conv.direct"], "direct", problem.target)


def _direct_default(problem, space) -> dict:
    return conv.default_params(problem.memo["conv.direct"], "direct", problem.target)


def _render_direct(ctx: LowerCtx, problem, params: dict):
    x, w, y, bias, res = _buffers(ctx, _epi(problem))
    spec = conv.render(problem.memo["conv.direct"], params, kind="direct")
    emit_spec(ctx, spec, {"X": x, "W": w, "Y": y, "bias": bias, "C": res})
    return True


def _gemm_space(problem) -> list:
    return gemm.candidates(problem.memo["conv.gemm"], problem.target)


def _gemm_default(problem, space) -> dict:
    return gemm.default_params(problem.memo["conv.gemm"], problem.target)


# ---------------------------------------------------------------- NCHW variants

def _applies_depthwise_nchw(problem):
    c = _nchw_only(problem)
    if isinstance(c, str):
        return no(c)
    if c.pr.CG != 1:
        return no("not depthwise (C/group > 1)")
    if c.pr.N * c.pr.K > MAX_GRID_YZ:
        return no("grid.y = N*K past 65535")
    problem.memo["conv.direct"] = c.pr
    return YES


def _applies_pointwise_nchw(problem):
    c = _nchw_only(problem)
    if isinstance(c, str):
        return no(c)
    pr = c.pr
    if pr.CG == 1:
        return no("depthwise: the direct kernel")
    if not _pointwise(pr.R, pr.S, pr.stride, pr.pads):
        return no("not 1x1, stride 1, unpadded")
    gp = _pointwise_gemm_problem(c, _epi(problem))
    if not gemm_ok(gp) or not c.x_aligned:
        return no("grid or index limits, or an input view not 16-byte aligned")
    problem.memo["conv.gemm"] = gp
    return YES


def _render_pointwise_nchw(ctx: LowerCtx, problem, params: dict):
    epi = _epi(problem)
    x, w, y, bias, res = _buffers(ctx, epi)
    cb = _nchw_gemm_bindings(bias, res)
    emit_spec(ctx, gemm.render(problem.memo["conv.gemm"], params), {"A": w, "B": x, "D": y, **cb})
    return True


def _weight_ready(problem, K: int) -> bool:
    """The weight can be had as OHWI (conv_weight.ohwi_weight): a constant, or an init value whose
    layout kernel's grid fits."""
    return problem.value(1) is not None or (is_init_operand(problem, 1) and K <= MAX_GRID_YZ)


def _applies_igemm_nchw(problem):
    c = _nchw_only(problem)
    if isinstance(c, str):
        return no(c)
    pr = c.pr
    if pr.CG == 1:
        return no("depthwise: the direct kernel")
    if not pr.igemm_ok():
        return no("strict fp32 (no tf32): no tensor-core path")
    if _grouped_unloadable(pr):
        return no("grouped, C/group not a multiple of 16 bytes")
    if pr.N > MAX_GRID_YZ or pr.groups > MAX_GRID_YZ:
        return no("grid.z past 65535")
    if not _weight_ready(problem, pr.K):
        return no("the weight is neither a constant nor an init value")
    cp = conv.padded_channels(pr)
    problem.memo["conv.igemm"] = conv.ConvProblem(
        pr.N, cp, pr.H, pr.W, pr.K, pr.R, pr.S, stride=pr.stride, pads=pr.pads, dilation=pr.dilation,
        groups=pr.groups, dtype=pr.dtype, has_bias=pr.has_bias, tf32=pr.tf32, in_layout="NHWC",
        out_layout="NCHW", has_c=pr.has_c, act=pr.act, act_params=pr.act_params)
    return YES


def _igemm_space(problem) -> list:
    return conv.candidates(problem.memo["conv.igemm"], "igemm", problem.target)


def _igemm_default(problem, space) -> dict:
    return conv.default_params(problem.memo["conv.igemm"], "igemm", problem.target)


def _render_igemm_nchw(ctx: LowerCtx, problem, params: dict):
    x, w, y, bias, res = _buffers(ctx, _epi(problem))
    pr, cpr = problem.memo["conv.nchw"].pr, problem.memo["conv.igemm"]
    cp = cpr.C
    wpad = cp if pr.groups == 1 else None  # only ungrouped convs pad their input channels
    # a const weight transposed at compile time, an init value at load (conv_weight.py)
    wt = ohwi_weight(ctx, pr.K, pr.CG, pr.R, pr.S, pr.groups, wpad, f"ohwi_c{cp}", pr.dtype)
    if wt is None:
        ctx.fail("internal error: conv.igemm_nchw applied but its weight is neither a constant nor an init value")
    xt = ctx.temp(x.dtype, (pr.N, pr.H, pr.W, cp), "nhwc")
    lay = conv.render_layout("nchw_to_nhwc", pr.N, pr.C, pr.H * pr.W, pr.dtype, CP=cp)
    emit_spec(ctx, lay, {"X": x, "Y": xt})
    spec = conv.render(cpr, params, kind="igemm")
    emit_spec(ctx, spec, {"X": xt, "W": wt, "Y": y, "bias": bias, "C": res})
    return True


def _strict_f32_case(problem, c: _Nchw):
    """(im2col GemmProblem, whether the FFMA GEMM is worth running, whether im2col fits)."""
    gp = _im2col_gemm_problem(c, _epi(problem))
    fits = _im2col_bytes(c.pr) <= IM2COL_MAX_BYTES and gemm_ok(gp)
    return gp, f32_worth_it(gp, problem.target), fits


def _applies_im2col(problem):
    c = _nchw_only(problem)
    if isinstance(c, str):
        return no(c)
    if c.pr.CG == 1:
        return no("depthwise: the direct kernel")
    if c.pr.igemm_ok():
        return no("fp16/bf16/tf32: the implicit GEMM")
    gp, worth, fits = _strict_f32_case(problem, c)
    if not worth:
        return no("strict fp32 GEMM too small for the FFMA kernel (F32_MIN_CTAS): the fallback")
    if not fits:
        return no("the im2col buffer past IM2COL_MAX_BYTES, or GEMM grid limits")
    problem.memo["conv.gemm"] = gp
    return YES


def _render_im2col(ctx: LowerCtx, problem, params: dict):
    epi = _epi(problem)
    x, w, y, bias, res = _buffers(ctx, epi)
    pr = problem.memo["conv.nchw"].pr
    PQ = pr.P * pr.Q
    cb = _nchw_gemm_bindings(bias, res)
    col = ctx.temp(x.dtype, (pr.N, pr.C * pr.R * pr.S, PQ), "col")
    emit_spec(ctx, conv.render_im2col(pr), {"X": x, "Y": col})
    emit_spec(ctx, gemm.render(problem.memo["conv.gemm"], params), {"A": w, "B": col, "D": y, **cb})
    return True


def _applies_direct(problem):
    c = _nchw_only(problem)
    if isinstance(c, str):
        return no(c)
    pr = c.pr
    if pr.CG == 1:
        return no("depthwise: conv.depthwise_nchw")
    if pr.N * pr.K > MAX_GRID_YZ:
        return no("grid.y = N*K past 65535")
    if pr.igemm_ok():
        if not _grouped_unloadable(pr):
            return no("the implicit GEMM takes it (or, its weight not ready, the fallback)")
    else:
        _, worth, fits = _strict_f32_case(problem, c)
        if not worth:
            return no("strict fp32 GEMM too small for the FFMA kernel (F32_MIN_CTAS): the fallback")
        if fits:
            return no("im2col + FFMA takes it")
    problem.memo["conv.direct"] = pr
    return YES


# ---------------------------------------------------------------- NHWC variants

@dataclass(frozen=True)
class _Nhwc:
    pr: conv.ConvProblem
    paths: tuple  # the NHWC variants that take it, in rank order ("depthwise", "pointwise", "igemm")
    gemm: Optional[gemm.GemmProblem]


def _nhwc(problem) -> _Nhwc:
    """The NHWC conv's problem and the paths that take it (memoised); raises a clear error when
    none does (the fallback lowerings only know NCHW)."""
    got = problem.memo.get("conv.nhwc")
    if got is None:
        problem.memo["conv.nhwc"] = got = _nhwc_case(problem)
    return got


def _fail(problem, msg: str):
    raise LoweringError(f"{problem.op.loc}: {problem.op.name}: {msg}")


def _nhwc_case(problem) -> _Nhwc:
    epi = _epi(problem)
    x, w, y, bias = problem.tensor(0), problem.tensor(1), problem.result(0), problem.tensor(2)
    dt = kernel_dtype(x, w, y, bias)
    if epi.bias is not None:
        bias = epi.bias
    res = epi.residual
    if dt is None or kernel_dtype(x, bias, res) != dt or epi.alpha != 1.0 or epi.beta != 1.0 or \
            (res is not None and tuple(res.shape) != tuple(y.shape)):
        _fail(problem, "an NHWC Conv needs one float dtype on all operands (and no epilogue scale)")
    N, H, W, C = x.shape
    K, R, S, CG = w.shape
    _, P, Q, _ = y.shape
    strides = list(problem.attr("strides") or [1, 1])
    dil = list(problem.attr("dilations") or [1, 1])
    begin, end = spatial_pads(problem, [H, W], [P, Q], [R, S], strides, dil)
    groups = int(problem.attr("group", 1) or 1)
    tf32 = problem.options.tf32 and dt == "float32"
    pr = conv.ConvProblem(N, C, H, W, K, R, S, stride=tuple(strides), pads=(begin[0], begin[1], end[0], end[1]),
                          dilation=tuple(dil), groups=groups, dtype=dt, has_bias=bias is not None, tf32=tf32,
                          in_layout="NHWC", out_layout="NHWC",
                          has_c=res is not None, act=epi.act, act_params=epi.act_params)
    if pr.P != P or pr.Q != Q or C % groups or K % groups or CG != C // groups or y.numel == 0:
        _fail(problem, f"NHWC Conv geometry: input {list(x.shape)}, weight {list(w.shape)}, output {list(y.shape)}")
    paths, gp = [], None
    if CG == 1:  # depthwise: channels-vectorised direct kernel
        paths.append("depthwise")
    if groups == 1 and _pointwise(R, S, strides, pr.pads):
        # pointwise: one plain GEMM, D [N*H*W, K] = X [N*H*W, C] @ W[K, C]^T, per-column bias
        kw = dict(act=epi.act, act_params=epi.act_params)
        if bias is not None:
            kw.update(has_bias=True, bias_dtype=dt)
        if res is not None:
            kw.update(has_c=True, c_dtype=dt, ldc_m=K, ldc_n=1, beta=1.0)
        cand = gemm.GemmProblem(N * H * W, K, C, dtype=dt, tf32=tf32, trans_b=True, **kw)
        if gemm_ok(cand) and aligned(x) and aligned(w) and (dt != "float32" or tf32):
            paths.append("pointwise")
            gp = cand
    if CG != 1 and pr.igemm_ok() and N <= MAX_GRID_YZ and groups <= MAX_GRID_YZ:
        paths.append("igemm")
    if not paths:
        _fail(problem, f"no NHWC kernel for this Conv ({dt}{'' if dt != 'float32' else ' without tf32'}, "
                       f"groups {groups}): assign-layout leaves such convs NCHW")
    return _Nhwc(pr, tuple(paths), gp)


def _applies_nhwc(path: str):
    def applies(problem):
        if not _nhwc_layout(problem):
            return no("an NCHW conv")
        c = _nhwc(problem)
        if path not in c.paths:
            return no(f"the NHWC {path} kernel does not take it")
        if path == "pointwise":
            problem.memo["conv.gemm"] = c.gemm
        elif path == "depthwise":
            problem.memo["conv.direct"] = c.pr
            res = _epi(problem).residual
            problem.memo["conv.dw_aligned"] = aligned(problem.tensor(0)) and aligned(problem.result(0)) and \
                aligned(res)
        return YES
    return applies


NHWC_DEPTHWISE_NT = 256  # threads per block the NHWC depthwise kernel was tuned with


def _dw_nhwc_space(problem) -> list:
    """conv.dw_nhwc_candidates: block sizes x channels per thread; the 16-byte vector width only
    where input, output and residual start 16-byte aligned (views may not)."""
    space = conv.dw_nhwc_candidates(problem.memo["conv.direct"], problem.target)
    if not problem.memo["conv.dw_aligned"]:
        space = [p for p in space if p["VEC"] <= 2]
    return space


def _dw_nhwc_default(problem, space) -> dict:
    """The widest channels per thread at the tuned block size (16-byte loads where they apply)."""
    return dict(NT=NHWC_DEPTHWISE_NT, OPT=1, VEC=max(p["VEC"] for p in space))


def _render_nhwc_conv(kind: str):
    def render(ctx: LowerCtx, problem, params: dict):
        x, w, y, bias, res = _buffers(ctx, _epi(problem))
        spec = conv.render(problem.memo["conv.nhwc"].pr, params, kind=kind)
        emit_spec(ctx, spec, {"X": x, "W": w, "Y": y, "bias": bias, "C": res})
        return True
    return render


def _igemm_nhwc_space(problem) -> list:
    return conv.candidates(problem.memo["conv.nhwc"].pr, "igemm", problem.target)


def _igemm_nhwc_default(problem, space) -> dict:
    return conv.default_params(problem.memo["conv.nhwc"].pr, "igemm", problem.target)


def _render_pointwise_nhwc(ctx: LowerCtx, problem, params: dict):
    x, w, y, bias, res = _buffers(ctx, _epi(problem))
    emit_spec(ctx, gemm.render(problem.memo["conv.gemm"], params), {"A": x, "B": w, "D": y, "C": res, "bias": bias})
    return True


# ---------------------------------------------------------------- ConvTranspose

def _applies_conv_transpose(problem):
    from ...ir.ops.conv import _convt_geometry
    x, w, y, bias = problem.tensor(0), problem.tensor(1), problem.result(0), problem.tensor(2)
    dt = kernel_dtype(x, w, y, bias)
    g2 = _geometry_2d(x.shape, w.shape)
    if dt is None or y.numel == 0 or g2 is None:
        return no("dtype not a conv dtype (or mixed), an empty output, or not 1-D/2-D")
    N, C, H, W, R, S, nd = g2
    groups = int(problem.attr("group", 1) or 1)
    K = y.shape[1]
    pads, out = _convt_geometry(problem.op.attrs, list(x.shape[2:]), list(w.shape[2:]))
    if [int(o) for o in out] != list(y.shape[2:]) or K != w.shape[1] * groups or C % groups:
        return no("geometry does not match the output")
    strides = list(problem.attr("strides") or [1] * nd)
    dil = list(problem.attr("dilations") or [1] * nd)
    sh, sw = _to2(strides, nd, 1)
    dh, dw = _to2(dil, nd, 1)
    P, Q = (out[0], out[1]) if nd == 2 else (1, out[0])
    ph, pw = _to2([p[0] for p in pads], nd, 0)
    # end pads chosen so that ConvProblem's output size is exactly (P, Q) (output_padding folded in)
    full_h, full_w = (H - 1) * sh + (R - 1) * dh + 1, (W - 1) * sw + (S - 1) * dw + 1
    pr = conv.ConvProblem(N, C, H, W, K, R, S, stride=(sh, sw), pads=(ph, pw, full_h - P - ph, full_w - Q - pw),
                          dilation=(dh, dw), groups=groups, dtype=dt, has_bias=bias is not None, transposed=True)
    if pr.P != P or pr.Q != Q:
        return no("geometry does not match the output")
    if N * K > MAX_GRID_YZ:
        return no("grid.y = N*K past 65535")
    problem.memo["conv.direct"] = pr
    return YES


# ---------------------------------------------------------------- registration

def _conv_variant(name, rank, applies, render, space, default) -> Variant:
    return register(Variant(name, FAMILY, ("Conv",), render, applies, space, default,
                            priority=FAST_PRIORITY, rank=rank))


DEPTHWISE_NHWC = _conv_variant("conv.depthwise_nhwc", 0, _applies_nhwc("depthwise"), _render_nhwc_conv("direct"),
                               _dw_nhwc_space, _dw_nhwc_default)
POINTWISE_GEMM_NHWC = _conv_variant("conv.pointwise_gemm_nhwc", 1, _applies_nhwc("pointwise"),
                                    _render_pointwise_nhwc, _gemm_space, _gemm_default)
IGEMM_NHWC = _conv_variant("conv.igemm_nhwc", 2, _applies_nhwc("igemm"), _render_nhwc_conv("igemm"),
                           _igemm_nhwc_space, _igemm_nhwc_default)
DEPTHWISE_NCHW = _conv_variant("conv.depthwise_nchw", 10, _applies_depthwise_nchw, _render_direct,
                               _direct_space, _direct_default)
POINTWISE_GEMM_NCHW = _conv_variant("conv.pointwise_gemm_nchw", 11, _applies_pointwise_nchw, _render_pointwise_nchw,
                                    _gemm_space, _gemm_default)
IGEMM_NCHW = _conv_variant("conv.igemm_nchw", 12, _applies_igemm_nchw, _render_igemm_nchw, _igemm_space,
                           _igemm_default)
IM2COL_FFMA = _conv_variant("conv.im2col_ffma", 13, _applies_im2col, _render_im2col, _gemm_space, _gemm_default)
DIRECT = _conv_variant("conv.direct", 14, _applies_direct, _render_direct, _direct_space, _direct_default)
CONV_VARIANTS = (DEPTHWISE_NHWC, POINTWISE_GEMM_NHWC, IGEMM_NHWC, DEPTHWISE_NCHW, POINTWISE_GEMM_NCHW, IGEMM_NCHW,
                 IM2COL_FFMA, DIRECT)
OTHER_CONV_VARIANTS: list = []  # other families' Conv variants a fused group's anchor may take (conv_wgmma.py)


def add_conv_variant(v: Variant) -> None:
    OTHER_CONV_VARIANTS.append(v)


CONV_TRANSPOSE = register(Variant("conv_transpose.direct", FAMILY, ("ConvTranspose",), _render_direct,
                                  _applies_conv_transpose, _direct_space, _direct_default, priority=FAST_PRIORITY))


def _epilogue_key(epi: Epilogue) -> str:
    return (f"|conv_epilogue(bias={epi.bias is not None},residual={epi.residual is not None},act={epi.act}"
            f"{list(epi.act_params)})")


def _conv(ctx: LowerCtx, epi: Epilogue = NONE):
    """A Conv with a fused group's epilogue (epilogue_fusion.py's "epilogue.conv"): lowered through
    the selector with the conv variants that apply (plan.json then names the conv variant and its
    tile params); None, having launched nothing, when none applies (the group is then split)."""
    problem = Problem(ctx.L, ctx.op, epi)
    fits = [v for v in sorted(CONV_VARIANTS + tuple(OTHER_CONV_VARIANTS), key=order_key) if v.check(problem)]
    if not fits:
        # the buffers the conv lowering always made first (x, w, the group's output): the split
        # lowering that follows reads them all, and making them here keeps the plan's buffer order
        _buffers(ctx, epi)
        return None
    ctx.L.lower_op(ctx.op, extra=epi, variants=fits, key_extra=_epilogue_key(epi), desc=ctx.desc)
    return True
