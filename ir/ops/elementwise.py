"""Elementwise unary ops: math functions, predicates and activations (ONNX semantics, newest opset).

Low-precision floats (f16, bf16, f8, f4) are computed in f32 and rounded back to their own
dtype, as onnxruntime and the CUDA kernels do; every reference returns exactly its input dtype
(or bool for the predicates).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..registry import NoAttrs, register
from ..types import BOOL, TensorType
from ._util import broadcast_infer

try:  # scipy is optional: a vectorised erf when it is there
    from scipy.special import erf as _sp_erf
except Exception:  # pragma: no cover
    _sp_erf = None

_NATIVE = (np.dtype(np.float32), np.dtype(np.float64))


def _erf(x: np.ndarray) -> np.ndarray:
    if _sp_erf is not None:
        return _sp_erf(x)
    return np.vectorize(math.erf, otypes=[x.dtype])(x)


def wide(x: np.ndarray) -> np.ndarray:
    """x itself for f32/f64 and non-floats, x as f32 for the narrow floats."""
    if x.dtype.kind == "f" and x.dtype in _NATIVE:
        return x
    if x.dtype.kind in "biuc":
        return x
    return x.astype(np.float32)


def fmap(fn):
    """A float op's ref: fn on the widened input, rounded back to the input dtype."""
    def ref(a, x):
        return np.asarray(fn(a, wide(x))).astype(x.dtype, copy=False)
    return ref


# ---------------------------------------------------------------- inference helpers

def _kinds(*kinds):
    """Inference: one result of operand 0's type; operand 0's dtype kind must be one of kinds."""
    def infer(ctx):
        t = ctx.type(0)
        if t.dtype.kind not in kinds:
            ctx.fail(f"unsupported element type {t.dtype} (wants {'/'.join(kinds)})")
        return [t]
    return infer


FLOAT = _kinds("float")
NUMERIC = _kinds("float", "int", "uint")
SIGNED = _kinds("float", "int")


def _pred_infer(*kinds):
    def infer(ctx):
        t = ctx.type(0)
        if t.dtype.kind not in kinds:
            ctx.fail(f"unsupported element type {t.dtype}")
        return [TensorType(BOOL, t.shape)]
    return infer


# ---------------------------------------------------------------- math

_FLOAT_UNARY = {
    "Acos": np.arccos, "Acosh": np.arccosh, "Asin": np.arcsin, "Asinh": np.arcsinh,
    "Atan": np.arctan, "Atanh": np.arctanh, "Cos": np.cos, "Cosh": np.cosh, "Sin": np.sin,
    "Sinh": np.sinh, "Tan": np.tan, "Tanh": np.tanh, "Exp": np.exp, "Log": np.log,
    "Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Floor": np.floor, "Ceil": np.ceil,
    "Round": np.round,  # half to even, as ONNX
    "Erf": _erf,
}
for _name, _f in _FLOAT_UNARY.items():
    register(_name, NoAttrs, infer=FLOAT, ref=fmap(lambda a, x, _f=_f: _f(x)), inputs=1)


def _abs_ref(a, x):
    return np.abs(wide(x)).astype(x.dtype, copy=False)


register("Abs", NoAttrs, infer=NUMERIC, ref=_abs_ref, inputs=1)
register("Neg", NoAttrs, infer=SIGNED, ref=lambda a, x: np.negative(wide(x)).astype(x.dtype, copy=False),
         inputs=1)
register("Sign", NoAttrs, infer=NUMERIC, ref=lambda a, x: np.sign(wide(x)).astype(x.dtype, copy=False),
         inputs=1)


@dataclass(frozen=True)
class IsInfAttrs:
    detect_negative: int = 1
    detect_positive: int = 1


def _isinf_ref(a: IsInfAttrs, x):
    x = wide(x)
    out = np.zeros(x.shape, np.bool_)
    if a.detect_positive:
        out |= np.isposinf(x)
    if a.detect_negative:
        out |= np.isneginf(x)
    return out


register("IsNaN", NoAttrs, infer=_pred_infer("float"), ref=lambda a, x: np.isnan(wide(x)), inputs=1)
register("IsInf", IsInfAttrs, infer=_pred_infer("float"), ref=_isinf_ref, inputs=1)
register("Not", NoAttrs, infer=_pred_infer("bool"), ref=lambda a, x: np.logical_not(x), inputs=1)
register("BitwiseNot", NoAttrs, infer=_kinds("int", "uint"), ref=lambda a, x: np.invert(x), inputs=1)


# ---------------------------------------------------------------- activations

def _relu_ref(a, x):
    return np.maximum(wide(x), 0).astype(x.dtype, copy=False)


register("Relu", NoAttrs, infer=SIGNED, ref=_relu_ref, inputs=1)


@dataclass(frozen=True)
class LeakyReluAttrs:
    alpha: float = 0.01


register("LeakyRelu", LeakyReluAttrs, infer=FLOAT, inputs=1,
         ref=fmap(lambda a, x: np.where(x < 0, x * x.dtype.type(a.alpha), x)))


@dataclass(frozen=True)
class AlphaAttrs:  # Elu, Celu, ThresholdedRelu
    alpha: float = 1.0


register("Elu", AlphaAttrs, infer=FLOAT, inputs=1,
         ref=fmap(lambda a, x: np.where(x < 0, x.dtype.type(a.alpha) * np.expm1(np.minimum(x, 0)), x)))


