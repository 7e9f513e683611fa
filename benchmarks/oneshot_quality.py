"""One-shot quality with no retraining, mean over calibration seeds.

MiniLM (the 36 encoder Linear layers; there is no pooler): STS-B test Spearman (x100) and
the mean cosine between pruned and dense embeddings of the STS-B test sentences, for
magnitude, Wanda and SparseGPT at 50%, 70% and 2:4 (SparseGPT with the published dampening,
1% of the mean Hessian diagonal, and with 1% of each input's own: dampening_rule="input").
Calibration: 512 sentences drawn by seed from the STS-B dev split (the validation side, in
the domain of the test; padding tokens do not count), block by block (sequential=True) for
the data-driven methods.

ResNet-20 on CIFAR-10: test top-1 after batch-norm re-estimation on 1024 augmented training images,
for magnitude, Wanda, SparseGPT and exact OBS at 50% and 70%. Calibration: 256 training
images.

    python benchmarks/oneshot_quality.py                 # both models, seeds 0 1 2
    python benchmarks/oneshot_quality.py --model resnet20 --seeds 0

Each finished (model, method, pattern, seed) is stored at once in the results file, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import prunekit
from prunekit.bench.provenance import load_result, provenance, write_result
from prunekit.io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results" / "oneshot_quality"


def _settings(model: str):
    if model == "minilm":
        out = []
        for label, kw in (("50%", dict(sparsity=0.5)), ("70%", dict(sparsity=0.7)),
                          ("2:4", dict(pattern="2:4"))):
            out.append((label, prunekit.Magnitude(**kw)))
            wkw = dict(kw, pattern=kw.get("pattern", "unstructured:row"))
            out.append((label, prunekit.Wanda(sequential=True, **wkw)))
            out.append((label, prunekit.SparseGPT(sequential=True, **kw)))
            out.append((label, prunekit.SparseGPT(sequential=True, dampening_rule="input",
                                                  **kw)))
        return out
    out = []
    for label, s in (("50%", 0.5), ("70%", 0.7)):
        out += [(label, prunekit.Magnitude(sparsity=s)),
                (label, prunekit.Wanda(sparsity=s, pattern="unstructured:row")),
                (label, prunekit.SparseGPT(sparsity=s)), (label, prunekit.OBS(sparsity=s))]
    return out


def method_name(cfg) -> str:
    """The method's name, and its dampening rule where it is not the published one."""
    rule = getattr(cfg, "dampening_rule", "mean")
    return cfg.method + ("" if rule == "mean" else f" ({rule} dampening)")


class MiniLMTask:
    name = "minilm"
    metric = "stsb_spearman"

    def __init__(self):
        from prunekit.data import load_stsb
        from prunekit.models import create

        self.dense = create("minilm", pretrained=True).eval()
        self.pairs = load_stsb("test")
        sentences = sorted({s for a, b, _ in self.pairs for s in (a, b)}, key=len)
        self.sentences = sentences
        self.dense_emb = self.dense.encode(sentences, batch_size=128)

    def calib(self, seed):
        from prunekit.models import calibration_batches
        return calibration_batches("minilm", n=512, seed=seed, source="stsb-dev")

    def quality(self, model):
        from prunekit.evaluate import stsb_spearman

        emb = model.encode(self.sentences, batch_size=128)
        cos = float((emb * self.dense_emb).sum(1).mean())
        return {"stsb_spearman": stsb_spearman(model, self.dense.tokenizer, self.pairs),
                "embedding_cosine": cos}

    def after(self, model):
        pass


class ResNetTask:
    name = "resnet20"
    metric = "top1"

    def __init__(self):
        from prunekit.data import calibration_images, cifar10_tensors
        from prunekit.models import create

        self.dense = create("resnet20-cifar10", pretrained=True).eval()
        self.images, self.labels = cifar10_tensors("test")
        # augmented like the training data the BN statistics were learnt on
        self.bn_images = calibration_images(1024, seed=1234, augment=True)

    def calib(self, seed):
        from prunekit.data import calibration_images
        return list(calibration_images(256, seed=seed).split(64))

    def quality(self, model):
        from prunekit.evaluate import top1_accuracy
        return {"top1": top1_accuracy(model, self.images, self.labels)}

    def after(self, model):
        from prunekit.evaluate import reestimate_bn
        reestimate_bn(model, self.bn_images)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", choices=["minilm", "resnet20", "both"], default="both")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "oneshot_quality.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    state = load_result(out) or {"runs": [], "dense": {}}
    prov = provenance(argv, script=__file__)
    tasks = {"minilm": MiniLMTask, "resnet20": ResNetTask}
    names = ["minilm", "resnet20"] if args.model == "both" else [args.model]
    for name in names:
        task = tasks[name]()
        if name not in state["dense"]:
            state["dense"][name] = task.quality(task.dense)
            write_result(out, state, prov, indent=2)
        print(f"{name} dense: {state['dense'][name]}", flush=True)
        for seed in args.seeds:
            calib = task.calib(seed)
            for label, cfg in _settings(name):
                key = dict(model=name, method=method_name(cfg), setting=label, seed=seed)
                if any(all(r[k] == v for k, v in key.items()) for r in state["runs"]):
                    continue
                model = copy.deepcopy(task.dense)
                start = time.perf_counter()
                report = prunekit.prune(model, cfg, calib if cfg.needs != "none" else None,
                                        progress=False)
                seconds = time.perf_counter() - start
                task.after(model)
                row = dict(key, sparsity=report.sparsity, prune_seconds=seconds,
                           **task.quality(model))
                state["runs"].append(row)
                write_result(out, state, prov, indent=2)
                print(json.dumps(row), flush=True)
    write_result(out, state, prov, indent=2)
    print(summary(state))
    atomic_write_text(out.with_suffix(".md"), summary(state) + f"\n\n`{prov['command']}`\n")
    return 0


def summary(state) -> str:
    lines = []
    for name, dense in state["dense"].items():
        metrics = list(dense)
        lines.append(f"\n{name} dense: " + ", ".join(f"{k} {v:.4f}" for k, v in dense.items()))
        lines.append("| setting | method | " + " | ".join(f"{m} mean (min-max)" for m in metrics)
                     + " | seeds | prune s |")
        lines.append("|" + "---|" * (len(metrics) + 4))
        groups = {}
        for r in state["runs"]:
            if r["model"] == name:
                groups.setdefault((r["setting"], r["method"]), []).append(r)
        for (setting, method), rows in sorted(groups.items()):
            cells = []
            for m in metrics:
                vals = [r[m] for r in rows]
                cells.append(f"{statistics.mean(vals):.2f} ({min(vals):.2f}-{max(vals):.2f})"
                             if m != "embedding_cosine" else
                             f"{statistics.mean(vals):.4f} ({min(vals):.4f}-{max(vals):.4f})")
            secs = statistics.mean(r["prune_seconds"] for r in rows)
            lines.append(f"| {setting} | {method} | " + " | ".join(cells)
                         + f" | {len(rows)} | {secs:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
