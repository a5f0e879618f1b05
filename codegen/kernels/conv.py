"""Convolution kernel family.

* `igemm`: implicit GEMM on tensor cores (templates/conv_igemm.cu.j2, mainloop shared with gemm_tc):
  fp16/bf16 (mma m16n8k16) or fp32 data as TF32 (`tf32=True`). Input NHWC (fast, 16-byte cp.async
  when C/group % 8 == 0 (fp16) / % 4 (fp32)) or NCHW (element gathers); weight pre-transformed at compile
  time to [K, R, S, C/group] (OHWI, `prepare_weight`); output NHWC or NCHW written by the epilogue.
* `direct`: NCHW direct conv for tiny shapes, specialised depthwise kernel (C/group == 1), and ConvTranspose
  as a gather (templates/conv_direct.cu.j2); any dtype incl. strict fp32; weight in ONNX layout. With
  in_layout NHWC: the depthwise kernel on NHWC -> NHWC (VEC channels per thread: 16-byte loads and
  stores where `dw_vec16_ok`, else 2), weight OHWI [K,R,S,1].
* `layout`: NCHW -> NHWC (channel zero-padding) and back (templates/conv_layout.cu.j2).

`plan(problem)` returns the fastest kernel sequence for an ONNX (NCHW) Conv: [nchw->nhwc(+pad)] + igemm
with the NCHW output written directly by the epilogue.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..target import Target
from .common import CTYPES, DEFAULT_TARGET, KernelSpec, act_ctx, cdiv, kernel_name, render as _render
from .gemm import GROUP_M, _tc_smem

MMA = {"float16": "f16", "bfloat16": "bf16", "float32": "tf32"}


@dataclass(frozen=True)
class ConvProblem:
    N: int
    C: int
    H: int
    W: int
    K: int                      # output channels
    R: int
    S: int
    stride: tuple = (1, 1)
    pads: tuple = (0, 0, 0, 0)  # ONNX order: top, left, bottom, right
    dilation: tuple = (1, 1)
    groups: int = 1
    dtype: str = "float16"
    in_layout: str = "NCHW"     # layout of X as the kernel reads it
    out_layout: str = "NCHW"
    has_bias: bool = False
    has_c: bool = False         # residual add (same layout/shape as the output), before activation
    act: str = "none"
    act_params: tuple = ()
    tf32: bool = False          # allow TF32 tensor cores for fp32
    transposed: bool = False    # ConvTranspose (weight [C, K/groups, R, S])
    output_padding: tuple = (0, 0)

    @property
    def P(self):
        sh, dh = self.stride[0], self.dilation[0]
        if self.transposed:
            return (self.H - 1) * sh - self.pads[0] - self.pads[2] + dh * (self.R - 1) + self.output_padding[0] + 1
        return (self.H + self.pads[0] + self.pads[2] - dh * (self.R - 1) - 1) // sh + 1

    @property
    def Q(self):
        sw, dw = self.stride[1], self.dilation[1]
        if self.transposed:
            return (self.W - 1) * sw - self.pads[1] - self.pads[3] + dw * (self.S - 1) + self.output_padding[1] + 1
        return (self.W + self.pads[1] + self.pads[3] - dw * (self.S - 1) - 1) // sw + 1

    @property
    def CG(self):
        return self.C // self.groups

    @property
    def KG(self):
        return self.K // self.groups

    @property
    def flops(self):
        if self.transposed:
            return 2.0 * self.N * self.C * self.H * self.W * self.KG * self.R * self.S
        return 2.0 * self.N * self.P * self.Q * self.K * self.CG * self.R * self.S

    def igemm_ok(self) -> bool:
        return (not self.transposed) and (self.dtype in ("float16", "bfloat16") or self.tf32)


# ---------------------------------------------------------------- tuning spaces (next to the templates)
# conv_igemm.cu.j2: (BM, BN, BK, WARPS_M, WARPS_N, STAGES); BN tracks output channels per group
IGEMM16_SPACE = [
    (128, 128, 32, 2, 2, 4),
    (128, 128, 64, 2, 2, 3),
    (256, 128, 32, 4, 2, 3),
    (128, 64, 32, 2, 2, 4),
    (64, 128, 32, 2, 2, 4),
    (64, 64, 32, 2, 2, 4),
]
IGEMM_TF32_SPACE = [(128, 128, 16, 2, 2, 4), (128, 64, 32, 2, 2, 3), (64, 64, 32, 2, 2, 4)]
# conv_direct.cu.j2: (threads per block, outputs per thread along Q)
DIRECT_SPACE = [(128, 1), (256, 1), (128, 2), (128, 4), (256, 4)]


def candidates(problem: ConvProblem, kind: str | None = None, target: Target = DEFAULT_TARGET) -> list[dict]:
    kind = kind or ("igemm" if problem.igemm_ok() else "direct")
    if kind == "direct":
        return [dict(NT=nt, OPT=o) for nt, o in DIRECT_SPACE if o <= max(1, problem.Q)]
    elem = CTYPES[problem.dtype][1]
    space = IGEMM_TF32_SPACE if problem.dtype == "float32" else IGEMM16_SPACE
    m = problem.N * problem.P * problem.Q
    out = []
    for bm, bn, bk, wm, wn, st in space:
        p = dict(BM=bm, BN=bn, BK=bk, WARPS_M=wm, WARPS_N=wn, STAGES=st)
        if _tc_smem(p, elem, True, True) > target.smem_per_block_optin:
            continue
        if bn > max(64, 1 << max(0, problem.KG - 1).bit_length()) or bm > max(64, 1 << max(0, m - 1).bit_length()):
            continue
        out.append(p)
    return out or [dict(BM=64, BN=64, BK=32, WARPS_M=2, WARPS_N=2, STAGES=3)]


def default_params(problem: ConvProblem, kind: str | None = None, target: Target = DEFAULT_TARGET) -> dict:
    kind = kind or ("igemm" if problem.igemm_ok() else "direct")
    cands = candidates(problem, kind, target)
    sms = target.sm_count
    if kind == "direct":
        return cands[0]
    m = problem.N * problem.P * problem.Q

    def score(p):
        ctas = cdiv(m, p["BM"]) * cdiv(problem.KG, p["BN"]) * problem.groups
        waves = ctas / sms
        util = min(1.0, waves) * (waves / cdiv(ctas, sms))
        waste = problem.KG / (cdiv(problem.KG, p["BN"]) * p["BN"])
        return util * waste * (1.0 + 0.15 * p["BM"] * p["BN"] / (128 * 128))

    return max(cands, key=score)


def dw_vec16_ok(problem: ConvProblem) -> bool:
    """The NHWC depthwise kernel may load 16 bytes of channels at once (VEC = 16 / element size):
    channel multiplier 1 (input channel = output channel) and channels a multiple of VEC, so every
    pixel row and each thread's channels start 16-byte aligned (given aligned buffers)."""
    vec = 16 // CTYPES[problem.dtype][1]
    return problem.KG == 1 and problem.CG == 1 and problem.K % vec == 0 and vec > 2


