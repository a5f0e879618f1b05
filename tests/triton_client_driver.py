"""Client side of tests/test_triton.py, run by the Triton venv's Python (tritonclient, numpy < 2),
never imported by nnc's tests. Usage: python triton_client_driver.py ACTION JSON-ARGS; prints one
JSON object on stdout.

infer  {url, grpc_url, model, inputs: IN.npz, save: OUT.npz}: one request over HTTP and one over gRPC
load   {url, model, input, shape, requests, clients, rows}: concurrent HTTP requests; counts and latencies
stats  {url, model}: Triton's inference statistics for the model
grpc_bad {grpc_url, model, shape, output}: wrong name / shape / dtype over gRPC, then a good request
"""
import json
import sys
import threading
import time

import numpy as np


def infer(a):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    feed = dict(np.load(a["inputs"]))
    result = {}
    h = httpclient.InferenceServerClient(a["url"])
    meta = h.get_model_metadata(a["model"])
    outs = [o["name"] for o in meta["outputs"]]
    ins = []
    for name, arr in feed.items():
        t = httpclient.InferInput(name, list(arr.shape), "FP32")
        t.set_data_from_numpy(arr, binary_data=True)
        ins.append(t)
    r = h.infer(a["model"], ins, outputs=[httpclient.InferRequestedOutput(n, binary_data=True) for n in outs])
    for n in outs:
        result["http/" + n] = r.as_numpy(n)
    g = grpcclient.InferenceServerClient(a["grpc_url"])
    gins = []
    for name, arr in feed.items():
        t = grpcclient.InferInput(name, list(arr.shape), "FP32")
        t.set_data_from_numpy(arr)
        gins.append(t)
    r = g.infer(a["model"], gins, outputs=[grpcclient.InferRequestedOutput(n) for n in outs])
    for n in outs:
        result["grpc/" + n] = r.as_numpy(n)
    np.savez(a["save"], **result)
    return {"outputs": outs, "keys": sorted(result)}


def load(a):
    import tritonclient.http as httpclient
    n_req, n_clients = a["requests"], a["clients"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(a["shape"]).astype(np.float32)
    lat, failures, done = [], [], [0]
    lock = threading.Lock()
    counter = iter(range(n_req))

    def worker():
        c = httpclient.InferenceServerClient(a["url"], connection_timeout=30, network_timeout=60)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t = httpclient.InferInput(a["input"], list(x.shape), "FP32")
            t.set_data_from_numpy(x, binary_data=True)
            t0 = time.perf_counter()
            try:
                r = c.infer(a["model"], [t])
                out = r.as_numpy(a["output"])
                ok = out is not None and out.shape[0] == x.shape[0] and np.all(np.isfinite(out))
                dt = time.perf_counter() - t0
                with lock:
                    if ok:
                        lat.append(dt)
                    else:
                        failures.append(f"request {i}: bad output {None if out is None else out.shape}")
                    done[0] += 1
            except Exception as e:  # counted, never lost
                with lock:
                    failures.append(f"request {i}: {type(e).__name__}: {e}")
                    done[0] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    wall = time.perf_counter() - t0
    ms = np.array(sorted(lat)) * 1e3
    return {"sent": n_req, "answered": done[0], "ok": len(lat), "failures": failures[:5], "n_failures": len(failures),
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
            "wall_s": wall, "rps": len(lat) / wall if wall else None}


def grpc_bad(a):
    """Bad requests over gRPC: each one's status code and message; then a good one."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException
    g = grpcclient.InferenceServerClient(a["grpc_url"])
    x = np.full(a["shape"], 0.5, np.float32)
    cases = {"wrong input name": ("nope", x, "FP32"), "wrong shape": ("input", x[..., :16], "FP32"),
             "wrong dtype": ("input", x.astype(np.int32), "INT32")}
    out = {}
    for what, (name, arr, dt) in cases.items():
        t = grpcclient.InferInput(name, list(arr.shape), dt)
        t.set_data_from_numpy(arr)
        try:
            g.infer(a["model"], [t])
            out[what] = {"status": "OK"}
        except InferenceServerException as e:
            out[what] = {"status": str(e.status()), "message": e.message()}
    t = grpcclient.InferInput("input", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    out["good"] = {"shape": list(g.infer(a["model"], [t]).as_numpy(a["output"]).shape)}
    return out


def stats(a):
    import tritonclient.http as httpclient
    return httpclient.InferenceServerClient(a["url"]).get_inference_statistics(a["model"])


if __name__ == "__main__":
    action, args = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps({"infer": infer, "load": load, "stats": stats, "grpc_bad": grpc_bad}[action](args)))
