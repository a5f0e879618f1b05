"""Issue 8's RNN benchmark (GPU machine): each model of tools/export_rnn_models.py at each batch,
nnc fp32 and fp16 (each sync scheme of the persistent recurrence: flags / barrier, and each step
of --step-mma: the FMA step "fma" and the tensor-core step "mma", fp16/bf16 only) against torch
eager (cuDNN) at the same precision, torch.compile with --torch-compile. A point is labelled
<sync> (FMA step) or <sync>_mma.

- correctness: nnc vs onnxruntime (CPU, the fp32 export) on fresh random inputs: max |diff| over
  max(1, max |ref|); fp32 <= 1e-3, fp16 <= 1e-2;
- timing: tools/cuda_timing.time_cuda (CUDA events, warm-up, median) of each side, in `--reps`
  alternating rounds (nnc builds, then torch, then again): the median of the rounds' medians;
- the recurrence per step: plan.json's launches timed alone (Module.time_launches) for the
  projection and the sync-word reset; the persistent kernel's own time is the whole run minus
  those (re-running it alone would find its sync words already past: not a valid timing); divided
  by seq x layers. Its bound: the bytes a step moves (each block reads h of its direction from L2,
  G[t], writes h and y[t]) over L2 bandwidth (L2_TBPS) plus one synchronisation, the floor
  measured by --floor (an RNN with hidden 64, batch 1: nothing but the per-step latency chain).

    python tools/bench_rnn.py --models lstm2x512 --batches 1 --out $OUT [--floor] [--torch-compile]
        [--budget-s 120] [--kperm] [--stage-batch] [--step-mma fma,mma,mma4,mma8|both]

issue 8's layer wavefront vs the hoisted tagged recurrence (plain pipeline, quarter blocks) vs cuDNN
(fp16 b1, three alternating rounds, ~2 min):

    python tools/bench_rnn.py --models rnn2x256@1,lstm2x512@1 --precisions fp16 --syncs tagged \
        --step-mma fma --stack wavefront,hoisted --reps 3 --budget-s 110 --out $OUT

issue 8's tensor-core step, new point vs old vs cuDNN, three alternating rounds (< 4 min):

    python tools/bench_rnn.py --models lstm2x512@16,lstm2x512@32,gru5x800bi@16 --syncs barrier \\
        --step-mma both --reps 3 --budget-s 170 --out $OUT

Rows go to OUT/bench_rnn.jsonl as they finish (a later call with other --models appends); a short
table is printed last.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_timing import time_cuda  # noqa: E402
from export_graphs import clamp_ir_version  # noqa: E402
from export_rnn_models import MODELS, export  # noqa: E402

SYNCS = ("flags", "barrier", "tagged")  # (--syncs also takes local: one block a direction, where it fits)
SM_DENSE_FLOPS = 989e12 / 132  # one H100/H200 SM's dense fp16 tensor rate (nominal), FLOP/s
L2_TBPS = 7.0  # H200 L2 read bandwidth, TB/s (nominal; the h broadcast is L2-resident)
TOL = {"fp32": 1e-3, "fp16": 1e-2}
ROWS: list = []


def rel_max(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape or not np.isfinite(got).all():
        return float("inf")
    return float(np.max(np.abs(got - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def build(onnx_path: Path, od: Path, prec: str, sync: str, step_mma=False, half_blocks=False, stack=None) -> Path:
    """Compile with the persistent recurrence's sync scheme forced to `sync` and its step to the
    tensor-core one (step_mma True, at any batch; an int: with that many warps) or the FMA one;
    half_blocks: the space's fewer blocks a direction (True / "h": the second-most, half the h
    broadcast from L2 a step; "q": the fewest, a quarter at batch <= rnn.SMALL_BATCH).
    stack: "hoisted" / "wavefront": the pass layer-wavefront runs after time-fusion (stacked
    unidirectional layers -> recurrence_stack) and recurrence.stack takes that form (the hoisted
    form's per-layer recurrences at `sync`); None: the default pipeline."""
    from nnc import driver
    from nnc.codegen.kernels import recurrence, rnn
    from nnc.driver import compile_model
    if not (od / "plan.json").exists():
        old_passes, old_form = driver.pipeline_passes, recurrence.DEFAULT_STACK_FORM
        old_wave_default = recurrence.wavefront_default
        old_stack_onchip = recurrence.DEFAULT_STACK_ONCHIP
        if stack:
            from nnc.passes import layer_wavefront

            def with_stack(*a, **k):
                ps = old_passes(*a, **k)
                if "layer-wavefront" not in ps:  # (once the lead's pipeline has it, as is)
                    ps.insert(ps.index("time-fusion") + 1, ("layer-wavefront", layer_wavefront.run))
                return ps
            driver.pipeline_passes = with_stack
            form, _, nsb = stack.partition("@")
            recurrence.DEFAULT_STACK_FORM = form
            if form == "onchip":  # the on-chip wavefront at that point (onchip@cNkMwW[h1|h2])
                recurrence.DEFAULT_STACK_ONCHIP = stack_onchip_point(nsb)
            elif nsb:  # the wavefront at nsb blocks a layer (its default tiling there)
                def at_nsb(kind, B, H, space, _default=old_wave_default):
                    return _default(kind, B, H, [p for p in space if p.get("nsb") == int(nsb)])
                recurrence.wavefront_default = at_nsb
        default = rnn.recurrence_default
        if half_blocks:
            def fewer(spec, target, space=None):
                space = rnn.recurrence_space(spec, target) if space is None else space
                counts = sorted({p["nsb"] for p in space}, reverse=True)
                pick = counts[-1] if half_blocks == "q" else counts[min(1, len(counts) - 1)]
                return default(spec, target, [p for p in space if p["nsb"] == pick])
            rnn.recurrence_default = fewer
        names = ("DEFAULT_SYNC", "DEFAULT_SYNC_SMALL_BATCH", "DEFAULT_KPERM", "DEFAULT_STAGE_BATCH", "DEFAULT_STEP_MMA",
                 "MMA_MIN_BATCH", "DEFAULT_MMA_WARPS", "DEFAULT_ONCHIP", "DEFAULT_ONCHIP_HSPLIT", "DEFAULT_ONCHIP_CLUSTER",
                 "DEFAULT_ONCHIP_KSPLIT")
        old = [getattr(rnn, n) for n in names]
        oc = onchip_form(sync)
        onchip = oc is not None
        new = (rnn.ONCHIP if onchip else sync, None, bool(ARGS and ARGS.kperm), bool(ARGS and ARGS.stage_batch),
               bool(step_mma), 1, step_mma if not isinstance(step_mma, bool) else None, onchip) + (oc or (None, None, None))
        for n, v in zip(names, new):
            setattr(rnn, n, v)
        try:
            compile_model(str(onnx_path), od, precision=prec)
        finally:
            for n, v in zip(names, old):
                setattr(rnn, n, v)
            rnn.recurrence_default = default
            driver.pipeline_passes, recurrence.DEFAULT_STACK_FORM = old_passes, old_form
            recurrence.wavefront_default = old_wave_default
            recurrence.DEFAULT_STACK_ONCHIP = old_stack_onchip
    return od


def stack_onchip_point(text: str) -> dict:
    """cNkMwW[h1|h2] -> the on-chip wavefront's point: N CTAs a layer, M k groups, W warps, h 16-bit
    (h1) or hi + lo (h2; absent: the cell's default)."""
    m = re.fullmatch(r"c(\d+)k(\d+)w(\d+)(?:h([12]))?", text)
    if not m:
        raise SystemExit(f"--stack onchip@{text}: expected onchip@cNkMwW[h1|h2], e.g. onchip@c4k4w16h2")
    return dict(cluster=int(m.group(1)), ksplit=int(m.group(2)), warps=int(m.group(3)),
                hsplit={"1": False, "2": True}.get(m.group(4)))


def onchip_form(sync: str):
    """onchip[1|2][cN][kM] -> (hsplit, cluster, k split) for the on-chip recurrence (None: the cell's
    default h split / the heuristic's cluster and k split); None for other syncs. onchip1: h 16-bit,
    onchip2: hi + lo; cN: a cluster of N CTAs a direction; kM: M k groups of warps."""
    m = re.fullmatch(r"onchip([12]?)(?:c(\d+))?(?:k(\d+))?", sync)
    if not m:
        return None
    return ({"1": False, "2": True}.get(m.group(1)), int(m.group(2)) if m.group(2) else None,
            int(m.group(3)) if m.group(3) else None)


def code_tag() -> str:
    """A hash of the recurrence's code, in the build directories' names: a later call on the same
    machine with changed kernels rebuilds instead of loading the old plan."""
    import hashlib
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha1()
    for f in ("codegen/kernels/rnn.py", "codegen/kernels/recurrence.py", "templates/rnn.cu.j2",
              "templates/rnn_wavefront.cu.j2", "templates/rnn_onchip.cu.j2", "compiler/passes/time_fusion.py", "compiler/passes/layer_wavefront.py"):
        p = root / f
        h.update(p.read_bytes() if p.exists() else b"")
    return h.hexdigest()[:8]


def points() -> list:
    """(label, sync, step_mma, half_blocks, stack) of the nnc builds each row times: every sync x
    step, then (--stack) the layer-wavefront pass's forms: "wave" (the wavefront kernel) and
    "<sync>_stk" (the hoisted form: per layer the recurrence at that sync's default point)."""
    kinds = {"fma": False, "mma": True, "mma4": 4, "mma8": 8, "mma16": 16}
    names = ("fma,mma" if ARGS.step_mma == "both" else ARGS.step_mma).split(",") if ARGS else ["fma"]
    syncs = [s for s in (ARGS.syncs.split(",") if ARGS else SYNCS) if s]
    pts = [(sync + ("" if n == "fma" else "_" + n), sync, kinds[n.rstrip("hq")], n[-1] if n[-1] in "hq" else False,
            None) for sync in syncs for n in names]
    for form in (ARGS.stack.split(",") if ARGS and ARGS.stack else []):
        if form == "wavefront" or form.startswith("wavefront@"):  # @n: n blocks a layer
            pts.append(("wave" + form.partition("@")[2], "tagged", False, False, form))
        elif form == "hoisted":
            pts += [(f"{sync}_stk", sync, False, False, "hoisted") for sync in syncs or ["tagged"]]
        elif form.startswith("onchip@"):  # the on-chip wavefront (one cluster, every layer)
            stack_onchip_point(form.partition("@")[2])
            pts.append(("ocw_" + form.partition("@")[2], "tagged", False, False, form))
        else:
            raise SystemExit(f"--stack: unknown form {form!r} (hoisted, wavefront[@nsb], onchip@cNkMwW[h1|h2])")
    return pts


def rec_launches(plan: dict) -> list:
    return [i for i, l in enumerate(plan["launches"]) if (l.get("kernel") or "").startswith(("nnc_coop_", "nnc_rnn_onchip"))]


def rec_params(plan: dict) -> list:
    ks = {k["name"]: k["params"] for k in plan["kernels"]}
    return [ks[plan["launches"][i]["kernel"]] for i in rec_launches(plan)]


def step_bound_us(spec_params: dict, sync_us: float) -> float:
    """Bytes one step of one layer moves over L2 bandwidth, plus one synchronisation."""
    p = spec_params
    D, B, H, NG = p["D"], p["B"], p["H"], p["NG"]
    if p.get("sync") == "onchip":  # h stays in the block: G[t] and y[t] over L2, plus the MMAs on one SM
        mp = -(-B // 16) * 16
        flops = 2.0 * mp * NG * H * H * (2 if p.get("HSPLIT") else 1)
        return (D * B * (NG * H * 4 + H * 2)) / (L2_TBPS * 1e12) * 1e6 + flops / SM_DENSE_FLOPS * 1e6
    esz = 4 if p["rt"] == "float" else 2
    # h between steps: fp32, or the storage dtype (mma); tagged: {fp32, tag} 8 bytes, {16-bit, tag} 4
    hsz = {"float": 4, "unsigned int": 4 if p.get("STEP_MMA") else 8}.get(p.get("ht", "float"), 2)
    nblk = D * p["NSB"]
    h_reads = nblk * B * H * hsz
    g = D * B * NG * H * 4
    writes = D * B * H * (hsz + esz)
    return (h_reads + g + writes) / (L2_TBPS * 1e12) * 1e6 + sync_us


def row(**r):
    ROWS.append(r)
    print(json.dumps(r), flush=True)
    if ARGS.out:
        with open(ARGS.out / "bench_rnn.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")


def floor_bench(work: Path) -> dict:
    """Per-step time of a recurrence with nothing to compute (RNN hidden 64, batch 1, 2048 steps):
    the synchronisation + latency chain of each sync scheme, in microseconds."""
    import cupy as cp
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh
    import nnc
    S, H = 2048, 64
    r = np.random.default_rng(0)
    w = (r.standard_normal((1, H, H)) * 0.1).astype(np.float32)
    g = h.make_graph([h.make_node("RNN", ["x", "W", "R"], ["y"], hidden_size=H)], "floor",
                     [h.make_tensor_value_info("x", T.FLOAT, [S, 1, H])], [h.make_tensor_value_info("y", T.FLOAT, None)],
                     [nh.from_array(w, "W"), nh.from_array(w.copy(), "R")])
    m = clamp_ir_version(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]))
    p = work / "floor.onnx"
    onnx.save(m, str(p))
    out = {}
    x = cp.asarray(r.standard_normal((S, 1, H)).astype(np.float32))
    for sync in SYNCS:
        mod = nnc.load(build(p, work / f"floor_{sync}_{code_tag()}", "fp32", sync))
        t = time_cuda(lambda: mod.run({"x": x}), warmup=3, iters=10)
        out[sync] = t * 1e3 / S
    row(part="floor", S=S, H=H, **{f"{k}_us_per_step": v for k, v in out.items()})
    return out


