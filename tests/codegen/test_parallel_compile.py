"""The compile service (codegen/cuda.py compile_many, codegen/units.py) and output integrity
(nnc/integrity.py): the cubin cache hits, misses and recompiles corrupt entries; its key follows
source, options, arch and compiler; --no-cache neither reads nor writes it; parallel compiles
equal serial ones; units carry only the prelude pieces they use; a tampered cubin, weights file
or IR is refused by every loader (Python runtime, C API, reference backend) naming the file."""
import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnc.codegen import cuda, units
from nnc.codegen.cuda import CompileError, CubinCache, Unit, cache_key, compile_many, valid_cubin
from nnc.driver import compile_model
from nnc.integrity import IntegrityError

ROOT = Path(__file__).resolve().parents[2]
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc") else None)


def _kernel(name: str, body: str = "x[threadIdx.x] *= 2.0f;") -> str:
    return f'extern "C" __global__ void {name}(float* x) {{ {body} }}\n'


def _units(n: int, tag: str = "k") -> list:
    return [Unit(f"unit {i}", _kernel(f"{tag}{i}", f"x[threadIdx.x] += {i}.0f;"), (f"{tag}{i}",)) for i in range(n)]


def _chain_model(n: int = 8) -> onnx.ModelProto:
    """x -> (Tanh, Add c_i, Softmax) * n -> y: a few distinct kernels (the Softmax keeps each
    Tanh+Add pair its own fused group, so fuse-elementwise does not make the chain one kernel; it
    is over axis 0, not the last axis, so fuse-reduction does not take the chain as one row group)."""
    nodes, inits, prev = [], [], "x"
    for i in range(n):
        nodes.append(helper.make_node("Tanh", [prev], [f"t{i}"], name=f"tanh{i}"))
        inits.append(numpy_helper.from_array(np.linspace(0.0, 0.1 * (i + 1), 32, dtype=np.float32), f"c{i}"))
        nodes.append(helper.make_node("Add", [f"t{i}", f"c{i}"], [f"a{i}"], name=f"add{i}"))
        nodes.append(helper.make_node("Softmax", [f"a{i}"], [f"s{i}"], name=f"softmax{i}", axis=0))
        prev = f"s{i}"
    nodes.append(helper.make_node("ReduceSum", [prev], ["y"], name="sum", keepdims=1))
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.fixture
def cache(tmp_path):
    return CubinCache(tmp_path / "cache")


@pytest.fixture(scope="module")
def chain_onnx(tmp_path_factory):
    p = tmp_path_factory.mktemp("chain") / "chain.onnx"
    onnx.save(_chain_model(), str(p))
    return p


@pytest.fixture
def small_units(monkeypatch):
    """Units of one or two kernels, so small models compile as several units."""
    monkeypatch.setattr(units, "MAX_UNIT_KERNELS", 2)


# ---------------------------------------------------------------------------- cache


def test_cache_miss_then_hit(cache):
    us = _units(3)
    first = compile_many(us, "sm_90", cache=cache, jobs=1)
    assert (cache.hits, cache.misses, cache.rejected) == (0, 3, 0)
    assert len(list((cache.dir / "cubin").glob("*.cubin"))) == 3
    again = compile_many(us, "sm_90", cache=cache, jobs=1)
    assert (cache.hits, cache.misses) == (3, 3) and again == first
    assert all(valid_cubin(c, u.kernels) for c, u in zip(first, us))
    assert not list((cache.dir / "cubin").glob(".tmp-*"))  # written atomically, nothing left over


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated", "other_kernel"])
def test_corrupt_entry_recompiled(cache, damage):
    u = _units(1)[0]
    good = compile_many([u], "sm_90", cache=cache)[0]
    path = cache.path(cache_key(u.source, "nvrtc", "sm_90", cuda.nvrtc_options("sm_90"), cache.dir))
    assert path.read_bytes() == good
    other = compile_many([Unit("o", _kernel("other"), ("other",))], "sm_90")[0]
    path.write_bytes({"empty": b"", "garbage": b"not a cubin at all", "truncated": good[:3],
                      "other_kernel": other}[damage])
    got = compile_many([u], "sm_90", cache=cache)[0]
    assert got == good and cache.rejected == 1
    assert path.read_bytes() == good  # the entry was replaced


