"""What a run measures besides quality: size, FLOPs, latency, memory and the environment."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import threading
import time

import torch
from torch import nn

from prunekit.batches import run_batch
from prunekit.layers import find_layers, is_prunable


def compression(model: nn.Module) -> dict:
    """All parameters / nonzero parameters, over the whole model and over prunable weights."""
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(p.count_nonzero()) for p in model.parameters())
    pw = [m.weight for m in model.modules() if is_prunable(m)]
    ptotal = sum(w.numel() for w in pw)
    pnonzero = sum(int(w.count_nonzero()) for w in pw)
    return {"params": total, "nonzero_params": nonzero,
            "compression": total / max(nonzero, 1),
            "compression_prunable": ptotal / max(pnonzero, 1)}


@torch.no_grad()
def output_positions(model: nn.Module, batch) -> dict[str, int]:
    """How many output positions each prunable layer computes for one example of `batch`
    (H*W for a convolution, tokens for a linear layer), found with forward hooks."""
    positions, hooks = {}, []

    def hook(name, module):
        def fn(_, __, out):
            out = out[0] if isinstance(out, tuple) else out
            per_example = out.numel() // max(out.shape[0], 1)
            channels = getattr(module, "out_channels", None) or getattr(
                module, "out_features", None) or module.weight.shape[-1]
            positions[name] = positions.get(name, 0) + per_example // channels
        return fn

    for name, m in model.named_modules():
        if is_prunable(m):
            hooks.append(m.register_forward_hook(hook(name, m)))
    try:
        run_batch(model.eval(), first_examples(batch, 1))
    finally:
        for h in hooks:
            h.remove()
    return positions


def flops(model: nn.Module, positions: dict[str, int]) -> dict:
    """Multiply-accumulates of the prunable layers for one example: dense and touching nonzero
    weights only; their ratio is the theoretical speedup."""
    dense = sparse = 0
    for name, m in model.named_modules():
        if name in positions:
            dense += m.weight.numel() * positions[name]
            sparse += int(m.weight.count_nonzero()) * positions[name]
    return {"flops_dense": dense, "flops_sparse": sparse,
            "theoretical_speedup": dense / max(sparse, 1)}


def sparsity_for_speedup(model: nn.Module, positions: dict[str, int], layers: list[str],
                         target: float) -> float:
    """The uniform sparsity of `layers` that gives theoretical speedup `target` over all
    prunable layers (layers left dense keep their FLOPs)."""
    from prunekit.errors import PruneError

    chosen = set(layers)
    total = kept = 0
    for name, m in model.named_modules():
        if name in positions:
            f = m.weight.numel() * positions[name]
            total += f
            kept += 0 if name in chosen else f
    prunable = total - kept
    s = 1.0 - (total / target - kept) / max(prunable, 1)
    if not 0 <= s < 1:
        raise PruneError(f"FLOPs target {target:g}x cannot be met: the layers left dense cap "
                         f"the speedup at {total / max(kept, 1):.2f}x; lower the target or "
                         f"prune more layers")
    return s


def first_examples(batch, n: int):
    """The first n examples of a batch (tensor, tuple or dict of tensors), repeated if short."""
    def take(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        reps = -(-n // t.shape[0])
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:n] if reps > 1 else t[:n]
    if isinstance(batch, dict):
        return {k: take(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(take(t) for t in batch)
    return take(batch)


@torch.no_grad()
def latency(models: dict[str, nn.Module], batch, batch_sizes, warmup: int, repeats: int
            ) -> dict:
    """Median forward time (ms) per model and batch size; the models are timed interleaved,
    repeat by repeat, so that drift from other load on the machine hits them alike."""
    out = {"threads": torch.get_num_threads()}
    for bs in batch_sizes:
        x = first_examples(batch, bs)
        times = {name: [] for name in models}
        for m in models.values():
            m.eval()
            for _ in range(warmup):
                run_batch(m, x)
        for _ in range(repeats):
            for name, m in models.items():
                t = time.perf_counter()
                run_batch(m, x)
                times[name].append((time.perf_counter() - t) * 1000)
        for name, ts in times.items():
            out[f"{name}_ms_b{bs}"] = statistics.median(ts)
    return out


class PeakMemory:
    """Peak resident memory (MiB) of this process while the block runs, sampled every 5 ms,
    and its growth over the starting value."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self.start = interval, 0.0, 0.0
        self._stop = threading.Event()

    @staticmethod
    def rss_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss_mb())

    def __enter__(self):
        self.start = self.peak = self.rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss_mb())

    @property
    def growth(self) -> float:
        return self.peak - self.start


def environment() -> dict:
    """Versions, threads and CPU, recorded with every run."""
    import numpy

    import prunekit
    from prunekit.runtime.latency import cpu_name

    cpu = cpu_name()
    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "prunekit": getattr(prunekit, "__version__", "?"),
            "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "hostname": platform.node()}


def layer_names(model: nn.Module, config) -> list[str]:
    return list(find_layers(model, config.include, config.exclude, config.keep_first,
                            config.keep_last))
