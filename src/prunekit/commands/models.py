"""`prunekit models` and `prunekit eval`."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("models", help="list the models in the registry")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("eval", help="evaluate a model on its standard dataset")
    p.add_argument("model", help="registry name, or module:function with --dataset-of")
    p.add_argument("--weights", help="safetensors weights to evaluate (e.g. a pruned model)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept a pickle checkpoint for --weights (runs code: trusted files only)")
    p.add_argument("--split", default="test", help="test (default) or the train/dev side")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples")
    p.add_argument("--bn-reestimate", type=int, default=0, metavar="N",
                   help="re-estimate batch-norm statistics on N training images first")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
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
    print("tv:<name>          any torchvision classification model (random init or --weights)")
    return 0


def cmd_eval(args) -> int:
    from prunekit.data import calibration_images
    from prunekit.evaluate import evaluate, reestimate_bn
    from prunekit.models import get_info, load_model

    info = get_info(args.model)
    model = load_model(args.model, weights=args.weights, pretrained=not args.weights,
                       allow_pickle=args.allow_pickle)
    if args.bn_reestimate:
        reestimate_bn(model, calibration_images(args.bn_reestimate, seed=1))
    metrics = evaluate(model, info, split=args.split, limit=args.limit)
    if args.json:
        print(json.dumps(dict(model=args.model, weights=args.weights, **metrics)))
    else:
        for k, v in metrics.items():
            print(f"{k}: {v:.4f}")
    return 0
