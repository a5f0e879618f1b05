"""ONNX's node test cases through nnc.onnx_backend (device CPU = the reference interpreter).

Every case not listed in node_xfail.txt must pass; a listed case that passes fails the test too,
so the list stays honest. The pass count is printed (pytest -s, or the summary line with -rA).
"""
import re
from pathlib import Path


from .node_suite import load_cases, run_case

XFAIL_FILE = Path(__file__).parent / "node_xfail.txt"


_SINCE = re.compile(r"([A-Za-z_][\w-]*)>=(\d+(?:\.\d+)*):\s*")


def _version(text: str) -> tuple:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def load_xfail(active_only: bool = True) -> dict[str, str]:
    """case -> reason. A reason starting `PACKAGE>=X.Y: ` applies only with that version of the
    package or newer installed (onnx builds a case's expected output when the suite is collected,
    with the installed ml_dtypes); with active_only those entries are dropped below it."""
    from importlib.metadata import version
    out = {}
    for line in XFAIL_FILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, reason = line.partition("\t")
        assert reason.strip(), f"node_xfail.txt: {name} has no reason"
        since = _SINCE.match(reason.strip())
        if active_only and since and _version(version(since.group(1))) < _version(since.group(2)):
            continue
        out[name] = reason.strip()
    return out


def test_node_suite(capsys):
    from rich.progress import Progress  # progress bar: the suite takes a minute or two
    xfail = load_xfail()
    cases = load_cases()
    names = {c.name for c in cases}
    stale = sorted(set(load_xfail(active_only=False)) - names)
    assert not stale, f"node_xfail.txt lists unknown cases: {stale[:10]}"
    unexpected_fail, unexpected_pass, n_ok = [], [], 0
    with Progress(transient=True) as bar:
        task = bar.add_task("ONNX node suite", total=len(cases))
        for tc in cases:
            status, detail = run_case(tc)
            bar.advance(task)
            if status == "ok":
                n_ok += 1
                if tc.name in xfail:
                    unexpected_pass.append(tc.name)
            elif tc.name not in xfail:
                unexpected_fail.append(f"{tc.name}: {status}: {detail[:200]}")
    with capsys.disabled():
        print(f"\nONNX node suite (reference interpreter): {n_ok}/{len(cases)} passed, "
              f"{len(xfail)} expected failures")
    assert not unexpected_fail, "\n".join(unexpected_fail[:50])
    assert not unexpected_pass, f"now passing, remove from node_xfail.txt: {unexpected_pass}"
