"""AMC (He et al. 2018, "AMC: AutoML for Model Compression and Acceleration on Mobile
Devices"): a DDPG agent walks the prunable units (layers, coupled channel groups) one by one
and sets each one's keep ratio; at the end of an episode the model pruned by those ratios is
scored on a held-out batch, and that score is the reward of every step of the episode.

As in the paper: the state of step t is (t, the unit's own features such as its shape and
stride, its FLOPs, the FLOPs already cut by earlier steps, the FLOPs still to decide, the
previous action), each feature scaled to [0, 1]; the action is a keep ratio in [lbound,
rbound]; the constraint is enforced by the action itself (each action is capped so that the
budget can still be met with every later unit at lbound, so every episode's model meets it);
exploration is truncated normal noise around the actor's action (sigma 0.5, decayed by 0.95
per episode after a warm-up of random episodes); the reward for a FLOPs or latency budget is
-error, minus a moving-average baseline in the critic's target; actor and critic are two
300-unit hidden layers, updated with soft targets (tau 0.01).

This file holds the agent and the search over plain callables: `cost(keep) -> float` (FLOPs,
parameters or predicted latency of the whole model at keep ratios `keep`, nondecreasing in
each ratio) and `evaluate(keep) -> accuracy in %`. Tying it to a model (which units, how a
ratio becomes channels) is the caller's: see prunekit.structured for channel groups. The
whole search is seeded and reproducible (its own RNGs; the global ones are left alone).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from prunekit.budget.dp import Unreachable
from prunekit.errors import PruneError
from prunekit.progress import Progress


@dataclass
class AMCResult:
    """The best episode's keep ratios, cost and score, and every episode in order."""

    keep: list[float]
    cost: float
    accuracy: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str | None = None  # why the search ended early, if it did

    def to_dict(self) -> dict:
        return {"keep": self.keep, "cost": self.cost, "accuracy": self.accuracy,
                "episodes": len(self.history), "history": self.history,
                "seconds": self.seconds, "stopped": self.stopped}


class _Actor(nn.Module):
    def __init__(self, states: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(states, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1),
                                 nn.Sigmoid())

    def forward(self, s):
        return self.net(s)


class _Critic(nn.Module):
    def __init__(self, states: int, hidden: int):
        super().__init__()
        self.state = nn.Linear(states, hidden)
        self.action = nn.Linear(1, hidden)
        self.rest = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, 1))

    def forward(self, s, a):
        return self.rest(self.state(s) + self.action(a))


def _soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters()):
            t.mul_(1 - tau).add_(s, alpha=tau)


class DDPG:
    """The agent: actor, critic, their targets and a replay buffer of (s, a, r, s', done)."""

    def __init__(self, states: int, seed: int, hidden: int = 300, lr_actor: float = 1e-4,
                 lr_critic: float = 1e-3, tau: float = 0.01, batch: int = 64,
                 memory: int = 2000, discount: float = 1.0, baseline_decay: float = 0.95):
        torch.manual_seed(seed)  # inside the search's forked RNG
        self.actor, self.critic = _Actor(states, hidden), _Critic(states, hidden)
        self.actor_target, self.critic_target = _Actor(states, hidden), _Critic(states, hidden)
        self.actor_target.load_state_dict(self.actor.state_dict())
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.opt_actor = torch.optim.Adam(self.actor.parameters(), lr=lr_actor)
        self.opt_critic = torch.optim.Adam(self.critic.parameters(), lr=lr_critic)
        self.tau, self.batch, self.discount = tau, batch, discount
        self.memory: list[tuple] = []
        self.capacity = memory
        self.baseline: float | None = None
        self.baseline_decay = baseline_decay

    def act(self, state: np.ndarray) -> float:
        with torch.no_grad():
            return float(self.actor(torch.as_tensor(state, dtype=torch.float32)[None])[0, 0])

    def remember(self, s, a, r, s2, done) -> None:
        self.memory.append((s, a, r, s2, done))
        if len(self.memory) > self.capacity:
            self.memory.pop(0)

    def observe_reward(self, reward: float) -> None:
        self.baseline = reward if self.baseline is None else (
            self.baseline_decay * self.baseline + (1 - self.baseline_decay) * reward)

    def update(self, rng: np.random.Generator) -> None:
        if len(self.memory) < self.batch:
            return
        idx = rng.choice(len(self.memory), self.batch, replace=False)
        s, a, r, s2, done = (torch.as_tensor(np.array(x), dtype=torch.float32)
                             for x in zip(*(self.memory[i] for i in idx)))
        a, r, done = a[:, None], r[:, None], done[:, None]
        r = r - (self.baseline or 0.0)
        with torch.no_grad():
            target = r + self.discount * (1 - done) * self.critic_target(
                s2, self.actor_target(s2))
        loss = nn.functional.mse_loss(self.critic(s, a), target)
        self.opt_critic.zero_grad()
        loss.backward()
        self.opt_critic.step()
        policy = -self.critic(s, self.actor(s)).mean()
        self.opt_actor.zero_grad()
        policy.backward()
        self.opt_actor.step()
        _soft_update(self.actor_target, self.actor, self.tau)
        _soft_update(self.critic_target, self.critic, self.tau)


def _cap(cost: Callable, decided: list[float], n: int, lbound: float, rbound: float,
         budget: float) -> float:
    """The largest keep ratio for the next unit with which the budget can still be met when
    every later unit takes lbound (cost is nondecreasing in each ratio: bisection)."""
    rest = [lbound] * (n - len(decided) - 1)
    if cost([*decided, rbound, *rest]) <= budget:
        return rbound
    lo, hi = lbound, rbound
    for _ in range(30):
        mid = (lo + hi) / 2
        if cost([*decided, mid, *rest]) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def _truncated_normal(rng: np.random.Generator, mu: float, sigma: float, lo: float,
                      hi: float) -> float:
    """A draw of N(mu, sigma) conditioned on [lo, hi] (by rejection; the mean is clipped
    into the interval first, so a draw lands within a few tries)."""
    mu = min(max(mu, lo), hi)
    for _ in range(1000):
        a = rng.normal(mu, sigma)
        if lo <= a <= hi:
            return float(a)
    return mu


