"""Pruning and quantizing in one pass: SparseGPT(quant=...) and OBS(quant=...)."""

import pytest
import torch

import prunekit
from prunekit import OBS, RTN, PruneError, SparseGPT
from prunekit.oneshot import transform_layer
from prunekit.quant import get_grid, load_quantized, quantized_layers, save_quantized


def _data(rows=32, d=64, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, d, generator=g)
    x = torch.randn(n, d, generator=g) @ (torch.eye(d) + 0.5 * torch.randn(d, d, generator=g))
    return w, (x.T @ x).double()


def _err(w, new, h):
    dw = (w - new).double()
    return float(torch.einsum("ij,jk,ik->", dw, h, dw)
                 / torch.einsum("ij,jk,ik->", w.double(), h, w.double()))


def _check_joint(q, weight, pattern, sparsity):
    """Mask obeys its pattern, kept weights on the grid, pruned exactly 0, form = weight."""
    q.check()
    assert q.keep is not None
    prunekit.get_pattern(pattern).check(q.keep, sparsity)
    assert torch.equal(weight, q.dequantize())
    q.grid.check_tensor(weight, q.scales, q.zeros)
    assert (weight[~q.keep] == 0).all()


CASES = [(SparseGPT, "unstructured", 0.5, "int4"), (SparseGPT, "2:4", None, "int4:g16"),
         (SparseGPT, "1x4", 0.5, "int3:g32:asym"), (SparseGPT, "unstructured:row", 0.6, "int8"),
         (SparseGPT, "2:4", None, "int3"),
         (OBS, "unstructured", 0.5, "int4"), (OBS, "2:4", None, "int4:g16:asym")]


@pytest.mark.parametrize("cls,pattern,sparsity,grid", CASES)
def test_joint_mask_grid_zeros_and_beats_prune_then_round(cls, pattern, sparsity, grid):
    w, h = _data()
    cfg = cls(sparsity=sparsity, pattern=pattern, quant=grid)
    r = transform_layer(w, h, cfg)
    _check_joint(r.quant, r.weight, pattern, cfg.target_sparsity)
    assert torch.equal(r.keep, r.quant.keep) and r.quant.grid == get_grid(grid)
    # against pruning first, then rounding the kept weights to the grid: one pass is better
    # (up to how the masks differ, which pruning and quantizing together may choose apart),
    # and with a fine grid as good as pruning alone
    pruned, keep = prunekit.prune_layer(w, h, cls(sparsity=sparsity, pattern=pattern))
    rounded = get_grid(grid).quantize(pruned).dequantize() * keep
    slack = 1.02 if pattern == "2:4" else 1.001 if get_grid(grid).bits == 8 else 1.0
    assert _err(w, r.weight, h) < slack * _err(w, rounded, h)
    if get_grid(grid).bits == 8:
        assert _err(w, r.weight, h) < 1.002 * _err(w, pruned, h)


def test_joint_obs_matches_prune_mask_and_is_exact_obq_afterwards():
    """OBS(quant=...) keeps exactly OBS's mask; with an 8-bit grid the result stays within
    rounding of the pruned weights."""
    w, h = _data(rows=16, d=32)
    pruned, keep = prunekit.prune_layer(w, h, OBS(sparsity=0.5))
    r = transform_layer(w, h, OBS(sparsity=0.5, quant="int8"))
    assert torch.equal(r.keep, keep)
    step = r.quant.grid.expand(r.quant.scales, 32)
    assert ((r.weight - pruned).abs() <= 2 * step).all()
    assert _err(w, r.weight, h) < 1.05 * _err(w, pruned, h)


def test_no_quant_changes_nothing():
    w, h = _data()
    for cfg in (SparseGPT(sparsity=0.5),
                OBS(pattern="2:4")):
        r = transform_layer(w, h, cfg)
        assert r.quant is None and "quant" not in cfg.target()


def test_joint_on_a_model_survives_save_and_load(tmp_path):
    from prunekit.layers import weight_matrix
    from prunekit.models import calibration_batches, create

    model = create("tiny-llama")
    calib = calibration_batches("tiny-llama", n=8, batch_size=4)
    cfg = SparseGPT(pattern="2:4", quant=prunekit.Grid(4, 32), exclude=("lm_head",),
                    sequential=True)
    report = prunekit.prune(model, cfg, calib, progress=False)
    assert report.target["quant"] == "int4:g32"
    save_quantized(model, tmp_path / "joint")
    fresh = create("tiny-llama")
    forms = load_quantized(fresh, tmp_path / "joint")
    assert set(forms) == set(quantized_layers(model)) == {lr.name for lr in report.layers}
    modules = dict(fresh.named_modules())
    for name, q in forms.items():
        _check_joint(q, weight_matrix(modules[name]).detach(), "2:4", None)
    ids = calib[0]["input_ids"]
    assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_joint_bad_input():
    w, h = _data(d=48)
    with pytest.raises(PruneError, match="unknown grid"):
        SparseGPT(sparsity=0.5, quant="four bits")
    with pytest.raises(PruneError, match="fc: groups of 32 inputs"):
        transform_layer(w, h, SparseGPT(sparsity=0.5, quant="int4:g32"), name="fc")
    with pytest.raises(PruneError, match="bits must be in 2..8"):
        OBS(sparsity=0.5, quant="int9")
    with pytest.raises(PruneError, match="prune and quantize in one pass"):
        prunekit.quantize(torch.nn.Linear(4, 4), SparseGPT(sparsity=0.5, quant="int4"))
    assert RTN(bits=4).family == "quantize" and SparseGPT(quant="int4").quant == "int4"
