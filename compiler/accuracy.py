"""`nnc verify`: compare what nnc computes with onnxruntime, output by output and (with
`per_layer`) for every intermediate value that survives compilation.

    from nnc.accuracy import verify_model
    rep = verify_model("model.onnx", shapes="x:1x3x224x224", precision="fp16", per_layer=True)
    rep.passed, rep.outputs, rep.first_failure, rep.first_nonfinite

nnc's side runs the model through the same import and pass pipeline as `nnc compile`
(`compile.pipeline_passes`, precision passes included, so fp16/bf16 overflow shows up), then
either the reference interpreter (backend "reference") or the generated CUDA (backend "cuda").
onnxruntime runs the original fp32 model on the same inputs and is the oracle.

Errors per tensor: max-abs, relative L2 (||nnc - ort|| / max(||ort||, tiny)), and the fraction
of elements outside np.allclose's band |nnc - ort| <= atol + rtol * |ort|. A tensor passes when
no element is outside it. Integer and bool tensors must match exactly. A non-finite nnc element
where onnxruntime is finite fails (and is counted), and so does a non-finite onnxruntime element
that nnc does not reproduce. Defaults (the project's accuracy standard): rtol 1e-3 at fp32,
3e-3 with tf32, 1e-2 at fp16/bf16; atol, when not given, is rtol x max|onnxruntime value| of
each tensor, so errors are judged against the tensor's own scale.

Per-layer mapping, ONNX tensor -> IR value of the final IR (explicit, in this order):
1. identity: the value the importer created for the tensor is still in the final IR;
2. origin: the ONNX node's ops (non-const ops whose loc is the node) are, in order and by op
   name, the same list after the passes as after import (passes that rebuild ops, e.g. to-fp16,
   keep locs): the same result of the same op;
3. name: a final value carries the importer's name for it (fold-constants keeps names).
A candidate must have the tensor's static shape and dtype class, else it is not used; a
candidate laid out differently (its layout tag's perm, ir/layout.py: assign-layout's #nhwc values) must
have the shape transposed by it and is compared transposed back (TensorCheck.perm). A tensor
that maps to a constant is reported "folded", one computed inside a `fused` op's body "inside a
fused group" (the group is compared at its boundary: its results), one with no candidate "fused
or removed"; none of these is compared. IR values created by passes that have no ONNX tensor (casts, decompositions) are
counted, not compared. With backend "cuda" the compared values become extra outputs of the IR
before code generation, so each is a real buffer read back after the run.

Random inputs (when `inputs` is not given): floats standard normal, bools fair coins, integers
uniform in [0, INT_INPUT_HIGH) (small and non-negative so index inputs such as Gather indices
and token ids stay in range for any non-trivial table; pass real inputs when a model needs
others). Symbolic dims must be bound by `shapes` or by the given inputs' shapes.
"""
from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .ir.errors import InputError, NncError
from .ir.layout import perm_of

INT_INPUT_HIGH = 4
DEFAULT_RTOL = {"fp32": 1e-3, "tf32": 3e-3, "fp16": 1e-2, "bf16": 1e-2}
BACKENDS = ("reference", "cuda")
_TINY = 1e-30  # rel-L2 denominator floor: an all-zero reference gives the absolute L2 norm
_PROTOBUF_LIMIT = 2 ** 31 - 1  # serialized ModelProto limit; larger models go through a file


class AccuracyError(NncError):
    """nnc verify could not run (no onnxruntime, no GPU, bad inputs, symbolic dims...)."""


@dataclass(frozen=True)
class TensorCheck:
    """One tensor compared: nnc's value against onnxruntime's."""
    name: str  # ONNX tensor name
    ir_name: str  # the IR value compared (final IR)
    node: str  # ONNX node that produces it ("" for a graph input)
    op_type: str
    dtype: str  # nnc's dtype (numpy name)
    shape: tuple
    max_abs: float
    rel_l2: float
    fail_fraction: float  # elements outside atol + rtol * |ref|
    nonfinite: int  # non-finite in nnc where onnxruntime is finite
    atol: float  # the absolute tolerance actually used
    passed: bool
    note: str = ""  # why it failed when the numbers do not say (shape or dtype mismatch)
    perm: tuple = ()  # the IR value is the tensor transposed by perm (module.layouts: NHWC); compared transposed back


