"""Measured time of every low-rank option of every layer: ALDS's measured-latency budget.

FLOPs do not say what a factorized layer costs on a CPU: on this machine a ResNet-56
convolution cut to half its FLOPs by SVD ran slower than the dense one (the second layer
reads and writes the activations once more), a grouped first half ran at half speed, and
among ranks of one layer the time jumps with the kernels oneDNN picks (rank 4 of a 32-channel
3x3 convolution took 1.5x the dense time, rank 8 0.43x). So the candidates are timed, at
every group count and at up to `ranks` ranks (multiples of the config's rank_step), in one of
two ways (`timing`, as for the sparse latency table):

- "model" (the default): inside the whole model's forward pass on the batch (hooks around
  each layer, `prunekit.budget.latency_table.timed_forwards`). Variant k of the model has
  every layer replaced by its k-th option, and the variants run in interleaved rounds with
  the dense model. Alone, a pair's intermediate activation stays in cache; in the model it
  does not: on ResNet-56 a table timed alone predicted 1.50x where the model measured 0.90x.
- "hot": each layer alone on the input it sees in the model, call after call, side by side
  with the dense layer (`prunekit.runtime.time_calls`).

Layers of the same shape on inputs of the same shape share their options (and, timed alone,
their times).
"""

from __future__ import annotations

import copy
import statistics

import torch
from torch import nn

from prunekit.budget.latency_table import timed_forwards
from prunekit.errors import PruneError
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


def _options(module: nn.Module, groups, rank_step: int, ranks: int) -> list[tuple[int, int]]:
    out, cols = weight_matrix(module).shape
    conv = isinstance(module, nn.modules.conv._ConvNd)
    channels = module.in_channels if conv else cols
    return [(j, r) for j in sorted(set(groups)) if not (channels % j or (j > 1 and not conv))
            for r in rank_grid(out, cols, j, rank_step, ranks)]


def _pair(module: nn.Module, j: int, r: int, gen: torch.Generator) -> nn.Module:
    pair = empty_factorized(module, r, j).eval()
    for p in pair.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return pair


@torch.no_grad()
def latency_costs(model: nn.Module, batch, groups=(1, 2, 4, 8), rank_step: int = 1,
                  ranks: int = 12, include=("*",), exclude=(), repeats: int = 9,
                  timing: str = "model", chunk: int = 8,
                  progress: bool = True) -> dict[str, dict[str, float]]:
    """{layer: {option_key(j, r): seconds}} for every chosen layer of `model` on `batch`,
    with the dense layer under "0,0". Feed it to ALDS(latency_ratio=..., costs=...).
    timing "model" builds `chunk` model variants at a time (memory: one copy each)."""
    if timing not in ("model", "hot"):
        raise PruneError(f"timing must be 'model' or 'hot', got {timing!r}")
    layers = find_layers(model, include, exclude)
    model.eval()
    inputs = layer_inputs(model, layers, batch)
    by_signature: dict[tuple, list[str]] = {}
    for name, m in layers.items():
        if name in inputs:
            by_signature.setdefault(_signature(m, inputs[name]), []).append(name)
    options = {names[0]: _options(layers[names[0]], groups, rank_step, ranks)
               for names in by_signature.values()}
    gen = torch.Generator().manual_seed(0)
    if timing == "model":
        return _in_model(model, batch, layers, by_signature, options, repeats, chunk, gen,
                         progress)
    costs: dict[str, dict[str, float]] = {}
    with Progress(enabled=progress) as bar:
        task = bar.add("low-rank latency table (alone)", total=len(by_signature))
        for names in by_signature.values():
            module, x = layers[names[0]], inputs[names[0]]
            calls = {option_key(0, 0): lambda m=module, x=x: m(x)}
            for j, r in options[names[0]]:
                pair = _pair(module, j, r, gen)
                calls[option_key(j, r)] = lambda m=pair, x=x: m(x)
            with torch.inference_mode():
                times = time_calls(calls, repeats=repeats, min_sample_s=0.0)
            for name in names:
                costs[name] = {k: v["median"] for k, v in times.items()}
            bar.advance(task)
    return costs


def _in_model(model, batch, layers, by_signature, options, repeats, chunk, gen,
              progress) -> dict[str, dict[str, float]]:
    """Variant k: every layer at its signature's k-th option (dense where it has fewer)."""
    names = [n for group in by_signature.values() for n in group]
    option_of = {n: options[group[0]] for group in by_signature.values() for n in group}
    count = max((len(o) for o in options.values()), default=0)
    dense_samples: dict[str, list[float]] = {n: [] for n in names}
    costs: dict[str, dict[str, float]] = {n: {} for n in names}
    with Progress(enabled=progress) as bar:
        task = bar.add("low-rank latency table (in model)", total=count)
        for start in range(0, max(count, 1), chunk):
            variants = {"dense": model}
            for k in range(start, min(start + chunk, count)):
                variant = copy.deepcopy(model)
                for n in names:
                    if k < len(option_of[n]):
                        j, r = option_of[n][k]
                        variant.set_submodule(n, _pair(layers[n], j, r, gen))
                variants[str(k)] = variant
            samples = timed_forwards(variants, names, batch, repeats)
            for n in names:
                dense_samples[n] += samples["dense"][n]
                for k in range(start, min(start + chunk, count)):
                    if k < len(option_of[n]):
                        j, r = option_of[n][k]
                        costs[n][option_key(j, r)] = statistics.median(samples[str(k)][n])
            bar.advance(task, len(variants) - 1)
    for n in names:
        costs[n][option_key(0, 0)] = statistics.median(dense_samples[n])
    return costs
