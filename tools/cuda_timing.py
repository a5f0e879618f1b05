"""The one CUDA-event timer of the GPU tools (gpu_validate, gpu_models, bench_attention): warm-up,
then the median of `iters` runs, each between two events on torch's current stream."""
from __future__ import annotations

import numpy as np


def time_cuda(fn, warmup: int = 10, iters: int = 50) -> float:
    """Median milliseconds of fn()."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return float(np.median(ts))
