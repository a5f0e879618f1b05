"""`nnc export-triton`: a compiled output directory -> a Triton Inference Server model repository.

REPO/NAME/config.pbtxt    inputs/outputs (Triton dtypes, dims) from plan.json, max_batch_size,
                          instance_group, dynamic_batching, and parameters telling model.py which
                          nnc backend to load and how requests are batched
REPO/NAME/1/model.py      the Python-backend model (templates/triton_model.py, copied verbatim: it
                          holds no string from the model; it reads its I/O from Triton's config)
REPO/NAME/1/nnc_out/      the compiled OUT, copied (regular files and directories only)

Batching. nnc models have a static batch today (no batch profile yet, issue 10). With
--max-batch 0 the config declares the full compiled shapes and Triton does no batching. With
--max-batch B > 0 every input and output must have the same compiled leading dim C: Triton's dims
are the rest, and model.py concatenates the requests Triton hands it (one, or several when
dynamic batching is on), pads with zero rows to a multiple of C, runs the model ceil(rows / C)
times and gives every request its own rows back. The config says so in its `nnc_batching`
parameter.

A model file is untrusted: tensor names reach config.pbtxt only as quoted, escaped pbtxt strings,
and only names of printable ASCII (what Triton's HTTP/gRPC clients and its model-config parser
handle) are accepted; the Triton model name is validated ([A-Za-z0-9_.-], not starting with '.').
"""
from __future__ import annotations

import importlib.resources
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .ir.errors import NncError

# nnc's dtype names (numpy spelling, as plan.json writes them) -> Triton's model-config data types
TRITON_DTYPES = {
    "float64": "TYPE_FP64", "float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16",
    "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8",
    "uint64": "TYPE_UINT64", "uint32": "TYPE_UINT32", "uint16": "TYPE_UINT16", "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}
MODEL_TEMPLATE = "triton_model.py"  # in the package nnc.templates (templates/)
MARKER = "nnc_export.json"  # in REPO/NAME: an nnc export, which a later export may replace
OUT_SUBDIR = "nnc_out"
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_TENSOR_NAME_RE = re.compile(r"[\x20-\x7e]{1,256}")


class TritonExportError(NncError):
    """The compiled directory cannot be exported as asked (names, shapes, batching, paths)."""


@dataclass(frozen=True)
class TritonExportOptions:
    name: Optional[str] = None         # Triton model name (default: OUT's directory name, sanitised)
    max_batch: int = 0                 # 0: no Triton batching; B > 0: requests padded to the compiled batch
    instances: int = 1                 # instance_group count
    dynamic_batching_us: Optional[int] = None  # max_queue_delay_microseconds; None: no dynamic batching
    backend: str = "cuda"              # the nnc backend model.py loads: cuda (KIND_GPU) | reference (KIND_CPU)


def pbtxt_string(s: str) -> str:
    """`s` as a quoted protobuf text-format string: printable ASCII except `"` `\\` `'` verbatim,
    every other byte as an octal escape (the text format's C-style escapes)."""
    out = []
    for b in s.encode("utf-8"):
        c = chr(b)
        out.append(c if 0x20 <= b < 0x7f and c not in "\"\\'" else f"\\{b:03o}")
    return '"' + "".join(out) + '"'


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise TritonExportError(f"Triton model name {name!r}: use 1-128 characters of [A-Za-z0-9_.-], "
                                f"not starting with '.' or '-'")
    return name


def default_model_name(out: Path) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]", "_", out.resolve().name).lstrip(".-")[:128]
    return s or "model"


def _check_tensor_name(name: str, where: str) -> str:
    if not _TENSOR_NAME_RE.fullmatch(name):
        raise TritonExportError(f"{where} name {name!r}: Triton serving needs 1-256 printable ASCII characters "
                                f"(recompile the model with a renamed tensor)")
    return name


def _io_rows(plan: dict, max_batch: int):
    """[(kind, name, triton dtype, dims)] and the compiled batch (None when max_batch == 0)."""
    entries = [("input", e) for e in plan["inputs"]] + [("output", e) for e in plan["outputs"]]
    for kind, e in entries:
        shape = e.get("shape")
        if shape is None or not all(isinstance(d, int) for d in shape):
            raise TritonExportError(f"{kind} {e['name']!r}: shape {shape} is not static; Triton export needs a "
                                    f"compile with every dim bound (--shapes)")
        if e["dtype"] not in TRITON_DTYPES:
            raise TritonExportError(f"{kind} {e['name']!r}: dtype {e['dtype']} has no Triton data type "
                                    f"(known: {', '.join(TRITON_DTYPES)})")
        _check_tensor_name(e["name"], kind)
    batch = None
    if max_batch > 0:
        leads = {(kind, e["name"]): (e["shape"][0] if e["shape"] else None) for kind, e in entries}
        batch = next(iter(leads.values()))
        if any(lead is None or lead != batch or lead < 1 for lead in leads.values()):
            raise TritonExportError(
                f"--max-batch {max_batch} needs every input and output to lead with the same compiled batch dim "
                f"(>= 1); leading dims: " + ", ".join(f"{k} {n!r}: {lead}" for (k, n), lead in leads.items())
                + "; use --max-batch 0 to serve the compiled shapes as they are")
    rows = [(kind, e["name"], TRITON_DTYPES[e["dtype"]], list(e["shape"][1:] if batch else e["shape"]))
            for kind, e in entries]
    return rows, batch


