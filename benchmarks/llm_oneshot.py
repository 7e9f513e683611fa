"""One-shot pruning of a real LLM: SmolLM2-135M-Instruct (Llama, 30 blocks, 210 linear layers)
pruned by magnitude, Wanda and SparseGPT at 50%, 70%, 2:4 and 4:8, embeddings and the tied
head dense; perplexity and pruning time per row.

Perplexity (prunekit.evaluate.lm_perplexity), on any of three evaluation sets:
  steering8   the issue's steering check: the shared raw WikiText-2 test file's lines joined
              with "\\n\\n", 1024-token windows, windows floor(i * n / 8) for i = 0..7
  wikitext2   the whole WikiText-2 test set (the rebuilt HF rows, 1024-token windows)
  tinyshakespeare  the whole last 10% of TinyShakespeare (1024-token windows)
Calibration: segments drawn by seed from WikiText-2 validation, 32 x 512 tokens unless the
row says otherwise; Wanda and SparseGPT run block by block (sequential=True); magnitude
needs no calibration and gets none. Rows: each method x setting (seed 0), seeds 1 and 2 for
the 50% and 2:4 rows of Wanda and SparseGPT, SparseGPT at 50%, 70% and 2:4 with the
per-input dampening rule (dampening_rule="input"), SparseGPT 50% with 128 x 512, 32 x 2048 and
128 x 2048 tokens, OWL (Yin et al. 2024) against uniform at 70% for Wanda and SparseGPT,
and Wanda and SparseGPT 50% calibrated in domain for TinyShakespeare (32 x 512 tokens of its
first 90%; evaluate them with --eval tinyshakespeare). Cheap rows run first. Peak resident
memory while pruning is read from the kernel's high-water mark (reset before each pruning
run).

    python benchmarks/llm_oneshot.py --eval steering8            # every row, 8 windows
    python benchmarks/llm_oneshot.py --eval wikitext2,tinyshakespeare --only 'sparsegpt/*'
    python benchmarks/llm_oneshot.py --only 'magnitude/*' --redo   # again, e.g. quiet

Each finished (row, evaluation set) is written at once to the results file, so an interrupted
run resumes where it stopped; the provenance (command, git commit, torch, CPU, threads,
allocator) is recorded with the rows.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import time
from pathlib import Path

import torch

import prunekit
from prunekit.bench.provenance import load_result, provenance, select, write_result
from prunekit.budget import owl
from prunekit.data import lm_tokens, load_wikitext2, tokenize_stream
from prunekit.evaluate import lm_perplexity
from prunekit.layers import find_layers
from prunekit.models import calibration_batches, create

RESULTS = Path(__file__).parent / "results" / "llm_oneshot"
HEAD = ("lm_head",)
SETTINGS = {"50%": dict(sparsity=0.5), "70%": dict(sparsity=0.7), "2:4": dict(pattern="2:4"),
            "4:8": dict(pattern="4:8")}
#: the issue's steering numbers (8 windows, 32 x 512 calibration, 1 thread, busy machine)
STEERING = {"dense": 22.1, "magnitude/50%": 490.0, "wanda/50%": 46.9, "sparsegpt/50%": 38.1}


def rows() -> list[dict]:
    """Every row, cheapest first."""
    out = [dict(key="dense", method="dense", setting="-")]
    for method in ("magnitude", "wanda", "sparsegpt"):
        for setting in SETTINGS:
            out.append(dict(key=f"{method}/{setting}", method=method, setting=setting))
    for method in ("wanda", "sparsegpt"):
        out.append(dict(key=f"{method}/70%/owl", method=method, setting="70%", budget="owl"))
    for seed in (1, 2):
        for method in ("wanda", "sparsegpt"):
            for setting in ("50%", "2:4"):
                out.append(dict(key=f"{method}/{setting}/seed{seed}", method=method,
                                setting=setting, seed=seed))
    for setting in ("50%", "70%", "2:4"):
        out.append(dict(key=f"sparsegpt/{setting}/damp-input", method="sparsegpt",
                        setting=setting, damp="input"))
    for n, length in ((128, 512), (32, 2048), (128, 2048)):
        out.append(dict(key=f"sparsegpt/50%/calib{n}x{length}", method="sparsegpt",
                        setting="50%", calib_n=n, calib_len=length))
    for method in ("wanda", "sparsegpt"):  # in domain for the TinyShakespeare evaluation
        out.append(dict(key=f"{method}/50%/calib-tinyshakespeare", method=method,
                        setting="50%", calib_source="tinyshakespeare"))
    for r in out:
        r.setdefault("calib_source", "wikitext2")
        r.setdefault("seed", 0)
        r.setdefault("calib_n", 32)
        r.setdefault("calib_len", 512)
        r.setdefault("budget", "uniform")
        r.setdefault("damp", "mean")
    return out


def config(row: dict):
    kw = dict(SETTINGS[row["setting"]], exclude=HEAD)
    if row["method"] == "magnitude":
        return prunekit.Magnitude(**kw)
    if row["method"] == "wanda":
        kw.setdefault("pattern", "unstructured:row")
        return prunekit.Wanda(sequential=True, **kw)
    return prunekit.SparseGPT(sequential=True, dampening_rule=row["damp"], **kw)


def eval_ids(name: str, tokenizer) -> tuple[torch.Tensor, int | None]:
    """(token stream, number of evenly spread windows or None for all) of an evaluation set."""
    if name == "steering8":
        lines = load_wikitext2("test", raw=True).split("\n")
        return tokenize_stream(tokenizer, "\n\n".join(lines[:-1] if lines[-1] == "" else lines)), 8
    if name == "wikitext2":
        return lm_tokens(tokenizer, "wikitext2", "test"), None
    if name == "tinyshakespeare":
        return lm_tokens(tokenizer, "tinyshakespeare", "test"), None
    raise SystemExit(f"unknown evaluation set {name!r}")


def _peak_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prune_row(dense, row: dict) -> tuple[torch.nn.Module, dict]:
    model = copy.deepcopy(dense)
    if row["method"] == "dense":
        return model, {"prune_s": 0.0}
    cfg = config(row)
    calib = None
    if cfg.needs != "none":
        calib = calibration_batches("smollm2-135m", n=row["calib_n"], seq_len=row["calib_len"],
                                    seed=row["seed"], source=row["calib_source"],
                                    tokenizer=dense.tokenizer)
    base = _rss_mb()
    reset = _peak_reset()
    start = time.perf_counter()
    budget = None
    if row["budget"] == "owl":
        budget = owl(find_layers(model, exclude=HEAD), cfg.target_sparsity, model=model,
                     calib=calib)
    elif row["budget"] != "uniform":
        raise SystemExit(f"unknown budget {row['budget']}")
    report = prunekit.prune(model, cfg, calib, budget=budget, progress=False)
    seconds = time.perf_counter() - start
    info = {"prune_s": seconds, "sparsity": report.sparsity,
            "rss_before_mb": base, "peak_rss_mb": _peak_mb() if reset else None,
            "model_mb": sum(p.numel() * 4 for p in dense.parameters()) / 2**20}
    if budget is not None:
        info["budget"] = {k: round(v, 4) for k, v in budget.items() if k.endswith("q_proj")}
    return model, info


def table(results: dict, evals: list[str]) -> str:
    head = f"{'row':<32} {'sparsity':>8} {'prune s':>8} {'peak MB':>8}" + "".join(
        f" {e:>16}" for e in evals)
    lines = [head]
    for r in rows():
        got = results.get(r["key"])
        if not got:
            continue
        cells = "".join(f" {got['ppl'].get(e, float('nan')):>16.2f}" for e in evals)
        peak = got.get("peak_rss_mb")
        lines.append(f"{r['key']:<32} {got.get('sparsity', 0):>8.3f} {got['prune_s']:>8.1f} "
                     f"{(peak or float('nan')):>8.0f}{cells}")
    for key, want in STEERING.items():
        got = results.get(key, {}).get("ppl", {}).get("steering8")
        if got is not None:
            lines.append(f"steering check {key}: {got:.2f} here, {want:g} in the issue "
                         f"({got / want:.3f}x)")
    # seed spread for the rows with three seeds
    for key in ("wanda/50%", "wanda/2:4", "sparsegpt/50%", "sparsegpt/2:4"):
        for e in evals:
            vals = [results[k]["ppl"][e] for k in (key, f"{key}/seed1", f"{key}/seed2")
                    if k in results and e in results[k]["ppl"]]
            if len(vals) == 3:
                lines.append(f"{key} {e}: mean {statistics.mean(vals):.2f} sd "
                             f"{statistics.stdev(vals):.2f} over seeds 0-2")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--eval", default="steering8",
                    help="comma-separated: steering8, wikitext2, tinyshakespeare")
    ap.add_argument("--only", default="*",
                    help="comma-separated globs over row keys (see --list)")
    ap.add_argument("--redo", action="store_true",
                    help="prune and evaluate the chosen rows again (e.g. on a quiet machine); "
                         "the replaced row's time, threads and run stay under 'earlier'")
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
    evals = [e.strip() for e in args.eval.split(",") if e.strip()]
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    saved = load_result(out)  # rows of earlier runs keep their runs' provenance
    results: dict = saved.get("rows", {})
    prov = provenance(argv, script=__file__, threads=args.threads)
    runs = saved.get("runs", []) + [{**prov, "pid": os.getpid()}]

    def save():
        write_result(out, {"model": "smollm2-135m", "steering": STEERING, "runs": runs,
                           "rows": results}, prov)

    dense = create("smollm2-135m", pretrained=True)
    streams = {e: eval_ids(e, dense.tokenizer) for e in evals}
    for row in chosen:
        have = results.get(row["key"], {})
        if args.redo and have:
            have = {"ppl": {}, "eval_s": {}, "earlier": [
                *have.get("earlier", []),
                {k: have[k] for k in ("prune_s", "threads", "run", "ppl", "peak_rss_mb")
                 if k in have}]}
        todo = [e for e in evals if e not in have.get("ppl", {})]
        if not todo:
            continue
        model, info = prune_row(dense, row)
        if "prune_s" in have:
            # only new evaluation sets: the row's pruning figures stay those of the run that
            # measured them (pruning is deterministic: the same model again); this run's
            # pruning time is kept beside them, with the load it ran under
            entry = {**have, "repruned": [*have.get("repruned", []), {
                "prune_s": info["prune_s"], "threads": args.threads, "run": len(runs) - 1,
                "load_average": list(os.getloadavg()), "for": todo}]}
        else:
            entry = {**have, **{k: v for k, v in row.items() if k != "key"}, **info,
                     "threads": args.threads, "run": len(runs) - 1,
                     "load_average": list(os.getloadavg())}
        entry.setdefault("ppl", {})
        entry.setdefault("eval_s", {})
        for e in todo:
            ids, windows = streams[e]
            start = time.perf_counter()
            entry["ppl"][e] = lm_perplexity(model, ids, 1024, windows=windows)
            entry["eval_s"][e] = time.perf_counter() - start
        results[row["key"]] = entry
        save()
        print(f"{row['key']:<32} prune {info['prune_s']:7.1f} s  " + "  ".join(
            f"{e} {entry['ppl'][e]:.2f}" for e in todo), flush=True)
        del model
    print(table(results, evals))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
