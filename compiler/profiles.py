"""Optimization profiles (TensorRT's --minShapes/--optShapes/--maxShapes): the input shapes one
build serves, as a (min, opt, max) range per input.

    nnc compile M.onnx -o OUT --profile input:1x3x224x224/8x3x224x224/32x3x224x224
    nnc.compile(M, profiles=["ids:1x1/8x128/32x512,mask:1x1/8x128/32x512"])
    nnc.compile(M, profiles=[Profile.of(input=((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224)))])

What a profile compiles to, today:
- min == opt == max for every input (a static profile): a static build of those shapes, as
  --shapes gives. One static profile writes OUT as a single build (plan.json records the
  profile); several write one build each under OUT/profiles/<i>/ and an index OUT/plan.json
  ("profile_builds": their count), and nnc.load(OUT) runs the build whose shapes the inputs
  have (ProfileSetModule). Build i's C API is nnc_<name>_p<i>_*; OUT/nnc_<name>_profiles.{h,cu}
  (render_profile_set) put nnc_<name>_set_* over all of them, one library (OUT/CMakeLists.txt).
- a range: the reference backend (no CUDA codegen) keeps the symbolic dims symbolic and checks
  every run's inputs against the profiles. With CUDA code generation, ONE range profile is one
  build with runtime sizes (compile_range, codegen/runtime_sizes.py): buffers at the max shapes,
  kernels of runtime_sizes variants taking the symbols per run (an op with none is a clear
  LoweringError naming it), plan.json "runtime_sizes": {symbol: [min, opt, max]}; nnc.load binds
  the symbols from each run's input shapes (one CUDA graph per distinct shape), the C API by
  <api>_set_input_shape. Kernels are chosen by the heuristic at max (no tuning at opt yet). With
  other profiles, a range is one build of the directory's set (OUT/profiles/<i>/; the set's C API
  is then not written: it selects by static shapes); every ranged dim must be a named symbol.
- no --shapes and no --profile with code generation on a model with symbolic input dims: every
  symbolic dim is 1 (min = opt = max) and a warning names the dims and prints a --profile line
  to copy, as trtexec does.

At run time (check_run): wrong rank, a static dim that differs, a symbol two inputs disagree on,
or inputs outside every profile are an InputError naming the input, its shape and the ranges,
before anything runs.
"""
from __future__ import annotations

import contextvars
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from .api import ExecutionContext, Module
from .ir.errors import InputError, NncError

Dims = tuple[int, ...]
ModelDim = Union[int, str, None]  # a static size, a symbol's name, or None: unnamed (ONNX dim without value or param)



class ProfileError(NncError):
    """A malformed or invalid optimization profile (the message names the profile, input and dim)."""


def _dims_text(d: Sequence) -> str:
    return "x".join(str(x) for x in d)


def shapes_text(dims: Mapping) -> str:
    """'input:1x3x32x32,mask:?': {input: dims} as one line (None: a shape the plan does not give)."""
    return ",".join(f"{n}:" + ("?" if d is None else _dims_text(d)) for n, d in dims.items())


@dataclass(frozen=True)
class InputRange:
    """One input's shapes in a profile: every dim k holds min[k] <= d <= max[k]; opt is the shape
    to tune for (the static build's shape when min == opt == max)."""
    name: str
    min: Dims
    opt: Dims
    max: Dims

    @property
    def is_static(self) -> bool:
        return self.min == self.opt == self.max

    def holds(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.min) and all(lo <= d <= hi for lo, d, hi in zip(self.min, shape, self.max))

    def text(self) -> str:
        return f"{self.name}:{_dims_text(self.min)}/{_dims_text(self.opt)}/{_dims_text(self.max)}"


