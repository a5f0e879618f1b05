"""Optimization profiles (compiler/profiles.py): parsing and validation errors, trtexec's default
for symbolic dims without shapes, the reference backend over a batch range, a directory of one
static build per profile, and the run-time checks."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import nnc
from nnc.ir.errors import InputError, NncError
from nnc.profiles import Profile, ProfileError, model_signature, normalize_profiles, parse_profile, validate

ROOT = Path(__file__).resolve().parents[1]
CNN = ROOT / "examples" / "tiny_cnn.onnx"  # input f32[N,3,32,32] -> probs f32[N,10]


def shared_symbol_model(tmp_path) -> Path:
    """a[S,4] + b[S,4] -> y[S,4]: two inputs sharing the symbol S, and a static one."""
    g = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Mul", ["s", "c"], ["y"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["S", 4]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["S", 4]),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["S", 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    p = tmp_path / "shared.onnx"
    onnx.save(m, str(p))
    return p


# ---------------------------------------------------------------------------- parsing


def test_parse_profile_several_inputs():
    p = parse_profile("ids:1x1/8x128/32x512,mask:1x1/8x128/32x512")
    assert [r.name for r in p.inputs] == ["ids", "mask"]
    r = p.get("ids")
    assert (r.min, r.opt, r.max) == ((1, 1), (8, 128), (32, 512))
    assert not p.is_static and p.text() == "ids:1x1/8x128/32x512,mask:1x1/8x128/32x512"
    assert Profile.from_json(json.loads(json.dumps(p.to_json()))) == p
    assert parse_profile("x:2x3/2x3/2x3").is_static


@pytest.mark.parametrize("text, where", [
    ("x:1x3/8x3", "column 1 ('x:1x3/8x3'): expected three shapes"),
    ("x:1x3/8x3/32x3,y1x2/1x2/1x2", "column 16 ('y1x2/1x2/1x2'): expected NAME:MIN/OPT/MAX"),
    ("x:1x3/8xq/32x3", "column 7 ('8xq', the opt shape of 'x')"),
    (":1/1/1", "no input name"),
    ("x:1/1/1,x:2/2/2", "input 'x' is given twice"),
    ("x:1x3/8x3/4x3", "input 'x' dim 0: needs min <= opt <= max, given 1 / 8 / 4"),
    ("x:1x3/8/32x3", "have different ranks"),
    ("", "empty"),
])
def test_parse_errors_say_where(text, where):
    with pytest.raises(ProfileError) as e:
        parse_profile(text)
    assert where in str(e.value)


def test_normalize_profiles_forms():
    p = Profile.of(x=((1, 3), (2, 3), (4, 3)))
    assert normalize_profiles([p, "x:1x3/2x3/4x3", {"x": ([1, 3], [2, 3], [4, 3])}]) == (p, p, p)
    assert normalize_profiles(p) == (p,) and normalize_profiles(None) == ()
    with pytest.raises(ProfileError, match=r"profiles\[0\]: expected a Profile"):
        normalize_profiles([3])
    with pytest.raises(NncError, match="shapes or profiles, not both"):
        nnc.CompileOptions(shapes={"x": [1, 3]}, profiles=[p], backend="reference")


# ---------------------------------------------------------------------------- validation


def test_validate_against_the_model(tmp_path):
    sig = model_signature(CNN)
    assert validate(parse_profile("input:1x3x32x32/8x3x32x32/32x3x32x32"), sig) == {"N": (1, 8, 32)}
    cases = [
        ("inp:1x3x32x32/1x3x32x32/1x3x32x32", "'inp' is not a model input; the inputs are ['input']"),
        ("input:1x3x32/1x3x32/1x3x32", "input 'input' has rank 4 [N,3,32,32], the profile gives rank 3"),
        ("input:1x4x32x32/1x4x32x32/1x4x32x32", "input 'input' dim 1 is fixed at 3 in the model [N,3,32,32], "
                                                "the profile gives 4/4/4"),
    ]
    for text, msg in cases:
        with pytest.raises(ProfileError) as e:
            validate(parse_profile(text), sig, "profile 0")
        assert "profile 0: " + msg in str(e.value)
    shared = model_signature(shared_symbol_model(tmp_path))
    with pytest.raises(ProfileError) as e:
        validate(parse_profile("a:1x4/2x4/8x4,b:1x4/4x4/8x4"), shared)
    assert ("symbolic dim S has 1/2/8 in input 'a' (dim 0) but 1/4/8 in input 'b' (dim 0); every input "
            "using S must give it the same range") in str(e.value)
    assert validate(parse_profile("a:1x4/2x4/8x4"), shared) == {"S": (1, 2, 8)}  # b gets S from a
    with pytest.raises(ProfileError, match=r"input 'a' \[S,4\] has symbolic dims S the profile does not give"):
        validate(parse_profile("c:1x4/1x4/1x4"), shared)


def test_compile_validates_profiles(tmp_path):
    with pytest.raises(ProfileError, match="profile 1 .*'inp' is not a model input"):
        nnc.compile(CNN, backend="reference", out=tmp_path / "o",
                    profiles=["input:1x3x32x32/1x3x32x32/1x3x32x32", "inp:1x3x32x32/1x3x32x32/1x3x32x32"])
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- no shapes: trtexec's default


def test_no_shapes_builds_at_one_and_warns_with_a_profile_line(tmp_path, capsys):
    from nnc.cli import main
    out = tmp_path / "o"
    assert main(["compile", str(CNN), "-o", str(out), "--no-tune"]) == 0
    err = capsys.readouterr().err
    assert "nnc compile: warning: the model has symbolic input dims N (in input): building with every symbolic " \
           "dim = 1 (min = opt = max)" in err
    line = err.split("--profile ", 1)[1].split()[0]
    assert line == "input:1x3x32x32/1x3x32x32/1x3x32x32"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["inputs"][0]["shape"] == [1, 3, 32, 32] and (out / "model.cu").is_file()
    # the printed line compiles as it is (one static profile: a single build, the profile recorded)
    out2 = tmp_path / "o2"
    assert main(["compile", str(CNN), "-o", str(out2), "--no-tune", "--profile", line]) == 0
    assert "warning" not in capsys.readouterr().err
    plan2 = json.loads((out2 / "plan.json").read_text())
    assert plan2["inputs"][0]["shape"] == [1, 3, 32, 32] and (out2 / "model.cu").is_file()
    assert plan2["profiles"] == [parse_profile(line).to_json()]


def test_a_range_with_other_profiles_is_one_build_of_the_set(tmp_path):
    """A range with code generation beside a static profile: a set of two builds (the range one
    with runtime sizes, tests/test_runtime_sizes.py); runs pick the build whose profile holds the
    shapes; the set C API (static shapes only) is not written, and plan.json says why."""
    out = tmp_path / "o"
    m = nnc.compile(CNN, profiles=["input:1x3x32x32/4x3x32x32/8x3x32x32", "input:16x3x32x32/16x3x32x32/16x3x32x32"],
                    out=out, backend="reference", codegen=True, tune=False)
    index = json.loads((out / "plan.json").read_text())
    assert index["profile_builds"] == 2 and "not_written" in index["c_api"]
    assert json.loads((out / "profiles" / "0" / "plan.json").read_text())["runtime_sizes"] == {"N": [1, 4, 8]}
    assert "runtime_sizes" not in json.loads((out / "profiles" / "1" / "plan.json").read_text())
    rng = np.random.default_rng(0)
    for n, build in ((5, 0), (1, 0), (16, 1)):
        x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
        assert m.pick({"input": x}) == build
        np.testing.assert_allclose(m.run({"input": x})["probs"], _ort(CNN, {"input": x})[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError):
        m.run({"input": np.zeros((12, 3, 32, 32), np.float32)})


# ---------------------------------------------------------------------------- the reference backend over a range


def _ort(model: Path, feed: dict) -> list:
    ort = pytest.importorskip("onnxruntime")
    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return s.run(None, feed)


def test_reference_batch_range_matches_onnxruntime(tmp_path):
    m = nnc.compile(CNN, backend="reference", out=tmp_path / "o",
                    profiles=["input:1x3x32x32/8x3x32x32/32x3x32x32"])
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert plan["profiles"] == [parse_profile("input:1x3x32x32/8x3x32x32/32x3x32x32").to_json()]
    assert m.inputs[0].shape == ("N", 3, 32, 32)
    rng = np.random.default_rng(7)
    for n in (1, 5, 32):  # min, between, max: all from the one build
        x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
        got = m(x)
        want = _ort(CNN, {"input": x})[0]
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)
    with pytest.raises(InputError) as e:
        m(rng.standard_normal((33, 3, 32, 32)).astype(np.float32))
    assert "input 'input' with shape [33, 3, 32, 32] is outside every profile" in str(e.value)
    assert "1x3x32x32 .. 32x3x32x32" in str(e.value)
    with pytest.raises(InputError, match=r"input 'input': shape \[3, 32, 32\] has rank 3; the model's is 4"):
        m(np.zeros((3, 32, 32), np.float32))


def test_reference_run_time_errors_shared_symbol(tmp_path):
    model = shared_symbol_model(tmp_path)
    m = nnc.compile(model, backend="reference", profiles=["a:1x4/2x4/8x4"])
    rng = np.random.default_rng(3)
    a, b, c = (rng.standard_normal(s).astype(np.float32) for s in ((3, 4), (3, 4), (1, 4)))
    np.testing.assert_allclose(m(a, b, c), _ort(model, {"a": a, "b": b, "c": c})[0], rtol=1e-5)
    with pytest.raises(InputError) as e:
        m(a, rng.standard_normal((5, 4)).astype(np.float32), c)
    assert ("inputs disagree on symbolic dim S: S = 3 in input 'a' (dim 0, shape [3, 4]) but 5 in input 'b' "
            "(dim 0, shape [5, 4])") in str(e.value)
    with pytest.raises(InputError, match=r"input 'c': shape \[2, 4\], dim 0 must be 1"):
        m(a, b, np.ones((2, 4), np.float32))
    with pytest.raises(InputError, match=r"input 'a' with shape \[9, 4\] is outside every profile"):
        nine = np.ones((9, 4), np.float32)
        m(nine, nine, c)


# ---------------------------------------------------------------------------- several static profiles


def _multi(tmp_path) -> Path:
    out = tmp_path / "multi"
    opts = nnc.CompileOptions(backend="reference", codegen=True, tune=False,
                              profiles=["input:1x3x32x32/1x3x32x32/1x3x32x32", "input:4x3x32x32/4x3x32x32/4x3x32x32"])
    from nnc.driver import compile_model
    compile_model(CNN, out, options=opts)  # CUDA generated and NVRTC-compiled for each profile
    return out


def test_multi_profile_directory_selects_the_build(tmp_path):
    out = _multi(tmp_path)
    for i, n in enumerate((1, 4)):
        plan = json.loads((out / "profiles" / str(i) / "plan.json").read_text())
        assert plan["inputs"][0]["shape"] == [n, 3, 32, 32] and plan["profile_index"] == i
        assert list((out / "profiles" / str(i)).glob("model.*.cubin"))
    index = json.loads((out / "plan.json").read_text())
    assert index["profile_builds"] == 2 and index["inputs"][0]["shape"] == ["N", 3, 32, 32]
    m = nnc.load(out, backend="reference")  # each build's plan executed in its arena on the CPU
    assert m.inputs[0].shape == ("N", 3, 32, 32)
    rng = np.random.default_rng(11)
    for i, n in enumerate((1, 4)):
        x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
        assert m.pick({"input": x}) == i
        np.testing.assert_allclose(m(x), _ort(CNN, {"input": x})[0], rtol=1e-3, atol=1e-5)
        assert m.build(i).in_arena
    ctx = m.context()
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(ctx(x), m(x), rtol=0, atol=0)
    with pytest.raises(InputError) as e:
        m(np.ones((2, 3, 32, 32), np.float32))
    msg = str(e.value)
    assert "input 'input' with shape [2, 3, 32, 32] is outside every profile" in msg
    assert "profile 0: input shape [2, 3, 32, 32] not in 1x3x32x32; profile 1: input shape [2, 3, 32, 32] " \
           "not in 4x3x32x32" in msg
    from nnc.codegen.target import gpu_present
    if not gpu_present():
        from nnc.runtime import GpuUnavailableError
        with pytest.raises(GpuUnavailableError):
            nnc.load(out)
    from nnc.inspect_cmd import inspect
    with pytest.raises(NncError, match=r"set of 2 builds, one per --profile.*profiles/0 to .*profiles/1"):
        inspect(out)  # the index has no kernels: say so, not "0 kernels"
    assert inspect(out / "profiles" / "1")[0]  # each build has its table
    # recompiling without profiles gives the single-build layout again
    nnc.compile(CNN, shapes={"input": [2, 3, 32, 32]}, backend="reference", out=out)
    assert not (out / "profiles").exists()


@pytest.mark.gpu
def test_multi_profile_directory_on_cuda(tmp_path):
    out = _multi(tmp_path)
    m = nnc.load(out)
    rng = np.random.default_rng(5)
    for i, n in enumerate((1, 4)):
        x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
        assert m.pick({"input": x}) == i
        got = m.run({"input": x}, output="numpy")["probs"]
        np.testing.assert_allclose(got, _ort(CNN, {"input": x})[0], rtol=1e-3, atol=1e-5)
    with pytest.raises(InputError, match="outside every profile"):
        m(np.ones((2, 3, 32, 32), np.float32))


def test_nnc_run_on_profile_directories(tmp_path, capsys):
    from nnc.cli import main
    out = _multi(tmp_path)
    assert main(["run", str(out), "--backend", "reference"]) == 0  # random inputs: profile 0's opt
    assert "probs: float32 [1, 10]" in capsys.readouterr().out
    rng_out = tmp_path / "range"
    assert main(["compile", str(CNN), "-o", str(rng_out), "--no-codegen",
                 "--profile", "input:2x3x32x32/3x3x32x32/8x3x32x32"]) == 0
    assert main(["run", str(rng_out), "--backend", "reference"]) == 0
    assert "probs: float32 [3, 10]" in capsys.readouterr().out
    np.savez(tmp_path / "big.npz", input=np.ones((9, 3, 32, 32), np.float32))
    assert main(["run", str(rng_out), "--backend", "reference", "--inputs", str(tmp_path / "big.npz")]) == 1
    assert "input 'input' with shape [9, 3, 32, 32] is outside every profile (profile 0: input shape " \
           "[9, 3, 32, 32] not in 2x3x32x32 .. 8x3x32x32)" in capsys.readouterr().err


def unnamed_dim_model(tmp_path) -> Path:
    """x[?,4] (an ONNX dim with neither value nor param) and t[T,4] -> Relu each."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Relu", ["t"], ["u"])], "g",
                          [x, helper.make_tensor_value_info("t", TensorProto.FLOAT, ["T", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4]),
                           helper.make_tensor_value_info("u", TensorProto.FLOAT, ["T", 4])])
    p = tmp_path / "unnamed.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(p))
    return p


