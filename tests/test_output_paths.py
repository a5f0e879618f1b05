"""Output directories and external data: nothing is written outside OUT, nothing is read through
a symbolic link or a path that a model or a plan.json chose (nnc/outdir.py,
nnc/onnx_import/_external_data.py)."""
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnc.driver import compile_model
from nnc.ir.errors import ImportError_, NncError
from nnc.outdir import OutputDirError, member, staged_dir


def _model(weight=None) -> onnx.ModelProto:
    w = np.arange(4, dtype=np.float32) if weight is None else weight
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def model_path(tmp_path):
    p = tmp_path / "add.onnx"
    onnx.save(_model(), p)
    return p


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


# ---------------------------------------------------------------- compile output directory

def test_compile_replaces_out_whole_and_leaves_no_temporaries(tmp_path, model_path):
    out = tmp_path / "out"
    compile_model(str(model_path), out, arch="sm_90")
    (out / "stale.txt").write_text("from an earlier compile")
    compile_model(str(model_path), out, arch="sm_90")
    assert (out / "plan.json").is_file() and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["add.onnx", "out"]  # no .out.nnc-tmp-* left


def test_symlink_planted_in_out_is_not_followed(tmp_path, model_path):
    out = tmp_path / "out"
    compile_model(str(model_path), out, arch="sm_90")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for f in ("model.cu", "weights.bin", "plan.json"):
        (out / f).unlink()
        (out / f).symlink_to(victim)
    compile_model(str(model_path), out, arch="sm_90")
    assert victim.read_text() == "precious"
    for f in ("model.cu", "weights.bin", "plan.json"):
        assert not (out / f).is_symlink() and (out / f).is_file()


def test_failed_compile_leaves_out_as_it_was(tmp_path, model_path, monkeypatch):
    import nnc.codegen.emit as emit
    out = tmp_path / "out"
    compile_model(str(model_path), out, arch="sm_90")
    before = _snapshot(out)

    def boom(*a, **k):
        raise RuntimeError("disk full, say")
    monkeypatch.setattr(emit, "weights_blob", boom)  # after the cubins and sources are written
    with pytest.raises(RuntimeError):
        compile_model(str(model_path), out, arch="sm_90")
    assert _snapshot(out) == before
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        compile_model(str(model_path), fresh, arch="sm_90")
    assert not os.path.lexists(fresh)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["add.onnx", "out"]


def test_interrupted_staging_is_removed(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(out) as t:
            (t / "half").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_not_an_nnc_directory_is_refused(tmp_path, model_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputDirError, match="not an nnc output directory"):
        compile_model(str(model_path), mine, arch="sm_90")
    assert (mine / "thesis.tex").read_text() == "years of work"
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputDirError, match="not a directory"):
        compile_model(str(model_path), f, arch="sm_90")
    empty = tmp_path / "empty"
    empty.mkdir()
    compile_model(str(model_path), empty, arch="sm_90", codegen=False)
    assert (empty / "plan.json").is_file() and (empty / "ir" / "final.nnir").is_file()


def test_out_given_as_a_symlink_is_the_users_own(tmp_path, model_path):
    real = tmp_path / "real"
    compile_model(str(model_path), real, arch="sm_90")
    link = tmp_path / "link"
    link.symlink_to(real)
    compile_model(str(model_path), link, arch="sm_90")
    assert link.is_symlink() and (real / "plan.json").is_file()


# ---------------------------------------------------------------- reading plan.json's files

@pytest.mark.parametrize("bad", ["../outside.bin", "/etc/passwd", "sub/weights.bin", "..", ".", "", "a\\b",
                                 "nul\x00", "link.bin", "missing.bin", 7])
