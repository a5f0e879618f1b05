"""CPU-only progress meter for the CUDA backend over the ONNX node suite.

For every case of tests.conformance.node_suite.load_cases(): import the model, lower it and
NVRTC-compile it for sm_90 (nnc.codegen.emit.compile_to_dir into a temp dir), and classify

    ok | no-lowering(<op>) | lowering(<op>) | compile-error | import | other

Prints counts per class and per op, and a total.

    python tools/node_suite_compile.py [--jobs 2] [--filter test_add ...] [--tsv out.tsv] [-v]
"""
from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_NO_LOWER = re.compile(r"no CUDA lowering for op '([^']+)'")


def _ops(model) -> list[str]:
    return sorted({n.op_type for n in model.graph.node})


def classify_case(tc) -> tuple[str, str, str]:
    """-> (class, op, detail)."""
    warnings.simplefilter("ignore")
    from nnc.codegen.emit import compile_to_dir
    from nnc.ir.errors import ImportError_
    from nnc.onnx_import import import_model
    from nnc.pipeline import run_passes
    ops = _ops(tc.model)
    op = ops[0] if len(ops) == 1 else "+".join(ops)
    try:
        mod = import_model(tc.model)
    except ImportError_ as e:
        return "import", op, str(e).splitlines()[0][:200]
    except Exception as e:  # noqa: BLE001
        return "import", op, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    d = tempfile.mkdtemp(prefix="nnc_nsc_")
    try:
        run_passes(mod)  # as the CUDA backend does (control flow is flattened there)
        compile_to_dir(mod, d, arch="sm_90")
        return "ok", op, ""
    except Exception as e:  # noqa: BLE001
        msg = str(e)
        m = _NO_LOWER.search(msg)
        if m:
            return "no-lowering", m.group(1), msg.splitlines()[0][:200]
        if "NVRTC" in msg or "nvrtc" in msg.lower() and "error" in msg.lower():
            errs = [l for l in msg.splitlines() if "error" in l][:2]
            return "compile-error", op, " | ".join(errs)[:300] or msg.splitlines()[0][:200]
        if type(e).__name__ == "LoweringError":
            return "lowering", op, msg.splitlines()[0][:200]
        return "other", op, f"{type(e).__name__}: {msg.splitlines()[0][:200] if msg else ''}"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _worker(names):
    warnings.simplefilter("ignore")
    from tests.conformance.node_suite import load_cases
    cases = {c.name: c for c in load_cases(names)}
    out = []
    for n in names:
        tc = cases.get(n)
        if tc is None:
            continue
        try:
            cls, op, det = classify_case(tc)
        except Exception as e:  # noqa: BLE001  (a worker must never die on one case)
            cls, op, det = "other", "?", f"{type(e).__name__}: {e}"
        out.append((n, cls, op, det.replace("\t", " ").replace("\n", " ")))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--filter", nargs="*", default=())
    ap.add_argument("--tsv", default=None, help="write case\\tclass\\top\\tdetail rows here")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every non-ok case")
    args = ap.parse_args(argv)
    from tests.conformance.node_suite import load_cases
    names = [c.name for c in load_cases(tuple(args.filter))]
    nchunks = max(1, args.jobs * 8)
    chunks = [c for c in (names[i::nchunks] for i in range(nchunks)) if c]
    results = []
    if args.jobs <= 1:
        for c in chunks:
            results += _worker(c)
    else:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for r in pool.imap_unordered(_worker, chunks):
                results += r
                print(f"  {len(results)}/{len(names)}", file=sys.stderr, flush=True)
    results.sort()
    by_class = collections.Counter(r[1] for r in results)
    by_op = collections.defaultdict(collections.Counter)
    for n, cls, op, det in results:
        by_op[cls][op] += 1
    if args.tsv:
        Path(args.tsv).write_text("".join("\t".join(r) + "\n" for r in results))
    if args.verbose:
        for n, cls, op, det in results:
            if cls != "ok":
                print(f"{cls:14s} {n}: {det}")
    for cls in sorted(by_op, key=lambda c: (c == "ok", c)):
        if cls == "ok":
            continue
        ops = ", ".join(f"{o}:{k}" for o, k in by_op[cls].most_common())
        print(f"{cls} ({by_class[cls]}): {ops}")
    print("total: " + ", ".join(f"{c}={k}" for c, k in by_class.most_common()) + f"  (cases={len(results)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
