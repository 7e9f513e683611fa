"""The one-shot engine: every post-training transform (pruning, quantization, low rank) is
one config run through `run`.

    select layers -> check them (before any work) -> calibrate, all at once or block by block
    -> per layer: config.transform(W, H) -> LayerResult -> config.apply -> LayerReport
    on any error (Ctrl-C included): every layer as it was

A config is a frozen `Transform`. It says what it needs (`needs`: nothing, the input Hessian
H = X^T X, or gradients of a loss) and how to change one (out, in) weight matrix given H:
`transform(w, hessian, layer, plan)` returns a `LayerResult` holding the new weight and,
as the family requires, a keep-mask, a quantization grid or low-rank factors. `apply` puts
the result into the model (by default: write the weight; low rank replaces the module).
`plan(layers, stats)` lets a config decide across layers first (a global threshold).
A per-layer budget ({layer: level}) runs each layer at its own level (`at_level`).

New families and methods plug in here as one file each; the loop does not change.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from prunekit.batches import as_batches, micro_batches
from prunekit.config import Config
from prunekit.errors import PruneError, all_finite
from prunekit.layers import (
    check_writable,
    find_layers,
    groups_of,
    restored_on_error,
    set_weight_matrix,
    shared_weights,
    weight_matrix,
)
from prunekit.oneshot.calibrate import Blockwise, LayerStats, collect_stats
from prunekit.progress import Progress
from prunekit.registry import Registry

#: Every one-shot method of every family (pruning, quantization, low rank), by name.
METHODS = Registry("method", packages=("prunekit.oneshot.methods", "prunekit.quant.methods",
                                      "prunekit.lowrank.methods"))


@dataclass
class LayerResult:
    """What a transform made of one (out, in) weight matrix.

    weight: the matrix the layer computes with afterwards (for factors: their product).
    keep: keep-mask, True where a weight is kept (pruning); None when nothing was removed.
    quant: the quantized form (codes, scales, zero points and grid) the weight dequantizes
        from; None when not quantized.
    factors: (U (out, r), V (r, in)) with weight = U @ V (low rank); None otherwise.
    note: set when the layer was left as it was, saying why.
    """

    weight: torch.Tensor
    keep: torch.Tensor | None = None
    quant: Any = None
    factors: tuple[torch.Tensor, torch.Tensor] | None = None
    note: str | None = None
    detail: dict = field(default_factory=dict)

    @staticmethod
    def cat(parts: Sequence[LayerResult]) -> LayerResult:
        """One result from the results of a grouped layer's groups (stacked along rows)."""
        if len(parts) == 1:
            return parts[0]
        if any(p.factors is not None or p.quant is not None for p in parts):
            raise PruneError("factors and quantized forms are per whole layer; a grouped "
                             "convolution's groups cannot be combined")
        keep = None
        if any(p.keep is not None for p in parts):
            keep = torch.cat([p.keep if p.keep is not None
                              else torch.ones_like(p.weight, dtype=torch.bool) for p in parts])
        return LayerResult(torch.cat([p.weight for p in parts]), keep,
                           note=next((p.note for p in parts if p.note), None),
                           detail=parts[0].detail)


