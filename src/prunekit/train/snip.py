"""SNIP (Lee et al. 2019, "Single-shot network pruning based on connection sensitivity").

Prunes once, before training: each weight is scored by |g * w|, the sensitivity of the loss to
removing the connection (g is the gradient of the mean loss over a few batches at
initialisation), and the highest scores are kept, ranked over all layers at once as in the
paper. The mask then stays fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torch.nn.functional as F

from prunekit.errors import PruneError
from prunekit.train.base import ANY_PATTERN, SCHEDULES, FixedMask
from prunekit.train.masks import check_positive_int, final_density


def snip_scores(model, weights: dict[str, torch.Tensor], data: Iterable, loss_fn: Callable,
                num_batches: int) -> dict[str, torch.Tensor]:
    """|g * w| per weight, g the gradient of the mean loss over the first num_batches
    (torch.autograd.grad: the weights' .grad are left as they are)."""
    grads = {n: torch.zeros_like(w) for n, w in weights.items()}
    seen = 0
    for batch in data:
        if seen == num_batches:
            break
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise PruneError("SNIP.data must yield (inputs, targets) pairs")
        x, y = batch
        loss = loss_fn(model(x), y)
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad):
            raise PruneError(f"SNIP.loss_fn must return a scalar loss that depends on the "
                             f"weights, got {type(loss).__name__}"
                             f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        g = torch.autograd.grad(loss.reshape(()) / float(num_batches), list(weights.values()))
        for n, gi in zip(weights, g):
            grads[n] += gi
        seen += 1
    if seen < num_batches:
        raise PruneError(f"SNIP asked for {num_batches} batches but the data gave only {seen}")
    return {n: (grads[n] * w.detach()).abs() for n, w in weights.items()}


@SCHEDULES.register("snip", summary="one-shot pruning at initialisation by connection "
                    "sensitivity |g * w| (Lee et al. 2019)", needs=("data",),
                    patterns=ANY_PATTERN, example={"density": 0.5})
class SNIP(FixedMask):
    """prunekit.train.SNIP(model, optimizer, density=0.1, data=loader, num_batches=1).

    data yields (inputs, targets); loss_fn(model(inputs), targets) is the training loss
    (cross-entropy by default). scope="global" ranks all layers together (paper), "layer"
    keeps `density` in each. `scores` holds the sensitivities used.
    """

    def __init__(self, model, optimizer, density: float | None = None, *, data: Iterable,
                 loss_fn: Callable = F.cross_entropy, num_batches: int = 1,
                 scope: Literal["layer", "global"] = "global", **layers):
        check_positive_int(num_batches, "SNIP.num_batches")
        super().__init__(model, optimizer, **layers)
        self.density = final_density(self.holder.pattern, density, "SNIP")
        self.scores = snip_scores(model, self.holder.weights, data, loss_fn, num_batches)
        self.holder.select_all(self.scores, 1.0 - self.density, scope)
        self.holder.apply()
