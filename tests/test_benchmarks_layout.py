"""benchmarks/: every result file says what it was measured with, lives in its script's
folder, and is listed by the generated index; prunekit.bench.provenance writes that record."""

import ast
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunekit.bench.provenance import (
    REQUIRED,
    git_state,
    load_result,
    provenance,
    recorded,
    write_result,
)

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
TOOLS = {"index.py", "backfill_provenance.py"}  # scripts that measure nothing
SCRIPTS = sorted([p for p in BENCHMARKS.glob("*.py") if p.name not in TOOLS]
                 + list((BENCHMARKS / "studies").glob("*.py")))
HAVE_GIT = shutil.which("git") is not None


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


index = load_module(BENCHMARKS / "index.py")
RECORDS = [(e["file"], e) for rows in index.entries(RESULTS).values() for e in rows]


def test_index_is_up_to_date():
    assert (RESULTS / "INDEX.md").read_text() == index.render(RESULTS), \
        "benchmarks/results/INDEX.md is stale: run python benchmarks/index.py"


@pytest.mark.parametrize("name,entry", RECORDS, ids=[r[0] for r in RECORDS])
def test_result_file_records_provenance(name, entry):
    prov = entry["provenance"]
    assert set(REQUIRED) <= prov.keys(), f"{name} lacks {set(REQUIRED) - prov.keys()}"
    assert prov["command"].strip() and prov["cpu"] and prov["allocator"]
    assert re.fullmatch(r"[0-9a-f]{40}", prov["git_commit"]), prov["git_commit"]
    assert re.match(r"\d+\.\d+", prov["torch"]), prov["torch"]
    assert re.match(r"\d{4}-\d\d-\d\dT", prov["date"]), prov["date"]
    assert isinstance(prov["threads"], int) or prov["threads"] == "unknown"
    if "backfilled" in prov:  # every field says whether the file knew it or git history did
        b = prov["backfilled"]
        for field in REQUIRED:
            sources = [field in b["known"], field in b["inferred"], field in b["unknown"]]
            assert sum(sources) == 1, f"{name}: {field} is not exactly one of known, " \
                                      "inferred, unknown"
            assert (prov[field] == "unknown") == (field in b["unknown"])


@pytest.mark.skipif(not HAVE_GIT, reason="needs git")
def test_recorded_commits_exist():
    shallow = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--is-shallow-repository"],
                             capture_output=True, text=True)
    if shallow.returncode or shallow.stdout.strip() != "false":
        pytest.skip("not a full git checkout")
    commits = {e["provenance"]["git_commit"] for _, e in RECORDS}
    for c in sorted(commits):
        ok = subprocess.run(["git", "-C", str(ROOT), "merge-base", "--is-ancestor", c, "HEAD"])
        assert ok.returncode == 0, f"{c} is not in this branch's history"


