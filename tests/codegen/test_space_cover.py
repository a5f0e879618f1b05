"""tests/codegen/space_cover.py: the covering subset holds every case, every parameter value
(pairs at strength 2) and every line of code, is the same on every call, merges points that
render one kernel, and NNC_FULL_SPACE=1 gives every point back."""
from dataclasses import dataclass, field

from . import space_cover as C

SPACE = [{"BM": bm, "CW": cw, "SCHED": "pingpong"} if cw == 2 and bm == 64 else {"BM": bm, "CW": cw}
         for bm in (64, 128, 256) for cw in (1, 2)]


@dataclass
class _Spec:
    name: str
    params: dict = field(default_factory=dict)
    source: str = ""


def _values(points, key):
    return {repr(p.get(key, C.DEFAULT)) for _, p in points}


def test_every_case_and_value_is_kept_and_the_choice_is_fixed(monkeypatch):
    monkeypatch.delenv(C.FULL_SPACE_ENV, raising=False)
    labelled = [(case, p) for case in ("f16", "bf16") for p in SPACE]
    got = C.cover_points(labelled)
    assert len(got) < len(labelled) and got == C.cover_points(labelled)
    assert {c for c, _ in got} == {"f16", "bf16"}
    for key in ("BM", "CW", "SCHED"):  # SCHED: "pingpong" and the left-out default
        assert _values(got, key) == _values(labelled, key)


def test_strength_two_keeps_every_pair():
    labelled = [("", p) for p in SPACE]
    got = C.cover_points(labelled, strength=2)
    pairs = {(p["BM"], p["CW"]) for _, p in got}
    assert pairs == {(p["BM"], p["CW"]) for p in SPACE}


def test_full_space_returns_everything(monkeypatch):
    monkeypatch.setenv(C.FULL_SPACE_ENV, "1")
    labelled = [("", p) for p in SPACE]
    assert C.cover_points(labelled) == labelled
    specs = [("", _Spec(f"k{i}", p)) for i, p in enumerate(SPACE)]
    assert [s.name for s in C.to_compile(specs)] == [f"k{i}" for i in range(len(SPACE))]


def test_points_of_one_kernel_count_once_with_all_their_features(monkeypatch):
    monkeypatch.delenv(C.FULL_SPACE_ENV, raising=False)
    # "a" is rendered from two points (the second names the default explicitly): one kernel that
    # covers both PERSIST values, so "b" (PERSIST=True) is not needed
    specs = [("", _Spec("a", {"BM": 64})), ("", _Spec("a", {"BM": 64, "PERSIST": True})),
             ("", _Spec("b", {"BM": 64, "PERSIST": True}))]
    assert [s.name for s in C.to_compile(specs)] == ["a"]


def test_a_line_of_code_only_one_point_has_is_compiled(monkeypatch):
    monkeypatch.delenv(C.FULL_SPACE_ENV, raising=False)
    # the same parameter values twice; only "c" emits the guarded load (numbers and names blanked:
    # "a" and "b" differ in numbers only and count as one shape of code)
    specs = [("", _Spec("a", {"BM": 64}, "x = ld(p + 16); // tile 64")),
             ("", _Spec("b", {"BM": 64}, "x = ld(p + 32); // tile 128")),
             ("", _Spec("c", {"BM": 64}, "x = ok ? ld(p + 32) : 0;"))]
    assert [s.name for s in C.to_compile(specs)] == ["a", "c"]
