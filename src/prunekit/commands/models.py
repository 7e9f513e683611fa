"""`prunekit models` lists the registry; `prunekit eval MODEL` measures a model's quality on
its data set (top-1, STS-B Spearman or perplexity), optionally with pruned weights."""

from __future__ import annotations

import json

from prunekit.commands import COMMANDS
from prunekit.commands.common import count


@COMMANDS.register("models")
def register(sub) -> None:
    p = sub.add_parser("models", help="list the models in the registry")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("eval", help="evaluate a model on its standard data set")
    p.add_argument("model", help="registry name (see `prunekit models`), tv:<name>, a .gguf "
                                 "file or transformers causal-LM folder, or module:function "
                                 "(then give --dataset)")
    p.add_argument("--weights", help="safetensors weights to evaluate (e.g. a pruned model); "
                                     "without it a registry model's pretrained weights are used")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept a pickle checkpoint for --weights (runs code: trusted files only)")
    p.add_argument("--dataset", choices=("cifar10", "digits", "stsb", "wikitext2",
                                         "tinyshakespeare"),
                   help="data set to evaluate on (default: the model's own)")
    p.add_argument("--split", default="test",
                   help="test (default), or the train / dev (valid) side")
    p.add_argument("--seq-len", type=int, default=None,
                   help="perplexity window in tokens (default 1024; 2048 is the other usual one)")
    p.add_argument("--windows", type=int, default=None, metavar="N",
                   help="perplexity on N windows spread evenly over the text (quick runs); "
                        "default all")
    p.add_argument("--limit", type=count(1), default=None,
                   help="evaluate the first N examples (N tokens for perplexity)")
    p.add_argument("--batch-size", type=count(1), default=None, help="evaluation batch size")
    p.add_argument("--bn-reestimate", type=count(0), default=0, metavar="N",
                   help="first re-estimate batch-norm statistics on N augmented CIFAR-10 "
                        "training images")
    p.add_argument("--seed", type=int, default=0, help="seed of the --bn-reestimate draw")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)


def cmd_models(args) -> int:
    from prunekit.models import list_models

    rows = [dict(name=m.name, task=m.task, dataset=m.dataset, pretrained=m.pretrained_available,
                 description=m.description) for m in list_models()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<18} {'task':<20} {'dataset':<9} {'weights':<8} description")
    for r in rows:
        print(f"{r['name']:<18} {r['task']:<20} {r['dataset'] or '-':<9} "
              f"{'yes' if r['pretrained'] else 'no':<8} {r['description']}")
    print(f"{'tv:<name>':<18} {'image-classification':<20} {'-':<9} {'no':<8} any torchvision "
          f"classification model (random init, or --weights FILE)")
    return 0


def cmd_eval(args) -> int:
    from prunekit.errors import PruneError
    from prunekit.evaluate import evaluate, lm_seq_len, reestimate_bn
    from prunekit.models import get_info, load_model
    from prunekit.models.llm import is_model_path

    custom = ":" in args.model and not args.model.startswith("tv:") \
        and not is_model_path(args.model)
    info = None if custom else get_info(args.model)
    if info is not None and args.dataset is None and info.dataset is None:
        raise PruneError(f"{info.name} has no standard data set; give --dataset")
    if custom and args.dataset is None:
        raise PruneError(f"{args.model} is your own model: say what to evaluate it on with "
                         f"--dataset")
    pretrained = bool(info and info.pretrained_available and not args.weights)
    model = load_model(args.model, weights=args.weights, pretrained=pretrained,
                       allow_pickle=args.allow_pickle)
    if args.bn_reestimate:
        from prunekit.data import calibration_images
        reestimate_bn(model, calibration_images(args.bn_reestimate, seed=args.seed, augment=True),
                      progress=not args.quiet)
    metrics = evaluate(model, info, split=args.split, limit=args.limit,
                       batch_size=args.batch_size, dataset=args.dataset,
                       progress=not args.quiet, seq_len=args.seq_len, windows=args.windows)
    extra = {}
    if "perplexity" in metrics:
        extra = dict(dataset=args.dataset or info.dataset, seq_len=lm_seq_len(model, args.seq_len),
                     windows=args.windows)
    if args.json:
        print(json.dumps(dict(model=args.model, weights=args.weights, split=args.split,
                              limit=args.limit, bn_reestimate=args.bn_reestimate, **extra,
                              **metrics)))
    else:
        for k, v in metrics.items():
            print(f"{k}: {v:.4f}")
    return 0