@dataclass(frozen=True)
class NotCompared:
    name: str  # ONNX tensor name
    node: str
    op_type: str
    reason: str  # "folded" (constant at compile time) | "inside a fused group" | "fused or removed" | "model input"


@dataclass(frozen=True)
class Report:
    model: str
    backend: str
    precision: str
    rtol: float
    atol: Optional[float]  # None: rtol x max|ref| per tensor
    seed: Optional[int]  # None when inputs were given
    ort_version: str
    outputs: tuple  # tuple[TensorCheck], in graph output order
    layers: tuple = ()  # tuple[TensorCheck], in nnc's execution order (per_layer only)
    not_compared: tuple = ()  # tuple[NotCompared]
    unmapped_ir_values: int = 0  # values at run time with no ONNX tensor (created by passes)
    per_layer: bool = False

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.outputs)

    @property
    def first_failure(self) -> Optional[TensorCheck]:
        """The first layer (execution order) whose error exceeds the tolerance."""
        return next((c for c in self.layers if not c.passed), None)

    @property
    def first_nonfinite(self) -> Optional[TensorCheck]:
        """The first layer that produces non-finite values where onnxruntime does not."""
        return next((c for c in self.layers if c.nonfinite), None)


# ----------------------------------------------------------------------------- comparison

def compare(name: str, got, ref, rtol: float, atol: Optional[float], *, ir_name: str = "", node: str = "",
            op_type: str = "") -> TensorCheck:
    """Compares nnc's `got` with onnxruntime's `ref` (see the module docstring for the rules)."""
    got, ref = np.asarray(got), np.asarray(ref)
    base = dict(name=name, ir_name=ir_name or name, node=node, op_type=op_type, dtype=str(got.dtype),
                shape=tuple(int(d) for d in got.shape))
    if got.shape != ref.shape:
        return TensorCheck(**base, max_abs=math.inf, rel_l2=math.inf, fail_fraction=1.0, nonfinite=0,
                           atol=0.0, passed=False,
                           note=f"shape {list(got.shape)}, onnxruntime gives {list(ref.shape)}")
    kinds = got.dtype.kind + ref.dtype.kind
    if any(k in "biu" for k in kinds):  # integers and bools must match exactly
        if all(k in "biu" for k in kinds):
            g, r = got.astype(np.int64), ref.astype(np.int64)
        else:  # a float on one side (a dtype mismatch): exact all the same
            g, r = got.astype(np.float64), ref.astype(np.float64)
        with np.errstate(all="ignore"):
            d = np.abs(g.astype(np.float64) - r.astype(np.float64))
        bad = int(np.count_nonzero(g != r))
        note = "" if got.dtype == ref.dtype else f"dtype {got.dtype}, onnxruntime gives {ref.dtype}"
        return TensorCheck(**base, max_abs=float(d.max()) if d.size else 0.0, rel_l2=_rel_l2(d, r),
                           fail_fraction=bad / max(d.size, 1), nonfinite=0, atol=0.0, passed=bad == 0, note=note)
    g, r = got.astype(np.float64), ref.astype(np.float64)
    with np.errstate(all="ignore"):
        rf, gf = np.isfinite(r), np.isfinite(g)
        both = rf & gf
        nonfinite = int(np.count_nonzero(rf & ~gf))
        # non-finite reference: nnc must give the same inf, or a NaN for a NaN
        ref_special_bad = int(np.count_nonzero(~rf & ~((np.isnan(r) & np.isnan(g)) | (r == g))))
        scale = float(np.max(np.abs(r[rf]))) if rf.any() else 0.0
        a = float(atol) if atol is not None else rtol * scale
        d = np.abs(g - r)
        inband = d[both] <= a + rtol * np.abs(r[both])
        bad = int(np.count_nonzero(~inband)) + nonfinite + ref_special_bad
        if nonfinite:
            max_abs, rel = math.inf, math.inf
        else:
            max_abs = float(d[both].max()) if both.any() else 0.0
            rel = _rel_l2(np.where(both, d, 0.0), np.where(both, r, 0.0))
    return TensorCheck(**base, max_abs=max_abs, rel_l2=rel, fail_fraction=bad / max(g.size, 1),
                       nonfinite=nonfinite, atol=a, passed=bad == 0)


