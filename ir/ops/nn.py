"""Spatial resampling and rearrangement: Resize, Dropout, DepthToSpace, SpaceToDepth,
GridSample, AffineGrid, RoiAlign."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import NncError
from ..registry import register
from ..symbolic import UNKNOWN
from ..types import BOOL, TensorType
from ._util import norm_axis


# ---------------------------------------------------------------- Resize

@dataclass(frozen=True)
class ResizeAttrs:
    antialias: int = 0
    axes: Optional[tuple[int, ...]] = None
    coordinate_transformation_mode: str = "half_pixel"
    cubic_coeff_a: float = -0.75
    exclude_outside: int = 0
    extrapolation_value: float = 0.0
    keep_aspect_ratio_policy: str = "stretch"
    mode: str = "nearest"
    nearest_mode: str = "round_prefer_floor"


def _resize_plan(a: ResizeAttrs, in_shape, scales, sizes):
    """(axes, per-dim scale list, per-dim output sizes); dims may be symbolic when scales are
    integral."""
    r = len(in_shape)
    axes = [norm_axis(x, r) for x in a.axes] if a.axes else list(range(r))
    if sizes is not None and np.size(sizes) > 0:
        sizes = [int(v) for v in np.asarray(sizes).reshape(-1)]
        out = list(in_shape)
        for i, d in enumerate(axes):
            out[d] = sizes[i]
        sc = [1.0] * r
        for d in axes:
            if not isinstance(in_shape[d], int):
                raise NncError("Resize with sizes needs static input dims on the resized axes")
            sc[d] = out[d] / in_shape[d]
        if a.keep_aspect_ratio_policy != "stretch":
            vals = [sc[d] for d in axes]
            s = min(vals) if a.keep_aspect_ratio_policy == "not_larger" else max(vals)
            for d in axes:
                sc[d] = s
                out[d] = int(s * in_shape[d] + 0.5)
        return axes, sc, out
    if scales is None or np.size(scales) == 0:
        raise NncError("Resize needs scales or sizes")
    scales = [float(v) for v in np.asarray(scales).reshape(-1)]
    sc = [1.0] * r
    for i, d in enumerate(axes):
        sc[d] = scales[i]
    out = []
    for d in range(r):
        dim = in_shape[d]
        if isinstance(dim, int):
            out.append(int(np.float64(np.float32(sc[d])) * dim) if True else 0)
        elif float(sc[d]).is_integer():
            out.append(dim * int(sc[d]))
        else:
            out.append(UNKNOWN)
    return axes, sc, out


def _resize_infer(ctx):
    xs = ctx.shape(0)
    a = ctx.attrs
    scales = ctx.value(2) if ctx.has(2) else None
    sizes = ctx.value(3) if ctx.has(3) else None
    if (ctx.has(2) and scales is None) or (ctx.has(3) and sizes is None):
        if ctx.has(3) and sizes is None:
            if a.axes:
                out = list(xs)
                for d in a.axes:
                    out[norm_axis(d, len(xs))] = UNKNOWN
                return [TensorType(ctx.dtype(0), tuple(out))]
            return [TensorType(ctx.dtype(0), (UNKNOWN,) * len(xs))]
        if not (ctx.has(3) and sizes is not None):
            return [TensorType(ctx.dtype(0), (UNKNOWN,) * len(xs))]
    _, _, out = _resize_plan(a, xs, scales, sizes)
    return [TensorType(ctx.dtype(0), tuple(out))]


def _coeffs(a: ResizeAttrs, ratio, scale):
    """Interpolation weights, shape (out, n), for ratio in (0, 1]."""
    A = a.cubic_coeff_a
    r = ratio[:, None]
    if a.mode == "linear":
        if a.antialias:
            s = min(scale, 1.0)
            start = int(np.floor(-1 / s) + 1)
            fp = 2 - 2 * start
            args = (np.arange(start, start + fp)[None, :] - r) * s
            c = np.clip(1 - np.abs(args), 0, 1)
            return c / c.sum(axis=1, keepdims=True)
        return np.concatenate([1 - r, r], axis=1)
    if a.mode == "cubic":
        if a.antialias:
            s = min(scale, 1.0)
            i0 = int(np.floor(-2 / s) + 1)
            i1 = 2 - i0
            x = np.abs(s * (np.arange(i0, i1)[None, :] - r))
            x2, x3 = x * x, x * x * x
            c = np.where(x <= 1, (A + 2) * x3 - (A + 3) * x2 + 1,
                         np.where(x < 2, A * x3 - 5 * A * x2 + 8 * A * x - 4 * A, 0.0))
            return c / c.sum(axis=1, keepdims=True)
        q = 1 - r
        return np.concatenate([
            ((A * (r + 1) - 5 * A) * (r + 1) + 8 * A) * (r + 1) - 4 * A,
            ((A + 2) * r - (A + 3)) * r * r + 1,
            ((A + 2) * q - (A + 3)) * q * q + 1,
            ((A * (q + 1) - 5 * A) * (q + 1) + 8 * A) * (q + 1) - 4 * A], axis=1)
    raise NncError(f"Resize: unknown mode {a.mode!r}")


def _resize_axis(a: ResizeAttrs, data, axis, scale, out_len, roi):
    in_len = data.shape[axis]
    if out_len == 0:
        shp = list(data.shape)
        shp[axis] = 0
        return np.empty(shp, data.dtype)
    out_w = scale * in_len
    y = np.arange(out_len, dtype=np.float64)
    ctm = a.coordinate_transformation_mode
    extrap = None
    if ctm == "align_corners":
        x = np.zeros(out_len) if out_w == 1 else y * (in_len - 1) / (out_w - 1)
    elif ctm == "asymmetric":
        x = y / scale
    elif ctm == "tf_crop_and_resize":
        r0, r1 = roi
        if out_w == 1:
            x = np.full(out_len, (r1 - r0) * (in_len - 1) / 2)
        else:
            x = y * (r1 - r0) * (in_len - 1) / (out_w - 1)
        x = x + r0 * (in_len - 1)
        extrap = (x < 0) | (x > in_len - 1)
    elif ctm == "pytorch_half_pixel":
        x = np.full(out_len, -0.5) if out_w == 1 else (y + 0.5) / scale - 0.5
    elif ctm == "half_pixel":
        x = (y + 0.5) / scale - 0.5
    elif ctm == "half_pixel_symmetric":
        adj = out_len / out_w
        x = in_len / 2 * (1 - adj) + (y + 0.5) / scale - 0.5
    elif ctm == "tf_half_pixel_for_nn":
        x = (y + 0.5) / scale
    else:
        raise NncError(f"Resize: unknown coordinate_transformation_mode {ctm!r}")
    xi = np.floor(x)
    if a.mode == "nearest":
        frac = x - xi
        nm = a.nearest_mode
        integer = frac == 0
        if nm == "round_prefer_floor":
            up = frac > 0.5
        elif nm == "round_prefer_ceil":
            up = frac >= 0.5
        elif nm == "floor":
            up = np.zeros_like(integer)
        elif nm == "ceil":
            up = ~integer
        else:
            raise NncError(f"Resize: unknown nearest_mode {nm!r}")
        idx = np.clip(xi.astype(np.int64) + up, 0, in_len - 1)
        res = np.take(data, idx, axis=axis)
    else:
        ratio = np.where(x == xi, 1.0, x - xi)
        c = _coeffs(a, ratio, scale)
        n = c.shape[1]
        pw = int(np.ceil(n / 2))
        xp = x + pw
        pp = np.floor(xp).astype(np.int64)
        fr = xp - pp
        if n % 2 == 0:
            off = np.where(fr == 0, -(n // 2), -(n // 2) + 1)
        else:
            base = -((n - 1) // 2)
            off = np.where(fr <= 0.5, base, base + 1)
        nb = (pp + off)[:, None] + np.arange(n)[None, :] - pw
        if a.exclude_outside:
            c = np.where((nb < 0) | (nb >= in_len), 0.0, c)
            s = c.sum(axis=1, keepdims=True)
            c = c / np.where(s == 0, 1.0, s)
        nb = np.clip(nb, 0, in_len - 1)
        g = np.take(data, nb, axis=axis)  # ..., out, n, ...
        cs = (1,) * axis + c.shape + (1,) * (data.ndim - axis - 1)
        res = (g * c.reshape(cs)).sum(axis=axis + 1)
    if extrap is not None and extrap.any():
        ms = (1,) * axis + (out_len,) + (1,) * (data.ndim - axis - 1)
        res = np.where(extrap.reshape(ms), a.extrapolation_value, res)
    return res


def _resize_ref(a: ResizeAttrs, x, roi=None, scales=None, sizes=None):
    r = x.ndim
    axes, sc, out = _resize_plan(a, x.shape, scales, sizes)
    full_roi = None
    if roi is not None and np.size(roi) > 0:
        roi = [float(v) for v in np.asarray(roi).reshape(-1)]
        full_roi = [0.0] * r + [1.0] * r
        na = len(axes)
        for i, d in enumerate(axes):
            full_roi[d] = roi[i]
            full_roi[r + d] = roi[na + i]
    res = x if a.mode == "nearest" else x.astype(np.float64)
    for d in axes:
        rp = None if full_roi is None else (full_roi[d], full_roi[r + d])
        if math.isclose(sc[d], 1.0) and out[d] == res.shape[d] and (
                rp is None or (math.isclose(rp[0], 0.0) and math.isclose(rp[1], 1.0))):
            continue
        res = _resize_axis(a, res, d, sc[d], out[d], rp)
    if x.dtype.kind in "iu":
        info = np.iinfo(x.dtype)
        return np.clip(np.round(res), info.min, info.max).astype(x.dtype)
    return np.asarray(res).astype(x.dtype)


register("Resize", ResizeAttrs, infer=_resize_infer, ref=_resize_ref, inputs=(1, 4))


# ---------------------------------------------------------------- Dropout

@dataclass(frozen=True)
class DropoutAttrs:
    seed: Optional[int] = None


def _dropout_infer(ctx):
    t = ctx.type(0)
    return [t, TensorType(BOOL, t.shape)][: ctx.num_results]


def _dropout_ref(a: DropoutAttrs, x, ratio=None, training_mode=None):
    train = training_mode is not None and bool(np.asarray(training_mode).reshape(-1)[0])
    r = 0.5 if ratio is None else float(np.asarray(ratio).reshape(-1)[0])
    if not train or r == 0:
        return x, np.ones(x.shape, np.bool_)
    rng = np.random.RandomState(0 if a.seed is None else a.seed & 0xFFFFFFFF)
    mask = rng.uniform(0, 1.0, x.shape) >= r
    y = (mask * x * (1 / (1 - r))).astype(x.dtype)
    return y, mask


register("Dropout", DropoutAttrs, infer=_dropout_infer, ref=_dropout_ref, inputs=(1, 3), outputs=(1, 2))


# ---------------------------------------------------------------- DepthToSpace / SpaceToDepth

@dataclass(frozen=True)
class D2SAttrs:
    blocksize: int
    mode: str = "DCR"


@dataclass(frozen=True)
class S2DAttrs:
    blocksize: int
    mode: str = "DCR"


def _d2s_infer(ctx):
    n, c, h, w = ctx.shape(0)
    b = ctx.attrs.blocksize
    return [TensorType(ctx.dtype(0), (n, c // (b * b), h * b, w * b))]


def _d2s_ref(a: D2SAttrs, x):
    n, c, h, w = x.shape
    b = a.blocksize
    if a.mode == "DCR":
        t = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    else:
        t = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
    return np.ascontiguousarray(t).reshape(n, c // (b * b), h * b, w * b)


def _s2d_infer(ctx):
    n, c, h, w = ctx.shape(0)
    b = ctx.attrs.blocksize
    return [TensorType(ctx.dtype(0), (n, c * b * b, h // b, w // b))]


def _s2d_ref(a: S2DAttrs, x):
    n, c, h, w = x.shape
    b = a.blocksize
    t = x.reshape(n, c, h // b, b, w // b, b)
    t = t.transpose(0, 3, 5, 1, 2, 4) if a.mode == "DCR" else t.transpose(0, 1, 3, 5, 2, 4)
    return np.ascontiguousarray(t).reshape(n, c * b * b, h // b, w // b)


register("DepthToSpace", D2SAttrs, infer=_d2s_infer, ref=_d2s_ref)
register("SpaceToDepth", S2DAttrs, infer=_s2d_infer, ref=_s2d_ref)


# ---------------------------------------------------------------- GridSample

@dataclass(frozen=True)
class GridSampleAttrs:
    align_corners: int = 0
    mode: str = "linear"
    padding_mode: str = "zeros"


def _gs_infer(ctx):
    xs, gs = ctx.shape(0), ctx.shape(1)
    return [TensorType(ctx.dtype(0), (xs[0], xs[1]) + tuple(gs[1:-1]))]


def _reflect(x, lo, hi):
    rng = hi - lo
    below = x < lo
    above = x > hi
    dx = np.where(below, lo - x, x - hi)
    n = np.trunc(dx / rng)
    r = dx - n * rng
    even = (n % 2) == 0
    fb = np.where(even, lo + r, hi - r)
    fa = np.where(even, hi - r, lo + r)
    return np.where(below, fb, np.where(above, fa, x))


def _gs_ref(a: GridSampleAttrs, X, grid):
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(a.mode, a.mode)
    N, C = X.shape[:2]
    dims = X.shape[2:]
    nd = len(dims)
    out_sp = grid.shape[1:-1]
    g = grid.astype(np.float64)
    ac = bool(a.align_corners)
    coords = []
    borders = []
    for i in range(nd):
        gi = g[..., nd - 1 - i]
        L = dims[i]
        x = (gi + 1) / 2.0 * (L - 1) if ac else ((gi + 1) * L - 1) / 2.0
        coords.append(x.astype(np.float32).astype(np.float64))
        borders.append((0.0, L - 1.0) if ac else (-0.5, L - 0.5))
    if mode == "nearest":
        coords = [np.rint(x) for x in coords]
    for i in range(nd):
        lo, hi = borders[i]
        x = coords[i]
        oob = (x < lo) | (x > hi)
        if a.padding_mode == "border":
            coords[i] = np.where(oob, np.clip(x, 0, dims[i] - 1), x)
        elif a.padding_mode == "reflection":
            coords[i] = np.where(oob, _reflect(x, lo, hi), x)
    nidx = np.arange(N).reshape((N,) + (1,) * len(out_sp))
    Xf = X.astype(np.float64)

    def fetch(idxs):
        """idxs: per-dim int arrays of shape (N, *out_sp) -> (N, C, *out_sp)."""
        valid = np.ones(idxs[0].shape, bool)
        fixed = []
        for i, ix in enumerate(idxs):
            if a.padding_mode == "zeros":
                valid &= (ix >= 0) & (ix < dims[i])
                fixed.append(np.clip(ix, 0, dims[i] - 1))
            elif a.padding_mode == "border":
                fixed.append(np.clip(ix, 0, dims[i] - 1))
            else:
                lo, hi = borders[i]
                fixed.append(np.clip(np.trunc(_reflect(ix.astype(np.float64), lo, hi)).astype(np.int64),
                                     0, dims[i] - 1))
        v = Xf[(nidx, slice(None)) + tuple(fixed)] if False else Xf.transpose((0,) + tuple(range(2, 2 + nd)) + (1,))[
            (nidx,) + tuple(fixed)]  # N, *out, C
        v = np.where(valid[..., None], v, 0.0)
        return np.moveaxis(v, -1, 1)

    if mode == "nearest":
        y = fetch([x.astype(np.int64) for x in coords])
    elif mode == "linear":
        x0 = [np.floor(x) for x in coords]
        fr = [x - f for x, f in zip(coords, x0)]
        y = 0
        for bits in itertools.product((0, 1), repeat=nd):
            w = 1.0
            for i, b in enumerate(bits):
                w = w * (fr[i] if b else 1 - fr[i])
            y = y + fetch([x0[i].astype(np.int64) + b for i, b in enumerate(bits)]) * w[:, None]
    elif mode == "cubic":
        A = -0.75
        x0 = [np.floor(x) for x in coords]
        cf = []
        for x, f in zip(coords, x0):
            t = x - f
            cf.append([((A * (t + 1) - 5 * A) * (t + 1) + 8 * A) * (t + 1) - 4 * A,
                       ((A + 2) * t - (A + 3)) * t * t + 1,
                       ((A + 2) * (1 - t) - (A + 3)) * (1 - t) * (1 - t) + 1,
                       ((A * (2 - t) - 5 * A) * (2 - t) + 8 * A) * (2 - t) - 4 * A])
        y = 0
        for ks in itertools.product(range(4), repeat=nd):
            w = 1.0
            for i, k in enumerate(ks):
                w = w * cf[i][k]
            y = y + fetch([x0[i].astype(np.int64) + k - 1 for i, k in enumerate(ks)]) * w[:, None]
    else:
        raise NncError(f"GridSample: unknown mode {a.mode!r}")
    return np.asarray(y).astype(X.dtype)


register("GridSample", GridSampleAttrs, infer=_gs_infer, ref=_gs_ref, inputs=2)


# ---------------------------------------------------------------- AffineGrid

@dataclass(frozen=True)
class AffineGridAttrs:
    align_corners: int = 0


def _ag_infer(ctx):
    v = ctx.value(1)
    if v is None:
        n = ctx.shape(1)[0]
        if not isinstance(n, int):
            raise NncError("AffineGrid: size must have a static length")
        sp = n - 2
        return [TensorType(ctx.dtype(0), (ctx.shape(0)[0],) + (UNKNOWN,) * sp + (sp,))]
    v = [int(t) for t in v]
    return [TensorType(ctx.dtype(0), (v[0],) + tuple(v[2:]) + (len(v) - 2,))]


def _ag_ref(a: AffineGridAttrs, theta, size):
    size = [int(t) for t in size]
    N = size[0]
    sp = size[2:]
    nd = len(sp)
    lins = []
    for L in sp:
        if a.align_corners:
            lins.append(np.linspace(-1, 1, L) if L > 1 else np.zeros(1))
        else:
            lins.append((2 * np.arange(L) + 1) / L - 1)
    mesh = np.meshgrid(*lins, indexing="ij")  # per spatial dim (D, H, W order)
    # homogeneous coords in (x, y[, z]) order = reversed spatial order
    base = np.stack([m for m in reversed(mesh)] + [np.ones_like(mesh[0])], axis=-1)  # *sp, nd+1
    th = theta.astype(np.float64)
    out = np.einsum("...k,njk->n...j", base, th)
    return out.astype(theta.dtype).reshape((N,) + tuple(sp) + (nd,))


register("AffineGrid", AffineGridAttrs, infer=_ag_infer, ref=_ag_ref, inputs=2)


# ---------------------------------------------------------------- RoiAlign

@dataclass(frozen=True)
class RoiAlignAttrs:
    coordinate_transformation_mode: str = "half_pixel"
    mode: str = "avg"
    output_height: int = 1
    output_width: int = 1
    sampling_ratio: int = 0
    spatial_scale: float = 1.0


def _roi_infer(ctx):
    a = ctx.attrs
    xs, rs = ctx.shape(0), ctx.shape(1)
    return [TensorType(ctx.dtype(0), (rs[0], xs[1], a.output_height, a.output_width))]


def _roi_ref(a: RoiAlignAttrs, X, rois, batch_indices):
    N, C, H, W = X.shape
    R = rois.shape[0]
    oh, ow = a.output_height, a.output_width
    off = 0.5 if a.coordinate_transformation_mode == "half_pixel" else 0.0
    Xf = X.astype(np.float64)
    out = np.zeros((R, C, oh, ow), np.float64)
    for r in range(R):  # loop over rois only; the bins are vectorised
        x1, y1, x2, y2 = rois[r].astype(np.float64) * a.spatial_scale - off
        rw, rh = x2 - x1, y2 - y1
        if off == 0.0:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / oh, rw / ow
        gh = a.sampling_ratio if a.sampling_ratio > 0 else int(np.ceil(rh / oh))
        gw = a.sampling_ratio if a.sampling_ratio > 0 else int(np.ceil(rw / ow))
        gh, gw = max(gh, 1), max(gw, 1)
        ys = y1 + np.arange(oh)[:, None] * bh + (np.arange(gh)[None, :] + 0.5) * bh / gh  # oh, gh
        xs = x1 + np.arange(ow)[:, None] * bw + (np.arange(gw)[None, :] + 0.5) * bw / gw  # ow, gw
        img = Xf[int(batch_indices[r])]

        def axis_w(v, L):
            ok = (v >= -1.0) & (v <= L)
            v = np.maximum(v, 0.0)
            lo = np.floor(v).astype(np.int64)
            hi_clip = lo >= L - 1
            lo = np.where(hi_clip, L - 1, lo)
            hi = np.where(hi_clip, L - 1, lo + 1)
            v = np.where(hi_clip, lo.astype(np.float64), v)
            l = v - lo
            return lo, hi, 1 - l, l, ok

        yl, yh, wy0, wy1, oky = axis_w(ys, H)
        xl, xh, wx0, wx1, okx = axis_w(xs, W)
        # samples: (oh, gh, ow, gw)
        def g(yi, xi):
            return img[:, yi[:, :, None, None], xi[None, None, :, :]]  # C, oh, gh, ow, gw
        w00 = (wy0[:, :, None, None] * wx0[None, None]); w01 = (wy0[:, :, None, None] * wx1[None, None])
        w10 = (wy1[:, :, None, None] * wx0[None, None]); w11 = (wy1[:, :, None, None] * wx1[None, None])
        ok = (oky[:, :, None, None] & okx[None, None])
        if a.mode == "avg":
            v = w00 * g(yl, xl) + w01 * g(yl, xh) + w10 * g(yh, xl) + w11 * g(yh, xh)
            v = np.where(ok, v, 0.0)
            out[r] = v.sum(axis=(2, 4)) / (gh * gw)
        else:
            v = np.maximum(np.maximum(w00 * g(yl, xl), w01 * g(yl, xh)),
                           np.maximum(w10 * g(yh, xl), w11 * g(yh, xh)))
            v = np.where(ok, v, 0.0)
            out[r] = v.max(axis=(2, 4))
    return out.astype(X.dtype)


register("RoiAlign", RoiAlignAttrs, infer=_roi_infer, ref=_roi_ref, inputs=3)
