"""The `nnc` command line: ir | opt | compile | run | verify | bench | inspect.

Errors go to stderr with exit status 1 and no traceback (add --debug for one).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__, progress
from .ir.errors import NncError

NONFINITE_EXIT = 3  # `nnc run`: the model ran, but an output holds NaN or inf (1 = error, 2 = usage)
EPILOG = "Docs: README.md. Shapes use trtexec's convention: --shapes input:1x3x224x224,mask:1x128"


SHAPES_HELP = (
    "bind input dims, trtexec's syntax: NAME:DxDx..[,NAME:Dx..], e.g. input:1x3x224x224,mask:1x128 "
    "(dims: integers >= 0; 'NAME:' is a scalar; the name ends at the last ':'). A named input must keep "
    "the model's rank and fixed dims. A symbolic dim (an ONNX dim_param such as N) bound in one input is "
    "bound in every input that uses it. Inputs not named keep their dims, and dims left symbolic stay "
    "symbolic: fine for `nnc ir` and the reference backend, while CUDA codegen needs every dim static "
    "and names the value that is not (`nnc compile` with neither --shapes nor --profile sets every symbolic "
    "input dim to 1, with a warning, as trtexec does)")


def _add_shapes(p):
    p.add_argument("--shapes", default="", metavar="NAME:DxD..,...", help=SHAPES_HELP)


def _add_verbose(p, what):
    p.add_argument("-v", "--verbose", action="store_true", help=f"print {what} to stderr")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nnc", description="nnc: ahead-of-time ONNX -> CUDA C++ compiler",
                                 epilog=EPILOG)
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    ap.add_argument("--version", action="version", version=f"nnc {__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")

    p = sub.add_parser("ir", help="import an ONNX model and print its IR",
                       description="Imports MODEL.onnx and prints the IR (constants over 16 elements are "
                                   "shown by weight name). With -o, writes FILE.nnir plus its weights.")
    p.add_argument("model", help="ONNX model file")
    _add_shapes(p)
    p.add_argument("-o", "--output", help="write IR to this .nnir file (and <stem>.weights.bin/.json)")
    p.add_argument("--verify", action="store_true", help="run the verifier on the imported IR")

    p = sub.add_parser("opt", help="parse IR, run passes, print IR (like mlir-opt)",
                       description="Parses FILE.nnir, runs the named passes in order and prints the IR. "
                                   "With no --passes it prints the parsed IR unchanged (the round-trip check).")
    p.add_argument("file", nargs="?", help="IR text file (weights are read from <stem>.weights.* beside it); "
                                           "not needed with --list-passes")
    p.add_argument("--passes", default="", help="comma-separated pass names, e.g. fold-constants,canonicalize,dce")
    p.add_argument("--verify-each", action="store_true", help="run the verifier after every pass")
    p.add_argument("--dump-ir", metavar="DIR", help="write NN-<pass>.nnir after each pass into DIR")
    p.add_argument("--list-passes", action="store_true", help="list the known passes (with what each does) and exit")
    _add_verbose(p, "each pass's time and the op count after it")
    p.add_argument("-o", "--output", help="write the result here instead of stdout (weights beside it)")

    p = sub.add_parser("compile", help="compile an ONNX model into an output directory",
                       description="Imports MODEL.onnx, runs the default pass pipeline and writes OUT/: "
                                   "ir/final.nnir (+ weights), plan.json, and the generated CUDA.")
    p.add_argument("model", help="ONNX model file")
    p.add_argument("-o", "--out", required=True, help="output directory")
    _add_shapes(p)
    p.add_argument("--profile", action="append", default=[], metavar="NAME:MIN/OPT/MAX,...",
                   help="an optimization profile (trtexec's --minShapes/--optShapes/--maxShapes in one): per input "
                        "NAME:MIN/OPT/MAX with each shape DxDx.., inputs joined by ','; give it several times for "
                        "several profiles. min=opt=max is a static build (several: one each under OUT/profiles/); "
                        "ranges need --no-codegen for now (the reference backend checks them per run)")
    p.add_argument("--arch", default=None, help="GPU architecture, e.g. sm_90 (default: the GPU present, else sm_90)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16", "best", "int8", "fp8"], default="fp32",
                   help="storage type of weights and activations (accumulation stays fp32); best: per layer, "
                        "the fastest of --allow within --max-rel-err; int8: Q/DQ around Conv/Gemm/MatMul from "
                        "--calib, the other ops fp32; fp8: MatMul/Gemm in e4m3 (activation scales amax/448 from "
                        "--calib, per-column weight scales), the other ops fp16")
    p.add_argument("--calib", default=None, metavar="FILE",
                   help="--precision int8 / fp8 (or best with --allow int8/fp8): activation scales (amax), calib.json from `nnc calibrate` or a "
                        "TensorRT calibration cache (first line TRT-...)")
    p.add_argument("--keep-fp32", default="", metavar="PATTERN,...",
                   help="layers kept at fp32: ONNX node-name globs or op types (with --precision fp16/bf16/best)")
    p.add_argument("--allow", default="", metavar="TYPE,...",
                   help="--precision best: the types layers may take (default fp16,bf16,fp32; fp32 is the fallback); "
                        "int8 / fp8 need --calib and apply to Conv/Gemm/MatMul layers with constant weights")
    p.add_argument("--max-rel-err", type=float, default=None, metavar="E",
                   help="--precision best: budget for each output's relative L2 error against fp32 (default 1e-2)")
    p.add_argument("--calib-data", default=None, metavar="NPZ_OR_DIR",
                   help="--precision best: calibration inputs, an .npz keyed by input name or a directory of them "
                        "(default: seeded random inputs, with a warning)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 tensor cores for fp32 GEMMs and convolutions")
    p.add_argument("--weights", choices=["float", "int4"], default="float",
                   help="int4: MatMul/Gemm constant weights quantized at compile time to symmetric int4 groups "
                        "along K (weight-only; relative weight error about 9-10%%: compare with the float build)")
    p.add_argument("--int4-block", type=int, choices=[32, 64, 128], default=32,
                   help="--weights int4: weights per group (one fp16-representable scale each)")
    p.add_argument("--sparsity", choices=["off", "enable", "force"], default="off",
                   help="2:4 structured sparsity (TensorRT's meanings): enable: MatMul/Gemm constant weights that "
                        "are 2:4-sparse along K use the sparse tensor cores (fp16/bf16, sm_80+); force: prune the "
                        "others to 2:4 by magnitude first (CHANGES the model's outputs: for benchmarking)")
    p.add_argument("--backend", choices=["nvrtc", "nvcc"], default="nvrtc", help="CUDA compiler to use")
    p.add_argument("--name", default=None,
                   help="the model's C API name: its symbols are nnc_NAME_create, nnc_NAME_run, ... "
                        "(a C identifier; default: the model file's name)")
    p.add_argument("--no-codegen", action="store_true", help="stop after writing the IR and plan.json")
    p.add_argument("--devices", type=int, default=None, metavar="K",
                   help="plan the model over K devices (nnc/multi_device.py): one build per device under "
                        "OUT/device<K>/, the communication in plan.json and OUT/ir/multi.nnmd")
    p.add_argument("--parallel", choices=["pipeline", "tensor", "auto"], default="pipeline",
                   help="--devices: contiguous pipeline stages (default), tensor-parallel transformer blocks, "
                        "or auto (tensor where it shards a block, else pipeline)")
    p.add_argument("--micro-batches", type=int, default=1, metavar="M",
                   help="--parallel pipeline: M micro-batches in flight (GPipe); each device compiles for "
                        "batch/M, axis 0 of every input")
    p.add_argument("--stage-times", default=None, metavar="PLAN.json",
                   help="--parallel pipeline: balance stages by the measured kernel times of this tuned "
                        "single-device plan.json (default: FLOP and byte estimates)")
    p.add_argument("--no-fuse", action="store_true",
                   help="leave out the fusion passes (fuse-*) and the folding fusions (fold-batchnorm, fuse-horizontal): about one kernel per op")
    p.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the cubin cache ($NNC_CACHE_DIR, else $XDG_CACHE_HOME/nnc or ~/.cache/nnc)")
    p.add_argument("-j", "--jobs", type=int, default=None, metavar="N",
                   help="compile the kernels in N parallel processes (default: the number of CPUs)")
    _add_verbose(p, "each pass's time and op count, the kernel and launch counts and each stage's time")
    p.add_argument("--verify-each", action="store_true", help="run the verifier after every pass")
    p.add_argument("--dump-ir", metavar="DIR", help="write NN-<pass>.nnir after each pass into DIR")
    tune = p.add_mutually_exclusive_group()  # kernel selection by timing (codegen/tuning.py)
    tune.add_argument("--tune", dest="tune", action="store_const", const=True, default=None,
                      help="time every kernel candidate on the GPU and keep the fastest correct one "
                           "(default: when a GPU is present; $NNC_TUNE=0 turns the default off)")
    tune.add_argument("--no-tune", dest="tune", action="store_const", const=False,
                      help="pick kernels by the heuristic (no GPU needed: cross-compiling)")
    p.add_argument("--tune-budget", type=float, default=None, metavar="SECONDS",
                   help="seconds of GPU timing for the kernel tuning (the candidates' rendering and parallel "
                        "compile come first and are not counted); problems left when it runs out use the heuristic")
    p.add_argument("--timing-cache", default=None, metavar="FILE",
                   help="read and write this timing cache (a corrupt, stale or foreign one is rebuilt)")

    p = sub.add_parser("calibrate", help="INT8 calibration: activation scales for nnc compile --precision int8",
                       description="Runs MODEL on the reference interpreter over --data and writes the activation "
                                   "scales (amax) of every Conv/Gemm/MatMul input and output (compiler/calibrate.py); "
                                   "the same file serves --precision fp8 (scale amax/448; --method minmax suits it).")
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--data", required=True, metavar="NPZ_OR_DIR",
                   help="calibration inputs: an .npz with one array per model input (first axis = samples), "
                        "or a directory of them")
    p.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="entropy",
                   help="max |x|; TensorRT's KL-divergence threshold (default); or a percentile of |x|")
    p.add_argument("--percentile", type=float, default=99.99, help="--method percentile: which (default 99.99)")
    _add_shapes(p)
    p.add_argument("-o", "--out", default=None, metavar="CALIB.json", help="write calib.json here")
    p.add_argument("--trt-cache", default=None, metavar="FILE", help="also (or instead) write a TensorRT calibration cache")
    _add_verbose(p, "each tensor's max |x| and chosen amax")

    p = sub.add_parser("prune", help="write a 2:4-pruned copy of an ONNX model (for --sparsity enable, fine-tuning)",
                       description="Prunes every MatMul/Gemm constant weight (K % 4 == 0) to 2:4 along K by magnitude, "
                                   "in the initializers (compiler/prune.py). The copy computes different numbers.")
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--2:4", dest="two_four", action="store_true", required=True, help="2:4 structured sparsity along K")
    p.add_argument("-o", "--out", required=True, metavar="PRUNED.onnx", help="where to write the pruned copy")

    p = sub.add_parser("timing-cache", help="timing cache files (nnc compile --timing-cache)")
    tsub = p.add_subparsers(dest="tc_cmd", required=True)
    m = tsub.add_parser("merge", help="merge timing caches of one GPU (the faster entry wins)")
    m.add_argument("files", nargs="+", help="timing cache files")
    m.add_argument("-o", "--output", required=True, help="the merged cache")

    p = sub.add_parser("run", help="run a compiled output directory on inputs",
                       description="Runs OUT with inputs from an .npz whose keys are the model's input names; "
                                   "prints a summary of each output. Random inputs are drawn when --inputs is omitted.")
    p.add_argument("out", help="directory written by `nnc compile`")
    p.add_argument("--inputs", help=".npz file keyed by input name")
    p.add_argument("--backend", choices=["reference", "cuda"], default="reference",
                   help="reference: numpy reference semantics (by default inside the planned arena, see "
                        "--in-arena); cuda: the generated kernels")
    p.add_argument("--transport", choices=["auto", "nccl", "copy"], default="auto",
                   help="a directory compiled with --devices K, --backend cuda: nccl (device k on GPU k), copy (all "
                        "devices on one GPU, copies standing in for NCCL), auto (nccl when K GPUs are present)")
    arena = p.add_mutually_exclusive_group()
    arena.add_argument("--in-arena", dest="arena", action="store_const", const=True, default=None,
                       help="reference backend: execute the plan itself on the CPU, every value at its "
                            "plan.json offset in one byte arena, temporaries poisoned, so a wrong plan gives "
                            "wrong answers (the default when plan.json has steps; an error when it has none)")
    arena.add_argument("--no-arena", dest="arena", action="store_const", const=False,
                       help="reference backend: the plain interpreter on ir/final.nnir (values in their own arrays)")
    p.add_argument("--save", help="write outputs to this .npz (keys: output names)")
    p.add_argument("--seed", type=int, default=0, help="seed for random inputs")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="cuda backend: launch every kernel from the host instead of replaying the captured CUDA graph")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help=f"exit 0 even when an output holds NaN or inf (by default each such output "
                        f"gets a warning line on stderr naming it with its NaN/inf counts, and the exit "
                        f"status is {NONFINITE_EXIT}; --save still writes the outputs)")

    p = sub.add_parser("verify", help="compare nnc with onnxruntime, per output or per layer",
                       description="Compiles MODEL.onnx with the same pipeline as `nnc compile`, runs it and "
                                   "onnxruntime on the same inputs (random unless --inputs) and prints max-abs / "
                                   "rel-L2 error and a verdict per output. Exit status 0 only if every output "
                                   "passes |nnc - ort| <= atol + rtol*|ort| elementwise. --per-layer also compares "
                                   "every intermediate tensor that survives compilation and names the first layer "
                                   "over tolerance and the first producing non-finite values.")
    p.add_argument("model", help="ONNX model file")
    _add_shapes(p)
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="as for nnc compile (the precision passes run, so fp16 overflow shows up)")
    p.add_argument("--tf32", action="store_true", help="cuda backend: allow TF32 tensor cores (rtol 3e-3)")
    p.add_argument("--backend", choices=["reference", "cuda"], default="reference",
                   help="reference: numpy interpreter on the final IR; cuda: the generated kernels (needs a GPU)")
    p.add_argument("--inputs", help=".npz keyed by input name (default: random inputs; its shapes bind symbolic dims)")
    p.add_argument("--seed", type=int, default=0, help="seed for random inputs")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance (default fp32 1e-3, fp16/bf16 1e-2)")
    p.add_argument("--atol", type=float, default=None,
                   help="absolute tolerance (default: rtol x max|onnxruntime value| of each tensor)")
    p.add_argument("--per-layer", action="store_true", help="compare every intermediate tensor, not only outputs")

    p = sub.add_parser("bench", help="time a compiled output directory as trtexec does",
                       description="Runs OUT on random inputs: latency per request (host wall clock: H2D + "
                                   "compute + D2H) min/mean/median/p90/p99/max, throughput (batch = the first "
                                   "input's leading dim), GPU compute time (CUDA events around the graph launch "
                                   "or kernel sequence) and H2D / D2H copy times (CUDA events). See nnc/bench.py.")
    p.add_argument("out", help="directory written by `nnc compile`")
    p.add_argument("--iterations", type=int, default=200, metavar="K", help="timed requests (default 200)")
    p.add_argument("--warmup", type=int, default=20, metavar="W", help="untimed requests first (default 20)")
    p.add_argument("--json", metavar="F", help="also write the numbers (and GPU, driver, versions, date) to F")
    p.add_argument("--no-cuda-graph", action="store_true", help="launch every kernel from the host (no CUDA graph)")
    p.add_argument("--transport", choices=["auto", "nccl", "copy"], default="auto",
                   help="a directory compiled with --devices K, --backend cuda: nccl (device k on GPU k), copy (all "
                        "devices on one GPU, copies standing in for NCCL), auto (nccl when K GPUs are present)")
    p.add_argument("--backend", choices=["cuda", "reference"], default="cuda",
                   help="reference: time the numpy reference instead (latency and throughput only; slow)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random inputs")
    p.add_argument("--profile", type=int, metavar="I",
                   help="of a directory compiled with several --profile: bench build I (default: every build)")
    p.add_argument("--shapes", metavar="NAME:DxD,...",
                   help="of a directory compiled with several --profile: bench the build whose profile holds "
                        "these input shapes")
    g = p.add_argument_group("MLPerf scenarios through MLCommons LoadGen (nnc/loadgen_sut.py; pip install 'nnc[bench]')")
    g.add_argument("--scenario", choices=["single-stream", "multi-stream", "server", "offline"],
                   help="run this LoadGen scenario instead of the trtexec-style loop")
    g.add_argument("--duration-s", type=float, metavar="S",
                   help="minimum duration of each LoadGen run (default 20 on cuda, 5 on the reference)")
    g.add_argument("--target-qps", type=float, metavar="Q",
                   help="server: the QPS search's first point; offline: the expected QPS (default: calibrated)")
    g.add_argument("--latency-bound-ms", type=float, metavar="L", help="server: the p99 latency bound")
    g.add_argument("--contexts", type=int, default=1, metavar="N",
                   help="execution contexts (one worker thread each) the queries go to (default 1)")
    g.add_argument("--batch", type=int, metavar="B", help="samples per run (must be the compiled batch)")
    g.add_argument("--batch-window-us", type=float, default=0.0, metavar="U",
                   help="server: wait up to U us for more samples to fill a batch (default 0)")
    g.add_argument("--min-queries", type=int, default=64, metavar="K", help="LoadGen's min_query_count (default 64)")
    g.add_argument("--log-dir", metavar="D", help="LoadGen's logs go here (default ./mlperf_logs/NAME_SCENARIO)")

    p = sub.add_parser("inspect", help="per-kernel table of a compiled output directory",
                       description="Prints one row per kernel from OUT/plan.json: launches per run, the IR ops "
                                   "it implements, template, chosen tactic, the tuner's time if any, and with "
                                   "--time the measured time per run and share of the total.")
    p.add_argument("out", help="directory written by `nnc compile`")
    p.add_argument("--time", action="store_true",
                   help="measure each launch on the GPU (CUDA events, each launch repeated on the planned arena)")
    p.add_argument("--plot", metavar="F.png", help="draw the times as bars into F.png (needs matplotlib)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random inputs of --time")
    p.add_argument("--profile", type=int, metavar="I",
                   help="of a directory compiled with several --profile: only build I (default: one section each)")

    p = sub.add_parser("export-triton", help="write a Triton Inference Server model repository entry for OUT",
                       description="Writes REPO/NAME/config.pbtxt, REPO/NAME/1/model.py (Triton's Python backend "
                                   "running nnc.load) and a copy of OUT; several models can share one REPO. "
                                   "nnc models have a static batch: with --max-batch B > 0 requests are "
                                   "zero-padded to the compiled batch (see nnc/triton_export.py).")
    p.add_argument("out", help="directory written by `nnc compile`")
    p.add_argument("--repo", required=True, help="the model repository (created if missing)")
    p.add_argument("--name", help="Triton model name (default: OUT's directory name)")
    p.add_argument("--max-batch", type=int, default=0, metavar="B",
                   help="Triton max_batch_size (0: serve the compiled shapes as they are, no batching)")
    p.add_argument("--instances", type=int, default=1, metavar="K", help="instance_group count (default 1)")
    p.add_argument("--dynamic-batching-us", type=int, default=None, metavar="U",
                   help="turn on Triton's dynamic batching with this max queue delay (needs --max-batch >= 1)")
    p.add_argument("--backend", choices=["cuda", "reference"], default="cuda",
                   help="what model.py loads: cuda (KIND_GPU) or the numpy reference (KIND_CPU)")

    p = sub.add_parser("serve", help="start NVIDIA Triton Inference Server on a model repository",
                       description="Starts the tritonserver binary of the nvidia-pytriton wheel (in its own venv, "
                                   "created on first use; see nnc/serve.py) on REPO, or on nnc OUT directories "
                                   "exported into a temporary repository. Listens on 127.0.0.1; stops on "
                                   "SIGTERM/SIGINT.")
    p.add_argument("repo", nargs="+", help="a model repository, or one or more `nnc compile` directories")
    p.add_argument("--http-port", type=int, default=None, metavar="P", help="default: a free port")
    p.add_argument("--grpc-port", type=int, default=None, metavar="P", help="default: a free port")
    p.add_argument("--metrics-port", type=int, default=None, metavar="P", help="default: a free port")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1 only)")
    p.add_argument("--backend", choices=["cuda", "reference"], default="cuda",
                   help="for OUT directories: the backend they are exported for")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.cmd:
        ap.print_help()
        return 2
    if args.cmd == "opt" and args.file is None and not args.list_passes:
        ap.error("opt: the following argument is required: file (unless --list-passes)")  # exit 2
    try:
        # progress bars (stderr, only on a terminal) and -v lines: every stage reports to this
        with progress.use(progress.make_reporter(verbose=getattr(args, "verbose", False))):
            return {"ir": cmd_ir, "opt": cmd_opt, "compile": cmd_compile, "run": cmd_run, "bench": cmd_bench,
                    "inspect": cmd_inspect, "export-triton": cmd_export_triton, "serve": cmd_serve,
                    "verify": cmd_verify, "timing-cache": cmd_timing_cache,
                    "calibrate": cmd_calibrate, "prune": cmd_prune}[args.cmd](args)
    except NncError as e:
        if args.debug:
            raise
        print(f"nnc {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError) as e:
        if args.debug:
            raise
        print(f"nnc {args.cmd}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _import(model, shapes):
    from .onnx_import import import_model, parse_shapes
    return import_model(model, shapes=parse_shapes(shapes))


def _write_ir(module, path: Path):
    from .ir.printer import print_module
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(print_module(module))
    module.weights.save(path)


def cmd_ir(args) -> int:
    from .ir.printer import print_module
    from .ir.verify import verify
    m = _import(args.model, args.shapes)
    if args.verify:
        verify(m)
    if args.output:
        _write_ir(m, Path(args.output))
    else:
        sys.stdout.write(print_module(m))
    return 0


def load_ir(path) -> "object":
    """Parses an IR file with its weights and verifies it: IR text is input like any other, and
    passes, printer and interpreter assume a verified module."""
    from .ir.parser import parse_file
    from .ir.verify import verify
    from .ir.weights import WeightStore
    p = Path(path)
    if not p.exists():
        raise NncError(f"{p}: no such file")
    m = parse_file(p)
    m.weights = WeightStore.load(p)
    try:
        verify(m)
    except NncError as e:
        raise type(e)(f"{p}: {e}") from None
    return m


def _pass_summary(name: str) -> str:
    """The first sentence of a pass's docstring (its function's, else its module's)."""
    from .pipeline import get_pass
    fn = get_pass(name)
    doc = fn.__doc__ or sys.modules[fn.__module__].__doc__ or ""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    end = para.find(". ")
    return para if end < 0 else para[:end + 1]


