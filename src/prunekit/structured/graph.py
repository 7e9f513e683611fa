"""The channel dependency graph: what `build_graph` (structured.tracer) finds and what the
criteria, `verify_graph`, `remove_slices` and `shrink` work on.

A channel class is the unit of removal: every parameter slice (name, dim, index) that must go
together for the model to keep computing the same function on the channels left (pruning
one slice of it triggers pruning all the others, as in Torch-Pruning's groups). A group
holds the classes that resize the same set of (parameter, dim): budgets, rounding and
per-layer fractions act per group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


def layer_of(param: str) -> str:
    """The module a parameter name belongs to, as users name layers: "conv.weight" ->
    "conv", and a parametrized weight's "conv.parametrizations.weight.original0" -> "conv"."""
    owner = param.rsplit(".", 1)[0]
    return owner.split(".parametrizations.", 1)[0] if ".parametrizations." in owner else owner


@dataclass
class ChannelClass:
    """One prunable unit: parameter slices that must be removed together."""

    id: int
    slices: list[tuple[str, int, int]]  # (parameter name, dim, index)
    # the slices that take the channel in: a weight's input dim, contracted by a convolution
    # or matrix product (removing the channel is zeroing these; the rest produce it)
    readers: list[tuple[str, int, int]] = field(default_factory=list)

    def size(self, param: str, dim: int) -> int:
        return sum(1 for p, d, _ in self.slices if p == param and d == dim)


@dataclass
class ChannelGroup:
    """Classes that resize the same set of (parameter, dim): budgets and rounding act here."""

    key: tuple[tuple[str, int], ...]
    classes: list[ChannelClass]
    reduced: bool = False  # channels are normalised or reduced over: removal is approximate

    @property
    def name(self) -> str:
        layers = sorted({layer_of(p) for p, d in self.key if d == 0})
        return ",".join(layers[:3]) + (f",+{len(layers) - 3}" if len(layers) > 3 else "")

    def params(self) -> list[str]:
        return sorted({p for p, _ in self.key})


@dataclass
class DependencyGraph:
    """Result of tracing: the prunable channel groups and what was kept whole and why.

    `tied` lists the parameters that are one tensor under several names (a tied embedding
    and LM head), first name first: slices name the first, and cutting it cuts every alias.
    `train_runs`: the model also ran in training mode when traced (auxiliary heads were
    followed). `data_reads`: where the forward read values computed from its inputs into
    Python (see tracer.check_paths). `verified`: None, "exact" or "all" once `verify_graph`
    has checked the groups (see structured.verify)."""

    groups: list[ChannelGroup]
    param_names: list[str]
    frozen_reasons: dict[str, str] = field(default_factory=dict)
    n_ops: int = 0
    tied: list[list[str]] = field(default_factory=list)
    train_runs: bool = False
    data_reads: list[str] = field(default_factory=list)
    verified: str | None = None

    def find(self, layer: str) -> list[ChannelGroup]:
        """Groups whose producing slices include `layer`'s weight."""
        return [g for g in self.groups if any(p.startswith(layer + ".") for p, _ in g.key)]


@dataclass
class Aliases:
    """Tensors of a model known under several names. `tied`: one tensor (the same object, or
    the same view of one storage), first name first: cut together, they stay one tensor.
    `overlapping`: different views of one storage (a fused weight exposed as parts):
    cutting one apart from the others would untie them, so they are left whole."""

    tied: list[list[str]]
    overlapping: list[list[str]]


def tensor_aliases(model: nn.Module) -> Aliases:
    """The tied and overlapping parameters and buffers of `model` (structured's one home for
    telling them apart; meta tensors have no storage and are told apart by identity)."""
    by_key: dict = {}
    by_storage: dict = {}
    named = list(model.named_parameters(remove_duplicate=False))
    named += list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if t.device.type == "meta" or t.numel() == 0:
            key = storage = ("id", id(t))
        else:
            storage = t.untyped_storage().data_ptr()
            key = (storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        by_key.setdefault(key, []).append(name)
        views = by_storage.setdefault(storage, {})
        views.setdefault(key, []).append(name)
    tied = [names for names in by_key.values() if len(names) > 1]
    overlapping = [[n for names in views.values() for n in names]
                   for views in by_storage.values() if len(views) > 1]
    return Aliases(tied, overlapping)
