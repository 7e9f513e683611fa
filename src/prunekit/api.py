"""The one-shot verbs: prune a model in place, prune one layer, report sparsity."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from prunekit.calibrate import LayerStats, Sequential, as_batches, collect_stats
from prunekit.errors import PruneError
from prunekit.layers import (
    find_layers,
    groups_of,
    is_prunable,
    restored_on_error,
    set_weight_matrix,
    weight_matrix,
)
from prunekit.methods.base import PruneConfig
from prunekit.patterns import Pattern, Unstructured, get_pattern
from prunekit.progress import Progress


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, ...]
    sparsity: float
    rel_error: float | None  # ||WX - W'X||^2 / ||WX||^2 on the calibration rows
    seconds: float


@dataclass
class PruneReport:
    method: str
    pattern: str
    target_sparsity: float
    options: dict
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned layers' weights."""
        total = sum(_numel(lr.shape) for lr in self.layers)
        return sum(lr.sparsity * _numel(lr.shape) for lr in self.layers) / max(total, 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sparsity"] = self.sparsity
        return d

    def __str__(self) -> str:
        lines = [f"{'layer':<40} {'shape':>16} {'sparsity':>9} {'rel.err':>9} {'s':>7}"]
        for lr in self.layers:
            err = "-" if lr.rel_error is None else f"{lr.rel_error:.4f}"
            shape = "x".join(map(str, lr.shape))
            lines.append(f"{lr.name:<40} {shape:>16} {lr.sparsity:>9.3f} {err:>9} "
                         f"{lr.seconds:>7.2f}")
        lines.append(f"{self.method} {self.pattern}: {len(self.layers)} layers, sparsity "
                     f"{self.sparsity:.3f}, {self.seconds:.1f} s")
        return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _check_config(config: PruneConfig) -> tuple[Pattern, float]:
    if not isinstance(config, PruneConfig):
        raise PruneError(f"config must be a method config such as prunekit.SparseGPT(...), "
                         f"got {type(config).__name__}")
    pattern = get_pattern(config.pattern)
    if not isinstance(pattern, config.patterns):
        names = ", ".join(p.__name__ for p in config.patterns)
        raise PruneError(f"{config.method} does not support pattern {pattern.name} "
                         f"(it supports {names})")
    sparsity = pattern.resolve_sparsity(config.sparsity if config.sparsity is not None
                                        else (None if pattern.implied_sparsity else 0.5))
    if config.scope == "global" and not isinstance(pattern, Unstructured):
        raise PruneError(f"scope='global' needs the unstructured pattern, got {pattern.name}")
    if config.scope == "global" and config.sequential:
        raise PruneError("scope='global' compares all layers at once; it cannot be combined "
                         "with sequential=True")
    return pattern, sparsity


def _relative_error(w: torch.Tensor, new: torch.Tensor, stats: LayerStats | None, groups: int):
    if stats is None:
        return None
    num = den = 0.0
    for g, (wg, ng) in enumerate(zip(w.chunk(groups), new.chunk(groups))):
        h = stats.hessian[g]
        dw = (wg - ng).double()
        num += float(torch.einsum("ij,jk,ik->", dw, h, dw))
        den += float(torch.einsum("ij,jk,ik->", wg.double(), h, wg.double()))
    return num / den if den > 0 else 0.0


def _prune_module(name: str, module: nn.Module, config: PruneConfig, pattern: Pattern,
                  sparsity: float, stats: LayerStats | None, mask: torch.Tensor | None = None):
    """Prune one layer in place (or apply a given mask) and return its LayerReport."""
    start = time.perf_counter()
    w = weight_matrix(module).detach().float().clone()
    groups = groups_of(module)
    if mask is not None:
        new = w * mask
    else:
        if config.needs == "hessian" and stats is None:
            raise PruneError(f"{name}: {config.method} needs calibration data")
        parts = []
        for g, wg in enumerate(w.chunk(groups)):
            h = stats.hessian[g] if stats is not None else None
            ng, _ = config.prune_matrix(wg.clone(), h, pattern, sparsity, name)
            parts.append(ng)
        new = torch.cat(parts)
    if not torch.isfinite(new).all():
        raise PruneError(f"{name}: pruning produced NaN or Inf; raise dampening")
    set_weight_matrix(module, new)
    return LayerReport(name, tuple(module.weight.shape), float((new == 0).float().mean()),
                       _relative_error(w, new, stats, groups), time.perf_counter() - start)


def _global_masks(layers: Mapping[str, nn.Module], config: PruneConfig, sparsity: float,
                  stats: Mapping[str, LayerStats]) -> dict[str, torch.Tensor]:
    """Keep-masks from one threshold over the scores of all layers (exact total count)."""
    scores = {}
    for name, module in layers.items():
        w = weight_matrix(module).detach().float()
        st = stats.get(name)
        g = groups_of(module)
        scores[name] = torch.cat([config.score(wg, st.hessian[i] if st else None, name)
                                  for i, wg in enumerate(w.chunk(g))])
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    keep = torch.ones_like(flat, dtype=torch.bool)
    k = int(round(sparsity * flat.numel()))
    if k:
        keep[torch.topk(flat, k, largest=False, sorted=False).indices] = False
    masks, i = {}, 0
    for name, s in scores.items():
        masks[name] = keep[i:i + s.numel()].view_as(s)
        i += s.numel()
    return masks


def _validate_layers(layers: Mapping[str, nn.Module], pattern: Pattern) -> None:
    for name, module in layers.items():
        if not torch.isfinite(module.weight).all():
            raise PruneError(f"{name}.weight holds NaN or Inf; fix the weights before pruning")
        w = weight_matrix(module)
        g = groups_of(module)
        pattern.validate_shape((w.shape[0] // g, w.shape[1]), name)


def prune(model: nn.Module, config: PruneConfig, calib=None, *, progress: bool = True,
          loss_fn=None) -> PruneReport:
    """Prune `model` in place with `config`; calib is a tensor or an iterable of batches.

    Batches are passed to the model as model(x), model(*tuple) or model(**dict). Methods that
    need gradients (WoodFisher) also take loss_fn(model, batch) -> scalar loss. On any error
    the model is left exactly as it was.
    """
    if getattr(config, "needs", None) == "gradients":
        if loss_fn is None:
            raise PruneError(f"{config.method} needs gradients: pass prune(model, config, "
                             f"calib, loss_fn=lambda model, batch: <scalar loss>), or call "
                             f"config.prune_global(model, loss_fn, batches)")
        return config.prune_global(model, loss_fn, as_batches(calib), progress=progress)
    pattern, sparsity = _check_config(config)
    layers = find_layers(model, config.include, config.exclude, config.keep_first,
                         config.keep_last)
    _validate_layers(layers, pattern)
    batches = as_batches(calib)
    if config.needs == "hessian" and not batches:
        raise PruneError(f"{config.method} needs calibration data: pass calib=...")
    if config.sequential and not batches:
        raise PruneError("sequential=True needs calibration data")
    report = PruneReport(config.method, pattern.name, sparsity, config.options())
    start = time.perf_counter()
    with restored_on_error(model, layers):
        model.eval()
        with Progress(enabled=progress) as bar:
            if config.sequential:
                seq = Sequential(model, layers, batches, config.blocks)
                task = bar.add(f"{config.method}: blocks", total=len(seq.blocks))
                for stage, stage_layers, stats in seq.stages(lambda b: bar.advance(task)):
                    _prune_stage(report, stage_layers, stats, config, pattern, sparsity, bar,
                                 stage)
            else:
                stats = {}
                if batches:
                    task = bar.add("calibrating", total=len(batches))
                    stats = collect_stats(model, layers, batches, lambda: bar.advance(task))
                _prune_stage(report, layers, stats, config, pattern, sparsity, bar, "layers")
    report.seconds = time.perf_counter() - start
    return report


def _prune_stage(report, layers, stats, config, pattern, sparsity, bar, stage):
    masks = _global_masks(layers, config, sparsity, stats) if config.scope == "global" else {}
    task = bar.add(f"{config.method}: {stage}", total=len(layers))
    for name, module in layers.items():
        report.layers.append(_prune_module(name, module, config, pattern, sparsity,
                                           stats.get(name), masks.get(name)))
        bar.advance(task)


def prune_layer(weight: torch.Tensor, calib: torch.Tensor | None, config: PruneConfig,
                name: str = "layer"):
    """Prune one (out, in) weight matrix; returns (new weight, keep-mask).

    calib is either input rows X (n, in), whose H = X^T X is formed here, or H itself
    (a square (in, in) tensor); it may be None for methods that need no data.
    """
    pattern, sparsity = _check_config(config)
    if weight.dim() != 2:
        raise PruneError(f"{name}: prune_layer takes an (out, in) matrix, got shape "
                         f"{tuple(weight.shape)}; use weight.reshape(out, -1)")
    if not torch.isfinite(weight).all():
        raise PruneError(f"{name}: weight holds NaN or Inf")
    pattern.validate_shape(tuple(weight.shape), name)
    hessian = None
    if calib is not None:
        if calib.dim() != 2 or calib.shape[1] != weight.shape[1] or calib.shape[0] == 0:
            raise PruneError(f"{name}: calibration must be input rows (n, {weight.shape[1]}) or "
                             f"a Hessian ({weight.shape[1]}, {weight.shape[1]}); got shape "
                             f"{tuple(calib.shape)}")
        if not torch.isfinite(calib).all():
            raise PruneError(f"{name}: calibration data holds NaN or Inf")
        if calib.shape[0] == calib.shape[1]:  # a square tensor is taken as H itself
            corner = calib[:16, :16]
            if not torch.allclose(corner, corner.T):
                raise PruneError(f"{name}: a square calibration tensor is read as the Hessian "
                                 f"X^T X, but it is not symmetric; pass X^T X, or more rows")
            hessian = calib.double()
        else:
            x = calib.double()
            hessian = x.T @ x
    elif config.needs == "hessian":
        raise PruneError(f"{config.method} needs calibration rows or a Hessian")
    if config.scope == "global":
        new_mask = pattern.select(config.score(weight.float(), hessian, name), sparsity)
        return weight.float() * new_mask, new_mask
    return config.prune_matrix(weight.detach().float().clone(), hessian, pattern, sparsity, name)


def sparsity_report(model: nn.Module) -> dict:
    """Zeros per prunable layer and overall: {'layers': {name: fraction}, 'total': fraction}."""
    layers, zeros, total = {}, 0, 0
    for name, m in model.named_modules():
        if is_prunable(m):
            w = m.weight.detach()
            z = int((w == 0).sum())
            layers[name] = z / w.numel()
            zeros += z
            total += w.numel()
    return {"layers": layers, "total": zeros / total if total else 0.0,
            "zeros": zeros, "weights": total}
