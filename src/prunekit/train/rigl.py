"""RigL (Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners").

Sparse from the first step with a fixed parameter count: the mask starts random (per-layer
densities ERK or uniform) and every delta_t steps, until t_end, each layer drops the fraction
f(t) = alpha/2 * (1 + cos(pi * t / t_end)) of its active weights with the smallest magnitude
and grows as many inactive ones with the largest dense-gradient magnitude. Grown weights
start at zero. Paper defaults: alpha 0.3, delta_t 100, t_end 75% of training, ERK.

Under structured patterns the swap happens per pattern unit: per row for unstructured:row,
per 1xN block (block scores are sums over the block), and for N:M the groups with the
strongest candidate gradient each swap one weight, so every group keeps exactly N.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from prunekit.errors import PruneError
from prunekit.patterns import NM, Block1xN, Unstructured
from prunekit.train.base import ANY_PATTERN, SCHEDULES, Schedule
from prunekit.train.masks import check_positive_int, check_seed, check_span, final_density


def _rank(scores: torch.Tensor, descending: bool) -> torch.Tensor:
    """Rank of each entry within its row (0 = first in the given order)."""
    order = scores.argsort(dim=1, descending=descending, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device)
                  .expand_as(order).contiguous())
    return rank


def drop_grow(active: torch.Tensor, drop_score: torch.Tensor, grow_score: torch.Tensor,
              k: torch.Tensor) -> torch.Tensor:
    """Per row of (S, L) tensors: drop the k[s] active entries with the lowest drop_score,
    then grow the k[s] inactive entries with the highest grow_score. Counts per row stay."""
    k = k.reshape(-1, 1)
    inf = torch.tensor(float("inf"), dtype=drop_score.dtype, device=drop_score.device)
    dropped = active & (_rank(torch.where(active, drop_score, inf), False) < k)
    kept = active & ~dropped
    grown = ~kept & (_rank(torch.where(kept, -inf, grow_score.to(inf.dtype)), True) < k)
    return kept | grown


def rigl_update(pattern, mask2d: torch.Tensor, w2d: torch.Tensor, g2d: torch.Tensor,
                fraction: float) -> torch.Tensor:
    """One RigL drop-and-grow on an (out, in) mask under `pattern`."""
    drop, grow = w2d.abs().float(), g2d.abs().float()
    if isinstance(pattern, Unstructured) and pattern.per == "row":
        k = (mask2d.sum(1).float() * fraction).round().long()
        return drop_grow(mask2d, drop, grow, k)
    if isinstance(pattern, NM):
        m = pattern.m
        act = mask2d.reshape(-1, m)
        drop, grow = drop.reshape(-1, m), grow.reshape(-1, m)
        best = torch.where(act, -1.0, grow).max(dim=1).values
        n_swap = int(round(fraction * act.shape[0]))
        k = torch.zeros(act.shape[0], dtype=torch.long, device=act.device)
        if n_swap:
            k[torch.topk(best, n_swap).indices] = 1
        return drop_grow(act, drop, grow, k).reshape(mask2d.shape)
    if isinstance(pattern, Block1xN):
        rows, cols = mask2d.shape
        act = mask2d.reshape(rows // pattern.n, pattern.n, cols)[:, 0, :].reshape(1, -1)
        drop = pattern.block_scores(drop).reshape(1, -1)
        grow = pattern.block_scores(grow).reshape(1, -1)
        k = (act.sum().float() * fraction).round().long()
        return pattern.expand(drop_grow(act, drop, grow, k).reshape(rows // pattern.n, cols))
    k = (mask2d.sum().float() * fraction).round().long()
    return drop_grow(mask2d.reshape(1, -1), drop.reshape(1, -1), grow.reshape(1, -1),
                     k).reshape(mask2d.shape)


@SCHEDULES.register("rigl", summary="sparse from the start; drop by magnitude, grow by "
                    "gradient (Evci et al. 2020)", needs=(), patterns=ANY_PATTERN,
                    example={"density": 0.5, "t_end": 6, "delta_t": 2})
class RigL(Schedule):
    """prunekit.train.RigL(model, optimizer, density=0.1, delta_t=100, t_end=..., alpha=0.3).

    distribution: "erk" (default) or "uniform" per-layer densities. seed: the initial random
    mask. Call `.step()` after every optimizer.step(); the backward before an update step
    keeps a copy of the dense gradients (the only extra cost).
    """

    def __init__(self, model, optimizer, density: float | None = 0.1, *, t_end: int,
                 delta_t: int = 100, alpha: float = 0.3,
                 distribution: Literal["uniform", "erk", "er"] = "erk", seed: int = 0,
                 **layers):
        check_span(0, t_end, "RigL", ("start", "t_end"))
        self.delta_t = check_positive_int(delta_t, "RigL.delta_t")
        if not 0.0 < alpha < 1.0:
            raise PruneError(f"RigL.alpha (initial update fraction) must be in (0, 1), "
                             f"got {alpha!r}")
        check_seed(seed, "RigL.seed")
        super().__init__(model, optimizer, **layers)
        self.density = final_density(self.holder.pattern, density, "RigL")
        self.t_end, self.alpha = t_end, float(alpha)
        self.densities = self.holder.densities(self.density, distribution)
        self.holder.random_masks(self.densities, seed)
        self._arm()

    def fraction(self, step: int) -> float:
        """Cosine-decayed update fraction at `step`."""
        return self.alpha / 2.0 * (1.0 + math.cos(math.pi * step / self.t_end))

    def is_update(self, step: int) -> bool:
        return 0 < step < self.t_end and step % self.delta_t == 0

    def _arm(self) -> None:
        self.holder.capture_dense_grads(self.is_update(self.step_count + 1))

    @torch.no_grad()
    def _event(self, step: int) -> None:
        if self.is_update(step):
            grads = self.holder.dense_grads or {}
            missing = [n for n in self.holder.weights if n not in grads]
            if missing:
                raise PruneError(
                    f"RigL update at step {step} found no gradient for layer {missing[0]}; call "
                    f"loss.backward() and optimizer.step() before each RigL.step(), once per "
                    f"iteration")
            f = self.fraction(step)
            for name, w in self.holder.weights.items():
                h = self.holder
                new = rigl_update(h.pattern, h.matrix(name, h.masks[name]), h.matrix(name, w),
                                  h.matrix(name, grads[name]), f)
                h.set_mask(name, new)
        self._arm()

    def next_event(self):
        nxt = (self.step_count // self.delta_t + 1) * self.delta_t
        if nxt >= self.t_end:
            return None
        return {"step": nxt, "event": "drop-grow", "fraction": self.fraction(nxt)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._arm()