def test_key_follows_source_options_arch_backend():
    opts = cuda.nvrtc_options("sm_90")
    base = cache_key("src", "nvrtc", "sm_90", opts)
    assert cache_key("src", "nvrtc", "90", opts) == base  # the same arch spelled differently
    assert cache_key("src ", "nvrtc", "sm_90", opts) != base
    assert cache_key("src", "nvrtc", "sm_80", opts) != base
    assert cache_key("src", "nvrtc", "sm_90", opts + ["-DX=1"]) != base
    assert cache_key("src", "nvrtc", "sm_90", cuda.nvrtc_options("sm_89")) != base
    if NVCC:
        assert cache_key("src", "nvcc", "sm_90", opts) != base


def test_key_includes_nvrtc_version(tmp_path):
    from cupy_backends.cuda.libs import nvrtc
    ident = cuda.compiler_id("nvrtc")
    assert ident.startswith("nvrtc %d.%d" % tuple(nvrtc.getVersion()))
    # the memoized identity (cache dir) equals the live one and is dropped when the library changes
    memo_dir = tmp_path / "memo"
    assert cuda.compiler_id("nvrtc", str(memo_dir)) == ident
    memo = json.loads((memo_dir / "nvrtc-identity.json").read_text())
    assert memo["identity"] in ident
    lib = memo["identity"].split(" ")[2]
    assert not cuda._memo_valid(memo["identity"].replace(lib, lib + ".gone"))
    assert cuda._memo_valid(memo["identity"])


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NNC_CACHE_DIR", str(tmp_path / "a"))
    assert cuda.default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("NNC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cuda.default_cache_dir() == tmp_path / "xdg" / "nnc"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cuda.default_cache_dir() == Path.home() / ".cache" / "nnc"


def test_unwritable_cache_still_compiles(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory would go")
    c = CubinCache(blocker)
    assert valid_cubin(compile_many(_units(1), "sm_90", cache=c)[0], ("k0",))


def test_no_cache_neither_reads_nor_writes(chain_onnx, tmp_path, monkeypatch):
    cdir = tmp_path / "cache"
    monkeypatch.setenv("NNC_CACHE_DIR", str(cdir))

    def forbidden(*a, **k):
        raise AssertionError("the cache was used")
    monkeypatch.setattr(CubinCache, "get", forbidden)
    monkeypatch.setattr(CubinCache, "put", forbidden)
    plan = compile_model(str(chain_onnx), tmp_path / "out", arch="sm_90", no_cache=True)
    assert plan["cubins"] and not cdir.exists()
    monkeypatch.undo()
    monkeypatch.setenv("NNC_CACHE_DIR", str(cdir))
    r = subprocess.run([sys.executable, "-m", "nnc.cli", "compile", str(chain_onnx), "-o", str(tmp_path / "o2"),
                        "--arch", "sm_90", "--no-cache"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not cdir.exists()
    r = subprocess.run([sys.executable, "-m", "nnc.cli", "compile", str(chain_onnx), "-o", str(tmp_path / "o3"),
                        "--arch", "sm_90"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert list((cdir / "cubin").glob("*.cubin"))  # without --no-cache the same command fills it


def test_recompile_hits_cache(chain_onnx, tmp_path, small_units, monkeypatch):
    monkeypatch.setenv("NNC_CACHE_DIR", str(tmp_path / "cache"))
    p1 = compile_model(str(chain_onnx), tmp_path / "a", arch="sm_90")
    entries = sorted((tmp_path / "cache" / "cubin").glob("*.cubin"))
    assert len(p1["cubins"]) > 1 and len(entries) == len(p1["cubins"])
    stamps = [e.stat().st_mtime_ns for e in entries]
    calls = []
    real = cuda._compile_unit
    monkeypatch.setattr(cuda, "_compile_unit", lambda *a, **k: calls.append(a) or real(*a, **k))
    p2 = compile_model(str(chain_onnx), tmp_path / "b", arch="sm_90")
    assert not calls  # every unit came from the cache
    assert [c["sha256"] for c in p1["cubins"]] == [c["sha256"] for c in p2["cubins"]]
    assert [e.stat().st_mtime_ns for e in entries] == stamps


# ---------------------------------------------------------------------------- parallel


def test_parallel_equals_serial():
    us = _units(5, "p")
    serial = compile_many(us, "sm_90", jobs=1)
    seen = []
    parallel = compile_many(us, "sm_90", jobs=3, progress=lambda d, t: seen.append((d, t)))
    assert parallel == serial
    assert [d for d, _ in seen] == [1, 2, 3, 4, 5] and {t for _, t in seen} == {5}


def test_progress_counts_cache_hits(cache):
    us = _units(3, "h")
    compile_many(us[:2], "sm_90", cache=cache)
    seen = []
    compile_many(us, "sm_90", cache=cache, progress=lambda d, t: seen.append(d))
    assert seen == [2, 3]


def test_compile_error_names_unit_and_kernel():
    us = _units(2, "e") + [Unit("unit X (nnc_broken)", _kernel("nnc_broken", "x[0] = undeclared_thing;"),
                                ("nnc_broken",))]
    for jobs in (1, 2):
        with pytest.raises(CompileError) as e:
            compile_many(us, "sm_90", jobs=jobs)
        assert "unit X (nnc_broken)" in str(e.value) and "undeclared_thing" in str(e.value)


def test_fallback_source_used_when_trimmed_fails():
    u = Unit("u", "this does not compile", ("fb",), fallback=_kernel("fb"))
    assert valid_cubin(compile_many([u], "sm_90")[0], ("fb",))


def test_worker_dies_cleanly(monkeypatch, tmp_path):
    """Workers that died while idle are replaced; one that dies mid-compile gives a CompileError
    naming the unit, and later compiles start fresh workers."""
    pool = cuda._POOL
    compile_many(_units(2, "w"), "sm_90", jobs=2)  # workers started
    for w in list(pool._all):
        w.proc.kill()
        w.proc.wait()
    assert valid_cubin(compile_many(_units(2, "w1"), "sm_90", jobs=2)[1], ("w11",))  # replaced
    for w in list(pool._all):
        w.proc.kill()
        w.proc.wait()
    dying = tmp_path / "dying_worker.py"
    dying.write_text("import sys\nsys.stdin.buffer.read(4)\nsys.exit(3)\n")
    monkeypatch.setattr(cuda.nvrtc_worker, "__file__", str(dying))
    with pytest.raises(CompileError, match=r"worker process died compiling unit \d \(exit status 3\)"):
        compile_many(_units(2, "w2"), "sm_90", jobs=2)
    monkeypatch.undo()
    assert valid_cubin(compile_many(_units(2, "w3"), "sm_90", jobs=2)[1], ("w31",))


def test_nvcc_backend_units(cache):
    if not NVCC:
        pytest.skip("nvcc not installed")
    us = _units(2, "n")
    out = compile_many(us, "sm_90", backend="nvcc", cache=cache, jobs=2)
    assert all(valid_cubin(c, u.kernels) for c, u in zip(out, us))
    assert compile_many(us, "sm_90", backend="nvcc", cache=cache) == out and cache.hits == 2


# ---------------------------------------------------------------------------- units


def test_units_cover_kernels_once_and_trim_prelude(tmp_path, small_units):
    from nnc.codegen.lower import lower
    from nnc.onnx_import import import_model
    from nnc.pipeline import run_passes
    m = import_model(_chain_model())
    run_passes(m)
    plan = lower(m, {"arch": "sm_90", "precision": "fp32", "tf32": False})
    ks = list(plan.kernels.values())
    us = units.make_units(ks)
    assert len(us) > 1 and all(len(u.kernels) <= 2 for u in us)
    assert [k for u in us for k in u.kernels] == [k.name for k in ks]
    for u in us:
        assert "#include <cuda_fp16.h>" not in u.source  # fp32 kernels: no fp16/bf16 headers
        assert "nnc_enc_f8e4m3" not in u.source           # nor the narrow types
    full = units.prelude()
    assert "#include <cuda_fp16.h>" in full and "nnc_enc_f8e4m3" in full and "nnc_block_sum" in full


def test_pieces_follow_names():
    base = units.pieces_for(["x"])
    assert base == ["prelude_base.cu.j2"]
    assert "prelude_fp16.cu.j2" in units.pieces_for(["const __half* x"])
    assert "exotic_types.cu.j2" in units.pieces_for(["nnc_f8e4m3 v"])
    assert "prelude_reduce.cu.j2" in units.pieces_for(["nnc_block_sum(v, s)"])
    assert "prelude_math.cu.j2" in units.pieces_for(["nnc_sigmoid(v)"])
    assert units.pieces_for(["nnc_ew_add_3"]) == base  # a kernel's own name is no helper's


@pytest.mark.parametrize("prec", ["fp16", "bf16"])
def test_half_models_compile_with_trimmed_prelude(tmp_path, prec, monkeypatch):
    monkeypatch.setenv("NNC_STRICT_PRELUDE", "1")  # no fallback: the trimmed prelude must do
    plan = compile_model(str(ROOT / "examples" / "tiny_transformer.onnx"), tmp_path, arch="sm_90", precision=prec)
    srcs = [k for c in plan["cubins"] for k in c["kernels"]]
    assert sorted(srcs) == sorted(k["name"] for k in plan["kernels"])


@pytest.mark.parametrize("name,shapes,prec", [("tiny_cnn", "input:1x3x32x32", "fp16"), ("tiny_transformer", "", "fp32")])
def test_model_cu_kernels_compile_as_one_program(tmp_path, name, shapes, prec):
    """The cubins come from units, but model.cu (what the C API's nvcc build compiles) still holds
    every kernel with the whole prelude in one file: its kernel part compiles as one NVRTC program
    with the same kernels (no clash between kernels of different units)."""
    plan = compile_model(str(ROOT / "examples" / f"{name}.onnx"), tmp_path / "o", shapes=shapes, arch="sm_90",
                         precision=prec)
    src = (tmp_path / "o" / "model.cu").read_text()
    names = tuple(k["name"] for k in plan["kernels"])
    one = compile_many([Unit("model.cu", src, names)], "sm_90", cache=CubinCache.default())[0]
    assert valid_cubin(one, names)


# ---------------------------------------------------------------------------- integrity


@pytest.fixture(scope="module")
def compiled(chain_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled") / "out"
    plan = compile_model(str(chain_onnx), out, arch="sm_90")
    return out, plan


def _copy(src: Path, tmp_path: Path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(src, d)
    return d


def _flip(p: Path, at: int = -1):
    b = bytearray(p.read_bytes())
    b[at] ^= 0xFF
    p.write_bytes(bytes(b))


def test_plan_records_hashes(compiled):
    out, plan = compiled
    names = sorted(k["name"] for k in plan["kernels"])
    assert sorted(k for c in plan["cubins"] for k in c["kernels"]) == names
    for c in plan["cubins"]:
        data = (out / c["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == c["sha256"] and valid_cubin(data, c["kernels"])
    for f in ("final.nnir", "final.weights.bin", "final.weights.json"):
        assert plan["ir_sha256"][f] == hashlib.sha256((out / "ir" / f).read_bytes()).hexdigest()
    assert "nnc_weights_sha256" not in plan and plan["weights_sha256"] in (out / "model.cu").read_text()


@pytest.mark.parametrize("target", ["cubin", "weights"])
def test_runtime_refuses_tampered_files(compiled, tmp_path, target):
    """Checked before any GPU work, so this runs without one too."""
    from nnc.runtime import Module
    out, plan = compiled
    d = _copy(out, tmp_path)
    f = d / (plan["cubins"][0]["file"] if target == "cubin" else "weights.bin")
    if target == "weights" and f.stat().st_size == 0:
        pytest.skip("no weights")
    _flip(f)
    with pytest.raises(IntegrityError, match=f.name):
        Module(d)


@pytest.mark.parametrize("target", ["final.nnir", "final.weights.bin", "final.weights.json"])
def test_reference_refuses_tampered_ir(compiled, tmp_path, target):
    import nnc
    from nnc.cli import main
    out, _ = compiled
    d = _copy(out, tmp_path)
    p = d / "ir" / target
    if target == "final.nnir":
        p.write_text(p.read_text().replace("tanh", "tanh ", 1) + "\n")
    else:
        _flip(p, len(p.read_bytes()) // 2)
    with pytest.raises(IntegrityError, match=target):
        nnc.load(d, backend="reference")
    assert main(["run", str(d), "--backend", "reference"]) == 1
    # the untouched directory runs
    assert main(["run", str(out), "--backend", "reference"]) == 0


def test_reference_refuses_tampered_ir_without_codegen(chain_onnx, tmp_path):
    import nnc
    plan = compile_model(str(chain_onnx), tmp_path / "o", codegen=False)
    assert set(plan["ir_sha256"]) >= {"final.nnir"}
    _flip(tmp_path / "o" / "ir" / "final.weights.bin")
    with pytest.raises(IntegrityError, match="final.weights.bin"):
        nnc.load(tmp_path / "o", backend="reference")


def test_sha256_template_matches_hashlib(tmp_path):
    """templates/sha256.cu.j2 (the C API's check) built as host C++ against hashlib."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if not cxx:
        pytest.skip("no C++ compiler")
    from nnc.codegen.render import render
    src = ("#include <cstdint>\n#include <cstring>\n#include <string>\n#include <cstdio>\nnamespace {\n"
           + render("sha256.cu.j2") + "}\n"
           'extern "C" void nnc_test_sha(const unsigned char* p, size_t n, char* out) {'
           " std::string h = Sha256().hex(p, n); std::memcpy(out, h.c_str(), 65); }\n")
    (tmp_path / "s.cpp").write_text(src)
    subprocess.run([cxx, "-O1", "-shared", "-fPIC", "-o", str(tmp_path / "s.so"), str(tmp_path / "s.cpp")], check=True)
    lib = ctypes.CDLL(str(tmp_path / "s.so"))
    rng = np.random.default_rng(0)
    for n in list(range(0, 131)) + [1000, 1 << 16, (1 << 20) + 3]:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        out = ctypes.create_string_buffer(65)
        lib.nnc_test_sha(data, n, out)
        assert out.value.decode() == hashlib.sha256(data).hexdigest(), n


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_c_api_refuses_tampered_weights(compiled, tmp_path):
    """The C API library (model.cu built by nvcc) checks weights.bin's sha256 in create, before
    any CUDA call: a flipped byte gives NNC_ERR_WEIGHTS naming the file (no GPU needed)."""
    out, plan = compiled
    d = _copy(out, tmp_path)
    if not (d / "weights.bin").stat().st_size:
        pytest.skip("no weights")
    api = plan["c_api_prefix"]
    lib_path = tmp_path / "libm.so"
    subprocess.run([NVCC, "-shared", "-Xcompiler", "-fPIC", "-std=c++17", "-arch=sm_90", "-I", str(d),
                    "-o", str(lib_path), str(d / "model.cu"), "-lcudart"], check=True, capture_output=True)
    lib = ctypes.CDLL(str(lib_path))
    create = getattr(lib, f"{api}_create")
    create.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    last_error = getattr(lib, f"{api}_last_error")
    last_error.restype = ctypes.c_char_p
    header = (d / "nnc_model.h").read_text()
    err_weights = int(header.split("NNC_ERR_WEIGHTS")[1].split("=")[1].split(",")[0].strip().rstrip("}").strip())
    h = ctypes.c_void_p()
    good = create(str(d).encode(), ctypes.byref(h))
    assert good != err_weights, last_error()  # intact weights pass the check (then need a GPU or not)
    if good == 0:
        getattr(lib, f"{api}_destroy")(h)
    _flip(d / "weights.bin", 0)
    rc = create(str(d).encode(), ctypes.byref(h))
    msg = last_error().decode()
    assert rc == err_weights and "weights.bin" in msg and "sha256" in msg


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_multi_cubin_model_runs(chain_onnx, tmp_path, small_units):
    """Several cubins (units of two kernels) load and run, matching the reference interpreter."""
    import nnc
    plan = compile_model(str(chain_onnx), tmp_path / "o", arch=None)
    assert len(plan["cubins"]) > 1
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    got = nnc.load(tmp_path / "o").run({"x": x}, output="numpy")["y"]
    want = nnc.load(tmp_path / "o", backend="reference").run({"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_refuses_tampered_cubin(chain_onnx, tmp_path):
    import nnc
    compile_model(str(chain_onnx), tmp_path / "o", arch=None)
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    nnc.load(tmp_path / "o")  # intact: loads
    _flip(tmp_path / "o" / plan["cubins"][-1]["file"], 100)
    with pytest.raises(IntegrityError, match=plan["cubins"][-1]["file"]):
        nnc.load(tmp_path / "o")
