"""`nnc calibrate`: post-training INT8 calibration on the reference backend.

Runs the model (the IR after the cleanups that precede the precision passes, so tensor names are
the ones `quantize-int8` sees at compile time) with the numpy interpreter over calibration
inputs and records, for every tensor the `quantize-int8` pass quantizes (the activation inputs
of Conv / Gemm / MatMul that are not constants, and their outputs, after a Relu that is the only
reader: passes/quantize_int8.quantized_tensors), the statistic the method needs. The output of a
MaxPool or view of such a tensor is given that tensor's amax (quantize_int8.scale_sources). The result is an activation amax per tensor; the
int8 scale is amax / 127 (symmetric, zero point 0); `--precision fp8` reads the same table, scale amax / 448
(e4m3; compiler/passes/quantize_fp8.py). Weights are not calibrated here: their
per-channel scales come from the constants at compile time (compiler/passes/quantize_int8.py).

Methods (all on |x|):
- minmax: amax = max |x| over all samples (exact).
- percentile: the `percentile`-th percentile of |x|, read from a 2048-bin histogram over
  [0, max |x|] with linear interpolation inside the bin (so within one bin width, max/2048).
- entropy: TensorRT's entropy calibrator: 2048-bin histogram of |x|; for every candidate
  threshold bin i in 128..2048 the reference distribution P = hist[:i] with the outliers added to
  its last bin is compared with Q, hist[:i] merged into 128 levels and spread back over P's
  non-zero bins; the i with the smallest KL(P || Q) gives amax = (i + 0.5) * bin width. The
  zero bin counts as its neighbour when that is not empty (the spike a Relu leaves there would pull
  the threshold in; with discrete data, image pixels k/16, the neighbour is empty and levelling
  would leave P only the outliers).
Histograms need the max first, so histogram methods run the data twice (max, then histogram).

Calibration data: an .npz (one array per model input, first axis = samples; it is cut into the
input's static batch or, for a symbolic batch dim, chunks of BATCH samples) or a directory of them,
read with nnc.npz_inputs (no pickles, member sizes checked before decompressing).

calib.json (CALIB_FORMAT, version CALIB_VERSION):
  {"format": "nnc-int8-calibration", "version": 1, "method": "entropy", "percentile": null,
   "samples": 1797, "tensors": {"<IR/ONNX tensor name>": {"amax": a, "scale": a / 127}}}
TensorRT's calibration cache (IInt8Calibrator::writeCalibrationCache; the text TensorRT writes
and reads back, also by trtexec --calib=FILE): first line `TRT-<version>-<calibrator>`
(e.g. `TRT-8601-EntropyCalibration2`), then one line per tensor `<name>: <hex>` where <hex> is
the IEEE float32 bit pattern of the tensor's scale (amax / 127) as a big-endian hex integer
(`3c010a14` = 0.00787...); TensorRT drops leading zeros, nnc writes all 8 digits and reads both.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .ir.errors import InputError

CALIB_FORMAT = "nnc-int8-calibration"
CALIB_VERSION = 1
METHODS = ("minmax", "entropy", "percentile")
NUM_BINS = 2048          # TensorRT's histogram size
NUM_QUANT_LEVELS = 128   # |x| in int8: 0..127 (the first candidate threshold bin)
INT8_MAX = 127.0
BATCH = 32               # samples per interpreter run for a symbolic batch dim
# TensorRT calibrator names in the cache header, per method. TensorRT has no percentile
# calibrator; its legacy calibrator is the quantile one, the closest.
TRT_CALIBRATORS = {"entropy": "EntropyCalibration2", "minmax": "MinMaxCalibration",
                   "percentile": "LegacyCalibration"}
TRT_DEFAULT_VERSION = "8601"


class CalibrationError(InputError):
    """A calibration file or calibration data is unusable."""


# ---------------------------------------------------------------------------------------------
# statistics -> amax


def entropy_amax(hist: np.ndarray, bin_width: float) -> float:
    """TensorRT-style KL-divergence threshold over a histogram of |x| (see the module docstring)."""
    hist = np.array(hist, np.float64)
    n = hist.size
    if hist.sum() == 0:
        return 0.0
    # the zero bin is levelled to its neighbour: after a Relu it holds about half the values, and
    # that spike would pull the threshold far in (NVIDIA's pytorch-quantization does the same)
    if n > 1 and hist[1] > 0:
        hist[0] = hist[1]
    if n < NUM_QUANT_LEVELS:
        return float(n * bin_width)
    total_after = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # total_after[i] = hist[i:].sum()
    best_i, best_kl = n, math.inf
    for i in range(NUM_QUANT_LEVELS, n + 1):
        sliced = hist[:i]
        p = sliced.copy()
        p[-1] += total_after[i]
        nz = p > 0
        # merge sliced into NUM_QUANT_LEVELS groups of (nearly) equal width, spread each group's
        # sum uniformly over its bins that are non-zero in P
        starts = (np.arange(NUM_QUANT_LEVELS) * i) // NUM_QUANT_LEVELS
        sums = np.add.reduceat(sliced, starts)
        counts = np.add.reduceat(nz.astype(np.float64), starts)
        per = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
        lengths = np.diff(np.append(starts, i))
        q = np.repeat(per, lengths) * nz
        ps = p.sum()
        qs = q.sum()
        if qs == 0:
            continue
        pn = p[nz] / ps
        qn = q[nz] / qs
        # a P bin whose Q is 0 (outliers beyond an empty group): smoothed, as TensorRT's does
        qn = np.where(qn > 0, qn, 1e-10)
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float((best_i + 0.5) * bin_width) if best_i < n else float(n * bin_width)


def percentile_amax(hist: np.ndarray, bin_width: float, percentile: float) -> float:
    """The percentile-th percentile of |x| from its histogram, interpolated inside the bin."""
    hist = np.asarray(hist, np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    want = total * percentile / 100.0
    cum = np.cumsum(hist)
    b = int(np.searchsorted(cum, want, side="left"))
    b = min(b, hist.size - 1)
    before = cum[b - 1] if b > 0 else 0.0
    frac = (want - before) / hist[b] if hist[b] > 0 else 1.0
    return float((b + min(max(frac, 0.0), 1.0)) * bin_width)


@dataclass
class TensorStats:
    """Running statistics of one tensor: max |x|, min/max, and (second pass) a histogram."""
    amax: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf
    hist: Optional[np.ndarray] = None
    hist_range: float = 0.0

    def observe_range(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        xf = np.asarray(x, np.float32)
        self.lo = min(self.lo, float(xf.min()))
        self.hi = max(self.hi, float(xf.max()))
        self.amax = max(self.amax, abs(self.lo), abs(self.hi))

    def observe_hist(self, x: np.ndarray) -> None:
        if self.hist is None:
            self.hist = np.zeros(NUM_BINS, np.int64)
            self.hist_range = self.amax if self.amax > 0 else 1.0
        a = np.abs(np.asarray(x, np.float32)).reshape(-1)
        h, _ = np.histogram(a, bins=NUM_BINS, range=(0.0, self.hist_range))
        self.hist += h

    def amax_for(self, method: str, percentile: float) -> float:
        if method == "minmax" or self.amax == 0:
            return self.amax
        bw = self.hist_range / NUM_BINS
        if method == "percentile":
            return percentile_amax(self.hist, bw, percentile)
        return entropy_amax(self.hist, bw)


# ---------------------------------------------------------------------------------------------
# the calibration table


@dataclass
class CalibTable:
    """Activation amax per tensor name (IR/ONNX names); scale = amax / 127."""
    method: str
    amax: dict = field(default_factory=dict)
    percentile: Optional[float] = None
    samples: int = 0
    source: str = "nnc"

    def scale(self, name: str) -> Optional[float]:
        a = self.amax.get(name)
        return None if a is None else a / INT8_MAX

    def fp8_scale(self, name: str, fp8_max: float = 448.0) -> Optional[float]:
        """The fp8 scale of a tensor: amax / the format's largest value (448: e4m3, 57344: e5m2)."""
        a = self.amax.get(name)
        return None if a is None else a / fp8_max

    def to_json(self) -> dict:
        return {"format": CALIB_FORMAT, "version": CALIB_VERSION, "method": self.method,
                "percentile": self.percentile, "samples": self.samples,
                "tensors": {k: {"amax": v, "scale": v / INT8_MAX} for k, v in sorted(self.amax.items())}}

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    def to_trt_cache(self, version: str = TRT_DEFAULT_VERSION) -> str:
        lines = [f"TRT-{version}-{TRT_CALIBRATORS[self.method]}"]
        for k, v in sorted(self.amax.items()):
            if any(c in k for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"):  # str.splitlines' breaks
                raise CalibrationError(f"tensor name {k!r} cannot be written to a TensorRT cache (a line break in it)")
            lines.append(f"{k}: {struct.unpack('>I', struct.pack('>f', v / INT8_MAX))[0]:08x}")
        return "\n".join(lines) + "\n"

    def save_trt_cache(self, path, version: str = TRT_DEFAULT_VERSION) -> None:
        Path(path).write_text(self.to_trt_cache(version))


def _bad(where: str, msg: str):
    return CalibrationError(f"{where}: {msg}")


def _check_amax(where: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise _bad(where, f"must be a finite number >= 0, not {v!r}")
    return float(v)


def table_from_json(doc, where: str) -> CalibTable:
    """A CalibTable from calib.json's parsed content, every key checked (errors name the key)."""
    if not isinstance(doc, dict):
        raise _bad(where, "not a JSON object (a calib.json from `nnc calibrate` is expected)")
    if doc.get("format") != CALIB_FORMAT:
        raise _bad(where, f"key 'format': expected {CALIB_FORMAT!r}, given {doc.get('format')!r}")
    if doc.get("version") != CALIB_VERSION:
        raise _bad(where, f"key 'version': this nnc reads version {CALIB_VERSION}, given {doc.get('version')!r}")
    method = doc.get("method")
    if method not in METHODS:
        raise _bad(where, f"key 'method': one of {', '.join(METHODS)}, given {method!r}")
    pct = doc.get("percentile")
    if pct is not None and (isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 < pct <= 100):
        raise _bad(where, f"key 'percentile': a number in (0, 100] or null, given {pct!r}")
    samples = doc.get("samples", 0)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise _bad(where, f"key 'samples': a count >= 0, given {samples!r}")
    tensors = doc.get("tensors")
    if not isinstance(tensors, dict):
        raise _bad(where, f"key 'tensors': an object {{tensor name: {{\"amax\", \"scale\"}}}}, given "
                          f"{type(tensors).__name__}")
    amax = {}
    for name, ent in tensors.items():
        w = f"{where}: key 'tensors.{name}'"
        if not isinstance(ent, dict) or "amax" not in ent:
            raise CalibrationError(f"{w}: an object with 'amax' (and 'scale') is expected, given {ent!r}")
        a = _check_amax(f"{where}: key 'tensors.{name}.amax'", ent["amax"])
        if "scale" in ent:
            s = _check_amax(f"{where}: key 'tensors.{name}.scale'", ent["scale"])
            if not math.isclose(s, a / INT8_MAX, rel_tol=1e-5, abs_tol=1e-30):
                raise CalibrationError(f"{w}: scale {s!r} is not amax / 127 ({a / INT8_MAX!r})")
        amax[name] = a
    return CalibTable(method, amax, pct, samples, source=where)


def parse_trt_cache(text: str, where: str) -> CalibTable:
    lines = text.splitlines()
    if not lines or not lines[0].startswith("TRT-"):
        raise _bad(where, "line 1: a TensorRT calibration cache starts with 'TRT-<version>-<calibrator>', "
                          f"given {lines[0][:60]!r}" if lines else "empty file")
    parts = lines[0].split("-", 2)
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise _bad(where, f"line 1: expected 'TRT-<version>-<calibrator>', given {lines[0][:60]!r}")
    by_cal = {v: k for k, v in TRT_CALIBRATORS.items()}
    method = by_cal.get(parts[2].strip(), "entropy" if "Entropy" in parts[2] else "minmax")
    amax = {}
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        name, sep, hexv = line.rpartition(": ")
        hexv = hexv.strip()
        if not sep or not name or not 1 <= len(hexv) <= 8 or any(c not in "0123456789abcdefABCDEF" for c in hexv):
            raise _bad(where, f"line {n}: expected '<tensor name>: <8 hex digits>', given {line[:80]!r}")
        scale = struct.unpack(">f", struct.pack(">I", int(hexv, 16)))[0]
        if not math.isfinite(scale) or scale < 0:
            raise _bad(where, f"line {n}: tensor {name!r}: scale {scale!r} is not a finite number >= 0")
        if name in amax:
            raise _bad(where, f"line {n}: tensor {name!r} is given twice")
        amax[name] = float(scale) * INT8_MAX
    return CalibTable(method, amax, None, 0, source=where)


def load_table(path) -> CalibTable:
    """calib.json or a TensorRT calibration cache (told apart by the first bytes)."""
    p = Path(path)
    where = f"--calib {str(p)!r}"
    if not p.is_file():
        raise CalibrationError(f"{where}: no such file")
    raw = p.read_bytes()
    if raw.startswith(b"TRT-"):
        try:
            return parse_trt_cache(raw.decode("utf-8"), where)
        except UnicodeDecodeError:
            raise _bad(where, "a TensorRT cache must be UTF-8 text") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(where, f"neither calib.json (JSON: {e}) nor a TensorRT cache (first line 'TRT-...')") from None
    return table_from_json(doc, where)


# ---------------------------------------------------------------------------------------------
# running the model


def calibration_module(model, shapes: Optional[dict] = None):
    """The IR calibration runs: imported and taken through the passes that precede the precision
    passes (the same point where `quantize-int8` runs at compile time)."""
    from .onnx_import import import_model
    from .ir.verify import verify
    from .pipeline import Pipeline
    module = import_model(model, shapes=shapes or {})
    verify(module)
    Pipeline(pre_quant_passes()).run(module)
    return module


def pre_quant_passes() -> list[str]:
    from .driver import pipeline_passes, precision_point
    # the compile's own passes up to where int8 quantization goes (the fusion passes all come after
    # it; fold-batchnorm and fuse-horizontal before it, so the tensors calibrated are the ones
    # quantize-int8 sees)
    passes = pipeline_passes("fp32")
    return passes[:precision_point(passes)]


def _npz_files(data) -> list[Path]:
    p = Path(data)
    if p.is_dir():
        files = sorted(x for x in p.iterdir() if x.suffix == ".npz" and x.is_file())
        if not files:
            raise CalibrationError(f"--data {str(p)!r}: the directory has no .npz files")
        return files
    if p.is_file():
        return [p]
    raise CalibrationError(f"--data {str(p)!r}: no such file or directory")


def load_batches(module, data) -> list[dict]:
    """Model-input batches from an .npz / a directory of them (first axis = samples)."""
    from .npz_inputs import load_inputs
    args = module.main.args
    specs = [{"name": a.name, "dtype": a.type.dtype.np_name,
              "shape": None if a.type.shape is None else ["samples"] + [d if isinstance(d, int) else "?"
                                                                       for d in a.type.shape[1:]]}
             for a in args]
    batches: list[dict] = []
    for f in _npz_files(data):
        arrs = load_inputs(f, specs)
        missing = [a.name for a in args if a.name not in arrs]
        if missing:
            raise CalibrationError(f"--data {str(f)!r}: no array for model input(s) {missing} "
                                   f"(the model takes {[a.name for a in args]})")
        counts = {k: v.shape[0] if v.ndim else 1 for k, v in arrs.items()}
        if len(set(counts.values())) != 1:
            raise CalibrationError(f"--data {str(f)!r}: inputs have different sample counts {counts}")
        n = next(iter(counts.values()))
        b0 = args[0].type.shape[0] if args[0].type.shape else None
        step = b0 if isinstance(b0, int) and b0 > 0 else BATCH
        if isinstance(b0, int) and n < step:
            raise CalibrationError(f"--data {str(f)!r}: {n} samples, fewer than the model's batch {step}")
        for s in range(0, n - n % step if isinstance(b0, int) else n, step):
            batches.append({k: v[s:s + step] for k, v in arrs.items()})
    return batches


def calibrate(model, data, method: str = "entropy", percentile: float = 99.99, shapes: Optional[dict] = None,
              log: Callable[[str], None] = lambda s: None) -> CalibTable:
    """Runs the model on the reference interpreter over `data` and returns the activation table."""
    from .ir.interp import Interpreter
    from . import progress
    if method not in METHODS:
        raise CalibrationError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    if not 0 < percentile <= 100:
        raise CalibrationError(f"--percentile must be in (0, 100], not {percentile!r}")
    module = calibration_module(model, shapes)
    from .passes.quantize_int8 import quantized_tensors
    want = quantized_tensors(module)
    names = list(want)
    if not names:
        raise CalibrationError("the model has no Conv / Gemm / MatMul with a float activation input: "
                               "nothing to calibrate")
    batches = load_batches(module, data)
    if not batches:
        raise CalibrationError(f"--data {str(data)!r}: no samples (every array has 0 along its first axis)")
    stats = {n: TensorStats() for n in names}
    arg_names = {a.name for a in module.main.args}
    samples = sum(next(iter(b.values())).shape[0] for b in batches)
    passes = ("range",) if method == "minmax" else ("range", "hist")
    rep = progress.current()
    for what in passes:
        def observe(op, outs, what=what):
            for r, o in zip(op.results, outs):
                s = stats.get(r.name)
                if s is not None:
                    s.observe_range(o) if what == "range" else s.observe_hist(o)
        interp = Interpreter(module, observe=observe)
        with rep.stage(f"calibrate ({what})", total=len(batches)) as task:
            for b in batches:
                for k in arg_names & set(stats):
                    stats[k].observe_range(b[k]) if what == "range" else stats[k].observe_hist(b[k])
                interp.run(b)
                task.advance()
    amax = {n: s.amax_for(method, percentile) for n, s in stats.items()}
    from .passes.quantize_int8 import scale_sources
    for t, u in scale_sources(module, want).items():  # MaxPool / views keep their input's scale
        amax[t] = amax[u]
    for n, a in amax.items():
        log(f"  {n}: max|x| {stats[n].amax:.6g} -> amax {a:.6g} ({method})")
    return CalibTable(method, amax, percentile if method == "percentile" else None, samples)
