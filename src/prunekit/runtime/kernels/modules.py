"""The layers that run a kernel: a Linear (or GPT-2 Conv1D) as W @ x^T, a Conv2d as im2col
followed by W @ patches. A convolution builds only the patch rows (input channel, kernel
offset) that some kept weight reads, so weights pruned in whole columns (1xN with N = the
output channels) skip most of im2col."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PruneError
from prunekit.layers import is_hf_conv1d, weight_matrix
from prunekit.runtime.kernels.base import make_kernel


class SparseLinear(nn.Module):
    """A Linear (or GPT-2 Conv1D) running W @ x^T through a sparse kernel."""

    def __init__(self, kernel, bias: torch.Tensor | None):
        super().__init__()
        self.kernel = kernel
        self.out_features, self.in_features = kernel.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if hasattr(self.kernel, "linear"):  # row-major in and out: no transposed copies
            y = self.kernel.linear(x.reshape(-1, self.in_features).contiguous())
        else:
            y = self.kernel.matmul(x.reshape(-1, self.in_features).t().contiguous()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, kernel={self.kernel.name}"


class SparseConv2d(nn.Module):
    """A Conv2d (groups=1, zero padding) as im2col followed by a sparse kernel.

    `taps` (sorted im2col row indices, c * kh * kw + i * kw + j) are the patch rows the
    kernel's weight columns stand for; the other rows have no kept weight and are never
    built: the rows needed are gathered straight from the input."""

    def __init__(self, kernel, conv: nn.Conv2d, taps: torch.Tensor | None = None):
        super().__init__()
        self.kernel = kernel
        self.out_channels = conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.taps = taps
        self._index: dict = {}  # (h, w) -> (gather index, padding mask)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(),
                                                                requires_grad=False)

    def _out_size(self, h: int, w: int) -> tuple[int, int]:
        return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in zip(
            (h, w), self.padding, self.dilation, self.kernel_size, self.stride))

    def _gather_index(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions in the flattened input (C * H * W) of every gathered element
        (T * ho * wo), and a 0/1 mask of those inside the input (None when all are): the
        zero padding is applied by the mask, never materialised."""
        if (h, w) not in self._index:
            (kh, kw), (ph, pw) = self.kernel_size, self.padding
            ho, wo = self._out_size(h, w)
            c, i, j = self.taps // (kh * kw), self.taps % (kh * kw) // kw, self.taps % kw
            rows = i[:, None] * self.dilation[0] + torch.arange(ho) * self.stride[0] - ph
            cols = j[:, None] * self.dilation[1] + torch.arange(wo) * self.stride[1] - pw
            inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None]
            idx = c[:, None, None] * h * w + rows.clamp(0, h - 1)[:, :, None] * w + \
                cols.clamp(0, w - 1)[:, None, :]
            mask = None if bool(inside.all()) else inside.reshape(-1, ho * wo).float()
            self._index[(h, w)] = (idx.reshape(-1), mask)
        return self._index[(h, w)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ho, wo = self._out_size(h, w)
        if self.taps is None:
            cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        else:
            idx, mask = self._gather_index(h, w)
            cols = x.reshape(b, -1).index_select(1, idx.to(x.device))
            cols = cols.view(b, self.taps.numel(), ho * wo)
            if mask is not None:
                cols = cols * mask.to(x.device, x.dtype)
        if hasattr(self.kernel, "matmul_batched"):  # (B, taps, L) -> (B, out, L)
            y = self.kernel.matmul_batched(cols)
        else:  # one (taps, B*L) product, and the result back to batch-major order: a
            # transposed output would slow every following op (batch norm 3x)
            xt = cols.transpose(0, 1).reshape(cols.shape[1], -1)
            y = self.kernel.matmul(xt).view(self.out_channels, b, ho * wo).transpose(0, 1)
            y = y.contiguous()
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1)
        return y.view(b, self.out_channels, ho, wo)

    def extra_repr(self) -> str:
        return f"{self.out_channels}, kernel_size={self.kernel_size}, kernel={self.kernel.name}"


def unsupported_reason(module: nn.Module) -> str | None:
    """Why no sparse kernel can replace `module` (the layer types the kernels' layers take),
    or None when they can."""
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups}) has no sparse kernel"
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return "convolution padding other than explicit zeros has no sparse kernel"
        return None
    return f"{type(module).__name__} has no sparse kernel"


def sparse_module(module: nn.Module, kind: str) -> nn.Module:
    """The replacement of `module` that runs its current weights through kernel `kind`."""
    why = unsupported_reason(module)
    if why:
        raise PruneError(why)
    w = weight_matrix(module).detach().float()
    if isinstance(module, nn.Conv2d):
        taps = torch.nonzero(w.any(dim=0)).flatten()
        if taps.numel() == w.shape[1]:  # every patch row is read: plain im2col
            return SparseConv2d(make_kernel(kind, w), module)
        if not taps.numel():
            taps = taps.new_zeros(1)  # an all-zero layer still needs one (zero) column
        return SparseConv2d(make_kernel(kind, w[:, taps].contiguous()), module, taps)
    return SparseLinear(make_kernel(kind, w), module.bias)
