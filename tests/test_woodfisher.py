"""WoodFisher: Woodbury inverse against the explicit inverse, the joint OBS update against a
brute-force constrained solve, and quality against global magnitude on a trained model."""

import pytest
import torch
import torch.nn.functional as F

from prunekit import Magnitude, PruneError, prune
from prunekit.oneshot import METHODS
from prunekit.oneshot.methods.woodfisher import (
    WoodFisher,
    fisher_inverse,
    fisher_inverse_diag,
    obs_update,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _explicit(g, lam):
    m, b = g.shape[1], g.shape[2]
    return torch.linalg.inv(lam * torch.eye(b, dtype=g.dtype) + g.transpose(1, 2) @ g / m)


@pytest.mark.parametrize("m,b", [(3, 8), (16, 8), (5, 5)])
def test_woodbury_matches_explicit_inverse(m, b):
    g = torch.randn(4, m, b, dtype=torch.float64)
    ref = _explicit(g, 0.1)
    torch.testing.assert_close(fisher_inverse(g, 0.1), ref)
    torch.testing.assert_close(fisher_inverse_diag(g, 0.1), torch.diagonal(ref, dim1=1, dim2=2))


def test_obs_update_is_the_constrained_minimum():
    torch.manual_seed(0)
    b = 7
    g = torch.randn(3, 10, b, dtype=torch.float64)
    finv = fisher_inverse(g, 0.05)
    f = torch.linalg.inv(finv)
    w = torch.randn(3, b, dtype=torch.float64)
    pruned = torch.zeros(3, b, dtype=torch.bool)
    pruned[0, [1, 4]] = True
    pruned[1, [0, 2, 3, 6]] = True  # block 2 prunes nothing
    new = obs_update(w, finv, pruned)
    for i in range(3):
        q = pruned[i]
        assert torch.all(new[i][q] == 0)
        if not q.any():
            torch.testing.assert_close(new[i], w[i])
            continue
        # brute force: minimise d^T F d with d_Q = -w_Q, over the free entries
        free = ~q
        d = torch.zeros(b, dtype=torch.float64)
        d[q] = -w[i][q]
        d[free] = -torch.linalg.solve(f[i][free][:, free], f[i][free][:, q] @ d[q])
        torch.testing.assert_close(new[i], w[i] + d)


def _digits():
    from prunekit.data import load_digits
    from prunekit.models import create
    model = create("digits-cnn", pretrained=True)
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    return model, x, y, xt, yt


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def test_registered_and_bad_input():
    assert METHODS["woodfisher"] is WoodFisher
    model, x, y, *_ = _digits()
    batches = list(zip(x[:64].split(8), y[:64].split(8)))
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(PruneError, match="num_grads=64 needs that many batches"):
        WoodFisher(sparsity=0.5).prune_global(model, _loss, batches, progress=False)
    with pytest.raises(PruneError, match="block_size"):
        WoodFisher(sparsity=0.5, block_size=0).prune_global(model, _loss, batches)
    with pytest.raises(PruneError, match="scalar"):
        WoodFisher(sparsity=0.5, num_grads=4).prune_global(
            model, lambda m, b: m(b[0]), batches, progress=False)
    with pytest.raises(PruneError, match="loss_fn"):
        prune(model, WoodFisher(sparsity=0.5), batches, progress=False)
    with pytest.raises(PruneError, match="does not support pattern 2:4"):
        WoodFisher(sparsity=0.5, pattern="2:4").prune_global(model, _loss, batches)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_interrupted_second_step_gives_the_model_back_whole():
    """Ctrl-C during step 2's gradients, after step 1 has pruned and updated weights: every
    weight comes back as it was, and the model's train mode too."""
    model, x, y, *_ = _digits()
    model.train()
    batches = list(zip(x[:32].split(8), y[:32].split(8)))
    before = [p.clone() for p in model.parameters()]
    calls = []

    def loss_fn(m, b):
        calls.append(1)
        if len(calls) > 4:  # step 1 took 4 gradients
            raise KeyboardInterrupt
        return _loss(m, b)

    with pytest.raises(KeyboardInterrupt):
        WoodFisher(sparsity=0.5, num_grads=4, steps=2).prune_global(model, loss_fn, batches,
                                                                    progress=False)
    assert len(calls) == 5 and model.training
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


@pytest.mark.parametrize("sparsity", [0.7, 0.9])
def test_woodfisher_beats_global_magnitude_on_digits(sparsity):
    model, x, y, xt, yt = _digits()
    mag, _, _, _, _ = _digits()
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(x), generator=g)[:512]
    batches = list(zip(x[idx].split(8), y[idx].split(8)))
    cfg = WoodFisher(sparsity=sparsity, num_grads=64, block_size=64, steps=2)
    report = cfg.prune_global(model, _loss, batches, progress=False)
    assert report.sparsity == pytest.approx(sparsity, abs=1e-3)
    prune(mag, Magnitude(sparsity=sparsity, scope="global"), progress=False)
    with torch.no_grad():
        wf_loss = float(F.cross_entropy(model(xt), yt))
        mag_loss = float(F.cross_entropy(mag(xt), yt))
        wf_acc = float((model(xt).argmax(1) == yt).float().mean())
        mag_acc = float((mag(xt).argmax(1) == yt).float().mean())
    assert wf_loss < mag_loss
    assert wf_acc >= mag_acc
