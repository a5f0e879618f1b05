"""Layer wavefront: stacked unidirectional `recurrence`s -> one `recurrence_stack` (issue 8).

Rewrites each maximal chain of L >= 2 `recurrence` ops (time-fusion's output, ir/ops/recurrence.py)

    %y0 = recurrence(%G0, %R0, [%rbh0]) {y_layout = "sbdh" | "bsdh" | ""}
    %x2 = Reshape(%y0, [S*B, H])   %g2 = Gemm(%x2, %Wcat1, [%bcat1])   %G1 = Reshape(%g2, [d0, d1, gates*H])
    %y1 = recurrence(%G1, %R1, [%rbh1]) ...

into `recurrence_stack(%G0, R [L,GH,H], W [L-1,GH,H], Bias [L-1,GH], [rbh [L,H]])`
(ir/ops/recurrence_stack.py): the last layer's Y, and the layers' Y_h / Y_c where any is read. Layer
l+1's projection becomes part of its step, so a kernel can run the layers as a wavefront (layer l at
step t, layer l+1 at step t-1: S + L - 1 serial steps instead of L*S). Whether the stack runs as that
wavefront or hoisted (per layer: recurrence, projection GEMM, recurrence, as before) is the lowering's
choice (codegen/kernels/recurrence.py, variant recurrence.stack, a measured space point).

What must hold for a link (layer l -> l+1), else the chain ends there:
- both are unidirectional (direction "forward", or both "reverse"), of one kind, one hidden size,
  one `layout`, equal cells (cell_of of their bodies), both with or both without rbh; neither has
  peepholes, initial states or sequence_lens (operands 3..6 absent);
- R (and rbh) are constants; the Gemm is plain (alpha = beta = 1, no transposes) with a constant
  weight [H, gates*H] and a constant bias [gates*H] (or none);
- layer l's Y is read only by the Reshape to [S*B, H], that only by the Gemm, whose result only by
  the Reshape to layer l+1's G, read only by layer l+1 (none of them a graph result), and the row
  order agrees: Y in (t, b) order (y_layout "sbdh", or "" with layout 0) feeds a G that layer l+1
  reads as [S, B, ...], Y in (b, t) order (y_layout "bsdh", or "" with layout 1) one it reads as
  [B, S, ...]; the same S and B;
- layer 0's G0 and layer l+1's G have one dtype (the storage dtype);
- no op before the last layer reads an earlier layer's Y_h / Y_c (the stack replaces the last layer).
Requires: time-fusion has run (its constants are folded). Leaves everything else alone; sweeps the
glue it replaces (dce).
"""
from __future__ import annotations

import numpy as np

from nnc.ir import registry
from nnc.ir.builder import Builder, const_value
from nnc.ir.errors import NncError
from nnc.ir.graph import Module, NameGen, Value, users, value_names
from nnc.ir.ops.recurrence import cell_of, g_batch_major
from nnc.ir.ops.rnn import _KIND

STACKABLE = ("forward", "reverse")


def _only_use(v, uses, results):
    us = uses.get(id(v), [])
    if len(us) != 1 or any(r is v for r in results):
        return None
    return us[0]


def _rows_batch_major(rec) -> bool:
    """Whether rec's Y holds its rows in (b, t) order (else (t, b); D = 1)."""
    a = rec.attrs
    return a.y_layout == "bsdh" or (a.y_layout == "" and a.layout == 1)


def _plain(rec, w) -> bool:
    a = rec.attrs
    ops = list(rec.operands) + [None] * (7 - len(rec.operands))
    if a.direction not in STACKABLE or any(o is not None for o in ops[3:7]):
        return False
    if const_value(ops[1], w) is None or (ops[2] is not None and const_value(ops[2], w) is None):
        return False
    if a.body_backward is not None:
        return False
    try:
        cell_of(a.kind, a.body)
    except NncError:
        return False
    return True