@dataclass(frozen=True)
class Profile:
    """An optimization profile: an InputRange per dynamic input (inputs not named keep the model's
    dims; a symbol they share with a named input takes its range)."""
    inputs: tuple[InputRange, ...]

    @classmethod
    def of(cls, **ranges) -> "Profile":
        """Profile.of(x=((1, 3), (8, 3), (32, 3))): keyword per input, (min, opt, max)."""
        return from_mapping(ranges)

    @property
    def is_static(self) -> bool:
        return all(r.is_static for r in self.inputs)

    def get(self, name: str) -> Optional[InputRange]:
        return next((r for r in self.inputs if r.name == name), None)

    def text(self) -> str:
        """The --profile argument that gives this profile."""
        return ",".join(r.text() for r in self.inputs)

    def static_shapes(self) -> dict:
        """{input: opt dims} (a static profile's shapes, what --shapes would give)."""
        return {r.name: list(r.opt) for r in self.inputs}

    def to_json(self) -> dict:
        return {r.name: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)} for r in self.inputs}

    @classmethod
    def from_json(cls, doc, where: str = "plan.json profiles") -> "Profile":
        if not isinstance(doc, Mapping) or not doc:
            raise ProfileError(f"{where}: expected an object {{input: {{min, opt, max}}}}")
        try:
            return from_mapping({k: (v["min"], v["opt"], v["max"]) for k, v in doc.items()}, where)
        except (KeyError, TypeError):
            raise ProfileError(f"{where}: every input needs 'min', 'opt' and 'max' dim lists") from None


# ---------------------------------------------------------------------------- parsing


_DIMS = re.compile(r"[0-9]+(x[0-9]+)*")


def parse_profile(text: str, what: str = "--profile") -> Profile:
    """'NAME:MIN/OPT/MAX[,NAME:MIN/OPT/MAX...]' with each shape DxDx.. (trtexec's dims). The name
    is split off at the last ':'. Errors give the column (1-based) of the bad part."""
    if not isinstance(text, str) or not text.strip():
        raise ProfileError(f"{what}: empty; expected NAME:MIN/OPT/MAX, e.g. input:1x3x224x224/8x3x224x224/32x3x224x224")
    ranges, col = [], 1
    for part in text.split(","):
        at = f"{what} {text!r} at column {col} ({part!r})"
        if ":" not in part:
            raise ProfileError(f"{at}: expected NAME:MIN/OPT/MAX (e.g. input:1x3/8x3/32x3)")
        name, spec = part.rsplit(":", 1)
        if not name:
            raise ProfileError(f"{at}: no input name before ':'")
        shapes = spec.split("/")
        if len(shapes) != 3:
            raise ProfileError(f"{at}: expected three shapes MIN/OPT/MAX joined by '/', given {len(shapes)}")
        dims = []
        off = col + len(name) + 1
        for label, s in zip(("min", "opt", "max"), shapes):
            if s and not _DIMS.fullmatch(s):
                raise ProfileError(f"{what} {text!r} at column {off} ({s!r}, the {label} shape of {name!r}): "
                                   f"dims must be integers >= 0 joined by 'x'")
            dims.append(tuple(int(d) for d in s.split("x")) if s else ())
            off += len(s) + 1
        ranges.append((name, dims, at))
        col += len(part) + 1
    seen = set()
    for name, _, at in ranges:
        if name in seen:
            raise ProfileError(f"{at}: input {name!r} is given twice in one profile")
        seen.add(name)
    return from_mapping({n: tuple(d) for n, d, _ in ranges}, what)


def from_mapping(ranges: Mapping, what: str = "profile") -> Profile:
    """{input: (min, opt, max)} -> Profile, each shape a sequence of ints >= 0 of one rank, with
    min <= opt <= max in every dim."""
    if not isinstance(ranges, Mapping) or not ranges:
        raise ProfileError(f"{what}: expected {{input name: (min, opt, max)}} with at least one input")
    out = []
    for name, mom in ranges.items():
        if not isinstance(name, str) or not name:
            raise ProfileError(f"{what}: input names must be non-empty strings, given {name!r}")
        if isinstance(mom, (str, bytes)) or not hasattr(mom, "__len__") or len(mom) != 3:
            raise ProfileError(f"{what}: input {name!r}: expected (min, opt, max) shapes, given {mom!r}")
        shapes = []
        for label, s in zip(("min", "opt", "max"), mom):
            if isinstance(s, (str, bytes)) or not hasattr(s, "__iter__") or not all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s):
                raise ProfileError(f"{what}: input {name!r}: {label} shape must be ints >= 0, given {s!r}")
            shapes.append(tuple(int(d) for d in s))
        lo, opt, hi = shapes
        if not len(lo) == len(opt) == len(hi):
            raise ProfileError(f"{what}: input {name!r}: min {_dims_text(lo)}, opt {_dims_text(opt)} and max "
                               f"{_dims_text(hi)} have different ranks ({len(lo)}, {len(opt)}, {len(hi)})")
        for k, (a, b, c) in enumerate(zip(lo, opt, hi)):
            if not a <= b <= c:
                raise ProfileError(f"{what}: input {name!r} dim {k}: needs min <= opt <= max, given "
                                   f"{a} / {b} / {c} ({_dims_text(lo)}/{_dims_text(opt)}/{_dims_text(hi)})")
        out.append(InputRange(name, lo, opt, hi))
    return Profile(tuple(out))


