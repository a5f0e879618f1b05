"""Regenerates node_xfail.txt from a node-suite run, keeping hand-written reasons.

    python -m tests.conformance.make_xfail        # runs the suite on CPU, rewrites the list

A case keeps its existing reason if it still fails; new failures get a reason derived from the
failure class (edit them by hand when the derived one is not specific enough).
"""
from __future__ import annotations

import re

from .node_suite import load_cases, run_case
from .test_node_suite import XFAIL_FILE, load_xfail

RULES = [
    (r"ai\.onnx\.preview\.training", "training-only op (ai.onnx.preview.training): out of scope"),
    (r"ai\.onnx\.preview'", "preview-domain op (ai.onnx.preview) not supported yet"),
    (r"sequence_type|optional_type|SequenceConstruct|SplitToSequence|Optional(Has|Get)Element|SequenceEmpty",
     "sequence/optional types: out of scope"),
    (r"element type 8\b", "string tensors: out of scope"),
    (r"ImageDecoder", "image decoding: out of scope"),
    (r"RandomUniformLike|Bernoulli|RandomNormal", "random op: values cannot match a stored reference"),
    (r"TfIdfVectorizer", "text op (TfIdfVectorizer): out of scope"),
]


def derive(detail: str) -> str:
    for pat, reason in RULES:
        if re.search(pat, detail):
            return reason
    return detail[:160]


def main():
    old = load_xfail(active_only=False) if XFAIL_FILE.exists() else {}
    lines = ["# ONNX node-suite cases expected to fail on the reference interpreter, one per line:",
             "# case<TAB>reason. Regenerate: python -m tests.conformance.make_xfail"]
    n = 0
    for tc in load_cases():
        status, detail = run_case(tc)
        if status != "ok":
            lines.append(f"{tc.name}\t{old.get(tc.name) or derive(status + ': ' + detail)}")
            n += 1
    XFAIL_FILE.write_text("\n".join(lines) + "\n")
    print(f"{n} expected failures written to {XFAIL_FILE}")


if __name__ == "__main__":
    main()
