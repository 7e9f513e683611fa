"""Low-rank factorization on the engine: exactness, optimality against brute force, the
factorized model against the composition of its factors, budgets, and bad input."""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit.budget.dp import Unreachable
from prunekit.errors import PruneError
from prunekit.layers import set_weight_matrix, weight_matrix
from prunekit.lowrank import (
    ALDS,
    SVD,
    Factorized,
    factor,
    factor_groups,
    lowrank,
    lowrank_for_speedup,
    lowrank_layer,
    minimax_allocation,
)
from prunekit.lowrank.latency import latency_costs
from prunekit.structured import count_flops

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_rows(n, d, seed=0):
    """Input rows whose features are correlated and of unequal scale, as real activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)[None, :]
    return torch.randn(n, d, generator=g) @ mix.T + 0.1 * torch.randn(n, d, generator=g)


def data_error(w, new, x):
    return float(((w.double() - new.double()) @ x.double().T).square().sum())


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(8, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=2, dilation=2, bias=False)
        self.c3 = nn.Conv1d(32, 24, 3, padding=1)
        self.fc = nn.Linear(24 * 4, 40)
        self.out = nn.Linear(40, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))  # (N, 32, 4, 4)
        x = torch.relu(self.c3(x.flatten(2)[..., :4]))  # (N, 24, 4)
        return self.out(torch.relu(self.fc(x.flatten(1))))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return ConvNet().eval(), torch.randn(16, 8, 8, 8)


# -- the factorization ------------------------------------------------------------------

@pytest.mark.parametrize("data_aware", [False, True])
def test_full_rank_reproduces_the_layer(data_aware):
    w = torch.randn(12, 20)
    x = correlated_rows(64, 20)
    u, v = factor(w, 12, x.double().T @ x.double() if data_aware else None)
    assert u.shape == (12, 12) and v.shape == (12, 20)
    torch.testing.assert_close(u @ v, w, atol=1e-5, rtol=1e-5)


def test_data_aware_error_is_at_most_plain_at_every_rank():
    w = torch.randn(24, 32)
    x = correlated_rows(200, 32)
    plain_errs, aware_errs = [], []
    for r in range(1, 25):
        plain = factor(w, r)
        aware = lowrank_layer(w, x, SVD(rank=r, data_aware=True))
        # transform_layer's result is the layer's: compare with the factors directly too
        if aware.factors is not None:
            torch.testing.assert_close(aware.factors[0] @ aware.factors[1], aware.weight)
        plain_errs.append(data_error(w, plain[0] @ plain[1], x))
        aware_errs.append(data_error(w, aware.weight, x))
        assert aware_errs[-1] <= plain_errs[-1] * (1 + 1e-6) + 1e-9, r
    # and by far on inputs of unequal scale
    assert aware_errs[7] < 0.5 * plain_errs[7]


def _best_by_sampling(w, h, rank, samples, seed):
    """Brute force: min over random row spaces B (in, rank) of the data error of the best
    W' with that row space, ||W L||^2 - tr(W H B (B^T H B)^-1 B^T H W^T)."""
    g = np.random.default_rng(seed)
    w, h = w.double().numpy(), h.double().numpy()
    b = g.standard_normal((samples, w.shape[1], rank))
    hb = h @ b  # (s, in, r)
    gram = np.swapaxes(b, 1, 2) @ hb  # B^T H B
    whb = w @ hb  # (s, out, r)
    kept = np.einsum("sor,sor->s", whb @ np.linalg.inv(gram), whb)
    return float(np.trace(w @ h @ w.T) - kept.max())


@pytest.mark.parametrize("rank", [1, 2])
def test_data_aware_svd_minimises_the_data_error_brute_force(rank):
    torch.manual_seed(rank)
    w = torch.randn(3, 4)
    x = correlated_rows(50, 4, seed=rank)
    h = x.double().T @ x.double()
    u, v = factor(w, rank, h, dampening=0.0)
    ours = data_error(w, u @ v, x)
    brute = _best_by_sampling(w, h, rank, 200_000, seed=rank)
    assert ours <= brute * (1 + 1e-7) + 1e-10  # nothing sampled beats it
    assert brute <= ours * 1.01 + 1e-8  # and the sampling comes close: the check has teeth
    plain = factor(w, rank)
    assert data_error(w, plain[0] @ plain[1], x) > ours * 1.05  # plain SVD is not optimal here


