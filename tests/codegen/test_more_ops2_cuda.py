"""CUDA lowerings of the remaining ops (codegen/kernels/ intgemm.py, signal.py, detect.py, sampling.py,
attention.py, scatter.py, linalg.py, ml.py, movement.py, pool.py):
every model compiles with NVRTC for sm_90 on the CPU; GPU-marked checks compare with the reference
interpreter on fresh random inputs (outputs poisoned before the run)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from nnc.ir.interp import Interpreter

from .cuda_models import N, mk, compile_models
from .cuda_models import random_feed as _random_feed


def random_feed(spec, rng):
    """cuda_models.random_feed plus kinds roi (valid boxes), small, neg (log-decay), unit ([0, 1))."""
    base = {k: v for k, v in spec.items() if v[2] not in ("roi", "small", "neg", "unit")}
    feed = _random_feed(base, rng)
    for k, (shape, dt, kind) in spec.items():
        if kind == "roi":
            a = rng.uniform(0, 6, shape)
            a[:, 2:] = a[:, :2] + rng.uniform(0.5, 8, (shape[0], 2))
        elif kind == "small":
            a = 0.3 * rng.standard_normal(shape)
        elif kind == "neg":
            a = -rng.uniform(0.0, 0.5, shape)
        elif kind == "unit":
            a = rng.uniform(0, 1, shape)
        else:
            continue
        feed[k] = np.asarray(a).astype(dt)
    return feed

F, I64, I32, B, I8, U8 = T.FLOAT, T.INT64, T.INT32, T.BOOL, T.INT8, T.UINT8


def _models():
    M = {}
    r = np.random.default_rng(11)
    M["int_mm"] = (mk([
        N("MatMulInteger", ["a", "b", "az", "bz"], ["mmi"]),
        N("MatMulInteger", ["a3", "b"], ["mmi3"]),
        N("QLinearMatMul", ["a", "sa", "az", "b", "sb", "bz", "sy", "yz"], ["qmm"]),
        N("DynamicQuantizeLinear", ["x"], ["dq", "dqs", "dqz"]),
    ], [("a", U8, [4, 6]), ("b", U8, [6, 5]), ("a3", U8, [2, 4, 6]), ("x", F, [3, 7])],
        [("mmi", I32), ("mmi3", I32), ("qmm", U8), ("dq", U8), ("dqs", F), ("dqz", U8)],
        [("az", np.array([1, 2, 3, 4], np.uint8)), ("bz", np.array([5, 0, 1, 2, 3], np.uint8)),
         ("sa", np.array(0.02, np.float32)), ("sb", np.array([0.01, 0.02, 0.03, 0.01, 0.02], np.float32)),
         ("sy", np.array(0.5, np.float32)), ("yz", np.array(10, np.uint8))], opset=21),
        {"a": ([4, 6], np.uint8, "int:256"), "b": ([6, 5], np.uint8, "int:256"),
         "a3": ([2, 4, 6], np.uint8, "int:256"), "x": ([3, 7], np.float32, "normal")})
    M["int_conv"] = (mk([
        N("ConvInteger", ["x", "w", "xz"], ["ci"], pads=[1, 1, 1, 1]),
        N("ConvInteger", ["x", "wg"], ["cig"], group=2, strides=[2, 1], dilations=[1, 2]),
        N("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "bias"], ["qc"], pads=[0, 1, 0, 1]),
    ], [("x", U8, [1, 4, 5, 6])],
        [("ci", I32), ("cig", I32), ("qc", U8)],
        [("w", r.integers(0, 255, (3, 4, 3, 3)).astype(np.uint8)), ("wg", r.integers(0, 255, (4, 2, 2, 2)).astype(np.uint8)),
         ("xz", np.array(7, np.uint8)), ("xs", np.array(0.01, np.float32)),
         ("ws", np.array([0.01, 0.005, 0.02], np.float32)), ("wz", np.array([100, 120, 128], np.uint8)),
         ("ys", np.array(2.0, np.float32)), ("yz", np.array(5, np.uint8)),
         ("bias", np.array([100, -2000, 30000], np.int32))], opset=21),
        {"x": ([1, 4, 5, 6], np.uint8, "int:256")})
    M["misc"] = (mk([
        N("ReverseSequence", ["rs", "lens"], ["rsy"], batch_axis=1, time_axis=0),
        N("ReverseSequence", ["rs2", "lens"], ["rsy2"], batch_axis=0, time_axis=1),
        N("MaxPool", ["x"], ["mp", "mpi"], kernel_shape=[2, 2], strides=[2, 2]),
        N("MaxUnpool", ["mp", "mpi"], ["mu"], kernel_shape=[2, 2], strides=[2, 2]),
        N("Resize", ["x", "", "sc"], ["cub"], mode="cubic"),
        N("Resize", ["x", "", "sc2"], ["cub2"], mode="cubic", coordinate_transformation_mode="align_corners",
          exclude_outside=1, cubic_coeff_a=-0.5),
        N("Resize", ["x", "", "sc2"], ["aal"], mode="linear", antialias=1),
        N("RoiAlign", ["x", "rois", "bi"], ["ra"], output_height=3, output_width=2, sampling_ratio=2, spatial_scale=0.5),
        N("RoiAlign", ["x", "rois", "bi"], ["ram"], output_height=2, output_width=2, mode="max",
          coordinate_transformation_mode="output_half_pixel"),
        N("Det", ["dm"], ["det"]),
        N("ArrayFeatureExtractor", ["rs", "afi"], ["afe"]),
        N("CenterCropPad", ["x", "ccs"], ["ccp"]),
        N("AffineGrid", ["theta", "agsz"], ["ag"], align_corners=0),
        N("AffineGrid", ["theta", "agsz"], ["ag1"], align_corners=1),
    ], [("rs", F, [4, 3, 2]), ("rs2", F, [3, 4, 2]), ("x", F, [2, 3, 6, 8]), ("rois", F, [3, 4]), ("dm", F, [2, 4, 4]),
        ("theta", F, [2, 2, 3])],
        [("rsy", F), ("rsy2", F), ("mu", F), ("cub", F), ("cub2", F), ("aal", F), ("ra", F), ("ram", F), ("det", F),
         ("afe", F), ("ccp", F), ("ag", F), ("ag1", F)],
        [("lens", np.array([4, 1, 3], np.int64)), ("sc", np.array([1, 1, 1.5, 2], np.float32)),
         ("sc2", np.array([1, 1, 0.5, 0.75], np.float32)), ("bi", np.array([0, 1, 1], np.int64)),
         ("afi", np.array([1, 0, 1], np.int64)), ("ccs", np.array([2, 5, 4, 10], np.int64)),
         ("agsz", np.array([2, 3, 4, 5], np.int64))], opset=21),
        {"rs": ([4, 3, 2], np.float32, "normal"), "rs2": ([3, 4, 2], np.float32, "normal"),
         "x": ([2, 3, 6, 8], np.float32, "normal"), "rois": ([3, 4], np.float32, "roi"),
         "dm": ([2, 4, 4], np.float32, "normal"), "theta": ([2, 2, 3], np.float32, "normal")})
    M["seq"] = (mk([
        N("TensorScatter", ["cache", "upd", "wi"], ["ts"], axis=2),
        N("TensorScatter", ["cache", "upd", "wi"], ["tsc"], axis=2, mode="circular"),
        N("CausalConvWithState", ["cx", "cw", "cb", "cp"], ["cy", "cst"], activation="silu"),
        N("CausalConvWithState", ["cx", "cw"], ["cy2", "cst2"]),
        N("LinearAttention", ["q", "k", "v", "ps", "dec", "beta"], ["la", "las"], q_num_heads=4, kv_num_heads=2,
          update_rule="gated_delta"),
        N("LinearAttention", ["q", "k", "v"], ["la2", "las2"], q_num_heads=4, kv_num_heads=2, update_rule="linear",
          scale=0.3),
        N("Col2Im", ["cols", "imsz", "blk"], ["c2i"], strides=[1, 2], pads=[1, 0, 1, 1], dilations=[1, 1]),
        N("DeformConv", ["dx", "dw", "doff", "db", "dmask"], ["dc"], pads=[1, 1, 1, 1], offset_group=2, group=2),
    ], [("cache", F, [2, 3, 6, 4]), ("upd", F, [2, 3, 2, 4]), ("wi", I64, [2]), ("cx", F, [2, 3, 5]),
        ("cp", F, [2, 3, 2]), ("q", F, [2, 5, 12]), ("k", F, [2, 5, 6]), ("v", F, [2, 5, 8]), ("ps", F, [2, 2, 3, 4]),
        ("dec", F, [2, 5, 2]), ("beta", F, [2, 5, 2]), ("cols", F, [1, 6, 8]), ("dx", F, [1, 4, 5, 5]),
        ("doff", F, [1, 36, 5, 5]), ("dmask", F, [1, 18, 5, 5])],
        [("ts", F), ("tsc", F), ("cy", F), ("cst", F), ("cy2", F), ("cst2", F), ("la", F), ("las", F), ("la2", F),
         ("las2", F), ("c2i", F), ("dc", F)],
        [("cw", r.standard_normal((3, 1, 3)).astype(np.float32)), ("cb", r.standard_normal(3).astype(np.float32)),
         ("imsz", np.array([3, 5], np.int64)), ("blk", np.array([2, 3], np.int64)),
         ("dw", r.standard_normal((6, 2, 3, 3)).astype(np.float32)), ("db", r.standard_normal(6).astype(np.float32))],
        opset=26),
        {"cache": ([2, 3, 6, 4], np.float32, "normal"), "upd": ([2, 3, 2, 4], np.float32, "normal"),
         "wi": ([2], np.int64, "int:5"), "cx": ([2, 3, 5], np.float32, "normal"), "cp": ([2, 3, 2], np.float32, "normal"),
         "q": ([2, 5, 12], np.float32, "normal"), "k": ([2, 5, 6], np.float32, "small"),
         "v": ([2, 5, 8], np.float32, "normal"), "ps": ([2, 2, 3, 4], np.float32, "normal"),
         "dec": ([2, 5, 2], np.float32, "neg"), "beta": ([2, 5, 2], np.float32, "unit"),
         "cols": ([1, 6, 8], np.float32, "normal"), "dx": ([1, 4, 5, 5], np.float32, "normal"),
         "doff": ([1, 36, 5, 5], np.float32, "normal"), "dmask": ([1, 18, 5, 5], np.float32, "unit")})
    M["signal"] = (mk([
        N("DFT", ["xr", "", "ax1"], ["dft"]),
        N("DFT", ["xc", "", "ax1"], ["idft"], inverse=1),
        N("DFT", ["xr", "", "ax1"], ["rdft"], onesided=1),
        N("DFT", ["xc", "len7", "ax1"], ["irdft"], inverse=1, onesided=1),
        N("DFT", ["xc", "len5", "ax2"], ["dft2"]),
        N("HannWindow", ["wsz"], ["hw"]), N("HammingWindow", ["wsz"], ["hmw"], periodic=0),
        N("BlackmanWindow", ["wsz"], ["bw"]),
        N("STFT", ["sig", "step", "hw"], ["stft"]),
        N("STFT", ["sig", "step", "", "wsz"], ["stft2"], onesided=0),
        N("MelWeightMatrix", ["nmel", "dftl", "srate", "lo", "hi"], ["mel"]),
    ], [("xr", F, [2, 6, 3, 1]), ("xc", F, [2, 6, 3, 2]), ("sig", F, [2, 20, 1])],
        [("dft", F), ("idft", F), ("rdft", F), ("irdft", F), ("dft2", F), ("hw", F), ("hmw", F), ("bw", F),
         ("stft", F), ("stft2", F), ("mel", F)],
        [("ax1", np.array(1, np.int64)), ("ax2", np.array(2, np.int64)), ("len7", np.array(7, np.int64)),
         ("len5", np.array(5, np.int64)), ("wsz", np.array(8, np.int64)), ("step", np.array(3, np.int64)),
         ("nmel", np.array(4, np.int64)), ("dftl", np.array(16, np.int64)), ("srate", np.array(8000, np.int64)),
         ("lo", np.array(100.0, np.float32)), ("hi", np.array(3000.0, np.float32))], opset=20),
        {"xr": ([2, 6, 3, 1], np.float32, "normal"), "xc": ([2, 6, 3, 2], np.float32, "normal"),
         "sig": ([2, 20, 1], np.float32, "normal")})
    M["dynamic"] = (mk([
        N("Compress", ["x", "cond"], ["cmp"], axis=1),
        N("Compress", ["x", "cond"], ["cmpf"]),
        N("Compress", ["x", "ccond"], ["cmps"], axis=0),
        N("Unique", ["u"], ["uy", "ui", "uinv", "uc"]),
        N("Unique", ["u"], ["uy2", "ui2", "uinv2", "uc2"], sorted=0),
        N("Unique", ["u2"], ["uay", "uai", "uainv", "uac"], axis=0),
        N("NonMaxSuppression", ["boxes", "scores", "mo", "iou", "sth"], ["nms"]),
        N("NonMaxSuppression", ["boxes", "scores", "mo"], ["nms2"], center_point_box=1),
    ], [("x", F, [3, 5]), ("cond", B, [4]), ("u", I64, [12]), ("u2", I64, [6, 2]), ("boxes", F, [2, 6, 4]),
        ("scores", F, [2, 2, 6])],
        [("cmp", F), ("cmpf", F), ("cmps", F), ("uy", I64), ("ui", I64), ("uinv", I64), ("uc", I64), ("uy2", I64),
         ("ui2", I64), ("uinv2", I64), ("uc2", I64), ("uay", I64), ("uai", I64), ("uainv", I64), ("uac", I64),
         ("nms", I64), ("nms2", I64)],
        [("ccond", np.array([1, 0, 1], bool)), ("mo", np.array([3], np.int64)), ("iou", np.array([0.3], np.float32)),
         ("sth", np.array([0.2], np.float32))], opset=18),
        {"x": ([3, 5], np.float32, "normal"), "cond": ([4], np.bool_, "bool"), "u": ([12], np.int64, "int:5"),
         "u2": ([6, 2], np.int64, "int:2"), "boxes": ([2, 6, 4], np.float32, "unit"),
         "scores": ([2, 2, 6], np.float32, "unit")})
    M["tree"] = (mk([
        N("TreeEnsemble", ["tx"], ["te"], tree_roots=[0, 3], nodes_modes=h.make_tensor("m", U8, [5], [0, 3, 6, 1, 0]),
          nodes_featureids=[0, 1, 2, 1, 0],
          nodes_splits=h.make_tensor("s", F, [5], [0.1, -0.2, 0.0, 0.5, 0.0]),
          nodes_truenodeids=[1, 0, 1, 4, 2], nodes_trueleafs=[0, 1, 1, 0, 1],
          nodes_falsenodeids=[2, 1, 2, 3, 3], nodes_falseleafs=[0, 1, 1, 1, 1],
          membership_values=h.make_tensor("mv", F, [3], [1.0, 2.0, float("nan")]),
          leaf_targetids=[0, 1, 1, 0, 1], leaf_weights=h.make_tensor("lw", F, [5], [1.0, 2.0, -1.5, 0.5, 3.0]),
          n_targets=2, aggregate_function=1, post_transform=2, domain="ai.onnx.ml"),
    ], [("tx", F, [7, 3])], [("te", F)], opset=21),
        {"tx": ([7, 3], np.float32, "normal")})
    return M


MODELS = _models()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """name -> (out dir, plan, module): every model compiled once (NVRTC, sm_90)."""
    return compile_models(MODELS, tmp_path_factory)


@pytest.mark.parametrize("name", list(MODELS))
def test_compiles_nvrtc(compiled, name):
    d, plan, _ = compiled[name]
    assert all((d / c["file"]).stat().st_size > 0 for c in plan["cubins"])
    assert plan["kernels"]


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MODELS))
def test_gpu_matches_interpreter(compiled, name, rng):
    import nnc
    d, _, mod = compiled[name]
    m = nnc.load(d)
    feed = random_feed(MODELS[name][1], rng)
    ref = Interpreter(mod).run(feed)
    got = m.run(feed, output="numpy", poison=True)
    for k, r in ref.items():
        g = got[k]
        assert g.shape == r.shape, (name, k, g.shape, r.shape)
        if r.dtype.kind == "f":
            rr, gg = r.astype(np.float64), g.astype(np.float64)
            scale = max(1.0, float(np.max(np.abs(rr)))) if rr.size else 1.0
            err = float(np.max(np.abs(gg - rr))) / scale if rr.size else 0.0
            assert err <= 1e-3, f"{name}/{k}: max rel err {err:.3g}"
        elif r.dtype == np.uint8 and k.startswith("q"):  # requantized: allow 1 lsb (rounding ties)
            assert int(np.max(np.abs(g.astype(np.int64) - r.astype(np.int64)))) <= 1, f"{name}/{k}"
        else:
            np.testing.assert_array_equal(g, r, err_msg=f"{name}/{k}")
