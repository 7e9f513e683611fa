"""benchmarks/results/INDEX.md, generated from the result files: one section per script (what
it measures, from its docstring), one row per result file with the run's options, date,
commit, machine, threads, allocator and a headline figure where the file has an obvious one.
Everything comes from the files' "provenance" records (prunekit.bench.provenance), so the
index never says more than the files do; values the backfill inferred from git history are
marked.

    python benchmarks/index.py           # writes benchmarks/results/INDEX.md
    python benchmarks/index.py --check   # exit 1 if INDEX.md is not what the files give
"""

from __future__ import annotations

import argparse
import ast
import json
import shlex
import sqlite3
import statistics
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
RESULTS = BENCHMARKS / "results"
SIDECAR = ".provenance.json"


def script_of(folder: str) -> Path | None:
    """The script that writes benchmarks/results/<folder>/: a suite script or a study."""
    for path in (BENCHMARKS / f"{folder}.py", BENCHMARKS / "studies" / f"{folder}.py"):
        if path.exists():
            return path
    return None


def describe(script: Path) -> str:
    """The first paragraph of a script's docstring, on one line."""
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split())


def entries(results: Path = RESULTS) -> dict[str, list[dict]]:
    """{folder: [{"file", "companions", "data", "provenance"}]}: every JSON result file (a
    sidecar stands for the files it lists), with the other files its run wrote beside it."""
    out = {}
    for folder in sorted(p for p in results.iterdir() if p.is_dir()):
        rows = []
        for path in sorted(folder.rglob("*.json")):
            data = json.loads(path.read_text())
            rel = path.relative_to(results).as_posix()
            if path.name.endswith(SIDECAR):
                companions = list(data.get("files", []))
            else:
                companions = sorted(p.name for p in path.parent.iterdir()
                                    if p.suffix != ".json" and p.is_file()
                                    and p.name.split(".")[0] == path.stem)
            rows.append({"file": rel, "companions": companions, "data": data,
                         "provenance": data.get("provenance", {})})
        out[folder.name] = rows
    return out


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _value(prov: dict, field: str) -> str:
    value = prov.get(field, "unknown")
    inferred = field in prov.get("backfilled", {}).get("inferred", {})
    return f"{value}{' †' if inferred else ''}"


def options(command: str, script: str) -> str:
    """The command's options after the script, without --out (the file names itself)."""
    try:
        words = shlex.split(command)
    except ValueError:
        return command
    if len(words) >= 2 and words[0] == "python" and Path(words[1]).stem == script:
        words = words[2:]
        kept, skip = [], False
        for w in words:
            if skip:
                skip = False
            elif w == "--out":
                skip = True
            elif not w.startswith("--out="):
                kept.append(w)
        return shlex.join(kept) or "(defaults)"
    return command


def _mean(rows, key):
    return statistics.mean(r[key] for r in rows)


def _layer_prune(d):
    out = [f"SparseGPT {r['shape']} {r['prunekit_s']:.2f} s vs published pseudo-code "
           f"{r['published_s']:.2f} s" for r in d.get("side_by_side", [])]
    expected = ["obs", "sparsegpt", "wanda", "magnitude"]
    orders = d.get("orders", [])
    if orders:
        hits = sum(o["order"] == [m for m in expected if m in o["order"]] for o in orders)
        out.append(f"error order OBS < SparseGPT < Wanda < magnitude in {hits} of "
                   f"{len(orders)} settings")
    return "; ".join(out)


def _oneshot_quality(d):
    out = []
    for model, dense in d["dense"].items():
        metric = next(iter(dense))
        rows = [r for r in d["runs"] if r["model"] == model and r["setting"] == "50%"]
        means = {m: _mean([r for r in rows if r["method"] == m], metric)
                 for m in sorted({r["method"] for r in rows})}
        ranked = sorted(means, key=means.get, reverse=True)
        out.append(f"{model} 50% {metric}: " + ", ".join(f"{m} {means[m]:.2f}" for m in ranked)
                   + f" (dense {dense[metric]:.2f})")
    return "; ".join(out)