def render_config(name: str, plan: dict, opts: TritonExportOptions) -> str:
    rows, batch = _io_rows(plan, opts.max_batch)
    if opts.dynamic_batching_us is not None and opts.max_batch < 1:
        raise TritonExportError("--dynamic-batching-us needs --max-batch >= 1 (Triton batches only models with "
                                "max_batch_size > 0)")
    batching = (f"pad-to-compiled-batch {batch}: requests are concatenated, zero-padded to a multiple of "
                f"{batch} rows and run {batch} rows at a time" if batch else
                "none: max_batch_size 0, the compiled shapes are served as they are")
    lines = ["# written by nnc export-triton: an nnc-compiled model on Triton's Python backend",
             f"# batching: {batching}",
             f"name: {pbtxt_string(name)}", 'backend: "python"', f"max_batch_size: {opts.max_batch}"]
    for kind in ("input", "output"):
        lines.append(f"{kind} [")
        items = [f"  {{\n    name: {pbtxt_string(n)}\n    data_type: {t}\n    dims: [ {', '.join(map(str, d))} ]\n  }}"
                 for k, n, t, d in rows if k == kind]
        lines.append(",\n".join(items))
        lines.append("]")
    kind_ = "KIND_GPU" if opts.backend == "cuda" else "KIND_CPU"
    lines.append(f"instance_group [ {{ count: {opts.instances} kind: {kind_} }} ]")
    if opts.dynamic_batching_us is not None:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {opts.dynamic_batching_us} }}")
    params = {"nnc_backend": opts.backend, "nnc_out": OUT_SUBDIR,
              "nnc_compiled_batch": str(batch or 0), "nnc_batching": batching}
    if opts.backend == "cuda":  # the Python backend may hand model.py device tensors (DLPack, no host copy)
        params["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
    for k, v in params.items():
        lines.append(f"parameters {{ key: {pbtxt_string(k)} value: {{ string_value: {pbtxt_string(v)} }} }}")
    return "\n".join(lines) + "\n"


def _copy_out(src: Path, dst: Path) -> None:
    """OUT's regular files and directories (never a symbolic link: refused)."""
    dst.mkdir()
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if entry.is_symlink():
            raise TritonExportError(f"{src / entry.name}: a symbolic link; nnc export-triton copies only plain "
                                    f"files and directories")
        if entry.is_dir():
            _copy_out(Path(entry.path), dst / entry.name)
        elif entry.is_file():
            shutil.copyfile(entry.path, dst / entry.name)
        else:
            raise TritonExportError(f"{src / entry.name}: not a regular file or directory")


def export_triton(out, repo, opts: TritonExportOptions = TritonExportOptions()) -> Path:
    """Writes REPO/NAME (see the module docstring) and returns that directory. REPO may hold other
    models (a multi-model repository); an existing REPO/NAME is replaced only when an earlier
    nnc export-triton wrote it."""
    from .plan_file import read_plan
    out, repo = Path(out), Path(repo)
    if opts.backend not in ("cuda", "reference"):
        raise TritonExportError(f"backend must be 'cuda' or 'reference', not {opts.backend!r}")
    if opts.max_batch < 0 or opts.instances < 1:
        raise TritonExportError("--max-batch must be >= 0 and --instances >= 1")
    if opts.dynamic_batching_us is not None and opts.dynamic_batching_us < 0:
        raise TritonExportError("--dynamic-batching-us must be >= 0")
    plan = read_plan(out)
    if opts.backend == "cuda" and "steps" not in plan:
        raise TritonExportError(f"{out}: compiled without CUDA code (no plan steps); export with --backend reference "
                                f"or compile for the GPU")
    name = check_model_name(opts.name if opts.name is not None else default_model_name(out))
    config = render_config(name, plan, opts)
    src, dst = Path(os.path.realpath(out)), Path(os.path.realpath(repo))
    if dst == src or src in dst.parents:
        raise TritonExportError(f"--repo {repo} is inside {out}: the copy of OUT would contain itself; "
                                f"give a repository outside OUT")
    repo.mkdir(parents=True, exist_ok=True)
    if repo.is_symlink():
        repo = Path(os.path.realpath(repo))
    final = repo / name
    if os.path.lexists(final) and (final.is_symlink() or not (final / MARKER).is_file()):
        raise TritonExportError(f"{final}: exists and was not written by nnc export-triton; remove it or pick --name")
    tmp = repo / f".{name}.nnc-tmp-{os.getpid()}"
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        (tmp / "config.pbtxt").write_text(config, encoding="ascii")
        (tmp / MARKER).write_text(json.dumps({"source": str(out.resolve()), "backend": opts.backend,
                                              "max_batch": opts.max_batch}, indent=1) + "\n")
        version = tmp / "1"
        version.mkdir()
        (version / "model.py").write_bytes((importlib.resources.files("nnc.templates") / MODEL_TEMPLATE).read_bytes())
        _copy_out(out, version / OUT_SUBDIR)
        if os.path.lexists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp)
    return final
