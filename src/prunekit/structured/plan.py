"""From scores and a budget to the classes to remove: the same fraction of every group (or
per layer, or one global threshold), and for FLOPs, parameter or latency budgets the
smallest uniform fraction that meets the target, by bisection.

Probing a fraction means measuring the model it would leave, up to 13 times per search.
`Probe` never makes a full copy for that: parameters are counted on a meta-device copy
(shapes without data), FLOPs too for models of more than META_BYTES of weights (exact
counts, checked once against the real model; a meta forward costs a few milliseconds per
op, more than a small model's real one), and otherwise a real smaller model runs, one at a
time, that shares the original's uncut weights (only its cut tensors are new).
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn
from torch.utils._pytree import tree_map

from prunekit.structured.config import ChannelPrune
from prunekit.structured.graph import DependencyGraph, layer_of
from prunekit.structured.measure import count_flops, count_params, measure_latency
from prunekit.structured.remove import meta_copy, remove_slices

#: Above this many bytes of parameters and buffers, FLOPs probes count on the meta device.
META_BYTES = 64 << 20


def removed_fraction(kept: float | None) -> float:
    """The fraction of a group's channels to remove for a kept fraction (None: keep all)."""
    return 0.0 if kept is None else 1.0 - kept


def _units_per_class(c, g) -> int:
    """Channels a class removes from the group's first producing dim (heads remove many)."""
    p, d = next(((p, d) for p, d in g.key if d == 0), g.key[0])
    return max(1, c.size(p, d))


def plan(graph: DependencyGraph, scores: dict[int, float], fraction: float,
          cfg: ChannelPrune, warn: list[str], original: dict | None = None,
          done: float = 1.0) -> list:
    """Classes to remove: `fraction` (removed) of each group (or per_layer's), lowest scores
    first; with global_ranking, one threshold over group-normalised scores.

    Iterative ratio budgets pass `original` (group key -> class count before the first step)
    and `done` (share of the schedule finished after this step): a group (or, with
    global_ranking, the whole pool) then keeps n0 - floor(fraction * done * n0) of its n0
    original classes, so the last step lands exactly on the one-shot count whatever the
    rounding of the earlier steps."""
    groups = cut_groups(graph, cfg)
    chosen = []

    def to_remove(fraction: float, n: int, n0: int | None) -> int:
        """Of n classes left now (n0 originally), how many this step removes."""
        if n0 is None:
            return int(math.floor(fraction * n + 1e-9))
        return max(0, n - (n0 - int(math.floor(fraction * done * n0 + 1e-9))))

    if cfg.global_ranking and not cfg.per_layer:
        pool = []
        for gi, g in enumerate(groups):
            vals = [scores[c.id] for c in g.classes]
            mean = sum(abs(v) for v in vals) / len(vals) or 1.0
            pool += [(scores[c.id] / mean, gi, c) for c in g.classes]
        pool.sort(key=lambda t: t[0])
        quota = {gi: max_remove(g, cfg, 0.95) for gi, g in enumerate(groups)}
        n0 = None if original is None else sum(original.get(g.key, len(g.classes))
                                                for g in groups)
        n_target = to_remove(fraction, len(pool), n0)
        taken = {gi: 0 for gi in quota}
        for _, gi, c in pool:
            if len(chosen) >= n_target:
                break
            if taken[gi] < quota[gi]:
                chosen.append(c)
                taken[gi] += 1
        return _round_groups(groups, chosen, scores, cfg)
    for g in groups:
        frac = fraction
        if cfg.per_layer:
            frac = removed_fraction(cfg.channel_ratio)
            for pat, v in cfg.per_layer.items():
                if any(fnmatch.fnmatchcase(layer_of(p), pat) for p, d in g.key if d == 0):
                    frac = removed_fraction(v)
        n = len(g.classes)
        k = to_remove(frac, n, None if original is None else original.get(g.key, n))
        limit = max_remove(g, cfg, 1.0)
        if k > limit:
            if frac * n >= n:
                warn.append(f"group {g.name}: removing {frac:.0%} would leave no channel; "
                            f"clamped to keep {n - limit}")
            k = limit
        order = sorted(g.classes, key=lambda c: scores[c.id])
        chosen += order[:k]
    return _round_groups(groups, chosen, scores, cfg)


