"""How long a fresh process waits for CIFAR-10: decoding the shared .npz (LZMA for train)
versus the memory-mapped decoded copy prunekit keeps in its cache after the first load.

Each measurement is one new Python process timing only `prunekit.data.load_cifar10(split)`
plus its checksum (imports excluded); the two ways alternate within each round, so both see
the same machine load.

    python benchmarks/data_load.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from prunekit.io import atomic_write_text

RESULTS = Path(__file__).parent / "results"
CHILD = ("import time; from prunekit import data; t = time.perf_counter(); "
         "data.load_cifar10({split!r}); print(time.perf_counter() - t)")


def timed_load(split: str, cache: str) -> float:
    env = dict(os.environ, PRUNEKIT_CACHE=cache)
    out = subprocess.run([sys.executable, "-c", CHILD.format(split=split)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for split in ("train", "test"):
        decode, cached = [], []
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory() as cache:
                decode.append(timed_load(split, cache))  # empty cache: decodes, then caches
                cached.append(timed_load(split, cache))  # the decoded copy, memory-mapped
        row = {"split": split, "decode_s": statistics.median(decode),
               "cached_s": statistics.median(cached),
               "ratio": statistics.median(decode) / statistics.median(cached),
               "decode_all": decode, "cached_all": cached}
        rows.append(row)
        print(f"{split:>5}: decode {row['decode_s']:.2f} s, cached {row['cached_s']:.2f} s, "
              f"{row['ratio']:.1f}x faster (median of {args.rounds})")
    result = {"command": "python " + " ".join(sys.argv), "machine": platform.platform(),
              "cpus": os.cpu_count(), "rows": rows}
    atomic_write_text(RESULTS / "data_load.json", json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
