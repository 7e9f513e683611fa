"""The SQLite results store: whole rows, no double runs, foreign files untouched, and several
processes writing at once."""

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from prunekit.bench.experiment import RunSpec
from prunekit.bench.store import ResultStore
from prunekit.errors import PruneError


def _spec(seed, method="magnitude"):
    return RunSpec("digits-cnn", "digits", method, {}, "unstructured", 0.5, None, seed)


def test_put_done_rows_and_failures(tmp_path):
    db = tmp_path / "r.sqlite"
    with ResultStore(db) as store:
        assert store.done() == set()
        assert store.put(_spec(0), result={"x": 1})
        assert not store.put(_spec(0), result={"x": 2})  # a success is never overwritten
        assert store.put(_spec(1), error="boom")
        assert store.done() == {_spec(0).key}
        assert store.put(_spec(1), result={"x": 3})  # a failure is replaced by a retry
        assert store.done() == {_spec(0).key, _spec(1).key}
    with ResultStore(db, readonly=True) as store:
        rows = {r["key"]: r for r in store.rows()}
    assert rows[_spec(0).key]["result"] == {"x": 1}
    assert rows[_spec(1).key]["result"] == {"x": 3}
    assert rows[_spec(1).key]["error"] is None
    assert RunSpec.from_config(rows[_spec(0).key]["config"]) == _spec(0)
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns


def test_foreign_and_corrupt_files_are_refused_unchanged(tmp_path):
    foreign = tmp_path / "foreign.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE runs (key TEXT)")
    con.execute("INSERT INTO runs VALUES ('theirs')")
    con.commit()
    con.close()
    text = tmp_path / "notes.sqlite"
    text.write_text("just some notes\n" * 20)
    good = tmp_path / "good.sqlite"
    with ResultStore(good) as store:
        store.put(_spec(0), result={"x": 1})
    corrupt = tmp_path / "corrupt.sqlite"
    data = bytearray(good.read_bytes())
    data[100:] = os.urandom(len(data) - 100)  # keep the header, wreck every page
    corrupt.write_bytes(bytes(data))

    for path, words in ((foreign, "another application"), (text, "not an SQLite"),
                        (corrupt, "corrupt")):
        before = _digest(path)
        siblings = set(tmp_path.iterdir())
        for readonly in (False, True):
            with pytest.raises(PruneError, match=words) as e:
                ResultStore(path, readonly=readonly)
            assert str(path) in str(e.value)
        assert _digest(path) == before
        assert set(tmp_path.iterdir()) == siblings  # no -wal or -journal file was created


WRITER = textwrap.dedent("""
    import sys
    from prunekit.bench.experiment import RunSpec
    from prunekit.bench.store import ResultStore
    db, start, stop, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    with ResultStore(db) as store:
        for seed in range(start, stop):
            spec = RunSpec("digits-cnn", "digits", "magnitude", {}, "unstructured", 0.5, None,
                           seed)
            store.put(spec, result={"seed": seed, "writer": tag, "pad": "x" * 2000})
""")


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    db = tmp_path / "shared.sqlite"
    ResultStore(db).close()
    # the ranges overlap on 100..149: those runs must exist once, written by one of the two
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), *args],
                              stderr=subprocess.PIPE)
             for args in (("0", "150", "a"), ("100", "250", "b"))]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    with ResultStore(db, readonly=True) as store:
        rows = store.rows()
    seeds = sorted(r["result"]["seed"] for r in rows)
    assert seeds == list(range(250))
    assert len({r["key"] for r in rows}) == 250
    for r in rows:
        assert r["config"]["seed"] == r["result"]["seed"]
        assert r["result"]["writer"] in ("a", "b")
        if r["result"]["seed"] < 100:
            assert r["result"]["writer"] == "a"
        elif r["result"]["seed"] >= 150:
            assert r["result"]["writer"] == "b"
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert json.loads(con.execute("SELECT result FROM runs LIMIT 1").fetchone()[0])
    con.close()
