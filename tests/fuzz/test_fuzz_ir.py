"""Mutated IR text: token deletions, duplications, replacements and swaps on the golden pass
tests' inputs and on the printed IR of examples/*.onnx (with their weights). Fixed seed, a
bounded number per run; each mutant must parse -> verify -> passes -> interpret cleanly or fail
with an NncError."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .harness import Tally, check_module

ROOT = Path(__file__).resolve().parents[2]
N_CASES = 200
SEED = 7
_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|%[A-Za-z0-9_.$/\-]+|@?[A-Za-z_][A-Za-z0-9_.]*|-?\d+(?:\.\d*)?(?:e[+-]?\d+)?|\S')
_EXTRA = ["(", ")", "{", "}", "[", "]", ",", ":", "=", "?", "*", "-", "region", "none", "-1", "0",
          "99999999999", "f16", "i64", "%undefined", '"\\u0000"', "return", "N", "loc"]


def seeds() -> list[tuple[str, object]]:
    """(IR text, weights or None)."""
    out = []
    for p in sorted((ROOT / "tests" / "passes" / "golden").glob("*.nnir")):
        for case in p.read_text().split("// -----"):
            src = case.split("// CHECK:")[0]
            src = "\n".join(line for line in src.splitlines() if not line.startswith("// RUN"))
            if "func" in src:
                out.append((src, None))
    from nnc.ir.printer import print_module
    from nnc.onnx_import import import_model
    for p in sorted((ROOT / "examples").glob("*.onnx")):
        m = import_model(p)
        out.append((print_module(m), m.weights))
    return out


def _cls(tok: str) -> str:
    """Token class, so that most replacements keep the text parseable and reach the verifier."""
    if tok.startswith("%"):
        return "value"
    if tok[:1].isdigit() or (tok[:1] == "-" and tok[1:2].isdigit()):
        return "number"
    if tok[:1].isalpha() or tok[:1] == "_":
        return "ident"
    return tok


def mutate(text: str, rng) -> str:
    toks = [(m.start(), m.end()) for m in _TOKEN.finditer(text)]
    pieces = [text[a:b] for a, b in toks]
    gaps = [text[b:a] for (_, b), (a, _) in zip(toks, toks[1:])] + [""]
    by_cls: dict = {}
    for p in pieces + _EXTRA:
        by_cls.setdefault(_cls(p), []).append(p)
    for _ in range(int(rng.integers(1, 3))):
        i = int(rng.integers(len(pieces)))
        kind = rng.choice([0, 1, 2, 3, 4, 4, 4, 4])
        if kind == 4 and pieces[i]:  # same-class replacement: dims, names, op names, dtypes
            pool = by_cls.get(_cls(pieces[i]), pieces)
            pieces[i] = str(pool[int(rng.integers(len(pool)))])
        elif kind == 0:
            pieces[i] = ""
        elif kind == 1:
            pieces[i] = pieces[i] + " " + pieces[i]
        elif kind == 2:
            pool = pieces if rng.random() < 0.7 else _EXTRA
            pieces[i] = str(pool[int(rng.integers(len(pool)))])
        else:
            j = int(rng.integers(len(pieces)))
            pieces[i], pieces[j] = pieces[j], pieces[i]
    return text[:toks[0][0]] + "".join(p + g for p, g in zip(pieces, gaps))


def run_ir_case(text: str, weights, rng) -> None:
    from nnc.ir.parser import parse
    from nnc.ir.weights import WeightStore
    m = parse(text, "mutant.nnir")
    m.weights = WeightStore(dict(weights.arrays)) if weights is not None else WeightStore()
    check_module(m, rng)


def test_fuzz_ir():
    rng = np.random.default_rng(SEED)
    base = seeds()
    tally = Tally()
    for k in range(N_CASES):
        text, w = base[k % len(base)]
        mutant = mutate(text, rng)
        case_rng = np.random.default_rng(k)
        tally.record(f"case {k} (seed {k % len(base)}):\n{mutant[:2000]}", lambda: run_ir_case(mutant, w, case_rng))
    print(tally.report().splitlines()[0])
    assert not tally.findings, tally.report()
    assert tally.clean_errors and tally.results


def test_unmutated_seeds_all_run():
    """The seeds themselves are valid (so the mutants start from real IR)."""
    rng = np.random.default_rng(0)
    for text, w in seeds():
        run_ir_case(text, w, rng)