def _rel_l2(diff: np.ndarray, ref: np.ndarray) -> float:
    if diff.size == 0:
        return 0.0
    return float(np.linalg.norm(diff.ravel()) / max(float(np.linalg.norm(ref.astype(np.float64).ravel())), _TINY))


# ----------------------------------------------------------------------------- inputs

def load_npz(path, model) -> dict:
    """Inputs from an .npz keyed by input name, read without trusting it (nnc.npz_inputs: no
    pickles, members checked against the ONNX model's inputs before decompressing)."""
    from .ir.types import dtype
    from .npz_inputs import load_inputs
    init = {i.name for i in model.graph.initializer}
    specs = []
    for i in model.graph.input:
        if i.name in init or not i.type.HasField("tensor_type"):
            continue
        tt = i.type.tensor_type
        try:
            dt = dtype(tt.elem_type).np_name
        except (ValueError, KeyError):
            continue  # the importer names the unsupported type (it runs next)
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim] \
            if tt.HasField("shape") else None
        specs.append({"name": i.name, "dtype": dt, "shape": shape})
    return load_inputs(path, specs)


def random_inputs(args, seed: int) -> dict:
    """Fresh random inputs for the IR function arguments `args` (all dims static)."""
    rng = np.random.default_rng(seed)
    out = {}
    for a in args:
        t = a.type
        if t.shape is None or not all(isinstance(d, int) for d in t.shape):
            raise AccuracyError(f"input {a.name!r} has dims {t}: bind them with --shapes "
                              f"{a.name}:{'x'.join('D' if not isinstance(d, int) else str(d) for d in (t.shape or ()))} "
                              f"or give --inputs")
        shape, dt = tuple(t.shape), t.dtype
        if dt.is_float:
            x = rng.standard_normal(shape).astype(dt.np)
        elif dt.kind == "bool":
            x = rng.random(shape) < 0.5
        elif dt.is_int:
            x = rng.integers(0, INT_INPUT_HIGH, shape).astype(dt.np)
        else:
            raise AccuracyError(f"input {a.name!r}: no random inputs of dtype {dt}; give --inputs")
        out[a.name] = x
    return out


def _shapes_from_inputs(model, given: dict) -> dict:
    """--shapes bindings taken from given input arrays (symbolic dims need no --shapes then)."""
    init = {i.name for i in model.graph.initializer}
    out = {}
    for i in model.graph.input:
        dims = i.type.tensor_type.shape.dim if i.type.HasField("tensor_type") else ()
        symbolic = any(not d.HasField("dim_value") for d in dims)
        if i.name not in init and i.name in given and symbolic and np.ndim(given[i.name]) == len(dims):
            out[i.name] = [int(d) for d in np.shape(given[i.name])]
    return out


# ----------------------------------------------------------------------------- onnxruntime

def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise AccuracyError("nnc verify compares against onnxruntime, which is not installed: "
                          "pip install onnxruntime (or pip install 'nnc[verify]')") from None
    return onnxruntime


def _ort_run(model, feed: dict, outputs: list) -> dict:
    ort = _onnxruntime()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: extra outputs make it warn about kept tensors
    try:
        if model.ByteSize() < _PROTOBUF_LIMIT:
            sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        else:  # > 2 GB: through a file with external data, in a directory of our own
            import onnx
            with tempfile.TemporaryDirectory(prefix="nnc_verify_") as d:
                f = str(Path(d) / "model.onnx")
                onnx.save(model, f, save_as_external_data=True, location="model.data")
                sess = ort.InferenceSession(f, opts, providers=["CPUExecutionProvider"])
        ins = {i.name for i in sess.get_inputs()}
        res = sess.run(outputs, {k: v for k, v in feed.items() if k in ins})
    except NncError:
        raise
    except Exception as e:
        raise AccuracyError(f"onnxruntime could not run the model: {type(e).__name__}: {e}") from None
    return dict(zip(outputs, res))


