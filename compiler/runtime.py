"""Python runtime for compiled model directories (the output of codegen.emit.compile_to_dir).

    m = nnc.load("out/")            # plan.json + model.<i>.cubin + weights.bin
    y = m(x)                        # numpy, cupy or torch arrays in; cupy arrays out
    outs = m.run({"input": x}, output="numpy")

A range-profile build (plan.json "runtime_sizes", codegen/runtime_sizes.py) binds its symbols
from each run's input shapes (checked against the profile first), and keeps one CUDA graph per
distinct shape (captured at its first run, GRAPH_CACHE of them) over max-size owned buffers.

CUDA graphs: the plan's shapes are static, so at load the whole run (every launch of
plan.json "launches", over device input/output buffers the module owns) is captured once into a
CUDA graph; run() copies the given inputs into those buffers, replays the graph and copies the
asked-for outputs out. Readbacks (the extent of a data-dependent output, NonZero's count) are
captured as device-to-host copies into pinned memory and read after one synchronize at the end
of the run: no launch depends on a host-read value. A plan the capture refuses runs eagerly
(Module.graph_fallback says why); nnc.load(out, cuda_graph=False) asks for eager launches.

Data-dependent sizes downstream (codegen/data_dependent.py): when later launches are sized by a
NonZero count (a symbol in the read-back buffer's sym_shape that no input binds), the run stops at
that read-back, synchronizes, binds the symbol to the count and sizes the launches after it
exactly (_run_data_dependent). A CUDA graph cannot hold that host step, so such a module runs
eagerly (graph_fallback says so).

cupy is imported lazily: importing nnc (or this module) never needs a GPU.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from . import api
from .codegen import tma
from .codegen.dtypes import BY_NP_NAME, SCALAR_NP
from .codegen.target import gpu_present
from .integrity import check_bytes, check_file
from .ir.errors import InputError, NncError


class GpuUnavailableError(NncError):
    """The CUDA backend was asked for on a machine where cupy finds no usable GPU."""


DATA_DEPENDENT_WHY = ("eager: launches after a NonZero count's read-back are sized by it (the host waits "
                      "there), which a CUDA graph cannot hold")


def require_gpu():
    """The cupy module, when it imports and sees a CUDA device; else GpuUnavailableError (not
    cupy's raw CUDARuntimeError, which names no remedy)."""
    hint = "use backend='reference' (`--backend reference` on the command line) to run the numpy reference"
    try:
        import cupy
    except Exception as e:
        raise GpuUnavailableError(f"no CUDA GPU is available (cupy cannot be imported: {e}); {hint}") from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        raise GpuUnavailableError(f"no CUDA GPU is available (cupy: {e}); {hint}") from None
    if n < 1:
        raise GpuUnavailableError(f"no CUDA GPU is available (cupy sees 0 devices); {hint}")
    return cupy


def gpu_available() -> bool:
    """True when cupy imports and sees at least one CUDA device. Never raises (the one detection,
    codegen/target.py's, which the compile side uses too)."""
    return gpu_present()


def _np_dtype(name: str) -> np.dtype:
    from .ir.types import dtype
    return dtype(name).np


# ml_dtypes types cupy lacks: they live on the device as their raw bytes (bf16 as uint16 bit
# patterns, the narrow ones one byte an element, bit-identical to the ml_dtypes numpy layout):
# numpy name -> that raw dtype, from the one dtype table (codegen/dtypes.py)
_RAW = {n: row.device_np for n, row in BY_NP_NAME.items() if row.raw_on_device}


def capture_graph(cp, st, execute):
    """(graph, None): the launches execute() issues on stream st, captured into one CUDA graph,
    uploaded and st synchronized; (None, why, a sentence for graph_fallback) when the capture fails
    (it is ended either way). Shared by Module and the execution contexts (compiler/contexts.py)."""
    err, graph = None, None
    mode = getattr(cp.cuda.runtime, "streamCaptureModeRelaxed", None)  # coop grid queries stay legal
    with st:
        st.begin_capture() if mode is None else st.begin_capture(mode)
        try:
            execute()
        except Exception as e:  # the capture is ended below either way
            err = e
        try:
            graph = st.end_capture()
        except Exception as e:
            err = err or e
    if err is not None or graph is None:
        return None, f"CUDA graph capture failed, running eagerly: {type(err).__name__}: {err}"
    try:
        graph.upload(st)  # instantiate the device-side work now, not at the first replay
    except Exception:
        pass  # upload is an optimisation (older cupy/driver): launch uploads on first use
    st.synchronize()
    return graph, None


def _dev_dtype(name: str):
    """The cupy dtype a tensor of dtype `name` has on the device (raw bits for ml_dtypes types)."""
    return np.dtype(_RAW[name]) if name in _RAW else _np_dtype(name)


class Module(api.Module):
    """A compiled model loaded on the current CUDA device (the interface: nnc.api.Module)."""

    backend = "cuda"
    runtime_sizes: dict = {}  # plan.json "runtime_sizes" of a range build (set by __init__)

    def __init__(self, out_dir, verify_weights: bool = True, cuda_graph: bool = True):
        self.dir = Path(out_dir)
        self.plan, weights_path, cubins = plan_files(self.dir)  # before the GPU: checks files only
        p = self.plan
        raw = np.fromfile(weights_path, dtype=np.uint8)
        if raw.size != p.get("weights_bytes", raw.size):
            raise NncError(f"{self.dir}/weights.bin has {raw.size} bytes, plan.json expects {p['weights_bytes']}")
        if verify_weights and p.get("weights_sha256"):
            check_bytes(memoryview(raw), p["weights_sha256"], weights_path, "weights_sha256")  # no copy
        for path, sha, _ in cubins:  # nnc.integrity: what is loaded is what was compiled
            if sha is not None:
                check_file(path, sha, "cubins[].sha256")
        self._cp = cupy = require_gpu()
        self.weights = cupy.asarray(raw) if raw.size else cupy.zeros(1, cupy.uint8)
        self.arena = cupy.empty(max(int(p["memory"]["arena_bytes"]), 1), cupy.uint8)
        # input-independent values (codegen/init_phase.py): computed once below, never reused by activations
        self.persistent = cupy.empty(max(int(p["memory"].get("persistent_bytes", 0)), 1), cupy.uint8)
        self.funcs = self._load_cubins(cubins, [k["name"] for k in p["kernels"]])
        self.buffers = {b["id"]: b for b in p["buffers"]}
        self._extent = {}
        self._launches = []
        self._init_launches = []  # the load-time init phase, run once (_run_init)
        self._tensor_maps = tma.TensorMapCache()  # TMA kernels' CUtensorMaps, by (spec, address)
        optin = {}
        # shared memory a block gets without opting in: the plan's Target (older plans: 48 KB)
        tgt = p.get("target")
        smem_default = tgt.get("smem_per_block") if isinstance(tgt, dict) else None
        if isinstance(smem_default, bool) or not isinstance(smem_default, int) or smem_default <= 0:
            smem_default = 48 * 1024
        # a range build (plan.json "runtime_sizes", codegen/runtime_sizes.py): each run launch's grid and
        # size arguments as trees, evaluated per distinct shape (_range_launches); _launches: at max
        self.runtime_sizes = dict(p.get("runtime_sizes") or {})
        self._launch_exprs = []
        for init, l in [(True, l) for l in p.get("init_launches", [])] + [(False, l) for l in p["launches"]]:
            if not init:
                self._launch_exprs.append((l.get("grid_expr"), [a.get("expr") for a in l["args"]]))
            args = []
            for a in l["args"]:
                if "buf" in a:
                    b = self.buffers[a["buf"]]
                    args.append(("buf", b["region"], b["index"], b["offset"]))
                elif tma.is_tmap(a.get("type")):  # encoded per address in _execute (codegen/tma.py)
                    args.append(("tmap", tma.spec_of(a["value"]), tma.spec_key(a["value"]), 0))
                else:
                    t = SCALAR_NP[a["type"]]
                    args.append(("val", t(a["value"]), 0, 0))
            f = self.funcs.get(l["kernel"]) if l["kind"] == "kernel" else None
            if f is not None and l["smem"] > max(smem_default, optin.get(l["kernel"], 0)):
                f.max_dynamic_shared_size_bytes = l["smem"]  # opt in (the largest launch of this kernel wins)
                optin[l["kernel"]] = l["smem"]
            kind, grid = l["kind"], tuple(l["grid"])
            if f is not None and l["kernel"].startswith("nnc_coop_"):
                # grid-wide barriers inside: a cooperative launch, at most the co-resident blocks
                kind, grid = "coop", _coop_grid(f, grid, l["block"], l["smem"])
            (self._init_launches if init else self._launches).append(
                (kind, f, grid, tuple(l["block"]), l["smem"], args, l.get("nbytes", 0), l.get("output_index", -1)))
        # readbacks: D2H copies of an int64 extent into pinned host memory, read after the run's end
        self._readback_outputs = sorted({o for k, *_, o in self._launches if k == "readback"})
        self._extent_mem = cupy.cuda.alloc_pinned_memory(8 * (len(p["outputs"]) + 1))
        self._extent_host = np.frombuffer(self._extent_mem, np.int64, len(p["outputs"]) + 1)
        self.init_runs = 0  # how often the init phase ran: once, here
        self._run_init()
        self.graph = None           # the captured cupy.cuda.graph.Graph, replayed by run()
        self.graph_fallback = None  # why runs are eager (a sentence), None when the graph is used
        if not isinstance(cuda_graph, bool):
            raise NncError(f"cuda_graph must be True or False, not {cuda_graph!r}")
        self._dd = self._data_dependent_readbacks()  # {run launch index: symbol it binds}
        if self.runtime_sizes:  # one graph per distinct shape, captured at its first run (_run_range)
            self._init_range(cuda_graph and not self._dd)
        elif cuda_graph and not self._dd:
            self._capture()
        else:
            self.graph_fallback = "cuda_graph=False"
        if self._dd:
            self.graph_fallback = (DATA_DEPENDENT_WHY if cuda_graph else "cuda_graph=False")

    def _data_dependent_readbacks(self) -> dict:
        """{index of a run readback: the symbol it binds}: a bare symbol of the read-back buffer's
        sym_shape that no input binds (a NonZero count sized downstream: codegen/data_dependent.py)."""
        out = {}
        for j, l in enumerate(self.plan["launches"]):
            if l["kind"] != "readback":
                continue
            bufs = [a["buf"] for a in l["args"] if "buf" in a]
            if len(bufs) != 2 or bufs[1] not in self.buffers:
                raise NncError(f"{self.dir}/plan.json: launches[{j}]: a readback takes a count and a buffer")
            syms = [d["sym"] for d in self.buffers[bufs[1]].get("sym_shape") or ()
                    if isinstance(d, dict) and "sym" in d and d["sym"] not in self.runtime_sizes]
            if len(syms) > 1:
                raise NncError(f"{self.dir}/plan.json: launches[{j}]: a readback binds one symbol, not {syms}")
            if syms:
                out[j] = syms[0]
        return out

    def _run_data_dependent(self, inputs, sel, out, poison, st) -> dict:
        """An eager run that stops at each data-dependent read-back: synchronize, bind its symbol to
        the count, and size the launches after it with it (grids and size arguments per run)."""
        from .codegen.runtime_sizes import runtime_shape
        where = f"{self.dir}/plan.json"
        env = dict(self.bind_shapes(inputs)) if self.runtime_sizes else {}
        ins = self._feed((inputs,), {})
        outs = [self._out_array(t, out, poison, st) for t in self.plan["outputs"]]
        if poison:
            self.arena.fill(0xFF)
        maxes = {b["id"]: b for b in self.plan["buffers"]}
        seg = []
        for j, (l, exprs) in enumerate(zip(self._launches, self._launch_exprs)):
            seg.append(_sized_launch(l, exprs, env, where))
            sym = self._dd.get(j)
            if sym is None:
                continue
            self._execute(ins, outs, st, seg)
            seg = []
            st.synchronize()
            n = int(self._extent_host[l[7]])  # l[7]: the read-back slot of this launch
            b = maxes[self.plan["launches"][j]["args"][1]["buf"]]
            bound = int(np.prod(b["shape"])) // max(1, int(np.prod([d for d in b.get("sym_shape") or ()
                                                                    if isinstance(d, int)], dtype=np.int64)))
            if not 0 <= n <= bound:
                raise NncError(f"{where}: launches[{j}]: read back {sym} = {n}, outside 0..{bound}")
            env[sym] = n
        if seg:
            self._execute(ins, outs, st, seg)
        self._read_extents(st)
        res = {}
        for i, (t, o) in enumerate(zip(self.plan["outputs"], outs)):
            if t.get("sym_shape"):  # this run's shape: the contiguous prefix of the max-size array
                shape = tuple(runtime_shape(t, env, where))
                res[t["name"]] = o.reshape(-1)[: int(np.prod(shape, dtype=np.int64))].reshape(shape)
            else:
                res[t["name"]] = self._true_shape(i, t, o)
        return {n: res[n] for n in sel}

    # ------------------------------------------------------------ a range build (runtime sizes)
    GRAPH_CACHE = 8  # CUDA graphs kept per module, one per distinct input shape (least recently used out)

    def _init_range(self, cuda_graph: bool) -> None:
        from .profiles import profiles_from_plan, signature_from_plan
        cp = self._cp
        self._sig = signature_from_plan(self.plan["inputs"])
        self.profiles = profiles_from_plan(self.plan, str(self.dir / "plan.json"))
        self._range_graphs = cuda_graph
        self._shape_cache: dict = {}  # (symbol values) -> (launches, graph or None)
        self._in_bufs = [cp.empty(t.get("max_shape", t["shape"]), _dev_dtype(t["dtype"])) for t in self.plan["inputs"]]
        self._out_bufs = [cp.empty(t.get("max_shape", t["shape"]), _dev_dtype(t["dtype"])) for t in self.plan["outputs"]]
        self._eager_bufs = (self._in_bufs, self._out_bufs)
        self._capture_stream = cp.cuda.Stream(non_blocking=True)
        self._out_index = {t["name"]: i for i, t in enumerate(self.plan["outputs"])}
        self.graph_fallback = None if cuda_graph else "cuda_graph=False"

    def _range_launches(self, env: dict) -> list:
        """The run launches with this run's grids and size arguments (codegen/runtime_sizes.py)."""
        where = f"{self.dir}/plan.json"
        return [_sized_launch(l, exprs, env, where) for l, exprs in zip(self._launches, self._launch_exprs)]

    def bind_shapes(self, inputs) -> dict:
        """{symbol: value} of a run of a range build, after profiles.check_run (rank, static dims,
        shared symbols, the profile's range: an InputError naming the input otherwise)."""
        from .codegen.runtime_sizes import bind
        from .profiles import _shape_of, check_run
        try:  # shapes seen before were checked then: the host cost of a repeated shape stays small
            key = tuple((k, tuple(v.shape)) for k, v in inputs.items())
        except (AttributeError, TypeError):
            key = None
        bound = getattr(self, "_bound", None)
        if bound is None:
            bound = self._bound = {}
        env = bound.get(key) if key is not None else None
        if env is None:
            check_run(inputs, self._sig, self.profiles)
            env = bind(self.plan["inputs"], {k: _shape_of(v) for k, v in inputs.items()})
            if key is not None and len(bound) < 256:
                bound[key] = env
        return env

    def _shape_entry(self, env: dict):
        key = tuple(sorted(env.items()))
        entry = self._shape_cache.pop(key, None)
        if entry is None:
            launches = self._range_launches(env)
            graph = None
            if self._range_graphs:
                st = self._capture_stream
                graph, why = capture_graph(self._cp, st, lambda: self._execute(
                    self._in_bufs, self._out_bufs, st, launches, capture=True))
                if graph is None:
                    self.graph_fallback = why
            from .codegen.runtime_sizes import runtime_shape
            where = f"{self.dir}/plan.json"
            shapes = [tuple(runtime_shape(t, env, where)) for t in self.plan["outputs"]]
            entry = (launches, graph, shapes)
            while len(self._shape_cache) >= self.GRAPH_CACHE:
                self._shape_cache.pop(next(iter(self._shape_cache)))
        self._shape_cache[key] = entry  # most recently used last
        return entry

    def _run_range(self, inputs, sel, output, out, poison, st) -> dict:
        """A run of a range build: inputs into the prefixes of the owned max-size buffers, this
        shape's graph (captured at its first run) or its launches, outputs cut to this run's shape."""
        cp = self._cp
        rt = cp.cuda.runtime
        if not isinstance(inputs, dict):
            raise InputError(f"run(inputs): expected a dict {{input name: array}}, given {type(inputs).__name__}")
        env = self.bind_shapes(inputs)
        arrays = self._feed((inputs,), {}, upload=False)
        launches, graph, shapes = self._shape_entry(env)
        for arr, buf in zip(arrays, self._in_bufs):
            if not arr.size:
                continue
            if isinstance(arr, np.ndarray):
                src = np.ascontiguousarray(arr)
                rt.memcpyAsync(buf.data.ptr, src.ctypes.data, src.nbytes, 1, st.ptr)
            else:
                src = arr if arr.flags.c_contiguous else cp.ascontiguousarray(arr)
                rt.memcpyAsync(buf.data.ptr, src.data.ptr, src.nbytes, 3, st.ptr)
        if poison:
            self.arena.fill(0xFF)
            for b in self._out_bufs:
                if b.nbytes:
                    rt.memsetAsync(b.data.ptr, 0xFF, b.nbytes, st.ptr)
        if graph is not None:
            graph.launch(st)
        else:
            self._execute(self._in_bufs, self._out_bufs, st, launches)
        index = self._out_index
        res = {}
        for n in sel:  # this run's output: the contiguous prefix of the max-size buffer
            i = index[n]
            buf, shape = self._out_bufs[i], shapes[i]
            if output == "numpy":
                a = np.empty(shape, buf.dtype)
                if a.nbytes:
                    rt.memcpyAsync(a.ctypes.data, buf.data.ptr, a.nbytes, 2, st.ptr)
                res[n] = a
            else:
                o = (out or {}).get(n)
                if o is None:
                    o = cp.empty(shape, buf.dtype)
                elif tuple(o.shape) != shape or o.dtype != buf.dtype or not o.flags.c_contiguous:
                    raise InputError(f"out[{n!r}]: expected contiguous {self.plan['outputs'][i]['dtype']}{list(shape)}")
                if o.nbytes:
                    rt.memcpyAsync(o.data.ptr, buf.data.ptr, o.nbytes, 3, st.ptr)
                res[n] = o
        if output == "numpy":
            st.synchronize()
        return res

    @property
    def uses_cuda_graph(self) -> bool:
        """True when run() replays the captured CUDA graph (False: eager launches; a range build:
        one graph per distinct shape, unless a capture failed)."""
        if getattr(self, "runtime_sizes", None):
            return self._range_graphs and self.graph_fallback is None
        return self.graph is not None

    def _capture(self):
        """Captures every run launch, bound to buffers this module owns, into one CUDA graph (on a
        private stream: the legacy default stream cannot capture). On any capture error the module
        stays eager and graph_fallback names the error."""
        cp = self._cp
        if not self._launches:
            self.graph_fallback = "the plan has no launches"
            return
        self._in_bufs = [cp.empty(t["shape"], _dev_dtype(t["dtype"])) for t in self.plan["inputs"]]
        self._out_bufs = [cp.empty(t.get("max_shape", t["shape"]), _dev_dtype(t["dtype"])) for t in self.plan["outputs"]]
        st = cp.cuda.Stream(non_blocking=True)
        graph, self.graph_fallback = capture_graph(
            cp, st, lambda: self._execute(self._in_bufs, self._out_bufs, st, capture=True))
        if graph is None:
            self._in_bufs = self._out_bufs = None
            return
        self._capture_stream = st
        self.graph = graph

    def _run_init(self):
        """The init phase: the launches that compute input-independent values (ConstantOfShape-made
        weights, say) into the persistent region, once at load, before any run."""
        st = self._cp.cuda.get_current_stream()
        if self._init_launches:
            with st:
                self._execute([], [], st, self._init_launches)
            st.synchronize()
        self.init_runs += 1

    def _load_cubins(self, cubins, kernel_names) -> dict:
        """Each cubin (its sha256 checked already) loaded; kernel name -> function."""
        owner = {}
        self.modules = []
        for path, _, kernels in cubins:
            mod = self._cp.RawModule(path=str(path))
            self.modules.append(mod)
            for k in kernels:
                owner.setdefault(k, mod)
        missing = [k for k in kernel_names if k not in owner]
        if missing:
            raise NncError(f"{self.dir}/plan.json: no cubin lists kernel(s) {missing[:5]}")
        return {k: owner[k].get_function(k) for k in kernel_names}

    def __repr__(self):
        ins = ", ".join(f"{t['name']}: {t['dtype']}{t['shape']}" for t in self.plan["inputs"])
        outs = ", ".join(f"{t['name']}: {t['dtype']}{t['shape']}" for t in self.plan["outputs"])
        return f"<nnc.Module {self.dir} ({ins}) -> ({outs}), {len(self.funcs)} kernels>"

    # ------------------------------------------------------------ inputs
    def _to_device(self, name: str, spec: dict, x):
        a = self._cp.ascontiguousarray(self._cp.asarray(self._input_array(name, spec, x)))
        # the kernels load inputs with 16-byte vectors: a view that starts off a 16-byte boundary
        # (a slice of a larger array) is copied into a fresh (256-byte aligned) allocation
        return a.copy() if a.data.ptr % 16 else a

    def _input_array(self, name: str, spec: dict, x):
        """x (numpy, cupy, torch, DLPack, ...) checked against the input's dtype and shape: a numpy
        or cupy array of the device dtype (raw bits for ml_dtypes types), not yet contiguous."""
        cp = self._cp
        want = spec["dtype"]
        if type(x).__module__.startswith("torch"):
            import torch
            tmap = {torch.bfloat16: "bfloat16"}
            for tn, nn in (("float8_e4m3fn", "float8_e4m3fn"), ("float8_e4m3fnuz", "float8_e4m3fnuz"),
                           ("float8_e5m2", "float8_e5m2"), ("float8_e5m2fnuz", "float8_e5m2fnuz"),
                           ("float8_e8m0fnu", "float8_e8m0fnu")):
                if hasattr(torch, tn):
                    tmap[getattr(torch, tn)] = nn
            given = tmap.get(x.dtype)
            if given:
                x = x.view(torch.int16 if given == "bfloat16" else torch.uint8)
            x = cp.from_dlpack(x.detach().contiguous()) if x.is_cuda else np.asarray(x.detach().contiguous().cpu())
            if given:
                x = x.view(_RAW[given])
        else:
            given = None
        if isinstance(x, cp.ndarray):
            arr = x
        elif hasattr(x, "__cuda_array_interface__"):
            arr = cp.asarray(x)
        elif hasattr(x, "__dlpack__") and not isinstance(x, np.ndarray):
            try:
                arr = cp.from_dlpack(x)
            except Exception:
                arr = np.asarray(x)
        else:
            arr = np.asarray(x)
        gname = given or str(arr.dtype)
        if gname in _RAW and not given:  # ml_dtypes numpy array: its raw bytes
            arr = arr.view(_RAW[gname])
        if want in _RAW and not given and isinstance(arr, cp.ndarray) and arr.dtype == _RAW[want]:
            gname = want  # raw device bits (what run() returns as cupy) of a bf16 / narrow tensor
        if gname != want:
            raise InputError(f"input {name!r}: expected dtype {want}, given {gname}")
        if "sym_shape" not in spec and list(arr.shape) != list(spec["shape"]):  # a range build: bind_shapes checked
            raise InputError(f"input {name!r}: expected shape {list(spec['shape'])}, given {list(arr.shape)}")
        return arr

    def _feed(self, args, kwargs, upload: bool = True):
        if len(args) == 1 and isinstance(args[0], dict) and not kwargs:
            feed = dict(args[0])
        else:
            if len(args) > len(self.input_names):
                raise InputError(f"the model takes {len(self.input_names)} inputs {self.input_names}, given {len(args)}")
            feed = dict(zip(self.input_names, args))
            feed.update(kwargs)
        missing = [n for n in self.input_names if n not in feed]
        extra = [n for n in feed if n not in self.input_names]
        if missing or extra:
            raise InputError(f"inputs: expected {self.input_names}; missing {missing}, unknown {extra}")
        conv = self._to_device if upload else self._input_array
        return [conv(t["name"], t, feed[t["name"]]) for t in self.plan["inputs"]]

    # ------------------------------------------------------------ running (__call__: nnc.api.Module)
    def run(self, inputs: dict, outputs=None, *, output: str = "cupy", stream=None, out: Optional[dict] = None,
            poison: bool = False) -> dict:
        """inputs: {name: array}. outputs: the output names to return (default all; the kernels
        compute every output either way, only these are returned and copied to the host).
        stream: a cupy Stream, an int cudaStream_t or None (current). out: optional preallocated
        cupy output arrays by name. poison: fill the arena and fresh outputs with 0xFF bytes first
        (testing). Returns {name: array} (cupy, or numpy); the arrays are the caller's (with a
        CUDA graph, copies of the module's output buffers, which the next run overwrites)."""
        cp = self._cp
        if output not in ("cupy", "numpy"):
            raise NncError(f"output must be 'cupy' or 'numpy', not {output!r}")
        sel = self._selected(outputs)
        if stream is None:
            st = cp.cuda.get_current_stream()
        elif isinstance(stream, int):
            st = cp.cuda.ExternalStream(stream)
        else:
            st = stream
        with st:
            if getattr(self, "_dd", None):
                result = self._run_data_dependent(inputs, sel, out, poison, st)
            elif getattr(self, "runtime_sizes", None):
                result = self._run_range(inputs, sel, output, out, poison, st)
            elif self.graph is not None:
                result = self._run_graph(self._feed((inputs,), {}, upload=False), sel, output, out, poison, st)
            else:
                result = self._run_eager(self._feed((inputs,), {}), sel, out, poison, st)
        if output == "numpy":
            conv = {}
            specs = {t["name"]: t for t in self.plan["outputs"]}
            for t in (specs[n] for n in sel):  # the order asked for
                a = result[t["name"]]
                if not isinstance(a, np.ndarray):
                    a = cp.asnumpy(a, stream=st)
                    st.synchronize()
                conv[t["name"]] = a.view(_np_dtype(t["dtype"])) if t["dtype"] in _RAW else a
            return conv
        return result

    def _out_array(self, t: dict, out: Optional[dict], poison: bool, st):
        """The caller's out[name] (checked), else a fresh array (0xFF bytes when poisoning)."""
        cp = self._cp
        shape = t.get("max_shape", t["shape"])
        o = (out or {}).get(t["name"])
        if o is None:
            o = cp.empty(shape, _dev_dtype(t["dtype"]))
            if poison and o.nbytes:
                cp.cuda.runtime.memsetAsync(o.data.ptr, 0xFF, o.nbytes, st.ptr)
        elif list(o.shape) != list(shape) or o.dtype != _dev_dtype(t["dtype"]) or not o.flags.c_contiguous:
            raise InputError(f"out[{t['name']!r}]: expected contiguous {t['dtype']}{shape}")
        elif o.data.ptr % 16:  # the kernels store with 16-byte vectors
            raise InputError(f"out[{t['name']!r}]: the array must start on a 16-byte boundary "
                             f"(it starts at {o.data.ptr:#x}; a fresh cupy allocation does)")
        return o

    def _true_shape(self, i: int, t: dict, o):
        """o, cut to the extent the run read back for a data-dependent output (else o)."""
        if not t.get("shape_known_after_run"):
            return o
        n = int(self._extent.get(i, 0))
        shape = list(t["max_shape"])
        shape[t["dynamic_axis"]] = n
        return o.reshape(-1)[: int(np.prod(shape))].reshape(shape)

    def _read_extents(self, st):
        """After a run with readbacks: one synchronize, then the extents the run copied to pinned memory."""
        self._extent = {}
        if self._readback_outputs:
            st.synchronize()
            self._extent = {i: int(self._extent_host[i]) for i in self._readback_outputs}

    def _run_eager(self, ins, sel, out, poison, st) -> dict:
        outs = [self._out_array(t, out, poison, st) for t in self.plan["outputs"]]
        if poison:
            self.arena.fill(0xFF)
        self._execute(ins, outs, st)
        self._read_extents(st)
        res = {t["name"]: self._true_shape(i, t, o) for i, (t, o) in enumerate(zip(self.plan["outputs"], outs))}
        return {n: res[n] for n in sel}

    def _run_graph(self, arrays, sel, output, out, poison, st) -> dict:
        """Inputs copied into the owned buffers (device-to-device, or host-to-device from numpy),
        the graph replayed, the selected outputs copied out of the owned buffers."""
        cp = self._cp
        rt = cp.cuda.runtime
        for arr, buf in zip(arrays, self._in_bufs):
            if not buf.nbytes:
                continue
            if isinstance(arr, np.ndarray):
                src = np.ascontiguousarray(arr)  # pageable: the call returns once src is staged
                rt.memcpyAsync(buf.data.ptr, src.ctypes.data, buf.nbytes, 1, st.ptr)  # H2D
            else:
                src = arr if arr.flags.c_contiguous else cp.ascontiguousarray(arr)
                rt.memcpyAsync(buf.data.ptr, src.data.ptr, buf.nbytes, 3, st.ptr)  # D2D
        if poison:
            self.arena.fill(0xFF)
            for b in self._out_bufs:
                if b.nbytes:
                    rt.memsetAsync(b.data.ptr, 0xFF, b.nbytes, st.ptr)
        self.graph.launch(st)
        self._read_extents(st)
        index = {t["name"]: i for i, t in enumerate(self.plan["outputs"])}
        res = {}
        for n in sel:
            i = index[n]
            t, buf = self.plan["outputs"][i], self._out_bufs[i]
            if output == "numpy":  # straight from the owned buffer to the host
                view = self._true_shape(i, t, buf)
                a = np.empty(view.shape, view.dtype)
                if a.nbytes:
                    rt.memcpyAsync(a.ctypes.data, view.data.ptr, a.nbytes, 2, st.ptr)  # D2H
                res[n] = a
                continue
            o = self._out_array(t, out, False, st)
            if o.nbytes:
                rt.memcpyAsync(o.data.ptr, buf.data.ptr, o.nbytes, 3, st.ptr)
            res[n] = self._true_shape(i, t, o)
        if output == "numpy":
            st.synchronize()
        return res

    def context(self, slots: int = 2):
        """A new execution context (nnc.api.Module.context; a nnc.contexts.CudaContext): its own arena, streams, I/O buffers
        and CUDA graph; `slots` pipelined request buffers for run_async (see CudaContext)."""
        from .contexts import CudaContext
        if getattr(self, "runtime_sizes", None) or getattr(self, "_dd", None):
            raise NncError(f"{self.dir}: execution contexts of a range-profile build (runtime sizes) or of "
                           f"data-dependent sizes (a NonZero count sized downstream) are not supported yet; "
                           f"use the module's run()")
        return CudaContext(self, slots=slots)

    # ------------------------------------------------------------ raw runs (nnc bench, nnc inspect)
    def io_buffers(self) -> tuple[list, list]:
        """(inputs, outputs): the device arrays launch() runs on, in plan order: with a graph the
        owned buffers it was captured with, else arrays allocated once for eager runs. Write the
        inputs, launch(), read the outputs (a data-dependent output at its maximum shape)."""
        if self.graph is not None:
            return self._in_bufs, self._out_bufs
        if getattr(self, "_eager_bufs", None) is None:
            cp = self._cp
            self._eager_bufs = ([cp.empty(t["shape"], _dev_dtype(t["dtype"])) for t in self.plan["inputs"]],
                                [cp.empty(t.get("max_shape", t["shape"]), _dev_dtype(t["dtype"]))
                                 for t in self.plan["outputs"]])
        return self._eager_bufs

    def launch(self, stream) -> None:
        """Queues one run over io_buffers() on stream: the graph replay, or every launch eagerly.
        No copies and no synchronize (so extents of data-dependent outputs are not read)."""
        if getattr(self, "_dd", None):
            raise NncError(f"{self.dir}: launches sized by a NonZero count read back mid-run cannot be queued "
                           f"without the host; use run()")
        if self.graph is not None:
            self.graph.launch(stream)
        else:
            ins, outs = self.io_buffers()
            with stream:
                self._execute(ins, outs, stream)

    def time_launches(self, feed: Optional[dict] = None, reps: int = 20, repeats: int = 5) -> list:
        """Device milliseconds of each launch of plan.json "launches" (None for a readback, a host
        copy of 8 bytes). The inputs (feed, else left as they are) go into io_buffers() and one
        whole run fills the arena with real values; then each launch alone is captured `reps`
        times into a CUDA graph (no host launch cost inside the timing; eager when the capture
        refuses) and replayed between two CUDA events, after one untimed replay: the median over
        `repeats`, divided by reps. In-place kernels rerun on their own results: the times are
        right, the arena's values are not kept."""
        cp = self._cp
        ins, outs = self.io_buffers()
        st = cp.cuda.Stream(non_blocking=True)
        for t, buf in zip(self.plan["inputs"], ins):
            if feed is not None and t["name"] in feed and buf.nbytes:
                buf.set(np.ascontiguousarray(feed[t["name"]]).view(buf.dtype), stream=st)
        self.launch(st)
        st.synchronize()
        t0, t1 = cp.cuda.Event(), cp.cuda.Event()
        times = []
        for launch in self._launches:
            if launch[0] == "readback":
                times.append(None)
                continue
            graph = None
            with st:
                try:
                    st.begin_capture()
                    try:
                        self._execute(ins, outs, st, [launch] * reps, capture=True)
                    finally:
                        graph = st.end_capture()
                except Exception:
                    graph = None  # eager below: the host's launch cost is then inside the time

                def once():
                    graph.launch(st) if graph is not None else self._execute(ins, outs, st, [launch] * reps)
                once()
                ts = []
                for _ in range(repeats):
                    t0.record(st)
                    once()
                    t1.record(st)
                    t1.synchronize()
                    ts.append(cp.cuda.get_elapsed_time(t0, t1) / reps)
            times.append(float(np.median(ts)))
        return times

    def _execute(self, ins, outs, st, launches=None, capture: bool = False, arena=None, extent_host=None):
        """Queues the launches on st (the current stream). A readback copies its extent into
        pinned host memory without waiting: _read_extents synchronizes once at the end (and a
        stream being captured may not synchronize at all). arena / extent_host: an execution
        context's own (None: the module's)."""
        cp = self._cp
        arena = self.arena if arena is None else arena
        extent_host = self._extent_host if extent_host is None else extent_host
        wptr, aptr, pptr = self.weights.data.ptr, arena.data.ptr, self.persistent.data.ptr
        iptr = [a.data.ptr for a in ins]
        optr = [a.data.ptr for a in outs]

        def ptr(region, index, off):
            if region == "input":
                return iptr[index] + off
            if region == "output":
                return optr[index] + off
            if region == "weights":
                return wptr + off
            if region == "persistent":
                return pptr + off
            return aptr + off

        for kind, f, grid, block, smem, args, nbytes, oidx in (self._launches if launches is None else launches):
            vals = [np.uint64(ptr(r, i, o)) if k == "buf" else r for k, r, i, o in args]
            if kind == "kernel" and any(a[0] == "tmap" for a in args):
                vals = tma.launch_values(args, vals, self._tensor_maps, int)
            if kind == "kernel":
                f(grid, block, tuple(vals), shared_mem=smem)
            elif kind == "coop":  # RawModule.get_function gives a RawKernel: launch its Function
                getattr(f, "kernel", f)(grid, block, tuple(vals), shared_mem=smem, enable_cooperative_groups=True)
            elif kind == "memcpy":
                if nbytes:
                    cp.cuda.runtime.memcpyAsync(int(vals[0]), int(vals[1]), nbytes, 3, st.ptr)
            else:  # readback: the extent of a data-dependent output, into its pinned slot
                cp.cuda.runtime.memcpyAsync(extent_host.ctypes.data + 8 * oidx, int(vals[0]), 8, 2, st.ptr)


