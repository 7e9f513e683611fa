"""Mask holder: pruned weights stay exactly zero through real optimizers, under every pattern;
masks save and load with the model; bad input is refused clearly."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit.train as T
from prunekit.errors import PruneError
from prunekit.train.masks import MaskHolder, layer_densities, pattern_select

PATTERNS = ["unstructured", "unstructured:row", "2:4", "1x4"]


def small_net():
    return nn.Sequential(nn.Conv2d(4, 8, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16),
                         nn.Tanh(), nn.Linear(16, 8))


def batch(n=16):
    return torch.randn(n, 4, 6, 6), torch.randint(0, 8, (n,))


def train_steps(model, opt, sched, steps):
    for _ in range(steps):
        x, y = batch()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam-wd": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("pattern", PATTERNS)
def test_pruned_weights_stay_exactly_zero(opt_name, pattern):
    model = small_net()
    opt = OPTIMIZERS[opt_name](model.parameters())
    # Warm the optimizer up dense first so momenta / moments are nonzero everywhere.
    train_steps(model, opt, None, 3)
    holder = MaskHolder(model, opt, pattern=pattern)
    density = None if pattern == "2:4" else 0.25
    for name, w in holder.weights.items():
        holder.set_mask(name, holder.select(name, torch.rand(w.shape),
                                            0.5 if density is None else 1 - density))
    holder.check_pattern()
    for name, w in holder.weights.items():
        state = opt.state[w]
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.shape == w.shape:
                assert (v[~holder.masks[name]] == 0).all()
    frozen = {n: m.clone() for n, m in holder.masks.items()}
    for _ in range(6):
        x, y = batch()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for name, w in holder.weights.items():  # gradients of pruned weights are masked
            assert (w.grad[~frozen[name]] == 0).all()
        opt.step()  # no .step() of a schedule: the optimizer hook alone holds the zeros
        for name, w in holder.weights.items():
            assert (w[~frozen[name]] == 0).all(), f"{name} drifted under {opt_name}"
            assert (w[frozen[name]] != 0).float().mean() > 0.9  # kept weights still train


def test_pattern_select_nm_ramp():
    s = torch.rand(4, 8)
    assert pattern_select(T.masks.get_pattern("2:4"), s, 0.0).all()
    three = pattern_select(T.masks.get_pattern("2:4"), s, 0.25)
    assert (three.reshape(4, 2, 4).sum(2) == 3).all()
    two = pattern_select(T.masks.get_pattern("2:4"), s, 0.9)
    assert (two.reshape(4, 2, 4).sum(2) == 2).all()


def test_erk_densities_keep_the_total_and_favour_small_layers():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 64, 3), nn.Linear(64, 10))
    layers = {n: m for n, m in model.named_children()}
    dens = layer_densities(layers, 0.1, "erk")
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    kept = sum(dens[n] * sizes[n] for n in layers)
    assert kept == pytest.approx(0.1 * sum(sizes.values()), rel=1e-9)
    assert all(0 < d <= 1 for d in dens.values())
    # ERK: density proportional to sum(shape)/prod(shape) for layers below 1.
    free = [n for n in layers if dens[n] < 1]
    ratios = {n: dens[n] * sizes[n] / sum(layers[n].weight.shape) for n in free}
    vals = list(ratios.values())
    assert max(vals) == pytest.approx(min(vals), rel=1e-9)
    assert dens["0"] > dens["1"]


def test_state_dict_round_trip_through_safetensors(tmp_path):
    torch.manual_seed(1)
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = T.RigL(model, opt, density=0.3, delta_t=2, t_end=20)
    train_steps(model, opt, sched, 5)
    path = T.save_sparse(tmp_path / "ck.safetensors", model, sched)
    torch.manual_seed(2)
    model2 = small_net()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    sched2 = T.RigL(model2, opt2, density=0.3, delta_t=2, t_end=20, seed=7)
    assert any((sched2.masks[n] != sched.masks[n]).any() for n in sched.masks)
    T.load_sparse(path, model2, sched2)
    assert sched2.step_count == 5
    for n in sched.masks:
        assert torch.equal(sched2.masks[n], sched.masks[n])
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    assert sched2.next_event() == sched.next_event()


def test_load_refuses_other_layers(tmp_path):
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = T.Static(model, opt, density=0.5)
    other = T.Static(model, opt, density=0.5, exclude=["5"])
    with pytest.raises(PruneError, match="missing|unexpected"):
        other.load_state_dict(sched.state_dict())
    with pytest.raises(PruneError, match="RigL"):
        T.GMP(model, opt, density=0.5, end=10, frequency=1).load_state_dict(
            T.RigL(model, opt, density=0.5, t_end=10).state_dict())


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, "0.5"])
def test_density_outside_range_is_refused(density):
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for make in (lambda: T.RigL(model, opt, density=density, t_end=10),
                 lambda: T.GMP(model, opt, density=density, end=10, frequency=1),
                 lambda: T.Static(model, opt, density=density),
                 lambda: T.L0(model, opt, density=density, t_end=10)):
        with pytest.raises(PruneError, match=r"density must be (in \(0, 1\]|a number)"):
            make()


def test_schedule_end_before_start_is_refused():
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(PruneError, match="end step 100 is not after start step 200"):
        T.GMP(model, opt, density=0.1, start=200, end=100)
    with pytest.raises(PruneError, match="not after start"):
        T.RigL(model, opt, density=0.1, t_end=0)
    with pytest.raises(PruneError, match="not after start"):
        T.SMCP(model, opt, 0.5, t_start=50, t_end=50)
    with pytest.raises(PruneError, match="multiple of frequency"):
        T.GMP(model, opt, density=0.1, start=0, end=150, frequency=100)


def test_optimizer_without_the_model_parameters_is_refused():
    model = small_net()
    other = small_net()
    with pytest.raises(PruneError, match="does not hold the weight of layer 0"):
        T.RigL(model, torch.optim.SGD(other.parameters(), lr=0.1), density=0.1, t_end=10)
    partial = torch.optim.SGD(list(model[0].parameters()), lr=0.1)
    with pytest.raises(PruneError, match="layer 3"):
        T.GMP(model, partial, density=0.5, end=10, frequency=1)
    with pytest.raises(PruneError, match="needs the optimizer"):
        T.Static(model, None, density=0.5)


def test_pattern_that_does_not_fit_a_layer_names_it():
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(PruneError, match="^0: pattern 2:4"):
        T.RigL(model, opt, density=None, t_end=10, pattern="2:4")
    with pytest.raises(PruneError, match="fixes density"):
        T.RigL(model, opt, density=0.3, t_end=10, pattern="2:4", exclude=["0"])