def test_groups_factor_each_block_of_input_columns():
    w = torch.randn(8, 24)
    u, v = factor_groups(w, 3, 4)
    assert u.shape == (8, 12) and v.shape == (12, 24)
    for g in range(4):
        ug, vg = factor(w[:, 6 * g:6 * g + 6], 3)
        torch.testing.assert_close((u @ v)[:, 6 * g:6 * g + 6], ug @ vg)
    assert (v[:3, 6:] == 0).all()  # block diagonal


# -- the factorized model ----------------------------------------------------------------

def masked_equivalent(dense, factorized_model):
    """The dense model with each factorized layer's weight replaced by U @ V."""
    ref = copy.deepcopy(dense)
    for name, m in factorized_model.named_modules():
        if isinstance(m, Factorized):
            set_weight_matrix(ref.get_submodule(name), m.product())
    return ref


@pytest.mark.parametrize("config", [SVD(rank_ratio=0.3), SVD(rank=4, data_aware=True),
                                    ALDS(params_ratio=0.4, groups=(1, 2, 4)),
                                    ALDS(flops_ratio=0.3)])
def test_factorized_model_equals_the_composition_of_its_factors(net, config):
    dense, x = net
    model = copy.deepcopy(dense)
    report = lowrank(model, config, [x], progress=False)
    pairs = {n: m for n, m in model.named_modules() if isinstance(m, Factorized)}
    assert pairs, report
    for name, m in pairs.items():  # plain layers, nothing else
        assert all(type(c) in (nn.Linear, nn.Conv1d, nn.Conv2d) for c in m)
        rank_detail = next(lr.detail for lr in report.layers if lr.name == name)
        assert rank_detail["rank"] == m.rank and rank_detail["groups"] == m.groups
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked_equivalent(dense, model)(x), atol=1e-5,
                                   rtol=1e-4)
    if isinstance(config, ALDS):
        assert any(m.groups > 1 for m in pairs.values())  # the grouped scheme is exercised
    # the reported error is the error of U @ V on the calibration rows
    assert all(lr.rel_error is not None and lr.rel_error >= 0 for lr in report.layers)


def test_factorized_model_is_smaller_and_trains(net):
    dense, x = net
    model = copy.deepcopy(dense)
    lowrank(model, SVD(rank_ratio=0.25), progress=False)
    assert sum(p.numel() for p in model.parameters()) < \
        sum(p.numel() for p in dense.parameters())
    model.train()
    loss = model(x).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gpt2_conv1d_factorizes_into_linears():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(12, 16), nn.ReLU(), Conv1D(4, 12))
    x = torch.randn(5, 7, 16)
    dense = copy.deepcopy(model)
    lowrank(model, SVD(rank=3), progress=False)
    assert isinstance(model[0], Factorized) and isinstance(model[0][0], nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked_equivalent(dense, model)(x), atol=1e-5,
                                   rtol=1e-4)


def test_rank_that_does_not_shrink_is_skipped_with_a_note():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 64))
    before = copy.deepcopy(model.state_dict())
    report = lowrank(model, SVD(rank=6), progress=False)  # 6 * (8 + 8) > 64; 6*72 < 512
    assert not isinstance(model[0], Factorized) and isinstance(model[1], Factorized)
    assert "would not make it smaller" in report.layers[0].detail["note"]
    torch.testing.assert_close(model[0].weight, before["0.weight"])


def test_per_layer_budget(net):
    dense, x = net
    model = copy.deepcopy(dense)
    lowrank(model, SVD(), budget={"c1": 0.25, "fc": 0.1}, progress=False)
    assert isinstance(model.c1, Factorized) and model.c1.rank == 4  # 0.25 * min(16, 72)
    assert isinstance(model.fc, Factorized) and model.fc.rank == 4  # 0.1 * 40
    assert not isinstance(model.c2, Factorized)


# -- budgets -----------------------------------------------------------------------------

def layer_weights(model, names):
    return sum(p.numel() for n in names for k, p in model.get_submodule(n).named_parameters()
               if k.endswith("weight"))


@pytest.mark.parametrize("ratio", [0.2, 0.35, 0.5, 0.8])
def test_alds_never_exceeds_its_budget(net, ratio):
    dense, x = net
    names = ["c1", "c2", "c3", "fc", "out"]
    model = copy.deepcopy(dense)
    lowrank(model, ALDS(params_ratio=ratio), progress=False)
    assert layer_weights(model, names) <= ratio * layer_weights(dense, names)
    model = copy.deepcopy(dense)
    lowrank(model, ALDS(flops_ratio=ratio), [x], progress=False)
    assert count_flops(model, x) <= ratio * count_flops(dense, x) * (1 + 1e-9)
    model = copy.deepcopy(dense)
    lowrank(model, SVD(flops_ratio=ratio), [x], progress=False)  # the uniform rank
    assert count_flops(model, x) <= ratio * count_flops(dense, x) * (1 + 1e-9)


