"""The standard benchmark: experiment files, a SQLite results store, resumable sweeps on
several backends, and reports with plots."""

from prunekit.bench.backends import BACKENDS, SweepSummary, run_sweep
from prunekit.bench.experiment import RunSpec, load_experiment, parse_experiment
from prunekit.bench.report import write_report
from prunekit.bench.runner import execute_run
from prunekit.bench.store import DEFAULT_DB, ResultStore

__all__ = ["BACKENDS", "DEFAULT_DB", "ResultStore", "RunSpec", "SweepSummary", "execute_run",
           "load_experiment", "parse_experiment", "run_sweep", "write_report"]
