"""The low-rank family on the engine: `LowRankConfig`, the options and steps every method
shares, and the one factorization they all use.

A low-rank method turns a layer's (out, in) weight W into U (out, r) @ V (r, in). Its
`transform` returns LayerResult(weight=U @ V, factors=(U, V), detail={"rank", "groups"}),
or the weight as it was with a note when the rank would not make the layer smaller; `apply`
then replaces the module by a `Factorized` pair (prunekit.lowrank.modules) and returns the
undo that puts the original back. The engine reports each layer's relative output error on
the calibration rows from U @ V.

The factorization (`factor`): the best rank-r approximation of W in Frobenius norm is its
truncated SVD (Eckart-Young). Data-aware, it minimises ||(W - W') X^T|| over the calibration
rows X instead: with H = X^T X = L L^T, that is ||(W - W') L||, whose minimiser is the
truncated SVD of W L with L^-1 folded back into V (the Hessian numerics of SparseGPT and
GPTQ, `prunekit.oneshot.hessian`, dampen H first). The singular values are split evenly,
U = U_r S_r^1/2 and V = S_r^1/2 V_r^T, so both halves train at the same scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from prunekit.errors import PruneError
from prunekit.layers import groups_of, weight_matrix
from prunekit.lowrank.modules import _layer_spec, factorized, replace_module
from prunekit.oneshot.engine import METHODS, LayerResult, Transform
from prunekit.oneshot.hessian import cholesky_lower, damped_hessian


def register(cls, needs: str = "none"):
    """Add a low-rank config class to METHODS under its `name` (family "lowrank")."""
    return METHODS.add(cls.name, cls, family="lowrank", needs=needs, patterns=(),
                       example=getattr(cls, "example", f"{cls.__name__}()"), promises=())


def _split(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors of the best rank-`rank` approximation of float64 `a`."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def factor(w: torch.Tensor, rank: int, hessian: torch.Tensor | None = None,
           dampening: float = 0.01, layer: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """U (out, rank), V (rank, in) float32 with U @ V the best rank-`rank` approximation of
    w: in Frobenius norm, or, given the (in, in) Hessian H = X^T X of the calibration rows,
    in ||(W - U V) X^T|| (H dampened by `dampening` times its mean diagonal first)."""
    w64 = w.double()
    if hessian is None:
        u, v = _split(w64, rank)
    else:
        # damped_hessian zeroes the dead columns of the matrix it is given: give it a copy,
        # so that a full rank still reproduces W exactly
        h = damped_hessian(hessian, w64.clone(), dampening, layer)
        chol = cholesky_lower(h, layer, dampening)
        u, vl = _split(w64 @ chol, rank)
        v = torch.linalg.solve_triangular(chol, vl, upper=False, left=False)  # vl @ L^-1
    return u.float(), v.float()


def factor_groups(w: torch.Tensor, rank: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ALDS's scheme: the input columns split into `groups` equal blocks, each factorized
    at `rank` in Frobenius norm; U (out, groups * rank), V (groups * rank, in) block
    diagonal, U @ V = [U_1 V_1 | ... | U_j V_j]."""
    cols = w.shape[1] // groups
    parts = [factor(w[:, g * cols:(g + 1) * cols], rank) for g in range(groups)]
    return torch.cat([u for u, _ in parts], dim=1), torch.block_diag(*[v for _, v in parts])


def factored_params(out: int, inputs: int, rank: int, groups: int = 1) -> int:
    """Weights of the pair: V holds rank * inputs (block diagonal over the groups), U
    out * groups * rank. `inputs` counts a convolution's kernel positions."""
    return rank * (inputs + out * groups)


def smaller_below(out: int, inputs: int, groups: int = 1) -> int:
    """The smallest rank that no longer makes the layer smaller."""
    return math.ceil(out * inputs / (inputs + out * groups))


@dataclass(frozen=True, kw_only=True)
class LowRankConfig(Transform):
    """Options every low-rank method shares (and those of Transform: include, exclude,
    keep_first, keep_last, sequential, blocks)."""

    family: ClassVar[str] = "lowrank"

    def __post_init__(self):
        super().__post_init__()
        if self.tied == "change":
            raise PruneError(f"{type(self).__name__}: tied='change' cannot hold for low rank: "
                             f"a factorized layer is two new modules, so the other holders of "
                             f"a tied weight would keep the old one; leave tied='skip'")

    def check_layer(self, name: str, module: nn.Module) -> None:
        if groups_of(module) > 1:
            raise PruneError(f"{name}: a grouped convolution (groups={groups_of(module)}) has "
                             f"no low-rank factorization here (its weight is already block "
                             f"diagonal); exclude it, e.g. exclude=({name!r},)")
        _layer_spec(module)

    def at_flops(self, ratio: float) -> LowRankConfig:
        """This config aimed at keeping `ratio` of the chosen layers' FLOPs (the measured
        speedup loop sets it)."""
        raise PruneError(f"{self.name} takes no FLOPs budget")

    def result(self, u: torch.Tensor, v: torch.Tensor, rank: int,
               groups: int = 1) -> LayerResult:
        """The factorized layer: weight U @ V, the factors, and its rank and size."""
        out, inputs = u.shape[0], v.shape[1]
        return LayerResult(u @ v, factors=(u, v),
                           detail={"rank": rank, "groups": groups,
                                   "params": factored_params(out, inputs, rank, groups)})

    def kept(self, w: torch.Tensor, why: str) -> LayerResult:
        """The layer left as it is, with the reason."""
        return LayerResult(w, note=why, detail={"rank": "-", "groups": "-",
                                                "params": w.numel()})

    def apply(self, name, module, result, model):
        if result.factors is None:
            return None
        u, v = result.factors
        pair = factorized(module, u, v, int(result.detail.get("groups", 1)))
        pair.train(module.training)
        replace_module(model, name, pair)
        return lambda: replace_module(model, name, module)


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of the layer's weight matrix, in counting a convolution's kernel."""
    w = weight_matrix(module)
    return int(w.shape[0]), int(w.shape[1])
