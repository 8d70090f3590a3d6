"""A progress bar (rich) for the train/val/test loops, shown on interactive terminals only.

Off when stdout is not a TTY, when ``CI`` is set, when ``TERM=dumb``, on every process but
the main one, when the log level is above INFO, and when rich is not installed. While a bar
is live, the runner's console log lines are printed above it (rich's stdout redirection).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys


def progress_wanted(setting: bool | None, is_main: bool, logger: logging.Logger | None) -> bool:
    """Whether to show a bar. ``setting``: ``None`` = auto, ``False`` = never, ``True`` = on a
    main process with rich installed even without a TTY."""
    if setting is False or not is_main:
        return False
    if logger is not None and logger.getEffectiveLevel() > logging.INFO:
        return False
    if importlib.util.find_spec('rich') is None:
        return False
    if setting:
        return True
    if os.environ.get('CI', '').strip().lower() not in ('', '0', 'false', 'no'):
        return False
    if os.environ.get('TERM') == 'dumb':
        return False
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


class ProgressBar:
    """One rich ``Progress`` with a task per running loop (``train``, ``val``, ``test``)."""

    def __init__(self, logger: logging.Logger | None = None):
        self._logger = logger
        self._progress = None
        self._tasks: dict[str, int] = {}
        self._swapped: list = []

    def start_task(self, name: str, total: int | None, completed: int = 0) -> None:
        if self._progress is None:
            self._start()
        if name in self._tasks:
            self.end_task(name)
            if self._progress is None:
                self._start()
        self._tasks[name] = self._progress.add_task(name, total=total, completed=completed)

    def advance(self, name: str, n: int = 1) -> None:
        task = self._tasks.get(name)
        if task is not None:
            self._progress.advance(task, n)

    def end_task(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            self._progress.remove_task(task)
        if not self._tasks:
            self.close()

    def close(self) -> None:
        if self._progress is not None:
            try:
                self._progress.stop()
            finally:
                for handler, stream in self._swapped:
                    handler.setStream(stream)
                self._swapped = []
                self._progress = None
                self._tasks = {}

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        original = sys.stdout
        self._progress = Progress(TextColumn('[bold]{task.description}'), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                  console=Console(file=original), transient=True)
        self._progress.start()  # replaces sys.stdout with a proxy that prints above the bar
        if self._logger is not None and sys.stdout is not original:
            for h in self._logger.handlers:
                if type(h) is logging.StreamHandler and h.stream is original:
                    self._swapped.append((h, h.setStream(sys.stdout)))
