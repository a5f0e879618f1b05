"""--precision best (compiler/precision_search.py) on the CPU: a model whose fp16 build overflows in
one layer gets that layer (and its normalising reader) out of fp16 and meets the budget, where plain
fp16 fails; tiny_cnn and the onnx light models whose fp16 build gives NaN meet --max-rel-err 1e-2 on
the reference backend; bad options give clear errors. Accuracy is always re-measured on fresh
inputs against the fp32 interpreter, not read back from the search's own record."""
import os
import warnings
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import nnc
from nnc.ir.errors import NncError
from nnc.ir.interp import Interpreter

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny_cnn.onnx"
LIGHT = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light"


def overflow_model() -> onnx.ModelProto:
    """x[4,16] -> MatMul(big W1: activations ~1e5 > fp16's 65504) -> LayerNormalization ->
    MatMul(W2) -> Relu -> y. In fp16 the first MatMul overflows and the LayerNorm turns it to NaN."""
    rng = np.random.default_rng(7)
    w1 = (rng.standard_normal((16, 32)) * 25000).astype(np.float32)
    w2 = (rng.standard_normal((32, 8)) * 0.3).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.ones(32, np.float32), "g"), numpy_helper.from_array(np.zeros(32, np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="big_matmul"),
             helper.make_node("LayerNormalization", ["h", "g", "b"], ["n"], name="norm", axis=-1),
             helper.make_node("MatMul", ["n", "w2"], ["p"], name="proj"),
             helper.make_node("Relu", ["p"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "overflow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _rel_err(model, m, feed) -> float:
    """The worst output rel-L2 of compiled module m against the fp32 interpreter on feed."""
    ref_mod = nnc.import_onnx(model) if isinstance(model, onnx.ModelProto) else nnc.import_onnx(str(model))
    with np.errstate(all="ignore"):
        ref = Interpreter(ref_mod).run(feed)
        got = m.run(feed)
    worst = 0.0
    for k, r in ref.items():
        g = got[k].astype(np.float64)
        if not np.isfinite(g).all():
            return float("inf")
        worst = max(worst, float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)))
    return worst


def test_overflow_layer_kept_fp32(tmp_path, rng):
    model = overflow_model()
    feed = {"x": rng.standard_normal((4, 16)).astype(np.float32)}
    plain = nnc.compile(model, precision="fp16", backend="reference", out=tmp_path / "fp16")
    assert _rel_err(model, plain, feed) > 1e-2  # plain fp16 fails (NaN)
    with pytest.warns(UserWarning, match="seeded random"):
        best = nnc.compile(model, precision="best", allow="fp16,fp32", max_rel_err=1e-2, backend="reference",
                           out=tmp_path / "best")
    layers = {d["node"]: d for d in best.plan["layer_precision"]["layers"]}
    assert layers["big_matmul"]["precision"] == "fp32"
    assert layers["proj"]["precision"] == "fp16" and layers["relu"]["precision"] == "fp16"
    assert _rel_err(model, best, feed) <= 1e-2
    search = best.plan["layer_precision"]["search"]
    assert search["met"] and search["cost_model"] == "heuristic" and len(search["iterations"]) >= 2
    assert "overflow" in str(search["iterations"][0]["moved"])


def test_overflow_layer_goes_bf16_when_allowed(tmp_path, rng):
    model = overflow_model()
    feed = {"x": rng.standard_normal((4, 16)).astype(np.float32)}
    with pytest.warns(UserWarning):
        best = nnc.compile(model, precision="best", backend="reference", out=tmp_path / "best")  # default allow
    layers = {d["node"]: d["precision"] for d in best.plan["layer_precision"]["layers"]}
    assert layers["big_matmul"] in ("bf16", "fp32") and layers["proj"] == "fp16"
    assert _rel_err(model, best, feed) <= 1e-2


def test_calib_data_npz_and_dir(tmp_path, rng):
    model = overflow_model()
    d = tmp_path / "calib"
    d.mkdir()
    for i in range(3):
        np.savez(d / f"s{i}.npz", x=rng.standard_normal((4, 16)).astype(np.float32))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no random-data warning with calibration data
        m = nnc.compile(model, precision="best", allow="fp16,fp32", calib_data=d, backend="reference",
                        out=tmp_path / "a")
        assert "3 sample(s)" in m.plan["layer_precision"]["search"]["calibration"]
        m = nnc.compile(model, precision="best", allow="fp16,fp32", calib_data=d / "s0.npz", backend="reference",
                        out=tmp_path / "b")
    assert _rel_err(model, m, {"x": rng.standard_normal((4, 16)).astype(np.float32)}) <= 1e-2
    np.savez(tmp_path / "wrong.npz", y=np.zeros((4, 16), np.float32))
    with pytest.raises(NncError, match="wrong.npz"):
        nnc.compile(model, precision="best", calib_data=tmp_path / "wrong.npz", backend="reference", out=tmp_path / "c")
    with pytest.raises(NncError, match="no such file"):
        nnc.compile(model, precision="best", calib_data=tmp_path / "nope", backend="reference", out=tmp_path / "d")


def test_tiny_cnn_best_meets_budget(tmp_path, rng):
    with pytest.warns(UserWarning):
        m = nnc.compile(str(EXAMPLE), shapes={"input": [2, 3, 32, 32]}, precision="best", max_rel_err=1e-2,
                        backend="reference", out=tmp_path / "o")
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert _rel_err(EXAMPLE, m, {"input": x}) <= 1e-2
    assert {d["precision"] for d in m.plan["layer_precision"]["layers"]} <= {"fp16", "bf16", "fp32"}


def _light(name):
    p = LIGHT / f"light_{name}.onnx"
    if not p.is_file():
        pytest.skip(f"{p} not in this onnx install")
    return p


# the light models whose plain fp16 build gives NaN (nnc verify --precision fp16); the larger
# ones (ResNet-50, VGG-19, AlexNet, ZFNet) take 10-40 s each on the CPU and are left to `slow`
@pytest.mark.parametrize("name", ["squeezenet", "inception_v1",
                                  pytest.param("zfnet512", marks=pytest.mark.slow),
                                  pytest.param("resnet50", marks=pytest.mark.slow)])
def test_light_model_best_meets_budget(name, tmp_path, rng):
    path = _light(name)
    model = onnx.load(str(path))
    args = nnc.import_onnx(str(path)).main.args
    feed = {a.name: rng.standard_normal([int(d) for d in a.type.shape]).astype(np.float32) for a in args}
    plain = nnc.compile(str(path), precision="fp16", backend="reference", out=tmp_path / "fp16")
    assert _rel_err(path, plain, feed) > 1e-2  # NaN
    with pytest.warns(UserWarning):
        m = nnc.compile(str(path), precision="best", max_rel_err=1e-2, backend="reference", out=tmp_path / "best")
    assert _rel_err(path, m, feed) <= 1e-2
    precs = [d["precision"] for d in m.plan["layer_precision"]["layers"]]
    assert "fp16" in precs  # not simply everything at fp32
    del model


@pytest.mark.parametrize("kw,msg", [
    (dict(precision="best", allow="fp16,int8"), "int8 / fp8 layers need calibration scales; pass --calib"),
    (dict(precision="best", allow="fp8"), "int8 / fp8 layers need calibration scales"),
    (dict(precision="best", allow="fp16,tf64"), "unknown type 'tf64'"),
    (dict(precision="best", max_rel_err=0.0), "positive"),
    (dict(precision="best", max_rel_err=-1e-2), "positive"),
    (dict(precision="best", max_rel_err=float("nan")), "positive"),
    (dict(precision="fp16", allow="fp16"), "only goes with precision 'best'"),
    (dict(precision="fp16", max_rel_err=1e-2), "only goes with precision 'best'"),
])
def test_bad_options(kw, msg):
    with pytest.raises(NncError, match=msg):
        nnc.compile(str(EXAMPLE), backend="reference", **kw)


def test_cli_best_and_errors(tmp_path):
    def nnc_cli(*args):
        return subprocess.run([sys.executable, "-m", "nnc.cli", *args], capture_output=True, text=True)
    r = nnc_cli("compile", str(EXAMPLE), "-o", str(tmp_path / "o"), "--shapes", "input:1x3x32x32",
                "--precision", "best", "--allow", "fp16,fp32", "--max-rel-err", "1e-2", "--no-codegen", "-v")
    assert r.returncode == 0, r.stderr
    assert "precision best: iteration 0" in r.stderr and "layer precision:" in r.stderr
    assert "seeded random" in r.stderr
    r = nnc_cli("compile", str(EXAMPLE), "-o", str(tmp_path / "p"), "--precision", "best", "--allow", "fp16,int8",
                "--no-codegen")
    assert r.returncode != 0 and "need calibration scales; pass --calib" in r.stderr and "Traceback" not in r.stderr
    r = nnc_cli("compile", str(EXAMPLE), "-o", str(tmp_path / "q"), "--precision", "best", "--max-rel-err", "0",
                "--no-codegen")
    assert r.returncode != 0 and "positive" in r.stderr and "Traceback" not in r.stderr
    r = nnc_cli("compile", str(EXAMPLE), "-o", str(tmp_path / "r"), "--precision", "fp16", "--keep-fp32", "zzz*",
                "--no-codegen")
    assert r.returncode == 0 and "'zzz*' matches no layer" in r.stderr


@pytest.mark.parametrize("allow", ["fp16,fp32", "fp16,bf16,fp32"])
def test_best_cuda_build_compiles_with_nvrtc(allow, tmp_path, rng):
    """The CUDA build of the mixed model `best` chose (fp16 beside fp32 or bf16 layers): every
    kernel NVRTC-compiles on the CPU, and the plan run in its arena by the reference backend
    meets the budget."""
    from nnc.driver import compile_model
    out = tmp_path / "cuda"
    with pytest.warns(UserWarning):
        plan = compile_model(overflow_model(), out, options=nnc.CompileOptions(precision="best", allow=allow,
                                                                               tune=False))
    # "precision" is code generation's storage type (the fastest allowed); the layers' are beside it
    assert plan["kernels"] and plan["precision"] == "fp16" and plan["layer_precision"]["mode"] == "best"
    kinds = {d["precision"] for d in plan["layer_precision"]["layers"]}
    assert kinds == ({"fp16", "fp32"} if allow == "fp16,fp32" else {"fp16", "bf16"})
    # the casts between layers are fused (fuse-reduction takes the one after LayerNorm, the GEMM
    # epilogue the one at the output); only a cast of a model input may be a kernel of its own
    alone = [k["ops"][0] for k in plan["kernels"] if len(k["ops"]) == 1 and " = Cast(" in k["ops"][0]]
    assert all("Cast(%x:" in op for op in alone), alone
    assert any("Cast(" in op for k in plan["kernels"] if len(k["ops"]) > 1 for op in k["ops"])
    m = nnc.load(out, backend="reference")
    assert m.in_arena
    feed = {"x": rng.standard_normal((4, 16)).astype(np.float32)}
    assert _rel_err(overflow_model(), m, feed) <= 1e-2


def test_tight_budget_moves_error_contributors(tmp_path, rng):
    """No overflow, a budget below fp16's rounding: layers move to fp32 by error contribution
    (1, 2, 4, ... per round) until the budget holds on the calibration data."""
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=x)
    m = nnc.compile(str(EXAMPLE), shapes={"input": [2, 3, 32, 32]}, precision="best", max_rel_err=1e-4,
                    calib_data=tmp_path / "calib.npz", backend="reference", out=tmp_path / "o")
    search = m.plan["layer_precision"]["search"]
    assert search["met"] and len(search["iterations"]) >= 2
    moved = [mv for it in search["iterations"] for mv in it.get("moved", [])]
    assert moved and all("error contribution" in mv["why"] and mv["to"] == "fp32" for mv in moved)
    sizes = [len(it["moved"]) for it in search["iterations"] if "moved" in it]
    # 1, 2, 4, ... per round (the last round may find fewer layers left)
    assert sizes and all(n == 2 ** i for i, n in enumerate(sizes[:-1])) and 1 <= sizes[-1] <= 2 ** (len(sizes) - 1)
    assert _rel_err(EXAMPLE, m, {"input": x}) <= 1e-4


