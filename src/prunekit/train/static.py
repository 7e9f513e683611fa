"""A fixed random mask trained as is: the baseline every dynamic method must beat."""

from __future__ import annotations

from typing import Literal

from prunekit.train.base import ANY_PATTERN, SCHEDULES, FixedMask
from prunekit.train.masks import check_seed, final_density


@SCHEDULES.register("static", summary="a fixed random mask (uniform or ERK), the baseline",
                    needs=(), patterns=ANY_PATTERN, example={"density": 0.5})
class Static(FixedMask):
    """prunekit.train.Static(model, optimizer, density=0.1, distribution="uniform", seed=0).

    Draws a random mask once (per-layer densities uniform or ERK) and keeps it for all of
    training.
    """

    def __init__(self, model, optimizer, density: float | None = None, *,
                 distribution: Literal["uniform", "erk", "er"] = "uniform", seed: int = 0,
                 **layers):
        check_seed(seed, "Static.seed")
        super().__init__(model, optimizer, **layers)
        self.density = final_density(self.holder.pattern, density, "Static")
        self.densities = self.holder.densities(self.density, distribution)
        self.holder.random_masks(self.densities, seed)
