"""Post-training quantization in the Optimal Brain Compression family, on the one-shot engine.

    grid.py     Grid (bits, groups, symmetric or not, min-max or MSE scales), QuantizedWeight
                (one layer's codes, scales, zero points: what kernels and formats read),
                ColumnQuantizer (a grid applied column by column)
    base.py     QuantConfig: the options every quantizer shares
    methods/    RTN, GPTQ, OBQ, one file each (registered in prunekit.METHODS)
    joint.py    pruning and quantization in one pass (SparseGPT(quant=...), OBS(quant=...))
    model.py    the quantized form on a model (module.quantized_weight) and on disk
    mixed.py    per-layer bit widths under a model-size budget
    api.py      quantize(model, config, calib), quantize_layer(weight, calib, config)

The method classes load on first use (prunekit.GPTQ, prunekit.quant.GPTQ): the pruning methods
import this package for their joint path, and GPTQ and OBQ build on those pruning methods.
"""

from prunekit.quant.api import quantize, quantize_layer
from prunekit.quant.base import FLOAT_BITS, QuantConfig
from prunekit.quant.grid import ColumnQuantizer, Grid, GridViolation, QuantizedWeight, get_grid
from prunekit.quant.model import (
    load_quantized,
    quantized_form,
    quantized_layers,
    save_quantized,
)

_METHODS = {"RTN": "rtn", "GPTQ": "gptq", "OBQ": "obq"}


def __getattr__(name: str):
    if name in _METHODS:
        import importlib

        return getattr(importlib.import_module(f"prunekit.quant.methods.{_METHODS[name]}"),
                       name)
    raise AttributeError(f"module 'prunekit.quant' has no attribute {name!r}")


__all__ = ["quantize", "quantize_layer", "FLOAT_BITS", "QuantConfig", "ColumnQuantizer", "Grid",
           "GridViolation", "QuantizedWeight", "get_grid", "load_quantized", "quantized_form",
           "quantized_layers", "save_quantized", "RTN", "GPTQ", "OBQ"]
