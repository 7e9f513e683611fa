"""Which form of first-order Taylor importance keeps the most accuracy (issue 4's "Taylor
above L1" target), on the structured benchmark's case: pretrained ResNet-56 on CIFAR-10 with
half of every block's inner channels removed, then the same short fine-tune.

Forms, each scored over the same labelled calibration images:
- taylor: prunekit's criterion, (sum of g*w over the slices that read the channel, here
  the next convolution's input slice)^2 per micro-batch of 8: exactly the first-order loss
  change of removing the channel (the "gate" form of Molchanov et al. 2019);
- taylor-group-sum: the same over every slice of the coupled group (filter, batch norm and
  input slice), prunekit's criterion before the gate form (`taylor_scores(..., "group")`);
- taylor-per-weight: prunekit's taylor_weight, the sum over the group of (g*w)^2, per batch of
  64 (their per-parameter form);
- torch-pruning-taylor / torch-pruning-l1: Torch-Pruning's own criteria (|g*w| summed over
  the whole calibration gradient; L1), as in the structured benchmark;
- l1: prunekit's filter norm, the baseline to beat;
- taylor, BN in train mode: the gate form with batch norms normalising by the micro-batch's
  own statistics, as during training, where Molchanov et al. score (running statistics
  left unchanged); micro-batches of 64 and 32 images.
Each pruned model is fine-tuned once per --ft-seeds seed (the swing between seeds shows
what difference is noise). Results go to
benchmarks/results/taylor_variants/taylor_variants.json (--out), with the run's provenance;
a rerun with the same settings resumes.

The pretrained model fits its training images (the script prints and records the
cross-entropy on both calibration sets), so their gradients carry little signal. The
"(held-out)" rows score the Taylor forms on --heldout test images that the model never saw
instead, as a user with a validation split would; top-1 is then measured on the other test
images only.

    python benchmarks/studies/taylor_variants.py --threads 2 --quiet
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from prunekit.bench.provenance import load_result, provenance, write_result
from prunekit.data import cifar10_tensors
from prunekit.evaluate import top1_accuracy
from prunekit.models import create
from prunekit.progress import Progress
from prunekit.structured import ChannelPrune, build_graph, score, shrink, taylor_scores
from prunekit.structured.importance import default_loss

BENCHMARKS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCHMARKS))  # the structured benchmark's fine-tune and Torch-Pruning
from structured import balanced_subset, fine_tune, have_torch_pruning, tp_prune  # noqa: E402

RESULTS = BENCHMARKS / "results" / "taylor_variants"


def bn_train_copy(model: nn.Module) -> nn.Module:
    """A copy whose batch norms keep their running statistics (momentum 0) when run in
    train mode, so that scoring can normalise by batch statistics as training does."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0
    return model


