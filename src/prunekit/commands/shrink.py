"""`prunekit shrink`: structured pruning of a registry model into a smaller dense model."""

from __future__ import annotations

import sys

import torch

from prunekit.commands import COMMANDS
from prunekit.commands.common import (
    add_malloc_option,
    add_threads_option,
    apply_malloc_option,
    count,
    print_result,
    with_threads,
)
from prunekit.errors import PruneError


@COMMANDS.register("shrink")
def register(sub) -> None:
    p = sub.add_parser("shrink", help="remove whole channels, heads and neurons; save the "
                                      "smaller model (safetensors + its new shapes)")
    p.add_argument("model", help="registry name (see `prunekit models`) or module:function")
    from prunekit.structured.importance import CRITERIA

    budget = p.add_mutually_exclusive_group()  # every ratio is the fraction KEPT
    budget.add_argument("--channel-ratio", type=float,
                        help="fraction of the channels of every group kept")
    budget.add_argument("--flops-ratio", type=float,
                        help="FLOPs kept, as a fraction (the default: 0.5)")
    budget.add_argument("--params-ratio", type=float, help="parameters kept, as a fraction")
    budget.add_argument("--latency-ratio", type=float, help="measured latency kept")
    p.add_argument("--importance", default="l1", choices=CRITERIA.names(),
                   help="; ".join(f"{e.name}: {e.summary.rstrip('.')}" + (
                       f", needs {e.meta['needs']}" if e.meta.get("needs") != "none" else "")
                       for e in CRITERIA.entries()))
    p.add_argument("--round-to", type=int, default=1, help="keep multiples of 8 or 16")
    p.add_argument("--min-channels", type=int, default=1)
    p.add_argument("--ignore", action="append", default=[], metavar="MODULE",
                   help="module name (glob) to leave whole; repeatable")
    p.add_argument("--global-ranking", action="store_true",
                   help="one threshold over all groups instead of the same fraction each")
    p.add_argument("--include-reduced", action="store_true",
                   help="also prune normalised channels (transformer residual streams)")
    p.add_argument("--allocation", default="uniform", choices=("uniform", "dp"),
                   help="uniform: the same fraction of every group; dp: each group its own "
                        "width (multiples of 8) from per-width sensitivities on calibration "
                        "data and costs measured in the model")
    p.add_argument("--cut", action="append", default=[], metavar="LAYER",
                   help="narrow only the groups these layers produce (glob; repeatable), "
                        "e.g. 'layer*.conv1' for a ResNet's inner channels")
    p.add_argument("--reconstruct", action="store_true",
                   help="refit the layers after each cut by least squares on calibration "
                        "inputs (bias compensation included)")
    p.add_argument("--weights", help="safetensors weights to load first")
    p.add_argument("--pretrained", action="store_true", help="load the registry's weights")
    p.add_argument("--calib-samples", type=count(1), default=64,
                   help="calibration samples for the criteria that need gradients")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the shrunk model here (safetensors, atomic)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_malloc_option(p)
    add_threads_option(p)
    p.set_defaults(func=with_threads(cmd_shrink))


def _example_inputs(info, model):
    """One small input matching the model's task."""
    if info.task == "image-classification":
        size = {"cifar10": 32, "digits": 8}.get(info.dataset, 224)
        ch = 1 if info.dataset == "digits" else 3
        return torch.randn(1, ch, size, size, generator=torch.Generator().manual_seed(0))
    vocab = getattr(getattr(model, "config", None), "vocab_size", 100)
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    if info.task == "sentence-embedding":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"input_ids": ids}


def cmd_shrink(args) -> int:
    from prunekit.models import calibration_batches, get_info, load_model
    from prunekit.structured import CRITERIA, ChannelPrune, save_shrunk, shrink

    apply_malloc_option(args)
    config = ChannelPrune(
        channel_ratio=args.channel_ratio, flops_ratio=args.flops_ratio,
        params_ratio=args.params_ratio,
        latency_ratio=args.latency_ratio, importance=args.importance, round_to=args.round_to,
        min_channels=args.min_channels, ignore=tuple(args.ignore),
        global_ranking=args.global_ranking, include_reduced=args.include_reduced,
        seed=args.seed, allocation=args.allocation, cut=tuple(args.cut) or ("*",),
        reconstruct=args.reconstruct)
    model = load_model(args.model, weights=args.weights, pretrained=args.pretrained)
    if ":" in args.model:
        raise PruneError(f"{args.model}: prunekit cannot guess example inputs for a user model; "
                         f"use prunekit.structured.shrink from Python")
    info = get_info(args.model)
    calib = None
    if CRITERIA.entry(config.importance).meta.get("needs") != "none" or \
            config.allocation == "dp" or config.reconstruct:
        calib = calibration_batches(info, n=args.calib_samples, seed=args.seed)
    if not args.quiet:
        print(f"shrinking {args.model} ({config.importance})...", file=sys.stderr)
    small, report = shrink(model, config, _example_inputs(info, model), calib=calib)
    if args.out:
        save_shrunk(small, args.out, extra={"model": args.model, "report": report.to_dict()})
    print_result(args, report.to_dict(), str(report))
    return 0
