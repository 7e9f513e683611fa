"""Sparse training on real data: ResNet-20 on CIFAR-10 at 90% sparsity, side by side.

Methods, all trained with the same data order, optimizer (SGD, Nesterov momentum 0.9, weight
decay 1e-4) and cosine learning-rate schedule, from the same random initialisation:
  static  a random mask (ERK layer densities) fixed from the start;
  rigl    RigL from scratch (same initial mask as static, drop-and-grow every delta_t steps
          until 75% of training, update fraction 0.3 cosine-decayed);
  gmp     gradual magnitude pruning from dense (cubic ramp from 10% to 70% of training, ERK
          final layer densities);
  rigl2x  RigL trained for twice the steps (the paper's RigL_2x): GMP's dense start costs
          about twice RigL's training FLOPs, so this compares them at equal training FLOPs;
  dense   optional reference (--methods dense,...).

The budget used for the results: the full 50,000 training images, batch 64, 800 steps (about
one epoch), top-1 on all 10,000 test images, one seed, 1 thread per run: a step took about
0.7 s on the shared 2-core machine, about 10 minutes per method (20 for rigl2x). This is far
from the papers' 160+ epochs, so the absolute accuracies are low; with 10,000 test images the
standard error of a top-1 figure is about 0.5 points.

Training FLOPs count the multiply-accumulates of the prunable layers (x2 for FLOPs) with the
masks in force at each step: forward f, backward 2f (both sparse), plus for RigL a dense
gradient at each update step, as in Evci et al. 2020, appendix H; dense = 3 * f_dense per image.

Finished runs are cached one file per run, each with its provenance, in
benchmarks/results/train_sparse/train_sparse_runs/ (--out DIR, --name; written atomically),
so an interrupted benchmark resumes with the runs that are left. The table goes to
train_sparse.json (with this run's provenance and the run file of each row) and .md there,
and top-1 against training FLOPs to .png.

    python benchmarks/train_sparse.py --methods rigl,gmp,static,rigl2x --steps 800 \
        --train-size 50000 --test-size 10000 --threads 1      # the results (~50 min)
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

from prunekit.bench.provenance import provenance, write_result
from prunekit.data import cifar10_tensors
from prunekit.evaluate import top1_accuracy
from prunekit.io import atomic_write_text
from prunekit.layers import find_layers
from prunekit.models import create
from prunekit.progress import Progress
from prunekit.train import GMP, RigL, Static

RESULTS = Path(__file__).resolve().parent / "results" / "train_sparse"


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


def split_method(method: str) -> tuple[str, int]:
    """'rigl2x' -> ('rigl', 2): a method trained for a multiple of the step budget, as the
    RigL paper's RigL_2x, to compare at equal training FLOPs."""
    if method.endswith("x") and method[:-1].rstrip("0123456789") != method[:-1]:
        base = method[:-1].rstrip("0123456789")
        return base, int(method[len(base):-1])
    return method, 1


