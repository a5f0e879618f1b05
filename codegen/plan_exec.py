"""The CPU plan executor: the reference backend run inside the planned memory.

It executes a compiled plan (plan.json + ir/final.nnir + weights.bin) with numpy and no GPU. Every
byte lives where the plan put it: one byte array per region (the arena, the persistent region of
the init phase, weights.bin, one per input and one per output), and every value is read and
written as a numpy view at its buffer's (region, offset) in plan.json. So a wrong plan (two live
tensors sharing bytes, a wrong view offset, a scratch temp over a live tensor, a missing copy)
gives wrong answers here, on any CPU machine, as it would on the GPU.

What runs, from plan.json "steps" (codegen/steps.py: one per top-level op or fused group):
- A step whose launches include a kernel (or a readback) computes: the op's reference semantics
  (ir/interp.py's call_ref and the op registry; a `fused` op runs its body) read the operands from
  their buffers' bytes; then the step's temporaries are poisoned (0xFF), so a temp placed over a
  tensor that outlives the step corrupts it; then the results are written into the bytes of the
  result buffers the step's launches name. A result the launches do not name is not written: a view made
  without a kernel (ctx.alias) must already hold the right bytes through its offset.
- A step of memcpy launches only copies those bytes; a step with no launch (a reshape view, a
  result written in place by its producers) does nothing. Launches outside every step (the copies
  of `return`) are memcpys and copy bytes.
- A fused group that also put constant-only parts of its body into the init phase computes whole
  where its kernels run every time; those init launches are subsumed by its reference semantics.
- Data-dependent extents (NonZero, Compress, Unique, NonMaxSuppression): a dynamic result is
  written compact at the start of its max-size buffer (the layout the CUDA runtime reads back) and
  its true shape is remembered per root buffer; memcpys carry it to the outputs.

Weights: weights.bin holds weights pre-transformed into kernel layouts (a conv's filter for its
kernel, a packed GEMM operand), which are not the IR value's layout. A const operand is therefore
read from weights.bin only when the step names its untransformed buffer and some launch reads that
buffer (so the bytes are there, at the plan's offset); otherwise its value comes from the final
IR's weights, as the plain interpreter reads it. Activations always come from the regions. With the
same reference semantics on the same bytes, results equal the plain interpreter's exactly.

A step is atomic here: its operands are read before, and its results written after, all of its
launches. An ordering fault between the launches of one step (a temp over an operand that a later
launch of the same step still reads) is for the per-launch liveness of codegen/memory.py and its
overlap checker; this executor catches whatever crosses steps, which is what the placement shares.

The arena is poisoned before every run, the output regions too; the init phase runs once, at load.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from ..ir.errors import InputError, NncError
from ..ir.registry import MAX_ELEMENTS
from ..ir.types import dtype as to_dtype

POISON = 0xFF
REGIONS = ("arena", "persistent", "weights", "input", "output")


class PlanExecError(NncError):
    """plan.json cannot be executed as written (malformed, or out of its regions' bounds)."""


def _require_steps(plan: dict, where) -> None:
    if not isinstance(plan.get("steps"), list):
        raise PlanExecError(f"{where}: has no \"steps\" (written by an older nnc or without code generation): "
                            "compile with code generation to run the reference backend in the arena, or run "
                            "the plain interpreter (--no-arena)")


class _Buf:
    __slots__ = ("id", "name", "dtype", "np", "shape", "numel", "nbytes", "region", "index", "offset",
                 "root", "dynamic", "touched", "sym_shape", "max_numel", "max_shape")

    def __init__(self, d: dict, where: str):
        try:
            self.id, self.name = int(d["id"]), str(d["name"])
            self.dtype = to_dtype(d["dtype"])
            self.shape = tuple(int(x) for x in d["shape"])
            self.nbytes, self.region = int(d["nbytes"]), str(d["region"])
            self.index, self.offset = int(d["index"]), int(d["offset"])
            self.root = self.id if d.get("alias_of") is None else int(d["alias_of"])
            self.dynamic = bool(d.get("dynamic", False))
            self.sym_shape = d.get("sym_shape")  # a range build's (codegen/runtime_sizes.py): shape is at max
        except (KeyError, TypeError, ValueError) as e:
            raise PlanExecError(f"{where}: malformed buffer entry ({type(e).__name__}: {e})") from None
        self.np = self.dtype.np
        self.numel = self.max_numel = math.prod(self.shape)
        self.max_shape = self.shape
        if self.numel > MAX_ELEMENTS:
            raise PlanExecError(f"{where}: shape {list(self.shape)} has more elements than nnc accepts")
        if self.region not in REGIONS:
            raise PlanExecError(f"{where}: unknown region {self.region!r}")
        if min(self.shape, default=0) < 0 or self.nbytes != self.numel * self.np.itemsize or self.offset < 0:
            raise PlanExecError(f"{where}: shape {list(self.shape)}, nbytes {self.nbytes}, offset {self.offset} "
                                f"do not fit {self.dtype}")
        self.touched = False


class _Action:
    """One thing the executor does, in launch order: compute a step, or copy bytes."""
    __slots__ = ("kind", "step", "names", "dst", "src", "nbytes")

    def __init__(self, kind, step=None, names=frozenset(), dst=None, src=None, nbytes=0):
        self.kind, self.step, self.names, self.dst, self.src, self.nbytes = kind, step, names, dst, src, nbytes


class PlanExecutor:
    """Runs a plan on the CPU in its own regions. `plan`: the plan.json dict; `module`: the final
    IR it was lowered from; `weights`: the bytes of weights.bin. The init phase runs here."""

    def __init__(self, plan: dict, module, weights: bytes, where: str = "plan.json"):
        from ..ir.interp import Interpreter
        self.where = where
        self.plan = plan
        self.module = module
        self.func = module.main
        self._interp = Interpreter(module)  # for region ops (fused bodies): RefCtx.run_region
        _require_steps(plan, where)
        raw = plan.get("buffers")
        if not isinstance(raw, list):
            raise PlanExecError(f"{where}: \"buffers\" must be a list")
        self.bufs = [_Buf(d, f"{where}: buffers[{i}]") if isinstance(d, dict) else None for i, d in enumerate(raw)]
        for i, b in enumerate(self.bufs):
            if b is None or b.id != i or not 0 <= b.root < len(self.bufs):
                raise PlanExecError(f"{where}: buffers[{i}] must be an object with id {i} and a valid alias_of")
        self.launches = self._launch_list("launches")
        self.init_launches = self._launch_list("init_launches")
        for seq in (self.init_launches, self.launches):
            for l in seq:
                for a in l["bufs"]:
                    self.bufs[a].touched = self.bufs[self.bufs[a].root].touched = True
        for b in self.bufs:  # a view of a touched root is placed too
            b.touched = b.touched or self.bufs[b.root].touched
        self._regions = self._make_regions(weights)
        self.steps = [self._step(i, s) for i, s in enumerate(plan["steps"])]
        self.init_program = self._program(self.init_launches, "init")
        self.run_program = self._program(self.launches, "run")
        self._extent: dict[int, tuple] = {}  # root buffer id -> true shape of a dynamic value
        self._env: dict = {}  # this run's runtime size symbols (_bind_sizes, _bind_dynamic)
        self._regions["arena"].fill(POISON)
        self._execute(self.init_program)  # once, at load (codegen/init_phase.py)

    # ------------------------------------------------------------ construction

    @classmethod
    def from_dir(cls, out_dir, plan: Optional[dict] = None, module=None) -> "PlanExecutor":
        """A compiled output directory: plan.json, ir/final.* and weights.bin, each checked against
        the sha256 plan.json records (compiler/integrity.py). plan / module: plan.json and
        ir/final.nnir already read and checked by the caller (nnc.api.ReferenceModule)."""
        from ..cli import load_ir
        from ..integrity import check_bytes, check_ir
        from ..outdir import member
        from ..plan_file import check_against_ir, read_plan
        d = Path(out_dir)
        if plan is None or module is None:
            plan = read_plan(d)
            check_ir(d, plan)
            module = load_ir(d / "ir" / "final.nnir")
        check_against_ir(plan, module.main, d)
        _require_steps(plan, d / "plan.json")  # before weights.bin, which --no-codegen does not write
        wpath = member(d, plan.get("weights_file", "weights.bin"), "weights_file")
        data = wpath.read_bytes()
        if plan.get("weights_sha256"):
            check_bytes(data, plan["weights_sha256"], wpath, "weights_sha256")
        return cls(plan, module, data, where=str(d / "plan.json"))

    @classmethod
    def from_plan(cls, plan, module) -> "PlanExecutor":
        """An in-memory Plan (codegen/lower.py) of `module`, as plan.json would hold it (no CUDA
        compile needed: tests and tools)."""
        import json
        from .emit import _json_default, plan_to_json, weights_blob
        blob = weights_blob(plan)
        opts = plan.options
        arch = opts.arch  # Plan.options is a LowerOptions (codegen/options.py)
        pj = plan_to_json(plan, arch=str(arch), precision="", tf32=False, passes=(),
                          weights_sha="", source_sha="", backend="")
        pj = json.loads(json.dumps(pj, default=_json_default))
        return cls(pj, module, blob, where="<plan>")

    def fork(self) -> "PlanExecutor":
        """An executor for one execution context (nnc.api.ReferenceContext): the parsed plan, the
        weights and the persistent region the init phase filled are shared (runs only read them);
        the arena, the input and output regions and the run's extents are its own, so forks run
        concurrently from different threads without touching each other's bytes."""
        import copy
        f = copy.copy(self)
        f._regions = {k: (r if k in ("weights", "persistent") else np.full(r.size, POISON, np.uint8))
                      for k, r in self._regions.items()}
        f._extent = dict(self._extent)
        f._env = dict(self._env)
        return f

    def _launch_list(self, key: str) -> list:
        seq = self.plan.get(key, [])
        if not isinstance(seq, list):
            raise PlanExecError(f"{self.where}: {key!r} must be a list")
        out = []
        for t, l in enumerate(seq):
            where = f"{self.where}: {key}[{t}]"
            if not isinstance(l, dict) or l.get("kind") not in ("kernel", "memcpy", "readback") \
                    or not isinstance(l.get("args"), list):
                raise PlanExecError(f"{where}: expected a kernel, memcpy or readback launch with args")
            bufs = []
            for a in l["args"]:
                if isinstance(a, dict) and "buf" in a:
                    bufs.append(self._buf_index(a["buf"], where))
            n = l.get("nbytes", 0)
            if l["kind"] == "memcpy" and (len(bufs) != 2 or not isinstance(n, int) or n < 0):
                raise PlanExecError(f"{where}: a memcpy takes a destination, a source and nbytes >= 0")
            out.append({"kind": l["kind"], "bufs": bufs, "nbytes": n if isinstance(n, int) else 0})
        return out

    def _buf_index(self, x, where) -> int:
        if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < len(self.bufs):
            raise PlanExecError(f"{where}: buffer id {x!r} is not in plan.json's buffers")
        return x

    def _make_regions(self, weights: bytes) -> dict:
        """One byte array per region. The arena and the persistent region get the bytes their
        placed buffers reach (within the sizes plan.json declares, and never more than the sum of
        those buffers' aligned sizes, which any placement fits in): a tampered size or offset is an
        error naming the buffer, not a giant allocation."""
        mem = self.plan.get("memory") or {}
        declared = {"arena": mem.get("arena_bytes", 0), "persistent": self.plan.get("persistent_bytes", 0)}
        for k, v in declared.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise PlanExecError(f"{self.where}: the {k} size {v!r} must be an int >= 0")
        reach, bound = dict.fromkeys(declared, 0), dict.fromkeys(declared, 0)
        for b in self.bufs:
            if b.touched and b.region in declared:
                if b.offset + b.nbytes > declared[b.region]:
                    raise PlanExecError(f"{self.where}: buffer {b.id} (%{b.name}) [{b.offset}, {b.offset + b.nbytes}) "
                                        f"lies outside region {b.region} of {declared[b.region]} bytes")
                reach[b.region] = max(reach[b.region], b.offset + b.nbytes)
                if b.root == b.id:
                    bound[b.region] += -(-max(b.nbytes, 1) // 256) * 256
        for k in declared:
            if reach[k] > bound[k]:
                raise PlanExecError(f"{self.where}: the {k} buffers reach byte {reach[k]}, past the {bound[k]} "
                                    f"bytes of all of them side by side")
        regions = {k: np.full(reach[k], POISON, np.uint8) for k in declared}
        regions["weights"] = np.frombuffer(weights, np.uint8)  # read-only: nothing writes a weight
        for kind in ("input", "output"):
            for i, e in enumerate(self.plan[kind + "s"]):
                b = self.bufs[self._buf_index(e.get("buffer"), f"{self.where}: {kind}s[{i}]")]
                regions[(kind, i)] = np.full(b.nbytes, POISON, np.uint8)
        for b in self.bufs:  # placed buffers must lie inside their region
            if not b.touched:
                continue
            key = (b.region, b.index) if b.region in ("input", "output") else b.region
            r = regions.get(key)
            if r is None or b.offset + b.nbytes > r.size:
                raise PlanExecError(f"{self.where}: buffer {b.id} (%{b.name}) [{b.offset}, {b.offset + b.nbytes}) "
                                    f"lies outside region {b.region}"
                                    f"{'' if r is None else f' of {r.size} bytes'}")
        return regions

    def _step(self, i: int, s) -> dict:
        where = f"{self.where}: steps[{i}]"
        ops = self.func.ops
        try:
            op = ops[s["op"]] if isinstance(s["op"], int) and 0 <= s["op"] < len(ops) else None
            operands, results, temps = list(s["operands"]), list(s["results"]), list(s["temps"])
            run = tuple(int(x) for x in s["launches"])
            init = tuple(int(x) for x in s["init_launches"])
        except (KeyError, TypeError, ValueError):
            raise PlanExecError(f"{where}: expected op, operands, results, temps, launches, init_launches") from None
        if op is None or op.name == "const":
            raise PlanExecError(f"{where}: op {s.get('op')!r} is not an op of ir/final.nnir's main function")
        if len(operands) != len(op.operands) or len(results) != len(op.results):
            raise PlanExecError(f"{where}: {op.name} has {len(op.operands)} operands and {len(op.results)} "
                                f"results, the step lists {len(operands)} and {len(results)}")
        for (a, b), seq in ((run, self.launches), (init, self.init_launches)):
            if len((a, b)) != 2 or not 0 <= a <= b <= len(seq):
                raise PlanExecError(f"{where}: launch range {[a, b]} outside 0..{len(seq)}")
        return {"index": i, "op": op, "init": bool(s.get("init", False)), "run": run, "init_range": init,
                "operands": [None if x is None else self._buf_index(x, where) for x in operands],
                "results": [self._buf_index(x, where) for x in results],
                "temps": [self._buf_index(x, where) for x in temps]}

    def _program(self, seq: list, phase: str) -> list:
        """The actions of one launch sequence ("init" or "run"), in order."""
        owner: list = [None] * len(seq)
        for st in self.steps:
            a, b = st["init_range"] if phase == "init" else st["run"]
            for t in range(a, b):
                if owner[t] is not None:
                    raise PlanExecError(f"{self.where}: {phase} launch {t} belongs to steps "
                                        f"{owner[t]['index']} and {st['index']}")
                owner[t] = st
        acts, t = [], 0
        while t < len(seq):
            st = owner[t]
            if st is None:
                l = seq[t]
                if l["kind"] != "memcpy":
                    raise PlanExecError(f"{self.where}: {phase} launch {t} ({l['kind']}) belongs to no step")
                acts.append(_Action("memcpy", dst=l["bufs"][0], src=l["bufs"][1], nbytes=l["nbytes"]))
                t += 1
                continue
            a, b = st["init_range"] if phase == "init" else st["run"]
            where = self._compute_phase(st)
            if where == phase:
                names = {x for l in seq[a:b] for x in l["bufs"]}
                other = st["run"] if phase == "init" else st["init_range"]
                other_seq = self.launches if phase == "init" else self.init_launches
                names |= {x for l in other_seq[other[0]:other[1]] for x in l["bufs"]}
                acts.append(_Action("step", step=st, names=frozenset(names)))
            elif where is None:  # copies only: the bytes the plan moves
                acts.extend(_Action("memcpy", dst=l["bufs"][0], src=l["bufs"][1], nbytes=l["nbytes"])
                            for l in seq[a:b])
            t = b  # else subsumed: the step computes in the other phase
        return acts

    def _compute_phase(self, st) -> Optional[str]:
        """Where a step runs its reference semantics: "run" if any of its every-run launches is a
        kernel or readback, else "init" if any of its init launches is, else None (copies only)."""
        for phase, (a, b), seq in (("run", st["run"], self.launches), ("init", st["init_range"], self.init_launches)):
            if any(l["kind"] != "memcpy" for l in seq[a:b]):
                return phase
        return None

    # ------------------------------------------------------------ bytes

    def _bytes(self, b: _Buf) -> np.ndarray:
        key = (b.region, b.index) if b.region in ("input", "output") else b.region
        return self._regions[key][b.offset:b.offset + b.nbytes]

    def _array(self, b: _Buf, shape) -> np.ndarray:
        """A read-only view of buffer b's bytes with `shape` (a dynamic buffer: its true extent)."""
        if not b.touched:  # no launch reads or writes it: nothing the GPU would find there
            a = np.full(b.nbytes, POISON, np.uint8)
        else:
            a = self._bytes(b)
        ext = self._extent.get(b.root) if b.dynamic else None
        n = math.prod(ext) if ext is not None else b.numel
        shape = ext if ext is not None else shape
        if math.prod(shape) != n:
            raise PlanExecError(f"{self.where}: buffer {b.id} (%{b.name}) holds {n} elements, "
                                f"the IR value has shape {list(shape)}")
        v = a[:n * b.np.itemsize].view(b.np).reshape(shape)
        v.flags.writeable = False  # a reference function never writes its operands
        return v

    def _write(self, b: _Buf, x: np.ndarray, what: str) -> None:
        if x.dtype != b.np:
            raise PlanExecError(f"{self.where}: {what}: a {x.dtype} result for {b.dtype} buffer {b.id} (%{b.name})")
        if b.dynamic:
            if x.size > b.max_numel:
                raise PlanExecError(f"{self.where}: {what}: {x.size} elements exceed buffer {b.id}'s {b.numel}")
            self._extent[b.root] = tuple(x.shape)
            self._bind_dynamic(b, tuple(x.shape), what)
        elif x.size != b.numel:
            raise PlanExecError(f"{self.where}: {what}: {x.size} elements for buffer {b.id} (%{b.name}) "
                                f"of {b.numel}")
        if b.region == "weights":
            raise PlanExecError(f"{self.where}: {what}: writes into weights.bin (buffer {b.id}, %{b.name})")
        if x.size:
            np.copyto(self._bytes(b)[:x.nbytes].view(b.np), x.reshape(-1))  # overlap-safe copy

    # ------------------------------------------------------------ running

    def _execute(self, program: list) -> None:
        for act in program:
            if act.kind == "memcpy":
                self._memcpy(act)
            else:
                self._compute(act)

    def _memcpy(self, act: _Action) -> None:
        dst, src = self.bufs[act.dst], self.bufs[act.src]
        n = act.nbytes
        if n > dst.nbytes or n > src.nbytes:
            raise PlanExecError(f"{self.where}: memcpy of {n} bytes from buffer {src.id} ({src.nbytes} bytes) "
                                f"into buffer {dst.id} ({dst.nbytes} bytes)")
        if dst.region == "weights":
            raise PlanExecError(f"{self.where}: memcpy into weights.bin (buffer {dst.id}, %{dst.name})")
        if n:
            np.copyto(self._bytes(dst)[:n], self._bytes(src)[:n])
        if src.root in self._extent:
            self._extent[dst.root] = self._extent[src.root]

    def _operand(self, st, i: int, v):
        if v is None:
            return None
        bid = st["operands"][i]
        p = v.producer
        if p is not None and p.name == "const":
            b = None if bid is None else self.bufs[bid]
            if b is None or not b.touched or b.region != "weights":  # transformed, or read at compile time
                from ..ir.builder import const_value
                return np.asarray(const_value(v, self.module.weights))
            if b.dtype != v.type.dtype:
                raise PlanExecError(f"{self.where}: buffer {b.id} of %{v.name} is {b.dtype}, the IR says {v.type}")
            return self._array(b, tuple(int(d) for d in v.type.shape))
        if bid is None:
            raise PlanExecError(f"{self.where}: steps[{st['index']}] ({st['op'].name}): operand {i} (%{v.name}) "
                                "has no buffer")
        b = self.bufs[bid]
        if b.dtype != v.type.dtype:
            raise PlanExecError(f"{self.where}: buffer {b.id} of %{v.name} is {b.dtype}, the IR says {v.type}")
        t = v.type.shape
        shape = tuple(int(d) for d in t) if t is not None and all(isinstance(d, int) for d in t) else b.shape
        if b.sym_shape is not None and t is not None:  # a range build: this run's shape
            shape = b.shape
        return self._array(b, shape)

    def _compute(self, act: _Action) -> None:
        from ..ir import registry
        from ..ir.interp import RefCtx, call_ref
        st = act.step
        op = st["op"]
        vals = [self._operand(st, i, v) for i, v in enumerate(op.operands)]
        types = [r.type for r in op.results]
        ctx = RefCtx(self._interp, {}, op, types)
        try:
            outs = call_ref(registry.get(op.name), op.attrs, vals, types, ctx)
        except NncError as e:
            raise NncError(f"{op.loc}: {e}") from e.__cause__
        outs = [x if x.flags.owndata else np.array(x) for x in outs]  # not views of the regions
        # scratch: whatever the kernels leave in a temp is garbage to every tensor live with it.
        # Poisoned after the operands were read and before the results are written, because inside
        # a step of several launches a temp may legally reuse the bytes of an operand that died at
        # an earlier launch of the step, or of a result written by a later one
        for tid in st["temps"]:
            t = self.bufs[tid]
            if t.touched:
                self._bytes(t).fill(POISON)
        for k, (r, bid, x) in enumerate(zip(op.results, st["results"], outs)):
            b = self.bufs[bid]
            # a root is written when a launch names it or a view of it; a view when named itself, or
            # when a launch of this step names its root (a fused body's last op lowered as a view of
            # a body temp the step's kernel wrote); else one made without a kernel must already hold
            # the bytes, through its offset
            if (bid in act.names) or (b.root == bid and any(self.bufs[n].root == bid for n in act.names)) \
                    or (b.root != bid and b.root in act.names):
                self._write(b, np.asarray(x), f"steps[{st['index']}] ({op.name}) result {k} (%{r.name})")

    def _bind_sizes(self, feed: dict) -> None:
        """Runtime sizes (codegen/runtime_sizes.py): binds a range build's symbols from the feed's
        shapes (checked against the profile by the caller: compiler/profiles.check_run) and gives
        every buffer with a sym_shape this run's shape (the contiguous prefix of its max-size
        bytes). A data-dependent symbol (NonZero's count: codegen/data_dependent.py) is bound later,
        when the dynamic buffer that carries it is written (_bind_dynamic); until then the buffers
        over it keep their max shape."""
        if not any(b.sym_shape is not None for b in self.bufs):
            return
        from .runtime_sizes import bind
        self._env = bind(self.plan["inputs"], {k: np.shape(v) for k, v in feed.items()}) \
            if self.plan.get("runtime_sizes") else {}
        for b in self.bufs:
            if b.sym_shape is not None:
                b.shape, b.numel = b.max_shape, b.max_numel
        self._apply_sizes()

    def _apply_sizes(self) -> None:
        from .runtime_sizes import expr_eval, tree_symbols
        for b in self.bufs:
            if b.sym_shape is not None and tree_symbols(b.sym_shape) <= self._env.keys():
                b.shape = tuple(expr_eval(d, self._env, self.where) for d in b.sym_shape)
                b.numel = math.prod(b.shape)
                if b.numel > b.max_numel:
                    raise InputError(f"buffer %{b.name}: shape {list(b.shape)} exceeds the build's max "
                                     f"({b.max_numel} elements): the inputs are outside the profile")

    def _bind_dynamic(self, b: _Buf, shape: tuple, what: str) -> None:
        """A dynamic buffer written with its true `shape`: each bare symbol of its sym_shape not yet
        bound takes that dim (the read-back of a data-dependent count), and the buffers over it get
        their exact shapes; a symbol already bound must agree."""
        if b.sym_shape is None:
            return
        if len(b.sym_shape) != len(shape):
            raise PlanExecError(f"{self.where}: {what}: rank {len(shape)} for buffer {b.id} (%{b.name}) of "
                                f"rank {len(b.sym_shape)}")
        new = False
        for d, got in zip(b.sym_shape, shape):
            if isinstance(d, dict) and "sym" in d:
                name = d["sym"]
                if name not in self._env:
                    self._env[name], new = int(got), True
                elif self._env[name] != int(got):
                    raise PlanExecError(f"{self.where}: {what}: dim {got} of buffer {b.id} (%{b.name}), but "
                                        f"{name} = {self._env[name]}")
        if new:
            self._apply_sizes()

    def run(self, feed: dict) -> dict[str, np.ndarray]:
        """Runs the plan once on `feed` ({input name: array}); returns {output name: array} (copies)."""
        ins = self.plan["inputs"]
        names = [e["name"] for e in ins]
        for e in ins:
            if e["name"] not in feed:
                raise InputError(f"missing input {e['name']!r} ({e['dtype']}{list(e['shape'])})")
        extra = set(feed) - set(names)
        if extra:
            raise InputError(f"unknown inputs {sorted(extra)}; the model takes {names}")
        self._regions["arena"].fill(POISON)
        self._bind_sizes(feed)
        for i, e in enumerate(ins):
            b = self.bufs[e["buffer"]]
            x = np.asarray(feed[e["name"]])
            if x.dtype != b.np or tuple(x.shape) != b.shape:
                raise InputError(f"input {e['name']!r}: expected {b.dtype.np_name}{list(b.shape)}, "
                                 f"given {x.dtype}{list(x.shape)}")
            self._regions[("input", i)].view(b.np)[:x.size] = x.reshape(-1)
        for i in range(len(self.plan["outputs"])):
            self._regions[("output", i)].fill(POISON)
        run_extent = dict(self._extent)  # extents of init values stay; a run's own start afresh
        try:
            self._execute(self.run_program)
            out = {}
            for e in self.plan["outputs"]:
                b = self.bufs[e["buffer"]]
                if e.get("shape_known_after_run") and b.root not in self._extent:
                    raise PlanExecError(f"{self.where}: output {e['name']!r}: no step gave its extent")
                out[e["name"]] = np.array(self._array(b, b.shape))
            return out
        finally:
            self._extent = run_extent
