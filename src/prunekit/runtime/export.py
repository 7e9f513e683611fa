"""Export a pruned model: dense safetensors, compressed sparse safetensors, ONNX.

The compressed format stores each tensor that is sparse enough to gain as
`<name>.__bitmask__` (packed bits, 1 = stored value, row-major) and `<name>.__values__` (the
stored entries in order); the shape and dtype go in the header metadata. Pruning by
multiplying with a mask leaves -0.0 where negative weights were, so when a tensor has any
negative zeros, `<name>.__negzero__` holds one packed bit per zero entry for its sign: the
round trip is bit-exact (NaN and Inf are ordinary stored values).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prunekit.config import coerce
from prunekit.errors import PruneError
from prunekit.io import (
    CHECKSUM_KEY,
    META_CHECKSUM_KEY,
    atomic_write,
    read_safetensors,
    save_weights,
    write_safetensors,
)
from prunekit.runtime.latency import eval_mode

MASK, VALUES, NEGZERO = ".__bitmask__", ".__values__", ".__negzero__"
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def save_dense(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> dict:
    """Plain safetensors of the state dict; returns {"path", "bytes"}."""
    out = save_weights(model, path, metadata)
    return {"path": str(out), "bytes": out.stat().st_size}


def _state(model_or_state) -> dict[str, torch.Tensor]:
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) \
        else model_or_state
    out, seen = {}, set()
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            continue
        key = (v.data_ptr(), tuple(v.shape), v.stride()) if v.numel() else None
        if key is not None and key in seen:
            continue  # tied weight: stored once, under its first name
        if key is not None:
            seen.add(key)
        out[k] = v.detach().cpu().contiguous()
    return out


def _split_zeros(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(flat bool mask of entries that are not zero, signs of the zeros or None).

    The second is a bool per zero entry (True = -0.0) for floating tensors that hold -0.0.
    """
    flat = t.reshape(-1)
    if t.dtype == torch.bool:
        return flat.clone(), None
    bits = flat.view(_INT_VIEW[t.element_size()])
    if not t.is_floating_point():
        return bits != 0, None
    nz = flat != 0
    nz |= flat.isnan()
    zero_bits = bits[~nz]
    neg = zero_bits != 0  # a zero whose bits are not all zero is -0.0
    return nz, (neg if bool(neg.any()) else None)


def save_compressed(model_or_state, path: str | os.PathLike, min_sparsity: float = 0.05
                    ) -> dict:
    """Write a bitmask + values safetensors file atomically.

    A tensor is compressed when at least `min_sparsity` of its entries are zero (below that
    the mask costs more than it saves). Returns {"path", "bytes", "dense_bytes", "ratio",
    "compressed": [names]}.
    """
    min_sparsity = coerce(float, min_sparsity, "save_compressed min_sparsity")
    if not 0.0 <= min_sparsity <= 1.0:
        raise PruneError(f"save_compressed min_sparsity must be in [0, 1] (the zero fraction "
                         f"from which a tensor is compressed), got {min_sparsity!r}")
    state = _state(model_or_state)
    tensors, meta, compressed, dense_bytes = {}, {}, [], 0
    for name, t in state.items():
        if any(x in name for x in (MASK, VALUES, NEGZERO)):
            raise PruneError(f"tensor name {name} uses a reserved suffix "
                             f"({MASK}, {VALUES}, {NEGZERO}); rename it")
        dense_bytes += t.numel() * t.element_size()
        if t.numel() == 0 or t.dim() == 0:
            tensors[name] = t
            continue
        nz, neg = _split_zeros(t)
        if float((~nz).float().mean()) < min_sparsity:
            tensors[name] = t
            continue
        tensors[name + MASK] = torch.from_numpy(np.packbits(nz.numpy()))
        tensors[name + VALUES] = t.reshape(-1)[nz].clone()
        if neg is not None:
            tensors[name + NEGZERO] = torch.from_numpy(np.packbits(neg.numpy()))
        meta[name] = json.dumps({"shape": list(t.shape), "dtype": str(t.dtype)})
        compressed.append(name)
    meta["__format__"] = "prunekit-bitmask-v1"
    out = write_safetensors(tensors, path, meta)
    size = out.stat().st_size
    return {"path": str(out), "bytes": size, "dense_bytes": dense_bytes,
            "ratio": dense_bytes / size if size else 0.0, "compressed": compressed}


