"""How much the C library's allocator decides a measured CPU latency, side by side in one run.

glibc serves every allocation above its mmap threshold (which rises as large blocks are
freed, but never past 32 MiB) with a fresh mmap and unmaps it on free, so each forward pass
maps and zeroes those activations again (page faults). The
run times the same models twice in one process: first with the allocator as it starts,
then after prunekit.runtime.keep_freed_memory(), which keeps freed memory in the process
as jemalloc or tcmalloc would. The models:
- ResNet-56 (CIFAR-10, batch 64), dense and with half of every block's inner channels
  removed (prunekit L1, the shapes of benchmarks/structured.py), and the speedup between
  them under each allocator;
- MiniLM at batch 64 x 128 tokens, dense and with 95% of every layer's weights pruned in
  1x16 blocks (magnitude), converted once (prunekit.runtime.convert, under the default
  allocator) to the fastest kernel per layer, and the speedup between them under each.
Each phase reports the median and the p10-p90 spread of single calls (interleaved rounds),
and the minor page faults per call.

    python benchmarks/malloc.py
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
from pathlib import Path

import torch

from prunekit import Magnitude, prune
from prunekit.budget.measured import unfit_layers
from prunekit.io import atomic_write_text
from prunekit.models import create
from prunekit.runtime import convert, keep_freed_memory, machine_info, time_calls
from prunekit.structured import ChannelPrune, shrink

RESULTS = Path(__file__).parent / "results"


def faults_per_call(fn, calls: int = 3) -> float:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def phase(calls: dict, repeats: int) -> dict:
    with torch.inference_mode():
        times = time_calls(calls, warmup=2, repeats=repeats, min_sample_s=0.0)
        faults = {k: faults_per_call(fn) for k, fn in calls.items()}
    return {k: {"median_ms": 1e3 * v["median"], "p10_ms": 1e3 * v["p10"],
                "p90_ms": 1e3 * v["p90"], "page_faults_per_call": faults[k]}
            for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "malloc.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    resnet = create("resnet56-cifar10", pretrained=True).eval()
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    small, _ = shrink(resnet, ChannelPrune(per_layer={"layer*.conv1": 0.5}), x[:1],
                      measure_latency_=False)
    small.eval()
    minilm = create("minilm", pretrained=True).eval()
    ids = torch.randint(1000, 20000, (64, 128), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": mask}
    sparse = copy.deepcopy(minilm)
    prune(sparse, Magnitude(sparsity=0.95, pattern="1x16",
                            exclude=unfit_layers(minilm, "1x16")), progress=False)
    sparse, _ = convert(sparse, batch, kernels=("dense", "csr", "block"), progress=False)
    calls = {"resnet56 dense b64": lambda: resnet(x),
             "resnet56 half-inner b64": lambda: small(x),
             "minilm dense b64x128": lambda: minilm(**batch),
             "minilm 1x16 95% b64x128": lambda: sparse(**batch)}
    results = {"command": "python " + " ".join(sys.argv), "machine": machine_info(args.threads)}
    results["system"] = phase(calls, args.repeats)
    if not keep_freed_memory():
        print("this C library is not glibc: nothing to compare", file=sys.stderr)
        return 1
    results["kept"] = phase(calls, args.repeats)
    lines = [f"{'model':<26}{'system malloc ms (p10-p90)':>30}{'faults':>8}"
             f"{'kept ms (p10-p90)':>24}{'faults':>8}{'system/kept':>13}"]
    for k in calls:
        s, e = results["system"][k], results["kept"][k]
        lines.append(f"{k:<26}{s['median_ms']:>12.1f} ({s['p10_ms']:.1f}-{s['p90_ms']:.1f})"
                     f"{'':>4}{s['page_faults_per_call']:>8.0f}"
                     f"{e['median_ms']:>9.1f} ({e['p10_ms']:.1f}-{e['p90_ms']:.1f})"
                     f"{e['page_faults_per_call']:>8.0f}{s['median_ms'] / e['median_ms']:>12.2f}x")
    for mode in ("system", "kept"):
        r = results[mode]
        for model, dense, pruned in (("resnet56", "resnet56 dense b64", "resnet56 half-inner b64"),
                                     ("minilm", "minilm dense b64x128",
                                      "minilm 1x16 95% b64x128")):
            sp = r[dense]["median_ms"] / r[pruned]["median_ms"]
            results[f"{model}_speedup_{mode}"] = sp
            lines.append(f"{pruned} speedup over dense, {mode} malloc: {sp:.2f}x")
    results["summary"] = "\n".join(lines)
    atomic_write_text(Path(args.out), json.dumps(results, indent=2))
    print(results["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