def make_schedule(method: str, model, opt, args, steps: int):
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
    base, mult = split_method(method)
    steps = args.steps * mult
    torch.manual_seed(args.seed)
    model = create("resnet20-cifar10", pretrained=False).train()
    macs = layer_macs(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=args.weight_decay)
    sched = make_schedule(base, model, opt, args, steps)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.cat([torch.randperm(len(xtr), generator=g)
                       for _ in range(math.ceil(steps * args.batch / len(xtr)))])
    total_macs, t0, curve = 0.0, time.time(), []
    with Progress(enabled=not args.quiet) as bar:
        task = bar.add(f"{method}", total=steps)
        for step in range(steps):
            lr = 0.5 * args.lr * (1 + math.cos(math.pi * step / steps))
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
            if (step + 1) % max(1, steps // 10) == 0:
                curve.append({"step": step + 1, "loss": float(loss.detach()),
                              "sparsity": sched.sparsity() if sched else 0.0})
            bar.advance(task)
    acc = top1_accuracy(model, xte, yte)
    # relative to dense training for the base budget (args.steps), so 2x methods show 2x
    dense_train = 3.0 * sum(macs.values()) * args.steps * args.batch
    nonzero = sum(int((m.weight != 0).sum()) for m in find_layers(model).values())
    total = sum(m.weight.numel() for m in find_layers(model).values())
    return {"method": method, "top1": acc, "sparsity": 1.0 - nonzero / total,
            "train_flops": 2.0 * total_macs, "train_flops_vs_dense": total_macs / dense_train,
            "inference_flops_vs_dense": (sum(macs[n] * float((m.weight != 0).float().mean())
                                             for n, m in find_layers(model).items())
                                         / sum(macs.values())),
            "seconds": time.time() - t0, "curve": curve}


def plot(rows: list[dict], path: Path, args) -> None:
    """Top-1 against training FLOPs, one point per method (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r, marker in zip(rows, "osD^v<>"):
        ax.scatter(r["train_flops"], r["top1"], s=50, marker=marker,
                   label=f"{r['method']} ({r['top1']:.1f}%)")
    ax.legend(loc="lower right")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("CIFAR-10 top-1 %")
    ax.set_title(f"ResNet-20, density {args.density}, {args.steps} steps x {args.batch}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


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
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    xtr, ytr = cifar10_tensors("train", limit=args.train_size)
    xte, yte = cifar10_tensors("test", limit=args.test_size)
    config = {k: v for k, v in vars(args).items()
              if k not in ("quiet", "name", "methods", "threads", "out")}
    key = "-".join(f"{k}={v}" for k, v in sorted(config.items()))
    cache = args.out / f"{args.name}_runs"
    prov = provenance(argv, script=__file__)
    rows, run_files = [], {}
    for method in args.methods.split(","):
        path = cache / f"{method}--{key}.json"
        run_files[method] = path.relative_to(args.out).as_posix()
        if path.exists():  # the run's own provenance stays in its file
            rows.append({k: v for k, v in json.loads(path.read_text()).items()
                         if k not in ("provenance", "earlier_provenance")})
            print(f"{method}: cached ({path.name})", file=sys.stderr)
            continue
        row = run(method, args, (xtr, ytr, xte, yte))
        write_result(path, dict(row), prov)
        rows.append(row)
        print(f"{method}: top-1 {row['top1']:.2f}% in {row['seconds']:.0f} s", file=sys.stderr)
    by = {r["method"]: r for r in rows}
    ratios = {}
    if "static" in by:
        for m in ("rigl", "gmp", "rigl2x"):
            if m in by:
                ratios[f"{m}_minus_static_top1"] = by[m]["top1"] - by["static"]["top1"]
    for m in ("rigl", "rigl2x"):
        if m in by and "gmp" in by:
            ratios[f"{m}_minus_gmp_top1"] = by[m]["top1"] - by["gmp"]["top1"]
    out = {"config": config, "results": rows, "comparisons": ratios, "run_files": run_files}
    write_result(args.out / f"{args.name}.json", out, prov)
    lines = [f"# Sparse training, ResNet-20 / CIFAR-10, density {args.density}", "",
             f"Command: `{prov['command']}`", "",
             f"Budget: {args.steps} steps x batch {args.batch} on the first {args.train_size} "
             f"train images; top-1 on the first {args.test_size} test images; seed {args.seed}.",
             "", "| method | top-1 % | sparsity | train FLOPs | vs dense training | "
             "inference FLOPs vs dense | seconds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['top1']:.2f} | {r['sparsity']:.3f} | "
                     f"{r['train_flops']:.3e} | {r['train_flops_vs_dense']:.3f} | "
                     f"{r['inference_flops_vs_dense']:.3f} | {r['seconds']:.0f} |")
    lines += ["", *(f"- {k}: {v:+.2f} points" for k, v in ratios.items())]
    atomic_write_text(args.out / f"{args.name}.md", "\n".join(lines) + "\n")
    plot(rows, args.out / f"{args.name}.png", args)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
