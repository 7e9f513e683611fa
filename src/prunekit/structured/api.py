"""`shrink(model, ChannelPrune(...), example_inputs, calib)`: structured pruning that returns a
smaller dense model, and the save / load of such models."""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunekit.errors import PruneError
from prunekit.io import read_weights, save_weights
from prunekit.structured.graph import DependencyGraph, build_graph, run_model
from prunekit.structured.importance import CRITERIA, score
from prunekit.structured.remove import SHAPE_ATTRS, module_shape_attrs, remove_slices


@dataclass
class ChannelPrune:
    """What to remove and how to choose it.

    Exactly one budget: `ratio` (fraction of the channels of every coupled group to remove),
    or a target left after pruning as a fraction of the original: `flops_ratio`,
    `params_ratio` or `latency_ratio` (measured on example_inputs). `per_layer` maps layer
    name globs to removal fractions for the groups they produce (overrides `ratio`).
    `min_channels` channels stay in every group; the number kept is rounded up to a
    multiple of `round_to` (8 or 16 suit fast kernels). `ignore` lists module names (globs)
    left whole. `include_reduced` also prunes channels that a norm or reduction mixes
    (transformer residual streams): the result is then close to, not equal to, the masked
    model. `iterative_steps` > 1 reaches the budget in steps, calling `between_steps`.
    """

    ratio: float | None = None
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

    def __post_init__(self):
        targets = {k: getattr(self, k) for k in ("ratio", "flops_ratio", "params_ratio",
                                                 "latency_ratio") if getattr(self, k) is not None}
        if not targets and not self.per_layer:
            self.flops_ratio = 0.5
            targets = {"flops_ratio": 0.5}
        if len(targets) > 1:
            raise PruneError(f"give one budget, not {', '.join(targets)}")
        for k, v in targets.items():
            if k == "ratio" and not 0 <= v < 1:
                raise PruneError(f"ratio={v} must be in [0, 1): it is the fraction of channels "
                                 f"removed, and 1 would remove every channel")
            if k != "ratio" and not 0 < v <= 1:
                raise PruneError(f"{k}={v} must be in (0, 1]: it is what is left after "
                                 f"pruning as a fraction of the original")
        for pat, v in (self.per_layer or {}).items():
            if not 0 <= v < 1:
                raise PruneError(f"per_layer[{pat!r}]={v} must be in [0, 1)")
        if self.importance not in CRITERIA:
            raise PruneError(f"unknown importance {self.importance!r}; choose from "
                             f"{', '.join(CRITERIA)}")
        if self.min_channels < 1 or self.round_to < 1 or self.iterative_steps < 1:
            raise PruneError("min_channels, round_to and iterative_steps must be at least 1")
        if isinstance(self.ignore, str):
            self.ignore = (self.ignore,)
        self.ignore = tuple(self.ignore)


@dataclass
class ShrinkReport:
    """Sizes and speed before and after, and what each group lost."""

    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    latency_ms_before: float
    latency_ms_after: float
    groups: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    @property
    def flops_ratio(self) -> float:
        return self.flops_after / max(self.flops_before, 1)

    @property
    def params_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)

    @property
    def speedup(self) -> float:
        return self.latency_ms_before / max(self.latency_ms_after, 1e-9)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(flops_ratio=self.flops_ratio, params_ratio=self.params_ratio,
                 speedup=self.speedup)
        return d

    def __str__(self) -> str:
        lines = [f"params  {self.params_before:,} -> {self.params_after:,} "
                 f"({self.params_ratio:.3f}x)",
                 f"FLOPs   {self.flops_before:,} -> {self.flops_after:,} "
                 f"({self.flops_ratio:.3f}x)",
                 f"latency {self.latency_ms_before:.2f} ms -> {self.latency_ms_after:.2f} ms "
                 f"({self.speedup:.2f}x faster)",
                 f"groups  {sum(1 for g in self.groups if g['removed'])} of "
                 f"{len(self.groups)} shrunk"]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, example_inputs) -> int:
    """FLOPs of one forward pass on example_inputs (torch's counter: 2 per multiply-add)."""
    was = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            run_model(model, example_inputs)
    finally:
        model.train(was)
    return int(counter.get_total_flops())


