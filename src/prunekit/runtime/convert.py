"""Convert a pruned model for speed, layer by layer, by measurement.

For each prunable layer the layer's real input (from one forward pass of a sample batch, in
eval mode) is run through every kernel that can serve the layer's weights; a kernel whose
output differs from the dense layer's is rejected, and the fastest of the rest replaces the
layer. Layers no kernel can serve stay dense, with a note saying why. Every module keeps
its own train/eval mode; the input model is not changed unless inplace=True.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from prunekit.batches import first_calls
from prunekit.config import coerce
from prunekit.errors import PruneError
from prunekit.layers import find_layers, weight_matrix
from prunekit.progress import Progress
from prunekit.runtime.kernels import KERNELS, rtol, sparse_module, unsupported_reason
from prunekit.runtime.latency import (
    check_count,
    check_threads,
    eval_mode,
    machine_info,
    num_threads,
    time_calls,
)


@dataclass
class LayerChoice:
    name: str
    shape: tuple[int, ...]
    sparsity: float
    kernel: str
    times_ms: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        """Measured dense time over the chosen kernel's; NaN when nothing was timed."""
        if self.kernel not in self.times_ms:
            return float("nan")
        return self.times_ms["dense"] / self.times_ms[self.kernel]


@dataclass
class ConversionReport:
    layers: list[LayerChoice]
    machine: dict

    def kernel_counts(self) -> dict[str, int]:
        """How many layers took each kernel."""
        counts: dict[str, int] = {}
        for lc in self.layers:
            counts[lc.kernel] = counts.get(lc.kernel, 0) + 1
        return counts

    def to_dict(self) -> dict:
        return {"layers": [asdict(lc) | {"speedup": lc.speedup} for lc in self.layers],
                "machine": self.machine}

    def __str__(self) -> str:
        lines = [f"{'layer':<36} {'sparsity':>8} {'kernel':>7} {'dense ms':>9} {'speedup':>8}"]
        for lc in self.layers:
            lines.append(f"{lc.name:<36} {lc.sparsity:>8.3f} {lc.kernel:>7} "
                         f"{lc.times_ms.get('dense', float('nan')):>9.4f} {lc.speedup:>7.2f}x"
                         + (f"  ({'; '.join(lc.notes)})" if lc.notes else ""))
        return "\n".join(lines)


def layer_inputs(model: nn.Module, layers: dict[str, nn.Module], batch) -> dict:
    """The input tensor each layer sees when `batch` runs through the model."""
    return first_calls(model, layers, batch, lambda m, x: x.detach())


def candidate_kernels(module: nn.Module, x: torch.Tensor, kernels: Sequence[str]):
    """({kernel: module} that serve the layer with matching output, [notes])."""
    out, notes = {"dense": module}, []
    w = weight_matrix(module).detach()
    if bool((w != 0).all()):
        return out, ["no zero weights"]
    why = unsupported_reason(module)
    if why:
        return out, [why]
    with torch.inference_mode():
        ref = module(x)
    scale = float(ref.abs().max()) + 1e-12
    for kind in kernels:
        if kind == "dense":  # the layer itself: the reference the others must match
            continue
        try:
            cand = sparse_module(module, kind)
        except PruneError as e:
            notes.append(str(e))
            continue
        with torch.inference_mode():
            err = float((cand(x).float() - ref.float()).abs().max())
        if err > rtol(kind) * scale:
            notes.append(f"{kind} kernel: output differs by {err:.3g}; rejected")
            continue
        out[kind] = cand
    return out, notes


def check_kernels(kernels) -> tuple[str, ...]:
    """A non-empty list of registered kernel names, lower case (close matches on a typo)."""
    kernels = coerce(tuple[str, ...], kernels, "kernels")
    if not kernels:
        raise PruneError(f"kernels is empty; choose from {', '.join(KERNELS.names())}")
    return tuple(KERNELS.entry(k).name for k in kernels)


def convert(model: nn.Module, batch, kernels: Sequence[str] | None = None,
            include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
            threads: int | None = None, repeats: int = 9, inplace: bool = False,
            progress: bool = True, choose: str = "fastest") -> tuple[nn.Module, ConversionReport]:
    """Replace each prunable layer by its fastest kernel, measured on its input from `batch`.

    kernels: names from prunekit.runtime.KERNELS (default: all of them).
    choose="first" times nothing: each layer takes the first of `kernels` that serves it
    (output still checked against the dense layer), or stays dense. That builds a model with
    one given kernel wherever it fits, as latency tables and benchmarks need.
    Returns (converted model, report). The input model is not changed at all (weights,
    modules, train/eval modes) unless inplace=True; the converted model keeps each module's
    mode (the sample batch runs in eval mode).
    """
    if not isinstance(model, nn.Module):
        raise PruneError(f"convert takes a torch.nn.Module, got {type(model).__name__}")
    kernels = check_kernels(KERNELS.names() if kernels is None else kernels)
    if choose not in ("fastest", "first"):
        raise PruneError(f"choose must be 'fastest' or 'first', got {choose!r}")
    check_threads(threads)
    check_count(repeats, "repeats")
    coerce(bool, inplace, "inplace")
    target = model if inplace else copy.deepcopy(model)
    layers = find_layers(target, include, exclude)
    with eval_mode(target):
        inputs = layer_inputs(target, layers, batch)
    choices = []
    with num_threads(threads), Progress(enabled=progress) as bar:
        task = bar.add("converting layers", total=len(layers))
        for name, module in layers.items():
            if name not in inputs:
                raise PruneError(f"layer {name} did not run on the sample batch; exclude it")
            x = inputs[name]
            w = weight_matrix(module)
            sparsity = float((w == 0).float().mean())
            cands, notes = candidate_kernels(module, x, kernels)
            if choose == "first":
                ms = {}
                best = next((k for k in kernels if k in cands), "dense")
            else:
                with torch.inference_mode():
                    times = time_calls({k: (lambda m=m, x=x: m(x)) for k, m in cands.items()},
                                       repeats=repeats)
                ms = {k: 1e3 * v["median"] for k, v in times.items()}
                best = min(ms, key=ms.get)
            if best != "dense":
                cands[best].train(module.training)
                target.set_submodule(name, cands[best])
            choices.append(LayerChoice(name, tuple(module.weight.shape), sparsity, best, ms,
                                       notes))
            bar.advance(task)
        info = machine_info(threads)
    return target, ConversionReport(choices, info)
