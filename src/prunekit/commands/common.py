"""Output shared by the commands that write a model and report on it."""

from __future__ import annotations

import json
import sys


def print_result(args, data: dict, text: str) -> None:
    """`data` as JSON with --json, else `text` and, with --out, the file written."""
    if args.json:
        json.dump(data, sys.stdout, indent=2, default=str)
        print()
        return
    print(text)
    if args.out:
        print(f"wrote {args.out}")
