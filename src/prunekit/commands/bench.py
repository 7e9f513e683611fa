"""`prunekit bench FILE` runs an experiment grid; `prunekit report DB` summarises it."""

from __future__ import annotations

import sys

from prunekit.commands import COMMANDS
from prunekit.commands.common import count


@COMMANDS.register("bench")
def register(sub) -> None:
    from prunekit.bench.store import DEFAULT_DB

    p = sub.add_parser("bench", help="run a benchmark experiment file (resumable)")
    p.add_argument("file", help="experiment file (TOML)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and stop")
    p.add_argument("--backend", default="inprocess", choices=("inprocess", "pool", "ray"),
                   help="where runs execute (default: this process)")
    p.add_argument("--workers", type=count(1), default=2,
                   help="worker processes (pool) or CPUs of a local Ray cluster")
    p.add_argument("--address", default=None,
                   help="address of a running Ray cluster to join (ray backend)")
    p.add_argument("--db", default=DEFAULT_DB, help=f"results database (default {DEFAULT_DB})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="tables, plots and an HTML report from a results database")
    p.add_argument("db", help="results database written by `prunekit bench`")
    p.add_argument("--out", default="bench-report", help="folder for report.html and PNGs")
    p.add_argument("--prefix", default="", help="prefix for the written file names")
    p.set_defaults(func=cmd_report, out_folder=True)


def cmd_bench(args) -> int:
    from prunekit.bench import ResultStore, load_experiment, run_sweep
    from prunekit.io import check_output

    runs = load_experiment(args.file)
    if args.dry_run:
        with_db = None
        from pathlib import Path
        if Path(args.db).exists():
            with ResultStore(args.db, readonly=True) as store:
                with_db = store.done()
        for i, r in enumerate(runs, 1):
            state = "" if with_db is None else (" [done]" if r.key in with_db else " [todo]")
            print(f"{i:4d}  {r.key}  {r.label()}{state}")
        print(f"{len(runs)} runs")
        return 0
    check_output(args.db, "--db")
    with ResultStore(args.db) as store:
        summary = run_sweep(runs, store, backend=args.backend, workers=args.workers,
                            address=args.address, progress=not args.quiet)
    print(f"{summary.total} runs: {summary.skipped} already done, {len(summary.finished)} "
          f"finished now, {len(summary.failed)} failed; results in {args.db}")
    for key, err in summary.failed.items():
        print(f"failed {key}: {err.strip().splitlines()[-1]}", file=sys.stderr)
    return 1 if summary.failed else 0


def cmd_report(args) -> int:
    from prunekit.bench import write_report

    out = write_report(args.db, args.out, prefix=args.prefix)
    print(out["text"])
    print(f"\nwrote {out['html']} and {len(out['pngs'])} PNGs")
    return 0


def main(argv: list[str] | None = None) -> int:
    """These two commands on their own: `python -m prunekit.commands.bench bench FILE`."""
    import argparse

    from prunekit.cli import run

    parser = argparse.ArgumentParser(prog="prunekit")
    register(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
