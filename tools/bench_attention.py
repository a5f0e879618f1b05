"""Fused attention benchmark: nnc's flash-attention kernels (the mma.sync one, flash_attention.py, and
the Hopper wgmma one, flash_attention_wgmma.py) vs torch's scaled_dot_product_attention (flash
backend) on the same shapes (run on the GPU machine; prints a short table last).

    python tools/bench_attention.py [--out /tmp/bench_attn] [--iters 100] [--cases 1x128,32x512,8x2048]
                                    [--wgmma stages2|all|default|none] [--sweep]

Per case (BxS, H = 12, D = 64, fp16):
- builds an ONNX attention subgraph the way transformers exports it (q/k/v [B,S,H*D] inputs,
  head split Reshape+Transpose, MatMul, Div by sqrt(D), optional additive mask [B,1,1,S],
  Softmax, MatMul, Transpose back to [B,S,H,D]), compiles it with nnc (fp16) and checks that it
  became ONE flash-attention launch;
- checks nnc's output against torch (fp32 math reference on the same fp16 inputs);
- times, with CUDA events (warm-up, then the median of --iters), nnc's whole plan (`run` with
  preallocated outputs) and the CUDA-graph-captured plan (the kernel alone: the column to read),
  vs torch sdpa under sdpa_kernel(SDPBackend.FLASH_ATTENTION) on [B,H,S,D] views of the same
  [B,S,H*D] tensors (the flash backend takes no mask, so the mask-free nnc builds are the
  like-for-like rows; the masked ones are shown too).
Rows: "nnc mma <tile>" - the mma.sync kernel with the pass's tile (the fused op's params say
wgmma=off); "nnc wgmma cw<c> bc<b> s<st>" - the wgmma kernel at that declared point (params say
wgmma=<c>x<b>x<st>; sm_90a only); --wgmma picks the points: stages2 (default: every declared point
with 2 stages), all (the TMA points too), tma (13 TMA points of two / three warp groups, "... tma" rows, the
FMA-pipe exponential ones "... emu<k>", and the two cp.async points cw2 bc128 s2/s3 persist pp), default (DEFAULT_POINT only), none. The mask rows use each kernel's default.
--sweep: also every tile of the mma.sync kernel's declared space (flash_attention.tile_space).
Last, per case: torch flash vs the heuristic's pick (a plain compile: the first nnc row, "nnc heuristic:
<kernel>") and the fastest mma and wgmma rows (CUDA-graph ms) and their ratio.
--diag: instead, the wgmma kernel on crafted inputs isolating Q K^T and P V (see diag()).
TFLOP/s = 4*B*H*S^2*D / time. Every build runs in its own try/except: a failure is a table row.
"""
from __future__ import annotations

import argparse
import math
import sys
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools.cuda_timing import time_cuda  # noqa: E402
H, D = 12, 64
ROWS: list[dict] = []