def plan_files(out_dir) -> tuple[dict, Path, list]:
    """plan.json of an output directory, the weights file and the cubins it names, each a plain
    regular file inside the directory (nnc/outdir.py: plan.json is as untrusted as a model).
    cubins: [(path, recorded sha256 or None, [kernel names])]."""
    from .outdir import member
    from .plan_file import read_plan
    d = Path(out_dir)
    plan = read_plan(d)
    return plan, member(d, plan.get("weights_file", "weights.bin"), "weights_file"), _cubin_files(d, plan)


def _cubin_files(d: Path, plan: dict) -> list:
    """plan.json's "cubins" (one per compile unit); an older plan's single "cubin_file" holds
    every kernel and records no hash."""
    from .outdir import member
    if "cubins" not in plan:
        names = [k.get("name") for k in plan.get("kernels", []) if isinstance(k, dict)]
        return [(member(d, plan.get("cubin_file", "model.cubin"), "cubin_file"), None, names)]
    entries = plan["cubins"]
    if not isinstance(entries, list):
        raise NncError(f"{d}/plan.json: \"cubins\" must be a list")
    out = []
    for i, e in enumerate(entries):
        if not (isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("kernels"), list)
                and all(isinstance(k, str) for k in e["kernels"])):
            raise NncError(f"{d}/plan.json: cubins[{i}] must be {{\"file\", \"sha256\", \"kernels\": [names]}}")
        out.append((member(d, e.get("file"), f"cubins[{i}].file"), e["sha256"], list(e["kernels"])))
    return out


