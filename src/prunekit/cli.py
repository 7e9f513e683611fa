"""The `prunekit` command. Each area adds its own subcommands through a `register(sub)`
function in its module, listed in COMMANDS."""

from __future__ import annotations

import argparse
import importlib
import sys

from prunekit.errors import PruneError

#: Modules that each define register(subparsers) adding their subcommands.
COMMANDS = [
    "prunekit.commands.prune",
    "prunekit.commands.shrink",
    "prunekit.commands.models",
    "prunekit.commands.demo",
    "prunekit.commands.bench",
    "prunekit.commands.latency",
    "prunekit.commands.export",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunekit", description="Prune neural networks and measure what it buys.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
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