@pytest.mark.parametrize("timing", ["model", "hot"])
def test_alds_latency_budget_uses_only_timed_options_and_keeps_the_budget(net, timing):
    dense, x = net
    costs = latency_costs(dense, x, groups=(1, 2), ranks=4, repeats=1, timing=timing,
                          chunk=3, progress=False)
    assert set(costs) == {"c1", "c2", "c3", "fc", "out"}
    keys = [tuple(map(int, k.split(","))) for k in costs["c2"]]  # (j, r); dense is (0, 0)
    assert sorted(j for j, _ in keys) == [0] + [1] * 4 + [2] * 4  # 4 ranks per group count
    assert all(r < 32 * 144 / (144 + 32 * j) for j, r in keys if j)  # each shrinks the layer
    assert all(t > 0 for c in costs.values() for t in c.values())
    # replace the timings by a known cost, so the budget check is exact
    fake = {n: {k: (1.0 if k == "0,0" else 0.1 * int(k.split(",")[1]) / 4) for k in c}
            for n, c in costs.items()}
    model = copy.deepcopy(dense)
    report = lowrank(model, ALDS(latency_ratio=0.6, costs=fake), progress=False)
    spent = 0.0
    for lr in report.layers:
        key = "0,0" if "note" in lr.detail else f"{lr.detail['groups']},{lr.detail['rank']}"
        assert key in fake[lr.name]
        spent += fake[lr.name][key]
    assert spent <= 0.6 * len(fake) + 1e-9
    with pytest.raises(PruneError, match="needs costs="):
        ALDS(latency_ratio=0.5)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_minimax_allocation_matches_brute_force(data):
    layers = data.draw(st.integers(1, 3))
    options = []
    for _ in range(layers):
        dense = data.draw(st.integers(10, 40))
        opts = [(float(dense), 0.0)]
        for _ in range(data.draw(st.integers(1, 4))):
            opts.append((float(data.draw(st.integers(1, dense - 1))),
                         data.draw(st.floats(0.01, 1.0))))
        options.append(opts)
    ratio = data.draw(st.floats(0.05, 1.0))
    dense_total = sum(o[0][0] for o in options)
    import itertools
    feasible = [c for c in itertools.product(*[range(len(o)) for o in options])
                if sum(options[i][k][0] for i, k in enumerate(c)) <= ratio * dense_total]
    if not feasible:
        with pytest.raises(Unreachable):
            minimax_allocation(options, ratio)
        return
    choice = minimax_allocation(options, ratio)
    assert sum(options[i][k][0] for i, k in enumerate(choice)) <= ratio * dense_total
    best = min(max(options[i][k][1] for i, k in enumerate(c)) for c in feasible)
    assert max(options[i][k][1] for i, k in enumerate(choice)) == best


def test_alds_is_no_worse_than_uniform_rank_in_its_largest_error(net):
    dense, x = net
    # ALDS with one group minimises the largest relative weight error over all rank choices,
    # which include the uniform ones: recompute both from the factors
    def largest(cfg):
        model = copy.deepcopy(dense)
        lowrank(model, cfg, [x], progress=False)
        out = 0.0
        for n, m in model.named_modules():
            if isinstance(m, Factorized):
                w = weight_matrix(dense.get_submodule(n)).detach()
                out = max(out, float((w - m.product()).square().sum() / w.square().sum()))
        return out
    assert largest(ALDS(flops_ratio=0.4, groups=(1,))) <= largest(SVD(flops_ratio=0.4)) + 1e-6


def test_data_aware_alds_is_no_worse_than_data_aware_uniform_rank(net):
    dense, x = net
    worst = {}
    for cfg in (ALDS(flops_ratio=0.4, groups=(1,), data_aware=True, dampening=1e-6),
                SVD(flops_ratio=0.4, data_aware=True, dampening=1e-6)):
        report = lowrank(copy.deepcopy(dense), cfg, [x], progress=False)
        worst[cfg.name] = max(lr.rel_error for lr in report.layers)
    assert worst["alds"] <= worst["svd"] * (1 + 1e-3)
    with pytest.raises(PruneError, match="groups=\\(1,\\)"):
        ALDS(data_aware=True)


