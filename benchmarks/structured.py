"""Structured pruning benchmark, prunekit side by side with Torch-Pruning in the same run.

1. Pretrained ResNet-56 on CIFAR-10 shrunk to half its FLOPs by L1 and by Taylor importance,
   with prunekit and with Torch-Pruning (pip torch-pruning, a benchmark-only dependency),
   then the same short fine-tune for all four (SGD, cosine schedule, standard augmentation).
   Half the FLOPs: both libraries remove --channel-ratio (50%) of every block's inner
   channels, so both get the very same shapes and FLOPs (0.502 of the dense model: the stem
   and the classifier stay). A FLOPs target searched by each library separately lands on
   different roundings (7/16 vs 8/16 kept) and compares unequal models. Taylor uses the
   same --calib labelled training images on both sides.
   prunekit's graph also follows the option-A shortcuts (their zero channels are buffers),
   so it can prune the residual stream, which Torch-Pruning cannot on this model (it
   breaks the model when asked to). --stream-ratio R adds prunekit entries that remove R of
   the stream channels and 1 - (1 - channel_ratio) / (1 - R) of the inner ones: the same
   FLOPs, spread over the whole network.
   Reported: top-1 before and after the fine-tune, params, FLOPs, CPU latency at batch 1
   and 64 (dense and pruned measured in turn in this process). In one shot, also how many
   filters both libraries keep, and whether prunekit cutting Torch-Pruning's choice gives
   Torch-Pruning's model exactly (then any gap is the criteria's, not the cut's).
2. MiniLM (all-MiniLM-L6-v2) with 25% of MLP neurons and 2 of 12 heads per layer removed:
   STS-B Spearman and CPU latency before and after.

Budget: on 2 shared CPU cores a full CIFAR epoch per model does not fit, so the fine-tune
is one epoch over a class-balanced subset of the train set (--train-images) and top-1 is
measured on the first --test-images test images; both are recorded in the results. Every
finished entry is written (atomically, with the run's provenance) to the results file
(benchmarks/results/structured/structured.json, --out) at once, and a rerun with the same
settings skips it, so an interrupted run resumes.

    python benchmarks/structured.py                  # defaults below
    python benchmarks/structured.py --train-images 50000 --test-images 10000   # full
    python benchmarks/structured.py --steps 5 \
        --out benchmarks/results/structured/structured_iterative.json

With --steps N both libraries prune iteratively: N equal steps (linear in channels of the
original), Taylor scores recomputed before each, and after each step but the last one pass
over the next 1/N of the fine-tune subset; the final fine-tune is the same as one-shot's.

Torch-Pruning is not a prunekit dependency: `pip install -e '.[bench]'` installs the version
these results used (1.6.1). Without it the Torch-Pruning side is skipped and the
results say so. The benchmark runs on one thread by default (--threads), the machine being
shared; latencies are then single-core CPU latencies.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from prunekit.bench.provenance import load_result, provenance, write_result
from prunekit.commands.common import add_malloc_option, apply_malloc_option
from prunekit.data import cifar10_tensors
from prunekit.evaluate import top1_accuracy
from prunekit.io import atomic_write_text
from prunekit.models import create
from prunekit.progress import Progress
from prunekit.runtime import time_calls
from prunekit.runtime.convert import layer_inputs
from prunekit.structured import ChannelPrune, count_flops, count_params, shrink

RESULTS = Path(__file__).resolve().parent / "results" / "structured"


def balanced_subset(x, y, n, seed=0):
    """n images, the same number per class, drawn by seed."""
    g = torch.Generator().manual_seed(seed)
    per = n // 10
    idx = torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()),
                                                                     generator=g)[:per]]
                     for c in range(10)])
    idx = idx[torch.randperm(len(idx), generator=g)]
    return x[idx], y[idx]


def augment(x, g):
    """Pad 4, random 32x32 crop, horizontal flip (He et al. 2016), on normalised tensors."""
    n = x.shape[0]
    padded = nn.functional.pad(x, (4, 4, 4, 4))
    i = torch.randint(0, 9, (n,), generator=g)
    j = torch.randint(0, 9, (n,), generator=g)
    out = torch.stack([padded[k, :, i[k]:i[k] + 32, j[k]:j[k] + 32] for k in range(n)])
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def fine_tune(model, x, y, epochs, batch, lr, seed, quiet):
    """The same short fine-tune for every pruned model."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    steps = epochs * math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    with Progress(enabled=not quiet) as bar:
        task = bar.add("fine-tune", total=steps)
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for s in range(0, len(x), batch):
                idx = order[s:s + batch]
                loss = nn.functional.cross_entropy(model(augment(x[idx], g)), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.advance(task)
    return model.eval()


@torch.inference_mode()
def latencies(models: dict, inputs, repeats):
    """Median ms per model, measuring the models in turn (round robin) so that load changes
    on the shared machine hit all of them alike."""
    for m in models.values():
        m.eval()
        m(inputs)
    times = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            t = time.perf_counter()
            m(inputs)
            times[k].append(1000 * (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in times.items()}


def conv_times(models: dict, batch: int, repeats: int) -> dict:
    """Each stage's first stride-1 block (layerN.1): its two convolutions timed alone on the
    inputs they get inside the model, all models side by side (interleaved rounds). It
    shows which convolutions turn their FLOPs cut into time and which do not."""
    x = torch.randn(batch, 3, 32, 32)
    calls, out = {}, {}
    for tag, m in models.items():
        convs = {f"layer{s}.1.conv{c}": m.get_submodule(f"layer{s}.1.conv{c}")
                 for s in (1, 2, 3) for c in (1, 2)}
        inputs = layer_inputs(m, convs, x)
        out[tag] = {}
        for n, mod in convs.items():
            calls[(tag, n)] = lambda mod=mod, inp=inputs[n]: mod(inp)
            out[tag][n] = {"channels": [mod.in_channels, mod.out_channels]}
    with torch.inference_mode():
        t = time_calls(calls, warmup=2, repeats=repeats, min_sample_s=0.0)
    for (tag, n), v in t.items():
        out[tag][n]["ms"] = 1e3 * v["median"]
    return out


def tp_prune(model, criterion, ratio, calib, example, steps=1, between=None):
    """Torch-Pruning's MetaPruner on the same structure; with steps > 1 it reaches the ratio
    in `steps` equal steps, calling between(model, step) after all but the last."""
    import torch_pruning as tp

    imp = (tp.importance.MagnitudeImportance(p=1) if criterion == "l1"
           else tp.importance.TaylorImportance())
    # Torch-Pruning does not follow the option-A shortcuts' zero channels (asked to prune
    # the residual stream, it returns a model that fails in the classifier): keep the
    # stream (stem, every block's conv2) and the classifier whole; it prunes each block's
    # inner channels, as the main prunekit entries do
    ignored = [model.conv1, model.linear] + [b.conv2 for layer in
                                             (model.layer1, model.layer2, model.layer3)
                                             for b in layer]
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=ratio,
                                  ignored_layers=ignored, iterative_steps=steps)
    for step in range(1, steps + 1):
        model.eval()
        if criterion == "taylor":
            model.zero_grad()
            for xb, yb in calib:
                nn.functional.cross_entropy(model(xb), yb).backward()
        pruner.step()
        model.zero_grad()
        if step < steps and between is not None:
            between(model, step)
    return model.eval()


def kept_filters(base: nn.Module, small: nn.Module) -> dict[str, list[int]]:
    """For each block's conv1, the original filter each kept filter is (pruned, not yet
    fine-tuned: kept filters are exact copies)."""
    kept = {}
    for name, conv in base.named_modules():
        if name.startswith("layer") and name.endswith(".conv1"):
            w = conv.weight.detach().flatten(1)
            same = (small.get_submodule(name).weight.detach().flatten(1)[:, None] == w).all(2)
            if not bool((same.sum(dim=1) == 1).all()):
                raise ValueError(f"{name}: a kept filter is no copy of one original filter")
            kept[name] = same.float().argmax(dim=1).tolist()
    return kept


def reproduces(base, example, fractions, kept, other) -> bool:
    """Does prunekit's shrink, told to keep exactly the filters in `kept`, give a model
    whose state dict equals `other`'s? Then a gap between the libraries comes from which
    channels the criteria pick, not from how the model is cut."""
    from prunekit.structured import build_graph

    graph = build_graph(base, example)
    scores = {}
    for group in graph.groups:
        for c in group.classes:
            hits = [i in kept[p[:-len(".weight")]] for p, d, i in c.slices
                    if d == 0 and p.endswith(".conv1.weight") and p[:-len(".weight")] in kept]
            scores[c.id] = float(any(hits))
    ours, _ = shrink(base, ChannelPrune(per_layer=fractions), example, graph=graph,
                     scores=scores, report_latency=False)
    a, b = ours.state_dict(), other.state_dict()
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k])
                                        for k in a)


