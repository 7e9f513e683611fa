"""Soft-mask channel pruning under a cost target, after SMCP (Humble et al. 2022,
"Soft Masking for Cost-Constrained Channel Pruning").

Input channels of the chosen layers are masked in the forward only: the backward passes the
gradient straight through, so pruned channels keep training and come back when they become
important again. Importance is the first-order Taylor estimate (sum over the channel of
g * w)**2 with the dense weights, averaged over steps (EMA). Every delta_t steps between
t_start and t_end the channels are re-chosen globally by importance per unit of cost (greedy
knapsack) so the kept cost is at most the current budget, which falls from 1 to cost_target
on a cubic ramp. At t_end the masks are made hard (pruned weights zeroed and held at zero).

Cost of an input channel is what removing it saves in its own layer: weights ("params") or
multiply-accumulates ("flops", measured with example_input). The paper also couples a layer's
input channels to the producing layer's output channels; that coupling is not modelled here.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from prunekit.batches import run_batch
from prunekit.errors import PruneError
from prunekit.runtime.latency import eval_mode
from prunekit.train.base import SCHEDULES, Schedule
from prunekit.train.masks import check_density, check_positive_int, check_span


def in_channels(module: nn.Module, cols: int) -> int:
    """Input channels of a layer's (out, in) view (per group for grouped convolutions)."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if hasattr(module, "in_channels"):
        return module.in_channels // getattr(module, "groups", 1)
    return cols  # GPT-2 Conv1D: one column per input feature


@SCHEDULES.register("smcp", summary="soft-masked input channels under a cost target, "
                    "hardened at the end (Humble et al. 2022)", needs=(), patterns=(),
                    example={"cost_target": 0.5, "t_end": 6, "delta_t": 2})
