"""Magnitude pruning: drop the weights of smallest absolute value (no data needed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prunekit.oneshot.methods.base import PruneConfig, register


@register
@dataclass(frozen=True)
class Magnitude(PruneConfig):
    """|W| as the score. scope='layer' compares within each layer (per row with pattern
    'unstructured:row'); scope='global' compares all chosen layers together (unstructured)."""

    scope: Literal["layer", "global"] = "layer"

    name = "magnitude"

    def score(self, w, hessian, layer):
        return w.abs()
