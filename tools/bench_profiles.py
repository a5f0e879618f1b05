"""Latency of one range-profile build (issue 10, codegen/runtime_sizes.py) at the profile's min, opt
and max shapes against static builds of those shapes, on the GPU; outputs checked against
onnxruntime (CPU) first.

    python tools/bench_profiles.py [--models cnn,encoder] [--precision fp32,fp16] [--iters 200] [--out DIR]

Models (tools/profile_models.py): cnn = examples/tiny_cnn.onnx over batch 1/8/32; bert = one
BERT-style layer (d=64, 4 heads) with an embedding Gather and an attention mask over ids/mask
1x1 / 2x77 / 4x128 (encoder: the same layer on x:1x1x64 / 2x77x64 / 2x128x64; encoder768: one
BERT-base sized layer, d 768, 12 heads, ffn 3072, on x:1x1x768 / 8x128x768 / 8x256x768). Every build: each
--precision given (default fp32; at fp16 the GEMMs take their epilogues and attention the mma.sync
flash kernel, over runtime sizes in the range build), --no-tune (the same heuristic selection on both sides), CUDA graphs on. A run is Module.run with
device (cupy) inputs and outputs (the input copy into the module's buffers, the graph replay, the
output copy): the median over 5 repeats of `iters` runs between two CUDA events; "dev" replays
each module's CUDA graph back to back (device time without run()'s host work). Targets:
range/static <= 1.05 at opt, <= 1.15 at min and max. Prints a line per measurement and a table last.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import profile_models  # noqa: E402

MODELS = {  # name: (inputs, min, opt, max): every input of a model has the same shape here
    "cnn": (("input",), (1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32)),
    "encoder": (("x",), (1, 1, 64), (2, 77, 64), (2, 128, 64)),
    "bert": (("ids", "mask"), (1, 1), (2, 77), (4, 128)),  # encoder(embed=True): ids + attention mask
    "encoder768": (("x",), (1, 1, 768), (8, 128, 768), (8, 256, 768)),  # BERT-base sized: d 768, 12 heads, ffn 3072
}


def make_model(name: str, work: Path) -> Path:
    if name == "cnn":
        return profile_models.cnn()
    if name == "encoder768":
        return profile_models.encoder(work / f"{name}.onnx", d=768, heads=12, ffn=3072)
    return profile_models.encoder(work / f"{name}.onnx", embed=name == "bert")


def make_feed(name: str, inputs, shape, rng) -> dict:
    if name != "bert":
        return {inputs[0]: rng.standard_normal(shape).astype(np.float32)}
    mask = (rng.random(shape) > 0.3).astype(np.float32)
    mask[:, 0] = 1
    return {"ids": rng.integers(0, 100, shape).astype(np.int64), "mask": mask}
TARGET = {"min": 1.15, "opt": 1.05, "max": 1.15}


def _dims(s) -> str:
    return "x".join(map(str, s))


def time_run(m, feed, iters: int) -> float:
    import cupy as cp
    dev = {k: cp.asarray(v) for k, v in feed.items()}
    for _ in range(20):
        m.run(dev, output="cupy")
    cp.cuda.get_current_stream().synchronize()
    t0, t1 = cp.cuda.Event(), cp.cuda.Event()
    ts = []
    for _ in range(5):
        t0.record()
        for _ in range(iters):
            m.run(dev, output="cupy")
        t1.record()
        t1.synchronize()
        ts.append(cp.cuda.get_elapsed_time(t0, t1) / iters)
    return float(np.median(ts))


def time_graph(graph, iters: int) -> float:
    """Device time of one run: the module's captured graph replayed back to back (no host work
    between replays, so the host cost of run() is not in it); None without a graph."""
    import cupy as cp
    if graph is None:
        return float("nan")
    st = cp.cuda.Stream(non_blocking=True)
    for _ in range(10):
        graph.launch(st)
    t0, t1 = cp.cuda.Event(), cp.cuda.Event()
    ts = []
    for _ in range(5):
        t0.record(st)
        for _ in range(iters):
            graph.launch(st)
        t1.record(st)
        t1.synchronize()
        ts.append(cp.cuda.get_elapsed_time(t0, t1) / iters)
    return float(np.median(ts))


def range_graph(m, feed):
    """The CUDA graph a range-build module keeps for these input shapes (None: eager)."""
    env = m.bind_shapes(feed)
    entry = m._shape_cache.get(tuple(sorted(env.items())))
    return entry[1] if entry is not None else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="cnn,bert")
    ap.add_argument("--precision", default="fp32", help="comma list: fp32, fp16, bf16")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", default="/tmp/nnc_bench_profiles")
    a = ap.parse_args()
    import nnc
    import onnxruntime as ort
    work = Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    t_start = time.time()
    for name, prec in [(n, p) for p in a.precision.split(",") for n in a.models.split(",")]:
        inputs, lo, opt, hi = MODELS[name]
        model = make_model(name, work)
        sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        profile = ",".join(f"{inp}:{_dims(lo)}/{_dims(opt)}/{_dims(hi)}" for inp in inputs)
        t = time.time()
        rng_m = nnc.compile(model, profiles=[profile], out=work / f"{name}_{prec}_range", tune=False, precision=prec)
        print(f"{name} {prec}: range build {profile} in {time.time() - t:.1f} s", flush=True)
        tol = 1e-3 if prec == "fp32" else 5e-2
        rng = np.random.default_rng(0)
        for label, shape in (("min", lo), ("opt", opt), ("max", hi)):
            feed = make_feed(name, inputs, shape, rng)
            ref = sess.run(None, feed)[0]
            got = rng_m.run(feed, output="numpy", poison=True)
            err = float(np.abs(next(iter(got.values())).astype(np.float32) - ref).max())
            t = time.time()
            st_m = nnc.compile(model, shapes={inp: list(shape) for inp in inputs}, out=work / f"{name}_{prec}_{label}",
                               tune=False, precision=prec)
            build_s = time.time() - t
            st_err = float(np.abs(next(iter(st_m.run(feed, output="numpy").values())).astype(np.float32) - ref).max())
            ms_static = time_run(st_m, feed, a.iters)
            ms_range = time_run(rng_m, feed, a.iters)
            g = range_graph(rng_m, feed)
            dev_static, dev_range = time_graph(st_m.graph, a.iters), time_graph(g, a.iters)
            r = dict(model=name, prec=prec, tol=tol, at=label, shape=_dims(shape), static_ms=ms_static,
                     range_ms=ms_range,
                     ratio=ms_range / ms_static, err=err, static_err=st_err, dev_static=dev_static,
                     dev_range=dev_range, graph=g is not None)
            rows.append(r)
            print(f"{name} {prec} {label} {_dims(shape)}: static {ms_static:.4f} ms (graph replay {dev_static:.4f}, "
                  f"{len(st_m.plan['launches'])} launches, built in {build_s:.1f} s, err {st_err:.1e}), range "
                  f"{ms_range:.4f} ms (graph replay {dev_range:.4f}, {len(rng_m.plan['launches'])} launches, "
                  f"graph {g is not None} {rng_m.graph_fallback or ''}, err {err:.1e}), ratio {r['ratio']:.3f}",
                  flush=True)
    print(f"\ntotal {time.time() - t_start:.0f} s")
    print("run: Module.run per request (host + device); dev: the graph replayed back to back (device)")
    print(f"{'model':8} {'prec':4} {'at':4} {'shape':10} {'static':>8} {'range':>8} {'ratio':>6} {'target':>6} {'ok':>3} "
          f"{'dev st':>8} {'dev rg':>8} {'dev ratio':>9} {'max err':>8}")
    for r in rows:
        ok = r["ratio"] <= TARGET[r["at"]] and r["err"] < r["tol"]
        print(f"{r['model']:8} {r['prec']:4} {r['at']:4} {r['shape']:10} {r['static_ms']:8.4f} {r['range_ms']:8.4f} "
              f"{r['ratio']:6.3f} {TARGET[r['at']]:6.2f} {'yes' if ok else 'NO':>3} {r['dev_static']:8.4f} "
              f"{r['dev_range']:8.4f} {r['dev_range'] / r['dev_static']:9.3f} {r['err']:8.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