def have_torch_pruning() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return False
    return True


def run_resnet(args, results, save):
    torch.manual_seed(0)
    base = create("resnet56-cifar10", pretrained=True).eval()
    example = torch.randn(1, 3, 32, 32)
    xt, yt = cifar10_tensors("test", limit=args.test_images)
    xtr, ytr = cifar10_tensors("train")
    xtr, ytr = balanced_subset(xtr, ytr, args.train_images, args.seed)
    calib = list(zip(xtr[:args.calib].split(64), ytr[:args.calib].split(64), strict=True))
    res = results.setdefault("resnet56", {})
    if "dense" not in res:
        res["dense"] = {"top1": top1_accuracy(base, xt, yt), "params": count_params(base),
                        "flops": count_flops(base, example)}
        save()
    libs = ["prunekit"]
    if have_torch_pruning():
        libs.insert(0, "torch-pruning")
    else:
        res["torch-pruning"] = "skipped: pip install torch-pruning==1.6.1"
        print("torch-pruning is not installed: its side is skipped", flush=True)
    models = {"dense": base}
    chunks = list(zip(xtr.chunk(args.steps), ytr.chunk(args.steps), strict=True))

    def between(model, step):  # iterative: fine-tune on the step's share of the subset
        xs, ys = chunks[step - 1]
        return fine_tune(model, xs, ys, 1, args.batch, args.lr, args.seed + step, True)

    kept = {}
    runs = [(lib, crit, "", {"layer*.conv1": 1 - args.channel_ratio})  # per_layer: kept
            for lib in libs for crit in ("l1", "taylor")]
    if args.stream_ratio:
        inner = 1 - (1 - args.channel_ratio) / (1 - args.stream_ratio)
        runs += [("prunekit", crit, f"-stream{args.stream_ratio:g}",
                  {"conv1": 1 - args.stream_ratio, "layer*.conv2": 1 - args.stream_ratio,
                   "layer*.conv1": 1 - inner}) for crit in ("l1", "taylor")]
    for lib, crit, suffix, fractions in runs:
        key = f"{lib}-{crit}{suffix}"
        t0 = time.time()
        if lib == "prunekit":
            small, _ = shrink(base, ChannelPrune(per_layer=fractions,
                                                 importance=crit,
                                                 iterative_steps=args.steps),
                              example, calib=calib, between_steps=between,
                              report_latency=False)
        else:
            small = tp_prune(copy.deepcopy(base), crit, args.channel_ratio, calib, example,
                             args.steps, between)
        prune_s = time.time() - t0
        if args.steps == 1 and not suffix:  # one-shot cuts of the same layers: comparable
            kept[key] = kept_filters(base, small)
        if key in kept and lib == "torch-pruning":
            check = res.setdefault("choice_checks", {}).setdefault(crit, {})
            check["prunekit_cut_reproduces_torch_pruning"] = reproduces(
                base, example, fractions, kept[key], small)
        if key in res and "top1_finetuned" in res[key]:
            models[key] = small  # for latency only; results cached
            continue
        entry = {"params": count_params(small), "flops": count_flops(small, example),
                 "prune_seconds": prune_s, "top1_pruned": top1_accuracy(small, xt, yt)}
        t0 = time.time()
        fine_tune(small, xtr, ytr, args.epochs, args.batch, args.lr, args.seed, args.quiet)
        entry["finetune_seconds"] = time.time() - t0
        entry["top1_finetuned"] = top1_accuracy(small, xt, yt)
        res[key] = entry
        save()
        models[key] = small
        print(f"{key}: {entry}", flush=True)
    for crit, check in res.get("choice_checks", {}).items():
        a, b = kept.get(f"prunekit-{crit}"), kept.get(f"torch-pruning-{crit}")
        if a and b:
            check["same_filters_kept"] = sum(len(set(a[n]) & set(b[n])) for n in a)
            check["filters_kept"] = sum(len(v) for v in a.values())
    save()
    if args.repeats == 0:  # accuracy only (e.g. extra seeds run beside other work)
        return
    if "prunekit-l1" in models:
        res["conv_ms_b64"] = conv_times({"dense": base, "prunekit-l1": models["prunekit-l1"]},
                                        64, args.repeats)
        save()
    for batch in (1, 64):
        lat = latencies(models, torch.randn(batch, 3, 32, 32), args.repeats)
        for k, v in lat.items():
            res.setdefault(k, {})[f"latency_ms_b{batch}"] = v
        save()
        if args.compile:  # as deployed: torch.compile fuses BN, ReLU and adds into the convs
            torch._dynamo.reset()
            compiled = {k: torch.compile(copy.deepcopy(m).eval(), dynamic=False)
                        for k, m in models.items()}
            with torch.inference_mode():
                lat = latencies(compiled, torch.randn(batch, 3, 32, 32), args.repeats)
            for k, v in lat.items():
                res[k][f"latency_ms_b{batch}_compiled"] = v
            save()


