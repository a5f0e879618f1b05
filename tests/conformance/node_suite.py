"""Runs onnx's node test cases through nnc.onnx_backend and classifies each.

    python -m tests.conformance.node_suite [SUBSTRING ...] [--device CPU] [--show-fail]

Prints one line per case that is not ok, then the pass count. The pytest wrapper
(test_node_suite.py) checks the result against node_xfail.txt.
"""
from __future__ import annotations

import sys
import time
import warnings

import numpy as np


def load_cases(patterns=()):
    from onnx.backend.test.case import node
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = node.collect_testcases("")
    if patterns:
        cases = [c for c in cases if any(p in c.name for p in patterns)]
    return sorted(cases, key=lambda c: c.name)


def run_case(tc, device: str = "CPU") -> tuple[str, str]:
    """('ok', '') or (failure class, detail)."""
    from nnc.onnx_backend import NncBackend
    from nnc.ir.errors import ImportError_, NncError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = NncBackend.prepare(tc.model, device)
    except ImportError_ as e:
        return "import", str(e).splitlines()[0]
    except NncError as e:
        return "prepare", str(e).splitlines()[0]
    except Exception as e:
        return "crash", f"prepare: {type(e).__name__}: {e}"
    for inputs, expected in tc.data_sets:
        inputs, expected = _arrays(inputs), _arrays(expected)  # exotic dtypes come as TensorProto
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                got = rep.run(inputs)
        except NncError as e:
            return "run", str(e).splitlines()[0]
        except Exception as e:
            return "crash", f"run: {type(e).__name__}: {e}"
        if len(got) != len(expected):
            return "mismatch", f"{len(got)} outputs, expected {len(expected)}"
        for i, (g, e) in enumerate(zip(got, expected)):
            msg = compare(g, e, tc.rtol, tc.atol)
            if msg:
                return "mismatch", f"output {i}: {msg}"
    # CUDA: say when the shapes needed value specialisation (see NncRep._cuda_run), and when the
    # model folded to constants so that no kernel ran at all
    if getattr(rep, "last_kernel_launches", None) == 0:
        return "ok", "no kernel ran"
    return "ok", "specialized" if getattr(rep, "specialized", False) else ""


def _arrays(xs):
    import onnx
    from onnx import numpy_helper
    return [numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else x for x in xs]


def compare(got, exp, rtol, atol) -> str:
    exp = np.asarray(exp)
    got = np.asarray(got)
    if exp.dtype == object or got.dtype == object:
        return "object dtype"
    if got.dtype != exp.dtype:
        return f"dtype {got.dtype}, expected {exp.dtype}"
    if got.shape != exp.shape:
        return f"shape {got.shape}, expected {exp.shape}"
    if exp.dtype.kind in "fc" or exp.dtype.name.startswith(("bfloat", "float")):
        g = got.astype(np.float64) if exp.dtype.kind != "c" else got
        e = exp.astype(np.float64) if exp.dtype.kind != "c" else exp
        ok = np.isclose(g, e, rtol=rtol, atol=atol, equal_nan=True)
        if not ok.all():
            bad = np.argwhere(~ok)[0]
            return f"values differ ({(~ok).sum()} of {ok.size}), first at {tuple(bad)}: {g[tuple(bad)]} vs {e[tuple(bad)]}"
        return ""
    if not np.array_equal(got, exp):
        return f"values differ ({(got != exp).sum()} of {exp.size})"
    return ""


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    device = "CPU"
    if "--device" in argv:
        i = argv.index("--device")
        device = argv[i + 1]
        del argv[i:i + 2]
    show_ok = "--show-ok" in argv
    argv = [a for a in argv if not a.startswith("--")]
    cases = load_cases(argv)
    t0 = time.time()
    n_ok = 0
    for tc in cases:
        status, detail = run_case(tc, device)
        n_ok += status == "ok"
        if status != "ok" or show_ok:
            print(f"{tc.name}\t{status}\t{detail[:300]}")
    print(f"# {n_ok}/{len(cases)} passed on {device} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
