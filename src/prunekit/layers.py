"""Layer discovery and the 2-D weight view every method works on.

Prunable: nn.Linear, nn.Conv1d/2d/3d (grouped too) and transformers' GPT-2 Conv1D (found by
duck typing so transformers is not imported here). The 2-D view is (out, in) with, for convs,
in = in_channels/groups * prod(kernel_size) in PyTorch's memory order.
"""

from __future__ import annotations

import fnmatch
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from prunekit.errors import PruneError

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D: weight stored as (in, out), y = x @ W + b."""
    # by the class chain: a parametrized module's class is a subclass named Parametrized...
    return (any(c.__name__ == "Conv1D" for c in type(module).__mro__)
            and hasattr(module, "nf") and hasattr(module, "weight"))


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, *_CONVS)) or is_hf_conv1d(module)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an (out, in) matrix (a view where the layout allows)."""
    w = module.weight
    if is_hf_conv1d(module):
        return w.t()
    return w.reshape(w.shape[0], -1)


def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Write an (out, in) matrix back into the layer's own weight layout, in place."""
    w = module.weight
    write_weight(module, matrix.t() if is_hf_conv1d(module) else matrix.reshape(w.shape))


def is_parametrized(module: nn.Module) -> bool:
    """True when module.weight is computed by torch parametrizations (weight_norm, ...)."""
    return nn.utils.parametrize.is_parametrized(module, "weight")


def write_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Set the layer's weight (its own layout). A parametrized weight (weight_norm and the
    like) is written through its parametrization's right inverse, so the underlying
    parameters change and module.weight reads back `weight`; a plain one is copied in
    place (tied modules see the change)."""
    with torch.no_grad():
        if is_parametrized(module):
            module.weight = weight.to(module.weight.dtype)
        else:
            module.weight.copy_(weight.to(module.weight.dtype))


def check_writable(name: str, module: nn.Module) -> None:
    """Refuse, before any work, a layer whose weight cannot be written back."""
    if not is_parametrized(module):
        return
    plist = module.parametrizations.weight
    if not all(hasattr(p, "right_inverse") for p in plist):
        kinds = ", ".join(type(p).__name__ for p in plist)
        raise PruneError(f"{name}.weight is computed by a parametrization ({kinds}) with no "
                         f"right_inverse, so a new weight cannot be written back into its "
                         f"parameters; remove it first (torch.nn.utils.parametrize."
                         f"remove_parametrizations(module, 'weight')) or exclude {name}")


def shared_weights(model: nn.Module) -> dict[str, list[str]]:
    """The one home of tied-weight detection: for every parameter held under more than one
    name in the model (an output head tied to the input embedding, shared blocks), map each
    of its names to the others ('lm_head.weight': ['model.embed_tokens.weight'])."""
    owners: dict[int, list[str]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False):
            if p is not None:
                full = f"{mname}.{pname}" if mname else pname
                owners.setdefault(id(p), [])
                if full not in owners[id(p)]:
                    owners[id(p)].append(full)
    out = {}
    for names in owners.values():
        if len(names) > 1:
            for n in names:
                out[n] = [o for o in names if o != n]
    return out


def groups_of(module: nn.Module) -> int:
    return int(getattr(module, "groups", 1)) if isinstance(module, _CONVS) else 1


def find_layers(
    model: nn.Module,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    keep_first: bool = False,
    keep_last: bool = False,
) -> dict[str, nn.Module]:
    """Prunable layers by name, in registration order, filtered by name globs.

    keep_first / keep_last leave the first / last prunable layer (before filtering) dense,
    as is common for stems and classifier heads.
    """
    if isinstance(include, str) or isinstance(exclude, str):
        raise PruneError("include and exclude take a list of name globs, not a single string")
    all_layers = [(n, m) for n, m in model.named_modules() if is_prunable(m)]
    if not all_layers:
        raise PruneError(
            f"{type(model).__name__} has no prunable layer (nn.Linear, nn.Conv1d/2d/3d or "
            f"GPT-2 Conv1D)"
        )
    skip = set()
    if keep_first:
        skip.add(all_layers[0][0])
    if keep_last:
        skip.add(all_layers[-1][0])
    chosen = {
        n: m
        for n, m in all_layers
        if n not in skip
        and any(fnmatch.fnmatchcase(n, p) for p in include)
        and not any(fnmatch.fnmatchcase(n, p) for p in exclude)
    }
    if not chosen:
        names = ", ".join(n for n, _ in all_layers[:8])
        raise PruneError(
            f"no prunable layer matches include={list(include)} exclude={list(exclude)}; "
            f"prunable layers are: {names}{' ...' if len(all_layers) > 8 else ''}"
        )
    return chosen


#: parameters larger than this in all are kept in an unlinked temporary file while a
#: transform runs, not in memory: the copy would double a language model's resident memory
SPILL_BYTES = 256 * 2**20


class Originals:
    """Exact copies of parameters to write back: in memory when small, else their raw bytes
    in an unlinked temporary file (in $TMPDIR), so nothing outlives the process."""

    def __init__(self, params: Sequence[nn.Parameter]):
        self.params = list({id(p): p for p in params}.values())  # a tied weight once
        total = sum(p.numel() * p.element_size() for p in self.params)
        self.file = None
        if total <= SPILL_BYTES or any(p.is_meta for p in self.params):
            self.saved = [p.detach().clone() for p in self.params]
            return
        self.saved = None
        self.file = tempfile.TemporaryFile(prefix="prunekit-originals-")
        try:
            for p in self.params:
                if p.numel():
                    raw = p.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                    self.file.write(memoryview(raw.numpy()))
            self.file.flush()
        except BaseException:
            self.close()
            raise

    @torch.no_grad()
    def restore(self) -> None:
        if self.file is None:
            for p, saved in zip(self.params, self.saved):
                p.copy_(saved)
            return
        self.file.seek(0)
        for p in self.params:
            size = p.numel() * p.element_size()
            if not size:
                continue
            buf = bytearray(size)
            if self.file.readinto(buf) != size:
                raise PruneError("the saved copy of the original weights was cut short")
            p.copy_(torch.frombuffer(buf, dtype=torch.uint8).view(p.dtype).view(p.shape))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


@contextmanager
def restored_on_error(model: nn.Module, layers: Mapping[str, nn.Module]) -> Iterator[list]:
    """Run a transform that loses nothing: if it raises (Ctrl-C included), every layer's
    weight is written back as it was and the undo functions the caller appended to the
    yielded list run (last first: a replaced module put back, an added buffer removed).
    Every module's own train/eval mode is restored either way (a BatchNorm frozen in eval
    inside a training model stays frozen). The copies of large layers wait on disk
    (`Originals`), so the transform's memory is the model's plus its own work."""
    # every parameter of each layer (a parametrized weight lives in its parametrization's
    # originals, which a write through the right inverse would not restore bit for bit)
    originals = Originals([p for m in layers.values() for p in m.parameters()])
    modes = [(m, m.training) for m in model.modules()]
    undo: list = []
    try:
        yield undo
    except BaseException:
        for step in reversed(undo):
            step()
        originals.restore()
        raise
    finally:
        originals.close()
        for m, mode in modes:
            m.training = mode
