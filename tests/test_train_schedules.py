"""The schedules against their papers' definitions, checked step by step."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit.train as T
from prunekit.errors import PruneError
from prunekit.train.lightning import SparsityCallback
from prunekit.train.rigl import drop_grow
from test_train_masks import batch, small_net, train_steps


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


# -- GMP ---------------------------------------------------------------------------------


def cubic(t, s_i, s_f, t0, n, dt):
    """Zhu and Gupta's formula, evaluated at the last pruning step <= t."""
    if t < t0:
        return 0.0
    k = min((t - t0) // dt, n)
    return s_f + (s_i - s_f) * (1 - k * dt / (n * dt)) ** 3


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gmp_sparsity_follows_the_cubic_formula_at_every_step(scope):
    model = small_net()
    opt = sgd(model)
    t0, dt, n, s_i, s_f = 3, 4, 5, 0.2, 0.85
    gmp = T.GMP(model, opt, density=1 - s_f, initial_density=1 - s_i, start=t0,
                end=t0 + n * dt, frequency=dt, scope=scope)
    sizes = {k: w.numel() for k, w in gmp.holder.weights.items()}
    previous = {k: m.clone() for k, m in gmp.masks.items()}
    for t in range(1, t0 + n * dt + 6):
        train_steps(model, opt, gmp, 1)
        want = cubic(t, s_i, s_f, t0, n, dt)
        if scope == "layer":  # every layer at exactly round(want * size) pruned
            for k, m in gmp.masks.items():
                assert int((~m).sum()) == round(want * sizes[k]), (t, k)
        else:
            assert int(sum((~m).sum() for m in gmp.masks.values())) == round(
                want * sum(sizes.values()))
        for k, m in gmp.masks.items():  # the support only shrinks
            assert not (m & ~previous[k]).any()
            previous[k] = m.clone()
    assert gmp.next_event() is None
    assert gmp.sparsity() == pytest.approx(s_f, abs=0.01)


def test_gmp_prunes_the_smallest_magnitudes():
    model = small_net()
    opt = sgd(model)
    gmp = T.GMP(model, opt, density=0.5, start=2, end=4, frequency=2)
    train_steps(model, opt, gmp, 3)
    assert gmp.sparsity() == 0.0  # the first pruning step (t0 = 2) prunes to s_i = 0
    before = {k: w.detach().abs().clone() for k, w in gmp.holder.weights.items()}
    opt.zero_grad()  # a step without gradients: the event sees exactly these weights
    opt.step()
    gmp.step()
    for k, m in gmp.masks.items():
        assert before[k][m].min() >= before[k][~m].max()
    assert gmp.sparsity() == pytest.approx(0.5, abs=0.01) and gmp.next_event() is None


def test_gmp_nm_ramps_through_looser_patterns():
    model = small_net()
    opt = sgd(model)
    gmp = T.GMP(model, opt, start=0, end=8, frequency=2, pattern="2:4", exclude=["5"])
    kept_per_group = []
    for _ in range(8):
        train_steps(model, opt, gmp, 1)
        m = gmp.holder.matrix("3", gmp.masks["3"]).reshape(16, -1, 4).sum(2)
        assert (m == m.flatten()[0]).all()
        kept_per_group.append(int(m.flatten()[0]))
    assert kept_per_group == sorted(kept_per_group, reverse=True)
    assert kept_per_group[-1] == 2 and kept_per_group[0] > 2
    gmp.holder.check_pattern()


# -- SNIP --------------------------------------------------------------------------------


def test_snip_scores_equal_g_times_w_by_hand():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 3))
    data = [(torch.randn(8, 10), torch.randint(0, 3, (8,))) for _ in range(3)]
    w1, b1, w2, b2 = (p.detach().clone().requires_grad_() for p in model.parameters())
    total = 0
    for x, y in data[:2]:
        logits = torch.tanh(x @ w1.t() + b1) @ w2.t() + b2
        logp = logits - logits.exp().sum(1, keepdim=True).log()
        total = total - logp[torch.arange(8), y].mean() / 2
    g1, g2 = torch.autograd.grad(total, [w1, w2])
    opt = sgd(model)
    snip = T.SNIP(model, opt, density=0.25, data=iter(data), num_batches=2)
    torch.testing.assert_close(snip.scores["0"], (g1 * w1).abs().detach(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(snip.scores["2"], (g2 * w2).abs().detach(), rtol=1e-5, atol=1e-8)
    # Global ranking: every kept score beats every pruned one, exactly 25% kept.
    s = torch.cat([snip.scores[k].flatten() for k in ("0", "2")])
    m = torch.cat([snip.masks[k].flatten() for k in ("0", "2")])
    assert int(m.sum()) == round(0.25 * m.numel())
    assert s[m].min() >= s[~m].max()
    assert all(p.grad is None for p in model.parameters())  # SNIP leaves no gradients behind
    with pytest.raises(PruneError, match="only 3"):
        T.SNIP(model, opt, density=0.5, data=data, num_batches=4)


# -- Lottery tickets ----------------------------------------------------------------------


def test_lottery_rewinds_to_the_saved_early_weights_on_the_kept_support():
    model = small_net()
    opt = sgd(model)
    seen = []
    lt = T.LotteryTicket(model, opt, density=0.2, rounds=2, round_steps=6, rewind_step=2,
                         on_rewind=lambda s: seen.append(s.step_count))
    train_steps(model, opt, lt, 2)
    early = {k: v.clone() for k, v in model.state_dict().items()}
    early_opt = {k: opt.state[w]["momentum_buffer"].clone() for k, w in lt.holder.weights.items()}
    train_steps(model, opt, lt, 3)
    assert lt.next_event() == {"step": 6, "event": "prune-rewind", "sparsity": 1 - 0.2 ** 0.5}
    train_steps(model, opt, lt, 1)  # step 6: prune + rewind
    assert seen == [6]
    kept = sum(int(m.sum()) for m in lt.masks.values())
    total = sum(m.numel() for m in lt.masks.values())
    assert kept == total - round((1 - 0.2 ** 0.5) * total)
    for k, w in lt.holder.weights.items():
        m = lt.masks[k]
        assert torch.equal(w[m], early[f"{k}.weight"][m])
        assert (w[~m] == 0).all()
        buf = opt.state[w]["momentum_buffer"]
        assert torch.equal(buf[m], early_opt[k][m]) and (buf[~m] == 0).all()
    for k, v in model.state_dict().items():  # biases are rewound too
        if not k.endswith("weight"):
            assert torch.equal(v, early[k])
    train_steps(model, opt, lt, 6)  # step 12: last round
    assert lt.sparsity() == pytest.approx(0.8, abs=1e-3)
    assert lt.round == 2 and lt.next_event() is None and lt.total_steps == 18


# -- RigL ----------------------------------------------------------------------------------


def brute_drop_grow(active, drop, grow, k):
    active, drop, grow = active.tolist(), drop.tolist(), grow.tolist()
    on = [i for i, a in enumerate(active) if a]
    dropped = sorted(on, key=lambda i: (drop[i], i))[:k]
    left = [i for i in range(len(active)) if not active[i] or i in dropped]
    grown = sorted(left, key=lambda i: (-grow[i], i))[:k]
    return [(a and i not in dropped) or i in grown for i, a in enumerate(active)]


def test_drop_grow_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        active = torch.rand(1, 30, generator=g) < 0.4
        drop, grow = torch.randn(1, 30, generator=g), torch.randn(1, 30, generator=g)
        k = int(torch.randint(0, int(active.sum()) + 1, (1,), generator=g))
        got = drop_grow(active, drop, grow, torch.tensor([k]))
        assert got[0].tolist() == brute_drop_grow(active[0], drop[0], grow[0], k)


@pytest.mark.parametrize("pattern", ["unstructured", "unstructured:row", "2:4", "1x4"])
def test_rigl_keeps_exactly_the_same_count_per_layer_at_every_step(pattern):
    torch.manual_seed(0)
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    density = None if pattern == "2:4" else 0.3
    # The head is left dense so every hidden unit has a gradient path: a grown weight then
    # gets a nonzero gradient and becomes nonzero after one step.
    rigl = T.RigL(model, opt, density=density, delta_t=3, t_end=24, pattern=pattern,
                  exclude=["5"], distribution="erk" if pattern == "unstructured" else "uniform")
    counts = rigl.holder.counts()
    start = {k: m.clone() for k, m in rigl.masks.items()}
    changes = []
    for t in range(1, 31):
        x, y = batch()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        nonzero = {k: int((w != 0).sum()) for k, w in rigl.holder.weights.items()}
        assert nonzero == counts, t
        before = {k: m.clone() for k, m in rigl.masks.items()}
        rigl.step()
        assert rigl.holder.counts() == counts, t
        rigl.holder.check_pattern()
        changes.append(sum(int((before[k] ^ rigl.masks[k]).sum()) for k in counts))
        for k, w in rigl.holder.weights.items():
            assert (w[~rigl.masks[k]] == 0).all()
    updates = [t for t in range(1, 31) if changes[t - 1]]
    assert set(updates) <= {3, 6, 9, 12, 15, 18, 21} and len(updates) >= 5
    assert any((start[k] != rigl.masks[k]).any() for k in counts)
    assert rigl.next_event() is None


def test_rigl_update_drops_smallest_and_grows_largest_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rigl = T.RigL(model, opt, density=0.3, delta_t=2, t_end=100, distribution="uniform")
    x, y = torch.randn(32, 20), torch.randint(0, 5, (32,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if rigl.step_count == 1:
            before = {k: m.clone() for k, m in rigl.masks.items()}
            mags = {k: w.detach().abs().clone() for k, w in rigl.holder.weights.items()}
            grads = {k: g.abs().clone() for k, g in rigl.holder.dense_grads.items()}
        rigl.step()
    f = rigl.fraction(2)
    assert f == pytest.approx(0.15 * (1 + math.cos(math.pi * 2 / 100)))
    for k in before:
        k_swap = round(int(before[k].sum()) * f)
        want = brute_drop_grow(before[k].flatten(), mags[k].flatten(), grads[k].flatten(), k_swap)
        assert rigl.masks[k].flatten().tolist() == want


def test_rigl_without_backward_names_the_problem():
    model = small_net()
    opt = sgd(model)
    rigl = T.RigL(model, opt, density=0.3, delta_t=1, t_end=10)
    with pytest.raises(PruneError, match="no gradient for layer 0"):
        rigl.step()


# -- GaP -----------------------------------------------------------------------------------


def test_gap_grows_one_partition_at_a_time_and_ends_at_the_density():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(12, 12) for _ in range(4)])
    opt = sgd(model)
    gap = T.GaP(model, opt, density=0.25, partitions=4, delta_t=3, t_end=12)
    assert [p for p in gap.partitions] == [["0"], ["1"], ["2"], ["3"]]
    target = round(0.25 * 144)
    dense_seen = []
    for _ in range(15):
        if gap.dense is not None:
            dense_seen.append(gap.dense)
        for k, m in gap.masks.items():
            part = next(i for i, p in enumerate(gap.partitions) if k in p)
            assert int(m.sum()) == (144 if part == gap.dense else target)
        x = torch.randn(8, 12)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        gap.step()
    assert sorted(set(dense_seen)) == [0, 1, 2, 3]
    assert gap.next_event() is None
    assert gap.sparsity() == pytest.approx(0.75, abs=1 / 144)
    for w in gap.holder.weights.values():
        assert int((w != 0).sum()) <= target


def test_gap_partitions_balance_sizes():
    from prunekit.train.gap import split_partitions
    parts = split_partitions({"a": 10, "b": 10, "c": 40, "d": 5, "e": 35}, 2)
    assert parts == [["a", "b", "c"], ["d", "e"]]
    with pytest.raises(PruneError, match="at most 2"):
        split_partitions({"a": 1, "b": 1}, 3)


# -- SMCP ----------------------------------------------------------------------------------


def test_smcp_soft_masked_channels_keep_learning_and_meet_the_cost():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(8, 3, 6, 6)
    smcp = T.SMCP(model, opt, 0.4, delta_t=2, t_end=12, cost="flops", example_input=x)
    w2 = smcp.holder.weights["2"]
    assert smcp.unit_cost["2"] == 16 * 9 * 16  # out * kernel * output positions
    masked_values = None
    for t in range(1, 15):
        y = torch.randint(0, 4, (8,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if masked_values is not None:
            # Soft: masked channels are not zero and their weights still move.
            assert (w2.detach()[~smcp.masks["2"]] != masked_values[~smcp.masks["2"]]).any() \
                or smcp.masks["2"].all()
        smcp.step()
        if t < 12:
            assert smcp.holder.soft
            masked_values = w2.detach().clone()
        if t >= 2:
            assert smcp.cost_fraction() <= smcp.budget(t - t % 2) + 1e-9
    assert not smcp.holder.soft and smcp.next_event() is None
    assert smcp.cost_fraction() <= 0.4 + 1e-9
    for k, m in smcp.masks.items():  # hard now: whole input channels are zero
        w = model[int(k)].weight
        assert (w[~m] == 0).all()
        cm = smcp.channel_masks[k]
        chan = m.reshape(m.shape[0], cm.numel(), -1)
        assert (chan.all(2).all(0) == cm).all() and ((~chan).all(2).all(0) == ~cm).all()
    assert "parametrizations" not in "".join(model.state_dict())


def test_smcp_channel_can_return():
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    smcp = T.SMCP(model, opt, 0.5, delta_t=1, t_end=100, ema=0.0)
    smcp.importance["0"] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    smcp._install(smcp.choose(0.5))
    assert smcp.channel_masks["0"].tolist() == [True, True, False, False]
    smcp.importance["0"] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    smcp._install(smcp.choose(0.5))
    assert smcp.channel_masks["0"].tolist() == [False, False, True, True]
    assert (model[0].parametrizations.weight.original != 0).all()  # soft: nothing was zeroed


# -- Lightning, logging -------------------------------------------------------------------


class FakeTrainer:
    global_step = 0


class FakeModule:
    def __init__(self):
        self.logged = {}

    def log(self, k, v):
        self.logged[k] = v


def test_lightning_callback_steps_once_per_optimizer_step():
    model = small_net()
    opt = sgd(model)
    gmp = T.GMP(model, opt, density=0.5, start=0, end=4, frequency=2)
    cb = SparsityCallback(gmp)
    trainer, module = FakeTrainer(), FakeModule()
    for batch_idx, global_step in enumerate([0, 1, 1, 2, 2, 3, 4]):  # accumulation of 2
        trainer.global_step = global_step
        cb.on_train_batch_end(trainer, module, None, None, batch_idx)
        assert gmp.step_count == global_step
    assert module.logged["sparsity/sparsity"] == pytest.approx(0.5, abs=0.01)
    assert module.logged["sparsity/next_event_step"] == -1.0
    assert cb.state_dict()["step"] == 4
    with pytest.raises(PruneError, match="schedule"):
        SparsityCallback(model)


def test_every_schedule_reports_sparsity_and_next_event():
    data = [batch()]
    for name, make in {
        "gmp": lambda m, o: T.GMP(m, o, density=0.5, end=10, frequency=5),
        "snip": lambda m, o: T.SNIP(m, o, density=0.5, data=data),
        "lottery": lambda m, o: T.LotteryTicket(m, o, density=0.5, rounds=2, round_steps=5),
        "rigl": lambda m, o: T.RigL(m, o, density=0.5, t_end=10, delta_t=5),
        "gap": lambda m, o: T.GaP(m, o, density=0.5, delta_t=5, t_end=10, partitions=2),
        "smcp": lambda m, o: T.SMCP(m, o, 0.5, t_end=10, delta_t=5),
        "l0": lambda m, o: T.L0(m, o, density=0.5, t_end=10),
        "static": lambda m, o: T.Static(m, o, density=0.5),
    }.items():
        model = small_net()
        opt = sgd(model)
        sched = make(model, opt)
        assert name in T.SCHEDULES and isinstance(sched, T.SCHEDULES[name])
        train_steps(model, opt, sched, 2)
        log = sched.log_dict()
        assert 0.0 <= log["sparsity"] <= 1.0 and log["step"] == 2.0
        nxt = sched.next_event()
        assert nxt is None or (nxt["step"] > 2 and isinstance(nxt["event"], str)), name


@pytest.mark.parametrize("name", ["smcp", "l0", "lottery", "gap"])
@pytest.mark.parametrize("steps", [3, 8])  # mid-schedule, and after the last event
def test_save_and_load_mid_training_restores_the_same_function(tmp_path, name, steps):
    make = {"smcp": lambda m, o: T.SMCP(m, o, 0.5, t_end=6, delta_t=2),
            "l0": lambda m, o: T.L0(m, o, density=0.5, t_end=6),
            "lottery": lambda m, o: T.LotteryTicket(m, o, density=0.5, rounds=2, round_steps=3,
                                                    rewind_step=1),
            "gap": lambda m, o: T.GaP(m, o, density=0.5, delta_t=2, t_end=6, partitions=2)}[name]
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = make(model, opt)
    train_steps(model, opt, sched, steps)
    path = T.save_sparse(tmp_path / "ck.safetensors", model, sched)
    torch.manual_seed(5)
    model2 = small_net()
    sched2 = make(model2, torch.optim.SGD(model2.parameters(), lr=0.1))
    T.load_sparse(path, model2, sched2)
    x, _ = batch()
    model.eval()
    model2.eval()
    torch.testing.assert_close(model2(x), model(x))
    assert sched2.sparsity() == sched.sparsity() and sched2.next_event() == sched.next_event()
    for k in sched.masks:
        assert torch.equal(sched2.masks[k], sched.masks[k])
