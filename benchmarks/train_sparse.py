"""Sparse training on real data: ResNet-20 on CIFAR-10 at 90% sparsity, side by side.

Methods, all trained for the same number of steps with the same data order, optimizer and
learning-rate schedule, from the same random initialisation:
  static  a random mask (ERK layer densities) fixed from the start;
  rigl    RigL from scratch (same initial mask as static, drop-and-grow every delta_t steps);
  gmp     gradual magnitude pruning from dense (cubic ramp, ERK final layer densities);
  dense   optional reference (--methods dense,...).

Budget (the default): 10,000 training images (the first of the train split), batch 64, 240
steps per method (1.5 epochs of the subset), test on the first 2,000 test images; 3 x 15,360
training images in all. It was sized for about 25 minutes on 2 CPU cores, but on the shared
machine (load average 10-16 on its 2 cores while it ran) a step took about 7 s and one
method about 30 minutes. This is far from the paper's 160+ epochs: absolute accuracies are
low, and with one seed and a 2,000-image test set (standard error about 1 point) only large
gaps mean anything.

Training FLOPs count the multiply-accumulates of the prunable layers (x2 for FLOPs) with the
masks in force at each step: forward f, backward 2f (both sparse), plus for RigL a dense
gradient at each update step, as in Evci et al. 2020, appendix H; dense = 3 * f_dense per image.

Finished runs are cached one file per run in benchmarks/results/train_sparse_runs/ (written
atomically), so an interrupted benchmark resumes with the runs that are left. The table goes
to benchmarks/results/train_sparse.json and .md with the command that made it.

    python benchmarks/train_sparse.py            # the default budget
    python benchmarks/train_sparse.py --steps 20 --train-size 640 --test-size 500  # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from prunekit.data import cifar10_tensors
from prunekit.evaluate import top1_accuracy
from prunekit.io import atomic_write_text
from prunekit.layers import find_layers
from prunekit.models import create
from prunekit.progress import Progress
from prunekit.train import GMP, RigL, Static

RESULTS = Path(__file__).resolve().parent / "results"


def layer_macs(model) -> dict[str, int]:
    """Multiply-accumulates per image of each prunable layer (dense)."""
    macs, handles = {}, []
    for name, m in find_layers(model).items():
        def hook(mod, inp, out, name=name):
            macs[name] = mod.weight.numel() * (out.numel() // (out.shape[0] * out.shape[1]))
        handles.append(m.register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in handles:
        h.remove()
    return macs


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel zero padding and random horizontal flip (standard CIFAR)."""
    n = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (2, n), generator=g)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in range(n)])
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def make_schedule(method: str, model, opt, args):
    steps = args.steps
    if method == "dense":
        return None
    if method == "static":
        return Static(model, opt, density=args.density, distribution="erk", seed=args.seed)
    if method == "rigl":
        return RigL(model, opt, density=args.density, delta_t=args.delta_t,
                    t_end=int(0.75 * steps), alpha=0.3, distribution="erk", seed=args.seed)
    if method == "gmp":
        start = int(0.1 * steps)
        n = max(1, (int(0.7 * steps) - start) // args.delta_t)
        return GMP(model, opt, density=args.density, start=start, end=start + n * args.delta_t,
                   frequency=args.delta_t, distribution="erk")
    raise SystemExit(f"unknown method {method!r}; use dense, static, rigl, gmp")


def step_macs(sched, macs, dense_grad: bool) -> float:
    """Training multiply-accumulates of one image at the current masks (f + 2f, + dense
    weight-gradient f_dense on RigL update steps)."""
    if sched is None:
        return 3.0 * sum(macs.values())
    dens = {n: float(m.float().mean()) for n, m in sched.masks.items()}
    f = sum(macs[n] * dens.get(n, 1.0) for n in macs)
    return 3.0 * f + (sum(macs.values()) if dense_grad else 0.0)


def run(method: str, args, data) -> dict:
    xtr, ytr, xte, yte = data
    torch.manual_seed(args.seed)
    model = create("resnet20-cifar10", pretrained=False).train()
    macs = layer_macs(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=args.weight_decay)
    sched = make_schedule(method, model, opt, args)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.cat([torch.randperm(len(xtr), generator=g)
                       for _ in range(math.ceil(args.steps * args.batch / len(xtr)))])
    total_macs, t0, curve = 0.0, time.time(), []
    with Progress(enabled=not args.quiet) as bar:
        task = bar.add(f"{method}", total=args.steps)
        for step in range(args.steps):
            lr = 0.5 * args.lr * (1 + math.cos(math.pi * step / args.steps))
            for group in opt.param_groups:
                group["lr"] = lr
            idx = order[step * args.batch:(step + 1) * args.batch]
            x = augment(xtr[idx], g)
            loss = F.cross_entropy(model(x), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            update = isinstance(sched, RigL) and sched.is_update(step + 1)
            total_macs += step_macs(sched, macs, update) * len(idx)
            if sched is not None:
                sched.step()
            if (step + 1) % max(1, args.steps // 10) == 0:
                curve.append({"step": step + 1, "loss": float(loss.detach()),
                              "sparsity": sched.sparsity() if sched else 0.0})
            bar.advance(task)
    acc = top1_accuracy(model, xte, yte)
    dense_train = 3.0 * sum(macs.values()) * args.steps * args.batch
    nonzero = sum(int((m.weight != 0).sum()) for m in find_layers(model).values())
    total = sum(m.weight.numel() for m in find_layers(model).values())
    return {"method": method, "top1": acc, "sparsity": 1.0 - nonzero / total,
            "train_flops": 2.0 * total_macs, "train_flops_vs_dense": total_macs / dense_train,
            "inference_flops_vs_dense": (sum(macs[n] * float((m.weight != 0).float().mean())
                                             for n, m in find_layers(model).items())
                                         / sum(macs.values())),
            "seconds": time.time() - t0, "curve": curve}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="static,rigl,gmp")
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--delta-t", type=int, default=20, help="RigL update / GMP pruning period")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="train_sparse", help="results file stem")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    xtr, ytr = cifar10_tensors("train", limit=args.train_size)
    xte, yte = cifar10_tensors("test", limit=args.test_size)
    config = {k: v for k, v in vars(args).items()
              if k not in ("quiet", "name", "methods", "threads")}
    key = "-".join(f"{k}={v}" for k, v in sorted(config.items()))
    cache = RESULTS / f"{args.name}_runs"
    rows = []
    for method in args.methods.split(","):
        path = cache / f"{method}--{key}.json"
        if path.exists():
            rows.append(json.loads(path.read_text()))
            print(f"{method}: cached ({path.name})", file=sys.stderr)
            continue
        row = run(method, args, (xtr, ytr, xte, yte))
        atomic_write_text(path, json.dumps(row, indent=1))
        rows.append(row)
        print(f"{method}: top-1 {row['top1']:.2f}% in {row['seconds']:.0f} s", file=sys.stderr)
    command = "python benchmarks/train_sparse.py " + " ".join(argv or sys.argv[1:])
    by = {r["method"]: r for r in rows}
    ratios = {}
    if "static" in by:
        for m in ("rigl", "gmp"):
            if m in by:
                ratios[f"{m}_minus_static_top1"] = by[m]["top1"] - by["static"]["top1"]
    if "rigl" in by and "gmp" in by:
        ratios["rigl_minus_gmp_top1"] = by["rigl"]["top1"] - by["gmp"]["top1"]
    out = {"command": command.strip(), "config": config, "results": rows, "comparisons": ratios,
           "torch": torch.__version__, "threads": torch.get_num_threads()}
    atomic_write_text(RESULTS / f"{args.name}.json", json.dumps(out, indent=1))
    lines = [f"# Sparse training, ResNet-20 / CIFAR-10, density {args.density}", "",
             f"Command: `{out['command']}`", "",
             f"Budget: {args.steps} steps x batch {args.batch} on the first {args.train_size} "
             f"train images; top-1 on the first {args.test_size} test images; seed {args.seed}.",
             "", "| method | top-1 % | sparsity | train FLOPs | vs dense training | "
             "inference FLOPs vs dense | seconds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['top1']:.2f} | {r['sparsity']:.3f} | "
                     f"{r['train_flops']:.3e} | {r['train_flops_vs_dense']:.3f} | "
                     f"{r['inference_flops_vs_dense']:.3f} | {r['seconds']:.0f} |")
    lines += ["", *(f"- {k}: {v:+.2f} points" for k, v in ratios.items())]
    atomic_write_text(RESULTS / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