def dw_nhwc_candidates(problem: ConvProblem, target: Target = DEFAULT_TARGET) -> list[dict]:
    """The NHWC depthwise kernel's space: threads per block x channels per thread (2, and the
    16-byte vector width where dw_vec16_ok; OPT, the NCHW kernel's outputs per thread, stays 1)."""
    vecs = ([16 // CTYPES[problem.dtype][1]] if dw_vec16_ok(problem) else []) + [2 if problem.K % 2 == 0 else 1]
    return [dict(NT=nt, OPT=1, VEC=v) for v in vecs for nt, o in DIRECT_SPACE if o == 1]


def padded_channels(problem: ConvProblem) -> int:
    """Channels the NHWC input should be padded to so the igemm A loads are 16-byte vectors."""
    epc = 16 // CTYPES[problem.dtype][1]
    if problem.groups == 1 and problem.C % epc:
        return cdiv(problem.C, epc) * epc
    return problem.C


def prepare_weight(w: np.ndarray, groups: int = 1, c_pad: int | None = None) -> np.ndarray:
    """ONNX OIHW weight [K, C/groups, R, S] -> OHWI [K, R, S, C/groups] (channels zero-padded to c_pad)."""
    w = np.ascontiguousarray(np.transpose(w, (0, 2, 3, 1)))
    if c_pad is not None and c_pad > w.shape[3]:
        assert groups == 1
        w = np.concatenate([w, np.zeros(w.shape[:3] + (c_pad - w.shape[3],), w.dtype)], axis=3)
    return np.ascontiguousarray(w)


def _geom(pr: ConvProblem) -> dict:
    return dict(CIN=pr.C, H=pr.H, W=pr.W, CG=pr.CG, KG=pr.KG, KTOT=pr.K, R=pr.R, S=pr.S, P=pr.P, Q=pr.Q,
                SH=pr.stride[0], SW=pr.stride[1], PH=pr.pads[0], PW=pr.pads[1], DH=pr.dilation[0], DW=pr.dilation[1])


def render(problem: ConvProblem, params: dict | None = None, kind: str | None = None, name: str | None = None) -> KernelSpec:
    pr = problem
    kind = kind or ("igemm" if pr.igemm_ok() else "direct")
    params = dict(params or default_params(pr, kind))
    ctype, elem, ctype2 = CTYPES[pr.dtype]
    ctx = dict(params)
    ctx.update(_geom(pr))
    ctx.update(act_ctx(pr.act, dict(pr.act_params)))
    ctx.update(T=ctype, has_bias=pr.has_bias, has_c=pr.has_c)
    if kind == "igemm":
        if not pr.igemm_ok():
            raise ValueError("igemm needs fp16/bf16 or tf32, and a forward conv")
        epc = 16 // elem
        ctx.update(conv=True, a_kmajor=True, b_kmajor=True, TO=ctype, TO2=ctype2, TC=ctype, TBIAS=ctype,
                   elem_bytes=elem, mma=MMA[pr.dtype], GROUP_M=GROUP_M, in_layout=pr.in_layout,
                   out_layout=pr.out_layout,
                   vec_a=(pr.in_layout == "NHWC" and pr.CG % epc == 0),
                   vec_b=(pr.CG * pr.R * pr.S) % epc == 0,
                   pair_store=(pr.out_layout == "NHWC" and pr.K % 2 == 0 and pr.KG % 2 == 0))
        ctx["name"] = name or kernel_name("nnc_conv_igemm", ctx)
        src = _render("conv_igemm.cu.j2", **ctx)
        m = pr.N * pr.P * pr.Q
        grid = (cdiv(m, params["BM"]) * cdiv(pr.KG, params["BN"]), 1, pr.groups)
        block = (params["WARPS_M"] * params["WARPS_N"] * 32, 1, 1)
        smem = _tc_smem(params, elem, True, True)
        names = ("X", "W", "Y")
    elif kind == "direct" and pr.in_layout == "NHWC":
        if pr.out_layout != "NHWC" or pr.CG != 1 or pr.transposed:
            raise ValueError("the NHWC direct conv is depthwise (C/group == 1), NHWC -> NHWC only")
        vec = int(params.get("VEC") or (2 if pr.K % 2 == 0 else 1))
        vec16 = vec * elem == 16
        if pr.K % vec or (vec > 2 and not (vec16 and dw_vec16_ok(pr))):
            raise ValueError(f"NHWC depthwise VEC={vec}: {pr.K} channels, channel multiplier {pr.KG}")
        ctx.update(transposed=False, in_layout="NHWC", VEC=vec, VEC16=vec16)
        ctx["name"] = name or kernel_name("nnc_conv_dw_nhwc", ctx)
        src = _render("conv_direct.cu.j2", **ctx)
        grid = (cdiv(pr.N * pr.P * pr.Q * (pr.K // vec), params["NT"]), 1, 1)
        block, smem = (params["NT"], 1, 1), 0
        names = ("X", "W", "Y")
    elif kind == "direct":
        if pr.in_layout != "NCHW" or pr.out_layout != "NCHW":
            raise ValueError("direct conv is NCHW only (NHWC: depthwise only)")
        ctx.update(transposed=pr.transposed)
        ctx["name"] = name or kernel_name("nnc_conv_direct", ctx)
        src = _render("conv_direct.cu.j2", **ctx)
        qt = cdiv(pr.Q, params["OPT"])
        grid = (cdiv(pr.P * qt, params["NT"]), pr.N * pr.K, 1)
        block, smem = (params["NT"], 1, 1), 0
        names = ("X", "W", "Y")
    else:
        raise ValueError(kind)
    args = [(names[0], f"const {ctype}*", None), (names[1], f"const {ctype}*", None), (names[2], f"{ctype}*", None)]
    if pr.has_c:
        args.append(("C", f"const {ctype}*", None))
    if pr.has_bias:
        args.append(("bias", f"const {ctype}*", None))
    args.append(("NB", "int", pr.N))
    return KernelSpec(source=src, name=ctx["name"], grid=grid, block=block, smem=smem, args=args,
                      params=dict(params, family=kind, template="conv_igemm.cu.j2" if kind == "igemm" else "conv_direct.cu.j2"))


def render_layout(direction: str, N: int, C: int, HW: int, dtype: str = "float16", CP: int | None = None,
                  name: str | None = None) -> KernelSpec:
    """direction 'nchw_to_nhwc' (X [N,C,HW] -> Y [N,HW,CP], zero-padded) or 'nhwc_to_nchw' (X [N,HW,CP] -> Y [N,C,HW])."""
    CP = CP or C
    ctype = CTYPES[dtype][0]
    ctx = dict(direction=direction, C=C, CP=CP, HW=HW, T=ctype)
    ctx["name"] = name or kernel_name("nnc_layout", ctx)
    src = _render("conv_layout.cu.j2", **ctx)
    if direction == "nchw_to_nhwc":
        grid = (cdiv(HW, 32), cdiv(CP, 32), N)
    else:
        grid = (cdiv(C, 32), cdiv(HW, 32), N)
    return KernelSpec(source=src, name=ctx["name"], grid=grid, block=(32, 8, 1), smem=0,
                      args=[("X", f"const {ctype}*", None), ("Y", f"{ctype}*", None), ("NB", "int", N)],
                      params=dict(family="layout", direction=direction, template="conv_layout.cu.j2"))


def render_im2col(problem: ConvProblem, name: str | None = None, max_blocks: int = 65536) -> KernelSpec:
    """NCHW im2col: X [N, C, H, W] -> Col [N, C*R*S, P*Q] (grouped convs: group g owns rows
    [g*CG*R*S, (g+1)*CG*R*S)), so the conv is a batched GEMM W[K, CG*R*S] @ Col -> NCHW Y."""
    pr = problem
    ctype = CTYPES[pr.dtype][0]
    ctx = dict(_geom(pr), T=ctype)
    ctx["name"] = name or kernel_name("nnc_im2col", ctx)
    src = _render("conv_im2col.cu.j2", **ctx)
    total = pr.N * pr.C * pr.R * pr.S * pr.P * pr.Q
    return KernelSpec(source=src, name=ctx["name"], grid=(max(1, min(cdiv(total, 256), max_blocks)), 1, 1),
                      block=(256, 1, 1), smem=0,
                      args=[("X", f"const {ctype}*", None), ("Y", f"{ctype}*", None), ("NB", "int", pr.N)],
                      params=dict(family="im2col", template="conv_im2col.cu.j2"))


def plan(problem: ConvProblem, params: dict | None = None) -> list[tuple[KernelSpec, dict]]:
    """Kernels for an ONNX NCHW conv. Returns [(spec, buffers)] where buffers maps each pointer arg to
    'x' (graph input), 'w' (prepared weight: OHWI padded for igemm, ONNX layout for direct), 'y' (output),
    'bias', 'c', or 'tmp_x' (scratch NHWC input: N*H*W*CP elements)."""
    pr = problem
    if not pr.igemm_ok() or (pr.groups > 1 and pr.CG % (16 // CTYPES[pr.dtype][1])):
        spec = render(replace(pr, in_layout="NCHW", out_layout="NCHW"), params, kind="direct")
        return [(spec, {"X": "x", "W": "w", "Y": "y", "C": "c", "bias": "bias"})]
    cp = padded_channels(pr)
    lay = render_layout("nchw_to_nhwc", pr.N, pr.C, pr.H * pr.W, pr.dtype, CP=cp)
    conv = render(replace(pr, C=cp, in_layout="NHWC", out_layout="NCHW"), params, kind="igemm")
    return [(lay, {"X": "x", "Y": "tmp_x"}), (conv, {"X": "tmp_x", "W": "w", "Y": "y", "C": "c", "bias": "bias"})]
