"""The method protocol and registry.

A method is a config dataclass that also knows how to prune one weight matrix:
`prune_matrix(w, hessian, pattern, sparsity, layer)` returns the new matrix and its keep-mask.
Score-based methods only define `score`; the default `prune_matrix` then keeps the highest
scores under the pattern and zeroes the rest. Reconstruction methods (SparseGPT, OBS)
override `prune_matrix` to also update the kept weights.

A new method is one file with one `@register`-ed dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from prunekit.errors import PruneError
from prunekit.patterns import NM, Block1xN, Pattern, Unstructured

METHODS: dict[str, type[PruneConfig]] = {}


def register(cls: type[PruneConfig]) -> type[PruneConfig]:
    """Add a method config class to the registry under its `method` name."""
    METHODS[cls.method] = cls
    return cls


def get_method(name: str) -> type[PruneConfig]:
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise PruneError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None


@dataclass
class PruneConfig:
    """Options every method shares.

    sparsity: fraction of weights to remove in each chosen layer; None takes the pattern's own
        (N:M) or 0.5.
    pattern: 'unstructured', 'unstructured:row', 'N:M' or '1xN'.
    include / exclude: name globs choosing the layers; keep_first / keep_last keep the first /
        last prunable layer dense.
    sequential: calibrate block by block (blocks: names or globs, default the longest ModuleList).
    """

    sparsity: float | None = None
    pattern: str = "unstructured"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    keep_first: bool = False
    keep_last: bool = False
    sequential: bool = False
    blocks: tuple[str, ...] | None = field(default=None)

    method: ClassVar[str] = ""
    #: "none": weights alone; "hessian": needs calibration data (input statistics).
    needs: ClassVar[str] = "none"
    patterns: ClassVar[tuple[type[Pattern], ...]] = (Unstructured, NM, Block1xN)
    #: "layer" scores compare within a layer; "global" compares across all chosen layers.
    scope: str = field(default="layer", init=False)

    def score(self, w: torch.Tensor, hessian: torch.Tensor | None, layer: str) -> torch.Tensor:
        raise NotImplementedError

    def prune_matrix(self, w, hessian, pattern: Pattern, sparsity: float, layer: str):
        """Prune one (out, in) float32 matrix; hessian is the group's (in, in) H or None."""
        mask = pattern.select(self.score(w, hessian, layer), sparsity)
        return w * mask, mask

    def options(self) -> dict:
        """All fields as plain values (for reports, the CLI and experiment files)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def damped_hessian(hessian: torch.Tensor, w: torch.Tensor, dampening: float, layer: str):
    """Float64 copy of H with dead inputs fixed and dampening added; zeroes dead columns of w.

    A dead input (zero diagonal: the feature never fired on the calibration set) gets H_ii = 1
    so the matrix stays invertible; its weights cannot matter and are set to zero.
    """
    if not (dampening >= 0):
        raise PruneError(f"{layer}: dampening must be >= 0, got {dampening!r}")
    h = hessian.to(torch.float64).clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    w[:, dead] = 0
    diag += dampening * diag.mean()
    return h


def cholesky_lower(h: torch.Tensor, layer: str, dampening: float) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise PruneError(
            f"{layer}: the calibration Hessian is not positive definite after dampening "
            f"{dampening:g} (Cholesky failed at column {int(info) - 1}); raise dampening or use "
            f"more calibration data"
        )
    return chol