def _coop_grid(f, grid, block, smem) -> tuple:
    """A cooperative kernel's grid (such kernels loop over their work: any grid size is correct)
    clamped to the blocks that can be co-resident on the current device."""
    import cupy
    from cupy_backends.cuda.api import driver
    per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(getattr(f, "kernel", f).ptr, int(block[0] * block[1] * block[2]), int(smem))
    rt = cupy.cuda.runtime
    sms = rt.deviceGetAttribute(rt.cudaDevAttrMultiProcessorCount, cupy.cuda.Device().id)
    return (max(1, min(int(grid[0]), int(per_sm) * int(sms))),) + tuple(grid[1:])


def load(out_dir, cuda_graph: bool = True) -> Module:
    """Loads a compiled model directory onto the current CUDA device (cuda_graph: replay the run
    as one captured CUDA graph; False: eager launches)."""
    return Module(out_dir, cuda_graph=cuda_graph)


def _sized_launch(launch: tuple, exprs: tuple, env: dict, where: str) -> tuple:
    """One launch with this run's grid and size arguments: `exprs` = (grid expressions or None, one
    expression or None per argument), evaluated over the bound symbols `env` (codegen/runtime_sizes.py).
    A grid keeps >= 1 block (a data-dependent count may be 0)."""
    from .codegen.runtime_sizes import expr_eval
    kind, f, grid, block, smem, args, nbytes, oidx = launch
    gx, ax = exprs
    if gx is not None:
        grid = tuple(max(1, expr_eval(g, env, where)) for g in gx)
    if any(e is not None for e in ax):
        args = [("val", type(a[1])(expr_eval(e, env, where)), 0, 0) if e is not None else a for a, e in zip(args, ax)]
    return (kind, f, grid, block, smem, args, nbytes, oidx)
