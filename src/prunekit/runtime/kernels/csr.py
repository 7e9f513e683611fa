"""The CSR kernel: torch.sparse CSR times dense (MKL sparse BLAS where PyTorch has it)."""

from __future__ import annotations

import warnings

import torch

from prunekit.runtime.kernels.base import KERNELS


@KERNELS.register("csr", device="any", serves="any zero pattern", pattern="unstructured",
                  summary="torch.sparse CSR times dense, for any zero pattern")
class CSRWeight:
    """W stored as torch.sparse_csr; matmul(xt) = W @ xt."""

    name = "csr"

    @staticmethod
    def unavailable(w: torch.Tensor) -> str | None:
        return None

    def __init__(self, w: torch.Tensor):
        self.shape = tuple(w.shape)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            self.w = w.detach().contiguous().to_sparse_csr()

    def matmul(self, xt: torch.Tensor) -> torch.Tensor:
        return self.w @ xt

    def nbytes(self) -> int:
        w = self.w
        return sum(t.numel() * t.element_size()
                   for t in (w.crow_indices(), w.col_indices(), w.values()))