@dataclass(frozen=True, kw_only=True)
class Transform(Config):
    """Options every one-shot config shares: which layers, and how to calibrate.

    include / exclude: name globs choosing the layers; keep_first / keep_last keep the first /
        last prunable layer of the model as it is.
    sequential: calibrate block by block (blocks: names or globs, default the longest
        ModuleList), so block k+1 is calibrated on the outputs of block k already transformed.
    tied: a layer whose weight is shared with another module (an output head tied to the
        input embedding) is left as it is ("skip", the default: the report says so), or
        transformed once with every holder seeing the change ("change").
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    keep_first: bool = False
    keep_last: bool = False
    sequential: bool = False
    blocks: tuple[str, ...] | None = None
    tied: Literal["skip", "change"] = "skip"

    #: "none": the weights alone; "hessian": calibration inputs (H = X^T X per layer);
    #: "gradients": gradients of a loss (run_global does the work).
    needs: ClassVar[str] = "none"
    #: with needs == "hessian": "diagonal" when the method reads only diag(H) (the input
    #: feature norms): calibration then gathers d sums of squares per layer, not d x d
    #: (and the report has no output error); "full" otherwise.
    statistic: ClassVar[str] = "full"
    #: "prune", "quantize" or "lowrank": what the method does to a layer.
    family: ClassVar[str] = "prune"
    #: the field a per-layer budget sets ("sparsity", "bits", ...), None if budgets do not apply
    level_field: ClassVar[str | None] = None
    #: the method's name (registry key and report label)
    name: ClassVar[str] = ""

    @property
    def method(self) -> str:
        return self.name

    # -- per layer ---------------------------------------------------------------------

    def check_layer(self, name: str, module: nn.Module) -> None:
        """Refuse a layer this config cannot handle, before any work, naming it."""

    def transform(self, w: torch.Tensor, hessian: torch.Tensor | None, layer: str,
                  plan: torch.Tensor | None = None) -> LayerResult:
        """One (out, in) float32 matrix (one group of a grouped convolution) and its (in, in)
        float64 H (None without calibration) -> LayerResult. `plan` is this group's slice of
        what `plan()` decided for the layer."""
        raise NotImplementedError

    def plan(self, layers: Mapping[str, nn.Module],
             stats: Mapping[str, LayerStats]) -> dict[str, torch.Tensor]:
        """Decisions across the layers of one stage (e.g. one global threshold), by layer."""
        return {}

    def apply(self, name: str, module: nn.Module, result: LayerResult,
              model: nn.Module) -> Callable[[], None] | None:
        """Put `result` into the model; return a function that undoes what restoring the
        weight alone would not (a replaced module, an added buffer), or None."""
        set_weight_matrix(module, result.weight)
        return None

    # -- budgets -----------------------------------------------------------------------

    def at_level(self, level) -> Transform:
        """This config with one layer's budgeted level (validated like any config)."""
        if self.level_field is None:
            raise PruneError(f"{self.name} takes no per-layer budget")
        return dataclasses.replace(self, **{self.level_field: level})

    def skips_level(self, level) -> bool:
        """True when a layer at this level is left as it is (sparsity 0, 16 bits)."""
        return False

    # -- reports -----------------------------------------------------------------------

    def target(self) -> dict:
        """What the config aims at, for reports (e.g. pattern and sparsity)."""
        return {}

    def run_global(self, model: nn.Module, layers: dict[str, nn.Module], batches: list,
                   loss_fn: Callable, bar: Progress) -> None:
        """For needs == 'gradients': transform every layer in place from gradients."""
        raise NotImplementedError


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, ...]
    sparsity: float
    rel_error: float | None  # ||WX - W'X||^2 / ||WX||^2 on the calibration rows
    seconds: float
    detail: dict = field(default_factory=dict)  # bits, rank, a note: what the family adds