def _celu(a, x):
    al = x.dtype.type(a.alpha)
    return np.maximum(x, 0) + np.minimum(0, al * np.expm1(np.minimum(x, 0) / al))


register("Celu", AlphaAttrs, infer=FLOAT, inputs=1, ref=fmap(_celu))
register("ThresholdedRelu", AlphaAttrs, infer=FLOAT, inputs=1,
         ref=fmap(lambda a, x: np.where(x > x.dtype.type(a.alpha), x, x.dtype.type(0))))


@dataclass(frozen=True)
class SeluAttrs:
    alpha: float = 1.67326319217681884765625
    gamma: float = 1.05070102214813232421875


def _selu(a, x):
    al, g = x.dtype.type(a.alpha), x.dtype.type(a.gamma)
    return np.where(x <= 0, g * (al * np.exp(np.minimum(x, 0)) - al), g * x)


register("Selu", SeluAttrs, infer=FLOAT, inputs=1, ref=fmap(_selu))


def sigmoid(x):
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


register("Sigmoid", NoAttrs, infer=FLOAT, inputs=1, ref=fmap(lambda a, x: sigmoid(x)))


@dataclass(frozen=True)
class HardSigmoidAttrs:
    alpha: float = 0.2
    beta: float = 0.5


register("HardSigmoid", HardSigmoidAttrs, infer=FLOAT, inputs=1,
         ref=fmap(lambda a, x: np.clip(x * x.dtype.type(a.alpha) + x.dtype.type(a.beta), 0, 1)))
register("HardSwish", NoAttrs, infer=FLOAT, inputs=1,
         ref=fmap(lambda a, x: x * np.clip(x * x.dtype.type(1 / 6) + x.dtype.type(0.5), 0, 1)))
register("Softplus", NoAttrs, infer=FLOAT, inputs=1, ref=fmap(lambda a, x: np.logaddexp(x.dtype.type(0), x)))
register("Softsign", NoAttrs, infer=FLOAT, inputs=1, ref=fmap(lambda a, x: x / (1 + np.abs(x))))
register("Mish", NoAttrs, infer=FLOAT, inputs=1,
         ref=fmap(lambda a, x: x * np.tanh(np.logaddexp(x.dtype.type(0), x))))


@dataclass(frozen=True)
class SwishAttrs:
    alpha: float = 1.0


register("Swish", SwishAttrs, infer=FLOAT, inputs=1, ref=fmap(lambda a, x: x * sigmoid(x * x.dtype.type(a.alpha))))


@dataclass(frozen=True)
class GeluAttrs:
    approximate: str = "none"


def _gelu(a: GeluAttrs, x):
    if a.approximate == "tanh":
        c = x.dtype.type(math.sqrt(2 / math.pi))
        return x * x.dtype.type(0.5) * (1 + np.tanh(c * (x + x.dtype.type(0.044715) * x * x * x)))
    xd = x.astype(np.float64)
    return (0.5 * xd * (1 + _erf(xd / math.sqrt(2)))).astype(x.dtype)


def _gelu_infer(ctx):
    if ctx.attrs.approximate not in ("none", "tanh"):
        ctx.fail(f"approximate must be 'none' or 'tanh', got {ctx.attrs.approximate!r}")
    return FLOAT(ctx)


register("Gelu", GeluAttrs, infer=_gelu_infer, inputs=1, ref=fmap(_gelu))


def _prelu_ref(a, x, slope):
    xw = wide(x)
    return np.where(xw < 0, xw * wide(slope), xw).astype(x.dtype, copy=False)


register("PRelu", NoAttrs, infer=broadcast_infer(), ref=_prelu_ref, inputs=2)


@dataclass(frozen=True)
class ShrinkAttrs:
    bias: float = 0.0
    lambd: float = 0.5


def _shrink_ref(a: ShrinkAttrs, x):
    xw = wide(x).astype(np.float64) if x.dtype.kind in "iu" else wide(x)
    lam, b = a.lambd, a.bias
    out = np.where(xw < -lam, xw + b, np.where(xw > lam, xw - b, 0))
    return out.astype(x.dtype)


register("Shrink", ShrinkAttrs, infer=NUMERIC, ref=_shrink_ref, inputs=1)


def _clip_ref(a, x, lo=None, hi=None):
    y = x
    if lo is not None:
        y = np.maximum(y, np.asarray(lo).astype(x.dtype, copy=False))
    if hi is not None:
        y = np.minimum(y, np.asarray(hi).astype(x.dtype, copy=False))
    return np.asarray(y).astype(x.dtype, copy=False)


def _clip_infer(ctx):
    t = NUMERIC(ctx)[0]
    for i in (1, 2):
        if ctx.has(i):
            s = ctx.shape(i)
            if len(s) > 1 or (len(s) == 1 and isinstance(s[0], int) and s[0] != 1):
                ctx.fail(f"operand {i} (min/max) must be a scalar, got {ctx.type(i)}")
            if ctx.dtype(i) != t.dtype:
                ctx.fail(f"operand {i} has dtype {ctx.dtype(i)}, input is {t.dtype}")
    return [t]


register("Clip", NoAttrs, infer=_clip_infer, ref=_clip_ref, inputs=(1, 3))
