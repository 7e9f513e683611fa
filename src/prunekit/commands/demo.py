"""`prunekit demo`: prune pretrained models with each method and show what quality is kept.

MiniLM (STS-B test Spearman) with magnitude, Wanda and SparseGPT at 50% and 2:4; ResNet-20
(CIFAR-10 test top-1, batch-norm re-estimated after pruning) with the same methods and exact
OBS at 50% and 70%; SmolLM2-135M (WikiText-2 perplexity on a few test windows) with the
three methods at 50%, and its decode speed on the int4 kernel next to the dense model.
Where the shared data are missing it says so and runs what it can: the digits CNN needs
only scikit-learn, and MiniLM falls back to the cosine of its embeddings to the dense
model's.
"""

from __future__ import annotations

import copy
import json
import sys
import time

import torch

from prunekit.commands import COMMANDS
from prunekit.commands.common import count
from prunekit.errors import PruneError


@COMMANDS.register("demo")
def register(sub) -> None:
    p = sub.add_parser("demo", help="prune pretrained MiniLM and ResNet-20 with every method")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the tables as JSON")
    p.add_argument("--limit", type=count(1), default=2000,
                   help="evaluate ResNet-20 on the first N test images (default 2000; all: 10000)")
    p.add_argument("--calib", type=count(1), default=64,
                   help="calibration samples per model (sequences for MiniLM, images for "
                        "ResNet-20)")
    p.add_argument("--llm-windows", type=count(0), default=2,
                   help="WikiText-2 test windows of 1024 tokens for SmolLM2's perplexity "
                        "(default 2; 0 skips the LLM section)")
    p.set_defaults(func=cmd_demo)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run_rows(name, dense, configs, calib, quality, quiet, after=None):
    """Prune a fresh copy of `dense` with each config; one table row per config."""
    from prunekit.oneshot.prune import prune

    before = quality(dense)
    rows = []
    for cfg in configs:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = prune(model, cfg, calib if cfg.needs != "none" else None, progress=not quiet)
        seconds = time.perf_counter() - start
        if after:
            after(model)
        rows.append(dict(model=name, method=cfg.method, pattern=report.pattern,
                         sparsity=round(report.sparsity, 4), before=before,
                         after=quality(model), prune_seconds=round(seconds, 2)))
        if not quiet:
            _say(f"  {name} {cfg.method} {report.pattern} {report.target_sparsity:.0%}: "
                 f"{rows[-1]['after']:.2f} ({seconds:.1f} s)")
    return rows


def _minilm(args):
    from prunekit import Magnitude, SparseGPT, Wanda
    from prunekit.evaluate import fidelity, stsb_spearman
    from prunekit.models import calibration_batches, create

    dense = create("minilm", pretrained=True).eval()
    configs = [Magnitude(sparsity=0.5), Wanda(sparsity=0.5, pattern="unstructured:row"),
               SparseGPT(sparsity=0.5)]
    configs += [cls(pattern="2:4") for cls in (Magnitude, Wanda, SparseGPT)]
    try:
        from prunekit.data import load_stsb
        pairs = load_stsb("test")
        metric = "STS-B test Spearman x100"

        def quality(m):
            return round(stsb_spearman(m, dense.tokenizer, pairs), 2)
        calib = calibration_batches("minilm", n=8 * args.calib, seed=0)  # STS-B dev sentences
    except PruneError as e:
        _say(f"STS-B / WikiText-2 not found ({e}); MiniLM is scored by the cosine of its "
             f"embeddings to the dense model's, calibrated on built-in sentences")
        sentences = [f"Example sentence number {i} about pruning neural networks."
                     for i in range(32)]
        enc = dense.tokenizer(sentences, padding=True, return_tensors="pt")
        calib = [dict(enc)]
        metric = "embedding cosine to dense x100"

        def quality(m):
            return round(100 * fidelity(dense, m, calib)["embedding_cosine"], 2)
    return metric, _run_rows("MiniLM-L6", dense, configs, calib, quality, args.quiet)


def _resnet20(args):
    from prunekit import OBS, Magnitude, SparseGPT, Wanda
    from prunekit.data import calibration_images, cifar10_tensors
    from prunekit.evaluate import reestimate_bn, top1_accuracy
    from prunekit.models import create

    images, labels = cifar10_tensors("test", limit=args.limit)
    dense = create("resnet20-cifar10", pretrained=True).eval()
    calib_images = calibration_images(args.calib, seed=0)
    calib = list(calib_images.split(32))
    bn_images = calibration_images(1024, seed=1, augment=True)  # as in training
    configs = []
    for s in (0.5, 0.7):
        configs += [Magnitude(sparsity=s), Wanda(sparsity=s, pattern="unstructured:row"),
                    SparseGPT(sparsity=s), OBS(sparsity=s)]

    def quality(m):
        return round(top1_accuracy(m, images, labels), 2)

    rows = _run_rows("ResNet-20", dense, configs, calib, quality, args.quiet,
                     after=lambda m: reestimate_bn(m, bn_images))
    n = len(labels)
    return f"CIFAR-10 test top-1 % ({n} images, BN re-estimated)", rows