def bn_train_loss(model, batch):
    """The default loss with every batch norm in train mode (Molchanov et al. score during
    training, where the loss on training images is far from zero)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
    return default_loss(model, batch)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-images", type=int, default=5000)
    p.add_argument("--test-images", type=int, default=8000)
    p.add_argument("--heldout", type=int, default=1024,
                   help="last test images used as held-out calibration (0: none)")
    p.add_argument("--calib", type=int, default=1024)
    p.add_argument("--ft-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "taylor_variants.json"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = create("resnet56-cifar10", pretrained=True).eval()
    example = torch.randn(1, 3, 32, 32)
    xt, yt = cifar10_tensors("test")
    if args.test_images + args.heldout > len(xt):
        p.error(f"--test-images + --heldout must be at most {len(xt)}")
    held = list(zip(xt[len(xt) - args.heldout:].split(64), yt[len(xt) - args.heldout:].split(64),
                    strict=True))
    xt, yt = xt[:args.test_images], yt[:args.test_images]
    xtr, ytr = cifar10_tensors("train")
    xtr, ytr = balanced_subset(xtr, ytr, max(args.train_images, args.calib), 0)
    calib = list(zip(xtr[:args.calib].split(64), ytr[:args.calib].split(64), strict=True))
    ftx, fty = xtr[:args.train_images], ytr[:args.train_images]
    half = ChannelPrune(per_layer={"layer*.conv1": 0.5})
    graph = build_graph(base, example)
    forms = {
        "l1": lambda: score(base, graph, "l1"),
        "taylor": lambda: score(base, graph, "taylor", calib),
        "taylor-group-sum": lambda: taylor_scores(base, graph, calib, "group"),
        "taylor-per-weight": lambda: score(base, graph, "taylor_weight", calib, micro_batch=64),
    }
    for size in (64, 32):
        forms[f"taylor, BN in train mode, batch {size}"] = (
            lambda size=size: score(bn_train_copy(base), graph, "taylor", calib,
                                    loss_fn=bn_train_loss, micro_batch=size))
    if have_torch_pruning():
        forms["torch-pruning-l1"] = forms["torch-pruning-taylor"] = None
    if args.heldout:
        forms["taylor (held-out)"] = lambda: score(base, graph, "taylor", held)
        forms["taylor-group-sum (held-out)"] = lambda: taylor_scores(base, graph, held,
                                                                     "group")
        if have_torch_pruning():
            forms["torch-pruning-taylor (held-out)"] = None
    out = Path(args.out)
    # the settings that decide the rows (where they are written and --quiet do not)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "quiet")}
    results = {"config": config, "rows": {}}
    old = load_result(out)
    if old and {k: v for k, v in old["config"].items() if k not in ("out", "quiet")} == config:
        # resume: keep the rows of a run with the same settings, and that run's record
        results["rows"] = {k: v for k, v in old["rows"].items() if k in forms}
        results.update({k: old[k] for k in ("provenance", "earlier_provenance") if k in old})
    prov = provenance(argv, script=__file__, threads=args.threads)
    with torch.no_grad():  # how much the gradients have to work with
        for key, model, loss_fn, batches in (
                ("loss_calibration", base, default_loss, calib),
                ("loss_heldout", base, default_loss, held),
                ("loss_calibration_bn_train", bn_train_copy(base), bn_train_loss, calib)):
            if batches:
                results[key] = (sum(float(loss_fn(model, b)) * len(b[1]) for b in batches)
                                / sum(len(b[1]) for b in batches))
    write_result(out, results, prov, indent=2)
    with Progress(enabled=not args.quiet) as bar:
        task = bar.add("forms", total=len(forms))
        for name, scorer in forms.items():
            if name in results["rows"]:
                bar.advance(task)
                continue
            t0 = time.time()
            if scorer is None:
                crit = name.split()[0].rsplit("-", 1)[1]
                pruned = tp_prune(copy.deepcopy(base), crit, 0.5,
                                  held if "held-out" in name else calib, example)
            else:
                pruned, _ = shrink(base, half, example, graph=graph, scores=scorer(),
                                   report_latency=False)
            row = {"prune_seconds": round(time.time() - t0, 1),
                   "top1_pruned": top1_accuracy(pruned, xt, yt), "top1_finetuned": {}}
            for seed in args.ft_seeds:
                tuned = fine_tune(copy.deepcopy(pruned), ftx, fty, 1, 64, 0.01, seed, True)
                row["top1_finetuned"][str(seed)] = top1_accuracy(tuned, xt, yt)
            row["mean_finetuned"] = statistics.mean(row["top1_finetuned"].values())
            results["rows"][name] = row
            write_result(out, results, prov, indent=2)
            bar.advance(task)
            if not args.quiet:
                print(name, row, flush=True)
    print("cross-entropy of the pretrained model: "
          + ", ".join(f"{k[5:]} {results[k]:.4f}" for k in (
              "loss_calibration", "loss_heldout", "loss_calibration_bn_train") if k in results))
    print(f"{'form':<36}{'pruned':>8}  fine-tuned per seed  mean")
    for name, row in results["rows"].items():
        seeds = " ".join(f"{v:6.2f}" for v in row["top1_finetuned"].values())
        print(f"{name:<36}{row['top1_pruned']:8.2f}  {seeds:<20}{row['mean_finetuned']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
