"""Sparse matrix kernels for inference and the layers that use them.

Every kernel computes W @ X for a fixed sparse W (out, in) and a dense X (in, n): a linear
layer passes its input rows transposed, a convolution its im2col patches. A convolution
builds only the patch rows (input channel, kernel offset) that some kept weight reads, so
weights pruned in whole columns (1xN with N = the output channels) skip most of im2col.
Kernels:

- "dense": the layer as it was (PyTorch's own GEMM / convolution).
- "csr": torch.sparse CSR times dense (MKL sparse BLAS where PyTorch has it).
- "block": a 1xN kernel. N consecutive output rows share their kept input columns, so each
  block row is a small dense matrix on a gathered slice of X; all block rows run as one
  batched matmul (rows with fewer kept columns are padded with zero weights).
- "2:4": PyTorch's semi-structured sparse tensors, on a CUDA GPU with compute capability 8.0+.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PruneError

# bumped when a kernel's speed changes: cached latency tables are then measured again
VERSION = 5

KERNELS = ("dense", "csr", "block", "2:4")


class CSRWeight:
    """W stored as torch.sparse_csr; matmul(xt) = W @ xt."""

    name = "csr"

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


def block_size_of(mask: torch.Tensor, sizes=(32, 16, 8, 4, 2)) -> int:
    """The largest N in `sizes` for which `mask` (out, in) is 1xN-structured, or 1."""
    rows = mask.shape[0]
    for n in sizes:
        if rows % n == 0 and rows > n:
            blocks = mask.reshape(rows // n, n, -1)
            if bool((blocks == blocks[:, :1]).all()):
                return n
    return 1


class _BlockGroup:
    """Block rows with about the same number of kept columns, padded to the largest."""

    def __init__(self, wb: torch.Tensor, blocks: torch.Tensor, counts: torch.Tensor,
                 sel: torch.Tensor, n: int, natural: bool):
        k = int(counts[sel].max())
        order = torch.argsort((~blocks[sel]).to(torch.int8), dim=1, stable=True)[:, :k]
        valid = torch.arange(k).unsqueeze(0) < counts[sel].unsqueeze(1)
        self.nb, self.k = len(sel), k
        self.index = torch.where(valid, order, torch.zeros_like(order)).reshape(-1)
        vals = torch.gather(wb[sel], 2, order.unsqueeze(1).expand(len(sel), n, k))
        self.values = (vals * valid.unsqueeze(1)).contiguous()  # (nb, N, k)
        self.values_t = self.values.transpose(1, 2).contiguous()  # (nb, k, N)
        # the output rows it writes; None: all of them, in order
        self.rows = None if natural else (sel.unsqueeze(1) * n + torch.arange(n)).reshape(-1)


class BlockWeight:
    """A 1xN-structured W as per-block-row gathered columns and dense (N, k) values.

    Block rows are grouped by their number of kept columns (within a factor of 2), and each
    group is padded only to its own largest count: methods such as SparseGPT keep 10x more
    in some block rows than the mean, and one padding for all would do that much more work.
    Block rows with nothing kept are skipped (their outputs are zero)."""

    name = "block"

    def __init__(self, w: torch.Tensor, n: int | None = None):
        w = w.detach()
        out, cols = w.shape
        self.shape = (out, cols)
        keep = w != 0
        self.n = n or block_size_of(keep)
        if out % self.n:
            raise PruneError(f"1x{self.n} kernel needs the output size to be a multiple of "
                             f"{self.n}, got {out}")
        nb = out // self.n
        blocks = keep.reshape(nb, self.n, cols).any(dim=1)  # (nb, in)
        counts = blocks.sum(dim=1)
        # no block row drops a column (a convolution's gathered taps often): a plain GEMM
        self.full = w.contiguous() if bool((counts == cols).all()) else None
        bucket = torch.where(counts > 0, torch.ceil(torch.log2(counts.clamp(min=1).float())),
                             torch.full_like(counts, -1, dtype=torch.float32))
        wb = w.reshape(nb, self.n, cols)
        kinds = [b for b in bucket.unique().tolist() if b >= 0]
        self.covers_all = bool((counts > 0).all())  # no block row is empty
        self.groups = [_BlockGroup(wb, blocks, counts, torch.nonzero(bucket == b).flatten(),
                                   self.n, natural=len(kinds) == 1 and self.covers_all)
                       for b in kinds]

    def _out(self, like: torch.Tensor, shape) -> torch.Tensor:
        return like.new_empty(shape) if self.covers_all else like.new_zeros(shape)

    def matmul(self, xt: torch.Tensor) -> torch.Tensor:
        if self.full is not None:
            return self.full @ xt
        t = xt.shape[1]
        y = None
        for g in self.groups:
            yg = torch.bmm(g.values, xt.index_select(0, g.index).view(g.nb, g.k, t))
            if g.rows is None:
                return yg.view(self.shape[0], t)
            y = self._out(xt, (self.shape[0], t)) if y is None else y
            y.index_copy_(0, g.rows, yg.view(-1, t))
        return self._out(xt, (self.shape[0], t)) if y is None else y

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T for a row-major x of shape (T, in), as (T, out).

        Under 16 rows the columns are gathered in place (no transposes). Otherwise 128 rows
        at a time go through matmul: transposed, the gather copies contiguous rows, and one
        chunk's gathered rows stay in cache (all rows at once stream several copies of the
        activations through memory: 1.2x instead of 2.8x over dense at 2,368 rows)."""
        if self.full is not None:
            return x @ self.full.t()
        t = x.shape[0]
        if t >= 16:
            y = x.new_empty(t, self.shape[0])
            for s in range(0, t, 128):
                y[s:s + 128].t().copy_(self.matmul(x[s:s + 128].t().contiguous()))
            return y
        y = self._out(x, (t, self.shape[0]))
        for g in self.groups:
            gx = x.index_select(1, g.index).view(t, g.nb, g.k).transpose(0, 1)
            yg = torch.bmm(gx, g.values_t).transpose(0, 1).reshape(t, -1)
            if g.rows is None:
                return yg
            y.index_copy_(1, g.rows, yg)
        return y

    def matmul_batched(self, x: torch.Tensor) -> torch.Tensor:
        """W @ x[b] for x of shape (B, in, L), as (B, out, L): a convolution's patches need
        no transposing in or out."""
        if self.full is not None:
            return torch.matmul(self.full, x)
        b, _, n = x.shape
        y = self._out(x, (b, self.shape[0], n))
        for g in self.groups:
            yg = torch.matmul(g.values, x.index_select(1, g.index).view(b, g.nb, g.k, n))
            if g.rows is None:
                return yg.view(b, self.shape[0], n)
            y.index_copy_(1, g.rows, yg.view(b, -1, n))
        return y

    def nbytes(self) -> int:
        return sum(g.values.numel() * g.values.element_size() + g.index.numel() * 8
                   + (0 if g.rows is None else g.rows.numel() * 8) for g in self.groups)



