"""One-shot reconstruction after removing channels: the layers that read the removed
channels are refit by least squares on calibration inputs, so a cut without fine-tuning
loses less (the channel-pruning reconstruction of He et al. 2017 and ThiNet, Luo et al.
2017, in closed form).

A layer y = W x + b that loses input columns R (a convolution: every kernel position of a
removed channel) keeps K. Over the calibration rows x of the unpruned model, with
xa = [x; 1] and Ha = sum xa xa^T, the kept weights and the bias that best reproduce the
old output solve min ||[W b] xa - [W' b'] xa_K||^2: [W' b'] = [W b] Ha[:, K] Ha[K, K]^-1.
The constant column is the bias compensation: what the removed channels contributed on
average moves into b' (a layer without a bias gets its kept weights refit only). Rows are
the inputs of the unpruned model, so the refit is exact for a layer whose own inputs are
unchanged and approximate downstream of other cuts. Grouped convolutions are left as cut.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from prunekit.batches import run_batch
from prunekit.errors import PruneError
from prunekit.layers import is_hf_conv1d, weight_matrix
from prunekit.oneshot.calibrate import input_rows
from prunekit.structured.graph import ChannelClass, layer_of
from prunekit.structured.measure import modes_restored


def model_inputs(batch):
    """The model's inputs of a calibration batch ((inputs, integer targets) -> inputs)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and torch.is_tensor(batch[1]) \
            and not batch[1].is_floating_point():
        return batch[0]
    return batch


def _removed_inputs(classes: Iterable[ChannelClass]) -> dict[str, set[int]]:
    """{weight parameter: indices of its input dim that the classes remove}."""
    out: dict[str, set[int]] = defaultdict(set)
    for c in classes:
        for p, _, i in c.readers:
            if p.endswith("weight"):
                out[p].add(i)
    return out


def _removed_outputs(classes: Iterable[ChannelClass]) -> dict[tuple[str, int], set[int]]:
    out: dict[tuple[str, int], set[int]] = defaultdict(set)
    for c in classes:
        for p, d, i in c.slices:
            out[(p, d)].add(i)
    return out


def _columns(module: nn.Module, channels: set[int]) -> torch.Tensor:
    """Columns of the layer's (out, in) matrix fed by the given input channels."""
    w = weight_matrix(module)
    per = w.shape[1] // (module.weight.shape[0] if is_hf_conv1d(module) else
                         module.weight.shape[1])
    return torch.tensor(sorted(c * per + k for c in channels for k in range(per)),
                        dtype=torch.long)


@torch.no_grad()
def reconstruct(dense: nn.Module, small: nn.Module, classes: Sequence[ChannelClass],
                calib, dampening: float = 1e-6) -> list[str]:
    """Refit, in `small` (`dense` with `classes` cut out), every layer that reads a removed
    channel, from calibration batches run through `dense`. Returns the refit layers."""
    batches = [model_inputs(b) for b in calib] if calib is not None else []
    if not batches:
        raise PruneError("reconstruct=True refits the layers after each cut on calibration "
                         "inputs: pass calib=[batch, ...]")
    reads = _removed_inputs(classes)
    cut_dims = _removed_outputs(classes)
    layers = {}
    for param, removed in reads.items():
        name = layer_of(param)
        module = dense.get_submodule(name)
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
            continue
        if not (isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or
                is_hf_conv1d(module)):
            continue
        layers[name] = (module, param, removed)
    hessians: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args):
            rows = input_rows(module, args[0].detach())[0].double()  # (rows, in)
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
            h = rows.T @ rows
            hessians[name] = hessians[name] + h if name in hessians else h
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, (m, _, _) in layers.items()]
    try:
        with modes_restored(dense):
            dense.eval()
            for b in batches:
                run_batch(dense, b)
    finally:
        for h in handles:
            h.remove()
    done = []
    for name, (module, param, removed) in layers.items():
        if name not in hessians:
            continue  # did not run on the calibration data
        w = weight_matrix(module).double()
        cols = w.shape[1]
        bias = getattr(module, "bias", None)
        keep = torch.tensor(sorted(set(range(cols)) - set(_columns(module, removed).tolist())),
                            dtype=torch.long)
        if bias is not None:
            w = torch.cat([w, bias.double()[:, None]], dim=1)
            keep = torch.cat([keep, torch.tensor([cols])])
        else:
            hessians[name] = hessians[name][:cols, :cols]
        h = hessians[name]
        hk = h[keep][:, keep]
        hk.diagonal().add_(dampening * float(hk.diagonal().mean()) + 1e-12)
        new = torch.linalg.solve(hk, (w @ h[:, keep]).T).T  # (out, kept)
        out_dim = 1 if is_hf_conv1d(module) else 0
        rows_cut = cut_dims.get((param, out_dim), set())
        if rows_cut:
            rows = torch.tensor(sorted(set(range(new.shape[0])) - rows_cut), dtype=torch.long)
            new = new[rows]
        target = small.get_submodule(name)
        nw = new[:, :len(keep) - (bias is not None)]
        if is_hf_conv1d(target):
            target.weight.copy_(nw.T.to(target.weight.dtype))
        else:
            target.weight.copy_(nw.reshape(target.weight.shape).to(target.weight.dtype))
        if bias is not None:
            target.bias.copy_(new[:, -1].to(target.bias.dtype))
        done.append(name)
    return done