def cmd_opt(args) -> int:
    from .ir.printer import print_module
    from .pipeline import PASSES, Pipeline
    if args.list_passes:
        width = max(map(len, PASSES))
        print("\n".join(f"{n:<{width}}  {_pass_summary(n)}" for n in PASSES))
        return 0
    m = load_ir(args.file)
    passes = [p for p in args.passes.split(",") if p]
    if passes or args.verify_each:
        Pipeline(passes, args.verify_each, Path(args.dump_ir) if args.dump_ir else None).run(m)
    if args.output:
        _write_ir(m, Path(args.output))
    else:
        sys.stdout.write(print_module(m))
    return 0


def cmd_compile(args) -> int:
    from .api import CompileOptions, normalize_shapes
    from .driver import compile_model
    t0 = time.perf_counter()
    opts = CompileOptions(shapes=normalize_shapes(args.shapes), precision=args.precision, arch=args.arch,
                          tf32=args.tf32, name=args.name, backend="reference" if args.no_codegen else "cuda",
                          codegen=not args.no_codegen, cuda_compiler=args.backend, verify_each=args.verify_each,
                          cache=not args.no_cache, jobs=args.jobs, fuse=not args.no_fuse, tune=args.tune,
                          tune_budget=args.tune_budget, timing_cache=args.timing_cache,
                          keep_fp32=args.keep_fp32, allow=args.allow, max_rel_err=args.max_rel_err,
                          calib_data=args.calib_data, profiles=args.profile, calib=args.calib,
                          weights=args.weights, int4_block=args.int4_block, sparsity=args.sparsity)
    import warnings
    with warnings.catch_warnings(record=True) as caught:  # one "nnc compile: warning:" line each
        warnings.simplefilter("always")
        try:
            if args.devices is not None:  # several devices: compiler/multi_device.py
                from .multi_device import compile_multi_device
                plan = compile_multi_device(args.model, args.out, opts, args.devices, args.parallel,
                                            args.micro_batches, args.stage_times, args.dump_ir)
            else:
                plan = compile_model(args.model, args.out, dump_ir=args.dump_ir, options=opts)
        finally:
            for w in caught:
                print(f"nnc compile: warning: {w.message}", file=sys.stderr)
    wall = time.perf_counter() - t0
    n_k = len(plan.get("kernels", []))
    print(f"compiled {args.model} -> {args.out} ({len(plan['inputs'])} inputs, {len(plan['outputs'])} outputs, "
          f"{n_k} kernels, {wall:.1f}s)")
    rep = progress.current()
    if rep.verbose:
        launches = plan.get("launches", [])
        n_kl = sum(l.get("kind") == "kernel" for l in launches)
        init = len(plan.get("init_launches", []))
        rep.log(f"  {n_k} kernels, {n_kl} kernel launches per run ({len(launches)} launches in all"
                f"{f', {init} more once at load' if init else ''})")
        t = plan.get("tuning") or {}
        rep.log(f"  kernel selection: {t.get('mode', 'heuristic')} ({t.get('why', '')})")
        rep.log("  stages: " + " | ".join(f"{k} {v * 1e3:.1f} ms" for k, v in _stage_times(rep.times, args.backend))
                + f" | total {wall * 1e3:.1f} ms")
    return 0


