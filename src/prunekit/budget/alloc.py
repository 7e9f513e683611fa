"""Per-layer sparsity budgets without search (uniform, global by score, ERK), and the one
home of the two facts they rest on: the global threshold over all layers' scores and the
ERK density rule (the training schedules use them too). Apply a budget with
`prunekit.prune(model, config, calib, budget=...)`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from prunekit.errors import PruneError
from prunekit.layers import weight_matrix
from prunekit.patterns import check_sparsity
from prunekit.registry import Registry

#: How a total sparsity is spread over layers: name -> function(layers, sparsity) -> budget.
#: Entries with search=True (SPDY) are searches over a latency table instead.
BUDGETS = Registry("budget")


@BUDGETS.register("uniform", search=False)
def uniform(layers: Sequence[str] | Mapping[str, nn.Module], sparsity: float) -> dict:
    """The same sparsity for every layer."""
    check_sparsity(sparsity)
    return {name: float(sparsity) for name in layers}


@BUDGETS.register("global", search=False)
def global_by_score(layers: Mapping[str, nn.Module], sparsity: float, score=None,
                    max_sparsity: float = 0.99) -> dict:
    """Per-layer sparsities from one threshold over all layers' scores (|w| by default).

    `score(name, matrix)` may return any per-weight importance of the (out, in) matrix. No
    layer is emptied: one whose share would pass `max_sparsity` is held there, and the
    threshold is taken again over the other layers for the weights still to remove.
    """
    check_sparsity(sparsity)
    check_sparsity(max_sparsity, "max_sparsity")
    scores = {}
    for name, m in layers.items():
        w = weight_matrix(m).detach().float()
        scores[name] = (w.abs() if score is None else score(name, w)).reshape(-1)
    total = sum(s.numel() for s in scores.values())
    k = int(round(sparsity * total))
    held = {}  # layers at max_sparsity
    while True:
        free = {n: s for n, s in scores.items() if n not in held}
        rest = k - sum(held.values())
        if not free:
            raise PruneError(f"global sparsity {sparsity} needs more than max_sparsity "
                             f"{max_sparsity} of every layer")
        counts = threshold_counts(free, rest)
        over = {n: int(max_sparsity * free[n].numel()) for n in free
                if counts[n] > max_sparsity * free[n].numel()}
        if not over:
            break
        held.update(over)
    counts.update(held)
    return {name: counts[name] / scores[name].numel() for name in layers}


def global_pruned(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The one global threshold: of all layers' scores together, the k smallest are pruned
    (exactly k, ties broken by position). Returns a bool tensor per layer, True where
    pruned, shaped like its scores."""
    flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    k = max(0, min(int(k), flat.numel()))
    if k:
        pruned[torch.topk(flat, k, largest=False, sorted=False).indices] = True
    out, i = {}, 0
    for name, s in scores.items():
        out[name] = pruned[i:i + s.numel()].view(s.shape)
        i += s.numel()
    return out


def global_keep_masks(scores: Mapping[str, torch.Tensor], sparsity: float
                      ) -> dict[str, torch.Tensor]:
    """Keep-masks from one threshold over every layer's scores at total `sparsity`."""
    total = sum(s.numel() for s in scores.values())
    return {n: ~p for n, p in global_pruned(scores, int(round(sparsity * total))).items()}


def threshold_counts(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, int]:
    """How many of each layer's scores are among the k smallest of all."""
    return {n: int(p.sum()) for n, p in global_pruned(scores, k).items()}


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float, power: float = 1.0,
                  kernel: bool = True) -> dict[str, float]:
    """Erdos-Renyi-Kernel densities (Evci et al. 2020, after Mocanu et al. 2018's ER): the
    density of a layer is proportional to (sum of its weight's dimensions / their
    product)^power, scaled so the weighted mean density is `density`. A layer that would
    pass 1 is made dense (the one with the largest raw density first) and the rest rescaled.
    kernel=False counts only the first two dimensions (ER)."""
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    raw = {}
    for n, shape in shapes.items():
        dims = list(shape) if kernel else list(shape)[:2]
        raw[n] = (sum(dims) / math.prod(dims)) ** power
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        budget = density * sum(sizes.values()) - sum(sizes[n] for n in dense)
        if not free or budget <= 0:
            raise PruneError(f"ERK cannot reach density {density}: too few weights to keep")
        eps = budget / sum(raw[n] * sizes[n] for n in free)
        over = [n for n in free if eps * raw[n] > 1.0]
        if not over:
            break
        dense.add(max(over, key=lambda n: raw[n]))
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


@BUDGETS.register("erk", search=False)
def erk(layers: Mapping[str, nn.Module], sparsity: float, power: float = 1.0) -> dict:
    """Per-layer sparsities from ERK densities (erk_densities) at total `sparsity`."""
    check_sparsity(sparsity)
    shapes = {n: tuple(m.weight.shape) for n, m in layers.items()}
    return {n: 1.0 - d for n, d in erk_densities(shapes, 1.0 - sparsity, power).items()}


def total_sparsity(layers: Mapping[str, nn.Module], budget: Mapping[str, float]) -> float:
    """Fraction of weights removed over the layers if each gets its budgeted sparsity."""
    n = {k: m.weight.numel() for k, m in layers.items()}
    return sum(budget[k] * n[k] for k in budget) / sum(n[k] for k in budget)
