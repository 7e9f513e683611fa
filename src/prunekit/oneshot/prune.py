"""The pruning verbs on the engine: prune a model in place, prune one layer, report sparsity."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from prunekit.errors import PruneError
from prunekit.layers import is_prunable
from prunekit.oneshot.engine import Report, run, transform_layer
from prunekit.oneshot.methods.base import PruneConfig


def prune(model: nn.Module, config: PruneConfig, calib=None, *,
          budget: Mapping[str, float] | None = None, loss_fn: Callable | None = None,
          progress: bool = True) -> Report:
    """Prune `model` in place with `config`; calib is a tensor or an iterable of batches.

    Batches are passed to the model as model(x), model(*tuple) or model(**dict).
    budget: {layer name: sparsity} prunes each named layer to its own sparsity (one
    calibration of the dense model); see prunekit.budget for uniform, global, ERK, OWL and
    SPDY budgets. Methods that need gradients (WoodFisher) also take loss_fn(model, batch)
    -> scalar loss. On any error the model is left exactly as it was.
    """
    _check_prune_config(config)
    return run(model, config, calib, budget=budget, loss_fn=loss_fn, progress=progress)


def prune_layer(weight: torch.Tensor, calib: torch.Tensor | None, config: PruneConfig,
                name: str = "layer"):
    """Prune one (out, in) weight matrix; returns (new weight, keep-mask).

    calib is either input rows X (n, in), whose H = X^T X is formed here, or H itself
    (a square (in, in) tensor); it may be None for methods that need no data.
    """
    _check_prune_config(config)
    result = transform_layer(weight, calib, config, name)
    keep = result.keep if result.keep is not None else torch.ones_like(result.weight,
                                                                       dtype=torch.bool)
    return result.weight, keep


def _check_prune_config(config) -> None:
    if not isinstance(config, PruneConfig):
        raise PruneError(f"config must be a pruning method config such as "
                         f"prunekit.SparseGPT(...), got {type(config).__name__}")


def sparsity_report(model: nn.Module) -> dict:
    """Zeros per prunable layer and overall: {'layers': {name: fraction}, 'total': fraction}."""
    layers, zeros, total = {}, 0, 0
    for name, m in model.named_modules():
        if is_prunable(m):
            w = m.weight.detach()
            z = int((w == 0).sum())
            layers[name] = z / w.numel()
            zeros += z
            total += w.numel()
    return {"layers": layers, "total": zeros / total if total else 0.0,
            "zeros": zeros, "weights": total}
