"""Fused attention benchmark: nnc's flash-attention kernel vs torch's scaled_dot_product_attention
(flash backend) on the same shapes (run on the GPU machine; prints a short table last).

    python tools/bench_attention.py [--out /tmp/bench_attn] [--iters 100] [--cases 1x128,32x512] [--sweep]

Per case (B in {1, 32}, S in {128, 512}, H = 12, D = 64, fp16):
- builds an ONNX attention subgraph the way transformers exports it (q/k/v [B,S,H*D] inputs,
  head split Reshape+Transpose, MatMul, Div by sqrt(D), optional additive mask [B,1,1,S],
  Softmax, MatMul, Transpose back to [B,S,H,D]), compiles it with nnc (fp16), and checks that it
  became ONE flash-attention launch;
- checks nnc's output against torch (fp32 math reference on the same fp16 inputs);
- times, with CUDA events (warm-up, then the median of --iters), nnc's whole plan (`run` with
  preallocated outputs; the model is nothing but the attention, so this is the kernel plus the
  runtime's launch overhead) and, where CUDA-graph capture works, the captured plan (the kernel
  alone, no Python in between), vs torch sdpa under sdpa_kernel(SDPBackend.FLASH_ATTENTION) on
  [B,H,S,D] views of the same [B,S,H*D] tensors (the flash backend takes no mask, so the
  mask-free nnc build is the like-for-like row; the masked one is shown too).
--sweep: besides the default build, every tile of the flash-attention variant's declared space
(codegen/kernels/flash_attention.tile_space: m-tiles per warp, warps, K/V rows per tile) is built
(the tile written into the fused op's params, which the variant's default follows) and timed, with
and without the mask; rows "nnc t=<rows>x<bc> w<warps>", the default marked "*", and per case the
fastest tile is printed last (what a timed selector would pick).
TFLOP/s = 4*B*H*S^2*D / time. Every case runs in its own try/except: a failure is a table row.
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


def build_tile(model_path: Path, od: Path, tile):
    """Compiles the model like the driver (fp16), with the fused attention group's params set to
    `tile` ({mi, warps, bc}; None: the pass's own choice); returns the chosen tile as the kernel
    recorded it (MI, WARPS, BC)."""
    import dataclasses

    import onnx

    from nnc.codegen.emit import compile_to_dir
    from nnc.driver import pipeline_passes
    from nnc.onnx_import import import_model
    from nnc.pipeline import Pipeline
    mod = import_model(onnx.load(str(model_path)))
    Pipeline(pipeline_passes("fp16"), verify_each=False).run(mod)
    if tile is not None:
        for op in mod.main.ops:
            if op.name == "fused" and op.attrs.kind == "attention":
                words = [w for w in op.attrs.params.split() if not w.startswith(("tile=", "warps="))]
                words = [f"tile={16 * tile['mi'] * tile['warps']}x{tile['bc']}", f"warps={tile['warps']}"] + words
                op.attrs = dataclasses.replace(op.attrs, params=" ".join(words))
    plan = compile_to_dir(mod, od, arch=None, precision="fp16")
    for k in plan["kernels"]:
        p = k.get("params", {}) if isinstance(k, dict) else {}
        if "MI" in p and "BC" in p:
            return (p["MI"], p["WARPS"], p["BC"])
    return None


def tile_name(t) -> str:
    return "-" if t is None else f"t={16 * t[0] * t[1]}x{t[2]} w{t[1]}"


def run_case(B: int, S: int, out: Path, args) -> None:
    import cupy as cp
    import torch
    import torch.nn.functional as Fn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import nnc
    from nnc.driver import compile_model

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

    from nnc.codegen.kernels.flash_attention import tile_space
    from nnc.codegen.target import resolve_target
    tiles = [None] + (tile_space(D, D, resolve_target(None).smem_per_block_optin) if args.sweep else [])
    for with_mask, tile in [(wm, t) for wm in (False, True) for t in tiles]:
        impl = "nnc" + (" +mask" if with_mask else "")
        row = dict(case=f"B={B} S={S}", impl=impl, ms=None, graph_ms=None, flops=flops, err=None, launches=None,
                   mask=with_mask, sweep=tile is not None)
        ROWS.append(row)
        try:
            od = out / f"attn_b{B}_s{S}{'_mask' if with_mask else ''}"
            model = attention_onnx(B, S, with_mask)
            path = out / f"{od.name}.onnx"
            import onnx
            onnx.save(model, path)
            if tile is None:
                compile_model(str(path), od, precision="fp16")
            else:
                od = od.with_name(od.name + f"_m{tile['mi']}w{tile['warps']}c{tile['bc']}")
                got = build_tile(path, od, tile)
                row["impl"] = impl + " " + tile_name(got)
                if got != (tile["mi"], tile["warps"], tile["bc"]):
                    row["note"] = f"asked {tile}, built {got}"
            m = nnc.load(od)
            if tile is None:
                chosen = next(((k["params"]["MI"], k["params"]["WARPS"], k["params"]["BC"]) for k in m.plan["kernels"]
                               if isinstance(k, dict) and "BC" in k.get("params", {})), None)
                row["impl"] = impl + " " + tile_name(chosen) + "*"
                row["tile"] = chosen
            kernels = [l.get("kernel") or l.get("kind") for l in m.plan["launches"]]
            row["launches"] = len(kernels)
            n_flash = sum(1 for x in kernels if x and "flash_attention" in x)
            if n_flash != 1:
                row["note"] = f"{n_flash} flash launches: {kernels}"
            feed = {"q": cp.asarray(q), "k": cp.asarray(k), "v": cp.asarray(v)}
            if with_mask:
                feed["mask"] = cp.asarray(mask)
            y = cp.empty((B, S, H, D), cp.float16)
            got = m.run(feed, out={"y": y})["y"]
            cp.cuda.runtime.deviceSynchronize()
            a = torch.as_tensor(got, device="cuda").float()
            r = ref[with_mask]
            row["err"] = float((a - r).abs().max().item() / max(1e-6, r.abs().max().item()))
            if not torch.isfinite(a).all():
                row["note"] = "non-finite output"
            row["ms"] = time_cuda(lambda: m.run(feed, out={"y": y}), args.warmup, args.iters)
            row["graph_ms"] = time_graph(lambda: m.run(feed, out={"y": y}, stream=torch.cuda.current_stream().cuda_stream),
                                         args.warmup, args.iters)
        except Exception as e:  # noqa: BLE001 - the row says why
            row["note"] = f"{type(e).__name__}: {e}"[:200]
            traceback.print_exc()


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/bench_attn")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--cases", default="1x128,1x512,32x128,32x512", help="BxS,... (H=12, D=64, fp16)")
    ap.add_argument("--sweep", action="store_true", help="also build and time every declared flash-attention tile")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for c in args.cases.split(","):
        B, S = (int(x) for x in c.split("x"))
        print(f"case B={B} S={S} H={H} D={D}", flush=True)
        try:
            run_case(B, S, out, args)
        except Exception as e:  # noqa: BLE001
            ROWS.append(dict(case=f"B={B} S={S}", impl="(case)", ms=None, graph_ms=None, flops=0, err=None,
                             launches=None, note=f"{type(e).__name__}: {e}"[:200]))
            traceback.print_exc()
    print()
    print(f"{'case':<13} {'impl':<26} {'ms':>9} {'TFLOP/s':>8} {'graph ms':>9} {'TFLOP/s':>8} {'max rel err':>11} "
          f"{'launches':>8}  note")
    for r in ROWS:
        tf = None if not r["ms"] else r["flops"] / (r["ms"] * 1e-3) / 1e12
        gtf = None if not r["graph_ms"] else r["flops"] / (r["graph_ms"] * 1e-3) / 1e12
        print(f"{r['case']:<13} {r['impl']:<26} {fmt(r['ms'], '9.4f')} {fmt(tf, '8.1f')} {fmt(r['graph_ms'], '9.4f')} "
              f"{fmt(gtf, '8.1f')} {fmt(r['err'], '11.2e')} {fmt(r['launches'], '8d')}  {r.get('note', '')}")
    if args.sweep:  # the fastest tile per case (graph time: the kernel alone), vs the default's
        print()
        print("fastest declared tile per case (CUDA-graph ms; '*' rows: the heuristic's default):")
        for case in dict.fromkeys(r["case"] for r in ROWS):
            for mask in (False, True):
                rs = [r for r in ROWS if r["case"] == case and r.get("mask") == mask and r.get("graph_ms")
                      and r["impl"].startswith("nnc") and not r.get("note")]
                if not rs:
                    continue
                best = min(rs, key=lambda r: r["graph_ms"])
                dflt = next((r for r in rs if not r.get("sweep")), None)
                print(f"  {case:<13} {'mask' if mask else 'no mask':<8} best {best['impl']:<26} {best['graph_ms']:.4f} ms"
                      + (f"  default {dflt['impl']} {dflt['graph_ms']:.4f} ms" if dflt else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