def normalize_profiles(profiles) -> tuple[Profile, ...]:
    """None | a Profile | 'x:1/8/32' | {input: (min, opt, max)} | a sequence of those -> profiles."""
    if profiles is None:
        return ()
    if isinstance(profiles, (Profile, str, Mapping)):
        profiles = [profiles]
    if not isinstance(profiles, (list, tuple)):
        raise ProfileError(f"profiles: expected a list of Profile, 'NAME:MIN/OPT/MAX,...' or "
                           f"{{input: (min, opt, max)}}, given {type(profiles).__name__}")
    out = []
    for i, p in enumerate(profiles):
        if isinstance(p, Profile):
            out.append(p)
        elif isinstance(p, str):
            out.append(parse_profile(p, f"profiles[{i}]"))
        elif isinstance(p, Mapping):
            out.append(from_mapping(p, f"profiles[{i}]"))
        else:
            raise ProfileError(f"profiles[{i}]: expected a Profile, a string or a dict, given {type(p).__name__}")
    return tuple(out)


# ---------------------------------------------------------------------------- against the model


@dataclass(frozen=True)
class ModelInput:
    name: str
    dims: Optional[tuple[ModelDim, ...]]  # None: unknown rank

    @property
    def symbols(self) -> list[str]:
        return [d for d in self.dims or () if isinstance(d, str)]

    @property
    def dynamic(self) -> bool:
        return self.dims is None or any(not isinstance(d, int) for d in self.dims)

    def text(self) -> str:
        return "[*]" if self.dims is None else "[" + ",".join("?" if d is None else str(d) for d in self.dims) + "]"


def model_signature(model) -> tuple[ModelInput, ...]:
    """The model's inputs (initializers excluded) with ONNX's dims: ints, dim_param names as the
    importer spells them, None for a dim with neither."""
    import onnx
    from .onnx_import import sanitize_symbol
    m = onnx.load(str(model), load_external_data=False) if isinstance(model, (str, Path)) else model
    inits = {i.name for i in m.graph.initializer}
    out = []
    for i in m.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        if not i.type.HasField("tensor_type") or not tt.HasField("shape"):
            out.append(ModelInput(i.name, None))
            continue
        dims = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param:
                dims.append(sanitize_symbol(d.dim_param))
            else:
                dims.append(None)
        out.append(ModelInput(i.name, tuple(dims)))
    return tuple(out)


def signature_from_plan(entries) -> tuple[ModelInput, ...]:
    return tuple(ModelInput(e["name"], None if e["shape"] is None else tuple(e["shape"])) for e in entries)


def validate(profile: Profile, sig: Sequence[ModelInput], where: str = "profile") -> dict:
    """Checks a profile against the model's inputs; returns {symbol: (min, opt, max)}."""
    by_name = {m.name: m for m in sig}
    syms: dict = {}  # symbol -> ((min, opt, max), input, dim)
    for r in profile.inputs:
        m = by_name.get(r.name)
        if m is None:
            raise ProfileError(f"{where}: {r.name!r} is not a model input; the inputs are {list(by_name)}")
        if m.dims is not None and len(m.dims) != len(r.min):
            raise ProfileError(f"{where}: input {r.name!r} has rank {len(m.dims)} {m.text()}, the profile gives "
                               f"rank {len(r.min)} ({r.text()})")
        for k, d in enumerate(m.dims or ()):
            got = (r.min[k], r.opt[k], r.max[k])
            if isinstance(d, int):
                if got != (d, d, d):
                    raise ProfileError(f"{where}: input {r.name!r} dim {k} is fixed at {d} in the model {m.text()}, "
                                       f"the profile gives {got[0]}/{got[1]}/{got[2]}")
            elif isinstance(d, str):
                prev = syms.get(d)
                if prev is not None and prev[0] != got:
                    raise ProfileError(
                        f"{where}: symbolic dim {d} has {prev[0][0]}/{prev[0][1]}/{prev[0][2]} in input "
                        f"{prev[1]!r} (dim {prev[2]}) but {got[0]}/{got[1]}/{got[2]} in input {r.name!r} (dim {k}); "
                        f"every input using {d} must give it the same range")
                syms.setdefault(d, (got, r.name, k))
    for m in sig:
        if profile.get(m.name) is None and m.dynamic:
            missing = sorted({d for d in m.symbols if d not in syms})
            if m.dims is None or None in m.dims or missing:
                what = f"symbolic dims {', '.join(missing)}" if missing else "dims without a name"
                raise ProfileError(f"{where}: input {m.name!r} {m.text()} has {what} the profile does not "
                                   f"give; add {m.name}:MIN/OPT/MAX")
    return {s: v[0] for s, v in syms.items()}