def _budget(d):
    groups = {}
    for key, row in d.get("rows", {}).items():
        if row.get("budget") in ("uniform", "global", "spdy") and "quality" in row:
            groups.setdefault(key.rsplit("/", 1)[0], {})[row["budget"]] = next(
                iter(row["quality"].values()))
    out = []
    if groups:
        wins = sum(g.get("spdy") == max(g.values()) for g in groups.values())
        out.append(f"SPDY best (or tied) in {wins} of {len(groups)} targets some budget "
                   "reached")
    elif any("unreachable" in r for r in d.get("rows", {}).values()):
        out.append("no budget reached its target")
    wf = {k.split("/", 2)[2]: next(iter(r["quality"].values()))
          for k, r in d.get("rows", {}).items() if "/woodfisher-part/" in k}
    for s in sorted({k.split("/")[0] for k in wf}):
        if f"{s}/woodfisher" in wf and f"{s}/global_magnitude" in wf:
            out.append(f"WoodFisher {wf[f'{s}/woodfisher']:.1f} vs global magnitude "
                       f"{wf[f'{s}/global_magnitude']:.1f} at {float(s):.0%}")
    return "; ".join(out)


def _kernels(d):
    rows = [r for r in d["rows"].values() if r["sparsity"] == 0.95]
    if not rows:
        return ""
    return (f"at 95%: CSR up to {max(r['csr_speedup'] for r in rows):.1f}x, 1x16 block up to "
            f"{max(r['block_1x16_speedup'] for r in rows):.1f}x dense speed")


def _structured(d):
    r = d.get("resnet56", {})
    out = []
    for crit in ("l1", "taylor"):
        ours, tp = r.get(f"prunekit-{crit}"), r.get(f"torch-pruning-{crit}")
        if isinstance(ours, dict) and "top1_finetuned" in ours:
            other = (f" (Torch-Pruning {tp['top1_finetuned']:.2f})"
                     if isinstance(tp, dict) and "top1_finetuned" in tp else "")
            out.append(f"{crit} {ours['top1_finetuned']:.2f}{other}")
    head = "ResNet-56 top-1 after fine-tune: " + ", ".join(out) if out else ""
    m = d.get("minilm", {})
    if "pruned" in m:
        head += ("; " if head else "") + (f"MiniLM STS-B {m['pruned']['stsb_spearman']:.2f} "
                                          f"(dense {m['dense']['stsb_spearman']:.2f})")
    return head


def _structured_seeds(d):
    out = []
    for pair, v in d["paired"].items():
        a, b = pair.split(" - ")
        if a.startswith("prunekit-") and b.startswith("torch-pruning-") and "ci95" in v:
            out.append(f"prunekit - Torch-Pruning, {a.split('-', 1)[1]}: {v['mean']:+.2f} "
                       f"[{v['ci95'][0]:+.2f}, {v['ci95'][1]:+.2f}]")
    return f"{len(d['top1_finetuned'])} seeds; " + "; ".join(out)


def _structured_runtimes(d):
    half = d["allocations"].get("half")
    if not half:
        return ""
    batch = str(max(d["batches"]))
    best = max(half["speedup"][batch].items(), key=lambda kv: kv[1])
    return (f"half the FLOPs at batch {batch}: at most {best[1]:.2f}x ({best[0]}), target "
            f"{half['target']:.2f}x")


def _taylor_variants(d):
    rows = d.get("rows", {})
    if "l1" not in rows:
        return ""
    taylor = {k: v["mean_finetuned"] for k, v in rows.items() if "taylor" in k}
    best = max(taylor, key=taylor.get)
    return (f"mean top-1 after fine-tune: l1 {rows['l1']['mean_finetuned']:.2f}, best Taylor "
            f"form {best} {taylor[best]:.2f}")


def _malloc(d):
    s = d["speedups"]
    return "; ".join(f"{m} pruned over dense: {s[f'{m}_system']:.2f}x system, "
                     f"{s[f'{m}_kept']:.2f}x kept" for m in ("minilm", "resnet56")
                     if f"{m}_system" in s)


