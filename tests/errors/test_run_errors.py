"""`nnc run`: untrusted input files, tampered weights, and outputs that are NaN/inf."""
import warnings
import zipfile

import numpy as np
import onnx
import pytest
from onnx import helper as h

from .util import cli, init, model, one_line_error, vi


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    """Add(x, w) with a weight in ir/final.weights.bin, compiled without codegen."""
    from nnc.driver import compile_model
    d = tmp_path_factory.mktemp("run")
    m = model([h.make_node("Add", ["x", "w"], ["y"], name="add")], [vi("x", shape=[4, 8])], [vi("y")],
              [init("w", np.arange(32, dtype=np.float32).reshape(4, 8))])
    onnx.save(m, d / "m.onnx")
    compile_model(d / "m.onnx", d / "out", codegen=False)
    return d / "out"


def npy_bytes(header: str, payload: bytes = b"") -> bytes:
    hdr = header.encode()
    hdr += b" " * (118 - len(hdr)) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(hdr).to_bytes(2, "little") + hdr + payload


def test_good_inputs(outdir, tmp_path, capsys):
    x = np.ones((4, 8), np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    rc, out, err = cli(capsys, "run", outdir, "--inputs", tmp_path / "in.npz", "--save", tmp_path / "o.npz")
    assert rc == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "o.npz")["y"], x + np.arange(32).reshape(4, 8))


def test_truncated_npz(outdir, tmp_path, capsys):
    np.savez(tmp_path / "in.npz", x=np.ones((4, 8), np.float32))
    b = (tmp_path / "in.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(b[: len(b) // 2])
    assert "truncated or corrupt" in one_line_error(capsys, "run", outdir, "--inputs", tmp_path / "t.npz")


def test_corrupt_compressed_member(outdir, tmp_path, capsys):
    np.savez_compressed(tmp_path / "in.npz", x=np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32))
    b = bytearray((tmp_path / "in.npz").read_bytes())
    b[90] ^= 0xFF
    (tmp_path / "c.npz").write_bytes(b)
    err = one_line_error(capsys, "run", outdir, "--inputs", tmp_path / "c.npz")
    assert "--inputs" in err


def test_header_claiming_1e12_elements(outdir, tmp_path, capsys):
    with zipfile.ZipFile(tmp_path / "h.npz", "w") as z:
        z.writestr("x.npy", npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }",
                                      b"\0" * 64))
    err = one_line_error(capsys, "run", outdir, "--inputs", tmp_path / "h.npz")
    assert "input 'x': expected shape f32[4,8], given [1000000, 1000000]" in err


def test_zip_bomb_is_refused_before_decompressing(outdir, tmp_path, capsys):
    """A 256 MB member in a 250 kB file, with a header matching the input: refused from the
    sizes in the zip directory before anything is inflated (the issue's 3 GB bomb is refused the
    same way; this one is smaller only so that building it is quick)."""
    import tracemalloc
    with zipfile.ZipFile(tmp_path / "b.npz", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open("x.npy", "w", force_zip64=True) as f:
            f.write(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (4, 8), }"))
            chunk = b"\0" * (1 << 24)
            for _ in range(16):
                f.write(chunk)
    assert (tmp_path / "b.npz").stat().st_size < 1 << 20
    tracemalloc.start()
    err = one_line_error(capsys, "run", outdir, "--inputs", tmp_path / "b.npz")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "holds 268435456 data bytes" in err and "implies 128" in err
    assert peak < 32 << 20


def test_not_an_npz(outdir, tmp_path, capsys):
    (tmp_path / "README.md").write_text("# hello\n")
    err = one_line_error(capsys, "run", outdir, "--inputs", tmp_path / "README.md")
    assert "not an .npz file" in err and "pickle" not in err


@pytest.mark.parametrize("arrays, msg", [
    ({"z": np.ones((4, 8), np.float32)}, "the model has no input 'z'"),
    ({"x": np.ones((4, 8), np.float64)}, "input 'x': expected dtype float32, given float64"),
    ({"x": np.ones((4, 7), np.float32)}, "input 'x': expected shape f32[4,8], given [4, 7]"),
])
def test_wrong_members(outdir, tmp_path, capsys, arrays, msg):
    np.savez(tmp_path / "in.npz", **arrays)
    assert msg in one_line_error(capsys, "run", outdir, "--inputs", tmp_path / "in.npz")


def test_object_member(outdir, tmp_path, capsys):
    with zipfile.ZipFile(tmp_path / "o.npz", "w") as z:
        z.writestr("x.npy", npy_bytes("{'descr': '|O', 'fortran_order': False, 'shape': (4, 8), }"))
    assert "not a plain numeric array" in one_line_error(capsys, "run", outdir, "--inputs", tmp_path / "o.npz")


def test_fortran_order_and_big_endian_inputs(outdir, tmp_path, capsys):
    x = np.asfortranarray(np.arange(32, dtype=">f4").reshape(4, 8))
    np.savez(tmp_path / "in.npz", x=x)
    rc, out, err = cli(capsys, "run", outdir, "--inputs", tmp_path / "in.npz", "--save", tmp_path / "o.npz")
    assert rc == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "o.npz")["y"], 2 * np.arange(32).reshape(4, 8))