def default_profile(sig: Sequence[ModelInput]) -> Optional[tuple[dict, str]]:
    """trtexec's default for a model with symbolic input dims and no shapes: every symbolic dim 1.
    Returns ({input: dims}, the warning), or None when every input dim is static. An input of
    unknown rank cannot be defaulted: None then too (the compile's own error names it)."""
    dyn = [m for m in sig if m.dynamic]
    if not dyn or any(m.dims is None for m in dyn):
        return None
    shapes = {m.name: [d if isinstance(d, int) else 1 for d in m.dims] for m in dyn}
    users: dict = {}
    for m in dyn:
        for k, d in enumerate(m.dims):
            if not isinstance(d, int):
                users.setdefault(d if d is not None else f"{m.name}[{k}]", []).append(m.name)
    from .codegen.escape import terminal_text  # input names come from the model file
    named = "; ".join(f"{terminal_text(s)} (in {', '.join(map(terminal_text, dict.fromkeys(u)))})"
                      for s, u in users.items())
    line = ",".join(f"{terminal_text(n)}:{_dims_text(s)}/{_dims_text(s)}/{_dims_text(s)}" for n, s in shapes.items())
    msg = (f"the model has symbolic input dims {named}: building with every symbolic dim = 1 "
           f"(min = opt = max), as trtexec does. Give --shapes, or a range with (edit and copy): "
           f"--profile {line}")
    return shapes, msg


# ---------------------------------------------------------------------------- at run time


def _shape_of(x) -> tuple:
    import numpy as np
    s = getattr(x, "shape", None)
    return tuple(int(d) for d in (s if s is not None else np.shape(x)))


def check_run(feed: Mapping, sig: Sequence[ModelInput], profiles: Sequence[Profile]) -> Optional[int]:
    """The index of the first profile holding the feed's shapes (None when there are no profiles),
    after checking ranks, static dims and that inputs sharing a symbol agree on it. Inputs not in
    the feed are left to the backend's own error. Raises InputError otherwise."""
    shapes = {m.name: _shape_of(feed[m.name]) for m in sig if m.name in feed}
    seen: dict = {}  # symbol -> (value, input, dim)
    for m in sig:
        if m.name not in shapes or m.dims is None:
            continue
        s = shapes[m.name]
        if len(s) != len(m.dims):
            raise InputError(f"input {m.name!r}: shape {list(s)} has rank {len(s)}; the model's is {len(m.dims)} "
                             f"{m.text()}")
        for k, (d, g) in enumerate(zip(m.dims, s)):
            if isinstance(d, int) and d != g:
                raise InputError(f"input {m.name!r}: shape {list(s)}, dim {k} must be {d} (the model's {m.text()})")
            if isinstance(d, str):
                prev = seen.setdefault(d, (g, m.name, k))
                if prev[0] != g:
                    raise InputError(f"inputs disagree on symbolic dim {d}: {d} = {prev[0]} in input {prev[1]!r} "
                                     f"(dim {prev[2]}, shape {list(shapes[prev[1]])}) but {g} in input {m.name!r} "
                                     f"(dim {k}, shape {list(s)})")
    if not profiles:
        return None
    why = []
    for i, p in enumerate(profiles):
        bad = [r for r in p.inputs if r.name in shapes and not r.holds(shapes[r.name])]
        if not bad:
            return i
        why.append(f"profile {i}: " + ", ".join(
            f"{r.name} shape {list(shapes[r.name])} not in "
            + (f"{_dims_text(r.min)}" if r.is_static else f"{_dims_text(r.min)} .. {_dims_text(r.max)}")
            for r in bad))
    first = next(r for r in profiles[0].inputs if r.name in shapes and not r.holds(shapes[r.name]))
    raise InputError(f"input {first.name!r} with shape {list(shapes[first.name])} is outside every profile "
                     f"({'; '.join(why)})")