def _data_load(d):
    return "; ".join(f"{r['split']}: decode {r['decode_s']:.2f} s, cached {r['cached_s']:.2f} s"
                     for r in d["rows"])


def _train_sparse(d):
    if "results" in d:
        return "top-1: " + ", ".join(f"{r['method']} {r['top1']:.1f}" for r in d["results"])
    return f"{d['method']} top-1 {d['top1']:.1f}" if "top1" in d else ""


def _sweep(d, folder: Path):
    db = next((folder / f for f in d.get("files", []) if f.endswith(".sqlite")), None)
    if db is None or not db.exists():
        return ""
    with sqlite3.connect(f"file:{db}?immutable=1", uri=True) as con:  # writes nothing
        counts = dict(con.execute("select status, count(*) from runs group by status"))
    return ", ".join(f"{n} runs {s}" for s, n in sorted(counts.items()))


HEADLINES = {"layer_prune": _layer_prune, "oneshot_quality": _oneshot_quality,
             "budget": _budget, "kernels": _kernels, "structured": _structured,
             "structured_seeds": _structured_seeds, "structured_runtimes": _structured_runtimes,
             "taylor_variants": _taylor_variants, "malloc": _malloc, "data_load": _data_load,
             "train_sparse": _train_sparse}


def headline(folder: str, entry: dict, results: Path) -> str:
    """The file's obvious figure, or "" (a file of an unexpected shape gets none)."""
    try:
        if folder == "sweep":
            return _sweep(entry["data"], results / folder)
        return HEADLINES[folder](entry["data"]) if folder in HEADLINES else ""
    except (KeyError, TypeError, ValueError, IndexError, AttributeError,
            statistics.StatisticsError):
        return ""


def render(results: Path = RESULTS) -> str:
    lines = ["# Benchmark results", "",
             "Generated by `python benchmarks/index.py` from the result files' provenance; "
             "do not edit by hand. How to rerun each script: [../README.md](../README.md).",
             "", "† inferred from git history when the file was backfilled (2026-12-07): see "
             "the file's `provenance.backfilled` for why. Commit: the one the run started "
             "from (* a tree with uncommitted changes); for backfilled files, the commit that "
             "last changed the file.", ""]
    for folder, rows in entries(results).items():
        script = script_of(folder)
        where = (f"`benchmarks/{script.relative_to(BENCHMARKS).as_posix()}`" if script
                 else "no script of this name")
        lines += [f"## {folder}", "", f"{where}: {describe(script) if script else ''}", "",
                  "| file | options | date | commit | machine | threads | allocator | headline |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for e in rows:
            prov = e["provenance"]
            name = e["file"].split("/", 1)[1]
            link = f"[{name}]({e['file']})"
            if e["companions"]:
                link += " (" + ", ".join(f"[{c}]({folder}/{Path(name).parent / c})"
                                         .replace("/./", "/") for c in e["companions"]) + ")"
            commit = str(prov.get("git_commit", "unknown"))[:7]
            if prov.get("git_dirty") is True:
                commit += "*"
            if "git_commit" in prov.get("backfilled", {}).get("inferred", {}):
                commit += " †"
            date = str(prov.get("date", "unknown"))[:10]
            if "date" in prov.get("backfilled", {}).get("inferred", {}):
                date += " †"
            machine = f"{_value(prov, 'cpu')}, {_value(prov, 'cores')} cores"
            cells = [link, f"`{options(prov.get('command', 'unknown'), folder)}`", date,
                     commit, machine, _value(prov, "threads"), _value(prov, "allocator"),
                     headline(folder, e, results)]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only compare with INDEX.md")
    args = p.parse_args(argv)
    text = render()
    index = RESULTS / "INDEX.md"
    if args.check:
        same = index.exists() and index.read_text() == text
        print("INDEX.md is up to date" if same else
              "INDEX.md is out of date: run python benchmarks/index.py")
        return 0 if same else 1
    from prunekit.io import atomic_write_text

    atomic_write_text(index, text)
    print(f"wrote {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
