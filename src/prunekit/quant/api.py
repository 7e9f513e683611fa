"""The quantization verbs on the engine: quantize a model in place, quantize one layer."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from prunekit.errors import PruneError
from prunekit.oneshot.engine import Report, run, transform_layer
from prunekit.quant.base import QuantConfig
from prunekit.quant.grid import QuantizedWeight


def quantize(model: nn.Module, config: QuantConfig, calib=None, *,
             budget: Mapping[str, int] | None = None, progress: bool = True) -> Report:
    """Quantize `model` in place with `config` (prunekit.GPTQ(...), RTN, OBQ); calib is a
    tensor or an iterable of batches, passed to the model as model(x), model(*tuple) or
    model(**dict). Each layer then computes with its dequantized weight and keeps its
    quantized form (prunekit.quant.quantized_layers, save_quantized). budget: {layer: bits}
    quantizes each named layer at its own bit width (16 leaves it in floating point); see
    prunekit.quant.mixed for choosing one. With sequential=True, block k+1 is calibrated on
    the outputs of block k already quantized. On any error the model is left as it was."""
    _check_quant_config(config)
    return run(model, config, calib, budget=budget, progress=progress)


def quantize_layer(weight: torch.Tensor, calib: torch.Tensor | None, config: QuantConfig,
                   name: str = "layer") -> tuple[torch.Tensor, QuantizedWeight]:
    """Quantize one (out, in) weight matrix; returns (dequantized weight, QuantizedWeight).

    calib is input rows X (n, in), whose H = X^T X is formed here, or H itself (a square
    (in, in) tensor); it may be None for RTN."""
    _check_quant_config(config)
    result = transform_layer(weight, calib, config, name)
    return result.weight, result.quant


def _check_quant_config(config) -> None:
    if not isinstance(config, QuantConfig):
        hint = (" (to prune and quantize in one pass, give the pruning method a grid: "
                "prunekit.prune(model, SparseGPT(sparsity=0.5, quant='int4:g128'), calib))"
                if getattr(config, "family", None) == "prune" else "")
        raise PruneError(f"config must be a quantization method config such as "
                         f"prunekit.GPTQ(bits=4), got {type(config).__name__}{hint}")