def profiles_from_plan(plan: Mapping, where: str) -> tuple[Profile, ...]:
    docs = plan.get("profiles", [])
    if not isinstance(docs, list):
        raise NncError(f"{where}: 'profiles' must be a list")
    return tuple(Profile.from_json(d, f"{where}: profiles[{i}]") for i, d in enumerate(docs))


# ---------------------------------------------------------------------------- compiling


def compile_with_profiles(model, out, options, dump_ir, compile_model) -> dict:
    """driver.compile_model for options.profiles (see the module docstring for what each gets)."""
    import dataclasses
    import json
    from .outdir import staged_dir
    profiles = options.profiles
    sig = model_signature(model)
    for i, p in enumerate(profiles):
        validate(p, sig, f"profile {i} ({p.text()})")
    record = {"profiles": [p.to_json() for p in profiles]}
    plain = dataclasses.replace(options, profiles=())
    if all(p.is_static for p in profiles) and len(profiles) == 1:
        return compile_model(model, out, dump_ir=dump_ir, plan_extra=record,
                             options=dataclasses.replace(plain, shapes=_shapes(profiles[0])))
    if not options.generates_cuda:  # the reference backend: symbolic dims stay, checked per run
        for i, p in enumerate(profiles):
            check_corners(model, p, f"profile {i}")
        return compile_model(model, out, dump_ir=dump_ir, plan_extra=record, options=plain)
    ranged = [i for i, p in enumerate(profiles) if not p.is_static]
    if ranged and len(profiles) == 1:
        return compile_range(model, out, profiles[0], sig, record, plain, dump_ir, compile_model)
    from .onnx_import import import_model
    from .driver import io_entry, model_name
    symbolic = import_model(model)  # the index's inputs/outputs keep the model's symbols
    name = model_name(options.name, model)
    with staged_dir(out) as tmp:
        builds = []
        for i, p in enumerate(profiles):
            # build i's C API is nnc_<name>_p<i>_*: every build links into the set's one library
            dump = Path(dump_ir) / str(i) if dump_ir else None
            extra = {"profiles": [p.to_json()], "profile_index": i}
            if not p.is_static:  # a range: one build with runtime sizes (nnc.load picks it per run)
                builds.append(compile_range(model, tmp / "profiles" / str(i), p, sig, extra,
                                            dataclasses.replace(plain, name=build_name(name, i)), dump,
                                            compile_model, f"profile {i}"))
                continue
            builds.append(compile_model(model, tmp / "profiles" / str(i), dump_ir=dump, plan_extra=extra,
                                        options=dataclasses.replace(plain, shapes=_shapes(p),
                                                                    name=build_name(name, i))))
        # the set's C API picks a build by static shapes: written for sets of static profiles only
        set_files = render_profile_set(name, profiles, builds) if not ranged else {}
        for fname, text in set_files.items():
            (tmp / fname).write_text(text)
        c_api = {"prefix": f"nnc_{name}_set", "files": sorted(set_files)} if not ranged else {
            "not_written": f"profile {ranged[0]} is a range: the set C API takes static profiles only (each "
                           f"build's own nnc_{name}_p<i>_* API is there, with set_input_shape for a range)"}
        index = {"name": name,
                 "inputs": [io_entry(a) for a in symbolic.main.args],
                 "outputs": [io_entry(r) for r in symbolic.main.results],
                 "profile_builds": len(profiles), **record,
                 "c_api": c_api,
                 "kernels": [k for b in builds for k in b.get("kernels", [])]}
        (tmp / "plan.json").write_text(json.dumps({k: v for k, v in index.items() if k != "kernels"}, indent=1) + "\n")
    return index


_RANGE_BUILD = contextvars.ContextVar("nnc_range_build", default=False)


