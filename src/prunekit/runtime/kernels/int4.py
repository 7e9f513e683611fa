"""The int4 weight-only kernel: torch's `aten._weight_int4pack_mm_for_cpu` (4-bit codes
packed two to a byte by `aten._convert_weight_to_int4pack_for_cpu`, a bfloat16 scale and
offset per group of 32, 64, 128 or 256 inputs), for layers quantized to at most 4 bits.

The kernel computes W[r, k] = (k4 - 8) * scale + offset for each group; a prunekit grid's
(c - z) * s is that with k4 = c + 8 - o (o = 2^(bits-1): the codes centered in the 4-bit
range) and offset = (o - z) * s (0 on a symmetric grid), so it serves every grid of 2 to 4 bits,
symmetric or asymmetric, whose group size (the input size, per output channel) is a multiple
of 32: the kernel's groups are the largest of 256, 128, 64, 32 that divide it, each taking its
prunekit group's scale. Per output channel the kernel runs with scale 1 and offset o - z
(exact in bfloat16) and the float32 scales are applied to its output, so they stay exact; in
groups, scales and offsets go in as bfloat16 (relative rounding 2^-9). Activations go in as
bfloat16 too (the kernel's only vectorized path on this CPU): the result is the dequantized
layer's within bfloat16 rounding (rtol 1e-2 of the largest output). A weight pruned in the
same pass (its code is the zero point) is exactly 0 on a symmetric grid and within rounding of
0 on an asymmetric grouped one. Like the int8 kernel it pays at a few rows (decode); at
hundreds of rows a float32 GEMM wins: from DENSE_FROM_ROWS rows on (prefill) the layer
dequantizes its codes (kept a second time, two to a byte in plain order, since the kernel's
packed layout is its own) and runs that GEMM, so one converted model serves decode and
prefill.
"""

from __future__ import annotations

import torch

from prunekit.runtime.kernels.base import KERNELS, quantized_unavailable

#: the group sizes the kernel takes, largest first
KERNEL_GROUPS = (256, 128, 64, 32)

#: from this many rows on, dequantize and run a float32 GEMM: on a 1536x576 SmolLM2 layer
#: (1 thread, loaded machine) the kernel took 1.5 ms at 48 rows against 24 ms to dequantize
#: and multiply, 23 ms against 27 ms at 256 rows and 48 ms against 32 ms at 512
DENSE_FROM_ROWS = 384


def kernel_group(group: int) -> int | None:
    """The kernel group size for a prunekit group of `group` inputs, or None."""
    return next((g for g in KERNEL_GROUPS if group % g == 0), None)


@KERNELS.register("int4", device="cpu", quantized=True, grid="int4:g32:asym",
                  serves="quantized layers of 2..4 bits (symmetric or asymmetric) in groups "
                         "of a multiple of 32 inputs, or per channel with in % 32 == 0",
                  pattern="unstructured", rtol=1e-2,
                  summary="torch's int4 weight-only GEMM (_weight_int4pack_mm_for_cpu), bf16 "
                          "activations, groups of 32k")
class Int4Weight:
    """Codes packed two to a byte in the kernel's layout; bfloat16 (scale, offset) pairs."""

    name = "int4"

    @staticmethod
    def unavailable(w: torch.Tensor, quant=None) -> str | None:
        why = quantized_unavailable(w, quant)
        if why:
            return why
        grid, cols = quant.grid, w.shape[1]
        if grid.bits > 4:
            return f"serves grids of at most 4 bits, not {grid.spec}"
        if kernel_group(grid.group(cols)) is None:
            what = "per-channel groups" if grid.group_size is None else "groups"
            return (f"needs {what} of a multiple of 32 inputs, got {grid.group(cols)} "
                    f"({grid.spec} on {cols} inputs)")
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return f"this PyTorch ({torch.__version__}) has no aten._weight_int4pack_mm_for_cpu"
        return None

    def __init__(self, w: torch.Tensor, quant):
        out, cols = self.shape = tuple(quant.shape)
        grid = quant.grid
        group = grid.group(cols)
        self.group = kernel_group(group)
        # b-bit codes centered in the 4-bit range: c + 8 - o with o = 2^(b-1), so the
        # offset (o - z) * s is small (0 on a symmetric grid) and rounds little
        center = 2 ** (grid.bits - 1)
        codes = (quant.codes.to(torch.int32) + (8 - center)).contiguous()
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        c = quant.codes if cols % 2 == 0 else torch.nn.functional.pad(quant.codes, (0, 1))
        self.nibbles = (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()  # plain order
        self.grid_scales, self.grid_zeros = quant.scales.float(), quant.zeros.float()
        reps = group // self.group
        zeros = quant.zeros.float()
        if grid.group_size is None or group == cols:  # per channel: scales after the product
            scale = torch.ones_like(zeros)
            offset = center - zeros
            self.post = quant.scales[:, 0].float().contiguous()
        else:
            scale = quant.scales.float()
            offset = (center - zeros) * scale
            self.post = None
        pairs = torch.stack([scale.repeat_interleave(reps, dim=1),
                             offset.repeat_interleave(reps, dim=1)], dim=2)  # (out, G, 2)
        self.scale_offset = pairs.transpose(0, 1).contiguous().to(torch.bfloat16)  # (G, out, 2)

    def dequantized(self) -> torch.Tensor:
        """The (out, in) float32 weight, from the plain-order codes: exactly the dequantized
        layer's (its float32 scales, not the kernel's bfloat16 ones)."""
        out, cols = self.shape
        codes = torch.stack([self.nibbles & 15, self.nibbles >> 4], dim=2).view(out, -1)
        g = cols // self.grid_scales.shape[1]
        w = codes[:, :cols].float().view(out, -1, g).sub_(self.grid_zeros.unsqueeze(2))
        return w.mul_(self.grid_scales.unsqueeze(2)).view(out, cols)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T for a row-major x (T, in), as (T, out) in x's dtype."""
        if x.shape[0] >= DENSE_FROM_ROWS:
            return torch.nn.functional.linear(x, self.dequantized().to(x.dtype))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), self.packed, self.group, self.scale_offset)
        if self.post is not None:
            return (y.float() * self.post).to(x.dtype)
        return y.to(x.dtype)

    def matmul(self, xt: torch.Tensor) -> torch.Tensor:
        return self.linear(xt.t().contiguous()).t()

    def nbytes(self) -> int:
        post = 0 if self.post is None else self.post.numel() * 4
        return (self.packed.numel() + self.nibbles.numel() + self.scale_offset.numel() * 2
                + post + self.grid_scales.numel() * 5)
