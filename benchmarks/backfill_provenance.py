"""Backfill the "provenance" record (prunekit.bench.provenance) of result files written before
it existed, from what each file says and from git history, marking every field known or
inferred. Run once, on 2026-12-07; a file that already holds provenance is left alone, so a
rerun changes nothing.

- command: the file's own "command" (known); a train_sparse run cache has none and takes
  its table's (inferred).
- git_commit: the commit that last changed the file (inferred: the figures were measured on
  that commit's code or its parent's); the whole history is kept under "backfilled".
- date: that commit's date (inferred: the run ended at or before it).
- torch, cpu, cores, threads, allocator: from the file (its "machine" block, "threads",
  "torch_threads", "malloc", "config", or a --threads in its command) where it says;
  otherwise torch is the version pinned in pyproject.toml at the commit, cpu and cores those
  recorded by other result files committed in the same working session (commits less than
  12 hours apart), and the allocator "system" where neither the script nor the library
  could have turned on keep_freed_memory at that commit; anything else is "unknown".

Files that are not JSON (.md, .png, .html, .sqlite, .txt) written by the run of a JSON file
of the same name are listed as its companions; the standard sweep's files get one sidecar
per experiment (<name>.provenance.json) listing them.

    python benchmarks/backfill_provenance.py            # rewrites the files it backfills
    python benchmarks/backfill_provenance.py --dry-run  # prints the records only
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import subprocess
import tempfile
from pathlib import Path

from prunekit.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
ON = "2026-12-07"
SESSION_GAP_S = 12 * 3600
SWEEPS = ("sweep_resnet20", "sweep_minilm")


def git(*args: str, ok=(0,)) -> str:
    out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if out.returncode not in ok:
        raise SystemExit(f"git {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def history(path: Path) -> list[dict]:
    """Every commit that changed `path` (newest first), following renames."""
    out = git("log", "--follow", "--format=%H%x09%ct%x09%cI%x09%s", "--",
              str(path.relative_to(ROOT)))
    rows = []
    for line in out.splitlines():
        commit, ts, date, subject = line.split("\t", 3)
        rows.append({"commit": commit, "time": int(ts), "date": date, "subject": subject[:120]})
    return rows


def sessions() -> list[tuple[int, int]]:
    """(first, last) commit times of each working session: commits less than 12 h apart."""
    times = sorted(int(t) for t in git("log", "--all", "--format=%ct").split())
    spans, start = [], times[0]
    for a, b in zip(times, times[1:]):
        if b - a > SESSION_GAP_S:
            spans.append((start, a))
            start = b
    spans.append((start, times[-1]))
    return spans


def session_of(t: int, spans) -> int:
    return next(i for i, (a, b) in enumerate(spans) if a <= t <= b)


def machine_evidence(spans) -> dict[int, dict[str, dict]]:
    """{session: {field: {value: [file@commit, ...]}}} for cpu and cores, from every version
    of every result file (JSON "machine" blocks, sweep run environments) in git history."""
    evidence: dict[int, dict[str, dict]] = {}
    out = git("log", "--all", "--format=%x00%H %ct", "--name-only", "--", "benchmarks/results")
    for block in filter(None, out.split("\x00")):
        head, *names = block.strip().splitlines()
        commit, ts = head.split()
        for name in filter(None, names):
            seen = _machine_of(commit, name)
            s = session_of(int(ts), spans)
            for field, value in seen.items():
                where = f"{name.rsplit('/', 1)[-1]}@{commit[:7]}"
                evidence.setdefault(s, {}).setdefault(field, {}).setdefault(value, [])
                evidence[s][field][value].append(where)
    return evidence


def _machine_of(commit: str, name: str) -> dict:
    try:
        raw = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{name}"], check=True,
                             capture_output=True).stdout
    except subprocess.CalledProcessError:  # deleted in this commit
        return {}
    if name.endswith(".json"):
        machine = json.loads(raw).get("machine")
        if isinstance(machine, dict):
            return {k: machine[k] for k in ("cpu", "cores") if k in machine}
        return {}
    if name.endswith(".sqlite"):
        with tempfile.NamedTemporaryFile(suffix=".sqlite") as f:
            f.write(raw)
            f.flush()
            with sqlite3.connect(f.name) as db:
                envs = [json.loads(r[0]).get("env", {}) for r in
                        db.execute("select result from runs where result is not null")]
        cpus = {e["cpu"] for e in envs if "cpu" in e}
        cores = {e["cpu_count"] for e in envs if "cpu_count" in e}
        return ({"cpu": cpus.pop()} if len(cpus) == 1 else {}) | (
            {"cores": cores.pop()} if len(cores) == 1 else {})
    return {}


def script_of(path: Path) -> str:
    """The benchmark script that wrote a result file, by its name."""
    stem = path.name.split(".")[0]
    if path.parent.name.endswith("_runs") or path.parent.name == "train_sparse":
        return "train_sparse"
    for script in ("structured_runtimes", "structured_seeds", "structured_iterative10_seeds",
                   "taylor_variants", "train_sparse", "oneshot_quality", "layer_prune",
                   "data_load", "malloc", "kernels", "budget", "structured", "sweep"):
        if stem.startswith(script):
            return "structured_seeds" if script.endswith("_seeds") else script
    raise SystemExit(f"{path}: no script writes files of this name")


def allocator_inferred(commit: str, script: str) -> tuple[str, str] | None:
    """("system", why) where nothing could have kept freed memory at `commit`."""
    users = git("grep", "-l", "-e", "keep_freed_memory", "-e", "apply_malloc_option", commit,
                "--", "src", "benchmarks", ok=(0, 1)).split()
    users = [u.split(":", 1)[1] for u in users]
    if not users:
        return "system", (f"no allocator option existed at {commit[:7]} (keep_freed_memory "
                          "came later): glibc's default")
    callers = [u for u in users if u.startswith("src/") and not u.startswith(
        ("src/prunekit/runtime/", "src/prunekit/commands/"))]
    if f"benchmarks/{script}.py" not in users and not callers:
        return "system", (f"benchmarks/{script}.py at {commit[:7]} never calls "
                          "keep_freed_memory, nor does the library it uses: glibc's default")
    return None


def known_fields(data: dict) -> dict:
    """The fields a result file states itself."""
    machine = data.get("machine") if isinstance(data.get("machine"), dict) else {}
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    out = {}
    if "command" in data:
        out["command"] = data["command"]
    torch = data.get("torch", machine.get("torch"))
    if torch:
        out["torch"] = torch
    if "cpu" in machine:
        out["cpu"] = machine["cpu"]
    cores = machine.get("cores", data.get("cpus"))
    if cores:
        out["cores"] = cores
    for threads in (data.get("threads"), data.get("torch_threads"), machine.get("threads"),
                    config.get("threads")):
        if threads is not None:
            out["threads"] = threads
            break
    else:
        m = re.search(r"--threads[ =](\d+)", data.get("command", ""))
        if m:
            out["threads"] = int(m.group(1))
    allocator = machine.get("malloc", data.get("malloc"))
    if isinstance(data.get("processes"), dict) and set(data["processes"]) == {"system", "kept"}:
        allocator = "system and kept, in alternating processes (what malloc.py compares)"
    if allocator:
        out["allocator"] = allocator
    if isinstance(data.get("machine"), str) and "-" in data["machine"]:
        out["platform"] = data["machine"]  # platform.platform(); a bare "x86_64" says little
    elif "platform" in machine:
        out["platform"] = machine["platform"]
    return out


def backfill(path: Path, data: dict, spans, evidence, parent: dict | None = None) -> dict:
    """The provenance record of one result file (JSON `data`, or a sidecar's first file)."""
    hist = history(path)
    last = hist[0]
    prov = known_fields(data)
    known = [k for k in prov if k != "platform"]
    inferred = {}
    if "command" not in prov and parent:
        prov["command"] = parent["command"]
        inferred["command"] = "the command of the table this run cache belongs to"
    prov["git_commit"] = last["commit"]
    inferred["git_commit"] = ("the commit that last changed this file: its figures were "
                              "measured on that commit's code or its parent's")
    prov["git_dirty"] = "unknown"
    prov["date"] = last["date"]
    inferred["date"] = "that commit's date (the run ended at or before it)"
    if "torch" not in prov:
        pin = re.search(r'"torch==([^"]+)"', git("show", f"{last['commit']}:pyproject.toml"))
        prov["torch"] = pin.group(1) if pin else "unknown"
        inferred["torch"] = f"the version pinned in pyproject.toml at {last['commit'][:7]}"
    own = {session_of(h["time"], spans) for h in hist}
    for field in ("cpu", "cores"):
        if field in prov:
            continue
        values = {v: w for s in sorted(own) for v, w in evidence.get(s, {}).get(field, {}).items()}
        last_s = session_of(last["time"], spans)
        here = evidence.get(last_s, {}).get(field, {})
        if len(here) == 1:
            (value, where), = here.items()
            prov[field] = value
            why = (f"recorded by every result file that names it in the same working session "
                   f"({', '.join(sorted(set(where))[:4])}{', ...' if len(where) > 4 else ''})")
            if len(values) > 1:
                why += (f"; rows kept from this file's earlier commits, in another session, may "
                        f"come from {', '.join(str(v) for v in values if v != value)}")
            inferred[field] = why
        else:
            prov[field] = "unknown"
    if "threads" not in prov:
        if parent and "threads" in parent:
            prov["threads"] = parent["threads"]
            inferred["threads"] = "the threads of the table this run cache belongs to"
        else:
            prov["threads"] = "unknown"
    if "allocator" not in prov:
        guess = allocator_inferred(last["commit"], script_of(path))
        if guess:
            prov["allocator"], inferred["allocator"] = guess
        else:
            prov["allocator"] = "unknown"
    prov["backfilled"] = {
        "on": ON, "from": "the file's own text and git history",
        "known": known, "inferred": inferred,
        "unknown": [k for k, v in prov.items() if v == "unknown"],
        "history": [{k: h[k] for k in ("commit", "date", "subject")} for h in hist]}
    return prov


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    spans = sessions()
    evidence = machine_evidence(spans)
    files = sorted(RESULTS.rglob("*"))
    jsons = [f for f in files if f.suffix == ".json" and not f.name.endswith(".provenance.json")]
    tables = {}
    for path in jsons:
        text = path.read_text()
        data = json.loads(text)
        if "provenance" in data:
            continue
        parent = None
        if path.parent.name.endswith("_runs"):
            table = path.parent.with_name(path.parent.name[:-len("_runs")] + ".json")
            parent = tables.get(table) or json.loads(table.read_text())["provenance"]
        prov = backfill(path, data, spans, evidence, parent)
        companions = {f.name: history(f)[0]["commit"] for f in files
                      if f.parent == path.parent and f.suffix != ".json"
                      and f.name.split(".")[0] == path.stem}
        if companions:
            prov["backfilled"]["companions_last_changed_in"] = companions
        tables[path] = prov
        indent = 2 if text.startswith("{\n  ") else 1
        data["provenance"] = prov
        out = json.dumps(data, indent=indent) + ("\n" if text.endswith("\n") else "")
        print(f"{path.relative_to(ROOT)}: " + json.dumps(
            {k: v for k, v in prov.items() if k != "backfilled"})[:300])
        if not args.dry_run:
            atomic_write_text(path, out)
    for stem in SWEEPS:
        sidecar = next(RESULTS.rglob(f"{stem}.sqlite")).with_name(f"{stem}.provenance.json")
        if sidecar.exists():
            continue
        members = sorted(f for f in files if f.parent == sidecar.parent
                         and (f.name.startswith(stem + "_") or f.name == f"{stem}.sqlite"
                              or f.name == "sweep_tables.txt"))
        db = sidecar.with_name(f"{stem}.sqlite")
        with sqlite3.connect(f"file:{db}?immutable=1", uri=True) as con:
            envs = [json.loads(r[0])["env"] for r in
                    con.execute("select result from runs where result is not null")]
        table_text = (sidecar.parent / "sweep_tables.txt").read_text()
        commands = [line[2:] for line in table_text.splitlines()
                    if line.startswith("# prunekit ") and stem in line]
        data = {"command": " && ".join(commands), "torch": envs[0]["torch"],
                "machine": {"cpu": envs[0]["cpu"], "cores": envs[0]["cpu_count"],
                            "threads": envs[0]["torch_threads"],
                            "platform": envs[0]["platform"]}}
        if any(e != envs[0] | {"hostname": e.get("hostname")} for e in envs):
            raise SystemExit(f"{db}: runs disagree on their environment; backfill by hand")
        prov = backfill(db, data, spans, evidence)
        prov["backfilled"]["known_from"] = (f"{db.name}: every run's recorded environment; "
                                            "command: the header lines of sweep_tables.txt")
        prov["backfilled"]["companions_last_changed_in"] = {
            f.name: history(f)[0]["commit"] for f in members}
        record = {"files": [f.name for f in members], "provenance": prov}
        print(f"{sidecar.relative_to(ROOT)}: {json.dumps(prov)[:300]}")
        if not args.dry_run:
            atomic_write_text(sidecar, json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
