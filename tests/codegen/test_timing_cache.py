"""The timing cache (codegen/timing_cache.py) with the stand-in runner: written by one compile and
read by the next (nothing timed again, the same choices), merged, and a corrupt, stale or foreign
file detected with a warning and rebuilt, never trusted."""
import json

import pytest

from nnc.codegen import timing_cache as tc
from nnc.codegen import tuning
from nnc.ir.errors import NncError

from .test_tuning import _opts, _selected, _tiny_cnn


class Counting(tuning.StandInRunner):
    def __init__(self, device=None, **kw):
        super().__init__(**kw)
        self.runs = 0
        self._device = device

    def device(self):
        return dict(super().device(), **(self._device or {}))

    def run(self, cap, seed, gate=None, cutoff=None):
        self.runs += 1
        return super().run(cap, seed, gate, cutoff)


def _tune(path, runner=None):
    runner = runner or Counting()
    plan = tuning.lower_tuned(_tiny_cnn(), _opts(timing_cache=str(path)), runner)
    return plan, runner


def test_written_then_reused(tmp_path):
    path = tmp_path / "tc.json"
    plan1, r1 = _tune(path)
    assert r1.runs > 0 and path.exists()
    doc = json.loads(path.read_text())
    assert doc["header"]["schema"] == tc.SCHEMA and doc["header"]["gpu"] == "stand-in"
    assert {"nnc", "sm", "cuda_runtime", "cuda_driver", "nvrtc"} <= set(doc["header"])
    assert doc["checksum"] == tc.checksum(doc["header"], doc["entries"])
    # every problem tuned (also ones a later choice made disappear: a group lowered op by op)
    assert len(doc["entries"]) >= plan1.tuning["tuned"] > 0
    e = next(iter(doc["entries"].values()))
    assert {"variant", "params", "time_ms", "heuristic", "space"} <= set(e)
    plan2, r2 = _tune(path)
    assert r2.runs == 0 and r2.prepared == 0  # nothing compiled or timed again
    assert plan2.tuning["cache_hits"] == plan1.tuning["tuned"] and plan2.tuning["tuned"] == 0
    assert plan2.tuning["timing_cache"]["state"] == "loaded"
    assert _selected(plan2) == _selected(plan1)
    recs = [l.tuning for l in plan2.launches if getattr(l, "tuning", None)]
    assert recs and all(r["source"] == "cache" for r in recs if r["source"] != "heuristic")


def test_an_entry_over_another_candidate_set_is_tuned_again(tmp_path):
    path = tmp_path / "tc.json"
    _tune(path)
    doc = json.loads(path.read_text())
    for e in doc["entries"].values():
        e["space"] = "0" * 16  # as if tuned before a new variant or tile existed
    doc["checksum"] = tc.checksum(doc["header"], doc["entries"])
    path.write_text(json.dumps(doc))
    plan, r = _tune(path)
    assert plan.tuning["cache_hits"] == 0 and r.runs > 0


@pytest.mark.parametrize("damage, state", [
    (lambda p: p.write_text("{not json"), "corrupt"),
    (lambda p: p.write_text(p.read_text()[:-40]), "corrupt"),
    (lambda p: _edit(p, lambda d: d["entries"].update({"k": {"variant": "x", "params": {}}}), fix=False), "corrupt"),
    (lambda p: _edit(p, lambda d: d["header"].update(schema=99)), "corrupt"),
    (lambda p: _edit(p, lambda d: d["header"].update(nnc="0.0.1")), "stale"),
    (lambda p: _edit(p, lambda d: d["header"].update(cuda_driver=11000)), "stale"),
    (lambda p: _edit(p, lambda d: d["header"].update(gpu="NVIDIA A100-SXM4-80GB", sm="sm_80")), "foreign"),
])
def test_bad_caches_are_detected_and_rebuilt(tmp_path, damage, state):
    path = tmp_path / "tc.json"
    plan1, _ = _tune(path)
    n_entries = len(json.loads(path.read_text())["entries"])
    damage(path)
    with pytest.warns(tc.TimingCacheWarning, match=f"{state}"):
        plan2, r = _tune(path)
    assert r.runs > 0 and plan2.tuning["cache_hits"] == 0  # not trusted: tuned again
    assert plan2.tuning["timing_cache"]["state"] == state
    assert _selected(plan2) == _selected(plan1)
    doc = json.loads(path.read_text())  # rebuilt: valid for this device again
    assert tc.check(path, doc["header"])[0] == "loaded" and doc["header"]["gpu"] == "stand-in"
    assert len(doc["entries"]) == n_entries


