"""Per-layer sparsity budgets without search: uniform, global by score, ERK; and pruning a
model with a {layer: sparsity} budget in one calibration pass."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from prunekit.api import PruneReport, _check_config, _prune_module, _validate_layers
from prunekit.calibrate import as_batches, collect_stats
from prunekit.errors import PruneError
from prunekit.layers import find_layers, restored_on_error, weight_matrix
from prunekit.methods.base import PruneConfig
from prunekit.patterns import check_sparsity
from prunekit.progress import Progress


def uniform(layers: Sequence[str] | Mapping[str, nn.Module], sparsity: float) -> dict:
    """The same sparsity for every layer."""
    check_sparsity(sparsity)
    return {name: float(sparsity) for name in layers}


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
        counts = _threshold_counts(free, rest)
        over = {n: int(max_sparsity * free[n].numel()) for n in free
                if counts[n] > max_sparsity * free[n].numel()}
        if not over:
            break
        held.update(over)
    counts.update(held)
    return {name: counts[name] / scores[name].numel() for name in layers}


def _threshold_counts(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, int]:
    """How many of each layer's scores are among the k smallest of all (ties shared out in
    layer order, so the counts sum to k exactly)."""
    if k <= 0:
        return {name: 0 for name in scores}
    flat = torch.cat(list(scores.values()))
    threshold = torch.kthvalue(flat, min(k, flat.numel())).values
    out = {name: int((s < threshold).sum()) for name, s in scores.items()}
    rest = k - sum(out.values())
    for name, s in scores.items():
        take = min(int((s == threshold).sum()), rest)
        out[name] += take
        rest -= take
    return out


def erk(layers: Mapping[str, nn.Module], sparsity: float, power: float = 1.0) -> dict:
    """Erdos-Renyi-Kernel (Evci et al. 2020): density proportional to
    (sum of the weight's dimensions / their product)^power, scaled so that the total sparsity
    is `sparsity`; layers that would exceed density 1 are kept dense and the rest rescaled."""
    check_sparsity(sparsity)
    shapes = {n: tuple(m.weight.shape) for n, m in layers.items()}
    numel = {n: float(torch.tensor(s).prod()) for n, s in shapes.items()}
    raw = {n: (sum(s) / numel[n]) ** power for n, s in shapes.items()}
    total_keep = (1 - sparsity) * sum(numel.values())
    dense: set[str] = set()
    while True:
        free = [n for n in layers if n not in dense]
        budget = total_keep - sum(numel[n] for n in dense)
        if not free or budget <= 0:
            raise PruneError(f"ERK cannot reach sparsity {sparsity}: too few weights to keep")
        eps = budget / sum(raw[n] * numel[n] for n in free)
        over = [n for n in free if eps * raw[n] > 1]
        if not over:
            break
        dense.update(over)
    return {n: 0.0 if n in dense else 1.0 - eps * raw[n] for n in layers}


def total_sparsity(layers: Mapping[str, nn.Module], budget: Mapping[str, float]) -> float:
    """Fraction of weights removed over the layers if each gets its budgeted sparsity."""
    n = {k: m.weight.numel() for k, m in layers.items()}
    return sum(budget[k] * n[k] for k in budget) / sum(n[k] for k in budget)


def prune_with_budget(model: nn.Module, budget: Mapping[str, float], config: PruneConfig,
                      calib=None, *, progress: bool = True) -> PruneReport:
    """Prune each layer named in `budget` to its own sparsity with `config` (one calibration
    pass over the dense model). On error the model is left as it was."""
    if not budget:
        raise PruneError("the budget names no layer; give {layer_name: sparsity}")
    all_layers = find_layers(model)
    missing = [n for n in budget if n not in all_layers]
    if missing:
        raise PruneError(f"budget names {missing[0]!r}, which is not a prunable layer of "
                         f"{type(model).__name__}; layers are: {', '.join(list(all_layers)[:6])}"
                         f"{' ...' if len(all_layers) > 6 else ''}")
    for name, s in budget.items():
        check_sparsity(s, f"sparsity of {name}")
    if config.scope == "global" or config.sequential:
        raise PruneError("prune_with_budget takes a per-layer method (scope='layer', "
                         "sequential=False); the budget already sets each layer's sparsity")
    pattern, _ = _check_config(config)
    layers = {n: all_layers[n] for n in budget}
    _validate_layers(layers, pattern)
    batches = as_batches(calib)
    if config.needs == "hessian" and not batches:
        raise PruneError(f"{config.method} needs calibration data: pass calib=...")
    report = PruneReport(config.method, pattern.name, total_sparsity(layers, budget),
                         config.options() | {"budget": dict(budget)})
    start = time.perf_counter()
    with restored_on_error(model, layers):
        model.eval()
        with Progress(enabled=progress) as bar:
            stats = {}
            if batches:
                task = bar.add("calibrating", total=len(batches))
                stats = collect_stats(model, layers, batches, lambda: bar.advance(task))
            task = bar.add(f"{config.method}: layers", total=len(layers))
            for name, module in layers.items():
                if budget[name] > 0:
                    report.layers.append(_prune_module(name, module, config, pattern,
                                                       budget[name], stats.get(name)))
                bar.advance(task)
    report.seconds = time.perf_counter() - start
    return report
