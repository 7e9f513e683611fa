"""Latency-aware allocation after SPDY (Frantar and Alistarh 2022).

1. A database: every layer pruned one-shot (e.g. SparseGPT, from the dense model's
   calibration statistics) at every level, with its relative reconstruction error.
2. A cost per layer and level: measured latency (LatencyTable), kept FLOPs or kept weights.
3. The DP picks one level per layer minimising sum_l c_l * err_l(level) under the cost budget.
4. A local search refines the per-layer coefficients c_l: each candidate allocation is
   assembled from the database and scored by the model's real output error on calibration
   data; changes that lower it are kept, and the number of coefficients perturbed shrinks
   as the search goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from prunekit.batches import as_batches, first_calls, output_tensor, run_batch
from prunekit.budget.alloc import BUDGETS
from prunekit.budget.dp import Unreachable, solve
from prunekit.budget.latency_table import LatencyTable
from prunekit.errors import PruneError
from prunekit.layers import find_layers, set_weight_matrix, weight_matrix
from prunekit.oneshot.engine import layer_levels
from prunekit.oneshot.methods.base import PruneConfig
from prunekit.progress import Progress


@dataclass
class Database:
    """weights[layer][i]: the layer's (out, in) matrix pruned to levels[i]; errors likewise."""

    levels: list[float]
    weights: dict[str, list[torch.Tensor]]
    errors: dict[str, list[float]]

    def error_matrix(self, names: Sequence[str]) -> np.ndarray:
        return np.array([self.errors[n] for n in names], dtype=np.float64)


def build_database(model: nn.Module, config: PruneConfig, calib, levels: Sequence[float],
                   include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                   progress: bool = True) -> Database:
    """Prune every chosen layer at every level from the dense model's statistics (the model
    is unchanged). Level errors are ||(W - W')X||^2 / ||WX||^2."""
    levels = [float(x) for x in levels]
    weights, errors = layer_levels(model, config, calib, levels, include, exclude, progress)
    return Database(levels, weights, errors)


@dataclass
class Target:
    """What the budget bounds: 'speedup' (measured latency table), 'flops' (reduction
    factor of the prunable layers' multiply-adds) or 'sparsity' (fraction of weights)."""

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in ("speedup", "flops", "sparsity"):
            raise PruneError(f"target kind must be 'speedup', 'flops' or 'sparsity', got "
                             f"{self.kind!r}")
        if self.kind == "sparsity" and not 0 <= self.value < 1:
            raise PruneError(f"a sparsity target must be in [0, 1), got {self.value}")
        if self.kind != "sparsity" and self.value < 1:
            raise PruneError(f"a {self.kind} target is a factor >= 1, got {self.value}")


def layer_macs(model: nn.Module, layers: Mapping[str, nn.Module], batch) -> dict[str, float]:
    """Dense multiply-adds per layer on `batch` (weights x output positions)."""
    return first_calls(model, layers, batch, lambda m, out: m.weight.numel() * out.numel()
                       / weight_matrix(m).shape[0], on="output")