def cmd_calibrate(args) -> int:
    from .calibrate import calibrate
    from .onnx_import import parse_shapes
    if not args.out and not args.trt_cache:
        raise NncError("give -o CALIB.json and/or --trt-cache FILE: nowhere to write the scales")
    log = progress.current().log if args.verbose else (lambda s: None)
    t = calibrate(args.model, args.data, args.method, args.percentile, shapes=parse_shapes(args.shapes), log=log)
    if args.out:
        t.save(args.out)
    if args.trt_cache:
        t.save_trt_cache(args.trt_cache)
    dest = " and ".join(x for x in (args.out, args.trt_cache) if x)
    print(f"calibrated {args.model}: {len(t.amax)} tensors, {t.samples} samples, method {args.method} -> {dest}")
    return 0


def cmd_prune(args) -> int:
    from .prune import prune_file
    done, skipped = prune_file(args.model, args.out)
    for w in done:
        print(f"  {w.name} {list(w.shape)}: " + ("already 2:4" if w.was_sparse else f"pruned (relative change {w.rel_change:.3f})"))
    for name, why in skipped:
        print(f"  {name}: left dense ({why})")
    print(f"pruned {sum(not w.was_sparse for w in done)} of {len(done)} MatMul/Gemm weights to 2:4 -> {args.out} "
          f"(the outputs change: fine-tune, or use for timing)")
    return 0