class SemiStructuredWeight:
    """2:4 weights through torch.sparse.to_sparse_semi_structured (CUDA, sm80+ only)."""

    name = "2:4"

    def __init__(self, w: torch.Tensor):
        why = semi_structured_unavailable(w)
        if why:
            raise PruneError(why)
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
        return "2:4 kernel needs a CUDA GPU (none available): kept dense"
    if torch.cuda.get_device_capability()[0] < 8:
        return "2:4 kernel needs a GPU with compute capability 8.0+: kept dense"
    out, cols = w.shape
    if out % 32 or cols % 64:
        return f"2:4 kernel needs rows % 32 == 0 and columns % 64 == 0, got {out}x{cols}"
    groups = (w != 0).reshape(out, cols // 4, 4).sum(dim=2)
    if bool((groups > 2).any()):
        return "weights are not 2:4 sparse: kept dense"
    return None


def make_kernel(kind: str, w: torch.Tensor):
    """A kernel object for a (out, in) float weight; raises PruneError when it cannot serve."""
    if kind == "csr":
        return CSRWeight(w)
    if kind == "block":
        n = block_size_of(w != 0)
        if n == 1:
            raise PruneError("weights are not 1xN-structured for any N in 2..32: kept dense")
        return BlockWeight(w, n)
    if kind == "2:4":
        return SemiStructuredWeight(w)
    raise PruneError(f"unknown kernel {kind!r}; choose from {', '.join(KERNELS)}")


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
    """Why a sparse kernel cannot replace `module`, or None when it can."""
    from prunekit.layers import is_hf_conv1d

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
    from prunekit.layers import weight_matrix

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
