"""The arena planner (codegen/memory.py): no two buffers live at the same time share a byte,
checked by an independent brute-force oracle on random interval sets and on the plans of the
example models; greedy placement gives exactly the offsets of the former all-pairs first-fit
(so no arena grew); the overlap checker catches overlaps; views and dynamic buffers behave as
before; a long chain lowers. Timings live in tools/bench_compile_scale.py, not here."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from nnc.codegen import memory
from nnc.codegen.lower import lower
from nnc.codegen.plan import Buffer
from nnc.codegen.memory import ArenaOverlapError, Interval, align, check_placement, peak_live, place
from nnc.onnx_import import import_model, parse_shapes
from nnc.pipeline import run_passes

from .cuda_models import models

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = [("tiny_cnn.onnx", "input:1x3x32x32"), ("tiny_transformer.onnx", ""), ("tiny_lstm.onnx", "")]


def brute_overlaps(iv, offsets):
    """Every pair live together whose byte ranges intersect (the O(n^2) oracle)."""
    bad = []
    for i in range(len(iv)):
        for j in range(i + 1, len(iv)):
            a, b = iv[i], iv[j]
            if a.first <= b.last and b.first <= a.last:
                if offsets[i] < offsets[j] + b.size and offsets[j] < offsets[i] + a.size:
                    bad.append((i, j))
    return bad


def old_first_fit(iv):
    """The planner as it was before codegen/memory.py (all placed buffers compared per buffer)."""
    placed, offsets = [], [0] * len(iv)
    for i in sorted(range(len(iv)), key=lambda i: (-iv[i].order_bytes, iv[i].first)):
        size = iv[i].size
        conflicts = sorted((o, s) for o, s, f0, l0 in placed if not (l0 < iv[i].first or iv[i].last < f0))
        off = 0
        for o, s in conflicts:
            if off + size <= o:
                break
            off = max(off, o + s)
        offsets[i] = off
        placed.append((off, size, iv[i].first, iv[i].last))
    return offsets


def random_intervals(rng, n, horizon, max_len):
    out = []
    for _ in range(n):
        f = rng.randrange(horizon)
        nbytes = rng.choice([1, 100, 256, 1000, 4096, rng.randrange(1, 20000)])
        out.append(Interval(f, min(horizon - 1, f + rng.randrange(max_len)), align(nbytes), nbytes))
    return out


def arena(iv, offsets):
    return max((o + x.size for o, x in zip(offsets, iv)), default=0)


@pytest.mark.parametrize("seed", range(40))
def test_random_placements_never_overlap(seed):
    rng = random.Random(seed)
    iv = random_intervals(rng, rng.randrange(1, 160), rng.randrange(1, 80), rng.choice([1, 3, 10, 80]))
    offsets, method = place(iv)
    assert method.removesuffix("+repair") in [m for m, _ in memory.GREEDY_METHODS]
    assert brute_overlaps(iv, offsets) == []
    check_placement(iv, offsets)
    old = old_first_fit(iv)
    assert memory.place_greedy(iv, memory.live_pairs(iv), "size") == old  # the former placement, still tried first
    assert arena(iv, offsets) <= arena(iv, old)  # no arena grew
    if method != "greedy-by-size":  # another order won only by being strictly smaller
        assert arena(iv, offsets) < arena(iv, old)
    for _, order in memory.GREEDY_METHODS:  # every order tried is a valid placement on its own
        alt = memory.place_greedy(iv, memory.live_pairs(iv), order)
        assert brute_overlaps(iv, alt) == []
    sweep = memory.place_sweep(iv)
    assert brute_overlaps(iv, sweep) == []
    check_placement(iv, sweep)
    assert arena(iv, offsets) >= peak_live(iv) and arena(iv, sweep) >= peak_live(iv)
    # peak_live against a per-launch sum
    horizon = max(x.last for x in iv) + 1
    assert peak_live(iv) == max(sum(x.size for x in iv if x.first <= t <= x.last) for t in range(horizon))


@pytest.mark.parametrize("seed", range(40))
def test_checker_agrees_with_brute_force(seed):
    """Random (mostly bad) placements: the checker raises exactly when the oracle finds a pair."""
    rng = random.Random(1000 + seed)
    iv = random_intervals(rng, rng.randrange(2, 60), 30, rng.choice([1, 5, 30]))
    offsets = [memory.ALIGN * rng.randrange(0, 40) for _ in iv]
    bad = brute_overlaps(iv, offsets)
    if bad:
        with pytest.raises(ArenaOverlapError):
            check_placement(iv, offsets)
    else:
        check_placement(iv, offsets)


def test_a_later_order_wins_where_by_size_fragments():
    """By size, the 768-byte buffer goes low and the three 512-byte ones that meet at launch 4 stack
    above it (1792 bytes); placing the most-contended ones first reaches peak_live (1536): the
    smaller arena wins and the method is recorded."""
    iv = [Interval(0, 3, 768), Interval(3, 5, 512), Interval(4, 5, 512), Interval(4, 4, 512)]
    nbr = memory.live_pairs(iv)
    by_size = memory.place_greedy(iv, nbr, "size")
    offsets, method = place(iv)
    assert brute_overlaps(iv, offsets) == []
    assert arena(iv, offsets) == peak_live(iv) == 1536 < arena(iv, by_size) == 1792
    assert method == "greedy-by-conflict"


def test_checker_names_the_buffers():
    iv = [Interval(0, 5, 512), Interval(5, 9, 256)]  # live together at launch 5 (inclusive ends)
    with pytest.raises(ArenaOverlapError, match="b.*live together"):
        check_placement(iv, [0, 256], ["a", "b"])
    check_placement(iv, [0, 512], ["a", "b"])
    with pytest.raises(ArenaOverlapError, match="aligned"):
        check_placement(iv, [0, 100])


def test_wide_graphs_fall_back_to_the_sweep(monkeypatch):
    """More live-together pairs than the budget: the O(n log n) sweep places them, still valid."""
    rng = random.Random(7)
    iv = random_intervals(rng, 300, 20, 20)
    monkeypatch.setattr(memory, "MAX_LIVE_PAIRS_BASE", 10)
    monkeypatch.setattr(memory, "MAX_LIVE_PAIRS_PER_BUFFER", 0)
    offsets, method = place(iv)
    assert method == "sweep"
    assert brute_overlaps(iv, offsets) == []
    assert memory.live_pairs(iv, 10) is None


def test_sweep_reuses_freed_space():
    # a chain: each buffer lives over two launches; two slots suffice
    iv = [Interval(t, t + 1, 1024) for t in range(100)]
    offs = memory.place_sweep(iv)
    assert arena(iv, offs) == 2048
    offs, _ = place(iv)
    assert arena(iv, offs) == 2048


# ---------------------------------------------------------------- real plans

def _plan(path, shapes="", precision="fp32"):
    m = import_model(str(path), shapes=parse_shapes(shapes))
    passes = None
    if precision != "fp32":
        from nnc.pipeline import DEFAULT_PIPELINE
        passes = list(DEFAULT_PIPELINE) + [f"to-{precision}", "canonicalize", "dce"]
    run_passes(m, passes)
    return lower(m, {"arch": "sm_90", "precision": precision, "tf32": False})


def _check_plan(plan):
    """Independent of memory.py: liveness from the launches, then the brute-force oracle."""
    seq = list(getattr(plan, "init_launches", [])) + list(plan.launches)
    first, last = {}, {}
    for t, l in enumerate(seq):
        for a in l.args:
            if isinstance(a, Buffer):
                r = plan.root(a)
                first.setdefault(r.id, t)
                last[r.id] = t
    temps = [b for b in plan.buffers if b.kind == "temp" and b.alias_of is None and b.id in first]
    iv = [Interval(first[b.id], last[b.id], align(max(b.nbytes, 1))) for b in temps]
    offsets = [b.offset for b in temps]
    pos = {b.id: n for n, b in enumerate(temps)}
    inplace = set()
    for n, b in enumerate(temps):  # written in place: the same slot, born at the launch where the operand dies
        if b.inplace_of is not None:
            i = pos[b.inplace_of]
            assert offsets[i] == offsets[n] and iv[i].size == iv[n].size and last[b.inplace_of] == first[b.id]
            inplace.add((min(i, n), max(i, n)))
    assert [p for p in brute_overlaps(iv, offsets) if p not in inplace] == []
    assert plan.memory["arena_bytes"] == arena(iv, offsets)
    assert plan.memory["peak_live_bytes"] <= plan.memory["arena_bytes"] <= plan.memory["naive_bytes"]
    for b in plan.buffers:  # views stay inside their root; the root of a view is never a view
        if b.alias_of is not None:
            r = plan.buffers[b.alias_of]
            assert r.alias_of is None
            assert 0 <= b.alias_offset and b.alias_offset + b.nbytes <= r.nbytes, b.name
    return temps


@pytest.mark.parametrize("name,shapes", EXAMPLES)
def test_example_plans_never_overlap(name, shapes):
    _check_plan(_plan(ROOT / "examples" / name, shapes))


@pytest.mark.parametrize("name", sorted(models()))
def test_kernel_family_plans_never_overlap(name):
    mod = import_model(models()[name][0])
    run_passes(mod)
    _check_plan(lower(mod, {"arch": "sm_90"}))


def test_fp16_example_plan_never_overlaps():
    _check_plan(_plan(ROOT / "examples" / "tiny_cnn.onnx", "input:1x3x32x32", "fp16"))


def test_views_and_dynamic_buffers():
    """A Reshape view shares its root's bytes and lifetime; NonZero's output (dynamic) is planned
    at its upper bound and keeps its readback."""
    from .cuda_models import nonzero_view_model
    mod = import_model(nonzero_view_model())
    run_passes(mod)
    plan = lower(mod, {"arch": "sm_90"})
    temps = _check_plan(plan)
    dyn = [b for b in plan.buffers if b.dynamic]
    nz = next(b for b in plan.outputs if b.name == "nz")
    assert nz.dynamic and nz.shape == (2, 24)  # the upper bound: every element nonzero
    assert dyn
    assert any(l.kind == "readback" for l in plan.launches)
    views = [b for b in plan.buffers if b.alias_of is not None]
    for v in views:
        root = plan.buffers[v.alias_of]
        if root.kind == "temp":
            assert root in temps


def _chain_model(n_blocks, dim=16, seed=0):
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh
    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], [], "x"
    for i in range(n_blocks):
        inits += [nh.from_array(rng.standard_normal((dim, dim)).astype(np.float32), f"w{i}"),
                  nh.from_array(rng.standard_normal(dim).astype(np.float32), f"b{i}")]
        nodes += [h.make_node("MatMul", [cur, f"w{i}"], [f"m{i}"]), h.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  h.make_node("Tanh", [f"a{i}"], [f"t{i}"])]
        cur = f"t{i}"
    g = h.make_graph(nodes, "chain", [h.make_tensor_value_info("x", T.FLOAT, [dim, dim])],
                     [h.make_tensor_value_info(cur, T.FLOAT, [dim, dim])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def test_long_chain_lowers():
    """2,000 blocks (6,000 nodes): lowering and planning work; a chain needs two 1 KiB slots.
    Each block is two launches: the MatMul (16x16 is below the fast GEMM's sizes, so its epilogue
    is declined) and one fused elementwise kernel for its bias Add + Tanh."""
    from nnc.codegen.emit import plan_to_json, render_sources, weights_blob
    mod = import_model(_chain_model(2000))
    run_passes(mod)
    plan = lower(mod, {"arch": "sm_90"})
    assert len(plan.launches) == 4000
    assert plan.memory["arena_bytes"] == 2048
    assert plan.memory_method == "greedy-by-size"
    blob = weights_blob(plan)
    assert len(blob) == plan.weights_bytes >= 2000 * (16 * 16 + 16) * 4
    srcs = render_sources(plan, "chain", "sm_90", "fp32")
    assert srcs["model.cu"].count("<<<") == 4000
    pj = plan_to_json(plan, arch="sm_90", precision="fp32", tf32=False, passes=[], weights_sha="",
                      source_sha="", backend="nvrtc")
    assert len(pj["launches"]) == 4000
