"""SparseGPT (Frantar and Alistarh 2023): one-shot OBS reconstruction, column by column.

Columns are visited left to right. Each pruned weight's error is spread onto the columns not
yet visited through the upper Cholesky factor U of H^-1 (U^T U = H^-1). Masks are chosen per
block of `blocksize` columns (unstructured, 1xN) or per group of M columns (N:M) from
w^2 / U_jj^2, with the weights as already updated.

Speed on a CPU: the matrix is kept transposed so a column is contiguous; updates are lazy at
two levels (a sub-block of columns, then the block, then the rest of the matrix as one
matrix product); U comes from one Cholesky factorisation and one triangular inverse of the
reversed H, instead of Cholesky, inverse and Cholesky again.

With `quant` (a grid), the kept weights of each column go to the grid as the sweep reaches
them and their rounding error is spread like a pruned weight's (the paper's joint
sparsification and quantization; prunekit.quant.joint). With nothing pruned this sweep is
GPTQ, which prunekit.quant.methods.gptq runs through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from prunekit.config import positive
from prunekit.oneshot.hessian import damped_hessian, inverse_cholesky_upper
from prunekit.oneshot.methods.base import PruneConfig, register
from prunekit.patterns import NM, Block1xN, Unstructured
from prunekit.quant.grid import ColumnQuantizer, Grid
from prunekit.quant.joint import JointQuantization


def _block_counts(rows: int, sparsity: float, i1: int, i2: int) -> int:
    """Entries to prune in columns [i1, i2) so that the layer total is exactly round(s*n)."""
    return int(round(sparsity * rows * i2)) - int(round(sparsity * rows * i1))


def _prune_from(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k smallest scores (True = prune)."""
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(scores.reshape(-1), k, largest=False, sorted=False).indices
        pruned.view(-1)[idx] = True
    return pruned


def sparsegpt_matrix(w: torch.Tensor, u: torch.Tensor, pattern, sparsity: float,
                     blocksize: int = 128, inner: int = 16,
                     quant: ColumnQuantizer | None = None):
    """Prune (rows, cols) w with U = upper Cholesky of H^-1; returns (new w, keep-mask).

    pattern None prunes nothing. quant: each column's kept weights go to its grid as the sweep
    reaches them (pruned ones to 0, which every grid holds); its codes are in `quant`."""
    rows, cols = w.shape
    m = pattern.m if isinstance(pattern, NM) else 1
    inner = max(m, (inner // m) * m)
    blocksize = max(inner, (blocksize // inner) * inner)
    wt = w.t().contiguous()  # (cols, rows): column j of w is the contiguous row wt[j]
    pruned = torch.zeros_like(wt, dtype=torch.bool)
    diag = torch.diagonal(u)
    nm = isinstance(pattern, NM)
    inf = torch.tensor(float("inf"), dtype=w.dtype)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        blk, u1, d1 = wt[i1:i2], u[i1:i2, i1:i2], diag[i1:i2]
        pblk = pruned[i1:i2]
        if quant is not None:
            quant.fit_block(i1, i2, wt)
        if pattern is not None and not isinstance(pattern, NM):
            scores = blk.square() / d1.square().unsqueeze(1)
            if isinstance(pattern, Block1xN):
                bs = scores.reshape(i2 - i1, rows // pattern.n, pattern.n).sum(dim=2)
                k = _block_counts(rows // pattern.n, sparsity, i1, i2)
                pblk.copy_(_prune_from(bs, k).repeat_interleave(pattern.n, dim=1))
            elif pattern.per == "row":
                k = _block_counts(1, sparsity, i1, i2)
                if k:
                    idx = torch.topk(scores, k, dim=0, largest=False, sorted=False).indices
                    pblk.scatter_(0, idx, True)
            else:
                pblk.copy_(_prune_from(scores, _block_counts(rows, sparsity, i1, i2)))
        errs = torch.empty_like(blk)
        # err = w / d where pruned, w / inf = 0 where kept: one division per column
        div = None if quant is not None or nm else torch.where(pblk, d1.unsqueeze(1), inf)
        for j1 in range(0, i2 - i1, inner):
            j2 = min(j1 + inner, i2 - i1)
            for j in range(j1, j2):
                if nm and j % m == 0:
                    g = blk[j:j + m].square() / d1[j:j + m].square().unsqueeze(1)
                    idx = torch.topk(g, m - pattern.n, dim=0, largest=False, sorted=False).indices
                    pblk[j:j + m].scatter_(0, idx, True)
                    if quant is None:
                        div = torch.where(pblk[j:j + m], d1[j:j + m].unsqueeze(1), inf)
                err = errs[j]
                if quant is None:
                    torch.div(blk[j], div[j % m if nm else j], out=err)
                else:
                    kept = blk[j] if pattern is None else blk[j].masked_fill(pblk[j], 0.0)
                    new = quant(i1 + j, kept)
                    torch.sub(blk[j], new, out=err)
                    err.div_(d1[j])
                blk[j:j2].addr_(u1[j, j:j2], err, alpha=-1.0)
                if quant is not None:
                    blk[j].copy_(new)  # exactly on the grid
            if j2 < i2 - i1:
                blk[j2:].addmm_(u1[j1:j2, j2:].t(), errs[j1:j2], alpha=-1.0)
        if i2 < cols:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), errs, alpha=-1.0)
    wt.masked_fill_(pruned, 0.0)
    return wt.t().contiguous(), ~pruned.t().contiguous()


@register
@dataclass(frozen=True)
class SparseGPT(JointQuantization, PruneConfig):
    """Hessian-based reconstruction with lazy block updates (unstructured, N:M, 1xN).

    quant: a grid (prunekit.quant.Grid or text such as 'int4:g128') to prune and quantize in
    one pass: kept weights end on the grid, pruned ones at exactly 0.
    """

    blocksize: int = 128
    dampening: float = 0.01
    #: "mean": dampening x the mean diagonal of H (published); "input": x each input's own
    #: H_ii (prunekit.oneshot.hessian.damped_hessian says why)
    dampening_rule: Literal["mean", "input"] = "mean"
    quant: Grid | str | None = None

    name = "sparsegpt"
    needs = "hessian"
    patterns = (Unstructured, NM, Block1xN)
    promises = ("beats_magnitude",)
    example = "SparseGPT(sparsity=0.5, pattern='2:4')"

    def check(self):
        super().check()
        positive(self, "blocksize")
        positive(self, "dampening", strict=False)

    def prune_matrix(self, w, hessian, pattern, sparsity, layer):
        w = w.clone()
        h = damped_hessian(hessian, w, self.dampening, layer, torch.float32,
                           rule=self.dampening_rule)
        u = inverse_cholesky_upper(h, layer, self.dampening)
        return sparsegpt_matrix(w, u, pattern, sparsity, self.blocksize)

    def prune_quantize(self, w, hessian, pattern, sparsity, layer, grid):
        """The grid is fitted on the layer as pruning alone leaves it: pruning compensates
        the kept weights and widens their range, so a grid fitted on the starting weights
        clips them (at 50% per row, 8 bits per channel lost 1.6% output error to it)."""
        w = w.clone()
        h = damped_hessian(hessian, w, self.dampening, layer, torch.float32,
                           rule=self.dampening_rule)
        u = inverse_cholesky_upper(h, layer, self.dampening)
        pruned, _ = sparsegpt_matrix(w.clone(), u, pattern, sparsity, self.blocksize)
        quant = ColumnQuantizer(grid, pruned, layer, static=True)
        _, keep = sparsegpt_matrix(w, u, pattern, sparsity, self.blocksize, quant=quant)
        return quant.result(keep)
