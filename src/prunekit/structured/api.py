"""`shrink(model, ChannelPrune(...), example_inputs, calib)`: structured pruning that returns a
smaller dense model, and the save / load of such models.

One step of shrink: trace the graph (structured.tracer), verify it (structured.verify),
score the classes (structured.importance), plan what to remove for the budget
(structured.plan), cut it out of a copy (structured.remove) and check that the copy runs.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from prunekit.batches import run_batch
from prunekit.errors import PruneError
from prunekit.io import read_weights, save_weights
from prunekit.structured.config import ChannelPrune
from prunekit.structured.graph import DependencyGraph, tensor_aliases
from prunekit.structured.importance import score
from prunekit.structured.measure import (
    copy_modes,
    count_flops,
    count_params,
    measure_latency,
    modes_restored,
)
from prunekit.structured.plan import Probe, plan, removed_fraction, search
from prunekit.structured.reconstruct import reconstruct
from prunekit.structured.remove import (
    SHAPE_ATTRS,
    copy_model,
    module_shape_attrs,
    recompute_hook_weights,
    remove_slices,
)
from prunekit.structured.tracer import build_graph
from prunekit.structured.verify import verify_graph
from prunekit.structured.widths import dp_classes


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
    tied: list[list[str]] = field(default_factory=list)  # one tensor under these names, cut

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
        lines += [f"tied    {' = '.join(names)} (one tensor, cut together)"
                  for names in self.tied]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _validate(model: nn.Module, example_inputs) -> None:
    try:
        with torch.no_grad(), modes_restored(model):
            run_batch(model.eval(), example_inputs)
    except Exception as e:
        raise PruneError(f"the shrunk model does not run ({type(e).__name__}: {e}); a module "
                         f"hard-codes a size the graph could not see: pass it in ignore=...") \
            from e


def shrink(model: nn.Module, config: ChannelPrune, example_inputs, calib=None,
           loss_fn: Callable | None = None,
           between_steps: Callable[[nn.Module, int], nn.Module | None] | None = None,
           report_latency: bool = True, graph: DependencyGraph | None = None,
           scores: dict[int, float] | None = None) -> tuple[nn.Module, ShrinkReport]:
    """Return (smaller model, report). The input model is never modified, and the smaller
    model has its modules' train/eval modes.

    example_inputs: a tensor, a tuple of positional arguments or a dict of keyword arguments
    that the model runs on (traced, verified, and measured). calib: batches for the gradient
    criteria (CRITERIA entries with needs="gradients"); loss_fn(model, batch) -> loss
    overrides the default loss. between_steps(model, step) is called after every iterative
    step but the last, e.g. to fine-tune; it may return a new model. report_latency: time
    the model before and after for the report (a latency budget is timed regardless).
    graph: a graph build_graph(model, example_inputs, config.ignore) already made (e.g. to
    inspect the groups first), used for the first step instead of tracing again (it is
    verified here unless verify_graph has checked it already). scores: your own criterion,
    {class id: importance} for every class of that graph (higher is kept); it replaces
    config.importance and needs graph= and iterative_steps=1."""
    prebuilt = graph
    if not isinstance(config, ChannelPrune):
        raise PruneError(f"config must be a ChannelPrune, got {type(config).__name__}")
    custom = scores is not None
    if custom:
        _check_scores(scores, graph, config)
    if config.allocation == "dp" and not calib:
        raise PruneError("ChannelPrune(allocation='dp') weighs each width by the loss on "
                         "calibration batches: pass calib=[batch, ...] to shrink")
    if config.reconstruct and not calib:
        raise PruneError("ChannelPrune(reconstruct=True) refits the layers after the cut on "
                         "calibration inputs: pass calib=[batch, ...] to shrink")
    warn: list[str] = []  # warned at the end
    notes: list[str] = []  # in the report only: already warned where they arose
    base_params = count_params(model)
    base_flops = count_flops(model, example_inputs)
    lat0 = measure_latency(model, example_inputs) if report_latency else 0.0
    what = config.budget
    goal = {"flops": config.flops_ratio, "params": config.params_ratio,
            "latency": config.latency_ratio}.get(what)
    base_metric = {"flops": base_flops, "params": base_params, "latency": lat0}.get(what)
    if what == "latency" and not base_metric:
        base_metric = measure_latency(model, example_inputs)
    current = model
    group_log: list[dict] = []
    tied: list[list[str]] = []
    steps = config.iterative_steps
    for step in range(1, steps + 1):
        graph = prebuilt if step == 1 and prebuilt is not None else build_graph(
            current, example_inputs, config.ignore)
        verify_graph(current, graph, example_inputs, reduced=config.include_reduced)
        if graph.data_reads and step == 1:
            notes.append(f"the forward reads values computed from its inputs "
                         f"({', '.join(graph.data_reads[:3])}): only the paths the example "
                         f"inputs (and perturbed ones) take were traced")
        if not graph.groups:
            raise PruneError(f"{type(model).__name__} has no channel that can be removed "
                             f"(all are tied to the output, an ignored module or an opaque op)")
        if scores is None or step > 1:
            scores = score(current, graph, config.importance, calib, loss_fn, config.seed + step)
        if what is None:  # linear schedule in channels of the original model
            if step == 1:
                original = {g.key: len(g.classes) for g in graph.groups}
            chosen = plan(graph, scores, removed_fraction(config.channel_ratio), config, warn,
                          original, step / steps)
        else:
            target = base_metric * (1 - (1 - goal) * step / steps)
            known = {"flops": base_flops, "params": base_params}.get(what) if step == 1 else None
            if config.allocation == "dp":
                chosen, _ = dp_classes(current, graph, scores, example_inputs, config, calib,
                                       loss_fn)
            else:
                probe = Probe(current, example_inputs, what, known)
                chosen = search(probe, graph, scores, config, target, warn)
                del probe
        new = remove_slices(current, chosen)
        if config.reconstruct:
            reconstruct(current, new, chosen, calib)
        _validate(new, example_inputs)
        group_log = _group_log(graph, chosen)
        cut = {p for c in chosen for p, _, _ in c.slices}
        tied += [names for names in graph.tied if names[0] in cut and names not in tied]
        current = new
        if step < steps and between_steps is not None:
            current = between_steps(current, step) or current
    copy_modes(model, current)
    report = ShrinkReport(
        params_before=base_params, params_after=count_params(current),
        flops_before=base_flops, flops_after=count_flops(current, example_inputs),
        latency_ms_before=lat0,
        latency_ms_after=measure_latency(current, example_inputs) if report_latency else 0.0,
        groups=group_log, warnings=warn + notes, tied=tied,
        config={**config.options(), **({"importance": "custom scores"} if custom else {})})
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


def save_shrunk(model: nn.Module, path, extra: dict | None = None):
    """Weights (safetensors) plus, in its metadata, the JSON description of the new shapes
    (tensor shapes and module shape attributes) that `load_shrunk` needs, and of the layers
    factorized into low-rank pairs (prunekit.lowrank), which load_shrunk rebuilds first."""
    from prunekit.lowrank.modules import describe

    desc = {"format": "prunekit-shrunk-1",
            "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
            "attrs": module_shape_attrs(model)}
    factorized = describe(model)
    if factorized:
        desc["factorized"] = factorized
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
    recompute_hook_weights(base_model)  # deepcopy refuses the old weight norm's computed w
    model = base_model if inplace else copy_model(base_model)
    if desc.get("factorized"):
        from prunekit.lowrank.modules import rebuild

        rebuild(model, desc["factorized"], where=str(path))
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
    # tied tensors (one object, or one storage under several objects) stay tied: the file
    # holds them once, under the first name
    tie = {a: names[0] for names in tensor_aliases(model).tied for a in names}
    replaced: dict[int, torch.Tensor] = {}
    made: dict[str, torch.Tensor] = {}
    for key, shape in desc["shapes"].items():
        if key not in own:
            raise PruneError(f"{path}: tensor {key} is not in {type(model).__name__}")
        m, k, p = own[key]
        if list(p.shape) == shape:
            continue
        if id(p) not in replaced:
            first = made.get(tie.get(key, key))
            new = first.detach() if first is not None and list(first.shape) == shape else \
                torch.empty(shape, dtype=p.dtype, device=p.device)
            replaced[id(p)] = nn.Parameter(new, requires_grad=p.requires_grad) \
                if k in m._parameters else new
        made[key] = replaced[id(p)]
        (m._parameters if k in m._parameters else m._buffers)[k] = replaced[id(p)]
    for m in mods.values():  # tied aliases of a replaced tensor
        for k, p in list(m._parameters.items()):
            if p is not None and id(p) in replaced:
                m._parameters[k] = replaced[id(p)]
    state = model.state_dict()
    missing = [k for k in state if k not in tensors and tie.get(k, k) not in tensors]
    if missing:
        raise PruneError(f"{path} has no tensor {', '.join(missing[:3])}"
                         + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
                         + "; it is incomplete or was saved from another model")
    with torch.no_grad():
        for k, t in tensors.items():
            if k not in state:
                raise PruneError(f"{path}: tensor {k} is not in the rebuilt model")
            state[k].copy_(t)
    return model
