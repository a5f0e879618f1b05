"""Runs a compiled model many times with synchronisation after each run (finds faults that only
show on repeated runs), optionally under compute-sanitizer.

    python tools/debug_repeat.py OUT_DIR [--n 50]
"""
import argparse
import sys

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=50)
    a = ap.parse_args()
    import cupy as cp
    import nnc
    m = nnc.load(a.out)
    rng = np.random.default_rng(0)
    feed = {}
    for t in m.plan["inputs"]:
        dt = np.dtype(t["dtype"])
        if dt.kind == "f":
            feed[t["name"]] = rng.standard_normal(t["shape"]).astype(dt)
        elif t["name"] == "attention_mask":
            feed[t["name"]] = np.ones(t["shape"], dt)
        else:
            feed[t["name"]] = rng.integers(0, 30000, t["shape"]).astype(dt)
    dev = {k: cp.asarray(v) for k, v in feed.items()}
    first = None
    for i in range(a.n):
        out = m.run(dev)
        cp.cuda.runtime.deviceSynchronize()
        o = cp.asnumpy(out[m.output_names[0]])
        if first is None:
            first = o
        elif not np.array_equal(o, first):
            print(f"run {i}: output changed (max diff {np.abs(o.astype(np.float64) - first).max()})")
    print(f"{a.out}: {a.n} runs ok")


if __name__ == "__main__":
    sys.exit(main())
