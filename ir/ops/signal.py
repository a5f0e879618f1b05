"""Signal processing: window functions, MelWeightMatrix, DFT (opset 20 form: axis is an input),
STFT. References follow onnx.reference; they compute in float64 and cast to the result dtype.
Complex tensors are real tensors with a trailing dim of 2 (real, imaginary), as in ONNX.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import NncError
from ..registry import register
from ..symbolic import UNKNOWN
from ..types import F32, DType, TensorType


def _scalar(v):
    return None if v is None else np.asarray(v).reshape(-1)[0].item()


# ---------------------------------------------------------------- windows

@dataclass(frozen=True)
class WindowAttrs:
    output_datatype: DType = F32
    periodic: int = 1


def _window_infer(ctx):
    t = ctx.type(0)
    if not t.dtype.is_int:
        ctx.fail(f"size must be an integer scalar, got {t}")
    n = _scalar(ctx.value(0))
    return [TensorType(ctx.attrs.output_datatype, (UNKNOWN if n is None else max(int(n), 0),))]


def _window(coefs):
    def ref(a: WindowAttrs, size):
        n = int(_scalar(size))
        denom = n if a.periodic else n - 1
        k = np.arange(n, dtype=np.float64)
        w = np.zeros(n)
        for m, c in enumerate(coefs):
            w = w + c * np.cos(2.0 * np.pi * m * k / denom) if denom else w + c
        return w.astype(a.output_datatype.np)
    return ref


register("HannWindow", WindowAttrs, infer=_window_infer, ref=_window((0.5, -0.5)))
register("HammingWindow", WindowAttrs, infer=_window_infer, ref=_window((25.0 / 46.0, -21.0 / 46.0)))
register("BlackmanWindow", WindowAttrs, infer=_window_infer, ref=_window((0.42, -0.5, 0.08)))


# ---------------------------------------------------------------- MelWeightMatrix

@dataclass(frozen=True)
class MelAttrs:
    output_datatype: DType = F32


def _mel_infer(ctx):
    bins, dft = _scalar(ctx.value(0)), _scalar(ctx.value(1))
    rows = UNKNOWN if dft is None else int(dft) // 2 + 1
    cols = UNKNOWN if bins is None else int(bins)
    return [TensorType(ctx.attrs.output_datatype, (rows, cols))]


def _mel_ref(a: MelAttrs, num_mel_bins, dft_length, sample_rate, lower_edge_hertz, upper_edge_hertz):
    nmel, dft, sr = int(_scalar(num_mel_bins)), int(_scalar(dft_length)), _scalar(sample_rate)
    lo, hi = _scalar(lower_edge_hertz), _scalar(upper_edge_hertz)
    nspec = dft // 2 + 1
    fb = np.arange(0, nmel + 2)
    low_mel = 2595 * np.log1p(lo / 700) / np.log(10)
    high_mel = 2595 * np.log1p(hi / 700) / np.log(10)
    step = (high_mel - low_mel) / fb.shape[0]
    fb = fb * step + low_mel
    fb = 700 * np.expm1(fb / 2595 * np.log(10))
    fb = ((dft + 1) * fb) // sr
    fb = fb.astype(int)
    out = np.zeros((nspec, nmel))
    for i in range(nmel):
        lo_b, c, hi_b = fb[i], fb[i + 1], fb[i + 2]
        if c - lo_b == 0:
            out[c, i] = 1
        else:
            for j in range(lo_b, c + 1):
                out[j, i] = float(j - lo_b) / float(c - lo_b)
        if hi_b - c > 0:
            for j in range(c, hi_b):
                out[j, i] = float(hi_b - j) / float(hi_b - c)
    return out.astype(a.output_datatype.np)


register("MelWeightMatrix", MelAttrs, infer=_mel_infer, ref=_mel_ref, inputs=5)


# ---------------------------------------------------------------- DFT

@dataclass(frozen=True)
class DFTAttrs:
    inverse: int = 0
    onesided: int = 0


def _dft_axis(ctx_or_val, rank):
    ax = -2 if ctx_or_val is None else int(_scalar(ctx_or_val))
    return ax % rank


def _dft_infer(ctx):
    a = ctx.attrs
    s = ctx.shape(0)
    r = len(s)
    if r < 2 or (isinstance(s[-1], int) and s[-1] not in (1, 2)):
        ctx.fail(f"input must end in a dim of 1 (real) or 2 (complex), got {ctx.type(0)}")
    if ctx.has(2) and ctx.value(2) is None:
        return [TensorType(ctx.dtype(0), tuple([UNKNOWN] * (r - 1)) + (1 if a.inverse and a.onesided else 2,))]
    ax = _dft_axis(ctx.value(2), r)
    if ax == r - 1:
        ctx.fail("axis cannot be the last (real/imaginary) dim")
    if ctx.has(1):
        n = _scalar(ctx.value(1))
        n = UNKNOWN if n is None else int(n)
    elif a.inverse and a.onesided:
        n = 2 * (s[ax] - 1)
    else:
        n = s[ax]
    if a.onesided and not a.inverse:
        n = n // 2 + 1
    out = list(s)
    out[ax] = n
    out[-1] = 1 if a.inverse and a.onesided else 2
    return [TensorType(ctx.dtype(0), tuple(out))]


def _to_complex(x):
    """Complex in the input's precision (complex64 for f32 and narrower, as onnx.reference)."""
    ct = np.complex128 if x.dtype == np.float64 else np.complex64
    x = x.astype(np.float64 if ct is np.complex128 else np.float32)
    if x.shape[-1] == 1:
        return x[..., 0].astype(ct)
    return (x[..., 0] + 1j * x[..., 1]).astype(ct)


