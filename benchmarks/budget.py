"""Per-layer budgets at equal CPU speedup, and WoodFisher against global magnitude.

Part 1, for each model (ResNet-20 on CIFAR-10, MiniLM on STS-B) and speedup target (1.5x,
2x): SparseGPT one-shot with three budgets: uniform (one sparsity everywhere), global (one
magnitude threshold) and SPDY (DP + local search over the sensitivity database). Each budget
is first sized by the measured per-layer latency table; the pruned model is then converted
to the fastest kernel per layer and its speedup over the dense model measured side by side.
Layers timed alone mispredict the whole model, so the predicted target is rescaled and the
model pruned again until the measured speedup lands in [target, target x (1 + --band)]
(prunekit.budget.prune_for_speedup, up to --rounds prunes; every round is recorded). A
model that reaches the target, or misses it by less than --band, is measured --confirm more
times and judged by the mean, so that one lucky or unlucky measurement on this shared
machine does not decide.
The model is then evaluated (CIFAR-10 test top-1 after BN re-estimation; STS-B test
Spearman).

Part 2: WoodFisher at 70% and 90% global sparsity on ResNet-20 against global magnitude
(both one-shot, BN re-estimated, no fine-tuning).

    python benchmarks/budget.py                          # everything (long on 2 cores)
    python benchmarks/budget.py --models resnet20 --eval-limit 2000 --steps 60
    python benchmarks/budget.py --models minilm --pattern 1x16 \
        --out benchmarks/results/budget/budget_1x16.json

The latency table times each layer inside the whole model (see
prunekit.budget.build_latency_table); --timing cold times each layer alone with the caches
flushed, as the tables of budget_1x16.json and budget_1x16_b1.json were.

--pattern 1xN prunes N-row blocks (SparseGPT supports it) and adds the 1xN block kernel to
the latency table and the conversion, so high levels can buy more speed than CSR gives.

Rows are written to benchmarks/results/budget/budget.json (--out) as they finish, with the
run's provenance; a rerun skips them, and refuses to add rows timed under another allocator.
The latency table is cached per machine (prunekit.budget.build_latency_table).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch.nn.functional as F

from prunekit import Magnitude, SparseGPT, prune
from prunekit.bench.provenance import load_result, provenance, recorded, write_result
from prunekit.budget import (
    Unreachable,
    build_database,
    build_latency_table,
    prune_for_speedup,
    total_sparsity,
    unfit_layers,
)
from prunekit.budget.latency_table import TIMINGS
from prunekit.commands.common import add_malloc_option, allocator_conflict, apply_malloc_option
from prunekit.errors import PruneError
from prunekit.layers import find_layers
from prunekit.patterns import Block1xN, get_pattern
from prunekit.runtime.latency import num_threads

RESULTS = Path(__file__).resolve().parent / "results" / "budget"
LEVELS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
NAMES = {"resnet20": "resnet20-cifar10", "minilm": "minilm"}


def quality(model, name, limit):
    from prunekit.evaluate import evaluate
    return evaluate(model, name, split="test", limit=limit)


def finish(model, name):
    """BN re-estimation for CNNs (every budget gets the same) on 1024 augmented training
    images, as the statistics were learnt: plain images cost the dense ResNet-20 3 points."""
    if name.startswith("resnet"):
        from prunekit.data import calibration_images
        from prunekit.evaluate import reestimate_bn
        reestimate_bn(model, calibration_images(1024, seed=1, augment=True))
    return model


def kernels_for(pattern: str) -> tuple[str, ...]:
    """Kernels the table and the conversion choose from: 1xN weights can use the block
    kernel, unstructured ones only CSR."""
    if isinstance(get_pattern(pattern), Block1xN):
        return ("dense", "csr", "block")
    return ("dense", "csr")


def part1(model_key, args, results, save):
    from prunekit.models import calibration_batches, create

    name = NAMES[model_key]
    dense = create(name, pretrained=True).eval()
    calib = calibration_batches(name, n=args.calib, seed=0, batch_size=32)
    timed_batch = calibration_batches(name, n=args.batch, seed=1, batch_size=args.batch)[0]
    skip = unfit_layers(dense, args.pattern)
    layers = find_layers(dense, exclude=skip)
    t0 = time.perf_counter()
    table = build_latency_table(dense, timed_batch, LEVELS, pattern=args.pattern, exclude=skip,
                                kernels=kernels_for(args.pattern), repeats=args.repeats,
                                progress=not args.quiet, timing=args.timing)
    method = SparseGPT(pattern=args.pattern)
    tag = "" if args.pattern == "unstructured" else f"{args.pattern}/"
    results.setdefault("tables", {})[model_key] = {"path": table.path, "timing": args.timing,
                                                   "max_speedup": table.max_speedup(),
                                                   "dense_ms": 1e3 * table.dense_total,
                                                   "seconds": time.perf_counter() - t0}
    key = f"{model_key}/dense"
    if key not in results["rows"]:
        results["rows"][key] = {"model": model_key, "budget": "dense",
                                "quality": quality(dense, name, args.eval_limit)}
        save()
    print(f"{model_key}: dense {results['rows'][key]['quality']}, table max predicted "
          f"speedup {table.max_speedup():.2f}x", flush=True)
    db = None
    for target in args.targets:
        for kind in ("uniform", "global", "spdy"):
            key = f"{model_key}/{tag}{target}x/{kind}"
            if key in results["rows"]:
                print(results["rows"][key], flush=True)
                continue
            row = {"model": model_key, "target_speedup": target, "budget": kind,
                   "pattern": args.pattern}
            if kind == "spdy" and db is None:
                db = build_database(dense, method, calib, LEVELS, exclude=skip,
                                    progress=not args.quiet)
            model = copy.deepcopy(dense)
            try:
                res = prune_for_speedup(model, method, calib, timed_batch, target, kind,
                                        table=table, database=db, exclude=skip,
                                        kernels=kernels_for(args.pattern), steps=args.steps,
                                        rounds=args.rounds, band=args.band,
                                        confirm=args.confirm, repeats=args.repeats,
                                        progress=not args.quiet)
            except Unreachable as e:
                row["unreachable"] = str(e)
                row["best_reachable"] = e.best
                results["rows"][key] = row
                save()
                print(key, row, flush=True)
                continue
            finish(model, name)
            if res.search_loss is not None:
                row["search_loss"] = res.search_loss
            row["predicted_target"] = res.predicted_target
            row["predicted_speedup"] = res.predicted_speedup
            row["measured_speedup"] = res.measured
            row["rounds"] = res.rounds
            row["sparsity"] = total_sparsity(layers, res.budget)
            row["budget_levels"] = res.budget
            row["kernels"] = res.timings[-1]["kernels"]
            row["timings"] = res.timings  # every measurement of the chosen model
            row["quality"] = quality(model, name, args.eval_limit)
            results["rows"][key] = row
            save()
            print(key, {k: v for k, v in row.items() if k != "budget_levels"}, flush=True)


def part2(args, results, save):
    from prunekit.data import cifar10_tensors
    from prunekit.models import create
    from prunekit.oneshot.methods.woodfisher import WoodFisher

    name = NAMES["resnet20"]
    x, y = cifar10_tensors("train", limit=args.wf_grads * args.wf_batch)
    batches = list(zip(x.split(args.wf_batch), y.split(args.wf_batch)))
    for s in (0.7, 0.9):
        for kind in ("global_magnitude", "woodfisher"):
            key = f"resnet20/woodfisher-part/{s}/{kind}"
            options = (dict(num_grads=args.wf_grads, grad_batch=args.wf_batch,
                            block_size=args.wf_block, steps=args.wf_steps,
                            dampening=args.wf_damp) if kind == "woodfisher" else {})
            if key in results["rows"] and results["rows"][key].get("options", {}) == options:
                print(results["rows"][key], flush=True)
                continue
            model = create(name, pretrained=True).eval()
            t0 = time.perf_counter()
            if kind == "woodfisher":
                cfg = WoodFisher(sparsity=s, num_grads=args.wf_grads,
                                 block_size=args.wf_block, steps=args.wf_steps,
                                 dampening=args.wf_damp)
                cfg.prune_global(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), batches,
                                 progress=not args.quiet)
            else:
                prune(model, Magnitude(sparsity=s, scope="global"), progress=False)
            seconds = time.perf_counter() - t0
            q_raw = quality(model, name, args.eval_limit)
            finish(model, name)
            row = {"sparsity": s, "method": kind, "options": options, "seconds": seconds,
                   "top1_no_bn": q_raw,
                   "quality": quality(model, name, args.eval_limit)}
            results["rows"][key] = row
            save()
            print(key, row, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet20,minilm")
    p.add_argument("--targets", default="1.5,2.0")
    p.add_argument("--pattern", default="unstructured",
                   help="SparseGPT's pattern: unstructured, or 1xN (e.g. 1x16: block kernel)")
    p.add_argument("--threads", type=int, default=1)
    add_malloc_option(p)
    p.add_argument("--batch", type=int, default=64, help="batch size the speedup is measured at")
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--steps", type=int, default=100, help="SPDY search steps")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--rounds", type=int, default=5,
                   help="prune-convert-measure rounds per budget to land the measured speedup "
                        "in [target, target x (1 + band)] (1: trust the latency table)")
    p.add_argument("--band", type=float, default=0.05)
    p.add_argument("--timing", default="model", choices=TIMINGS,
                   help="how the latency table times a layer: inside the whole model (model), "
                        "alone with caches flushed (cold), or alone call after call (hot)")
    p.add_argument("--confirm", type=int, default=1,
                   help="extra measurements of a model that reaches the target or nearly "
                        "(the mean decides)")
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--wf-grads", type=int, default=128)
    p.add_argument("--wf-batch", type=int, default=16)
    p.add_argument("--wf-block", type=int, default=128)
    p.add_argument("--wf-steps", type=int, default=16,
                   help="WoodFisher rounds (fresh gradients each); 4 lost to magnitude at 90%%")
    p.add_argument("--wf-damp", type=float, default=0.1,
                   help="WoodFisher dampening, as a fraction of the Fisher's mean diagonal")
    p.add_argument("--skip-woodfisher", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "budget.json"))
    args = p.parse_args(argv)
    args.targets = [float(t) for t in args.targets.split(",")]
    try:
        get_pattern(args.pattern)
    except PruneError as e:
        p.error(f"--pattern: {e}")
    out = Path(args.out)
    results = load_result(out)  # rows kept from earlier runs keep those runs' provenance
    apply_malloc_option(args)
    conflict = results.get("rows") and allocator_conflict(
        {"malloc": recorded(results, "allocator")}, out)
    if conflict:
        p.error(conflict)
    prov = provenance(argv, script=__file__, threads=args.threads)
    results.setdefault("rows", {})

    def save():
        write_result(out, results, prov)

    with num_threads(args.threads):
        for m in filter(None, args.models.split(",")):  # --models "" runs only WoodFisher
            if m not in NAMES:
                p.error(f"unknown model {m}; choose from {', '.join(NAMES)}")
            part1(m, args, results, save)
        if not args.skip_woodfisher:
            part2(args, results, save)
    save()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
