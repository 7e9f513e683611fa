"""What every training-time schedule shares: the registry, a mask holder, a step counter,
logging, state, and constructor arguments checked before any work.

A schedule plugs into any loop with two lines: build it after the optimizer, and call
`.step()` right after `optimizer.step()` (once per optimizer step).

A new schedule is one file in prunekit/train with one decorator:

    @SCHEDULES.register("mine", summary="...", needs=(), patterns=ANY_PATTERN,
                        example={"density": 0.5, "t_end": 6})
    class Mine(Schedule): ...

Metadata: `needs`, the constructor arguments beyond (model, optimizer) that must come from
the user's data ("data": batches of (inputs, targets) and a loss_fn); `patterns`, the pattern
families it takes as `pattern=` (ANY_PATTERN, or () for a schedule that chooses its own
unit); `example`, keyword arguments for a run of a few steps on a small model, which the
generated tests (tests/test_train_registry.py) use to check every schedule.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import typing
from pathlib import Path

import torch
from torch import nn

from prunekit.config import coerce
from prunekit.errors import PruneError
from prunekit.io import read_weights, save_weights
from prunekit.patterns import Pattern
from prunekit.registry import Registry
from prunekit.train.masks import MaskHolder

_MASK_PREFIX = "__prunekit_mask__."

#: every training-time schedule, filled by the decorator in each schedule's own file
SCHEDULES = Registry("schedule", packages=("prunekit.train",))

#: the pattern families of prunekit.patterns, for schedules that take any of them
ANY_PATTERN = ("unstructured", "unstructured:row", "N:M", "1xN")


def checked_arguments(init):
    """Wrap a schedule's __init__ so that every annotated argument is checked against its
    annotation (prunekit.config.coerce, as configs are) before the body runs: a wrong type
    ("0.3" for a float, "no" for a bool, a float step) raises PruneError naming the schedule
    and the parameter, not a TypeError from inside torch halfway through the work. Missing
    and unknown arguments are PruneErrors too. Ranges stay with each schedule. A constructor
    that fails releases the hooks its mask holder had put on the model and optimizer."""
    sig = inspect.signature(init)
    hints: dict = {}

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        who = type(self).__name__
        if not hints:
            hints.update(typing.get_type_hints(init))
        try:
            bound = sig.bind(self, *args, **kwargs)
        except TypeError as e:
            raise PruneError(f"{who}: {e}") from None
        for name, value in list(bound.arguments.items()):
            kind = sig.parameters[name].kind
            if name in hints and kind not in (inspect.Parameter.VAR_KEYWORD,
                                              inspect.Parameter.VAR_POSITIONAL):
                bound.arguments[name] = coerce(hints[name], value, f"{who}.{name}")
        try:
            return init(*bound.args, **bound.kwargs)
        except BaseException:
            holder = self.__dict__.get("holder")
            if holder is not None:
                holder.release()
            raise

    return wrapper


class Schedule:
    """Base class: subclasses implement `_event(step)` and `next_event()`. Every subclass's
    constructor arguments are checked against its annotations (checked_arguments)."""

    #: masks act in the forward only (MaskHolder soft mode) until the schedule hardens them
    soft_masks: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = checked_arguments(cls.__dict__["__init__"])

    @checked_arguments
    def __init__(self, model: nn.Module, optimizer,
                 pattern: str | Pattern = "unstructured", include: tuple[str, ...] = ("*",),
                 exclude: tuple[str, ...] = (), keep_first: bool = False,
                 keep_last: bool = False):
        if optimizer is None:
            raise PruneError(f"{type(self).__name__} needs the optimizer that trains the model")
        self.model = model
        self.optimizer = optimizer
        self.holder = MaskHolder(model, optimizer, pattern, include, exclude, keep_first,
                                 keep_last, soft=self.soft_masks)
        self.step_count = 0

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return self.holder.masks

    def step(self) -> None:
        """Call once after each optimizer.step(): advances the schedule and re-applies masks."""
        self.step_count += 1
        self._event(self.step_count)
        self.holder.apply()

    def _event(self, step: int) -> None:
        raise NotImplementedError

    def next_event(self) -> dict | None:
        """The next step at which masks change, and what happens there (None: no more)."""
        raise NotImplementedError

    def sparsity(self) -> float:
        """Current fraction of pruned weights over the chosen layers."""
        return self.holder.sparsity()

    def log_dict(self) -> dict[str, float]:
        """Scalars for a logger: step, sparsity and the next event's step (-1 when none)."""
        nxt = self.next_event()
        return {"step": float(self.step_count), "sparsity": self.sparsity(),
                "next_event_step": float(nxt["step"]) if nxt else -1.0}

    # -- state ------------------------------------------------------------------------------

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        """Masks, step counter and the schedule's own state (tensors and plain values)."""
        return {"step": self.step_count, "masks": self.holder.state_dict(),
                "schedule": type(self).__name__, **self._extra_state()}

    def load_state_dict(self, state: dict) -> None:
        kind = state.get("schedule")
        if kind != type(self).__name__:
            raise PruneError(f"state was saved by a {kind} schedule, not {type(self).__name__}")
        self.step_count = int(state["step"])
        self._load_extra_state(state)
        self.holder.load_state_dict(state["masks"])