def test_flipped_byte_in_weights_bin(outdir, tmp_path, capsys):
    """Caught twice over: plan.json's ir_sha256 (nnc run) and the per-weight sha256 in the
    weights index (WeightStore.load, which `nnc opt` and everything loading IR goes through)."""
    import shutil
    d = tmp_path / "out"
    shutil.copytree(outdir, d)
    p = d / "ir" / "final.weights.bin"
    b = bytearray(p.read_bytes())
    b[5] ^= 0x01
    p.write_bytes(b)
    assert "sha256" in one_line_error(capsys, "run", d)
    err = one_line_error(capsys, "opt", d / "ir" / "final.nnir")
    assert "weight 'w'" in err and "do not match the sha256" in err
    p.write_bytes(b[:40])
    assert "runs past the end" in one_line_error(capsys, "opt", d / "ir" / "final.nnir")


def test_weights_index_tampering(outdir, tmp_path, capsys):
    import json
    import shutil
    d = tmp_path / "out"
    shutil.copytree(outdir, d)
    p = d / "ir" / "final.weights.json"
    good = json.loads(p.read_text())
    for bad, msg in [({"shape": [1000, 1000]}, "nbytes 128 but"), ({"dtype": "object"}, "unknown dtype"),
                     ({"offset": -5}, "not ints >= 0"), ({"sha256": None}, "sha256 is not a string"),
                     ({"shape": "x"}, "is not a list of ints")]:
        p.write_text(json.dumps([{**good[0], **bad}]))
        assert msg in one_line_error(capsys, "opt", d / "ir" / "final.nnir")
    p.write_text(json.dumps([{k: v for k, v in good[0].items() if k != "sha256"}]))
    assert "older nnc" in one_line_error(capsys, "opt", d / "ir" / "final.nnir")
    p.write_text(json.dumps(good * 2))
    assert "listed twice" in one_line_error(capsys, "opt", d / "ir" / "final.nnir")
    p.write_text("{not json")
    assert "not a weights index" in one_line_error(capsys, "opt", d / "ir" / "final.nnir")


def test_nonfinite_outputs_are_reported_and_fail(tmp_path, capsys):
    from nnc.driver import compile_model
    m = model([h.make_node("Log", ["x"], ["y"], name="log")], [vi("x", shape=[4])], [vi("y")])
    onnx.save(m, tmp_path / "m.onnx")
    compile_model(tmp_path / "m.onnx", tmp_path / "out", codegen=False)
    np.savez(tmp_path / "in.npz", x=np.array([1, 0, -1, -2], np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy RuntimeWarning leaking out would fail here
        rc, out, err = cli(capsys, "run", tmp_path / "out", "--inputs", tmp_path / "in.npz")
        assert rc == 3
        assert "warning: output 'y' has 2 NaN and 1 inf of 4 values" in err
        assert "RuntimeWarning" not in err and ".py:" not in err
        rc, out, err = cli(capsys, "run", tmp_path / "out", "--inputs", tmp_path / "in.npz", "--allow-nonfinite")
        assert rc == 0 and "2 NaN and 1 inf" in err


def test_fp16_light_model_overflow_is_reported(tmp_path, capsys):
    """The issue's reproducer: light_bvlc_alexnet's weights are all 0.02 (ConstantOfShape), so its
    activations reach 3.6e12 even in fp32, far past fp16's 65504: a genuine fp16 overflow, which
    `nnc run` must flag instead of printing NaN statistics with exit 0."""
    import os
    light = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
    from nnc.driver import compile_model
    compile_model(os.path.join(light, "light_bvlc_alexnet.onnx"), tmp_path / "out", precision="fp16", codegen=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rc, out, err = cli(capsys, "run", tmp_path / "out")
    assert rc == 3 and "output 'prob_1' has 1000 NaN" in err, err
