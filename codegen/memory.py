"""The arena: liveness, placement, the overlap checker.

Every temp buffer (a root, not a view: views live inside their root) is live from the first
launch that touches it to the last, both inclusive, so two buffers read or written by the same
launch are live together. Live buffers share one device arena; placement gives each an offset.

Placement is greedy: buffers in an order (largest first, ...: GREEDY_METHODS), each at the lowest
256-byte-aligned offset where it overlaps no already placed buffer that is live at the same time.
The orders are tried in turn and the smallest arena wins (plan.memory_method records which); the
first to reach peak_live ends the search.
The pairs of buffers live together are found once, by a sweep over launch times, so the cost is
O(n log n + K) for n buffers and K pairs live together, not the O(n^2) of comparing every buffer
with every placed one. K is n x (buffers live at once) in practice: small for chains and typical
networks. A graph where very many buffers are live at once (K above MAX_LIVE_PAIRS) is placed by
a strictly O(n log n) sweep instead (best-fit allocation from a free list, in launch order).

`check_placement` verifies any placement in O(n log n): in a sweep over launch times, the live
buffers, kept sorted by offset, must be disjoint; inserting one only needs its two neighbours
checked. plan_memory runs it on every plan it makes.

Weights and consts are laid out back to back (256-byte aligned) in weights.bin.
"""
from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass
from typing import Optional, Sequence

ALIGN = 256
MAX_LIVE_PAIRS_PER_BUFFER = 64
MAX_LIVE_PAIRS_BASE = 1 << 20  # K budget: this + 64 per buffer; above it the sweep placer runs


class ArenaOverlapError(AssertionError):
    """Two buffers live at the same time share arena bytes (a compiler bug, never user error)."""


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class Interval:
    """One arena buffer: live over launches [first, last] (inclusive), `size` bytes (aligned)."""
    first: int
    last: int
    size: int
    nbytes: int = -1  # unaligned size: the greedy order sorts on it (-1: size)

    @property
    def order_bytes(self) -> int:
        return self.size if self.nbytes < 0 else self.nbytes


# ---------------------------------------------------------------- liveness

def launch_sequence(plan) -> list:
    """The launches in the order they run: the load-time init phase (codegen/init_phase.py) runs
    once before any run, so its scratch temps are planned as if it came first."""
    return list(getattr(plan, "init_launches", None) or []) + list(plan.launches)


def liveness(plan) -> tuple[dict[int, int], dict[int, int]]:
    """Root buffer id -> index (in launch_sequence) of the first / last launch that names the
    buffer or a view of it."""
    from .plan import Buffer
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for t, l in enumerate(launch_sequence(plan)):
        for a in l.args:
            if isinstance(a, Buffer):
                rid = a.alias_of if a.alias_of is not None else a.id
                if rid not in first:
                    first[rid] = t
                last[rid] = t
    return first, last


def live_pairs(iv: Sequence[Interval], budget: Optional[int] = None) -> Optional[list[list[int]]]:
    """For each interval, the indices of the others live at the same time (overlapping [first,
    last]); None if there are more than `budget` such pairs. A sweep by start time: each interval
    meets exactly the active ones (started before, not yet ended), so the cost is O(n log n + K)."""
    order = sorted(range(len(iv)), key=lambda i: (iv[i].first, i))
    nbr: list[list[int]] = [[] for _ in iv]
    active: dict[int, None] = {}  # insertion-ordered set of live interval indices
    ends: list[tuple[int, int]] = []  # heap of (last, index) of the active ones
    pairs = 0
    for i in order:
        f = iv[i].first
        while ends and ends[0][0] < f:
            del active[heapq.heappop(ends)[1]]
        pairs += len(active)
        if budget is not None and pairs > budget:
            return None
        for j in active:
            nbr[i].append(j)
            nbr[j].append(i)
        active[i] = None
        heapq.heappush(ends, (iv[i].last, i))
    return nbr


# ---------------------------------------------------------------- placement

