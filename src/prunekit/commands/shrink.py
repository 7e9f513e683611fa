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
    p.add_argument("model", help="registry name (see `prunekit models`), module:function, or "
                                 "for the causal-LM options a .gguf file or transformers folder")
    from prunekit.structured.importance import CRITERIA
    from prunekit.structured.llm import IMPORTANCES

    budget = p.add_mutually_exclusive_group()  # every ratio is the fraction KEPT
    budget.add_argument("--channel-ratio", type=float,
                        help="fraction of the channels of every group kept")
    budget.add_argument("--flops-ratio", type=float,
                        help="FLOPs kept, as a fraction (the default: 0.5)")
    budget.add_argument("--params-ratio", type=float, help="parameters kept, as a fraction")
    budget.add_argument("--latency-ratio", type=float, help="measured latency kept")
    p.add_argument("--importance", choices=CRITERIA.names() + [
                       k for k in IMPORTANCES if k not in CRITERIA.names()],
                   help="; ".join(f"{e.name}: {e.summary.rstrip('.')}" + (
                       f", needs {e.meta['needs']}" if e.meta.get("needs") != "none" else "")
                       for e in CRITERIA.entries()) + " (default l1). Causal LMs: " +
                   ", ".join(IMPORTANCES) + " (default activation; structured.llm)")
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
    p.add_argument("--reconstruct", nargs="?", const="all", default=None,
                   choices=("none", "attention", "all"),
                   help="refit the layers that read removed channels by least squares on "
                        "calibration inputs (bias compensation included); a bare "
                        "--reconstruct means all. Causal LMs (default all): attention refits "
                        "o_proj only, all also down_proj, none skips it")
    p.add_argument("--weights", help="safetensors weights to load first")
    p.add_argument("--pretrained", action="store_true", help="load the registry's weights")
    p.add_argument("--calib-samples", type=count(1), default=64,
                   help="calibration samples for the criteria that need gradients")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the shrunk model here (safetensors, atomic; with the "
                                 "causal-LM options a transformers folder when the widths are "
                                 "uniform)")
    _llm_options(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_malloc_option(p)
    add_threads_option(p)
    p.set_defaults(func=with_threads(cmd_shrink))


#: the causal-LM options (structured.llm): any of them selects that path
LLM_OPTIONS = ("heads", "kv_heads", "mlp_ratio", "hidden_ratio", "drop_blocks")


def _llm_options(p) -> None:
    g = p.add_argument_group(
        "causal LMs (Llama architecture: SmolLM2, Llama)",
        "width and depth pruning scored on calibration text (structured.llm); any of the "
        "first five options selects it")
    g.add_argument("--heads", type=count(1), help="query heads kept per block, a multiple of "
                                                  "the key/value heads kept")
    g.add_argument("--kv-heads", type=count(1), help="key/value heads kept per block (whole "
                                                     "groups with their query heads)")
    g.add_argument("--mlp-ratio", type=float, help="fraction of MLP neurons kept per block")
    g.add_argument("--hidden-ratio", type=float, help="fraction of hidden channels kept")
    g.add_argument("--drop-blocks", type=count(0), help="whole blocks removed")
    g.add_argument("--mlp-allocation", choices=("uniform", "dp"), default="uniform",
                   help="uniform: --mlp-ratio in every block; dp: each block its own MLP "
                        "width (multiples of --round-to, or of 64), at most uniform's MLP "
                        "parameters in all, removing the least summed importance")
    g.add_argument("--block-metric", choices=("influence", "perplexity"), default="influence",
                   help="which blocks go: least 1 - cos(input, output), or least calibration "
                        "perplexity cost")
    g.add_argument("--calib-len", type=count(2), default=256,
                   help="tokens per calibration segment (--calib-samples segments)")
    g.add_argument("--distill-steps", type=count(0), default=0,
                   help="distillation steps from the dense model afterwards (0: none)")
    g.add_argument("--distill-lr", type=float, default=1e-4)
    g.add_argument("--distill-len", type=count(2), default=128,
                   help="tokens per distillation sequence")
    g.add_argument("--distill-batch", type=count(1), default=2)
    g.add_argument("--eval-tokens", type=count(0),
                   help="WikiText-2 test tokens for perplexity (1024-token windows; default "
                        "the whole test set; 0: no perplexity)")
    g.add_argument("--prefill-tokens", type=count(1), default=512,
                   help="prompt length for the prefill timing")
    g.add_argument("--decode-tokens", type=count(1), default=32,
                   help="tokens decoded at batch 1 for the decode timing")


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
    if any(getattr(args, k) is not None for k in LLM_OPTIONS):
        return cmd_shrink_llm(args)
    config = ChannelPrune(
        channel_ratio=args.channel_ratio, flops_ratio=args.flops_ratio,
        params_ratio=args.params_ratio,
        latency_ratio=args.latency_ratio, importance=args.importance or "l1",
        round_to=args.round_to,
        min_channels=args.min_channels, ignore=tuple(args.ignore),
        global_ranking=args.global_ranking, include_reduced=args.include_reduced,
        seed=args.seed, allocation=args.allocation, cut=tuple(args.cut) or ("*",),
        reconstruct=args.reconstruct not in (None, "none"))
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


def cmd_shrink_llm(args) -> int:
    """Width/depth pruning of a causal LM: sizes, measured prefill and decode speed and
    perplexity before and after (and after distillation with --distill-steps)."""
    from prunekit.models import calibration_batches, get_info, load_model
    from prunekit.structured.distill import distill
    from prunekit.structured.llm import (
        IMPORTANCES,
        LLMShrink,
        compare_speed,
        save_llm,
        shrink_llm,
    )

    given = [f"--{k.replace('_', '-')}" for k in ("channel_ratio", "flops_ratio",
                                                  "params_ratio", "latency_ratio")
             if getattr(args, k) is not None]
    if given:
        raise PruneError(f"{given[0]} is a budget of the traced graph; the causal-LM options "
                         f"(--heads, --kv-heads, --mlp-ratio, --hidden-ratio, --drop-blocks) "
                         f"set the widths themselves: use one kind or the other")
    if args.allocation != "uniform":
        raise PruneError("--allocation is the traced graph's; for a causal LM's per-block MLP "
                         "widths use --mlp-allocation dp")
    info = get_info(args.model)
    if info.task != "causal-lm":
        raise PruneError(f"{args.model} is a {info.task} model; --heads, --kv-heads, "
                         f"--mlp-ratio, --hidden-ratio and --drop-blocks prune causal LMs")
    importance = args.importance or "activation"
    if importance not in IMPORTANCES:
        raise PruneError(f"--importance {importance} is a criterion of the traced graph; "
                         f"causal LMs are scored by {', '.join(IMPORTANCES)}")
    config = LLMShrink(heads=args.heads, kv_heads=args.kv_heads,
                       mlp_ratio=1.0 if args.mlp_ratio is None else args.mlp_ratio,
                       hidden_ratio=1.0 if args.hidden_ratio is None else args.hidden_ratio,
                       drop_blocks=args.drop_blocks or 0, block_metric=args.block_metric,
                       round_to=args.round_to, reconstruct=args.reconstruct or "all",
                       importance=importance, mlp_allocation=args.mlp_allocation)
    out = None
    if args.out:
        from pathlib import Path
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise PruneError(f"--out {out} is a file; give a folder for the transformers model")
    model = load_model(args.model, weights=args.weights, pretrained=args.pretrained)
    tokenizer = getattr(model, "tokenizer", None)
    calib = calibration_batches(info, n=args.calib_samples, seq_len=args.calib_len,
                                seed=args.seed, tokenizer=tokenizer)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    say(f"shrinking {args.model}...")
    small, report = shrink_llm(model, config, calib, progress=not args.quiet)
    result = {"model": args.model, **report.to_dict()}
    ids = None
    if args.eval_tokens != 0 and info.dataset == "wikitext2" and tokenizer is not None:
        from prunekit.data import lm_tokens
        ids = lm_tokens(tokenizer, "wikitext2", "test")
        ids = ids[:args.eval_tokens] if args.eval_tokens else ids
    ppl = {}
    if ids is not None:
        from prunekit.evaluate import lm_perplexity, lm_seq_len
        seq = min(lm_seq_len(model), len(ids))
        say(f"perplexity on {len(ids) // seq * seq} WikiText-2 test tokens...")
        ppl["dense"] = lm_perplexity(model, ids, seq)
        ppl["pruned"] = lm_perplexity(small, ids, seq)
    if args.distill_steps:
        batches = calibration_batches(info, n=min(args.distill_steps * args.distill_batch, 512),
                                      seq_len=args.distill_len, seed=args.seed + 1,
                                      batch_size=args.distill_batch, tokenizer=tokenizer)
        say(f"distilling {args.distill_steps} steps...")
        result["distill"] = distill(small, model, batches, args.distill_steps,
                                    lr=args.distill_lr, progress=not args.quiet)
        if ids is not None:
            ppl["distilled"] = lm_perplexity(small, ids, seq)
    say("timing prefill and decode...")
    speed = compare_speed({"dense": model, "pruned": small}, args.prefill_tokens,
                          args.decode_tokens)
    result.update(perplexity=ppl, speed=speed,
                  prefill_speedup=speed["dense"]["prefill_s"] / speed["pruned"]["prefill_s"],
                  decode_speedup=speed["pruned"]["decode_tokens_per_s"]
                  / speed["dense"]["decode_tokens_per_s"])
    if out is not None:
        if not report.uniform:  # per-block widths: prunekit's one-file format, in the folder
            out.mkdir(parents=True, exist_ok=True)
            out = out / "model.safetensors"
        saved = save_llm(small, out)
        result["saved"] = str(saved)
    lines = [str(report),
             f"prefill       {speed['dense']['prefill_s'] * 1e3:.0f} ms -> "
             f"{speed['pruned']['prefill_s'] * 1e3:.0f} ms ({result['prefill_speedup']:.2f}x "
             f"faster, {args.prefill_tokens} tokens)",
             f"decode        {speed['dense']['decode_tokens_per_s']:.1f} -> "
             f"{speed['pruned']['decode_tokens_per_s']:.1f} tokens/s "
             f"({result['decode_speedup']:.2f}x)"]
    if ppl:
        lines.append("perplexity    " + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items()))
    print_result(args, result, "\n".join(lines))
    return 0
