"""Round to nearest: every weight to its closest grid point, the baseline every post-training
quantizer is measured against. Needs no data."""

from __future__ import annotations

from dataclasses import dataclass

from prunekit.oneshot.methods.base import register
from prunekit.quant.base import QuantConfig


@register
@dataclass(frozen=True)
class RTN(QuantConfig):
    """Round to nearest on the grid (the baseline; no calibration data)."""

    name = "rtn"
    needs = "none"
    example = "RTN(bits=8)"

    def quantize_matrix(self, w, hessian, layer):
        return self.grid.quantize(w, layer=layer)
