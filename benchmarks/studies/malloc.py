"""How much the C library's allocator decides a measured CPU latency.

glibc serves an allocation above its mmap threshold (which rises as large blocks are freed,
but never past 32 MiB) with a fresh mmap, unless a free block of the heap can take it, and
unmaps it on free: a forward pass may then map and zeroe its activations again on every
call (page faults), depending on what the process did before.
prunekit.runtime.keep_freed_memory() keeps freed memory in the process, as jemalloc or
tcmalloc would. The mode cannot be undone within a process, so each measurement is a fresh
process, alternating the default allocator and kept memory (--rounds pairs); the summary
takes the median over the processes of each mode. Every process times, in interleaved
rounds:
- ResNet-56 (CIFAR-10, batch 64), dense and with half of every block's inner channels
  removed (prunekit L1, the shapes of benchmarks/structured.py);
- MiniLM at batch 64 x 128 tokens, dense and with 95% of every layer's weights pruned in
  1x16 blocks (magnitude), every such layer on prunekit's block kernel;
and reports the median call and the minor page faults per call. Results:
benchmarks/results/malloc/malloc.json (--out), with the run's provenance.

    python benchmarks/studies/malloc.py
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from prunekit.bench.provenance import provenance, write_result
from prunekit.runtime import keep_freed_memory, time_calls

RESULTS = Path(__file__).resolve().parents[1] / "results" / "malloc"
PAIRS = (("resnet56", "resnet56 dense b64", "resnet56 half-inner b64"),
         ("minilm", "minilm dense b64x128", "minilm 1x16 95% b64x128"))


def faults_per_call(fn, calls: int = 2) -> float:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def models() -> dict:
    """The four calls, built the same way in every process."""
    from prunekit import Magnitude, prune
    from prunekit.budget.measured import unfit_layers
    from prunekit.models import create
    from prunekit.runtime import convert
    from prunekit.structured import ChannelPrune, shrink

    resnet = create("resnet56-cifar10", pretrained=True).eval()
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    small, _ = shrink(resnet, ChannelPrune(per_layer={"layer*.conv1": 0.5}), x[:1],
                      report_latency=False)
    small.eval()
    minilm = create("minilm", pretrained=True).eval()
    ids = torch.randint(1000, 20000, (64, 128), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    sparse = copy.deepcopy(minilm)
    skip = unfit_layers(minilm, "1x16")
    prune(sparse, Magnitude(sparsity=0.95, pattern="1x16", exclude=skip), progress=False)
    convert(sparse, batch, ("block",), exclude=skip, inplace=True, progress=False,
            choose="first")
    return {PAIRS[0][1]: lambda: resnet(x), PAIRS[0][2]: lambda: small(x),
            PAIRS[1][1]: lambda: minilm(**batch), PAIRS[1][2]: lambda: sparse(**batch)}


def child(mode: str, repeats: int) -> dict:
    if mode == "kept" and not keep_freed_memory():
        raise SystemExit("this C library is not glibc: there is nothing to compare")
    calls = models()
    with torch.inference_mode():
        times = time_calls(calls, warmup=2, repeats=repeats, min_sample_s=0.0)
        faults = {k: faults_per_call(fn) for k, fn in calls.items()}
    return {k: {"ms": 1e3 * v["median"], "faults": faults[k]} for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="pairs of processes (default, kept)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per model and process")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", choices=("system", "kept"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(RESULTS / "malloc.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.repeats)))
        return 0
    runs = {"system": [], "kept": []}
    for r in range(args.rounds):
        for mode in ("system", "kept"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--repeats",
                                  str(args.repeats), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} {mode}: "
                  + ", ".join(f"{k} {v['ms']:.0f} ms" for k, v in runs[mode][-1].items()),
                  flush=True)
    med = {mode: {k: {"ms": statistics.median(run[k]["ms"] for run in rs),
                      "faults": statistics.median(run[k]["faults"] for run in rs)}
                  for k in rs[0]} for mode, rs in runs.items()}
    lines = [f"{'model':<26}{'default ms':>11}{'faults':>9}{'kept ms':>9}{'faults':>8}"
             f"{'default/kept':>14}"]
    for k in med["system"]:
        s, e = med["system"][k], med["kept"][k]
        lines.append(f"{k:<26}{s['ms']:>11.1f}{s['faults']:>9.0f}{e['ms']:>9.1f}"
                     f"{e['faults']:>8.0f}{s['ms'] / e['ms']:>13.2f}x")
    speedups = {}
    for mode in ("system", "kept"):
        for model, dense, pruned in PAIRS:
            speedups[f"{model}_{mode}"] = med[mode][dense]["ms"] / med[mode][pruned]["ms"]
            lines.append(f"{pruned} over dense, {'default' if mode == 'system' else mode} "
                         f"allocator: {speedups[f'{model}_{mode}']:.2f}x")
    prov = provenance(argv, script=__file__, threads=args.threads,
                      allocator="system and kept, in alternating processes (the comparison)")
    results = {"processes": runs, "median": med, "speedups": speedups,
               "summary": "\n".join(lines)}
    write_result(args.out, results, prov, indent=2)
    print(results["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
