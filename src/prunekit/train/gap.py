"""Grow-and-prune, GaP (Ma et al. 2022, "Effective Model Sparsification by Scheduled
Grow-and-Prune Methods").

The chosen layers are split into `partitions` groups of consecutive layers with similar
weight counts. The model starts sparse (random masks at the target densities) with the first
partition dense. Every delta_t steps the dense partition is pruned back to its densities by
magnitude and the next partition (cyclically) is grown dense, new weights starting at zero;
at t_end the last dense partition is pruned and the masks stay fixed. So every weight gets
dense-training time while the model is never more than one partition away from sparse.
"""

from __future__ import annotations

from typing import Literal

import torch

from prunekit.errors import PruneError
from prunekit.train.base import ANY_PATTERN, SCHEDULES, Schedule
from prunekit.train.masks import check_positive_int, check_seed, check_span, final_density


def split_partitions(sizes: dict[str, int], k: int) -> list[list[str]]:
    """k groups of consecutive names whose summed sizes are as even as a greedy cut allows."""
    names = list(sizes)
    if k > len(names):
        raise PruneError(f"GaP: {k} partitions but only {len(names)} layers are chosen; use "
                         f"at most {len(names)}")
    total, parts, acc = sum(sizes.values()), [[]], 0
    for i, n in enumerate(names):
        left_names, left_parts = len(names) - i, k - len(parts)
        if parts[-1] and (acc >= total * len(parts) / k or left_names == left_parts):
            parts.append([])
        parts[-1].append(n)
        acc += sizes[n]
    return parts


@SCHEDULES.register("gap", summary="grow-and-prune: one partition of layers dense at a time, "
                    "cycled (Ma et al. 2022)", needs=(), patterns=ANY_PATTERN,
                    example={"density": 0.5, "delta_t": 2, "t_end": 6, "partitions": 2})
class GaP(Schedule):
    """prunekit.train.GaP(model, optimizer, density=0.1, partitions=4, delta_t=..., t_end=...).

    distribution: per-layer densities, "uniform" (paper) or "erk". seed: the initial random
    masks of the sparse partitions.
    """

    def __init__(self, model, optimizer, density: float | None = 0.1, *, delta_t: int,
                 t_end: int, partitions: int = 4,
                 distribution: Literal["uniform", "erk", "er"] = "uniform", seed: int = 0,
                 **layers):
        self.delta_t = check_positive_int(delta_t, "GaP.delta_t")
        check_span(0, t_end, "GaP", ("start", "t_end"))
        if t_end < delta_t:
            raise PruneError(f"GaP: t_end {t_end} is before the first switch at delta_t "
                             f"{delta_t}")
        check_positive_int(partitions, "GaP.partitions")
        check_seed(seed, "GaP.seed")
        super().__init__(model, optimizer, **layers)
        self.density = final_density(self.holder.pattern, density, "GaP")
        self.t_end = t_end
        self.densities = self.holder.densities(self.density, distribution)
        self.partitions = split_partitions(
            {n: w.numel() for n, w in self.holder.weights.items()}, partitions)
        # the first partition starts dense with all its initial weights (density 1 keeps
        # every weight and draws from the generator like the others); the rest random
        first = set(self.partitions[0])
        self.holder.random_masks({n: 1.0 if n in first else d
                                  for n, d in self.densities.items()}, seed)
        self.dense = 0

    @torch.no_grad()
    def _event(self, step: int) -> None:
        if self.dense is None or (step % self.delta_t and step != self.t_end):
            return
        h = self.holder
        for n in self.partitions[self.dense]:
            h.set_mask(n, h.select(n, h.weights[n].detach().abs(), 1.0 - self.densities[n]))
        if step >= self.t_end:
            self.dense = None
            return
        self.dense = (self.dense + 1) % len(self.partitions)
        for n in self.partitions[self.dense]:
            h.set_mask(n, torch.ones_like(h.masks[n]))

    def next_event(self):
        if self.dense is None:
            return None
        nxt = min((self.step_count // self.delta_t + 1) * self.delta_t, self.t_end)
        event = "prune" if nxt >= self.t_end else "prune-grow"
        return {"step": nxt, "event": event, "dense_partition": self.dense}

    def _extra_state(self):
        return {"dense_partition": -1 if self.dense is None else self.dense}

    def _load_extra_state(self, state):
        d = int(state["dense_partition"])
        self.dense = None if d < 0 else d
