"""Which compression family wins at equal measured speedup.

Every cell is one family at one seed, compressed until its measured speedup over the dense
model lands in [target, target x (1 + --band)] (batch --batch, --threads thread(s), freed
memory kept, dense and compressed timed side by side: prunekit.budget.meet_measured_speedup
and the loops built on it), then given the same short fine-tune, and timed again. A family
that cannot reach the target records the best it measured.

Sections (--sections):
- layer_error: data-aware SVD against plain SVD at equal rank on every MiniLM layer, the
  relative output error on the calibration rows and on held-out rows (target: >= 2x lower).
- resnet56: ResNet-56 on CIFAR-10 at --target (1.5x): uniform L1 channels, the DP-width
  budget, AMC, ALDS low-rank (measured-latency table), uniform-rank SVD (ALDS's baseline),
  1x16 sparse with SPDY; then the same fine-tune (benchmarks/structured.py's: SGD, cosine,
  standard augmentation, one pass over a class-balanced --train-images subset) for each,
  top-1 on the first --test-images test images; --seeds seeds (calibration draw, fine-tune
  subset and order, AMC's agent).
- minilm: MiniLM on STS-B at --minilm-target (1.5x), no fine-tune: heads and neurons
  shrunk (uniform and DP), data-aware low-rank SVD, ALDS, 1x16 sparse with SPDY; STS-B
  test Spearman.
- smollm2: SmolLM2-135M at --llm-target (1.3x) measured prefill of --llm-tokens tokens:
  data-aware SVD (lowrank_for_speedup), and width (structured.llm: MLP neurons alone, or
  with 6 of 9 query heads, 2 per key/value group; activation scores and least-squares
  refit), the least cut that reaches the target; perplexity on the 8 steering windows; and
  data-aware vs plain SVD layer error on a spread of its blocks.

Families that need the refactored structured package (uniform channels, DP widths, AMC)
are recorded as pending where it is missing. Results go to --out-dir (one JSON per section,
written atomically after every cell, and summary.md); a rerun with the same settings skips
finished cells, so an interrupted run resumes. Provenance (prunekit.bench.provenance:
command, git commit, torch, CPU, threads, allocator) is in every file, with the machine's load
average when each run started (the 2 cores are shared).

    python benchmarks/equal_speedup.py --sections layer_error
    python benchmarks/equal_speedup.py --sections resnet56 --families alds,sparse-1x16-spdy
    python benchmarks/equal_speedup.py            # everything: hours on 2 shared cores
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from prunekit.bench.provenance import load_result, provenance, write_result
from prunekit.budget import Unreachable, converted_speedup, prune_for_speedup
from prunekit.commands.common import add_malloc_option, apply_malloc_option
from prunekit.io import atomic_write_text
from prunekit.lowrank import ALDS, SVD, lowrank_for_speedup
from prunekit.runtime import measure_latency
from prunekit.structured import count_flops, count_params

RESULTS = Path(__file__).parent / "results" / "equal_speedup"
RESNET_FAMILIES = ("uniform-l1", "dp-width", "amc", "alds", "svd-uniform", "sparse-1x16-spdy")
LLM_FAMILIES = ("svd-data-aware", "width-mlp", "width-heads-mlp")
MINILM_FAMILIES = ("uniform-width", "dp-width", "svd-data-aware", "svd-uniform", "alds",
                   "alds-data-aware", "sparse-1x16-spdy")
STRUCTURED = ("uniform-l1", "uniform-width", "dp-width", "amc")


class Store:
    """One section's results file: cells by key, written (atomically, with this run's
    provenance) after each."""

    def __init__(self, path: Path, settings: dict, args):
        self.path = path
        old = load_result(path) if not args.fresh else {}
        if old.get("settings") != settings:
            old = {}  # other settings: start over rather than mix
        self.data = old
        self.data["settings"] = settings
        if "runs" in self.data:  # records of runs before prunekit.bench.provenance
            self.data["earlier_runs"] = self.data.pop("runs")
        self.prov = provenance(threads=args.threads)
        self.data.setdefault("load_average", []).append([self.prov["date"], os.getloadavg()])
        self.data.setdefault("cells", {})

    @property
    def cells(self) -> dict:
        return self.data["cells"]

    def save(self) -> None:
        write_result(self.path, self.data, self.prov)


def speedup_of(dense, model, batch, repeats, sparse=False) -> float:
    """Dense over compressed median time, side by side (sparse: converted to the fastest
    kernel per layer first)."""
    if sparse:
        return converted_speedup(dense, model, batch, repeats=repeats)
    r = measure_latency({"dense": dense, "model": model}, batch, repeats=repeats)
    return r["dense"]["median_ms"] / r["model"]["median_ms"]


def log(args, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


# -- compression by family ----------------------------------------------------------------

def compress_lowrank(dense, config, calib, batch, target, args, budget):
    model = copy.deepcopy(dense)
    found = lowrank_for_speedup(model, config, calib, batch, target, budget=budget,
                                rounds=args.rounds, band=args.band, confirm=args.confirm,
                                repeats=args.repeats, progress=not args.quiet)
    return model, {"measured": found.measured, "kept_share": found.kept,
                   "budget": found.budget, "rounds": found.rounds,
                   "ranks": {lr.name: [lr.detail.get("groups"), lr.detail.get("rank")]
                             for lr in found.report.layers}}


def compress_sparse(dense, calib, batch, target, args):
    from prunekit import SparseGPT

    model = copy.deepcopy(dense)
    res = prune_for_speedup(model, SparseGPT(pattern="1x16"), calib, batch, target, "spdy",
                            steps=args.spdy_steps, rounds=args.rounds, band=args.band,
                            confirm=args.confirm, repeats=args.repeats,
                            progress=not args.quiet)
    return model, {"measured": res.measured, "predicted_target": res.predicted_target,
                   "rounds": res.rounds, "budget_levels": res.budget,
                   "skipped": list(res.skipped)}


def compress_structured(family, dense, batch, target, args, seed, cut, labelled, loss_fn,
                        evaluate):
    """Uniform widths, DP widths or AMC, each moved until the measured speedup lands."""
    from prunekit.budget.measured import meet_measured_speedup
    from prunekit.structured import ChannelPrune, build_graph, remove_slices, score
    from prunekit.structured.widths import amc_widths, shrink_for_speedup, width_table

    say = (lambda line: None) if args.quiet else (lambda line: log(args, f"  {line}"))
    if family in ("uniform-l1", "uniform-width", "dp-width"):
        dp = family == "dp-width"
        cfg = ChannelPrune(importance="l1", cut=cut, allocation="dp" if dp else "uniform")
        found = shrink_for_speedup(dense, cfg, batch, target, labelled if dp else None,
                                   loss_fn, step=args.width_step, rounds=args.rounds,
                                   band=args.band, confirm=args.confirm, repeats=args.repeats,
                                   progress=not args.quiet)
        info = {"measured": found.measured, "predicted_target": found.predicted_target,
                "rounds": found.rounds, "widths": found.widths}
        if found.table is not None:
            info["table"] = {"groups": [g.name for g in found.table.groups],
                             "widths": found.table.widths, "errors": found.table.errors,
                             "saving_s": found.table.saving["latency"],
                             "dense_s": found.table.base["latency"]}
        return found.model, info
    if family != "amc":
        raise ValueError(family)
    cfg = ChannelPrune(importance="l1", cut=cut)
    graph = build_graph(dense, batch)
    scores = score(dense, graph, "l1")
    table = width_table(dense, graph, scores, batch, cfg, metrics=("latency",),
                        step=args.width_step, repeats=args.repeats, log=say)
    searches = []

    def build(t: float) -> dict:
        try:
            result, widths = amc_widths(dense, table, scores, evaluate, "latency",
                                        table.base["latency"] / t, episodes=args.amc_episodes,
                                        seed=seed, max_seconds=60 * args.amc_minutes,
                                        progress=not args.quiet)
        except Unreachable as e:  # a time out of reach is a speedup out of reach
            raise Unreachable(str(e), table.base["latency"] / e.best) from None
        searches.append({"predicted_target": t, "seconds": result.seconds,
                         "episodes": len(result.history), "best_reward_accuracy":
                         result.accuracy, "stopped": result.stopped,
                         "history": [{k: h[k] for k in ("episode", "accuracy", "cost")}
                                     for h in result.history]})
        chosen = [c for g, w in zip(table.groups, widths)
                  for c in sorted(g.classes, key=lambda c: scores[c.id])[:len(g.classes) - w]]
        return {"model": remove_slices(dense, chosen), "widths": widths}

    def measure(c: dict) -> float:
        return speedup_of(dense, c["model"], batch, args.repeats)

    found = meet_measured_speedup(build, measure, target, rounds=args.amc_rounds,
                                  band=args.band, confirm=args.confirm, log=say)
    return found.model["model"], {"measured": found.measured,
                                  "predicted_target": found.predicted_target,
                                  "rounds": found.rounds, "widths": found.model["widths"],
                                  "amc": searches}


def compress(family, dense, calib, batch, target, args, seed, structured=None):
    """(model, info) for one family, or raise Unreachable / NotImplementedError.
    structured: (cut, labelled calibration, loss_fn, evaluate) for the width families."""
    if family == "alds":
        return compress_lowrank(dense, ALDS(rank_step=args.rank_step), calib, batch, target,
                                args, "latency")
    if family == "alds-data-aware":  # ALDS's allocation, data-aware errors (one group)
        return compress_lowrank(dense, ALDS(rank_step=args.rank_step, groups=(1,),
                                            data_aware=True), calib, batch, target, args,
                                "latency")
    if family == "svd-uniform":
        return compress_lowrank(dense, SVD(round_to=args.rank_step), calib, batch, target,
                                args, "flops")
    if family == "svd-data-aware":
        return compress_lowrank(dense, SVD(data_aware=True, round_to=args.rank_step), calib,
                                batch, target, args, "flops")
    if family == "sparse-1x16-spdy":
        return compress_sparse(dense, calib, batch, target, args)
    if family in STRUCTURED:
        if not _have_widths():
            raise NotImplementedError(f"{family}: needs prunekit.structured.widths (the "
                                      f"refactored structured package), not on this branch")
        return compress_structured(family, dense, batch, target, args, seed, *structured)
    raise ValueError(f"unknown family {family}")


def _have_widths() -> bool:
    try:
        import prunekit.structured.widths  # noqa: F401
    except ImportError:
        return False
    return True


# -- sections -------------------------------------------------------------------------------

def section_layer_error(args) -> dict:
    """Data-aware vs plain SVD at equal rank on every MiniLM layer."""
    from prunekit.layers import find_layers
    from prunekit.models import calibration_batches, create
    from prunekit.oneshot.calibrate import collect_stats
    from prunekit.oneshot.engine import layer_levels, relative_error

    settings = {"calib": args.calib_sentences, "levels": args.rank_ratios}
    store = Store(args.out_dir / "layer_error.json", settings, args)
    if "layers" in store.cells:
        return store.data
    model = create("minilm", pretrained=True).eval()
    calib = calibration_batches("minilm", n=args.calib_sentences, seed=0)
    held = calibration_batches("minilm", n=args.calib_sentences, seed=1)
    layers = find_layers(model)
    held_stats = collect_stats(model, layers, held)
    out = {}
    t0 = time.perf_counter()
    for aware in (False, True):
        weights, errors = layer_levels(model, SVD(data_aware=aware), calib, args.rank_ratios,
                                       progress=not args.quiet)
        for name, module in layers.items():
            w = module.weight.detach()
            row = out.setdefault(name, {"shape": list(w.shape)})
            row["data_aware" if aware else "plain"] = {
                "calib": errors[name],
                "held_out": [relative_error(w, new, held_stats[name], 1)
                             for new in weights[name]]}
    store.cells["layers"] = out
    store.cells["seconds"] = time.perf_counter() - t0
    ratios = {}
    for where in ("calib", "held_out"):
        for i, lv in enumerate(args.rank_ratios):
            r = [row["plain"][where][i] / row["data_aware"][where][i] for row in out.values()
                 if row["data_aware"][where][i] > 0]
            total_p = sum(row["plain"][where][i] for row in out.values())
            total_a = sum(row["data_aware"][where][i] for row in out.values())
            ratios[f"{where}/{lv:g}"] = {"median": statistics.median(r), "min": min(r),
                                         "geomean": statistics.geometric_mean(r),
                                         "layers": len(r), "summed": total_p / total_a}
    store.cells["ratios"] = ratios
    store.save()
    return store.data


def resnet_data(args, seed):
    from prunekit.data import cifar10_tensors
    from prunekit.models import calibration_batches
    from structured import balanced_subset

    calib = calibration_batches("resnet56-cifar10", n=args.calib, seed=seed)
    batch = calibration_batches("resnet56-cifar10", n=args.batch, seed=100 + seed,
                                batch_size=args.batch)[0]
    x, y = cifar10_tensors("train")
    xtr, ytr = balanced_subset(x, y, args.train_images, seed)
    # the width families' sensitivity batches and AMC's held-out reward batch: other
    # balanced draws of the train set
    xs, ys = balanced_subset(x, y, args.calib, 1000 + seed)
    xh, yh = balanced_subset(x, y, args.amc_images, 2000 + seed)
    labelled = list(zip(xs.split(64), ys.split(64), strict=True))
    return calib, batch, xtr, ytr, labelled, (xh, yh)


def section_resnet56(args) -> dict:
    from prunekit.data import cifar10_tensors
    from prunekit.evaluate import top1_accuracy
    from prunekit.models import create
    from structured import fine_tune

    settings = {k: getattr(args, k) for k in ("target", "batch", "threads", "calib",
                                              "train_images", "test_images", "epochs",
                                              "lr", "band", "rank_step", "spdy_steps",
                                              "amc_episodes", "amc_images", "width_step")}
    store = Store(args.out_dir / "resnet56.json", settings, args)
    dense = create("resnet56-cifar10", pretrained=True).eval()
    example = torch.randn(1, 3, 32, 32)
    xt, yt = cifar10_tensors("test", limit=args.test_images)
    if "dense" not in store.cells:
        store.cells["dense"] = {"top1": top1_accuracy(dense, xt, yt),
                                "params": count_params(dense),
                                "flops": count_flops(dense, example)}
        store.save()
    for seed in args.seeds:
        calib, batch, xtr, ytr, labelled, (xh, yh) = resnet_data(args, seed)
        structured = (("layer*.conv1",), labelled, None,
                      lambda m, xh=xh, yh=yh: top1_accuracy(m, xh, yh))
        for family in args.families:
            if family not in RESNET_FAMILIES:
                continue
            key = f"{family}/seed{seed}"
            if key in store.cells and ("top1_finetuned" in store.cells[key] or
                                       "unreachable" in store.cells[key]):
                continue
            log(args, f"resnet56 {key}")
            cell = {"family": family, "seed": seed}
            t0 = time.perf_counter()
            try:
                model, info = compress(family, dense, calib, batch, args.target, args, seed,
                                       structured)
            except Unreachable as e:
                cell.update(unreachable=str(e), best_measured=e.best,
                            seconds=time.perf_counter() - t0)
                store.cells[key] = cell
                store.save()
                continue
            except NotImplementedError as e:
                store.cells[key] = {**cell, "pending": str(e)}
                store.save()
                continue
            sparse = family.startswith("sparse")
            cell.update(info, compress_seconds=time.perf_counter() - t0,
                        params=count_params(model), flops=count_flops(model, example),
                        top1_compressed=top1_accuracy(model, xt, yt))
            store.cells[key] = cell
            store.save()
            t0 = time.perf_counter()
            holder = keep_zeros(model) if sparse else None
            try:
                fine_tune(model, xtr, ytr, args.epochs, 64, args.lr, seed, args.quiet)
            finally:
                if holder is not None:
                    holder()
            cell["finetune_seconds"] = time.perf_counter() - t0
            cell["top1_finetuned"] = top1_accuracy(model, xt, yt)
            cell["speedup_finetuned"] = speedup_of(dense, model, batch, args.repeats, sparse)
            store.save()
            log(args, f"resnet56 {key}: {cell['measured']:.3f}x, top-1 "
                      f"{cell['top1_compressed']:.2f} -> {cell['top1_finetuned']:.2f}")
    return store.data


def keep_zeros(model: nn.Module):
    """Keep every zero weight of the prunable layers at zero through any optimizer step (the
    sparse family's fine-tune); returns the function that stops it."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from prunekit.train import MaskHolder

    holder = MaskHolder(model)
    for name, w in holder.weights.items():
        holder.set_mask(name, w != 0)
    hook = register_optimizer_step_post_hook(lambda *a: holder.apply())

    def stop():
        hook.remove()
        holder.remove()
    return stop


def section_minilm(args) -> dict:
    from prunekit.data import load_stsb
    from prunekit.evaluate import stsb_spearman
    from prunekit.models import calibration_batches, create

    settings = {k: getattr(args, k) for k in ("minilm_target", "batch", "threads",
                                              "calib_sentences", "band", "rank_step",
                                              "spdy_steps")}
    store = Store(args.out_dir / "minilm.json", settings, args)
    dense = create("minilm", pretrained=True).eval()
    tok = dense.tokenizer
    pairs = load_stsb("test")
    if "dense" not in store.cells:
        store.cells["dense"] = {"stsb_spearman": stsb_spearman(dense, tok, pairs),
                                "params": count_params(dense)}
        store.save()
    calib = calibration_batches("minilm", n=args.calib_sentences, seed=0)
    batch = calibration_batches("minilm", n=args.batch, seed=1, batch_size=args.batch)[0]
    store.data["timed_batch"] = {k: list(v.shape) for k, v in batch.items()}
    refs: dict[int, torch.Tensor] = {}

    def embedding_loss(model, b):
        """1 - cosine of the sentence embeddings with the unpruned model's (the MiniLM
        width sensitivity)."""
        if id(b) not in refs:
            with torch.no_grad():
                refs[id(b)] = dense(**b)
        return (1 - (model(**b) * refs[id(b)]).sum(-1)).mean()

    structured = (("*",), calib, embedding_loss, None)
    for family in args.families:
        if family not in MINILM_FAMILIES:
            continue
        key = family
        if key in store.cells and ("stsb_spearman" in store.cells[key] or
                                   "unreachable" in store.cells[key]):
            continue
        log(args, f"minilm {key}")
        cell = {"family": family}
        t0 = time.perf_counter()
        try:
            model, info = compress(family, dense, calib, batch, args.minilm_target, args, 0,
                                   structured)
        except Unreachable as e:
            store.cells[key] = {**cell, "unreachable": str(e), "best_measured": e.best,
                                "seconds": time.perf_counter() - t0}
            store.save()
            continue
        except NotImplementedError as e:
            store.cells[key] = {**cell, "pending": str(e)}
            store.save()
            continue
        cell.update(info, compress_seconds=time.perf_counter() - t0,
                    params=count_params(model), stsb_spearman=stsb_spearman(model, tok, pairs))
        store.cells[key] = cell
        store.save()
        log(args, f"minilm {key}: {cell['measured']:.3f}x, STS-B {cell['stsb_spearman']:.4f}")
    return store.data


def section_smollm2(args) -> dict:
    """SmolLM2-135M: data-aware vs plain SVD layer error on a spread of its blocks, then
    data-aware SVD at --llm-target measured prefill speedup (1 x --llm-tokens tokens),
    perplexity on 8 evenly spread 1024-token windows of WikiText-2 test (llm_oneshot.py's
    steering8)."""
    from prunekit.data import load_wikitext2, tokenize_stream
    from prunekit.evaluate import lm_perplexity
    from prunekit.models import calibration_batches, create
    from prunekit.oneshot.calibrate import collect_stats
    from prunekit.oneshot.engine import layer_levels, relative_error

    settings = {k: getattr(args, k) for k in ("llm_target", "llm_tokens", "threads", "band",
                                              "rank_step", "llm_blocks")}
    store = Store(args.out_dir / "smollm2.json", settings, args)
    dense = create("smollm2-135m", pretrained=True).eval()
    tok = dense.tokenizer
    lines = load_wikitext2("test", raw=True).split("\n")
    ids = tokenize_stream(tok, "\n\n".join(lines[:-1] if lines[-1] == "" else lines))

    def ppl(model) -> float:
        return lm_perplexity(model, ids, seq_len=1024, windows=8)

    if "dense" not in store.cells:
        store.cells["dense"] = {"ppl_steering8": ppl(dense), "params": count_params(dense)}
        store.save()
    calib = calibration_batches("smollm2-135m", n=32, seq_len=512, seed=0, tokenizer=tok)
    if "layer_error" not in store.cells:
        blocks = [f"model.layers.{b}.*" for b in args.llm_blocks]
        held = calibration_batches("smollm2-135m", n=32, seq_len=512, seed=1, tokenizer=tok)
        from prunekit.layers import find_layers
        layers = find_layers(dense, blocks)
        held_stats = collect_stats(dense, layers, held)
        rows = {}
        for aware in (False, True):
            weights, errors = layer_levels(dense, SVD(data_aware=aware), calib, [0.25],
                                           include=blocks, progress=not args.quiet)
            for name, module in layers.items():
                row = rows.setdefault(name, {"shape": list(module.weight.shape)})
                row["data_aware" if aware else "plain"] = {
                    "calib": errors[name][0],
                    "held_out": relative_error(module.weight.detach(), weights[name][0],
                                               held_stats[name], 1)}
        ratios = {}
        for where in ("calib", "held_out"):
            r = [v["plain"][where] / v["data_aware"][where] for v in rows.values()]
            ratios[where] = {"median": statistics.median(r), "min": min(r),
                             "geomean": statistics.geometric_mean(r), "layers": len(r)}
        store.cells["layer_error"] = {"rank_ratio": 0.25, "layers": rows, "ratios": ratios}
        store.save()
    batch = calibration_batches("smollm2-135m", n=1, seq_len=args.llm_tokens, seed=5,
                                tokenizer=tok)[0]
    for family in ("svd-data-aware",):  # ALDS's in-model table would copy the model 8 times
        if family not in args.families or family in store.cells:
            continue
        log(args, f"smollm2 {family}")
        cell = {"family": family}
        t0 = time.perf_counter()
        try:
            model, info = compress(family, dense, calib, batch, args.llm_target, args, 0)
        except Unreachable as e:
            store.cells[family] = {**cell, "unreachable": str(e), "best_measured": e.best}
            store.save()
            continue
        cell.update(info, compress_seconds=time.perf_counter() - t0,
                    params=count_params(model), ppl_steering8=ppl(model))
        store.cells[family] = cell
        store.save()
        log(args, f"smollm2 {family}: {cell['measured']:.3f}x, ppl {cell['ppl_steering8']:.2f}")
    store.cells.pop("width", None)  # an earlier run's "pending" note
    for family in ("width-mlp", "width-heads-mlp"):
        if family not in args.families or family in store.cells:
            continue
        log(args, f"smollm2 {family}")
        t0 = time.perf_counter()
        cell = llm_width_for_speedup(family, dense, calib, batch, args)
        cell["compress_seconds"] = time.perf_counter() - t0
        if "model" in cell:
            model = cell.pop("model")
            cell.update(params=count_params(model), ppl_steering8=ppl(model))
            log(args, f"smollm2 {family}: {cell['measured']:.3f}x, "
                      f"ppl {cell['ppl_steering8']:.2f}")
        store.cells[family] = cell
        store.save()
    return store.data


#: SmolLM2 width candidates, least cut first: MLP neurons kept (of 1536, multiples of 64),
#: alone or with 6 of the 9 query heads (2 per key/value group)
LLM_MLP_KEPT = (1152, 1088, 1024, 960, 896, 832, 768, 704, 640)


def llm_width_for_speedup(family, dense, calib, batch, args) -> dict:
    """The least cut (structured.llm.shrink_llm, activation scores, least-squares refit of
    o_proj and down_proj) whose measured prefill speedup over the dense model reaches
    --llm-target, confirmed by a second measurement; every candidate's measurement is kept.
    The calibration statistics are gathered once and shared by the candidates."""
    from prunekit.structured.llm import LLMShrink, collect_stats, shrink_llm

    stats = collect_stats(dense, calib, grams=True)
    width = dense.model.layers[0].mlp.down_proj.in_features
    trail = []
    for kept in LLM_MLP_KEPT:
        kw = dict(mlp_ratio=kept / width)
        if family == "width-heads-mlp":
            kw["heads"] = 6
        small, report = shrink_llm(dense, LLMShrink(**kw), calib, stats=stats)
        measured = speedup_of(dense, small, batch, args.repeats)
        trail.append({"mlp": kept, "heads": kw.get("heads", 9), "measured": measured,
                      "block_params_kept": report.block_params_after
                      / report.block_params_before})
        log(args, f"  {family} mlp {kept}: {measured:.3f}x")
        if measured >= args.llm_target:
            again = [speedup_of(dense, small, batch, args.repeats)
                     for _ in range(args.confirm)]
            trail[-1]["confirm"] = again
            if min(again) >= args.llm_target * 0.98:
                return {"family": family, "measured": statistics.median([measured, *again]),
                        "config": LLMShrink(**kw).options(), "trail": trail,
                        "block_params_kept": trail[-1]["block_params_kept"], "model": small}
    best = max(trail, key=lambda t: t["measured"])
    return {"family": family, "unreachable": f"no candidate down to MLP {LLM_MLP_KEPT[-1]} "
            f"reached {args.llm_target}x", "best_measured": best["measured"], "trail": trail}


# -- report ---------------------------------------------------------------------------------

def summary(results: dict) -> str:
    lines = []
    le = results.get("layer_error", {}).get("cells", {}).get("ratios")
    if le:
        lines.append("MiniLM layers: plain SVD error / data-aware SVD error at equal rank "
                     "(per-layer ratios)")
        lines.append(f"{'rows/rank ratio':<18}{'median':>8}{'geomean':>9}{'min':>7}"
                     f"{'summed':>8}")
        for k, v in le.items():
            lines.append(f"{k:<18}{v['median']:>8.2f}{v['geomean']:>9.2f}{v['min']:>7.2f}"
                         f"{v['summed']:>8.2f}")
    r = results.get("resnet56", {}).get("cells", {})
    if r:
        d = r.get("dense", {})
        lines.append("")
        lines.append(f"ResNet-56 / CIFAR-10, target {results['resnet56']['settings']['target']}"
                     f"x measured (dense top-1 {d.get('top1', float('nan')):.2f})")
        lines.append(f"{'family':<18}{'seed':>5}{'speedup':>8}{'tuned x':>8}{'FLOPs x':>8}"
                     f"{'top1 cut':>9}{'top1 tuned':>11}")
        for k, c in r.items():
            if k == "dense":
                continue
            lines.append(_resnet_row(c, d))
        lines += _means(r)
    m = results.get("minilm", {}).get("cells", {})
    if m:
        lines.append("")
        lines.append(f"MiniLM / STS-B, target {results['minilm']['settings']['minilm_target']}"
                     f"x measured, no fine-tune (dense Spearman "
                     f"{m.get('dense', {}).get('stsb_spearman', float('nan')):.4f})")
        for k, c in m.items():
            if k == "dense":
                continue
            if "stsb_spearman" in c:
                lines.append(f"{k:<18} speedup {c['measured']:.3f}x  params {c['params']:>9}  "
                             f"STS-B {c['stsb_spearman']:.4f}")
            else:
                lines.append(f"{k:<18} {_missing(c)}")
    s = results.get("smollm2", {}).get("cells", {})
    if s:
        d = s.get("dense", {})
        lines += ["", f"SmolLM2-135M, target {results['smollm2']['settings']['llm_target']}x "
                      f"measured prefill, perplexity on 8 WikiText-2 windows (dense "
                      f"{d.get('ppl_steering8', float('nan')):.2f})"]
        le = s.get("layer_error", {}).get("ratios", {})
        for where, v in le.items():
            lines.append(f"  plain / data-aware SVD layer error at rank 1/4, {where}: median "
                         f"{v['median']:.2f}x, min {v['min']:.2f}x over {v['layers']} layers")
        for k in ("svd-data-aware", "alds-data-aware", "width-mlp", "width-heads-mlp"):
            c = s.get(k)
            if c is None:
                continue
            kept = (f"  block params kept {c['block_params_kept']:.3f}"
                    if "block_params_kept" in c else "")
            lines.append(f"  {k:<18} " + (f"speedup {c['measured']:.3f}x  ppl "
                                          f"{c['ppl_steering8']:.2f}{kept}"
                                          if "ppl_steering8" in c else _missing(c)))
    lines += [""] + targets(results)
    return "\n".join(lines)


def targets(results: dict) -> list[str]:
    """The issue's targets, each with its numbers and met / NOT met / open."""
    out = ["Targets:"]

    def verdict(ok):
        return "open (cells missing)" if ok is None else "met" if ok else "NOT met"

    le = results.get("layer_error", {}).get("cells", {}).get("ratios", {})
    for k, v in le.items():
        out.append(f"  data-aware SVD >= 2x lower layer error than plain, MiniLM {k}: median "
                   f"{v['median']:.2f}x, summed {v['summed']:.2f}x: {verdict(v['median'] >= 2)}")
    r = results.get("resnet56", {}).get("cells", {})
    mean = {}
    for fam in RESNET_FAMILIES:
        cs = [c for k, c in r.items() if k != "dense" and c.get("family") == fam]
        done = [c["top1_finetuned"] for c in cs if "top1_finetuned" in c]
        best = max((c.get("best_measured", 0) for c in cs), default=None)
        mean[fam] = (statistics.mean(done) if done else None, len(done), best, len(cs))
    u, d = mean.get("uniform-l1"), mean.get("dp-width")
    if u and d and u[3] and d[3]:
        reach = d[1] > 0 and u[1] == 0
        beats = d[0] is not None and u[0] is not None and d[0] >= u[0] + 0.5
        out.append(f"  ResNet-56 DP widths reach the target where uniform does not "
                   f"({d[1]}/{d[3]} vs {u[1]}/{u[3]} cells reached), or beat it by 0.5 "
                   f"(top-1 {_fmt(d[0])} vs {_fmt(u[0])}): {verdict(reach or beats)}")
    a, s = mean.get("alds"), mean.get("svd-uniform")
    if a and s and a[3] and s[3]:
        ok = None if a[0] is None or s[0] is None else a[0] >= s[0]
        out.append(f"  ResNet-56 ALDS level with uniform rank: top-1 {_fmt(a[0])} vs "
                   f"{_fmt(s[0])} (best measured {_fmt(a[2], 'x')} vs {_fmt(s[2], 'x')}): "
                   f"{verdict(ok) if a[1] and s[1] else 'neither reached the target'}")
    m = mean.get("amc")
    if m and u and m[3]:
        ok = None if m[0] is None or u[0] is None else m[0] >= u[0]
        secs = [sum(x["seconds"] for x in c.get("amc", [])) for k, c in r.items()
                if c.get("family") == "amc"]
        out.append(f"  ResNet-56 AMC level with uniform: top-1 {_fmt(m[0])} vs {_fmt(u[0])}: "
                   f"{verdict(ok)}; search {max(secs, default=0) / 60:.1f} min (< 30: "
                   f"{verdict(max(secs, default=0) < 1800)})")
    mm = results.get("minilm", {}).get("cells", {})
    if "alds" in mm and "svd-uniform" in mm:
        a, s = mm["alds"].get("stsb_spearman"), mm["svd-uniform"].get("stsb_spearman")
        ok = None if a is None or s is None else a >= s
        out.append(f"  MiniLM ALDS level with uniform rank: STS-B {_fmt(a)} vs {_fmt(s)}: "
                   f"{verdict(ok)}")
    return out


def _fmt(v, unit="") -> str:
    return "-" if v is None else f"{v:.3f}{unit}" if unit else f"{v:.2f}"


def _missing(c) -> str:
    if "unreachable" in c:
        return f"target not reached: best measured {c['best_measured']:.3f}x"
    return c.get("pending", "not run")


def _resnet_row(c, d) -> str:
    head = f"{c['family']:<18}{c['seed']:>5}"
    if "top1_finetuned" not in c:
        return head + "  " + _missing(c)
    return (head + f"{c['measured']:>8.3f}{c['speedup_finetuned']:>8.3f}"
            f"{c['flops'] / d['flops']:>8.3f}{c['top1_compressed']:>9.2f}"
            f"{c['top1_finetuned']:>11.2f}")


def _means(cells) -> list[str]:
    by = {}
    for k, c in cells.items():
        if k != "dense" and "top1_finetuned" in c:
            by.setdefault(c["family"], []).append(c)
    out = ["mean over seeds:"] if by else []
    for fam, cs in by.items():
        t = [c["top1_finetuned"] for c in cs]
        sd = statistics.stdev(t) if len(t) > 1 else 0.0
        out.append(f"  {fam:<18} top-1 {statistics.mean(t):.2f} +- {sd:.2f} at "
                   f"{statistics.mean(c['measured'] for c in cs):.3f}x ({len(cs)} seeds)")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default="layer_error,resnet56,minilm,smollm2")
    p.add_argument("--families", default=",".join(dict.fromkeys(RESNET_FAMILIES +
                                                                 MINILM_FAMILIES +
                                                                 LLM_FAMILIES)))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--target", type=float, default=1.5, help="ResNet-56 measured speedup")
    p.add_argument("--minilm-target", type=float, default=1.5)
    p.add_argument("--llm-target", type=float, default=1.3, help="SmolLM2 prefill speedup")
    p.add_argument("--llm-tokens", type=int, default=256, help="SmolLM2 prefill length")
    p.add_argument("--llm-blocks", default="0,10,20,29",
                   help="SmolLM2 blocks whose layers get the layer-error comparison")
    p.add_argument("--batch", type=int, default=64, help="batch the speedup is measured at")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--band", type=float, default=0.05)
    p.add_argument("--confirm", type=int, default=1)
    p.add_argument("--calib", type=int, default=256, help="ResNet-56 calibration images")
    p.add_argument("--calib-sentences", type=int, default=128)
    p.add_argument("--rank-ratios", default="0.125,0.25,0.375")
    p.add_argument("--rank-step", type=int, default=2)
    p.add_argument("--spdy-steps", type=int, default=60)
    p.add_argument("--amc-episodes", type=int, default=120,
                   help="AMC episodes per search (a quarter random warm-up)")
    p.add_argument("--amc-rounds", type=int, default=3,
                   help="AMC searches at most, each moved by the measured speedup")
    p.add_argument("--amc-minutes", type=float, default=30, help="time limit per AMC search")
    p.add_argument("--amc-images", type=int, default=500, help="AMC's held-out reward batch")
    p.add_argument("--width-step", type=int, default=8, help="candidate widths' step")
    p.add_argument("--train-images", type=int, default=4000)
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--fresh", action="store_true", help="ignore earlier results")
    p.add_argument("--quiet", action="store_true")
    add_malloc_option(p)
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.families = [f for f in args.families.split(",") if f]
    args.rank_ratios = [float(x) for x in args.rank_ratios.split(",")]
    args.llm_blocks = [int(b) for b in args.llm_blocks.split(",")]
    args.out_dir = Path(args.out_dir)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    apply_malloc_option(args)
    torch.set_num_threads(args.threads)
    sections = {"layer_error": section_layer_error, "resnet56": section_resnet56,
                "minilm": section_minilm, "smollm2": section_smollm2}
    for s in args.sections.split(","):
        if s not in sections:
            p.error(f"unknown section {s}; choose from {', '.join(sections)}")
        sections[s](args)
    results = {s: json.loads((args.out_dir / f"{s}.json").read_text())
               for s in sections if (args.out_dir / f"{s}.json").exists()}
    text = summary(results)
    prov = provenance(threads=args.threads)
    write_result(args.out_dir / "summary.json", {"summary": text.splitlines(),
                                                 "sections": sorted(results)}, prov)
    atomic_write_text(args.out_dir / "summary.md",
                      "# Compression families at equal measured speedup\n\n"
                      f"Latest command: `{prov['command']}`; each section's command, commit "
                      f"and machine are in its JSON file.\n\n```\n{text}\n```\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
