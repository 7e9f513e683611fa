"""The 2:4 kernel: PyTorch's semi-structured sparse tensors, on a CUDA GPU with compute
capability 8.0+ (fp16, so its outputs are compared with a looser tolerance)."""

from __future__ import annotations

import torch

from prunekit.errors import PruneError
from prunekit.runtime.kernels.base import KERNELS


@KERNELS.register("2:4", device="cuda", serves="2:4-sparse weights, rows % 32 == 0 and "
                  "columns % 64 == 0", pattern="2:4", rtol=1e-4 + 1e-2,
                  summary="PyTorch's semi-structured 2:4 tensors (CUDA, sm80+)")
class SemiStructuredWeight:
    """2:4 weights through torch.sparse.to_sparse_semi_structured (CUDA, sm80+ only)."""

    name = "2:4"

    @staticmethod
    def unavailable(w: torch.Tensor) -> str | None:
        return semi_structured_unavailable(w)

    def __init__(self, w: torch.Tensor):
        why = semi_structured_unavailable(w)
        if why:
            raise PruneError(f"2:4 kernel: {why}")
        from torch.sparse import to_sparse_semi_structured

        self.shape = tuple(w.shape)
        self.w = to_sparse_semi_structured(w.detach().half().cuda())

    def matmul(self, xt: torch.Tensor) -> torch.Tensor:
        return (self.w @ xt.to(self.w.device, torch.half)).to(xt.device, xt.dtype)

    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1]  # half the fp16 values plus metadata, roughly


def semi_structured_unavailable(w: torch.Tensor) -> str | None:
    """Why 2:4 semi-structured sparsity cannot serve `w` here, or None when it can."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (none available)"
    if torch.cuda.get_device_capability()[0] < 8:
        return "needs a GPU with compute capability 8.0+"
    out, cols = w.shape
    if out % 32 or cols % 64:
        return f"needs rows % 32 == 0 and columns % 64 == 0, got {out}x{cols}"
    groups = (w != 0).reshape(out, cols // 4, 4).sum(dim=2)
    if bool((groups > 2).any()):
        return "weights are not 2:4 sparse"
    return None
