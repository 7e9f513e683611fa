"""AMC's DDPG search: reproducible by seed, always within budget, learning on a problem
whose answer is known, and clear errors."""

import numpy as np
import pytest

from prunekit.budget.amc import amc_search, keep_counts
from prunekit.budget.dp import Unreachable
from prunekit.errors import PruneError

pytestmark = pytest.mark.usefixtures("one_thread")

# six units: FLOPs weights and sensitivities; the cheap-to-cut units are the insensitive ones
FLOPS = np.array([4.0, 1.0, 3.0, 2.0, 5.0, 1.0])
SENS = np.array([0.2, 3.0, 0.3, 2.0, 0.1, 4.0])
FEATURES = [(f, 1.0 + i % 2) for i, f in enumerate(FLOPS)]


def cost(keep):
    return 1.0 + float(FLOPS @ np.asarray(keep))


def evaluate(keep):
    return 100.0 - 10.0 * float(SENS @ (1 - np.asarray(keep)) ** 2)


def search(seed, episodes=30):
    return amc_search(FEATURES, cost, evaluate, budget=0.5 * cost([1.0] * 6),
                      episodes=episodes, warmup=10, seed=seed, hidden=64, progress=False)


def test_a_fixed_seed_reproduces_the_search():
    a, b = search(3, episodes=16), search(3, episodes=16)
    assert a.history == b.history and a.keep == b.keep
    assert search(4, episodes=16).history != a.history


def test_every_episode_meets_the_budget_and_the_best_is_reported():
    r = search(0)
    budget = 0.5 * cost([1.0] * 6)
    assert len(r.history) == 30
    assert all(h["cost"] <= budget * (1 + 1e-9) for h in r.history)
    assert r.accuracy == max(h["accuracy"] for h in r.history)
    assert all(0.2 <= k <= 1.0 for k in r.keep)


def test_the_agent_learns_beyond_its_random_warmup():
    r = amc_search(FEATURES, cost, evaluate, budget=0.5 * cost([1.0] * 6), episodes=120,
                   warmup=30, seed=0, hidden=64, progress=False)
    warm = [h["accuracy"] for h in r.history[:30]]
    late = [h["accuracy"] for h in r.history[-30:]]
    assert np.mean(late) > np.mean(warm) + 2.0
    # it cuts the insensitive units more than the sensitive ones
    keep = np.array(r.keep)
    assert keep[SENS < 1].mean() < keep[SENS > 1].mean()


def test_unreachable_budget_says_the_least_cost():
    with pytest.raises(Unreachable, match="cannot be met.*still costs 4.2") as e:
        amc_search(FEATURES, cost, evaluate, budget=2.0, episodes=5, progress=False)
    assert e.value.best == pytest.approx(cost([0.2] * 6))


def test_bad_arguments():
    with pytest.raises(PruneError, match="lbound"):
        amc_search(FEATURES, cost, evaluate, 10.0, lbound=0.0, progress=False)
    with pytest.raises(PruneError, match="at least one unit"):
        amc_search([], cost, evaluate, 10.0, progress=False)


def test_keep_counts_round_up():
    assert keep_counts([0.3, 0.5, 0.01, 1.0], [16, 64, 16, 10], round_to=8) == [8, 32, 8, 10]
    assert keep_counts([0.3], [16]) == [5]
