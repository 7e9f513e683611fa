"""prunekit against the authors' own code on a whole LLM: SmolLM2-135M pruned block by block by
IST-DASLab/sparsegpt's `SparseGPT` class and by locuslab/wanda's `prune_wanda`, then by
prunekit's SparseGPT and Wanda, on the same model, the same calibration tokens, in the same
run; perplexity and pruning time of each side and their ratios (issue 20's side by side).

The reference code is imported from its local copy (prunekit.bench.reference: fetched into a
cache, never copied into this repository); a side whose copy is missing is skipped with the
command that gets it. Both references are driven as their scripts drive them, with two
adaptations to today's transformers, both outside the pruning itself:
  sparsegpt   its llama.py loop, written out here (llama.py is a script, not a function):
              capture the inputs of block 0, hook add_batch on every linear layer of a
              block, run the block, fasterprune(sparsity, prunen, prunem, blocksize=128,
              percdamp=.01) each layer, rerun the block with the pruned weights for the next
              block's inputs; all the layers of a block see the dense block's inputs (the
              script's default, not --true-sequential), lm_head and embeddings dense. The
              block is called with every keyword the model passed to block 0 (llama.py
              passes attention_mask alone: transformers then computed RoPE inside the block,
              today the model computes the position embeddings once and passes them).
  wanda       its own `prune_wanda(args, model, tokenizer, device, prune_n, prune_m)` from
              lib/prune.py, unchanged, with three stubs: `get_loaders` returns our 32
              segments (instead of C4), the model gets `seqlen` and an empty `hf_device_map`,
              and each block is wrapped so that a call with position_ids alone (as
              prune_wanda calls them) gets the position embeddings the model would pass.
prunekit: prunekit.prune with SparseGPT / Wanda(pattern="unstructured:row"), sequential=True,
exclude=("lm_head",), given the same segments as batches.

Rows: sparsegpt and wanda at 50% unstructured and at 2:4, each side on its own copy of the one
dense model, reference first then prunekit; the dense model's perplexity as a row of its
own. Calibration: 32 x 512 tokens of WikiText-2 validation (seed 0). Perplexity: the issue's
8 steering windows of WikiText-2 test (benchmarks/llm_oneshot.py's eval_ids("steering8")),
1024 tokens each. Targets: prunekit's perplexity within 2% of the reference's, and its
pruning time no slower. Also recorded per side: peak resident memory while pruning (the
kernel's high-water mark, reset before each side), the sparsity of the block layers, the load
average around the side (the machine may be shared), and the share of weights where both
sides made the same keep/drop decision.

    python benchmarks/llm_reference.py                      # every row
    python benchmarks/llm_reference.py --only 'wanda/*'     # a subset (comma globs)
    python benchmarks/llm_reference.py --only 'sparsegpt/2:4' --redo   # again

Each finished row is written at once to results/llm_reference/results.json, so an
interrupted run resumes at the first unfinished row (a row's two sides always come from one
run).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import io
import os
import time
import types
from pathlib import Path

import torch
from torch import nn

import prunekit
from prunekit.bench.provenance import load_result, provenance, select, write_result
from prunekit.bench.reference import cpu_run, import_file, locate, stub_module
from prunekit.evaluate import lm_perplexity
from prunekit.models import calibration_batches, create

RESULTS = Path(__file__).resolve().parent / "results" / "llm_reference"
HEAD = ("lm_head",)
SETTINGS = {"50%": dict(sparsity=0.5, n=0, m=0), "2:4": dict(sparsity=0.5, n=2, m=4)}
EVAL = "steering8"
TARGETS = {"ppl_ratio": 1.02, "time_ratio": 1.0}


def rows() -> list[dict]:
    out = [dict(key="dense", method="dense", setting="-")]
    for method in ("sparsegpt", "wanda"):
        for setting in SETTINGS:
            out.append(dict(key=f"{method}/{setting}", method=method, setting=setting))
    return out


def prunekit_config(row: dict):
    pattern = "2:4" if row["setting"] == "2:4" else None
    if row["method"] == "sparsegpt":
        kw = dict(pattern=pattern) if pattern else dict(sparsity=0.5)
        return prunekit.SparseGPT(**kw, sequential=True, exclude=HEAD)
    return prunekit.Wanda(sparsity=0.5, pattern=pattern or "unstructured:row",
                          sequential=True, exclude=HEAD)


# -- the references, driven over the whole model --------------------------------------------

def _linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in block.named_modules() if type(m) is nn.Linear}


def _add_batch(pruner):
    """llama.py's forward hook: the layer's input and output to the pruner's add_batch."""
    def tmp(_, inp, out):
        pruner.add_batch(inp[0].data, out.data)
    return tmp