def load_compressed(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The exact state dict written by save_compressed; a damaged file is a PruneError (the
    sha256 of the stored tensors is checked, then every mask against its values)."""
    path = Path(path)
    if not path.exists():
        raise PruneError(f"compressed weights file {path} does not exist")
    raw, meta = read_safetensors(path)
    if meta.get("__format__") != "prunekit-bitmask-v1":
        raise PruneError(f"{path} is not a prunekit compressed file (no bitmask-v1 header); "
                         f"load it with prunekit.io.load_weights")
    state = {}
    stored = set()
    for name, t in raw.items():
        for suffix in (MASK, VALUES, NEGZERO):
            if name.endswith(suffix):
                stored.add(name[:-len(suffix)])
                break
        else:
            state[name] = t
    skip = ("__format__", CHECKSUM_KEY, META_CHECKSUM_KEY)
    described = {n for n in meta if n not in skip}
    if stored != described:
        odd = sorted(stored ^ described)
        raise PruneError(f"{path}: the header describes {len(described)} compressed tensors "
                         f"but the file stores {len(stored)} (differing: "
                         f"{', '.join(odd[:4])}); the file is corrupt")
    for name, info in meta.items():
        if name in skip:
            continue
        try:
            shape = [int(n) for n in json.loads(info)["shape"]]
            if min(shape, default=0) < 0:
                raise ValueError("a negative size")
        except (ValueError, TypeError, KeyError) as e:
            raise PruneError(f"{path}: the header entry of tensor {name} is damaged ({e})") \
                from e
        numel = int(np.prod(shape))
        if name + MASK not in raw or name + VALUES not in raw:
            raise PruneError(f"{path}: tensor {name} lacks its bitmask or values")
        packed = raw[name + MASK]
        if packed.dtype != torch.uint8 or packed.numel() * 8 < numel:
            raise PruneError(f"{path}: the bitmask of tensor {name} does not cover its "
                             f"{numel} entries; the file is corrupt")
        nz = torch.from_numpy(np.unpackbits(packed.numpy(), count=numel).astype(bool))
        values = raw[name + VALUES]
        if int(nz.sum()) != values.numel():
            raise PruneError(f"{path}: tensor {name} has {values.numel()} values but its mask "
                             f"marks {int(nz.sum())}; the file is corrupt")
        full = torch.zeros(numel, dtype=values.dtype)
        full[nz] = values.reshape(-1)
        if name + NEGZERO in raw:
            zeros = numel - values.numel()
            neg_packed = raw[name + NEGZERO]
            if neg_packed.dtype != torch.uint8 or neg_packed.numel() * 8 < zeros:
                raise PruneError(f"{path}: the sign bits of tensor {name} do not cover its "
                                 f"{zeros} zeros; the file is corrupt")
            neg = np.unpackbits(neg_packed.numpy(), count=zeros).astype(bool)
            full[(~nz).nonzero().squeeze(1)[torch.from_numpy(neg)]] = -0.0
        state[name] = full.reshape(shape)
    return state


def _as_args(batch):
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, dict):
        return (), dict(batch)
    return tuple(batch), {}


def _flat_outputs(out) -> list[np.ndarray]:
    if isinstance(out, torch.Tensor):
        return [out.detach().numpy()]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        return [a for o in out for a in _flat_outputs(o)]
    raise PruneError(f"cannot compare model output of type {type(out).__name__} with ONNX")


def export_onnx(model: nn.Module, batch, path: str | os.PathLike, verify: bool = True,
                rtol: float = 1e-4, atol: float = 1e-5, opset: int = 17) -> dict:
    """Export to ONNX (TorchScript exporter) atomically and, with verify, check that
    onnxruntime's outputs on `batch` are allclose to PyTorch's.

    The batch dimension (and for dict inputs the sequence dimension) is dynamic. The model
    is exported and checked in eval mode and gets its own modes back. Returns {"path",
    "bytes", "max_abs_diff"}; raises PruneError if the outputs differ.
    """
    check_tolerances(rtol, atol)
    opset = coerce(int, opset, "export_onnx opset")
    args, kwargs = _as_args(batch)
    names = list(kwargs) if kwargs else [f"input_{i}" for i in range(len(args))]
    values = tuple(kwargs.values()) if kwargs else args
    dynamic = {n: ({0: "batch", 1: "sequence"} if kwargs and v.dim() >= 2 else {0: "batch"})
               for n, v in zip(names, values)}

    class _Positional(nn.Module):  # ONNX takes positional inputs; map them back to kwargs
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *xs):
            return self.inner(**dict(zip(names, xs))) if kwargs else self.inner(*xs)

    wrapper = _Positional(model)

    def write(tmp):
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, values, tmp, input_names=names, dynamic_axes=dynamic,
                              opset_version=opset, dynamo=False)

    with eval_mode(wrapper):  # the wrapper's modules are the model's
        out = atomic_write(path, write)
    result = {"path": str(out), "bytes": out.stat().st_size, "max_abs_diff": None}
    if verify:
        result["max_abs_diff"] = verify_onnx(model, batch, out, rtol, atol)
    return result


def check_tolerances(rtol, atol) -> None:
    """Relative and absolute tolerances: finite numbers >= 0."""
    for name, v in (("rtol", rtol), ("atol", atol)):
        if coerce(float, v, name) < 0:
            raise PruneError(f"{name} must be >= 0, got {v!r}")


def verify_onnx(model: nn.Module, batch, path, rtol: float = 1e-4, atol: float = 1e-5
                ) -> float:
    """Run the ONNX file with onnxruntime on `batch`; raise unless allclose to PyTorch (run
    in eval mode; the model gets its own modes back). Returns the largest absolute
    difference."""
    check_tolerances(rtol, atol)
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise PruneError("ONNX verification needs onnxruntime (pip install "
                         "onnxruntime==1.32.0)") from e
    args, kwargs = _as_args(batch)
    with torch.no_grad(), eval_mode(model):
        ref = _flat_outputs(model(*args, **kwargs))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = [i.name for i in sess.get_inputs()]
    values = list(kwargs.values()) if kwargs else list(args)
    got = sess.run(None, {n: v.numpy() for n, v in zip(feeds, values)})
    if len(got) != len(ref):
        raise PruneError(f"{path}: ONNX gives {len(got)} outputs, PyTorch {len(ref)}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(ref, got)):
        if a.shape != b.shape:
            raise PruneError(f"{path}: output {i} has shape {b.shape} in ONNX, {a.shape} in "
                             f"PyTorch")
        worst = max(worst, float(np.abs(a - b).max()) if a.size else 0.0)
        if not np.allclose(a, b, rtol=rtol, atol=atol):
            raise PruneError(f"{path}: ONNX output {i} differs from PyTorch by up to "
                             f"{float(np.abs(a - b).max()):.3g} (rtol={rtol}, atol={atol})")
    return worst