def compile_range(model, out, p: Profile, sig, record: dict, plain, dump_ir, compile_model,
                  where: str = "profile 0") -> dict:
    """One CUDA build for a range profile: the IR keeps the symbolic dims, lowering sizes buffers
    at the profile's max and the kernels take the sizes at run time (codegen/runtime_sizes.py).
    plan.json "runtime_sizes": {symbol: [min, opt, max]}. Every dim with a range must be a named
    symbol of the model (an unnamed dim is refused: its value could not be bound per run)."""
    symbols = validate(p, sig, where)
    by_name = {m.name: m for m in sig}
    for r in p.inputs:
        dims = by_name[r.name].dims or ()
        for k, (lo, hi) in enumerate(zip(r.min, r.max)):
            if lo != hi and (k >= len(dims) or not isinstance(dims[k], str)):
                raise ProfileError(f"{where} ({p.text()}): input {r.name!r} dim {k} has the range {lo}..{hi} "
                                   f"but no symbolic name in the model ({by_name[r.name].text()}); a range build "
                                   f"binds each named symbol per run: give the dim a dim_param")
    for s_, (lo, _, _) in symbols.items():
        if lo < 1:
            raise ProfileError(f"{where} ({p.text()}): symbolic dim {s_} has min {lo}; a range build needs "
                               f"every size >= 1")
    check_corners(model, p, where)
    ranges = {s_: list(v) for s_, v in symbols.items()}
    # kernels are chosen by the heuristic, which sees the max shapes: timing-based tuning (at opt, as
    # the issue asks) does not know symbolic problems yet, so a range build does not tune
    import dataclasses
    plain = dataclasses.replace(plain, tune=False)
    note = "heuristic selection at the profile's max shapes (tuning at opt not implemented for ranges)"
    token = _RANGE_BUILD.set(True)
    try:
        return compile_model(model, out, dump_ir=dump_ir, options=plain,
                             plan_extra={**record, "runtime_sizes": ranges, "runtime_sizes_tactics": note})
    finally:
        _RANGE_BUILD.reset(token)


def build_name(name: str, i: int) -> str:
    """The --name of profile i's build in a profile set (its C API: nnc_<name>_p<i>_*)."""
    return f"{name}_p{i}"


def render_profile_set(name: str, profiles: Sequence[Profile], builds: Sequence[Mapping]) -> dict:
    """The set's C API over the builds of a profile set: {file name in OUT: text}, rendered from
    templates/profile_set.*.j2. builds: each profile's plan.json (its static inputs and outputs,
    the names and dtypes the same in every build; arch from the first)."""
    from .codegen.render import render
    first = builds[0]

    def io(key):
        out = []
        for k, e in enumerate(first[key]):
            for i, b in enumerate(builds):
                o = b[key][k]
                if o["name"] != e["name"] or o["dtype"] != e["dtype"] or len(o["shape"]) != len(e["shape"]):
                    raise ProfileError(f"profile {i}: {key[:-1]} {k} is {o['name']!r} {o['dtype']} of rank "
                                       f"{len(o['shape'])}, profile 0's {e['name']!r} {e['dtype']} of rank "
                                       f"{len(e['shape'])}: the set's C API needs one name, dtype and rank")
            out.append({"name": e["name"], "dtype": e["dtype"], "rank": len(e["shape"])})
        return out
    inputs, outputs = io("inputs"), io("outputs")
    sets = [{"api": f"nnc_{build_name(name, i)}", "dir": f"profiles/{i}", "text": p.text(),
             "input_dims": [d for e in b["inputs"] for d in e["shape"]],
             "output_dims": [d for e in b["outputs"] for d in e.get("max_shape", e["shape"])],
             "input_nbytes": [e["nbytes"] for e in b["inputs"]],
             "output_nbytes": [e["nbytes"] for e in b["outputs"]]}
            for i, (p, b) in enumerate(zip(profiles, builds))]
    header, source = f"nnc_{name}_profiles.h", f"nnc_{name}_profiles.cu"
    common = dict(model_name=name, api=f"nnc_{name}", header=header, source=source, profiles=sets,
                  inputs=inputs, outputs=outputs)
    return {header: str(render("profile_set.h.j2", **common)),
            source: str(render("profile_set.cu.j2", **common)),
            "CMakeLists.txt": str(render("profile_set.CMakeLists.txt.j2", target=f"nnc_{name}_profiles",
                                         arch_num=str(first["arch"]).replace("sm_", ""), **common))}


