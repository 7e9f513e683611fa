"""The pruning family on the engine: `PruneConfig`, the options every pruning method shares.

A pruning method is one frozen dataclass in one file, registered with `@register`. Score-based
methods define `score(w, hessian, layer)`: the engine keeps the highest scores under the
pattern and zeroes the rest. Reconstruction methods (SparseGPT, OBS) define
`prune_matrix(w, hessian, pattern, sparsity, layer)` to also update the kept weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch

from prunekit.errors import PruneError
from prunekit.oneshot.engine import METHODS, LayerResult, Transform
from prunekit.patterns import NM, Block1xN, Pattern, Unstructured, get_pattern


def register(cls):
    """Add a method config class to METHODS under its `name`, with its metadata."""
    return METHODS.add(cls.name, cls, family=cls.family, needs=cls.needs,
                       patterns=tuple(p.__name__ for p in getattr(cls, "patterns", ())),
                       example=getattr(cls, "example", f"{cls.__name__}()"),
                       promises=tuple(getattr(cls, "promises", ())))


def get_method(name: str):
    return METHODS.get(name)


@dataclass(frozen=True)
class PruneConfig(Transform):
    """Options every pruning method shares (and those of Transform: include, exclude,
    keep_first, keep_last, sequential, blocks).

    sparsity: fraction of weights removed in each chosen layer; None takes the pattern's own
        (N:M) or 0.5.
    pattern: 'unstructured', 'unstructured:row', 'N:M' or '1xN'.
    """

    sparsity: float | None = None
    pattern: str = "unstructured"

    family: ClassVar[str] = "prune"
    level_field: ClassVar[str] = "sparsity"
    patterns: ClassVar[tuple[type[Pattern], ...]] = (Unstructured, NM, Block1xN)
    #: what the generated tests hold the method to: "beats_magnitude" = its calibration
    #: error is at most magnitude's on every layer
    promises: ClassVar[tuple[str, ...]] = ()
    #: "layer" scores compare within a layer; "global" compares across all chosen layers.
    scope: ClassVar[str] = "layer"
    #: a pattern text that does not parse names the field (the text itself is kept)
    field_parsers: ClassVar[dict] = {"pattern": lambda text: (get_pattern(text), text)[1]}

    def check(self) -> None:
        pattern = self.pattern_obj
        if not isinstance(pattern, self.patterns):
            names = ", ".join(p.__name__ for p in self.patterns)
            raise PruneError(f"{self.name} does not support pattern {pattern.name} "
                             f"(it supports {names})")
        _ = self.target_sparsity
        if self.scope == "global" and not isinstance(pattern, Unstructured):
            raise PruneError(f"scope='global' needs the unstructured pattern, got {pattern.name}")
        if self.scope == "global" and self.sequential:
            raise PruneError("scope='global' compares all layers at once; it cannot be "
                             "combined with sequential=True")

    @cached_property
    def pattern_obj(self) -> Pattern:
        return get_pattern(self.pattern)

    @cached_property
    def target_sparsity(self) -> float:
        """The sparsity asked for, or the pattern's own (N:M), or 0.5."""
        pattern = self.pattern_obj
        default = None if pattern.implied_sparsity else 0.5
        return pattern.resolve_sparsity(self.sparsity if self.sparsity is not None
                                        else default)

    def target(self) -> dict:
        return {"pattern": self.pattern_obj.name, "target_sparsity": self.target_sparsity}

    def skips_level(self, level) -> bool:
        return level == 0

    def at_level(self, level):
        if self.pattern_obj.implied_sparsity is not None:
            raise PruneError(f"pattern {self.pattern_obj.name} fixes every layer's sparsity; "
                             f"a per-layer budget needs unstructured or 1xN")
        return super().at_level(level)

    def check_layer(self, name, module) -> None:
        from prunekit.layers import groups_of, weight_matrix

        w = weight_matrix(module)
        g = groups_of(module)
        shape = (w.shape[0] // g, w.shape[1])
        self.pattern_obj.validate_shape(shape, name)
        if self.scope == "layer" and self.pattern_obj.prunes_all(shape, self.target_sparsity):
            raise PruneError(f"{name}: sparsity {self.target_sparsity:g} would remove every "
                             f"weight of its {shape[0]}x{shape[1]} matrix"
                             f"{' row' if getattr(self.pattern_obj, 'per', '') == 'row' else ''}"
                             f", which then computes nothing; lower the sparsity or exclude "
                             f"{name}")

    # -- what a method defines ---------------------------------------------------------

    def score(self, w: torch.Tensor, hessian: torch.Tensor | None, layer: str) -> torch.Tensor:
        """Importance of each weight of the (out, in) matrix; higher is kept."""
        raise NotImplementedError

    def prune_matrix(self, w, hessian, pattern: Pattern, sparsity: float, layer: str):
        """Prune one (out, in) float32 matrix; hessian is the group's (in, in) H or None.
        Returns (new matrix, keep-mask)."""
        mask = pattern.select(self.score(w, hessian, layer), sparsity)
        return w * mask, mask

    # -- the engine's side -------------------------------------------------------------

    def transform(self, w, hessian, layer, plan=None) -> LayerResult:
        if plan is not None:  # a keep-mask decided across layers (global scope)
            return LayerResult(w * plan, plan)
        new, keep = self.prune_matrix(w, hessian, self.pattern_obj, self.target_sparsity, layer)
        return LayerResult(new, keep)

    def plan(self, layers, stats):
        if self.scope != "global":
            return {}
        from prunekit.budget.alloc import global_keep_masks
        from prunekit.layers import groups_of, weight_matrix

        scores = {}
        for name, module in layers.items():
            w = weight_matrix(module).detach().float()
            st = stats.get(name)
            g = groups_of(module)
            scores[name] = torch.cat([self.score(wg, st.matrix(i) if st else None, name)
                                      for i, wg in enumerate(w.chunk(g))])
        return global_keep_masks(scores, self.target_sparsity)
