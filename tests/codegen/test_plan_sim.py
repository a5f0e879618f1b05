"""CPU check of the lowering's index arithmetic: a numpy simulator executes the launch plan for the
data-movement, reduction and fill templates (strided_copy, gather, gather_elements, pad, reduce,
softmax, argreduce, fill/eye/range, memcpy/aliases) and compares the outputs they produce with the
interpreter. Kernels of other templates are skipped, and so are outputs that depend on them.
The load-time init phase (Plan.init_launches) runs once, before the runs. With `regions=True`
buffers live where the plan put them (arena, persistent, weights.bin bytes), and the arena is
poisoned before every run, as `Module.run(poison=True)` does on the GPU."""
from __future__ import annotations

import re

import numpy as np
import pytest

from nnc.codegen.lower import lower
from nnc.codegen.plan import Buffer
from nnc.ir.interp import Interpreter
from nnc.onnx_import import import_model

from .cuda_models import models, random_feed


def _coords(shape):
    return np.indices(shape).reshape(len(shape), -1) if shape else np.zeros((0, 1), np.int64)


def _strided_copy(p, x):
    c = _coords(p["shape"])
    src = np.full(c.shape[1], p["in_base"], np.int64)
    for d in range(len(p["shape"])):
        cc = c[d] % p["in_mods"][d] if p["in_mods"][d] else c[d]
        src += cc * p["in_strides"][d]
    if p["out_contig"]:
        dst = np.arange(c.shape[1])
    else:
        dst = p["out_base"] + sum(c[d] * p["out_strides"][d] for d in range(len(p["shape"])))
    return src, dst


_RED = {"sum": np.sum, "max": np.max, "min": np.min, "prod": np.prod}


def _c_literal(s: str):
    """The value of a literal from codegen/kernels/elementwise.py's lit()."""
    s = s.strip()
    if s in ("true", "false"):
        return s == "true"
    m = re.fullmatch(r"\(\([\w ]+\)(-?\d+)LL\)", s)
    if m:
        return int(m.group(1))
    m = re.fullmatch(r"__int_as_float\((0x[0-9a-f]+)\)", s)
    if m:
        return np.array([int(m.group(1), 16)], np.uint32).view(np.float32)[0]
    return float(s.rstrip("f"))


def _schedule(plan, runs: int, poison):
    """The launches in execution order: the init phase once, then `runs` runs (poison() first)."""
    yield from plan.init_launches
    for _ in range(runs):
        poison()
        yield from plan.launches


