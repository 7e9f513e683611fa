"""OBQ, the Optimal Brain Quantizer (Frantar, Singh and Alistarh 2022, "Optimal Brain
Compression"): exact greedy quantization, the quantization half of OBC.

Each output row is independent given H. For a row, repeat until every weight is on the grid:
the weight p whose rounding q_p costs least, (w_p - q_p)^2 / [H^-1]_pp, goes to q_p; the row's
other weights take the exact OBS compensation w -= (w_p - q_p) / [H^-1]_pp * H^-1[:, p]; and
H^-1 is downdated to the inverse without p. The steps are exact OBS's (`obs_step` in
prunekit.oneshot.methods.obs: the downdates kept as rank-one factors, rows in batches, float64);
only the target differs, the nearest grid point instead of 0. Scales are fitted on the starting
weights. A row costs O(in^3), so OBQ is for layers of up to a few thousand inputs.

`obq_matrix` also takes a pruned set: those weights go to 0 first (in any order the result is
the same optimal state), then the kept ones are quantized greedily: exact OBS's joint path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from prunekit.config import positive
from prunekit.oneshot.hessian import cholesky_lower, damped_hessian
from prunekit.oneshot.methods.base import register
from prunekit.oneshot.methods.obs import obs_step
from prunekit.quant.base import QuantConfig
from prunekit.quant.grid import Grid, QuantizedWeight

#: rows per batch are capped so the rank-one factors (rows, in, in) float64 stay this small
FACTOR_BYTES = 256 * 2**20


def obq_matrix(w: torch.Tensor, hinv: torch.Tensor, grid: Grid, scales: torch.Tensor,
               zeros: torch.Tensor, pruned: torch.Tensor | None = None, batch: int = 32,
               steps: int | None = None) -> QuantizedWeight:
    """Greedy exact OBQ on each row of w (rows, d) float64 with H^-1 `hinv` (d, d) float64, on
    the grid with the given scales and zero points; `pruned` (rows, d) bool weights go to 0
    first. steps: stop after that many steps per row (tests); the other codes are then
    the nearest grid points of the weights as they stand."""
    rows, d = w.shape
    steps = d if steps is None else steps
    s_all = grid.expand(scales, d).to(w.dtype)
    z_all = grid.expand(zeros, d).to(w.dtype)
    codes = torch.empty((rows, d), dtype=torch.uint8)
    diag0 = torch.diagonal(hinv)
    batch = max(1, min(batch, FACTOR_BYTES // (8 * d * d)))
    for r1 in range(0, rows, batch):
        r2 = min(r1 + batch, rows)
        b = r2 - r1
        ar = torch.arange(b)
        x = w[r1:r2].clone()
        s, z = s_all[r1:r2], z_all[r1:r2]
        gone = torch.zeros((b, d), dtype=torch.bool)
        if pruned is not None:
            npruned = pruned[r1:r2].sum(dim=1)
            forced = torch.sort(pruned[r1:r2].to(torch.int8), dim=1, descending=True,
                                stable=True).indices  # each row's pruned inputs first
        diag = diag0.expand(b, d).clone()
        factors = torch.empty((b, min(steps, d), d), dtype=w.dtype)
        coef = torch.empty((b, 1, d), dtype=w.dtype)
        code = torch.empty((b, d), dtype=w.dtype)
        active = torch.ones(b, dtype=torch.bool)
        for t in range(steps):
            torch.clamp(torch.round(x / s) + z, 0, grid.maxq, out=code)
            target = (code - z) * s
            err = (x - target).square_().masked_fill_(gone, 0.0)
            p = torch.argmin((err / diag).masked_fill_(gone, math.inf), dim=1)
            # a weight pushed past the grid's end (clamped: error over half a step) is
            # quantized at once, the largest first (OBC's rule for outliers)
            outlier = (err > 0.25 * s.square()).any(dim=1)
            p = torch.where(outlier, torch.argmax(err, dim=1), p)
            if pruned is not None:
                prune_now = npruned > t
                p = torch.where(prune_now, forced[:, min(t, d - 1)], p)
                value = torch.where(prune_now, 0.0, target[ar, p])
                chosen = torch.where(prune_now, z[ar, p], code[ar, p])
            else:
                value, chosen = target[ar, p], code[ar, p]
            obs_step(x, hinv, factors, coef, diag, p, t, active, value)
            x[ar, p] = value
            codes[r1 + ar, p] = chosen.to(torch.uint8)
            gone[ar, p] = True
            diag.masked_fill_(gone, 1.0)
        if steps < d:  # the rest to their nearest grid points, as they stand
            rest = torch.clamp(torch.round(x / s) + z, 0, grid.maxq).to(torch.uint8)
            codes[r1:r2] = torch.where(gone, codes[r1:r2], rest)
    keep = None if pruned is None else ~pruned
    return QuantizedWeight(grid, codes, scales, zeros, keep)


@register
@dataclass(frozen=True)
class OBQ(QuantConfig):
    """Exact greedy quantization: least OBS cost first, exact downdates (small layers).

    O(in^3) a row, for layers of up to a few thousand inputs. batch: rows at a time (capped
    so the downdate factors stay within FACTOR_BYTES). dampening: as GPTQ's."""

    dampening: float = 0.01
    #: "mean": dampening x the mean diagonal of H (published); "input": x each input's own
    #: H_ii (prunekit.oneshot.hessian.damped_hessian says why)
    dampening_rule: Literal["mean", "input"] = "mean"
    batch: int = 32

    name = "obq"
    needs = "hessian"
    example = "OBQ(bits=4)"

    def check(self):
        super().check()
        positive(self, "batch")
        positive(self, "dampening", strict=False)

    def quantize_matrix(self, w, hessian, layer):
        w = w.to(torch.float64).clone()
        h = damped_hessian(hessian, w, self.dampening, layer,
                           rule=self.dampening_rule)
        hinv = torch.cholesky_inverse(cholesky_lower(h, layer, self.dampening))
        scales, zeros = self.grid.fit(w.float(), layer)
        return obq_matrix(w, hinv, self.grid, scales, zeros, batch=self.batch)
