"""Weights in and out: safetensors only, written atomically; checkpoints checked against
the model tensor by tensor."""

from __future__ import annotations

import fnmatch
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from prunekit.errors import PruneError


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return atomic_write(path, write)


def save_weights(model_or_state: nn.Module | dict, path: str | os.PathLike,
                 metadata: dict | None = None) -> Path:
    """Save a state dict as safetensors atomically (shared tensors are stored once each)."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors, seen = {}, {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            continue
        key = (v.data_ptr(), v.shape, v.stride()) if v.numel() else None
        if key is not None and key in seen:
            continue  # tied weight: saved under its first name
        if key is not None:
            seen[key] = k
        tensors[k] = v.detach().contiguous().cpu()
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_weights(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file; pickle checkpoints only with allow_pickle=True."""
    path = Path(path)
    if not path.exists():
        raise PruneError(f"weights file {path} does not exist")
    if path.suffix != ".safetensors":
        if not allow_pickle:
            raise PruneError(
                f"{path}: only safetensors files are read by default, since a pickle checkpoint "
                f"can run code when loaded; convert it, or pass allow_pickle=True "
                f"(--allow-pickle) if you trust the file")
        obj = torch.load(path, map_location="cpu", weights_only=False)
        return obj.get("state_dict", obj) if isinstance(obj, dict) else obj.state_dict()
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise PruneError(f"{path} is not a readable safetensors file: {e}") from e


def load_weights(model: nn.Module, path: str | os.PathLike, allow_pickle: bool = False,
                 strict: bool = True, optional: Sequence[str] = ()) -> nn.Module:
    """Load weights into `model`, naming the first missing, unexpected or mis-shaped tensor.
    Model tensors matching an `optional` pattern (fnmatch) may be absent from the file."""
    state = read_weights(path, allow_pickle)
    own = model.state_dict()
    for name, t in state.items():
        if name in own and tuple(own[name].shape) != tuple(t.shape):
            raise PruneError(f"{path}: tensor {name} has shape {tuple(t.shape)} but the model "
                             f"expects {tuple(own[name].shape)}")
    if strict:
        unexpected = [k for k in state if k not in own]
        if unexpected:
            raise PruneError(f"{path}: tensor {unexpected[0]} is not in the model "
                             f"({len(unexpected)} unexpected in all)")
        tied = _tied_names(model)
        missing = [k for k in own if k not in state and k not in tied
                   and not k.endswith("num_batches_tracked")
                   and not any(fnmatch.fnmatchcase(k, p) for p in optional)]
        if missing:
            raise PruneError(f"{path}: the model's tensor {missing[0]} is missing from the file "
                             f"({len(missing)} missing in all)")
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    return model


def _tied_names(model: nn.Module) -> set[str]:
    """State-dict names that share storage with an earlier name (tied embeddings)."""
    seen, tied = set(), set()
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.shape, v.stride()) if v.numel() else None
        if key is not None and key in seen:
            tied.add(k)
        elif key is not None:
            seen.add(key)
    return tied