def run_minilm(args, results, save):
    from prunekit.data import load_stsb
    from prunekit.evaluate import stsb_spearman

    res = results.setdefault("minilm", {})
    base = create("minilm", pretrained=True).eval()
    tok = base.tokenizer
    pairs = load_stsb("test")
    sents = [a for a, _, _ in load_stsb("dev")[:64]]
    example = dict(tok(sents[:4], padding=True, return_tensors="pt"))
    cfg = ChannelPrune(per_layer={"*intermediate*": 0.75, "*attention.self*": 10 / 12},
                       importance=args.minilm_importance)
    small, report = shrink(base, cfg, example, report_latency=False)
    if "dense" not in res:
        res["dense"] = {"stsb_spearman": stsb_spearman(base, tok, pairs),
                        "params": count_params(base)}
        save()
    if "pruned" not in res:
        res["pruned"] = {"stsb_spearman": stsb_spearman(small, tok, pairs),
                         "params": count_params(small), "importance": args.minilm_importance,
                         "heads_per_layer": [m.num_attention_heads for n, m in
                                             small.named_modules()
                                             if hasattr(m, "num_attention_heads")],
                         "intermediate": [m.out_features for n, m in small.named_modules()
                                          if n.endswith("intermediate.dense")]}
        save()
    for batch, length in ((1, 32), (32, 128)) if args.repeats else ():
        enc = dict(tok(sents[:batch], padding="max_length", max_length=length,
                       truncation=True, return_tensors="pt"))

        class Call(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, e):
                return self.m(**e)

        lat = latencies({"dense": Call(base), "pruned": Call(small)}, enc, args.repeats)
        res["dense"][f"latency_ms_b{batch}_len{length}"] = lat["dense"]
        res["pruned"][f"latency_ms_b{batch}_len{length}"] = lat["pruned"]
    res["flops_ratio"] = report.flops_ratio
    save()


