"""Latency measured as a user would see it: warm-up calls first, then the median of many
timed calls, with the thread count fixed and named. Candidates compared with each other are
timed in interleaved rounds, so a change in machine load hits all of them alike."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn

from prunekit.calibrate import run_batch
from prunekit.errors import PruneError


@contextlib.contextmanager
def num_threads(n: int | None):
    """Run the body with torch.set_num_threads(n) (None leaves the setting alone)."""
    if n is None:
        yield
        return
    if n < 1:
        raise PruneError(f"threads must be >= 1, got {n}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def cpu_name() -> str:
    """The CPU model as the OS reports it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int | None = None) -> dict:
    """What a timing depends on: CPU model, cores, threads, torch version, and the GPU if any."""
    info = {"cpu": cpu_name(), "cores": os.cpu_count(),
            "threads": threads or torch.get_num_threads(), "torch": torch.__version__,
            "platform": platform.platform()}
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return info


def time_calls(calls: Mapping[str, Callable[[], object]], warmup: int = 2, repeats: int = 15,
               min_sample_s: float = 2e-3) -> dict[str, dict]:
    """Median seconds per call of each candidate, timed in interleaved rounds.

    A sample repeats a fast call enough times to last about min_sample_s, so timer
    resolution does not dominate. Returns {name: {"median", "p10", "p90", "samples"}}.
    """
    if repeats < 1 or warmup < 0:
        raise PruneError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    inner = {}
    for name, fn in calls.items():
        for _ in range(max(warmup, 1)):
            start = time.perf_counter()
            fn()
            once = time.perf_counter() - start
        inner[name] = max(1, min(1000, int(min_sample_s / max(once, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / inner[name])
    out = {}
    for name, s in samples.items():
        q = sorted(s)
        out[name] = {"median": statistics.median(q), "p10": q[int(0.1 * (len(q) - 1))],
                     "p90": q[int(round(0.9 * (len(q) - 1)))], "samples": len(q)}
    return out


def measure_latency(models: nn.Module | Mapping[str, nn.Module], batch, warmup: int = 3,
                    repeats: int = 20, threads: int | None = None) -> dict:
    """Time model(batch) (or several models side by side) under torch.inference_mode.

    Returns {name: {"median_ms", "p10_ms", "p90_ms"}} ("model" for a single model) plus
    "machine" with the thread count used.
    """
    if isinstance(models, nn.Module):
        models = {"model": models}
    for m in models.values():
        m.eval()

    def call(m):
        def f():
            return run_batch(m, batch)
        return f

    with num_threads(threads), torch.inference_mode():
        times = time_calls({k: call(m) for k, m in models.items()}, warmup, repeats,
                           min_sample_s=0.0)
        info = machine_info(threads)
    out = {k: {"median_ms": 1e3 * v["median"], "p10_ms": 1e3 * v["p10"],
               "p90_ms": 1e3 * v["p90"]} for k, v in times.items()}
    out["machine"] = info
    return out