class SMCP(Schedule):
    """prunekit.train.SMCP(model, optimizer, cost_target=0.5, delta_t=100, t_end=...).

    cost_target: fraction of the chosen layers' cost kept, in (0, 1]. cost: "params" or
    "flops" (needs example_input, one batch for a forward pass). ema: importance averaging.
    """

    soft_masks = True

    def __init__(self, model, optimizer, cost_target: float = 0.5, *, t_end: int,
                 t_start: int = 0, delta_t: int = 100,
                 cost: Literal["params", "flops"] = "params", example_input: Any = None,
                 ema: float = 0.9, **layers):
        if "pattern" in layers:
            raise PruneError("SMCP.pattern: SMCP prunes whole input channels; it takes no "
                             "pattern")
        self.cost_target = check_density(cost_target, "SMCP.cost_target")
        check_span(t_start, t_end, "SMCP", ("t_start", "t_end"))
        self.delta_t = check_positive_int(delta_t, "SMCP.delta_t")
        if not 0.0 <= ema < 1.0:
            raise PruneError(f"SMCP.ema must be in [0, 1), got {ema!r}")
        if cost == "flops" and example_input is None:
            raise PruneError("SMCP cost='flops' needs example_input (one input batch) to "
                             "measure each layer's output size")
        super().__init__(model, optimizer, **layers)
        self.t_start, self.t_end, self.ema = t_start, t_end, float(ema)
        h = self.holder
        self.channels, self.kernel = {}, {}
        for n, m in h.layers.items():
            cols = h.matrix_shape(n)[1]
            self.channels[n] = in_channels(m, cols)
            self.kernel[n] = cols // self.channels[n]
        self.unit_cost = self._unit_costs(cost, example_input)
        self.importance = {n: torch.zeros(c) for n, c in self.channels.items()}
        self.channel_masks = {n: torch.ones(c, dtype=torch.bool) for n, c in self.channels.items()}
        for n, w in h.weights.items():
            self.holder._hooks.append(w.register_hook(self._importance_hook(n)))

    def _unit_costs(self, cost: str, example_input) -> dict[str, float]:
        h = self.holder
        per = {n: h.matrix_shape(n)[0] * self.kernel[n] for n in h.layers}
        if cost == "params":
            return {n: float(v) for n, v in per.items()}
        positions = {}

        def hook(name):
            def fn(mod, inp, out):
                rows = h.matrix_shape(name)[0]
                positions[name] = out.numel() // (out.shape[0] * rows)
            return fn

        handles = [m.register_forward_hook(hook(n)) for n, m in h.layers.items()]
        try:  # eval mode: measuring sizes must not move BatchNorm statistics
            with torch.no_grad(), eval_mode(self.model):
                run_batch(self.model, example_input)
        except PruneError:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            raise PruneError(f"SMCP could not run example_input through the model to measure "
                             f"its layers' output sizes ({type(e).__name__}: {e}); give one "
                             f"batch the model takes") from e
        finally:
            for hd in handles:
                hd.remove()
        return {n: float(per[n] * positions.get(n, 1)) for n in h.layers}

    def _importance_hook(self, name: str):
        def hook(grad):
            h = self.holder
            gw = h.matrix(name, (grad * h.weights[name].detach()))
            per = gw.reshape(gw.shape[0], self.channels[name], self.kernel[name]).sum(dim=(0, 2))
            imp = self.importance[name]
            imp.mul_(self.ema).add_((1.0 - self.ema) * per.detach().float().cpu() ** 2)
        return hook

    def budget(self, step: int) -> float:
        """Kept cost fraction at `step`: 1 before t_start, a cubic ramp to cost_target."""
        if step <= self.t_start:
            return 1.0
        t = min(step, self.t_end)
        progress = (t - self.t_start) / (self.t_end - self.t_start)
        return self.cost_target + (1.0 - self.cost_target) * (1.0 - progress) ** 3

    def cost_fraction(self) -> float:
        """Kept cost over the chosen layers' full cost."""
        kept = sum(self.unit_cost[n] * int(m.sum()) for n, m in self.channel_masks.items())
        return kept / sum(self.unit_cost[n] * c for n, c in self.channels.items())

    def choose(self, budget: float) -> dict[str, torch.Tensor]:
        """Greedy knapsack: the most important channels per unit cost within the budget;
        every layer keeps at least its best channel."""
        names = list(self.channels)
        imp = torch.cat([self.importance[n] for n in names])
        cost = torch.cat([torch.full((self.channels[n],), self.unit_cost[n]) for n in names])
        layer = torch.cat([torch.full((self.channels[n],), i) for i, n in enumerate(names)])
        keep = torch.zeros(len(imp), dtype=torch.bool)
        offsets = torch.tensor([0] + [self.channels[n] for n in names]).cumsum(0)[:-1]
        best = torch.stack([self.importance[n].argmax() for n in names]) + offsets
        keep[best] = True
        spent = float(cost[best].sum())
        limit = budget * float(cost.sum()) + 1e-9
        for i in torch.argsort(imp / cost, descending=True, stable=True).tolist():
            if not keep[i] and spent + float(cost[i]) <= limit:
                keep[i] = True
                spent += float(cost[i])
        return {n: keep[layer == i] for i, n in enumerate(names)}

    def _install(self, channel_masks: dict[str, torch.Tensor]) -> None:
        h = self.holder
        for n, cm in channel_masks.items():
            self.channel_masks[n] = cm
            rows = h.matrix_shape(n)[0]
            m2 = cm.repeat_interleave(self.kernel[n]).to(h.masks[n].device)
            h.set_mask(n, m2.expand(rows, -1))

    @torch.no_grad()
    def _event(self, step: int) -> None:
        if not self.holder.soft or step <= self.t_start:
            return
        if (step - self.t_start) % self.delta_t == 0 or step >= self.t_end:
            self._install(self.choose(self.budget(step)))
        if step >= self.t_end:
            self.holder.harden()

    def next_event(self):
        if not self.holder.soft:
            return None
        s = max(self.step_count, self.t_start)
        nxt = min(self.t_start + ((s - self.t_start) // self.delta_t + 1) * self.delta_t,
                  self.t_end)
        event = "harden" if nxt >= self.t_end else "reselect"
        return {"step": nxt, "event": event, "budget": self.budget(nxt)}

    def _extra_state(self):
        return {"hard": not self.holder.soft,
                **{f"importance.{n}": v.clone() for n, v in self.importance.items()}}

    def _load_extra_state(self, state):
        for n in self.importance:
            if f"importance.{n}" in state:
                self.importance[n] = state[f"importance.{n}"].float().clone()
        if state.get("hard"):
            self.holder.harden()

    def load_state_dict(self, state):
        super().load_state_dict(state)
        h = self.holder
        for n in self.channel_masks:
            m2 = h.matrix(n, h.masks[n])
            self.channel_masks[n] = m2.reshape(m2.shape[0], self.channels[n],
                                               self.kernel[n]).any(dim=2).any(dim=0).cpu()