@torch.inference_mode()
def measure_latency(model: nn.Module, example_inputs, repeats: int = 10,
                    warmup: int = 2) -> float:
    """Median wall time of a forward pass in milliseconds."""
    was = model.training
    model.eval()
    try:
        for _ in range(warmup):
            run_model(model, example_inputs)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            run_model(model, example_inputs)
            times.append(time.perf_counter() - t)
    finally:
        model.train(was)
    return 1000 * statistics.median(times)


def _units_per_class(c, g) -> int:
    """Channels a class removes from the group's first producing dim (heads remove many)."""
    p, d = next(((p, d) for p, d in g.key if d == 0), g.key[0])
    return max(1, c.size(p, d))


def _plan(graph: DependencyGraph, scores: dict[int, float], fraction: float,
          cfg: ChannelPrune, warn: list[str], original: dict | None = None,
          done: float = 1.0) -> list:
    """Classes to remove: `fraction` of each group (or per_layer), lowest scores first;
    with global_ranking, one threshold over group-normalised scores.

    Iterative ratio budgets pass `original` (group key -> class count before the first step)
    and `done` (share of the schedule finished after this step): a group (or, with
    global_ranking, the whole pool) then keeps n0 - floor(fraction * done * n0) of its n0
    original classes, so the last step lands exactly on the one-shot count whatever the
    rounding of the earlier steps."""
    groups = [g for g in graph.groups if cfg.include_reduced or not g.reduced]
    chosen = []

    def to_remove(fraction: float, n: int, n0: int | None) -> int:
        """Of n classes left now (n0 originally), how many this step removes."""
        if n0 is None:
            return int(math.floor(fraction * n + 1e-9))
        return max(0, n - (n0 - int(math.floor(fraction * done * n0 + 1e-9))))

    if cfg.global_ranking and not cfg.per_layer:
        pool = []
        for gi, g in enumerate(groups):
            vals = [scores[c.id] for c in g.classes]
            mean = sum(abs(v) for v in vals) / len(vals) or 1.0
            pool += [(scores[c.id] / mean, gi, c) for c in g.classes]
        pool.sort(key=lambda t: t[0])
        quota = {gi: _max_remove(g, cfg, 0.95) for gi, g in enumerate(groups)}
        n0 = None if original is None else sum(original.get(g.key, len(g.classes))
                                                for g in groups)
        n_target = to_remove(fraction, len(pool), n0)
        taken = {gi: 0 for gi in quota}
        for _, gi, c in pool:
            if len(chosen) >= n_target:
                break
            if taken[gi] < quota[gi]:
                chosen.append(c)
                taken[gi] += 1
        return _round_groups(groups, chosen, scores, cfg)
    for g in groups:
        frac = fraction
        if cfg.per_layer:
            frac = cfg.ratio or 0.0
            for pat, v in cfg.per_layer.items():
                if any(fnmatch.fnmatchcase(p.rsplit(".", 1)[0], pat) for p, d in g.key
                       if d == 0):
                    frac = v
        n = len(g.classes)
        k = to_remove(frac, n, None if original is None else original.get(g.key, n))
        limit = _max_remove(g, cfg, 1.0)
        if k > limit:
            if frac * n >= n:
                warn.append(f"group {g.name}: removing {frac:.0%} would leave no channel; "
                            f"clamped to keep {n - limit}")
            k = limit
        order = sorted(g.classes, key=lambda c: scores[c.id])
        chosen += order[:k]
    return _round_groups(groups, chosen, scores, cfg)


def _max_remove(g, cfg: ChannelPrune, cap: float) -> int:
    n = len(g.classes)
    per = _units_per_class(g.classes[0], g)
    keep_min = max(1, math.ceil(cfg.min_channels / per))
    return max(0, min(n - keep_min, int(cap * n)))


def _round_groups(groups, chosen, scores, cfg: ChannelPrune):
    """Keep counts rounded up to multiples of round_to (single-channel classes only)."""
    if cfg.round_to == 1:
        return chosen
    ids = {id(c) for c in chosen}
    out = []
    for g in groups:
        rm = sorted([c for c in g.classes if id(c) in ids], key=lambda c: -scores[c.id])
        if _units_per_class(g.classes[0], g) == 1:
            keep = len(g.classes) - len(rm)
            target = min(len(g.classes), math.ceil(keep / cfg.round_to) * cfg.round_to)
            rm = rm[target - keep:] if target > keep else rm
        out += rm
    return out