def amc_search(features: Sequence[Sequence[float]], cost: Callable[[list[float]], float],
               evaluate: Callable[[list[float]], float], budget: float, *,
               episodes: int = 300, warmup: int | None = None, lbound: float = 0.2,
               rbound: float = 1.0, sigma: float = 0.5, sigma_decay: float = 0.95,
               seed: int = 0, hidden: int = 300, max_seconds: float | None = None,
               log: Callable[[str], None] | None = None,
               progress: bool = True) -> AMCResult:
    """Search keep ratios for len(features) units, one DDPG episode at a time.

    features[t]: unit t's own static features (e.g. channels, inputs, kernel, stride,
    spatial size); cost(keep) the model's cost at one keep ratio per unit (during an
    episode the units not yet decided are passed as 1.0 for the state, as lbound for the
    cap); budget the largest cost allowed; evaluate(keep) the accuracy (%) of the model
    pruned at keep. `warmup` random episodes (default a quarter)
    fill the replay buffer before the agent acts; `hidden` is the width of the actor's and
    critic's two hidden layers (300 in the paper). Stops after `episodes`, or once
    `max_seconds` have passed. Raises Unreachable (best: the least cost any ratios reach,
    every unit at lbound) when the budget cannot be met."""
    n = len(features)
    if n == 0:
        raise PruneError("AMC needs at least one unit to walk")
    if not 0 < lbound <= rbound <= 1:
        raise PruneError(f"need 0 < lbound <= rbound <= 1, got {lbound} and {rbound}")
    if episodes < 1:
        raise PruneError(f"episodes must be >= 1, got {episodes}")
    least = float(cost([lbound] * n))
    if least > budget:
        raise Unreachable(f"AMC: cost budget {budget:.6g} cannot be met: every unit at the "
                          f"lowest keep ratio {lbound:g} still costs {least:.6g}", least)
    warmup = episodes // 4 if warmup is None else warmup
    full = float(cost([1.0] * n))
    flops = [full - float(cost([1.0] * t + [0.0] + [1.0] * (n - t - 1))) for t in range(n)]
    static = np.array([[t, *f, fl] for t, (f, fl) in enumerate(zip(features, flops))],
                      dtype=np.float64)
    lo, span = static.min(0), np.ptp(static, 0)
    static = (static - lo) / np.where(span > 0, span, 1.0)

    def state(t: int, decided: list[float]) -> np.ndarray:
        done_cost = float(cost(decided + [1.0] * (n - len(decided))))
        reduced = (full - done_cost) / full  # FLOPs already cut
        rest = sum(flops[t + 1:]) / full  # FLOPs of the units after this one
        prev = decided[-1] if decided else 1.0
        return np.concatenate([static[t], [reduced, rest, prev]]).astype(np.float32)

    history: list[dict] = []
    best: dict | None = None
    start = time.perf_counter()
    stopped = None
    with torch.random.fork_rng(), Progress(enabled=progress) as bar:
        rng = np.random.default_rng(seed)
        agent = DDPG(static.shape[1] + 3, seed, hidden=hidden)
        task = bar.add("AMC episodes", total=episodes)
        for episode in range(episodes):
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                stopped = f"time limit {max_seconds:g} s after {episode} episodes"
                break
            noise = sigma * sigma_decay ** max(0, episode - warmup)
            decided: list[float] = []
            steps = []
            for t in range(n):
                s = state(t, decided)
                if episode < warmup:
                    a = float(rng.uniform(lbound, rbound))
                else:
                    mu = agent.act(s)
                    a = _truncated_normal(rng, mu, noise, lbound, rbound)
                a = min(max(a, lbound), _cap(cost, decided, n, lbound, rbound, budget))
                steps.append((s, a))
                decided.append(a)
            spent = float(cost(decided))
            accuracy = float(evaluate(decided))
            reward = -(100.0 - accuracy) / 100.0
            agent.observe_reward(reward)
            for t, (s, a) in enumerate(steps):
                s2 = steps[t + 1][0] if t + 1 < n else s
                agent.remember(s, a, reward, s2, float(t + 1 == n))
            if episode >= warmup:
                for _ in range(n):
                    agent.update(rng)
            row = {"episode": episode, "keep": [round(a, 6) for a in decided], "cost": spent,
                   "accuracy": accuracy, "reward": reward, "sigma": noise if episode >= warmup
                   else None}
            history.append(row)
            if best is None or accuracy > best["accuracy"]:
                best = row
            if log is not None:
                log(f"episode {episode}: accuracy {accuracy:.2f} at cost {spent / full:.3f} "
                    f"(best {best['accuracy']:.2f})")
            bar.advance(task)
    assert best is not None
    return AMCResult(list(best["keep"]), best["cost"], best["accuracy"], history,
                     time.perf_counter() - start, stopped)


def keep_counts(keep: Sequence[float], channels: Sequence[int], round_to: int = 1,
                minimum: int = 1) -> list[int]:
    """Channels kept per unit: ceil(ratio * n) rounded up to a multiple of round_to, at
    least `minimum`, at most n."""
    out = []
    for k, c in zip(keep, channels):
        kept = math.ceil(k * c - 1e-9)
        kept = math.ceil(kept / round_to) * round_to
        out.append(int(min(c, max(minimum, kept))))
    return out
