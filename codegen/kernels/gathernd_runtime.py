"""GatherND over a runtime number of index tuples (issue 10: the indices of a NonZero downstream,
codegen/data_dependent.py, or a range profile's leading dims). The same scatter.cu.j2 "gathernd"
kernel as kernels/scatter.py: it already takes the element count n as an argument and loops
grid-stride, and with batch_dims = 0 and a static data operand nothing else depends on the count
(the slice, the index depth and the data strides are static), so n and the grid go per run."""
from __future__ import annotations

from ..runtime_sizes import shape_is_symbolic
from ..lower import LowerCtx, lowering


def _runtime_count(op) -> bool:
    """Only the index tuples' count is symbolic: data static, index depth static, batch_dims 0."""
    x, ind = op.operands[0], op.operands[1]
    if x is None or ind is None or not x.type.is_static or ind.type.shape is None or not ind.type.shape:
        return False
    if int(getattr(op.attrs, "batch_dims", 0) or 0) != 0 or not isinstance(ind.type.shape[-1], int):
        return False
    return shape_is_symbolic(ind.type.shape[:-1])


@lowering("GatherND", priority=1, when=_runtime_count, runtime_sizes=True)
def _gathernd_runtime(ctx: LowerCtx):
    x, ind, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    kk = ind.shape[-1]
    if kk == 0:
        ctx.fail("GatherND with an empty index depth is not supported")
    slice_ = 1
    for d in x.shape[kk:]:
        slice_ *= int(d)
    nj = max(1, y.numel // max(1, slice_))  # at the bound; with batch_dims 0 the kernel's b is 0
    k = ctx.render("scatter.cu.j2", "gathernd", kind="gathernd", ctype=x.ctype, ictype=ind.ctype, k=kk,
                   dims=list(x.shape[:kk]), xstrides=x.strides()[:kk], slice=slice_, nj=nj, bstride=0,
                   reduction="none", acc="")
    n = y.sym_numel
    ctx.launch(k, ctx.grid1d(n), 256, [x, ind, y, ctx.i64(n)])
    return True
