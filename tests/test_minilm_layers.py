"""Method quality on real layers: MiniLM weights, inputs from WikiText-2 validation text."""

import pytest
import torch

import prunekit
from prunekit import models
from prunekit.layers import find_layers, weight_matrix
from prunekit.oneshot.calibrate import collect_stats

SQUARE = ("bert.encoder.layer.1.attention.self.query",
          "bert.encoder.layer.4.attention.output.dense")
WIDE = ("bert.encoder.layer.2.intermediate.dense", "bert.encoder.layer.2.output.dense")


@pytest.fixture(scope="module")
def layer_stats():
    m = models.create("minilm", pretrained=True)
    calib = models.calibration_batches("minilm", n=32, seed=0, batch_size=16, seq_len=128)
    layers = find_layers(m, include=SQUARE + WIDE)
    stats = collect_stats(m, layers, calib)
    return {n: (weight_matrix(layers[n]).detach().clone(), stats[n].hessian[0]) for n in layers}


def _rel_error(w, new, h):
    d = (w - new).double()
    return float(torch.einsum("ij,jk,ik->", d, h, d) /
                 torch.einsum("ij,jk,ik->", w.double(), h, w.double()))


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_reconstruction_methods_beat_magnitude_on_minilm(layer_stats, pattern):
    sparsity = 0.5 if pattern == "unstructured" else None
    for name, (w, h) in layer_stats.items():
        configs = [prunekit.Magnitude(sparsity=sparsity, pattern=pattern),
                   prunekit.Wanda(sparsity=sparsity, pattern="unstructured:row"
                                  if pattern == "unstructured" else pattern),
                   prunekit.SparseGPT(sparsity=sparsity, pattern=pattern)]
        err = {}
        for cfg in configs:
            new, keep = prunekit.prune_layer(w, h, cfg, name=name)
            prunekit.get_pattern(cfg.pattern).check(keep, cfg.sparsity)
            err[cfg.method] = _rel_error(w, new, h)
        assert err["sparsegpt"] < err["wanda"] < err["magnitude"], (name, err)
        if name in SQUARE:
            # exact OBS costs O(rows * d^3): compared with SparseGPT on the first 96 rows
            sub = {}
            for cfg in (prunekit.SparseGPT(sparsity=sparsity, pattern=pattern),
                        prunekit.OBS(sparsity=sparsity, pattern=pattern)):
                new, keep = prunekit.prune_layer(w[:96], h, cfg, name=name)
                prunekit.get_pattern(cfg.pattern).check(keep, cfg.sparsity)
                sub[cfg.method] = _rel_error(w[:96], new, h)
            assert sub["obs"] < sub["sparsegpt"], (name, sub)
