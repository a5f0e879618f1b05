"""The sandbox render of one (candidate, params) for the tuner (codegen/tuning.py): the Lowerer's
state is snapshotted, the variant renders, what it emitted (renamed kernels, launches, the root
buffers they touch, where the op's results live) is captured and the state rolled back.

A root buffer's bytes: the constant itself where it has one (weights, pre-transformed), else
random data (operands: the same for every candidate of a problem) or poison (results). An
integer operand that is not a constant makes the capture untimable (random indices could go
out of range), as do readbacks and cooperative launches.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..ir.errors import NncError
from . import tma
from .dtypes import SCALAR_NP
from .plan import Kernel, Scalar
from .variants import Candidate, _params_key


@dataclass
class RootSpec:
    """A device allocation a capture's launches touch: a root Buffer. data: its constant (weights,
    pre-transformed: the array, in the buffer's dtype); None: random data (`shared` ones, the
    operands, are the same for every candidate of the problem) or poison (results)."""
    id: int
    np_name: str
    nbytes: int
    data: Optional[np.ndarray]
    shared: bool  # existed before the render (an operand): same bytes for every candidate
    result: bool  # holds one of the op's results (poisoned before a run)


@dataclass
class Capture:
    """One (candidate, params) rendered in a sandbox. launches: (kind, kernel name, grid, block,
    smem, args, nbytes), args ("buf", root id, byte offset) | ("val", numpy scalar) | ("tmap",
    tma.TensorMapSpec, key: a tensor map of the pointer arg spec.arg, encoded by the runner); kernels:
    name -> Kernel, renamed by its code (batch_name: one name per distinct kernel in the batch); outputs per op result: (root id, byte
    offset, np name, shape). why_not: "" or why it cannot run (then it is not a candidate)."""
    variant: str
    params: dict
    candidate: Optional[Candidate] = None
    kernels: dict = field(default_factory=dict)
    launches: list = field(default_factory=list)
    roots: dict = field(default_factory=dict)
    outputs: list = field(default_factory=list)
    why_not: str = ""

    @property
    def label(self) -> str:
        return f"{self.variant} {_params_key(self.params)}"


class _Snapshot:
    """The Lowerer state a render changes, to roll it back."""

    def __init__(self, L):
        self.L = L
        self.n_buf = len(L.buffers)
        self.n_launch = len(L.launches)
        self.n_init = len(L.init_launches)
        self.n_sel = len(L.selections)
        self.dicts = {a: dict(getattr(L, a)) for a in ("values", "kernels", "_by_key", "transformed", "dynamic",
                                                         "equiv", "slot_views")}
        self.params = {n: k.params for n, k in L.kernels.items()}
        self.dynamic_flags = [b.dynamic for b in L.buffers]
        self.zero_copy_bytes = L.zero_copy_bytes

    def restore(self):
        L = self.L
        del L.buffers[self.n_buf:]
        del L.launches[self.n_launch:]
        del L.init_launches[self.n_init:]
        del L.selections[self.n_sel:]
        for a, d in self.dicts.items():
            setattr(L, a, d)
        for n, p in self.params.items():
            L.kernels[n].params = p
        for b, f in zip(L.buffers, self.dynamic_flags):
            b.dynamic = f
        L.zero_copy_bytes = self.zero_copy_bytes


def capture(problem, cand: Candidate, params: dict) -> Capture:
    """Renders (cand, params) for `problem` in a sandbox of its Lowerer and rolls the state back."""
    from .lower import LowerCtx
    L, op = problem.L, problem.op
    cap = Capture(cand.name, dict(params), cand)
    snap = _Snapshot(L)
    try:
        ctx = LowerCtx(L, op)
        ctx.problem = problem
        try:
            ret = cand.variant.render(ctx, problem, dict(params))
        except NncError as e:
            cap.why_not = f"render failed: {e}"
            return cap
        except Exception as e:  # a candidate's render bug must not stop the compile: not a candidate
            cap.why_not = f"render failed: {type(e).__name__}: {e}"
            return cap
        if ret is None and not ctx.emitted:
            cap.why_not = "render declined"
            return cap
        _describe(cap, L, op, snap)
    finally:
        snap.restore()
    return cap


def _describe(cap: Capture, L, op, snap: _Snapshot):
    launches = L.launches[snap.n_launch:]
    if not any(l.kind == "kernel" for l in launches):
        cap.why_not = "no kernel launched"
        return
    results = set()
    for r in op.results:
        b = L.values.get(id(L.canon(r)))
        if b is None:
            cap.why_not = f"result %{r.name} not defined"
            return
        root = L.buffers[b.alias_of] if b.alias_of is not None else b
        results.add(root.id)
        cap.outputs.append((root.id, b.alias_offset if b.alias_of is not None else 0, b.dtype.np_name,
                            tuple(int(d) for d in b.shape)))
    names = {}  # the render's kernel name -> its name in the tuning batch
    for l in launches:
        if l.kind == "readback":
            cap.why_not = "data-dependent output (readback)"
            return
        args = []
        for a in l.args:
            if isinstance(a, Scalar):
                if tma.is_tmap(a.type):  # a tensor map: encoded by the runner from its pointer argument
                    args.append(("tmap", tma.spec_of(a.value), tma.spec_key(a.value)))
                else:
                    args.append(("val", SCALAR_NP[a.type](a.value)))
                continue
            root = L.buffers[a.alias_of] if a.alias_of is not None else a
            if root.id not in cap.roots:
                shared = root.id < snap.n_buf
                data = None
                if root.data is not None:  # the array itself (no copy per candidate: weights are big)
                    data = np.ascontiguousarray(root.data).astype(root.dtype.np, copy=False)
                elif shared and root.id not in results and root.dtype.np.kind in "iu":  # bool is "b": random 0/1
                    cap.why_not = (f"integer operand {root.name} ({root.dtype.np_name}) is not a constant: "
                                   f"random indices could be out of range")
                    return
                cap.roots[root.id] = RootSpec(root.id, root.dtype.np_name, int(root.nbytes), data, shared,
                                              root.id in results)
            args.append(("buf", root.id, a.alias_offset if a.alias_of is not None else 0))
        kname = None
        if l.kind == "kernel":
            if l.kernel.startswith("nnc_coop_"):
                cap.why_not = "cooperative launch"
                return
            if l.kernel not in names:
                names[l.kernel] = batch_name(L.kernels[l.kernel])
            kname = names[l.kernel]
        cap.launches.append((l.kind, kname, tuple(l.grid), tuple(l.block), int(l.smem), args, int(l.nbytes)))
    for old, new in names.items():
        k = L.kernels[old]
        body = re.sub(rf"\b{re.escape(old)}\b", new, k.body)
        # no op list: the header would name the model's values, and the source (the cubin cache
        # key) must be the same wherever this kernel recurs (another problem, model or build)
        cap.kernels[new] = Kernel(new, k.template, dict(k.params), body, [])


def batch_name(k: Kernel) -> str:
    """A kernel's name in the tuning batch: its own name and a digest of its code with that name
    taken out (template, params, body). Candidates that emit the same kernel (a group's fused
    variant and its anchor's choice, the same conv in two problems) share it: compiled and loaded
    once, and found in the cubin cache by the next build."""
    text = "\n".join((k.template, json.dumps(k.params, sort_keys=True, default=str),
                      re.sub(rf"\b{re.escape(k.name)}\b", "@KERNEL@", k.body)))
    return f"{k.name}_{hashlib.sha256(text.encode()).hexdigest()[:12]}"