@torch.no_grad()
def reference_sparsegpt(module, model, samples: list[torch.Tensor], sparsity: float, n: int,
                        m: int) -> None:
    """IST-DASLab/sparsegpt's llama.py `llama_sequential` loop with its `SparseGPT` class."""
    use_cache = model.config.use_cache
    model.config.use_cache = False
    layers = model.model.layers
    inps = torch.zeros((len(samples), samples[0].shape[-1], model.config.hidden_size),
                       dtype=next(model.parameters()).dtype)
    cache = {"i": 0, "kwargs": None}

    class Catcher(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.module = block

        def forward(self, inp, **kwargs):
            inps[cache["i"]] = inp
            cache["i"] += 1
            cache["kwargs"] = kwargs
            raise ValueError

    layers[0] = Catcher(layers[0])
    for batch in samples:
        try:
            model(batch)
        except ValueError:
            pass
    layers[0] = layers[0].module
    kwargs = cache["kwargs"]
    outs = torch.zeros_like(inps)
    for i in range(len(layers)):
        layer = layers[i]
        subset = _linear_layers(layer)
        gpts = {name: module.SparseGPT(subset[name]) for name in subset}
        handles = [subset[name].register_forward_hook(_add_batch(gpts[name]))
                   for name in subset]
        for j in range(len(samples)):
            outs[j] = layer(inps[j].unsqueeze(0), **kwargs)[0]
        for h in handles:
            h.remove()
        for name in subset:
            gpts[name].fasterprune(sparsity, prunen=n, prunem=m, percdamp=0.01, blocksize=128)
            gpts[name].free()
        for j in range(len(samples)):
            outs[j] = layer(inps[j].unsqueeze(0), **kwargs)[0]
        del gpts
        inps, outs = outs, inps
    model.config.use_cache = use_cache


class _WithRope(nn.Module):
    """A decoder block that accepts position_ids alone, as prune_wanda calls it (written for
    transformers 4.3x, whose blocks computed RoPE themselves): the position embeddings are
    computed from position_ids as the model would pass them."""

    def __init__(self, block: nn.Module, rotary: nn.Module):
        super().__init__()
        self.block = block
        object.__setattr__(self, "rotary", rotary)  # not a submodule: no second owner

    def forward(self, hidden, **kwargs):
        if kwargs.get("position_embeddings") is None:
            kwargs["position_embeddings"] = self.rotary(hidden, kwargs["position_ids"])
        return self.block(hidden, **kwargs)


@torch.no_grad()
def reference_wanda(module, model, samples: list[torch.Tensor], sparsity: float, n: int,
                    m: int) -> None:
    """locuslab/wanda's prune_wanda, unchanged, on our segments."""
    module.get_loaders = lambda *a, **k: ([(s, None) for s in samples], None)
    args = types.SimpleNamespace(nsamples=len(samples), seed=0, sparsity_ratio=sparsity,
                                 use_variant=False)
    model.seqlen = samples[0].shape[-1]
    model.hf_device_map = {}
    layers = model.model.layers
    for i in range(len(layers)):
        layers[i] = _WithRope(layers[i], model.model.rotary_emb)
    try:
        module.prune_wanda(args, model, model.tokenizer, device=torch.device("cpu"),
                           prune_n=n, prune_m=m)
    finally:
        for i in range(len(layers)):
            layers[i] = layers[i].block
        del model.seqlen, model.hf_device_map


def load_references() -> dict:
    """{method: (imported module, where it came from)}; a missing copy is skipped."""
    out = {}
    folder, where = locate("sparsegpt")
    print(f"reference sparsegpt: {where}")
    if folder is not None:
        out["sparsegpt"] = (import_file(folder, "sparsegpt.py", "ref_sparsegpt"), where)
    folder, where = locate("wanda")
    print(f"reference wanda: {where}")
    if folder is not None:
        datasets = stub_module("datasets", load_dataset=None)  # only its C4/WikiText loaders
        out["wanda"] = (import_file(folder, "lib/prune.py", "ref_wanda_prune",
                                    stubs={"datasets": datasets}), where)
    return out


# -- one side of a row -----------------------------------------------------------------------

def block_sparsity(model) -> float:
    zeros = total = 0
    for block in model.model.layers:
        for lin in _linear_layers(block).values():
            zeros += int((lin.weight == 0).sum())
            total += lin.weight.numel()
    return zeros / total


def same_decisions(a, b) -> float:
    """Share of block weights that are zero in both or nonzero in both models."""
    same = total = 0
    for ba, bb in zip(a.model.layers, b.model.layers):
        la, lb = _linear_layers(ba), _linear_layers(bb)
        for name, lin in la.items():
            same += int(((lin.weight == 0) == (lb[name].weight == 0)).sum())
            total += lin.weight.numel()
    return same / total


def prune_quietly(model, config, calib) -> None:
    prunekit.prune(model, config, calib, progress=False)


def run_side(dense, prune, ids, windows, helpers) -> tuple[nn.Module, dict]:
    peak_reset, peak_mb, rss_mb = helpers
    model = copy.deepcopy(dense)
    gc.collect()
    base = rss_mb()
    reset = peak_reset()
    load = list(os.getloadavg())
    start = time.perf_counter()
    with cpu_run(), contextlib.redirect_stdout(io.StringIO()):  # the references print a lot
        prune(model)
    seconds = time.perf_counter() - start
    info = {"prune_s": seconds, "peak_rss_mb": peak_mb() if reset else None,
            "rss_before_mb": base, "load_before": load, "load_after": list(os.getloadavg()),
            "sparsity": block_sparsity(model)}
    start = time.perf_counter()
    info["ppl"] = lm_perplexity(model, ids, 1024, windows=windows)
    info["eval_s"] = time.perf_counter() - start
    return model, info


def table(results: dict) -> str:
    lines = [f"{'row':<14} {'side':<10} {'ppl':>8} {'prune s':>8} {'peak MB':>8} "
             f"{'sparsity':>8}  ratios (prunekit / reference)"]
    for r in rows():
        got = results.get(r["key"])
        if not got:
            continue
        if r["key"] == "dense":
            lines.append(f"{'dense':<14} {'-':<10} {got['ppl']:>8.3f}")
            continue
        for side in ("reference", "prunekit"):
            s = got.get(side)
            if s:
                lines.append(f"{r['key']:<14} {side:<10} {s['ppl']:>8.3f} {s['prune_s']:>8.1f} "
                             f"{s['peak_rss_mb'] or float('nan'):>8.0f} {s['sparsity']:>8.4f}")
        if "ppl_ratio" in got:
            ok_p = "ok" if got["ppl_ratio"] <= TARGETS["ppl_ratio"] else "MISSED"
            ok_t = "ok" if got["time_ratio"] <= TARGETS["time_ratio"] else "MISSED"
            lines.append(f"{'':<14} ppl {got['ppl_ratio']:.4f} (target <= 1.02: {ok_p}), "
                         f"time {got['time_ratio']:.3f} (target <= 1: {ok_t}), same "
                         f"keep/drop {got['same_decisions']:.4f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", default="*", help="comma-separated globs over row keys")
    ap.add_argument("--redo", action="store_true",
                    help="run the chosen rows again; the replaced row stays under 'earlier'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--list", action="store_true", help="print the row keys and stop")
    ap.add_argument("--out", default=str(RESULTS / "results.json"))
    args = ap.parse_args(argv)
    try:
        keys = select([r["key"] for r in rows()], args.only)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    chosen = [r for r in rows() if r["key"] in keys]
    if args.list:
        print("\n".join(r["key"] for r in chosen))
        return 0
    from llm_oneshot import _peak_mb, _peak_reset, _rss_mb, eval_ids  # a sibling script

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    saved = load_result(out)
    results: dict = saved.get("rows", {})
    prov = provenance(argv, script=__file__, threads=args.threads)
    runs = saved.get("runs", []) + [{**prov, "pid": os.getpid()}]
    refs = load_references()

    def save():
        write_result(out, {
            "model": "smollm2-135m", "eval": f"{EVAL}: 8 windows of 1024 tokens",
            "calibration": "32 x 512 tokens, WikiText-2 validation, seed 0",
            "targets": TARGETS, "references": {k: w for k, (_, w) in refs.items()},
            "runs": runs, "rows": results}, prov)

    dense = create("smollm2-135m", pretrained=True)
    ids, windows = eval_ids(EVAL, dense.tokenizer)
    calib = calibration_batches("smollm2-135m", n=32, seq_len=512, seed=0,
                                tokenizer=dense.tokenizer)
    samples = [s.unsqueeze(0) for b in calib for s in b["input_ids"]]  # as the scripts feed
    helpers = (_peak_reset, _peak_mb, _rss_mb)
    drivers = {"sparsegpt": reference_sparsegpt, "wanda": reference_wanda}
    for row in chosen:
        have = results.get(row["key"], {})
        complete = "ppl" in have if row["key"] == "dense" else "time_ratio" in have
        if complete and not args.redo:
            continue
        # a replaced row (--redo) or an interrupted one (one side only) is kept under earlier
        earlier = [*have.get("earlier", []), {k: v for k, v in have.items() if k != "earlier"}
                   ] if set(have) - {"earlier"} else have.get("earlier", [])
        entry = {"run": len(runs) - 1, "threads": args.threads}
        if earlier:
            entry["earlier"] = earlier
        if row["key"] == "dense":
            start = time.perf_counter()
            entry["ppl"] = lm_perplexity(dense, ids, 1024, windows=windows)
            entry["eval_s"] = time.perf_counter() - start
            results["dense"] = entry
            save()
            print(f"dense ppl {entry['ppl']:.3f}", flush=True)
            continue
        if row["method"] not in refs:
            print(f"{row['key']}: skipped, no copy of the reference")
            continue
        module = refs[row["method"]][0]
        s = SETTINGS[row["setting"]]
        cfg = prunekit_config(row)
        entry.update(method=row["method"], setting=row["setting"],
                     prunekit_config={"name": cfg.name, **cfg.options()},
                     reference_call=dict(sparsity=s["sparsity"], prune_n=s["n"],
                                         prune_m=s["m"]))
        reference = functools.partial(drivers[row["method"]], module, samples=samples,
                                      sparsity=s["sparsity"], n=s["n"], m=s["m"])
        ref_model, entry["reference"] = run_side(dense, reference, ids, windows, helpers)
        results[row["key"]] = entry
        save()
        ours, entry["prunekit"] = run_side(
            dense, functools.partial(prune_quietly, config=cfg, calib=calib), ids, windows,
            helpers)
        entry["same_decisions"] = same_decisions(ref_model, ours)
        entry["ppl_ratio"] = entry["prunekit"]["ppl"] / entry["reference"]["ppl"]
        entry["time_ratio"] = entry["prunekit"]["prune_s"] / entry["reference"]["prune_s"]
        results[row["key"]] = entry
        save()
        del ref_model, ours
        print(f"{row['key']:<14} reference ppl {entry['reference']['ppl']:.3f} "
              f"{entry['reference']['prune_s']:.1f} s | prunekit ppl "
              f"{entry['prunekit']['ppl']:.3f} {entry['prunekit']['prune_s']:.1f} s | ppl "
              f"ratio {entry['ppl_ratio']:.4f} time ratio {entry['time_ratio']:.3f}",
              flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
