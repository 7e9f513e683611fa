"""L0 regularisation with hard-concrete gates (Louizos, Welling and Kingma 2018), the sparsity
target held by a Lagrange multiplier (constrained optimisation as in Gallego-Posada et al.
2022, "Controlled Sparsity via Constrained Optimization").

Every weight w gets a gate z in [0, 1] drawn from the hard-concrete distribution with a
learned log_alpha: s = sigmoid((log u - log(1 - u) + log_alpha) / beta), z = clamp(s * (zeta -
gamma) + gamma, 0, 1); the forward uses w * z. The gates descend the task loss plus lambda
times the expected fraction of open gates, P(z > 0) = sigmoid(log_alpha - beta *
log(-gamma / zeta)), a smooth proxy of the density. lambda ascends on the violation of
max(expected density, fraction of deterministic gates open) over the target (a proxy
Lagrangian, Cotter et al. 2019), and is reset to 0 as soon as the constraint holds (dual
restarts, Gallego-Posada et al.), so no penalty weight needs tuning and the density that is
finally kept does not drift below the target. The target itself ramps (cubic) from the
initial density to `density` over the first half of training, and the gates' Adam has no
momentum, so they stop closing as soon as lambda is released. At t_end the deterministic gates
z = clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1) are folded into the weights and
the closed ones become a hard mask.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.errors import PruneError
from prunekit.patterns import Unstructured
from prunekit.train.base import SCHEDULES, Schedule, load_optimizer_state, optimizer_state
from prunekit.train.masks import check_density, check_positive, check_span


class HardConcreteGate(nn.Module):
    """Parametrization weight -> weight * z with one hard-concrete gate per weight."""

    def __init__(self, shape, log_alpha: float, beta: float, gamma: float, zeta: float):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full(shape, float(log_alpha)))
        self.beta, self.gamma, self.zeta = beta, gamma, zeta

    def gate(self, sample: bool) -> torch.Tensor:
        if sample:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / self.beta)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def forward(self, w):
        return w * self.gate(self.training).to(w.dtype)

    def open_probability(self) -> torch.Tensor:
        """P(z > 0) per gate: the differentiable expected L0 norm."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))


@SCHEDULES.register("l0", summary="hard-concrete gates per weight, the density held by a "
                    "Lagrange multiplier (Louizos et al. 2018)", needs=(),
                    patterns=("unstructured",),
                    example={"density": 0.5, "t_end": 6, "init_density": 0.5, "gate_lr": 0.5})
