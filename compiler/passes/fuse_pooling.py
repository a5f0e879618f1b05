"""Global-average-pool fusion: a global average pool, the views after it and the Gemm that reads the
pooled vector (the classifier head of ResNet-50 and MobileNetV2: GlobalAveragePool -> Flatten ->
Gemm) become ONE `fused` op of kind "gap_gemm", lowered to one kernel (codegen/kernels/pool_gemm.py,
templates/gap_gemm.cu.j2) that pools its rows into shared memory and multiplies them by the Gemm's
weight. No atomics: every output is one thread block's fixed-order sums, so results do not depend
on scheduling (deterministic), and the pooled [N, C] tensor never goes to global memory.

Rewrites, in the top-level region of each function,

    %g = ReduceMean(%x, [1, 2]) {keepdims = 1}  (NHWC, as assign-layout writes a GAP)  or  GlobalAveragePool(%x)
    %v = Reshape / Flatten / Squeeze ...(%g)       (views, each the only user of the one before)
    %y = Gemm(%v, %w, %b) {transB = 0|1}  or  fused {kind = "gemm_epilogue"} whose Gemm reads %v
  ->
    %y = fused(%x, ..., %w, %b) {kind = "gap_gemm", params = "pool=nhwc|nchw hw=.. c=.. gemm=[..]", body = {the same ops}}

The body is the same ops, so the interpreter computes what it did before. Where the kernel does
not take the group (a Gemm epilogue with a residual or a scale, a non-constant weight, a pooled
width C over the Target's shared memory) the lowering falls back to the kernels of before
("gap_gemm.split": the pool, the views, the Gemm group).

Must hold: after fuse-epilogue (the Gemm already carries its bias / cast epilogue, read through
fuse-epilogue's own matcher) and assign-layout (its NHWC ReduceMean form); every intermediate has
one user (a read inside a nested region, an If or Loop body, counts as one) and is not a function
result; static shapes, float types.
"""
from __future__ import annotations

from typing import Optional

from nnc.ir.builder import const_value
from nnc.ir.graph import Module, Op, users
from nnc.ir.outline import Outliner
from nnc.passes.fuse_cross_layer import Part, _flat  # a group's ops back in the function, to outline anew
from nnc.passes.fuse_epilogue import match_group

KIND = "gap_gemm"
VIEW_OPS = ("Reshape", "Flatten", "Squeeze")
FLOATS = ("f16", "bf16", "f32")


def pool_kind(op: Op, const_of) -> Optional[str]:
    """"nhwc" for ReduceMean over axes (1, 2) of a rank-4 value with keepdims, "nchw" for a 4-D
    GlobalAveragePool, else None."""
    x = op.operands[0] if op.operands else None
    # static but for the batch (a range profile's runtime size: codegen/runtime_sizes.py)
    if x is None or x.type.rank != 4 or not all(isinstance(d, int) for d in x.type.shape[1:]) \
            or x.type.dtype.short not in FLOATS:
        return None
    if op.name == "GlobalAveragePool":
        return "nchw"
    if op.name != "ReduceMean" or int(getattr(op.attrs, "keepdims", 1)) != 1 or len(op.operands) < 2:
        return None
    axes = const_of(op.operands[1]) if op.operands[1] is not None else None
    if axes is None or sorted(int(a) % 4 for a in axes.reshape(-1)) != [1, 2]:
        return None
    return "nhwc"


def _part_gemm(op: Op, weights):
    """(the Gemm, its epilogue's params) for a Gemm or a gemm_epilogue group with a Gemm anchor."""
    if op.name == "Gemm" and len(op.results) == 1:
        return op, ""
    if op.name != "fused" or op.attrs.kind != "gemm_epilogue" or len(op.results) != 1:
        return None
    ch = match_group(op, weights)
    if ch is None or ch.anchor.name != "Gemm":
        return None
    return ch.anchor, op.attrs.params


def _run_func(func, module: Module) -> bool:
    weights = module.weights
    # readers anywhere, nested regions included (an If / Loop body may read the pooled value): a
    # chain continues only through a value whose one reader is a top-level op
    readers = users(func)
    top = {id(op) for op in func.ops}
    returned = {id(v) for v in func.results}

    def only(v):
        us = readers.get(id(v), [])
        return None if id(v) in returned or len(us) != 1 or id(us[0]) not in top else us[0]

    groups = []
    for op in func.ops:
        kind = pool_kind(op, lambda v: const_value(v, weights))
        if kind is None:
            continue
        chain, cur = [op], op.results[0]
        nxt = only(cur)
        while nxt is not None and nxt.name in VIEW_OPS and nxt.operands[0] is cur:
            chain.append(nxt)
            cur = nxt.results[0]
            nxt = only(cur)
        if nxt is None or nxt.operands.count(cur) != 1:
            continue
        g = _part_gemm(nxt, weights)
        if g is None:
            continue
        gemm_op, chain_info = g
        a = gemm_op.operands[0]
        if nxt.name == "fused":
            a_outer = nxt.operands[nxt.attrs.body.args.index(a)] if a in nxt.attrs.body.args else None
        else:
            a_outer = a
        if a_outer is not cur or cur.type.rank != 2:
            continue
        x = op.operands[0].type.shape
        hw, c = (x[1] * x[2], x[3]) if kind == "nhwc" else (x[2] * x[3], x[1])
        if tuple(cur.type.shape) != (x[0], c):
            continue
        groups.append((chain, nxt, f"pool={kind} hw={hw} c={c} gemm=[{chain_info}]"))
    if not groups:
        return False
    flat_of = {}
    for chain, g, _ in groups:
        flat_of[id(g)] = _flat(Part(g, g, None)) if g.name == "fused" else [g]
    func.ops = [o for op in func.ops for o in flat_of.get(id(op), [op])]
    out = Outliner(func, module=module)
    for chain, g, params in groups:
        ops = chain + flat_of[id(g)]
        if out.can_outline(ops):
            out.outline(ops, kind=KIND, params=params)
        elif g.name == "fused":  # (cannot happen for single-use chains) the Gemm group as it was
            out.outline(flat_of[id(g)], kind=g.attrs.kind, params=g.attrs.params)
    out.finish()
    return True


def run(module: Module) -> bool:
    changed = False
    for f in module.functions:
        changed |= _run_func(f, module)
    return changed
