"""The quantization family on the engine: `QuantConfig`, the options every quantizer shares.

A quantizer is one frozen dataclass in one file of prunekit/quant/methods, registered with
`@register`, that defines `quantize_matrix(w, hessian, layer) -> QuantizedWeight`. The engine
gives it each chosen layer's (out, in) float32 weight and, when it needs calibration, the
layer's input Hessian H = X^T X; the layer then computes with the dequantized weight and keeps
the quantized form as `module.quantized_weight` (prunekit.quant.model), undone on any error.

A per-layer budget sets `bits` ({layer: bits}); 16 bits leaves a layer in floating point.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal

import torch

from prunekit.errors import PruneError
from prunekit.layers import set_weight_matrix
from prunekit.oneshot.engine import LayerResult, Transform
from prunekit.quant import model as qmodel
from prunekit.quant.grid import Grid, QuantizedWeight

#: the bit width that means "leave the layer in floating point" in a per-layer budget
FLOAT_BITS = 16


@dataclass(frozen=True)
class QuantConfig(Transform):
    """Options every quantizer shares (and those of Transform: include, exclude, keep_first,
    keep_last, sequential, blocks).

    bits: 2..8. group_size: consecutive inputs sharing a scale (e.g. 32, 64, 128; it must
    divide every chosen layer's input size), None for one scale per output channel.
    sym: symmetric grid (zero point fixed) or asymmetric. search: scales from the min-max
    range, or the shrunk range with the least squared error ("mse"). scale_dtype: "float16"
    makes every scale an exact float16 value (for formats that store fp16 scales).
    """

    bits: int = 4
    group_size: int | None = None
    sym: bool = True
    search: Literal["minmax", "mse"] = "minmax"
    scale_dtype: Literal["float32", "float16"] = "float32"

    family: ClassVar[str] = "quantize"
    level_field: ClassVar[str] = "bits"
    #: quantizers take no sparsity pattern (the sweep benchmark's experiment files read this)
    patterns: ClassVar[tuple] = ()

    def check(self) -> None:
        _ = self.grid

    @cached_property
    def grid(self) -> Grid:
        try:
            return Grid(self.bits, self.group_size, self.sym, self.search, self.scale_dtype)
        except PruneError as e:
            raise PruneError(f"{type(self).__name__}: {e}") from None

    # -- budgets -----------------------------------------------------------------------

    def skips_level(self, level) -> bool:
        return level == FLOAT_BITS

    def at_level(self, level):
        if self.skips_level(level):
            return self  # the layer is left as it is; this config is never run on it
        return super().at_level(level)

    # -- the engine's side -------------------------------------------------------------

    def check_layer(self, name, module) -> None:
        qmodel.check_layer(self.grid, name, module)

    def quantize_matrix(self, w: torch.Tensor, hessian: torch.Tensor | None,
                        layer: str) -> QuantizedWeight:
        """Quantize one (out, in) float32 matrix given its (in, in) float64 H (or None)."""
        raise NotImplementedError

    def transform(self, w, hessian, layer, plan=None) -> LayerResult:
        q = self.quantize_matrix(w, hessian, layer)
        return LayerResult(q.dequantize(), quant=q, detail={"bits": self.bits})

    def apply(self, name, module, result, model):
        set_weight_matrix(module, result.weight)
        return qmodel.attach(module, result.quant)

    def target(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "grid": self.grid.spec}