def _with_outputs(model, names: list):
    """A copy of `model` that also returns the tensors `names`, typed by ONNX shape inference
    where it can; the others are declared without a type and onnxruntime types them itself
    (nnc's own dtype is no oracle here: an old-opset Dropout mask is bool in onnxruntime)."""
    import onnx
    from onnx import helper
    m = onnx.ModelProto()
    m.CopyFrom(model)
    types = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(m)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types[vi.name] = vi.type.tensor_type.elem_type
    except Exception:  # shape inference is a convenience: untyped outputs are fine for onnxruntime
        pass
    have = {o.name for o in m.graph.output}
    for name in names:
        if name not in have:
            m.graph.output.append(helper.make_tensor_value_info(name, types[name], None) if name in types
                                  else helper.make_empty_tensor_value_info(name))
            have.add(name)
    return m


# ----------------------------------------------------------------------------- mapping

@dataclass
class _Tensor:
    """An ONNX tensor of the main graph and what nnc made of it at import."""
    name: str
    node: str  # ONNX node name ('' if unnamed: then loc_key names it)
    op_type: str
    loc_key: str  # the Loc.node the importer gives the node's ops
    value: object  # import-time IR Value
    ir_name: str
    dtype: object  # import-time DType
    shape: Optional[tuple]
    origin: Optional[tuple] = None  # (k, j): result j of the node's k-th non-const op at import
    origin_ops: Optional[list] = None  # op names of the node's non-const ops at import, in order
    status: str = ""  # "", "folded", "model input"


def _node_key(node) -> str:
    return node.name or f"{node.op_type}:{node.output[0] if node.output else ''}"  # as the importer


def _groups(func, inside_fused: bool = False) -> dict:
    """Loc.node -> its non-const top-level ops; with inside_fused, a `fused` op stands for the ops
    of its body (which keep their locs)."""
    g: dict = {}
    for op in func.ops:
        for o in (op.attrs.body.ops if inside_fused and op.name == "fused" else (op,)):
            if o.name != "const":
                g.setdefault(o.loc.node, []).append(o)
    return g


def _snapshot(model, module, tmap: dict) -> list:
    """Records, right after import, the IR value behind every node output of the main graph."""
    groups = _groups(module.main)
    out = []
    for node in model.graph.node:
        key = _node_key(node)
        for t in node.output:
            v = tmap.get(t) if t else None
            if v is None:
                continue
            rec = _Tensor(t, node.name, node.op_type, key, v, v.name, v.type.dtype, v.type.shape)
            p = v.producer
            if p is None:
                rec.status = "model input"  # e.g. an Identity of an input, imported as the input itself
            elif p.name == "const":
                rec.status = "folded"
            elif p.loc.node == key:
                ops = groups.get(key, [])
                k = next((i for i, o in enumerate(ops) if o is p), None)
                if k is not None:  # (an op of a nested region has no origin at the top level)
                    rec.origin = (k, next(j for j, r in enumerate(p.results) if r is v))
                    rec.origin_ops = [o.name for o in ops]
            out.append(rec)
    return out


def _fits(rec: _Tensor, v, perm: tuple = ()) -> bool:
    """A final-IR candidate must have the tensor's static shape (transposed by perm when the
    value is laid out so) and dtype class."""
    t = v.type
    if (t.dtype.kind == "float") != (rec.dtype.kind == "float"):
        return False
    if t.dtype.kind != "float" and t.dtype != rec.dtype:
        return False
    if rec.shape is not None and t.shape is not None and all(isinstance(d, int) for d in rec.shape):
        want = tuple(rec.shape[p] for p in perm) if perm and len(perm) == len(rec.shape) else tuple(rec.shape)
        return tuple(t.shape) == want and (not perm or len(perm) == len(rec.shape))
    return True


