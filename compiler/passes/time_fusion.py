"""Time fusion: ONNX LSTM / GRU / RNN -> one input projection over all steps + one `recurrence` op.

Rewrites each LSTM, GRU and RNN of the main function (X [S,B,I] or, layout 1, [B,S,I]) into
- the projection of every timestep and both directions at once: Gemm(Reshape(X, [S*B, I]), Wcat,
  bias) -> Reshape [S, B, D*gates*H] (layout 1: [B, S, ...]), with Wcat = [W_0^T | W_1^T]
  ([I, D*gates*H], a new constant) and the biases folded into one C operand (Wb + Rb; GRU with
  linear_before_reset = 1 keeps the hidden gate's Rb out: it multiplies the reset gate, so it
  becomes the recurrence's `rbh` operand [D, H]). The reshapes are views; the Gemm is an ordinary
  one through the GEMM variants (its bias in the epilogue). With a symbolic S or B it is
  MatMul(X, Wcat) + Add(bias) instead (fuse-epilogue puts the Add into the GEMM);
- a `recurrence` op (ir/ops/recurrence.py) whose body is the per-step gate math (activations with
  alpha/beta, clip, peepholes, input_forget, linear_before_reset) and which keeps the op's
  direction, layout and sequence_lens semantics. Y, Y_h, Y_c are the same values as before.
And folds what surrounds it:
- the view/transpose chain exporters put after Y (torch: Y [S,D,B,H] -> Transpose(0,2,1,3) ->
  Reshape [S,B,D*H], batch_first then -> Transpose(1,0,2); unidirectional: Squeeze(1)) becomes the
  recurrence's y_layout ("sbdh" or "bsdh"): the recurrence writes Y in that layout directly and
  the chain goes. Only a chain of single uses of Transposes and views (no view that splits an
  axis) up to a value holding Y as [S,B,D*H] / [B,S,D*H];
- a bidirectional layer written as two ops (a forward and a reverse op of one kind, same X, same
  attributes and sequence_lens, constant weights) whose Ys are squeezed and concatenated on the
  last axis: one bidirectional op (weights stacked) first, so one projection GEMM and one
  recurrence running both directions at once, written as that Concat (y_layout sbdh); the pair's
  Y_h/Y_c become the merged op's (a Concat of them on axis 0, torch's h_n, is the merged Y_h
  itself; read one by one, they are Slices of it);
- a batch_first input Transpose(x, [1,0,2]) before X: the projection reads x, and the
  recurrence reads G in the other row order (g_layout "bs" / "sb"); the Transpose goes when
  nothing else reads it;
- initial_h / initial_c that are zeros (a zero constant, a ConstantOfShape of 0 - what the
  batch-size Shape chains fold to -, or a Cast/Expand/view of one) are dropped (zero-initialised),
  as are all-zero constant peepholes and constant sequence_lens that cover every step;
- an embedding Gather(table, ids) (axis 0, constant 2-D table) feeding X: X.Wcat + b ==
  Gather(table.Wcat + b, ids) exactly, so the whole projection becomes one Gather of a
  precomputed [V, D*gates*H] table (computed in float64, rounded once) when that table is at most
  GATHER_TABLE_MAX_BYTES. Larger vocabularies keep Gather -> GEMM.
Trailing results nobody reads (Y_c, Y_h) are dropped, so the kernels do not write them.
Left alone (they keep the ONNX op and its own lowering): W or B not constant, activations that
are not one IR op (affine, scaledtanh), X and W of different dtypes.
Requires: a verified module, constants folded (run after fold-constants / canonicalize / simplify,
and at fp16/bf16 after the precision passes: the projection and the recurrence's storage take
the precision the LSTM had; the recurrence's state and math stay fp32). Sweeps the constants and
glue it leaves unread (dce).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from nnc.ir.builder import Builder, const_value
from nnc.ir.graph import Module, NameGen, Op, users, value_names
from nnc.ir.ops.recurrence import ACT_OPS, Cell, cell_body
from nnc.ir.ops.rnn import _KIND, _num_dirs, activation_slots
from nnc.ir.errors import NncError
from nnc.ir import registry

RNN_OPS = ("LSTM", "GRU", "RNN")
GATHER_TABLE_MAX_BYTES = 64 << 20  # the precomputed embedding x projection table, at most
_VIEWS = ("Reshape", "Squeeze", "Unsqueeze", "Flatten")
# ops whose result holds only elements of (or a cast of) their first operand: zeros stay zeros
_ZERO_THROUGH = ("Cast", "Expand", "Identity", "Slice", "Gather", "Split", "Transpose", "Tile") + _VIEWS


def _is_zero(v, weights, depth=0) -> bool:
    """v is all zeros whatever the inputs: a zero constant, a ConstantOfShape of 0 (torch's
    zeros(L*D, batch, H) from the input's Shape), or a selection/cast of one (torch slices each
    layer's state out of it), or a Concat of such."""
    if v is None or depth > 16:
        return False
    val = const_value(v, weights)
    if val is not None:
        return bool(np.isfinite(val).all()) and not np.any(val)
    p = v.producer
    if p is None:
        return False
    if p.name == "ConstantOfShape":
        return p.attrs.value is None or not np.any(p.attrs.value)
    if p.name in _ZERO_THROUGH and p.operands:
        return _is_zero(p.operands[0], weights, depth + 1)
    if p.name == "Concat":
        return all(_is_zero(x, weights, depth + 1) for x in p.operands)
    return False


def _operands8(op: Op) -> list:
    """An LSTM / GRU / RNN's operands at their ONNX positions, None where absent."""
    return list(op.operands) + [None] * (8 - len(op.operands))


def _regroup(groups, shape, size):
    """The axis groups of a view of a value whose dims hold `groups` (tuples of Y's logical axes),
    reshaped to `shape`: adjacent axes merge, unit axes come and go; None when the view would
    split an axis."""
    seq = [a for g in groups for a in g if size[a] != 1]
    out, k = [], 0
    for n in shape:
        if n == 1:
            out.append(())
            continue
        g, prod = [], 1
        while k < len(seq) and not (g and prod == n):
            a = seq[k]
            g.append(a)
            k += 1
            s = size[a]
            if not (isinstance(s, int) and isinstance(prod, int) and isinstance(n, int)):
                if len(g) == 1 and s == n:  # a symbolic extent maps only onto itself
                    prod = n
                    continue
                return None
            prod *= s
            if prod > n:
                return None
        if not g or prod != n:
            return None
        out.append(tuple(g))
    return out if k == len(seq) else None


def _y_chain(y, uses, results, S, B, nd, H, layout):
    """(chain ops, y_layout, end value) of the longest foldable glue chain after Y, or None.
    Each dim of a value in the chain holds a group of Y's logical axes S, D, B, H (in order);
    Transposes permute the groups, views regroup them (_regroup). The chain folds up to a value
    whose groups are (S)(B)(D H) or (B)(S)(D H), unit axes aside: Y written as [S,B,D*H] / [B,S,D*H]."""
    size = {"S": S, "D": nd, "B": B, "H": H}
    groups = [("S",), ("D",), ("B",), ("H",)] if layout == 0 else [("B",), ("S",), ("D",), ("H",)]
    targets = {"sbdh": ([("S",), ("B",), ("D", "H")], (S, B, nd * H)),
               "bsdh": ([("B",), ("S",), ("D", "H")], (B, S, nd * H))}

    def norm(gs):  # unit axes and the dims left empty by them do not change the bytes
        return [t for t in (tuple(a for a in g if size[a] != 1) for g in gs) if t]

    chain, v, best = [], y, None
    while True:
        us = uses.get(id(v), [])
        if any(r is v for r in results) or len(us) != 1 or len(us[0].results) != 1:
            break
        u = us[0]
        if u.operands[0] is not v or u.results[0].type.shape is None:
            break
        if u.name == "Transpose":
            perm = u.attrs.perm if u.attrs.perm is not None else tuple(reversed(range(len(groups))))
            if sorted(perm) != list(range(len(groups))):
                break
            groups = [groups[p] for p in perm]
        elif u.name in _VIEWS:
            groups = _regroup(groups, u.results[0].type.shape, size)
            if groups is None:
                break
        else:
            break
        chain.append(u)
        v = u.results[0]
        for name, (t_groups, t_shape) in targets.items():
            if v.type.shape == tuple(t_shape) and norm(groups) == norm(t_groups):
                best = (list(chain), name, v)
                break
    return best


class _Rewriter:
    def __init__(self, module: Module):
        self.m = module
        self.f = module.main
        self.names = NameGen(value_names(module))
        self.uses = users(self.f)
        self.skip: set[int] = set()  # glue ops folded into a recurrence
        self.notes: list[str] = []

    def plan(self, op: Op):
        """None (op left alone, reason in self.notes) or what the rewrite needs."""
        kind, a, w = op.name, op.attrs, self.m.weights
        ops = _operands8(op)
        X, W, R, Bv_, lens, h0, c0, P = ops
        Wv = const_value(W, w)
        Bv = None if Bv_ is None else const_value(Bv_, w)
        if Wv is None or (Bv_ is not None and Bv is None):
            self.notes.append(f"{op.loc}: {kind}: W or B is not a constant")
            return None
        if X.type.dtype != W.type.dtype or not X.type.dtype.is_float or X.type.shape is None:
            self.notes.append(f"{op.loc}: {kind}: X {X.type} and W {W.type}")
            return None
        try:
            slots = activation_slots(kind, a)
        except NncError:
            return None
        if any(k not in ACT_OPS for d in slots for k, _, _ in d):
            self.notes.append(f"{op.loc}: {kind}: activations {slots} are not all single IR ops")
            return None
        nd = _num_dirs(a)
        gates = _KIND[kind][0]
        H = int(R.type.shape[2]) if a.hidden_size is None else int(a.hidden_size)
        GH = gates * H
        lbr = kind == "GRU" and bool(a.linear_before_reset)
        S, B = (X.type.shape[0], X.type.shape[1]) if a.layout == 0 else (X.type.shape[1], X.type.shape[0])
        wcat = np.concatenate([Wv[d].astype(np.float64).T for d in range(nd)], axis=1)  # [I, D*GH]
        bcat = rbh = None
        if Bv is not None:
            bb = Bv.astype(np.float64)
            wb, rb = bb[:, :GH], bb[:, GH:].copy()
            if lbr:
                rbh = rb[:, 2 * H:].copy()
                rb[:, 2 * H:] = 0.0
            bcat = (wb + rb).reshape(-1)
            if not np.any(rbh if rbh is not None else 0.0):
                rbh = None  # a zero hidden-gate bias adds nothing
        zero = lambda v: v is not None and _is_zero(v, w)  # noqa: E731
        if zero(h0):
            h0 = None
        if zero(c0):
            c0 = None
        if zero(P):
            P = None
        lv = const_value(lens, w) if lens is not None else None
        if lv is not None and isinstance(S, int) and lv.size and int(lv.min()) >= S:
            lens = None
        clip = None if a.clip is None else float(a.clip)
        cells = [Cell(kind, tuple(slots[d]), clip, kind == "LSTM" and bool(a.input_forget), lbr,
                      rbh is not None, P is not None) for d in range(nd)]
        chain = None
        if op.results:
            chain = _y_chain(op.results[0], self.uses, self.f.results, S, B, nd, H, a.layout)
            if chain is not None:
                self.skip |= {id(u) for u in chain[0]}
        # a batch_first model's input Transpose(x, [1, 0, 2]): project x itself, G then has the
        # other row order (g_layout)
        g_bm = a.layout == 1
        xp = X.producer
        if xp is not None and xp.name == "Transpose" and tuple(xp.attrs.perm or (2, 1, 0)) == (1, 0, 2) \
                and id(xp) not in self.skip:  # (not the end of an earlier layer's folded glue)
            X, g_bm = xp.operands[0], not g_bm
        g_layout = "" if g_bm == (a.layout == 1) else ("bs" if g_bm else "sb")
        gather = None
        xp = X.producer
        if xp is not None and xp.name == "Gather" and len(X.type.shape) == 3:
            table = const_value(xp.operands[0], w)
            if table is not None and table.ndim == 2 and int(xp.attrs.axis) in (0, -2) \
                    and table.shape[0] * nd * GH * X.type.dtype.np.itemsize <= GATHER_TABLE_MAX_BYTES:
                gather = (table, xp.operands[1])
        return dict(kind=kind, a=a, X=X, g_layout=g_layout, R=R, lens=lens, h0=h0, c0=c0, P=P, nd=nd, H=H, S=S, B=B,
                    wcat=wcat, bcat=bcat, rbh=rbh, cells=cells, chain=chain, gather=gather)

    def emit(self, op: Op, p: dict, b: Builder):
        dt = p["X"].type.dtype
        loc = op.loc
        stem = op.results[0].name
        if p["gather"] is not None:
            table, ids = p["gather"]
            t = table.astype(np.float64) @ p["wcat"]
            if p["bcat"] is not None:
                t = t + p["bcat"]
            tconst = b.constant(t.astype(dt.np), stem + ".proj_table", loc)
            G = b.create("Gather", [tconst, ids], {"axis": 0}, names=[stem + ".proj"], loc=loc)[0]
        else:
            X = p["X"]
            wconst = b.constant(p["wcat"].astype(dt.np), stem + ".wcat", loc)
            bconst = None if p["bcat"] is None else b.constant(p["bcat"].astype(dt.np), stem + ".bcat", loc)
            d0, d1, inner = X.type.shape
            if all(isinstance(d, int) for d in (d0, d1, inner)):
                # static: one 2-D Gemm over [S*B, I] with the bias as its C operand, between views
                x2 = b.create("Reshape", [X, b.constant(np.array([d0 * d1, inner], np.int64))],
                              names=[stem + ".x2d"], loc=loc)[0]
                g2 = b.create("Gemm", [x2, wconst] + ([bconst] if bconst is not None else []),
                              names=[stem + ".proj2d"], loc=loc)[0]
                G = b.create("Reshape", [g2, b.constant(np.array([d0, d1, g2.type.shape[1]], np.int64))],
                             names=[stem + ".proj"], loc=loc)[0]
            else:  # symbolic S or B: MatMul broadcasting over [S, B] (+ the bias Add)
                G = b.create("MatMul", [X, wconst], names=[stem + (".proj" if bconst is None else ".xw")],
                             loc=loc)[0]
                if bconst is not None:
                    G = b.create("Add", [G, bconst], names=[stem + ".proj"], loc=loc)[0]
        rbh = None if p["rbh"] is None else b.constant(p["rbh"].astype(dt.np), stem + ".rbh", loc)
        cells = p["cells"]
        body = cell_body(cells[0], p["B"], p["H"], dt, self.names, self.m.weights)
        back = None
        if p["nd"] == 2 and cells[1] != cells[0]:
            back = cell_body(cells[1], p["B"], p["H"], dt, self.names, self.m.weights)
        chain = p["chain"]
        attrs = {"body": body, "kind": p["kind"], "direction": p["a"].direction, "hidden_size": p["H"],
                 "layout": int(p["a"].layout), "y_layout": chain[1] if chain else "", "g_layout": p["g_layout"],
                 "body_backward": back}
        operands = [G, p["R"], rbh, p["P"], p["h0"], p["c0"], p["lens"]]
        results = list(op.results)
        while len(results) > 1 and not self.uses.get(id(results[-1])) \
                and not any(r is results[-1] for r in self.f.results):
            results.pop()  # an unread Y_c / Y_h is not computed
        new = b.create("recurrence", operands, attrs, num_results=len(results), loc=loc)
        rec = new[0].producer
        if chain:
            results[0] = chain[2]
        for i, (old, fresh) in enumerate(zip(results, new)):
            if old.type != fresh.type:
                raise NncError(f"{loc}: time-fusion: result {i} would change type {old.type} -> {fresh.type}")
            old.producer = rec
        rec.results = results

    # ------------------------------------------------------------ direction pairs

    def _pair_glue(self, fwd: Op, rev: Op):
        """The Squeeze/Reshape of each Y and the Concat joining them on the last axis, when the
        pair's Ys are read only that way: Concat(squeeze(Y_fwd), squeeze(Y_rev), axis=-1) is the
        bidirectional op's Y in [S, B, 2H], the layout `sbdh`. Else None."""
        def only_use(v):
            us = self.uses.get(id(v), [])
            return us[0] if len(us) == 1 and not any(r is v for r in self.f.results) else None
        sq = []
        for op in (fwd, rev):
            u = only_use(op.results[0])
            y = op.results[0].type.shape
            if u is None or u.name not in ("Squeeze", "Reshape") or u.operands[0] is not op.results[0] \
                    or u.results[0].type.shape != (y[0], y[2], y[3]):
                return None
            sq.append(u)
        cat = only_use(sq[0].results[0])
        if cat is None or cat.name != "Concat" or only_use(sq[1].results[0]) is not cat \
                or list(cat.operands) != [sq[0].results[0], sq[1].results[0]] \
                or int(cat.attrs.axis) not in (2, -1):
            return None
        return sq, cat

    def _merge_directions(self) -> bool:
        """A forward and a reverse op of one kind on the same X with the same attributes, whose
        Ys are squeezed and concatenated on the last axis (exporters that write a bidirectional
        layer as two ops): one bidirectional op instead, written as that Concat directly. Its
        Y_h/Y_c are sliced back into the pair's (views)."""
        w = self.m.weights
        pos = {id(op): i for i, op in enumerate(self.f.ops)}
        groups = {}
        for op in self.f.ops:
            a = op.attrs
            if op.name not in RNN_OPS or a.direction not in ("forward", "reverse") or a.layout != 0:
                continue
            try:  # only cells the rewrite below takes (else the pair stays as it was)
                if any(k not in ACT_OPS for d in activation_slots(op.name, a) for k, _, _ in d):
                    continue
            except NncError:
                continue
            ops = _operands8(op)
            if const_value(ops[1], w) is None or const_value(ops[2], w) is None or \
                    (ops[3] is not None and const_value(ops[3], w) is None) or \
                    (ops[7] is not None and const_value(ops[7], w) is None):
                continue
            key = (op.name, id(ops[0]), id(ops[4]) if ops[4] is not None else None,
                   repr(dataclasses.replace(a, direction="forward")))
            groups.setdefault(key, {}).setdefault(a.direction, []).append(op)
        merged = False
        b = Builder(self.f, w, self.names)
        for g in groups.values():
            if len(g.get("forward", ())) != 1 or len(g.get("reverse", ())) != 1:
                continue
            fwd, rev = g["forward"][0], g["reverse"][0]
            glue = self._pair_glue(fwd, rev)
            if glue is None:
                continue
            sq, cat = glue
            last = max(pos[id(fwd)], pos[id(rev)])
            if any(pos.get(id(u), last + 1) <= last for op in (fwd, rev) for r in op.results[1:]
                   for u in self.uses.get(id(r), [])):
                continue  # a state read between the two ops: it would be used before the merged op
            self._merge_pair(fwd, rev, sq, cat, b, pos)
            merged = True
        if merged:
            self.uses = users(self.f)
        return merged

    def _merge_pair(self, fwd, rev, sq, cat, b: Builder, pos):
        w = self.m.weights
        kind, a = fwd.name, fwd.attrs
        fo = _operands8(fwd)
        ro = _operands8(rev)
        X, lens = fo[0], fo[4]
        H = int(fo[2].type.shape[2])
        gates = _KIND[kind][0]
        dt = X.type.dtype.np
        B = X.type.shape[1]

        def stack(i, shape):
            vals = [const_value(o[i], w) if o[i] is not None else None for o in (fo, ro)]
            if all(v is None for v in vals):
                return None
            vals = [np.zeros(shape, dt) if v is None else v for v in vals]
            return b.constant(np.concatenate(vals, axis=0), f"{fwd.results[0].name}.bidir{i}")

        def state(i):
            vs = [o[i] for o in (fo, ro)]
            if all(v is None or _is_zero(v, w) for v in vs):
                return None
            zero = None
            parts = []
            for v in vs:
                if v is None:
                    zero = zero or b.constant(np.zeros((1, B, H), dt))
                    v = zero
                parts.append(v)
            return b.create("Concat", parts, {"axis": 0})[0]

        n0 = len(self.f.ops)  # what b.create appends below moves to the later op's place
        W = stack(1, (1, gates * H, fo[1].type.shape[2]))
        R = stack(2, (1, gates * H, H))
        Bc = stack(3, (1, 2 * gates * H))
        P = stack(7, (1, 3 * H)) if kind == "LSTM" else None
        h0 = state(5)
        c0 = state(6) if kind == "LSTM" else None
        nres = max(len(fwd.results), len(rev.results))
        operands = [X, W, R, Bc, lens, h0] + ([c0, P] if kind == "LSTM" else [])
        bi = dataclasses.replace(a, direction="bidirectional")
        if a.activations:  # one direction's list: ONNX reads a bidirectional op's as two of them
            bi = dataclasses.replace(bi, activations=tuple(a.activations) * 2,
                                     activation_alpha=tuple(a.activation_alpha) * 2,
                                     activation_beta=tuple(a.activation_beta) * 2)
        outs = b.create(kind, operands, bi, num_results=nres,
                        names=[f"{fwd.results[0].name}.bidir"] + [""] * (nres - 1), loc=fwd.loc)
        merged_op = outs[0].producer
        gone = {id(fwd), id(rev), id(cat), id(sq[0]), id(sq[1])}
        for k in range(1, nres):  # Concat(Y_h fwd, Y_h rev, axis 0) (torch's h_n) is the merged Y_h
            rf = fwd.results[k] if k < len(fwd.results) else None
            rr = rev.results[k] if k < len(rev.results) else None
            us = [self.uses.get(id(x), []) for x in (rf, rr) if x is not None]
            if rf is None or rr is None or len(us[0]) != 1 or us[0] != us[1] or us[0][0].name != "Concat" \
                    or us[0][0].operands != [rf, rr] or int(us[0][0].attrs.axis) != 0 \
                    or any(x is rf or x is rr for x in self.f.results):
                continue
            hcat = us[0][0]
            merged_op.results[k] = hcat.results[0]
            hcat.results[0].producer = merged_op
            outs[k] = hcat.results[0]
            gone.add(id(hcat))
            for x in (rf, rr):
                self.uses[id(x)] = []  # no slice needed
        for d, op in enumerate((fwd, rev)):  # the pair's other states: slices of the merged op's
            for k, r in enumerate(op.results[1:], 1):
                if self.uses.get(id(r)) or any(x is r for x in self.f.results):
                    sl = b.create("Slice", [outs[k], b.constant(np.array([d], np.int64)),
                                            b.constant(np.array([d + 1], np.int64)),
                                            b.constant(np.array([0], np.int64))])[0]
                    sl.producer.results = [r]
                    r.producer = sl.producer
        moved = self.f.ops[n0:]
        del self.f.ops[n0:]
        # Y [S,2,B,H] -> [S,B,2H] where the Concat was: what the glue fold makes the layout sbdh
        t = b.create("Transpose", [outs[0]], {"perm": (0, 2, 1, 3)})[0]
        shape = b.constant(np.array([0, 0, 2 * H], np.int64))
        rs = b.create("Reshape", [t, shape])[0]
        rs.producer.results = [cat.results[0]]
        cat.results[0].producer = rs.producer
        at_cat = self.f.ops[n0:]
        del self.f.ops[n0:]
        later = fwd if pos[id(fwd)] > pos[id(rev)] else rev
        new_ops = []
        for op in self.f.ops:
            if id(op) in gone:
                if op is later:
                    new_ops.extend(moved)
                elif op is cat:
                    new_ops.extend(at_cat)
                continue
            new_ops.append(op)
        self.f.ops = new_ops
        pos.clear()
        pos.update({id(op): i for i, op in enumerate(self.f.ops)})

    # ------------------------------------------------------------ the rewrite

    def run(self) -> bool:
        merged = self._merge_directions()
        plans = {}
        for op in self.f.ops:
            if op.name in RNN_OPS:
                p = self.plan(op)
                if p is not None:
                    plans[id(op)] = p
        from nnc import progress
        for note in self.notes:  # `nnc compile -v`: why an RNN op kept its own lowering
            progress.current().log(f"  time-fusion left alone: {note}")
        if not plans:
            return merged
        old, self.f.ops = self.f.ops, []
        b = Builder(self.f, self.m.weights, self.names)
        for op in old:
            if id(op) in self.skip:
                continue
            if id(op) in plans:
                self.emit(op, plans[id(op)], b)
            else:
                self.f.ops.append(op)
        from nnc.passes import dce
        dce.run(self.m)
        return True


def run(module: Module) -> bool:
    registry.get("recurrence")  # the op families are loaded
    return _Rewriter(module).run()
