"""Per-group widths under one budget: a sensitivity and a cost per candidate width of every
coupled channel group, and SPDY's dynamic program (prunekit.budget.dp.solve) to choose.

Uniform fractions cut every group alike, and FLOPs do not see what this CPU rewards: an
8-channel convolution ran no faster than a 16-channel one (benchmarks/structured.py). So:

- candidate widths: kept channels in multiples of `step` (8 suits AVX-512's 16 floats
  once paired, and multiples of 16 are among them), the full width first, at most
  `levels` of them per group, evenly spread (a head counts its channels: a 32-channel
  head is always a multiple of 8);
- sensitivity: the loss on calibration batches with that group alone cut to that width
  (lowest importance first, as `shrink` cuts), minus the unpruned loss;
- cost: what the model saves with that group alone at that width: FLOPs or parameters
  counted on the cut model, or time measured inside the model, one run per width level
  (variant k has every group at its k-th width, timed per module by hooks beside the
  unpruned model, as the sparse latency table does; a module two groups touch is split
  between them).

The savings are taken as additive over groups (exact for FLOPs and parameters when no two
groups cut the same layer, as with a network's inner channels), and the DP minimises the
summed sensitivity with the predicted cost within the budget. `shrink_for_speedup` then
rounds, as the sparse path does, until the measured speedup lands in its band.
"""

from __future__ import annotations

import copy
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from prunekit.batches import as_batches
from prunekit.budget.dp import Unreachable, solve
from prunekit.errors import PruneError
from prunekit.structured.config import ChannelPrune
from prunekit.structured.graph import ChannelGroup, DependencyGraph, layer_of
from prunekit.structured.importance import default_loss, score
from prunekit.structured.measure import count_flops, count_params, modes_restored
from prunekit.structured.plan import cut_groups, max_remove
from prunekit.structured.remove import remove_slices
from prunekit.structured.tracer import build_graph

METRICS = ("flops", "params", "latency")


def _per_class(g: ChannelGroup) -> int:
    p, d = next(((p, d) for p, d in g.key if d == 0), g.key[0])
    return max(1, g.classes[0].size(p, d))


def candidate_widths(group: ChannelGroup, step: int, levels: int, least: int) -> list[int]:
    """Kept classes, largest first: the full group, then counts whose channels are a
    multiple of `step`, at least `least` classes, at most `levels` in all (evenly spread)."""
    n, per = len(group.classes), _per_class(group)
    fit = [k for k in range(n - 1, least - 1, -1) if (k * per) % step == 0]
    if len(fit) > levels - 1:  # evenly spread down to the narrowest (never next to full)
        fit = [fit[round(i * (len(fit) - 1) / (levels - 1))] for i in range(1, levels)]
    return [n, *dict.fromkeys(fit)]


def classes_for(groups: Sequence[ChannelGroup], widths: Sequence[int],
                scores: dict[int, float]) -> list:
    """The classes to remove so that group i keeps widths[i] classes (lowest scores go)."""
    out = []
    for g, w in zip(groups, widths):
        out += sorted(g.classes, key=lambda c: scores[c.id])[:len(g.classes) - w]
    return out


