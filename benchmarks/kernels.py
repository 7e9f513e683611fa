"""Sparse kernel speedup over dense matmul, measured side by side.

For each weight shape (out x in), sparsity and batch size, times y = x @ W^T as
- dense: torch.nn.functional.linear with the dense (zero-holding) weight;
- csr: prunekit.runtime CSRWeight (torch.sparse CSR) with an unstructured random mask;
- 1x16 block: prunekit.runtime BlockWeight with a random 1x16 mask (16 output rows share
  their kept inputs), and csr on that same 1x16 mask;
all through SparseLinear, i.e. including the transposes a model would pay. Timings are
interleaved rounds (median), so load changes hit all candidates alike. Random Gaussian
weights: kernel speed depends on the mask, not the values.

--convs times ResNet-20's 3x3 convolutions (batch 1, 16, 64) the same way through
SparseConv2d: unstructured masks on the (out, in*9) weight matrix, and 1x16 masks, which on
a 16-channel layer prune whole (input channel, offset) taps, so the layer gathers only the
patch rows it reads instead of building all of im2col.

On a CUDA GPU with compute capability 8.0+ (none in the session that wrote the committed
results) it also times 2:4 semi-structured sparsity in fp16 against dense fp16.

    python benchmarks/kernels.py                 # all shapes, 1 thread
    python benchmarks/kernels.py --threads 2 --shapes 384x384,768x768
    python benchmarks/kernels.py --quick         # two small shapes, batch 1 and 16
    python benchmarks/kernels.py --convs --out benchmarks/results/kernels/kernels_conv.json

Results go to benchmarks/results/kernels/kernels.json (--out) with the run's provenance.
Finished rows are kept in the results file; a rerun skips them, and refuses to add rows timed
under another allocator.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from prunekit.bench.provenance import load_result, provenance, recorded, write_result
from prunekit.commands.common import add_malloc_option, allocator_conflict, apply_malloc_option
from prunekit.patterns import Block1xN
from prunekit.runtime.kernels import BlockWeight, CSRWeight, SparseLinear, sparse_module
from prunekit.runtime.latency import num_threads, time_calls

RESULTS = Path(__file__).resolve().parent / "results" / "kernels"
SHAPES = [(384, 384), (1536, 384), (384, 1536), (768, 768), (3072, 768), (768, 3072),
          (4096, 4096)]
SPARSITIES = (0.5, 0.7, 0.9, 0.95)
BATCHES = (1, 16, 128)
BLOCK = 16
# ResNet-20's convolutions: (in, out, input size, stride)
CONVS = [(16, 16, 32, 1), (16, 32, 32, 2), (32, 32, 16, 1), (32, 64, 16, 2), (64, 64, 8, 1)]
CONV_BATCHES = (1, 16, 64)


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


def measure_conv(spec, s, batch, repeats, gen) -> dict:
    cin, cout, size, stride = spec
    conv = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    x = torch.randn(batch, cin, size, size, generator=gen)
    w = torch.randn(cout, cin * 9, generator=gen)
    masks = {"csr": torch.rand(cout, cin * 9, generator=gen) >= s,
             "1x16": Block1xN(BLOCK).select(torch.rand(cout, cin * 9, generator=gen), s)}
    mods, dense = {}, {}
    for name, kind, mask in (("csr", "csr", "csr"), ("block_1x16", "block", "1x16"),
                             ("csr_on_1x16", "csr", "1x16")):
        ref = copy.deepcopy(conv)
        with torch.no_grad():
            ref.weight.copy_((w * masks[mask]).view_as(conv.weight))
        mods[name], dense[name] = sparse_module(ref, kind), ref
    with torch.inference_mode():
        for name, m in mods.items():
            torch.testing.assert_close(m(x), dense[name](x), rtol=1e-3, atol=1e-3)
        calls = {"dense": lambda: dense["csr"](x)}
        calls.update({k: (lambda m=m: m(x)) for k, m in mods.items()})
        t = time_calls(calls, repeats=repeats)
    row = {"conv": f"{cin}->{cout} {size}x{size} s{stride}", "sparsity": s, "batch": batch,
           "dense_ms": 1e3 * t["dense"]["median"],
           "taps_read_1x16": int(mods["block_1x16"].taps.numel()) if mods[
               "block_1x16"].taps is not None else cin * 9, "taps_all": cin * 9}
    for k in mods:
        row[f"{k}_ms"] = 1e3 * t[k]["median"]
        row[f"{k}_speedup"] = t["dense"]["median"] / t[k]["median"]
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
    add_malloc_option(p)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--shapes", help="comma-separated OUTxIN subset")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--convs", action="store_true", help="ResNet-20 convolutions instead")
    p.add_argument("--out", default=str(RESULTS / "kernels.json"))
    args = p.parse_args(argv)
    shapes = SHAPES
    batches = BATCHES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.quick:
        shapes, batches = [(384, 384), (768, 768)], (1, 16)
    out = Path(args.out)
    results = load_result(out)  # rows kept from earlier runs keep those runs' provenance
    apply_malloc_option(args)
    conflict = results.get("rows") and allocator_conflict(
        {"malloc": recorded(results, "allocator")}, out)
    if conflict:
        p.error(conflict)
    prov = provenance(argv, script=__file__, threads=args.threads)
    rows = results.setdefault("rows", {})
    gen = torch.Generator().manual_seed(0)
    print(f"machine: {prov['cpu']}, {args.threads} thread(s), torch {prov['torch']}, "
          f"{prov['allocator']} allocator")

    def save():
        write_result(out, results, prov)

    if args.convs:
        return run_convs(args, rows, save, gen)
    print(f"{'shape':>10} {'sparsity':>8} {'batch':>5} {'dense ms':>9} {'csr':>6} "
          f"{'1x16':>6} {'csr@1x16':>8}   (speedup over dense)")
    with num_threads(args.threads):
        sweep(rows, save, shapes, batches, _row_key, measure, args.repeats, gen,
              lambda r: f"{r['shape']:>10}")
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
        save()
    print("2:4:", results["semi_structured_2_4"] if not gpu else f"{len(gpu)} rows")
    print(f"wrote {out}")
    return 0


def sweep(rows, save, specs, batches, key, measure_row, repeats, gen, label):
    """Measure every (spec, sparsity, batch) row not yet in `rows` (saved after each one)
    and print them all."""
    for spec in specs:
        for s in SPARSITIES:
            for batch in batches:
                k = key(spec, s, batch)
                if k not in rows:
                    rows[k] = measure_row(spec, s, batch, repeats, gen)
                    save()
                r = rows[k]
                print(f"{label(r)} {s:>8.2f} {batch:>5} {r['dense_ms']:>9.3f} "
                      f"{r['csr_speedup']:>5.2f}x {r['block_1x16_speedup']:>5.2f}x "
                      f"{r['csr_on_1x16_speedup']:>7.2f}x", flush=True)


def run_convs(args, rows, save, gen) -> int:
    print(f"{'conv':>20} {'taps read (1x16)':>16} {'sparsity':>8} {'batch':>5} "
          f"{'dense ms':>9} {'csr':>6} {'1x16':>6} {'csr@1x16':>8}   (speedup over dense)")
    with num_threads(args.threads):
        sweep(rows, save, CONVS, CONV_BATCHES, lambda c, s, b: f"conv/{c}/{s}/{b}",
              measure_conv, args.repeats, gen,
              lambda r: f"{r['conv']:>20} {r['taps_read_1x16']:>7}/{r['taps_all']:<8}")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