def test_for_speedup_reaches_the_target_by_measure(net):
    dense, x = net
    model = copy.deepcopy(dense)
    base = count_flops(dense, x)

    def measure(d, candidate):  # a deterministic stand-in for timing: FLOPs speedup
        return base / count_flops(candidate, x)

    found = lowrank_for_speedup(model, ALDS(), [x], x, 2.0, measure=measure, progress=False)
    assert found.measured >= 2.0 and base / count_flops(model, x) >= 2.0
    assert found.rounds and any(isinstance(m, Factorized) for m in model.modules())


# -- bad input ---------------------------------------------------------------------------

def unchanged(model, state):
    assert not any(isinstance(m, Factorized) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_rank_larger_than_the_layer_allows(net):
    dense, x = net
    state = copy.deepcopy(dense.state_dict())
    with pytest.raises(PruneError, match=r"out: rank 11 is larger than the layer allows.*"
                                         r"10 x 40.*at most 10"):
        lowrank(dense, SVD(rank=11), progress=False)
    unchanged(dense, state)


@pytest.mark.parametrize("config", [ALDS(params_ratio=0.001), ALDS(flops_ratio=0.001),
                                    SVD(flops_ratio=0.001)])
def test_unreachable_budget_says_the_best_reachable(net, config):
    dense, x = net
    state = copy.deepcopy(dense.state_dict())
    with pytest.raises(Unreachable, match=r"cannot be met.*>= 0\.\d+") as e:
        lowrank(dense, config, [x], progress=False)
    assert 0.001 < e.value.best < 0.2
    unchanged(dense, state)


def test_layer_with_no_factorization(net):
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(PruneError, match=r"0: a grouped convolution \(groups=8\) has no "
                                         r"low-rank factorization.*exclude"):
        lowrank(model, SVD(rank=1), progress=False)
    unchanged(model, state)
    lowrank(model, SVD(rank=1, exclude=("0",)), progress=False)  # the way out works
    assert isinstance(model[1], Factorized)


def test_bad_configs_and_missing_data(net):
    dense, _ = net
    with pytest.raises(PruneError, match="one of rank, rank_ratio and flops_ratio"):
        SVD(rank=2, rank_ratio=0.5)
    with pytest.raises(PruneError, match="rank_ratio"):
        SVD(rank_ratio=1.5)
    with pytest.raises(PruneError, match="ALDS takes one budget, not params_ratio and flops_ratio"):
        ALDS(params_ratio=0.5, flops_ratio=0.5)
    with pytest.raises(PruneError, match="sequential"):
        ALDS(sequential=True)
    with pytest.raises(PruneError, match="tied='change' cannot hold for low rank"):
        SVD(tied="change")
    with pytest.raises(PruneError, match="needs calibration data"):
        lowrank(dense, SVD(data_aware=True), progress=False)
    with pytest.raises(PruneError, match="low-rank config"):
        from prunekit import Magnitude
        lowrank(dense, Magnitude(), progress=False)


def test_an_error_midway_puts_every_replaced_layer_back(net, monkeypatch):
    dense, x = net
    state = copy.deepcopy(dense.state_dict())
    real = SVD.transform

    def failing(self, w, hessian, layer, plan=None):
        if layer == "fc":
            raise KeyboardInterrupt
        return real(self, w, hessian, layer, plan)

    monkeypatch.setattr(SVD, "transform", failing)
    with pytest.raises(KeyboardInterrupt):
        lowrank(dense, SVD(rank=2), progress=False)
    unchanged(dense, state)


def test_cli_lowrank_on_a_registry_model(tmp_path, capsys):
    """`prunekit lowrank` as a user types it: data-aware SVD of tiny GPT-2 (its Conv1D
    layers become Linear pairs; the LM head tied to the embedding is left as it is)."""
    import json

    from prunekit.cli import main
    from prunekit.models import calibration_batches, create

    out = tmp_path / "g.safetensors"
    assert main(["lowrank", "tiny-gpt2", "--method", "svd", "-o", "rank_ratio=0.25",
                 "-o", "data_aware=true", "--calib-samples", "8", "--out", str(out),
                 "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params_after"] < report["params_before"]
    assert "lm_head" not in [lr["name"] for lr in report["layers"]] and out.exists()
    assert report["options"]["exclude"] == ["lm_head"]  # a causal LM's tied head stays
    assert all(lr["detail"].get("rank") for lr in report["layers"])
    model = create("tiny-gpt2")
    lowrank(model, SVD(rank_ratio=0.25), progress=False)
    model(**calibration_batches("tiny-gpt2", n=2)[0])  # the factorized model runs
    assert main(["lowrank", "tiny-gpt2", "--method", "wanda", "--quiet"]) != 0
    assert "wanda is not a low-rank method; low-rank methods are: alds, svd" in \
        capsys.readouterr().err
