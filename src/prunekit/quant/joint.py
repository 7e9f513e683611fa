"""Pruning and quantization in one pass (Optimal Brain Compression, Frantar et al. 2022;
SparseGPT, Frantar and Alistarh 2023, sec. 3.5, "joint sparsification and quantization").

A reconstruction pruner given `quant=<grid>` ends every kept weight on the grid and every
pruned weight at exactly 0, the error of both spread onto the weights not yet treated by the
same inverse-Hessian updates: SparseGPT quantizes each column's kept weights as its sweep
reaches them (GPTQ with a mask); exact OBS prunes first, then quantizes the kept weights
greedily from the pruned state (OBQ). The mask obeys the pattern exactly as without `quant`;
the result carries the QuantizedWeight with its keep-mask, which the layer keeps
(`module.quantized_weight`), so saving and loading (prunekit.quant.save_quantized) keep the
mask too.

`JointQuantization` is the glue both methods share: it reads the grid and adds it to the
layer checks, the result, `apply` and the report. A method using it has a field
`quant: str | Grid | None` and defines `prune_quantize(w, hessian, pattern, sparsity, layer,
grid) -> QuantizedWeight` (with keep). Without `quant`, every call goes straight to the pruning
method, so its results are bit-identical to what they were.
"""

from __future__ import annotations

from prunekit.oneshot.engine import LayerResult
from prunekit.quant import model as qmodel
from prunekit.quant.grid import Grid, get_grid


class JointQuantization:
    """Mixin for a reconstruction PruneConfig with a field `quant` (a grid or its text)."""

    quant: str | Grid | None
    #: kept as the grid's canonical text (reports, TOML, the CLI); a bad grid names `quant`
    field_parsers = {"quant": lambda value: get_grid(value).spec}

    @property
    def grid(self) -> Grid | None:
        return None if self.quant is None else get_grid(self.quant)

    def check_layer(self, name, module) -> None:
        super().check_layer(name, module)
        qmodel.refuse_quantized(name, module, type(self).__name__)
        if self.quant is not None:
            qmodel.check_layer(self.grid, name, module)

    def transform(self, w, hessian, layer, plan=None) -> LayerResult:
        if self.quant is None:
            return super().transform(w, hessian, layer, plan)
        q = self.prune_quantize(w, hessian, self.pattern_obj, self.target_sparsity, layer,
                                self.grid)
        return LayerResult(q.dequantize(), q.keep, quant=q, detail={"bits": self.grid.bits})

    def apply(self, name, module, result, model):
        undo = super().apply(name, module, result, model)
        if result.quant is None:
            return undo
        take_back = qmodel.attach(module, result.quant)
        if undo is None:
            return take_back
        return lambda: (take_back(), undo())

    def target(self) -> dict:
        out = super().target()
        if self.quant is not None:
            out["quant"] = self.quant
        return out