def _inverse(perm: tuple) -> tuple:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def map_tensors(snapshot: list, func, inside_fused: bool = False) -> dict:
    """ONNX tensor name -> (final IR Value or None, reason when None) for each recorded tensor.
    inside_fused: values inside `fused` bodies map too (by origin: the reference interpreter runs
    the body op by op and sees them); else a group is compared at its boundary, its results.
    A candidate with a layout tag (ir/layout.perm_of: assign-layout's #nhwc result of a conv, pool or
    elementwise op standing for its node's NCHW tensor) must have the tensor's shape transposed
    by it, and is compared transposed back."""
    defined = {}
    for op in func.ops:
        for r in op.results:
            defined[id(r)] = r
    by_name = {r.name: r for r in defined.values()}
    args = {id(a) for a in func.args}
    g1 = _groups(func, inside_fused)
    in_fused = {o.loc.node for op in func.ops if op.name == "fused" for o in op.attrs.body.ops}
    # a group's results stand for the body ops that return them: (node, op, result index) -> result
    group_result = {}
    for op in func.ops:
        if op.name == "fused":
            for outer, inner in zip(op.results, op.attrs.body.results):
                p = inner.producer
                if p is not None and p.loc.node:
                    group_result.setdefault((p.loc.node, p.name, p.results.index(inner)), outer)
    out = {}
    for rec in snapshot:
        if rec.status:
            out[rec.name] = (None, rec.status)
            continue
        cands = []
        if id(rec.value) in defined or id(rec.value) in args:
            cands.append(rec.value)
        if rec.origin is not None:
            k, j = rec.origin
            ops = g1.get(rec.loc_key, [])
            if [o.name for o in ops] == rec.origin_ops and j < len(ops[k].results):
                cands.append(ops[k].results[j])
        if rec.ir_name in by_name:
            cands.append(by_name[rec.ir_name])
        if rec.origin is not None and not inside_fused:
            k, j = rec.origin
            if k < len(rec.origin_ops):
                g = group_result.get((rec.loc_key, rec.origin_ops[k], j))
                if g is not None:
                    cands.append(g)
        v = next((c for c in cands if _fits(rec, c, perm_of(c))), None)
        if v is None:
            out[rec.name] = (None, "inside a fused group" if rec.loc_key in in_fused else "fused or removed")
        elif id(v) in args:
            out[rec.name] = (None, "model input")
        elif v.producer is not None and v.producer.name == "const":
            out[rec.name] = (None, "folded")
        else:
            out[rec.name] = (v, "")
    return out


# ----------------------------------------------------------------------------- nnc side

def _run_reference(module, feed: dict, watch: dict) -> tuple[dict, dict]:
    """Outputs and the arrays of the watched values ({id(Value): Value}) from the interpreter."""
    from .ir.interp import Interpreter
    from .progress import current
    seen: dict = {}
    n_ops = len(module.main.ops)
    with current().stage("nnc reference", total=n_ops) as task:
        top = {id(op) for op in module.main.ops}

        def observe(op, outs):
            if id(op) in top:
                task.advance()
            for r, o in zip(op.results, outs):
                if id(r) in watch:
                    seen[id(r)] = o  # reference ops return fresh arrays and never write operands

        with np.errstate(all="ignore"):  # overflow is reported as non-finite values, not warnings
            res = Interpreter(module, observe=observe).run(feed)
    return res, seen


def compile_with_outputs(module, watch: dict, out_dir, precision: str = "fp32", tf32: bool = False,
                         arch=None) -> dict:
    """Generates CUDA for `module` (after the pipeline) with the watched values ({id: Value})
    added as extra outputs of the function, so each is a real buffer the runtime reads back.
    Needs no GPU (NVRTC). Returns the plan."""
    from .codegen.emit import compile_to_dir
    from .driver import io_entry
    f = module.main
    present = {id(r) for r in f.results}
    f.results = list(f.results) + [v for v in watch.values() if id(v) not in present]
    plan = {"inputs": [io_entry(a) for a in f.args], "outputs": [io_entry(r) for r in f.results],
            "precision": precision, "tf32": tf32}
    return compile_to_dir(module, out_dir, arch=arch, precision=precision, tf32=tf32, base_plan=plan)


def _run_cuda(module, feed: dict, watch: dict, precision: str, tf32: bool, arch) -> tuple[dict, dict]:
    from .progress import current
    from .runtime import load
    n_out = len(module.main.results)
    with tempfile.TemporaryDirectory(prefix="nnc_verify_") as d:
        with current().stage("nnc cuda compile"):
            compile_with_outputs(module, watch, d, precision, tf32, arch)
        with current().stage("nnc cuda run"):
            res = load(d).run(feed, output="numpy")
    results = module.main.results
    outs = {r.name: res[r.name] for r in results[:n_out]}
    seen = {id(v): res[v.name] for v in results if id(v) in watch}
    return outs, seen


