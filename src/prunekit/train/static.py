"""A fixed random mask trained as is: the baseline every dynamic method must beat."""

from __future__ import annotations

import torch

from prunekit.errors import PruneError
from prunekit.train.base import Schedule
from prunekit.train.masks import check_density, layer_densities


def initial_density(holder, density: float | None) -> float:
    """The requested density, or the pattern's own (N:M), checked against each other."""
    implied = holder.pattern.implied_sparsity
    if density is None:
        if implied is None:
            raise PruneError("a density (kept fraction) in (0, 1] is needed")
        return 1.0 - implied
    density = check_density(density)
    if implied is not None and abs(1.0 - density - implied) > 1e-9:
        raise PruneError(f"pattern {holder.pattern} fixes density at {1 - implied:g}; got "
                         f"density={density!r} (leave it unset)")
    return density


def random_masks(holder, densities: dict[str, float], generator: torch.Generator) -> None:
    """Install uniformly random masks at the given per-layer densities (pattern obeyed)."""
    for name, w in holder.weights.items():
        scores = torch.rand(w.shape, generator=generator).to(w.device)
        holder.set_mask(name, holder.select(name, scores, 1.0 - densities[name]))


class Static(Schedule):
    """prunekit.train.Static(model, optimizer, density=0.1, distribution="uniform", seed=0).

    Draws a random mask once (per-layer densities uniform or ERK) and keeps it for all of
    training.
    """

    def __init__(self, model, optimizer, density: float | None = None, *,
                 distribution: str = "uniform", seed: int = 0, **layers):
        super().__init__(model, optimizer, **layers)
        self.density = initial_density(self.holder, density)
        self.densities = layer_densities(self.holder.layers, self.density, distribution)
        random_masks(self.holder, self.densities, torch.Generator().manual_seed(seed))
        self.holder.apply()

    def _event(self, step):
        pass

    def next_event(self):
        return None
