"""Sizes and speed of a model as structured pruning counts them (one home for its params,
FLOPs and latency), and the per-module train/eval modes that every measurement gives back."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunekit.batches import run_batch


@contextmanager
def modes_restored(model: nn.Module) -> Iterator[nn.Module]:
    """Give every module its own train/eval mode back on leaving (a BatchNorm frozen in eval
    inside a training model stays in eval), whatever the body set."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def copy_modes(source: nn.Module, target: nn.Module) -> None:
    """Give the modules of `target` the modes of the modules of the same name in `source`
    (a shrunk model keeps its original's modes, module by module)."""
    modes = {name: m.training for name, m in source.named_modules()}
    for name, m in target.named_modules():
        if name in modes:
            m.training = modes[name]


def count_params(model: nn.Module) -> int:
    """Parameters of `model`, each tensor object once (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, example_inputs) -> int:
    """FLOPs of one forward pass in eval mode on example_inputs (torch's counter: 2 per
    multiply-add). Works on a meta-device model with meta inputs: FLOPs follow shapes."""
    with modes_restored(model), FlopCounterMode(display=False) as counter:
        run_batch(model.eval(), example_inputs)
    return int(counter.get_total_flops())


@torch.inference_mode()
def measure_latency(model: nn.Module, example_inputs, repeats: int = 10,
                    warmup: int = 2) -> float:
    """Median wall time of a forward pass in eval mode, in milliseconds."""
    with modes_restored(model):
        model.eval()
        for _ in range(warmup):
            run_batch(model, example_inputs)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            run_batch(model, example_inputs)
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)