def check_corners(model, p: Profile, where: str) -> None:
    """The model imports (shape inference and the verifier) at the profile's min, opt and max
    shapes: a range the graph cannot take (a Reshape to a fixed shape, say) is a compile-time
    error naming the shape, not a run-time one. (Between the corners, shapes are checked per run.)"""
    from .ir.verify import verify
    from .onnx_import import import_model
    for label in ("min", "opt", "max"):
        shapes = {r.name: list(getattr(r, label)) for r in p.inputs}
        if label != "min" and all(getattr(r, label) == r.min for r in p.inputs):
            continue
        try:
            verify(import_model(model, shapes=shapes))
        except NncError as e:
            text = ",".join(f"{n}:{_dims_text(d)}" for n, d in shapes.items())
            raise ProfileError(f"{where} ({p.text()}): the model does not take its {label} shape {text}: {e}") from None


def _shapes(p: Profile) -> tuple:
    from .api import normalize_shapes
    return normalize_shapes(p.static_shapes())


def default_shapes(model, options, warn) -> object:
    """options with trtexec's default shapes when CUDA is generated without shapes or profiles on
    a model with symbolic input dims (warn(message) says which and how to choose)."""
    import dataclasses
    if options.shapes or options.profiles or not options.generates_cuda or _RANGE_BUILD.get():
        return options
    got = default_profile(model_signature(model))
    if got is None:
        return options
    shapes, msg = got
    warn(msg)
    from .api import normalize_shapes
    return dataclasses.replace(options, shapes=normalize_shapes(shapes))


# ---------------------------------------------------------------------------- loading


class ProfileSetModule(Module):
    """nnc.load of a directory with one build per static profile (OUT/profiles/<i>/): each run
    goes to the build whose profile holds the input shapes (loaded on first use), after
    check_run. Interface of nnc.api.Module; its inputs keep the model's symbolic dims."""

    @staticmethod
    def is_profile_set(out) -> bool:
        import json
        import os
        p = Path(out) / "plan.json"
        if not os.path.lexists(p) or p.is_symlink() or not p.is_file():
            return False  # the ordinary loaders give their own errors
        try:
            return "profile_builds" in json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return False

    def __init__(self, out, backend, **load_kw):
        import threading
        from .plan_file import read_plan
        self.dir = Path(out)
        self.backend = backend
        self.plan = read_plan(self.dir)
        n = self.plan.get("profile_builds")
        self.profiles = profiles_from_plan(self.plan, str(self.dir / "plan.json"))
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n != len(self.profiles):
            raise NncError(f"{self.dir}/plan.json: 'profile_builds' must be the number of profiles "
                           f"({len(self.profiles)}), given {n!r}")
        self._sig = signature_from_plan(self.plan["inputs"])
        self._load_kw = {k: v for k, v in load_kw.items() if not (k == "in_arena" and v is None)}
        if backend == "cuda":
            self._load_kw.pop("in_arena", None)
        else:
            self._load_kw.pop("cuda_graph", None)
        self._builds: dict = {}
        self._lock = threading.Lock()
        if backend == "cuda":  # builds load on first use: say now that there is no GPU
            from .runtime import require_gpu
            require_gpu()

    def build(self, i: int):
        """The loaded build of profile i (OUT/profiles/<i>/)."""
        with self._lock:
            m = self._builds.get(i)
            if m is None:
                from .api import load
                m = self._builds[i] = load(self.dir / "profiles" / str(i), self.backend, **self._load_kw)
            return m

    def pick(self, inputs: Mapping) -> int:
        """The profile whose build runs these inputs (InputError when none holds them)."""
        if not isinstance(inputs, Mapping):
            raise InputError(f"run(inputs): expected a dict {{input name: array}}, given {type(inputs).__name__}")
        return check_run(inputs, self._sig, self.profiles)

    def run(self, inputs, outputs=None, *, output=None, stream=None) -> dict:
        self._selected(outputs)
        kw = {k: v for k, v in (("output", output), ("stream", stream)) if v is not None}
        return self.build(self.pick(inputs)).run(inputs, outputs, **kw)

    def context(self):
        return ProfileSetContext(self)

    def close(self) -> None:
        for m in self._builds.values():
            m.close()