class _Stacker:
    def __init__(self, module: Module):
        self.m = module
        self.f = module.main
        self.w = module.weights
        self.uses = users(self.f)
        self.names = NameGen(value_names(module))

    def link(self, lo, hi_candidates):
        """(reshape_in, gemm, reshape_out, next recurrence) when lo's Y feeds a stackable layer."""
        res, uses = self.f.results, self.uses
        a = lo.attrs
        y = lo.results[0]
        r1 = _only_use(y, uses, res)
        if r1 is None or r1.name != "Reshape" or r1.operands[0] is not y:
            return None
        S_B_H = r1.results[0].type.shape
        ys = y.type.shape
        if S_B_H is None or len(S_B_H) != 2 or not all(isinstance(d, int) for d in ys):
            return None
        H = int(a.hidden_size)
        GH = _KIND[a.kind][0] * H
        gs = lo.operands[0].type.shape
        S, B = (gs[1], gs[0]) if g_batch_major(a) else (gs[0], gs[1])
        if tuple(S_B_H) != (S * B, H):
            return None
        gemm = _only_use(r1.results[0], uses, res)
        if gemm is None or gemm.name != "Gemm" or gemm.operands[0] is not r1.results[0]:
            return None
        ga = gemm.attrs
        if ga.transA or ga.transB or ga.alpha != 1.0 or ga.beta != 1.0:
            return None
        wv = const_value(gemm.operands[1], self.w)
        bv = const_value(gemm.operands[2], self.w) if len(gemm.operands) > 2 and gemm.operands[2] is not None else None
        if wv is None or wv.shape != (H, GH) or (len(gemm.operands) > 2 and gemm.operands[2] is not None
                                                 and (bv is None or bv.size != GH)):
            return None
        r2 = _only_use(gemm.results[0], uses, res)
        if r2 is None or r2.name != "Reshape" or r2.operands[0] is not gemm.results[0]:
            return None
        hi = _only_use(r2.results[0], uses, res)
        if hi is None or id(hi) not in hi_candidates or hi.operands[0] is not r2.results[0]:
            return None
        b = hi.attrs
        if (b.kind, b.direction, int(b.hidden_size), b.layout) != (a.kind, a.direction, H, a.layout):
            return None
        if (len(hi.operands) > 2 and hi.operands[2] is not None) != (len(lo.operands) > 2 and lo.operands[2] is not None):
            return None
        if cell_of(a.kind, a.body) != cell_of(b.kind, b.body):
            return None
        hs = hi.operands[0].type.shape
        bm = g_batch_major(b)
        if tuple(hs) != ((B, S, GH) if bm else (S, B, GH)) or bm != _rows_batch_major(lo):
            return None
        if hi.operands[0].type.dtype != lo.operands[0].type.dtype:
            return None
        return r1, gemm, r2, hi

    def run(self) -> bool:
        plain = {id(op) for op in self.f.ops if op.name == "recurrence" and _plain(op, self.w)}
        if not plain:
            return False
        nxt, has_prev = {}, set()
        for op in self.f.ops:
            if id(op) in plain:
                got = self.link(op, plain)
                if got is not None:
                    nxt[id(op)] = got
                    has_prev.add(id(got[3]))
        chains = []
        for op in self.f.ops:
            if id(op) in nxt and id(op) not in has_prev:
                chain, links, cur = [op], [], op
                while id(cur) in nxt:
                    links.append(nxt[id(cur)])
                    cur = links[-1][3]
                    chain.append(cur)
                chains.append((chain, links))
        if not chains:
            return False
        done = False
        for chain, links in chains:
            done |= self.stack(chain, links)
        if not done:
            return False
        from nnc.passes import dce
        dce.run(self.m)
        return True

    def stack(self, chain, links) -> bool:
        """Replaces the chain by one recurrence_stack where the last layer was; False (nothing
        changed) when an op before the last layer reads an earlier layer's state."""
        w = self.w
        first, last = chain[0], chain[-1]
        pos = {id(op): i for i, op in enumerate(self.f.ops)}
        for r in chain[:-1]:
            if any(pos[id(u)] < pos[id(last)] for s in r.results[1:] for u in self.uses.get(id(s), [])):
                return False
        a0 = first.attrs
        L = len(chain)
        H = int(a0.hidden_size)
        dt = first.operands[0].type.dtype
        GH = _KIND[a0.kind][0] * H
        stem = last.results[0].name
        b = Builder(self.f, w, self.names)
        n0 = len(self.f.ops)
        R = np.concatenate([const_value(r.operands[1], w) for r in chain], axis=0).astype(dt.np)
        Wst = np.stack([const_value(g.operands[1], w).T for _, g, _, _ in links]).astype(dt.np)  # [L-1, GH, H]
        Bst = np.stack([const_value(g.operands[2], w).reshape(GH) if len(g.operands) > 2 and g.operands[2] is not None
                        else np.zeros(GH) for _, g, _, _ in links]).astype(dt.np)
        ops = [first.operands[0], b.constant(R, stem + ".stack_r"), b.constant(Wst, stem + ".stack_w"),
               b.constant(Bst, stem + ".stack_b")]
        if len(first.operands) > 2 and first.operands[2] is not None:
            rbh = np.concatenate([const_value(r.operands[2], w) for r in chain], axis=0).astype(dt.np)
            ops.append(b.constant(rbh, stem + ".stack_rbh"))
        K = max(len(r.results) - 1 for r in chain)
        attrs = {"body": a0.body, "kind": a0.kind, "hidden_size": H, "layers": L, "direction": a0.direction,
                 "layout": int(a0.layout), "y_layout": last.attrs.y_layout, "g_layout": a0.g_layout}
        new = b.create("recurrence_stack", ops, attrs, num_results=1 + K * L, loc=last.loc)
        st = new[0].producer
        results = [last.results[0]]
        for k in range(1, K + 1):
            for r in chain:
                if k < len(r.results):
                    results.append(r.results[k])
                else:  # a state this layer's op did not return: computed, unread
                    results.append(Value(self.names(f"{r.results[0].name}.state{k}"), new[len(results)].type))
        for i, (old, fresh) in enumerate(zip(results, new)):
            if old.type != fresh.type:
                raise NncError(f"{last.loc}: layer-wavefront: result {i} would change type {old.type} -> {fresh.type}")
            old.producer = st
        st.results = results
        moved = self.f.ops[n0:]
        del self.f.ops[n0:]
        gone = {id(op) for op in chain} | {id(x) for lk in links for x in lk[:3]}
        out = []
        for op in self.f.ops:  # the stack takes the last layer's place: every state reader follows it
            if op is last:
                out.extend(moved)
            if id(op) not in gone:
                out.append(op)
        self.f.ops = out
        self.uses = users(self.f)
        return True


def run(module: Module) -> bool:
    registry.get("recurrence_stack")  # the op families are loaded
    return _Stacker(module).run()
