"""`ChannelPrune`: what structured pruning removes and how it chooses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from prunekit.config import Config
from prunekit.errors import PruneError
from prunekit.structured.importance import CRITERIA

BUDGETS = ("channel_ratio", "flops_ratio", "params_ratio", "latency_ratio")


@dataclass(frozen=True)
class ChannelPrune(Config):
    """What to remove and how to choose it.

    Every `*_ratio` (and every `per_layer` value) is the fraction KEPT, in (0, 1]:
    flops_ratio=0.5 leaves half the FLOPs, channel_ratio=0.75 keeps three channels in four.

    Exactly one budget: `channel_ratio` (of the channels of every coupled group), or what is
    left of the original model: `flops_ratio`, `params_ratio` or `latency_ratio` (measured
    on the example inputs); with none of them and no `per_layer`, flops_ratio=0.5.
    `per_layer` maps layer name globs to the fraction kept of the groups they produce
    (groups no glob matches keep channel_ratio, or everything). `min_channels` channels stay
    in every group; the number kept is rounded up to a multiple of `round_to` (8 or 16 suit
    fast kernels). `ignore` lists module names (globs) left whole. `include_reduced` also
    prunes channels that a norm or reduction mixes (transformer residual streams): the
    result is then close to, not equal to, the masked model. `importance` names a criterion
    of `prunekit.structured.CRITERIA`; `global_ranking` ranks all groups against one
    threshold instead of the same fraction each. `iterative_steps` > 1 reaches the budget
    in steps (shrink's `between_steps` runs between them). `seed` feeds random criteria.
    `cut` (layer globs) narrows only the groups a matching layer produces (e.g.
    "layer*.conv1": a ResNet's inner channels, its residual stream whole).
    `allocation` "dp" gives each group its own width under a flops, params or latency
    budget: the DP over per-width sensitivities on shrink's `calib` and costs measured in
    the model (structured.widths); "uniform" cuts the same fraction everywhere.
    `reconstruct` refits the layers that read removed channels by least squares on shrink's
    `calib` inputs, bias compensation included (structured.reconstruct).
    """

    name: ClassVar[str] = "channelprune"

    channel_ratio: float | None = None
    flops_ratio: float | None = None
    params_ratio: float | None = None
    latency_ratio: float | None = None
    importance: str = "l1"
    per_layer: dict[str, float] | None = None
    min_channels: int = 1
    round_to: int = 1
    ignore: tuple[str, ...] = ()
    iterative_steps: int = 1
    global_ranking: bool = False
    include_reduced: bool = False
    seed: int = 0
    reconstruct: bool = False
    cut: tuple[str, ...] = ("*",)
    allocation: Literal["uniform", "dp"] = "uniform"

    def check(self) -> None:
        given = [k for k in BUDGETS if getattr(self, k) is not None]
        if len(given) > 1:
            raise PruneError(f"ChannelPrune takes one budget, not {', '.join(given)}")
        if not given and not self.per_layer:
            object.__setattr__(self, "flops_ratio", 0.5)  # the documented default
            given = ["flops_ratio"]
        for k in given:
            v = getattr(self, k)
            if not 0 < v <= 1:
                raise PruneError(f"ChannelPrune.{k}={v} must be in (0, 1]: it is the fraction "
                                 f"kept (1 keeps everything; 0 would keep nothing)")
        for pat, v in (self.per_layer or {}).items():
            if not 0 < v <= 1:
                raise PruneError(f"ChannelPrune.per_layer[{pat!r}]={v} must be in (0, 1]: it "
                                 f"is the fraction of the group's channels kept")
        if self.importance not in CRITERIA:
            raise PruneError(f"ChannelPrune.importance: {CRITERIA.unknown(self.importance)}")
        if self.allocation == "dp" and (self.budget is None or self.iterative_steps > 1):
            raise PruneError("ChannelPrune(allocation='dp') chooses widths once for a "
                             "flops_ratio, params_ratio or latency_ratio budget; give one, "
                             "with iterative_steps=1")
        for k in ("min_channels", "round_to", "iterative_steps"):
            if getattr(self, k) < 1:
                raise PruneError(f"ChannelPrune.{k} must be at least 1, got {getattr(self, k)}")

    @property
    def budget(self) -> str | None:
        """Which measured budget this config sets ("flops", "params", "latency"), or None
        for channel fractions (channel_ratio / per_layer)."""
        for k in ("flops", "params", "latency"):
            if getattr(self, f"{k}_ratio") is not None:
                return k
        return None