def test_default_shapes_from_python_warn_and_name_unnamed_dims(tmp_path):
    from nnc.driver import compile_model
    model = unnamed_dim_model(tmp_path)
    opts = nnc.CompileOptions(backend="reference", codegen=True, tune=False)  # CUDA generated: the default applies
    with pytest.warns(UserWarning) as w:
        plan = compile_model(model, tmp_path / "o", options=opts)
    msg = str(w[0].message)
    assert "symbolic input dims x[0] (in x); T (in t)" in msg
    assert msg.endswith("--profile x:1x4/1x4/1x4,t:1x4/1x4/1x4")
    assert [i["shape"] for i in plan["inputs"]] == [[1, 4], [1, 4]]
    # without CUDA code generation the dims stay symbolic and nothing is said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = nnc.compile(model.read_bytes(), backend="reference")
    assert m.inputs[1].shape == ("T", 4)
    # an unnamed dim must be given by name in a profile
    with pytest.raises(ProfileError, match=r"input 'x' \[\?,4\] has dims without a name the profile does not give"):
        nnc.compile(model, backend="reference", profiles=["t:1x4/2x4/3x4"])


def test_several_static_profiles_on_the_reference_backend_match_exactly(tmp_path):
    m = nnc.compile(CNN, backend="reference", profiles=["input:1x3x32x32/1x3x32x32/1x3x32x32",
                                                        Profile.of(input=((3, 3, 32, 32),) * 3)])
    assert m.inputs[0].shape == ("N", 3, 32, 32)  # one symbolic build, the profiles checked per run
    x = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(m(x), _ort(CNN, {"input": x})[0], rtol=1e-3, atol=1e-5)
    with pytest.raises(InputError, match=r"profile 0: input shape \[2, 3, 32, 32\] not in 1x3x32x32; "
                                         r"profile 1: input shape \[2, 3, 32, 32\] not in 3x3x32x32"):
        m(np.ones((2, 3, 32, 32), np.float32))