def greedy_order(iv: Sequence[Interval], nbr: list[list[int]], order: str) -> list[int]:
    """The order in which place_greedy places the buffers (GREEDY_METHODS). O(n log n + K)."""
    n = range(len(iv))
    if order == "size":  # largest first, ties: earlier first use, then input order
        return sorted(n, key=lambda i: (-iv[i].order_bytes, iv[i].first, i))
    if order == "size-last":  # largest first, ties: later last use (the long-lived one is kept low)
        return sorted(n, key=lambda i: (-iv[i].order_bytes, -iv[i].last, i))
    if order == "conflict":  # most bytes live together with it (itself included) first
        return sorted(n, key=lambda i: (-(iv[i].size + sum(iv[j].size for j in nbr[i])), i))
    raise ValueError(f"unknown greedy order {order!r}")


def place_greedy(iv: Sequence[Interval], nbr: list[list[int]], order: str = "size") -> list[int]:
    """Buffers in greedy_order, each at the lowest offset that overlaps none of its already placed
    live-together neighbours. O(sum of deg log deg) = O(K log K)."""
    return place_in_order(iv, nbr, greedy_order(iv, nbr, order))


def place_in_order(iv: Sequence[Interval], nbr: list[list[int]], order: Sequence[int]) -> list[int]:
    """place_greedy for an explicit order (a permutation of the interval indices)."""
    offsets = [-1] * len(iv)
    for i in order:
        size = iv[i].size
        conflicts = sorted((offsets[j], iv[j].size) for j in nbr[i] if offsets[j] >= 0)
        off = 0
        for o, s in conflicts:
            if off + size <= o:
                break
            off = max(off, o + s)
        offsets[i] = off
    return offsets


class _FreeList:
    """Free arena ranges below the top: by offset (to merge neighbours) and by (size, offset) (to
    find the best fit), both sorted lists kept with bisect."""

    def __init__(self):
        self.offs: list[int] = []
        self.size_at: dict[int, int] = {}
        self.by_size: list[tuple[int, int]] = []
        self.top = 0

    def _add(self, off: int, size: int):
        bisect.insort(self.offs, off)
        self.size_at[off] = size
        bisect.insort(self.by_size, (size, off))

    def _remove(self, off: int):
        size = self.size_at.pop(off)
        del self.offs[bisect.bisect_left(self.offs, off)]
        del self.by_size[bisect.bisect_left(self.by_size, (size, off))]

    def alloc(self, size: int) -> int:
        k = bisect.bisect_left(self.by_size, (size, -1))
        if k < len(self.by_size):
            hsize, off = self.by_size[k]
            self._remove(off)
            if hsize > size:
                self._add(off + size, hsize - size)
            return off
        off = self.top  # no hole fits: grow (free() never leaves a range ending at the top)
        self.top = off + size
        return off

    def free(self, off: int, size: int):
        k = bisect.bisect_left(self.offs, off)
        if k > 0:  # merge with the free range just below
            p = self.offs[k - 1]
            if p + self.size_at[p] == off:
                off, size = p, size + self.size_at[p]
                self._remove(p)
        nxt = off + size
        if nxt in self.size_at:  # and with the one just above
            size += self.size_at[nxt]
            self._remove(nxt)
        if off + size == self.top:
            self.top = off
        else:
            self._add(off, size)


def place_sweep(iv: Sequence[Interval]) -> list[int]:
    """In launch order: buffers whose last use is past are freed, then those first used now are
    allocated (largest first) best-fit from the free list. O(n log n) whatever the overlap."""
    offsets = [-1] * len(iv)
    starts = sorted(range(len(iv)), key=lambda i: (iv[i].first, -iv[i].size, i))
    ends: list[tuple[int, int]] = []
    fl = _FreeList()
    for i in starts:
        while ends and ends[0][0] < iv[i].first:
            _, j = heapq.heappop(ends)
            fl.free(offsets[j], iv[j].size)
        offsets[i] = fl.alloc(iv[i].size)
        heapq.heappush(ends, (iv[i].last, i))
    return offsets