# ----------------------------------------------------------------------------- entry point

@dataclass
class Prepared:
    """A model imported and through `nnc compile`'s pipeline, with its inputs and (per_layer)
    the mapping of its ONNX tensors onto the final IR."""
    label: str
    proto: object  # onnx.ModelProto (external data loaded): what onnxruntime runs
    module: object  # the IR after the pipeline
    feed: dict
    given: bool  # inputs were given (not drawn)
    snapshot: list  # list[_Tensor]
    mapping: dict  # ONNX tensor name -> (final IR Value | None, reason)

    @property
    def watch(self) -> dict:
        """{id(Value): Value} of the IR values to read at run time."""
        return {id(v): v for v, _ in self.mapping.values() if v is not None}


def prepare(model, shapes="", precision: str = "fp32", inputs=None, seed: int = 0,
            per_layer: bool = False, inside_fused: bool = False) -> Prepared:
    """Imports `model`, reads or draws its inputs, runs `nnc compile`'s pass pipeline and (with
    per_layer) maps the ONNX tensors onto the final IR (inside_fused: see map_tensors). Nothing
    runs the model yet."""
    from .driver import pipeline_passes
    from .ir.verify import verify
    from .onnx_import import import_model, parse_shapes
    from .pipeline import Pipeline
    from .progress import current

    label = str(model) if isinstance(model, (str, Path)) else (model.graph.name or "<ModelProto>")
    shape_map = parse_shapes(shapes) if isinstance(shapes, str) else dict(shapes or {})
    given = None
    if inputs is not None:
        given = load_npz(inputs, _load_proto(model, external=False)) if isinstance(inputs, (str, Path)) \
            else {k: np.asarray(v) for k, v in inputs.items()}
    tmap: dict = {}
    with current().stage("import"):
        if given is not None and not shape_map:  # the given arrays bind symbolic dims
            shape_map = _shapes_from_inputs(_load_proto(model, external=False), given)
        module = import_model(model, shapes=shape_map, tensor_map=tmap)
        verify(module)
    proto = _load_proto(model, external=True)  # after nnc's import checked the file
    snapshot = _snapshot(proto, module, tmap) if per_layer else []
    feed = given if given is not None else random_inputs(module.main.args, seed)
    want = {a.name for a in module.main.args}
    if set(feed) != want:
        raise InputError(f"inputs: the model takes {sorted(want)}; missing {sorted(want - set(feed))}, "
                         f"unknown {sorted(set(feed) - want)}")
    Pipeline(pipeline_passes(precision)).run(module)
    mapping = map_tensors(snapshot, module.main, inside_fused) if per_layer else {}
    return Prepared(label, proto, module, feed, given is not None, snapshot, mapping)


