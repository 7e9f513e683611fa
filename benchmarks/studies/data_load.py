"""How long a fresh process waits for CIFAR-10: decoding the shared .npz (LZMA for train)
versus the memory-mapped decoded copy prunekit keeps in its cache after the first load.

Each measurement is one new Python process timing only `prunekit.data.load_cifar10(split)`
plus its checksum (imports excluded); the two ways alternate within each round, so both see
the same machine load.

Results: benchmarks/results/data_load/data_load.json (--out), with the run's provenance.

    python benchmarks/studies/data_load.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from prunekit.bench.provenance import provenance, write_result

RESULTS = Path(__file__).resolve().parents[1] / "results" / "data_load"
CHILD = ("import time; from prunekit import data; t = time.perf_counter(); "
         "data.load_cifar10({split!r}); print(time.perf_counter() - t)")


def timed_load(split: str, cache: str) -> float:
    env = dict(os.environ, PRUNEKIT_CACHE=cache)
    out = subprocess.run([sys.executable, "-c", CHILD.format(split=split)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "data_load.json")
    args = parser.parse_args(argv)
    prov = provenance(argv, script=__file__)
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
    write_result(args.out, {"rows": rows}, prov, indent=2)


if __name__ == "__main__":
    main()