def target_lines(r) -> list[str]:
    """The issue's targets, each with its numbers and met / NOT met."""
    d, out = r["dense"], []

    def verdict(ok):
        return "met" if ok else "NOT met"

    for k, e in r.items():
        if not isinstance(e, dict) or k == "dense" or "latency_ms_b1" not in e:
            continue
        need = 0.85 * d["flops"] / e["flops"]
        for b in ("b1", "b64", "b1_compiled", "b64_compiled"):
            if f"latency_ms_{b}" not in e:
                continue
            sp = d[f"latency_ms_{b}"] / e[f"latency_ms_{b}"]
            out.append(f"target {k} speedup {b} {sp:.2f} >= 0.85 x FLOPs ratio {need:.2f}: "
                       f"{verdict(sp >= need)}")
    for crit in ("l1", "taylor"):
        ours, tp = r.get(f"prunekit-{crit}"), r.get(f"torch-pruning-{crit}")
        if isinstance(ours, dict) and isinstance(tp, dict) and "top1_finetuned" in ours:
            ok = ours["top1_finetuned"] >= tp["top1_finetuned"] and ours["flops"] <= tp["flops"]
            out.append(f"target {crit}: prunekit {ours['top1_finetuned']:.2f} at "
                       f"{ours['flops']} FLOPs >= Torch-Pruning {tp['top1_finetuned']:.2f} at "
                       f"{tp['flops']}: {verdict(ok)}")
    for lib in ("prunekit", "torch-pruning"):
        a, b = r.get(f"{lib}-taylor"), r.get(f"{lib}-l1")
        if isinstance(a, dict) and isinstance(b, dict) and "top1_finetuned" in a:
            out.append(f"target {lib} taylor {a['top1_finetuned']:.2f} > l1 "
                       f"{b['top1_finetuned']:.2f} after fine-tune: "
                       f"{verdict(a['top1_finetuned'] > b['top1_finetuned'])}")
    return out