@pytest.mark.gpu
def test_single_static_profile_on_cuda(tmp_path):
    m = nnc.compile(CNN, profiles=["input:2x3x32x32/2x3x32x32/2x3x32x32"], out=tmp_path / "o")
    assert m.inputs[0].shape == (2, 3, 32, 32)
    x = np.random.default_rng(9).standard_normal((2, 3, 32, 32)).astype(np.float32)
    got = m.run({"input": x}, output="numpy")["probs"]
    np.testing.assert_allclose(got, _ort(CNN, {"input": x})[0], rtol=1e-3, atol=1e-5)


def _with_symbolic_input(path: Path, dims) -> onnx.ModelProto:
    """The model with its first input's dims made symbolic where `dims` names a symbol (output
    shapes and value_info dropped: shape inference recomputes them)."""
    m = onnx.load(str(path))
    for d, v in zip(m.graph.input[0].type.tensor_type.shape.dim, dims):
        if isinstance(v, str):
            d.ClearField("dim_value")
            d.dim_param = v
    for o in m.graph.output:
        o.type.tensor_type.ClearField("shape")
    del m.graph.value_info[:]
    return m


def test_reference_lstm_over_sequence_lengths(tmp_path):
    model = _with_symbolic_input(ROOT / "examples" / "tiny_lstm.onnx", ["T", 1, 16])
    m = nnc.compile(model, backend="reference", profiles=["x:1x1x16/8x1x16/40x1x16"])
    p = tmp_path / "lstm.onnx"
    onnx.save(model, str(p))
    rng = np.random.default_rng(4)
    for t in (1, 5, 40):
        x = rng.standard_normal((t, 1, 16)).astype(np.float32)
        got, want = m.run({"x": x}), _ort(p, {"x": x})
        for name, w in zip(m.output_names, want):
            np.testing.assert_allclose(got[name], w, rtol=1e-3, atol=1e-5)