def _edit(p, fn, fix=True):
    d = json.loads(p.read_text())
    fn(d)
    if fix:
        d["checksum"] = tc.checksum(d["header"], d["entries"])
    p.write_text(json.dumps(d))


def test_merge(tmp_path):
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    _tune(a)
    doc = json.loads(a.read_text())
    keys = sorted(doc["entries"])
    assert len(keys) >= 2
    # b: one entry faster, one new, the rest dropped
    fast = dict(doc["entries"][keys[0]], time_ms=1e-9, variant="faster")
    entries_b = {keys[0]: fast, "new-problem": {"variant": "v", "params": {"x": 1}, "time_ms": 1.0}}
    b.write_text(json.dumps({"header": doc["header"], "entries": entries_b,
                             "checksum": tc.checksum(doc["header"], entries_b)}))
    from nnc.cli import main
    assert main(["timing-cache", "merge", str(a), str(b), "-o", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["checksum"] == tc.checksum(m["header"], m["entries"])
    assert set(m["entries"]) == set(keys) | {"new-problem"}
    assert m["entries"][keys[0]]["variant"] == "faster"
    assert m["entries"][keys[1]] == doc["entries"][keys[1]]
    # another GPU or a corrupt input: an error naming the file, nothing written
    _edit(b, lambda d: d["header"].update(gpu="other"))
    with pytest.raises(NncError, match="b.json: gpu"):
        tc.merge([a, b], tmp_path / "d.json")
    b.write_text("garbage")
    with pytest.raises(NncError, match="b.json: corrupt"):
        tc.merge([a, b], tmp_path / "d.json")
    assert not (tmp_path / "d.json").exists()
    assert main(["timing-cache", "merge", str(a), str(b), "-o", str(tmp_path / "d.json")]) == 1


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "tc.json"
    _tune(path)
    before = path.read_text()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(tc.os, "replace", boom)
    c = tc.TimingCache({"gpu": "stand-in", "sm": "sm_90"})
    with pytest.raises(OSError):
        c.save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["tc.json"]  # no temporary left behind


def test_a_cache_entry_outside_the_declared_space_is_not_used(tmp_path):
    # a cache file is input: params that no variant declares never reach a template
    path = tmp_path / "tc.json"
    plan1, _ = _tune(path)
    doc = json.loads(path.read_text())
    for e in doc["entries"].values():
        e["params"] = {**e["params"], "BM": "1; } __global__ void evil() {"}
    doc["checksum"] = tc.checksum(doc["header"], doc["entries"])
    path.write_text(json.dumps(doc))
    plan2, r = _tune(path)
    assert r.runs > 0 and plan2.tuning["cache_hits"] == 0  # tuned again instead
    assert all("evil" not in k.body for k in plan2.kernels.values())
    assert _selected(plan2) == _selected(plan1)


def test_an_unwritable_cache_warns_and_the_build_goes_on(tmp_path):
    d = tmp_path / "a_dir"
    d.mkdir()  # --timing-cache naming a directory: unreadable (corrupt) and unwritable
    with pytest.warns(tc.TimingCacheWarning) as got:
        plan, r = _tune(d)
    msgs = " ".join(str(w.message) for w in got)
    assert "corrupt" in msgs and "cannot write" in msgs
    assert plan.tuning["tuned"] > 0 and "write_error" in plan.tuning["timing_cache"]