def cost_matrix(names: Sequence[str], levels: Sequence[float], target: Target,
                table: LatencyTable | None = None, sizes: Mapping[str, float] | None = None,
                macs: Mapping[str, float] | None = None) -> tuple[np.ndarray, float]:
    """(costs (layers, levels), budget) for the DP under `target`."""
    lv = np.asarray(levels, dtype=np.float64)
    if target.kind == "speedup":
        if table is None:
            raise PruneError("a speedup target needs a latency table (build_latency_table)")
        if list(table.levels) != list(levels):
            raise PruneError(f"the latency table's levels {table.levels} differ from the "
                             f"database's {list(levels)}")
        costs = np.array([table.times[n] for n in names])
        # the same baseline as table.speedup: when the layers timed cold sum to more than
        # the whole model, `other` is clamped at 0 and the dense prediction exceeds the
        # measured total (dense_total here made SPDY refuse its own max_speedup)
        budget = table.predict({}) / target.value - table.other
        if budget <= 0 or costs.min(axis=1).sum() > budget:
            raise Unreachable(
                f"speedup {target.value:g}x cannot be reached on this machine: the best "
                f"reachable (every layer at its fastest level) is {table.max_speedup():.3f}x",
                table.max_speedup())
        return costs, budget
    per = macs if target.kind == "flops" else sizes
    if per is None:
        raise PruneError(f"a {target.kind} target needs the layers' "
                         f"{'MACs' if target.kind == 'flops' else 'sizes'}")
    costs = np.array([[per[n] * (1 - s) for s in lv] for n in names])
    total = sum(per[n] for n in names)
    budget = total / target.value if target.kind == "flops" else total * (1 - target.value)
    if costs.min(axis=1).sum() > budget * (1 + 1e-9):
        best = total / costs.min(axis=1).sum() if target.kind == "flops" \
            else 1 - costs.min(axis=1).sum() / total
        raise Unreachable(f"{target.kind} target {target.value:g} cannot be reached with the "
                          f"largest level {max(levels):g}; the best reachable is {best:.4g}",
                          best)
    return costs, budget


@dataclass
class Allocation:
    budget: dict[str, float]
    loss: float
    coefficients: dict[str, float]
    predicted: dict
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0


def output_error(model: nn.Module, batches, reference: list[torch.Tensor]) -> float:
    """||y - y_dense||^2 / ||y_dense||^2 summed over the batches."""
    num = den = 0.0
    with torch.inference_mode():
        for b, ref in zip(batches, reference):
            y = output_tensor(run_batch(model, b)).float()
            num += float((y - ref).pow(2).sum())
            den += float(ref.pow(2).sum())
    return num / max(den, 1e-30)


def output_loss(model: nn.Module, calib) -> Callable[[nn.Module], float]:
    """loss(m): m's relative output error on `calib` against `model` as it is now."""
    batches = as_batches(calib)
    if not batches:
        raise PruneError("scoring allocations needs data: pass calib=... or loss=...")
    model.eval()
    with torch.inference_mode():
        ref = [output_tensor(run_batch(model, b)).float() for b in batches]
    return lambda m: output_error(m, batches, ref)


def assemble(layers: Mapping[str, nn.Module], db: Database, choice: Mapping[str, int]) -> None:
    """Write each layer's database weights at its chosen level into the model."""
    for name, k in choice.items():
        set_weight_matrix(layers[name], db.weights[name][k])


def coefficient_search(errors: np.ndarray, costs: np.ndarray, cap: float,
                       apply: Callable[[list[int]], None], loss: Callable[[], float],
                       steps: int = 100, seed: int = 0, resolution: int = 2000,
                       init: Sequence[float] | None = None, progress: bool = True
                       ) -> tuple[np.ndarray, float, list[int], list[float]]:
    """SPDY's search over per-layer coefficients c: each candidate is the DP's choice for
    the errors c_l * e[l, level] under the cost cap, applied (`apply(choice)`) and scored
    by `loss()`; the first candidate is the plain DP (c = 1, or `init`), then random starts
    (a fifth of the steps, none with `init`), then a local search that perturbs many
    coefficients early and few late. Returns (coefficients, best loss, its choice, best
    loss after each step); the last candidate applied is not necessarily the best."""
    rng = np.random.default_rng(seed)
    n = errors.shape[0]

    def evaluate(coef: np.ndarray) -> tuple[float, list[int]]:
        choice = solve(errors * coef[:, None], costs, cap, resolution)
        apply(choice)
        return loss(), choice

    coef = np.ones(n) if init is None else np.asarray(init, dtype=np.float64)
    best_loss, best_choice = evaluate(coef)
    history = [best_loss]
    explore = 0 if init is not None else steps // 5
    with Progress(enabled=progress) as bar:
        task = bar.add("SPDY search", total=steps)
        for step in range(steps):
            if step < explore:  # random starting points first
                trial = np.exp(rng.normal(0.0, 1.5, size=n))
            else:  # then local search: perturb many coefficients early, few late
                t = (step - explore) / max(steps - explore, 1)
                count = max(1, int(round(max(1.0 / n, 0.5 * (1 - t)) * n)))
                trial = coef.copy()
                idx = rng.choice(n, size=count, replace=False)
                trial[idx] *= np.exp(rng.normal(0.0, 1.0, size=count))
            value, choice = evaluate(trial)
            if value < best_loss:
                coef, best_loss, best_choice = trial, value, choice
            history.append(best_loss)
            bar.advance(task)
    return coef, best_loss, best_choice, history