@dataclass
class WidthTable:
    """Per searched group: candidate widths (kept classes, full first), the sensitivity and
    the saving of each (saving[metric][g][k]: what the model saves with g alone at width k),
    and the unpruned model's totals."""

    groups: list[ChannelGroup]
    widths: list[list[int]]
    errors: list[list[float]] | None
    saving: dict[str, list[list[float]]] = field(default_factory=dict)
    base: dict[str, float] = field(default_factory=dict)

    def predict(self, metric: str, choice: Sequence[int]) -> float:
        """The model's cost with group g at its choice[g]-th width (savings added)."""
        return self.base[metric] - sum(s[k] for s, k in zip(self.saving[metric], choice))

    def cost_at(self, metric: str, keep: Sequence[float]) -> float:
        """Cost with each group keeping (at least) a fraction: the smallest candidate at or
        above it (what AMC's agent asks). Nondecreasing in every fraction, as a search that
        caps its actions needs: a narrower width is credited at least the saving of every
        wider one (measured savings are noisy, and an 8-channel convolution can run as slow
        as a 16-channel one; the DP never picks such a width anyway)."""
        choice = self.snap(keep)
        return self.base[metric] - sum(max(s[:k + 1]) for s, k in zip(self.saving[metric],
                                                                        choice))

    def snap(self, keep: Sequence[float]) -> list[int]:
        out = []
        for ws, k in zip(self.widths, keep):
            need = k * ws[0]
            ok = [i for i, w in enumerate(ws) if w >= need - 1e-9]
            out.append(max(ok))  # widths are descending: the last that fits is the smallest
        return out

    def allocate(self, metric: str, target: float, resolution: int = 2000) -> list[int]:
        """Width index per group minimising the summed sensitivity with the predicted cost
        at most `target` (the DP). Raises Unreachable with the least predicted cost."""
        if self.errors is None:
            raise PruneError("this width table has no sensitivities: build it with calib")
        top = [max(s) for s in self.saving[metric]]
        floor = self.base[metric] - sum(top)  # every group at its cheapest width
        costs = [[t - x for x in s] for t, s in zip(top, self.saving[metric])]
        try:
            return solve(np.array(_pad(self.errors, np.inf)), np.array(_pad(costs, 0.0)),
                         target - floor, resolution)
        except Unreachable as e:
            raise Unreachable(f"a {metric} budget of {target:.6g} cannot be met: the "
                              f"narrowest widths are predicted at {e.best + floor:.6g} "
                              f"({(e.best + floor) / self.base[metric]:.3f} of the model)",
                              e.best + floor) from None


def _pad(rows, fill) -> list[list[float]]:
    n = max(len(r) for r in rows)
    return [list(r) + [fill] * (n - len(r)) for r in rows]


def searched_groups(graph: DependencyGraph, cfg: ChannelPrune) -> list[ChannelGroup]:
    return [g for g in cut_groups(graph, cfg) if max_remove(g, cfg, 1.0) > 0]


def _loss(model, batches, loss_fn) -> float:
    with torch.no_grad(), modes_restored(model):
        model.eval()
        return float(sum(float(loss_fn(model, b)) for b in batches) / len(batches))


@torch.no_grad()
def width_table(model: nn.Module, graph: DependencyGraph, scores: dict[int, float],
                example_inputs, cfg: ChannelPrune, calib=None,
                loss_fn: Callable | None = None, metrics: Sequence[str] = ("flops",),
                step: int = 8, levels: int = 12, repeats: int = 9,
                log: Callable[[str], None] | None = None) -> WidthTable:
    """Candidate widths of every searched group, their sensitivities on `calib` (skipped
    without it) and their savings in `metrics`, measured on `example_inputs`."""
    groups = searched_groups(graph, cfg)
    if not groups:
        raise PruneError("no channel group can be narrowed (all are whole, ignored or at "
                         "min_channels)")
    widths = [candidate_widths(g, step, levels, len(g.classes) - max_remove(g, cfg, 1.0))
              for g in groups]
    loss_fn = loss_fn or default_loss
    batches = as_batches(calib) if calib is not None else []
    errors = None
    if batches:
        base_loss = _loss(model, batches, loss_fn)
        errors = []
        for i, (g, ws) in enumerate(zip(groups, widths)):
            row = [0.0]
            for w in ws[1:]:
                small = remove_slices(model, classes_for([g], [w], scores), share_uncut=True)
                row.append(_loss(small, batches, loss_fn) - base_loss)
            errors.append(row)
            if log:
                log(f"sensitivity {i + 1}/{len(groups)} {g.name}: " +
                    ", ".join(f"{w}:{e:.3f}" for w, e in zip(ws, row)))
    table = WidthTable(groups, widths, errors)
    for metric in metrics:
        if metric not in METRICS:
            raise PruneError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if metric == "latency":
            _time_widths(model, table, scores, example_inputs, repeats)
            continue
        count = (lambda m: float(count_flops(m, example_inputs))) if metric == "flops" \
            else (lambda m: float(count_params(m)))
        table.base[metric] = count(model)
        table.saving[metric] = [
            [0.0] + [table.base[metric] - count(remove_slices(model, classes_for([g], [w],
                                                                                  scores),
                                                              share_uncut=True))
                     for w in ws[1:]] for g, ws in zip(groups, widths)]
    return table