def verify_model(model, shapes="", precision: str = "fp32", backend: str = "reference", inputs=None,
                 rtol: Optional[float] = None, atol: Optional[float] = None, per_layer: bool = False,
                 seed: int = 0, tf32: bool = False, arch: Optional[str] = None) -> Report:
    """Runs `model` (a path or ModelProto) through nnc and onnxruntime on the same inputs and
    compares the outputs (and, with per_layer, every intermediate that maps back to an ONNX
    tensor). `shapes`: a --shapes string or {name: dims}. `inputs`: {name: array}, an .npz path,
    or None for random inputs drawn with `seed`."""
    from .progress import current

    if precision not in DEFAULT_RTOL or precision == "tf32":
        raise AccuracyError(f"--precision {precision!r}: expected one of fp32, fp16, bf16")
    if backend not in BACKENDS:
        raise AccuracyError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    ort = _onnxruntime()  # fail before any work when the oracle (or the GPU) is missing
    if backend == "cuda":
        from .runtime import gpu_available
        if not gpu_available():
            raise AccuracyError("--backend cuda needs a CUDA GPU and none is available here; "
                                "use --backend reference")
    if rtol is None:
        rtol = DEFAULT_RTOL["tf32" if tf32 and precision == "fp32" else precision]
    if rtol < 0 or (atol is not None and atol < 0) or not math.isfinite(rtol):
        raise AccuracyError(f"tolerances must be finite and non-negative (rtol {rtol}, atol {atol})")
    # the reference interpreter runs fused bodies op by op, so it compares inside them; the CUDA
    # build computes a group in one kernel and is compared at the group's results
    pre = prepare(model, shapes, precision, inputs, seed, per_layer, inside_fused=backend == "reference")
    proto, module, feed, snapshot, mapping = pre.proto, pre.module, pre.feed, pre.snapshot, pre.mapping
    watch = pre.watch
    order = {}  # id(value) -> (top-level op, op of a fused body): execution order
    for i, op in enumerate(module.main.ops):
        body = op.attrs.body.ops if op.name == "fused" else ()
        for j, o in enumerate(body):
            for r in o.results:
                order[id(r)] = (i, j)
        for r in op.results:
            order[id(r)] = (i, len(body))
    unmapped = sum(1 for op in module.main.ops if op.name != "const"
                   for r in op.results if id(r) not in watch) if per_layer else 0

    out_names = [o.name for o in proto.graph.output]
    compared = [t for t, (v, _) in mapping.items() if v is not None]
    with current().stage("onnxruntime"):
        ort_model = _with_outputs(proto, compared) if per_layer else proto
        ref = _ort_run(ort_model, feed, out_names + [t for t in compared if t not in out_names])

    if backend == "reference":  # each opens its own stages (progress bars on a terminal)
        got, seen = _run_reference(module, feed, watch)
    else:
        got, seen = _run_cuda(module, feed, watch, precision, tf32, arch)

    producer = {t: n for n in proto.graph.node for t in n.output}
    outputs = []
    for name, r in zip(out_names, module.main.results[:len(out_names)]):
        n = producer.get(name)
        outputs.append(compare(name, got[r.name], ref[name], rtol, atol, ir_name=r.name,
                               node=n.name if n is not None else "", op_type=n.op_type if n is not None else ""))
    layers, skipped = [], []
    recs = {rec.name: rec for rec in snapshot}
    todo = sorted(compared, key=lambda t: order.get(id(mapping[t][0]), (0, 0)))
    with current().stage("compare", total=len(todo)) as task:
        for t in todo:
            v = mapping[t][0]
            rec = recs[t]
            if id(v) in seen:
                perm = perm_of(v)
                got_t = np.transpose(np.asarray(seen[id(v)]), _inverse(perm)) if perm else seen[id(v)]
                c = compare(t, got_t, ref[t], rtol, atol, ir_name=v.name, node=rec.node or rec.loc_key,
                            op_type=rec.op_type)
                layers.append(dataclasses.replace(c, perm=perm) if perm else c)
            else:  # an op inside a region that never ran, say
                skipped.append(NotCompared(t, rec.node or rec.loc_key, rec.op_type, "not computed at run time"))
            task.advance()
    for t, (v, why) in mapping.items():
        if v is None:
            rec = recs[t]
            skipped.append(NotCompared(t, rec.node or rec.loc_key, rec.op_type, why))
    return Report(model=pre.label, backend=backend, precision=precision, rtol=rtol, atol=atol,
                  seed=None if pre.given else seed, ort_version=ort.__version__,
                  outputs=tuple(outputs), layers=tuple(layers), not_compared=tuple(skipped),
                  unmapped_ir_values=unmapped, per_layer=per_layer)


def _load_proto(model, external: bool):
    import onnx
    if not isinstance(model, (str, Path)):
        return model
    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as e:
        raise AccuracyError(f"{model}: not a readable ONNX model ({e})") from None
    if external:  # nnc reads external data itself, every location checked (onnx_import/_external_data.py)
        from .onnx_import._external_data import inline_external
        proto = inline_external(proto, str(Path(model).resolve().parent))
    return proto


# ----------------------------------------------------------------------------- rendering

SHOW_NAMES = 12  # not-compared tensors listed by name per reason
COLUMNS = ("tensor", "node", "op", "dtype", "shape", "max-abs", "rel-L2", "failing", "verdict")


def _show(s: str) -> str:
    """A model-given name made safe to print (no escape sequences or line breaks reach the screen)."""
    from .codegen.escape import terminal_text
    return terminal_text(s)