def test_budget_not_met_falls_back_to_fp32(tmp_path, monkeypatch):
    from nnc import precision_search
    monkeypatch.setattr(precision_search, "MAX_ITERATIONS", 0)
    with pytest.warns(UserWarning, match="not met"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*seeded random")
        m = nnc.compile(str(EXAMPLE), shapes={"input": [1, 3, 32, 32]}, precision="best", max_rel_err=1e-6,
                        backend="reference", out=tmp_path / "o")
    assert {d["precision"] for d in m.plan["layer_precision"]["layers"]} == {"fp32"}
    search = m.plan["layer_precision"]["search"]
    assert len(search["iterations"]) == 1 and search["fallback_all_fp32"]


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["keep_fp32", "best_fp32", "best_bf16"])
def test_mixed_builds_run_on_the_gpu(case, tmp_path, rng):
    """The generated CUDA of mixed builds (fp16 kernels beside fp32 or bf16 ones, casts fused)
    against the fp32 interpreter on fresh inputs, within the fp16 tolerance."""
    if case == "keep_fp32":
        model, feed = EXAMPLE, {"input": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)}
        m = nnc.compile(str(model), shapes={"input": [2, 3, 32, 32]}, precision="fp16", keep_fp32="fc,block.a/*",
                        out=tmp_path / "o")
    else:
        model, feed = overflow_model(), {"x": rng.standard_normal((4, 16)).astype(np.float32)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = nnc.compile(model, precision="best", allow="fp16,fp32" if case == "best_fp32" else "fp16,bf16",
                            out=tmp_path / "o")

    class Host:  # run() of the cuda module, numpy out
        def run(self, f):
            return m.run(f, output="numpy")
    assert _rel_err(model, Host(), feed) <= 1e-2


def test_best_respects_keep_fp32(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = nnc.compile(overflow_model(), precision="best", allow="fp16,fp32", keep_fp32="relu",
                        backend="reference", out=tmp_path / "o")
    layers = {d["node"]: d for d in m.plan["layer_precision"]["layers"]}
    assert layers["relu"]["precision"] == "fp32" and layers["relu"]["why"] == "--keep-fp32"
    assert layers["proj"]["precision"] == "fp16" and layers["big_matmul"]["precision"] == "fp32"
