"""Runs of the structured benchmark that differ only in --seed, pooled: is the gap between
prunekit and Torch-Pruning (same criterion, same shapes, same fine-tune), or between Taylor
and L1, larger than what the seed alone moves?

Reads the results files given (default: the full-epoch runs,
benchmarks/results/structured/structured_full_epoch*.json, written by
`benchmarks/structured.py --train-images 50000 --test-images 10000 --skip-minilm --seed S`;
others, such as the 10-step runs, go with their own --out), checks that they differ only in
the seed, and prints per seed the top-1 after the fine-tune, then for each pair of entries
the paired differences: their mean, a 95% confidence interval (Student t over seeds) and the
two-sided paired t-test's p-value. Writes --out (default
benchmarks/results/structured_seeds/structured_seeds.json) and the same name with .md.

    python benchmarks/studies/structured_seeds.py
    python benchmarks/studies/structured_seeds.py \
        benchmarks/results/structured/structured_iterative10_all_test_seed*.json \
        --out benchmarks/results/structured_seeds/structured_iterative10_seeds.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from scipy import stats

from prunekit.bench.provenance import provenance, write_result
from prunekit.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
ENTRIES = ("prunekit-l1", "torch-pruning-l1", "prunekit-taylor", "torch-pruning-taylor")
PAIRS = (("prunekit-l1", "torch-pruning-l1"), ("prunekit-taylor", "torch-pruning-taylor"),
         ("prunekit-taylor", "prunekit-l1"), ("torch-pruning-taylor", "torch-pruning-l1"))


def load_runs(paths: list[Path]) -> dict[int, dict[str, float]]:
    """{seed: {entry: top-1 after fine-tune}}; refuses files whose settings differ other
    than by seed, or two files for one seed."""
    runs, settings = {}, {}
    for path in paths:
        data = json.loads(path.read_text())
        config = dict(data.get("config", {}))
        seed = config.pop("seed", None)
        if seed is None or "resnet56" not in data:
            raise SystemExit(f"{path}: not a structured.py ResNet-56 result (no seed)")
        if settings and config != settings["config"]:
            diff = sorted(k for k in config.keys() | settings["config"].keys()
                          if config.get(k) != settings["config"].get(k))
            raise SystemExit(f"{path}: settings differ from {settings['path']} in {diff}")
        settings = settings or {"config": config, "path": path}
        if seed in runs:
            raise SystemExit(f"{path}: seed {seed} is already given by another file")
        res = data["resnet56"]
        missing = [e for e in ENTRIES if "top1_finetuned" not in res.get(e, {})]
        if missing:
            raise SystemExit(f"{path}: no fine-tuned top-1 for {missing}; finish that run")
        runs[seed] = {e: res[e]["top1_finetuned"] for e in ENTRIES}
    return dict(sorted(runs.items()))


def shown(path: Path) -> str:
    """A results file's path as a rerun would name it: from the repository root if inside."""
    path = path.resolve()
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def paired(runs: dict[int, dict[str, float]], a: str, b: str) -> dict:
    d = [r[a] - r[b] for r in runs.values()]
    n = len(d)
    mean = statistics.mean(d)
    out = {"differences": d, "mean": mean}
    if n > 1:
        sd = statistics.stdev(d)
        half = stats.t.ppf(0.975, n - 1) * sd / n ** 0.5
        out |= {"ci95": [mean - half, mean + half],
                "p_value": float(stats.ttest_rel([r[a] for r in runs.values()],
                                                 [r[b] for r in runs.values()]).pvalue)
                if sd > 0 else (1.0 if mean == 0 else 0.0)}
    return out


def report(runs, pairs) -> str:
    lines = [f"{'entry':<22}" + "".join(f"{'seed ' + str(s):>9}" for s in runs)
             + f"{'mean':>8}{'sd':>6}"]
    for e in ENTRIES:
        vals = [r[e] for r in runs.values()]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        lines.append(f"{e:<22}" + "".join(f"{v:9.2f}" for v in vals)
                     + f"{statistics.mean(vals):8.2f}{sd:6.2f}")
    lines.append("")
    lines.append(f"{'paired difference':<46}{'mean':>7}  {'95% CI':<17}{'p':>6}")
    for (a, b), p in pairs.items():
        ci = f"[{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}]" if "ci95" in p else "-"
        pv = f"{p['p_value']:6.3f}" if "p_value" in p else "     -"
        lines.append(f"{a + ' - ' + b:<46}{p['mean']:+7.2f}  {ci:<17}{pv}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path,
                   default=sorted((RESULTS / "structured").glob("structured_full_epoch*.json")))
    p.add_argument("--out", type=Path,
                   default=RESULTS / "structured_seeds" / "structured_seeds.json")
    args = p.parse_args(argv)
    if not args.files:
        p.error("no results files: run structured.py with --train-images 50000 first")
    runs = load_runs(args.files)
    pairs = {(a, b): paired(runs, a, b) for a, b in PAIRS}
    text = report(runs, pairs)
    prov = provenance(argv, script=__file__)
    write_result(args.out, {"files": [shown(f) for f in args.files],
                            "top1_finetuned": {str(s): r for s, r in runs.items()},
                            "paired": {f"{a} - {b}": v for (a, b), v in pairs.items()}},
                 prov, indent=2)
    atomic_write_text(args.out.with_suffix(".md"), "# Structured benchmark over fine-tune "
                      f"seeds\n\n`{prov['command']}`\n\n```\n{text}\n```\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
