"""One benchmark run: build the model, measure it dense, prune it, measure it again.

`execute_run(config)` takes a RunSpec's config dict and returns a JSON-ready result, so that
any backend (this process, a process pool, Ray) can run it; with the same seed and threads
it returns the same quality, sparsity and per-layer numbers wherever it runs.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.bench import metrics
from prunekit.bench.experiment import RunSpec
from prunekit.errors import PruneError
from prunekit.progress import Progress

#: Dense quality per (model, split, limit), so that a worker evaluates each dense model once.
_DENSE_QUALITY: dict[tuple, dict] = {}

STAGES = ("load", "dense quality", "prune", "recover", "pruned quality", "speed")


def make_config(spec: RunSpec, sparsity: float | None):
    """The method config for a run: the file's options one to one, plus pattern and sparsity."""
    from prunekit.oneshot import get_method

    options = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.options.items()}
    kwargs = dict(options, pattern=spec.pattern)
    if sparsity is not None:
        kwargs["sparsity"] = sparsity
    return get_method(spec.method)(**kwargs)


@torch.no_grad()
def quality(model: nn.Module, spec: RunSpec) -> dict:
    """The model's standard metric on its dataset; image classifiers get top-1 and top-5 from
    one pass over the images."""
    from prunekit import data
    from prunekit.evaluate import evaluate, topk_accuracy

    if spec.dataset in ("cifar10", "digits"):
        if spec.dataset == "cifar10":
            x, y = data.cifar10_tensors("test", limit=spec.eval_limit)
        else:
            x, y = data.load_digits("test")
            x, y = x[:spec.eval_limit], y[:spec.eval_limit]
        acc = topk_accuracy(model, x, y, (1, 5), batch_size=500)
        return {"top1": acc[1], "top5": acc[5]}
    return evaluate(model, spec.model, split=spec.eval_split, limit=spec.eval_limit)


def _dense_quality(model: nn.Module, spec: RunSpec) -> dict:
    key = (spec.model, spec.eval_split, spec.eval_limit, spec.threads)
    if key not in _DENSE_QUALITY:
        _DENSE_QUALITY[key] = quality(model, spec)
    return dict(_DENSE_QUALITY[key])


def _bn_images(spec: RunSpec, calib) -> torch.Tensor:
    if spec.dataset == "cifar10":
        from prunekit.data import calibration_images
        # augmented like the data the pretrained statistics were learnt on; plain images
        # cost the dense ResNet-20 three points of top-1
        return calibration_images(max(spec.calibration_samples, 1024), spec.seed, augment=True)
    if all(isinstance(b, torch.Tensor) for b in calib):
        return torch.cat(calib)
    raise PruneError(f"reestimate_bn needs image batches; {spec.model} has none")


def finetune(model: nn.Module, spec: RunSpec, masks: dict[str, torch.Tensor]) -> None:
    """A fixed budget of masked SGD steps on the training split (image classifiers): pruned
    weights stay zero because the masks are applied again after every step."""
    from prunekit import data

    if spec.dataset == "cifar10":
        x = data.calibration_images(spec.finetune_steps * spec.finetune_batch_size,
                                    spec.seed + 1)
        _, labels = data.load_cifar10("train")
        import numpy as np
        idx = np.sort(np.random.default_rng(spec.seed + 1).choice(
            len(labels), size=len(x), replace=False))
        y = torch.from_numpy(labels[idx].copy())
    elif spec.dataset == "digits":
        x, y = data.load_digits("train")
    else:
        raise PruneError(f"finetune_steps: fine-tuning is implemented for image classifiers "
                         f"(cifar10, digits), not {spec.model}; set finetune_steps = 0")
    g = torch.Generator().manual_seed(spec.seed)
    params = {n: m for n, m in model.named_modules() if n in masks}
    opt = torch.optim.SGD(model.parameters(), lr=spec.finetune_lr, momentum=0.9)
    model.train()
    for _ in range(spec.finetune_steps):
        idx = torch.randint(0, len(x), (spec.finetune_batch_size,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        with torch.no_grad():
            for n, m in params.items():
                m.weight.mul_(masks[n])
    model.eval()


def execute_run(config: dict, progress: bool = False) -> dict:
    """Run one configuration and return its metrics (see the module docstring)."""
    from prunekit.models import calibration_batches, create, get_info
    from prunekit.oneshot.prune import prune

    spec = RunSpec.from_config(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    start = time.perf_counter()
    try:
        with Progress(enabled=progress) as bar:
            task = bar.add(f"  {spec.label()}", total=len(STAGES))
            info = get_info(spec.model)
            model = create(spec.model, pretrained=info.pretrained_available)
            calib = calibration_batches(spec.model, n=spec.calibration_samples, seed=spec.seed,
                                        batch_size=spec.calibration_batch_size)
            dense = copy.deepcopy(model).eval()
            positions = metrics.output_positions(model, calib[0])
            bar.advance(task)
            before = _dense_quality(model, spec)
            bar.advance(task)

            sparsity = spec.sparsity
            if spec.flops_target is not None:
                probe = make_config(spec, 0.5)
                sparsity = metrics.sparsity_for_speedup(
                    model, positions, metrics.layer_names(model, probe), spec.flops_target)
            config_obj = make_config(spec, sparsity)
            data = calib if (config_obj.needs != "none" or config_obj.sequential) else None
            with metrics.PeakMemory() as mem:
                report = prune(model, config_obj, data, progress=progress)
            bar.advance(task)

            if spec.reestimate_bn:
                from prunekit.evaluate import reestimate_bn
                reestimate_bn(model, _bn_images(spec, calib))
            if spec.finetune_steps:
                masks = {lr.name: (dict(model.named_modules())[lr.name].weight != 0)
                         for lr in report.layers}
                finetune(model, spec, masks)
            bar.advance(task)
            after = quality(model, spec)
            bar.advance(task)

            result = {"metric": next(iter(after)), "quality_before": before,
                      "quality_after": after, "sparsity": report.sparsity,
                      "target_sparsity": report.target_sparsity,
                      "prune_seconds": report.seconds,
                      "peak_rss_mb": mem.peak, "peak_rss_growth_mb": mem.growth}
            result.update(metrics.compression(model))
            result.update(metrics.flops(model, positions))
            lat = metrics.latency({"dense": dense, "pruned": model}, calib[0],
                                  spec.latency_batch_sizes, spec.latency_warmup,
                                  spec.latency_repeats)
            result["latency"] = lat
            for bs in spec.latency_batch_sizes:
                result[f"measured_speedup_b{bs}"] = (lat[f"dense_ms_b{bs}"]
                                                     / lat[f"pruned_ms_b{bs}"])
            bar.advance(task)
            result["layers"] = [{"name": lr.name, "shape": list(lr.shape),
                                 "sparsity": lr.sparsity, "rel_error": lr.rel_error,
                                 "seconds": lr.seconds} for lr in report.layers]
            result["run_seconds"] = time.perf_counter() - start
            result["env"] = metrics.environment()
            return result
    finally:
        torch.set_num_threads(threads)
