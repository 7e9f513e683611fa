"""SmolLM2-135M speed and size with the quantized kernels (issue 21): decode tokens/s at batch 1
with the key/value cache, prefill of 512 tokens, dense float32 against the int8 and int4
kernels (runtime/kernels/int8.py, int4.py); one joint sparse + quantized layer on every
kernel that can run it; model file sizes of every export format against float32.

Variants (weights by RTN: speed does not depend on how the codes were chosen):
  dense        the float32 model
  int8         block linears int8 per output channel (symmetric), int8 kernel
  int4         block linears int4 in symmetric groups of 64, int4 kernel
  int4+head8   int4 as above and lm_head on the int8 kernel (an int8 copy of the tied
               embedding matrix; the embeddings stay float32): lm_head is 28M of the 135M
               weights, a fifth of a dense decode step's bytes
The machine is shared and loaded: every variant is timed once per round, rounds interleave
the variants (order rotated), and the table gives medians and ratios to dense from the same
rounds, with the load average before and after.

    python benchmarks/quant_speed.py --part speed --rounds 5
    python benchmarks/quant_speed.py --part layer
    python benchmarks/quant_speed.py --part size

Results: benchmarks/results/quant_speed/{speed_t<threads>,layer,size}.json (provenance) and
.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import prunekit
from prunekit.bench.provenance import provenance, write_result
from prunekit.io import atomic_write_text
from prunekit.runtime.latency import num_threads

RESULTS = Path(__file__).resolve().parent / "results" / "quant_speed"
HEAD = ("lm_head",)


def load() -> tuple[float, float, float]:
    return os.getloadavg()


def build_variants() -> dict:
    from prunekit.models import create
    from prunekit.quant import get_grid
    from prunekit.quant.model import attach
    from prunekit.runtime.decode import quantized_runtime
    from prunekit.runtime.kernels import SparseLinear, make_kernel

    out = {"dense": create("smollm2-135m", pretrained=True)}
    m8 = create("smollm2-135m", pretrained=True)
    prunekit.quantize(m8, prunekit.RTN(bits=8, exclude=HEAD), None, progress=False)
    out["int8"] = quantized_runtime(m8, kernels=("int8",))[0]
    m4 = create("smollm2-135m", pretrained=True)
    prunekit.quantize(m4, prunekit.RTN(bits=4, group_size=64, exclude=HEAD), None,
                      progress=False)
    out["int4"] = quantized_runtime(m4, kernels=("int4",))[0]
    both = quantized_runtime(m4, kernels=("int4",))[0]
    w = both.lm_head.weight.detach()
    q = get_grid("int8").quantize(w, layer="lm_head")
    head = SparseLinear(make_kernel("int8", q.dequantize(), q), None)
    attach(head, q)
    both.lm_head = head  # the embeddings keep the float32 matrix
    out["int4+head8"] = both
    return out


def run_speed(args, prov) -> dict:
    from prunekit.runtime.decode import decode_tokens_per_second, prefill_seconds

    load_before = load()
    variants = build_variants()
    names = list(variants)
    torch.manual_seed(0)
    prompt = torch.randint(1000, 20000, (1, args.prompt))
    long = torch.randint(1000, 20000, (1, args.prefill))
    decode = {n: [] for n in names}
    prefill = {n: [] for n in names}
    with num_threads(args.threads):
        for n in names:  # warm-up (first calls allocate and pack)
            decode_tokens_per_second(variants[n], prompt, 2)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                d = decode_tokens_per_second(variants[n], prompt, args.tokens)
                decode[n].append(d["tokens_per_s"])
                prefill[n].append(prefill_seconds(variants[n], long))
            print(f"round {r + 1}: " + "  ".join(
                f"{n} {decode[n][-1]:.1f} tok/s {prefill[n][-1]:.2f} s" for n in names),
                flush=True)
    load_after = load()
    rows = []
    for n in names:
        rows.append({
            "variant": n, "decode_tokens_per_s": statistics.median(decode[n]),
            "prefill_512_s": statistics.median(prefill[n]),
            "decode_speedup": statistics.median(
                a / b for a, b in zip(decode[n], decode["dense"])),
            "prefill_speedup": statistics.median(
                b / a for a, b in zip(prefill[n], prefill["dense"])),
            "decode_rounds": decode[n], "prefill_rounds": prefill[n],
        })
    payload = {"rows": rows, "tokens": args.tokens, "prompt": args.prompt,
               "prefill": args.prefill, "rounds": args.rounds, "threads": args.threads,
               "loadavg_before": load_before, "loadavg_after": load_after}
    write_result(RESULTS / f"speed_t{args.threads}.json", payload, prov)
    lines = [f"# SmolLM2-135M decode and prefill, {args.threads} threads, {args.rounds} "
             f"interleaved rounds", "",
             f"load average before {load_before}, after {load_after} "
             f"(the machine has {os.cpu_count()} cores)", "",
             f"| variant | decode tok/s (batch 1, {args.tokens} tokens) | x dense | "
             f"prefill {args.prefill} tokens (s) | x dense |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['decode_tokens_per_s']:.2f} | "
                     f"{r['decode_speedup']:.2f} | {r['prefill_512_s']:.3f} | "
                     f"{r['prefill_speedup']:.2f} |")
    atomic_write_text(RESULTS / f"speed_t{args.threads}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return payload


def run_layer(args, prov) -> dict:
    """One SmolLM2-shaped layer (1536x576, as gate/up_proj), dense, 50% unstructured and
    2:4, each alone and with int4:g64 in the same pass (magnitude masks, RTN codes):
    every kernel that serves it, at 1 and 512 rows, timed side by side (time_calls)."""
    from torch import nn

    from prunekit.patterns import get_pattern
    from prunekit.quant import QuantizedWeight, get_grid
    from prunekit.quant.model import attach
    from prunekit.runtime.convert import candidate_kernels
    from prunekit.runtime.latency import time_calls

    torch.manual_seed(0)
    rows_out = []
    kernels = ("dense", "csr", "block", "int8", "int4")
    for sparsity in (None, "unstructured", "2:4"):
        for quant in (None, "int4:g64", "int8"):
            if sparsity is None and quant is None:
                continue
            lin = nn.Linear(576, 1536, bias=False)
            w = lin.weight.detach()
            keep = torch.ones_like(w, dtype=torch.bool)
            if sparsity:
                keep = get_pattern(sparsity).select(w.abs(), 0.5).bool()
                w = w * keep
            with torch.no_grad():
                lin.weight.copy_(w)
            if quant:
                q = get_grid(quant).quantize(w)
                q = QuantizedWeight(q.grid, q.codes, q.scales, q.zeros,
                                    keep if sparsity else None)
                with torch.no_grad():
                    lin.weight.copy_(q.dequantize())
                attach(lin, q)
            for n_rows in (1, 512):
                x = torch.randn(n_rows, 576)
                cands, notes = candidate_kernels(lin, x, kernels)
                with num_threads(args.threads), torch.inference_mode():
                    t = time_calls({k: (lambda m=m, x=x: m(x)) for k, m in cands.items()},
                                   repeats=args.repeats)
                ms = {k: 1e3 * v["median"] for k, v in t.items()}
                row = {"sparsity": sparsity or "dense", "quant": quant or "float32",
                       "rows": n_rows, "ms": ms,
                       "speedup": {k: ms["dense"] / v for k, v in ms.items()},
                       "fastest": min(ms, key=ms.get), "notes": notes}
                rows_out.append(row)
                print(f"{row['sparsity']:>12} {row['quant']:>8} rows {n_rows:>4}: " + "  ".join(
                    f"{k} {v:.3f} ms" for k, v in ms.items()), flush=True)
    payload = {"rows": rows_out, "threads": args.threads, "loadavg": load(),
               "shape": [1536, 576]}
    write_result(RESULTS / "layer.json", payload, prov)
    lines = ["# One 1536x576 layer: sparse, quantized, and both (x dense, same run)", "",
             f"{args.threads} threads, load average {payload['loadavg']}", "",
             "| mask | grid | rows | " + " | ".join(kernels) + " | fastest |",
             "|---|---|---|" + "---|" * len(kernels) + "---|"]
    for r in rows_out:
        cells = [f"{r['speedup'][k]:.2f}" if k in r["speedup"] else "-" for k in kernels]
        lines.append(f"| {r['sparsity']} | {r['quant']} | {r['rows']} | " + " | ".join(cells)
                     + f" | {r['fastest']} |")
    atomic_write_text(RESULTS / "layer.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return payload


def run_size(args, prov) -> dict:
    """File sizes of each export of SmolLM2 (RTN codes; GPTQ's have the same size)."""
    from prunekit.models import create
    from prunekit.quant import formats

    def block_bytes(path: Path, embedding_names) -> dict:
        total = path.stat().st_size if path.is_file() else sum(
            p.stat().st_size for p in path.rglob("*.safetensors"))
        return {"bytes": total}

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dense = create("smollm2-135m", pretrained=True)
        emb = dense.model.embed_tokens.weight.numel() * 4
        rows.append({"format": "float32 safetensors",
                     **formats.export(dense, tmp / "dense", "safetensors")})
        for label, cfg, fmts in (
                ("int8 per channel", prunekit.RTN(bits=8, exclude=HEAD),
                 ("compressed-tensors", "prunekit")),
                ("int8 g32 fp16", prunekit.RTN(bits=8, group_size=32, scale_dtype="float16",
                                               exclude=HEAD), ("gguf-q8_0",)),
                ("int4 g32 fp16", prunekit.RTN(bits=4, group_size=32, scale_dtype="float16",
                                               exclude=HEAD),
                 ("gguf-q4_0", "compressed-tensors", "prunekit")),
                ("int4 g64", prunekit.RTN(bits=4, group_size=64, exclude=HEAD),
                 ("compressed-tensors", "prunekit"))):
            m = create("smollm2-135m", pretrained=True)
            prunekit.quantize(m, cfg, None, progress=False)
            for fmt in fmts:
                res = formats.export(m, tmp / f"{label}-{fmt}".replace(" ", "_"), fmt)
                rows.append({"format": fmt, "grid": label, **res})
    fp32 = rows[0]["bytes"]
    for r in rows:
        r["x_fp32"] = r["bytes"] / fp32
        r["x_fp32_embeddings_excepted"] = (r["bytes"] - emb) / (fp32 - emb)
    payload = {"rows": [{k: v for k, v in r.items() if k != "path"} for r in rows],
               "embedding_bytes_fp32": emb}
    write_result(RESULTS / "size.json", payload, prov)
    lines = ["# SmolLM2-135M file sizes (the float32 embeddings, tied to lm_head, are in every "
             "file)", "", "| format | grid | MB | x fp32 | x fp32, embeddings excepted |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['format']} | {r.get('grid', '-')} | {r['bytes'] / 1e6:.1f} | "
                     f"{r['x_fp32']:.3f} | {r['x_fp32_embeddings_excepted']:.3f} |")
    atomic_write_text(RESULTS / "size.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return payload


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("speed", "layer", "size", "all"), default="all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per measurement")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding")
    ap.add_argument("--prefill", type=int, default=512, help="prefill length")
    ap.add_argument("--repeats", type=int, default=9, help="layer part: timed calls")
    args = ap.parse_args(argv)
    prov = provenance(argv if argv is not None else sys.argv[1:], threads=args.threads)
    prov["loadavg_at_start"] = load()
    if args.part in ("speed", "all"):
        run_speed(args, prov)
    if args.part in ("layer", "all"):
        run_layer(args, prov)
    if args.part in ("size", "all"):
        run_size(args, prov)
    print(json.dumps({"results": str(RESULTS)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