# The greedy placements tried, in this order: the first with the smallest arena wins, so a plan
# changes only where a later one is strictly smaller, and the search stops at the first that
# reaches peak_live (no placement does better). Each is a heuristic for an NP-hard packing and
# none is best everywhere: on light_shufflenet at fp16 (memory-aware schedule) by-size leaves a
# 10% hole that by-size with late-last-use ties does not.
GREEDY_METHODS = (("greedy-by-size", "size"), ("greedy-by-size-late-last", "size-last"),
                  ("greedy-by-conflict", "conflict"))


# The repair (repair_order) where no greedy order reaches peak_live: at most this many re-placements,
# and at most REPAIR_WORK neighbour visits in all (each round costs n + K), so it stays linear in
# the size of the graph whatever it finds.
REPAIR_ROUNDS = 64
REPAIR_WORK = 1 << 23


def arena_size(iv: Sequence[Interval], offsets: Sequence[int]) -> int:
    return max((o + x.size for o, x in zip(offsets, iv)), default=0)


def repair_order(iv: Sequence[Interval], nbr: list[list[int]], order: Sequence[int], bound: int,
                 rounds: int = REPAIR_ROUNDS) -> tuple[int, list[int], int]:
    """Squeaky-wheel repair of a greedy order: place, move the buffers that end above `bound` (the
    ones the order could not fit) to the front of the order, keeping their relative order, and
    place again; the smallest arena seen wins. Returns (arena, offsets, rounds it took).
    Why: by size, every big short-lived buffer goes to offset 0 before any small long-lived one is
    placed, and a periodic pattern can need the big ones to alternate around the small ones.
    ViT-B/16: per encoder layer the MLP hidden tensor (4R) is live with the residual and the LN
    output (R each) at fc1/fc2, 6R in all; the residual of the layer before is live with this
    layer's residual and LN output one launch earlier. With every 4R buffer at 0, those three R
    buffers must share the 2R above it: one goes to 6R (arena 7R = 1.167 x peak). Placing the
    stranded one first makes the hidden tensors of successive layers alternate between [0, 4R)
    and [2R, 6R): arena = peak_live after ~20 rounds."""
    order = list(order)
    best = None
    work = len(iv) + sum(len(x) for x in nbr)
    for r in range(max(1, min(rounds, REPAIR_WORK // max(work, 1)))):
        offsets = place_in_order(iv, nbr, order)
        a = arena_size(iv, offsets)
        if best is None or a < best[0]:
            best = (a, offsets, r)
        if a <= bound:
            break
        stuck = [i for i in order if offsets[i] + iv[i].size > bound]
        moved = set(stuck)
        order = stuck + [i for i in order if i not in moved]
    return best


def place(iv: Sequence[Interval]) -> tuple[list[int], str]:
    """Offsets for the intervals and the method that won: the smallest arena of GREEDY_METHODS,
    then, if none reached peak_live, of the winning order's repair (method "<name>+repair", kept
    only where strictly smaller), or the sweep where too many buffers are live together for the
    greedy ones."""
    nbr = live_pairs(iv, MAX_LIVE_PAIRS_BASE + MAX_LIVE_PAIRS_PER_BUFFER * len(iv))
    if nbr is None:
        return place_sweep(iv), "sweep"
    bound = peak_live(iv)
    best = None
    for name, order in GREEDY_METHODS:
        offsets = place_greedy(iv, nbr, order)
        a = arena_size(iv, offsets)
        if best is None or a < best[0]:
            best = (a, offsets, name, order)
        if a <= bound:
            break
    if best[0] > bound:
        a, offsets, _ = repair_order(iv, nbr, greedy_order(iv, nbr, best[3]), bound)
        if a < best[0]:
            return offsets, best[2] + "+repair"
    return best[1], best[2]


# ---------------------------------------------------------------- the overlap checker

def check_placement(iv: Sequence[Interval], offsets: Sequence[int], names: Optional[Sequence[str]] = None,
                    inplace: Sequence[tuple[int, int]] = ()) -> None:
    """Raises ArenaOverlapError if two intervals live at the same time share a byte, except an
    in-place pair (i, j) of `inplace` (j written over i by the launch where i dies), which must
    overlap exactly: the same offset and size. O(n log n) plus the in-place partners met."""
    def name(i):
        return names[i] if names is not None else f"#{i}"

    allowed = {(min(i, j), max(i, j)) for i, j in inplace}
    for i, o in enumerate(offsets):
        if o < 0 or o % ALIGN:
            raise ArenaOverlapError(f"buffer {name(i)}: arena offset {o} is negative or not {ALIGN}-aligned")
    for i, j in inplace:
        if offsets[i] != offsets[j] or iv[i].size != iv[j].size:
            raise ArenaOverlapError(f"in-place pair {name(i)} -> {name(j)}: not the same slot "
                                    f"([{offsets[i]}, +{iv[i].size}) and [{offsets[j]}, +{iv[j].size}))")

    def clash(a, b):
        raise ArenaOverlapError(f"buffers {name(a)} [{offsets[a]}, {offsets[a] + iv[a].size}) and {name(b)} "
                                f"[{offsets[b]}, {offsets[b] + iv[b].size}) are live together (launches "
                                f"{iv[a].first}..{iv[a].last} and {iv[b].first}..{iv[b].last}) and overlap")

    order = sorted(range(len(iv)), key=lambda i: (iv[i].first, i))
    ends: list[tuple[int, int]] = []
    live: list[tuple[int, int]] = []  # (offset, index) of the live ones, sorted
    for i in order:
        while ends and ends[0][0] < iv[i].first:
            _, j = heapq.heappop(ends)
            del live[bisect.bisect_left(live, (offsets[j], j))]
        o, s = offsets[i], iv[i].size
        k = bisect.bisect_left(live, (o, i))
        if s > 0:
            # the live ones are disjoint but for exact in-place partners: walk past those (each
            # partner already passed this test against the rest) to the first true neighbours
            q = k - 1
            while q >= 0:
                po, pj = live[q]
                if po + iv[pj].size <= o or iv[pj].size == 0:
                    break
                if (min(i, pj), max(i, pj)) not in allowed:
                    clash(pj, i)
                q -= 1
            q = k
            while q < len(live):
                no, nj = live[q]
                if o + s <= no:
                    break
                if iv[nj].size > 0 and (min(i, nj), max(i, nj)) not in allowed:
                    clash(i, nj)
                q += 1
        live.insert(k, (o, i))
        heapq.heappush(ends, (iv[i].last, i))


def peak_live(iv: Sequence[Interval]) -> int:
    """The largest total size of buffers live at one launch (a lower bound for any arena)."""
    ev = sorted([(x.first, x.size) for x in iv] + [(x.last + 1, -x.size) for x in iv], key=lambda e: (e[0], e[1]))
    peak = cur = 0
    for _, d in ev:
        cur += d
        peak = max(peak, cur)
    return peak


# ---------------------------------------------------------------- the plan

ELEMENTWISE_TEMPLATE = "elementwise.cu.j2"  # launch args: its inputs, its outputs, n (kernels/elementwise.py)


def inplace_pairs(plan, first: dict[int, int], last: dict[int, int]) -> list[tuple[int, int, int]]:
    """(launch index, input buffer id, output buffer id): an elementwise kernel's output written
    over an input's slot. Legal only where a thread reads element idx of the input and then
    writes element idx of the output and nothing else touches that input any more: the input is
    read at the output's own index (not broadcast: its template strides are None), has the
    output's dtype and shape, is a temp root (not a view, input, output, weight or persistent
    value, not dynamic) that no other argument of the launch views, and this launch is its last
    use; the output is a temp root first used by this launch. Each input and output in one pair."""
    from .plan import Buffer
    out = []
    for t, l in enumerate(launch_sequence(plan)):
        if l.kind != "kernel":
            continue
        k = plan.kernels.get(l.kernel)
        if k is None or k.template != ELEMENTWISE_TEMPLATE:
            continue
        ins, outs = k.params.get("inputs", []), k.params.get("outputs", [])
        if len(l.args) < len(ins) + len(outs):
            continue
        roots: dict[int, int] = {}
        for a in l.args:
            if isinstance(a, Buffer):
                r = a.alias_of if a.alias_of is not None else a.id
                roots[r] = roots.get(r, 0) + 1

        def plain(b) -> bool:
            return (isinstance(b, Buffer) and b.kind == "temp" and b.alias_of is None and not b.dynamic
                    and roots.get(b.id) == 1)
        taken: set[int] = set()
        for kin, p in enumerate(ins):
            b = l.args[kin]
            if p.get("strides", 0) is not None or not plain(b) or last.get(b.id) != t:
                continue
            for kout in range(len(outs)):
                ob = l.args[len(ins) + kout]
                if (kout in taken or not plain(ob) or first.get(ob.id) != t or ob.dtype != b.dtype
                        or tuple(ob.shape) != tuple(b.shape)):
                    continue
                taken.add(kout)
                out.append((t, b.id, ob.id))
                break
    return out


def _alias_kernels(plan, pairs: list[tuple[int, int, int]]) -> None:
    """Launches written in place run a variant of their kernel whose aliased pointers are not
    __restrict__ (templates/elementwise.cu.j2 `aliased`); kernels no launch runs any more go."""
    from .plan import Kernel
    from .render import render
    seq = launch_sequence(plan)
    by_launch: dict[int, list[tuple[int, int]]] = {}
    for t, i, o in pairs:
        by_launch.setdefault(t, []).append((i, o))
    made: dict[tuple, str] = {}
    for t, ios in by_launch.items():
        l = seq[t]
        k = plan.kernels[l.kernel]
        ids = [a.id if hasattr(a, "alias_of") else None for a in l.args]
        n_in = len(k.params["inputs"])
        marks = tuple(sorted((ids.index(i), ids.index(o) - n_in) for i, o in ios))
        key = (k.name, marks)
        if key not in made:
            params = dict(k.params)
            params["inputs"] = [dict(p) for p in params["inputs"]]
            params["outputs"] = [dict(p) for p in params["outputs"]]
            for ki, ko in marks:
                params["inputs"][ki]["aliased"] = True
                params["outputs"][ko]["aliased"] = True
            name = f"{k.name}_inplace{len(made)}"
            made[key] = name
            plan.kernels[name] = Kernel(name, k.template, params, render(k.template, name=name, **params), list(k.ops))
        l.kernel = made[key]
    used = {l.kernel for l in seq if l.kind == "kernel"}
    for name in [n for n in plan.kernels if n not in used]:
        del plan.kernels[name]


def plan_memory(plan, inplace: bool = True) -> None:
    """Places the plan's temp buffers in the arena and its weights/consts in weights.bin; fills
    plan.memory and plan.weights_bytes. With `inplace`, an elementwise kernel's output shares
    the slot of an operand that dies there (inplace_pairs): the pair is placed as one interval
    (chains of such pairs too), the output's Buffer.inplace_of names the operand, and the checker
    allows exactly that overlap."""
    check_slot_views(plan, getattr(plan, "slot_views", ()))
    first, last = liveness(plan)
    temps = [b for b in plan.buffers if b.kind == "temp" and b.alias_of is None and b.id in first]
    iv = [Interval(first[b.id], last[b.id], align(max(b.nbytes, 1)), b.nbytes) for b in temps]
    pairs = inplace_pairs(plan, first, last) if inplace else []
    pos = {b.id: n for n, b in enumerate(temps)}
    group = list(range(len(temps)))  # union-find: in-place chains share one slot

    def find(x):
        while group[x] != x:
            group[x] = group[group[x]]
            x = group[x]
        return x
    for _, i, o in pairs:
        group[find(pos[o])] = find(pos[i])
    roots = sorted({find(n) for n in range(len(temps))})
    gi = {r: n for n, r in enumerate(roots)}
    span: list[list[int]] = [[iv[r].first, iv[r].last, iv[r].size, iv[r].order_bytes] for r in roots]
    for n in range(len(temps)):
        g = span[gi[find(n)]]
        g[0], g[1] = min(g[0], iv[n].first), max(g[1], iv[n].last)
        g[2], g[3] = max(g[2], iv[n].size), max(g[3], iv[n].order_bytes)
    giv = [Interval(f, l, s, nb) for f, l, s, nb in span]
    goff, method = place(giv)
    offsets = [goff[gi[find(n)]] for n in range(len(temps))]
    check_placement(iv, offsets, [b.name for b in temps], [(pos[i], pos[o]) for _, i, o in pairs])
    for b, o in zip(temps, offsets):
        b.offset = o
        b.inplace_of = None
    for _, i, o in pairs:
        temps[pos[o]].inplace_of = i
    if pairs:
        _alias_kernels(plan, pairs)
    arena = max((o + x.size for o, x in zip(offsets, iv)), default=0)
    woff = 0
    for b in plan.buffers:
        if b.kind in ("weight", "const") and b.alias_of is None and b.id in first:
            woff = align(woff)
            b.offset = woff
            woff += b.nbytes
    plan.weights_bytes = woff
    plan.memory = {"arena_bytes": arena, "naive_bytes": sum(x.size for x in iv), "peak_live_bytes": peak_live(giv),
                   "weights_bytes": woff, "inplace_bytes": sum(iv[pos[o]].size for _, _, o in pairs)}
    plan.memory_method = method


# ---------------------------------------------------------------- zero-copy concat

SLOT_ALIGN = 16  # bytes: kernels store outputs with vector stores of up to 16 bytes


# ops whose CUDA lowering is a view of operand 0 (codegen/kernels/movement.py _view): in the IR-level
# estimate they extend their operand's life instead of holding bytes of their own
VIEW_OPS = ("Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten")
# how far a zero-copy Concat may push the IR-level live-bytes estimate past its original peak. The
# estimate is coarse (no fusion, no in-place) and a Concat refused half-way leaves a long-lived
# partial chain that fragments the arena: light_densenet121 fp16 refuses its first dense block's
# last Concat at 1.03 (arena 4616192 B over a peak of 3813376: 1.21) and takes it at 1.06 (arena =
# peak = 3813376, no concat copy left; 3612672 without zero-copy), while light_shufflenet's
# memory-scheduled order (a shortcut made long before its Concat) needs the refusal either way
SLOT_PEAK_SLACK = 1.06
MAX_SLOT_SPAN = 4096  # ops between a Concat and its earliest slot producer: beyond, no zero-copy (linear time)


class _LiveProfile:
    """Bytes live at each top-level op of `func` (a value from its producer to its last reader,
    operands and results of an op live at it; returned values to the end; arguments, consts and
    values computed at load cost nothing; a view holds its root), with the intervals of the arena roots it assumes: the IR-level estimate that
    concat_slots uses to keep a zero-copy Concat from raising the bytes live anywhere."""

    def __init__(self, func, skip: set, ops: list):
        import math
        from ..ir.rewrite import used_values
        self.n = len(ops)
        self.at: dict[int, int] = {}
        last: dict[int, int] = {}
        root: dict[int, int] = {}  # a view op's result -> the value whose buffer it views
        for t, op in enumerate(ops):
            for r in op.results:
                self.at[id(r)] = t
            if op.name in VIEW_OPS and op.operands and op.operands[0] is not None:
                root[id(op.results[0])] = root.get(id(op.operands[0]), id(op.operands[0]))
            reads = {id(v) for v in op.operands if v is not None}
            for _, sub in op.regions():
                reads |= used_values(sub)
            for i in reads:
                last[root.get(i, i)] = t
        for v in func.results:
            last[root.get(id(v), id(v))] = self.n - 1
        diff = [0] * (self.n + 1)
        self.span: dict[int, list] = {}  # root value id -> [first, last, bytes]
        for t, op in enumerate(ops):
            if op.name == "const":
                continue
            for r in op.results:
                if id(r) in root or id(r) in skip:  # a view, or computed at load (persistent)
                    continue
                sh = r.type.shape
                b = math.prod(sh) * r.type.dtype.np.itemsize if sh is not None and all(isinstance(d, int) for d in sh) else 0
                self.span[id(r)] = [t, last.get(id(r), t), b]
                diff[t] += b
                diff[last.get(id(r), t) + 1] -= b
        self.live = []
        cur = 0
        for t in range(self.n):
            cur += diff[t]
            self.live.append(cur)
        self.peak = max(self.live, default=0)  # the original order's peak: no merge may exceed it

    def try_merge(self, c, xs) -> bool:
        """Makes the values `xs` slots of Concat result `c` (one arena root) unless that makes the
        bytes live at some op exceed the peak (the arena's lower bound); returns whether it did."""
        roots = [self.span.get(id(v)) for v in [c] + list(xs)]
        if any(r is None for r in roots):
            return False
        lo, hi = min(r[0] for r in roots), max(r[1] for r in roots)
        if hi - lo > MAX_SLOT_SPAN:
            return False
        delta = [0] * (hi - lo + 1)
        for f, l, b in roots:
            for t in range(f, l + 1):
                delta[t - lo] -= b
        cb = roots[0][2]
        for t in range(lo, hi + 1):
            delta[t - lo] += cb
        if max(self.live[t] + delta[t - lo] for t in range(lo, hi + 1)) > self.peak * SLOT_PEAK_SLACK:
            return False
        for t in range(lo, hi + 1):
            self.live[t] += delta[t - lo]
        for v in xs:
            del self.span[id(v)]
        self.span[id(c)] = [lo, hi, cb]
        return True


class _FlatOp:
    """An op of a `fused` body seen from the function: operands and results are the Values the
    lowering canonicalises them to (Lowerer.canon: a body argument is its operand, a body result
    the fused op's result), so a Concat inside a fused group lowered op by op (codegen/kernels/
    fused.py) gets the same slots as unfused."""

    def __init__(self, op, canon):
        self.name, self.attrs = op.name, op.attrs
        self.operands = [None if v is None else canon(v) for v in op.operands]
        self.results = [canon(r) for r in op.results]

    @staticmethod
    def regions():
        return []


def flat_ops(func, skip: set) -> list:
    """func's top-level ops with each `fused` op (not computed at load) replaced by its body's ops."""
    out = []
    for op in func.ops:
        if op.name != "fused" or any(id(r) in skip for r in op.results):
            out.append(op)
            continue
        body = op.attrs.body
        eq = {id(a): v for a, v in zip(body.args, op.operands)}
        eq.update((id(r), v) for r, v in zip(body.results, op.results))
        out.extend(_FlatOp(b, lambda v: eq.get(id(v), v)) for b in body.ops if b.name != "const")
    return out


def concat_slots(func, skip: set, outputs: set) -> dict:
    """Zero-copy Concat: id(input Value) -> (the Concat's result Value, byte offset of its slot),
    for the inputs whose producer can write straight into the Concat's output (codegen/lower.py
    makes their result buffers views of it; the Concat lowering then copies only the inputs that
    did not end up in their slot, e.g. a producer that aliased its result). A Concat qualifies when
    its result is one contiguous run per input: static shapes, every dim before the axis 1 (a
    channel concat at batch 1 in NCHW), its result neither a function result (`outputs`: ids) nor
    in `skip` (ids of input-independent values, computed at load). An input qualifies when an op
    of `func` produces it (no argument or const), it is the Concat's operand once, it is no
    function result and not in `skip`, it is no slot of an earlier Concat, and its slot starts
    SLOT_ALIGN-aligned. Other readers of an input are fine: an SSA value is written once, by its
    producer, so reading it where it lies in the Concat's output is reading it (DenseNet's chain
    Concat(Concat(a, b), c) puts a whole dense block in one buffer).
    The Concat's output is then live from its first slot's producer on (liveness is per root), so
    slots are taken only where the IR-level live bytes (_LiveProfile) stay within their peak: all of a
    Concat's candidates, else without the earliest-produced ones in turn (light_shufflenet's
    shortcut branch, made long before the Concat, would otherwise keep the whole output live
    across the other branch). The arena needs nothing more: the overlap checker sees one buffer
    per outermost Concat, check_slot_views the slots inside it."""
    import math
    prof = None
    out: dict = {}
    ops = flat_ops(func, skip)

    def static(v):
        s = v.type.shape
        return s is not None and all(isinstance(d, int) for d in s)
    for op in ops:
        if op.name != "Concat" or len(op.results) != 1:
            continue
        y = op.results[0]
        if not static(y) or id(y) in outputs or id(y) in skip or not y.type.shape:
            continue
        rank = len(y.type.shape)
        axis = int(op.attrs.axis)
        axis = axis + rank if axis < 0 else axis
        if not 0 <= axis < rank or math.prod(y.type.shape[:axis]) != 1:
            continue
        inner = math.prod(y.type.shape[axis + 1:]) * y.type.dtype.np.itemsize
        off = 0
        cands = []
        for x in op.operands:
            if x is None or not static(x):
                break
            n = int(x.type.shape[axis])
            p = x.producer
            if (p is not None and p.name != "const" and id(x) not in outputs and id(x) not in skip
                    and id(x) not in out and sum(v is x for v in op.operands) == 1
                    and off * inner % SLOT_ALIGN == 0 and n):
                cands.append((x, off * inner))
            off += n
        if not cands:
            continue
        if prof is None:
            prof = _LiveProfile(func, skip, ops)
        cands.sort(key=lambda c: prof.at.get(id(c[0]), 0))  # earliest producer first
        for k in range(min(len(cands), 4)):  # drop the earliest ones in turn (bounded tries)
            if prof.try_merge(y, [x for x, _ in cands[k:]]):
                out.update((id(x), (y, o)) for x, o in cands[k:])
                break
    return out


def check_slot_views(plan, views) -> None:
    """Raises ArenaOverlapError unless the zero-copy Concat slots (`views`: (slot, concat) Buffer
    pairs, the slot a view of the Concat's output written by its producer; the Concat's output
    may itself be a slot of a later Concat) each lie inside their Concat's bytes, start
    SLOT_ALIGN-aligned and are pairwise disjoint among one Concat's slots: the root-level checker
    above sees one buffer per outermost Concat, so this is what proves that two producers never
    write the same bytes."""
    by_parent: dict = {}
    for v, parent in views:
        proot = parent.alias_of if parent.alias_of is not None else parent.id
        base = parent.alias_offset if parent.alias_of is not None else 0
        lo, hi = v.alias_offset - base, v.alias_offset - base + v.nbytes
        if v.alias_of != proot or lo < 0 or hi > parent.nbytes or v.alias_offset % SLOT_ALIGN:
            raise ArenaOverlapError(f"concat slot {v.name} [{lo}, {hi}) is not an aligned range of {parent.name} "
                                    f"({parent.nbytes} bytes)")
        by_parent.setdefault(parent.id, []).append((lo, hi, v.name))
    for spans in by_parent.values():
        spans.sort()
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                raise ArenaOverlapError(f"concat slots {an} [{a0}, {a1}) and {bn} [{b0}, {b1}) overlap")


def fused_away_bytes(func) -> int:
    """Bytes of the intermediates that fusion took out of the graph: over the `fused` ops of
    `func` (ir/ops/fused.py), the sizes of the values their bodies define and do not return (the
    body's results are the fused op's results, which still exist). Static shapes only; a dim
    left symbolic counts 0 bytes. A group a family could not render as one kernel is lowered op
    by op (codegen/kernels/fused.py) and still materialises these: the figure is what the IR
    removed, plan.json's arena figures are what the lowering kept."""
    import math
    total = 0
    for op in func.ops:
        if op.name != "fused":
            continue
        body = op.attrs.body
        returned = {id(v) for v in body.results}
        for bop in body.ops:
            if bop.name == "const":
                continue
            for r in bop.results:
                t = r.type
                if id(r) in returned or t.shape is None or not all(isinstance(d, int) for d in t.shape):
                    continue
                total += math.prod(t.shape) * t.dtype.np.itemsize
    return total
