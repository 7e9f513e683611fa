"""Safety net for the traced graph: shrink each group on the example inputs and check that the
smaller model still runs and equals the masked model. Groups that break (a module reshapes
with a size read from another tensor, which the tracer cannot see) are found by bisection, in
O(k log n) forward passes for k bad groups out of n, and frozen with a warning.

`build_graph` only traces; `shrink` calls `verify_graph` on every graph it uses (once: a
graph remembers that it was verified), and users who build a graph themselves call it to get
the same guarantee."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from prunekit.batches import plain_outputs, run_batch
from prunekit.structured.graph import ChannelClass, ChannelGroup, DependencyGraph
from prunekit.structured.measure import modes_restored
from prunekit.structured.remove import recompute_hook_weights, remove_slices
from prunekit.structured.tracer import tensors_in

#: Relative tolerance (to the largest output) between the shrunk and the masked model.
RTOL = 1e-4


def probe(group: ChannelGroup) -> list[ChannelClass]:
    """The classes removed to test a group: every third one, never all of them."""
    n = len(group.classes)
    if n < 2:
        return []
    return group.classes[1::3][: n - 1]


def _floats(out) -> list[torch.Tensor]:
    return [t for t in tensors_in(plain_outputs(out)) if t.is_floating_point()]


def _masked_outputs(model: nn.Module, classes: list[ChannelClass], example_inputs):
    """Outputs (eval mode) with every slice of `classes` zeroed; the model is restored."""
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    kept = _normed_directions(model)
    saved = []
    with torch.no_grad():
        try:
            for c in classes:
                for p, d, i in c.slices:
                    if p.endswith("running_var") or kept.get(p) == d:
                        continue  # a zero variance or norm would divide by zero; the scale
                        # (batch norm's, weight norm's g) is zeroed instead
                    s = named[p].select(d, i)
                    saved.append((s, s.clone()))
                    s.zero_()
            return _floats(run_batch(model, example_inputs))
        finally:
            for s, v in reversed(saved):
                s.copy_(v)
            recompute_hook_weights(model)  # the old weight norm keeps w from the last call


def _shrinks_cleanly(model: nn.Module, groups: list[ChannelGroup], example_inputs,
                     train_runs: bool) -> str | None:
    """None if removing the probe classes of `groups` keeps the model equal to the masked
    model (only running and shapes for reduced groups); else why not."""
    classes = [c for g in groups for c in probe(g)]
    if not classes:
        return None
    exact = not any(g.reduced for g in groups)
    try:
        ref = _masked_outputs(model, classes, example_inputs)
        small = remove_slices(model, classes, share_uncut=True)  # only cut tensors are new
        with torch.no_grad():
            got = _floats(run_batch(small.eval(), example_inputs))
            if train_runs:  # training mode may run more (auxiliary heads)
                run_batch(small.train(), example_inputs)
    except Exception as e:  # noqa: BLE001 - any failure means this shrink is unsafe
        return f"{type(e).__name__}: {str(e)[:200]}"
    if len(got) != len(ref) or any(a.shape != b.shape for a, b in zip(got, ref)):
        return "output shapes change"
    if exact:
        for a, b in zip(got, ref):
            scale = b.abs().max().clamp_min(1e-12) if b.numel() else 1.0
            if b.numel() and float((a - b).abs().max() / scale) > RTOL:
                return "outputs differ from the masked model"
    return None


def _bad_groups(model, groups, example_inputs, train_runs, found: dict) -> None:
    why = _shrinks_cleanly(model, groups, example_inputs, train_runs)
    if why is None:
        return
    if len(groups) == 1:
        found[id(groups[0])] = why
        return
    before = len(found)
    half = len(groups) // 2
    _bad_groups(model, groups[:half], example_inputs, train_runs, found)
    _bad_groups(model, groups[half:], example_inputs, train_runs, found)
    if len(found) == before:  # each half is fine alone, together not: keep all of them
        for g in groups:
            found[id(g)] = f"breaks together with other groups ({why})"


def verify_graph(model: nn.Module, graph: DependencyGraph, example_inputs,
                 reduced: bool = False) -> DependencyGraph:
    """Freeze (drop from `graph.groups`, in place) every group whose shrink breaks the model
    on `example_inputs`, with a warning naming its modules; return the graph. Reduced groups
    (pruned only with include_reduced) are checked only when `reduced`. Each check holds one
    smaller model that shares the original's uncut weights; the model is left as it was
    (weights, buffers and every module's mode)."""
    level = "all" if reduced else "exact"
    if graph.verified in (level, "all"):
        return graph
    testable = [g for g in graph.groups if probe(g) and (reduced or not g.reduced)]
    found: dict[int, str] = {}
    with modes_restored(model):
        model.eval()
        for _ in range(3):  # re-check what is left: interactions between groups
            left = [g for g in testable if id(g) not in found]
            n = len(found)
            _bad_groups(model, left, example_inputs, graph.train_runs, found)
            if len(found) == n:
                break
    graph.verified = level
    if not found:
        return graph
    bad = [g for g in graph.groups if id(g) in found]
    graph.groups = [g for g in graph.groups if id(g) not in found]
    for g in bad:
        graph.frozen_reasons[g.name] = f"shrinking it breaks the model: {found[id(g)]}"
    names = "; ".join(f"{g.name} ({found[id(g)]})" for g in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    warnings.warn(f"{len(bad)} channel group(s) left unpruned because shrinking them breaks the "
                  f"model on the example inputs: {names}{more}; pass such modules in ignore=... "
                  f"to silence this", stacklevel=3)
    return graph


def _normed_directions(model: nn.Module) -> dict[str, int]:
    """{name of a weight-normed direction v: its norm dim} (nn.utils.parametrizations and
    the old hook form): zeroing a slice of v along that dim would divide 0 by 0, zeroing the
    matching slice of g removes the channel (w = g * v / ||v||)."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.weight_norm import WeightNorm

    out = {}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if parametrize.is_parametrized(m):
            for tname, plist in m.parametrizations.items():
                for p in plist:
                    if type(p).__name__ == "_WeightNorm" and p.dim != -1:
                        out[f"{prefix}parametrizations.{tname}.original1"] = p.dim
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm) and hook.dim not in (None, -1):
                out[f"{prefix}{hook.name}_v"] = hook.dim
    return out