@dataclass
class Report:
    """What one run did: per layer, the sparsity, the relative output error on the
    calibration rows and the time; plus the method, its options and its target."""

    method: str
    target: dict
    options: dict
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it was left as is

    @property
    def pattern(self) -> str | None:
        return self.target.get("pattern")

    @property
    def target_sparsity(self) -> float | None:
        return self.target.get("target_sparsity")

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all reported layers' weights."""
        total = sum(_numel(lr.shape) for lr in self.layers)
        return sum(lr.sparsity * _numel(lr.shape) for lr in self.layers) / max(total, 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(self.target)
        d["sparsity"] = self.sparsity
        return d

    def __str__(self) -> str:
        extra = sorted({k for lr in self.layers for k in lr.detail})
        head = f"{'layer':<40} {'shape':>16} {'sparsity':>9} {'rel.err':>9} {'s':>7}"
        lines = [head + "".join(f" {k:>8}" for k in extra)]
        for lr in self.layers:
            err = "-" if lr.rel_error is None else f"{lr.rel_error:.4f}"
            shape = "x".join(map(str, lr.shape))
            row = (f"{lr.name:<40} {shape:>16} {lr.sparsity:>9.3f} {err:>9} "
                   f"{lr.seconds:>7.2f}")
            lines.append(row + "".join(f" {str(lr.detail.get(k, '-')):>8}" for k in extra))
        what = " ".join(str(v) for k, v in self.target.items() if k == "pattern")
        lines += [f"{name:<40} left as it is: {why}" for name, why in self.skipped.items()]
        lines.append(f"{self.method}{' ' + what if what else ''}: {len(self.layers)} layers, "
                     f"sparsity {self.sparsity:.3f}, {self.seconds:.1f} s")
        return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# -- the steps -------------------------------------------------------------------------

def check_config(config) -> Transform:
    if not isinstance(config, Transform):
        raise PruneError(f"config must be a method config such as prunekit.SparseGPT(...), "
                         f"got {type(config).__name__}")
    return config


def select_layers(model: nn.Module, config: Transform) -> dict[str, nn.Module]:
    """The config's layers: prunable modules by name globs and keep_first / keep_last."""
    return find_layers(model, config.include, config.exclude, config.keep_first,
                       config.keep_last)


def untie(model: nn.Module, layers: dict[str, nn.Module], config: Transform
          ) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Layers whose weight another module also holds: left out (tied='skip') or kept once
    (tied='change'); returns (layers to transform, {left-out layer: why})."""
    shared = shared_weights(model)
    out, skipped, done = {}, {}, set()
    for name, module in layers.items():
        others = shared.get(f"{name}.weight", [])
        if not others:
            out[name] = module
            continue
        if config.tied == "skip":
            skipped[name] = (f"weight tied with {', '.join(others)} (tied='change' "
                             f"transforms it, and so every holder)")
        elif id(module.weight) in done:
            skipped[name] = f"weight tied with {', '.join(others)}, transformed once already"
        else:
            done.add(id(module.weight))
            out[name] = module
    if not out:
        raise PruneError(f"every chosen layer's weight is tied to another module "
                         f"({', '.join(skipped)}); pass tied='change' to transform them")
    return out, skipped


def check_layers(layers: Mapping[str, nn.Module], config: Transform,
                 configs: Mapping[str, Transform] | None = None) -> None:
    """Every layer usable before any work: finite floating weights and what the config
    itself requires (e.g. a pattern that tiles the shape)."""
    for name, module in layers.items():
        w = module.weight
        if not w.is_floating_point():
            raise PruneError(f"{name}.weight has dtype {w.dtype}; prunekit transforms floating "
                             f"point weights (load the model in float32)")
        if w.device.type == "meta":
            raise PruneError(f"{name}.weight is on the meta device (no values); load the "
                             f"weights before transforming the model")
        if w.numel() == 0:
            raise PruneError(f"{name}.weight is empty (shape {tuple(w.shape)}); exclude "
                             f"{name}")
        if not all_finite(w):
            raise PruneError(f"{name}.weight holds NaN or Inf; fix the weights before pruning")
        check_writable(name, module)
        (configs or {}).get(name, config).check_layer(name, module)


def relative_error(w: torch.Tensor, new: torch.Tensor, stats: LayerStats | None,
                   groups: int) -> float | None:
    """||(W - W')X||^2 / ||WX||^2 over the calibration rows, from H = X^T X (None without
    calibration, or from diagonal-only statistics, which do not give it)."""
    if stats is None or stats.diagonal:
        return None
    num = den = 0.0
    for g, (wg, ng) in enumerate(zip(w.chunk(groups), new.chunk(groups))):
        h = stats.hessian[g]
        dw = (wg - ng).double()
        num += float(torch.einsum("ij,jk,ik->", dw, h, dw))
        den += float(torch.einsum("ij,jk,ik->", wg.double(), h, wg.double()))
    return num / den if den > 0 else 0.0


def transform_module(name: str, module: nn.Module, config: Transform,
                     stats: LayerStats | None, plan: torch.Tensor | None = None
                     ) -> tuple[LayerResult, float | None]:
    """The config's result for one layer and its relative error; the module is unchanged."""
    if config.needs == "hessian" and stats is None:
        raise PruneError(f"{name}: {config.name} needs calibration data")
    # a contiguous copy: GPT-2's Conv1D stores (in, out), so its (out, in) view is strided
    w = weight_matrix(module).detach().float().clone(memory_format=torch.contiguous_format)
    groups = groups_of(module)
    plans = plan.chunk(groups) if plan is not None else [None] * groups
    parts = []
    for g, (wg, pg) in enumerate(zip(w.chunk(groups), plans)):
        h = stats.matrix(g) if stats is not None else None
        parts.append(config.transform(wg.clone(), h, name, pg))
    result = LayerResult.cat(parts)
    if not all_finite(result.weight):
        raise PruneError(f"{name}: {config.name} produced NaN or Inf; raise dampening")
    return result, relative_error(w, result.weight, stats, groups)


def _apply_stage(report: Report, model, layers, stats, config: Transform, configs, undo, bar,
                 stage: str) -> None:
    plan = config.plan(layers, stats)
    task = bar.add(f"{config.name}: {stage}", total=len(layers))
    for name, module in layers.items():
        start = time.perf_counter()
        cfg = configs.get(name, config)
        result, err = transform_module(name, module, cfg, stats.get(name), plan.get(name))
        shape = tuple(module.weight.shape)
        step = cfg.apply(name, module, result, model)
        if step is not None:
            undo.append(step)
        detail = dict(result.detail)
        if result.note:
            detail["note"] = result.note
        report.layers.append(LayerReport(name, shape, float((result.weight == 0).float().mean()),
                                         err, time.perf_counter() - start, detail))
        bar.advance(task)


def run(model: nn.Module, config: Transform, calib=None, *,
        budget: Mapping[str, Any] | None = None, loss_fn: Callable | None = None,
        progress: bool = True) -> Report:
    """Transform `model` in place with `config`; calib is a batch or an iterable of batches.

    budget: {layer name: level} (sparsity, bits, ...) runs each named layer at its own level
    instead of the config's; only those layers are touched. Methods that need gradients take
    loss_fn(model, batch) -> scalar loss. On any error the model is left exactly as it was.
    Calibration runs only when the method needs it or calib is given (then the report has
    each layer's output error)."""
    config = check_config(config)
    layers = select_layers(model, config)
    configs: dict[str, Transform] = {}
    if budget is not None:
        layers, configs = _budget_layers(model, layers, config, budget)
    layers, skipped = untie(model, layers, config)
    check_layers(layers, config, configs)
    batches = as_batches(calib)
    if config.needs in ("hessian", "gradients") and not batches:
        raise PruneError(f"{config.name} needs calibration data: pass calib=...")
    if config.sequential and not batches:
        raise PruneError("sequential=True needs calibration data")
    if config.needs == "gradients":
        if budget is not None or config.sequential:
            raise PruneError(f"{config.name} chooses every layer's share itself from "
                             f"gradients; it takes no budget and no sequential=True")
        if not callable(loss_fn):
            raise PruneError(f"{config.name} needs gradients: pass loss_fn=lambda model, "
                             f"batch: <scalar loss>")
    diagonal = config.needs == "hessian" and config.statistic == "diagonal"
    pieces = micro_batches(batches)  # calibration passes run token batches in pieces
    report = Report(config.name, config.target(), config.options(), skipped=skipped)
    if budget is not None:
        report.options["budget"] = dict(budget)
    start = time.perf_counter()
    with restored_on_error(model, layers) as undo, Progress(enabled=progress) as bar:
        model.eval()
        if config.needs == "gradients":
            config.run_global(model, layers, batches, loss_fn, bar)
            for n, m in layers.items():
                report.layers.append(LayerReport(n, tuple(m.weight.shape),
                                                 float((m.weight == 0).float().mean()), None,
                                                 0.0))
        elif config.sequential:
            seq = Blockwise(model, layers, pieces, config.blocks, diagonal=diagonal)
            task = bar.add(f"{config.name}: blocks", total=len(seq.blocks))
            for stage, stage_layers, stats in seq.stages(lambda b: bar.advance(task)):
                _apply_stage(report, model, stage_layers, stats, config, configs, undo, bar,
                             stage)
        else:
            stats = {}
            if batches:
                task = bar.add("calibrating", total=len(pieces))
                stats = collect_stats(model, layers, pieces, lambda: bar.advance(task),
                                      diagonal=diagonal)
            _apply_stage(report, model, layers, stats, config, configs, undo, bar, "layers")
    shared = shared_weights(model)
    for lr in report.layers:  # tied='change': say which other holders changed with it
        if shared.get(f"{lr.name}.weight"):
            lr.detail["tied"] = "+".join(shared[f"{lr.name}.weight"])
    report.seconds = time.perf_counter() - start
    return report


def _budget_layers(model, layers, config: Transform, budget: Mapping[str, Any]):
    """The budget's layers and each one's config; levels that leave a layer as it is drop
    it. Every name and level is checked before any work."""
    if not isinstance(budget, Mapping) or not budget:
        raise PruneError("the budget names no layer; give {layer_name: level}")
    if config.level_field is None:
        raise PruneError(f"{config.name} takes no per-layer budget")
    all_layers = find_layers(model)
    missing = [n for n in budget if n not in all_layers]
    if missing:
        raise PruneError(f"budget names {missing[0]!r}, which is not a prunable layer of "
                         f"{type(model).__name__}; layers are: {', '.join(list(all_layers)[:6])}"
                         f"{' ...' if len(all_layers) > 6 else ''}")
    configs = {}
    for name, level in budget.items():
        try:
            configs[name] = config.at_level(level)
        except PruneError as e:
            raise PruneError(f"budget for {name}: {e}") from None
    chosen = {n: all_layers[n] for n in budget if not config.skips_level(budget[n])}
    return chosen, {n: configs[n] for n in chosen}


@torch.no_grad()
def layer_levels(model: nn.Module, config: Transform, calib, levels: Sequence,
                 include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                 progress: bool = True) -> tuple[dict, dict]:
    """Every chosen layer transformed at every level from one calibration of the unchanged
    model (SPDY's database, a mixed-precision error table). Returns ({layer: [(out, in)
    matrix per level]}, {layer: [relative error per level]}); the model is unchanged."""
    config = check_config(config)
    if getattr(config, "scope", "layer") == "global":
        raise PruneError("a per-level database needs a per-layer method (scope='layer')")
    if config.sequential:
        raise PruneError("a per-level database calibrates the unchanged model once; "
                         "use sequential=False")
    layers = find_layers(model, include, exclude)
    configs = {lv: config.at_level(lv) for lv in levels}
    for cfg in configs.values():
        check_layers(layers, cfg)
    batches = micro_batches(as_batches(calib))
    if not batches:
        raise PruneError("a per-level database needs calibration data: pass calib=...")
    model.eval()
    weights, errors = {}, {}
    with Progress(enabled=progress) as bar:
        task = bar.add("calibrating", total=len(batches))
        stats = collect_stats(model, layers, batches, lambda: bar.advance(task))
        task = bar.add(f"database ({config.name})", total=len(layers))
        for name, module in layers.items():
            weights[name], errors[name] = [], []
            for lv in levels:
                if config.skips_level(lv):
                    weights[name].append(weight_matrix(module).detach().clone())
                    errors[name].append(0.0)
                    continue
                result, err = transform_module(name, module, configs[lv], stats.get(name))
                weights[name].append(result.weight)
                errors[name].append(float(err))
            bar.advance(task)
    return weights, errors


def transform_layer(weight: torch.Tensor, calib: torch.Tensor | None, config: Transform,
                    name: str = "layer") -> LayerResult:
    """One (out, in) weight matrix through `config`, outside any model.

    calib is input rows X (n, in), whose H = X^T X is formed here, or H itself (a square
    symmetric (in, in) tensor); it may be None for methods that need no data."""
    config = check_config(config)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise PruneError(f"{name}: takes an (out, in) matrix, got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}; use "
                         f"weight.reshape(out, -1)")
    if not weight.is_floating_point():
        raise PruneError(f"{name}: weight has dtype {weight.dtype}; give a floating matrix")
    if weight.numel() == 0:
        raise PruneError(f"{name}: weight is empty (shape {tuple(weight.shape)})")
    if not all_finite(weight):
        raise PruneError(f"{name}: weight holds NaN or Inf")
    hessian = None
    if calib is not None:
        hessian = _hessian_from(calib, weight.shape[1], name)
    elif config.needs == "hessian":
        raise PruneError(f"{config.name} needs calibration rows or a Hessian")
    w = weight.detach().float().clone()
    probe = nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=False)  # no init
    with torch.no_grad():
        probe.weight.copy_(w)
    config.check_layer(name, probe)
    stats = LayerStats(hessian.unsqueeze(0), 0) if hessian is not None else None
    plan = config.plan({name: probe}, {name: stats} if stats is not None else {}).get(name)
    result = config.transform(w, hessian, name, plan)
    if not all_finite(result.weight):
        raise PruneError(f"{name}: {config.name} produced NaN or Inf; raise dampening")
    return result


