"""Options and output shared by the commands that write a model and report on it."""

from __future__ import annotations

import functools
import json
import sys

from prunekit.runtime.latency import num_threads


def print_result(args, data: dict, text: str) -> None:
    """`data` as JSON with --json, else `text` and, with --out, the file written."""
    if args.json:
        json.dump(data, sys.stdout, indent=2, default=str)
        print()
        return
    print(text)
    if args.out:
        print(f"wrote {args.out}")


def add_threads_option(p) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for pruning and timing (default: torch's); measured "
                        "speedups depend on it, so give the count the model will run with")


def with_threads(cmd):
    """The command run under its --threads (restored afterwards)."""
    @functools.wraps(cmd)
    def run(args):
        with num_threads(args.threads):
            return cmd(args)
    return run
