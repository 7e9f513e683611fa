"""Running a sweep: skip finished runs, execute the rest on a backend, store each as it ends.

Backends: 'inprocess' (the default), 'pool' (local worker processes) and 'ray' (a running
cluster given by address, or a local one started here). Results are written only by this
process, one transaction per run, as soon as each run returns.
"""

from __future__ import annotations

import importlib
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from prunekit.bench.experiment import RunSpec
from prunekit.bench.store import ResultStore
from prunekit.errors import PruneError
from prunekit.progress import Progress

BACKENDS = ("inprocess", "pool", "ray")
DEFAULT_RUNNER = "prunekit.bench.runner:execute_run"


@dataclass
class SweepSummary:
    total: int
    skipped: int
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def resolve_runner(runner: str | Callable) -> Callable:
    """A run function from 'module:function' (importable by every worker) or a callable."""
    if callable(runner):
        return runner
    module, _, name = runner.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise PruneError(f"cannot load the run function {runner!r}: {e}") from e


def _safe_call(runner, config: dict, progress: bool = False) -> tuple[str, object]:
    """Run one configuration in a worker; errors come back as text so the sweep goes on."""
    try:
        return "ok", resolve_runner(runner)(config, progress=progress)
    except PruneError as e:
        return "error", f"PruneError: {e}"
    except Exception:
        return "error", traceback.format_exc(limit=8)


def pending_runs(runs: list[RunSpec], store: ResultStore) -> list[RunSpec]:
    done = store.done()
    return [r for r in runs if r.key not in done]


def run_sweep(runs: list[RunSpec], store: ResultStore, backend: str = "inprocess",
              workers: int = 2, address: str | None = None, progress: bool = True,
              runner: str | Callable = DEFAULT_RUNNER) -> SweepSummary:
    """Execute every run not yet finished in `store` and record each result."""
    if backend not in BACKENDS:
        raise PruneError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if address and backend != "ray":
        raise PruneError("--address joins a Ray cluster; use it with --backend ray")
    if workers < 1:
        raise PruneError(f"workers must be >= 1, got {workers}")
    todo = pending_runs(runs, store)
    summary = SweepSummary(total=len(runs), skipped=len(runs) - len(todo))
    if not todo:
        return summary

    with Progress(enabled=progress) as bar:
        task = bar.add(f"runs ({summary.skipped} already done)", total=len(todo))

        def record(spec: RunSpec, status: str, value) -> None:
            if status == "ok":
                store.put(spec, result=value)
                summary.finished.append(spec.key)
            else:
                store.put(spec, error=str(value))
                summary.failed[spec.key] = str(value)
            bar.advance(task)

        if backend == "inprocess":
            fn = resolve_runner(runner)
            for spec in todo:
                record(spec, *_safe_call(fn, spec.config(), progress))
        elif backend == "pool":
            _run_pool(todo, runner, workers, record)
        else:
            _run_ray(todo, runner, workers, address, record)
    return summary


def _run_pool(todo, runner, workers, record) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if not isinstance(runner, str) and getattr(runner, "__module__", "__main__") == "__main__":
        raise PruneError("the pool backend needs an importable run function (module:function)")
    ctx = multiprocessing.get_context("spawn")  # no forked copies of torch's thread pools
    with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as pool:
        futures = {pool.submit(_safe_call, runner, spec.config()): spec for spec in todo}
        try:
            for fut in as_completed(futures):
                record(futures[fut], *fut.result())
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def _run_ray(todo, runner, workers, address, record) -> None:
    try:
        import ray
    except ImportError as e:
        raise PruneError("the ray backend needs Ray: pip install ray") from e
    started = False
    if not ray.is_initialized():
        env = {k: v for k, v in os.environ.items() if k.startswith("PRUNEKIT_")}
        if address:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": env})
        started = True
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(_safe_call)
        refs = {task.remote(runner, spec.config()): spec for spec in todo}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                record(refs.pop(ref), *ray.get(ref))
    finally:
        if started:
            ray.shutdown()