def attention_model(tmp_path) -> Path:
    """x[1,S,64] -> softmax((x Wq)(x Wk)^T / 8)(x Wv) Wo: single-head self-attention over S."""
    rng = np.random.default_rng(0)
    w = {k: helper.make_tensor(k, TensorProto.FLOAT, [64, 64], (rng.standard_normal((64, 64)) * 0.1).ravel())
         for k in ("wq", "wk", "wv", "wo")}
    nodes = [helper.make_node("MatMul", ["x", k], [k[1]]) for k in ("wq", "wk", "wv")] + [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["ss"]),
        helper.make_node("Softmax", ["ss"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["a"]),
        helper.make_node("MatMul", ["a", "wo"], ["y"])]
    g = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S", 64])],
                          list(w.values()) + [helper.make_tensor("scale", TensorProto.FLOAT, [], [0.125])])
    p = tmp_path / "attn.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(p))
    return p


def test_reference_attention_over_sequence_lengths(tmp_path):
    p = attention_model(tmp_path)
    m = nnc.compile(p, backend="reference", profiles=["x:1x1x64/1x128x64/1x512x64"])
    rng = np.random.default_rng(6)
    for s in (1, 77, 512):
        x = rng.standard_normal((1, s, 64)).astype(np.float32)
        np.testing.assert_allclose(m(x), _ort(p, {"x": x})[0], rtol=1e-3, atol=1e-5)