class L0(Schedule):
    """prunekit.train.L0(model, optimizer, density=0.1, t_end=...).

    Gates train with their own Adam (gate_lr); lambda with dual_lr. init_density sets the
    initial deterministic gate value (0.9: gates start nearly open). beta, gamma, zeta are
    the paper's 2/3, -0.1, 1.1. The current deterministic sparsity is `sparsity()`;
    `expected_density()` and `multiplier` are loggable too.
    """

    def __init__(self, model, optimizer, density: float = 0.1, *, t_end: int,
                 gate_lr: float = 0.05, dual_lr: float = 0.05,
                 init_density: float = 0.9,
                 beta: float = 2 / 3, gamma: float = -0.1, zeta: float = 1.1, **layers):
        pattern = layers.pop("pattern", "unstructured")
        if pattern not in ("unstructured", Unstructured()):
            raise PruneError(f"L0.pattern: L0 gates one weight each; pattern {pattern!r} is "
                             f"not supported (use 'unstructured')")
        self.density = check_density(density, "L0.density")
        check_span(0, t_end, "L0", ("start", "t_end"))
        init = check_density(init_density, "L0.init_density")
        if not (gamma < 0.0 < 1.0 < zeta and beta > 0):
            raise PruneError(f"L0 needs gamma < 0, zeta > 1 and beta > 0; got gamma={gamma}, "
                             f"zeta={zeta}, beta={beta}")
        check_positive(gate_lr, "L0.gate_lr")
        check_positive(dual_lr, "L0.dual_lr")
        super().__init__(model, optimizer, **layers)
        self.t_end, self.init_density = t_end, max(init, self.density)
        s0 = min(max((init - gamma) / (zeta - gamma), 1e-4), 1 - 1e-4)
        self.gates: dict[str, HardConcreteGate] = {}
        for n, m in self.holder.layers.items():
            g = HardConcreteGate(m.weight.shape, math.log(s0 / (1 - s0)), beta, gamma, zeta)
            g.to(m.weight.device)
            parametrize.register_parametrization(m, "weight", g, unsafe=True)
            self.gates[n] = g
        self.gate_optimizer = torch.optim.Adam([g.log_alpha for g in self.gates.values()],
                                               lr=gate_lr,
                                               betas=(0.0, 0.999))
        self.dual_lr = float(dual_lr)
        self.multiplier = 0.0
        self.finalized = False

    def target_density(self, step: int) -> float:
        """The constraint's level: a cubic ramp from the initial density to `density` over
        the first half of training, so the multiplier tracks a slow target and never winds
        up (gates can only close so fast)."""
        ramp = max(1, self.t_end // 2)
        frac = (1.0 - min(step, ramp) / ramp) ** 3
        return self.density + (self.init_density - self.density) * frac

    def expected_density(self) -> float:
        with torch.no_grad():
            total = sum(float(g.open_probability().sum()) for g in self.gates.values())
        return total / sum(g.log_alpha.numel() for g in self.gates.values())

    def sparsity(self) -> float:
        if self.finalized:
            return super().sparsity()
        with torch.no_grad():
            closed = sum(int((g.gate(False) == 0).sum()) for g in self.gates.values())
        return closed / sum(g.log_alpha.numel() for g in self.gates.values())

    def _event(self, step: int) -> None:
        if self.finalized:
            return
        density_now = max(self.expected_density(), 1.0 - self.sparsity())
        violation = density_now - self.target_density(step)
        grads = [g.log_alpha.grad for g in self.gates.values() if g.log_alpha.grad is not None]
        scale = (torch.cat([x.reshape(-1) for x in grads]).pow(2).mean().sqrt().item()
                 if grads else 1.0) or 1.0
        # d(lambda * P(open)) / d log_alpha per gate; lambda is in units of the RMS task
        # gradient of the gates, so one dual_lr suits models of any size.
        for g in self.gates.values():
            p = g.open_probability().detach()
            extra = (self.multiplier * scale * 4.0) * p * (1 - p)
            g.log_alpha.grad = extra if g.log_alpha.grad is None else g.log_alpha.grad + extra
        self.gate_optimizer.step()
        self.gate_optimizer.zero_grad(set_to_none=True)
        # Dual ascent with restarts: lambda drops to 0 as soon as the constraint holds.
        self.multiplier = 0.0 if violation <= 0 else self.multiplier + self.dual_lr * violation
        if step >= self.t_end:
            self.finalize()

    @torch.no_grad()
    def finalize(self) -> None:
        """Fold the deterministic gates into the weights and hold the closed ones at zero."""
        if self.finalized:
            return
        for n, m in self.holder.layers.items():
            z = self.gates[n].gate(False)
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            m.weight.mul_(z)
            self.holder.set_mask(n, z > 0)
        self.finalized = True
        self.holder.apply()

    def next_event(self):
        if self.finalized:
            return None
        return {"step": self.t_end, "event": "finalize", "multiplier": self.multiplier}

    def log_dict(self):
        out = super().log_dict()
        if not self.finalized:
            out.update(expected_density=self.expected_density(), multiplier=self.multiplier)
        return out

    def _extra_state(self):
        out = {"multiplier": self.multiplier, "finalized": self.finalized}
        if not self.finalized:
            out.update({f"log_alpha.{n}": g.log_alpha.detach().clone()
                        for n, g in self.gates.items()})
            out.update(optimizer_state("gate_optimizer", self.gate_optimizer.state_dict()))
        return out

    def _load_extra_state(self, state):
        self.multiplier = float(state["multiplier"])
        if state["finalized"]:
            self.finalize()
            return
        with torch.no_grad():
            for n, g in self.gates.items():
                g.log_alpha.copy_(state[f"log_alpha.{n}"])
        gate_state = load_optimizer_state("gate_optimizer", state)
        if gate_state is not None:
            self.gate_optimizer.load_state_dict(gate_state)
