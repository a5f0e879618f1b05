"""`nnc inspect` and `nnc bench` on a directory compiled with several static --profile (one build
each under OUT/profiles/<i>/, the index OUT/plan.json; compiler/profiles.py select_builds): a
section / a result per profile, --profile I or --shapes picking one build, a clear error for shapes
no profile holds. CPU only: the tables come from plan.json, the numbers from the reference backend."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import nnc
from nnc.cli import main
from nnc.ir.errors import InputError, NncError
from nnc.profiles import select_builds

ROOT = Path(__file__).resolve().parents[1]
CNN = ROOT / "examples" / "tiny_cnn.onnx"  # input f32[N,3,32,32] -> probs f32[N,10]
PROFILES = ["input:1x3x32x32/1x3x32x32/1x3x32x32", "input:4x3x32x32/4x3x32x32/4x3x32x32"]


@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> Path:
    """CNN with two static profiles, batch 1 and 4 (as tests/test_profiles.py's _multi: CUDA
    generated and NVRTC-compiled for each, no GPU needed)."""
    from nnc.driver import compile_model
    out = tmp_path_factory.mktemp("profile_dirs") / "multi"
    compile_model(CNN, out, options=nnc.CompileOptions(backend="reference", codegen=True, tune=False,
                                                       profiles=PROFILES))
    return out


def _sections(text: str) -> list:
    return [line for line in text.splitlines() if ": profile " in line and " of 2 (" in line]


# ---------------------------------------------------------------------------- selecting the build


def test_select_builds(multi, tmp_path):
    every = select_builds(multi)
    assert [(b.index, b.dir) for b in every] == [(0, multi / "profiles" / "0"), (1, multi / "profiles" / "1")]
    assert every[1].profile.text() == PROFILES[1]
    assert [b.index for b in select_builds(multi, profile=1)] == [1]
    assert [b.index for b in select_builds(multi, shapes={"input": [4, 3, 32, 32]})] == [1]
    with pytest.raises(NncError, match=r"--profile 2: .* has profiles 0 to 1 \(0: input:1x3x32x32/"):
        select_builds(multi, profile=2)
    with pytest.raises(InputError, match=r"--shapes: 'x' is not a model input; the inputs are \['input'\]"):
        select_builds(multi, shapes={"x": [1, 3, 32, 32]})
    with pytest.raises(NncError, match="give one of them"):
        select_builds(multi, profile=0, shapes={"input": [1, 3, 32, 32]})
    one = multi / "profiles" / "0"  # a single build: itself, profile 0 only, its own shapes
    assert [(b.index, b.dir) for b in select_builds(one, profile=0)] == [(None, one)]
    with pytest.raises(NncError, match="is a single build"):
        select_builds(one, profile=1)
    with pytest.raises(InputError, match=r"input 'input' with shape \[4, 3, 32, 32\] is not the shape .* was "
                                         r"built for \(1x3x32x32\)"):
        select_builds(one, shapes={"input": [4, 3, 32, 32]})


# ---------------------------------------------------------------------------- nnc inspect


def test_inspect_prints_one_section_per_profile(multi, capsys):
    assert main(["inspect", str(multi)]) == 0
    out = capsys.readouterr().out
    titles = _sections(out)
    assert len(titles) == 2
    assert titles[0].endswith(f"profile 0 of 2 ({multi / 'profiles' / '0'}), inputs input:1x3x32x32")
    assert titles[1].endswith(f"profile 1 of 2 ({multi / 'profiles' / '1'}), inputs input:4x3x32x32")
    assert out.count("kernel launches per run") == 2 and out.count("ops fused") == 2
    first, second = out.split(titles[1])
    assert "BN=1 " in first and "BN=4 " in second  # each section is its own build's table (gap_gemm's batch tile)
    assert main(["inspect", str(multi), "--profile", "1"]) == 0
    out = capsys.readouterr().out
    assert _sections(out) == [titles[1]] and out.count("kernel launches per run") == 1
    assert main(["inspect", str(multi), "--profile", "2"]) == 1
    assert "nnc inspect: error: --profile 2: " in capsys.readouterr().err


def test_inspect_of_one_build_is_unchanged(multi, capsys):
    assert main(["inspect", str(multi / "profiles" / "0")]) == 0
    out = capsys.readouterr().out
    assert not _sections(out) and out.startswith("kernel ") and out.count("kernel launches per run") == 1


def test_inspect_plot_writes_one_file_per_profile(multi, tmp_path, capsys):
    from nnc.inspect_cmd import inspect_sections, plot_paths, plot_sections
    sections = inspect_sections(multi)
    assert plot_paths(tmp_path / "k.png", sections) == [tmp_path / "k-0.png", tmp_path / "k-1.png"]
    assert plot_paths(tmp_path / "k.png", inspect_sections(multi, profile=1)) == [tmp_path / "k.png"]
    # no times (untuned, no --time): refused naming the profile, before any file is written
    sections[0].rows[0].tuned_ms = 0.5
    with pytest.raises(NncError, match=r"--plot needs times \(profile 1\): add --time"):
        plot_sections(sections, tmp_path / "k.png", "multi")
    assert not list(tmp_path.glob("k*.png"))
    pytest.importorskip("matplotlib")
    sections[1].rows[0].tuned_ms = 0.25
    assert plot_sections(sections, tmp_path / "k.png", "multi") == [tmp_path / "k-0.png", tmp_path / "k-1.png"]
    assert all(p.stat().st_size > 0 for p in tmp_path.glob("k-*.png"))


@pytest.mark.gpu
def test_inspect_time_measures_each_profile(multi, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["inspect", str(multi), "--time", "--plot", str(tmp_path / "k.png")]) == 0
    out = capsys.readouterr().out
    assert len(_sections(out)) == 2 and out.count("whole run (GPU compute, nnc bench)") == 2
    assert (tmp_path / "k-0.png").stat().st_size > 0 and (tmp_path / "k-1.png").stat().st_size > 0


# ---------------------------------------------------------------------------- nnc bench (reference backend)


BENCH = ["--backend", "reference", "--iterations", "3", "--warmup", "1"]


def _heads(text: str) -> list:
    return [line for line in text.splitlines() if ": reference on CPU, numpy reference, batch " in line]


def test_bench_every_profile_one_block_and_record_each(multi, tmp_path, capsys):
    js = tmp_path / "all.json"
    assert main(["bench", str(multi), *BENCH, "--json", str(js)]) == 0
    heads = _heads(capsys.readouterr().out)
    assert [h.split(": reference")[0] for h in heads] == [f"{multi} profile 0 (input:1x3x32x32)",
                                                          f"{multi} profile 1 (input:4x3x32x32)"]
    assert "batch 1," in heads[0] and "batch 4," in heads[1]
    records = json.loads(js.read_text())
    assert isinstance(records, list) and len(records) == 2
    for i, (r, n) in enumerate(zip(records, (1, 4))):
        assert r["model"] == str(multi) and r["profile"] == i and r["shapes"] == {"input": [n, 3, 32, 32]}
        assert r["batch"] == n and r["iterations"] == 3 and r["latency_ms"]["median"] > 0


@pytest.mark.parametrize("pick", [["--profile", "1"], ["--shapes", "input:4x3x32x32"]])
def test_bench_one_profile(multi, tmp_path, capsys, pick):
    js = tmp_path / "one.json"
    assert main(["bench", str(multi), *BENCH, *pick, "--json", str(js)]) == 0
    heads = _heads(capsys.readouterr().out)
    assert len(heads) == 1 and heads[0].startswith(f"{multi} profile 1 (input:4x3x32x32): ")
    r = json.loads(js.read_text())  # one build: one record, not a list
    assert r["profile"] == 1 and r["shapes"] == {"input": [4, 3, 32, 32]} and r["batch"] == 4


def test_bench_shapes_no_profile_holds(multi, tmp_path, capsys):
    js = tmp_path / "none.json"
    assert main(["bench", str(multi), *BENCH, "--shapes", "input:2x3x32x32", "--json", str(js)]) == 1
    err = capsys.readouterr().err
    assert ("nnc bench: error: --shapes: input 'input' with shape [2, 3, 32, 32] is outside every profile "
            "(profile 0: input shape [2, 3, 32, 32] not in 1x3x32x32; profile 1: input shape [2, 3, 32, 32] "
            "not in 4x3x32x32)") in err
    assert not js.exists()
    assert main(["bench", str(multi), *BENCH, "--shapes", "ids:1x8"]) == 1
    assert "--shapes: 'ids' is not a model input; the inputs are ['input']" in capsys.readouterr().err
    assert main(["bench", str(multi), *BENCH, "--profile", "5"]) == 1
    err = capsys.readouterr().err
    assert "nnc bench: error: --profile 5: " in err and "has profiles 0 to 1" in err
    assert main(["bench", str(multi), *BENCH, "--profile", "0", "--shapes", "input:1x3x32x32"]) == 1
    assert "--profile and --shapes both pick the build: give one of them" in capsys.readouterr().err


def test_bench_one_build_keeps_its_record(multi, tmp_path, capsys):
    one = multi / "profiles" / "0"
    js = tmp_path / "b.json"
    assert main(["bench", str(one), *BENCH, "--json", str(js)]) == 0
    assert _heads(capsys.readouterr().out)[0].startswith(f"{one}: reference on CPU")
    r = json.loads(js.read_text())
    assert r["profile"] is None and r["shapes"] == {"input": [1, 3, 32, 32]}
    assert main(["bench", str(one), *BENCH, "--shapes", "input:4x3x32x32"]) == 1
    assert "is not the shape" in capsys.readouterr().err


def test_bench_without_a_gpu_on_a_profile_directory(multi, capsys):
    from nnc.codegen.target import gpu_present
    if gpu_present():
        pytest.skip("a GPU is present")
    assert main(["bench", str(multi), "--iterations", "2", "--warmup", "0"]) == 1
    err = capsys.readouterr().err
    assert "nnc bench: error: no CUDA GPU is available" in err and "--backend reference" in err


def test_bench_scenario_needs_one_build(multi, capsys):
    assert main(["bench", str(multi), "--scenario", "single-stream", "--backend", "reference"]) == 1
    assert "has 2 builds, one per --profile: LoadGen runs one of them; pick it with --profile I" \
        in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_bench_every_profile(multi, tmp_path, capsys):
    js = tmp_path / "gpu.json"
    assert main(["bench", str(multi), "--iterations", "20", "--warmup", "5", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert out.count("GPU compute") == 2 and f"{multi} profile 1 (input:4x3x32x32): cuda on " in out
    records = json.loads(js.read_text())
    assert [r["profile"] for r in records] == [0, 1] and all(r["gpu_compute_ms"]["median"] > 0 for r in records)
