"""The numerics every Hessian-based method shares (SparseGPT, exact OBS, GPTQ, OBQ,
data-aware SVD), stated once: dead inputs, dampening, and the factorisations of H."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch

from prunekit.errors import PruneError


def damped_hessian(hessian: torch.Tensor, w: torch.Tensor, dampening: float, layer: str):
    """Float64 copy of H with dead inputs fixed and dampening added; zeroes dead columns of w.

    A dead input (zero diagonal: the feature never fired on the calibration set) gets H_ii = 1
    so the matrix stays invertible; its weights cannot matter and are set to zero. Dampening
    adds `dampening` times the mean diagonal to the diagonal (the published rule).
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


def inverse_cholesky_upper(h: torch.Tensor, layer: str, dampening: float) -> torch.Tensor:
    """Upper triangular U with U^T U = h^-1.

    With P the reversal permutation and P h P = L L^T, h^-1 = (P L^-T P)(P L^-1 P), and
    P L^-1 P is upper triangular. One Cholesky plus one triangular inverse.
    """
    flipped = torch.flip(h, dims=(0, 1)).contiguous()
    chol = cholesky_lower(flipped, layer, dampening)
    lapack = scipy.linalg.lapack
    trtri = lapack.strtri if chol.dtype == torch.float32 else lapack.dtrtri
    inv, info = trtri(np.asfortranarray(chol.numpy()), lower=1)
    if info != 0:
        raise PruneError(f"{layer}: triangular inverse failed (info={info}); raise dampening")
    return torch.flip(torch.from_numpy(np.ascontiguousarray(inv)), dims=(0, 1)).contiguous()