def cut_groups(graph: DependencyGraph, cfg: ChannelPrune) -> list:
    """The groups the config may narrow: not reduced (unless include_reduced), produced by a
    layer that `cut` matches."""
    return [g for g in graph.groups if (cfg.include_reduced or not g.reduced)
            and (cfg.cut == ("*",) or any(fnmatch.fnmatchcase(layer_of(p), pat)
                                          for p, d in g.key if d == 0 for pat in cfg.cut))]


def max_remove(g, cfg: ChannelPrune, cap: float) -> int:
    n = len(g.classes)
    per = _units_per_class(g.classes[0], g)
    keep_min = max(1, math.ceil(cfg.min_channels / per))
    return max(0, min(n - keep_min, int(cap * n)))


def _round_groups(groups, chosen, scores, cfg: ChannelPrune):
    """Keep counts rounded up to multiples of round_to (single-channel classes only)."""
    if cfg.round_to == 1:
        return chosen
    ids = {id(c) for c in chosen}
    out = []
    for g in groups:
        rm = sorted([c for c in g.classes if id(c) in ids], key=lambda c: -scores[c.id])
        if _units_per_class(g.classes[0], g) == 1:
            keep = len(g.classes) - len(rm)
            target = min(len(g.classes), math.ceil(keep / cfg.round_to) * cfg.round_to)
            rm = rm[target - keep:] if target > keep else rm
        out += rm
    return out


class Probe:
    """Measure (`what`: "flops", "params" or "latency") the model that removing some classes
    would leave, without keeping a full copy of the model per probe.

    Parameters, and the FLOPs of models above META_BYTES, are counted on a meta-device copy
    of the model (and inputs): the counts follow from shapes, so they are exact and cost no
    memory. The meta count of the unpruned model is checked against `base` (the real count,
    counted if not given); if a forward cannot run on meta tensors (it reads values, or
    makes tensors on a fixed device) or counts otherwise, probes fall back to real copies.
    Those, and latency probes, run a real smaller model that shares the original's uncut
    weights, one at a time."""

    def __init__(self, model: nn.Module, example_inputs, what: str,
                 base: float | None = None):
        self.model, self.inputs, self.what = model, example_inputs, what
        self.meta = self.meta_inputs = None
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        if what == "params" or (what == "flops" and size > META_BYTES):
            if base is None:
                base = self._count(model, example_inputs)
            self.meta = meta_copy(model)
            self.meta_inputs = tree_map(
                lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, example_inputs)
            try:
                same = self._count(self.meta, self.meta_inputs) == base
            except Exception:  # noqa: BLE001 - the forward needs real data: count for real
                same = False
            if not same:
                self.meta = self.meta_inputs = None

    def _count(self, model: nn.Module, inputs) -> float:
        if self.what == "params":
            return float(count_params(model))
        return float(count_flops(model, inputs))

    def __call__(self, classes) -> float:
        if self.meta is not None:
            return self._count(remove_slices(self.meta, classes), self.meta_inputs)
        small = remove_slices(self.model, classes, share_uncut=True)
        if self.what == "latency":
            return measure_latency(small, self.inputs, repeats=5, warmup=1)
        return self._count(small, self.inputs)


def search(probe: Probe, graph: DependencyGraph, scores: dict[int, float], cfg: ChannelPrune,
           target: float, warn: list[str]) -> list:
    """The classes of the smallest uniform fraction whose smaller model meets `target`
    (bisection over the removed fraction, probing each candidate)."""
    limit = target * (1 + 1e-9)  # a target given as a ratio of the base may round just below
    lo, hi = 0.0, 0.95
    best = plan(graph, scores, hi, cfg, [])
    least = probe(best)
    if least > limit:
        warn.append(f"{probe.what} target not reached: the most that can be removed leaves "
                    f"{least:.4g} > {target:.4g}")
        return best
    for _ in range(12):
        mid = (lo + hi) / 2
        chosen = plan(graph, scores, mid, cfg, [])
        if probe(chosen) <= limit:
            hi, best = mid, chosen
        else:
            lo = mid
        if hi - lo < 2e-3:
            break
    return best