def _from_complex(c, dt):
    return np.stack([c.real, c.imag], axis=-1).astype(dt)


def _dft_ref(a: DFTAttrs, x, dft_length=None, axis=None):
    ax = _dft_axis(axis, x.ndim)
    if ax == x.ndim - 1:
        raise NncError("DFT: axis cannot be the last (real/imaginary) dim")
    c = _to_complex(x)
    if dft_length is not None:
        n = int(_scalar(dft_length))
    elif a.inverse and a.onesided:
        n = 2 * (x.shape[ax] - 1)
    else:
        n = x.shape[ax]
    if a.inverse:
        if a.onesided:
            return np.fft.irfft(c, n=n, axis=ax)[..., None].astype(x.dtype)
        return _from_complex(np.fft.ifft(c, n=n, axis=ax), x.dtype)
    y = np.fft.fft(c, n=n, axis=ax)
    if a.onesided:
        y = np.take(y, np.arange(n // 2 + 1), axis=ax)
    return _from_complex(y, x.dtype)


register("DFT", DFTAttrs, infer=_dft_infer, ref=_dft_ref, inputs=(1, 3),
         doc="Discrete Fourier transform along one axis (ONNX opset 20 form: dft_length, axis inputs).")


# ---------------------------------------------------------------- STFT

@dataclass(frozen=True)
class STFTAttrs:
    onesided: int = 1


def _stft_infer(ctx):
    s = ctx.shape(0)
    if len(s) != 3:
        ctx.fail(f"signal must be [batch, length, 1 or 2], got {ctx.type(0)}")
    step = _scalar(ctx.value(1))
    if ctx.has(3):
        fl = _scalar(ctx.value(3))
        fl = UNKNOWN if fl is None else int(fl)
    elif ctx.has(2):
        ws = ctx.type(2).shape
        fl = UNKNOWN if ws is None else ws[0]
    else:
        fl = s[1]
    frames = UNKNOWN if step is None else 1 + (s[1] - fl) // int(step)
    bins = fl // 2 + 1 if ctx.attrs.onesided else fl
    return [TensorType(ctx.dtype(0), (s[0], frames, bins, 2))]


def _stft_ref(a: STFTAttrs, signal, frame_step, window=None, frame_length=None):
    step = int(_scalar(frame_step))
    if frame_length is not None:
        fl = int(_scalar(frame_length))
    elif window is not None:
        fl = window.shape[0]
    else:
        fl = signal.shape[1]
    win = np.ones(fl, np.float32) if window is None else window.astype(np.float64 if signal.dtype == np.float64 else np.float32)
    if win.shape[0] != fl:
        raise NncError(f"STFT: window has length {win.shape[0]}, frame_length is {fl}")
    c = _to_complex(signal)  # [B, L]
    nframes = 1 + (c.shape[1] - fl) // step
    idx = np.arange(nframes)[:, None] * step + np.arange(fl)[None, :]
    frames = c[:, idx] * win  # [B, F, fl]
    y = np.fft.fft(frames, n=fl, axis=-1)
    if a.onesided:
        y = y[..., : fl // 2 + 1]
    return _from_complex(y, signal.dtype)


register("STFT", STFTAttrs, infer=_stft_infer, ref=_stft_ref, inputs=(2, 4),
         doc="Short-time Fourier transform: framed, windowed DFTs of a signal.")
