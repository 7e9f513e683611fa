"""Magnitude pruning: drop the weights of smallest absolute value (no data needed)."""

from __future__ import annotations

from dataclasses import dataclass

from prunekit.errors import PruneError
from prunekit.methods.base import PruneConfig, register


@register
@dataclass
class Magnitude(PruneConfig):
    """|W| as the score. scope='layer' compares within each layer (per row with pattern
    'unstructured:row'); scope='global' compares all chosen layers together (unstructured)."""

    scope: str = "layer"

    method = "magnitude"

    def __post_init__(self):
        if self.scope not in ("layer", "global"):
            raise PruneError(
                f"Magnitude(scope=...) must be 'layer' or 'global', got {self.scope!r}")

    def score(self, w, hessian, layer):
        return w.abs()
