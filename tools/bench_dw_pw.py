"""Cross-layer dw+pw fusion on the GPU: MobileNetV2 (tests/models/graphs/mobilenet_v2.graph.onnx,
refilled with seeded weights by tools/graph_models.py) at fp16, batch 1 and 32, built with the
default pipeline, without `fuse-cross-layer`, with it grouping every eligible pair (its `pays`
bound lifted), and without `fuse-pooling` (ResNet-50 too with --models): launches and median ms
(tools/cuda_timing.py);
then per layer: one MobileNetV2 inverted-residual block (stem, expand, dw, project, GAP) without
the pass, with it at the heuristic's tile, and with other tiles of the space (set in the op's
params); a block's time is the whole small model's, so the difference is the pair's.

    python tools/bench_dw_pw.py build DIR     # CPU: compile every build into DIR (NVRTC, no GPU)
    python tools/bench_dw_pw.py time DIR      # GPU: load each build, time it, print one JSON row each
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from tools.cuda_timing import time_cuda  # noqa: E402


def _without_cross(fn):
    """Runs fn with fuse-cross-layer left out of the default pipeline."""
    from nnc.pipeline import DEFAULT_PIPELINE
    i = DEFAULT_PIPELINE.index("fuse-cross-layer")
    DEFAULT_PIPELINE.pop(i)
    try:
        return fn()
    finally:
        DEFAULT_PIPELINE.insert(i, "fuse-cross-layer")


def _without_pooling(fn):
    """Runs fn with fuse-pooling left out of the default pipeline."""
    from nnc.pipeline import DEFAULT_PIPELINE
    i = DEFAULT_PIPELINE.index("fuse-pooling")
    DEFAULT_PIPELINE.pop(i)
    try:
        return fn()
    finally:
        DEFAULT_PIPELINE.insert(i, "fuse-pooling")


def _every_pair(fn):
    """Runs fn with fuse-cross-layer grouping every eligible pair (its measured `pays` bound lifted)."""
    from nnc.passes import fuse_cross_layer as xl
    pays, xl.pays = xl.pays, (lambda s: True)
    try:
        return fn()
    finally:
        xl.pays = pays


def _set_batch(model, b):
    inits = {i.name for i in model.graph.initializer}
    for x in model.graph.input:
        if x.name not in inits:
            d = x.type.tensor_type.shape.dim[0]
            d.Clear()
            d.dim_value = b
    return model


LAYERS = [("56x56 c144->24 s1 res", dict(hw=56, cin=24, expand=6)),
          ("56x56 c144->32 s2", dict(hw=56, cin=24, expand=6, stride=2, k=32)),
          ("14x14 c576->96 s1 res", dict(hw=14, cin=96, expand=6)),
          ("7x7 c960->160 s1 res", dict(hw=7, cin=160, expand=6))]


def _compile(m, od: Path):
    from nnc.codegen.emit import compile_to_dir
    compile_to_dir(m, od, arch="sm_90", precision="fp16")


def build_all(out: Path, batches=(1, 32), models=("mobilenet_v2",), blocks=True):
    """Every build, compiled for sm_90 on this machine; index.json lists them."""
    from nnc.driver import compile_model
    from nnc.passes import fuse_cross_layer as xl
    from tests.passes.test_fuse_cross_layer import build, dw_pw_ops, inverted_residual
    from tools.graph_models import load_graph_model
    index = []
    builds = {"mobilenet_v2": (("default", lambda f: f()), ("nocross", _without_cross), ("every pair", _every_pair),
                               ("nopool", _without_pooling)),
              "resnet50": (("default", lambda f: f()), ("nopool", _without_pooling))}
    for name in models:
        for batch in batches:
            model = _set_batch(load_graph_model(ROOT / f"tests/models/graphs/{name}.graph.onnx"), batch)
            p = out / f"{name}_b{batch}.onnx"
            p.write_bytes(model.SerializeToString())
            for build_name, wrap in builds[name]:
                od = out / f"{name}_b{batch}_{build_name.replace(' ', '_')}"
                fn = lambda: compile_model(str(p), od, precision="fp16", arch="sm_90")  # noqa: E731
                wrap(fn)
                index.append(dict(group=f"{name} fp16 b{batch}", build=build_name, dir=od.name))
            p.unlink()
    for li, (label, kw) in enumerate(LAYERS if blocks else ()):
        for batch in batches:
            model = inverted_residual(n=batch, **kw)
            group = f"block {label} b{batch}"
            od = out / f"blk{li}_b{batch}_nocross"
            _compile(build(model, "fp16", cross=False), od)
            index.append(dict(group=group, build="nocross", dir=od.name))
            m = _every_pair(lambda: build(model, "fp16", cross=True))
            op = dw_pw_ops(m)[0]
            s = xl.pair_shape(*[b for b in op.attrs.body.ops if b.name == "Conv"])
            default = xl.parse_tile(op.attrs.params)
            others = [p for p in sorted(xl.tile_space(s, 227 * 1024), key=lambda p: xl.cost(s, p)) if p != default]
            picks = [default] + others[:1] + [max(others, key=lambda p: p["TH"] * p["TW"] * p["KN"])]
            for ti, tile in enumerate(picks):
                object.__setattr__(op.attrs, "params", xl.format_tile(tile))
                od = out / f"blk{li}_b{batch}_t{ti}"
                _compile(m, od)
                index.append(dict(group=group, build=("default " if ti == 0 else "") + xl.format_tile(tile),
                                  dir=od.name))
    (out / "index.json").write_text(json.dumps(index, indent=1))
    print(f"{len(index)} builds in {out}")


def time_all(out: Path):
    import cupy as cp
    import nnc
    index = json.loads((out / "index.json").read_text())
    rows = []
    for e in index:
        g = nnc.load(out / e["dir"])
        rng = np.random.default_rng(0)
        dev = {t.name: cp.asarray(rng.standard_normal(t.shape).astype(np.float32)) for t in g.inputs}
        r = dict(e, ms=round(time_cuda(lambda: g.run(dev)), 4), launches=len(g.plan["launches"]))
        rows.append(r)
        print(json.dumps(r), flush=True)
    # the short table: each group's builds against its "nocross" build
    print("| group | build | ms | launches | speed-up vs nocross (or nopool) |")
    print("|---|---|---|---|---|")
    base = {}
    for r in rows:
        if r["build"] in ("nocross", "nopool"):
            base.setdefault(r["group"], r["ms"])
    for r in rows:
        b = base.get(r["group"])
        ratio = "" if not b else "%.2fx" % (b / r["ms"])
        print(f"| {r['group']} | {r['build']} | {r['ms']:.4f} | {r['launches']} | {ratio} |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["build", "time"])
    ap.add_argument("dir")
    ap.add_argument("--models", default="mobilenet_v2", help="comma-separated: mobilenet_v2, resnet50")
    ap.add_argument("--no-blocks", action="store_true", help="skip the per-layer block builds")
    args = ap.parse_args()
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.step == "build":
        build_all(out, models=tuple(args.models.split(",")), blocks=not args.no_blocks)
    else:
        time_all(out)
    print(f"# {args.step}: {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