def _smollm2(args):
    from prunekit import Magnitude, SparseGPT, Wanda
    from prunekit.data import load_wikitext2
    from prunekit.evaluate import evaluate
    from prunekit.models import calibration_batches, create
    from prunekit.runtime.decode import int4_speed_and_perplexity

    load_wikitext2("test")  # before the model: without the text there is nothing to score
    load_wikitext2("valid")
    dense = create("smollm2-135m", pretrained=True).eval()
    calib = calibration_batches("smollm2-135m", n=8, seq_len=256, seed=0,
                                tokenizer=dense.tokenizer)
    common = dict(sparsity=0.5, exclude=("lm_head",), sequential=True)
    configs = [Magnitude(sparsity=0.5, exclude=("lm_head",)), Wanda(**common),
               SparseGPT(**common)]

    def quality(m):
        return round(evaluate(m, "smollm2-135m", windows=args.llm_windows)["perplexity"], 2)

    rows = _run_rows("SmolLM2-135M", dense, configs, calib, quality, args.quiet)
    del dense
    if not args.quiet:
        _say("  SmolLM2-135M int4 (RTN, groups of 64) on the int4 kernel ...")
    speed = int4_speed_and_perplexity(windows=args.llm_windows, tokens=16, threads=None)
    rows.append(dict(model="SmolLM2-135M", method="rtn int4", pattern="dense",
                     sparsity=0.0, before=round(speed["dense_perplexity"], 2),
                     after=round(speed["perplexity"], 2), prune_seconds=0.0,
                     decode_tokens_per_s=round(speed["decode_tokens_per_s"], 1),
                     dense_decode_tokens_per_s=round(speed["dense_decode_tokens_per_s"], 1)))
    return (f"WikiText-2 test perplexity ({args.llm_windows} windows of 1024 tokens; lower "
            f"is better)", rows)


def _digits(args):
    from prunekit import OBS, Magnitude, SparseGPT, Wanda
    from prunekit.data import load_digits
    from prunekit.evaluate import top1_accuracy
    from prunekit.models import calibration_batches, create

    dense = create("digits-cnn", pretrained=True).eval()
    images, labels = load_digits("test")
    calib = calibration_batches("digits-cnn", n=args.calib, seed=0)
    configs = [cls(sparsity=0.7) for cls in (Magnitude, Wanda, SparseGPT, OBS)]

    def quality(m):
        return round(top1_accuracy(m, images, labels), 2)

    return "digits test top-1 %", _run_rows("digits-CNN", dense, configs, calib, quality,
                                            args.quiet)


def _table(title: str, metric: str, rows: list[dict]) -> str:
    lines = [f"\n{title}: quality = {metric}",
             f"{'method':<11} {'pattern':<17} {'sparsity':>8} {'before':>8} {'after':>8} "
             f"{'prune s':>8}"]
    for r in rows:
        lines.append(f"{r['method']:<11} {r['pattern']:<17} {r['sparsity']:>8.3f} "
                     f"{r['before']:>8.2f} {r['after']:>8.2f} {r['prune_seconds']:>8.1f}")
        if "decode_tokens_per_s" in r:
            lines[-1] += (f"   decode {r['decode_tokens_per_s']:.1f} tokens/s on the int4 "
                          f"kernel, dense {r['dense_decode_tokens_per_s']:.1f}")
    return "\n".join(lines)


def cmd_demo(args) -> int:
    torch.manual_seed(0)
    start = time.perf_counter()
    tables = []
    sections = [("MiniLM-L6 sentence encoder", _minilm), ("ResNet-20 on CIFAR-10", _resnet20)]
    if args.llm_windows:
        sections.append(("SmolLM2-135M causal LM", _smollm2))
    for title, fn in sections:
        if not args.quiet:
            _say(f"{title} ...")
        try:
            metric, rows = fn(args)
        except PruneError as e:
            _say(f"skipping {title}: {e}")
            if fn is _resnet20:
                _say("running the digits CNN instead (scikit-learn's bundled digits)")
                metric, rows = _digits(args)
                title = "digits CNN (scikit-learn digits)"
            else:
                continue
        tables.append(dict(title=title, metric=metric, rows=rows))
        if not args.json:
            print(_table(title, metric, rows), flush=True)
    total = time.perf_counter() - start
    if args.json:
        print(json.dumps(dict(tables=tables, seconds=round(total, 1)), indent=2))
    else:
        print(f"\ndemo finished in {total:.0f} s")
    return 0 if tables else 1