class ProfileSetContext(ExecutionContext):
    """A context of a ProfileSetModule: one context per build, made when a run first needs it."""

    def __init__(self, module: ProfileSetModule):
        super().__init__(module)
        self._ctx: dict = {}

    def _run(self, inputs, outputs, output):
        i = self.module.pick(inputs)
        if i not in self._ctx:
            self._ctx[i] = self.module.build(i).context()
        kw = {"output": output} if output is not None else {}
        return self._ctx[i].run(inputs, outputs, **kw)


def opt_inputs(plan: Mapping) -> list:
    """plan.json's "inputs" with the first profile's opt shapes in place of symbols (`nnc run`'s
    random inputs for a directory with profiles); the entries as they are without profiles."""
    entries = plan.get("inputs", [])
    profiles = profiles_from_plan(plan, "plan.json")
    if not profiles:
        return entries
    p, syms = profiles[0], {}
    for e in entries:
        r = p.get(e["name"])
        if r is not None and e["shape"] is not None:
            syms.update({d: o for d, o in zip(e["shape"], r.opt) if isinstance(d, str)})
    out = []
    for e in entries:
        r = p.get(e["name"])
        shape = list(r.opt) if r is not None else None if e["shape"] is None else [syms.get(d, d) for d in e["shape"]]
        out.append({**e, "shape": shape})
    return out


# ---------------------------------------------------------------------------- the builds, for bench and inspect


@dataclass(frozen=True)
class ProfileBuild:
    """One build `nnc bench` / `nnc inspect` looks at: OUT itself (index None), or OUT/profiles/<i>/
    of a directory with one build per static profile (index i, its profile from the index)."""
    index: Optional[int]
    profile: Optional[Profile]
    dir: Path


def _dims_of(entries) -> dict:
    return {e["name"]: e["shape"] for e in entries}


def select_builds(out, profile: Optional[int] = None, shapes: Optional[Mapping] = None) -> list:
    """The ProfileBuilds of OUT to look at: every build of a profile set (OUT/plan.json with
    "profile_builds"), or the one `profile` names, or the one whose profile holds `shapes`
    ({input: dims}, as --shapes gives; an InputError naming the input, its shape and every
    profile's shapes when none does, as nnc.load's runs). A directory of one build is its only
    build (profile 0; `shapes` must be its input shapes)."""
    from types import SimpleNamespace
    from .plan_file import read_plan
    out = Path(out)
    plan = read_plan(out)
    if profile is not None and shapes:
        raise NncError("--profile and --shapes both pick the build: give one of them")
    if "profile_builds" not in plan:
        if profile not in (None, 0):
            raise NncError(f"--profile {profile}: {out} is a single build (profile 0 only); several builds come "
                           f"from `nnc compile` with several static --profile")
        if shapes:
            have = _dims_of(plan.get("inputs", []))
            for name, dims in shapes.items():
                if name not in have:
                    raise InputError(f"--shapes: {name!r} is not an input of {out}; the inputs are {list(have)}")
                if list(dims) != list(have[name] or []):
                    raise InputError(f"--shapes: input {name!r} with shape {list(dims)} is not the shape {out} "
                                     f"was built for ({_dims_text(have[name] or [])})")
        return [ProfileBuild(None, None, out)]
    profiles = profiles_from_plan(plan, str(out / "plan.json"))
    n = plan["profile_builds"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n != len(profiles):
        raise NncError(f"{out}/plan.json: 'profile_builds' must be the number of profiles "
                       f"({len(profiles)}), given {n!r}")
    builds = [ProfileBuild(i, p, out / "profiles" / str(i)) for i, p in enumerate(profiles)]
    if profile is not None:
        if isinstance(profile, bool) or not isinstance(profile, int) or not 0 <= profile < n:
            raise NncError(f"--profile {profile}: {out} has profiles 0 to {n - 1} "
                           f"({'; '.join(f'{b.index}: {b.profile.text()}' for b in builds)})")
        return [builds[profile]]
    if shapes:
        sig = signature_from_plan(plan["inputs"])
        known = [m.name for m in sig]
        for name in shapes:
            if name not in known:
                raise InputError(f"--shapes: {name!r} is not a model input; the inputs are {known}")
        try:
            i = check_run({k: SimpleNamespace(shape=tuple(v)) for k, v in shapes.items()}, sig, profiles)
        except InputError as e:
            raise InputError(f"--shapes: {e}") from None
        return [builds[i]]
    return builds
