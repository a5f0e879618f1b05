"""A Linear layer on a batch (A [B, M, K] @ W [K, N]) is one GEMM of B*M rows (gemm.fold_batch_into_rows),
not B GEMMs of M rows; a batched B, a broadcast A or an epilogue that needs the batch keep the batch."""
from nnc.codegen.kernels import gemm
from nnc.codegen.kernels.epilogue import NONE, Epilogue
from nnc.codegen.kernels.gemm_lowering import matmul_case
from nnc.codegen.target import ARCHS


class T:  # the TensorInfo fields matmul_case reads
    def __init__(self, shape, dtype="f16"):
        from nnc.ir.types import DTYPES
        self.shape, self.dtype = tuple(shape), DTYPES[dtype]
        self.numel = 1
        for d in shape:
            self.numel *= d
        self.alias_of = None


def test_fold_of_a_linear_layer():
    pr = gemm.matmul_problem([32, 128, 768], [768, 3072], "float16")
    assert (pr.M, pr.nbatch) == (128, 32)
    f = gemm.fold_batch_into_rows(pr)
    assert (f.M, f.N, f.K, f.nbatch, f.stride_a, f.stride_d) == (4096, 3072, 768, 1, (0, 0), (0, 0))
    two = gemm.matmul_problem([4, 8, 16, 64], [64, 32], "float16")  # two batch dims merge into one level
    assert gemm.fold_batch_into_rows(two).M == 4 * 8 * 16


def test_no_fold_where_the_batch_matters():
    assert gemm.fold_batch_into_rows(gemm.matmul_problem([128, 768], [768, 64], "float16")) is None  # no batch
    assert gemm.fold_batch_into_rows(gemm.matmul_problem([12, 128, 64], [12, 64, 128], "float16")) is None  # B batched
    assert gemm.fold_batch_into_rows(gemm.matmul_problem([1, 128, 64], [12, 64, 128], "float16")) is None  # A broadcast
    assert gemm.fold_batch_into_rows(gemm.matmul_problem([8, 1, 128, 64], [12, 64, 32], "float16")) is None


def test_matmul_case_folds_unless_a_broadcast_residual_needs_the_batch():
    a, w, y = T([32, 128, 768]), T([768, 768]), T([32, 128, 768])
    pr, _ = matmul_case(a, w, y, NONE, False, ARCHS["sm_90a"])
    assert (pr.M, pr.nbatch) == (4096, 1)
    res = T([32, 128, 768])
    pr, bufs = matmul_case(a, w, y, Epilogue(residual=res), False, ARCHS["sm_90a"])
    assert (pr.M, pr.nbatch, pr.has_c, pr.ldc_m) == (4096, 1, True, 768) and bufs["C"] is res
    bcast = T([128, 768])  # one [M, N] matrix added to every batch: C strides need the batch level
    pr, _ = matmul_case(a, w, y, Epilogue(residual=bcast), False, ARCHS["sm_90a"])
    assert (pr.M, pr.nbatch, pr.stride_c) == (128, 32, (0, 0))
