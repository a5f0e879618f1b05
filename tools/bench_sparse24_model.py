"""2:4 sparsity on a whole model (issue 12): TensorRT's workflow, prune then build sparse, against the
dense build of the SAME pruned model.

    python tools/bench_sparse24_model.py                       # BERT-base b32 s128 (torch export), fp16
    python tools/bench_sparse24_model.py --batch 1             # b1
    python tools/bench_sparse24_model.py --graph               # tests/models/graphs/bert_base (b1, no torch)
    python tools/bench_sparse24_model.py --graph --dry         # CPU: prune + both compiles (no GPU run)

Steps: the model (tools/gpu_models.export, or the committed graph refilled with seeded weights)
-> `nnc prune --2:4` (compiler/prune.py: every MatMul/Gemm weight magnitude-pruned in the ONNX
initializers) -> two fp16 builds of that pruned model with the heuristic's kernels (tune off, so the
run stays short): `--sparsity off` (dense GEMMs) and `--sparsity enable` (matmul_sparse24). Both run
on the same fresh inputs; the relative L2 difference of their outputs is the sparse kernels' error on
a whole model (the same numbers up to fp16 rounding: ~1e-3 expected), and each build is timed
(nnc.load's CUDA graph, CUDA events, median). Last: a short table.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))


def load_model(name: str, batch: int, graph: bool):
    """(onnx.ModelProto, {input: array}) of the model."""
    import onnx
    if graph:
        from graph_models import GRAPHS, load_graph_model
        m = load_graph_model(GRAPHS / f"{name}.graph.onnx")
        feeds = {}
        for i in m.graph.input:
            shape = [d.dim_value or 1 for d in i.type.tensor_type.shape.dim]
            dt = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
            feeds[i.name] = np.zeros(shape, dt)
        return m, feeds
    from gpu_models import export
    path, feeds, _, _ = export(name, batch)
    return onnx.load(str(path)), feeds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bert_base")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--graph", action="store_true", help="the committed graph file (batch 1) instead of a torch export")
    ap.add_argument("--dry", action="store_true", help="prune and compile only (no GPU)")
    args = ap.parse_args(argv)
    import onnx

    import nnc
    from gpu_models import fresh_inputs, rel_err
    from nnc.prune import prune_model
    t0 = time.perf_counter()
    model, feeds = load_model(args.model, args.batch, args.graph)
    model, done, skipped = prune_model(model)
    print(f"{args.model}: pruned {sum(not w.was_sparse for w in done)} of {len(done)} MatMul/Gemm weights "
          f"(median relative change {np.median([w.rel_change for w in done]):.3f}); left dense: {len(skipped)}",
          flush=True)
    work = Path(tempfile.mkdtemp(prefix="nnc_sp24_model_"))
    src = work / "pruned.onnx"
    onnx.save(model, str(src))
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    builds = {}
    for label, sparsity in (("dense", "off"), ("sparse", "enable")):
        t1 = time.perf_counter()
        opts = nnc.CompileOptions(precision="fp16", sparsity=sparsity, tune=False, shapes=shapes,
                                  **({"backend": "reference", "codegen": True} if args.dry else {}))
        plan = nnc.compile(str(src), out=work / label, options=opts)
        import json
        plan = json.loads((work / label / "plan.json").read_text())
        sparse_k = sum("gemm_sparse24" in k["template"] and "reduce" not in k["name"] for k in plan["kernels"])
        builds[label] = dict(dir=work / label, compile_s=time.perf_counter() - t1, sparse_kernels=sparse_k,
                             launches=len(plan["launches"]))
        print(f"  {label}: compiled in {builds[label]['compile_s']:.0f} s, {builds[label]['launches']} launches, "
              f"{sparse_k} sparse GEMM kernels", flush=True)
        del plan
    if args.dry:
        print(f"dry run: {time.perf_counter() - t0:.0f} s")
        return 0
    import cupy as cp

    from cuda_timing import time_cuda
    x = fresh_inputs(feeds)
    outs = {}
    for label, b in builds.items():
        m = nnc.load(b["dir"])
        dev = {k: cp.asarray(v) for k, v in x.items()}
        res = m.run(dev, output="numpy")
        outs[label] = {k: np.asarray(v, np.float32) for k, v in res.items()}
        b["ms"] = time_cuda(lambda: m.run(dev), warmup=10, iters=50)
        del m
    errs = {k: rel_err(outs["sparse"][k], outs["dense"][k]) for k in outs["dense"]}
    d, s = builds["dense"], builds["sparse"]
    print(f"\n{args.model} b{args.batch if not args.graph else 1} fp16, 2:4-pruned weights, heuristic kernels "
          f"({time.perf_counter() - t0:.0f} s)")
    print(f"{'build':>8} {'ms':>8} {'launches':>8} {'sparse GEMMs':>12}")
    for label, b in builds.items():
        print(f"{label:>8} {b['ms']:8.3f} {b['launches']:8d} {b['sparse_kernels']:12d}")
    print(f"sparse / dense speed-up {d['ms'] / s['ms']:.2f}x; outputs' rel L2 sparse vs dense: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    return 0 if all(v < 2e-2 for v in errs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
