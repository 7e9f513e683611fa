"""Truncated SVD, plain or data-aware: every chosen layer at one rank rule.

Plain, the rank-r factors are the best in Frobenius norm (Eckart-Young), which weighs every
input direction alike. Data-aware (data_aware=True), they minimise the layer's output error
on the calibration rows, ||(W - U V) X^T||: the SVD of W L with H = X^T X = L L^T, L^-1
folded back into V (DRONE, Chen et al. 2021; SVD-LLM's whitening, Wang et al. 2024).
Inputs that vary little cost little to drop, so the same rank keeps far less output error.
The rank is one number (`rank`), a share of each layer's full rank (`rank_ratio`), or one
share for every layer chosen so that the chosen layers keep `flops_ratio` of their FLOPs
(the uniform baseline ALDS is compared with).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prunekit.config import positive
from prunekit.errors import PruneError
from prunekit.lowrank.base import (
    LowRankConfig,
    factor,
    factored_params,
    layer_shape,
    register,
    smaller_below,
)


@dataclass(frozen=True)
class SVD(LowRankConfig):
    """Truncated SVD of each layer (data_aware=True: of W L, H = L L^T).

    rank: the rank of every chosen layer; rank_ratio: the kept share of each layer's full
        rank min(out, in); flops_ratio: one rank_ratio for all, the largest whose factorized
        layers keep at most this share of the chosen layers' FLOPs (needs calibration data,
        which counts each layer's output positions). At most one; none means rank_ratio=0.5.
    round_to: ranks rounded up to a multiple of this (8 or 16 suit vector units).
    dampening: added to H's diagonal, times its mean, before the Cholesky (data-aware).
    """

    rank: int | None = None
    rank_ratio: float | None = None
    flops_ratio: float | None = None
    data_aware: bool = False
    dampening: float = 0.01
    round_to: int = 1

    name = "svd"
    level_field = "rank_ratio"
    example = "SVD(rank_ratio=0.25, data_aware=True)"

    @property
    def needs(self) -> str:  # calibration: for H, or for counting FLOPs
        return "hessian" if self.data_aware or self.flops_ratio is not None else "none"

    def check(self) -> None:
        given = [k for k in ("rank", "rank_ratio", "flops_ratio") if getattr(self, k) is not None]
        if len(given) > 1:
            raise PruneError(f"SVD takes one of rank, rank_ratio and flops_ratio, got "
                             f"{' and '.join(given)}")
        positive(self, "rank", "rank_ratio", "flops_ratio", "round_to")
        positive(self, "dampening", strict=False)
        for k in ("rank_ratio", "flops_ratio"):
            if getattr(self, k) is not None and getattr(self, k) > 1:
                raise PruneError(f"SVD.{k} is a kept share in (0, 1], got {getattr(self, k)}")
        if self.flops_ratio is not None and self.sequential:
            raise PruneError("SVD(flops_ratio=...) shares one budget over all layers; it "
                             "cannot run with sequential=True (give rank_ratio instead)")

    def rank_for(self, out: int, inputs: int, ratio: float | None = None) -> int:
        """The rank of an (out, in) layer under `rank` or the share `ratio` (default
        rank_ratio, 0.5 when nothing is given), rounded up to round_to, at most full."""
        full = min(out, inputs)
        if self.rank is not None and ratio is None:
            r = self.rank
        else:
            share = ratio if ratio is not None else (self.rank_ratio or 0.5)
            r = max(1, round(share * full))
        return min(full, math.ceil(r / self.round_to) * self.round_to)

    def check_layer(self, name, module) -> None:
        super().check_layer(name, module)
        out, inputs = layer_shape(module)
        if self.rank is not None and self.rank > min(out, inputs):
            raise PruneError(f"{name}: rank {self.rank} is larger than the layer allows: its "
                             f"weight is {out} x {inputs}, so its rank is at most "
                             f"{min(out, inputs)}; give a smaller rank, or rank_ratio=")

    def plan(self, layers, stats):
        if self.flops_ratio is None:
            return {}
        missing = [n for n in layers if n not in stats]
        if missing:
            raise PruneError(f"SVD(flops_ratio=...) counts FLOPs on calibration data; layer "
                             f"{missing[0]} did not run on it")
        shapes = {n: layer_shape(m) for n, m in layers.items()}
        dense = sum(stats[n].rows * o * i for n, (o, i) in shapes.items())

        def flops(share: float) -> tuple[float, dict]:
            ranks = {n: self.rank_for(o, i, share) for n, (o, i) in shapes.items()}
            return sum(stats[n].rows * (factored_params(o, i, ranks[n])
                                        if ranks[n] < smaller_below(o, i) else o * i)
                       for n, (o, i) in shapes.items()), ranks

        budget = self.flops_ratio * dense
        least, ranks = flops(0.0)
        if least > budget * (1 + 1e-12):
            from prunekit.budget.dp import Unreachable

            raise Unreachable(f"SVD: flops_ratio={self.flops_ratio:g} cannot be met: the "
                              f"lowest ranks keep {least / dense:.4f} of the layers' FLOPs; "
                              f"give flops_ratio >= {least / dense:.4f}", least / dense)
        lo, hi = 0.0, 1.0
        for _ in range(40):  # the largest share whose FLOPs fit (FLOPs grow with the share)
            mid = (lo + hi) / 2
            cost, r = flops(mid)
            if cost <= budget:
                lo, ranks = mid, r
            else:
                hi = mid
        return {n: torch.tensor([r]) for n, r in ranks.items()}

    def transform(self, w, hessian, layer, plan=None):
        out, inputs = w.shape
        r = int(plan[0]) if plan is not None else self.rank_for(out, inputs)
        limit = smaller_below(out, inputs)
        if r >= limit:
            return self.kept(w, f"rank {r} would not make it smaller (a {out}x{inputs} "
                                f"layer shrinks below rank {limit})")
        if self.data_aware and hessian is None:
            raise PruneError(f"{layer}: SVD(data_aware=True) needs calibration data")
        u, v = factor(w, r, hessian if self.data_aware else None, self.dampening, layer)
        return self.result(u, v, r)

    def at_level(self, level):
        return self.replace(rank_ratio=level, rank=None, flops_ratio=None)

    def skips_level(self, level) -> bool:
        return level >= 1

    def at_flops(self, ratio):
        return self.replace(flops_ratio=ratio, rank=None, rank_ratio=None)

    def target(self) -> dict:
        return {"rank": self.rank, "rank_ratio": self.rank_ratio,
                "flops_ratio": self.flops_ratio, "data_aware": self.data_aware}


register(SVD, needs="hessian if data_aware or flops_ratio")
