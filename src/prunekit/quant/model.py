"""The quantized form on a model, and on disk.

A quantized layer computes with its dequantized float weight (so every dense code path,
state dict and checkpoint loader works as before) and carries its `QuantizedWeight` as the
plain attribute `module.quantized_weight`: not a parameter or buffer, so `state_dict()` and
`load_weights` are unchanged, and later kernels and export formats read the codes from it.
The form must always equal the weight: `check_matches` says when it no longer does (the
weight was changed after quantization), and saving refuses such a layer.

A quantized model saves to a directory of two safetensors files, each written atomically:

    model.safetensors      the dequantized weights (loads anywhere with prunekit.io.load_weights)
    quantized.safetensors  per layer '<name>.codes', '<name>.scales', '<name>.zeros' and, for
                           a layer pruned and quantized in one pass, '<name>.keep'; the grid
                           of each layer in the metadata key 'prunekit_grids'
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from prunekit.errors import PruneError
from prunekit.layers import groups_of, is_hf_conv1d, weight_matrix
from prunekit.quant.grid import Grid, QuantizedWeight

#: the attribute of a module that holds its QuantizedWeight
ATTR = "quantized_weight"
WEIGHTS_FILE = "model.safetensors"
QUANT_FILE = "quantized.safetensors"


def quantized_form(module: nn.Module) -> QuantizedWeight | None:
    """The layer's quantized form, or None."""
    return getattr(module, ATTR, None)


def quantized_layers(model: nn.Module) -> dict[str, QuantizedWeight]:
    """{layer name: QuantizedWeight} for every quantized layer of the model."""
    return {n: q for n, m in model.named_modules() if (q := quantized_form(m)) is not None}


def attach(module: nn.Module, q: QuantizedWeight) -> Callable[[], None]:
    """Give the module its quantized form; returns the function that takes it back (the form
    it had before, if any)."""
    had = ATTR in module.__dict__
    old = module.__dict__.get(ATTR)
    module.__dict__[ATTR] = q

    def undo() -> None:
        if had:
            module.__dict__[ATTR] = old
        else:
            module.__dict__.pop(ATTR, None)
    return undo


def check_layer(grid: Grid, name: str, module: nn.Module) -> None:
    """Refuse, before any work, a layer this grid cannot quantize exactly."""
    if groups_of(module) > 1:
        raise PruneError(f"{name}: a grouped convolution ({groups_of(module)} groups) cannot be "
                         f"quantized as one matrix yet; exclude it")
    if module.weight.dtype not in (torch.float32, torch.float64):
        raise PruneError(f"{name}.weight has dtype {module.weight.dtype}, which cannot hold the "
                         f"grid's float32 values exactly; load the model in float32")
    w = weight_matrix(module)
    grid.validate_shape((w.shape[0], w.shape[1]), name)


def refuse_quantized(name: str, module: nn.Module, method: str) -> None:
    """A method that moves weights (reconstruction pruning) would take a quantized layer off
    its grid: refuse it, naming the way out."""
    q = quantized_form(module)
    if q is not None:
        raise PruneError(f"{name} is quantized ({q.grid.spec}); {method} would move its weights "
                         f"off the grid. Prune the floating-point model first, or prune and "
                         f"quantize in one pass ({method}(..., quant='{q.grid.spec}'))")


def check_matches(name: str, module: nn.Module, q: QuantizedWeight) -> None:
    """Raise unless the module's weight is exactly the dequantized form."""
    w = weight_matrix(module).detach()
    if tuple(w.shape) != q.shape:
        raise PruneError(f"{name}: the quantized form has shape {q.shape} but the weight is "
                         f"{tuple(w.shape)}")
    if not torch.equal(w.float(), q.dequantize()):
        raise PruneError(f"{name}: the weight no longer equals its quantized form (it was "
                         f"changed after quantization, by pruning or training?); quantize the "
                         f"model again")


def save_quantized(model: nn.Module, directory: str | os.PathLike,
                   metadata: dict | None = None) -> Path:
    """Write the model's dequantized weights and every layer's quantized form to
    `directory` (see the module docstring); every form is checked against its weight first."""
    from safetensors.torch import save_file

    from prunekit.io import atomic_write, save_weights

    forms = quantized_layers(model)
    if not forms:
        raise PruneError(f"{type(model).__name__} has no quantized layer; quantize it first "
                         f"(prunekit.quantize)")
    modules = dict(model.named_modules())
    tensors, grids = {}, {}
    for name, q in forms.items():
        q.check(name)
        check_matches(name, modules[name], q)
        grids[name] = q.grid.spec
        for key, t in q.tensors().items():
            tensors[f"{name}.{key}"] = t.contiguous()
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise PruneError(f"{directory} exists and is not a directory")
    meta = {"prunekit_grids": json.dumps(grids)}
    atomic_write(directory / QUANT_FILE, lambda tmp: save_file(tensors, tmp, metadata=meta))
    save_weights(model, directory / WEIGHTS_FILE, metadata=metadata)
    return directory


def load_quantized(model: nn.Module, directory: str | os.PathLike) -> dict[str, QuantizedWeight]:
    """Load a directory written by save_quantized into `model` (same architecture): the
    weights, then each layer's quantized form, checked against the weight it must equal."""
    from safetensors import safe_open

    from prunekit.io import load_weights, read_weights

    directory = Path(directory)
    path = directory / QUANT_FILE
    if not path.exists() or not (directory / WEIGHTS_FILE).exists():
        raise PruneError(f"{directory} is not a quantized model directory (it needs "
                         f"{WEIGHTS_FILE} and {QUANT_FILE}, as save_quantized writes)")
    try:
        with safe_open(str(path), framework="pt") as f:
            grids = json.loads((f.metadata() or {}).get("prunekit_grids", "{}"))
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise PruneError(f"{path} is not a readable quantized-form file: {e}") from e
    modules = dict(model.named_modules())
    missing = [n for n in grids if n not in modules]
    if missing:
        raise PruneError(f"{path}: layer {missing[0]} is not in {type(model).__name__}")
    weights = read_weights(directory / WEIGHTS_FILE)
    forms = {}
    for name, spec in grids.items():
        parts = {k: stored[f"{name}.{k}"] for k in QuantizedWeight.FIELDS
                 if f"{name}.{k}" in stored}
        q = forms[name] = QuantizedWeight.from_tensors(spec, parts, name)
        w = weights.get(f"{name}.weight")
        if w is None:
            continue  # a tied weight, saved under its first name: checked once loaded
        w = w.t() if is_hf_conv1d(modules[name]) else w.reshape(w.shape[0], -1)
        if tuple(w.shape) != q.shape or not torch.equal(w.float(), q.dequantize()):
            raise PruneError(f"{directory}: {name}.weight does not equal its quantized form; "
                             f"the two files do not belong together")
    load_weights(model, directory / WEIGHTS_FILE)  # checks every tensor before loading
    for name, q in forms.items():
        check_matches(name, modules[name], q)
        attach(modules[name], q)
    return forms
