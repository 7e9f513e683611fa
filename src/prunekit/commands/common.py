"""Options and output shared by the commands (and the timing benchmarks): threads, the
allocator mode, counts, and printing a report."""

from __future__ import annotations

import argparse
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


def count(least: int = 1):
    """An argparse type: an integer >= least. A zero or negative count (--calib-samples 0,
    --steps -1) is refused by argparse, which names the option, before any work; it would
    otherwise reach torch as an empty or negative size."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {value}")
        return value
    parse.__name__ = f"integer >= {least}"
    return parse


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


def add_malloc_option(p) -> None:
    """--system-malloc, for every command that times a model."""
    p.add_argument("--system-malloc", action="store_true",
                   help="time with the C library's default allocator, which maps and zeroes "
                        "large tensors afresh on every call; by default freed memory is kept "
                        "in the process, as jemalloc or tcmalloc would (steadier timings)")


def apply_malloc_option(args) -> None:
    from prunekit.runtime import keep_freed_memory  # looked up at call time (tests stub it)

    if not args.system_malloc:
        keep_freed_memory()


def allocator_conflict(saved_machine: dict | None, path) -> str | None:
    """Why rows saved in `path` (timed on `saved_machine`) must not be joined by rows timed
    under this process's allocator mode, or None when they may."""
    from prunekit.runtime import machine_info

    mode = machine_info()["malloc"]
    if (saved_machine or {}).get("malloc", "system") == mode:
        return None
    return (f"{path} holds rows timed under the {'system' if mode == 'kept' else 'kept'} "
            f"allocator and this run would time under the {mode} one: match it "
            f"(--system-malloc) or write to a new --out")
