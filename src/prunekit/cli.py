"""The `prunekit` command (also `python -m prunekit`). Every module in prunekit/commands
registers its subcommands in COMMANDS (`@COMMANDS.register("name")` on a function that adds
them to the parser); a new command is one file there.

Whatever goes wrong, the user reads one line: bad input is a PruneError (exit code 2), as is
an output path that cannot be written, which every command's --out is checked for before its
work starts; anything else is a bug in prunekit, printed as one line with the exception type
(exit code 1), with the full traceback under PRUNEKIT_DEBUG=1.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from prunekit.commands import COMMANDS
from prunekit.errors import PruneError

DEBUG_ENV = "PRUNEKIT_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunekit", description="Prune neural networks and measure what it buys.")
    sub = parser.add_subparsers(dest="command", required=True)
    for entry in COMMANDS.entries():
        entry.obj(sub)
    return parser


def check_outputs(args) -> None:
    """--out of any command, before its work: a file unless the command set out_folder."""
    from prunekit.io import check_output

    if getattr(args, "out", None):
        check_output(args.out, "--out", folder=getattr(args, "out_folder", False))


def run(args) -> int:
    """Run a parsed command: its exit code, with every error as one line on stderr."""
    try:
        check_outputs(args)
        return int(args.func(args) or 0)
    except PruneError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        print(f"prunekit: error: {'; '.join(lines)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunekit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `prunekit ... | head`: the reader left, nothing to say
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except Exception as e:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exc()
        else:
            what = " ".join(str(e).split())[:300]
            print(f"prunekit: internal error: {type(e).__name__}: {what} (a bug in prunekit: "
                  f"please report it with the traceback that {DEBUG_ENV}=1 prints)",
                  file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
