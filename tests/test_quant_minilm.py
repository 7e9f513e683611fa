"""Quantizers on real layers: MiniLM weights, inputs from WikiText-2 validation text."""

import pytest
import torch

import prunekit
from prunekit import GPTQ, RTN, SparseGPT, quantize_layer
from prunekit.oneshot import transform_layer
from prunekit.quant import get_grid

pytestmark = pytest.mark.data

LAYERS = ("bert.encoder.layer.1.attention.self.query",
          "bert.encoder.layer.3.attention.output.dense",
          "bert.encoder.layer.2.intermediate.dense", "bert.encoder.layer.2.output.dense")


@pytest.fixture(scope="module")
def layers():
    from prunekit import models
    from prunekit.layers import find_layers, weight_matrix
    from prunekit.oneshot.calibrate import collect_stats

    m = models.create("minilm", pretrained=True)
    calib = models.calibration_batches("minilm", n=64, seed=0, batch_size=16,
                                       source="wikitext2")
    found = find_layers(m, include=LAYERS)
    stats = collect_stats(m, found, calib)
    return {n: (weight_matrix(found[n]).detach().clone(), stats[n].hessian[0]) for n in LAYERS}


def _err(w, new, h):
    d = (w - new).double()
    return float(torch.einsum("ij,jk,ik->", d, h, d)
                 / torch.einsum("ij,jk,ik->", w.double(), h, w.double()))


@pytest.mark.parametrize("bits,group", [(4, None), (3, 128)])
def test_gptq_beats_rtn_on_minilm_layers(layers, bits, group):
    for name, (w, h) in layers.items():
        rtn, _ = quantize_layer(w, h, RTN(bits=bits, group_size=group), name=name)
        new, q = quantize_layer(w, h, GPTQ(bits=bits, group_size=group), name=name)
        act, _ = quantize_layer(w, h, GPTQ(bits=bits, group_size=group, act_order=True),
                                name=name)
        q.grid.check_tensor(new, q.scales, q.zeros, name)
        e_rtn, e_gptq, e_act = _err(w, rtn, h), _err(w, new, h), _err(w, act, h)
        assert e_gptq < 0.8 * e_rtn and e_act < 0.8 * e_rtn, (name, e_rtn, e_gptq, e_act)


def test_joint_2_4_int4_on_minilm(layers):
    for name, (w, h) in layers.items():
        r = transform_layer(w, h, SparseGPT(pattern="2:4", quant="int4:g128"), name=name)
        r.quant.check(name)
        prunekit.get_pattern("2:4").check(r.keep)
        assert (r.weight[~r.keep] == 0).all() and torch.equal(r.weight, r.quant.dequantize())
        # one pass beats pruning, then rounding the kept weights to the same grid
        pruned, keep = prunekit.prune_layer(w, h, SparseGPT(pattern="2:4"), name=name)
        rounded = get_grid("int4:g128").quantize(pruned).dequantize() * keep
        assert _err(w, r.weight, h) < 0.95 * _err(w, rounded, h), name
