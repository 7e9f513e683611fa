"""`prunekit latency MODEL`: time a model as a user would (warm-up, median, threads, batch
sizes), dense and, with --sparse, converted to the fastest kernel per layer."""

from __future__ import annotations

import json
import sys

from prunekit.commands import COMMANDS
from prunekit.commands.common import add_malloc_option, apply_malloc_option
from prunekit.errors import PruneError
from prunekit.runtime.kernels import KERNELS
from prunekit.runtime.latency import check_count, check_threads


@COMMANDS.register("latency")
def register(sub) -> None:
    p = sub.add_parser("latency", help="measure a model's inference latency (median of runs)")
    p.add_argument("model", help="registry name (see `prunekit models`) or module:function")
    p.add_argument("--weights", help="safetensors weights to load (e.g. a pruned model)")
    p.add_argument("--pretrained", action="store_true", help="load the registry's weights")
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    p.add_argument("--repeats", type=int, default=20, help="timed calls; the median is shown")
    p.add_argument("--sparse", action="store_true",
                   help="also convert to sparse kernels (chosen per layer by measurement) "
                        "and report the speedup")
    p.add_argument("--kernels", default=None, metavar="NAMES",
                   help="with --sparse: the kernels to try, comma-separated (default: all). "
                        + KERNELS.help())
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_malloc_option(p)
    p.set_defaults(func=cmd_latency)


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise PruneError(f"--batch-sizes takes integers like 1,16,128; got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise PruneError(f"--batch-sizes needs positive integers, got {text!r}")
    return sizes


def sample_batch(model_name: str, batch_size: int):
    """A real input batch of the model's own data, of the given size."""
    from prunekit.models import calibration_batches

    if ":" in model_name and not model_name.startswith("tv:"):
        raise PruneError(f"prunekit draws inputs only for registry models; time {model_name} "
                         f"with prunekit.runtime.measure_latency from Python")
    if model_name.startswith("tv:"):
        import torch
        return torch.randn(batch_size, 3, 224, 224)
    return calibration_batches(model_name, n=batch_size, seed=0, batch_size=batch_size)[0]


def cmd_latency(args) -> int:
    from prunekit.models import load_model
    from prunekit.runtime import convert, measure_latency
    from prunekit.runtime.convert import check_kernels

    sizes = _batch_sizes(args.batch_sizes)
    check_threads(args.threads)
    check_count(args.warmup, "--warmup", least=0)
    check_count(args.repeats, "--repeats")
    kernels = None
    if args.kernels is not None:
        if not args.sparse:
            raise PruneError("--kernels chooses the kernels of --sparse; add --sparse")
        kernels = check_kernels([k.strip() for k in args.kernels.split(",") if k.strip()])
    apply_malloc_option(args)
    model = load_model(args.model, weights=args.weights, pretrained=args.pretrained)
    rows = []
    for b in sizes:
        batch = sample_batch(args.model, b)
        models = {"dense": model}
        report = None
        if args.sparse:
            models["sparse"], report = convert(model, batch, kernels=kernels,
                                               threads=args.threads, progress=not args.quiet)
        r = measure_latency(models, batch, warmup=args.warmup, repeats=args.repeats,
                            threads=args.threads)
        row = {"batch": b, "dense_ms": r["dense"]["median_ms"],
               "dense_p10_ms": r["dense"]["p10_ms"], "dense_p90_ms": r["dense"]["p90_ms"],
               "machine": r["machine"]}
        if args.sparse:
            row["sparse_ms"] = r["sparse"]["median_ms"]
            row["speedup"] = row["dense_ms"] / row["sparse_ms"]
            row["kernels"] = {lc.name: lc.kernel for lc in report.layers}
        rows.append(row)
    if args.json:
        json.dump({"model": args.model, "rows": rows}, sys.stdout, indent=2)
        print()
        return 0
    m = rows[0]["machine"]
    print(f"{args.model} on {m['cpu']}, {m['threads']} thread(s), {m['malloc']} malloc, median "
          f"of {args.repeats} after {args.warmup} warm-up calls")
    for row in rows:
        line = (f"batch {row['batch']:>4}: dense {row['dense_ms']:.3f} ms "
                f"(p10 {row['dense_p10_ms']:.3f}, p90 {row['dense_p90_ms']:.3f})")
        if args.sparse:
            used = sorted(set(row["kernels"].values()))
            line += (f"  sparse {row['sparse_ms']:.3f} ms  speedup {row['speedup']:.2f}x "
                     f"(kernels: {', '.join(used)})")
        print(line)
    return 0
