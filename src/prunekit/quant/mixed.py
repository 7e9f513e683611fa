"""Mixed precision: one bit width per layer under a model-size budget.

The error database (`database`): every chosen layer quantized at every bit width (default
2, 3, 4, 8 and 16, which leaves the layer in floating point) by the config's own method, from
one calibration of the unchanged model (`engine.layer_levels` on the level field "bits"):
e[l, b] = ||(W - Q_b(W)) X||^2 / ||W X||^2 on the calibration rows. A layer's cost c[l, b] is
its storage in bits on that grid (codes, scales, zero points; 16 bits a weight at 16).
`Database.allocate` picks one width per layer minimising the summed error with the summed
cost within the budget, by SPDY's dynamic program (prunekit.budget.dp.solve).

For comparison at equal size, a HAWQ-style sensitivity (Dong et al. 2019, 2020: the Hessian
trace times the squared weight perturbation) is allocated by the same program:
    Omega[l, b] = Tr(H_l) / d_l * ||RTN_b(W_l) - W_l||^2 / ||W_l X||^2
with H_l = X^T X the layer's input Hessian (HAWQ uses the loss Hessian; this layer-wise
form is what prunekit calibrates), divided by the layer's output energy so that layers compare.
It stands for H by its mean eigenvalue; the measured error uses the whole H and the method's
own updates. The two allocations differ in nothing else.

A sum of relative layer errors weighs every layer alike, which the model does not: on
SmolLM2 at the size of W3 g64 the DP on it put 11 layers at 2 bits and scored 129 perplexity
against uniform W3's 82. `Database.search` corrects it as SPDY does (Frantar and Alistarh
2022): per-layer coefficients on the errors, searched by scoring each candidate allocation
end to end on calibration data, with the database's quantized weights written into the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from prunekit.batches import as_batches, micro_batches
from prunekit.budget.dp import solve
from prunekit.errors import PruneError
from prunekit.layers import find_layers, set_weight_matrix, weight_matrix
from prunekit.oneshot.calibrate import collect_stats
from prunekit.oneshot.engine import layer_levels
from prunekit.quant.base import FLOAT_BITS, QuantConfig

LEVELS = (2, 3, 4, 8, 16)


@dataclass
class Allocation:
    """Bits per layer, the storage they take (bits) and the database error they predict."""

    bits: dict[str, int]
    size_bits: int
    error: float
    sensitivity: str  # "measured", "trace", "uniform" or "searched"

    n_weights: int = 0
    #: with `Database.search`: the loss of the allocation, the best loss after each step and
    #: the per-layer coefficients found
    loss: float | None = None
    history: list[float] = field(default_factory=list)
    coefficients: dict[str, float] = field(default_factory=dict)

    @property
    def mean_bits(self) -> float:
        """Storage bits per weight over the allocated layers (scales included)."""
        return self.size_bits / max(self.n_weights, 1)


@dataclass
class Database:
    """Per layer and bit width: measured error, HAWQ-style sensitivity, storage cost."""

    names: list[str]
    levels: tuple[int, ...]
    errors: np.ndarray  # (layers, levels) relative output error of the config's method
    trace: np.ndarray  # (layers, levels) HAWQ-style trace sensitivity (RTN perturbation)
    costs: np.ndarray  # (layers, levels) storage bits
    weights: np.ndarray  # (layers,) weights per layer
    #: with database(keep_weights=True): each layer's dequantized matrix at every level,
    #: which `search` writes into the model to score allocations end to end
    quantized: dict[str, list[torch.Tensor]] | None = None

    def size(self, bits: int) -> int:
        """Storage of every layer at `bits` (the budget of a uniform allocation)."""
        return int(self.costs[:, self._level(bits)].sum())

    def uniform(self, bits: int) -> Allocation:
        k = self._level(bits)
        return Allocation({n: bits for n in self.names}, self.size(bits),
                          float(self.errors[:, k].sum()), "uniform", int(self.weights.sum()))

    def allocate(self, budget_bits: float, sensitivity: str = "measured") -> Allocation:
        """Bits per layer minimising the summed sensitivity within `budget_bits` of storage.
        The returned error is always the measured database error of that allocation."""
        if sensitivity not in ("measured", "trace"):
            raise PruneError(f"sensitivity must be 'measured' or 'trace', got {sensitivity!r}")
        table = self.errors if sensitivity == "measured" else self.trace
        choice = solve(table, self.costs, float(budget_bits))
        rows = np.arange(len(self.names))
        return Allocation({n: self.levels[k] for n, k in zip(self.names, choice)},
                          int(self.costs[rows, choice].sum()),
                          float(self.errors[rows, choice].sum()), sensitivity,
                          int(self.weights.sum()))

    def search(self, model: nn.Module, budget_bits: float, calib=None,
               loss: Callable[[nn.Module], float] | None = None, steps: int = 100,
               seed: int = 0, progress: bool = True) -> Allocation:
        """SPDY's search (prunekit.budget.spdy.coefficient_search) instead of trusting the
        summed layer errors: per-layer coefficients on the database errors, each candidate
        the DP's allocation for them, written into the model from the database's quantized
        weights and scored by `loss(model)` (default: the relative output error against the
        unchanged model on `calib`). The first candidate is `allocate(budget_bits)`, so the
        result scores no worse than it on that loss. The model is unchanged afterwards; the
        allocation is applied by `prunekit.quantize(..., budget=alloc.bits)` as the others.
        Needs database(keep_weights=True)."""
        from prunekit.budget.spdy import coefficient_search, output_loss

        self._check_search(model)
        if loss is None:
            loss = output_loss(model, calib)
        with self._written(model) as write:
            coef, best, choice, history = coefficient_search(
                self.errors, self.costs, float(budget_bits), write, lambda: loss(model),
                steps, seed, init=None, progress=progress)
        rows = np.arange(len(self.names))
        alloc = Allocation({n: self.levels[k] for n, k in zip(self.names, choice)},
                           int(self.costs[rows, choice].sum()),
                           float(self.errors[rows, choice].sum()), "searched",
                           int(self.weights.sum()))
        alloc.loss, alloc.history = best, history
        alloc.coefficients = dict(zip(self.names, coef.tolist()))
        return alloc

    def loss_at(self, model: nn.Module, bits: dict[str, int],
                loss: Callable[[nn.Module], float]) -> float:
        """loss(model) with the database's weights of `bits` (a width for every layer)
        written in; the model unchanged afterwards. Needs database(keep_weights=True)."""
        self._check_search(model)
        with self._written(model) as write:
            write([self._level(bits[n]) for n in self.names])
            return loss(model)

    def _check_search(self, model: nn.Module) -> None:
        if self.quantized is None:
            raise PruneError("search needs the quantized weights of every level: build the "
                             "database with database(..., keep_weights=True)")
        layers = find_layers(model)
        missing = [n for n in self.names if n not in layers]
        if missing:
            raise PruneError(f"the model has no layer {missing[0]!r} of this database; pass "
                             f"the model the database was built from")

    @contextmanager
    def _written(self, model: nn.Module):
        """write(choice): each layer's database matrix at level index choice[i] into the
        model; every layer's own weights come back when the block ends."""
        all_layers = find_layers(model)
        layers = {n: all_layers[n] for n in self.names}
        dense = {n: weight_matrix(m).detach().clone() for n, m in layers.items()}

        def write(choice):
            for n, k in zip(self.names, choice):
                set_weight_matrix(layers[n], self.quantized[n][k])

        try:
            yield write
        finally:
            for n, w in dense.items():
                set_weight_matrix(layers[n], w)

    def _level(self, bits: int) -> int:
        if bits not in self.levels:
            raise PruneError(f"{bits} bits is not a level of this database ({self.levels})")
        return self.levels.index(bits)


