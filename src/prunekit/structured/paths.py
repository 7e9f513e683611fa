"""Data-dependent control flow: a trace follows the path its example inputs take, so a
forward that branches on the data (`if x.sum() > 0: ...`) could take another path on other
inputs, through weights or views the graph never saw, and a model shrunk on one path would
fail on the other.

The tracer notes every place a value computed from the inputs is read into Python
(`bool(t)`, `t.item()`, `int(t)`: aten._local_scalar_dense and friends, the ways a forward
branches on data through torch; `t.tolist()` and `t.numpy()` are not seen). Where there is
one, `check_paths` runs the model on perturbed inputs and compares the sequence of ops (and
their output shapes) with the example's: a difference is refused, naming the module that
read the data; none found still warns, since a branch no input took was not checked. What
happens inside an ignored module stays inside it (that module is left whole anyway).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from prunekit.batches import run_batch
from prunekit.errors import PruneError
from prunekit.structured.tracer import opaque, tensors_in, traced


class _Path(TorchDispatchMode):
    """The ops one forward pass runs: (module, op, output shapes), outside ignored modules
    (whose inside may branch: they are left whole)."""

    def __init__(self, model: nn.Module, ignore: Sequence[str]):
        super().__init__()
        self.module_names = {m: name for name, m in model.named_modules()}
        self.ignore = tuple(ignore)
        self.stack: list[str] = []
        self.opaque_depth = 0
        self.ops: list[tuple] = []

    def pre_hook(self, module, args):
        name = self.module_names.get(module)
        if name is not None:
            self.stack.append(name or "<model>")
            if self.opaque_depth or opaque(name, module, self.ignore):
                self.opaque_depth += 1

    def post_hook(self, module, args, out):
        if self.module_names.get(module) is not None:
            if self.opaque_depth:
                self.opaque_depth -= 1
            if self.stack:
                self.stack.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.opaque_depth:
            self.ops.append((self.stack[-1] if self.stack else "<model>",
                             func.overloadpacket.__name__,
                             tuple(tuple(t.shape) for t in tensors_in(out))))
        return out


def _path(model: nn.Module, inputs, ignore: Sequence[str]) -> list[tuple]:
    rec = _Path(model, ignore)
    with traced(model, rec.pre_hook, rec.post_hook), rec:
        model.eval()
        run_batch(model, inputs)
    return rec.ops


def perturbed_inputs(example_inputs) -> dict[str, object]:
    """Other inputs of the same shapes and dtypes: floating tensors negated, and redrawn from
    a normal distribution of the same mean and spread; integer tensors (token ids, masks)
    are kept, as their valid values are not known."""
    gen = torch.Generator().manual_seed(1)

    def negated(t):
        return -t if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    def redrawn(t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or not t.numel():
            return t
        spread = float(t.float().std()) if t.numel() > 1 else 0.0
        spread = spread if spread > 0 else float(t.abs().mean()) or 1.0
        noise = torch.randn(t.shape, generator=gen).to(t.dtype)
        return noise * spread + t.float().mean().to(t.dtype)

    return {"the negated inputs": tree_map(negated, example_inputs),
            "inputs redrawn at random": tree_map(redrawn, example_inputs)}


def check_paths(model: nn.Module, example_inputs, ignore: Sequence[str] = (),
                reads: Sequence[str] = ()) -> None:
    """Refuse a model whose forward runs other ops on other inputs.

    The trace follows the path that `example_inputs` take; a forward that branches on the
    data (`if x.sum() > 0`) could take another path on other inputs, through weights or
    views the graph never saw, and a model shrunk on one path would fail on the other. So
    the model runs on `perturbed_inputs` too, and a different sequence of ops (outside
    ignored modules) raises PruneError naming the module where the paths part. When every
    input takes the same path, a warning still says where the data was read: branches no
    input took were not checked."""
    if not any(t.is_floating_point() for t in tensors_in(example_inputs)):
        warnings.warn(_unchecked(reads, "its inputs hold no floating-point tensor to vary"),
                      stacklevel=3)
        return
    base = _path(model, example_inputs, ignore)
    for what, other in perturbed_inputs(example_inputs).items():
        try:
            path = _path(model, other, ignore)
        except Exception as e:  # noqa: BLE001 - the model itself fails on these inputs
            warnings.warn(_unchecked(reads, f"it fails on {what} ({type(e).__name__})"),
                          stacklevel=3)
            return
        if path != base:
            i = next((k for k, (a, b) in enumerate(zip(base, path)) if a != b),
                     min(len(base), len(path)))
            where = reads[0].split(":", 1)[0] if reads else "<model>"
            fix = (f"leave the module that branches whole with ignore=({where!r},), or "
                   if where != "<model>" else "")
            raise PruneError(
                f"the forward of {type(model).__name__} branches on the values of its "
                f"inputs: it reads them into Python ({', '.join(reads[:3])}), and after {i} "
                f"ops alike the example inputs run {_op_text(base, i)} where {what} run "
                f"{_op_text(path, i)}. The channel graph follows one path only, so a model "
                f"shrunk on it could fail on the other; {fix}make the forward take one path "
                f"whatever the data")
    warnings.warn(_unchecked(reads, "perturbed inputs took the same path"), stacklevel=3)


def _op_text(path: list[tuple], i: int) -> str:
    if i >= len(path):
        return "nothing more"
    module, op, shapes = path[i]
    return f"aten.{op} in {module} (out {', '.join(str(list(s)) for s in shapes) or '-'})"


def _unchecked(reads: Sequence[str], why: str) -> str:
    return (f"the forward reads values computed from its inputs into Python "
            f"({', '.join(reads[:3])}); {why}: if it branches on them, paths the example "
            f"inputs did not take were not traced. Check the shrunk model on inputs of every "
            f"path, or pass such modules in ignore=...")
