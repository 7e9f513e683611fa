"""The standard benchmark: one experiment file (benchmarks/sweep_*.toml) run as `prunekit
bench` runs it, then reported as `prunekit report` reports it, into benchmarks/results/sweep/
with the run's provenance.

For an experiment file sweep_NAME.toml it writes, in --out:
- sweep_NAME.sqlite: one row per finished run, keyed by its configuration, so a rerun
  (after an interruption) skips the runs already done;
- sweep_NAME_report.html and sweep_NAME_<model>_*.png: the report and its plots;
- sweep_NAME_tables.txt: the tables it prints;
- sweep_NAME.provenance.json: this run's provenance and the files it covers (the record of
  an earlier run that filled the same database moves to its earlier_provenance).

    python benchmarks/sweep.py benchmarks/sweep_resnet20.toml   # 60 runs, ~25 min, 1 thread
    python benchmarks/sweep.py benchmarks/sweep_minilm.toml     # 45 runs, ~20 min, 1 thread
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prunekit.bench import ResultStore, load_experiment, run_sweep, write_report
from prunekit.bench.provenance import load_result, provenance, write_result
from prunekit.io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results" / "sweep"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file", type=Path, help="experiment file (TOML)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    runs = load_experiment(args.file)
    stem = args.file.stem
    db = args.out / f"{stem}.sqlite"
    args.out.mkdir(parents=True, exist_ok=True)
    threads = {r.threads for r in runs}
    prov = provenance(argv, script=__file__,
                      threads=threads.pop() if len(threads) == 1 else None)
    with ResultStore(db) as store:
        summary = run_sweep(runs, store, progress=not args.quiet)
    print(f"{summary.total} runs: {summary.skipped} already done, {len(summary.finished)} "
          f"finished now, {len(summary.failed)} failed; results in {db}")
    for key, err in summary.failed.items():
        print(f"failed {key}: {err.strip().splitlines()[-1]}", file=sys.stderr)
    report = write_report(db, args.out, prefix=f"{stem}_")
    tables = args.out / f"{stem}_tables.txt"
    atomic_write_text(tables, report["text"] + "\n")
    print(report["text"])
    sidecar = args.out / f"{stem}.provenance.json"
    record = load_result(sidecar)
    record["files"] = sorted(Path(f).name for f in (db, report["html"], tables,
                                                    *report["pngs"]))
    write_result(sidecar, record, prov)
    print(f"wrote {report['html']}, {len(report['pngs'])} PNGs, {tables} and {sidecar}")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
