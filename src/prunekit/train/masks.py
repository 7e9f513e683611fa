"""The mask holder: keeps pruned weights of chosen layers at zero through any optimizer.

Three guards keep a pruned weight at exactly zero whatever the optimizer does: its gradient is
masked by a tensor hook (so momentum and Adam moments of pruned weights never grow), the
optimizer's state at pruned positions is zeroed whenever a mask changes, and the masks are
re-applied after every optimizer step by an optimizer step hook (which also undoes any decay
or drift an exotic optimizer might add). Masks live in each weight's own layout; pattern
choices are made on the (out, in) view of prunekit.layers, so every prunekit pattern works.

In soft mode (SMCP) weights are not zeroed: the forward uses weight * mask through a
parametrization whose backward is the identity, so pruned weights keep training and may return.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.errors import PruneError
from prunekit.layers import find_layers, is_hf_conv1d
from prunekit.patterns import NM, Block1xN, Pattern, get_pattern


def check_density(density, what: str = "density") -> float:
    """A kept fraction in (0, 1]."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not (
            0.0 < float(density) <= 1.0):
        raise PruneError(f"{what} must be in (0, 1] (the fraction of weights kept), "
                         f"got {density!r}")
    return float(density)


def check_span(start: int, end: int, what: str = "schedule",
               names: tuple[str, str] = ("start", "end")) -> None:
    """A schedule's step range: integers with 0 <= start < end; `names` are the two
    parameters as the schedule calls them."""
    for name, v in zip(names, (start, end)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise PruneError(f"{what}.{name} must be an integer step, got {v!r}")
    if start < 0:
        raise PruneError(f"{what}.{names[0]} must be >= 0, got {start}")
    if end <= start:
        raise PruneError(f"{what}: end step {end} is not after start step {start}; give "
                         f"{names[1]} > {names[0]}")


def check_positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PruneError(f"{what} must be a positive integer, got {value!r}")
    return value


def check_positive(value, what: str) -> float:
    """A finite number > 0 (learning rates, temperatures)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0.0 < float(value) < float("inf")):
        raise PruneError(f"{what} must be a positive number, got {value!r}")
    return float(value)


def check_seed(seed, what: str = "seed") -> int:
    """A random seed torch.Generator accepts: an integer in [0, 2**63)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise PruneError(f"{what} must be an integer in [0, 2**63), got {seed!r}")
    return seed


def final_density(pattern: Pattern, density: float | None, who: str) -> float:
    """The kept fraction a schedule ends at: `density` itself, or the one an N:M pattern
    fixes when density is None; both given must agree. `who` names the schedule."""
    implied = pattern.implied_sparsity
    if density is None:
        if implied is None:
            raise PruneError(f"{who}.density (the kept fraction at the end) is needed, in "
                             f"(0, 1], under pattern {pattern}")
        return 1.0 - implied
    density = check_density(density, f"{who}.density")
    if implied is not None and abs(1.0 - density - implied) > 1e-9:
        raise PruneError(f"{who}: pattern {pattern} fixes density at {1 - implied:g}; got "
                         f"density={density!r} (leave it unset)")
    return density


@dataclass(frozen=True)
class MatrixView:
    """How a layer's weight layout maps to the (out, in) matrix that patterns work on.

    Taken once, when a holder is built: SMCP and L0 later put a parametrization on the layer,
    which renames its class (ParametrizedConv1D) so that GPT-2's Conv1D is no longer
    recognised by name, and a transposed weight would be read as (in, out)."""

    shape: tuple[int, ...]
    transposed: bool  # GPT-2 Conv1D: the weight is stored (in, out)

    @classmethod
    def of(cls, module: nn.Module) -> MatrixView:
        return cls(tuple(module.weight.shape), is_hf_conv1d(module))

    @property
    def matrix_shape(self) -> tuple[int, int]:
        if self.transposed:
            return self.shape[1], self.shape[0]
        return self.shape[0], math.prod(self.shape[1:])

    def to_matrix(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor in the weight's layout (a weight, mask, score or gradient) as the
        contiguous (out, in) matrix: a view for Linear and convolutions, a copy for GPT-2's
        Conv1D, whose transpose is strided and cannot be flattened by pattern code
        (RuntimeError: view size is not compatible). Only ever read: masks and scores go
        back through from_matrix."""
        if self.transposed:
            return t.t().contiguous()
        return t.reshape(t.shape[0], -1)

    def from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        """Inverse of to_matrix."""
        return m.t() if self.transposed else m.reshape(self.shape)


def check_layer(name: str, module: nn.Module) -> None:
    """Refuse a layer whose weight a training schedule cannot mask, naming it and the fix:
    masks on a computed weight (weight_norm and other parametrizations) would not stick, a
    frozen or non-floating weight cannot train, a meta or empty one holds nothing."""
    w = module.weight
    parametrized = parametrize.is_parametrized(module, "weight") or not isinstance(
        module._parameters.get("weight"), nn.Parameter)
    if parametrized:
        raise PruneError(f"layer {name}: its weight is computed (weight_norm or another "
                         f"parametrization), so a mask on it would not stick; remove the "
                         f"parametrization first (torch.nn.utils.parametrize."
                         f"remove_parametrizations) or exclude the layer")
    if w.device.type == "meta":
        raise PruneError(f"layer {name}: its weight is on the meta device (no values); load "
                         f"the model's weights before building a schedule")
    if not w.is_floating_point():
        raise PruneError(f"layer {name}: weight dtype {w.dtype} is not floating point; "
                         f"exclude the layer")
    if not w.numel():
        raise PruneError(f"layer {name}: its weight is empty (shape {tuple(w.shape)}); "
                         f"exclude the layer")
    if not w.requires_grad:
        raise PruneError(f"layer {name}: its weight is frozen (requires_grad=False), so it "
                         f"does not train; exclude the layer or unfreeze it")


def tied_layers(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, list[str]]:
    """Chosen layers whose weight is also another module's parameter (tied embeddings), with
    the other names: a mask on such a weight prunes every copy."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    out = {}
    for n, m in layers.items():
        own = f"{n}.weight" if n else "weight"
        others = [q for q in owners.get(id(m.weight), []) if q != own]
        if others:
            out[n] = others
    return out


def pattern_select(pattern: Pattern, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of the (out, in) scores at `sparsity` under `pattern`.

    For N:M, sparsities below the pattern's own are met by a looser n':M (n' >= N), so a
    gradual schedule walks M:M -> (M-1):M -> ... -> N:M.
    """
    if isinstance(pattern, NM):
        n = max(pattern.n, pattern.m - int(round(sparsity * pattern.m)))
        if n >= pattern.m:
            return torch.ones_like(scores, dtype=torch.bool)
        return NM(n, pattern.m).select(scores, None)
    return pattern.select(scores, min(max(sparsity, 0.0), 1.0 - 1e-12))


def layer_densities(layers: dict[str, nn.Module], density: float, distribution: str = "uniform",
                    power: float = 1.0) -> dict[str, float]:
    """Per-layer densities whose weighted mean is `density`.

    uniform: every layer at `density`. erk (Evci et al. 2020, after Mocanu et al. 2018's ER):
    density_l proportional to sum(shape_l) / prod(shape_l) (kernel dims included), layers
    that would exceed 1 are made dense and the rest rescaled so the total count is kept.
    """
    density = check_density(density)
    if distribution == "uniform":
        return {n: density for n in layers}
    if distribution not in ("erk", "er"):
        raise PruneError(f"distribution must be 'uniform', 'erk' or 'er', got {distribution!r}")
    from prunekit.budget.alloc import erk_densities

    shapes = {n: tuple(m.weight.shape) for n, m in layers.items()}
    return erk_densities(shapes, density, power, kernel=distribution == "erk")


class _STEMask(torch.autograd.Function):
    """weight * mask forward, identity backward: masked-out weights still get gradients."""

    @staticmethod
    def forward(ctx, w, mask):
        return w * mask

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SoftMask(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def forward(self, w):
        return _STEMask.apply(w, self.mask.to(w.dtype))


class MaskHolder:
    """Boolean keep-masks for the prunable layers of `model` (True = kept).

    model, optimizer: the user's; the optimizer must hold every chosen weight.
    pattern: any prunekit pattern ('unstructured', 'unstructured:row', 'N:M', '1xN').
    include / exclude / keep_first / keep_last: layer choice as in prunekit.layers.find_layers.
    soft: masks act in the forward only (identity backward) and weights are never zeroed.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 pattern: str | Pattern = "unstructured", include: Sequence[str] = ("*",),
                 exclude: Sequence[str] = (), keep_first: bool = False,
                 keep_last: bool = False, soft: bool = False):
        if not isinstance(model, nn.Module):
            raise PruneError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.pattern = get_pattern(pattern)
        self.layers = find_layers(model, include, exclude, keep_first, keep_last)
        for name, m in self.layers.items():
            check_layer(name, m)
        self.views = {n: MatrixView.of(m) for n, m in self.layers.items()}
        for name, view in self.views.items():
            self.pattern.validate_shape(view.matrix_shape, name)
        #: layer -> other parameter names sharing its weight; their copies are pruned too
        self.tied = tied_layers(model, self.layers)
        for name, others in self.tied.items():
            warnings.warn(f"layer {name}'s weight is tied to {', '.join(others)}: its mask "
                          f"prunes every copy; exclude {name} to keep them dense", stacklevel=2)
        self.weights = {n: m.weight for n, m in self.layers.items()}
        self.masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in self.weights.items()}
        self.optimizer = optimizer
        self.soft = False
        self.dense_grads: dict[str, torch.Tensor] | None = None
        self._capture = False
        self._hooks: list = []
        if optimizer is not None:
            check_optimizer(optimizer, self.weights)
            self._hooks.append(optimizer.register_step_post_hook(lambda *a: self.apply()))
        if soft:
            self._make_soft()
        else:
            self._add_grad_hooks()

    # -- hooks ----------------------------------------------------------------------------

    def _add_grad_hooks(self) -> None:
        for name, w in self.weights.items():
            self._hooks.append(w.register_hook(self._grad_hook(name)))

    def _grad_hook(self, name: str):
        def hook(grad):
            if self._capture:
                self.dense_grads[name] = grad.detach().clone()
            return grad * self.masks[name].to(grad.dtype)
        return hook

    def _make_soft(self) -> None:
        self.soft = True
        for name, m in self.layers.items():
            parametrize.register_parametrization(m, "weight", _SoftMask(self.masks[name]),
                                                 unsafe=True)

    def harden(self) -> None:
        """Leave soft mode: bake weight * mask into the weights and mask from now on."""
        if not self.soft:
            return
        for m in self.layers.values():
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        self.soft = False
        self._add_grad_hooks()
        for name in self.masks:
            self._zero_state(name, ~self.masks[name])
        self.apply()

    def capture_dense_grads(self, on: bool) -> None:
        """Keep a copy of each chosen weight's unmasked gradient from the next backward."""
        self._capture = bool(on)
        self.dense_grads = {} if on else None

    def remove(self) -> None:
        """Drop all hooks (masks stop being enforced; weights keep their current values)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def release(self) -> None:
        """Undo what building the holder did to the model and optimizer (hooks, soft-mode
        parametrizations with the weights as they were): a schedule whose construction
        fails leaves nothing behind."""
        self.remove()
        if self.soft:
            for m in self.layers.values():
                if parametrize.is_parametrized(m, "weight"):
                    parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            self.soft = False

    # -- masks ----------------------------------------------------------------------------

    def matrix(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return self.views[name].to_matrix(t)

    def matrix_shape(self, name: str) -> tuple[int, int]:
        return self.views[name].matrix_shape

    def unmatrix(self, name: str, m: torch.Tensor) -> torch.Tensor:
        return self.views[name].from_matrix(m)

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every pruned weight (no-op in soft mode)."""
        if self.soft:
            return
        for name, w in self.weights.items():
            w.mul_(self.masks[name].to(w.dtype))

    @torch.no_grad()
    def set_mask(self, name: str, mask: torch.Tensor) -> None:
        """Install a new keep-mask for one layer (weight layout, or the (out, in) view).

        Newly pruned weights are zeroed (hard mode); newly grown ones start at zero with empty
        optimizer state, as RigL and GaP prescribe.
        """
        old = self.masks[name]
        mask = mask.to(device=old.device, dtype=torch.bool)
        if mask.shape != old.shape:
            mask = self.unmatrix(name, mask)
        if mask.shape != old.shape:
            raise PruneError(f"{name}: mask shape {tuple(mask.shape)} does not match the weight "
                             f"{tuple(old.shape)}")
        changed = mask ^ old
        old.copy_(mask)  # in place: soft-mode parametrizations hold this tensor
        if self.soft or not bool(changed.any()):
            return
        w = self.weights[name]
        w.masked_fill_(changed, 0.0)
        self._zero_state(name, changed)

    @torch.no_grad()
    def _zero_state(self, name: str, where: torch.Tensor) -> None:
        if self.optimizer is None:
            return
        for v in self.optimizer.state.get(self.weights[name], {}).values():
            if isinstance(v, torch.Tensor) and v.shape == where.shape:
                v.masked_fill_(where, 0)

    def counts(self) -> dict[str, int]:
        """Kept weights per layer."""
        return {n: int(m.sum()) for n, m in self.masks.items()}

    def sparsity(self) -> float:
        """Fraction of the chosen layers' weights that are pruned."""
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - sum(self.counts().values()) / total

    def layer_sparsity(self) -> dict[str, float]:
        return {n: 1.0 - float(m.float().mean()) for n, m in self.masks.items()}

    def check_pattern(self) -> None:
        """Raise PatternViolation unless every mask obeys the holder's pattern."""
        for name, mask in self.masks.items():
            self.pattern.check(self.matrix(name, mask))

    # -- selection helpers shared by the schedules -----------------------------------------

    def densities(self, density: float, distribution: str = "uniform") -> dict[str, float]:
        """Per-layer densities averaging `density` (layer_densities); under N:M every layer
        has the pattern's own density, whatever the distribution."""
        if self.pattern.implied_sparsity is not None:
            distribution = "uniform"
        return layer_densities(self.layers, density, distribution)

    @torch.no_grad()
    def random_masks(self, densities: dict[str, float], seed: int) -> None:
        """Install uniformly random masks (pattern obeyed) on the layers in `densities`, at
        their densities, drawn from one generator seeded with `seed`; zero what they prune."""
        generator = torch.Generator().manual_seed(check_seed(seed))
        for name, density in densities.items():
            w = self.weights[name]
            scores = torch.rand(w.shape, generator=generator).to(w.device)
            self.set_mask(name, self.select(name, scores, 1.0 - density))
        self.apply()

    @torch.no_grad()
    def kept_magnitudes(self) -> dict[str, torch.Tensor]:
        """|w| of every kept weight and -1 at pruned ones: ranked on these scores, pruned
        weights fall below every kept one, so magnitude pruning only ever shrinks the
        support."""
        return {n: torch.where(self.masks[n], w.detach().abs(), -1.0)
                for n, w in self.weights.items()}

    def select(self, name: str, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        """Keep-mask (weight layout) of one layer keeping its highest scores under the pattern."""
        return self.unmatrix(name, pattern_select(self.pattern, self.matrix(name, scores),
                                                  sparsity))

    def global_sparsities(self, scores: dict[str, torch.Tensor],
                          sparsity: float) -> dict[str, float]:
        """Per-layer sparsities from one threshold over all layers' scores (global ranking).

        Under 1xN the ranking is over block scores; N:M fixes each layer and so stays uniform.
        """
        if isinstance(self.pattern, NM):
            return {n: sparsity for n in scores}
        from prunekit.budget.alloc import threshold_counts

        units = {}
        for n, s in scores.items():
            unit = self.matrix(n, s)
            if isinstance(self.pattern, Block1xN):
                unit = self.pattern.block_scores(unit)
            units[n] = unit.reshape(-1).float()
        total = sum(u.numel() for u in units.values())
        counts = threshold_counts(units, int(round(sparsity * total)))
        return {n: counts[n] / units[n].numel() for n in scores}

    def select_all(self, scores: dict[str, torch.Tensor], sparsity: float | dict[str, float],
                   scope: str = "layer") -> None:
        """Install masks keeping the highest scores: per layer, or ranked globally."""
        if scope not in ("layer", "global"):
            raise PruneError(f"scope must be 'layer' or 'global', got {scope!r}")
        if isinstance(sparsity, dict):
            per = sparsity
        elif scope == "global":
            per = self.global_sparsities(scores, sparsity)
        else:
            per = {n: sparsity for n in scores}
        for n, s in scores.items():
            self.set_mask(n, self.select(n, s, per[n]))

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: m.clone() for n, m in self.masks.items()}

    def load_state_dict(self, masks: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.masks if n not in masks]
        unexpected = [n for n in masks if n not in self.masks]
        if missing or unexpected:
            raise PruneError(
                f"saved masks do not match the chosen layers: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}; build the schedule with the same include/exclude")
        for n, m in masks.items():
            if tuple(m.shape) != tuple(self.masks[n].shape):
                raise PruneError(f"saved mask of {n} has shape {tuple(m.shape)}, the weight has "
                                 f"{tuple(self.masks[n].shape)}")
            self.set_mask(n, m)
        self.apply()


def check_optimizer(optimizer, weights: dict[str, torch.Tensor]) -> None:
    """Raise unless the optimizer updates every chosen weight."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise PruneError(f"optimizer must be a torch.optim.Optimizer, got "
                         f"{type(optimizer).__name__}")
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n for n, w in weights.items() if id(w) not in held]
    if missing:
        raise PruneError(
            f"the optimizer does not hold the weight of layer {missing[0]} ({len(missing)} of "
            f"{len(weights)} chosen layers missing); build it from model.parameters() of this "
            f"model, or exclude those layers")
