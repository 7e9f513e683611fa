"""Tests generated from the METHODS registry: every pruning method x every pattern it
supports. A method file with one decorator appears here with no other edit.

On one layer with correlated inputs (a few large-scale features, as in transformers): the
mask obeys the pattern and hits the count exactly, the new weights are finite and zero
exactly where the mask drops, and a method that promises it ("beats_magnitude") has a
calibration error no worse than magnitude's. Methods that need gradients run the same
checks through prunekit.prune on a small MLP.
"""

import pytest
import torch
from torch import nn

import prunekit
from prunekit.oneshot import METHODS
from prunekit.patterns import NM, Block1xN, Unstructured, get_pattern

PATTERN_SPECS = {Unstructured: ("unstructured", "unstructured:row"), NM: ("2:4",),
                 Block1xN: ("1x4",)}


def _cases():
    for name in METHODS.where(family="prune"):
        cls = METHODS.get(name)
        for pcls in cls.patterns:
            for spec in PATTERN_SPECS[pcls]:
                yield pytest.param(name, spec, id=f"{name}-{spec}")


def _layer(rows=16, cols=32, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    scale = torch.logspace(0, -1, cols)
    scale[:3] *= 10.0  # outlier features
    mix = torch.randn(cols, cols, generator=g) * 0.3 + torch.eye(cols)
    x = (torch.randn(n, cols, generator=g) @ mix) * scale
    return w, x


def _error(w, new, x):
    return float(((x @ (w - new).T) ** 2).sum() / ((x @ w.T) ** 2).sum())


def _config(name, spec, **kw):
    cls = METHODS.get(name)
    pattern = get_pattern(spec)
    sparsity = None if pattern.implied_sparsity is not None else 0.5
    return cls(sparsity=sparsity, pattern=spec, **kw)


@pytest.mark.parametrize("name, spec", list(_cases()))
def test_method_obeys_pattern_count_and_promise(name, spec):
    cfg = _config(name, spec)
    pattern = cfg.pattern_obj
    if cfg.needs == "gradients":
        _check_gradient_method(cfg)
        return
    w, x = _layer()
    new, keep = prunekit.prune_layer(w, x if cfg.needs == "hessian" else None, cfg)
    assert keep.dtype == torch.bool and keep.shape == w.shape
    pattern.check(keep, cfg.target_sparsity)  # raises PatternViolation otherwise
    assert torch.isfinite(new).all()
    assert bool((new[~keep] == 0).all())
    if "beats_magnitude" in cfg.promises:
        mag, _ = prunekit.prune_layer(w, None, prunekit.Magnitude(sparsity=cfg.sparsity,
                                                                  pattern=spec))
        assert _error(w, new, x) <= _error(w, mag, x) * (1 + 1e-6)


def _check_gradient_method(cfg):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    xs = torch.randn(64, 16)
    ys = (xs[:, :4] > 0).long().argmax(1)
    batches = list(zip(xs.split(4), ys.split(4)))

    def loss_fn(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1])

    cfg = cfg.replace(num_grads=8, steps=2) if hasattr(cfg, "num_grads") else cfg
    report = prunekit.prune(model, cfg, batches, loss_fn=loss_fn, progress=False)
    assert abs(report.sparsity - cfg.target_sparsity) < 1e-6
    for layer in (model[0], model[2]):
        assert torch.isfinite(layer.weight).all()


@pytest.mark.parametrize("name", METHODS.where(family="prune"))
def test_method_is_listed_with_its_metadata(name):
    """The registry entry carries what the CLI and experiment files read."""
    entry = METHODS.entry(name)
    assert entry.meta["needs"] in ("none", "hessian", "gradients")
    assert entry.meta["patterns"]
    assert entry.summary
    cls = entry.obj
    assert cls(**({} if cls.needs != "gradients" else {})).name == name