def _time_widths(model, table: WidthTable, scores, example_inputs, repeats) -> None:
    """Savings in seconds, per group and width level, timed inside the model."""
    from prunekit.budget.latency_table import timed_forwards

    owners: dict[str, list[int]] = {}
    for gi, g in enumerate(table.groups):
        for p in g.params():
            mods = owners.setdefault(layer_of(p), [])
            if gi not in mods:
                mods.append(gi)
    names = list(owners)
    levels = max(len(w) for w in table.widths)
    variants = {"dense": model}
    for k in range(1, levels):
        ws = [w[k] if k < len(w) else w[0] for w in table.widths]
        variants[str(k)] = remove_slices(model, classes_for(table.groups, ws, scores))
    t = timed_forwards(variants, names, example_inputs, repeats)
    med = {v: {n: statistics.median(x) for n, x in d.items()} for v, d in t.items()}

    def group_time(variant: str, gi: int) -> float:
        return sum(med[variant][n] / len(owners[n]) for n in names if gi in owners[n])

    table.base["latency"] = med["dense"]["total"]
    table.saving["latency"] = [
        [0.0] + [group_time("dense", gi) - group_time(str(k), gi) for k in range(1, len(ws))]
        for gi, ws in enumerate(table.widths)]


def dp_classes(model, graph, scores, example_inputs, cfg: ChannelPrune, calib, loss_fn=None,
               base: dict | None = None, table: WidthTable | None = None, step: int = 8,
               log=None) -> tuple[list, WidthTable]:
    """The classes `shrink` removes under ChannelPrune(allocation="dp"): widths chosen by
    the DP for the config's flops, params or latency ratio."""
    what = cfg.budget
    if what is None:
        raise PruneError("allocation='dp' needs a flops_ratio, params_ratio or latency_ratio "
                         "budget (channel_ratio is the same fraction everywhere)")
    if table is None:
        table = width_table(model, graph, scores, example_inputs, cfg, calib, loss_fn, (what,),
                            step=step, log=log)
    goal = {"flops": cfg.flops_ratio, "params": cfg.params_ratio,
            "latency": cfg.latency_ratio}[what]
    choice = table.allocate(what, goal * table.base[what])
    widths = [w[k] for w, k in zip(table.widths, choice)]
    return classes_for(table.groups, widths, scores), table


@dataclass
class SpeedupShrink:
    """What shrink_for_speedup chose: the model, the predicted share of the dense time it
    was built for, the measured speedup, every round, and the widths."""

    model: nn.Module
    predicted_target: float
    measured: float
    rounds: list[dict]
    widths: dict[str, int]
    table: WidthTable | None = None


