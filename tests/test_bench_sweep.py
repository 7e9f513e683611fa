"""Sweeps on real data (scikit-learn digits, a small CNN): resume after SIGKILL, no double
runs, and the same metrics from every backend."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from prunekit.bench import ResultStore, execute_run, parse_experiment, run_sweep

SWEEP = """\
[experiment]
name = "kill"
models = ["digits-cnn"]
sparsities = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
seeds = [0, 1]
calibration_samples = 64
latency_repeats = 30

[[methods]]
name = "magnitude"

[[methods]]
name = "wanda"
"""

DRIVER = textwrap.dedent("""
    import sys
    from prunekit.bench import ResultStore, load_experiment, run_sweep
    runs = load_experiment(sys.argv[1])
    with ResultStore(sys.argv[2]) as store:
        s = run_sweep(runs, store, progress=False)
    print("ran", len(s.finished), "skipped", s.skipped, "failed", len(s.failed))
""")


def _snapshot(db):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {k: (r, f) for k, r, f in con.execute("SELECT key, result, finished FROM runs")}
    finally:
        con.close()


def _start_and_kill(exp, db, rows_at_least):
    """Start a sweep in a subprocess and SIGKILL it once the store holds that many rows;
    returns the rows it left."""
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(exp), str(db)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    rows = {}
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        if db.exists():
            try:
                rows = _snapshot(db)
            except sqlite3.OperationalError:  # schema not created yet
                continue
            if len(rows) >= rows_at_least:
                break
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    return _snapshot(db)


def _resume_and_check(exp, db, runs, before):
    out = subprocess.run([sys.executable, "-c", DRIVER, str(exp), str(db)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ran", str(len(runs) - len(before)), "skipped",
                                  str(len(before)), "failed", "0"]
    after = _snapshot(db)
    assert set(after) == {r.key for r in runs}  # exactly one row per run
    for key, row in before.items():
        assert after[key] == row  # finished rows untouched
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == len(runs)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()

    # a last start finds nothing to do
    with ResultStore(db) as store:
        s = run_sweep(runs, store, progress=False)
    assert (s.skipped, s.finished, s.failed) == (len(runs), [], {})


def test_sigkill_mid_sweep_then_resume(tmp_path):
    exp = tmp_path / "sweep.toml"
    exp.write_text(SWEEP)
    db = tmp_path / "results.sqlite"
    runs = parse_experiment(SWEEP)
    before = _start_and_kill(exp, db, 4)
    assert 4 <= len(before) < len(runs)
    _resume_and_check(exp, db, runs, before)


@pytest.mark.slow
def test_sigkill_again_and_again_loses_and_repeats_nothing(tmp_path):
    """Killed five times, each time a few runs further on (a kill can land anywhere: in a
    run, in the store's transaction, in start-up), then resumed to the end."""
    exp = tmp_path / "sweep.toml"
    exp.write_text(SWEEP)
    db = tmp_path / "results.sqlite"
    runs = parse_experiment(SWEEP)
    seen = {}
    for kill in range(5):
        rows = _start_and_kill(exp, db, len(seen) + 1 + kill % 3)
        for key, row in seen.items():
            assert rows[key] == row  # what was written stays as it was
        assert len(rows) < len(runs)
        seen = rows
    _resume_and_check(exp, db, runs, seen)


BACKENDS = """\
[experiment]
models = ["digits-cnn"]
sparsities = [0.6]
patterns = ["unstructured", "2:4"]
seeds = [3]
calibration_samples = 48
latency_repeats = 2

[[methods]]
name = "sparsegpt"
options = { blocksize = 16, exclude = ["conv1"] }

[[methods]]
name = "wanda"
options = { exclude = ["conv1"] }
"""


def _same(a, b):
    """Quality, sizes and masks match exactly; the per-layer error diagnostic (a float64 sum
    whose kernels may take another path under Ray's worker environment) to 1e-6."""
    for k in ("quality_before", "quality_after", "sparsity", "compression",
              "compression_prunable", "flops_dense", "flops_sparse", "theoretical_speedup"):
        assert a[k] == b[k], k
    assert [(l["name"], l["sparsity"]) for l in a["layers"]] == \
        [(l["name"], l["sparsity"]) for l in b["layers"]]
    assert [l["rel_error"] for l in a["layers"]] == \
        pytest.approx([l["rel_error"] for l in b["layers"]], rel=1e-6)


def _sweep(tmp_path, name, **kw):
    runs = parse_experiment(BACKENDS)
    with ResultStore(tmp_path / f"{name}.sqlite") as store:
        s = run_sweep(runs, store, progress=False, **kw)
        assert not s.failed, s.failed
        return {r["key"]: r["result"] for r in store.rows()}, runs


def test_inprocess_and_pool_agree(tmp_path):
    a, runs = _sweep(tmp_path, "inprocess")
    b, _ = _sweep(tmp_path, "pool", backend="pool", workers=2)
    assert set(a) == set(b) == {r.key for r in runs}
    for key in a:
        _same(a[key], b[key])
    # the stored result is what a direct call returns
    direct = execute_run(runs[0].config())
    _same(direct, a[runs[0].key])
    r = a[runs[0].key]
    assert r["quality_after"]["top1"] < r["quality_before"]["top1"] + 1e-9
    assert r["latency"]["threads"] == 1
    assert {"dense_ms_b1", "pruned_ms_b1", "dense_ms_b32", "pruned_ms_b32"} <= set(r["latency"])
    assert r["env"]["torch"] and r["env"]["cpu_count"]


@pytest.mark.slow
def test_ray_local_two_cpu_cluster_agrees_with_inprocess(tmp_path):
    ray = pytest.importorskip("ray")
    a, _ = _sweep(tmp_path, "inprocess")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        b, _ = _sweep(tmp_path, "ray", backend="ray")
        assert ray.is_initialized()  # a cluster we did not start is left running
    finally:
        ray.shutdown()
    assert set(a) == set(b)
    for key in a:
        _same(a[key], b[key])


def test_failed_runs_are_recorded_and_retried(tmp_path):
    # 2:4 cannot take conv1's 9 inputs once conv1 is no longer excluded
    text = BACKENDS.replace(', exclude = ["conv1"]', "").replace('{ exclude = ["conv1"] }', "{}")
    runs = parse_experiment(text)
    with ResultStore(tmp_path / "f.sqlite") as store:
        s = run_sweep(runs, store, progress=False)
        assert len(s.failed) == 2 and len(s.finished) == 2
        assert all("conv1" in e and "multiple of 4" in e for e in s.failed.values())
        failed = store.rows(status="failed")
        assert {r["key"] for r in failed} == set(s.failed)
        s2 = run_sweep(runs, store, progress=False)  # failures are tried again, not successes
        assert s2.skipped == 2 and set(s2.failed) == set(s.failed)