def test_every_result_file_is_listed_and_every_folder_has_its_script():
    listed = {(RESULTS / e["file"]).parent / c for _, e in RECORDS for c in e["companions"]}
    listed |= {RESULTS / e["file"] for _, e in RECORDS}
    files = {p for p in RESULTS.rglob("*") if p.is_file() and p.name != "INDEX.md"
             and not p.name.endswith(("-wal", "-shm"))}  # SQLite's own, git-ignored
    assert files == listed, (f"not in any record: {sorted(map(str, files - listed))}; "
                             f"listed but missing: {sorted(map(str, listed - files))}")
    assert not list(RESULTS.glob("*.*")) or {p.name for p in RESULTS.glob("*.*")} == {
        "INDEX.md"}, "result files belong in benchmarks/results/<script>/"
    for folder in (p for p in RESULTS.iterdir() if p.is_dir()):
        assert index.script_of(folder.name), f"no benchmarks/[studies/]{folder.name}.py"


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_script_writes_to_its_folder_through_provenance(script):
    text = script.read_text()
    calls = {n.func.id for n in ast.walk(ast.parse(text))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert {"provenance", "write_result"} <= calls, f"{script.name}: no provenance record"
    assert f'"{script.stem}"' in text, f"{script.name}: results not in results/{script.stem}/"
    module = load_module(script)  # imports resolve from the script's new place
    assert callable(module.main)


@pytest.mark.skipif(not HAVE_GIT, reason="needs git")
def test_provenance_of_this_checkout():
    prov = provenance(["--quick", "a b"], script=BENCHMARKS / "layer_prune.py", threads=3,
                      allocator="kept")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert prov["command"] == "python benchmarks/layer_prune.py --quick 'a b'"
    assert prov["git_commit"] == head and isinstance(prov["git_dirty"], bool)
    assert prov["threads"] == 3 and prov["allocator"] == "kept"
    assert prov["torch"] == torch.__version__ and prov["cores"] >= 1
    assert set(REQUIRED) <= prov.keys()


@pytest.mark.skipif(not HAVE_GIT, reason="needs git")
def test_dirty_means_tracked_code_changed(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c",
                        "user.email=t@t", *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "benchmarks" / "results" / "r.json").write_text("{}\n")
    git("add", ".")
    git("commit", "-qm", "x")
    assert git_state(tmp_path / "code.py")[2] is False
    (tmp_path / "benchmarks" / "results" / "r.json").write_text('{"a": 1}\n')
    (tmp_path / "untracked.py").write_text("")
    assert git_state(tmp_path)[2] is False  # a rewritten result, an untracked file
    (tmp_path / "code.py").write_text("a = 2\n")
    assert git_state(tmp_path)[2] is True
    assert git_state(Path("/"))[0] == "unknown"


def test_write_result_keeps_a_resumed_files_earlier_record(tmp_path):
    path = tmp_path / "sub" / "r.json"
    first = {"command": "python a.py", "git_commit": "1" * 40}
    data = {"rows": {"x": 1}}
    write_result(path, data, first)
    write_result(path, data, first)
    assert json.loads(path.read_text()) == {"rows": {"x": 1}, "provenance": first}
    resumed = load_result(path)
    second = dict(first, command="python a.py --more")
    resumed["rows"]["y"] = 2
    for _ in range(3):  # a script saves after every row
        write_result(path, resumed, second)
    out = json.loads(path.read_text())
    assert out["provenance"] == second and out["earlier_provenance"] == [first]
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary left


def test_files_from_before_provenance_resume_with_their_record(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"command": "python b.py", "rows": {"k": 1},
                                "machine": {"cpu": "X", "threads": 2, "malloc": "kept"}}))
    old = load_result(path)
    assert "command" not in old and "machine" not in old  # no stale record beside the new
    assert recorded(old, "threads") == 2 and recorded(old, "allocator") == "kept"
    assert recorded({"rows": {}}, "allocator") == "system"  # timed before the option existed
    write_result(path, old, {"command": "python b.py --again"})
    out = json.loads(path.read_text())
    assert out["earlier_provenance"][0]["as_recorded"]["machine"]["cpu"] == "X"
    assert load_result(tmp_path / "missing.json") == {}


def test_budget_files_keep_refusing_rows_under_another_allocator():
    """budget.py and kernels.py compare the recorded allocator with this process's."""
    from prunekit.commands.common import allocator_conflict

    backfilled = load_result(RESULTS / "budget" / "budget_1x16.json")
    kept = load_result(RESULTS / "budget" / "budget_1x16_model_kept.json")
    assert recorded(backfilled, "allocator") == "system"
    assert recorded(kept, "allocator") == "kept"
    assert allocator_conflict({"malloc": recorded(backfilled, "allocator")}, "f") is None
    assert "kept" in allocator_conflict({"malloc": recorded(kept, "allocator")}, "f")


def test_index_check_mode_reports_staleness(tmp_path, monkeypatch, capsys):
    assert index.main(["--check"]) == 0
    monkeypatch.setattr(index, "RESULTS", tmp_path)
    assert index.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().out


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_select_keeps_order_and_refuses_a_glob_that_matches_nothing():
    from prunekit.bench.provenance import select

    keys = ["dense", "wanda/50%", "sparsegpt/50%", "sparsegpt/2:4", "wanda/2:4"]
    assert select(keys, "*") == keys
    # order is the keys' order, not the globs', and a key matched twice appears once
    assert select(keys, "*/2:4, sparsegpt/*") == ["sparsegpt/50%", "sparsegpt/2:4", "wanda/2:4"]
    with pytest.raises(ValueError, match="'wnada/\\*' matches no row"):
        select(keys, "sparsegpt/*,wnada/*")
    with pytest.raises(ValueError, match="names no rows"):
        select(keys, " , ")
