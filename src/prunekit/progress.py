"""Progress bars for long steps (rich), silent when disabled or when stderr is not a terminal
and PRUNEKIT_PROGRESS is unset."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as _RichProgress


def _wanted(enabled: bool) -> bool:
    if not enabled:
        return False
    env = os.environ.get("PRUNEKIT_PROGRESS")
    if env is not None:
        return env not in ("0", "", "false", "no")
    return sys.stderr.isatty()


class Progress:
    """`with Progress() as bar: t = bar.add('step', total=n); bar.advance(t)`."""

    def __init__(self, enabled: bool = True):
        self._bar = None
        if _wanted(enabled):
            self._bar = _RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), console=Console(stderr=True), transient=False)

    def __enter__(self):
        if self._bar:
            self._bar.start()
        return self

    def __exit__(self, *exc):
        if self._bar:
            self._bar.stop()

    def add(self, description: str, total: int | None = None):
        return self._bar.add_task(description, total=total) if self._bar else None

    def advance(self, task, n: int = 1) -> None:
        if self._bar is not None and task is not None:
            self._bar.advance(task, n)
