"""GPTQ (Frantar, Ashkboos, Hoefler and Alistarh 2023): quantize a layer column by column,
spreading each column's rounding error onto the columns not yet quantized with the inverse
Hessian of the layer's reconstruction error (Optimal Brain Surgeon's update, in a fixed order).

The sweep is SparseGPT's (`sparsegpt_matrix` with nothing pruned): the upper Cholesky factor U
of H^-1 carries the updates, applied lazily per block of columns and, inside a block, per
sub-block, so the work is matrix products. Scales per output channel are fitted on the
starting weights; in groups they are fitted when the sweep reaches a group's first column, on
the weights as updated so far (the paper's choice).

act_order visits the columns by decreasing H_jj (the inputs with the most energy first, while
the most weights remain to absorb their error). The groups then keep their layout (runs of
`group_size` consecutive inputs of the original order, which integer kernels and formats
need) by fitting every group's scales on the starting weights ("static groups").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from prunekit.config import positive
from prunekit.oneshot.hessian import damped_hessian, inverse_cholesky_upper
from prunekit.oneshot.methods.base import register
from prunekit.oneshot.methods.sparsegpt import sparsegpt_matrix
from prunekit.quant.base import QuantConfig
from prunekit.quant.grid import ColumnQuantizer


@register
@dataclass(frozen=True)
class GPTQ(QuantConfig):
    """Column by column with OBS error feedback and lazy block updates; act_order optional.

    act_order: columns by decreasing Hessian diagonal, with static groups. blocksize: columns
    per lazy block. dampening: added to H's diagonal, times its mean."""

    act_order: bool = False
    blocksize: int = 128
    dampening: float = 0.01
    #: "mean": dampening x the mean diagonal of H (published); "input": x each input's own
    #: H_ii (prunekit.oneshot.hessian.damped_hessian says why)
    dampening_rule: Literal["mean", "input"] = "mean"

    name = "gptq"
    needs = "hessian"
    example = "GPTQ(bits=4, group_size=128, act_order=True)"

    def check(self):
        super().check()
        positive(self, "blocksize")
        positive(self, "dampening", strict=False)

    def quantize_matrix(self, w, hessian, layer):
        w = w.clone()
        h = damped_hessian(hessian, w, self.dampening, layer,
                           rule=self.dampening_rule)  # dead inputs' weights -> 0
        perm = None
        if self.act_order:
            perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        quant = ColumnQuantizer(self.grid, w, layer, perm, static=self.act_order)
        if perm is not None:
            w, h = w[:, perm], h[perm][:, perm]
        u = inverse_cholesky_upper(h.float(), layer, self.dampening)
        sparsegpt_matrix(w, u, None, 0.0, self.blocksize, quant=quant)
        return quant.result()