def cmd_timing_cache(args) -> int:
    from .codegen.timing_cache import merge
    doc = merge(args.files, args.output)
    print(f"merged {len(args.files)} timing caches -> {args.output} ({len(doc['entries'])} entries, "
          f"{doc['header'].get('gpu')} {doc['header'].get('sm')})")
    return 0


def _stage_times(times: dict, cuda_compiler: str) -> list:
    """import, passes, lowering, render, the CUDA compile (absent: the cubin was up to date) and
    write (with codegen: the rest of the codegen stage, which writes OUT)."""
    out = [(k, times[k]) for k in ("import", "passes", "lowering", "render", cuda_compiler, "write") if k in times]
    if "codegen" in times and "write" not in times:
        rest = times["codegen"] - sum(times.get(k, 0.0) for k in ("lowering", "render", cuda_compiler))
        out.append(("write", max(rest, 0.0)))
    return out


def _random_inputs(plan: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    from .ir.types import dtype
    out = {}
    for i in plan["inputs"]:
        if i["shape"] is None or any(isinstance(d, str) for d in i["shape"]):
            raise NncError(f"input {i['name']!r} has symbolic shape {i['shape']}: pass --inputs "
                           f"or compile with --shapes")
        dt = dtype(i["dtype"])
        if dt.is_float:
            a = rng.standard_normal(i["shape"]).astype(dt.np)
        elif dt.kind == "bool":
            a = rng.random(i["shape"]) < 0.5
        else:
            a = rng.integers(0, 4, i["shape"]).astype(dt.np)
        out[i["name"]] = a
    return out


def cmd_run(args) -> int:
    from .plan_file import check_against_ir, read_plan
    out = Path(args.out)
    plan = read_plan(out)  # checked field by field: the directory may have been edited
    if args.inputs:
        from .npz_inputs import load_inputs
        feed = load_inputs(args.inputs, plan.get("inputs", []))
    else:
        from .profiles import opt_inputs  # with profiles: the first one's opt shapes
        feed = _random_inputs({**plan, "inputs": opt_inputs(plan)}, args.seed)
    t0 = time.perf_counter()
    how = args.backend
    if args.arena is not None and args.backend != "reference":
        raise NncError("--in-arena / --no-arena choose how the reference backend runs; not with --backend cuda")
    if args.no_cuda_graph and args.backend != "cuda":
        raise NncError("--no-cuda-graph chooses how the cuda backend launches; not with --backend reference")
    if plan.get("kind") == "multi_device":  # nnc compile --devices K (compiler/multi_device.py)
        from .multi_device import MultiDeviceProgram
        prog = MultiDeviceProgram(out, args.backend, args.transport if args.backend == "cuda" else "auto",
                                  cuda_graph=not args.no_cuda_graph)
        res = prog.run(feed)
        how = f"{args.backend}, {plan['devices']} devices ({plan['parallel']}), transport {prog.transport_used}"
    elif "profile_builds" in plan or ("profiles" in plan and "steps" not in plan and args.backend == "reference"):
        from .api import load as load_module  # picks the build / checks the inputs against the profiles
        res = load_module(out, args.backend, in_arena=args.arena).run(feed, output="numpy")
        how = f"{args.backend}, profiles checked"
    elif args.backend == "reference" and (args.arena or (args.arena is None and "steps" in plan)):
        from .codegen.plan_exec import PlanExecutor  # the plan run on the CPU (codegen/plan_exec.py)
        res = PlanExecutor.from_dir(out).run(feed)
        how = "reference in the plan's arena"
    elif args.backend == "reference":
        from .integrity import check_ir
        from .ir.interp import Interpreter
        check_ir(out, plan)  # ir/final.* as plan.json recorded them
        m = load_ir(out / "ir" / "final.nnir")
        check_against_ir(plan, m.main, out)
        res = Interpreter(m).run(feed)
    else:
        from .runtime import load
        res = load(out, cuda_graph=not args.no_cuda_graph).run(feed, output="numpy")
    dt = time.perf_counter() - t0
    from .codegen.escape import terminal_text  # output names come from the model file
    nonfinite = []
    for k, v in res.items():
        v = np.asarray(v)
        stats = ""
        if v.size and v.dtype.kind in "fiubcV":
            with np.errstate(all="ignore"):  # NaN/inf outputs are reported below, not warned about
                f = v.astype(np.complex128 if v.dtype.kind == "c" else np.float64)
                if v.dtype.kind != "c":
                    stats = f" min {f.min():.6g} max {f.max():.6g} mean {f.mean():.6g}"
            n_nan, n_inf = int(np.isnan(f).sum()), int(np.isinf(f).sum())
            if n_nan or n_inf:
                nonfinite.append(f"output '{terminal_text(k)}' has {n_nan} NaN and {n_inf} inf of {v.size} values")
        print(f"{terminal_text(k)}: {v.dtype} {list(v.shape)}{stats}")
    print(f"({how}, {dt * 1e3:.1f} ms)")
    if args.save:
        np.savez(args.save, **{k: np.asarray(v) for k, v in res.items()})
    for line in nonfinite:
        print(f"nnc run: warning: {line}", file=sys.stderr)
    if nonfinite and not args.allow_nonfinite:
        return NONFINITE_EXIT
    return 0


def cmd_verify(args) -> int:
    from .accuracy import format_text, print_rich, verify_model
    from .progress import make_reporter, use
    with use(make_reporter()):
        rep = verify_model(args.model, shapes=args.shapes, precision=args.precision, backend=args.backend,
                           inputs=args.inputs, rtol=args.rtol, atol=args.atol, per_layer=args.per_layer,
                           seed=args.seed, tf32=args.tf32)
    if sys.stdout.isatty():
        from rich.console import Console
        print_rich(rep, Console())
    else:
        sys.stdout.write(format_text(rep))
    return 0 if rep.passed else 1


def _bench_shapes(args):
    from .onnx_import import parse_shapes
    return parse_shapes(args.shapes) if args.shapes else None


def cmd_bench(args) -> int:
    if args.scenario is not None:
        return _bench_scenario(args)
    given = [f for f, v in (("--duration-s", args.duration_s), ("--target-qps", args.target_qps),
                            ("--latency-bound-ms", args.latency_bound_ms), ("--batch", args.batch),
                            ("--log-dir", args.log_dir), ("--contexts", args.contexts != 1 or None),
                            ("--batch-window-us", args.batch_window_us or None)) if v is not None]
    if given:
        raise NncError(f"{', '.join(given)}: only with --scenario (the LoadGen scenarios)")
    from .bench import BenchOptions, bench_builds, format_text, print_rich, write_json
    options = BenchOptions(iterations=args.iterations, warmup=args.warmup, cuda_graph=not args.no_cuda_graph,
                           backend=args.backend, seed=args.seed, transport=args.transport)
    results = bench_builds(args.out, options, profile=args.profile, shapes=_bench_shapes(args))
    console = None
    if sys.stdout.isatty():
        from rich.console import Console
        console = Console()
    for k, res in enumerate(results):
        if console is not None:
            print_rich(res, console)
        else:
            sys.stdout.write(("\n" if k else "") + format_text(res))
    if args.json:
        write_json(results if len(results) > 1 else results[0], args.json)
    return 0


def _bench_scenario(args) -> int:
    import json
    from .loadgen_sut import ScenarioOptions, format_text, loadgen_summary, print_rich, run_scenario
    from .profiles import select_builds
    if args.no_cuda_graph:
        raise NncError("--no-cuda-graph is for the trtexec-style loop, not with --scenario")
    builds = select_builds(args.out, profile=args.profile, shapes=_bench_shapes(args))
    if len(builds) > 1:
        raise NncError(f"{args.out} has {len(builds)} builds, one per --profile: LoadGen runs one of them; "
                       f"pick it with --profile I or --shapes NAME:DxD,...")
    res = run_scenario(builds[0].dir, ScenarioOptions(
        args.scenario, backend=args.backend, duration_s=args.duration_s, target_qps=args.target_qps,
        latency_bound_ms=args.latency_bound_ms, contexts=args.contexts, batch=args.batch, log_dir=args.log_dir,
        min_query_count=args.min_queries, batch_window_us=args.batch_window_us, seed=args.seed))
    sys.stdout.write(loadgen_summary(res))
    if sys.stdout.isatty():
        from rich.console import Console
        print_rich(res, Console())
    else:
        sys.stdout.write(format_text(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res.to_json(), indent=2) + "\n")
    return 0


def cmd_inspect(args) -> int:
    from .inspect_cmd import format_text, inspect_sections, plot_sections, print_rich, require_matplotlib
    if args.plot:
        require_matplotlib()  # before any GPU time is spent
    sections = inspect_sections(args.out, profile=args.profile, time=args.time, seed=args.seed)
    several = any(s.profile is not None for s in sections)  # a set of builds: each table under its title
    console = None
    if sys.stdout.isatty():
        from rich.console import Console
        console = Console()
    for k, s in enumerate(sections):
        if console is not None:
            print_rich(s.rows, console, s.title, s.footer)
        else:
            sys.stdout.write(("\n" if k else "") + (s.title + "\n" if several else "") + format_text(s.rows, s.footer))
    if args.plot:
        paths = plot_sections(sections, args.plot, Path(args.out).name)
        if several:
            print(f"nnc inspect: wrote {', '.join(map(str, paths))}", file=sys.stderr)
    return 0


def cmd_export_triton(args) -> int:
    from .triton_export import TritonExportOptions, export_triton
    d = export_triton(args.out, args.repo, TritonExportOptions(
        name=args.name, max_batch=args.max_batch, instances=args.instances,
        dynamic_batching_us=args.dynamic_batching_us, backend=args.backend))
    print(f"wrote {d} (config.pbtxt, 1/model.py, 1/nnc_out)")
    return 0


def cmd_serve(args) -> int:
    from .serve import ServerOptions, serve
    return serve(args.repo, ServerOptions(http_port=args.http_port, grpc_port=args.grpc_port,
                                          metrics_port=args.metrics_port, host=args.host), backend=args.backend)


if __name__ == "__main__":
    sys.exit(main())