def optimizer_state(prefix: str, state_dict: dict) -> dict:
    """An optimizer's state_dict as flat schedule state, which save_sparse can write: each
    tensor under `<prefix>.state.<param>.<key>`, everything else (param groups, non-tensor
    state) as plain values under `<prefix>.rest`."""
    out, rest = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for i, st in state_dict["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"{prefix}.state.{i}.{k}"] = v.detach().clone()
            else:
                rest["state"].setdefault(str(i), {})[k] = v
    out[f"{prefix}.rest"] = rest
    return out


def load_optimizer_state(prefix: str, state: dict) -> dict | None:
    """The optimizer state_dict that optimizer_state flattened into `state` (None if absent)."""
    rest = state.get(f"{prefix}.rest")
    if rest is None:
        return None
    st: dict = {int(i): dict(d) for i, d in rest["state"].items()}
    head = f"{prefix}.state."
    for k, v in state.items():
        if k.startswith(head):
            i, key = k[len(head):].split(".", 1)
            st.setdefault(int(i), {})[key] = v
    return {"state": st, "param_groups": rest["param_groups"]}


class FixedMask(Schedule):
    """A schedule whose mask is chosen once, when it is built, and kept for all of training
    (Static, SNIP): no events."""

    def _event(self, step: int) -> None:
        pass

    def next_event(self) -> dict | None:
        return None


def save_sparse(path: str | os.PathLike, model: nn.Module, schedule: Schedule) -> Path:
    """Save model weights, masks and schedule state in one safetensors file, atomically."""
    state = schedule.state_dict()
    tensors = dict(model.state_dict())
    scalars = {}
    for k, v in state.items():
        if k == "masks":
            tensors.update({_MASK_PREFIX + n: m.to(torch.uint8) for n, m in v.items()})
        elif isinstance(v, torch.Tensor):
            tensors[f"__prunekit_state__.{k}"] = v
        else:
            scalars[k] = v
    try:
        meta = {"prunekit_schedule": json.dumps(scalars)}
    except TypeError as e:
        raise PruneError(f"{type(schedule).__name__} state is not JSON-serialisable: {e}") from e
    return save_weights(tensors, path, metadata=meta)


def check_loaded(path, tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """Refuse, before anything is loaded, tensors that would load silently wrong: NaN or Inf
    in floating ones, or a floating tensor where the model holds integers and vice versa
    (load_state_dict would cast it)."""
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise PruneError(f"{path}: tensor {k} holds NaN or Inf; the file is corrupt or the "
                             f"run diverged")
        if k in own and own[k].is_floating_point() != v.is_floating_point():
            raise PruneError(f"{path}: tensor {k} has dtype {v.dtype}, the model's has "
                             f"{own[k].dtype}; load it into the model it was saved from")


def load_sparse(path: str | os.PathLike, model: nn.Module, schedule: Schedule) -> None:
    """Restore what save_sparse wrote into `model` and `schedule` (same layer choice)."""
    from safetensors import safe_open

    tensors = read_weights(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "prunekit_schedule" not in meta:
        raise PruneError(f"{path} was not written by prunekit.train.save_sparse (no schedule "
                         f"metadata)")
    state = json.loads(meta["prunekit_schedule"])
    masks, weights = {}, {}
    for k, v in tensors.items():
        if k.startswith(_MASK_PREFIX):
            masks[k[len(_MASK_PREFIX):]] = v.bool()
        elif k.startswith("__prunekit_state__."):
            state[k[len("__prunekit_state__."):]] = v
        else:
            weights[k] = v
    state["masks"] = masks
    check_loaded(path, weights, model.state_dict())
    bad = [k for k, v in tensors.items() if k.startswith(_MASK_PREFIX) and bool((v > 1).any())]
    if bad:
        raise PruneError(f"{path}: mask {bad[0][len(_MASK_PREFIX):]} holds values other than "
                         f"0 and 1; the file is corrupt")
    schedule.load_state_dict(state)  # first: it may change the model's keys (soft masks, gates)
    own = model.state_dict()
    bad = [k for k in weights if k not in own or own[k].shape != weights[k].shape]
    if bad:
        raise PruneError(f"{path}: tensor {bad[0]} does not fit the model (missing or another "
                         f"shape); load it into the model it was saved from")
    with torch.no_grad():
        model.load_state_dict(weights, strict=False)
    schedule.holder.apply()