@BUDGETS.register("spdy", search=True)
def spdy_search(model: nn.Module, db: Database, calib, target: Target,
                table: LatencyTable | None = None, steps: int = 100, seed: int = 0,
                resolution: int = 2000, loss: Callable[[nn.Module], float] | None = None,
                batch=None, init: Mapping[str, float] | None = None,
                progress: bool = True) -> Allocation:
    """Search per-layer coefficients; return the best allocation found (the model ends up
    holding it: the database weights at the chosen levels).

    loss(model) scores a candidate (default: relative output error against the dense model
    on `calib`). `batch` is a sample input used to count MACs for a 'flops' target.
    `init` starts from the coefficients of an earlier search (Allocation.coefficients, e.g.
    at a nearby target) and goes straight to the local search, without random starts.
    """
    start = time.perf_counter()
    names = list(db.weights)
    if init is not None:
        missing = [n for n in names if n not in init]
        if missing:
            raise PruneError(f"init has no coefficient for layer(s) {missing[:3]}: pass the "
                             "coefficients of a search over the same database")
    all_layers = find_layers(model)
    layers = {n: all_layers[n] for n in names}
    sizes = {n: float(m.weight.numel()) for n, m in layers.items()}
    macs = None
    if target.kind == "flops":
        if batch is None:
            raise PruneError("a flops target needs batch=... to count multiply-adds")
        macs = layer_macs(model, layers, batch)
    costs, cap = cost_matrix(names, db.levels, target, table, sizes, macs)
    errors = db.error_matrix(names)
    model.eval()
    if loss is None:
        loss = output_loss(model, calib)

    coef, best_loss, best_choice, history = coefficient_search(
        errors, costs, cap, lambda choice: assemble(layers, db, dict(zip(names, choice))),
        lambda: loss(model), steps, seed, resolution,
        None if init is None else [float(init[n]) for n in names], progress)
    assemble(layers, db, dict(zip(names, best_choice)))
    budget = {n: db.levels[k] for n, k in zip(names, best_choice)}
    chosen_cost = float(sum(costs[i, k] for i, k in enumerate(best_choice)))
    predicted = {"cost": chosen_cost, "budget": cap,
                 "sparsity": sum(budget[n] * sizes[n] for n in names) / sum(sizes.values())}
    if table is not None:
        predicted["speedup"] = table.speedup(budget)
    return Allocation(budget, best_loss, dict(zip(names, coef.tolist())), predicted, history,
                      time.perf_counter() - start)


def for_speedup(table: LatencyTable, target: float, make_budget: Callable[[float], dict],
                tol: float = 1e-3) -> tuple[float, dict]:
    """The smallest parameter x in [0, max level] whose budget make_budget(x) reaches the
    predicted speedup `target` (bisection; speedup grows with x). Returns (x, budget)."""
    hi = max(table.levels)
    best = table.speedup(make_budget(hi))
    if best < target:
        raise Unreachable(f"speedup {target:g}x cannot be reached: this allocation family "
                          f"reaches at most {best:.3f}x on this machine", best)
    lo = 0.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if table.speedup(make_budget(mid)) >= target:
            hi = mid
        else:
            lo = mid
    return hi, make_budget(hi)
