"""Sparse kernel speedup over dense matmul, measured side by side.

For each weight shape (out x in), sparsity and batch size, times y = x @ W^T as
- dense: torch.nn.functional.linear with the dense (zero-holding) weight;
- csr: prunekit.runtime CSRWeight (torch.sparse CSR) with an unstructured random mask;
- 1x16 block: prunekit.runtime BlockWeight with a random 1x16 mask (16 output rows share
  their kept inputs), and csr on that same 1x16 mask;
all through SparseLinear, i.e. including the transposes a model would pay. Timings are
interleaved rounds (median), so load changes hit all candidates alike. Random Gaussian
weights: kernel speed depends on the mask, not the values.

On a CUDA GPU with compute capability 8.0+ (none in the session that wrote the committed
results) it also times 2:4 semi-structured sparsity in fp16 against dense fp16.

    python benchmarks/kernels.py                 # all shapes, 1 thread
    python benchmarks/kernels.py --threads 2 --shapes 384x384,768x768
    python benchmarks/kernels.py --quick         # two small shapes, batch 1 and 16

Finished rows are kept in the results file; a rerun skips them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from prunekit.io import atomic_write_text
from prunekit.patterns import Block1xN
from prunekit.runtime.kernels import BlockWeight, CSRWeight, SparseLinear
from prunekit.runtime.latency import machine_info, num_threads, time_calls

RESULTS = Path(__file__).parent / "results"
SHAPES = [(384, 384), (1536, 384), (384, 1536), (768, 768), (3072, 768), (768, 3072),
          (4096, 4096)]
SPARSITIES = (0.5, 0.7, 0.9, 0.95)
BATCHES = (1, 16, 128)
BLOCK = 16


def _row_key(shape, s, batch) -> str:
    return f"{shape[0]}x{shape[1]}/{s}/{batch}"


def measure(shape, s, batch, repeats, gen) -> dict:
    out, inp = shape
    w = torch.randn(out, inp, generator=gen)
    x = torch.randn(batch, inp, generator=gen)
    unstructured = w * (torch.rand(out, inp, generator=gen) >= s)
    block = w * Block1xN(BLOCK).select(torch.rand(out, inp, generator=gen), s)
    mods = {"csr": SparseLinear(CSRWeight(unstructured), None),
            "block_1x16": SparseLinear(BlockWeight(block, BLOCK), None),
            "csr_on_1x16": SparseLinear(CSRWeight(block), None)}
    with torch.inference_mode():
        for name, ref in (("csr", unstructured), ("block_1x16", block), ("csr_on_1x16", block)):
            torch.testing.assert_close(mods[name](x), F.linear(x, ref), rtol=1e-3, atol=1e-3)
        calls = {"dense": lambda: F.linear(x, unstructured)}
        calls.update({k: (lambda m=m: m(x)) for k, m in mods.items()})
        t = time_calls(calls, repeats=repeats)
    dense = t["dense"]["median"]
    row = {"shape": f"{out}x{inp}", "sparsity": s, "batch": batch,
           "dense_ms": 1e3 * dense}
    for k in mods:
        row[f"{k}_ms"] = 1e3 * t[k]["median"]
        row[f"{k}_speedup"] = dense / t[k]["median"]
    return row


def measure_24(shape, batch, repeats) -> dict | None:
    """2:4 fp16 on CUDA against dense fp16, or None without a suitable GPU."""
    from prunekit.runtime.kernels import semi_structured_unavailable

    out, inp = shape
    w = torch.randn(out, inp)
    mask = torch.zeros(out, inp // 4, 4, dtype=torch.bool)
    mask[..., :2] = True
    w = w * mask.reshape(out, inp)
    if semi_structured_unavailable(w):
        return None
    from torch.sparse import to_sparse_semi_structured

    wd = w.half().cuda()
    ws = to_sparse_semi_structured(wd)
    x = torch.randn(batch, inp, device="cuda", dtype=torch.half)

    def sync(f):
        def g():
            f()
            torch.cuda.synchronize()
        return g

    t = time_calls({"dense": sync(lambda: F.linear(x, wd)),
                    "2:4": sync(lambda: F.linear(x, ws))}, repeats=repeats)
    return {"shape": f"{out}x{inp}", "batch": batch, "dense_ms": 1e3 * t["dense"]["median"],
            "2:4_ms": 1e3 * t["2:4"]["median"],
            "2:4_speedup": t["dense"]["median"] / t["2:4"]["median"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--shapes", help="comma-separated OUTxIN subset")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "kernels.json"))
    args = p.parse_args(argv)
    shapes = SHAPES
    batches = BATCHES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.quick:
        shapes, batches = [(384, 384), (768, 768)], (1, 16)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["command"] = "python " + " ".join(["benchmarks/kernels.py", *sys.argv[1:]])
    results["machine"] = machine_info(args.threads)
    rows = results.setdefault("rows", {})
    gen = torch.Generator().manual_seed(0)
    print(f"machine: {results['machine']['cpu']}, {args.threads} thread(s), "
          f"torch {torch.__version__}")
    print(f"{'shape':>10} {'sparsity':>8} {'batch':>5} {'dense ms':>9} {'csr':>6} "
          f"{'1x16':>6} {'csr@1x16':>8}   (speedup over dense)")
    with num_threads(args.threads):
        for shape in shapes:
            for s in SPARSITIES:
                for batch in batches:
                    key = _row_key(shape, s, batch)
                    if key not in rows:
                        rows[key] = measure(shape, s, batch, args.repeats, gen)
                        atomic_write_text(out, json.dumps(results, indent=1))
                    r = rows[key]
                    print(f"{r['shape']:>10} {s:>8.2f} {batch:>5} {r['dense_ms']:>9.3f} "
                          f"{r['csr_speedup']:>5.2f}x {r['block_1x16_speedup']:>5.2f}x "
                          f"{r['csr_on_1x16_speedup']:>7.2f}x", flush=True)
        gpu = []
        for shape in shapes:
            for batch in batches:
                r = measure_24(shape, batch, args.repeats)
                if r is None:
                    break
                gpu.append(r)
        results["semi_structured_2_4"] = gpu or (
            "not measured: no CUDA GPU with compute capability 8.0+ was available in this "
            "session; the 2:4 path is guarded and falls back to dense")
        atomic_write_text(out, json.dumps(results, indent=1))
    print("2:4:", results["semi_structured_2_4"] if not gpu else f"{len(gpu)} rows")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
