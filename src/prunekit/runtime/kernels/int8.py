"""The int8 weight-only kernel: torch's `aten._weight_int8pack_mm` (an int8 weight, one scale
per output channel, times bfloat16 activations), for layers quantized per output channel.

It serves every per-channel grid of 2 to 8 bits, symmetric or asymmetric: a code c on a
grid with zero point z and center o = 2^(bits-1) is stored as the int8 value c - o, so

    x @ W^T = s * (x @ (c - o)^T + (o - z) * sum(x))

where the second term (a row sum of x times one number per output) is added only for an
asymmetric grid, and the scales s are applied in float32 after the product, so they stay
exact. PyTorch's CPU kernel is vectorized for bfloat16 activations only (float32 ones run
about 20x slower than a float32 GEMM here), so activations go in as bfloat16 and the
output comes back in it before the float32 scaling: the result is the dequantized layer's
within bfloat16 rounding (rtol 1e-2 of the largest output). It pays at batch 1 and a few
rows (decode), where the weight's bytes dominate; at hundreds of rows a float32 GEMM wins, so
from DENSE_FROM_ROWS rows on (prefill) the layer dequantizes its int8 values and runs that
GEMM: one converted model serves decode and prefill.
"""

from __future__ import annotations

import torch

from prunekit.runtime.kernels.base import KERNELS, quantized_unavailable

#: from this many rows on, dequantize and run a float32 GEMM (the kernel is about 40x slower
#: than a float32 GEMM at 512 rows on SmolLM2's layers; see the int4 kernel's measurement)
DENSE_FROM_ROWS = 384


@KERNELS.register("int8", device="cpu", quantized=True, grid="int8:asym",
                  serves="quantized layers on a per-channel grid of 2..8 bits (symmetric or "
                         "asymmetric)", pattern="unstructured", rtol=1e-2,
                  summary="torch's int8 weight-only GEMM (_weight_int8pack_mm), bf16 "
                          "activations, per-channel grids")
class Int8Weight:
    """Codes as int8 (c - 2^(bits-1)), float32 scales per output channel."""

    name = "int8"

    @staticmethod
    def unavailable(w: torch.Tensor, quant=None) -> str | None:
        why = quantized_unavailable(w, quant)
        if why:
            return why
        grid = quant.grid
        if grid.group(w.shape[1]) != w.shape[1]:
            return (f"serves per-channel grids only, not {grid.spec} (groups of "
                    f"{grid.group_size}); the int4 kernel serves 4-bit groups of 32k")
        if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            return f"this PyTorch ({torch.__version__}) has no aten._weight_int8pack_mm"
        return None

    def __init__(self, w: torch.Tensor, quant):
        self.shape = tuple(quant.shape)
        center = 2 ** (quant.grid.bits - 1)
        self.q = (quant.codes.to(torch.int16) - center).to(torch.int8).contiguous()
        self.scale = quant.scales[:, 0].float().contiguous()  # (out,)
        self.ones = torch.ones(self.shape[0], dtype=torch.bfloat16)
        offset = center - quant.zeros[:, 0].float()  # (out,): 0 on a symmetric grid
        self.offset = offset if bool((offset != 0).any()) else None

    def dequantized(self) -> torch.Tensor:
        """The (out, in) float32 weight: exactly the dequantized layer's."""
        w = self.q.float()
        if self.offset is not None:
            w += self.offset.unsqueeze(1)
        return w.mul_(self.scale.unsqueeze(1))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T for a row-major x (T, in), as (T, out) in x's dtype."""
        if x.shape[0] >= DENSE_FROM_ROWS:
            return torch.nn.functional.linear(x, self.dequantized().to(x.dtype))
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.ones).float()
        if self.offset is not None:
            y = y + x.float().sum(dim=1, keepdim=True) * self.offset
        return (y * self.scale).to(x.dtype)

    def matmul(self, xt: torch.Tensor) -> torch.Tensor:
        return self.linear(xt.t().contiguous()).t()

    def nbytes(self) -> int:
        extra = 0 if self.offset is None else self.offset.numel() * 4
        return self.q.numel() + self.scale.numel() * 4 + extra
