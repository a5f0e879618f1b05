"""Regenerates generated/: nnc's output for the small reference models in examples/, so that
reviewers see every code-generation change as a diff of real CUDA.

    python tools/regen_generated.py            # rewrite generated/
    python tools/regen_generated.py --check    # exit 1 if generated/ is stale (tests run this)

Text files only (model.cu, nnc_model.h, CMakeLists.txt, nnc_run_example.cpp, plan.json,
final.nnir); cubin and weights are binary and rebuilt by `nnc compile` (their sha256 sit in
plan.json; a cubin's depends on the NVRTC build, so generated/ shows a placeholder for it).
Compiled for sm_90 at fp32 (and the CNN at fp16 too), whatever GPU is present.
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "generated"
# name -> (model file, --shapes, precision)
MODELS = {
    "tiny_cnn": ("examples/tiny_cnn.onnx", "input:1x3x32x32", "fp32"),
    "tiny_cnn_fp16": ("examples/tiny_cnn.onnx", "input:1x3x32x32", "fp16"),
    "tiny_transformer": ("examples/tiny_transformer.onnx", "", "fp32"),
    "tiny_lstm": ("examples/tiny_lstm.onnx", "", "fp32"),
}
TEXT_FILES = ["model.cu", "nnc_model.h", "CMakeLists.txt", "nnc_run_example.cpp", "plan.json", "ir/final.nnir"]


def build(name: str, out: Path) -> dict[str, str]:
    from nnc.driver import compile_model
    model, shapes, precision = MODELS[name]
    compile_model(str(ROOT / model), out, shapes=shapes, arch="sm_90", precision=precision)
    files = {f: (out / f).read_text() for f in TEXT_FILES}
    files["plan.json"] = _compiler_independent(files["plan.json"])
    return files


def _compiler_independent(plan_text: str) -> str:
    """plan.json with each cubin's sha256 (which another NVRTC patch release changes) replaced."""
    plan = json.loads(plan_text)
    for c in plan.get("cubins", []):
        c["sha256"] = "(depends on the NVRTC build)"
    return json.dumps(plan, indent=1) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 when stale")
    ap.add_argument("names", nargs="*", default=list(MODELS))
    args = ap.parse_args(argv)
    stale = []
    for name in args.names:
        with tempfile.TemporaryDirectory() as tmp:
            files = build(name, Path(tmp) / name)
        for f, text in files.items():
            dst = GENERATED / name / Path(f).name
            if args.check:
                old = dst.read_text() if dst.exists() else ""
                if old != text:
                    diff = "".join(list(difflib.unified_diff(old.splitlines(True), text.splitlines(True),
                                                             str(dst), "regenerated", n=1))[:40])
                    stale.append(f"{dst.relative_to(ROOT)}\n{diff}")
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_text(text)
        if not args.check:
            print(f"generated/{name}: {', '.join(Path(f).name for f in files)}")
    if stale:
        print("generated/ is stale; run: python tools/regen_generated.py\n" + "\n".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
