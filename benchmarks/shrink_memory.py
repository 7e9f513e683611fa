"""Peak memory and time of `shrink` before and after the structured refactor (issue 19).

`shrink(model, ChannelPrune(flops_ratio=0.5), x)` (L1 importance, latency measured, the
defaults) on ResNet-56 (CIFAR-10, pretrained, 1x3x32x32) and on torchvision's ResNet-50
(seeded random weights, 1x3x224x224). Each run is a fresh process, so its peak resident set
(getrusage's ru_maxrss; tracemalloc cannot see torch's C++ allocations) belongs to that run
alone; the process's resident set just before `shrink` is recorded too, and the difference
is what `shrink` itself added at its peak. BEFORE runs the untouched baseline checkout
(`--before`, default /work/baseline/src, commit 8657ca8), AFTER this checkout's src/, both
with the same torch, threads and inputs. The two shrunk models must be identical: the same
tensor shapes (kept channels), bit-identical weights, and outputs on a fixed input equal.

    PRUNEKIT_DATA=/work/shared/data python benchmarks/shrink_memory.py
    python benchmarks/shrink_memory.py --models resnet50 --rounds 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results" / HERE.stem
MODELS = {"resnet56": (1, 3, 32, 32), "resnet50": (1, 3, 224, 224)}


def rss_kib() -> int:
    """The process's resident set now (KiB), from /proc/self/status."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child(model_name: str, threads: int, out_file: str) -> dict:
    """Build the model, shrink it once, report memory, time and what was kept."""
    torch.set_num_threads(threads)
    import prunekit
    from prunekit.structured import ChannelPrune, shrink

    torch.manual_seed(0)
    if model_name == "resnet56":
        from prunekit.models import create

        model = create("resnet56-cifar10", pretrained=True).eval()
    else:
        import torchvision

        model = torchvision.models.resnet50().eval()
    x = torch.randn(*MODELS[model_name], generator=torch.Generator().manual_seed(0))
    rss_before = rss_kib()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    small, report = shrink(model, ChannelPrune(flops_ratio=0.5), x)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    small.eval()
    with torch.no_grad():
        y = small(x)
    torch.save(y, out_file)
    digest = hashlib.sha256()
    for k, v in small.state_dict().items():
        digest.update(k.encode())
        digest.update(v.detach().contiguous().numpy().tobytes())
    return {"prunekit": str(Path(prunekit.__file__).parent), "seconds": seconds,
            "rss_before_shrink_kib": rss_before, "peak_before_shrink_kib": peak_before,
            "peak_rss_kib": peak, "shrink_added_kib": peak - rss_before,
            "flops_ratio": report.flops_ratio, "params_after": report.params_after,
            "shapes": {k: list(v.shape) for k, v in small.state_dict().items()},
            "weights_sha256": digest.hexdigest()}


def git_commit(path: Path) -> str:
    def git(*a):
        return subprocess.run(["git", "-C", str(path), *a], capture_output=True,
                              text=True).stdout.strip()
    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--", ".") else "")


def run_child(src: Path, model_name: str, threads: int, out_file: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), PRUNEKIT_PROGRESS="0")
    cmd = [sys.executable, str(HERE), "--child", model_name, "--threads", str(threads),
           "--output-file", out_file]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{model_name} with PYTHONPATH={src} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default="/work/baseline/src",
                   help="src/ of the baseline checkout (commit 8657ca8)")
    p.add_argument("--after", default=str(HERE.parent.parent / "src"))
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1,
                   help="processes per (model, checkout), alternating; medians reported")
    p.add_argument("--out", default=str(RESULTS / "shrink_memory.json"))
    p.add_argument("--child", choices=list(MODELS), help=argparse.SUPPRESS)
    p.add_argument("--output-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.threads, args.output_file)))
        return

    sys.path.insert(0, args.after)
    from prunekit.io import atomic_write_text
    from prunekit.runtime import machine_info

    sides = {"before": Path(args.before), "after": Path(args.after)}
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
               "commits": {k: git_commit(v) for k, v in sides.items()},
               "machine": machine_info(args.threads), "threads": args.threads,
               "measure": "peak RSS = getrusage ru_maxrss of a fresh process per run",
               "models": {}}
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            runs = {"before": [], "after": []}
            outputs = {}
            for r in range(args.rounds):  # alternate the order: noise hits both sides
                for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
                    f = os.path.join(tmp, f"{name}-{side}-{r}.pt")
                    runs[side].append(run_child(sides[side], name, args.threads, f))
                    outputs.setdefault(side, torch.load(f))
            b, a = runs["before"][0], runs["after"][0]
            same_shapes = b["shapes"] == a["shapes"]
            same_weights = b["weights_sha256"] == a["weights_sha256"]
            diff = float((outputs["before"] - outputs["after"]).abs().max())
            med = {side: {k: statistics.median(run[k] for run in rs) for k in
                          ("seconds", "peak_rss_kib", "shrink_added_kib",
                           "rss_before_shrink_kib")} for side, rs in runs.items()}
            for rs in runs.values():
                for run in rs:
                    run.pop("shapes")
            results["models"][name] = {
                "input": list(MODELS[name]), "runs": runs, "median": med,
                "identical": {"shapes": same_shapes, "weights": same_weights,
                              "outputs_max_abs_diff": diff},
                "ratios_after_over_before": {
                    k: med["after"][k] / med["before"][k]
                    for k in ("seconds", "peak_rss_kib", "shrink_added_kib")}}
            lines.append(
                f"{name}: peak RSS {med['before']['peak_rss_kib'] / 1024:.0f} -> "
                f"{med['after']['peak_rss_kib'] / 1024:.0f} MiB, added by shrink "
                f"{med['before']['shrink_added_kib'] / 1024:.0f} -> "
                f"{med['after']['shrink_added_kib'] / 1024:.0f} MiB, time "
                f"{med['before']['seconds']:.1f} -> {med['after']['seconds']:.1f} s; "
                f"same shapes {same_shapes}, same weights {same_weights}, "
                f"output diff {diff:.3g}")
            if not (same_shapes and same_weights and diff == 0.0):
                lines.append(f"{name}: THE SHRUNK MODELS DIFFER")
    results["summary"] = lines
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
