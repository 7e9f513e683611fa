"""Wanda (Sun et al. 2023): |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunekit.oneshot.methods.base import PruneConfig, register


@register
@dataclass(frozen=True)
class Wanda(PruneConfig):
    """Weight magnitude times input feature norm. The paper compares per output row, so the
    default pattern is 'unstructured:row'; N:M and 1xN work too."""

    pattern: str = "unstructured:row"

    name = "wanda"
    needs = "hessian"
    statistic = "diagonal"  # only the feature norms: calibration skips X^T X

    def score(self, w, hessian, layer):
        norms = torch.diagonal(hessian).clamp_min(0).sqrt().to(w.dtype)
        return w.abs() * norms.unsqueeze(0)
