"""The factorized layer: one weight W (out, in) computed as two plain layers, W ~ U @ V.

A Linear becomes Linear(in, r, bias=False) then Linear(r, out) with the original bias. A
convolution becomes a convolution with the original kernel, stride, padding and dilation and
r output channels, then a 1x1 convolution to the original outputs. With the input channels
split into j groups (ALDS), the first convolution is grouped (j groups of r outputs each) and
V is block diagonal: group g's input channels feed only its own r channels, and the 1x1
convolution sums the j partial products. Both halves are ordinary torch modules inside an
nn.Sequential subclass, so the result is a plain dense model that trains, exports and runs
anywhere; `describe` / `rebuild` let `save_shrunk` / `load_shrunk` record and restore it.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.errors import PruneError
from prunekit.layers import is_hf_conv1d

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class Factorized(nn.Sequential):
    """A layer replaced by its two factors: `self[0]` computes V x (rank * groups channels),
    `self[1]` computes U (.) + bias. `rank` is per group; `groups` is ALDS's j."""

    def __init__(self, first: nn.Module, second: nn.Module, rank: int, groups: int = 1):
        super().__init__(first, second)
        self.rank = rank
        self.groups = groups

    def extra_repr(self) -> str:
        return f"rank={self.rank}, groups={self.groups}"

    @torch.no_grad()
    def product(self) -> torch.Tensor:
        """The (out, in) weight U @ V this pair computes (for a convolution, in counts the
        kernel positions, in the order of the original layer's weight)."""
        first, second = self
        u = second.weight.reshape(second.weight.shape[0], -1)
        v = first.weight.reshape(self.groups * self.rank, -1)  # (j r, in / j * k)
        return u @ torch.block_diag(*v.split(self.rank))


def _layer_spec(module: nn.Module) -> tuple[int, int, int]:
    """(out, in, positions per output of the kernel) of a factorizable layer."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, 1
    if is_hf_conv1d(module):
        return module.weight.shape[1], module.weight.shape[0], 1
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        k = 1
        for s in module.kernel_size:
            k *= s
        return module.out_channels, module.in_channels, k
    raise PruneError(f"{type(module).__name__} has no factorization (Linear, Conv1d/2d/3d "
                     f"and GPT-2 Conv1D have)")


def empty_factorized(module: nn.Module, rank: int, groups: int = 1,
                     out_features: int | None = None,
                     in_features: int | None = None) -> Factorized:
    """A Factorized pair shaped for `module` (or for the given in / out sizes, when the
    module was shrunk first), weights uninitialised; dtype and device follow the module."""
    out0, in0, _ = _layer_spec(module)
    out, inn = out_features or out0, in_features or in0
    w = module.weight
    kw = {"dtype": w.dtype, "device": w.device}
    has_bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.modules.conv._ConvNd):
        conv = _CONVS[len(module.kernel_size)]
        first = conv(inn, groups * rank, module.kernel_size, module.stride, module.padding,
                     module.dilation, groups=groups, bias=False,
                     padding_mode=module.padding_mode, **kw)
        second = conv(groups * rank, out, 1, bias=has_bias, **kw)
    else:
        if groups != 1:
            raise PruneError("a Linear layer factorizes with one group only")
        first = nn.Linear(inn, rank, bias=False, **kw)
        second = nn.Linear(rank, out, bias=has_bias, **kw)
    for p in (*first.parameters(), *second.parameters()):
        p.requires_grad_(w.requires_grad)
    return Factorized(first, second, rank, groups)


@torch.no_grad()
def factorized(module: nn.Module, u: torch.Tensor, v: torch.Tensor,
               groups: int = 1) -> Factorized:
    """The pair computing the layer with weight U @ V: U (out, groups * r), V (groups * r,
    in) block diagonal over `groups` equal blocks of input columns (the layer's (out, in)
    view: for a convolution, in = in_channels * kernel positions)."""
    out, inn, k = _layer_spec(module)
    rank = u.shape[1] // groups
    if u.shape != (out, groups * rank) or v.shape != (groups * rank, inn * k):
        raise PruneError(f"factors of shapes {tuple(u.shape)} and {tuple(v.shape)} do not "
                         f"fit a layer of {out} outputs and {inn * k} inputs in {groups} "
                         f"group(s)")
    pair = empty_factorized(module, rank, groups)
    first, second = pair
    cols = inn * k // groups
    blocks = [v[g * rank:(g + 1) * rank, g * cols:(g + 1) * cols] for g in range(groups)]
    first.weight.copy_(torch.cat(blocks).reshape(first.weight.shape))
    second.weight.copy_(u.reshape(second.weight.shape))
    bias = getattr(module, "bias", None)
    if bias is not None:
        second.bias.copy_(bias)
    return pair


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where `name` is in `model`; returns the module it replaced."""
    from prunekit.runtime.convert import set_submodule  # runtime is heavy: on first use

    old = model.get_submodule(name)
    set_submodule(model, name, new)
    return old


def describe(model: nn.Module) -> dict[str, dict]:
    """{module name: {"rank", "groups", "out", "in"}} for every Factorized module: what
    `rebuild` needs to give a freshly built original the same structure."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, Factorized):
            first, second = m
            inn = first.in_features if isinstance(first, nn.Linear) else first.in_channels
            outs = second.out_features if isinstance(second, nn.Linear) else \
                second.out_channels
            out[name] = {"rank": m.rank, "groups": m.groups, "out": outs, "in": inn}
    return out


def rebuild(model: nn.Module, description: dict[str, dict], where: str = "the file") -> None:
    """Replace each described layer of `model` by an (uninitialised) Factorized pair of the
    recorded shape, in place; the weights are loaded afterwards."""
    mods = dict(model.named_modules())
    for name, d in description.items():
        m = mods.get(name)
        if m is None:
            raise PruneError(f"{where}: factorized layer {name!r} is not in "
                             f"{type(model).__name__}; was it saved from another "
                             f"architecture?")
        replace_module(model, name, empty_factorized(m, int(d["rank"]), int(d["groups"]),
                                                     int(d["out"]), int(d["in"])))
