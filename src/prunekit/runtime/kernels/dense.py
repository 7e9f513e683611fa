"""The dense kernel: W @ X with PyTorch's own GEMM. In convert, "dense" is the layer as it
was; this class serves the same product inside a sparse layer (and is the simplest example
of a kernel)."""

from __future__ import annotations

import torch

from prunekit.runtime.kernels.base import KERNELS


@KERNELS.register("dense", device="any", serves="every weight (the layer as it was)",
                  pattern="unstructured",
                  summary="the layer as it was (PyTorch's own GEMM)")
class DenseWeight:
    """W stored dense; matmul(xt) = W @ xt."""

    name = "dense"

    @staticmethod
    def unavailable(w: torch.Tensor) -> str | None:
        return None

    def __init__(self, w: torch.Tensor):
        self.shape = tuple(w.shape)
        self.w = w.detach().contiguous()

    def matmul(self, xt: torch.Tensor) -> torch.Tensor:
        return self.w @ xt

    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size()