def test_plan_file_names_must_be_plain_regular_files(tmp_path, model_path, bad):
    from nnc.runtime import plan_files
    out = tmp_path / "out"
    compile_model(str(model_path), out, arch="sm_90")
    (tmp_path / "outside.bin").write_bytes((out / "weights.bin").read_bytes())
    (out / "sub").mkdir()
    (out / "sub" / "weights.bin").write_bytes(b"")
    (out / "link.bin").symlink_to(tmp_path / "outside.bin")
    plan = json.loads((out / "plan.json").read_text())
    plan_files(out)  # as written: fine
    plan["weights_file"] = bad
    (out / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(OutputDirError):
        plan_files(out)
    import nnc
    with pytest.raises(NncError):  # nnc.load checks the files before it needs a GPU
        nnc.load(out)


def test_symlinked_plan_json_is_refused(tmp_path, model_path):
    from nnc.runtime import plan_files
    out = tmp_path / "out"
    compile_model(str(model_path), out, arch="sm_90")
    (out / "plan.json").rename(tmp_path / "plan.json")
    (out / "plan.json").symlink_to(tmp_path / "plan.json")
    with pytest.raises(OutputDirError, match="symbolic link"):
        plan_files(out)


def test_member_accepts_plain_names(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert member(tmp_path, "weights.bin") == tmp_path / "weights.bin"


def test_cli_reports_bad_plan_file_in_one_line(tmp_path, model_path, capsys):
    from nnc.cli import main
    out = tmp_path / "out"
    compile_model(str(model_path), out, arch="sm_90")
    plan = json.loads((out / "plan.json").read_text())
    plan["weights_file"] = "../../etc/passwd"
    (out / "plan.json").write_text(json.dumps(plan))
    assert main(["run", str(out), "--backend", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "not a plain file name" in err and "Traceback" not in err and err.count("\n") == 1


# ---------------------------------------------------------------- --name

def test_name_option_validated_and_defaulted(tmp_path, model_path):
    from nnc.cli import main
    plan = compile_model(str(model_path), tmp_path / "a", arch="sm_90", codegen=False)
    assert plan["name"] == "add"
    odd = tmp_path / "3d-unet.v2.onnx"
    onnx.save(_model(), odd)
    plan = compile_model(str(odd), tmp_path / "b", arch="sm_90")
    assert plan["name"] == "m3d_unet_v2" and plan["c_api_prefix"] == "nnc_m3d_unet_v2"
    assert "nnc_m3d_unet_v2_create" in (tmp_path / "b" / "nnc_model.h").read_text()
    for bad in ("9lives", "a-b", "a b", "", "caf\u00e9", "x\n#define"):
        with pytest.raises(NncError, match="C identifier"):
            compile_model(str(model_path), tmp_path / "c", arch="sm_90", name=bad)
    assert not os.path.lexists(tmp_path / "c")
    assert main(["compile", str(model_path), "-o", str(tmp_path / "d"), "--arch", "sm_90", "--name", "no-dash"]) == 1


# ---------------------------------------------------------------- external data

def _external_model(tmp_path: Path) -> Path:
    """add.onnx whose initializer w lives in w.bin beside it (offset/length entries present)."""
    d = tmp_path / "model"
    d.mkdir()
    m = _model(np.array([10, 20, 30, 40], dtype=np.float32))
    onnx.save_model(m, d / "add.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.bin", size_threshold=0)
    return d / "add.onnx"


def _set_external(path: Path, **entries):
    m = onnx.load(str(path), load_external_data=False)
    t = m.graph.initializer[0]
    assert t.data_location == TensorProto.EXTERNAL
    kv = {e.key: e.value for e in t.external_data}
    kv.update(entries)
    del t.external_data[:]
    for k, v in kv.items():
        if v is not None:
            t.external_data.add(key=k, value=str(v))
    onnx.save(m, str(path))


def test_external_data_is_read(tmp_path):
    from nnc.ir.interp import Interpreter
    from nnc.onnx_import import import_model
    p = _external_model(tmp_path)
    mod = import_model(p)
    y = Interpreter(mod).run({"x": np.ones(4, np.float32)})["y"]
    np.testing.assert_array_equal(y, [11, 21, 31, 41])


@pytest.mark.parametrize("case,entries,match", [
    ("dotdot", {"location": "../secret.bin"}, r"leaves the model's directory"),
    ("dotdot_inner", {"location": "sub/../../secret.bin"}, r"leaves the model's directory"),
    ("absolute", {"location": "/etc/passwd"}, r"is absolute"),
    ("backslash_abs", {"location": "\\etc\\passwd"}, r"is absolute"),
    ("symlink", {"location": "link.bin"}, r"symbolic link"),
    ("symlink_dir", {"location": "linkdir/w.bin"}, r"symbolic link"),
    ("missing", {"location": "nope.bin"}, r"does not exist"),
    ("directory", {"location": "sub"}, r"not a regular file"),
    ("offset_beyond", {"offset": 1000}, r"beyond the file"),
    ("length_beyond", {"offset": 8, "length": 16}, r"beyond the file"),
    ("bad_offset", {"offset": "-4"}, r"not a non-negative integer"),
    ("bad_length", {"length": "1e3"}, r"not a non-negative integer"),
    ("no_location", {"location": None}, r"names no location"),
    ("unknown_key", {"evil": "1"}, r"unknown external data key"),
    ("short", {"length": 8}, r"cannot read"),
])
def test_external_data_locations_are_checked(tmp_path, case, entries, match):
    from nnc.onnx_import import import_model
    p = _external_model(tmp_path)
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    (p.parent / "sub").mkdir()
    (p.parent / "link.bin").symlink_to(tmp_path / "secret.bin")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "w.bin").write_bytes(b"\0" * 16)
    (p.parent / "linkdir").symlink_to(tmp_path / "elsewhere")
    _set_external(p, **entries)
    with pytest.raises(ImportError_, match=match):
        import_model(p)


def test_external_data_of_an_in_memory_model_is_refused(tmp_path):
    from nnc.onnx_import import import_model
    p = _external_model(tmp_path)
    with pytest.raises(ImportError_, match="load the model from its file"):
        import_model(onnx.load(str(p), load_external_data=False))


def test_verify_reads_external_data_through_nnc(tmp_path):
    """nnc verify hands onnxruntime a proto whose external tensors nnc read itself: a good model
    verifies; a location outside the model's directory is refused before onnxruntime sees it."""
    from nnc.accuracy import _load_proto, verify_model
    p = _external_model(tmp_path)
    r = verify_model(str(p), seed=1)
    assert r.passed and [o.name for o in r.outputs] == ["y"]
    (tmp_path / "secret.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    _set_external(p, location="../secret.bin")
    with pytest.raises(NncError, match="leaves the model's directory"):
        _load_proto(str(p), external=True)