def shrink_for_speedup(model: nn.Module, config: ChannelPrune, example_inputs, speedup: float,
                       calib=None, loss_fn=None, *, step: int = 8, rounds: int = 5,
                       band: float = 0.05, confirm: int = 1, repeats: int = 9,
                       table: WidthTable | None = None,
                       measure: Callable[[nn.Module, nn.Module], float] | None = None,
                       progress: bool = True) -> SpeedupShrink:
    """A smaller copy of `model` that runs at least `speedup` times faster on
    `example_inputs` (measured here, dense and shrunk side by side), cutting as little as
    it can. config.allocation "dp": widths from the DP over a width table measured in the
    model (latency) for a predicted time of 1/t of the dense one; "uniform": the same
    fraction of every group, the smallest whose FLOPs are 1/t of the dense ones. The
    measured speedup moves t (prunekit.budget.meet_measured_speedup). Raises Unreachable
    with the best measured speedup."""
    from prunekit.budget.measured import meet_measured_speedup
    from prunekit.runtime.latency import measure_latency as timed
    from prunekit.structured.plan import Probe, search

    if speedup < 1:
        raise PruneError(f"a speedup target is a factor >= 1, got {speedup}")
    dense = copy.deepcopy(model).eval()
    graph = build_graph(dense, example_inputs, config.ignore)
    scores = score(dense, graph, config.importance, calib, loss_fn, config.seed)

    def say(line: str) -> None:
        if progress:
            print(f"shrink_for_speedup ({config.allocation}): {line}", file=sys.stderr,
                  flush=True)

    if config.allocation == "dp" and table is None:
        table = width_table(dense, graph, scores, example_inputs, config, calib, loss_fn,
                            ("latency",), step=step, repeats=repeats, log=say)
    base_flops = float(count_flops(dense, example_inputs))

    def build(t: float) -> dict:
        if config.allocation == "dp":
            choice = table.allocate("latency", table.base["latency"] / t)
            widths = [w[k] for w, k in zip(table.widths, choice)]
            chosen = classes_for(table.groups, widths, scores)
        else:
            probe = Probe(dense, example_inputs, "flops", base_flops)
            least = probe(_most(graph, scores, config))
            if least > base_flops / t:
                raise Unreachable(f"FLOPs {1 / t:.3f} of the model are out of reach",
                                  base_flops / least)
            chosen = search(probe, graph, scores, config, base_flops / t, [])
        small = remove_slices(dense, chosen)
        ids = {id(c) for c in chosen}
        kept = {g.name: sum(1 for c in g.classes if id(c) not in ids) for g in graph.groups}
        return {"model": small, "widths": kept}

    def measure_candidate(c: dict) -> float:
        if measure is not None:
            return measure(dense, c["model"])
        r = timed({"dense": dense, "small": c["model"]}, example_inputs, repeats=repeats)
        return r["dense"]["median_ms"] / r["small"]["median_ms"]

    found = meet_measured_speedup(build, measure_candidate, speedup, rounds=rounds, band=band,
                                  confirm=confirm, log=say)
    return SpeedupShrink(found.model["model"], found.predicted_target, found.measured,
                         found.rounds, found.model["widths"], table)


def _most(graph, scores, cfg):
    from prunekit.structured.plan import plan
    return plan(graph, scores, 0.95, cfg, [])


def amc_widths(model: nn.Module, table: WidthTable, scores: dict[int, float],
               evaluate: Callable[[nn.Module], float], metric: str, target: float,
               **amc_options):
    """AMC (prunekit.budget.amc) over the table's groups: keep ratios per group, the cost
    predicted from the table (FLOPs or latency), the reward evaluate(shrunk model) (accuracy
    in %). Returns (AMCResult, widths of its best episode)."""
    from prunekit.budget.amc import amc_search

    features = [(len(g.classes) * _per_class(g), len(g.params())) for g in table.groups]

    def widths_of(keep):
        return [w[k] for w, k in zip(table.widths, table.snap(keep))]

    def reward(keep) -> float:
        small = remove_slices(model, classes_for(table.groups, widths_of(keep), scores))
        return float(evaluate(small))

    lbound = min(w[-1] / w[0] for w in table.widths)  # groups narrower than this saturate
    result = amc_search(features, lambda keep: table.cost_at(metric, keep), reward, target,
                        lbound=amc_options.pop("lbound", lbound), **amc_options)
    return result, widths_of(result.keep)
