"""Measured time of every low-rank option of every layer: ALDS's measured-latency budget.

FLOPs do not say what a factorized layer costs on a CPU: on this machine a ResNet-56
convolution cut to half its FLOPs by SVD ran slower than the dense one (the second layer
reads and writes the activations once more), a grouped first half ran at half speed, and
among ranks of one layer the time jumps with the kernels oneDNN picks (rank 4 of a 32-channel
3x3 convolution took 1.5x the dense time, rank 8 0.43x). So the candidates are timed: each
layer, fed the input it sees in the model on the given batch, runs as its Factorized pair at
every group count and at up to `ranks` ranks (multiples of the config's rank_step), side by
side with the dense layer (interleaved rounds, `prunekit.runtime.time_calls`). Layers of the
same shape on inputs of the same shape are timed once.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.layers import find_layers, weight_matrix
from prunekit.lowrank.base import factored_params
from prunekit.lowrank.modules import empty_factorized
from prunekit.progress import Progress
from prunekit.runtime.convert import layer_inputs
from prunekit.runtime.latency import time_calls


def option_key(groups: int, rank: int) -> str:
    """The key of a (groups, rank) option in a cost table; "0,0" is the dense layer."""
    return f"{groups},{rank}"


def _signature(module: nn.Module, x: torch.Tensor) -> tuple:
    conv = isinstance(module, nn.modules.conv._ConvNd)
    return (type(module).__name__, tuple(module.weight.shape), tuple(x.shape),
            *((module.stride, module.padding, module.dilation) if conv else ()))


def rank_grid(out: int, inputs: int, groups: int, step: int, count: int) -> list[int]:
    """Up to `count` ranks, multiples of `step`, spread over those that make the layer
    smaller at `groups` groups (the smallest rank always among them)."""
    top = 0
    r = step
    while r <= min(out, inputs // groups) and \
            factored_params(out, inputs, r, groups) < out * inputs:
        top = r
        r += step
    if top == 0:
        return []
    every = list(range(step, top + 1, step))
    if len(every) <= count:
        return every
    picks = {every[round(i * (len(every) - 1) / (count - 1))] for i in range(count)}
    return sorted(picks)


@torch.no_grad()
def latency_costs(model: nn.Module, batch, groups=(1, 2, 4, 8), rank_step: int = 1,
                  ranks: int = 12, include=("*",), exclude=(), repeats: int = 9,
                  progress: bool = True) -> dict[str, dict[str, float]]:
    """{layer: {option_key(j, r): seconds}} for every chosen layer of `model` on `batch`,
    with the dense layer under "0,0". Feed it to ALDS(latency_ratio=..., costs=...)."""
    layers = find_layers(model, include, exclude)
    model.eval()
    inputs = layer_inputs(model, layers, batch)
    by_signature: dict[tuple, list[str]] = {}
    for name, m in layers.items():
        if name in inputs:
            by_signature.setdefault(_signature(m, inputs[name]), []).append(name)
    gen = torch.Generator().manual_seed(0)
    costs: dict[str, dict[str, float]] = {}
    with Progress(enabled=progress) as bar:
        task = bar.add("low-rank latency table", total=len(by_signature))
        for names in by_signature.values():
            module, x = layers[names[0]], inputs[names[0]]
            out, cols = weight_matrix(module).shape
            channels = module.in_channels if isinstance(module, nn.modules.conv._ConvNd) \
                else cols
            calls = {option_key(0, 0): lambda m=module, x=x: m(x)}
            for j in sorted(set(groups)):
                if channels % j or (j > 1 and not isinstance(module, nn.modules.conv._ConvNd)):
                    continue
                for r in rank_grid(out, cols, j, rank_step, ranks):
                    pair = empty_factorized(module, r, j).eval()
                    for p in pair.parameters():
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                    calls[option_key(j, r)] = lambda m=pair, x=x: m(x)
            with torch.inference_mode():
                times = time_calls(calls, repeats=repeats, min_sample_s=0.0)
            for name in names:
                costs[name] = {k: v["median"] for k, v in times.items()}
            bar.advance(task)
    return costs
