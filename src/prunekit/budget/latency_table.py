"""Measured per-layer latency at each candidate sparsity on this machine, cached and reused.

Three ways to time a layer (`timing`):

- "model" (the default): every layer is timed inside the whole model's forward pass (hooks
  around each layer), with every layer at the same level and the same kernel. What the
  layers leave in cache for each other is then part of the time: at batch 1 a model whose
  layers are all sparse fits in cache, and its layers run faster than any of them timed
  alone. Time that a kernel adds outside the layers (the next op reading its output) is
  charged to its layers.
- "cold": the layer alone, with its own shape and its real input from a sample batch, gets
  weights at each level (random mask under the pattern) and runs through every kernel that
  serves it. Each call starts with the caches flushed and only the layer's input warm, as
  inside the whole model, where the other layers evict its weights.
- "hot": the same, timed call after call (the weights stay in cache).

The fastest kernel's median is the layer's time at that level. The rest of the model
(everything but the prunable layers) is the dense model's time minus the dense layer
times. The table is a JSON file under $PRUNEKIT_CACHE/latency (default ~/.cache/prunekit),
keyed by the machine, the thread count, the model's layer shapes, the batch shape, the
levels and the timing; each layer (each level for "model") is written as soon as it is
measured, so an interrupted build resumes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

import numpy as np
import torch
from torch import nn

from prunekit.batches import run_batch
from prunekit.errors import PruneError
from prunekit.io import atomic_write_text
from prunekit.layers import find_layers, set_weight_matrix, weight_matrix
from prunekit.patterns import get_pattern
from prunekit.progress import Progress
from prunekit.runtime.convert import candidate_kernels, convert, layer_inputs
from prunekit.runtime.kernels import VERSION as KERNELS_VERSION
from prunekit.runtime.latency import (
    CacheFlush,
    machine_info,
    measure_latency,
    num_threads,
    time_calls,
)

DEFAULT_LEVELS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
TIMINGS = ("cold", "hot", "model")
VERSION = 2  # bumped when the way a table is measured changes: cached tables are then stale


def cache_dir() -> Path:
    root = Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))
    return root / "latency"


@dataclass
class LatencyTable:
    """times[layer][i] = seconds of the layer at levels[i] (its fastest kernel)."""

    levels: list[float]
    times: dict[str, list[float]]
    kernels: dict[str, list[str]]
    dense_total: float  # the whole dense model, seconds
    machine: dict
    path: str | None = None

    @property
    def other(self) -> float:
        """Seconds spent outside the prunable layers (never negative)."""
        return max(self.dense_total - sum(t[0] for t in self.times.values()), 0.0)

    def time_at(self, layer: str, sparsity: float) -> float:
        """Layer time at any sparsity, linear between measured levels (clamped at the ends)."""
        return float(np.interp(sparsity, self.levels, self.times[layer]))

    def predict(self, budget: dict[str, float]) -> float:
        """Predicted model seconds with each layer at its budgeted sparsity (others dense)."""
        return self.other + sum(self.time_at(n, budget.get(n, 0.0)) for n in self.times)

    def speedup(self, budget: dict[str, float]) -> float:
        """Predicted dense time over predicted time at `budget`: both from the same table, so
        the dense budget is exactly 1 even when the whole-model timing came out below the sum
        of the layer timings."""
        return self.predict({}) / self.predict(budget)

    def max_speedup(self) -> float:
        return self.predict({}) / (self.other + sum(min(t) for t in self.times.values()))

    def to_dict(self) -> dict:
        return {"levels": self.levels, "times": self.times, "kernels": self.kernels,
                "dense_total": self.dense_total, "machine": self.machine}


def _key(model: nn.Module, layers, inputs, levels, pattern, kernels, threads, batch_desc,
         timing) -> str:
    info = machine_info(threads)
    parts = [f"v{KERNELS_VERSION}", f"t{VERSION}", timing, info["cpu"], str(info["cores"]),
             str(info["threads"]), info["torch"], str(info["gpu"]), info["malloc"],
             type(model).__name__,
             pattern, ",".join(kernels), ",".join(f"{x:g}" for x in levels), batch_desc]
    parts += [f"{n}:{tuple(m.weight.shape)}:{tuple(inputs[n].shape)}" for n, m in layers.items()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _batch_desc(batch) -> str:
    if isinstance(batch, torch.Tensor):
        return str(tuple(batch.shape))
    if isinstance(batch, dict):
        return str({k: tuple(v.shape) for k, v in batch.items() if isinstance(v, torch.Tensor)})
    return str([tuple(v.shape) for v in batch if isinstance(v, torch.Tensor)])


def build_latency_table(model: nn.Module, batch, levels: Sequence[float] = DEFAULT_LEVELS,
                        pattern: str = "unstructured",
                        kernels: Sequence[str] = ("dense", "csr", "block"),
                        include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                        threads: int | None = None, repeats: int = 9,
                        cache: str | os.PathLike | None = None, refresh: bool = False,
                        progress: bool = True, seed: int = 0,
                        timing: str = "model") -> LatencyTable:
    """Measure (or load from the cache) the latency table of `model` on `batch`; `timing` is
    "cold", "hot" or "model" (see the module docstring)."""
    levels = sorted(float(x) for x in levels)
    if not levels or levels[0] != 0.0 or levels[-1] >= 1.0:
        raise PruneError(f"levels must start at 0.0 and stay below 1.0, got {levels}")
    if timing not in TIMINGS:
        raise PruneError(f"timing must be one of {', '.join(TIMINGS)}, got {timing!r}")
    pat = get_pattern(pattern)
    model.eval()
    layers = find_layers(model, include, exclude)
    inputs = layer_inputs(model, layers, batch)
    missing = [n for n in layers if n not in inputs]
    if missing:
        raise PruneError(f"layer {missing[0]} did not run on the sample batch; exclude it")
    key = _key(model, layers, inputs, levels, pat.name, kernels, threads, _batch_desc(batch),
               timing)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", machine_info(threads)["cpu"]).strip("-")[:40]
    path = Path(cache) if cache else cache_dir() / f"{slug}-{key}.json"
    state = {"levels": levels, "times": {}, "kernels": {}, "dense_total": None,
             "machine": machine_info(threads)}
    if path.exists() and not refresh:
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("levels") == levels:
                state.update(saved)
        except (json.JSONDecodeError, OSError):
            pass  # a corrupt cache is measured again
    gen = torch.Generator().manual_seed(seed)
    flush = CacheFlush() if timing == "cold" else None
    with num_threads(threads), Progress(enabled=progress) as bar:
        if timing == "model":
            _measure_in_model(model, batch, layers, levels, pat, kernels, repeats, gen, state,
                              path, bar)
        else:
            task = bar.add("latency table", total=len(layers))
            for name, module in layers.items():
                if name in state["times"]:
                    bar.advance(task)
                    continue
                state["times"][name], state["kernels"][name] = _measure_layer(
                    module, inputs[name], levels, pat, kernels, repeats, gen, flush)
                atomic_write_text(path, json.dumps(state, indent=1))
                bar.advance(task)
            if state["dense_total"] is None:
                state["dense_total"] = measure_latency(model, batch, repeats=repeats)["model"][
                    "median_ms"] / 1e3
                atomic_write_text(path, json.dumps(state, indent=1))
    return LatencyTable(levels, state["times"], state["kernels"], state["dense_total"],
                        state["machine"], str(path))


def _probe_weights(module, level, pattern, gen) -> torch.Tensor:
    """The layer's weights under a random mask at `level` (real values kept: a zero weight
    would be dropped by the sparse formats)."""
    w = weight_matrix(module).detach().float()
    mask = pattern.select(torch.rand(w.shape, generator=gen),
                          level if pattern.implied_sparsity is None else None)
    return torch.where(w == 0, torch.ones_like(w), w) * mask


def _monotone(times: list[float], chosen: list[str]) -> None:
    """A sparser layer never needs to be slower: it could keep the denser level's format
    with explicit zeros, so times are made non-increasing."""
    for i in range(1, len(times)):
        if times[i] > times[i - 1]:
            times[i], chosen[i] = times[i - 1], chosen[i - 1]


def timed_forwards(variants: dict[str, nn.Module], names, batch, repeats: int) -> dict:
    """Run the variants in interleaved rounds, timing each named layer inside the forward
    pass with hooks (a layer that runs twice in one pass is summed). Returns
    {variant: {"total": [seconds per pass], layer: [seconds per pass]}}."""
    samples = {v: {"total": [], **{n: [] for n in names}} for v in variants}
    spent: dict[str, float] = {}
    started: dict[str, float] = {}
    handles = []
    for model in variants.values():
        for n in names:
            module = model.get_submodule(n)
            handles.append(module.register_forward_pre_hook(
                lambda m, a, n=n: started.__setitem__(n, perf_counter())))
            handles.append(module.register_forward_hook(
                lambda m, a, o, n=n: spent.__setitem__(
                    n, spent.get(n, 0.0) + perf_counter() - started[n])))
    try:
        with torch.inference_mode():
            for model in variants.values():  # warm-up, untimed
                run_batch(model, batch)
            for _ in range(repeats):
                for v, model in variants.items():
                    spent.clear()
                    start = perf_counter()
                    run_batch(model, batch)
                    samples[v]["total"].append(perf_counter() - start)
                    for n in names:
                        samples[v][n].append(spent[n])
    finally:
        for h in handles:
            h.remove()
    return samples


def _measure_in_model(model, batch, layers, levels, pattern, kernels, repeats, gen, state,
                      path, bar) -> None:
    """timing="model": for each level, the whole model with every layer at that level, once
    per sparse kernel (layers it cannot serve stay dense there), timed interleaved with the
    dense model. A layer's time is its in-model dense time times its best ratio at the level.
    Each finished level is saved in state["levels_done"], so an interrupted build resumes."""
    names = list(layers)
    done = state.setdefault("levels_done", {})
    task = bar.add("latency table (in model)", total=len(levels) - 1)
    for i, level in enumerate(levels[1:], start=1):
        # drawn even for a finished level, so that a resumed build draws the same masks
        masks = {n: _probe_weights(layers[n], level, pattern, gen) for n in names}
        if str(i) in done:
            bar.advance(task)
            continue
        variants, served = {"dense": model}, {}
        for kind in kernels:
            if kind == "dense":
                continue
            variant = copy.deepcopy(model)
            for n in names:
                set_weight_matrix(variant.get_submodule(n), masks[n])
            _, report = convert(variant, batch, (kind,), include=names, inplace=True,
                                progress=False, choose="first")
            served[kind] = [lc.name for lc in report.layers if lc.kernel == kind]
            if served[kind]:
                variants[kind] = variant
        t = timed_forwards(variants, names, batch, repeats)
        med = {v: {k: statistics.median(x) for k, x in d.items()} for v, d in t.items()}
        # a kernel can change the time spent outside the layers too (the ops after a layer
        # read its output's memory layout): that change is charged to the layers the kernel
        # serves, in proportion to their time, so that a model with every layer at this
        # level and kernel is predicted at its measured time
        outside = {v: med[v]["total"] - sum(med[v][n] for n in names) for v in variants}
        ratios = {n: [1.0, "dense"] for n in names}
        for kind, layers_served in served.items():
            if not layers_served:
                continue
            extra = (outside[kind] - outside["dense"]) / sum(med[kind][n] for n in layers_served)
            for n in layers_served:
                ratio = max(med[kind][n] * (1 + extra), 0.0) / med["dense"][n]
                if ratio < ratios[n][0]:
                    ratios[n] = [ratio, kind]
        done[str(i)] = {"ratios": ratios, "dense": {n: t["dense"][n] for n in names},
                        "total": t["dense"]["total"]}
        atomic_write_text(path, json.dumps(state, indent=1))
        bar.advance(task)
    if len(levels) == 1 and "0" not in done:  # only the dense level: time the dense model
        t = timed_forwards({"dense": model}, names, batch, repeats)["dense"]
        done["0"] = {"ratios": {}, "dense": {n: t[n] for n in names}, "total": t["total"]}
    # every dense pass of every level pooled: one in-model dense time per layer
    base = {n: statistics.median(x for d in done.values() for x in d["dense"][n])
            for n in names}
    for n in names:
        times, chosen = [base[n]], ["dense"]
        for i in range(1, len(levels)):
            ratio, kind = done[str(i)]["ratios"][n]
            times.append(base[n] * ratio)
            chosen.append(kind)
        _monotone(times, chosen)
        state["times"][n], state["kernels"][n] = times, chosen
    state["dense_total"] = statistics.median(x for d in done.values() for x in d["total"])
    atomic_write_text(path, json.dumps(state, indent=1))


def _measure_layer(module, x, levels, pattern, kernels, repeats, gen, flush):
    """Seconds per level. Each level's sparse kernels are timed interleaved with the dense
    layer and kept as a ratio to it, scaled by the level-0 dense time: timings taken minutes
    apart under different machine load are never compared directly."""
    dense = module
    before = None if flush is None else (lambda: (flush(), x.sum()))  # input warm, rest cold
    with torch.inference_mode():
        base = time_calls({"dense": lambda: dense(x)}, repeats=repeats,
                          before=before)["dense"]["median"]
    times, chosen = [base], ["dense"]
    for s in levels[1:]:
        probe = copy.deepcopy(module)
        set_weight_matrix(probe, _probe_weights(module, s, pattern, gen))
        cands, _ = candidate_kernels(probe, x, kernels)
        with torch.inference_mode():
            t = time_calls({k: (lambda m=m: m(x)) for k, m in cands.items()}, repeats=repeats,
                           before=before)
        best = min(t, key=lambda k: t[k]["median"])
        # served densely, a level costs exactly the dense time (no ratio rounding)
        times.append(base if best == "dense" else base * t[best]["median"] / t["dense"]["median"])
        chosen.append(best)
    _monotone(times, chosen)
    return times, chosen
