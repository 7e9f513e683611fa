"""The results store: one SQLite file, one row per finished run, keyed by its configuration.

A row is written in one transaction when its run finishes, so a killed sweep leaves only whole
rows and resumes where it stopped. WAL mode and a busy timeout let several processes write at
once; INSERT OR IGNORE keeps the first row when two of them finish the same run. A file that is
not a prunekit store (another application's database, or not SQLite at all) is refused before
anything is written to it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from prunekit.errors import PruneError

DEFAULT_DB = "prunekit-results.sqlite"
#: Written into the file header (PRAGMA application_id) to recognise our stores: "PKB1".
APPLICATION_ID = 0x504B4231
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    experiment TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    result TEXT,
    error TEXT,
    finished REAL NOT NULL
);
"""


def _check_existing(path: Path) -> None:
    """Refuse a file that is not an empty file or a prunekit store, opening it read-only."""
    if path.is_dir():
        raise PruneError(f"{path} is a folder; give the results database's file name")
    if not path.exists() or path.stat().st_size == 0:
        return
    try:
        with open(path, "rb") as f:
            header = f.read(100)
    except OSError as e:
        raise PruneError(f"cannot read results database {path}: {e.strerror or e}") from e
    if not header.startswith(b"SQLite format 3\x00"):
        raise PruneError(f"{path} is not an SQLite database (wrong header); it was left "
                         f"unchanged. Pass another --db path")
    # Read through SQLite: after a crash the newest header may still sit in the -wal file.
    # Without one, open immutable (no locks, no -wal/-shm files); either way read-only.
    wal = path.with_name(path.name + "-wal")
    flags = "mode=ro" if wal.exists() and wal.stat().st_size else "mode=ro&immutable=1"
    try:
        con = sqlite3.connect(f"{path.absolute().as_uri()}?{flags}", uri=True, timeout=60)
        try:
            app_id = con.execute("PRAGMA application_id").fetchone()[0]
            if app_id != APPLICATION_ID:
                raise PruneError(f"{path} is an SQLite database of another application "
                                 f"(application_id {app_id:#x}); it was left unchanged. Pass "
                                 f"another --db path")
            ok = con.execute("PRAGMA quick_check").fetchone()[0]
            version = con.execute("PRAGMA user_version").fetchone()[0]
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise PruneError(f"{path} is a corrupt results database ({e}); it was left unchanged. "
                         f"Restore it or pass another --db path") from e
    if ok != "ok":
        raise PruneError(f"{path} is a corrupt results database ({ok}); it was left unchanged")
    if version != SCHEMA_VERSION:
        raise PruneError(f"{path} has results schema {version}; this prunekit reads "
                         f"{SCHEMA_VERSION}")


class ResultStore:
    """`ResultStore(path)`; `done()` keys, `put(spec, result)`, `rows()`."""

    def __init__(self, path: str | Path = DEFAULT_DB, readonly: bool = False):
        self.path = Path(path)
        if readonly and not self.path.exists():
            raise PruneError(f"results database {self.path} does not exist")
        _check_existing(self.path)
        try:
            self.con = self._open(readonly)
        except (sqlite3.Error, OSError) as e:
            raise PruneError(f"cannot open results database {self.path}: {e}; pass another "
                             f"--db path") from e

    def _open(self, readonly: bool) -> sqlite3.Connection:
        if readonly:
            con = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True,
                                  timeout=60)
            if not con.execute("SELECT 1 FROM sqlite_master WHERE name = 'runs'").fetchone():
                con.execute("CREATE TEMP TABLE runs (key, experiment, config, status, result, "
                            "error, finished)")  # an empty file: no results yet
            return con
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        con.execute("PRAGMA busy_timeout = 60000")
        con.execute("BEGIN IMMEDIATE")
        try:
            con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    con.execute(stmt)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        # after the marked header exists: WAL lets readers and writers work at once
        con.execute("PRAGMA journal_mode = WAL")
        con.execute("PRAGMA synchronous = NORMAL")
        return con

    def close(self) -> None:
        self.con.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _query(self, sql: str, args=()) -> list[tuple]:
        try:
            return self.con.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as e:
            raise PruneError(f"cannot read results database {self.path}: {e}; it was left "
                             f"unchanged") from e

    def done(self) -> set[str]:
        """Keys of the runs that finished successfully (they are never run again)."""
        return {k for (k,) in self._query("SELECT key FROM runs WHERE status = 'ok'")}

    def put(self, spec, result: dict | None = None, error: str | None = None) -> bool:
        """Record a finished run in one transaction; True if this call wrote the row.

        A success is never overwritten; a failure is replaced by a later attempt."""
        status = "ok" if error is None else "failed"
        row = (spec.key, spec.experiment, json.dumps(spec.config(), sort_keys=True), status,
               None if result is None else json.dumps(result, sort_keys=True), error,
               time.time())
        self.con.execute("BEGIN IMMEDIATE")
        try:
            cur = self.con.execute(
                "INSERT INTO runs (key, experiment, config, status, result, error, finished) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                "experiment = excluded.experiment, config = excluded.config, "
                "status = excluded.status, result = excluded.result, error = excluded.error, "
                "finished = excluded.finished WHERE runs.status = 'failed'", row)
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        return cur.rowcount == 1

    def rows(self, status: str | None = "ok") -> list[dict]:
        """All rows as dicts with config and result parsed, oldest first."""
        sql = "SELECT key, experiment, config, status, result, error, finished FROM runs"
        args = ()
        if status is not None:
            sql += " WHERE status = ?"
            args = (status,)
        out = []
        for key, exp, config, st, result, error, finished in self._query(
                sql + " ORDER BY finished, key", args):
            out.append({"key": key, "experiment": exp, "config": json.loads(config),
                        "status": st, "result": json.loads(result) if result else None,
                        "error": error, "finished": finished})
        return out