def bench_one(name: str, batch: int, work: Path, precs, pts, floor: dict):
    import cupy as cp
    import onnxruntime as ort
    import torch
    import nnc
    spec = MODELS[name]
    path = export(spec, batch, work)
    rng = np.random.default_rng()
    x = rng.standard_normal(spec.input_shape(batch)).astype(np.float32)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    tm32 = spec.torch_module().cuda()
    for prec in precs:
        r = {"part": "bench", "model": name, "batch": batch, "prec": prec, "kperm": bool(ARGS.kperm),
             "stage_batch": bool(ARGS.stage_batch)}
        mods = {}
        for label, sync, mma, half, stack in pts:
            if mma and prec == "fp32":
                continue  # the tensor-core step is fp16/bf16 only
            try:
                t0 = time.time()
                od = build(path, work / f"{name}_b{batch}_{prec}_{label}{'_kperm' if ARGS.kperm else ''}"
                           f"{'_sb' if ARGS.stage_batch else ''}_{code_tag()}", prec, sync, mma, half, stack)
                m = nnc.load(od)
                r[f"compile_s_{label}"] = round(time.time() - t0, 1)
                xin = x.astype(m.inputs[0].dtype)
                got = m.run({"x": xin}, output="numpy", poison=True)["y"]
                r[f"err_{label}"] = rel_max(got, ref)
                r[f"ok_{label}"] = r[f"err_{label}"] <= TOL[prec]
                if mma and not all(p.get("STEP_MMA") for p in rec_params(m.plan)):
                    r[f"note_{label}"] = "not every recurrence took the tensor-core step (space: fp16/bf16, H % 8)"
                if stack and stack.startswith("wavefront") and not any("wavefront" in (la.get("kernel") or "") for la in m.plan["launches"]):
                    r[f"note_{label}"] = "no wavefront kernel: layer-wavefront stacked nothing (bidirectional?)"
                if stack and stack.startswith("onchip") and not any(
                        "_stack" in (la.get("kernel") or "") for la in m.plan["launches"]):
                    r[f"note_{label}"] = "no on-chip stack kernel (no stack, or no on-chip point at this shape)"
                if not (stack and stack.startswith(("wavefront", "onchip"))) and any(
                        p.get("sync") != ("onchip" if sync.startswith("onchip") else sync) for p in rec_params(m.plan)):
                    r[f"note_sync_{label}"] = (f"not every recurrence has sync {sync} (local: one block a direction, "
                                               f"only where R, h and B*H gate threads fit one SM)")
                if onchip_form(sync):  # the on-chip layouts the recurrences took (CTAs a direction, k groups, threads)
                    r[f"onchip_{label}"] = sorted({f"c{p.get('CL', 1)}k{p.get('KSP', 1)}t{p.get('NTHR')}"
                                                   f"{'h2' if p.get('HSPLIT') else ''}" for p in rec_params(m.plan)
                                                   if p.get("sync") == "onchip"})
                mods[label] = (m, cp.asarray(xin), xin, sync)
            except Exception as e:
                r[f"error_{label}"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
        tm = tm32.half() if prec == "fp16" else tm32.float()
        tx = torch.from_numpy(x).cuda()
        tx = tx.half() if prec == "fp16" else tx
        with torch.no_grad():
            tref = tm(tx).float().cpu().numpy()
        r["torch_err"] = rel_max(tref, ref)
        cm = None
        if ARGS.torch_compile:
            try:
                cm = torch.compile(tm)
                with torch.no_grad():
                    cm(tx)
            except Exception as e:
                r["torch_compile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                cm = None
        rounds = {k: [] for k in list(mods) + ["torch"] + (["torch_compile"] if cm is not None else [])}
        with torch.no_grad():
            for _ in range(ARGS.reps):  # alternate: the peer moves +-30 % between runs on this machine
                for label, (m, dx, _, _) in mods.items():
                    rounds[label].append(time_cuda(lambda m=m, dx=dx: m.run({"x": dx}), warmup=3, iters=ARGS.iters))
                rounds["torch"].append(time_cuda(lambda: tm(tx), warmup=3, iters=ARGS.iters))
                if cm is not None:
                    rounds["torch_compile"].append(time_cuda(lambda: cm(tx), warmup=3, iters=ARGS.iters))
        for k, v in rounds.items():
            if v:
                r[f"{k}_ms"] = float(np.median(v))
                r[f"{k}_rounds_ms"] = [round(t, 4) for t in v]
        # the recurrence per step, derived (see the docstring), for the default sync
        for label, (m, _, xin, sync) in mods.items():
            try:
                lt = m.time_launches({"x": xin}, reps=5, repeats=3)
                recs = set(rec_launches(m.plan))
                other = sum(t for i, t in enumerate(lt) if t is not None and i not in recs)
                layers = max(1, len(recs))
                rec_ms = r[f"{label}_ms"] - other
                r[f"other_launches_ms_{label}"] = other
                ps = rec_params(m.plan)
                if ps and "L" in ps[-1]:  # the wavefront: S + L - 1 serial steps in one launch
                    r[f"rec_step_us_{label}"] = rec_ms * 1e3 / (spec.seq + ps[-1]["L"] - 1)
                    r[f"rec_params_{label}"] = {k: ps[-1].get(k) for k in ("L", "NSB", "HS", "TR", "KS", "NTHR")}
                    ps = []
                else:
                    r[f"rec_step_us_{label}"] = rec_ms * 1e3 / (spec.seq * layers)
                if ps:
                    r[f"step_bound_us_{label}"] = step_bound_us(ps[-1], floor.get(sync, 1.0))
                    r[f"rec_params_{label}"] = {k: ps[-1].get(k) for k in ("NSB", "HS", "TR", "TB", "KS", "NTHR", "R_SMEM",
                                                                            "KPERM", "STAGE_BATCH", "STEP_MMA", "NW",
                                                                            "MP", "NP", "sync", "U", "HSPLIT", "PF")}
                r["launches"] = len(m.plan["launches"])
            except Exception as e:
                r[f"per_step_error_{label}"] = f"{type(e).__name__}: {str(e)[:200]}"
        row(**r)


def table():
    labels = [pt[0] for pt in points()]
    print("\n==== bench_rnn (ms; speedup = torch eager / nnc best point; us/step (bound) per point) ====")
    cw = max([13] + [len(lb) + 2 for lb in labels])
    print(f"{'model':<12}{'b':>3} {'prec':<5}{'err':>9} {'ok':<3}" + "".join(f"{lb:>{cw}}" for lb in labels)
          + f"{'torch':>8}{'tcomp':>8}{'speedup':>8}  " + "  ".join(f"{lb + ' us/step':>20}" for lb in labels))
    f = lambda v, w=8, p=3: f"{v:>{w}.{p}f}" if isinstance(v, (int, float)) and v is not None else f"{'-':>{w}}"
    for r in ROWS:
        if r["part"] == "floor":
            print("floor (sync+latency, us/step): " + ", ".join(
                f"{s} {r.get(f'{s}_us_per_step', float('nan')):.2f}" for s in SYNCS))
            continue
        if "error" in r:
            print(f"{r['model']:<12}{r['batch']:>3} error: {r['error'][:100]}")
            continue
        ts = {lb: r.get(f"{lb}_ms") for lb in labels if r.get(f"{lb}_ms") is not None}
        best = min(ts.values()) if ts else None
        errs = [r.get(f"err_{lb}") for lb in labels if r.get(f"err_{lb}") is not None]
        ok = all(r.get(f"ok_{lb}", True) for lb in labels) and bool(errs)
        sp = r.get("torch_ms") / best if best and r.get("torch_ms") else None
        steps = "  ".join(f"{f(r.get(f'rec_step_us_{lb}'), 9, 2)} ({f(r.get(f'step_bound_us_{lb}'), 6, 2)})"
                          for lb in labels)
        print(f"{r['model']:<12}{r['batch']:>3} {r['prec']:<5}{max(errs) if errs else float('nan'):>9.1e} "
              f"{'y' if ok else 'N':<3}" + "".join(f(ts.get(lb), cw) for lb in labels)
              + f"{f(r.get('torch_ms'))}{f(r.get('torch_compile_ms'))}{f(sp, 8, 2)}  {steps}")
        for k, v in r.items():
            if k.startswith(("error_", "note_", "per_step_error_")):
                print(f"    {k}: {v}")


def main(argv=None) -> int:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default="", help="these batches (comma-separated) of every model; default: each "
                    "model's own (a --models item name@b runs batch b of that model only)")
    ap.add_argument("--precisions", default="fp32,fp16")
    ap.add_argument("--syncs", default="flags,barrier,tagged",
                    help="flags, barrier, tagged, local, onchip[1|2][cN][kM] (the on-chip recurrence: 1 h 16-bit, "
                         "2 hi + lo; cN a cluster of N CTAs a direction; kM M k groups of warps)")
    ap.add_argument("--step-mma", default="fma",
                    help="the recurrence steps to time, comma-separated: fma (CUDA cores), mma (tensor cores, space "
                         "param step_mma, the cost model's warps), mma4 / mma8 (4 / 8 warps); a suffix h (fmah, "
                         "mma8h): half the blocks a direction, q (fmaq): the fewest (a quarter at batch <= 4); "
                         "both = fma,mma")
    ap.add_argument("--stack", default="",
                    help="also time the layer-wavefront pass's recurrence_stack forms, comma-separated: wavefront "
                         "(label wave: one launch, layer l at step t while l+1 at t-1; wavefront@n: n blocks a layer, "
                         "label wave<n>), hoisted (label <sync>_stk: "
                         "per layer the recurrence, then the next projection GEMM); --syncs '' leaves out the "
                         "plain builds")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--floor", action="store_true", help="measure the per-step sync floor first")
    ap.add_argument("--torch-compile", action="store_true")
    ap.add_argument("--kperm", action="store_true", help="fp16/bf16 R in the permuted k order (space param kperm)")
    ap.add_argument("--stage-batch", action="store_true", help="h staged 8 loads a thread in flight (stage_batch)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/rnn_bench"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="start no new model/batch after this many seconds (so the table still prints in a "
                         "time-limited call); 0: no limit")
    ARGS = ap.parse_args(argv)
    ARGS.work.mkdir(parents=True, exist_ok=True)
    if ARGS.out:
        ARGS.out.mkdir(parents=True, exist_ok=True)
    batches = {int(b) for b in ARGS.batches.split(",") if b}
    floor = {}
    if ARGS.floor:
        try:
            floor = floor_bench(ARGS.work)
        except Exception:
            traceback.print_exc()
    for item in ARGS.models.split(","):
        name, _, at = item.partition("@")
        if name not in MODELS:
            ap.error(f"unknown model {name!r} (known: {', '.join(MODELS)})")
        for b in [int(at)] if at else sorted(batches) if batches else MODELS[name].batches:
            if ARGS.budget_s and time.time() - T0 > ARGS.budget_s:
                print(f"--budget-s {ARGS.budget_s:g} spent: {name} b{b} not run", flush=True)
                continue
            try:
                bench_one(name, b, ARGS.work, ARGS.precisions.split(","), points(), floor)
            except Exception as e:
                row(part="bench", model=name, batch=b, prec="-", error=f"{type(e).__name__}: {str(e)[:300]}")
                traceback.print_exc()
    table()
    return 0


ARGS = None
T0 = time.time()
if __name__ == "__main__":
    raise SystemExit(main())
