"""ALDS (Liebenwein et al. 2021, "Compressing Neural Networks: Towards Determining the
Optimal Layer-wise Decomposition"): per layer, the number of input-channel groups j and the
rank r, chosen together under one global budget.

With j groups, a layer's input channels are split into j equal blocks and each block's
slice W_g is factorized at rank r: a grouped k x k convolution (j groups of r channels)
then a 1x1. More groups cost fewer weights per rank, fewer ranks cost more error; which
trade is best differs from layer to layer. ALDS picks every layer's (j, r) to minimise the
largest relative layer error over the network, since that bounds the error of the whole, under
a parameter or FLOPs budget. Here the candidate (j, r) of every layer are enumerated with
their exact relative error ||W - W'||_F^2 / ||W||_F^2 (the tail of each block's squared
singular values), the smallest attainable largest error is found by bisection over those
errors (for each threshold, every layer takes its cheapest option under it, dense included),
and budget left over lowers the largest remaining errors greedily. Under a measured-latency
budget the cost of an option is its time from a table (`prunekit.lowrank.latency_costs`:
each option timed on the layer's real input), and only the timed options are candidates;
`prunekit.lowrank.lowrank_for_speedup` then moves the ratio until the measured speedup of
the whole model lands.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from prunekit.errors import PruneError
from prunekit.layers import weight_matrix
from prunekit.lowrank.base import (
    LowRankConfig,
    factor,
    factor_groups,
    factored_params,
    register,
)
from prunekit.oneshot.hessian import cholesky_lower, damped_hessian

BUDGETS = ("params_ratio", "flops_ratio", "latency_ratio")


@dataclass(frozen=True)
class ALDS(LowRankConfig):
    """Per layer, j groups and rank r minimising the largest relative layer error.

    params_ratio / flops_ratio / latency_ratio: the share of the chosen layers' weights /
        FLOPs / measured time kept (at most one; none means params_ratio=0.5). FLOPs need
        calibration data (each layer's output positions); latency needs `costs`.
    costs: {layer: {"j,r": seconds}} with the dense layer under "0,0", from
        prunekit.lowrank.latency_costs(model, batch).
    groups: the candidate j (a convolution's input channels must divide by j; a Linear
        takes j = 1). rank_step: candidate ranks are its multiples (8 or 16 suit vector
        units).
    data_aware: errors and factors on the calibration rows, as SVD(data_aware=True) (not in
        the paper; one group only, since a grouped V cannot follow the full H).
    """

    params_ratio: float | None = None
    flops_ratio: float | None = None
    latency_ratio: float | None = None
    costs: dict[str, dict[str, float]] | None = None
    groups: tuple[int, ...] = (1, 2, 4, 8)
    rank_step: int = 1
    data_aware: bool = False
    dampening: float = 0.01

    name = "alds"
    example = "ALDS(flops_ratio=0.5)"

    @property
    def needs(self) -> str:
        return "hessian" if self.flops_ratio is not None or self.data_aware else "none"

    def check(self) -> None:
        given = [k for k in BUDGETS if getattr(self, k) is not None]
        if len(given) > 1:
            raise PruneError(f"ALDS takes one budget, not {' and '.join(given)}")
        if self.latency_ratio is not None and not self.costs:
            raise PruneError("ALDS(latency_ratio=...) needs costs=, the measured time of each "
                             "option: prunekit.lowrank.latency_costs(model, batch)")
        for k in BUDGETS:
            v = getattr(self, k)
            if v is not None and not 0 < v <= 1:
                raise PruneError(f"ALDS.{k} is the kept share in (0, 1], got {v}")
        if not self.groups or any(j < 1 for j in self.groups):
            raise PruneError(f"ALDS.groups must list group counts >= 1, got {self.groups}")
        if self.data_aware and tuple(self.groups) != (1,):
            raise PruneError("ALDS(data_aware=True) factorizes whole layers: give groups=(1,)")
        if self.rank_step < 1:
            raise PruneError(f"ALDS.rank_step must be >= 1, got {self.rank_step}")
        if self.sequential:
            raise PruneError("ALDS shares one budget over all layers at once; it cannot run "
                             "with sequential=True")

    @property
    def ratio(self) -> float:
        return self.flops_ratio or self.params_ratio or self.latency_ratio or 0.5

    def candidates(self, name: str, module: nn.Module, scale: float = 1.0,
                   hessian: torch.Tensor | None = None) -> list[tuple]:
        """(cost, relative error, j, r) of every way to factorize `module`, the dense layer
        first as (cost, 0, 0, 0). The cost is the option's weights times `scale` (output
        positions), or under latency_ratio its time in `costs` (only timed options). Given
        the layer's Hessian (data_aware), the error is the output error on its rows."""
        w = weight_matrix(module).detach().double()
        out, inputs = w.shape
        conv = isinstance(module, nn.modules.conv._ConvNd)
        channels = module.in_channels if conv else inputs
        whitened = w
        if hessian is not None:
            h = damped_hessian(hessian, w.clone(), self.dampening, name)
            whitened = w @ cholesky_lower(h, name, self.dampening)
        norm = float(whitened.square().sum())
        timed = None
        if self.latency_ratio is not None:
            timed = self.costs.get(name)
            if timed is None or "0,0" not in timed:
                raise PruneError(f"ALDS: costs= has no time for layer {name}; measure the "
                                 f"table on this model (prunekit.lowrank.latency_costs)")
        found = [(timed["0,0"] if timed else out * inputs * scale, 0.0, 0, 0)]
        for j in sorted(set(self.groups)):
            if channels % j or (j > 1 and not conv):
                continue
            cols = inputs // j
            s2 = torch.stack([torch.linalg.svdvals(whitened[:, g * cols:(g + 1) * cols])
                              .square() for g in range(j)]).sum(0)
            tail = torch.flip(torch.cumsum(torch.flip(s2, (0,)), 0), (0,))  # sum over i >= r
            tail = torch.cat([tail, tail.new_zeros(1)])
            for r in range(self.rank_step, min(out, cols) + 1, self.rank_step):
                p = factored_params(out, inputs, r, j)
                if p >= out * inputs:
                    break
                err = float(tail[r]) / norm if norm > 0 else 0.0
                if timed is None:
                    found.append((p * scale, err, j, r))
                elif f"{j},{r}" in timed:
                    found.append((timed[f"{j},{r}"], err, j, r))
        return found

    def plan(self, layers, stats):
        if self.flops_ratio is not None:
            missing = [n for n in layers if n not in stats]
            if missing:
                raise PruneError(f"ALDS(flops_ratio=...) counts FLOPs on calibration data; "
                                 f"layer {missing[0]} did not run on it")
        if self.data_aware:
            missing = [n for n in layers if n not in stats]
            if missing:
                raise PruneError(f"ALDS(data_aware=True): layer {missing[0]} did not run on "
                                 f"the calibration data")
        options = [self.candidates(n, m, stats[n].rows if self.flops_ratio is not None else 1.0,
                                   stats[n].hessian[0] if self.data_aware else None)
                   for n, m in layers.items()]
        choice = minimax_allocation(options, self.ratio)
        return {n: torch.tensor(options[i][choice[i]][2:]) for i, n in enumerate(layers)}

    def transform(self, w, hessian, layer, plan=None):
        if plan is None:
            raise PruneError(f"{layer}: ALDS chooses ranks across layers (plan) first")
        j, r = (int(x) for x in plan)
        if j == 0:
            return self.kept(w, "left dense: every factorization within the budget has a "
                                "larger error than the largest one ALDS allows")
        if self.data_aware:
            u, v = factor(w, r, hessian, self.dampening, layer)
        else:
            u, v = factor_groups(w, r, j)
        return self.result(u, v, r, j)

    def at_flops(self, ratio):
        return self.replace(flops_ratio=ratio, params_ratio=None, latency_ratio=None)

    def at_latency(self, ratio: float, costs: dict) -> ALDS:
        """This config keeping `ratio` of the chosen layers' time in the table `costs`."""
        return self.replace(latency_ratio=ratio, costs=costs, params_ratio=None,
                            flops_ratio=None)

    def target(self) -> dict:
        return {"params_ratio": self.params_ratio, "flops_ratio": self.flops_ratio,
                "latency_ratio": self.latency_ratio}


