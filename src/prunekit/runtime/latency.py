"""Latency measured as a user would see it: warm-up calls first, then the median of many
timed calls, with the thread count fixed and named. Candidates compared with each other are
timed in interleaved rounds, so a change in machine load hits all of them alike."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from prunekit.batches import run_batch
from prunekit.errors import PruneError


def check_threads(n) -> int | None:
    """A thread count: None (torch's setting) or an integer >= 1."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise PruneError(f"threads must be an integer >= 1 (or None for torch's setting), "
                         f"got {n!r}")
    return n


def check_count(value, what: str, least: int = 1) -> int:
    """An integer option such as repeats or warm-up calls, at least `least`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise PruneError(f"{what} must be an integer >= {least}, got {value!r}")
    return value


@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """Run the body with every module of `models` in eval mode, and give each module its own
    train/eval mode back afterwards, whatever happens: a BatchNorm frozen in eval inside a
    training model stays frozen, and a model in training stays in training."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def num_threads(n: int | None):
    """Run the body with torch.set_num_threads(n) (None leaves the setting alone)."""
    check_threads(n)
    if n is None:
        yield
        return
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


_MALLOC = {"mode": "system"}


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process for the rest of its life, as jemalloc and
    tcmalloc do. Returns False, changing nothing, where the C library is not glibc.

    By default glibc serves an allocation over its mmap threshold (at most 32 MiB) with a
    fresh mmap, unless a free heap block can take it, and unmaps it when it is freed, so a
    forward pass may map and zero its activations again on every call. MiniLM at batch 64
    x 128 tokens paid 195,000 page faults per call (1.15x its time with memory kept), and
    its 95% 1x16 block-sparse version 289,000 (1.49x): its speedup over dense measured
    1.52x instead of 1.96x (benchmarks/studies/malloc.py). Timing tools call this first
    (`--system-malloc` opts out). The price: the process keeps its peak memory."""
    if _MALLOC["mode"] == "kept":
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # musl, macOS: another mallopt
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    if mallopt(m_mmap_max, 0) != 1 or mallopt(m_trim_threshold, 1 << 30) != 1:
        return False
    _MALLOC["mode"] = "kept"
    return True


def machine_info(threads: int | None = None) -> dict:
    """What a timing depends on: CPU model, cores, threads, torch version, the GPU if any,
    and whether freed memory is kept (keep_freed_memory)."""
    info = {"cpu": cpu_name(), "cores": os.cpu_count(),
            "threads": threads or torch.get_num_threads(), "torch": torch.__version__,
            "platform": platform.platform(), "malloc": _MALLOC["mode"]}
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return info


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """Size of the CPU's largest cache (Linux sysfs), or `default` where it is not known."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
            sizes.append(int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]]
                         if text[-1] in "KM" else int(text))
        except (OSError, ValueError):
            continue
    return max(sizes, default=default)


class CacheFlush:
    """Calling it writes a buffer twice the size of the last-level cache, evicting whatever
    the previous call left there.

    Inside a whole model each layer's weights are evicted by the other layers' before the
    layer runs again; a layer timed alone, call after call, finds them in cache. At small
    batches that hides most of a dense layer's time: MiniLM's linear layers at batch 1 (2
    threads) sum to 5.0 ms timed hot and 11.2 ms cold, in a 15.2 ms model."""

    def __init__(self, nbytes: int | None = None):
        self.buffer = torch.zeros((nbytes or 2 * last_level_cache_bytes()) // 4)

    def __call__(self) -> None:
        self.buffer.add_(1.0)


def time_calls(calls: Mapping[str, Callable[[], object]], warmup: int = 2, repeats: int = 15,
               min_sample_s: float = 2e-3,
               before: Callable[[], object] | None = None) -> dict[str, dict]:
    """Median seconds per call of each candidate, timed in interleaved rounds.

    A sample repeats a fast call enough times to last about min_sample_s, so timer
    resolution does not dominate. With `before` (for instance a CacheFlush), every sample
    is one call, and before() runs, untimed, ahead of it. Returns {name: {"median", "p10",
    "p90", "samples"}}.
    """
    check_count(repeats, "repeats")
    check_count(warmup, "warmup", least=0)
    inner = {}
    for name, fn in calls.items():
        for _ in range(max(warmup, 1)):
            start = time.perf_counter()
            fn()
            once = time.perf_counter() - start
        inner[name] = 1 if before else max(1, min(1000, int(min_sample_s / max(once, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            if before is not None:
                before()
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
    "machine" with the thread count used. The models run in eval mode and get their own
    modes back afterwards. It leaves the allocator as it is: call keep_freed_memory() first
    for the steadier timings the CLI takes.
    """
    if isinstance(models, nn.Module):
        models = {"model": models}
    if not isinstance(models, Mapping) or not models or not all(
            isinstance(m, nn.Module) for m in models.values()):
        raise PruneError("measure_latency takes a model or a non-empty {name: model} mapping")
    check_count(warmup, "warmup", least=0)
    check_count(repeats, "repeats")
    check_threads(threads)

    def call(m):
        def f():
            return run_batch(m, batch)
        return f

    with num_threads(threads), eval_mode(*models.values()), torch.inference_mode():
        times = time_calls({k: call(m) for k, m in models.items()}, warmup, repeats,
                           min_sample_s=0.0)
        info = machine_info(threads)
    out = {k: {"median_ms": 1e3 * v["median"], "p10_ms": 1e3 * v["p10"],
               "p90_ms": 1e3 * v["p90"]} for k, v in times.items()}
    out["machine"] = info
    return out