def _measure(model, example_inputs, what: str) -> float:
    if what == "flops":
        return float(count_flops(model, example_inputs))
    if what == "params":
        return float(count_params(model))
    return measure_latency(model, example_inputs, repeats=5, warmup=1)


def _validate(model: nn.Module, example_inputs) -> None:
    try:
        with torch.no_grad():
            run_model(model.eval(), example_inputs)
    except Exception as e:
        raise PruneError(f"the shrunk model does not run ({type(e).__name__}: {e}); a module "
                         f"hard-codes a size the graph could not see: pass it in ignore=...") \
            from e


def shrink(model: nn.Module, config: ChannelPrune, example_inputs, calib=None,
           loss_fn: Callable | None = None,
           between_steps: Callable[[nn.Module, int], nn.Module | None] | None = None,
           measure_latency_: bool = True, graph: DependencyGraph | None = None,
           scores: dict[int, float] | None = None) -> tuple[nn.Module, ShrinkReport]:
    """Return (smaller model, report). The input model is never modified.

    calib: batches for taylor / sosp importance (tensors, (inputs, targets) or dicts);
    loss_fn(model, batch) -> loss overrides the default loss. between_steps(model, step) is
    called after every iterative step but the last, e.g. to fine-tune; it may return a new
    model. graph: the graph build_graph(model, example_inputs, config.ignore) already made
    (e.g. to inspect the groups first), reused for the first step instead of tracing again.
    scores: your own criterion, {class id: importance} for every class of that graph (higher
    is kept); it replaces config.importance and needs graph= and iterative_steps=1."""
    prebuilt = graph
    if not isinstance(config, ChannelPrune):
        raise PruneError(f"config must be a ChannelPrune, got {type(config).__name__}")
    custom = scores is not None
    if custom:
        _check_scores(scores, graph, config)
    warn: list[str] = []
    was_training = model.training
    base_params = count_params(model)
    base_flops = count_flops(model, example_inputs)
    lat0 = measure_latency(model, example_inputs) if measure_latency_ else 0.0
    what = ("flops" if config.flops_ratio is not None else "params"
            if config.params_ratio is not None else "latency"
            if config.latency_ratio is not None else None)
    goal = {"flops": config.flops_ratio, "params": config.params_ratio,
            "latency": config.latency_ratio}.get(what)
    base_metric = {"flops": base_flops, "params": base_params, "latency": lat0}.get(what)
    if what == "latency" and not base_metric:
        base_metric = measure_latency(model, example_inputs)
    current = model
    group_log: list[dict] = []
    steps = config.iterative_steps
    for step in range(1, steps + 1):
        graph = prebuilt if step == 1 and prebuilt is not None else build_graph(
            current, example_inputs, config.ignore,
            verify="all" if config.include_reduced else True)
        if not graph.groups:
            raise PruneError(f"{type(model).__name__} has no channel that can be removed "
                             f"(all are tied to the output, an ignored module or an opaque op)")
        if scores is None or step > 1:
            scores = score(current, graph, config.importance, calib, loss_fn, config.seed + step)
        if what is None:  # linear schedule in channels of the original model
            if step == 1:
                original = {g.key: len(g.classes) for g in graph.groups}
            chosen = _plan(graph, scores, config.ratio or 0.0, config, warn, original,
                           step / steps)
        else:
            target = base_metric * (1 - (1 - goal) * step / steps)
            chosen = _search(current, graph, scores, config, example_inputs, what, target, warn)
        new = remove_slices(current, chosen)
        _validate(new, example_inputs)
        group_log = _group_log(graph, chosen)
        current = new
        if step < steps and between_steps is not None:
            current = between_steps(current, step) or current
    current.train(was_training)
    report = ShrinkReport(
        params_before=base_params, params_after=count_params(current),
        flops_before=base_flops, flops_after=count_flops(current, example_inputs),
        latency_ms_before=lat0,
        latency_ms_after=measure_latency(current, example_inputs) if measure_latency_ else 0.0,
        groups=group_log, warnings=warn,
        config={**asdict(config), **({"importance": "custom scores"} if custom else {})})
    for w in warn:
        warnings.warn(w, stacklevel=2)
    return current, report


