"""Tampered output directories: plan.json edits, truncated or edited ir/final.* files, fed to
`nnc run --backend reference` (CPU only). Each must run or fail with an NncError; the command
itself is called below main(), so an escaping exception of another type is seen as such."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
from onnx import helper as h, numpy_helper as nh

from .harness import Tally

N_CASES = 60
SEED = 8


def _build(tmp_path):
    from nnc.driver import compile_model
    r = np.random.default_rng(0)
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["m"], name="mm"), h.make_node("Tanh", ["m"], ["y"], name="t")],
                     "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 16])],
                     [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                     [nh.from_array(r.standard_normal((16, 16)).astype(np.float32), "w")])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), tmp_path / "m.onnx")
    compile_model(tmp_path / "m.onnx", tmp_path / "good", codegen=False)
    return tmp_path / "good"


_JUNK = [None, -1, 0, 2 ** 40, "x", "../../etc/passwd", [], {}, [1, "N"], True, 1.5]


def _mutate_json(obj, rng):
    """Replaces, deletes or retypes one random field somewhere in a JSON tree."""
    paths = []
    stack = [(obj, ())]
    while stack:
        o, p = stack.pop()
        if isinstance(o, dict):
            for k, v in o.items():
                paths.append(p + (k,))
                stack.append((v, p + (k,)))
        elif isinstance(o, list):
            for i, v in enumerate(o):
                paths.append(p + (i,))
                stack.append((v, p + (i,)))
    path = paths[int(rng.integers(len(paths)))]
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if rng.random() < 0.25:
        del parent[path[-1]]
    else:
        parent[path[-1]] = _JUNK[int(rng.integers(len(_JUNK)))]
    return obj


def _tamper(d, rng) -> str:
    kind = rng.choice(["plan", "plan", "truncate", "flip", "index", "nnir"])
    if kind == "plan":
        p = d / "plan.json"
        p.write_text(json.dumps(_mutate_json(json.loads(p.read_text()), rng)))
    elif kind in ("truncate", "flip"):
        p = d / "ir" / str(rng.choice(["final.weights.bin", "final.nnir", "final.weights.json"]))
        b = bytearray(p.read_bytes())
        if kind == "truncate":
            b = b[:int(rng.integers(len(b) + 1))]
        elif b:
            b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
        p.write_bytes(bytes(b))
    elif kind == "index":
        p = d / "ir" / "final.weights.json"
        p.write_text(json.dumps(_mutate_json(json.loads(p.read_text()), rng)))
    else:
        p = d / "ir" / "final.nnir"
        t = p.read_text()
        i = int(rng.integers(len(t)))
        p.write_text(t[:i] + t[i + 1:])
    return kind


def _run(d, seed):
    from nnc.cli import build_parser, cmd_run
    args = build_parser().parse_args(["run", str(d), "--seed", str(seed)])
    rc = cmd_run(args)
    assert rc in (0, 3), rc


def test_fuzz_outdir(tmp_path, capsys):
    good = _build(tmp_path)
    rng = np.random.default_rng(SEED)
    tally = Tally()
    for k in range(N_CASES):
        d = tmp_path / f"case{k}"
        shutil.copytree(good, d)
        kind = _tamper(d, rng)
        tally.record(f"case {k}: {kind}", lambda: _run(d, k))
        shutil.rmtree(d)
    capsys.readouterr()
    with capsys.disabled():
        print(tally.report().splitlines()[0])
    assert not tally.findings, tally.report()
    assert tally.clean_errors
