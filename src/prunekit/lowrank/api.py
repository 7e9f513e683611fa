"""The low-rank verbs on the engine: factorize a model in place, factorize one matrix, and
factorize for a measured speedup."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.errors import PruneError
from prunekit.lowrank.base import LowRankConfig
from prunekit.lowrank.modules import describe, replace_module
from prunekit.oneshot.engine import LayerResult, Report, run, transform_layer


def _check(config) -> LowRankConfig:
    if not isinstance(config, LowRankConfig):
        raise PruneError(f"config must be a low-rank config such as prunekit.SVD(rank_ratio=0.5)"
                         f" or prunekit.ALDS(flops_ratio=0.5), got {type(config).__name__}")
    return config


def lowrank(model: nn.Module, config: LowRankConfig, calib=None, *,
            budget: Mapping[str, float] | None = None, progress: bool = True) -> Report:
    """Factorize `model`'s chosen layers in place: each becomes a `Factorized` pair of plain
    layers (Linear(in, r) then Linear(r, out); a k x k convolution with r outputs then a
    1x1). calib (a batch or an iterable of batches) is needed by data-aware SVD and FLOPs
    budgets, and gives every layer's output error in the report. budget: {layer: rank_ratio}
    runs each named layer at its own share (SVD). Layers a rank would not make smaller stay
    as they are, with a note. On any error the model is left exactly as it was. Save the
    result with prunekit.structured.save_shrunk."""
    return run(model, _check(config), calib, budget=budget, progress=progress)


def lowrank_layer(weight: torch.Tensor, calib: torch.Tensor | None,
                  config: LowRankConfig, name: str = "layer") -> LayerResult:
    """Factorize one (out, in) matrix; calib is input rows X (n, in) or H = X^T X. The
    result's `factors` are (U, V) with weight = U @ V (None, with a note, when the rank
    would not make the layer smaller)."""
    return transform_layer(weight, calib, _check(config), name)


@dataclass
class LowRankSpeedup:
    """What lowrank_for_speedup chose: the budget ("flops" or "latency") and the share of the
    chosen layers' FLOPs or tabled time that built it, the predicted speedup it stood for,
    the measured speedup, every round, and the report."""

    budget: str
    kept: float
    predicted_target: float
    measured: float
    rounds: list[dict] = field(default_factory=list)
    report: Report | None = None

    def to_dict(self) -> dict:
        return {"budget": self.budget, "kept": self.kept,
                "predicted_target": self.predicted_target,
                "measured": self.measured, "rounds": self.rounds,
                "report": self.report.to_dict() if self.report else None}


def lowrank_for_speedup(model: nn.Module, config: LowRankConfig, calib, batch,
                        speedup: float, *, budget: str = "flops", rounds: int = 5,
                        band: float = 0.05, confirm: int = 1, repeats: int = 9,
                        costs: dict | None = None, timing: str = "model",
                        measure: Callable[[nn.Module, nn.Module], float] | None = None,
                        progress: bool = True) -> LowRankSpeedup:
    """Factorize `model` in place so that it runs at least `speedup` times faster on
    `batch`, measured here, factorizing as little as it can.

    A predicted speedup t asks `config` to keep 1/t of the chosen layers' FLOPs
    (budget="flops", config.at_flops) or, for ALDS, of their time in a table of every
    option measured on `batch` (budget="latency": `costs`, or latency_costs measures it as
    `timing` says);
    the measured speedup of the factorized copy (dense and factorized timed side by side,
    or `measure(dense, candidate)`) moves t, as the sparse path does
    (prunekit.budget.meet_measured_speedup). `kept` in the result is that share. Raises
    Unreachable with the best measured speedup when no round reaches the target; the model
    is then left as it was."""
    from prunekit.budget.dp import Unreachable
    from prunekit.budget.measured import meet_measured_speedup
    from prunekit.lowrank.latency import latency_costs
    from prunekit.lowrank.methods.alds import ALDS
    from prunekit.runtime.latency import measure_latency

    config = _check(config)
    if speedup < 1:
        raise PruneError(f"a speedup target is a factor >= 1, got {speedup}")
    if budget not in ("flops", "latency"):
        raise PruneError(f"budget must be 'flops' or 'latency', got {budget!r}")
    if budget == "latency" and not isinstance(config, ALDS):
        raise PruneError(f"a latency budget picks each layer's option from measured times: "
                         f"ALDS does, {config.name} does not (use budget='flops')")
    config.at_flops(1.0)  # refuses a method with no FLOPs budget, before any work
    dense = copy.deepcopy(model).eval()
    if budget == "latency" and costs is None:
        costs = latency_costs(dense, batch, config.groups, config.rank_step,
                              include=config.include, exclude=config.exclude,
                              repeats=repeats, timing=timing, progress=progress)

    def aimed(ratio: float) -> LowRankConfig:
        return config.at_latency(ratio, costs) if budget == "latency" \
            else config.at_flops(ratio)

    def build(t: float) -> dict:
        candidate = copy.deepcopy(dense)
        try:
            report = run(candidate, aimed(1 / t), calib, progress=False)
        except Unreachable as e:  # a share out of reach is a speedup out of reach
            raise Unreachable(f"a predicted {t:.3f}x is out of reach: {e}", 1 / e.best) \
                from None
        return {"model": candidate, "report": report, "kept": 1 / t}

    def measure_candidate(candidate: dict) -> float:
        if measure is not None:
            return measure(dense, candidate["model"])
        r = measure_latency({"dense": dense, "lowrank": candidate["model"]}, batch,
                            repeats=repeats)
        return r["dense"]["median_ms"] / r["lowrank"]["median_ms"]

    def log(line: str) -> None:
        if progress:
            print(f"lowrank_for_speedup ({config.name}): {line}", file=sys.stderr, flush=True)

    found = meet_measured_speedup(build, measure_candidate, speedup, rounds=rounds, band=band,
                                  confirm=confirm, log=log)
    chosen = found.model["model"]
    for name in describe(chosen):
        pair = chosen.get_submodule(name)
        pair.train(replace_module(model, name, pair).training)
    return LowRankSpeedup(budget, found.model["kept"], found.predicted_target, found.measured,
                          found.rounds, found.model["report"])