def conv_lines(c) -> list[str]:
    """The per-convolution table: channels, ms, FLOPs and time ratios, dense vs pruned."""
    d, q = c["dense"], c["prunekit-l1"]
    out = ["Convolutions alone at batch 64 (each stage's block 1), dense vs prunekit-l1:",
           f"{'conv':<16}{'dense':>8}{'ms':>7}{'pruned':>8}{'ms':>7}{'FLOPs x':>9}{'time x':>8}"]
    for n in d:
        (i0, o0), (i1, o1) = d[n]["channels"], q[n]["channels"]
        out.append(f"{n:<16}{f'{i0}->{o0}':>8}{d[n]['ms']:>7.2f}{f'{i1}->{o1}':>8}"
                   f"{q[n]['ms']:>7.2f}{i1 * o1 / (i0 * o0):>9.2f}{q[n]['ms'] / d[n]['ms']:>8.2f}")
    return out


def summary(results) -> str:
    lines = []
    r = results.get("resnet56", {})
    if "dense" in r:
        d = r["dense"]
        lines.append("ResNet-56 / CIFAR-10, "
                     f"{results['config']['channel_ratio']:.0%} of each block's inner channels "
                     "removed by both libraries"
                     + (f", iteratively in {results['config']['steps']} steps"
                        if results["config"].get("steps", 1) > 1 else ", in one shot"))
        cols = ["b1", "b64", "b1_compiled", "b64_compiled"]  # measured speedup at batch
        cols = [c for c in cols if f"latency_ms_{c}" in d]
        w = max(22, *(len(k) + 2 for k in r))
        lines.append(f"{'entry':<{w}}{'top1 pruned':>12}{'top1 tuned':>11}{'params':>9}"
                     f"{'FLOPs x':>8}"
                     + "".join(f"{c.replace('_compiled', ' compiled'):>13}" for c in cols)
                     + f"{'target':>8}")
        for k, e in r.items():
            if not isinstance(e, dict) or "flops" not in e:
                continue
            fr = e["flops"] / d["flops"]
            sps = [d[f"latency_ms_{c}"] / max(e.get(f"latency_ms_{c}", 1e-9), 1e-9)
                   for c in cols]
            lines.append(f"{k:<{w}}{e.get('top1_pruned', e.get('top1', 0)):>12.2f}"
                         f"{e.get('top1_finetuned', e.get('top1', 0)):>11.2f}{e['params']:>9}"
                         f"{fr:>8.3f}" + "".join(f"{sp:>13.2f}" for sp in sps)
                         + f"{0.85 / fr:>8.2f}")
        lines += target_lines(r)
        for crit, c in r.get("choice_checks", {}).items():
            if "same_filters_kept" in c:
                lines.append(f"{crit}: the libraries keep {c['same_filters_kept']} of the same "
                             f"{c['filters_kept']} filters; prunekit cutting Torch-Pruning's "
                             "choice gives its model exactly: "
                             f"{'yes' if c['prunekit_cut_reproduces_torch_pruning'] else 'NO'}")
        if "conv_ms_b64" in r:
            lines += conv_lines(r["conv_ms_b64"])
    m = results.get("minilm", {})
    if "pruned" in m:
        lines.append("MiniLM, 25% MLP neurons and 2/12 heads per layer removed")
        for k in ("dense", "pruned"):
            e = m[k]
            lines.append(f"{k:<8} STS-B {e['stsb_spearman']:.2f} params {e['params']} "
                         + " ".join(f"{a}={b:.1f}" for a, b in e.items()
                                    if a.startswith("latency")))
        for key in [a for a in m["dense"] if a.startswith("latency")]:
            if key in m["pruned"]:
                lines.append(f"speedup {key[len('latency_ms_'):]}: "
                             f"{m['dense'][key] / m['pruned'][key]:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-images", type=int, default=2000)
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--calib", type=int, default=1024, help="labelled images for Taylor")
    p.add_argument("--channel-ratio", type=float, default=0.5,
                   help="fraction of every block's inner channels removed (both libraries)")
    p.add_argument("--stream-ratio", type=float, default=0.0,
                   help="also prune this fraction of the residual stream (prunekit only)")
    p.add_argument("--steps", type=int, default=1,
                   help="iterative pruning steps (both libraries), each but the last followed "
                        "by one pass over its 1/steps share of the fine-tune subset")
    p.add_argument("--repeats", type=int, default=30,
                   help="timed calls per latency; 0 skips every timing")
    p.add_argument("--compile", action="store_true",
                   help="also time every ResNet-56 under torch.compile (as deployed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    p.add_argument("--minilm-importance", default="l1")
    p.add_argument("--skip-resnet", action="store_true")
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "structured.json"))
    p.add_argument("--fresh", action="store_true", help="ignore cached results")
    p.add_argument("--quiet", action="store_true")
    add_malloc_option(p)
    args = p.parse_args(argv)
    apply_malloc_option(args)
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    if not 0 <= args.stream_ratio < args.channel_ratio:
        p.error(f"--stream-ratio must be in [0, --channel-ratio), got {args.stream_ratio}")
    torch.set_num_threads(args.threads)
    config = {k: v for k, v in vars(args).items()
              if k not in ("out", "fresh", "quiet", "skip_resnet", "skip_minilm", "repeats",
                          "compile", "stream_ratio", "system_malloc")}
    # stream entries are named by ratio; the allocator changes only the timings
    out = Path(args.out)
    results = {}
    if not args.fresh:
        old = load_result(out)
        old_config = dict(old.get("config", {}))
        old_config.setdefault("steps", 1)  # results written before --steps existed
        if old_config == config:
            results = old  # entries kept from earlier runs keep those runs' provenance
    results["config"] = config
    prov = provenance(argv, script=__file__)
    if args.skip_resnet and args.skip_minilm and "provenance" in results:
        prov = results["provenance"]  # only the summary is rewritten: nothing was measured

    def save():
        write_result(out, results, prov, indent=2)

    if not args.skip_resnet:
        run_resnet(args, results, save)
    if not args.skip_minilm:
        run_minilm(args, results, save)
    text = summary(results)
    results["summary"] = text
    save()
    atomic_write_text(out.with_suffix(".md"), "# Structured pruning benchmark\n\n"
                      f"`{prov.get('command', '')}`, {prov.get('threads')} "
                      f"thread(s), {prov.get('allocator')} malloc\n\n"
                      f"```\n{text}\n```\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