def simulate(plan, feed, regions: bool = False, runs: int = 1):
    mem = {}  # root buffer id -> flat numpy array
    ok = {}   # root id -> bool (fully produced by simulated kernels)
    arena = np.zeros(max(plan.memory["arena_bytes"], 1), np.uint8)
    persistent = np.full(max(plan.persistent_bytes, 1), 0xFF, np.uint8)
    if regions:
        from nnc.codegen.emit import weights_blob
        weights = np.frombuffer(weights_blob(plan), np.uint8).copy()
        placed = {"temp": arena, "init": persistent, "weight": weights, "const": weights}
    for b in plan.buffers:
        if b.alias_of is None:
            if b.kind == "input":
                mem[b.id] = np.asarray(feed[b.name]).reshape(-1).copy()
                ok[b.id] = True
            elif regions and b.kind in placed:  # a view of the bytes where the plan put it
                mem[b.id] = placed[b.kind][b.offset:b.offset + b.nbytes].view(b.dtype.np)
                ok[b.id] = True
            elif b.kind in ("weight", "const"):
                mem[b.id] = np.asarray(b.data).reshape(-1).astype(b.dtype.np)
                ok[b.id] = True
            else:
                mem[b.id] = np.zeros(b.numel, b.dtype.np)
                ok[b.id] = True

    def poison():
        if regions:
            arena.fill(0xFF)

    def view(b: Buffer):
        r = plan.root(b)
        off = b.alias_offset // (b.dtype.bits // 8)
        return r.id, off

    for l in _schedule(plan, runs, poison):
        bufs = [a for a in l.args if isinstance(a, Buffer)]
        if l.kind == "memcpy":
            (dr, do), (sr, so) = view(bufs[0]), view(bufs[1])
            n = bufs[0].numel
            mem[dr][do:do + n] = mem[sr][so:so + n]
            ok[dr] = ok[sr]
            continue
        if l.kind != "kernel":
            continue
        k = plan.kernels[l.kernel]
        p, t = k.params, k.template
        ins = [mem[view(b)[0]][view(b)[1]:] for b in bufs]
        out_root, out_off = view(bufs[-1] if t not in ("argreduce.cu.j2",) else bufs[-1])
        good = all(ok[plan.root(b).id] for b in bufs[:-1])
        y = mem[out_root]
        if t == "strided_copy.cu.j2":
            src, dst = _strided_copy(p, None)
            y[out_off + dst] = ins[0][src]
        elif t == "gather.cu.j2":
            x, ind = ins[0], ins[1][:p["nidx"]].astype(np.int64)
            n = bufs[-1].numel
            idx = np.arange(n)
            post, nidx, dim = p["post"], p["nidx"], p["dim"]
            pp, tt = idx % post, idx // post
            j, o = tt % nidx, tt // nidx
            kk = ind[j] % dim
            y[out_off + idx] = x[(o * dim + kk) * post + pp]
        elif t == "gather_elements.cu.j2":
            shape = p["shape"]
            c = _coords(shape)
            n = c.shape[1]
            kk = ins[1][:n].astype(np.int64) % p["dim"]
            src = sum((kk if d == p["axis"] else c[d]) * p["x_strides"][d] for d in range(len(shape)))
            y[out_off:out_off + n] = ins[0][src]
        elif t == "pad.cu.j2":
            c = _coords(p["out_shape"])
            src = np.zeros(c.shape[1], np.int64)
            inside = np.ones(c.shape[1], bool)
            for d, D in enumerate(p["in_shape"]):
                cc = c[d] - p["begin"][d]
                if p["mode"] == "constant":
                    inside &= (cc >= 0) & (cc < D)
                    cc = np.clip(cc, 0, D - 1)
                elif p["mode"] == "edge":
                    cc = np.clip(cc, 0, D - 1)
                elif p["mode"] == "reflect":
                    per = 2 * (D - 1)
                    cc = np.zeros_like(cc) if D == 1 else np.where(cc % per >= D, per - cc % per, cc % per)
                else:
                    cc = cc % D
                src += cc * p["in_strides"][d]
            val = float(p["value"].rstrip("f")) if "LL" not in p["value"] else 0
            y[out_off:out_off + c.shape[1]] = np.where(inside, ins[0][src], val)
        elif t == "reduce.cu.j2":
            o, R, i = p["outer"], p["R"], p["inner"]
            x = ins[0][:o * R * i].reshape(o, R, i).astype(np.float64)
            f = {"v": x, "nnc_abs(v)": np.abs(x), "v * v": x * x}.get(p["map_expr"])
            if p["lse"]:
                m = x.max(axis=1)
                acc = np.log(np.exp(x - m[:, None]).sum(axis=1)) + m
            else:
                acc = _RED[p["combine_op"]](f, axis=1)
                fin = p["final_expr"]
                if fin.startswith("acc / "):
                    acc = acc / R
                elif fin.startswith("sqrt"):
                    acc = np.sqrt(acc)
                elif fin.startswith("log"):
                    acc = np.log(acc)
            y[out_off:out_off + o * i] = acc.reshape(-1)
        elif t == "softmax.cu.j2":
            o, R, i = p["outer"], p["R"], p["inner"]
            x = ins[0][:o * R * i].reshape(o, R, i).astype(np.float64)
            e = np.exp(x - x.max(axis=1, keepdims=True))
            s = e / e.sum(axis=1, keepdims=True)
            y[out_off:out_off + x.size] = (np.log(s) if p["log"] else s).reshape(-1)
        elif t == "argreduce.cu.j2":
            o, R, i = p["outer"], p["R"], p["inner"]
            x = ins[0][:o * R * i].reshape(o, R, i)
            r = x.argmax(axis=1) if p["cmp"] == ">" else x.argmin(axis=1)
            y[out_off:out_off + o * i] = r.reshape(-1)
        elif t == "fill.cu.j2" and p["kind"] in ("fill", "eye", "range"):
            n = bufs[-1].numel
            idx = np.arange(n)
            if p["kind"] == "fill":
                y[out_off:out_off + n] = _c_literal(p["value"])
            elif p["kind"] == "eye":
                y[out_off:out_off + n] = (idx % p["cols"]) - (idx // p["cols"]) == p["k"]
            else:  # start + idx * delta in the element type
                y[out_off:out_off + n] = ins[0][0] + idx.astype(y.dtype) * ins[1][0]
        else:
            good = False
        ok[out_root] = ok[out_root] and good
    return mem, ok


@pytest.mark.parametrize("name", ["movement", "reduce"])
def test_plan_simulation_matches_interpreter(name):
    m, spec = models()[name]
    mod = import_model(m)
    plan = lower(mod, {"arch": "sm_90"})
    feed = random_feed(spec, np.random.default_rng(0))
    ref = Interpreter(mod).run(feed)
    mem, ok = simulate(plan, feed)
    checked = 0
    for b in plan.outputs:
        r = plan.root(b)
        if not ok[r.id]:
            continue
        got = mem[r.id][:b.numel].reshape(b.shape)
        np.testing.assert_allclose(got.astype(np.float64), ref[b.name].astype(np.float64), rtol=1e-5, atol=1e-5,
                                   err_msg=f"{name}/{b.name}")
        checked += 1
    print(name, "checked", checked, "of", len(plan.outputs))
    assert checked >= (15 if name == "movement" else 12), checked