def test_a_range_the_graph_cannot_take_is_a_compile_error():
    model = _with_symbolic_input(ROOT / "examples" / "tiny_transformer.onnx", [1, "S", 64])  # Reshape to 16 heads x 16
    with pytest.raises(ProfileError) as e:
        nnc.compile(model, backend="reference", profiles=["x:1x16x64/1x16x64/1x32x64"])
    assert "profile 0 (x:1x16x64/1x16x64/1x32x64): the model does not take its max shape x:1x32x64: " in str(e.value)
    assert "cannot reshape [1, 32, 64]" in str(e.value)


def test_symbolic_reference_build_without_profiles_checks_shared_symbols(tmp_path):
    m = nnc.compile(shared_symbol_model(tmp_path), backend="reference")
    with pytest.raises(InputError, match=r"inputs disagree on symbolic dim S: S = 3 in input 'a' .* but 5 in input 'b'"):
        m(np.ones((3, 4), np.float32), np.ones((5, 4), np.float32), np.ones((1, 4), np.float32))
    y = m(np.ones((6, 4), np.float32), np.ones((6, 4), np.float32), np.full((1, 4), 2, np.float32))
    np.testing.assert_array_equal(y, np.full((6, 4), 4, np.float32))


def test_default_warning_escapes_model_names():
    from nnc.profiles import ModelInput, default_profile
    shapes, msg = default_profile([ModelInput("in\x1b[2J", ("N", 3))])
    assert shapes == {"in\x1b[2J": [1, 3]}
    assert "\x1b" not in msg and "in\\x1b[2J:1x3/1x3/1x3" in msg
