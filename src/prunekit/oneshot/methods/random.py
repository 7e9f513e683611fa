"""Random pruning: the baseline every method must beat."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from prunekit.oneshot.methods.base import PruneConfig, register


@register
@dataclass(frozen=True)
class Random(PruneConfig):
    """Uniformly random scores, reproducible from `seed` and the layer's name."""

    seed: int = 0

    name = "random"

    def score(self, w, hessian, layer):
        gen = torch.Generator().manual_seed(zlib.crc32(layer.encode()) ^ int(self.seed))
        return torch.rand(w.shape, generator=gen)