def attention_onnx(B: int, S: int, mask: bool):
    from onnx import TensorProto, helper, numpy_helper
    N = helper.make_node
    F16 = TensorProto.FLOAT16
    ins = [helper.make_tensor_value_info(n, F16, [B, S, H * D]) for n in ("q", "k", "v")]
    inits = [numpy_helper.from_array(np.array([B, S, H, D], np.int64), "sh"),
             numpy_helper.from_array(np.array(math.sqrt(D), np.float16), "sc")]
    nodes = [N("Reshape", ["q", "sh"], ["q4"]), N("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
             N("Reshape", ["k", "sh"], ["k4"]), N("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
             N("Reshape", ["v", "sh"], ["v4"]), N("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
             N("MatMul", ["qh", "kt"], ["s0"]), N("Div", ["s0", "sc"], ["s1"])]
    cur = "s1"
    if mask:
        ins.append(helper.make_tensor_value_info("mask", F16, [B, 1, 1, S]))
        nodes.append(N("Add", [cur, "mask"], ["s2"]))
        cur = "s2"
    nodes += [N("Softmax", [cur], ["p"], axis=-1), N("MatMul", ["p", "vh"], ["o"]),
              N("Transpose", ["o"], ["y"], perm=[0, 2, 1, 3])]
    # the output is the merged [B,S,H,D] itself: a final Reshape to [B,S,H*D] would be a view of
    # the kernel's result, which the runtime copies into the output buffer (one more launch)
    g = helper.make_graph(nodes, "attention", ins, [helper.make_tensor_value_info("y", F16, [B, S, H, D])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def time_graph(fn, warmup: int, iters: int, reps: int = 20):
    """fn captured `reps` times into one CUDA graph (torch's capture, on a side stream): the median
    ms of one fn, with no host work between the kernels. None when capture fails."""
    import torch
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()  # warm (allocations outside the capture)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
        return time_cuda(g.replay, max(2, warmup // 5), max(5, iters // 5)) / reps
    except Exception as e:  # noqa: BLE001 - a row says why
        print(f"  graph capture failed: {type(e).__name__}: {e}"[:300], flush=True)
        return None


def build_with(model_path: Path, od: Path, words):
    """Compiles the model like the driver (fp16), with the fused attention group's params words
    tile= / warps= / wgmma= replaced by `words`; returns (kernel kind, its parameters) as the plan
    recorded them: ("mma", (MI, WARPS, BC)) or ("wgmma", (CW, BC, STAGES, PERSIST))."""
    import dataclasses

    import onnx

    from nnc.codegen.emit import compile_to_dir
    from nnc.driver import pipeline_passes
    from nnc.onnx_import import import_model
    from nnc.pipeline import Pipeline
    mod = import_model(onnx.load(str(model_path)))
    Pipeline(pipeline_passes("fp16"), verify_each=False).run(mod)
    keys = tuple(w.split("=")[0] + "=" for w in words)
    for op in mod.main.ops:
        if op.name == "fused" and op.attrs.kind == "attention":
            kept = [w for w in op.attrs.params.split() if not w.startswith(keys)] if keys else op.attrs.params.split()
            op.attrs = dataclasses.replace(op.attrs, params=" ".join(list(words) + kept))
    plan = compile_to_dir(mod, od, arch=None, precision="fp16")
    return kernel_of(plan)


def kernel_of(plan):
    for k in plan["kernels"]:
        p = k.get("params", {}) if isinstance(k, dict) else {}
        if "CW" in p and "STAGES" in p:
            return ("wgmma", (p["CW"], p["BC"], p["STAGES"], int(p["PERSIST"]), int(p.get("PINGPONG", 0)),
                              int(p.get("TMA", 0)), int(p.get("EMU", 0))))
        if "MI" in p and "BC" in p:
            return ("mma", (p["MI"], p["WARPS"], p["BC"]))
    return None


def kernel_name(got) -> str:
    if got is None:
        return "-"
    kind, t = got
    if kind == "wgmma":
        return (f"wgmma cw{t[0]} bc{t[1]} s{t[2]}" + (" persist" if t[3] else "") + (" pp" if t[4] else "")
                + (" tma" if len(t) > 5 and t[5] else "") + (f" emu{t[6]}" if len(t) > 6 and t[6] else ""))
    return f"mma t={16 * t[0] * t[1]}x{t[2]} w{t[1]}"


def tile_name(t) -> str:
    return "-" if t is None else f"t={16 * t[0] * t[1]}x{t[2]} w{t[1]}"


def point_word(p) -> str:
    w = f"wgmma={p['cw']}x{p['bc']}x{p['stages']}x{p['persist']}x{p.get('pingpong', 0)}"
    return w + (f"x{p.get('tma', 0)}x{p['emu']}" if p.get("emu") else "x1" if p.get("tma") else "")


def point_key(p) -> tuple:
    return (p["cw"], p["bc"], p["stages"], int(p["persist"]), int(p.get("pingpong", 0)), int(p.get("tma", 0)),
            int(p.get("emu", 0)))


def configs(args):
    """(mask, params words, what was asked) of the nnc builds of one case."""
    from nnc.codegen.kernels import flash_attention_wgmma as W
    from nnc.codegen.kernels.flash_attention import tile_space
    from nnc.codegen.target import resolve_target
    limit = resolve_target(None).smem_per_block_optin
    # first the heuristic's own pick (no words: what a plain compile gets), then the mma.sync kernel
    out = [(False, [], "heuristic"), (False, ["wgmma=off"], "mma"), (True, ["wgmma=off"], "mma")]
    if args.sweep:
        for t in tile_space(D, D, limit):
            out.append((False, [f"tile={16 * t['mi'] * t['warps']}x{t['bc']}", f"warps={t['warps']}", "wgmma=off"],
                        ("mma", (t["mi"], t["warps"], t["bc"]))))
    pts = W.wgmma_space(D, D, limit, tma=args.wgmma in ("all", "tma"), maskless=True)
    if args.wgmma == "tma":  # TMA points (turn-taking ones after the others, then the FMA-pipe
        # exponentials), and the cp.async points measured best before them (2026-12-03) for the comparison
        ref = [{"cw": 2, "bc": 128, "stages": st, "persist": 1, "pingpong": 1} for st in (2, 3)]
        picks = [(2, 64, 4, 0), (2, 128, 3, 0), (2, 128, 4, 0), (2, 128, 6, 0), (3, 64, 4, 0), (3, 128, 3, 0),
                 (2, 64, 4, 1), (2, 64, 6, 1), (2, 128, 3, 1), (2, 128, 4, 1), (2, 128, 6, 1), (3, 64, 4, 1),
                 (3, 128, 3, 1)]
        tp = [p for k in picks for p in pts if p.get("tma") and not p.get("emu")
              and (p["cw"], p["bc"], p["stages"], p["pingpong"]) == k]
        pts = [p for p in ref if p in pts] + tp + [p for p in pts if p.get("emu")]
    elif args.wgmma == "all":  # (the turn-taking points last)
        pts = [p for p in pts if not p["pingpong"]] + [p for p in pts if p["pingpong"]]
    elif args.wgmma == "stages2":  # (the turn-taking points last: a hang would cost only their rows)
        pts = [p for p in pts if p["stages"] == 2 and (p["persist"] or p["cw"] == 2) and not p["pingpong"]] + [
            p for p in pts if p["stages"] == 3 and p["persist"] and p["cw"] == 2 and not p["pingpong"]] + [
            p for p in pts if p["stages"] == 2 and p["pingpong"]]
    elif args.wgmma == "default":
        pts = [p for p in pts if p == W.DEFAULT_POINT]
    elif args.wgmma == "none":
        pts = []
    for p in pts:
        out.append((False, [point_word(p)], ("wgmma", point_key(p))))
    if args.wgmma != "none":
        p = W.DEFAULT_POINT
        out.append((True, [point_word(p)], ("wgmma", point_key(p))))
    return out


def build_job(job):
    """One build of the build phase (a worker process): (status, kernel_of or the error)."""
    path, od, words = job
    try:
        return "ok", build_with(Path(path), Path(od), words)
    except Exception as e:  # noqa: BLE001 - the row says why
        return "err", f"{type(e).__name__}: {e}"[:200]


def build_all(cases, out: Path, args) -> dict:
    """Every (case, config) built first, in parallel worker processes (spawned: no CUDA state
    inherited): {(B, S): [(mask, asked, out dir, status, built kernel or error), ...]}."""
    import concurrent.futures as cf
    import multiprocessing as mp
    import os
    import time

    import onnx
    jobs, keys = [], []
    cfgs = configs(args)
    for B, S in cases:
        for with_mask in (False, True):
            path = out / f"attn_b{B}_s{S}{'_mask' if with_mask else ''}.onnx"
            onnx.save(attention_onnx(B, S, with_mask), path)
        for idx, (with_mask, words, asked) in enumerate(cfgs):
            od = out / f"attn_b{B}_s{S}{'_mask' if with_mask else ''}_{idx}"
            jobs.append((str(out / f"attn_b{B}_s{S}{'_mask' if with_mask else ''}.onnx"), str(od), words))
            keys.append(((B, S), with_mask, asked, od))
    t = time.time()
    workers = args.jobs or min(16, os.cpu_count() or 1)
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        results = list(ex.map(build_job, jobs))
    print(f"built {len(jobs)} models in {time.time() - t:.1f} s ({workers} workers)", flush=True)
    built: dict = {}
    for (case, with_mask, asked, od), (status, got) in zip(keys, results):
        built.setdefault(case, []).append((with_mask, asked, od, status, got))
    return built


def run_case(B: int, S: int, out: Path, args, built) -> None:
    import cupy as cp
    import torch
    import torch.nn.functional as Fn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import nnc

    flops = 4.0 * B * H * S * S * D
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, S, H * D, device="cuda", dtype=torch.float16) for _ in range(3))
    mask = torch.zeros(B, 1, 1, S, device="cuda", dtype=torch.float16)
    mask[..., S - S // 8:] = -10000.0  # the last eighth padded

    def heads(x):
        return x.view(B, S, H, D).transpose(1, 2)

    # torch reference (fp32 math) and torch flash timing
    with torch.no_grad():
        ref = {}
        for with_mask in (False, True):
            r = Fn.scaled_dot_product_attention(heads(q).float(), heads(k).float(), heads(v).float(),
                                                attn_mask=mask.float() if with_mask else None)
            ref[with_mask] = r.transpose(1, 2)
        t_flash = g_flash = None
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                qh, kh, vh = heads(q), heads(k), heads(v)
                Fn.scaled_dot_product_attention(qh, kh, vh)
                t_flash = time_cuda(lambda: Fn.scaled_dot_product_attention(qh, kh, vh), args.warmup, args.iters)
                g_flash = time_graph(lambda: Fn.scaled_dot_product_attention(qh, kh, vh), args.warmup, args.iters)
        except Exception as e:  # noqa: BLE001
            print(f"  torch flash failed: {type(e).__name__}: {e}"[:300], flush=True)
    ROWS.append(dict(case=f"B={B} S={S}", impl="torch sdpa flash", ms=t_flash, graph_ms=g_flash, flops=flops,
                     err=None, launches=None))
    print_row(ROWS[-1])

    for with_mask, asked, od, status, got in built:
        impl = "nnc" + (" +mask" if with_mask else "")
        row = dict(case=f"B={B} S={S}", impl=impl, ms=None, graph_ms=None, flops=flops, err=None, launches=None,
                   mask=with_mask, kind=asked if isinstance(asked, str) else asked[0])
        ROWS.append(row)
        try:
            if status != "ok":
                raise RuntimeError(f"build failed: {got}")
            row["impl"] = impl + " " + kernel_name(got)
            if asked == "heuristic":
                row["impl"] = "nnc heuristic: " + kernel_name(got)
            elif got is None or (not isinstance(asked, str) and got != asked) or (isinstance(asked, str) and got[0] != asked):
                row["note"] = f"asked {asked}, built {got}"
            # eager launches: the module's own CUDA graph cannot be captured again inside torch's
            # capture (H200 run: "operation failed due to a previous error during capture", which
            # also left torch's RNG in capture state for every later case)
            m = nnc.load(od, cuda_graph=False)
            kernels = [l.get("kernel") or l.get("kind") for l in m.plan["launches"]]
            row["launches"] = len(kernels)
            n_flash = sum(1 for x in kernels if x and "flash_attention" in x)
            if n_flash != 1:
                row["note"] = f"{n_flash} flash launches: {kernels}"
            feed = {"q": cp.asarray(q), "k": cp.asarray(k), "v": cp.asarray(v)}
            if with_mask:
                feed["mask"] = cp.asarray(mask)
            y = cp.full((B, S, H, D), float("nan"), cp.float16)  # poisoned: a row never written shows
            got = m.run(feed, out={"y": y})["y"]
            cp.cuda.runtime.deviceSynchronize()
            a = torch.as_tensor(got, device="cuda").float()
            r = ref[with_mask]
            row["err"] = float((a - r).abs().max().item() / max(1e-6, r.abs().max().item()))
            if not torch.isfinite(a).all():
                row["note"] = "non-finite output"
            elif row["err"] > 2e-2:
                row["note"] = (row.get("note", "") + " WRONG (err > 2e-2)").strip()
            row["ms"] = time_cuda(lambda: m.run(feed, out={"y": y}), args.warmup, args.iters)
            row["graph_ms"] = time_graph(lambda: m.run(feed, out={"y": y}, stream=torch.cuda.current_stream().cuda_stream),
                                         args.warmup, args.iters)
        except Exception as e:  # noqa: BLE001 - the row says why
            row["note"] = f"{type(e).__name__}: {e}"[:200]
            traceback.print_exc()
        print_row(row)  # as it comes (a hang later still leaves these)


def print_row(r) -> None:
    tf = None if not r["ms"] else r["flops"] / (r["ms"] * 1e-3) / 1e12
    gtf = None if not r["graph_ms"] else r["flops"] / (r["graph_ms"] * 1e-3) / 1e12
    print(f"{r['case']:<13} {r['impl']:<34} {fmt(r['ms'], '9.4f')} {fmt(tf, '8.1f')} {fmt(r['graph_ms'], '9.4f')} "
          f"{fmt(gtf, '8.1f')} {fmt(r['err'], '11.2e')} {fmt(r['launches'], '8d')}  {r.get('note', '')}", flush=True)


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def diag(out: Path, args) -> None:
    """--diag: the wgmma kernel on crafted inputs that isolate its two products (B=1, S=T=128):
    A, q = 0: uniform P, O = the mean of V's rows (the P V product and V's layout alone);
    B, v[t, h, d] = (t % 64 == d): O = P folded onto 64 columns (the Q K^T product and softmax);
    C, random. Per point and test: the max abs error vs torch (fp32 math) and where the errors lie
    (rows mod 16 and columns mod 8 of the worst elements: a fragment-layout mistake shows as a pattern)."""
    import cupy as cp
    import torch

    import nnc
    B, S = 1, 128
    pts = [{"cw": 2, "bc": 128, "stages": 2, "persist": 1}, {"cw": 2, "bc": 64, "stages": 2, "persist": 0},
           {"cw": 1, "bc": 64, "stages": 2, "persist": 1}, {"cw": 2, "bc": 128, "stages": 2, "persist": 1, "pingpong": 1}]
    path = out / "diag.onnx"
    import onnx
    onnx.save(attention_onnx(B, S, False), path)
    for p in pts:
        od = out / f"diag_{point_key(p)}".replace(" ", "").replace(",", "_").replace("(", "").replace(")", "")
        try:
            got = build_with(path, od, [point_word(p)])
            m = nnc.load(od)
        except Exception as e:  # noqa: BLE001
            print(f"  diag {point_word(p)}: build failed {type(e).__name__}: {e}"[:300], flush=True)
            continue
        g = torch.Generator(device="cuda").manual_seed(1)

        def rnd():
            return torch.randn(B, S, H * D, device="cuda", dtype=torch.float16, generator=g)
        eye = (torch.arange(S, device="cuda")[:, None] % 64 == torch.arange(D, device="cuda")[None, :]).half()
        tests = {"A q=0": (torch.zeros(B, S, H * D, device="cuda", dtype=torch.float16), rnd(), rnd()),
                 "B v=onehot": (rnd(), rnd(), eye[None, :, None, :].expand(B, S, H, D).reshape(B, S, H * D).contiguous()),
                 "C random": (rnd(), rnd(), rnd())}
        for tname, (q, k, v) in tests.items():
            hq, hk, hv = (x.view(B, S, H, D).transpose(1, 2).float() for x in (q, k, v))
            ref = torch.nn.functional.scaled_dot_product_attention(hq, hk, hv).transpose(1, 2)
            y = cp.full((B, S, H, D), float("nan"), cp.float16)
            res = m.run({"q": cp.asarray(q), "k": cp.asarray(k), "v": cp.asarray(v)}, out={"y": y})["y"]
            cp.cuda.runtime.deviceSynchronize()
            a = torch.as_tensor(res, device="cuda").float()
            err = (a - ref).abs().nan_to_num(1e9)
            bad = err > 2e-2 * max(1.0, ref.abs().max().item())
            line = f"  diag {kernel_name(got):<28} {tname:<11} max err {err.max().item():.3g}  bad {int(bad.sum())}/{bad.numel()}"
            if bad.any():
                idx = bad.nonzero()[:, 1:]  # (s, h, d)
                rows = torch.bincount(idx[:, 0] % 16, minlength=16).tolist()
                cols = torch.bincount(idx[:, 2] % 8, minlength=8).tolist()
                heads = torch.bincount(idx[:, 1], minlength=H).tolist()
                line += f"  rows%16 {rows} cols%8 {cols} heads {heads}"
            print(line, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/bench_attn")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--cases", default="1x128,1x512,32x128,32x512,8x2048", help="BxS,... (H=12, D=64, fp16)")
    ap.add_argument("--wgmma", default="stages2", choices=("stages2", "all", "tma", "default", "none"),
                    help="which declared points of the wgmma kernel to build and time")
    ap.add_argument("--sweep", action="store_true", help="also every declared tile of the mma.sync kernel")
    ap.add_argument("--jobs", type=int, default=0, help="build processes (0: the CPUs, at most 16)")
    ap.add_argument("--diag", action="store_true", help="only the wgmma kernel on crafted inputs (see diag)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.diag:
        diag(out, args)
        return 0
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    built = build_all(cases, out, args)
    for B, S in cases:
        print(f"case B={B} S={S} H={H} D={D}", flush=True)
        try:
            run_case(B, S, out, args, built[(B, S)])
        except Exception as e:  # noqa: BLE001
            ROWS.append(dict(case=f"B={B} S={S}", impl="(case)", ms=None, graph_ms=None, flops=0, err=None,
                             launches=None, note=f"{type(e).__name__}: {e}"[:200]))
            traceback.print_exc()
    print()
    print(f"{'case':<13} {'impl':<34} {'ms':>9} {'TFLOP/s':>8} {'graph ms':>9} {'TFLOP/s':>8} {'max rel err':>11} "
          f"{'launches':>8}  note")
    for r in ROWS:
        print_row(r)
    # per case: torch flash vs the fastest correct row of each nnc kernel (graph time: the kernel alone)
    print()
    print("CUDA-graph ms, no mask: torch flash | the heuristic's pick | fastest mma | fastest wgmma "
          "(ratio torch / nnc: > 1 = nnc faster)")
    for case in dict.fromkeys(r["case"] for r in ROWS):
        rs = [r for r in ROWS if r["case"] == case and r.get("graph_ms")]
        torch_ms = next((r["graph_ms"] for r in rs if r["impl"] == "torch sdpa flash"), None)
        line = f"  {case:<13} torch {fmt(torch_ms, '.4f')}"
        for kind in ("heuristic", "mma", "wgmma"):
            ok = [r for r in rs if r.get("kind") == kind and not r.get("mask") and not r.get("note")]
            if not ok:
                line += f" | {kind} -"
                continue
            best = min(ok, key=lambda r: r["graph_ms"])
            ratio = "" if not torch_ms else f" x{torch_ms / best['graph_ms']:.2f}"
            line += f" | {best['impl'][4:]} {best['graph_ms']:.4f}{ratio}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
