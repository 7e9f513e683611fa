"""Batches: the one place that runs a batch through a model and reads what comes out.

A batch is a tensor (`model(x)`), a tuple or list (`model(*batch)`) or a dict
(`model(**batch)`). Calibration data is a batch or an iterable of batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from prunekit.errors import PruneError, all_finite

Batch = torch.Tensor | tuple | list | Mapping


def token_mask(batch: Batch) -> torch.Tensor | None:
    """The (batch, tokens) bool mask of real tokens of a transformers-style batch, if any."""
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
        mask = batch["attention_mask"]
        if mask.dim() == 2:
            return mask.bool()
    return None


def _tensors(batch: Batch) -> list[torch.Tensor] | None:
    """The tensors a batch holds (None: not a tensor, mapping, tuple or list)."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [v for v in batch.values() if isinstance(v, torch.Tensor)]
    if isinstance(batch, (tuple, list)):
        return [v for v in batch if isinstance(v, torch.Tensor)]
    return None


def _check_batch(batch: Batch, index: int) -> None:
    tensors = _tensors(batch)
    if tensors is None:
        raise PruneError(
            f"calibration batch {index} is a {type(batch).__name__}; give tensors, tuples of "
            f"tensors (positional arguments) or dicts (keyword arguments)"
        )
    if not tensors or any(t.numel() == 0 for t in tensors):
        raise PruneError(f"calibration batch {index} is empty")
    for t in tensors:
        if t.is_floating_point() and not all_finite(t):
            raise PruneError(f"calibration batch {index} holds NaN or Inf")


def _cut(batch: Batch, start: int, stop: int) -> Batch:
    def cut(v):
        return v[start:stop] if isinstance(v, torch.Tensor) else v

    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {k: cut(v) for k, v in batch.items()}
    return type(batch)(cut(v) for v in batch)


def _shared_rows(tensors: list[torch.Tensor] | None) -> int | None:
    """The first dimension every tensor of a batch shares (its examples), or None."""
    if not tensors or any(t.dim() == 0 for t in tensors) or len({t.shape[0] for t in tensors}) != 1:
        return None
    return tensors[0].shape[0]


def first_rows(batch: Batch, rows: int = 2) -> Batch:
    """The batch cut to its first `rows` examples: every tensor sliced along its first
    dimension, when all of them share that dimension; otherwise the batch as it is."""
    n = _shared_rows(_tensors(batch))
    return batch if n is None or n <= rows else _cut(batch, 0, rows)


#: tokens per calibration forward: a block's activations for 4096 tokens stay near the
#: CPU's caches; one 16k-token batch ran SmolLM2's blocks 25% slower (and held 4x the memory)
MICRO_TOKENS = 4096


def micro_batches(batches: list[Batch], tokens: int | None = None) -> list[Batch]:
    """Token batches (their first tensor (examples, tokens) of integer ids, as transformers'
    input_ids) cut along the examples into pieces of at most `tokens` tokens; other batches
    as they are. Calibration statistics are sums over rows, so the pieces give the same
    statistics as the whole batch (up to the order of floating-point sums)."""
    tokens = tokens or MICRO_TOKENS
    out = []
    for batch in batches:
        tensors = _tensors(batch)
        n = _shared_rows(tensors)
        first = tensors[0] if tensors else None
        if n is None or first.dim() != 2 or first.is_floating_point() or first.is_complex():
            out.append(batch)
            continue
        step = max(1, tokens // max(1, first.shape[1]))
        out.extend([batch] if n <= step else
                   [_cut(batch, i, min(i + step, n)) for i in range(0, n, step)])
    return out


def run_batch(model: nn.Module, batch: Batch):
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(*batch)


def first_calls(model: nn.Module, layers: Mapping[str, nn.Module], batch: Batch,
                fn: Callable[[nn.Module, torch.Tensor], object], on: str = "input") -> dict:
    """{layer name: fn(module, tensor)} for the first call of each layer when `batch` runs
    through the model (inference mode), where tensor is the layer's input or its output."""
    seen = {}

    def hook(name):
        def pre(module, args):
            seen.setdefault(name, fn(module, args[0]))

        def post(module, args, out):
            seen.setdefault(name, fn(module, out))
        return pre if on == "input" else post

    handles = [m.register_forward_pre_hook(hook(n)) if on == "input"
               else m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.inference_mode():
            run_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def as_batches(calib) -> list[Batch]:
    """Calibration data as a list of batches: a tensor is one batch, an iterable is many."""
    if calib is None:
        return []
    if isinstance(calib, (torch.Tensor, Mapping)):
        batches = [calib]
    elif isinstance(calib, Iterable):
        batches = list(calib)
    else:
        raise PruneError(f"calibration data must be a tensor or an iterable of batches, "
                         f"got {type(calib).__name__}")
    if not batches:
        raise PruneError("the calibration set is empty; give at least one batch")
    for i, b in enumerate(batches):
        _check_batch(b, i)
    return batches


def output_tensor(out) -> torch.Tensor:
    """The main tensor of a model's output: itself, .logits, .last_hidden_state or the first
    element of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise PruneError(f"cannot read a tensor from model output of type {type(out).__name__}")


def plain_outputs(out):
    """A model's output as plain containers (transformers ModelOutput -> tuple)."""
    if hasattr(out, "to_tuple"):
        return out.to_tuple()
    return out