@torch.no_grad()
def database(model: nn.Module, config: QuantConfig, calib, levels: Sequence[int] = LEVELS,
             include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
             progress: bool = True, keep_weights: bool = False) -> Database:
    """Every chosen layer at every bit width (the config at each level), from one
    calibration of the unchanged model; the model is unchanged. The layers are the config's
    (its include and exclude) unless `include` / `exclude` are given. keep_weights keeps
    every layer's quantized matrix at every level (levels x the layers' float32 size in
    memory) for `Database.search`."""
    if not isinstance(config, QuantConfig):
        raise PruneError(f"a bit-width database needs a quantization config such as "
                         f"prunekit.GPTQ(group_size=128), got {type(config).__name__}")
    include = tuple(config.include) if include is None else include
    exclude = tuple(config.exclude) if exclude is None else exclude
    levels = tuple(int(b) for b in levels)
    if not levels or len(set(levels)) != len(levels):
        raise PruneError(f"levels must be distinct bit widths, got {levels}")
    quantized, errors = layer_levels(model, config, calib, levels, include, exclude, progress)
    if not keep_weights:
        quantized = None
    layers = find_layers(model, include, exclude)
    stats = collect_stats(model, layers, micro_batches(as_batches(calib)))
    names = list(errors)
    trace = np.zeros((len(names), len(levels)))
    costs = np.zeros((len(names), len(levels)))
    weights = np.zeros(len(names), dtype=np.int64)
    for i, name in enumerate(names):
        w = weight_matrix(layers[name]).detach().float()
        h = stats[name].hessian[0]
        energy = float(torch.einsum("ij,jk,ik->", w.double(), h, w.double())) or 1.0
        mean_trace = float(torch.diagonal(h).mean())
        weights[i] = w.numel()
        for k, b in enumerate(levels):
            if config.skips_level(b):
                costs[i, k] = FLOAT_BITS * w.numel()
                continue
            grid = config.at_level(b).grid
            costs[i, k] = grid.storage_bits(tuple(w.shape))
            rtn = grid.quantize(w, layer=name).dequantize()
            trace[i, k] = mean_trace * float((rtn - w).double().square().sum()) / energy
    return Database(names, levels, np.array([errors[n] for n in names]), trace, costs, weights,
                    quantized)
