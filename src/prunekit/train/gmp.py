"""Gradual magnitude pruning (Zhu and Gupta 2017, "To prune, or not to prune").

Sparsity follows s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))**3 at the pruning steps
t = t0, t0 + dt, ..., t0 + n*dt, and stays put in between and afterwards: the network prunes
fast while it is redundant and slowly near the end. At each pruning step the smallest-magnitude
weights of each layer (or of all layers, scope="global") are removed; pruned weights stay
pruned.
"""

from __future__ import annotations

from typing import Literal

import torch

from prunekit.errors import PruneError
from prunekit.train.base import ANY_PATTERN, SCHEDULES, Schedule
from prunekit.train.masks import check_density, check_positive_int, check_span, final_density


def cubic_sparsity(step: int, initial: float, final: float, start: int, end: int,
                   frequency: int) -> float:
    """The GMP target sparsity after `step` optimizer steps (last pruning step <= step)."""
    if step < start:
        return 0.0
    t = min(start + (step - start) // frequency * frequency, end)
    return final + (initial - final) * (1.0 - (t - start) / (end - start)) ** 3


@SCHEDULES.register("gmp", summary="gradual magnitude pruning on a cubic ramp (Zhu and Gupta "
                    "2017)", needs=(), patterns=ANY_PATTERN,
                    example={"density": 0.5, "end": 6, "frequency": 2})
class GMP(Schedule):
    """prunekit.train.GMP(model, optimizer, density=0.1, start=0, end=..., frequency=100).

    density: final kept fraction (s_f = 1 - density). initial_density: kept fraction at the
    first pruning step (s_i = 1 - initial_density, paper default 0). end - start must be a
    multiple of frequency (dt; the paper uses 100 to 1000 steps). scope="global" ranks all
    layers together; distribution="erk" gives each layer its own final density (same total),
    each reached on the same cubic ramp. Under an N:M pattern the density is the
    pattern's and the ramp passes through looser n':M patterns.
    """

    def __init__(self, model, optimizer, density: float | None = None, *, end: int,
                 start: int = 0, frequency: int = 100, initial_density: float = 1.0,
                 scope: Literal["layer", "global"] = "layer",
                 distribution: Literal["uniform", "erk", "er"] = "uniform", **layers):
        check_span(start, end, "GMP")
        self.frequency = check_positive_int(frequency, "GMP.frequency")
        if (end - start) % frequency:
            raise PruneError(f"GMP: end - start = {end - start} is not a multiple of frequency "
                             f"{frequency}; choose end = start + n * frequency")
        if scope == "global" and distribution != "uniform":
            raise PruneError("GMP: a layer distribution applies to scope='layer' only")
        self.initial_density = check_density(initial_density, "GMP.initial_density")
        super().__init__(model, optimizer, **layers)
        self.density = final_density(self.holder.pattern, density, "GMP")
        if self.initial_density < self.density:
            raise PruneError(f"GMP.initial_density {initial_density} is below the final "
                             f"density {self.density}; GMP only removes weights")
        self.start, self.end, self.scope = start, end, scope
        self.final_densities = self.holder.densities(self.density, distribution)
        self.target = 0.0
        self._event(0)

    def target_sparsity(self, step: int, layer: str | None = None) -> float:
        """The cubic target after `step` steps, overall or for one layer (distribution)."""
        final = 1.0 - (self.density if layer is None else self.final_densities[layer])
        initial = min(1.0 - self.initial_density, final)
        return cubic_sparsity(step, initial, final, self.start, self.end, self.frequency)

    def _is_event(self, step: int) -> bool:
        return self.start <= step <= self.end and (step - self.start) % self.frequency == 0

    @torch.no_grad()
    def _event(self, step: int) -> None:
        if not self._is_event(step):
            return
        self.target = self.target_sparsity(step)
        scores = self.holder.kept_magnitudes()
        if self.scope == "global":
            self.holder.select_all(scores, self.target, "global")
        else:
            self.holder.select_all(scores, {n: self.target_sparsity(step, n) for n in scores})

    def next_event(self):
        if self.step_count >= self.end:
            return None
        nxt = max(self.start, self.step_count + 1)
        nxt += (-(nxt - self.start)) % self.frequency
        return {"step": nxt, "event": "prune", "sparsity": self.target_sparsity(nxt)}

    def _extra_state(self):
        return {"target": self.target}

    def _load_extra_state(self, state):
        self.target = float(state["target"])
