"""OWL, outlier-weighted layerwise sparsity (Yin et al. 2024, "Outlier Weighed Layerwise
Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity").

LLM blocks differ in how many outlier features they carry, and pruning a block rich in
outliers costs more. OWL scores each weight as Wanda does, |W_ij| * ||X_j||_2 on calibration
inputs of the dense model, and measures each block's outlier ratio: the share of its scores
above m times the block's mean score (the paper's M, 5 for LLaMA). Densities are then set
linearly in that ratio, spread over [1 - s - lam, 1 - s + lam] and shifted so that their
mean is 1 - s: blocks with more outliers keep more weights. Every layer of a block gets the
block's sparsity; with blocks of equal size (transformer layers) the total is exactly s.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from prunekit.batches import as_batches
from prunekit.budget.alloc import BUDGETS
from prunekit.errors import PruneError
from prunekit.layers import groups_of, weight_matrix
from prunekit.oneshot.calibrate import StatsCollector, _forward, _StopForward, find_blocks
from prunekit.patterns import check_sparsity


@torch.no_grad()
def feature_norms(model: nn.Module, layers: Mapping[str, nn.Module], calib,
                  stop_after: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """||X_j||_2 of every input feature of every layer over the calibration batches, as
    (groups, in) per layer: one forward pass of the model as it is. stop_after: a module
    after which every layer has run (e.g. the last block); the pass ends there, so a causal
    LM's head and its logits (3.2 GB for SmolLM2 on 32 x 512 tokens) are never computed."""
    batches = as_batches(calib)
    if not batches:
        raise PruneError("OWL needs calibration data (the inputs' feature norms): pass calib=")
    # the calibration statistics' own diagonal (sums of squares per input, shared by the
    # layers that read one tensor, padding tokens skipped), run as the engine runs batches
    handles = []
    if stop_after is not None:
        def stop(module, args, out):
            raise _StopForward
        handles.append(stop_after.register_forward_hook(stop))
    mode = model.training
    try:
        model.eval()
        with StatsCollector(layers, diagonal=True) as collector:
            _forward(model, batches, None, collector)
    finally:
        for h in handles:
            h.remove()
        model.train(mode)
    sums = {n: st.hessian for n, st in collector.stats.items()}  # (groups, in)
    missing = [n for n in layers if n not in sums]
    if missing:
        raise PruneError(f"layers never ran during OWL's calibration: {', '.join(missing[:5])}")
    return {n: s.sqrt().float() for n, s in sums.items()}


def _block_of(name: str, blocks: list[str]) -> str | None:
    return next((b for b in blocks if name.startswith(b + ".")), None)


def outlier_ratios(model: nn.Module, layers: Mapping[str, nn.Module], calib, m: float = 5.0,
                   blocks=None) -> dict[str, float]:
    """Each block's share of Wanda scores above m times the block's mean score."""
    if m <= 0:
        raise PruneError(f"OWL's outlier threshold m must be positive, got {m}")
    found = find_blocks(model, blocks)
    names = [b for b, _ in found]
    inside = {n: mod for n, mod in layers.items() if _block_of(n, names) is not None}
    # only the layers inside the blocks count, and all of them have run after the last block
    norms = feature_norms(model, inside, calib, stop_after=found[-1][1] if found else None)
    scores: dict[str, list[torch.Tensor]] = {}
    for name, module in layers.items():
        block = _block_of(name, names)
        if block is None:
            continue
        w = weight_matrix(module).detach().float()
        g = groups_of(module)
        scores.setdefault(block, []).extend(
            (wg.abs() * norms[name][i].unsqueeze(0)).reshape(-1)
            for i, wg in enumerate(w.chunk(g)))
    if not scores:
        raise PruneError(f"none of the layers lies in a block of {type(model).__name__} "
                         f"({', '.join(names[:3])}, ...); pass blocks=[...]")
    ratios = {}
    for block, parts in scores.items():
        s = torch.cat(parts)
        ratios[block] = float((s > m * s.mean()).double().mean())
    return ratios


@BUDGETS.register("owl", search=False)
def owl(layers: Mapping[str, nn.Module], sparsity: float, model: nn.Module | None = None,
        calib=None, m: float = 5.0, lam: float = 0.08, blocks=None,
        ratios: Mapping[str, float] | None = None) -> dict:
    """Per-layer sparsities from OWL: each block's density 1 - s + lam * (2 * r' - 1) - mean,
    r' its outlier ratio scaled to [0, 1] over the blocks (see the module docstring).

    layers: the layers to prune (e.g. prunekit.layers.find_layers(model, exclude=...));
    model and calib give the outlier ratios (one dense forward pass), or pass `ratios` from
    outlier_ratios() to reuse them across sparsities. Layers outside every block get s."""
    check_sparsity(sparsity)
    if not 0 <= lam < 1:
        raise PruneError(f"OWL's lam (the largest change of a block's density) must be in "
                         f"[0, 1), got {lam}")
    if ratios is None:
        if model is None:
            raise PruneError("OWL measures outliers on calibration data: pass model= and "
                             "calib= (or ratios= from outlier_ratios)")
        ratios = outlier_ratios(model, layers, calib, m, blocks)
    r = torch.tensor(list(ratios.values()), dtype=torch.float64)
    spread = r.max() - r.min()
    scaled = (r - r.min()) / spread if spread > 0 else torch.full_like(r, 0.5)
    density = 2 * lam * scaled
    density = density - density.mean() + (1 - sparsity)
    if float(density.min()) <= 0 or float(density.max()) > 1:
        raise PruneError(f"OWL at sparsity {sparsity} with lam={lam} would give a block "
                         f"density outside (0, 1] ({float(density.min()):.3f} to "
                         f"{float(density.max()):.3f}); use a smaller lam")
    per_block = {b: 1.0 - float(d) for b, d in zip(ratios, density)}
    return {name: per_block.get(_block_of(name, list(per_block)) or "", float(sparsity))
            for name in layers}