def _row(c: TensorCheck) -> tuple:
    verdict = "PASS" if c.passed else "FAIL"
    if c.nonfinite:
        verdict += f" ({c.nonfinite} non-finite)"
    if c.note:
        verdict += f" ({c.note})"
    return (_show(c.name), _show(c.node), _show(c.op_type), c.dtype, "x".join(map(str, c.shape)) or "scalar",
            f"{c.max_abs:.3g}", f"{c.rel_l2:.3g}", f"{100 * c.fail_fraction:.2f}%", verdict)


def _header(r: Report) -> str:
    atol = f"{r.atol:g}" if r.atol is not None else "rtol x max|onnxruntime| per tensor"
    inputs = "given inputs" if r.seed is None else f"random inputs (seed {r.seed})"
    return (f"nnc verify {_show(r.model)}: {r.backend} backend, {r.precision}, against onnxruntime {r.ort_version}, "
            f"{inputs}, rtol {r.rtol:g}, atol {atol}")


def _layer_line(what: str, c: Optional[TensorCheck]) -> str:
    if c is None:
        return f"{what}: none"
    extra = f", {c.nonfinite} non-finite" if c.nonfinite else ""
    return (f"{what}: node '{_show(c.node)}' ({_show(c.op_type)}), tensor '{_show(c.name)}': max-abs {c.max_abs:.3g}, "
            f"rel-L2 {c.rel_l2:.3g}, {100 * c.fail_fraction:.2f}% of elements failing{extra}")


def summary_lines(r: Report) -> list[str]:
    lines = []
    if r.per_layer:
        reasons: dict = {}
        for s in r.not_compared:
            reasons[s.reason] = reasons.get(s.reason, 0) + 1
        why = "".join(f", {n} {k}" for k, n in sorted(reasons.items()))
        lines.append(f"per-layer: {len(r.layers)} tensors compared{why}; {r.unmapped_ir_values} IR values "
                     f"with no ONNX tensor (made by passes) not compared")
        for reason in sorted(reasons):
            names = [_show(s.name) for s in r.not_compared if s.reason == reason]
            more = f" ... (+{len(names) - SHOW_NAMES})" if len(names) > SHOW_NAMES else ""
            lines.append(f"  {reason}: {', '.join(names[:SHOW_NAMES])}{more}")
        lines.append(_layer_line("first layer over tolerance", r.first_failure))
        lines.append(_layer_line("first layer with non-finite values", r.first_nonfinite))
    bad = [c.name for c in r.outputs if not c.passed]
    lines.append(f"FAILED: {len(bad)} of {len(r.outputs)} outputs outside tolerance ({', '.join(map(_show, bad))})" if bad
                 else f"PASSED: all {len(r.outputs)} outputs within tolerance")
    return lines


def format_text(r: Report) -> str:
    """The report as plain aligned text (pipes, logs, CI)."""
    def table(title, checks):
        rows = [COLUMNS] + [_row(c) for c in checks]
        w = [max(len(str(row[i])) for row in rows) for i in range(len(COLUMNS))]
        out = [title]
        out += ["  " + "  ".join(str(x).ljust(w[i]) for i, x in enumerate(row)).rstrip() for row in rows]
        return out
    lines = [_header(r)]
    if r.per_layer:
        lines += table("layers (execution order):", r.layers)
    lines += table("outputs:", r.outputs)
    return "\n".join(lines + summary_lines(r)) + "\n"


def print_rich(r: Report, console) -> None:
    """The report as rich tables (a terminal)."""
    from rich.markup import escape
    from rich.table import Table

    def table(title, checks):
        t = Table(title=title, title_justify="left")
        for i, c in enumerate(COLUMNS):
            t.add_column(c, justify="right" if 5 <= i <= 7 else "left")
        for c in checks:
            row = [escape(x) for x in _row(c)]
            row[-1] = f"[green]{row[-1]}[/green]" if c.passed else f"[bold red]{row[-1]}[/bold red]"
            t.add_row(*row)
        return t
    console.print(_header(r), markup=False, highlight=False)
    if r.per_layer:
        console.print(table("layers (execution order)", r.layers))
    console.print(table("outputs", r.outputs))
    for line in summary_lines(r):
        console.print(line, markup=False, highlight=False)
