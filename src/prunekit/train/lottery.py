"""Lottery tickets by iterative magnitude pruning with weight rewinding.

Frankle and Carbin (2019) train, prune the smallest-magnitude weights, reset the survivors to
their initial values and train again; Frankle et al. (2020, "Linear mode connectivity and the
lottery ticket hypothesis") rewind instead to the weights of an early iteration k, which is
what makes tickets work on deeper networks. Each of `rounds` rounds keeps density**(1/rounds)
of the surviving weights (paper: 20% pruned per round, ranked globally).

Timeline in optimizer steps: the snapshot is taken after `rewind_step` steps; at
round_steps, 2*round_steps, ..., rounds*round_steps the model is pruned and rewound; the last
round then trains to (rounds + 1) * round_steps (`total_steps`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import torch

from prunekit.errors import PruneError
from prunekit.train.base import (
    ANY_PATTERN,
    SCHEDULES,
    Schedule,
    load_optimizer_state,
    optimizer_state,
)
from prunekit.train.masks import check_positive_int, final_density


@SCHEDULES.register("lottery", summary="iterative magnitude pruning with rewinding to early "
                    "weights (Frankle et al. 2019, 2020)", needs=(), patterns=ANY_PATTERN,
                    example={"density": 0.5, "rounds": 2, "round_steps": 3, "rewind_step": 1})
class LotteryTicket(Schedule):
    """prunekit.train.LotteryTicket(model, optimizer, density=0.1, rounds=10,
    round_steps=..., rewind_step=0).

    rewind_optimizer: also restore the optimizer's state (momenta, learning rates) saved at
    rewind_step. on_rewind(schedule): called after each rewind, e.g. to reset an LR scheduler.
    """

    def __init__(self, model, optimizer, density: float | None = 0.1, *, round_steps: int,
                 rounds: int = 10, rewind_step: int = 0,
                 scope: Literal["layer", "global"] = "global", rewind_optimizer: bool = True,
                 on_rewind: Callable | None = None, **layers):
        self.rounds = check_positive_int(rounds, "LotteryTicket.rounds")
        self.round_steps = check_positive_int(round_steps, "LotteryTicket.round_steps")
        if not 0 <= rewind_step < round_steps:
            raise PruneError(f"LotteryTicket.rewind_step must be an integer in [0, round_steps="
                             f"{round_steps}), got {rewind_step!r}")
        super().__init__(model, optimizer, **layers)
        self.density = final_density(self.holder.pattern, density, "LotteryTicket")
        self.rewind_step, self.scope = rewind_step, scope
        self.rewind_optimizer, self.on_rewind = rewind_optimizer, on_rewind
        self.keep_per_round = self.density ** (1.0 / self.rounds)
        self.snapshot: dict | None = None
        self.optimizer_snapshot: dict | None = None
        self._event(0)

    @property
    def total_steps(self) -> int:
        return (self.rounds + 1) * self.round_steps

    @property
    def round(self) -> int:
        """Rounds of pruning done so far."""
        return min(self.step_count // self.round_steps, self.rounds)

    def round_sparsity(self, r: int) -> float:
        return 1.0 - self.keep_per_round ** r if r < self.rounds else 1.0 - self.density

    @torch.no_grad()
    def _event(self, step: int) -> None:
        if step == self.rewind_step:
            self.snapshot = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            if self.rewind_optimizer:
                self.optimizer_snapshot = copy.deepcopy(self.optimizer.state_dict())
        if step > 0 and step % self.round_steps == 0 and step // self.round_steps <= self.rounds:
            self._prune_and_rewind(self.round_sparsity(step // self.round_steps))

    def _prune_and_rewind(self, sparsity: float) -> None:
        h = self.holder
        h.select_all(h.kept_magnitudes(), sparsity, self.scope)
        self.model.load_state_dict(self.snapshot)
        if self.rewind_optimizer:
            self.optimizer.load_state_dict(copy.deepcopy(self.optimizer_snapshot))
        for n, m in h.masks.items():
            h._zero_state(n, ~m)
        h.apply()
        if self.on_rewind is not None:
            self.on_rewind(self)

    def next_event(self):
        s = self.step_count
        if s < self.rewind_step:
            return {"step": self.rewind_step, "event": "snapshot"}
        nxt = (s // self.round_steps + 1) * self.round_steps
        if nxt // self.round_steps > self.rounds:
            return None
        return {"step": nxt, "event": "prune-rewind",
                "sparsity": self.round_sparsity(nxt // self.round_steps)}

    def _extra_state(self):
        out = {}
        if self.snapshot is not None:
            out.update({f"snapshot.{k}": v for k, v in self.snapshot.items()})
        if self.optimizer_snapshot is not None:
            out.update(optimizer_state("optimizer_snapshot", self.optimizer_snapshot))
        return out

    def _load_extra_state(self, state):
        snap = {k[len("snapshot."):]: v for k, v in state.items() if k.startswith("snapshot.")}
        self.snapshot = snap or None
        self.optimizer_snapshot = load_optimizer_state("optimizer_snapshot", state)
        if (self.optimizer_snapshot is None and self.rewind_step > 0
                and self.step_count >= self.rewind_step):
            # saved without it (older files): later rewinds restore the weights only
            self.rewind_optimizer = False
