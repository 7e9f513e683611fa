"""The 1xN block kernel. N consecutive output rows share their kept input columns, so each
block row is a small dense matrix on a gathered slice of X; all block rows run as one batched
matmul (rows with fewer kept columns are padded with zero weights)."""

from __future__ import annotations

import torch

from prunekit.errors import PruneError
from prunekit.runtime.kernels.base import KERNELS


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


@KERNELS.register("block", device="any", serves="1xN-structured weights (N in 2..32)",
                  pattern="1x4",
                  summary="1xN blocks as one batched matmul on gathered columns")
class BlockWeight:
    """A 1xN-structured W as per-block-row gathered columns and dense (N, k) values.

    Block rows are grouped by their number of kept columns (within a factor of 2), and each
    group is padded only to its own largest count: methods such as SparseGPT keep 10x more
    in some block rows than the mean, and one padding for all would do that much more work.
    Block rows with nothing kept are skipped (their outputs are zero)."""

    name = "block"

    @staticmethod
    def unavailable(w: torch.Tensor) -> str | None:
        if block_size_of(w != 0) == 1:
            return "weights are not 1xN-structured for any N in 2..32"
        return None

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
