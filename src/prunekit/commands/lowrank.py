"""`prunekit lowrank`: factorize a registry model's layers into low-rank pairs and save the
smaller dense model (save_shrunk's format: safetensors plus the new structure)."""

from __future__ import annotations

from prunekit.commands import COMMANDS
from prunekit.commands.common import (
    add_malloc_option,
    add_threads_option,
    apply_malloc_option,
    print_result,
    with_threads,
)
from prunekit.errors import PruneError
from prunekit.oneshot import METHODS


@COMMANDS.register("lowrank")
def register(sub) -> None:
    p = sub.add_parser("lowrank", help="factorize layers into low-rank pairs (SVD, data-aware "
                                       "SVD, ALDS) and save the smaller dense model")
    p.add_argument("model", help="registry name (see `prunekit models`) or module:function")
    p.add_argument("--method", default="svd",
                   help="one of: " + ", ".join(METHODS.where(family="lowrank")))
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="method options, e.g. -o rank_ratio=0.25 -o data_aware=true, "
                        "-o flops_ratio=0.5 (see `prunekit methods`)")
    p.add_argument("--weights", help="safetensors weights to load first")
    p.add_argument("--pretrained", action="store_true", help="load the registry's weights")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept a pickle checkpoint for --weights (runs code: trusted files only)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw")
    p.add_argument("--speedup", type=float, default=None,
                   help="factorize for this measured speedup on this machine (the method's "
                        "FLOPs budget moved until the measurement lands)")
    p.add_argument("--budget", default="flops", choices=("flops", "latency"),
                   help="what --speedup moves: the layers' FLOPs share, or (alds) their time "
                        "in a table of every option measured on the --speedup-batch")
    p.add_argument("--speedup-batch", type=int, default=64,
                   help="batch size the --speedup is measured at")
    p.add_argument("--out", help="write the factorized model here (safetensors, atomic)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_malloc_option(p)
    add_threads_option(p)
    p.set_defaults(func=with_threads(cmd_lowrank))


def cmd_lowrank(args) -> int:
    from prunekit.commands.prune import make_config
    from prunekit.lowrank import LowRankConfig, lowrank, lowrank_for_speedup
    from prunekit.models import calibration_batches, get_info, load_model
    from prunekit.structured import count_params, save_shrunk

    options = list(args.option)
    if ":" not in args.model and get_info(args.model).task == "causal-lm" and not any(
            o.partition("=")[0].strip() == "exclude" for o in options):
        options.insert(0, "exclude=lm_head")  # as prune and quantize: the tied head stays
    config = make_config(args.method, options=options)
    if not isinstance(config, LowRankConfig):
        raise PruneError(f"{args.method} is not a low-rank method; low-rank methods are: "
                         f"{', '.join(METHODS.where(family='lowrank'))} (prune with "
                         f"`prunekit prune`)")
    if args.speedup is not None:
        config.at_flops(1.0)  # a method without a FLOPs budget says so before loading
    model = load_model(args.model, weights=args.weights, pretrained=args.pretrained,
                       allow_pickle=args.allow_pickle)
    before = count_params(model)
    calib = None
    if config.needs != "none" or args.speedup is not None:
        if ":" in args.model:
            raise PruneError(f"{config.name} needs calibration data, which prunekit can draw "
                             f"only for registry models; use prunekit.lowrank from Python "
                             f"for {args.model}")
        calib = calibration_batches(get_info(args.model), n=args.calib_samples, seed=args.seed,
                                    tokenizer=getattr(model, "tokenizer", None))
    if args.speedup is not None:
        apply_malloc_option(args)
        batch = calibration_batches(get_info(args.model), n=args.speedup_batch,
                                    seed=args.seed + 1, batch_size=args.speedup_batch)[0]
        found = lowrank_for_speedup(model, config, calib, batch, args.speedup,
                                    budget=args.budget, progress=not args.quiet)
        report, data = found.report, found.to_dict()
        what = "time" if found.budget == "latency" else "FLOPs"
        head = (f"measured speedup {found.measured:.2f}x at batch {args.speedup_batch} "
                f"(target {args.speedup:g}x) with {found.kept:.3f} of the layers' {what}, "
                f"after {len(found.rounds)} round(s)\n")
    else:
        report = lowrank(model, config, calib, progress=not args.quiet)
        data, head = report.to_dict(), ""
    after = count_params(model)
    data.update(params_before=before, params_after=after)
    if args.out:
        save_shrunk(model, args.out, extra={"prunekit_report": data})
    print_result(args, data, f"{head}{report}\nparams {before:,} -> {after:,} "
                             f"({after / before:.3f}x)")
    return 0
