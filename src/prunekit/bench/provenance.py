"""What a benchmark figure was measured with, written beside it.

A speedup holds for the machine, thread count and allocator it was timed on, and a quality
figure for the code that produced it; a result file that does not say so cannot be judged or
rerun. Every script in benchmarks/ builds one `provenance()` record at the start of a run
(after setting its threads and allocator) and writes its JSON through `write_result`, which
puts the record under the "provenance" key. benchmarks/index.py lists the files by it.

The machine facts come from prunekit.runtime.machine_info (their one home); this module adds
the command line, the git commit and the date.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from prunekit.io import atomic_write_text

#: The fields every result file's provenance holds (benchmarks' tests check them).
REQUIRED = ("command", "git_commit", "date", "torch", "cpu", "cores", "threads", "allocator")
#: Result files inside the repository, which a run rewrites: they do not make the tree dirty.
RESULTS_DIR = "benchmarks/results/"


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(where: str | os.PathLike) -> tuple[str, Path | None, bool | None]:
    """(commit, repository root, dirty) of the checkout holding `where`; ("unknown", None,
    None) outside git. Dirty: a tracked file other than a result file differs from the
    commit (untracked files do not count)."""
    where = Path(where).resolve()
    top = _git(where if where.is_dir() else where.parent, "rev-parse", "--show-toplevel")
    if not top:
        return "unknown", None, None
    root = Path(top.strip())
    commit = (_git(root, "rev-parse", "HEAD") or "unknown").strip()
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    if status is None:
        return commit, root, None
    changed = [line[3:] for line in status.splitlines() if line[3:]]
    return commit, root, any(not p.startswith(RESULTS_DIR) for p in changed)


def command_line(argv: Sequence[str] | None = None, script: str | os.PathLike | None = None,
                 root: Path | None = None) -> str:
    """The command that reruns this run: `python <script> <argv>`, the script's path relative
    to the repository root where it lies inside it."""
    script = Path(script if script is not None else sys.argv[0]).resolve()
    argv = list(sys.argv[1:] if argv is None else argv)
    shown = str(script)
    if root is not None and script.is_relative_to(root):
        shown = script.relative_to(root).as_posix()
    return shlex.join(["python", shown, *argv])


def provenance(argv: Sequence[str] | None = None, *, script: str | os.PathLike | None = None,
               threads: int | None = None, allocator: str | None = None) -> dict:
    """The record of this run: command line (`argv`: the arguments after the script,
    default sys.argv[1:]; `script`: default sys.argv[0]), git commit and whether the tree was
    dirty, date (UTC), torch and Python versions, CPU model, cores, torch threads (`threads`
    if the script sets them only around its work), allocator mode (`allocator` where the
    process's own mode does not describe the run), platform and GPU."""
    from prunekit.runtime import machine_info

    script = script if script is not None else sys.argv[0]
    commit, root, dirty = git_state(script)
    info = machine_info(threads)
    return {"command": command_line(argv, script, root), "git_commit": commit,
            "git_dirty": dirty,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "torch": info["torch"], "python": platform.python_version(), "cpu": info["cpu"],
            "cores": info["cores"], "threads": info["threads"],
            "allocator": allocator or info["malloc"], "platform": info["platform"],
            "gpu": info["gpu"], "load_average": _load_average()}


def _load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages when the run started: a timing taken while other
    work shared the cores says so."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def select(keys: Sequence[str], only: str) -> list[str]:
    """The keys matched by `only`, comma-separated shell globs ("*" for all), in `keys`' order
    (the `--only` option of the benchmark scripts). A glob that matches no key is an error,
    so that a typo does not run nothing silently."""
    import fnmatch

    globs = [g.strip() for g in only.split(",") if g.strip()]
    if not globs:
        raise ValueError(f"--only {only!r} names no rows")
    missing = [g for g in globs if not any(fnmatch.fnmatchcase(k, g) for k in keys)]
    if missing:
        raise ValueError(f"--only: {', '.join(map(repr, missing))} matches no row; the rows "
                         f"are: {', '.join(keys)}")
    return [k for k in keys if any(fnmatch.fnmatchcase(k, g) for g in globs)]


def write_result(path: str | os.PathLike, data: dict, prov: dict, indent: int = 1) -> Path:
    """Stamp `data` with `prov` under "provenance" (in place, so that a script saving the
    same dict after each row stamps it once) and write it as JSON atomically.

    A file resumed from an earlier run holds rows that run measured: its provenance, if it
    differs, moves to the "earlier_provenance" list instead of being lost."""
    old = data.get("provenance")
    if old is not None and old != prov:
        earlier = data.setdefault("earlier_provenance", [])
        if old not in earlier:
            earlier.append(old)
    data["provenance"] = prov
    return atomic_write_text(path, json.dumps(data, indent=indent, default=str) + "\n")


#: Where scripts kept their run's record before provenance existed.
LEGACY_KEYS = ("command", "commands", "machine", "threads", "torch", "torch_threads", "malloc")


def load_result(path: str | os.PathLike) -> dict:
    """The result file at `path` to resume ({} if there is none). The keys in which scripts
    recorded their run before provenance existed (LEGACY_KEYS) move into its provenance, as
    "as_recorded", so that write_result files them with the earlier run's record instead of
    leaving them beside the new run's."""
    path = Path(path)
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    legacy = {k: data.pop(k) for k in LEGACY_KEYS if k in data}
    if legacy:
        data.setdefault("provenance", {})["as_recorded"] = legacy
    return data


def recorded(data: dict, field: str):
    """`field` ("threads" or "allocator") of the run that wrote a result file: from its
    provenance or, in a file written before provenance existed, from where the scripts kept
    it then (threads: None if nowhere; a timing file that names no allocator was timed under
    the system one)."""
    prov = data.get("provenance", {})
    if field in prov:
        return prov[field]
    legacy = prov.get("as_recorded", data)
    machine = legacy.get("machine") if isinstance(legacy.get("machine"), dict) else {}
    if field == "threads":
        for value in (legacy.get("threads"), legacy.get("torch_threads"),
                      machine.get("threads")):
            if value is not None:
                return value
        return None
    if field == "allocator":
        return machine.get("malloc", legacy.get("malloc", "system"))
    raise KeyError(f"recorded() knows 'threads' and 'allocator', not {field!r}")
