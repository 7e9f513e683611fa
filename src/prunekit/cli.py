"""The `prunekit` command (also `python -m prunekit`). Every module in prunekit/commands
registers its subcommands in COMMANDS (`@COMMANDS.register("name")` on a function that adds
them to the parser); a new command is one file there."""

from __future__ import annotations

import argparse
import sys

from prunekit.commands import COMMANDS
from prunekit.errors import PruneError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunekit", description="Prune neural networks and measure what it buys.")
    sub = parser.add_subparsers(dest="command", required=True)
    for entry in COMMANDS.entries():
        entry.obj(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PruneError as e:
        print(f"prunekit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunekit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
