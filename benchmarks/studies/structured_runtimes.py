"""Does a structured cut's FLOPs ratio turn into speed, and under which runtime?

Issue 4 asks that a ResNet-56 shrunk to half its FLOPs measure at least 0.85x its FLOPs
ratio in speed. This script times the dense pretrained ResNet-56 against channel
allocations cut by prunekit (L1), each under four runtimes, side by side in interleaved
rounds in one process:

- eager: PyTorch as the model is written (oneDNN convolutions, NCHW);
- eager channels_last: the same with weights and inputs in NHWC;
- compiled: torch.compile (inductor; convolutions stay oneDNN calls);
- onnxruntime: the model exported by prunekit.runtime.export_onnx (verified allclose) and
  run by onnxruntime's CPU provider, all graph optimisations on.

Allocations (fraction of each stage's block inner channels removed):
- half: 50% everywhere (16->8, 32->16, 64->32): 0.502 of the FLOPs, the benchmark's case;
- stage1-whole: stage 1 kept, stages 2-3 lose 75% (32->8, 64->16): about half the FLOPs,
  with no 8-channel layer in stage 1;
- round16: every width a multiple of 16 (16, 32->16, 64->16): the fewest FLOPs multiples of
  16 allow, about 0.6.

Each row gives the FLOPs ratio, the speedup per runtime and batch, and the issue's target
(0.85 / FLOPs ratio). Accuracy is not measured here (see benchmarks/structured.py).
Results: benchmarks/results/structured_runtimes/structured_runtimes.json and .md (--out).

    python benchmarks/studies/structured_runtimes.py
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

from prunekit.bench.provenance import provenance, write_result
from prunekit.commands.common import add_malloc_option, apply_malloc_option
from prunekit.io import atomic_write_text
from prunekit.models import create
from prunekit.runtime import time_calls
from prunekit.runtime.export import export_onnx
from prunekit.structured import ChannelPrune, count_flops, shrink

RESULTS = Path(__file__).resolve().parents[1] / "results" / "structured_runtimes"
ALLOCATIONS = {  # fractions of each block's inner channels kept
    "half": {"layer*.conv1": 0.5},
    "stage1-whole": {"layer2.*.conv1": 0.25, "layer3.*.conv1": 0.25},
    "round16": {"layer2.*.conv1": 0.5, "layer3.*.conv1": 0.25},
}
RUNTIMES = ("eager", "eager channels_last", "compiled", "onnxruntime")


def runners(models: dict, batch: int, tmp: Path, threads: int) -> dict:
    """{(model, runtime): zero-argument call} for every model under every runtime."""
    import onnxruntime as ort

    x = torch.randn(batch, 3, 32, 32)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    calls = {}
    for name, m in models.items():
        cl = copy.deepcopy(m).to(memory_format=torch.channels_last)
        compiled = torch.compile(copy.deepcopy(m), dynamic=False)
        path = tmp / f"{name}.onnx"
        if not path.exists():
            export_onnx(m, x[:1], path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x.numpy()}
        calls[(name, "eager")] = lambda m=m: m(x)
        calls[(name, "eager channels_last")] = lambda cl=cl: cl(x_cl)
        calls[(name, "compiled")] = lambda c=compiled: c(x)
        calls[(name, "onnxruntime")] = lambda s=sess, f=feed: s.run(None, f)
    return calls


def table(res: dict) -> str:
    lines = []
    for batch in res["batches"]:
        lines.append(f"batch {batch}: speedup over dense (dense ms per runtime: "
                     + ", ".join(f"{r} {res['dense_ms'][str(batch)][r]:.2f}" for r in RUNTIMES)
                     + ")")
        lines.append(f"{'allocation':<14}{'FLOPs x':>8}{'target':>8}"
                     + "".join(f"{r:>21}" for r in RUNTIMES))
        for name, row in res["allocations"].items():
            sp = row["speedup"][str(batch)]
            lines.append(f"{name:<14}{row['flops_ratio']:8.3f}{row['target']:8.2f}"
                         + "".join(f"{sp[r]:>20.2f}{'*' if sp[r] >= row['target'] else ' '}"
                                   for r in RUNTIMES))
        lines.append("")
    lines.append("* = the issue's target (0.85 / FLOPs ratio) met")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "structured_runtimes.json"))
    add_malloc_option(p)
    args = p.parse_args(argv)
    apply_malloc_option(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = create("resnet56-cifar10", pretrained=True).eval()
    example = torch.randn(1, 3, 32, 32)
    flops = count_flops(base, example)
    models = {"dense": base}
    prov = provenance(argv, script=__file__, threads=args.threads)
    res = {"batches": args.batches, "dense_ms": {}, "allocations": {}}
    for name, per_layer in ALLOCATIONS.items():
        small, _ = shrink(base, ChannelPrune(per_layer=per_layer), example,
                          report_latency=False)
        models[name] = small.eval()
        ratio = count_flops(small, example) / flops
        res["allocations"][name] = {"per_layer": per_layer, "flops_ratio": ratio,
                                    "target": 0.85 / ratio, "speedup": {}}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for batch in args.batches:
            t = time_calls(runners(models, batch, Path(tmp), args.threads), warmup=3,
                           repeats=args.repeats, min_sample_s=0.0)
            dense = {r: t[("dense", r)]["median"] for r in RUNTIMES}
            res["dense_ms"][str(batch)] = {r: 1e3 * v for r, v in dense.items()}
            for name, row in res["allocations"].items():
                row["speedup"][str(batch)] = {r: dense[r] / t[(name, r)]["median"]
                                              for r in RUNTIMES}
    res["summary"] = table(res)
    out = Path(args.out)
    write_result(out, res, prov, indent=2)
    atomic_write_text(out.with_suffix(".md"), f"# Structured cut speed per runtime\n\n"
                      f"`{prov['command']}`, {args.threads} thread(s), "
                      f"{prov['allocator']} malloc, {prov['cpu']}\n\n"
                      f"```\n{res['summary']}\n```\n")
    print(res["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
