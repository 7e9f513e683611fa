"""`prunekit prune` and `prunekit methods`."""

from __future__ import annotations

import dataclasses
import json

from prunekit.budget.alloc import BUDGETS
from prunekit.budget.latency_table import TIMINGS
from prunekit.commands import COMMANDS
from prunekit.commands.common import (
    add_malloc_option,
    add_threads_option,
    apply_malloc_option,
    count,
    print_result,
    with_threads,
)
from prunekit.config import field_names
from prunekit.errors import PruneError
from prunekit.oneshot import METHODS, get_method


@COMMANDS.register("prune")
def register(sub) -> None:
    p = sub.add_parser("methods", help="list the one-shot pruning methods and their options")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("prune", help="prune a model one-shot and save its weights")
    p.add_argument("model", help="registry name (see `prunekit models`), a .gguf file, a "
                                 "transformers causal-LM folder, or module:function")
    p.add_argument("--method", default="sparsegpt",
                   help="one of: " + ", ".join(METHODS.where(family="prune")))
    p.add_argument("--sparsity", type=float, default=None, help="fraction of weights to remove")
    p.add_argument("--pattern", default=None, help="unstructured, unstructured:row, N:M, 1xN")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="any other method option, e.g. -o blocksize=64 -o include=layer*")
    p.add_argument("--weights", help="safetensors weights to load before pruning")
    p.add_argument("--pretrained", action="store_true", help="load the registry's weights")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept a pickle checkpoint for --weights (runs code: trusted files only)")
    p.add_argument("--calib-samples", type=count(1), default=None,
                   help="calibration samples (default 128; causal LMs: 32 segments)")
    p.add_argument("--calib-tokens", type=count(1), default=None,
                   help="tokens per calibration segment of a causal LM (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw")
    p.add_argument("--speedup", type=float, default=None,
                   help="prune for this measured speedup on this machine instead of a "
                        "sparsity: per-layer budget, convert to sparse kernels, measure, repeat")
    p.add_argument("--budget", default=None, choices=BUDGETS.names(),
                   help="how sparsity is spread over the layers: with --sparsity, uniform "
                        "(default), global, erk or owl (outlier-weighted, from calibration "
                        "data); with --speedup, any of them or spdy (the default there)")
    p.add_argument("--speedup-batch", type=count(1), default=64,
                   help="batch size the --speedup is measured at")
    p.add_argument("--timing", default="model", choices=TIMINGS,
                   help="how the latency table times a layer for --speedup: inside the whole "
                        "model (model, the default), alone with caches flushed (cold) or alone "
                        "call after call (hot)")
    p.add_argument("--steps", type=count(1), default=100, help="SPDY search steps (--budget spdy)")
    p.add_argument("--out", help="write the pruned weights here (safetensors, atomic); for a "
                                 "causal LM, a path not ending in .safetensors is a folder "
                                 "that transformers loads (config, safetensors, tokenizer)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_malloc_option(p)
    add_threads_option(p)
    p.set_defaults(func=with_threads(cmd_prune))


def make_config(method: str, sparsity=None, pattern=None, options=()):
    """A method config from command-line text; unknown options name the valid ones."""
    from prunekit.config import build

    cls = get_method(method)
    values = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep:
            raise PruneError(f"option {item!r} is not KEY=VALUE; options of {method} are: "
                             f"{', '.join(field_names(cls))}")
        values[key.strip()] = value.strip()
    if sparsity is not None:
        values["sparsity"] = sparsity
    if pattern is not None:
        values["pattern"] = pattern
    return build(cls, values, text=True, where=method)


def method_rows() -> list[dict]:
    """One row per registered method: family, what it needs, patterns, options, example."""
    rows = []
    for e in METHODS.entries():
        cls = e.obj
        opts = {f.name: f.default for f in dataclasses.fields(cls)
                if f.init and f.default is not dataclasses.MISSING}
        rows.append({"method": e.name, "family": e.meta.get("family", "prune"),
                     "needs_data": e.meta.get("needs", "none") != "none",
                     "needs": e.meta.get("needs", "none"),
                     "patterns": list(e.meta.get("patterns", ())), "options": opts,
                     "example": e.meta.get("example"), "summary": e.summary})
    return sorted(rows, key=lambda r: (r["family"], r["method"]))


def cmd_methods(args) -> int:
    rows = method_rows()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for r in rows:
        data = {"none": "weights only", "hessian": "calibration data",
                "gradients": "gradients"}.get(r["needs"], r["needs"])
        pats = f"  patterns: {', '.join(r['patterns'])}" if r["patterns"] else ""
        print(f"{r['method']:<12} {r['family']:<9} {data:<17}{pats}")
        print(f"{'':<12} {r['summary']}")
        print(f"{'':<12} options: " + ", ".join(f"{k}={v!r}" for k, v in r["options"].items()))
    return 0


def _sparsity_budget(name: str | None, model, config, calib) -> dict | None:
    """Per-layer sparsities that spread config.sparsity as budget `name` says (None: every
    layer at config.sparsity)."""
    import inspect

    from prunekit.layers import find_layers

    if name in (None, "uniform"):
        return None
    entry = BUDGETS.entry(name)
    if entry.meta.get("search"):
        raise PruneError(f"--budget {name} searches for a measured speedup: give --speedup")
    if config.sparsity is None:
        raise PruneError(f"--budget {name} spreads a --sparsity; give one")
    layers = find_layers(model, config.include, config.exclude)
    if "model" in inspect.signature(entry.obj).parameters:  # OWL reads the data
        if not calib:
            raise PruneError(f"--budget {name} measures the model on calibration data; "
                             f"{config.method} draws none (use a method that calibrates)")
        return entry.obj(layers, config.sparsity, model=model, calib=calib)
    return entry.obj(layers, config.sparsity)


def cmd_prune(args) -> int:
    from prunekit.io import save_weights
    from prunekit.models import calibration_batches, get_info, load_model
    from prunekit.oneshot.prune import prune

    if args.speedup is not None and args.sparsity is not None:
        raise PruneError("give --sparsity or --speedup, not both: --speedup chooses each "
                         "layer's sparsity")
    if args.speedup is not None and args.budget == "owl":
        raise PruneError("--budget owl spreads a --sparsity by each block's outliers; it does "
                         "not size a --speedup (use spdy, uniform, global or erk)")
    if args.speedup is None and args.budget and BUDGETS.entry(args.budget).meta.get("search"):
        raise PruneError(f"--budget {args.budget} searches for a measured speedup: give "
                         f"--speedup")
    from prunekit.models.llm import is_model_path

    custom = ":" in args.model and not is_model_path(args.model)
    info = None if custom else get_info(args.model)
    causal = info is not None and info.task == "causal-lm"
    options = list(args.option)
    if causal:  # the tied head and the embeddings stay dense; LLMs calibrate block by block
        defaults = ["exclude=lm_head"] + (["sequential=true"]
                                          if get_method(args.method).needs != "none" else [])
        given = {o.partition("=")[0].strip() for o in options}
        options = [d for d in defaults if d.partition("=")[0] not in given] + options
    config = make_config(args.method, args.sparsity, args.pattern, options)
    model = load_model(args.model, weights=args.weights,
                       pretrained=args.pretrained or (causal and info.pretrained_available),
                       allow_pickle=args.allow_pickle)
    calib = None
    if config.needs != "none" or config.sequential:
        if custom:
            raise PruneError(f"{config.method} needs calibration data, which prunekit can draw "
                             f"only for registry models; use the Python API for {args.model}")
        calib = calibration_batches(info, n=args.calib_samples, seed=args.seed,
                                    seq_len=args.calib_tokens,
                                    tokenizer=getattr(model, "tokenizer", None))
    if args.speedup is not None:
        args.budget = args.budget or "spdy"
        return _prune_for_speedup(args, model, config, calib)
    budget = _sparsity_budget(args.budget, model, config, calib)
    report = prune(model, config, calib, budget=budget, progress=not args.quiet)
    if args.out and causal and hasattr(model, "save_pretrained") \
            and not str(args.out).endswith(".safetensors"):
        from prunekit.models.llm import save_pretrained
        save_pretrained(model, args.out)
    elif args.out:
        save_weights(model, args.out, metadata={"prunekit_report": report.to_dict()})
    print_result(args, report.to_dict(), str(report))
    return 0


def _prune_for_speedup(args, model, config, calib) -> int:
    from prunekit.budget import prune_for_speedup
    from prunekit.io import save_weights
    from prunekit.models import calibration_batches, get_info

    if ":" in args.model:
        raise PruneError("--speedup measures on a batch drawn from the model's dataset, which "
                         f"prunekit has only for registry models; use the Python API "
                         f"(prunekit.budget.prune_for_speedup) for {args.model}")
    apply_malloc_option(args)
    info = get_info(args.model)
    if calib is None:  # SPDY scores its candidates on calibration data whatever the method
        calib = calibration_batches(info, n=args.calib_samples, seed=args.seed)
    timed_batch = calibration_batches(info, n=args.speedup_batch, seed=args.seed + 1,
                                      batch_size=args.speedup_batch)[0]
    result = prune_for_speedup(model, config, calib, timed_batch, args.speedup, args.budget,
                               steps=args.steps, timing=args.timing, progress=not args.quiet)
    report = {"method": config.method, "pattern": config.pattern, "target": args.speedup,
              "batch_size": args.speedup_batch, "timing": args.timing, **result.to_dict()}
    if args.out:
        save_weights(model, args.out, metadata={"prunekit_report": report})
    lines = [f"{config.method} ({config.pattern}, {args.budget} budget): measured speedup "
             f"{result.measured:.2f}x at batch {args.speedup_batch} (target "
             f"{args.speedup:g}x; table predicted {result.predicted_speedup:.2f}x) after "
             f"{len(result.rounds)} round(s)"]
    lines += [f"  {name:<40} sparsity {s:.2f}" for name, s in result.budget.items()]
    if result.skipped:
        lines.append(f"  left dense (the pattern cannot tile them): {', '.join(result.skipped)}")
    print_result(args, report, "\n".join(lines))
    return 0