def _hessian_from(calib: torch.Tensor, d: int, name: str) -> torch.Tensor:
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.shape[1] != d \
            or calib.shape[0] == 0:
        raise PruneError(f"{name}: calibration must be input rows (n, {d}) or a Hessian "
                         f"({d}, {d}); got shape {tuple(getattr(calib, 'shape', ()))}")
    if not calib.is_floating_point():
        raise PruneError(f"{name}: calibration data has dtype {calib.dtype}; give floating "
                         f"point input rows or a Hessian")
    if not all_finite(calib):
        raise PruneError(f"{name}: calibration data holds NaN or Inf")
    if calib.shape[0] == calib.shape[1]:  # a square tensor is taken as H itself
        h = calib.double()
        scale = float(h.abs().max()) or 1.0
        # |H - H^T| within 1.1e-5 of H's largest entry: allclose's tolerances against the
        # largest entry, in two passes over H instead of allclose's six
        if float(torch.sub(h, h.mT).abs_().max()) > 1.1e-5 * scale:
            raise PruneError(f"{name}: a square calibration tensor is read as the Hessian "
                             f"X^T X, but it is not symmetric; pass X^T X, or more rows")
        # cheap checks only (an eigen decomposition would cost more than pruning): X^T X has
        # no negative diagonal entry; a subtler indefinite H fails the methods' Cholesky
        if float(torch.diagonal(h).min()) < 0:
            raise PruneError(f"{name}: a square calibration tensor is read as the Hessian "
                             f"X^T X, but it has a negative diagonal entry, which X^T X never "
                             f"has; pass X^T X or the input rows")
        return h
    x = calib.double()
    return x.T @ x