def _check_scores(scores, graph, config: ChannelPrune) -> None:
    if graph is None or config.iterative_steps != 1:
        raise PruneError("scores= are per class of one graph: pass the graph they score "
                         "(graph=build_graph(model, example_inputs)) and iterative_steps=1")
    missing = [c.id for g in graph.groups for c in g.classes if c.id not in scores]
    if missing:
        raise PruneError(f"scores= has no importance for {len(missing)} channel classes of "
                         f"the graph (ids {missing[:5]}...): score every class of "
                         f"graph.groups")


def _group_log(graph: DependencyGraph, chosen) -> list[dict]:
    ids = {id(c) for c in chosen}
    return [{"group": g.name, "units": len(g.classes),
             "removed": sum(1 for c in g.classes if id(c) in ids), "reduced": g.reduced}
            for g in graph.groups]


def _search(model, graph, scores, cfg, example_inputs, what, target, warn):
    """Smallest uniform fraction whose shrunk model meets `target` (bisection)."""
    limit = target * (1 + 1e-9)  # a target given as a ratio of the base may round just below
    lo, hi = 0.0, 0.95
    best = _plan(graph, scores, hi, cfg, [])
    least = _measure(remove_slices(model, best), example_inputs, what)
    if least > limit:
        warn.append(f"{what} target not reached: the most that can be removed leaves "
                    f"{least:.4g} > {target:.4g}")
        return best
    for _ in range(12):
        mid = (lo + hi) / 2
        plan = _plan(graph, scores, mid, cfg, [])
        if _measure(remove_slices(model, plan), example_inputs, what) <= limit:
            hi, best = mid, plan
        else:
            lo = mid
        if hi - lo < 2e-3:
            break
    return best


def save_shrunk(model: nn.Module, path, extra: dict | None = None):
    """Weights (safetensors) plus, in its metadata, the JSON description of the new shapes
    (tensor shapes and module shape attributes) that `load_shrunk` needs."""
    desc = {"format": "prunekit-shrunk-1",
            "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
            "attrs": module_shape_attrs(model)}
    if extra:
        desc["extra"] = extra
    return save_weights(model, path, metadata={"prunekit_shrunk": json.dumps(desc)})


def read_description(path) -> dict:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise PruneError(f"{path} is not a readable safetensors file: {e}") from e
    if "prunekit_shrunk" not in meta:
        raise PruneError(f"{path} has no shape description; it was not written by "
                         f"save_shrunk (load plain weights with prunekit.io.load_weights)")
    return json.loads(meta["prunekit_shrunk"])


def load_shrunk(base_model: nn.Module, path, inplace: bool = False) -> nn.Module:
    """Rebuild a shrunk model from a freshly constructed original and a save_shrunk file."""
    desc = read_description(path)
    model = base_model if inplace else copy.deepcopy(base_model)
    mods = dict(model.named_modules())
    for name, attrs in desc["attrs"].items():
        m = mods.get(name)
        if m is None:
            raise PruneError(f"{path}: module {name!r} is not in {type(model).__name__}; "
                             f"was it saved from another architecture?")
        for k, v in attrs.items():
            if k in SHAPE_ATTRS:
                setattr(m, k, tuple(v) if isinstance(v, list) else v)
    tensors = read_weights(path)
    own = {}
    for mname, m in mods.items():
        for k, p in list(m._parameters.items()) + list(m._buffers.items()):
            if p is not None:
                own[f"{mname}.{k}" if mname else k] = (m, k, p)
    replaced: dict[int, torch.Tensor] = {}
    for key, shape in desc["shapes"].items():
        if key not in own:
            raise PruneError(f"{path}: tensor {key} is not in {type(model).__name__}")
        m, k, p = own[key]
        if list(p.shape) == shape:
            continue
        if id(p) in replaced:
            new = replaced[id(p)]
        else:
            new = torch.empty(shape, dtype=p.dtype, device=p.device)
            new = nn.Parameter(new, requires_grad=p.requires_grad) if k in m._parameters \
                else new
            replaced[id(p)] = new
        (m._parameters if k in m._parameters else m._buffers)[k] = new
    for m in mods.values():  # tied aliases of a replaced tensor
        for k, p in list(m._parameters.items()):
            if p is not None and id(p) in replaced:
                m._parameters[k] = replaced[id(p)]
    state = model.state_dict()
    with torch.no_grad():
        for k, t in tensors.items():
            if k not in state:
                raise PruneError(f"{path}: tensor {k} is not in the rebuilt model")
            state[k].copy_(t)
    return model
