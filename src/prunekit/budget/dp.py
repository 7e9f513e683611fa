"""The dynamic program of SPDY: one level per layer, minimising the summed error under a
budget on the summed cost (a knapsack with one choice per layer)."""

from __future__ import annotations

import math

import numpy as np

from prunekit.errors import PruneError


class Unreachable(PruneError):
    """No allocation meets the budget; `best` is the smallest total cost any allocation has."""

    def __init__(self, message: str, best: float):
        super().__init__(message)
        self.best = best


def solve(errors, costs, budget: float, resolution: int | None = 2000) -> list[int]:
    """Level index per layer minimising sum(errors[l, k_l]) with sum(costs[l, k_l]) <= budget.

    errors, costs: (layers, levels) arrays; an inf error forbids a level. With resolution=None
    the costs must be non-negative integers and the result is exactly optimal. Otherwise costs
    are rounded up to units of budget/resolution, so the answer always meets the budget and is
    optimal for the rounded costs. Raises Unreachable (with the best reachable total cost)
    when even the cheapest levels exceed the budget.
    """
    e = np.asarray(errors, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    if e.shape != c.shape or e.ndim != 2 or e.shape[1] == 0:
        raise PruneError(f"errors and costs must both be (layers, levels); got {e.shape} and "
                         f"{c.shape}")
    if (c < 0).any() or not np.isfinite(c).all():
        raise PruneError("costs must be finite and non-negative")
    allowed = np.isfinite(e)
    if not allowed.any(axis=1).all():
        bad = int(np.flatnonzero(~allowed.any(axis=1))[0])
        raise PruneError(f"layer {bad} has no allowed level (all errors are inf)")
    cheapest = float(np.where(allowed, c, np.inf).min(axis=1).sum())
    if cheapest > budget + 1e-12 * max(1.0, abs(budget)):
        raise Unreachable(f"budget {budget:.6g} is below the cheapest allocation's cost "
                          f"{cheapest:.6g}", cheapest)
    if resolution is None:
        if not np.allclose(c, np.round(c)):
            raise PruneError("resolution=None needs integer costs")
        units, cap = np.round(c).astype(np.int64), int(math.floor(budget + 1e-9))
        limit = cap
    else:
        unit = budget / resolution if budget > 0 else 1.0
        units = np.ceil(c / unit - 1e-9).astype(np.int64)
        cap = resolution
        # rounding up adds less than one unit per layer: states up to cap + layers may still
        # fit the real budget, and are checked against the real costs below
        limit = cap + e.shape[0]
    units = np.where(allowed, units, limit + 1)
    n_layers, n_levels = e.shape
    dp = np.full(limit + 1, np.inf)
    dp[0] = 0.0
    back = np.zeros((n_layers, limit + 1), dtype=np.int32)
    for layer in range(n_layers):
        new = np.full(limit + 1, np.inf)
        for k in range(n_levels):
            u = units[layer, k]
            if u > limit or not allowed[layer, k]:
                continue
            cand = np.full(limit + 1, np.inf)
            cand[u:] = dp[:limit + 1 - u] + e[layer, k]
            better = cand < new
            new[better] = cand[better]
            back[layer, better] = k
        dp = new

    def trace(end: int) -> list[int]:
        choice, b = [0] * n_layers, end
        for layer in range(n_layers - 1, -1, -1):
            choice[layer] = int(back[layer, b])
            b -= int(units[layer, choice[layer]])
        return choice

    slack = 1e-12 * max(1.0, abs(budget))
    for end in np.argsort(dp, kind="stable"):
        if not np.isfinite(dp[end]):
            break
        choice = trace(int(end))
        if sum(c[i, k] for i, k in enumerate(choice)) <= budget + slack:
            return choice
    if cheapest <= budget + slack:
        # near the limit, rounding up can hide the only allocations that fit: each kept
        # state held a lower-error choice whose real cost is over; the cheapest one fits
        return [int(k) for k in np.where(allowed, c, np.inf).argmin(axis=1)]
    raise Unreachable(f"budget {budget:.6g} cannot be met at resolution {resolution}; "
                      f"the cheapest allocation costs {cheapest:.6g}", cheapest)
