"""Exact Optimal Brain Surgeon, row by row (Optimal Brain Compression, Frantar et al. 2022).

Each output row is independent given H. For a row, repeat: remove the weight p with the
smallest loss w_p^2 / [H^-1]_pp, update the others by the exact OBS step
w -= w_p / [H^-1]_pp * H^-1[:, p], and downdate H^-1 to the inverse without p.

Instead of rewriting a d x d inverse per row and step (OBC's GPU-friendly form), we keep the
downdate as rank-one factors: H^-1 after t removals is H0^-1 - sum_s c_s c_s^T, so one step
costs O(d t) rather than O(d^2). Many rows are processed together as a batch.

Unstructured (per layer): every row runs its greedy path up to `row_cap` times the target
sparsity and records the loss of each removal; the layer's removals are then the smallest
losses across rows, and each row's kept weights are solved for directly on its support
(the point the exact greedy steps reach). N:M and per-row unstructured
need one pass.

With `quant` (a grid), the kept weights are then quantized greedily by the same exact steps,
starting from the pruned state (OBQ, prunekit.quant.methods.obq: OBC's joint path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from prunekit.config import positive
from prunekit.errors import PruneError
from prunekit.oneshot.hessian import cholesky_lower, damped_hessian
from prunekit.oneshot.methods.base import PruneConfig, register
from prunekit.patterns import NM, Unstructured
from prunekit.quant.grid import Grid
from prunekit.quant.joint import JointQuantization


def obs_step(x: torch.Tensor, hinv: torch.Tensor, factors: torch.Tensor, coef: torch.Tensor,
             diag: torch.Tensor, p: torch.Tensor, t: int, active: torch.Tensor,
             target: torch.Tensor | None = None) -> None:
    """One exact OBS step on a batch of rows x (b, d), in place. The inverse Hessian after t
    steps is held as H0^-1 - sum_{s<t} c_s c_s^T (factors[:, s] = c_s; coef is (b, 1, >= t)
    scratch). Weight p[i] of each active row i moves to target[i] (0 when None) and the row's
    other weights take the optimal compensation; c_t is stored and the diagonal `diag` of the
    inverse downdated. The moved weight itself is left for the caller to set exactly."""
    ar = torch.arange(x.shape[0])
    col = hinv[p]  # row p of the current inverse = column p (symmetric)
    if t:
        coef[:, 0, :t] = factors[ar, :t, p]
        col.sub_(torch.bmm(coef[:, :, :t], factors[:, :t]).squeeze(1))
    hpp = torch.where(active, col[ar, p], 1.0).clamp_min(torch.finfo(x.dtype).tiny)
    moved = x[ar, p] if target is None else x[ar, p] - target
    step = torch.where(active, moved / hpp, 0.0)
    x.sub_(step.unsqueeze(1) * col)
    c = col * (active / hpp.sqrt()).unsqueeze(1)
    factors[:, t] = c
    diag.sub_(c.square())


def greedy_obs(w: torch.Tensor, hinv: torch.Tensor, counts: torch.Tensor, nm: NM | None = None,
               batch: int = 32):
    """Greedy exact OBS on each row of w (rows, d), removing counts[r] weights from row r.

    Returns the updated rows, the bool mask of removed weights, the loss
    w_p^2 / (2 [H^-1]_pp) of each removal (rows, max count; +inf padded) and the removed
    indices in removal order.
    """
    rows, d = w.shape
    kmax = int(counts.max()) if rows else 0
    out = w.clone()
    pruned = torch.zeros((rows, d), dtype=torch.bool)
    losses = torch.full((rows, kmax), math.inf, dtype=w.dtype)
    order = torch.zeros((rows, kmax), dtype=torch.long)
    diag0 = torch.diagonal(hinv)
    for r1 in range(0, rows, batch):
        r2 = min(r1 + batch, rows)
        b = r2 - r1
        ar = torch.arange(b)
        x = out[r1:r2]
        cnt = counts[r1:r2]
        k = int(cnt.max())
        if k == 0:
            continue
        diag = diag0.expand(b, d).clone()
        factors = torch.empty((b, k, d), dtype=w.dtype)
        coef = torch.empty((b, 1, k), dtype=w.dtype)
        removed = torch.zeros((b, d), dtype=torch.bool)
        if nm is not None:
            group_left = torch.full((b, d // nm.m), nm.m - nm.n)
        for t in range(k):
            scores = x.square() / diag
            scores.masked_fill_(removed, math.inf)
            if nm is not None:
                scores.masked_fill_((group_left == 0).repeat_interleave(nm.m, dim=1), math.inf)
            p = torch.argmin(scores, dim=1)
            best = scores[ar, p]
            active = (cnt > t) & torch.isfinite(best)  # rows done, or with nothing left
            losses[r1:r2, t] = torch.where(active, best / 2, math.inf)
            order[r1:r2, t] = p
            obs_step(x, hinv, factors, coef, diag, p, t, active)
            x[ar[active], p[active]] = 0.0
            removed[ar[active], p[active]] = True
            diag.masked_fill_(removed, 1.0)
            if nm is not None:
                group_left[ar[active], p[active] // nm.m] -= 1
        x.masked_fill_(removed, 0.0)
        pruned[r1:r2] = removed
    return out, pruned, losses, order


def _global_counts(losses: torch.Tensor, total: int) -> torch.Tensor:
    """Per-row removal counts taking the `total` smallest recorded losses of the layer."""
    rows, kmax = losses.shape
    cum = torch.cummax(losses, dim=1).values  # a row's later removal never counts as cheaper
    picked = torch.zeros(rows * kmax, dtype=torch.bool)
    picked[torch.topk(cum.reshape(-1), total, largest=False).indices] = True
    return picked.view(rows, kmax).sum(dim=1)


@register
@dataclass(frozen=True)
class OBS(JointQuantization, PruneConfig):
    """Exact greedy OBS per row with exact inverse-Hessian downdates (unstructured and N:M).

    Runs in float64: the rank-one downdates lose too much in float32 at high sparsity.
    row_cap: in per-layer unstructured mode, no row is pruned beyond row_cap * sparsity.
    quant: a grid (prunekit.quant.Grid or text such as 'int4') to prune and quantize in one
    pass (OBQ on the kept weights after pruning).
    """

    dampening: float = 0.01
    #: "mean": dampening x the mean diagonal of H (published); "input": x each input's own
    #: H_ii (prunekit.oneshot.hessian.damped_hessian says why)
    dampening_rule: Literal["mean", "input"] = "mean"
    row_cap: float = 1.5
    batch: int = 32
    quant: Grid | str | None = None

    name = "obs"
    needs = "hessian"
    patterns = (Unstructured, NM)
    promises = ("beats_magnitude",)
    example = "OBS(sparsity=0.5)"

    def check(self):
        super().check()
        positive(self, "batch")
        positive(self, "dampening", strict=False)
        if not self.row_cap >= 1:
            raise PruneError(f"OBS.row_cap must be >= 1 (rows may prune up to row_cap times "
                             f"the target), got {self.row_cap!r}")

    def prune_matrix(self, w, hessian, pattern, sparsity, layer):
        dtype = torch.float64
        rows, d = w.shape
        w = w.to(dtype).clone()
        h = damped_hessian(hessian, w, self.dampening, layer,
                           rule=self.dampening_rule)
        hinv = torch.cholesky_inverse(cholesky_lower(h, layer, self.dampening)).to(dtype)
        nm = pattern if isinstance(pattern, NM) else None
        if nm is not None or pattern.per == "row":
            per_row = d - d * nm.n // nm.m if nm else int(round(sparsity * d))
            counts = torch.full((rows,), per_row)
        else:
            total = int(round(sparsity * rows * d))
            cap = min(d, max(1, math.ceil(self.row_cap * sparsity * d)))
            _, _, losses, order = greedy_obs(w, hinv, torch.full((rows,), cap),
                                             batch=self.batch)
            counts = _global_counts(losses, total)
            pruned = torch.zeros((rows, d), dtype=torch.bool)
            for r in range(rows):
                pruned[r, order[r, : int(counts[r])]] = True
            return _optimal_kept(w, h, pruned).float(), ~pruned
        new, pruned, _, _ = greedy_obs(w, hinv, counts, nm, batch=self.batch)
        return new.float(), ~pruned

    def prune_quantize(self, w, hessian, pattern, sparsity, layer, grid):
        from prunekit.quant.methods.obq import obq_matrix  # OBQ builds on this file

        pruned_w, keep = self.prune_matrix(w, hessian, pattern, sparsity, layer)
        w = w.to(torch.float64).clone()
        h = damped_hessian(hessian, w, self.dampening, layer,
                           rule=self.dampening_rule)
        hinv = torch.cholesky_inverse(cholesky_lower(h, layer, self.dampening))
        scales, zeros = grid.fit(pruned_w, layer)  # the range of the weights that remain
        return obq_matrix(w, hinv, grid, scales, zeros, pruned=~keep, batch=self.batch)


def _optimal_kept(w: torch.Tensor, h: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Each row's best weights on its support: the state greedy OBS reaches after removing
    exactly those weights. With S pruned and K kept, w'_K = w_K + H_KK^-1 H_KS w_S."""
    out = torch.zeros_like(w)
    for r in range(w.shape[0]):
        s, k = pruned[r], ~pruned[r]
        if not k.any():
            continue
        rhs = (h[k][:, s] @ w[r, s]).unsqueeze(1)
        out[r, k] = w[r, k] + torch.linalg.solve(h[k][:, k], rhs).squeeze(1)
    return out
