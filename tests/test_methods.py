import itertools

import pytest
import torch

import prunekit
from prunekit import OBS, Magnitude, PruneError, Random, SparseGPT, Wanda, prune_layer
from reference import sparsegpt_reference


def _data(rows=6, d=16, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ (torch.eye(d) + 0.3 * torch.randn(d, d, generator=g))
    w = torch.randn(rows, d, generator=g)
    return w, x.double()


def _err(w, new, x):
    return float(((w.double() - new.double()) @ x.T).pow(2).sum())


def _least_squares(w, x, keep):
    """Kept weights minimising ||x w - x w'|| with w' zero off `keep` (per row)."""
    out = torch.zeros_like(w, dtype=torch.float64)
    for r in range(w.shape[0]):
        k = keep[r]
        xk = x[:, k]
        target = x @ w[r].double()
        out[r, k] = torch.linalg.lstsq(xk, target.unsqueeze(1)).solution.squeeze(1)
    return out


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured:row", 0.6),
                                              ("2:4", None), ("1:4", None)])
def test_obs_kept_weights_are_least_squares_optimum(pattern, sparsity):
    w, x = _data()
    new, keep = prune_layer(w, x, OBS(sparsity=sparsity, pattern=pattern, dampening=0.0))
    assert ((new != 0) <= keep).all()
    best = _least_squares(w, x, keep)
    torch.testing.assert_close(new.double(), best, rtol=1e-4, atol=1e-4)


def test_obs_single_removal_is_best_by_brute_force():
    for seed in range(5):
        w, x = _data(rows=1, d=8, seed=seed)
        new, keep = prune_layer(w, x, OBS(sparsity=1 / 8, dampening=0.0))
        assert int((~keep).sum()) == 1
        errors = []
        for p in range(8):
            k = torch.ones(1, 8, dtype=torch.bool)
            k[0, p] = False
            errors.append(_err(w, _least_squares(w, x, k), x))
        assert _err(w, new, x) == pytest.approx(min(errors), rel=1e-6)
        assert int((~keep[0]).nonzero()) == min(range(8), key=errors.__getitem__)


def test_obs_greedy_matches_brute_force_order_on_tiny_row():
    """Two removals: greedy OBS is never worse than the best first step followed by best second."""
    w, x = _data(rows=1, d=6, seed=3)
    new, keep = prune_layer(w, x, OBS(sparsity=2 / 6, dampening=0.0))
    best = min(
        _err(w, _least_squares(w, x, torch.tensor([[i not in pair for i in range(6)]])), x)
        for pair in itertools.combinations(range(6), 2))
    assert _err(w, new, x) >= best - 1e-9  # brute force is a lower bound
    assert _err(w, new, x) <= 1.5 * best + 1e-9  # and greedy OBS stays close to it here


@pytest.mark.parametrize("pattern,sparsity,kw", [
    ("unstructured", 0.5, {}), ("unstructured", 0.7, {}), ("2:4", None, {"prunen": 2, "prunem": 4}),
    ("4:8", None, {"prunen": 4, "prunem": 8})])
def test_sparsegpt_matches_reference(pattern, sparsity, kw):
    w, x = _data(rows=24, d=64, n=400)
    h = x.T @ x
    ref, ref_keep = sparsegpt_reference(w, h, sparsity or 0.0, blocksize=32, **kw)
    new, keep = prune_layer(w, h, SparseGPT(sparsity=sparsity, pattern=pattern, blocksize=32))
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(new, ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("pattern", ["unstructured", "unstructured:row", "2:4", "1x4"])
def test_sparsegpt_obeys_pattern_and_beats_magnitude(pattern):
    w, x = _data(rows=32, d=64, n=400)
    new, keep = prune_layer(w, x, SparseGPT(sparsity=0.5, pattern=pattern, blocksize=16))
    prunekit.get_pattern(pattern).check(keep, 0.5)
    assert (new[~keep] == 0).all()
    mag, _ = prune_layer(w, None, Magnitude(sparsity=0.5, pattern=pattern))
    assert _err(w, new, x) < _err(w, mag, x)


def test_wanda_scores_weight_times_feature_norm_per_row():
    w, x = _data(rows=5, d=12)
    new, keep = prune_layer(w, x, Wanda(sparsity=0.5))
    score = w.abs() * x.float().norm(dim=0)
    for r in range(5):
        dropped = torch.topk(score[r], 6, largest=False).indices
        assert set(dropped.tolist()) == set((~keep[r]).nonzero().flatten().tolist())
    torch.testing.assert_close(new, w * keep)


def test_random_is_reproducible_and_exact():
    w = torch.randn(8, 8)
    a, ka = prune_layer(w, None, Random(sparsity=0.25, seed=1))
    b, kb = prune_layer(w, None, Random(sparsity=0.25, seed=1))
    c, kc = prune_layer(w, None, Random(sparsity=0.25, seed=2))
    assert torch.equal(ka, kb) and not torch.equal(ka, kc)
    assert int((~ka).sum()) == 16


def test_dead_inputs_are_zeroed_not_nan():
    w, x = _data(rows=8, d=16)
    x[:, 3] = 0
    x[:, 10] = 0
    for cfg in (SparseGPT(sparsity=0.5), OBS(sparsity=0.5), SparseGPT(pattern="2:4")):
        new, keep = prune_layer(w, x, cfg)
        assert torch.isfinite(new).all()
        assert (new[:, [3, 10]] == 0).all()


def test_singular_hessian_without_dampening_names_the_layer():
    w = torch.randn(4, 8)
    x = torch.randn(3, 8).double()  # rank 3 < 8
    for cfg in (SparseGPT(sparsity=0.5, dampening=0.0), OBS(sparsity=0.5, dampening=0.0)):
        with pytest.raises(PruneError, match="enc.q.*not positive definite"):
            prune_layer(w, x, cfg, name="enc.q")


def test_prune_layer_bad_input():
    w = torch.randn(4, 8)
    with pytest.raises(PruneError, match="needs calibration"):
        prune_layer(w, None, SparseGPT(sparsity=0.5))
    with pytest.raises(PruneError, match="shape"):
        prune_layer(w, torch.randn(10, 7), Wanda(sparsity=0.5))
    with pytest.raises(PruneError, match="shape"):
        prune_layer(w, torch.randn(0, 8), Wanda(sparsity=0.5))
    bad = torch.randn(10, 8)
    bad[0, 0] = float("nan")
    with pytest.raises(PruneError, match="NaN"):
        prune_layer(w, bad, Wanda(sparsity=0.5))
    w2 = w.clone()
    w2[1, 1] = float("inf")
    with pytest.raises(PruneError, match="NaN or Inf"):
        prune_layer(w2, None, Magnitude(sparsity=0.5))
    with pytest.raises(PruneError, match="sparsity"):
        prune_layer(w, None, Magnitude(sparsity=1.0))
    with pytest.raises(PruneError, match="does not support"):
        prune_layer(w, torch.randn(10, 8), OBS(sparsity=0.5, pattern="1x4"))
    with pytest.raises(PruneError, match="multiple of 3"):
        prune_layer(w, None, Magnitude(pattern="1:3"))


def test_obs_can_empty_whole_rows_without_nan():
    w, x = _data(rows=4, d=8)
    new, keep = prune_layer(w, x, OBS(sparsity=0.9))
    assert torch.isfinite(new).all()
    assert int((~keep).sum()) == round(0.9 * 32)
    assert (new[~keep] == 0).all()