def minimax_allocation(options: list[list[tuple]], ratio: float) -> list[int]:
    """One option per layer, total cost <= ratio * the dense total (option 0 of each layer),
    minimising the largest error, then spending what is left on the largest errors.

    options[l] = [(cost, error, ...), ...]. Raises Unreachable (best: the smallest reachable
    ratio) when even the cheapest options exceed the budget."""
    costs = [np.array([o[0] for o in opts], dtype=np.float64) for opts in options]
    errors = [np.array([o[1] for o in opts], dtype=np.float64) for opts in options]
    dense = sum(float(c[0]) for c in costs)
    budget = ratio * dense
    least = sum(float(c.min()) for c in costs)
    if least > budget * (1 + 1e-12):
        from prunekit.budget.dp import Unreachable

        best = least / dense if dense else 1.0
        raise Unreachable(f"ALDS: a budget of {ratio:g} of the layers' cost cannot be met: the "
                          f"smallest factorization of every layer keeps {best:.4f}; give a "
                          f"ratio >= {best:.4f}", best)

    def pick(eps: float) -> list[int]:
        out = []
        for c, e in zip(costs, errors):
            ok = np.flatnonzero(e <= eps)
            out.append(int(ok[np.lexsort((e[ok], c[ok]))[0]]))  # cheapest, then least error
        return out

    def total(choice: list[int]) -> float:
        return sum(float(c[k]) for c, k in zip(costs, choice))

    levels = np.unique(np.concatenate(errors))
    lo, hi = 0, len(levels) - 1  # the largest level allows every option: always fits
    while lo < hi:
        mid = (lo + hi) // 2
        if total(pick(levels[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    choice = pick(levels[lo])
    left = budget - total(choice)
    while True:  # lower the largest errors while the budget allows
        for i in sorted(range(len(choice)), key=lambda i: -errors[i][choice[i]]):
            c, e, k = costs[i], errors[i], choice[i]
            ok = np.flatnonzero((e < e[k]) & (c - c[k] <= left))
            if len(ok):
                best = int(ok[np.lexsort((c[ok], e[ok]))[0]])
                left -= float(c[best] - c[k])
                choice[i] = best
                break
        else:
            return choice


register(ALDS, needs="hessian if flops_ratio or data_aware")
